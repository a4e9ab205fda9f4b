//! The library's error type.

use std::fmt;
use std::io;

/// What can go wrong setting up or using the protocol.
///
/// Each message names the thing and the problem in one line.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The memory is too small to hold the header.
    TooSmall {
        /// Its length in bytes.
        len: usize,
        /// The length needed.
        needed: usize,
    },
    /// The first page holds data that is not a shm-snapshot header (another
    /// program's state, or a memfd used without the protocol): it is left
    /// untouched.
    ForeignData,
    /// The header's magic is right but the rest does not check out.
    Corrupt {
        /// What is wrong, e.g. a checksum mismatch.
        problem: String,
    },
    /// The header is from a newer (or unknown) version of the protocol.
    UnsupportedVersion {
        /// The version it carries.
        version: u32,
    },
    /// A snapshot destination is not as long as the source.
    LengthMismatch {
        /// The source's length in bytes.
        source_len: usize,
        /// The destination's length in bytes.
        destination_len: usize,
    },
    /// Stopping the program for the fallback copy failed (or the program
    /// was not stopped in time).
    Fallback(io::Error),
    /// Copying the memory failed (e.g. finding a memfd's data extents).
    Copy(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooSmall { len, needed } => write!(
                f,
                "shared memory of {len} bytes is too small for the shm-snapshot header ({needed} bytes needed)"
            ),
            Error::ForeignData => write!(
                f,
                "the first page of the shared memory holds data that is not a shm-snapshot header (state of a program not using shm-snapshot?); refusing to overwrite it"
            ),
            Error::Corrupt { problem } => write!(f, "corrupt shm-snapshot header: {problem}"),
            Error::UnsupportedVersion { version } => write!(
                f,
                "shm-snapshot header version {version} is not supported (this build reads version {})",
                crate::VERSION
            ),
            Error::LengthMismatch {
                source_len,
                destination_len,
            } => write!(
                f,
                "snapshot buffer holds {destination_len} bytes but the shared memory has {source_len}"
            ),
            Error::Fallback(e) => write!(f, "stopping the program for a snapshot failed: {e}"),
            Error::Copy(e) => write!(f, "copying the shared memory failed: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Fallback(e) | Error::Copy(e) => Some(e),
            _ => None,
        }
    }
}
