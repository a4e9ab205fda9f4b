//! Copying a running program's memfd without stopping it, when the program
//! keeps shm-snapshot's dirty map (`--snapshot protocol`): copy, then copy
//! again only the cells written meanwhile, until a pass runs while no
//! update does (docs/snapshot-protocol.md, *Converging copies*).
//!
//! A pass: load the sequence word (even: no update runs; odd: wait a
//! little and look again), take the marks, copy the cells they name (with
//! those the last pass took, the first 64 KiB and the cells past the map),
//! then load the sequence word again. Unchanged, the copy is the committed
//! state of that generation:
//! - a cell copied in this pass was copied after the word was read, and no
//!   update ran between that read and the second one;
//! - a cell copied in an earlier pass and not marked since was not written
//!   after its copy (the program marks before it writes);
//! - a write whose mark an earlier pass took but which landed after that
//!   pass copied its cell belongs to an update that began before that
//!   pass's take: it ended before this pass's even word, and the cell is
//!   copied again in the pass right after the take (marks are carried one
//!   pass), which then reads the write.
//!
//! Each pass copies what changed during the one before, so at a commit
//! every millisecond touching a few cells, the passes shrink to those
//! cells and one fits between two commits.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use shm_snapshot::{DirtyCells, Region};

/// The most passes before the caller falls back on another copy. A
/// program committing every millisecond converges in a few; one that
/// commits back to back (a benchmark's loop) never does, and the fallback
/// (optimistic tries, then a short stop) should not wait long for that.
const MAX_PASSES: u32 = 64;
/// The longest a converging copy runs before it gives up.
const DEADLINE: Duration = Duration::from_millis(500);
/// How long to wait for the program to leave an update before looking
/// again.
const UPDATE_WAIT: Duration = Duration::from_micros(50);

/// A consistent copy: the cells copied, dense (holes as zeros), by cell
/// index; the rest of the memfd is as the caller's starting point says.
#[derive(Debug)]
pub(crate) struct Converged {
    /// The memfd's size through the copy.
    pub data_len: u64,
    /// The program's committed generation the copy is.
    pub generation: u64,
    /// Each copied cell's bytes, by cell index.
    pub cells: BTreeMap<u64, Vec<u8>>,
    /// The passes it took.
    pub passes: u32,
    /// The marks taken from the program's map (for a save that fails: the
    /// cells must count again).
    pub taken: DirtyCells,
    /// The program's scratch range as the last pass found it.
    pub scratch: Option<std::ops::Range<u64>>,
}

/// Why no converged copy was made: the caller copies another way.
#[derive(Debug)]
pub(crate) enum NotConverged {
    /// The map is off (or the header is not valid): nothing was taken.
    NoMap,
    /// The size changed, or the passes ran out: the marks taken so far are
    /// given back for the next capture.
    GaveUp(Option<DirtyCells>),
    /// Reading the memfd failed: the error, and the marks taken so far
    /// (which count again at the next capture).
    Failed(io::Error, Option<DirtyCells>),
}

/// Copies the cells (`chunk_size` bytes each) of `memfd` named by `first`
/// (indices; every cell holding data for a whole copy) and then whatever
/// the program marks, until a pass sees no update. `page` is the memfd's
/// first page mapped (the header). `pending` are marks earlier captures
/// took whose saves failed: their cells are copied too.
pub(crate) fn converge(
    memfd: &File,
    page: Region<'_>,
    chunk_size: u32,
    first: &BTreeSet<u64>,
    pending: Option<&DirtyCells>,
) -> Result<Converged, NotConverged> {
    let cell = u64::from(chunk_size);
    let data_len = match memfd.metadata() {
        Ok(m) => m.len(),
        Err(e) => return Err(NotConverged::Failed(e, pending.cloned())),
    };
    let cells_of = |marks: &DirtyCells, out: &mut BTreeSet<u64>| {
        for c in 0..data_len.div_ceil(cell) {
            if marks.any(c * cell, cell) {
                out.insert(c);
            }
        }
    };
    // Always copied: the first 64 KiB (the header page, whose sequence word
    // changes at every commit, unmarked). Cells past the map count as
    // marked (`DirtyCells::any`).
    let always: BTreeSet<u64> = (0..data_len.div_ceil(cell))
        .take_while(|&c| c * cell < shm_snapshot::ALWAYS_READ)
        .collect();
    let start = Instant::now();
    let mut taken: Option<DirtyCells> = pending.cloned();
    let mut copied: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut carried: BTreeSet<u64> = first.clone();
    if let Some(p) = pending {
        cells_of(p, &mut carried);
    }
    let mut passes = 0;
    loop {
        if passes >= MAX_PASSES || start.elapsed() > DEADLINE {
            return Err(NotConverged::GaveUp(taken));
        }
        let seq = page.load_u64(shm_snapshot::OFF_SEQ);
        if seq >= 1 << 63 {
            return Err(NotConverged::GaveUp(taken));
        }
        fence(Ordering::Acquire);
        if seq % 2 == 1 {
            std::thread::sleep(UPDATE_WAIT);
            continue;
        }
        passes += 1;
        let Some(marks) = shm_snapshot::take_dirty(page) else {
            return Err(match taken {
                None => NotConverged::NoMap,
                some => NotConverged::GaveUp(some),
            });
        };
        let len_now = memfd.metadata().map(|m| m.len());
        if len_now.as_ref().ok() != Some(&data_len) {
            if let Some(t) = &mut taken {
                t.merge(&marks);
            } else {
                taken = Some(marks);
            }
            return Err(match len_now {
                Err(e) => NotConverged::Failed(e, taken),
                Ok(_) => NotConverged::GaveUp(taken),
            });
        }
        let mut todo = std::mem::take(&mut carried);
        cells_of(&marks, &mut todo);
        todo.extend(&always);
        let scratch = marks.scratch();
        match &mut taken {
            Some(t) => t.merge(&marks),
            None => taken = Some(marks.clone()),
        }
        for &c in &todo {
            let from = c * cell;
            let len = cell.min(data_len - from) as usize;
            let buf = copied.entry(c).or_default();
            buf.resize(len, 0);
            if let Err(e) = memfd.read_exact_at(buf, from) {
                return Err(NotConverged::Failed(e, taken));
            }
        }
        // The reads above before the second look at the word.
        fence(Ordering::Acquire);
        if page.load_u64(shm_snapshot::OFF_SEQ) == seq {
            return Ok(Converged {
                data_len,
                generation: seq / 2,
                cells: copied,
                passes,
                taken: taken.unwrap_or(marks),
                scratch,
            });
        }
        // An update ran: this pass's marks are carried into the next.
        cells_of(&marks, &mut carried);
    }
}
