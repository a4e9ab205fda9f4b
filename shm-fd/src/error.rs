//! The library's error type.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

/// Everything that can go wrong while finding, validating, creating or
/// mapping the shared memfd.
///
/// Each message names the thing (an environment variable, an fd, a name) and
/// the problem in one line, so a binary can print it as it is.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `LISTEN_FDS` is not set: this process was not started by a watcher.
    NotPassed {
        /// The fd name that was looked for.
        name: String,
    },
    /// `LISTEN_PID` is set to another process: the fds are not meant for us.
    NotForThisProcess {
        /// The pid `LISTEN_PID` names.
        listen_pid: u32,
        /// This process's pid.
        own_pid: u32,
    },
    /// fds were passed, but none carries the wanted name.
    NameNotFound {
        /// The fd name that was looked for.
        name: String,
        /// The names that were passed, in fd order.
        passed: Vec<String>,
    },
    /// A `LISTEN_*` variable is malformed.
    InvalidVariable {
        /// The variable's name, e.g. `LISTEN_FDS`.
        var: &'static str,
        /// Its value, lossily converted for the message.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A fd name (ours, e.g. from `--name`) cannot be used in `LISTEN_FDNAMES`.
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The fd the protocol points at is not usable: closed, or not a memfd.
    BadFd {
        /// The fd number.
        fd: RawFd,
        /// Its name in `LISTEN_FDNAMES`.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The same inherited fd was taken twice in this process.
    AlreadyTaken {
        /// The fd number.
        fd: RawFd,
    },
    /// An option (e.g. of [`crate::CreateOptions`]) has a value that cannot
    /// be used.
    InvalidOption {
        /// The option's name, e.g. `size`.
        option: &'static str,
        /// Its value, for the message.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A range of the memfd asked to be mapped is not one that can be.
    InvalidRange {
        /// Where it starts, in bytes from the start of the memfd.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The memfd cannot grow to the size asked for (sealed against growth).
    CannotGrow {
        /// Its current size in bytes.
        len: u64,
        /// The size asked for.
        wanted: u64,
    },
    /// A system call failed.
    Io {
        /// What was being done, e.g. `"memfd_create"`.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io {
            op,
            source: source.into(),
        }
    }

    /// True for the two cases that mean "no fd was handed to this process"
    /// (as opposed to a malformed or unusable hand-over).
    pub fn is_not_passed(&self) -> bool {
        matches!(
            self,
            Error::NotPassed { .. } | Error::NotForThisProcess { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotPassed { name } => write!(
                f,
                "no shared memory fd `{name}` was passed (LISTEN_FDS is not set): \
                 run this program under shm-fd, e.g. `shm-fd ./program`"
            ),
            Error::NotForThisProcess {
                listen_pid,
                own_pid,
            } => write!(
                f,
                "LISTEN_PID={listen_pid} names another process (this is {own_pid}): \
                 the passed fds are not meant for this program"
            ),
            Error::NameNotFound { name, passed } => {
                write!(f, "no fd named `{name}` among the passed fds")?;
                if passed.is_empty() {
                    write!(f, " (LISTEN_FDS=0)")
                } else {
                    write!(f, " (LISTEN_FDNAMES={})", passed.join(":"))
                }
            }
            Error::InvalidVariable { var, value, reason } => {
                write!(f, "invalid {var}={value:?}: {reason}")
            }
            Error::InvalidName { name, reason } => {
                write!(f, "invalid fd name {name:?}: {reason}")
            }
            Error::BadFd { fd, name, problem } => {
                write!(f, "fd {fd} (`{name}`) {problem}")
            }
            Error::AlreadyTaken { fd } => {
                write!(f, "fd {fd} was already taken from the environment")
            }
            Error::InvalidOption {
                option,
                value,
                reason,
            } => write!(f, "invalid {option} {value}: {reason}"),
            Error::InvalidRange {
                offset,
                len,
                reason,
            } => write!(
                f,
                "cannot map {len} bytes at offset {offset} of the memfd: {reason}"
            ),
            Error::CannotGrow { len, wanted } => write!(
                f,
                "the memfd is sealed against growing: it holds {len} bytes, {wanted} are needed"
            ),
            Error::Io { op, source } => write!(f, "{op}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::NotPassed { .. } | Error::NameNotFound { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
