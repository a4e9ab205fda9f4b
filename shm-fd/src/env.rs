//! Reading the `LISTEN_FDS` / `LISTEN_FDNAMES` / `LISTEN_PID` protocol.
//!
//! Parsing is pure: [`ListenEnv::parse`] takes the three values, so the
//! caller reads the environment once (in `main`) and tests need no global
//! state. Taking ownership of the fds is [`ListenEnv::take`]'s job, and
//! `unsafe`: a variable cannot prove that a number is not already some
//! other object's fd in this process.

use std::ffi::OsStr;
use std::os::fd::{OwnedFd, RawFd};

use crate::error::{Error, Result};
use crate::sys;

/// The first fd number of the protocol: the passed fds are `3 .. 3+N`.
pub const LISTEN_FDS_START: RawFd = 3;

/// The largest `LISTEN_FDS` accepted; far above any real use, low enough that
/// `3 + N` can never overflow an fd number.
pub const MAX_LISTEN_FDS: usize = 4096;

/// The longest fd name systemd accepts.
pub const MAX_NAME_LEN: usize = 255;

/// The name systemd gives fds whose names it was not told.
pub const UNKNOWN_NAME: &str = "unknown";

/// A parsed, validated `LISTEN_*` hand-over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEnv {
    names: Vec<String>,
    pid: Option<u32>,
}

impl ListenEnv {
    /// Parses the three variables' values (`None` when unset).
    ///
    /// Returns `Ok(None)` when `LISTEN_FDS` is unset (nothing was passed).
    /// `LISTEN_PID` is parsed but not compared: see [`ListenEnv::is_for`].
    pub fn parse(
        listen_fds: Option<&OsStr>,
        listen_fdnames: Option<&OsStr>,
        listen_pid: Option<&OsStr>,
    ) -> Result<Option<Self>> {
        let pid = listen_pid
            .map(|v| parse_number("LISTEN_PID", v, 1, i32::MAX as u64))
            .transpose()?
            .map(|p| p as u32);
        // Without LISTEN_FDS nothing was passed; a stale LISTEN_FDNAMES is
        // ignored, as sd_listen_fds_with_names() does.
        let Some(fds) = listen_fds else {
            return Ok(None);
        };
        let count = parse_number("LISTEN_FDS", fds, 0, MAX_LISTEN_FDS as u64)? as usize;
        let names = match listen_fdnames {
            None => vec![UNKNOWN_NAME.to_owned(); count],
            Some(raw) => {
                let text = raw
                    .to_str()
                    .ok_or_else(|| invalid("LISTEN_FDNAMES", raw, "is not valid UTF-8"))?;
                let names: Vec<String> = if text.is_empty() && count == 0 {
                    Vec::new()
                } else {
                    text.split(':').map(str::to_owned).collect()
                };
                if names.len() != count {
                    return Err(invalid(
                        "LISTEN_FDNAMES",
                        raw,
                        &format!("has {} names but LISTEN_FDS={count}", names.len()),
                    ));
                }
                for name in &names {
                    if let Err(reason) = check_inherited_name(name) {
                        return Err(invalid(
                            "LISTEN_FDNAMES",
                            raw,
                            &format!("name {name:?} {reason}"),
                        ));
                    }
                }
                names
            }
        };
        Ok(Some(ListenEnv { names, pid }))
    }

    /// Reads the three variables from this process's environment.
    ///
    /// Call it once, early in `main`; the library never changes the
    /// environment.
    pub fn from_process_env() -> Result<Option<Self>> {
        let fds = std::env::var_os("LISTEN_FDS");
        let names = std::env::var_os("LISTEN_FDNAMES");
        let pid = std::env::var_os("LISTEN_PID");
        Self::parse(fds.as_deref(), names.as_deref(), pid.as_deref())
    }

    /// An empty hand-over (`LISTEN_FDS=0`), to which a producer adds fds.
    pub fn empty() -> Self {
        ListenEnv {
            names: Vec::new(),
            pid: None,
        }
    }

    /// The number of passed fds (`LISTEN_FDS`).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when no fd was passed (`LISTEN_FDS=0`).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The names, in fd order (fd `3 + i` has name `i`).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// `LISTEN_PID`, if it was set.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the fds are meant for the process `pid`: true when
    /// `LISTEN_PID` is unset or equal to it.
    pub fn is_for(&self, pid: u32) -> bool {
        self.pid.is_none_or(|p| p == pid)
    }

    /// The index of the first fd called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The fd number the protocol assigns to `name`.
    pub fn fd_of(&self, name: &str) -> Option<RawFd> {
        self.position(name).map(|i| LISTEN_FDS_START + i as RawFd)
    }

    /// Takes ownership of the passed fd at `index` (fd `3 + index`).
    ///
    /// Checks that the fd is open and sets close-on-exec on it, so it does
    /// not leak into programs this process starts unless it is passed on on
    /// purpose. Each fd can be taken once per process through this crate; a
    /// second take is [`Error::AlreadyTaken`].
    ///
    /// # Safety
    ///
    /// The returned [`OwnedFd`] becomes the owner of fd `3 + index`, as
    /// with [`std::os::fd::FromRawFd::from_raw_fd`]; nothing checks that the
    /// number is not already owned by something else in this process (a
    /// `LISTEN_FDS` that says more than was passed, or a file this process
    /// opened and that got that number). The caller must make sure that:
    ///
    /// - no other object in this process owns fd `3 + index` or will close
    ///   it: take the fds early in `main`, before the program opens files of
    ///   its own (then every open fd above 2 was inherited and has no owner
    ///   yet), and
    /// - the number is not adopted through another path as well (another
    ///   `from_raw_fd`, another library reading `LISTEN_FDS`).
    ///
    /// Adopting outside `unsafe` does not compile:
    ///
    /// ```compile_fail,E0133
    /// let env = shm_fd::ListenEnv::parse(Some(std::ffi::OsStr::new("1")), None, None).unwrap().unwrap();
    /// let fd = env.take(0);
    /// ```
    pub unsafe fn take(&self, index: usize) -> Result<OwnedFd> {
        let name = self.names.get(index).ok_or_else(|| Error::NameNotFound {
            name: format!("#{index}"),
            passed: self.names.clone(),
        })?;
        let fd = LISTEN_FDS_START + index as RawFd;
        // SAFETY: forwarded from this function's contract: fd `fd` has no
        // other owner in this process.
        unsafe { sys::take_inherited_fd(fd) }.map_err(|problem| match problem {
            sys::TakeError::Taken => Error::AlreadyTaken { fd },
            sys::TakeError::Closed => Error::BadFd {
                fd,
                name: name.clone(),
                problem: "is not open (LISTEN_FDS promised it)".into(),
            },
            sys::TakeError::Io(e) => Error::io("fcntl(F_SETFD) on a passed fd", e),
        })
    }

    /// Takes ownership of every passed fd, paired with its name, in order.
    ///
    /// # Safety
    ///
    /// As for [`ListenEnv::take`], for each of the fds `3 .. 3 + N`.
    ///
    /// ```compile_fail,E0133
    /// let env = shm_fd::ListenEnv::parse(Some(std::ffi::OsStr::new("1")), None, None).unwrap().unwrap();
    /// let fds = env.take_all();
    /// ```
    pub unsafe fn take_all(&self) -> Result<Vec<(String, OwnedFd)>> {
        (0..self.len())
            // SAFETY: forwarded from this function's contract.
            .map(|i| Ok((self.names[i].clone(), unsafe { self.take(i) }?)))
            .collect()
    }
}

/// Checks a name found in an inherited `LISTEN_FDNAMES` by systemd's own
/// rule (`fdname_is_valid`): at most 255 ASCII characters that are not
/// control characters (spaces allowed; `:` is the separator).
fn check_inherited_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.len() > MAX_NAME_LEN {
        return Err("is longer than 255 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii() && !b.is_ascii_control()) {
        return Err("has control or non-ASCII characters");
    }
    Ok(())
}

/// Checks that `name` can be given to a new fd: 1..=255 printable ASCII
/// characters without spaces or `:`. Stricter than what is accepted from
/// an inherited `LISTEN_FDNAMES`, so that every name this crate hands out
/// is also a valid memfd name and shell word.
pub fn check_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("is longer than 255 bytes");
    }
    if name.contains(':') {
        return Err("contains ':'");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("has characters other than printable ASCII");
    }
    Ok(())
}

fn invalid(var: &'static str, value: &OsStr, reason: &str) -> Error {
    Error::InvalidVariable {
        var,
        value: value.to_string_lossy().into_owned(),
        reason: reason.to_owned(),
    }
}

fn parse_number(var: &'static str, value: &OsStr, min: u64, max: u64) -> Result<u64> {
    let text = value
        .to_str()
        .ok_or_else(|| invalid(var, value, "is not valid UTF-8"))?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(var, value, "is not a decimal number"));
    }
    let n: u64 = text
        .parse()
        .map_err(|_| invalid(var, value, "is too large"))?;
    if n < min || n > max {
        return Err(invalid(
            var,
            value,
            &format!("is out of range ({min}..={max})"),
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(fds: Option<&str>, names: Option<&str>, pid: Option<&str>) -> Result<Option<ListenEnv>> {
        ListenEnv::parse(
            fds.map(OsStr::new),
            names.map(OsStr::new),
            pid.map(OsStr::new),
        )
    }

    #[test]
    fn unset_means_nothing_passed() {
        assert_eq!(p(None, None, None).unwrap(), None);
    }

    #[test]
    fn names_without_count_are_ignored() {
        assert_eq!(p(None, Some("a"), None).unwrap(), None);
    }

    #[test]
    fn inherited_names_follow_systemds_rule() {
        let env = p(Some("2"), Some("my sock:"), None).unwrap().unwrap();
        assert_eq!(env.names(), ["my sock", ""]);
        assert!(p(Some("1"), Some("a\tb"), None).is_err());
    }

    #[test]
    fn parses_names_and_positions() {
        let env = p(Some("3"), Some("a:SHM_SHARED_FD:c"), Some("42"))
            .unwrap()
            .unwrap();
        assert_eq!(env.len(), 3);
        assert_eq!(env.fd_of("SHM_SHARED_FD"), Some(4));
        assert_eq!(env.fd_of("c"), Some(5));
        assert_eq!(env.fd_of("zzz"), None);
        assert!(env.is_for(42));
        assert!(!env.is_for(43));
    }

    #[test]
    fn missing_names_are_unknown() {
        let env = p(Some("2"), None, None).unwrap().unwrap();
        assert_eq!(env.names(), ["unknown", "unknown"]);
        assert!(env.is_for(1));
    }

    #[test]
    fn zero_fds_with_empty_names() {
        let env = p(Some("0"), Some(""), None).unwrap().unwrap();
        assert!(env.is_empty());
    }

    #[test]
    fn rejects_malformed_values() {
        for (fds, names, pid, var, what) in [
            ("x", None, None, "LISTEN_FDS", "decimal"),
            ("-1", None, None, "LISTEN_FDS", "decimal"),
            (" 1", None, None, "LISTEN_FDS", "decimal"),
            ("", None, None, "LISTEN_FDS", "decimal"),
            (
                "99999999999999999999999",
                None,
                None,
                "LISTEN_FDS",
                "too large",
            ),
            ("5000", None, None, "LISTEN_FDS", "out of range"),
            (
                "2",
                Some("a"),
                None,
                "LISTEN_FDNAMES",
                "1 names but LISTEN_FDS=2",
            ),
            ("1", Some("a:b"), None, "LISTEN_FDNAMES", "2 names"),
            ("1", Some("a\u{1}"), None, "LISTEN_FDNAMES", "control"),
            ("1", Some("é"), None, "LISTEN_FDNAMES", "non-ASCII"),
            ("1", Some("a"), Some("0"), "LISTEN_PID", "out of range"),
            ("1", Some("a"), Some("abc"), "LISTEN_PID", "decimal"),
        ] {
            let e = p(Some(fds), names, pid).unwrap_err().to_string();
            assert!(
                e.contains(var) && e.contains(what),
                "{fds:?} {names:?} {pid:?}: {e}"
            );
        }
    }

    #[test]
    fn check_name_rules() {
        assert!(check_name("SHM_SHARED_FD").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a:b").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
        assert!(check_name("é").is_err());
    }
}
