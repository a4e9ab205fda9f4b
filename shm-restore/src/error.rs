//! The library's error types.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What is wrong with a snapshot file's contents: each case names the part
/// of the file and the problem, so that damage is located.
///
/// Only damage: a file that is intact but holds more data than a reader
/// accepts is not `Damage` ([`Error::TooLarge`], [`ReadError::TooLarge`]),
/// and is never moved aside as a damaged file is.
///
/// [`ReadError::TooLarge`]: crate::ReadError::TooLarge
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Damage {
    /// The file does not start with the snapshot magic bytes.
    BadMagic,
    /// The file is a snapshot of a format version this code cannot read.
    UnsupportedVersion {
        /// The version the file declares.
        version: u32,
    },
    /// The header's CRC32 does not match its bytes.
    HeaderChecksum {
        /// The CRC stored in the header.
        stored: u32,
        /// The CRC of the header bytes as read.
        computed: u32,
    },
    /// A header field has an impossible value.
    BadHeader {
        /// The field's name as in `docs/snapshot-format.md`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The file is shorter than its header says.
    Truncated {
        /// The file's length.
        len: u64,
        /// The length the header implies.
        expected: u64,
    },
    /// The file is longer than its header says.
    TrailingBytes {
        /// The file's length.
        len: u64,
        /// The length the header implies.
        expected: u64,
    },
    /// The chunk table's CRC32 does not match.
    TableChecksum {
        /// The CRC stored in the header.
        stored: u32,
        /// The CRC of the table as read.
        computed: u32,
    },
    /// A chunk table entry is impossible.
    BadTable {
        /// The entry's index.
        index: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// Chunks whose data does not match their CRC32.
    ChunkChecksum {
        /// How many chunks are bad.
        bad: u64,
        /// How many chunks the file has.
        total: u64,
        /// The first bad chunk's index.
        index: u64,
        /// Where the first bad chunk's bytes belong in the memfd.
        memfd_offset: u64,
        /// Where they are in the file.
        file_offset: u64,
        /// How many bytes the chunk holds.
        len: u32,
    },
    /// A delta whose chain does not lead to a valid full snapshot: a base
    /// is missing, is not the file the delta names, or is damaged.
    BrokenChain {
        /// The base file's name.
        base: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::BadMagic => write!(f, "is not a shm-restore snapshot (bad magic bytes)"),
            Damage::UnsupportedVersion { version } => write!(
                f,
                "has format version {version}, this shm-restore reads versions {} and {}",
                crate::format::VERSION,
                crate::format::VERSION_DELTA
            ),
            Damage::HeaderChecksum { stored, computed } => write!(
                f,
                "has a corrupt header (CRC32 {computed:#010x}, stored {stored:#010x})"
            ),
            Damage::BadHeader { field, problem } => {
                write!(f, "has a bad header: {field} {problem}")
            }
            Damage::Truncated { len, expected } => {
                write!(f, "is truncated: {len} bytes, the header needs {expected}")
            }
            Damage::TrailingBytes { len, expected } => write!(
                f,
                "has {} unexpected trailing bytes ({len} bytes, the header says {expected})",
                len - expected
            ),
            Damage::TableChecksum { stored, computed } => write!(
                f,
                "has a corrupt chunk table (CRC32 {computed:#010x}, stored {stored:#010x})"
            ),
            Damage::BadTable { index, problem } => {
                write!(f, "has a bad chunk table: entry {index} {problem}")
            }
            Damage::ChunkChecksum {
                bad,
                total,
                index,
                memfd_offset,
                file_offset,
                len,
            } => write!(
                f,
                "has {bad} of {total} chunks failing their CRC32, the first is chunk {index} \
                 (file offset {file_offset}, memfd bytes {memfd_offset}..{})",
                memfd_offset + u64::from(*len)
            ),
            Damage::BrokenChain { base, problem } => {
                write!(f, "is a delta whose base {base} {problem}")
            }
        }
    }
}

/// Everything that can go wrong while reading, loading, capturing or saving
/// a snapshot. Each message is one line naming the file or resource and the
/// problem.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A snapshot file's contents are damaged or unsupported.
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        damage: Damage,
    },
    /// Neither the snapshot nor its `.prev` copy can be loaded; nothing was
    /// changed.
    NothingValid {
        /// The snapshot and what is wrong with it.
        main: Box<Error>,
        /// The `.prev` file and what is wrong with it; `None` if it does not
        /// exist.
        prev: Option<Box<Error>>,
    },
    /// A snapshot file is intact as far as it was read, but holds more
    /// data than the maximum the reader accepts (`--max-size`). It is not
    /// damage: the file is refused, and left where it is.
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The data size its header declares.
        data_len: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// A save cannot be done: the memfd holds more data than the maximum
    /// (`max_data_len`, `--max-size`), so a snapshot of it could not be
    /// loaded. Nothing was written; every file is as it was.
    MemfdTooLarge {
        /// The memfd's size.
        data_len: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// The memfd cannot take the snapshot (sealed against growing, or a
    /// system error on it).
    Memfd(shm_fd::Error),
    /// The process group could not be stopped for a consistent copy.
    NotStopped {
        /// The process group.
        pgid: i32,
        /// How long it was waited for.
        waited_ms: u64,
    },
    /// A capture through shm-snapshot's protocol failed.
    Snapshot(shm_snapshot::Error),
    /// The new snapshot was written and renamed into place (the save's
    /// commit), and a step after it failed: keeping the previous one as
    /// `.prev`, or the directory's fsync (the new snapshot may then not
    /// survive a machine crash).
    AfterCommit(Box<Error>),
    /// A system call on a file failed.
    Io {
        /// What was being done, e.g. `"fsync"`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True when the error is about a file's contents (as opposed to the
    /// system failing to read or write it).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::NothingValid { .. })
    }

    /// True when a snapshot file's contents stop the load: damaged
    /// ([`Error::is_corrupt`]) or holding more data than the maximum
    /// ([`Error::TooLarge`]). Either way nothing was changed.
    pub fn is_unloadable(&self) -> bool {
        self.is_corrupt() || matches!(self, Error::TooLarge { .. })
    }

    /// True when the error says a file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Corrupt { path, damage } => write!(f, "{} {damage}", path.display()),
            Error::NothingValid { main, prev } => {
                write!(f, "no valid snapshot to load: {main}")?;
                match prev {
                    Some(prev) => write!(f, "; {prev}"),
                    None => write!(f, "; no .prev file to fall back on"),
                }
            }
            Error::TooLarge {
                path,
                data_len,
                max,
            } => write!(
                f,
                "{} holds {data_len} bytes, more than the maximum {max} (see --max-size)",
                path.display()
            ),
            Error::MemfdTooLarge { data_len, max } => write!(
                f,
                "the memfd holds {data_len} bytes, more than the maximum {max} (see --max-size): \
                 not saved, since no start could load such a snapshot"
            ),
            Error::Memfd(e) => write!(f, "shared memfd: {e}"),
            Error::NotStopped { pgid, waited_ms } => write!(
                f,
                "process group {pgid} did not stop within {waited_ms} ms for a consistent copy"
            ),
            Error::Snapshot(e) => write!(f, "shm-snapshot protocol: {e}"),
            Error::AfterCommit(e) => write!(f, "{e} (the new snapshot is saved)"),
            Error::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Memfd(e) => Some(e),
            Error::Snapshot(e) => Some(e),
            Error::NothingValid { main, .. } => Some(main.as_ref()),
            _ => None,
        }
    }
}

impl From<shm_fd::Error> for Error {
    fn from(e: shm_fd::Error) -> Self {
        Error::Memfd(e)
    }
}

/// An option given to a constructor or builder of this crate is out of
/// range (see [`SaveOptions::builder`](crate::SaveOptions::builder)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidOption {
    /// The option's name, e.g. `"chunk_size"`.
    pub option: &'static str,
    /// The value given.
    pub value: u64,
    /// The values accepted, e.g. `"a power of two in 4096..=67108864"`.
    pub accepted: String,
}

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} is out of range: accepted {}",
            self.option, self.value, self.accepted
        )
    }
}

impl std::error::Error for InvalidOption {}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
