//! The producer side: gathering the fds a program should get and putting
//! them where the `LISTEN_FDS` protocol says, for `exec` or for a child.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Command;

use crate::env::{LISTEN_FDS_START, ListenEnv};
use crate::error::{Error, Result};
use crate::memfd::{CreateOptions, SharedFd};
use crate::sys;

/// The fds a watcher hands on: every inherited fd (kept in its place, with
/// its name) plus the shared memfd, reused when inherited, created otherwise.
#[derive(Debug)]
pub struct Handover {
    entries: Vec<(String, OwnedFd)>,
    shared: usize,
    created: bool,
}

impl Handover {
    /// Takes the inherited fds described by `env` (when they are meant for
    /// this process) and finds the memfd called `name` among them, checking
    /// that it is a memfd; when there is none, creates one with `options`
    /// and appends it after the inherited fds.
    ///
    /// fds passed to another process (`LISTEN_PID` names someone else) are
    /// not taken: the hand-over starts empty. `options` are checked before
    /// any fd is taken or created ([`CreateOptions::validate`]).
    ///
    /// # Safety
    ///
    /// This adopts every fd `env` describes, as [`ListenEnv::take_all`]
    /// does, whose contract the caller must uphold: nothing else in this
    /// process owns those fd numbers (call it at the start of `main`, before
    /// anything opens a file). [`Handover::reuse_or_create`] is the safe
    /// form, for fds the caller owns already.
    ///
    /// ```compile_fail,E0133
    /// let handover = shm_fd::Handover::adopt_or_create(None, "X", Default::default());
    /// ```
    pub unsafe fn adopt_or_create(
        env: Option<&ListenEnv>,
        name: &str,
        options: CreateOptions,
    ) -> Result<Self> {
        options.validate()?;
        let own_pid = std::process::id();
        let entries = match env {
            // SAFETY: forwarded from this function's contract.
            Some(env) if env.is_for(own_pid) => unsafe { env.take_all() }?,
            _ => Vec::new(),
        };
        Self::reuse_or_create(entries, name, options)
    }

    /// A hand-over of fds this process owns already (`entries`, in fd
    /// order): the one called `name` is the shared memfd, checked to be a
    /// memfd and sealed against shrinking when `options` say so; when none
    /// is called `name`, a memfd is created with `options` and appended.
    pub fn reuse_or_create(
        entries: Vec<(String, OwnedFd)>,
        name: &str,
        options: CreateOptions,
    ) -> Result<Self> {
        options.validate()?;
        let mut entries = entries;
        if entries.iter().any(|(n, _)| n == name) {
            let handover = Self::from_entries(entries, name)?;
            if options.seal_shrink {
                // An inherited memfd (from systemd's store, another tool, or
                // a `--no-seal` parent) gets the seal too; one whose seals
                // are frozen without it is reported by `shrink_sealed`.
                let _ = handover.shared_fd()?.seal_shrink();
            }
            return Ok(handover);
        }
        let shared = SharedFd::create(name, options)?;
        entries.push((name.to_owned(), shared.into_owned_fd()));
        Ok(Handover {
            shared: entries.len() - 1,
            entries,
            created: true,
        })
    }

    /// A hand-over of fds this process already holds: `entries` in fd order,
    /// the one called `name` being the shared memfd (validated here).
    /// [`Handover::created`] is false: the memfd is not new.
    pub fn from_entries(entries: Vec<(String, OwnedFd)>, name: &str) -> Result<Self> {
        let mut entries = entries;
        let index =
            entries
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| Error::NameNotFound {
                    name: name.to_owned(),
                    passed: entries.iter().map(|(n, _)| n.clone()).collect(),
                })?;
        for (n, _) in &entries {
            crate::env::check_name(n).map_err(|reason| Error::InvalidName {
                name: n.clone(),
                reason,
            })?;
        }
        let (n, fd) = entries.remove(index);
        let shared = SharedFd::adopt(fd, &n)?;
        entries.insert(index, (n, shared.into_owned_fd()));
        Ok(Handover {
            entries,
            shared: index,
            created: false,
        })
    }

    /// True when the memfd was created here, false when it was inherited.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Whether the shared memfd is sealed against shrinking.
    pub fn shrink_sealed(&self) -> Result<bool> {
        Ok(self.shared_fd()?.seals()?.contains(crate::Seals::SHRINK))
    }

    /// The shared memfd.
    pub fn shared(&self) -> BorrowedFd<'_> {
        self.entries[self.shared].1.as_fd()
    }

    /// A duplicate of the shared memfd, for this process's own use (loading
    /// or saving it); close-on-exec, so it does not leak into the child.
    pub fn shared_fd(&self) -> Result<SharedFd> {
        let (name, fd) = &self.entries[self.shared];
        let dup = fd.try_clone().map_err(|e| Error::io("dup", e))?;
        SharedFd::adopt(dup, name)
    }

    /// The names in fd order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Puts the fds on `3, 4, ...` with close-on-exec cleared, ready for
    /// `exec` or for starting children (see [`PassedFds::configure`]).
    ///
    /// # Safety
    ///
    /// Descriptors open on the target numbers that are not part of this
    /// hand-over are closed and replaced: no other object in this process
    /// may own one. Call it early in `main`, before opening anything else,
    /// or make sure those numbers are free.
    pub unsafe fn install(self) -> Result<PassedFds> {
        let (names, fds): (Vec<String>, Vec<OwnedFd>) = self.entries.into_iter().unzip();
        // SAFETY: forwarded from this function's own contract.
        let fds = unsafe { sys::place_fds(fds, LISTEN_FDS_START) }
            .map_err(|e| Error::io("placing the fds on 3, 4, ...", e))?;
        Ok(PassedFds {
            names,
            fds,
            shared: self.shared,
        })
    }
}

/// fds sitting on `3, 4, ...` without close-on-exec, with their names: what
/// a program started from this process receives.
#[derive(Debug)]
pub struct PassedFds {
    names: Vec<String>,
    fds: Vec<OwnedFd>,
    shared: usize,
}

impl PassedFds {
    /// The value for `LISTEN_FDS`.
    pub fn listen_fds(&self) -> String {
        self.fds.len().to_string()
    }

    /// The value for `LISTEN_FDNAMES`.
    pub fn listen_fdnames(&self) -> String {
        self.names.join(":")
    }

    /// The shared memfd, on its protocol number.
    pub fn shared(&self) -> BorrowedFd<'_> {
        self.fds[self.shared].as_fd()
    }

    /// The number of passed fds.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// True when nothing is passed.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The fd numbers, in order (`3, 4, ...`).
    pub fn raw_fds(&self) -> impl Iterator<Item = i32> + '_ {
        self.fds.iter().map(|f| f.as_raw_fd())
    }

    /// Sets `LISTEN_FDS` and `LISTEN_FDNAMES` on `cmd` and sets or removes
    /// `LISTEN_PID`: `Some(pid)` sets it (right for `exec`, where the pid
    /// stays), `None` removes it (right for a child, whose pid is not known
    /// before it starts; a stale value would hide the fds from it).
    ///
    /// The fds need no further work: they are already inheritable, so `cmd`
    /// can be spawned without a `pre_exec` hook.
    pub fn configure(&self, cmd: &mut Command, listen_pid: Option<u32>) {
        cmd.env("LISTEN_FDS", self.listen_fds())
            .env("LISTEN_FDNAMES", self.listen_fdnames());
        match listen_pid {
            Some(pid) => cmd.env("LISTEN_PID", pid.to_string()),
            None => cmd.env_remove("LISTEN_PID"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_or_create_checks_the_options_first() {
        let fd = SharedFd::create(
            "other",
            CreateOptions {
                size: 10,
                seal_shrink: false,
            },
        )
        .unwrap();
        let bad = CreateOptions {
            size: u64::MAX,
            seal_shrink: true,
        };
        let entries = vec![("other".to_owned(), fd.try_clone().unwrap().into_owned_fd())];
        let e = Handover::reuse_or_create(entries, "other", bad).unwrap_err();
        assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
        assert!(
            !fd.seals().unwrap().contains(crate::Seals::SHRINK),
            "nothing was done to the fds"
        );
        // SAFETY: no fds are described (None), so nothing is adopted.
        let e = unsafe { Handover::adopt_or_create(None, "x", bad) }.unwrap_err();
        assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
    }

    #[test]
    fn reuse_or_create_reuses_or_creates() {
        let fd = SharedFd::create(
            "mem",
            CreateOptions {
                size: 10,
                seal_shrink: false,
            },
        )
        .unwrap();
        let entries = vec![("mem".to_owned(), fd.try_clone().unwrap().into_owned_fd())];
        let h = Handover::reuse_or_create(entries, "mem", CreateOptions::default()).unwrap();
        assert!(!h.created());
        assert!(h.shrink_sealed().unwrap(), "sealed as the options say");
        let h = Handover::reuse_or_create(Vec::new(), "new", CreateOptions::default()).unwrap();
        assert!(h.created());
        assert_eq!(h.names().collect::<Vec<_>>(), ["new"]);
    }
}
