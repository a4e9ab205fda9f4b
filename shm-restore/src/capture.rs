//! Capture: getting a private copy of the memfd that is a state the program
//! actually had at one instant.
//!
//! This is the pluggable step of a save. [`StopGroup`] stops the program's
//! process group for the copy; [`Unpaused`] copies directly (right when no
//! one else writes, e.g. after the program exited); [`SnapshotProtocol`]
//! copies while the program runs and keeps the copy when the program's
//! shm-snapshot header proves it is a committed state (stopping the group
//! only when that fails, or when the program does not use the protocol).

use std::cell::Cell;
use std::fs::{self, File};
use std::io;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use shm_snapshot::{CopyTarget, Region};

use std::collections::BTreeSet;

use crate::chain::changed_cells;
use crate::converge::{Converged, NotConverged};
use crate::error::{Error, Result};
use crate::format::{Chunk, split_at_cells};
use crate::image::{
    Extent, Image, crcs_of, data_extents, data_extents_since, memfd_table, prefaulted, push_merged,
    read_extents, stored_len,
};
use crate::save::{Changes, DeltaBasis};

/// The result of a capture: a consistent private copy, or the news that
/// nothing writes the memfd any more (so a save may read it directly), or
/// that nothing changed since the last copy.
#[derive(Debug)]
#[non_exhaustive]
pub enum Captured {
    /// A copy of a state the program had.
    Copied {
        /// The copy.
        image: Image,
        /// How long the program was paused for it, if it was.
        pause: Option<Duration>,
        /// What shm-snapshot's protocol said about the copy, when the
        /// capture used it ([`SnapshotProtocol`]); `None` for a plain
        /// stop-the-group copy.
        protocol: Option<shm_snapshot::CaptureOutcome>,
    },
    /// No process is left that could write the memfd: read it directly
    /// ([`crate::Saver::save_memfd`]), without a private copy.
    Quiescent,
    /// The program committed nothing since the last copy this capture
    /// made: nothing was copied, there is nothing new to save.
    Unchanged {
        /// The program's committed generation (shm-snapshot).
        generation: u64,
    },
    /// Only the cells that changed since a [`DeltaBasis`] were copied
    /// ([`CaptureMethod::capture_changes`]), with the whole state's chunk
    /// table: what a delta save needs.
    Changes {
        /// The copy.
        changes: Changes,
        /// How long the program was paused for it, if it was.
        pause: Option<Duration>,
    },
}

impl Captured {
    /// How long the program was paused, if it was.
    pub fn pause(&self) -> Option<Duration> {
        match self {
            Captured::Copied { pause, .. } | Captured::Changes { pause, .. } => *pause,
            _ => None,
        }
    }
}

/// A way of copying the memfd that yields a state the program had.
pub trait CaptureMethod {
    /// Copies `memfd` (a private open file description of it).
    fn capture(&mut self, memfd: &File) -> Result<Captured>;

    /// True when [`CaptureMethod::capture`] itself tells an unchanged memfd
    /// ([`Captured::Unchanged`]) without copying it, so a periodic save
    /// needs no change probe of its own first.
    fn detects_unchanged(&self) -> bool {
        false
    }

    /// Says that saving the last capture failed: the next capture must
    /// copy even if nothing changed since.
    fn save_failed(&mut self) {}

    /// Captures only what changed since `basis`, the state the snapshot in
    /// place holds ([`crate::Saver::delta_basis`]), when this method can
    /// tell that at the instant it captures ([`Captured::Changes`]), or
    /// everything when more changed than the basis' budget. The default is
    /// [`CaptureMethod::capture`]: a whole copy, which the saver compares
    /// with the basis itself.
    fn capture_changes(&mut self, memfd: &File, basis: &DeltaBasis) -> Result<Captured> {
        let _ = basis;
        self.capture(memfd)
    }
}

/// For a memfd nothing writes any more (the program has exited): returns
/// [`Captured::Quiescent`] without copying.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpaused;

impl CaptureMethod for Unpaused {
    fn capture(&mut self, _memfd: &File) -> Result<Captured> {
        Ok(Captured::Quiescent)
    }
}

/// Stops a process group (`SIGSTOP`), waits until every thread of every
/// member has stopped, copies the memfd, and continues the group
/// (`SIGCONT`) before returning, also on errors. Writing to disk happens
/// after, outside the pause.
///
/// When the group no longer exists the result is [`Captured::Quiescent`].
#[derive(Debug, Clone)]
pub struct StopGroup {
    pgid: i32,
    timeout: Duration,
    /// The dirty-map marks the last capture of changes took (cleared from
    /// the program's map): given back to the next one if its save fails.
    taken: Option<shm_snapshot::DirtyCells>,
    /// Marks taken by captures whose saves failed.
    pending: Option<shm_snapshot::DirtyCells>,
    /// The bytes the last capture of changes copied: the next one faults
    /// in a buffer of that size before it stops the group.
    copied_last: usize,
}

impl StopGroup {
    /// Captures for the process group `pgid`, waiting at most `timeout`
    /// for it to stop.
    pub fn new(pgid: i32, timeout: Duration) -> StopGroup {
        StopGroup {
            pgid,
            timeout,
            taken: None,
            pending: None,
            copied_last: 0,
        }
    }
}

/// Sends `SIGCONT` to the group when dropped.
struct ContinueOnDrop(Pid);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = killpg(self.0, Signal::SIGCONT);
    }
}

impl CaptureMethod for StopGroup {
    fn capture(&mut self, memfd: &File) -> Result<Captured> {
        self.capture_with(memfd, || {})
    }

    /// In the stop, reads the memfd once through a small buffer per thread
    /// to compute every chunk's CRC, and copies only the cells whose chunks
    /// differ from the basis'; no copy of the whole (and no buffer of its
    /// size) unless more than the basis' budget changed.
    fn capture_changes(&mut self, memfd: &File, basis: &DeltaBasis) -> Result<Captured> {
        self.capture_changes_with(memfd, basis, || {})
    }

    /// The marks the last capture of changes took from the program's dirty
    /// map count again at the next one: the snapshot in place does not
    /// hold what they mark.
    fn save_failed(&mut self) {
        if let Some(taken) = self.taken.take() {
            match &mut self.pending {
                Some(p) => p.merge(&taken),
                None => self.pending = Some(taken),
            }
        }
    }
}

impl StopGroup {
    /// [`CaptureMethod::capture`], calling `stopped` once the group is
    /// stopped, before the copy (tests write into the memfd there, as the
    /// program could have just before the stop).
    fn capture_with(&mut self, memfd: &File, stopped: impl FnOnce()) -> Result<Captured> {
        let pgid = Pid::from_raw(self.pgid);
        if group_is_gone(pgid) {
            return Unpaused.capture(memfd);
        }
        // Before the pause: the extent search, and a buffer of about the
        // right size with its pages faulted in, so the pause is the copy
        // and a re-check of the holes alone.
        let searched = search(memfd)?;
        let size = usize::try_from(stored_len(&searched)).unwrap_or(usize::MAX);
        let buf = prefaulted(size).map_err(|e| Error::io("copying", "the memfd", e))?;
        let start = Instant::now();
        let Some(cont) = self.stop_group()? else {
            return Unpaused.capture(memfd);
        };
        stopped();
        // A copy of everything: the program's marks so far are what this
        // copy holds, and its next marks what changed since it.
        self.take_marks(memfd);
        // The extents found before the stop, plus whatever holes among them
        // the program filled since: the memfd as it is now.
        let image = Image::read_searched(memfd, &searched, buf)
            .map_err(|e| Error::io("copying", "the memfd", e))?;
        drop(cont);
        Ok(Captured::Copied {
            image,
            pause: Some(start.elapsed()),
            protocol: None,
        })
    }
}

impl StopGroup {
    /// Stops the group and waits until every member is stopped; the group
    /// is continued when the result is dropped. `None` when the group is
    /// gone (nothing writes the memfd any more).
    fn stop_group(&self) -> Result<Option<ContinueOnDrop>> {
        let pgid = Pid::from_raw(self.pgid);
        match killpg(pgid, Signal::SIGSTOP) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    "stopping process group",
                    format!("{}", self.pgid),
                    e.into(),
                ));
            }
        }
        let cont = ContinueOnDrop(pgid);
        wait_until_stopped(self.pgid, self.timeout)?;
        Ok(Some(cont))
    }

    /// Takes the program's dirty-map marks (with the group stopped), with
    /// those of captures whose saves failed, and keeps them for
    /// [`CaptureMethod::save_failed`].
    fn take_marks(&mut self, memfd: &File) -> Option<Marks> {
        let len = memfd.metadata().ok()?.len();
        let mut marked = take_marked(memfd, len);
        if let (Some(m), Some(p)) = (&mut marked, self.pending.take()) {
            m.cells.merge(&p);
        }
        self.taken = marked.as_ref().map(|m| m.cells.clone());
        marked
    }

    /// [`CaptureMethod::capture_changes`], calling `stopped` once the group
    /// is stopped (for tests, as in `capture_with`).
    fn capture_changes_with(
        &mut self,
        memfd: &File,
        basis: &DeltaBasis,
        stopped: impl FnOnce(),
    ) -> Result<Captured> {
        let pgid = Pid::from_raw(self.pgid);
        if group_is_gone(pgid) {
            return Unpaused.capture(memfd);
        }
        // The extents, from the basis' and a search of its holes only: a
        // dense memfd costs no search at all (a fresh one costs two
        // `lseek`s per extent, 10 ms for 1 GiB of pages).
        let searched = {
            let fail = |e| Error::io("reading", "the memfd", e);
            let len = memfd.metadata().map_err(fail)?.len();
            let mut earlier: Vec<Extent> = Vec::new();
            for c in &basis.table {
                push_merged(&mut earlier, c.offset, c.offset + u64::from(c.len));
            }
            data_extents_since(memfd, len, &earlier).map_err(fail)?
        };
        // The changed cells' copy goes to a buffer faulted in now, sized
        // as the last one: the pause does not fault its pages in.
        let buf = prefaulted(self.copied_last).map_err(|e| Error::io("copying", "the memfd", e))?;
        let start = Instant::now();
        let Some(cont) = self.stop_group()? else {
            return Unpaused.capture(memfd);
        };
        stopped();
        let fail = |e| Error::io("copying", "the memfd", e);
        let data_len = memfd.metadata().map_err(fail)?.len();
        let extents = data_extents_since(memfd, data_len, &searched).map_err(fail)?;
        // The program's dirty map, if it keeps one: only the cells it
        // marked are read (and a few others, to check it).
        let mut marked = self.take_marks(memfd);
        let scratch = marked.as_ref().and_then(|m| m.scratch.clone());
        if data_len != basis.data_len {
            // A change of size is not a mark: compare every cell.
            marked = None;
        }
        let from_marks = marked.as_ref().and_then(|m| {
            table_from_marks(memfd, &extents, basis, m).map(|t| (t, m.cells.count()))
        });
        let (table, marked) = match from_marks {
            Some((t, count)) => (t.map_err(fail)?, Some(count)),
            None => (
                memfd_table(memfd, &extents, basis.chunk_size).map_err(fail)?,
                None,
            ),
        };
        let mut cells = changed_cells(&basis.table, &table, data_len, basis.chunk_size);
        // Captured between two updates: the program's scratch cells (its
        // undo journal) are left as the chain has them.
        let scratch = scratch.filter(|_| data_len == basis.data_len);
        cells.retain(|&(offset, n)| !in_scratch(scratch.as_ref(), offset, u64::from(n)));
        let changed: u64 = cells.iter().map(|&(_, n)| u64::from(n)).sum();
        let whole = changed > basis.budget;
        let kept = if whole {
            extents
        } else {
            cell_extents(&extents, &cells)
        };
        let bytes = read_extents(memfd, &kept, buf).map_err(fail)?;
        drop(cont);
        // A whole copy is no guide to the next delta's (and is held for
        // the whole save): only a delta's copy, within its budget, is.
        self.copied_last = if whole {
            0
        } else {
            bytes
                .len()
                .min(usize::try_from(basis.budget).unwrap_or(usize::MAX))
        };
        let pause = Some(start.elapsed());
        let image = Image::from_parts(data_len, kept, bytes)
            .map_err(|e| Error::io("copying", "the memfd", io::Error::other(e)))?;
        if whole {
            return Ok(Captured::Copied {
                image,
                pause,
                protocol: None,
            });
        }
        Ok(Captured::Changes {
            changes: Changes {
                basis_generation: basis.generation,
                data_len,
                table,
                cells,
                image,
                marked,
            },
            pause,
        })
    }
}

/// How many unmarked cells a capture that trusts the dirty map reads
/// anyway, to check that the program marks its writes: a mismatch makes the
/// capture read every cell.
const SPOT_CHECKS: usize = 4;

/// Takes the cells the program marked in its dirty map
/// ([`shm_snapshot::take_dirty`]), when its first page holds a valid
/// shm-snapshot header with the map on. The page is mapped only when the
/// memfd is sealed against shrinking (else a truncation under the mapping
/// could kill this process with SIGBUS).
fn take_marked(memfd: &File, data_len: u64) -> Option<Marks> {
    if data_len < shm_snapshot::HEADER_LEN as u64 {
        return None;
    }
    let sealed = nix::fcntl::fcntl(memfd, nix::fcntl::FcntlArg::F_GET_SEALS)
        .is_ok_and(|seals| seals & libc::F_SEAL_SHRINK != 0);
    if !sealed {
        return None;
    }
    let map = memmap2::MmapOptions::new()
        .len(shm_snapshot::HEADER_LEN)
        .map_raw(memfd)
        .ok()?;
    let page = Region::try_from_mmap(&map).ok()?;
    match shm_snapshot::probe(page) {
        Ok(shm_snapshot::Protocol::Present { updating, .. }) => {
            let cells = shm_snapshot::take_dirty(page)?;
            if updating {
                // Stopped inside an update: it may still write cells it
                // marked before the stop (a `&mut` handed out, then the
                // write). Its marks stay for the next capture, which reads
                // those cells again.
                shm_snapshot::give_back_dirty(page, &cells);
            }
            // Between updates the program's scratch bytes mean nothing.
            let scratch = if updating { None } else { cells.scratch() };
            Some(Marks { cells, scratch })
        }
        _ => None,
    }
}

/// What [`take_marked`] found: the cells the program marked, and its
/// scratch range when the capture is between two of its updates.
#[derive(Debug, Clone)]
struct Marks {
    cells: shm_snapshot::DirtyCells,
    scratch: Option<std::ops::Range<u64>>,
}

/// The memfd's chunk table, computed from the chunks of the cells the
/// program marked (and of the header page's cells, which change at every
/// commit and which taking the marks wrote), the rest taken from the
/// basis. A cell whose extents differ from the basis' is read too. Then
/// [`SPOT_CHECKS`] unmarked cells are read and compared: `None` (read
/// everything) when one differs.
fn table_from_marks(
    memfd: &File,
    extents: &[Extent],
    basis: &DeltaBasis,
    marks: &Marks,
) -> Option<io::Result<Vec<Chunk>>> {
    let marked = &marks.cells;
    let cell = u64::from(basis.chunk_size);
    let pieces: Vec<(u64, u32)> = extents
        .iter()
        .flat_map(|e| split_at_cells(e.offset, e.len, basis.chunk_size))
        .collect();
    // The first cell of the map (the header page, and the program's first
    // bytes after it) is always read: commits change it, and taking the
    // marks wrote it (docs/snapshot-protocol.md, *The dirty map*).
    let header_cells = shm_snapshot::ALWAYS_READ.div_ceil(cell);
    // Walk the cells holding data now or in the basis, in order.
    let (mut i, mut j) = (0, 0);
    let mut table: Vec<Option<Chunk>> = Vec::with_capacity(pieces.len());
    let mut to_read = Vec::new(); // (index in table, piece)
    let mut clean = Vec::new(); // unmarked cells kept from the basis: (first, end) in table
    let index = |offset: u64| offset / cell;
    loop {
        let c = match (pieces.get(i), basis.table.get(j)) {
            (None, None) => break,
            (Some(p), None) => index(p.0),
            (None, Some(b)) => index(b.offset),
            (Some(p), Some(b)) => index(p.0).min(index(b.offset)),
        };
        let i_end = i + pieces[i..].iter().take_while(|p| index(p.0) == c).count();
        let j_end = j + basis.table[j..]
            .iter()
            .take_while(|b| index(b.offset) == c)
            .count();
        let now = &pieces[i..i_end];
        let then = &basis.table[j..j_end];
        let same_extents = now.len() == then.len()
            && now
                .iter()
                .zip(then)
                .all(|(p, b)| p.0 == b.offset && p.1 == b.len);
        let first = table.len();
        if c < header_cells || marked.any(c * cell, cell) || !same_extents {
            for &p in now {
                to_read.push((table.len(), p));
                table.push(None);
            }
        } else {
            table.extend(then.iter().copied().map(Some));
            // A scratch cell is no spot check: one a capture left out of
            // its delta differs from the basis, unmarked.
            if !now.is_empty() && !in_scratch(marks.scratch.as_ref(), c * cell, cell) {
                clean.push((first, table.len()));
            }
        }
        (i, j) = (i_end, j_end);
    }
    // The spot checks: unmarked cells spread over the memfd.
    let step = clean.len() / SPOT_CHECKS + 1;
    for &(first, end) in clean.iter().skip(step / 2).step_by(step).take(SPOT_CHECKS) {
        for (k, kept) in table.iter().enumerate().take(end).skip(first) {
            let c = (*kept)?;
            to_read.push((k, (c.offset, c.len)));
        }
    }
    let read: Vec<(u64, u32)> = to_read.iter().map(|&(_, p)| p).collect();
    let crcs = match crcs_of(memfd, &read) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    for (&(k, _), got) in to_read.iter().zip(crcs) {
        match table[k] {
            // A spot check: the program wrote a cell it did not mark.
            Some(kept) if kept != got => return None,
            _ => table[k] = Some(got),
        }
    }
    // Every entry was kept or read.
    table.into_iter().collect::<Option<Vec<_>>>().map(Ok)
}

/// True when `offset..offset + len` lies wholly inside `scratch`.
fn in_scratch(scratch: Option<&std::ops::Range<u64>>, offset: u64, len: u64) -> bool {
    scratch.is_some_and(|r| r.start <= offset && offset.saturating_add(len) <= r.end)
}

/// The parts of the data `extents` inside the `cells` (both sorted).
fn cell_extents(extents: &[Extent], cells: &[(u64, u32)]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut first = 0;
    for &(offset, n) in cells {
        let end = offset + u64::from(n);
        first += extents[first..].partition_point(|e| e.offset + e.len <= offset);
        for e in &extents[first..] {
            if e.offset >= end {
                break;
            }
            push_merged(&mut out, e.offset.max(offset), (e.offset + e.len).min(end));
        }
    }
    out
}

/// True when no process is left in group `pgid`.
fn group_is_gone(pgid: Pid) -> bool {
    killpg(pgid, None) == Err(Errno::ESRCH)
}

/// Copies while the program runs, through shm-snapshot's protocol
/// (`shm-restore --snapshot protocol`, also called `restore-v1`): a copy is
/// kept only when the program's header proves that no update ran during
/// it, so it is a state the program committed; after a few failed tries
/// the process group is stopped for the copy, as [`StopGroup`] does. A
/// program that commits nothing between two captures is not copied at all
/// ([`Captured::Unchanged`]).
///
/// A memfd without a valid header (a program that does not use
/// shm-snapshot), or one not sealed against shrinking (reading it through a
/// mapping could then crash this process), is captured exactly as
/// [`StopGroup`] does; the result says so in
/// `protocol: Some(CaptureOutcome::Plain { reason, first })`, `first` being true
/// the first time in a row.
#[derive(Debug)]
pub struct SnapshotProtocol {
    stop: StopGroup,
    snapshotter: shm_snapshot::Snapshotter,
    /// The memfd mapped at its length at the last capture.
    map: Option<memmap2::MmapRaw>,
    /// Whether the last capture found the protocol in use.
    in_use: bool,
    /// Whether the last capture was a plain one because of the memfd's
    /// contents (for `first`).
    plain: bool,
    /// The bytes of the last copy that was not kept, for the next one.
    spare: Vec<u8>,
    /// The generation of the last copy made by converging passes (the
    /// program keeps a dirty map), for telling an unchanged memfd.
    converged_at: Option<u64>,
    /// Set when converging passes just gave up: the whole copy that
    /// follows in the same capture does not try them again.
    gave_up: bool,
}

impl SnapshotProtocol {
    /// Captures for the process group `pgid`, waiting at most `timeout` for
    /// it to stop when a stop is needed.
    pub fn new(pgid: i32, timeout: Duration) -> SnapshotProtocol {
        SnapshotProtocol {
            stop: StopGroup::new(pgid, timeout),
            snapshotter: shm_snapshot::Snapshotter::new(),
            map: None,
            in_use: false,
            plain: false,
            spare: Vec::new(),
            converged_at: None,
            gave_up: false,
        }
    }

    /// Uses `snapshotter` (e.g. with other retry settings).
    pub fn with_snapshotter(mut self, snapshotter: shm_snapshot::Snapshotter) -> Self {
        self.snapshotter = snapshotter;
        self
    }

    /// Maps the memfd at `len` bytes (again if its length changed), or says
    /// why it is not read through a mapping.
    fn map(&mut self, memfd: &File, len: u64) -> std::result::Result<(), String> {
        let shrink_sealed = nix::fcntl::fcntl(memfd, nix::fcntl::FcntlArg::F_GET_SEALS)
            .is_ok_and(|seals| seals & libc::F_SEAL_SHRINK != 0);
        if !shrink_sealed {
            // Truncating a memfd under a mapping makes the next access
            // raise SIGBUS.
            self.map = None;
            return Err(
                "the memfd is not sealed against shrinking (see --no-seal), \
                        so it is not read through a mapping"
                    .into(),
            );
        }
        let len = usize::try_from(len).map_err(|_| "the memfd is too large to map".to_owned())?;
        if self.map.as_ref().is_some_and(|m| m.len() == len) {
            return Ok(());
        }
        self.map = None;
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(memfd)
            .map_err(|e| format!("mapping the memfd: {e}"))?;
        self.map = Some(map);
        Ok(())
    }

    /// A capture as the plain mode makes it, saying why.
    fn plain(&mut self, memfd: &File, reason: String) -> Result<Captured> {
        let first = !self.plain;
        self.plain = true;
        self.in_use = false;
        self.snapshotter.forget();
        Ok(match self.stop.capture(memfd)? {
            Captured::Copied { image, pause, .. } => Captured::Copied {
                image,
                pause,
                protocol: Some(shm_snapshot::CaptureOutcome::Plain { reason, first }),
            },
            other => other,
        })
    }
}

impl SnapshotProtocol {
    /// The memfd mapped, when its header is valid: the region, or why a
    /// plain capture is needed.
    fn protocol_region(&mut self, memfd: &File) -> std::result::Result<Region<'_>, String> {
        let len = memfd
            .metadata()
            .map_err(|e| format!("reading the memfd: {e}"))?
            .len();
        if len < shm_snapshot::HEADER_LEN as u64 {
            return Err("no shm-snapshot header".into());
        }
        self.map(memfd, len)?;
        let map = self.map.as_ref().ok_or("the memfd is not mapped")?;
        let region = Region::try_from_mmap(map).map_err(|e| format!("mapping the memfd: {e}"))?;
        match shm_snapshot::probe(region) {
            Ok(shm_snapshot::Protocol::Present { .. }) => Ok(region),
            Ok(_) => Err("no shm-snapshot header".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A copy made by converging passes, without stopping the program
    /// ([`crate::converge`]), when it keeps shm-snapshot's dirty map:
    /// `first` the cells to copy in any case. `Ok(None)` when the map is
    /// off or the passes gave up (their marks are kept for the next
    /// capture): the caller copies another way.
    fn converge(
        &mut self,
        memfd: &File,
        chunk_size: u32,
        first: impl FnOnce(u64) -> io::Result<BTreeSet<u64>>,
    ) -> Result<Option<Converged>> {
        let fail = |e| Error::io("copying", "the memfd", e);
        let pending = self.stop.pending.take();
        let Ok(region) = self.protocol_region(memfd) else {
            self.stop.pending = pending;
            return Ok(None);
        };
        let first = match memfd.metadata().and_then(|m| first(m.len())) {
            Ok(f) => f,
            Err(e) => {
                self.stop.pending = pending;
                return Err(fail(e));
            }
        };
        match crate::converge::converge(memfd, region, chunk_size, &first, pending.as_ref()) {
            Ok(c) => {
                self.stop.taken = Some(c.taken.clone());
                self.converged_at = Some(c.generation);
                self.in_use = true;
                self.plain = false;
                Ok(Some(c))
            }
            Err(NotConverged::NoMap) => {
                self.stop.pending = pending;
                Ok(None)
            }
            Err(NotConverged::GaveUp(taken)) => {
                self.stop.pending = taken;
                self.gave_up = true;
                Ok(None)
            }
            Err(NotConverged::Failed(e, taken)) => {
                // The marks taken count again at the next capture.
                self.stop.pending = taken;
                Err(fail(e))
            }
        }
    }

    /// The committed generation, when it is the one the last converged
    /// copy holds (nothing to save).
    fn unchanged_since_converged(&mut self, memfd: &File) -> Option<u64> {
        let last = self.converged_at?;
        let region = self.protocol_region(memfd).ok()?;
        match shm_snapshot::probe(region) {
            Ok(shm_snapshot::Protocol::Present {
                generation,
                updating: false,
            }) if generation == last => Some(generation),
            _ => None,
        }
    }
}

/// The cells (indices, `chunk_size` bytes each) holding data in `memfd`.
fn cells_with_data(memfd: &File, len: u64, chunk_size: u32) -> io::Result<BTreeSet<u64>> {
    let cell = u64::from(chunk_size);
    let mut cells = BTreeSet::new();
    for e in data_extents(memfd, len)? {
        let (first, last) = (e.offset / cell, (e.offset + e.len - 1) / cell);
        cells.extend(first..=last);
    }
    Ok(cells)
}

/// An image of the converged cells: each cell holding a non-zero byte is
/// one extent (dense), the rest holes.
fn image_of_cells(c: &Converged, chunk_size: u32, only: Option<&[(u64, u32)]>) -> Result<Image> {
    let cell = u64::from(chunk_size);
    let mut extents = Vec::new();
    let mut bytes = Vec::new();
    let wanted = |index: u64| {
        only.is_none_or(|only| {
            only.binary_search_by_key(&(index * cell), |&(o, _)| o)
                .is_ok()
        })
    };
    let total: usize = c
        .cells
        .iter()
        .filter(|&(&index, _)| wanted(index))
        .map(|(_, data)| data.len())
        .sum();
    bytes
        .try_reserve_exact(total)
        .map_err(|_| Error::io("copying", "the memfd", io::ErrorKind::OutOfMemory.into()))?;
    for (&index, data) in &c.cells {
        if !wanted(index) {
            continue;
        }
        if data.iter().all(|&b| b == 0) {
            continue;
        }
        push_merged(&mut extents, index * cell, index * cell + data.len() as u64);
        bytes.extend_from_slice(data);
    }
    Image::from_parts(c.data_len, extents, bytes)
        .map_err(|e| Error::io("copying", "the memfd", io::Error::other(e)))
}

impl CaptureMethod for SnapshotProtocol {
    fn capture(&mut self, memfd: &File) -> Result<Captured> {
        let pgid = Pid::from_raw(self.stop.pgid);
        if group_is_gone(pgid) {
            return Unpaused.capture(memfd);
        }
        if let Some(generation) = self.unchanged_since_converged(memfd) {
            return Ok(Captured::Unchanged { generation });
        }
        // A program that marks its writes: copied without a stop (unless
        // the passes of this capture's delta just gave up).
        let chunk_size = crate::format::DEFAULT_CHUNK_SIZE;
        let tried = std::mem::take(&mut self.gave_up);
        if !tried
            && let Some(c) = self.converge(memfd, chunk_size, |len| {
                cells_with_data(memfd, len, chunk_size)
            })?
        {
            let image = image_of_cells(&c, chunk_size, None)?;
            return Ok(Captured::Copied {
                image,
                pause: None,
                protocol: Some(shm_snapshot::CaptureOutcome::Consistent {
                    generation: c.generation,
                    tries: c.passes,
                }),
            });
        }
        // Only this capture skips the passes.
        self.gave_up = false;
        self.converged_at = None;
        let pgid = Pid::from_raw(self.stop.pgid);
        if group_is_gone(pgid) {
            return Unpaused.capture(memfd);
        }
        let len = memfd
            .metadata()
            .map_err(|e| Error::io("reading", "the memfd", e))?
            .len();
        if len == 0 {
            // Nothing to tell about the protocol yet.
            return self.stop.capture(memfd);
        }
        if let Err(reason) = self.map(memfd, len) {
            return self.plain(memfd, reason);
        }
        let Some(map) = &self.map else {
            return self.plain(memfd, "the memfd is not mapped".into());
        };
        let region = match shm_snapshot::Region::try_from_mmap(map) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("mapping the memfd: {e}");
                return self.plain(memfd, reason);
            }
        };
        let absent = match shm_snapshot::probe(region) {
            Ok(shm_snapshot::Protocol::Absent) => Some("no shm-snapshot header".to_owned()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = absent {
            return self.plain(memfd, reason);
        }

        let plan = StopPlan::default();
        let mut copy = ProtocolCopy {
            sparse: shm_snapshot::SparseCopy::new(memfd),
            memfd,
            plan: &plan,
        };
        copy.sparse.bytes = std::mem::take(&mut self.spare);
        plan.have.set(copy.sparse.bytes.len());
        let pause = Cell::new(None);
        let (pgid_raw, timeout) = (self.stop.pgid, self.stop.timeout);
        let got = self.snapshotter.capture(region, &mut copy, |copy_now| {
            // Before the stop: the extent search, and a buffer faulted in
            // if the copy's own is too small (see `ProtocolCopy`).
            plan.prepare(memfd, region.len() as u64)?;
            let start = Instant::now();
            match killpg(pgid, Signal::SIGSTOP) {
                Ok(()) => {}
                // Gone: nothing writes the memory any more.
                Err(Errno::ESRCH) => return copy_now(),
                Err(e) => return Err(e.into()),
            }
            let cont = ContinueOnDrop(pgid);
            wait_until_stopped(pgid_raw, timeout).map_err(|e| io::Error::other(e.to_string()))?;
            let copied = copy_now();
            drop(cont);
            pause.set(Some(start.elapsed()));
            copied
        });
        let copy = copy.sparse;
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                self.spare = copy.bytes;
                return Err(Error::Snapshot(e));
            }
        };
        match &got {
            shm_snapshot::CaptureOutcome::Unchanged { generation } => {
                self.spare = copy.bytes;
                self.in_use = true;
                self.plain = false;
                return Ok(Captured::Unchanged {
                    generation: *generation,
                });
            }
            // The header turned bad during the tries: copied stopped.
            shm_snapshot::CaptureOutcome::Plain { .. } => {
                self.in_use = false;
                self.plain = true;
            }
            _ => {
                self.in_use = true;
                self.plain = false;
            }
        }
        let extents = copy
            .extents
            .iter()
            .filter(|r| r.end > r.start)
            .map(|r| Extent {
                offset: r.start as u64,
                len: (r.end - r.start) as u64,
            })
            .collect();
        let image = Image::from_parts(copy.len as u64, extents, copy.bytes).map_err(|problem| {
            Error::io("copying", "the memfd", io::Error::other(problem.to_owned()))
        })?;
        Ok(Captured::Copied {
            image,
            pause: pause.get(),
            protocol: Some(got),
        })
    }

    fn detects_unchanged(&self) -> bool {
        self.in_use
    }

    fn save_failed(&mut self) {
        self.snapshotter.forget();
        self.converged_at = None;
        self.stop.save_failed();
    }

    /// For a program that keeps shm-snapshot's dirty map: converging
    /// passes over the cells it marked since the basis (no stop), saved as
    /// a delta. Otherwise a whole copy ([`CaptureMethod::capture`]), which
    /// the saver compares with the basis.
    fn capture_changes(&mut self, memfd: &File, basis: &DeltaBasis) -> Result<Captured> {
        let pgid = Pid::from_raw(self.stop.pgid);
        if group_is_gone(pgid) {
            return Unpaused.capture(memfd);
        }
        if let Some(generation) = self.unchanged_since_converged(memfd) {
            return Ok(Captured::Unchanged { generation });
        }
        let cs = basis.chunk_size;
        let Some(c) = self.converge(memfd, cs, |len| {
            if len == basis.data_len {
                // The marks since the basis' capture say the rest.
                Ok(BTreeSet::new())
            } else {
                cells_with_data(memfd, len, cs)
            }
        })?
        else {
            self.converged_at = None;
            return self.capture(memfd);
        };
        let cell = u64::from(cs);
        // The basis' chunks, with the copied cells' in their place: both
        // are in cell order, merged in one pass.
        let mut table: Vec<Chunk> = Vec::with_capacity(basis.table.len() + c.cells.len());
        let mut kept = basis.table.iter().peekable();
        for (&index, data) in &c.cells {
            while let Some(ch) = kept.next_if(|ch| ch.offset / cell < index) {
                table.push(*ch);
            }
            while kept.next_if(|ch| ch.offset / cell == index).is_some() {}
            if data.iter().any(|&b| b != 0) {
                table.push(Chunk {
                    offset: index * cell,
                    len: data.len() as u32,
                    crc: crc32fast::hash(data),
                });
            }
        }
        table.extend(kept);
        table.retain(|ch| ch.offset + u64::from(ch.len) <= c.data_len);
        let mut cells = changed_cells(&basis.table, &table, c.data_len, cs);
        // A converged copy is at a commit: the scratch cells stay out.
        let scratch = c.scratch.clone().filter(|_| c.data_len == basis.data_len);
        cells.retain(|&(offset, n)| !in_scratch(scratch.as_ref(), offset, u64::from(n)));
        let changed: u64 = cells.iter().map(|&(_, n)| u64::from(n)).sum();
        if changed > basis.budget {
            // The save is a full one: copy everything, the marks taken
            // counting again.
            self.stop.save_failed();
            self.converged_at = None;
            return self.capture(memfd);
        }
        let image = image_of_cells(&c, cs, Some(&cells))?;
        Ok(Captured::Changes {
            changes: Changes {
                basis_generation: basis.generation,
                data_len: c.data_len,
                table,
                cells,
                image,
                marked: Some(c.taken.count()),
            },
            pause: None,
        })
    }
}

/// What the protocol's fallback prepares before it stops the group, for
/// the copy it makes in the stop.
#[derive(Default)]
struct StopPlan {
    /// The memfd's data extents, found just before the stop.
    searched: Cell<Option<Vec<Extent>>>,
    /// A buffer faulted in before the stop, when the copy's own is smaller.
    buf: Cell<Option<Vec<u8>>>,
    /// The length of the copy's own buffer (faulted in up to there).
    have: Cell<usize>,
    /// The copy's old buffer when `buf` replaced it: freed after the stop.
    old: Cell<Vec<u8>>,
}

impl StopPlan {
    /// Searches the extents of the memfd's first `len` bytes and makes sure
    /// a buffer of their size (and the header page's) is faulted in.
    fn prepare(&self, memfd: &File, len: u64) -> io::Result<()> {
        let searched = data_extents(memfd, len)?;
        let need = stored_len(&searched).saturating_add(shm_snapshot::HEADER_LEN as u64);
        let need = usize::try_from(need).unwrap_or(usize::MAX);
        if need > self.have.get() {
            self.buf.set(Some(prefaulted(need)?));
        }
        self.searched.set(Some(searched));
        Ok(())
    }
}

/// The protocol mode's copy: a [`shm_snapshot::SparseCopy`] for the
/// optimistic tries (searching the extents in each try costs no pause);
/// the copy in the fallback's stop instead takes the extents its
/// [`StopPlan`] searched just before the stop, re-checks the holes between
/// them ([`data_extents_since`]), and reads into a buffer faulted in before.
struct ProtocolCopy<'f> {
    sparse: shm_snapshot::SparseCopy<'f>,
    memfd: &'f File,
    plan: &'f StopPlan,
}

impl CopyTarget for ProtocolCopy<'_> {
    fn copy_from(&mut self, src: Region<'_>) -> io::Result<()> {
        let Some(searched) = self.plan.searched.take() else {
            self.sparse.copy_from(src)?;
            self.plan.have.set(self.sparse.bytes.len());
            return Ok(());
        };
        let len = src.len() as u64;
        let extents = with_header_page(data_extents_since(self.memfd, len, &searched)?, len);
        let buf = match self.plan.buf.take() {
            Some(buf) => {
                self.plan.old.set(std::mem::take(&mut self.sparse.bytes));
                buf
            }
            None => std::mem::take(&mut self.sparse.bytes),
        };
        // The group is stopped: reading the memfd is as exact as reading
        // the mapping, and runs on a few threads.
        self.sparse.bytes = read_extents(self.memfd, &extents, buf)?;
        self.sparse.len = src.len();
        // Within `len` (a usize), so every bound converts back.
        self.sparse.extents = extents
            .iter()
            .map(|e| e.offset as usize..(e.offset + e.len) as usize)
            .collect();
        self.plan.have.set(self.sparse.bytes.len());
        Ok(())
    }

    fn header_mut(&mut self) -> Option<&mut [u8]> {
        self.sparse.header_mut()
    }

    fn required_len(&self) -> Option<usize> {
        None
    }
}

/// `extents` with the header page (the first [`shm_snapshot::HEADER_LEN`]
/// bytes, or all of a shorter memfd) always in the first one, as
/// [`shm_snapshot::SparseCopy`] keeps it: a blank header page is copied as
/// the zeros it holds.
fn with_header_page(extents: Vec<Extent>, len: u64) -> Vec<Extent> {
    let head = (shm_snapshot::HEADER_LEN as u64).min(len);
    if head == 0 {
        return extents;
    }
    let mut out = Vec::with_capacity(extents.len() + 1);
    push_merged(&mut out, 0, head);
    for e in extents {
        push_merged(&mut out, e.offset, e.offset + e.len);
    }
    out
}

/// The memfd's data extents now (searched while the program runs, to be
/// re-checked with [`data_extents_since`] once it is stopped).
fn search(memfd: &File) -> Result<Vec<Extent>> {
    let fail = |e| Error::io("reading", "the memfd", e);
    let len = memfd.metadata().map_err(fail)?.len();
    data_extents(memfd, len).map_err(fail)
}

/// Waits until every thread of every process in group `pgid` is stopped
/// (or dead). A process whose threads are still running (or in the middle
/// of a system call) has not yet reached the stop.
///
/// One wait cannot end by itself: a process that started a child with
/// `vfork` sleeps uninterruptibly until the child execs, and a child
/// stopped before its exec never does. When the only members not stopped
/// are in such a sleep for a while, the group is let go for a moment
/// (`SIGCONT`) and stopped again, so the child can exec.
pub fn wait_until_stopped(pgid: i32, timeout: Duration) -> Result<()> {
    /// How long members may sleep uninterruptibly before the group is
    /// nudged, and the longest it then runs.
    const NUDGE_AFTER: Duration = Duration::from_millis(10);
    const MAX_NUDGE_RUN: Duration = Duration::from_millis(8);
    let start = Instant::now();
    let group = Pid::from_raw(pgid);
    let mut members = group_members(pgid);
    let mut backoff = Duration::from_micros(20);
    let mut stuck_since: Option<Instant> = None;
    let mut nudge_run = Duration::from_micros(500);
    loop {
        let states: Vec<Progress> = members.iter().map(|&pid| progress(pid)).collect();
        if states.iter().all(|&p| p == Progress::Stopped) {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::NotStopped {
                pgid,
                waited_ms: timeout.as_millis() as u64,
            });
        }
        if states.iter().all(|&p| p != Progress::Running) {
            let since = *stuck_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= NUDGE_AFTER {
                let _ = killpg(group, Signal::SIGCONT);
                std::thread::sleep(nudge_run);
                let _ = killpg(group, Signal::SIGSTOP);
                nudge_run = (nudge_run * 2).min(MAX_NUDGE_RUN);
                stuck_since = None;
                // The vfork child is another program now; a new one may
                // have appeared.
                members = group_members(pgid);
            }
        } else {
            stuck_since = None;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(1));
    }
}

/// The pids of group `pgid`'s live members.
fn group_members(pgid: i32) -> Vec<i32> {
    shm_fd::process::group_members(pgid)
        .into_iter()
        .map(|p| p.pid)
        .collect()
}

/// Where a process is on its way to a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Every thread is stopped, traced, dead, or the process is gone.
    Stopped,
    /// The threads not stopped are in uninterruptible sleep ("D").
    Blocked,
    /// A thread is running or in an interruptible sleep: it stops soon.
    Running,
}

/// How far `pid` is on its way to a stop.
fn progress(pid: i32) -> Progress {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Progress::Stopped; // gone
    };
    let mut progress = Progress::Stopped;
    for t in tasks.flatten() {
        let stat = fs::read_to_string(t.path().join("stat"));
        match stat.map(|s| shm_fd::process::ProcStat::parse(&s).map(|p| p.state)) {
            Ok(Some(c)) if "TtZXx".contains(c) => {}
            Ok(Some('D')) => progress = Progress::Blocked,
            Ok(_) => return Progress::Running,
            Err(_) => {} // the thread exited
        }
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command started in a process group of its own (the group a
    /// capture stops), killed with its group and reaped when dropped, also
    /// when a test fails part way.
    struct Group(std::process::Child);

    impl Group {
        fn spawn(cmd: &mut std::process::Command) -> Group {
            use std::os::unix::process::CommandExt;
            Group(cmd.process_group(0).spawn().unwrap())
        }

        /// `sleep 30`, a program that never writes.
        fn sleeper() -> Group {
            Group::spawn(std::process::Command::new("sleep").arg("30"))
        }

        fn pgid(&self) -> i32 {
            self.0.id() as i32
        }

        /// Kills the group (SIGKILL) and reaps the leader.
        fn kill(&mut self) {
            let _ = killpg(Pid::from_raw(self.pgid()), Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }

    impl Drop for Group {
        fn drop(&mut self) {
            self.kill();
        }
    }

    #[test]
    fn a_group_caught_inside_vfork_is_stopped_too() {
        // The shell starts each `true` with vfork: a SIGSTOP can land on the
        // child before its exec, leaving the parent in uninterruptible
        // sleep ("D") until the child goes on, which it cannot while
        // stopped.
        let mut group = Group::spawn(
            std::process::Command::new("sh").args(["-c", "while :; do /bin/true; done"]),
        );
        let pgid = group.pgid();
        let memfd = shm_fd::SharedFd::create("cap-vfork", Default::default())
            .unwrap()
            .into_file();
        let mut capture = StopGroup::new(pgid, Duration::from_secs(3));
        let rounds = 60;
        let mut failed = Vec::new();
        for _ in 0..rounds {
            if let Err(e) = capture.capture(&memfd) {
                failed.push(e.to_string());
            }
        }
        group.kill();
        assert!(
            failed.is_empty(),
            "{} of {rounds}: {failed:?}",
            failed.len()
        );
    }

    #[test]
    fn protocol_capture_of_a_memfd_it_cannot_map_safely_is_plain_and_says_so_once() {
        use std::os::unix::fs::FileExt;
        let mut group = Group::sleeper();
        let pgid = group.pgid();
        let unsealed = shm_fd::SharedFd::create(
            "cap-unsealed",
            shm_fd::CreateOptions {
                size: 0,
                seal_shrink: false,
            },
        )
        .unwrap()
        .into_file();
        unsealed.write_all_at(b"data", 8192).unwrap();
        let mut capture = SnapshotProtocol::new(pgid, Duration::from_secs(5));
        let mut firsts = Vec::new();
        for _ in 0..2 {
            match capture.capture(&unsealed).unwrap() {
                Captured::Copied {
                    image,
                    pause: Some(_),
                    protocol: Some(shm_snapshot::CaptureOutcome::Plain { reason, first }),
                } => {
                    assert!(reason.contains("not sealed against shrinking"), "{reason}");
                    assert_eq!(&image.to_dense()[8192..], b"data");
                    firsts.push(first);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(firsts, [true, false]);
        assert!(!capture.detects_unchanged());
        group.kill();
        // The group is gone: the memfd is read directly, as after the exit.
        assert!(matches!(
            capture.capture(&unsealed).unwrap(),
            Captured::Quiescent
        ));
    }

    /// A memfd of 64 pages with data in pages 1, 3 and 40 (each filled
    /// with its page number).
    fn fragmented_memfd(name: &str) -> File {
        use std::os::unix::fs::FileExt;
        let memfd = shm_fd::SharedFd::create(name, Default::default())
            .unwrap()
            .into_file();
        memfd.set_len(64 * 4096).unwrap();
        for p in [1u64, 3, 40] {
            memfd.write_all_at(&[p as u8; 4096], p * 4096).unwrap();
        }
        memfd
    }

    /// What the program writes between the extent search and the stop:
    /// data into two holes (one between extents, one after the last) and
    /// a page punched out of an extent.
    fn write_after_the_search(memfd: &File) {
        use std::os::unix::fs::FileExt;
        memfd.write_all_at(&[0xA2; 4096], 2 * 4096).unwrap();
        memfd.write_all_at(&[0xB0; 100], 50 * 4096 + 7).unwrap();
        nix::fcntl::fallocate(
            memfd,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            3 * 4096,
            4096,
        )
        .unwrap();
    }

    #[test]
    fn a_hole_written_between_the_extent_search_and_the_stop_is_copied() {
        let mut group = Group::sleeper();
        let pgid = group.pgid();
        let memfd = fragmented_memfd("cap-hole-filled");
        let mut capture = StopGroup::new(pgid, Duration::from_secs(5));
        // The write lands after the search (made before the stop) and
        // before the copy, as a program's last write before the stop can.
        let got = capture
            .capture_with(&memfd, || {
                assert_eq!(progress(pgid), Progress::Stopped);
                write_after_the_search(&memfd);
            })
            .unwrap();
        group.kill();
        let Captured::Copied { image, .. } = got else {
            panic!("{got:?}")
        };
        let now = Image::read_from(&memfd).unwrap();
        assert_eq!(image.to_dense(), now.to_dense(), "the copy is torn");
        assert_eq!(image.to_dense()[2 * 4096], 0xA2);
        assert_eq!(image.to_dense()[3 * 4096], 0, "the punched page");
    }

    /// A capture of the changes since a save, with the program's writes
    /// landing between the extent search and the copy, saved as a delta:
    /// the delta loads to exactly the memfd as it is at the stop. With a
    /// budget too small, the capture copies everything instead.
    #[test]
    fn a_capture_of_the_changes_copies_what_changed_up_to_the_stop() {
        use crate::load::{LoadOutcome, restore};
        use crate::save::{SaveOptions, Saver};
        use crate::storage::DirStorage;
        use std::ffi::OsStr;
        let mut group = Group::sleeper();
        let pgid = group.pgid();
        let memfd = fragmented_memfd("cap-changes");
        // Pages 4..40 hold data too, so the changes are a small part.
        for p in 4u64..40 {
            std::os::unix::fs::FileExt::write_all_at(&memfd, &[p as u8; 4096], p * 4096).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let options = SaveOptions::builder().chunk_size(4096).build().unwrap();
        let mut saver = Saver::new(DirStorage::new(dir.path()), OsStr::new("s"), options);
        let mut capture = StopGroup::new(pgid, Duration::from_secs(5));
        assert!(saver.delta_basis().is_none(), "nothing saved yet");
        let first = capture.capture(&memfd).unwrap();
        saver.save_captured(&first, &memfd, 1).unwrap();
        let basis = saver.delta_basis().expect("a delta can follow");
        let got = capture
            .capture_changes_with(&memfd, &basis, || {
                assert_eq!(progress(pgid), Progress::Stopped);
                write_after_the_search(&memfd);
            })
            .unwrap();
        let Captured::Changes { changes, pause } = &got else {
            panic!("{got:?}")
        };
        assert!(pause.is_some());
        // Page 2 (filled), 3 (punched) and 50 (written) changed.
        assert_eq!(
            changes.cells(),
            [(2 * 4096, 4096), (3 * 4096, 4096), (50 * 4096, 4096)]
        );
        let outcome = saver.save_captured(&got, &memfd, 2).unwrap();
        let crate::save::SaveOutcome::Saved(report) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(report.base.map(|b| b.generation), Some(1));
        assert_eq!(report.stored_len, 3 * 4096);
        let loaded = shm_fd::SharedFd::create("cap-changes-load", Default::default())
            .unwrap()
            .into_file();
        let out = restore(&dir.path().join("s"), &loaded, u64::MAX, 0, None).unwrap();
        assert!(matches!(out, LoadOutcome::Loaded { .. }));
        let now = Image::read_from(&memfd).unwrap().to_dense();
        assert_eq!(Image::read_from(&loaded).unwrap().to_dense(), now);

        // More changed than the budget: a whole copy, saved in full.
        let mut small = saver.delta_basis().unwrap();
        small.budget = 4095;
        std::os::unix::fs::FileExt::write_all_at(&memfd, b"x", 5 * 4096).unwrap();
        let got = capture.capture_changes(&memfd, &small).unwrap();
        let Captured::Copied { image, .. } = &got else {
            panic!("{got:?}")
        };
        assert_eq!(
            image.to_dense(),
            Image::read_from(&memfd).unwrap().to_dense()
        );
        // A copy of changes made against another basis is refused, and
        // nothing is written.
        let stale = capture.capture_changes(&memfd, &basis).unwrap();
        let e = saver.save_captured(&stale, &memfd, 3).unwrap_err();
        assert!(e.to_string().contains("generation 1"), "{e}");
        group.kill();
        assert!(matches!(
            capture.capture_changes(&memfd, &basis).unwrap(),
            Captured::Quiescent
        ));
    }

    #[test]
    fn the_protocol_stop_copy_rechecks_the_extents_searched_before_it() {
        let memfd = fragmented_memfd("cap-plan");
        let map = memmap2::MmapOptions::new()
            .len(64 * 4096)
            .map_raw(&memfd)
            .unwrap();
        let region = Region::try_from_mmap(&map).unwrap();
        let plan = StopPlan::default();
        let mut copy = ProtocolCopy {
            sparse: shm_snapshot::SparseCopy::new(&memfd),
            memfd: &memfd,
            plan: &plan,
        };
        plan.prepare(&memfd, region.len() as u64).unwrap();
        write_after_the_search(&memfd);
        copy.copy_from(region).unwrap();
        assert!(copy.header_mut().is_some(), "the header page is copied");
        let copy = copy.sparse;
        let extents = copy
            .extents
            .iter()
            .map(|r| Extent {
                offset: r.start as u64,
                len: (r.end - r.start) as u64,
            })
            .collect();
        let image = Image::from_parts(copy.len as u64, extents, copy.bytes).unwrap();
        let now = Image::read_from(&memfd).unwrap();
        assert_eq!(image.to_dense(), now.to_dense(), "the copy is torn");
        assert_eq!(image.extents()[0].offset, 0);
        // The plan was used up: the next copy (a try) searches afresh.
        assert!(plan.searched.take().is_none());
    }

    #[test]
    fn stops_and_continues_a_group() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        let memfd = shm_fd::SharedFd::create("cap", Default::default())
            .unwrap()
            .into_file();
        let got = StopGroup::new(pgid, Duration::from_secs(5))
            .capture(&memfd)
            .unwrap();
        assert!(got.pause().is_some());
        // Continued afterwards: the shell is running (R), not stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while progress(pgid) == Progress::Stopped {
            assert!(Instant::now() < deadline, "the group was not continued");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
