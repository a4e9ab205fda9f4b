//! Reading a shared state without the writer lock: a [`View`] copies what
//! it reads out of the region through a [`Region`] (atomic loads, never a
//! reference into memory another process writes), and checks every
//! offset, length and count it reads before using it, since a writer may
//! be changing those bytes as they are read. Whether what was read is a
//! committed state is decided after the read, by the commit word
//! (`SharedState::read`): a torn read is thrown away and done again.

use std::cell::Cell;
use std::marker::PhantomData;

use bytemuck::Pod;
use shm_snapshot::Region;

use crate::cell::check_cell;
use crate::error::{Error, Result};
use crate::format::{BLOCK_HEADER, Block, DY_ROOT, Kind, MAP_HEADER, VEC_HEADER, touches_atomics};
use crate::handle::{StateCell, StateMap, StateRing, StateVec};
use crate::map::{self, BYTES, DELETED, EMPTY, Item, TAG_BIT, field, slot_size};
use crate::ring::{self, RingEnd};
use crate::vec;

/// A consistent read of a shared state, inside
/// [`SharedState::read`](crate::SharedState::read): every value is
/// returned as a copy.
///
/// A view is valid only inside the closure it is passed to; what it
/// returns is kept only if no transaction committed meanwhile (otherwise
/// the closure runs again), so the closure should only read.
pub struct View<'a, R> {
    region: Region<'a>,
    heap: (u64, u64),
    /// The committed commit word this view reads under.
    word: u64,
    /// The last map header this handle validated, and under which word.
    cache: &'a Cell<Option<MapCache>>,
    _root: PhantomData<fn() -> R>,
}

/// A map header validated under a committed word: while the word is the
/// same, no transaction ran, so the header and its table block are what
/// they were (the word never takes a value twice: every transaction, rolled
/// back or not, consumes a sequence number). Read under a word that turned
/// out torn, the entry is keyed by a word that never comes back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MapCache {
    word: u64,
    off: u64,
    kinds: [u32; 4],
    header: map::Header,
}

impl<R> std::fmt::Debug for View<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View").field("heap", &self.heap).finish()
    }
}

/// Copies `buf.len()` bytes at `off`, after checking the range against
/// the region (and that it is not one of the atomic words).
fn read_into(region: &Region<'_>, what: &'static str, off: u64, buf: &mut [u8]) -> Result<()> {
    let len = buf.len() as u64;
    let end = off.checked_add(len);
    if end.is_none_or(|e| e > region.len() as u64) || touches_atomics(off, len) {
        return Err(Error::corrupt(
            what,
            off,
            format!(
                "{len} bytes at this offset are not in the readable region ({} bytes)",
                region.len()
            ),
        ));
    }
    region.read(off as usize, buf);
    Ok(())
}

pub(crate) fn read_u64(region: &Region<'_>, what: &'static str, off: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    read_into(region, what, off, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads and validates the block at `off`.
pub(crate) fn block(region: &Region<'_>, heap: (u64, u64), off: u64, kind: Kind) -> Result<Block> {
    Block::check_offset(heap, off)?;
    let mut h = [0u8; BLOCK_HEADER as usize];
    read_into(region, "block header", off, &mut h)?;
    Block::decode(heap, off, &h)?.of_kind(kind)
}

/// A buffer of `len` bytes for a copy, refusing sizes that could not be in
/// the region (a length read while a writer changed it).
fn buffer(region: &Region<'_>, what: &'static str, at: u64, len: u64) -> Result<Vec<u8>> {
    if len > region.len() as u64 {
        return Err(Error::corrupt(
            what,
            at,
            format!("{len} bytes, more than the region"),
        ));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len as usize)
        .map_err(|_| Error::TooLarge { what, len })?;
    v.resize(len as usize, 0);
    Ok(v)
}

impl<'a, R: Pod> View<'a, R> {
    pub(crate) fn new(
        region: Region<'a>,
        heap: (u64, u64),
        word: u64,
        cache: &'a Cell<Option<MapCache>>,
    ) -> View<'a, R> {
        View {
            region,
            heap,
            word,
            cache,
            _root: PhantomData,
        }
    }

    /// A copy of the root.
    pub fn root(&self) -> Result<R> {
        let off = read_u64(&self.region, "root offset", DY_ROOT)?;
        if off == 0 {
            return Err(Error::NullHandle { kind: "root" });
        }
        let b = block(&self.region, self.heap, off, Kind::Root)?.need(size_of::<R>() as u64)?;
        let mut bytes = vec![0u8; size_of::<R>()];
        read_into(&self.region, "root", b.payload(), &mut bytes)?;
        bytemuck::try_pod_read_unaligned(&bytes)
            .map_err(|e| Error::corrupt("root", b.payload(), format!("{e:?}")))
    }

    /// A copy of the value in a cell.
    pub fn cell<T: Pod>(&self, h: StateCell<T>) -> Result<T> {
        crate::cell::check_type::<T>("cell")?;
        let b = check_cell::<T>(block(&self.region, self.heap, h.off()?, Kind::Cell)?)?;
        let mut bytes = vec![0u8; size_of::<T>()];
        read_into(&self.region, "cell", b.payload(), &mut bytes)?;
        bytemuck::try_pod_read_unaligned(&bytes)
            .map_err(|e| Error::corrupt("cell", b.payload(), format!("{e:?}")))
    }

    fn vec_header<T: Pod>(&self, h: StateVec<T>) -> Result<vec::Header> {
        let b = block(&self.region, self.heap, h.off()?, Kind::Vec)?.need(VEC_HEADER)?;
        let mut raw = [0u8; VEC_HEADER as usize];
        read_into(&self.region, "vec header", b.payload(), &mut raw)?;
        let hd = vec::decode_header::<T>(&raw, b.payload())?;
        if hd.cap != 0 {
            block(&self.region, self.heap, hd.data, Kind::VecData)?
                .need(hd.cap * size_of::<T>() as u64)?;
        }
        Ok(hd)
    }

    /// The length of a vector.
    pub fn vec_len<T: Pod>(&self, h: StateVec<T>) -> Result<u64> {
        Ok(self.vec_header(h)?.len)
    }

    /// A copy of element `i` of a vector (`None` past its end).
    pub fn vec_get<T: Pod>(&self, h: StateVec<T>, i: u64) -> Result<Option<T>> {
        let hd = self.vec_header(h)?;
        if i >= hd.len {
            return Ok(None);
        }
        let size = size_of::<T>() as u64;
        let at = hd.data + BLOCK_HEADER + i * size;
        let mut bytes = vec![0u8; size as usize];
        read_into(&self.region, "vec element", at, &mut bytes)?;
        Ok(bytemuck::try_pod_read_unaligned(&bytes).ok())
    }

    /// A copy of a whole vector.
    pub fn vec<T: Pod>(&self, h: StateVec<T>) -> Result<Vec<T>> {
        let hd = self.vec_header(h)?;
        let at = hd.data + BLOCK_HEADER;
        let bytes_len = hd.len * size_of::<T>() as u64;
        let mut bytes = buffer(&self.region, "vec data", at, bytes_len)?;
        if hd.len != 0 {
            read_into(&self.region, "vec data", at, &mut bytes)?;
        }
        Ok(bytes
            .chunks_exact(size_of::<T>().max(1))
            .filter_map(|c| bytemuck::try_pod_read_unaligned(c).ok())
            .collect())
    }

    /// A map, its header and table checked (once per committed state: a
    /// view under the same commit as the last check reuses it).
    pub fn map<K: Item, V: Item>(&self, h: StateMap<K, V>) -> Result<MapView<'a, K, V>> {
        let off = h.off()?;
        let kinds = [K::KIND, K::SIZE, V::KIND, V::SIZE];
        let hd = match self.cache.get() {
            Some(c) if c.word == self.word && c.off == off && c.kinds == kinds => c.header,
            _ => {
                let hd = self.map_header::<K, V>(off)?;
                self.cache.set(Some(MapCache {
                    word: self.word,
                    off,
                    kinds,
                    header: hd,
                }));
                hd
            }
        };
        Ok(MapView {
            region: self.region,
            heap: self.heap,
            h: hd,
            copied: Cell::new(0),
            _t: PhantomData,
        })
    }

    fn map_header<K: Item, V: Item>(&self, off: u64) -> Result<map::Header> {
        let b = block(&self.region, self.heap, off, Kind::Map)?.need(MAP_HEADER)?;
        let mut raw = [0u8; MAP_HEADER as usize];
        read_into(&self.region, "map header", b.payload(), &mut raw)?;
        let hd = map::decode_header::<K, V>(&raw, b.payload())?;
        if hd.cap != 0 {
            block(&self.region, self.heap, hd.table, Kind::MapTable)?
                .need(hd.table_bytes::<K, V>())?;
        }
        Ok(hd)
    }
}

impl<'a, R: Pod> View<'a, R> {
    /// A ring's state: its frames, its bytes and who is attached.
    pub fn ring(&self, h: StateRing) -> Result<RingView> {
        let b = block(&self.region, self.heap, h.off()?, Kind::Ring)?;
        let hd = ring::header_via(b, |off, buf| {
            read_into(&self.region, "ring header", off, buf)
        })?;
        Ok(RingView { h: hd })
    }
}

/// A ring's state as a [`View`] read it.
#[derive(Debug, Clone, Copy)]
pub struct RingView {
    h: ring::Header,
}

impl RingView {
    /// Frames in the ring.
    pub fn len(&self) -> u64 {
        self.h.frames
    }

    /// True when the ring holds no frame.
    pub fn is_empty(&self) -> bool {
        self.h.frames == 0
    }

    /// Bytes free for frames (headers and padding included).
    pub fn free_bytes(&self) -> u64 {
        self.h.cap - (self.h.tail - self.h.head)
    }

    /// The largest frame the ring takes.
    pub fn max_frame(&self) -> u32 {
        self.h.max_frame
    }

    /// Whether the process recorded as the producer
    /// ([`RingMut::attach`](crate::RingMut::attach)) is alive: false when
    /// none is recorded or it died (a copied or restored state's
    /// producer, from another boot, counts as gone too).
    pub fn producer_alive(&self) -> bool {
        ring::alive(self.h.producer.0, self.h.producer.1)
    }

    /// Whether the process recorded as the consumer is alive.
    pub fn consumer_alive(&self) -> bool {
        ring::alive(self.h.consumer.0, self.h.consumer.1)
    }

    /// The pid recorded at `end` (`None`: no process ever attached there).
    pub fn attached(&self, end: RingEnd) -> Option<u32> {
        let pid = match end {
            RingEnd::Producer => self.h.producer.0,
            RingEnd::Consumer => self.h.consumer.0,
        };
        (pid != 0).then_some(pid)
    }

    /// Whether the process recorded at `end` is alive.
    pub fn alive(&self, end: RingEnd) -> bool {
        match end {
            RingEnd::Producer => self.producer_alive(),
            RingEnd::Consumer => self.consumer_alive(),
        }
    }

    /// The header as read (for the waiting calls, `shared::rings`).
    pub(crate) fn header(&self) -> &ring::Header {
        &self.h
    }

    /// Whether a frame of `len` bytes fits now (a push would take it):
    /// false for a frame longer than the largest.
    pub fn fits(&self, len: usize) -> bool {
        len as u64 <= u64::from(self.h.max_frame) && ring::room_for(&self.h, len as u64).is_some()
    }
}

/// A map inside a [`View`]: lookups return copies.
pub struct MapView<'a, K, V> {
    region: Region<'a>,
    heap: (u64, u64),
    h: map::Header,
    /// Bytes of byte strings copied so far (bounded in `entries`).
    copied: Cell<u64>,
    _t: PhantomData<(K, V)>,
}

impl<K, V> std::fmt::Debug for MapView<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapView")
            .field("len", &self.h.len)
            .field("cap", &self.h.cap)
            .finish()
    }
}

impl<K: Item, V: Item> MapView<'_, K, V> {
    /// The number of entries.
    pub fn len(&self) -> u64 {
        self.h.len
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> bool {
        self.h.len == 0
    }

    /// The byte string a slot's field at `at` names (a `Bytes` item).
    fn byte_string(&self, slot: &[u8], at: usize) -> Result<Vec<u8>> {
        let off = u64::from_le_bytes(slot[at..at + 8].try_into().expect("8"));
        let b = block(&self.region, self.heap, off, Kind::Bytes)?;
        let b = b.need(b.aux)?;
        let mut bytes = buffer(&self.region, "byte string", b.payload(), b.aux)?;
        read_into(&self.region, "byte string", b.payload(), &mut bytes)?;
        self.copied.set(self.copied.get().saturating_add(b.aux));
        Ok(bytes)
    }

    /// A copy of the item in a slot's field at `at`.
    fn item<I: Item>(&self, slot: &[u8], at: usize) -> Result<I::Owned> {
        let owned = if I::KIND == BYTES {
            I::owned(&self.byte_string(slot, at)?)
        } else {
            I::owned(&slot[at..at + I::SIZE as usize])
        };
        owned.ok_or_else(|| Error::corrupt("map slot", self.h.slots(), "unreadable item"))
    }

    /// Whether the key in a slot's field at 8 is `key` (a byte string of
    /// another length is not copied).
    fn same_key(&self, slot: &[u8], key: &[u8]) -> Result<bool> {
        if K::KIND != BYTES {
            return Ok(slot[8..8 + K::SIZE as usize] == *key);
        }
        let off = u64::from_le_bytes(slot[8..16].try_into().expect("8"));
        let b = block(&self.region, self.heap, off, Kind::Bytes)?;
        if b.aux != key.len() as u64 {
            return Ok(false);
        }
        Ok(self.byte_string(slot, 8)? == key)
    }

    /// Slot `i`'s control byte (a table with control bytes).
    fn ctrl(&self, i: u64) -> Result<u8> {
        let mut c = [0u8; 1];
        read_into(
            &self.region,
            "map control byte",
            self.h.ctrl_at() + i,
            &mut c,
        )?;
        Ok(c[0])
    }

    /// Slot `i`, copied into `slot`.
    fn slot(&self, i: u64, slot: &mut [u8]) -> Result<()> {
        let at = self.h.slots() + i * slot.len() as u64;
        read_into(&self.region, "map slot", at, slot)
    }

    /// A copy of the value for `key`.
    pub fn get(&self, key: &K::Borrowed) -> Result<Option<V::Owned>> {
        if self.h.cap == 0 {
            return Ok(None);
        }
        let kb = K::as_bytes(key);
        let tag = map::hash(kb) | TAG_BIT;
        let size = slot_size::<K, V>() as usize;
        // Small slots (most maps) are copied to the stack.
        let mut small = [0u8; 128];
        let mut large = Vec::new();
        let slot: &mut [u8] = if size <= small.len() {
            &mut small[..size]
        } else {
            large.resize(size, 0);
            &mut large
        };
        let mask = self.h.cap - 1;
        let mut i = tag & mask;
        // At most one pass over the table, however the slots change.
        for _ in 0..self.h.cap {
            if self.h.ctrl {
                match self.ctrl(i)? {
                    map::C_EMPTY => return Ok(None),
                    c if c != map::ctrl_of(tag) => {
                        i = (i + 1) & mask;
                        continue;
                    }
                    _ => {}
                }
            }
            self.slot(i, slot)?;
            let t = u64::from_le_bytes(slot[..8].try_into().expect("8"));
            if t == EMPTY && !self.h.ctrl {
                return Ok(None);
            }
            if t == tag && self.same_key(slot, kb)? {
                return Ok(Some(self.item::<V>(slot, 8 + field::<K>() as usize)?));
            }
            i = (i + 1) & mask;
        }
        Ok(None)
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: &K::Borrowed) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Copies of every entry, in table order.
    pub fn entries(&self) -> Result<Vec<(K::Owned, V::Owned)>> {
        let size = slot_size::<K, V>() as usize;
        let mut slot = vec![0u8; size];
        let mut out = Vec::new();
        // What a committed state can hold: the heap. A run that copies
        // more is reading bytes a writer is changing, and stops.
        let bound = self.heap.1 - self.heap.0;
        let mut copied = 0u64;
        for i in 0..self.h.cap {
            if self.h.ctrl {
                if self.ctrl(i)? < 0x80 {
                    continue;
                }
                self.slot(i, &mut slot)?;
            } else {
                self.slot(i, &mut slot)?;
                let t = u64::from_le_bytes(slot[..8].try_into().expect("8"));
                if t == EMPTY || t == DELETED {
                    continue;
                }
            }
            let k = self.item::<K>(&slot, 8)?;
            let v = self.item::<V>(&slot, 8 + field::<K>() as usize)?;
            copied += slot.len() as u64;
            if copied + self.copied.get() > bound.saturating_mul(2) {
                return Err(Error::corrupt(
                    "map table",
                    self.h.slots(),
                    "its entries hold more than the heap",
                ));
            }
            out.push((k, v));
            if out.len() as u64 > self.h.len {
                return Err(Error::corrupt(
                    "map header",
                    self.h.at,
                    format!("the table holds more than its {} entries", self.h.len),
                ));
            }
        }
        Ok(out)
    }
}
