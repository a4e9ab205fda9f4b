//! The library's error type.

use std::fmt;
use std::io;

/// Everything that can go wrong while opening a state, reading it or running
/// a transaction.
///
/// Each message names the thing (the region, a structure, a field) and the
/// problem in one line, so a binary can print it as it is.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The region holds data that is not a shm-state region (wrong magic).
    /// Nothing was changed: the data is left as it was.
    NotAState {
        /// What the first eight bytes hold instead.
        found: [u8; 8],
    },
    /// The region was written by an incompatible version of this library.
    UnsupportedFormat {
        /// The format version recorded in the region.
        found: u32,
        /// The version this library reads.
        supported: u32,
    },
    /// The region is smaller than its header says, or too small to hold one.
    Truncated {
        /// The bytes the region needs.
        needed: u64,
        /// The bytes it holds.
        len: u64,
    },
    /// Something read from the region is inconsistent: a checksum does not
    /// match, an offset points outside the region, a tag is wrong.
    Corrupted(Corruption),
    /// The region's root layout differs from the program's and no migration
    /// was supplied (or the migration declined it).
    LayoutMismatch {
        /// The layout recorded in the region.
        stored: StoredLayout,
        /// The layout the program asked for.
        expected: StoredLayout,
    },
    /// The region's root layout has a newer version than the program's:
    /// opening it with an older program is refused (a migration only runs
    /// forwards).
    Downgrade {
        /// The layout recorded in the region.
        stored: StoredLayout,
        /// The layout the program asked for.
        expected: StoredLayout,
    },
    /// An operation in the transaction failed after it had changed the
    /// state (the closure went on and returned `Ok` anyway): the
    /// transaction was rolled back instead of committing half an operation.
    Incomplete {
        /// The first such failure.
        first: String,
    },
    /// Another live process holds the state (its lock word names it).
    Locked {
        /// The owner's pid.
        pid: u32,
    },
    /// Every entry of the peer table names a live process: the state is
    /// shared by as many processes as it can be ([`SharedState`](crate::SharedState)).
    PeersFull {
        /// The table's size ([`MAX_PEERS`](crate::MAX_PEERS), 68).
        max: usize,
    },
    /// The other end of a ring is gone: the process recorded there
    /// ([`RingMut::attach`](crate::RingMut::attach)) died or ended, and the
    /// ring is empty (for a consumer) or full (for a producer), so a wait
    /// would never end. A new process attaching at that end carries on.
    PeerGone {
        /// The end that is gone.
        end: crate::RingEnd,
        /// The pid it recorded.
        pid: u32,
    },
    /// A wait ([`SharedState::pop_wait`](crate::SharedState::pop_wait),
    /// [`SharedState::push_wait`](crate::SharedState::push_wait)) ran out
    /// its timeout.
    TimedOut {
        /// What it waited for, and who was attached at the other end.
        waiting_for: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// A handle is null: the structure it names was never created.
    NullHandle {
        /// The kind of structure, e.g. `"vec"`.
        kind: &'static str,
    },
    /// A type cannot be stored: too large an alignment, zero-sized, or not
    /// the type the structure was created with.
    UnsupportedType {
        /// What is wrong, e.g. `"alignment 32 exceeds 16"`.
        problem: String,
    },
    /// An index is past the end of a vector.
    OutOfRange {
        /// The index asked for.
        index: u64,
        /// The vector's length.
        len: u64,
    },
    /// A transaction wrote more than the journal can hold.
    JournalFull {
        /// The journal's capacity in bytes (set at creation by
        /// [`Layout::journal_len`](crate::Layout::journal_len)).
        capacity: u64,
    },
    /// A value or allocation is too large for the region's format.
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size in bytes.
        len: u64,
    },
    /// A migration supplied by the program failed.
    Migration(String),
    /// An earlier failure left this handle unusable (a rollback could not be
    /// completed); reopen the state to recover it.
    Poisoned,
    /// shm-snapshot's protocol header in the first page cannot be used
    /// (foreign data, damaged, too new).
    Snapshot(shm_snapshot::Error),
    /// The shared memfd could not be grown or mapped.
    SharedFd(shm_fd::Error),
    /// A system call failed.
    Io {
        /// What was being done, e.g. `"mmap"`.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

/// The details of a corrupt region: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The thing that is inconsistent, e.g. `"header checksum"`, `"vec header"`.
    pub what: &'static str,
    /// The byte offset in the region, when known.
    pub offset: Option<u64>,
    /// What is wrong with it.
    pub problem: String,
}

/// A root layout as recorded in the region: the program's version number and
/// the root type's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredLayout {
    /// The program's layout version ([`Layout::version`](crate::Layout::version)).
    pub version: u32,
    /// `size_of::<Root>()`.
    pub root_size: u32,
    /// `align_of::<Root>()`.
    pub root_align: u32,
}

impl fmt::Display for StoredLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "version {} (root {} bytes, align {})",
            self.version, self.root_size, self.root_align
        )
    }
}

impl Error {
    pub(crate) fn corrupt(what: &'static str, offset: u64, problem: impl Into<String>) -> Self {
        Error::Corrupted(Corruption {
            what,
            offset: Some(offset),
            problem: problem.into(),
        })
    }

    pub(crate) fn io(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io {
            op,
            source: source.into(),
        }
    }

    pub(crate) fn unsupported(problem: impl Into<String>) -> Self {
        Error::UnsupportedType {
            problem: problem.into(),
        }
    }

    /// True when the error means the region's contents are damaged (as
    /// opposed to a usage error or a system failure).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::NotAState { .. }
                | Error::UnsupportedFormat { .. }
                | Error::Truncated { .. }
                | Error::Corrupted(_)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotAState { found } => write!(
                f,
                "the region is not a shm-state region (magic {:?}, expected {:?}); left untouched",
                String::from_utf8_lossy(found),
                String::from_utf8_lossy(crate::format::MAGIC)
            ),
            Error::UnsupportedFormat { found, supported } if found < supported => write!(
                f,
                "the region has format version {found}, this library reads versions {}..={supported}: it was written by an earlier build; open it with that build, or start from an empty memfd (left untouched)",
                crate::format::OLDEST_FORMAT
            ),
            Error::UnsupportedFormat { found, supported } => write!(
                f,
                "the region has format version {found}, this library reads versions {}..={supported}: it was written by a newer build (left untouched)",
                crate::format::OLDEST_FORMAT
            ),
            Error::Truncated { needed, len } => write!(
                f,
                "the region is truncated: it holds {len} bytes, its header needs {needed}"
            ),
            Error::Corrupted(c) => write!(f, "{c}"),
            Error::LayoutMismatch { stored, expected } => write!(
                f,
                "state layout mismatch: the region holds layout {stored}, the program expects \
                 layout {expected}; add a migration (Layout::migrate), run the program that \
                 wrote it, or start from an empty memfd (the region is left untouched)"
            ),
            Error::Downgrade { stored, expected } => write!(
                f,
                "the region holds layout {stored}, newer than the program's {expected}; \
                 refusing to downgrade (use the newer program)"
            ),
            Error::Incomplete { first } => write!(
                f,
                "the transaction was rolled back: an operation in it failed part way ({first})"
            ),
            Error::Locked { pid } => write!(
                f,
                "the state is in use by process {pid} (its lock names that live process, in this memory)"
            ),
            Error::PeersFull { max } => write!(
                f,
                "the state is shared by {max} live processes already, the most its peer table holds; close one first"
            ),
            Error::PeerGone { end, pid } => write!(
                f,
                "the ring's {end} (process {pid}) is gone: it died or ended, and nothing more comes until another {end} attaches"
            ),
            Error::TimedOut { waiting_for, after } => {
                write!(f, "timed out after {after:?} waiting for {waiting_for}")
            }
            Error::NullHandle { kind } => {
                write!(f, "the {kind} handle is null: the {kind} was never created")
            }
            Error::UnsupportedType { problem } => write!(f, "unsupported type: {problem}"),
            Error::OutOfRange { index, len } => {
                write!(f, "index {index} is out of range (length {len})")
            }
            Error::JournalFull { capacity } => write!(
                f,
                "the transaction needs more than the journal's {capacity} bytes; \
                 split it or create the state with a larger Layout::journal_len"
            ),
            Error::TooLarge { what, len } => write!(f, "{what} of {len} bytes is too large"),
            Error::Migration(msg) => write!(f, "migration failed: {msg}"),
            Error::Poisoned => write!(
                f,
                "the state handle is poisoned by an earlier failed rollback; reopen it"
            ),
            Error::SharedFd(e) => write!(f, "shared memfd: {e}"),
            Error::Snapshot(e) => write!(f, "snapshot protocol header: {e}"),
            Error::Io { op, source } => write!(f, "{op}: {source}"),
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt state: {}", self.what)?;
        if let Some(off) = self.offset {
            write!(f, " at offset {off:#x}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::SharedFd(e) => Some(e),
            Error::Snapshot(e) => Some(e),
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<shm_fd::Error> for Error {
    fn from(e: shm_fd::Error) -> Self {
        Error::SharedFd(e)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
