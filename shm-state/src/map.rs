//! A hash map: open addressing with linear probing over one table block.
//!
//! Header block (48 bytes): `len u64, tombstones u64, cap u64, table u64,
//! key_kind u32, key_size u32, val_kind u32, val_size u32`. A slot is
//! `tag u64` (0 empty, 1 deleted, otherwise the key's hash with the top bit
//! set) followed by the key field and the value field: a POD value inline
//! (padded to 8 bytes) or, for [`Bytes`], the offset of a byte-string block
//! whose aux word is its length.
//!
//! A table with *control bytes* (format 7: [`CTRL_TABLE`] set in
//! `key_kind`) starts with one byte per slot, then the slots: the control
//! byte says whether the slot is empty (0), deleted (1) or live (the top
//! byte of its tag, 0x80..=0xFF), and a slot whose control byte is not live
//! holds no meaning. A probe reads the control bytes (`cap` bytes, where
//! the slots take `cap × 24` or more) and a slot only where its byte
//! matches the key's, and an insert writes a free slot without reading it
//! (nor journaling it: only its control byte is). Tables without control
//! bytes (maps of older formats) are read and written as they are until
//! their next rebuild.

use std::marker::PhantomData;

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::format::{BLOCK_HEADER, Block, Kind, MAP_HEADER, fmix, u64_at};
use crate::handle::StateMap;
use crate::journal::Journal;
use crate::mem::Mem;
use crate::state::{State, Tx};
use crate::tx::{KnownMap, TxCore};

mod sealed {
    pub trait Sealed {}
}

/// A key or value type a [`StateMap`] can hold: any [`Pod`] type of
/// alignment at most 8 (stored inline; `u128` and other 16-aligned types
/// are refused with [`Error::UnsupportedType`]) or [`Bytes`] (a byte string of any length).
pub trait Item: sealed::Sealed + 'static {
    /// What lookups take and return a reference to: `T` or `[u8]`.
    type Borrowed: ?Sized;
    /// What a shared state's reads return (a copy): `T` or `Vec<u8>`.
    type Owned;
    #[doc(hidden)]
    const KIND: u32;
    #[doc(hidden)]
    const SIZE: u32;
    #[doc(hidden)]
    const ALIGN: u32;
    #[doc(hidden)]
    fn as_bytes(v: &Self::Borrowed) -> &[u8];
    #[doc(hidden)]
    fn from_bytes(b: &[u8]) -> Option<&Self::Borrowed>;
    #[doc(hidden)]
    fn owned(b: &[u8]) -> Option<Self::Owned>;
}

/// Marks a byte-string key or value in a [`StateMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes;

const POD: u32 = 1;
pub(crate) const BYTES: u32 = 2;

impl<T: Pod> sealed::Sealed for T {}
impl<T: Pod> Item for T {
    type Borrowed = T;
    type Owned = T;
    const KIND: u32 = POD;
    const SIZE: u32 = size_of::<T>() as u32;
    const ALIGN: u32 = align_of::<T>() as u32;
    fn as_bytes(v: &T) -> &[u8] {
        bytemuck::bytes_of(v)
    }
    fn from_bytes(b: &[u8]) -> Option<&T> {
        bytemuck::try_from_bytes(b).ok()
    }
    fn owned(b: &[u8]) -> Option<T> {
        bytemuck::try_pod_read_unaligned(b).ok()
    }
}

impl sealed::Sealed for Bytes {}
impl Item for Bytes {
    type Borrowed = [u8];
    type Owned = Vec<u8>;
    const KIND: u32 = BYTES;
    const SIZE: u32 = 0;
    const ALIGN: u32 = 1;
    fn as_bytes(v: &[u8]) -> &[u8] {
        v
    }
    fn from_bytes(b: &[u8]) -> Option<&[u8]> {
        Some(b)
    }
    fn owned(b: &[u8]) -> Option<Vec<u8>> {
        Some(b.to_vec())
    }
}

/// The width of an item's field in a slot.
pub(crate) fn field<I: Item>() -> u64 {
    if I::KIND == BYTES {
        8
    } else {
        u64::from(I::SIZE).next_multiple_of(8)
    }
}

pub(crate) fn slot_size<K: Item, V: Item>() -> u64 {
    8 + field::<K>() + field::<V>()
}

pub(crate) const EMPTY: u64 = 0;
pub(crate) const DELETED: u64 = 1;
pub(crate) const TAG_BIT: u64 = 1 << 63;

/// In a map header's `key_kind`: the table starts with control bytes.
pub(crate) const CTRL_TABLE: u32 = 1 << 16;
/// Control bytes: an empty slot, a deleted one; a live slot's is
/// [`ctrl_of`] its tag.
pub(crate) const C_EMPTY: u8 = 0;
pub(crate) const C_DELETED: u8 = 1;

#[cfg(test)]
thread_local! {
    /// Tests: make tables as a build of format 6 or older does, without
    /// control bytes.
    pub(crate) static OLD_TABLES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether new tables get control bytes: in a region at format 7 (one
/// kept at an older format, because a peer of an older build shares it,
/// gets the tables that build reads), and not in tests that stand in for
/// an older build.
#[inline(always)]
fn ctrl_tables(journal: Journal) -> bool {
    #[cfg(test)]
    if OLD_TABLES.with(std::cell::Cell::get) {
        return false;
    }
    journal == Journal::Claimed
}

/// A live slot's control byte: its tag's top byte (0x80..=0xFF).
#[inline(always)]
pub(crate) fn ctrl_of(tag: u64) -> u8 {
    (tag >> 56) as u8
}

/// A fast, stable (same in every process and run) 64-bit hash. Inlined, so
/// that a fixed-size key's loop unrolls.
#[inline]
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    const P: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = (bytes.len() as u64).wrapping_mul(P);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8"));
        h = (h ^ w).wrapping_mul(P).rotate_left(31);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(P).rotate_left(31);
    }
    // murmur3's finalizer spreads the bits into the low ones we index by.
    fmix(h)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) at: u64,
    pub(crate) len: u64,
    pub(crate) tombs: u64,
    pub(crate) cap: u64,
    pub(crate) table: u64,
    /// The table starts with `cap` control bytes ([`CTRL_TABLE`]).
    pub(crate) ctrl: bool,
}

impl Header {
    /// Where the control bytes start (a table with control bytes).
    pub(crate) fn ctrl_at(&self) -> u64 {
        self.table + BLOCK_HEADER
    }

    /// Where the first slot starts.
    pub(crate) fn slots(&self) -> u64 {
        self.table + BLOCK_HEADER + if self.ctrl { self.cap } else { 0 }
    }

    /// The table's size in bytes (checked not to overflow when decoded).
    pub(crate) fn table_bytes<K: Item, V: Item>(&self) -> u64 {
        self.cap * slot_size::<K, V>() + if self.ctrl { self.cap } else { 0 }
    }

    /// The table's slots, `cap` of them (empty when there is no table).
    /// The size was checked against the table block by [`header`].
    #[inline(always)]
    fn table<'m, K: Item, V: Item>(&self, mem: &'m Mem) -> Result<&'m [u8]> {
        if self.cap == 0 {
            return Ok(&[]);
        }
        mem.bytes("map table", self.slots(), self.cap * slot_size::<K, V>())
    }

    /// The table's control bytes (empty without a table or without
    /// control bytes).
    #[inline(always)]
    fn ctrl_bytes<'m>(&self, mem: &'m Mem) -> Result<&'m [u8]> {
        if self.cap == 0 || !self.ctrl {
            return Ok(&[]);
        }
        mem.bytes("map control bytes", self.ctrl_at(), self.cap)
    }

    /// The same map with no entries and no table.
    fn emptied(&self) -> Header {
        Header {
            at: self.at,
            len: 0,
            tombs: 0,
            cap: 0,
            table: 0,
            ctrl: self.ctrl,
        }
    }
}

/// Whether slot `i` holds an entry: by its control byte, or (a table
/// without control bytes) by its tag. `ctrl` and `table` are a header's
/// [`Header::ctrl_bytes`] and [`Header::table`].
#[inline(always)]
fn is_live(ctrl: &[u8], table: &[u8], size: usize, i: usize) -> bool {
    if ctrl.is_empty() {
        let t = u64::from_le_bytes(table[i * size..][..8].try_into().expect("8"));
        t != EMPTY && t != DELETED
    } else {
        ctrl[i] >= 0x80
    }
}

fn check_item<I: Item>(what: &str) -> Result<()> {
    if I::KIND == POD {
        // Sizes and alignments are those of a Pod type T; see Item for T.
        if I::SIZE == 0 {
            return Err(Error::unsupported(format!(
                "map {what}: zero-sized types are not stored"
            )));
        }
        // Slots are 8-byte aligned: a more aligned item could be stored but
        // never viewed in place.
        if I::ALIGN > 8 {
            return Err(Error::unsupported(format!(
                "map {what}: alignment {} exceeds 8",
                I::ALIGN
            )));
        }
    }
    Ok(())
}

/// Reads and validates a map's header block and its table block. Inlined
/// (with [`decode_header`]): a `Result` returned through memory stalls the
/// caller's read of it on store forwarding.
#[inline(always)]
fn header<K: Item, V: Item>(mem: &Mem, heap: (u64, u64), off: u64) -> Result<Header> {
    Ok(header_blocks::<K, V>(mem, heap, off)?.0)
}

/// [`header`], and the map's block and table block (`None` without a
/// table).
#[inline(always)]
fn header_blocks<K: Item, V: Item>(
    mem: &Mem,
    heap: (u64, u64),
    off: u64,
) -> Result<(Header, Block, Option<Block>)> {
    let b = Block::expect(mem, heap, off, Kind::Map)?.need(MAP_HEADER)?;
    let h = read_header::<K, V>(mem, b.off)?;
    if h.cap == 0 {
        return Ok((h, b, None));
    }
    let t = Block::expect(mem, heap, h.table, Kind::MapTable)?.need(h.table_bytes::<K, V>())?;
    Ok((h, b, Some(t)))
}

/// A block header's first word, as [`Block::expect`] checked it: the kind
/// in the low half, the class in the high one.
#[inline(always)]
fn first_word(b: &Block) -> u64 {
    u64::from(b.kind as u32) | (u64::from(b.class) << 32)
}

/// Reads and validates the header of the map whose block (checked) is at
/// `off`.
#[inline(always)]
fn read_header<K: Item, V: Item>(mem: &Mem, off: u64) -> Result<Header> {
    let at = off + BLOCK_HEADER;
    let raw = mem.bytes("map header", at, MAP_HEADER)?;
    decode_header::<K, V>(raw.try_into().expect("48"), at)
}

/// [`header`] for a view in a transaction: when this handle checked the
/// map's block and table block in an earlier view and the check still
/// holds ([`KnownMap`]), their header words are compared with the ones it
/// checked instead; the map header itself is read and validated every
/// time. Anything else (another map, another table, a header word that
/// changed) takes the full check, which is remembered for the next view.
#[inline(always)]
fn tx_header<K: Item, V: Item>(tx: &mut TxCore<'_>, off: u64) -> Result<Header> {
    if let Some(k) = tx.core.known_map
        && k.map == off
    {
        let mem = tx.mem();
        // The block header and the map header after it, read at once.
        let raw = mem.bytes("map", off, BLOCK_HEADER + MAP_HEADER)?;
        let word = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8"));
        if word(raw) == k.map_word {
            let at = off + BLOCK_HEADER;
            let h = decode_header::<K, V>(raw[16..].try_into().expect("48"), at)?;
            if h.cap == 0
                || (h.table == k.table
                    && h.table_bytes::<K, V>() <= k.table_cap
                    && word(mem.bytes("block header", h.table, 8)?) == k.table_word)
            {
                return Ok(h);
            }
        }
    }
    let (h, b, t) = header_blocks::<K, V>(tx.mem(), tx.heap()?, off)?;
    tx.core.known_map = Some(KnownMap {
        seq: tx.seq(),
        map: off,
        map_word: first_word(&b),
        table: h.table,
        table_word: t.as_ref().map_or(0, first_word),
        table_cap: t.map_or(0, |t| t.capacity()),
    });
    Ok(h)
}

/// Validates a map header's fields (`raw`, read from the payload at `at`)
/// against the item types; the table block is the caller's to check.
#[inline(always)]
pub(crate) fn decode_header<K: Item, V: Item>(raw: &[u8; 48], at: u64) -> Result<Header> {
    check_item::<K>("key")?;
    check_item::<V>("value")?;
    let word = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8"));
    let half = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4"));
    let (len, tombs, cap, table) = (word(0), word(8), word(16), word(24));
    let ctrl = half(32) & CTRL_TABLE != 0;
    // Compared as two words read straight from the header (an array built
    // on the stack would be read back wide, stalling on store forwarding).
    let flag = u64::from(CTRL_TABLE);
    let want = |kind: u32, size: u32| u64::from(kind) | u64::from(size) << 32;
    if word(32) & !flag != want(K::KIND, K::SIZE) || word(40) != want(V::KIND, V::SIZE) {
        let kinds = [half(32) & !CTRL_TABLE, half(36), half(40), half(44)];
        return Err(Error::unsupported(format!(
            "the map holds (kind {}, size {}) -> (kind {}, size {}), the types asked for are \
             (kind {}, size {}) -> (kind {}, size {})",
            kinds[0],
            kinds[1],
            kinds[2],
            kinds[3],
            K::KIND,
            K::SIZE,
            V::KIND,
            V::SIZE
        )));
    }
    let bad = |p: String| Error::corrupt("map header", at, p);
    if cap == 0 {
        if table != 0 || len != 0 || tombs != 0 {
            return Err(bad("no table but entries or a table offset".into()));
        }
    } else {
        if !cap.is_power_of_two() {
            return Err(bad(format!("capacity {cap} is not a power of two")));
        }
        if len.checked_add(tombs).is_none_or(|n| n >= cap) {
            return Err(bad(format!(
                "{len} entries and {tombs} tombstones in {cap} slots"
            )));
        }
        cap.checked_mul(slot_size::<K, V>() + u64::from(ctrl))
            .ok_or_else(|| bad(format!("capacity {cap} overflows")))?;
    }
    Ok(Header {
        at,
        len,
        tombs,
        cap,
        table,
        ctrl,
    })
}

/// Reads the item field at byte `at` of `table` (whose first slot is at
/// region offset `slots`): a POD item in place, or the byte string its
/// offset names.
#[inline(always)]
fn item<'m, I: Item>(
    mem: &'m Mem,
    heap: (u64, u64),
    table: &'m [u8],
    slots: u64,
    at: usize,
) -> Result<&'m I::Borrowed> {
    let bytes = if I::KIND == BYTES {
        let off = u64::from_le_bytes(table[at..at + 8].try_into().expect("8"));
        let b = Block::expect(mem, heap, off, Kind::Bytes)?;
        let b = b.need(b.aux)?;
        mem.bytes("byte string", b.payload(), b.aux)?
    } else {
        &table[at..at + I::SIZE as usize]
    };
    I::from_bytes(bytes)
        .ok_or_else(|| Error::corrupt("map slot", slots + at as u64, "misaligned item"))
}

/// Where a probe for a key ended.
#[cfg_attr(test, derive(Debug, PartialEq))]
enum Probe {
    /// The key is in this slot.
    Found(u64),
    /// The key is absent; it would go in this slot, with whether the slot
    /// holds a tombstone (none: the table has no free slot, which only a
    /// damaged header allows).
    Vacant(Option<(u64, bool)>),
}

/// Probes for `key` (whose tag is `tag`) in `table` (the slots) and
/// `ctrl` (the control bytes, empty for a table without). Inlined, so that
/// a loop of gets overlaps the probes' cache misses.
#[inline(always)]
fn find<K: Item, V: Item>(
    mem: &Mem,
    heap: (u64, u64),
    h: &Header,
    ctrl: &[u8],
    table: &[u8],
    key: &[u8],
    tag: u64,
) -> Result<Probe> {
    if h.cap == 0 {
        return Ok(Probe::Vacant(None));
    }
    if !ctrl.is_empty() {
        return find_ctrl::<K, V>(mem, heap, h, ctrl, table, key, tag);
    }
    let size = slot_size::<K, V>() as usize;
    let mask = h.cap - 1;
    let mut i = tag & mask;
    let mut insert_at = None;
    for _ in 0..h.cap {
        let slot = &table[i as usize * size..][..size];
        let t = u64::from_le_bytes(slot[..8].try_into().expect("8"));
        if t == EMPTY {
            return Ok(Probe::Vacant(insert_at.or(Some((i, false)))));
        }
        if t == DELETED {
            insert_at.get_or_insert((i, true));
        } else if t == tag {
            // Hash and key share the slot (and usually its cache line).
            if slot_holds::<K>(mem, heap, h, table, slot, i, key)? {
                return Ok(Probe::Found(i));
            }
        }
        i = (i + 1) & mask;
    }
    Ok(Probe::Vacant(insert_at))
}

/// Whether slot `i` (its bytes `slot`, its tag already matched) holds
/// `key`: the key's bytes in the slot, or a byte string's in its block.
#[inline(always)]
fn slot_holds<K: Item>(
    mem: &Mem,
    heap: (u64, u64),
    h: &Header,
    table: &[u8],
    slot: &[u8],
    i: u64,
    key: &[u8],
) -> Result<bool> {
    Ok(if K::KIND == BYTES {
        let at = i as usize * slot.len() + 8;
        K::as_bytes(item::<K>(mem, heap, table, h.slots(), at)?) == key
    } else {
        slot[8..8 + K::SIZE as usize] == *key
    })
}

/// [`find`] over control bytes: a slot is read only where its control
/// byte is the key's.
#[inline(always)]
fn find_ctrl<K: Item, V: Item>(
    mem: &Mem,
    heap: (u64, u64),
    h: &Header,
    ctrl: &[u8],
    table: &[u8],
    key: &[u8],
    tag: u64,
) -> Result<Probe> {
    let size = slot_size::<K, V>() as usize;
    scan_ctrl(ctrl, tag, |j| {
        let slot = &table[j as usize * size..][..size];
        let t = u64::from_le_bytes(slot[..8].try_into().expect("8"));
        Ok(t == tag && slot_holds::<K>(mem, heap, h, table, slot, j, key)?)
    })
}

/// The probe over control bytes `ctrl` (a power of two of them: 8 or more
/// in any table this library makes; fewer, from a damaged header, are read
/// wrapping and give the same outcome) for a key of tag `tag`, `holds(j)` telling whether slot `j`, whose
/// control byte is the tag's, holds the key: from slot `tag & mask` on,
/// wrapping, up to the first empty slot, the first slot that holds the
/// key, else the first tombstone or that empty slot. The bytes are
/// scanned eight at a time (one word, tested for the three values that
/// matter with the usual zero-byte trick), with the same outcome and the
/// same calls of `holds`, in the same order, as one byte at a time.
#[inline(always)]
fn scan_ctrl(ctrl: &[u8], tag: u64, mut holds: impl FnMut(u64) -> Result<bool>) -> Result<Probe> {
    let cap = ctrl.len() as u64;
    let mask = cap - 1;
    let want = ctrl_of(tag);
    let mut i = tag & mask;
    let mut insert_at = None;
    // `cap / 8` groups of eight visit every slot once (a table under 8
    // bytes: one group, its bytes repeated).
    for _ in 0..cap.div_ceil(8) {
        let group = ctrl_group(ctrl, i as usize);
        // Bytes before the first empty one (all eight if none is).
        let empty = zero_bytes(group);
        let before = if empty == 0 {
            u64::MAX
        } else {
            // The lowest flagged byte is exactly the first empty one.
            (empty & empty.wrapping_neg()) - 1
        };
        // Flags above a true match can be false: each is checked.
        let mut hits = zero_bytes(group ^ (ONES * u64::from(want))) & before;
        while hits != 0 {
            let j = (i + u64::from(hits.trailing_zeros() / 8)) & mask;
            hits &= hits - 1;
            if ctrl[j as usize] == want && holds(j)? {
                return Ok(Probe::Found(j));
            }
        }
        if insert_at.is_none() {
            let dead = zero_bytes(group ^ (ONES * u64::from(C_DELETED))) & before;
            if dead != 0 {
                insert_at = Some(((i + u64::from(dead.trailing_zeros() / 8)) & mask, true));
            }
        }
        if empty != 0 {
            let j = (i + u64::from(empty.trailing_zeros() / 8)) & mask;
            return Ok(Probe::Vacant(insert_at.or(Some((j, false)))));
        }
        i = (i + 8) & mask;
    }
    Ok(Probe::Vacant(insert_at))
}

/// The control bytes `i..i+8` (wrapping past the end) as a little-endian
/// word: byte `k` of the word is slot `i + k`'s.
#[inline(always)]
fn ctrl_group(ctrl: &[u8], i: usize) -> u64 {
    match ctrl.get(i..i + 8) {
        Some(b) => u64::from_le_bytes(b.try_into().expect("8")),
        None => (0..8).rev().fold(0u64, |w, k| {
            (w << 8) | u64::from(ctrl[(i + k) & (ctrl.len() - 1)])
        }),
    }
}

/// The top bit of each byte of `x` that may be zero: the lowest flagged
/// byte is exactly the lowest zero byte; flags above it may be false.
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & (ONES << 7)
}

/// A one in every byte of a word: `ONES * b` is byte `b` eight times.
const ONES: u64 = 0x0101_0101_0101_0101;

/// A map for reading, borrowed from a [`State`]. Its header and table are
/// validated once, when the view is made.
#[derive(Debug)]
pub struct MapRef<'a, K, V> {
    mem: &'a Mem,
    heap: (u64, u64),
    h: Header,
    /// The control bytes (empty for a table without).
    ctrl: &'a [u8],
    /// The slots.
    table: &'a [u8],
    _t: PhantomData<(K, V)>,
}

impl<'a, K: Item, V: Item> MapRef<'a, K, V> {
    fn new(mem: &'a Mem, heap: (u64, u64), h: Header) -> Result<Self> {
        Ok(MapRef {
            mem,
            heap,
            h,
            ctrl: h.ctrl_bytes(mem)?,
            table: h.table::<K, V>(mem)?,
            _t: PhantomData,
        })
    }

    /// The number of entries.
    pub fn len(&self) -> u64 {
        self.h.len
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> bool {
        self.h.len == 0
    }

    /// The value for `key`, read in place. Inlined: a caller's loop of
    /// lookups then overlaps their cache misses, and the `Result` does not
    /// go through memory.
    #[inline(always)]
    pub fn get(&self, key: &K::Borrowed) -> Result<Option<&'a V::Borrowed>> {
        let kb = K::as_bytes(key);
        let tag = hash(kb) | TAG_BIT;
        match find::<K, V>(self.mem, self.heap, &self.h, self.ctrl, self.table, kb, tag)? {
            Probe::Found(i) => {
                let at = (i * slot_size::<K, V>() + 8 + field::<K>()) as usize;
                Ok(Some(item::<V>(
                    self.mem,
                    self.heap,
                    self.table,
                    self.h.slots(),
                    at,
                )?))
            }
            Probe::Vacant(_) => Ok(None),
        }
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: &K::Borrowed) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The entry in slot `i`, if the slot holds one.
    fn entry(&self, i: u64) -> Result<Option<(&'a K::Borrowed, &'a V::Borrowed)>> {
        let size = slot_size::<K, V>() as usize;
        let at = i as usize * size;
        if !is_live(self.ctrl, self.table, size, i as usize) {
            return Ok(None);
        }
        let slots = self.h.slots();
        let k = item::<K>(self.mem, self.heap, self.table, slots, at + 8)?;
        let v = item::<V>(
            self.mem,
            self.heap,
            self.table,
            slots,
            at + 8 + field::<K>() as usize,
        )?;
        Ok(Some((k, v)))
    }

    /// Every entry, in table order. Each item is checked as it is read.
    pub fn iter(&self) -> impl Iterator<Item = Result<(&'a K::Borrowed, &'a V::Borrowed)>> + 'a {
        let this = *self;
        (0..self.h.cap).filter_map(move |i| this.entry(i).transpose())
    }

    /// Checks the whole table: every tag matches its key's hash, every byte
    /// string is valid, and the counts agree with the header.
    pub fn verify(&self) -> Result<()> {
        let size = slot_size::<K, V>();
        let (mut live, mut dead) = (0u64, 0u64);
        for i in 0..self.h.cap {
            let at = (i * size) as usize;
            let tag = u64::from_le_bytes(self.table[at..at + 8].try_into().expect("8"));
            let state = match self.ctrl.get(i as usize) {
                None => tag,
                Some(&C_EMPTY) => EMPTY,
                Some(&C_DELETED) => DELETED,
                Some(&c) if c >= 0x80 && ctrl_of(tag) == c => tag,
                Some(&c) => {
                    return Err(Error::corrupt(
                        "map control byte",
                        self.h.ctrl_at() + i,
                        format!("{c:#04x} is not the byte of its slot's tag {tag:#x}"),
                    ));
                }
            };
            match state {
                EMPTY => {}
                DELETED => dead += 1,
                tag => {
                    let (k, _) = self.entry(i)?.expect("a live slot");
                    if hash(K::as_bytes(k)) | TAG_BIT != tag {
                        return Err(Error::corrupt(
                            "map slot",
                            self.h.slots() + at as u64,
                            "tag does not match the key",
                        ));
                    }
                    live += 1;
                }
            }
        }
        if live != self.h.len || dead != self.h.tombs {
            return Err(Error::corrupt(
                "map header",
                self.h.at,
                format!(
                    "header counts {} entries and {} tombstones, the table holds {live} and {dead}",
                    self.h.len, self.h.tombs
                ),
            ));
        }
        Ok(())
    }
}

impl<K, V> Clone for MapRef<'_, K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for MapRef<'_, K, V> {}

impl<R: Pod> State<R> {
    /// A map, for reading in place.
    #[inline]
    pub fn map<K: Item, V: Item>(&self, h: StateMap<K, V>) -> Result<MapRef<'_, K, V>> {
        let heap = self.core.heap()?;
        let hd = header::<K, V>(&self.core.mem, heap, h.off()?)?;
        MapRef::new(&self.core.mem, heap, hd)
    }
}

impl<'s, R: Pod> Tx<'s, R> {
    /// Creates an empty map.
    pub fn new_map<K: Item, V: Item>(&mut self) -> Result<StateMap<K, V>> {
        check_item::<K>("key")?;
        check_item::<V>("value")?;
        let mut w = [0u8; 16];
        let flag = if ctrl_tables(self.core.core.journal) {
            CTRL_TABLE
        } else {
            0
        };
        for (i, v) in [K::KIND | flag, K::SIZE, V::KIND, V::SIZE]
            .into_iter()
            .enumerate()
        {
            w[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        self.core.op(|core| {
            let b = core.alloc(Kind::Map, MAP_HEADER, true)?;
            core.write("map header", b.payload() + 32, &w)?;
            Ok(StateMap::from_off(b.off))
        })
    }

    /// A map, for reading and changing in this transaction. Its header is
    /// validated here, once: the view is the map's only writer while it
    /// lives and keeps its copy of the header up to date. The map's block
    /// and table block are checked fully by the first view of the map in
    /// this handle; later views compare their header words, and check them
    /// fully again once they may have moved (see `docs/state-format.md`,
    /// *Validation*).
    // Inlined: the view would come back through memory, and the caller's
    // first wide load of it stall on store forwarding.
    #[inline(always)]
    pub fn map<K: Item, V: Item>(&mut self, h: StateMap<K, V>) -> Result<MapMut<'_, 's, K, V>> {
        let off = h.off()?;
        let hd = tx_header::<K, V>(&mut self.core, off)?;
        Ok(MapMut {
            tx: &mut self.core,
            off,
            h: hd,
            stale: false,
            fresh_table: (0, false),
            _t: PhantomData,
        })
    }
}

/// A map inside a transaction.
///
/// The view holds the map's validated header and updates it with its own
/// writes (nothing else can write the map while the view borrows the
/// transaction). After a failed operation it reads and validates the header
/// again from the region before going on.
#[derive(Debug)]
pub struct MapMut<'t, 's, K, V> {
    tx: &'t mut TxCore<'s>,
    off: u64,
    h: Header,
    /// An operation failed part way: `h` must be read again.
    stale: bool,
    /// A table block and whether it was allocated in this transaction
    /// (which cannot change while the transaction runs): asked once per
    /// table, not per insert.
    fresh_table: (u64, bool),
    _t: PhantomData<(K, V)>,
}

/// A slot's bytes being built: on the stack when small.
struct SlotBuf {
    stack: [u8; 128],
    heap: Vec<u8>,
    len: usize,
}

impl SlotBuf {
    #[inline(always)]
    fn new(len: usize) -> SlotBuf {
        SlotBuf {
            stack: [0; 128],
            heap: if len > 128 { vec![0; len] } else { Vec::new() },
            len,
        }
    }

    #[inline(always)]
    fn bytes(&mut self) -> &mut [u8] {
        if self.len > 128 {
            &mut self.heap
        } else {
            &mut self.stack[..self.len]
        }
    }
}

impl<K: Item, V: Item> MapMut<'_, '_, K, V> {
    /// The header as it is in the region now.
    fn current(&self) -> Result<Header> {
        if self.stale {
            header::<K, V>(self.tx.mem(), self.tx.heap()?, self.off)
        } else {
            Ok(self.h)
        }
    }

    /// Runs a changing operation on an up-to-date header; a failure marks
    /// the cached header stale, and, if the operation had changed something,
    /// fails the transaction (see `TxCore::settle`).
    #[inline(always)]
    fn changing<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.stale {
            self.h = self.current()?;
            self.stale = false;
        }
        let before = self.tx.changes();
        // `Ok` is rebuilt rather than the result moved: a `Result` holding
        // the large `Error` would be copied in wide loads right after the
        // operation's narrow stores of it, which stall on store forwarding.
        match op(self) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.failed(before, e)),
        }
    }

    /// A changing operation that started at `before` failed with `e`.
    #[cold]
    #[inline(never)]
    fn failed(&mut self, before: u64, e: Error) -> Error {
        self.stale = true;
        self.tx.settle_err(before, &e);
        e
    }

    /// The number of entries.
    pub fn len(&self) -> Result<u64> {
        Ok(self.current()?.len)
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The value for `key`.
    pub fn get(&self, key: &K::Borrowed) -> Result<Option<&V::Borrowed>> {
        self.as_ref()?.get(key)
    }

    /// A read view of the whole map as it is in this transaction.
    pub fn as_ref(&self) -> Result<MapRef<'_, K, V>> {
        MapRef::new(self.tx.mem(), self.tx.heap()?, self.current()?)
    }

    /// Probes for `key` in the map as it is now.
    #[inline(always)]
    fn probe(&self, h: &Header, key: &[u8], tag: u64) -> Result<Probe> {
        let mem = self.tx.mem();
        let heap = if K::KIND == BYTES {
            self.tx.heap()?
        } else {
            (0, 0) // POD keys are compared in the slot: no block is read.
        };
        find::<K, V>(
            mem,
            heap,
            h,
            h.ctrl_bytes(mem)?,
            h.table::<K, V>(mem)?,
            key,
            tag,
        )
    }

    /// Fills `out` (an item's field in a slot, zeroed) with the item,
    /// allocating its byte string if it has one.
    fn encode<I: Item>(&mut self, v: &I::Borrowed, out: &mut [u8]) -> Result<()> {
        let bytes = I::as_bytes(v);
        if I::KIND == BYTES {
            let b = self.tx.alloc(Kind::Bytes, bytes.len() as u64, false)?;
            self.tx.write("byte string", b.payload(), bytes)?;
            out[..8].copy_from_slice(&b.off.to_le_bytes());
        } else {
            out[..bytes.len()].copy_from_slice(bytes);
        }
        Ok(())
    }

    /// Writes slot `i`'s control byte, journaling the aligned 8 bytes
    /// around it (one small record then covers the neighbours' bytes too,
    /// and is read and checked in whole words).
    fn write_ctrl(&mut self, h: &Header, i: u64, c: u8) -> Result<()> {
        let at = h.ctrl_at() + i;
        self.tx.prepare(at & !7, 8)?;
        // Journaled just now (or fresh, or journaled earlier).
        self.tx.write_tail("map control byte", at, &[c])
    }

    /// Frees an item's byte string, if it has one.
    fn release<I: Item>(&mut self, at: u64) -> Result<()> {
        if I::KIND == BYTES {
            let off = u64_at(self.tx.mem(), "map slot", at)?;
            self.tx.free(off, Kind::Bytes)?;
        }
        Ok(())
    }

    /// Grows (or cleans) the table so that one more entry fits; returns the
    /// new header if the table was rebuilt.
    fn make_room(&mut self, h: Header) -> Result<Option<Header>> {
        if h.cap != 0 && (h.len + h.tombs + 1) * 8 <= h.cap * 7 {
            return Ok(None);
        }
        let new_cap = if (h.len + 1) * 2 > h.cap {
            (h.cap * 2).max(8)
        } else {
            h.cap
        };
        let size = slot_size::<K, V>();
        // A table with control bytes: `new_cap` of them, then the slots.
        let with_ctrl = ctrl_tables(self.tx.core.journal);
        let bytes = new_cap
            .checked_mul(size + u64::from(with_ctrl))
            .ok_or(Error::TooLarge {
                what: "map table",
                len: u64::MAX,
            })?;
        // Every live slot is checked before anything changes: a damaged
        // table fails the insert with the transaction still able to commit.
        if h.cap > 0 {
            let mem = self.tx.mem();
            let (old_ctrl, old) = (h.ctrl_bytes(mem)?, h.table::<K, V>(mem)?);
            let size = size as usize;
            for (j, slot) in old.chunks_exact(size).enumerate() {
                if !is_live(old_ctrl, old, size, j) {
                    continue;
                }
                let tag = u64::from_le_bytes(slot[..8].try_into().expect("8"));
                if tag & TAG_BIT == 0 || old_ctrl.get(j).is_some_and(|&c| c != ctrl_of(tag)) {
                    return Err(Error::corrupt(
                        "map slot",
                        h.slots() + (j * size) as u64,
                        format!("a live slot with tag {tag:#x}"),
                    ));
                }
            }
        }
        // The new table is built in its block (allocated in this
        // transaction, so not part of the committed state: written
        // without journaling), the live slots placed in it straight from
        // the old table. Only what says "empty" is zeroed: the control
        // bytes, or, in a table without them, every slot (the tag).
        // A slot whose control byte is not live holds no meaning
        // (docs/state-format.md, *Map slots*).
        let block = self.tx.alloc(Kind::MapTable, bytes, false)?;
        let ctrl_len = if with_ctrl { new_cap as usize } else { 0 };
        let (old_ctrl_at, old_bytes) = if h.cap > 0 {
            (h.ctrl_at(), h.table_bytes::<K, V>())
        } else {
            (0, 0)
        };
        // The block with its header: a free block forged over the old
        // table's end (its header, just written by `alloc`, would lie in
        // bytes already checked) is refused as an overlap.
        let (old_all, whole) = self.tx.core.mem.split_pair(
            "map table",
            (old_ctrl_at, old_bytes),
            (block.off, BLOCK_HEADER + bytes),
        )?;
        let (ctrl, slots) = whole[BLOCK_HEADER as usize..].split_at_mut(ctrl_len);
        if with_ctrl {
            ctrl.fill(C_EMPTY);
        } else {
            slots.fill(0);
        }
        if h.cap > 0 {
            let old_ctrl_len = if h.ctrl { h.cap as usize } else { 0 };
            let (old_ctrl, old) = old_all.split_at(old_ctrl_len);
            let mask = new_cap - 1;
            let size = size as usize;
            for (j, slot) in old.chunks_exact(size).enumerate() {
                if !is_live(old_ctrl, old, size, j) {
                    continue;
                }
                let tag = u64::from_le_bytes(slot[..8].try_into().expect("8"));
                // Ends: at most `h.cap <= new_cap` slots are placed.
                let mut i = (tag & mask) as usize;
                while if with_ctrl {
                    ctrl[i] != C_EMPTY
                } else {
                    slots[i * size..][..8] != [0; 8]
                } {
                    i = (i + 1) & mask as usize;
                }
                if with_ctrl {
                    ctrl[i] = ctrl_of(tag);
                }
                slots[i * size..][..size].copy_from_slice(slot);
            }
        }
        if h.table != 0 {
            self.tx.free(h.table, Kind::MapTable)?;
        }
        // tombstones, cap, table and the key kind with the control flag.
        let mut w = [0u8; 28];
        w[8..16].copy_from_slice(&new_cap.to_le_bytes());
        w[16..24].copy_from_slice(&block.off.to_le_bytes());
        let flag = if with_ctrl { CTRL_TABLE } else { 0 };
        w[24..28].copy_from_slice(&(K::KIND | flag).to_le_bytes());
        self.tx.write("map header", h.at + 8, &w)?;
        // Read back through the validation, like any header.
        Ok(Some(header::<K, V>(
            self.tx.mem(),
            self.tx.heap()?,
            self.off,
        )?))
    }

    /// Inserts or replaces the value for `key`; returns true if it replaced
    /// one.
    pub fn insert(&mut self, key: &K::Borrowed, value: &V::Borrowed) -> Result<bool> {
        self.changing(|m| m.insert_now(key, value))
    }

    fn insert_now(&mut self, key: &K::Borrowed, value: &V::Borrowed) -> Result<bool> {
        let kb = K::as_bytes(key);
        let tag = hash(kb) | TAG_BIT;
        let size = slot_size::<K, V>();
        let h = self.h;
        let vacant = match self.probe(&h, kb, tag)? {
            Probe::Found(i) => {
                let at = h.slots() + i * size + 8 + field::<K>();
                // The new value first: if it cannot be stored, the old one
                // must not have been queued for freeing.
                let mut buf = SlotBuf::new(field::<V>() as usize);
                self.encode::<V>(value, buf.bytes())?;
                self.release::<V>(at)?;
                self.tx.write("map slot", at, buf.bytes())?;
                return Ok(true);
            }
            Probe::Vacant(i) => i,
        };
        let (h, vacant) = match self.make_room(h)? {
            // The table is as probed: its free slot stands.
            None => (h, vacant),
            Some(grown) => {
                self.h = grown;
                match self.probe(&grown, kb, tag)? {
                    Probe::Vacant(i) => (grown, i),
                    Probe::Found(_) => {
                        return Err(Error::corrupt(
                            "map table",
                            grown.at,
                            "the key appeared while growing",
                        ));
                    }
                }
            }
        };
        let Some((i, reused)) = vacant else {
            return Err(Error::corrupt(
                "map table",
                h.at,
                "no free slot although the header counts room",
            ));
        };
        let at = h.slots() + i * size;
        let Some(tombs) = h.tombs.checked_sub(u64::from(reused)) else {
            return Err(Error::corrupt(
                "map header",
                h.at,
                "counts no tombstones, but the table holds one",
            ));
        };
        let mut buf = SlotBuf::new(size as usize);
        let slot = buf.bytes();
        slot[..8].copy_from_slice(&tag.to_le_bytes());
        let (k_field, v_field) = slot[8..].split_at_mut(field::<K>() as usize);
        self.encode::<K>(key, k_field)?;
        self.encode::<V>(value, v_field)?;
        if h.ctrl && self.fresh_table.0 != h.table {
            let fresh = self.tx.is_fresh(h.ctrl_at(), h.table_bytes::<K, V>());
            self.fresh_table = (h.table, fresh);
        }
        if h.ctrl && self.fresh_table.1 {
            // A table made in this transaction: nothing to journal.
            self.tx.write_tail("map slot", at, buf.bytes())?;
            self.tx
                .write_tail("map control byte", h.ctrl_at() + i, &[ctrl_of(tag)])?;
        } else if h.ctrl {
            let c = h.ctrl_at() + i;
            // A free slot means nothing to the committed state when its
            // control byte is as committed (this transaction has not
            // journaled it: it did not free the slot itself), so its
            // bytes need no before-image: the slot is not even read. What
            // needs journaling is journaled before anything is written, so
            // that a full journal fails the insert before it changed
            // anything.
            let committed_free = !self.tx.may_have_written_byte(c);
            if !committed_free {
                self.tx.prepare(at, size)?;
            }
            self.write_ctrl(&h, i, ctrl_of(tag))?;
            if committed_free {
                self.tx.write_tail("map slot", at, buf.bytes())?;
            } else {
                self.tx.write("map slot", at, buf.bytes())?;
            }
        } else {
            self.tx.write("map slot", at, buf.bytes())?;
        }
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&(h.len + 1).to_le_bytes());
        w[8..].copy_from_slice(&tombs.to_le_bytes());
        self.tx.write("map header", h.at, &w)?;
        self.h = Header {
            len: h.len + 1,
            tombs,
            ..h
        };
        Ok(false)
    }

    /// Removes `key`; returns true if it was present.
    pub fn remove(&mut self, key: &K::Borrowed) -> Result<bool> {
        self.changing(|m| m.remove_now(key))
    }

    fn remove_now(&mut self, key: &K::Borrowed) -> Result<bool> {
        let kb = K::as_bytes(key);
        let tag = hash(kb) | TAG_BIT;
        let size = slot_size::<K, V>();
        let h = self.h;
        let Probe::Found(i) = self.probe(&h, kb, tag)? else {
            return Ok(false);
        };
        let Some(len) = h.len.checked_sub(1) else {
            return Err(Error::corrupt(
                "map header",
                h.at,
                "counts no entries, but the table holds one",
            ));
        };
        let at = h.slots() + i * size;
        self.release::<K>(at + 8)?;
        self.release::<V>(at + 8 + field::<K>())?;
        // A slot followed by an empty one ends every probe chain through it,
        // so it can become empty instead of a tombstone.
        let next = (i + 1) & (h.cap - 1);
        let ends_chain = if h.ctrl {
            self.tx
                .mem()
                .bytes("map control byte", h.ctrl_at() + next, 1)?[0]
                == C_EMPTY
        } else {
            u64_at(self.tx.mem(), "map slot", h.slots() + next * size)? == EMPTY
        };
        let (mark, tombs) = if ends_chain {
            (EMPTY, h.tombs)
        } else {
            (DELETED, h.tombs + 1)
        };
        if h.ctrl {
            // The control byte alone: the slot's bytes then mean nothing.
            self.write_ctrl(&h, i, mark as u8)?;
        } else {
            self.tx.write_u64("map slot", at, mark)?;
        }
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&len.to_le_bytes());
        w[8..].copy_from_slice(&tombs.to_le_bytes());
        self.tx.write("map header", h.at, &w)?;
        self.h = Header { len, tombs, ..h };
        Ok(true)
    }

    /// Removes every entry and frees the table.
    pub fn clear(&mut self) -> Result<()> {
        self.changing(|m| m.clear_now())
    }

    fn clear_now(&mut self) -> Result<()> {
        let h = self.h;
        let size = slot_size::<K, V>();
        if K::KIND == BYTES || V::KIND == BYTES {
            for i in 0..h.cap {
                let at = h.slots() + i * size;
                let live = if h.ctrl {
                    self.tx
                        .mem()
                        .bytes("map control byte", h.ctrl_at() + i, 1)?[0]
                        >= 0x80
                } else {
                    let tag = u64_at(self.tx.mem(), "map slot", at)?;
                    tag != EMPTY && tag != DELETED
                };
                if live {
                    self.release::<K>(at + 8)?;
                    self.release::<V>(at + 8 + field::<K>())?;
                }
            }
        }
        if h.table != 0 {
            self.tx.free(h.table, Kind::MapTable)?;
        }
        // Empty again: no table at all.
        self.tx.write("map header", h.at, &[0u8; 32])?;
        self.h = h.emptied();
        Ok(())
    }

    /// Frees the map. Its handle (and copies) must not be used again.
    pub fn free(mut self) -> Result<()> {
        self.changing(|m| {
            m.clear_now()?;
            m.tx.free(m.off, Kind::Map)
        })
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;
    use proptest::prelude::*;

    /// The probe one control byte at a time, as format 7 defines it.
    fn scan_bytewise(ctrl: &[u8], tag: u64, holds: impl Fn(u64) -> bool) -> Probe {
        let mask = ctrl.len() as u64 - 1;
        let want = ctrl_of(tag);
        let mut i = tag & mask;
        let mut insert_at = None;
        for _ in 0..ctrl.len() {
            let c = ctrl[i as usize];
            if c == C_EMPTY {
                return Probe::Vacant(insert_at.or(Some((i, false))));
            }
            if c == C_DELETED {
                insert_at.get_or_insert((i, true));
            } else if c == want && holds(i) {
                return Probe::Found(i);
            }
            i = (i + 1) & mask;
        }
        Probe::Vacant(insert_at)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]
        /// The word-at-a-time probe ends where the byte-at-a-time one does,
        /// and asks `holds` about the same slots in the same order, for
        /// every table size (1 to 64 bytes, as a damaged header may give),
        /// start (wrapping included) and mix of bytes.
        #[test]
        fn scan_matches_bytewise(
            shift in 0u32..7,
            tag_low in any::<u64>(),
            want in 0x80u8..=0xFF,
            bytes in proptest::collection::vec(any::<u8>(), 64),
            picks in proptest::collection::vec(0usize..6, 64),
            keys in proptest::collection::vec(any::<bool>(), 64),
        ) {
            let cap = 1usize << shift;
            // Mostly the values the word tests could confuse: empty,
            // deleted, the key's byte, and bytes one bit from them (a zero
            // byte's borrow flags the byte above it when that one is 1).
            let choices = [C_EMPTY, C_DELETED, want, want ^ 1, C_DELETED ^ 1, 0];
            let ctrl: Vec<u8> = (0..cap).map(|k| if picks[k] == 5 { bytes[k] | 0x80 } else { choices[picks[k]] }).collect();
            let tag = (u64::from(want) << 56) | (tag_low & ((1 << 56) - 1)) | TAG_BIT;
            let holds = |j: u64| keys[j as usize];
            let asked = std::cell::RefCell::new(Vec::new());
            let fast = scan_ctrl(&ctrl, tag, |j| {
                asked.borrow_mut().push(j);
                Ok(holds(j))
            })
            .unwrap();
            let asked_slow = std::cell::RefCell::new(Vec::new());
            let slow = scan_bytewise(&ctrl, tag, |j| {
                asked_slow.borrow_mut().push(j);
                holds(j)
            });
            prop_assert_eq!(fast, slow, "ctrl {:02x?} start {}", ctrl, tag & (cap as u64 - 1));
            if cap >= 8 {
                prop_assert_eq!(asked.into_inner(), asked_slow.into_inner());
            }
        }
    }
}
