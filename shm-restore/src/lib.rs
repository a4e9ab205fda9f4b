//! Durable snapshots of a shared memfd: the library behind `shm-restore`.
//!
//! `shm-restore` keeps a program's memfd across reboots: before the program
//! starts it loads the snapshot file into an empty memfd, and it saves the
//! memfd back when the program exits, on `SIGUSR1` and periodically. This
//! crate holds the pieces, each usable alone:
//!
//! - [`format`](mod@format): the snapshot file layout (version 1), byte by byte as in
//!   `docs/snapshot-format.md`: little-endian, a CRC32-protected header and
//!   chunk table, and a CRC32 per data chunk so damage is located.
//! - [`Image`]: a sparse private copy of a memfd (holes are neither copied
//!   nor written).
//! - [`CaptureMethod`]: how a consistent copy is taken while the program runs
//!   ([`StopGroup`] pauses its process group for the copy only;
//!   [`SnapshotProtocol`] copies while it runs and keeps the copy when the
//!   program's shm-snapshot header proves it is a committed state).
//! - [`Saver`]: the crash-safe save protocol (temp file, fsync, `.prev`,
//!   rename, directory fsync) over the [`Storage`] I/O seam.
//! - [`restore`]: loading with fallback on `.prev`; damaged files are moved
//!   aside, never deleted or loaded.
//! - [`Progress`]: how many bytes a long load or save has done, for a
//!   progress display.
//! - [`verify`] (the `--check` path) and [`read_snapshot`]: readers of
//!   untrusted files or bytes; every count and length in a file is bounded
//!   by the file's size before it sizes an allocation or a loop, so a
//!   damaged or hostile file is an error, never a panic or an abort.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use shm_restore::{CaptureMethod, DirStorage, SaveOptions, Saver, StopGroup, Unpaused};
//! let shared = shm_fd::SharedFd::create("demo", Default::default())?;
//! // A private open file description: SEEK_DATA moves its offset.
//! let memfd = shared.reopen()?.into_file();
//! let path = std::path::Path::new("state.snap");
//! shm_restore::restore(path, &memfd, shm_restore::DEFAULT_MAX_DATA_LEN, 0, None)?;
//! // ... run the program ...
//! let (storage, name) = DirStorage::for_snapshot(path)?;
//! let mut saver = Saver::new(storage, &name, SaveOptions::default());
//! // The program exited: nothing writes the memfd, save it directly.
//! let captured = Unpaused.capture(&memfd)?;
//! let now = std::time::UNIX_EPOCH.elapsed()?.as_nanos() as u64;
//! saver.save_captured(&captured, &memfd, now)?;
//! # Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod background;
mod capture;
mod chain;
mod converge;
mod error;
pub mod format;
mod image;
mod load;
mod parallel;
mod progress;
mod save;
mod snapshot;
mod storage;

// The library's API: load, save (with a consistent copy of a running
// program's memfd), check, and their options and errors.
pub use capture::{CaptureMethod, Captured, SnapshotProtocol, StopGroup, Unpaused};
pub use chain::{base_name, series_of};
pub use error::{Damage, Error, InvalidOption, Result};
pub use image::{Extent, Image, prefaulted};
pub use load::{Fallback, LoadOutcome, restore};
pub use progress::Progress;
pub use save::{
    Changes, DeltaBasis, SaveOptions, SaveOptionsBuilder, SaveOutcome, SaveReport, Saver,
    remove_stale_temps,
};
pub use snapshot::{
    DEFAULT_MAX_DATA_LEN, Inspection, ReadAt, ReadError, Snapshot, inspect, read_snapshot, verify,
};
pub use storage::{DirStorage, Storage};

// What the `shm-restore` command and the tests use besides: not part of
// the library's API (hidden, and only with the `cli` feature).
#[cfg(feature = "cli")]
#[doc(hidden)]
pub use capture::wait_until_stopped;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub use image::{data_extents, data_extents_since, probe_table, stored_len};
#[cfg(feature = "cli")]
#[doc(hidden)]
pub use save::{move_aside, prev_path};
#[cfg(feature = "cli")]
#[doc(hidden)]
pub use snapshot::{file_time, format_time, read_header};

/// Now, in nanoseconds since the Unix epoch (0 if the clock is before it).
#[cfg(feature = "cli")]
#[doc(hidden)]
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}
