//! A ring of variable-length frames: a single producer and a single
//! consumer, usually in two processes sharing a state
//! ([`SharedState`](crate::SharedState)).
//!
//! The ring is part of the state like any structure: its head and tail
//! move inside transactions, so a consumer that takes a frame **and**
//! applies its effect in one transaction, or a producer that pushes a
//! frame in the same transaction as its own state change, is exactly once
//! across kill -9 at any instruction: the journal rolls back the move of
//! the index together with the effect, or neither happened.
//!
//! Ring block (kind 11), payload: a 64-byte header, then `cap` data bytes.
//!
//! | offset | size | field |
//! |---|---|---|
//! | +0 | 8 | head: bytes the consumer has taken, ever |
//! | +8 | 8 | tail: bytes the producer has pushed, ever |
//! | +16 | 8 | frames in the ring |
//! | +24 | 8 | cap: data bytes, a multiple of 8 |
//! | +32 | 4 | max_frame: the largest frame, at most `cap - 8` |
//! | +36 | 4 | flags, 0 |
//! | +40 | 4 | producer pid (0: none attached) |
//! | +44 | 4 | consumer pid |
//! | +48 | 8 | producer start time |
//! | +56 | 8 | consumer start time |
//!
//! A frame at data offset `tail % cap`: `len u32`, `check u32` (`len ^
//! 0xF00DFEED`), then `len` bytes, zero-padded to 8. A frame never splits
//! across the end of the data: when it does not fit before the end, a wrap
//! marker (`len = 0xFFFFFFFF`, with its check) fills the rest and the frame
//! starts at offset 0. Frame bytes are written unjournaled (they lie past
//! the committed tail, where a rollback leaves them unreachable), except
//! where they reach the space of frames the same transaction popped
//! (logical offsets from the committed head plus `cap` on), which a
//! rollback brings back.

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::format::{Block, Kind};
use crate::handle::StateRing;
use crate::mem::Mem;
use crate::state::Tx;
use crate::tx::TxCore;

/// The ring header's payload size.
pub(crate) const RING_HEADER: u64 = 64;
const FRAME_HEADER: u64 = 8;
const CHECK: u32 = 0xF00D_FEED;
const WRAP: u32 = u32::MAX;

/// A ring's header, validated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) at: u64,
    pub(crate) head: u64,
    pub(crate) tail: u64,
    pub(crate) frames: u64,
    pub(crate) cap: u64,
    pub(crate) max_frame: u32,
    pub(crate) producer: (u32, u64),
    pub(crate) consumer: (u32, u64),
}

impl Header {
    fn data(&self) -> u64 {
        self.at + RING_HEADER
    }
}

/// Decodes and checks a ring header (`raw`, read from the payload at `at`
/// of a block whose payload holds `capacity` bytes).
pub(crate) fn decode_header(raw: &[u8; 64], at: u64, capacity: u64) -> Result<Header> {
    let word = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8"));
    let half = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4"));
    let h = Header {
        at,
        head: word(0),
        tail: word(8),
        frames: word(16),
        cap: word(24),
        max_frame: half(32),
        producer: (half(40), word(48)),
        consumer: (half(44), word(56)),
    };
    let bad = |p: String| Error::corrupt("ring header", at, p);
    if half(36) != 0 {
        return Err(bad(format!("flags {:#x}", half(36))));
    }
    if h.cap < 16
        || !h.cap.is_multiple_of(8)
        || RING_HEADER.checked_add(h.cap).is_none_or(|n| n > capacity)
    {
        return Err(bad(format!("capacity {} does not fit its block", h.cap)));
    }
    if u64::from(h.max_frame) > h.cap - FRAME_HEADER {
        return Err(bad(format!(
            "largest frame {} exceeds the capacity",
            h.max_frame
        )));
    }
    if h.head > h.tail
        || h.tail > u64::MAX - 2 * h.cap
        || h.tail - h.head > h.cap
        || !h.head.is_multiple_of(8)
        || !h.tail.is_multiple_of(8)
    {
        return Err(bad(format!(
            "head {} and tail {} do not bound at most {} bytes",
            h.head, h.tail, h.cap
        )));
    }
    if h.frames > (h.tail - h.head) / FRAME_HEADER || (h.frames == 0) != (h.head == h.tail) {
        return Err(bad(format!(
            "{} frames in {} bytes",
            h.frames,
            h.tail - h.head
        )));
    }
    Ok(h)
}

fn header(mem: &Mem, heap: (u64, u64), off: u64) -> Result<Header> {
    let b = Block::expect(mem, heap, off, Kind::Ring)?.need(RING_HEADER)?;
    let raw = mem.bytes("ring header", b.payload(), RING_HEADER)?;
    decode_header(raw.try_into().expect("64"), b.payload(), b.capacity())
}

fn padded(len: u64) -> u64 {
    len.next_multiple_of(8)
}

/// Where the next frame from `head` lies, given its frame header `fh` at
/// data offset `head % cap`: `Ok(None)` for a wrap marker (the frame is at
/// the next lap), else the frame's length and the bytes it takes.
pub(crate) fn frame_at(h: &Header, head: u64, fh: [u8; 8]) -> Result<Option<(u64, u64)>> {
    let len = u32::from_le_bytes(fh[..4].try_into().expect("4"));
    let check = u32::from_le_bytes(fh[4..].try_into().expect("4"));
    let pos = head % h.cap;
    let bad = |p: String| Error::corrupt("ring frame", h.data() + pos, p);
    if check != len ^ CHECK {
        return Err(bad(format!("length {len:#x} fails its check")));
    }
    if len == WRAP {
        return Ok(None);
    }
    let need = FRAME_HEADER + padded(u64::from(len));
    if len > h.max_frame || need > h.cap - pos || head + need > h.tail {
        return Err(bad(format!(
            "a frame of {len} bytes does not fit the ring (largest {}, {} bytes to the end, {} pending)",
            h.max_frame,
            h.cap - pos,
            h.tail - head
        )));
    }
    Ok(Some((u64::from(len), need)))
}

/// Where a frame of `len` bytes (at most the largest frame) would go:
/// `Some(skip)`, the bytes a wrap marker fills before it (0: none), or
/// `None` when the ring has no room for it now. An empty ring takes any
/// frame: it starts at the next lap, head and tail together.
pub(crate) fn room_for(h: &Header, len: u64) -> Option<u64> {
    let need = FRAME_HEADER + padded(len);
    let pos = h.tail % h.cap;
    let skip = if need > h.cap - pos { h.cap - pos } else { 0 };
    (h.frames == 0 || h.tail - h.head + skip + need <= h.cap).then_some(skip)
}

/// Which end of a ring a process works ([`RingMut::attach`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingEnd {
    /// The end that pushes frames.
    Producer,
    /// The end that pops them.
    Consumer,
}

impl std::fmt::Display for RingEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RingEnd::Producer => "producer",
            RingEnd::Consumer => "consumer",
        })
    }
}

/// Validates a creation's sizes: the data bytes (rounded up to 8) and the
/// largest frame.
fn sizes(capacity: u64, max_frame: u32) -> Result<u64> {
    let cap = capacity
        .checked_next_multiple_of(8)
        .filter(|&c| c >= 16)
        .ok_or_else(|| {
            Error::unsupported(format!("a ring of {capacity} bytes: give at least 16"))
        })?;
    if u64::from(max_frame) > cap - FRAME_HEADER {
        return Err(Error::unsupported(format!(
            "frames of up to {max_frame} bytes do not fit a ring of {cap} (at most {})",
            cap - FRAME_HEADER
        )));
    }
    Ok(cap)
}

impl<'s, R: Pod> Tx<'s, R> {
    /// Creates an empty ring of `capacity` data bytes (rounded up to 8)
    /// for frames of up to `max_frame` bytes (at most `capacity - 8`).
    pub fn new_ring(&mut self, capacity: u64, max_frame: u32) -> Result<StateRing> {
        let cap = sizes(capacity, max_frame)?;
        self.core.op(|tx| {
            let len = RING_HEADER.checked_add(cap).ok_or(Error::TooLarge {
                what: "ring",
                len: cap,
            })?;
            let b = tx.alloc(Kind::Ring, len, false)?;
            let mut h = [0u8; 64];
            h[24..32].copy_from_slice(&cap.to_le_bytes());
            h[32..36].copy_from_slice(&max_frame.to_le_bytes());
            tx.write("ring header", b.payload(), &h)?;
            Ok(StateRing::from_off(b.off))
        })
    }

    /// A ring, to push to or pop from in this transaction.
    pub fn ring(&mut self, h: StateRing) -> Result<RingMut<'_, 's>> {
        let off = h.off()?;
        let hd = header(self.core.mem(), self.core.heap()?, off)?;
        // Remembered at the first look in this transaction: the committed
        // head, which decides which frame bytes may skip the journal.
        self.core.ring_head_at_start(off, hd.head, hd.tail);
        Ok(RingMut {
            tx: &mut self.core,
            off,
        })
    }
}

/// A ring inside a transaction ([`Tx::ring`]).
#[derive(Debug)]
pub struct RingMut<'t, 's> {
    tx: &'t mut TxCore<'s>,
    off: u64,
}

impl RingMut<'_, '_> {
    fn header(&self) -> Result<Header> {
        header(self.tx.mem(), self.tx.heap()?, self.off)
    }

    fn op<U>(&mut self, f: impl FnOnce(&mut Self) -> Result<U>) -> Result<U> {
        let before = self.tx.changes();
        let result = f(self);
        self.tx.settle(before, &result);
        result
    }

    /// The number of frames in the ring.
    pub fn len(&self) -> Result<u64> {
        Ok(self.header()?.frames)
    }

    /// True when the ring holds no frame.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The largest frame the ring takes.
    pub fn max_frame(&self) -> Result<u32> {
        Ok(self.header()?.max_frame)
    }

    /// Appends `frame`; `Ok(false)`, with nothing changed, when the ring
    /// has no room for it now. A frame longer than the ring's largest is
    /// [`Error::TooLarge`].
    pub fn push(&mut self, frame: &[u8]) -> Result<bool> {
        self.op(|r| r.push_now(frame))
    }

    fn push_now(&mut self, frame: &[u8]) -> Result<bool> {
        let h = self.header()?;
        let len = frame.len() as u64;
        if len > u64::from(h.max_frame) {
            return Err(Error::TooLarge {
                what: "ring frame",
                len,
            });
        }
        let need = FRAME_HEADER + padded(len);
        let pos = h.tail % h.cap;
        let Some(skip) = room_for(&h, len) else {
            return Ok(false);
        };
        // Bytes past the tail are unreachable after a rollback unless they
        // reach the space of frames this transaction popped (from the
        // committed head on, a lap later), which a rollback brings back:
        // journaled then.
        let start_head = self.tx.ring_head_at_start(self.off, h.head, h.tail);
        let journal = h.tail + skip + need > start_head + h.cap;
        if h.frames == 0 && skip != 0 {
            // An empty ring starts the frame at the next lap, head and
            // tail together (no wrap marker): a frame of up to `max_frame`
            // always fits an empty ring, wherever its position.
            let base = h.tail + skip;
            let journal = base + need > start_head + h.cap;
            let mut buf = Vec::with_capacity(need as usize);
            buf.extend_from_slice(&(len as u32).to_le_bytes());
            buf.extend_from_slice(&((len as u32) ^ CHECK).to_le_bytes());
            buf.extend_from_slice(frame);
            buf.resize(need as usize, 0);
            if journal {
                self.tx.write("ring frame", h.data(), &buf)?;
            } else {
                self.tx.write_tail("ring frame", h.data(), &buf)?;
            }
            let mut w = [0u8; 24];
            w[..8].copy_from_slice(&base.to_le_bytes());
            w[8..16].copy_from_slice(&(base + need).to_le_bytes());
            w[16..].copy_from_slice(&1u64.to_le_bytes());
            self.tx.write("ring header", h.at, &w)?;
            return Ok(true);
        }
        let write = |tx: &mut TxCore<'_>, what, off, bytes: &[u8]| {
            if journal {
                tx.write(what, off, bytes)
            } else {
                tx.write_tail(what, off, bytes)
            }
        };
        let mut at = pos;
        if skip != 0 {
            let mut marker = [0u8; 8];
            marker[..4].copy_from_slice(&WRAP.to_le_bytes());
            marker[4..].copy_from_slice(&(WRAP ^ CHECK).to_le_bytes());
            write(self.tx, "ring wrap marker", h.data() + pos, &marker)?;
            at = 0;
        }
        let mut buf = Vec::with_capacity(need as usize);
        buf.extend_from_slice(&(len as u32).to_le_bytes());
        buf.extend_from_slice(&((len as u32) ^ CHECK).to_le_bytes());
        buf.extend_from_slice(frame);
        buf.resize(need as usize, 0);
        write(self.tx, "ring frame", h.data() + at, &buf)?;
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&(h.tail + skip + need).to_le_bytes());
        w[8..].copy_from_slice(&(h.frames + 1).to_le_bytes());
        self.tx.write("ring header", h.at + 8, &w)?;
        Ok(true)
    }

    /// Takes the oldest frame (`None` when the ring is empty).
    pub fn pop(&mut self) -> Result<Option<Vec<u8>>> {
        self.op(|r| r.pop_now())
    }

    fn pop_now(&mut self) -> Result<Option<Vec<u8>>> {
        let h = self.header()?;
        if h.frames == 0 {
            return Ok(None);
        }
        let mut head = h.head;
        // At most one wrap marker before a frame.
        for _ in 0..2 {
            let pos = head % h.cap;
            let fh: [u8; 8] = self
                .tx
                .mem()
                .bytes("ring frame", h.data() + pos, FRAME_HEADER)?
                .try_into()
                .expect("8");
            match frame_at(&h, head, fh)? {
                None => {
                    head += h.cap - pos;
                    if head >= h.tail {
                        return Err(Error::corrupt(
                            "ring frame",
                            h.data() + pos,
                            "a wrap marker ends the ring's frames",
                        ));
                    }
                }
                Some((len, need)) => {
                    let frame = self
                        .tx
                        .mem()
                        .bytes("ring frame", h.data() + pos + FRAME_HEADER, len)?
                        .to_vec();
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&(head + need).to_le_bytes());
                    self.tx.write("ring header", h.at, &w)?;
                    self.tx.write_u64("ring header", h.at + 16, h.frames - 1)?;
                    return Ok(Some(frame));
                }
            }
        }
        Err(Error::corrupt(
            "ring frame",
            h.data() + head % h.cap,
            "two wrap markers in a row",
        ))
    }

    /// Frees the ring and the frames in it, when the transaction commits.
    /// Its handle (and copies) must not be used again: a process waiting
    /// on it ([`SharedState::pop_wait`](crate::SharedState::pop_wait))
    /// wakes within its 50 ms nap and gets an error, as does any later
    /// look through a stale handle (until the block is reused).
    pub fn free(mut self) -> Result<()> {
        self.op(|r| {
            r.header()?;
            r.tx.free(r.off, Kind::Ring)
        })
    }

    /// Records this process as the ring's producer or consumer (replacing
    /// the one recorded), so that the other end can tell when it is gone
    /// ([`crate::RingView::producer_alive`], [`Error::PeerGone`]).
    pub fn attach(&mut self, end: RingEnd) -> Result<()> {
        self.op(|r| {
            let h = r.header()?;
            let pid = std::process::id();
            let start = crate::owner::own_start_time();
            let (pid_at, start_at) = match end {
                RingEnd::Consumer => (h.at + 44, h.at + 56),
                RingEnd::Producer => (h.at + 40, h.at + 48),
            };
            r.tx.write("ring peer", pid_at, &pid.to_le_bytes())?;
            r.tx.write_u64("ring peer", start_at, start)
        })
    }
}

/// Whether process `pid`, started at `start` (clock ticks since boot, 0:
/// unknown), is alive.
pub(crate) fn alive(pid: u32, start: u64) -> bool {
    pid != 0 && crate::owner::is_alive(pid, start)
}

/// Reads a ring's header through a region's atomic loads (shared views):
/// `read` copies `len` bytes at an offset after checking the range.
pub(crate) fn header_via(
    block: Block,
    read: impl Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<Header> {
    let b = block.need(RING_HEADER)?;
    let mut raw = [0u8; 64];
    read(b.payload(), &mut raw)?;
    decode_header(&raw, b.payload(), b.capacity())
}
