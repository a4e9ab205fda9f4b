//! Capture: getting a private copy of the memfd that is a state the program
//! actually had at one instant.
//!
//! This is the pluggable step of a save. [`StopGroup`] stops the program's
//! process group for the copy; [`Unpaused`] copies directly (right when no
//! one else writes, e.g. after the program exited). A capture based on
//! shm-snapshot's in-memory protocol implements the same [`Capture`] trait.

use std::fs::{self, File};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::image::{Image, data_extents, prefaulted, stored_len};

/// The result of a capture: a consistent private copy, or the news that
/// nothing writes the memfd any more (so a save may read it directly).
#[derive(Debug)]
pub enum Captured {
    /// A copy of a state the program had.
    Copied {
        /// The copy.
        image: Image,
        /// How long the program was paused for it, if it was.
        pause: Option<Duration>,
    },
    /// No process is left that could write the memfd: read it directly
    /// ([`crate::Saver::save_memfd`]), without a private copy.
    Quiescent,
}

impl Captured {
    /// How long the program was paused, if it was.
    pub fn pause(&self) -> Option<Duration> {
        match self {
            Captured::Copied { pause, .. } => *pause,
            Captured::Quiescent => None,
        }
    }
}

/// A way of copying the memfd that yields a state the program had.
pub trait Capture {
    /// Copies `memfd` (a private open file description of it).
    fn capture(&mut self, memfd: &File) -> Result<Captured>;
}

/// For a memfd nothing writes any more (the program has exited): returns
/// [`Captured::Quiescent`] without copying.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpaused;

impl Capture for Unpaused {
    fn capture(&mut self, _memfd: &File) -> Result<Captured> {
        Ok(Captured::Quiescent)
    }
}

/// Stops a process group (`SIGSTOP`), waits until every thread of every
/// member has stopped, copies the memfd, and continues the group
/// (`SIGCONT`) before returning, also on errors. Writing to disk happens
/// after, outside the pause.
///
/// When the group no longer exists the result is [`Captured::Quiescent`].
#[derive(Debug, Clone, Copy)]
pub struct StopGroup {
    pgid: i32,
    timeout: Duration,
}

impl StopGroup {
    /// Captures for the process group `pgid`, waiting at most `timeout`
    /// for it to stop.
    pub fn new(pgid: i32, timeout: Duration) -> StopGroup {
        StopGroup { pgid, timeout }
    }
}

/// Sends `SIGCONT` to the group when dropped.
struct ContinueOnDrop(Pid);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = killpg(self.0, Signal::SIGCONT);
    }
}

impl Capture for StopGroup {
    fn capture(&mut self, memfd: &File) -> Result<Captured> {
        let pgid = Pid::from_raw(self.pgid);
        // Before the pause: a buffer of about the right size with its pages
        // faulted in, so the pause is the copy alone.
        let size = usize::try_from(data_size(memfd)?).unwrap_or(usize::MAX);
        let buf = prefaulted(size).map_err(|e| Error::io("copying", "the memfd", e))?;
        let start = Instant::now();
        match killpg(pgid, Signal::SIGSTOP) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Unpaused.capture(memfd),
            Err(e) => {
                return Err(Error::io(
                    "stopping process group",
                    format!("{}", self.pgid),
                    e.into(),
                ));
            }
        }
        let cont = ContinueOnDrop(pgid);
        wait_until_stopped(self.pgid, self.timeout)?;
        let image =
            Image::read_into(memfd, buf).map_err(|e| Error::io("copying", "the memfd", e))?;
        drop(cont);
        Ok(Captured::Copied {
            image,
            pause: Some(start.elapsed()),
        })
    }
}

/// How many data bytes (holes excluded) the memfd holds now.
fn data_size(memfd: &File) -> Result<u64> {
    let fail = |e| Error::io("reading", "the memfd", e);
    let len = memfd.metadata().map_err(fail)?.len();
    Ok(stored_len(&data_extents(memfd, len).map_err(fail)?))
}

/// Waits until every thread of every process in group `pgid` is stopped
/// (or dead). A process whose threads are still running (or in the middle
/// of a system call) has not yet reached the stop.
pub fn wait_until_stopped(pgid: i32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let members = group_members(pgid);
    let mut backoff = Duration::from_micros(20);
    loop {
        if members.iter().all(|&pid| is_stopped(pid)) {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::NotStopped {
                pgid,
                waited_ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(1));
    }
}

/// The pids of group `pgid`'s members, from `/proc/*/stat`.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_fields(&s).map(|(_, pgrp)| pgrp == pgid))
                .unwrap_or(false)
        })
        .collect()
}

/// `(state, pgrp)` from a `/proc/.../stat` line; the command name may hold
/// spaces and parentheses, so fields are counted after the last `)`.
fn stat_fields(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// True when every thread of `pid` is stopped, traced, dead or gone.
fn is_stopped(pid: i32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return true; // gone
    };
    tasks.flatten().all(|t| {
        match fs::read_to_string(t.path().join("stat")) {
            Ok(s) => matches!(stat_fields(&s), Some((c, _)) if "TtZXx".contains(c)),
            Err(_) => true, // the thread exited
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        assert_eq!(
            stat_fields("123 (a) b) (c) T 1 456 456 0 -1"),
            Some(('T', 456))
        );
        assert_eq!(stat_fields("garbage"), None);
    }

    #[test]
    fn stops_and_continues_a_group() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        let memfd = shm_fd::SharedFd::create("cap", Default::default())
            .unwrap()
            .into_file();
        let got = StopGroup::new(pgid, Duration::from_secs(5))
            .capture(&memfd)
            .unwrap();
        assert!(got.pause().is_some());
        // Continued afterwards: the shell is running (R), not stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_stopped(pgid) {
            assert!(Instant::now() < deadline, "the group was not continued");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
