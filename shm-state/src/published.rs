//! A published value: one writer publishes versions of a byte string,
//! readers in any process get the latest complete one without taking any
//! lock and without ever seeing a torn one (shared/seeds' mmap-sync idea,
//! inside the state).
//!
//! Block (kind 12), payload: `max_len u64`, `0 u64`, then two slots of
//! `32 + pad8(max_len)` bytes each: `seq u64` (2 × the version when the
//! slot is complete, odd while it is being written, 0 never written),
//! `len u64`, `crc u32` (CRC-32 of the bytes), `0 u32`, `0 u64`, then the
//! bytes. A publish writes the slot that does not hold the latest version:
//! its `seq` odd, a release fence, the bytes, `len` and `crc`, then `seq`
//! even with release ordering. A reader takes the slot with the larger
//! even `seq`, copies it between two loads of that `seq` (acquire fences)
//! and checks the CRC; a slot that changed under it means a newer version
//! is complete in the other slot, which it reads instead. The slots are
//! not journaled: a writer killed in a publish leaves that slot odd and
//! the other holding the last version (what readers keep reading). A
//! publish is an update of the snapshot protocol (when the state uses it),
//! so a snapshot copied while one runs is not kept as consistent; a slot
//! whose bytes fail their checksum anyway (damage) is skipped for the
//! other. No reader writes anything, so a reader's death never blocks
//! the writer.
//!
//! Readers retry only when the writer completes publishes while they copy
//! (lock-free; wait-free while publishes are rarer than reads); after 64
//! retries in a row a reader reads under the writer lock, where no publish
//! runs, instead of failing.

use std::sync::atomic::{Ordering, fence};

use bytemuck::Pod;
use shm_snapshot::Region;

use crate::error::{Error, Result};
use crate::format::{Block, Kind};
use crate::handle::StatePublished;
use crate::state::Tx;

const HEAD: u64 = 16;
const SLOT_HEAD: u64 = 32;

/// A published value's geometry, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) max_len: u64,
    /// Region offsets of the two slots.
    pub(crate) slots: [u64; 2],
}

fn slot_size(max_len: u64) -> Option<u64> {
    SLOT_HEAD.checked_add(max_len.checked_next_multiple_of(8)?)
}

/// Checks a published value's block and reads its geometry.
pub(crate) fn geometry(b: Block, max_len: u64) -> Result<Geometry> {
    slot_size(max_len)
        .and_then(|s| s.checked_mul(2))
        .and_then(|s| s.checked_add(HEAD))
        .filter(|&n| n <= b.capacity())
        .ok_or_else(|| {
            Error::corrupt(
                "published value",
                b.off,
                format!("a largest length of {max_len} does not fit its block"),
            )
        })?;
    let first = b.payload() + HEAD;
    let second = first + slot_size(max_len).expect("checked");
    Ok(Geometry {
        max_len,
        slots: [first, second],
    })
}

impl<'s, R: Pod> Tx<'s, R> {
    /// Creates a published value for byte strings of up to `max_len` bytes
    /// (none published yet).
    pub fn new_published(&mut self, max_len: u32) -> Result<StatePublished> {
        let max_len = u64::from(max_len);
        let len = slot_size(max_len)
            .and_then(|s| s.checked_mul(2))
            .and_then(|s| s.checked_add(HEAD))
            .ok_or(Error::TooLarge {
                what: "published value",
                len: max_len,
            })?;
        self.core.op(|tx| {
            let b = tx.alloc(Kind::Published, len, true)?;
            tx.write("published value", b.payload(), &max_len.to_le_bytes())?;
            Ok(StatePublished::from_off(b.off))
        })
    }
}

impl<R: Pod> Tx<'_, R> {
    /// Frees a published value, when the transaction commits. Its handle
    /// (and copies) must not be used again: a read through a stale handle
    /// gets an error (until the block is reused).
    pub fn free_published(&mut self, h: StatePublished) -> Result<()> {
        let off = h.off()?;
        let heap = self.core.heap()?;
        Block::expect(self.core.mem(), heap, off, Kind::Published)?;
        self.core.free(off, Kind::Published)
    }
}

/// Where a read copies a version's bytes.
pub(crate) trait Sink {
    /// A buffer of exactly `len` bytes (a version's length, at most the
    /// value's largest), or the error a version of that length is for
    /// this sink.
    fn buffer(&mut self, len: u64) -> Result<&mut [u8]>;
}

impl Sink for Vec<u8> {
    fn buffer(&mut self, len: u64) -> Result<&mut [u8]> {
        self.resize(len as usize, 0);
        Ok(self)
    }
}

/// A value of a POD type: only a version of exactly its size is read.
pub(crate) struct Exact<'a>(pub(crate) &'a mut [u8]);

impl Sink for Exact<'_> {
    fn buffer(&mut self, len: u64) -> Result<&mut [u8]> {
        if len != self.0.len() as u64 {
            return Err(Error::UnsupportedType {
                problem: format!(
                    "the published value's latest version holds {len} bytes, not the {} of the type asked for",
                    self.0.len()
                ),
            });
        }
        Ok(self.0)
    }
}

/// What a bounded read found.
pub(crate) enum Latest {
    /// The latest complete version's number (copied into the sink), or
    /// `None` when nothing was published.
    Read(Option<u64>),
    /// Every try saw its slot rewritten while it copied (a writer
    /// publishing faster than this reads): the caller reads again under
    /// the writer lock, where no publish runs.
    Contended,
}

/// Reads the latest complete version into `out`. Bounded: after `tries`
/// slots that changed while being copied it returns
/// [`Latest::Contended`].
pub(crate) fn read_latest(
    region: &Region<'_>,
    g: Geometry,
    tries: u32,
    out: &mut impl Sink,
) -> Result<Latest> {
    let load = |off: u64| -> Result<u64> {
        if off.checked_add(8).is_none_or(|e| e > region.len() as u64) {
            return Err(Error::corrupt("published value", off, "past the region"));
        }
        Ok(region.load_u64(off as usize))
    };
    let mut avoid: Option<usize> = None;
    let mut damaged = 0;
    for _ in 0..tries {
        let seqs = [load(g.slots[0])?, load(g.slots[1])?];
        fence(Ordering::Acquire);
        // The complete slot with the larger sequence.
        let complete = |s: u64| s.is_multiple_of(2) && s != 0;
        let pick = match (complete(seqs[0]), complete(seqs[1])) {
            // Nothing published yet (at most the first publish running).
            (false, false) if seqs[0] == 0 || seqs[1] == 0 => return Ok(Latest::Read(None)),
            // Both odd: two loads taken while two publishes ran; look again.
            (false, false) => continue,
            (true, false) => 0,
            (false, true) => 1,
            (true, true) => usize::from(seqs[1] > seqs[0]),
        };
        // A slot whose bytes failed their checksum: the other, if complete.
        let pick = match avoid {
            Some(bad) if bad == pick && complete(seqs[1 - pick]) => 1 - pick,
            _ => pick,
        };
        let at = g.slots[pick];
        let len = load(at + 8)?;
        let crc = load(at + 16)? as u32;
        if len > g.max_len {
            // Torn (the slot is being rewritten) or damaged: decided below.
            fence(Ordering::Acquire);
            if load(at)? != seqs[pick] {
                continue;
            }
            return Err(Error::corrupt(
                "published value",
                at,
                format!("length {len} exceeds the largest {}", g.max_len),
            ));
        }
        let data = at + SLOT_HEAD;
        if data
            .checked_add(len)
            .is_none_or(|e| e > region.len() as u64)
        {
            return Err(Error::corrupt("published value", at, "past the region"));
        }
        let bytes = match out.buffer(len) {
            Ok(b) => b,
            // A length read from a slot being rewritten: look again.
            Err(_)
                if {
                    fence(Ordering::Acquire);
                    load(at)? != seqs[pick]
                } =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        region.read(data as usize, bytes);
        fence(Ordering::Acquire);
        if load(at)? != seqs[pick] {
            continue; // rewritten while copied: a newer one is complete
        }
        if crc32fast::hash(bytes) != crc {
            // Damage (or a slot torn in a copy of the memory): the other
            // slot, if complete, holds the version before.
            damaged += 1;
            if damaged > 2 {
                return Err(Error::corrupt(
                    "published value",
                    at,
                    "the bytes of both versions fail their checksums",
                ));
            }
            avoid = Some(pick);
            continue;
        }
        return Ok(Latest::Read(Some(seqs[pick] / 2)));
    }
    Ok(Latest::Contended)
}

/// Publishes `bytes` as the next version (the caller is the only writer:
/// it holds the writer lock); returns the version.
/// The bytes a publish may write: both slots, `(offset, length)`.
pub(crate) fn slots_span(g: Geometry) -> (u64, u64) {
    let end = g.slots[1]
        .saturating_add(SLOT_HEAD)
        .saturating_add(g.max_len);
    (g.slots[0], end.saturating_sub(g.slots[0]))
}

pub(crate) fn publish(region: &Region<'_>, g: Geometry, bytes: &[u8]) -> Result<u64> {
    let len = bytes.len() as u64;
    if len > g.max_len {
        return Err(Error::TooLarge {
            what: "published value",
            len,
        });
    }
    let end = g.slots[1] + SLOT_HEAD + g.max_len;
    if end > region.len() as u64 {
        return Err(Error::corrupt(
            "published value",
            g.slots[0],
            "past the region",
        ));
    }
    let seqs = [
        region.load_u64(g.slots[0] as usize),
        region.load_u64(g.slots[1] as usize),
    ];
    // The latest complete version lives on; the other slot is rewritten.
    let complete = |s: u64| s.is_multiple_of(2) && s != 0;
    let latest = [0, 1]
        .into_iter()
        .filter(|&i| complete(seqs[i]))
        .max_by_key(|&i| seqs[i]);
    let (target, version) = match latest {
        Some(i) => (1 - i, seqs[i] / 2 + 1),
        None => (0, seqs[0].max(seqs[1]) / 2 + 1),
    };
    if version >= 1 << 62 {
        return Err(Error::corrupt(
            "published value",
            g.slots[target],
            format!("version {version} is past any count (damaged memory)"),
        ));
    }
    let at = g.slots[target] as usize;
    region.store_u64(at, 2 * version - 1);
    fence(Ordering::Release);
    region.write(at + SLOT_HEAD as usize, bytes);
    region.store_u64(at + 8, len);
    region.store_u64(at + 16, u64::from(crc32fast::hash(bytes)));
    fence(Ordering::Release);
    region.store_u64(at, 2 * version);
    Ok(version)
}
