//! Consistent snapshots of a running program's shared memory, without
//! stopping it.
//!
//! A program keeps its state in a memfd (see `shm-fd`); `shm-restore` saves
//! that memfd to a file while the program runs. Copying memory that is
//! being written can give a torn copy, half old and half new. With this
//! crate the program marks, in a small header at the start of the memfd,
//! when it is inside an update and when its state is consistent (a
//! *commit*); the snapshotter copies optimistically and keeps a copy only
//! when the header proves that no update ran during the copy (a seqlock).
//! The byte layout and the memory orderings are in
//! `docs/snapshot-protocol.md`.
//!
//! # Layout
//!
//! The first page ([`HEADER_LEN`] bytes) of the memfd is the header; the
//! program's own data region starts at [`DATA_OFFSET`] and runs to the end
//! of the memfd: [`Publisher::data`].
//!
//! # The program's side
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use shm_snapshot::{Publisher, Region, DATA_OFFSET};
//! // SAFETY: first thing in main: the inherited fd has no other owner.
//! let shared = unsafe { shm_fd::SharedFd::from_env(shm_fd::DEFAULT_NAME)? };
//! let map = shared.map_raw((DATA_OFFSET + 4096) as u64)?;
//! let (mut publisher, opened) = Publisher::open(Region::from_mmap(&map))?;
//! if opened.interrupted {
//!     // The last run stopped inside an update: repair, then commit.
//!     publisher.commit();
//! }
//! let update = publisher.begin();
//! let runs = update.data().load_u64(0) + 1;
//! update.data().store_u64(0, runs);
//! update.commit();
//! # Ok(()) }
//! ```
//!
//! One `Publisher` per region (the program is the only writer of the
//! header's sequence word). [`Publisher::check`] says what `open` would do
//! without writing anything, for a program that refuses foreign state
//! before it grows or writes the memfd.
//!
//! # The snapshotter's side
//!
//! [`Snapshotter::capture`] does the whole job (skip when nothing was
//! committed, bounded optimistic tries, fallback stop) into a dense buffer
//! or a [`SparseCopy`] (the memfd's data extents only); the pieces are
//! [`probe`], [`has_protocol`], [`committed_generation`] and
//! [`try_copy_consistent`]. [`Snapshotter::wait_for_generation`] sleeps
//! (futex) until the program commits.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let memfd: std::fs::File = unimplemented!();
//! use shm_snapshot::{CaptureOutcome, Region, Snapshotter, SparseCopy};
//! let map = memmap2::MmapOptions::new().map_raw(&memfd)?;
//! let mut snapshotter = Snapshotter::new();
//! let mut copy = SparseCopy::new(&memfd);
//! let got = snapshotter.capture(Region::from_mmap(&map), &mut copy, |copy_now| {
//!     // stop the program (SIGSTOP its group, wait until stopped), then:
//!     let copied = copy_now();
//!     // continue it (SIGCONT)
//!     copied
//! })?;
//! if let CaptureOutcome::Unchanged { .. } = got { /* nothing to save */ }
//! # Ok(()) }
//! ```
//!
//! # Model checking
//!
//! All accesses go through [`Region`] (atomic words), which is built from
//! loom's atomics under `--cfg loom`, over a [`HeapBuffer`]:
//! `RUSTFLAGS="--cfg loom" cargo test -p shm-snapshot --release --test loom`.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(not(loom))]
mod dirty;
mod error;
#[cfg(not(loom))]
mod extents;
mod futex;
mod header;
mod publisher;
mod region;
mod snapshot;
mod sync;
mod target;

#[cfg(not(loom))]
pub use dirty::{
    ALWAYS_READ, DIRTY_CELLS, DirtyCells, DirtyMap, MAX_SHIFT, MIN_SHIFT, control_shift,
    give_back_dirty, shift_for, take_dirty,
};
pub use error::Error;
#[cfg(not(loom))]
pub use extents::{data_extents, data_extents_since};
pub use header::{
    DATA_OFFSET, HEADER_LEN, MAGIC, OFF_DIRTY, OFF_DIRTY_MAP, OFF_SCRATCH, OFF_SEQ, OFF_WAITERS,
    OFF_WAKE, VERSION,
};
#[cfg(not(loom))]
pub use publisher::MappedRegion;
pub use publisher::{AsRegion, OpenedHeader, OwnedPublisher, Publisher, Update};
pub use region::{HeapBuffer, Region};
pub use snapshot::{
    CaptureOutcome, CopyOutcome, Protocol, Snapshotter, committed_generation, has_protocol, probe,
    try_copy_consistent,
};
pub use target::CopyTarget;
#[cfg(not(loom))]
pub use target::SparseCopy;
