//! Typed, crash-atomic data structures inside a shared memory mapping.
//!
//! A program keeps its state in a region of memory — the memfd that
//! `shm-fd` hands it, a file, or a heap buffer in tests — and finds it again
//! on the next run, read in place with no deserialisation:
//!
//! ```
//! use shm_state::{Layout, Source, State, StateMap, StateVec, Bytes};
//!
//! #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
//! #[repr(C)]
//! struct Root {
//!     runs: u64,
//!     balances: StateVec<u64>,
//!     names: StateMap<u64, Bytes>,
//! }
//!
//! # fn main() -> shm_state::Result<()> {
//! // In a real program: `unsafe { Source::shared(SharedFd::from_env(..)?) }`.
//! let mut state = State::<Root>::open(Source::heap(Vec::new()), Layout::new(1))?;
//! println!("{}", state.report()); // "created, generation 1"
//! state.transaction(|tx| {
//!     if tx.root()?.balances.is_null() {
//!         let balances = tx.new_vec()?;
//!         let names = tx.new_map()?;
//!         let root = tx.root_mut()?;
//!         root.balances = balances;
//!         root.names = names;
//!     }
//!     let root = *tx.root()?;
//!     tx.root_mut()?.runs += 1;
//!     tx.vec(root.balances)?.push(100)?;
//!     tx.map(root.names)?.insert(&0, b"alice")?;
//!     Ok::<_, shm_state::Error>(())
//! })?;
//! let root = *state.root()?;
//! assert_eq!(state.vec(root.balances)?, &[100]);
//! assert_eq!(state.map(root.names)?.get(&0)?, Some(&b"alice"[..]));
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **All or nothing.** Every change is made in a [`State::transaction`].
//!   Before a transaction overwrites any byte that was part of the committed
//!   state, its before-image is written to a journal in the region; the
//!   commit is one atomic store of a header word. If the process dies at
//!   any instruction, the next [`State::open`] rolls the unfinished
//!   transaction back ([`Opened::Recovered`]) — including the opening
//!   transaction itself, creation and migrations. An operation that fails
//!   after it changed something fails its transaction
//!   ([`Error::Incomplete`]) even if the closure ignores the error.
//! - **Validated.** Every offset, length and tag read from the region is
//!   checked (checked arithmetic, bounds, alignment, kinds, checksums on the
//!   header and the journal records) before use: a damaged region gives an
//!   [`Error`], never undefined behaviour or a panic.
//! - **Versioned.** The region records the program's [`Layout::version`]
//!   and the root type's size and alignment; a different layout runs the
//!   program's migration or is refused, a newer version is refused
//!   ([`Error::Downgrade`]), and a state is never silently reset (a wiped
//!   header is refused, not created over).
//! - **One owner.** A lock in the region names the process holding the
//!   state (pid, start time, boot id) and the memory it holds (the memfd's
//!   or file's device and inode); a second opener of that memory, in
//!   another process or another thread, gets [`Error::Locked`] while the
//!   holder lives. The same bytes in other memory (a second memfd they were
//!   copied to, a snapshot restored on this or another boot) are not held:
//!   they open, and an interrupted transaction is rolled back.
//! - **Damage is refused, never guessed.** The words that decide recovery
//!   carry checks (the commit word a check byte, the superblock and the
//!   dynamic header CRCs, free-list heads a check, journal records CRCs and
//!   an end marker): one flipped bit opens to exactly the committed state
//!   or is refused as [`Error::Corrupted`], with the region as it was
//!   found (a rollback that turns out to meet damage is undone). The lock
//!   words carry a seal, so damage to a live holder's words never lets a
//!   second opener in.
//! - **Snapshot-consistent.** With [`Layout::with_snapshot_protocol`], the
//!   first page of the memfd holds shm-snapshot's header and every
//!   transaction is published through it ("updating" before the first
//!   write, "committed" after the commit), so a snapshot copied while the
//!   program runs is a committed state (creation and recovery at open
//!   included). A snapshot taken by stopping the
//!   program (shm-restore's fallback) is like a kill at that instruction:
//!   the next open rolls the interrupted transaction back. A program can
//!   also watch commits with its own [`CommitHook`].
//!
//! The byte layout is documented in `docs/state-format.md`.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod cell;
mod check;
mod error;
mod format;
mod handle;
mod journal;
mod layout;
mod lock;
mod log;
mod map;
mod mem;
mod open;
mod owner;
mod published;
mod ring;
mod shared;
mod snapshot;
mod source;
mod state;
mod tx;
mod vec;
mod verify;

#[cfg(test)]
mod tests;

pub use error::{Corruption, Error, Result, StoredLayout};
pub use format::{CREATING_MAGIC, FORMAT_VERSION, HEADER_LEN, MAGIC, OLDEST_FORMAT};
pub use handle::{StateCell, StateLog, StateMap, StatePublished, StateRing, StateVec};
pub use layout::{Layout, Migrate, OldRoot};
pub use log::{LogIter, LogMut, LogRef};
pub use map::{Bytes, Item, MapMut, MapRef};
pub use open::{OpenReport, Opened};
pub use ring::{RingEnd, RingMut};
pub use shared::{MAX_PEERS, MapView, RingView, SharedState, Stats as SharedStats, View};
pub use snapshot::CommitHook;
pub use source::Source;
pub use state::{State, Tx};
pub use vec::VecMut;
pub use verify::HeapReport;
