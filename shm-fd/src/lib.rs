//! Keep a program's state in a Linux memfd that outlives the program.
//!
//! A watcher (the `shm-fd` command, `shm-restore`, or systemd's file
//! descriptor store) owns a memfd and passes it to each run of a program on
//! an inherited fd, named in systemd's `LISTEN_FDS` / `LISTEN_FDNAMES`
//! variables. The program maps it and finds its state where the last run
//! left it.
//!
//! # The consumer side
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // SAFETY: this runs first in `main`, before the program opens any file,
//! // so the fd LISTEN_FDS names was inherited and has no other owner here.
//! let shared = unsafe { shm_fd::SharedFd::from_env(shm_fd::DEFAULT_NAME)? };
//! // SAFETY: only this program writes the memfd while it runs, and the
//! // watcher sealed it against shrinking.
//! let mut state = unsafe { shared.map_mut(8)? };
//! let runs = u64::from_le_bytes(state[..8].try_into()?) + 1;
//! state[..8].copy_from_slice(&runs.to_le_bytes());
//! println!("run number {runs}");
//! # Ok(()) }
//! ```
//!
//! Run outside a watcher, [`SharedFd::from_env`] fails with
//! [`Error::NotPassed`], whose message says to start the program under
//! `shm-fd`.
//!
//! Adopting an fd from the environment is `unsafe` (as
//! [`std::os::fd::FromRawFd`] is): a variable cannot prove that the number
//! it names is not already owned by something else in this process. Do it
//! first thing in `main`. A program that shares the memfd with
//! shm-snapshot's snapshotter maps its data with
//! [`SharedFd::map_mut_range`], never the header page.
//!
//! # The producer side
//!
//! [`Handover::adopt_or_create`] takes inherited fds and reuses or creates
//! the memfd ([`Handover::reuse_or_create`] for fds already owned);
//! [`Handover::install`] puts the fds on `3, 4, ...` and
//! [`PassedFds::configure`] sets the variables on a [`std::process::Command`].
//! [`notify_fd_store`] uploads a new memfd to systemd's fd store.
//! With the `cli` feature (off by default: it brings clap and
//! signal-hook, which a program that only links the library does not
//! need), `process::spawn_group` starts a command that dies with its
//! supervisor, process group and all, and [`process`] has the other
//! pieces the `shm-fd` and `shm-restore` commands share.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod env;
mod error;
mod memfd;
mod notify;
mod pass;
pub mod process;
mod sys;
#[cfg(feature = "cli")]
pub mod units;

pub use env::{
    LISTEN_FDS_START, ListenEnv, MAX_LISTEN_FDS, MAX_NAME_LEN, UNKNOWN_NAME, check_name,
};
pub use error::{Error, Result};
pub use memfd::{CreateOptions, MAX_MEMFD_NAME_LEN, Seals, SharedFd};
pub use notify::notify_fd_store;
pub use pass::{Handover, PassedFds};

/// The name of the shared memory fd in `LISTEN_FDNAMES` unless configured
/// otherwise.
pub const DEFAULT_NAME: &str = "SHM_SHARED_FD";

/// The README's code, compiled and checked as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
