//! Small pieces every supervisor here needs: starting a command tied to
//! the supervisor's life ([`spawn_group`]: it dies when the supervisor
//! dies, and so does its whole process group), finding processes through
//! `/proc` ([`ProcStat`]), waiting for signals without spinning, turning a
//! child's end into an exit code, and sharing the terminal with a child's
//! process group.

mod keeper;
mod stat;

pub use keeper::{GroupKeeper, SpawnError, on_main_thread, spawn_group};
pub use stat::{ProcStat, group_members, is_running, processes};

use std::io::{self, IsTerminal, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, sigprocmask};
use nix::unistd::Pid;
use signal_hook::SigId;

/// The exit code a supervisor reports for a child that ended with `status`:
/// its own exit code, or `128 + N` when signal `N` killed it (as shells do).
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => 1,
    }
}

/// A set of signals to wait for, without a busy loop: each is recorded in a
/// flag and wakes a self-pipe that [`SignalSet::wait`] sleeps on.
///
/// Register `SIGCHLD` too to be woken when a child ends.
#[derive(Debug)]
pub struct SignalSet {
    wake: UnixStream,
    flags: Vec<(i32, Arc<AtomicBool>)>,
    ids: Vec<SigId>,
}

impl SignalSet {
    /// Installs handlers for `signals`, replacing their default actions.
    ///
    /// Dropping the set unregisters its actions, but signal-hook cannot
    /// put the default actions back: afterwards these signals are ignored.
    /// Create the set once, for the life of the supervisor.
    pub fn new(signals: &[i32]) -> io::Result<Self> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let mut set = SignalSet {
            wake,
            flags: Vec::new(),
            ids: Vec::new(),
        };
        for &sig in signals {
            let flag = Arc::new(AtomicBool::new(false));
            set.ids
                .push(signal_hook::flag::register(sig, Arc::clone(&flag))?);
            set.ids.push(signal_hook::low_level::pipe::register(
                sig,
                notify.try_clone()?,
            )?);
            set.flags.push((sig, flag));
        }
        Ok(set)
    }

    /// Returns the signals that arrived since the last call, sleeping until
    /// at least one does or `timeout` (if any) passes.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Vec<i32>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let got = self.take();
            if !got.is_empty() {
                return Ok(got);
            }
            let left = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Vec::new());
                    }
                    // Round up so a sub-millisecond remainder still sleeps.
                    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, left) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            self.drain();
        }
    }

    /// The signals that arrived since the last call, without sleeping.
    pub fn take(&self) -> Vec<i32> {
        self.flags
            .iter()
            .filter(|(_, f)| f.swap(false, Ordering::AcqRel))
            .map(|(s, _)| *s)
            .collect()
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for SignalSet {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// The controlling terminal on stdin, when this process is in its
/// foreground: a supervisor hands the foreground to each child's process
/// group while it runs (as a shell does with a job), so the child can use
/// the terminal and gets Ctrl-C / Ctrl-\\ itself.
#[derive(Debug)]
pub struct Terminal {
    own_group: Pid,
}

impl Terminal {
    /// The terminal, if stdin is one and this process is in its foreground.
    pub fn if_foreground() -> Option<Terminal> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let own_group = nix::unistd::getpgrp();
        (nix::unistd::tcgetpgrp(&stdin).ok()? == own_group).then_some(Terminal { own_group })
    }

    /// Makes `pgid` the foreground group and wakes it if it was stopped
    /// for touching the terminal too early.
    pub fn give_to(&self, pgid: Pid) {
        set_foreground(pgid);
        // The run may have touched the terminal before it was its own and
        // been stopped (SIGTTIN/SIGTTOU): let it go on.
        let _ = killpg(pgid, Signal::SIGCONT);
    }

    /// Whether the terminal has hung up (closed, or the session is gone).
    pub fn hung_up(&self) -> bool {
        nix::unistd::tcgetpgrp(std::io::stdin()).is_err()
    }

    /// Whether this process's group is the terminal's foreground group.
    pub fn owns_foreground(&self) -> bool {
        nix::unistd::tcgetpgrp(std::io::stdin()).is_ok_and(|g| g == self.own_group)
    }

    /// Makes this process's group the foreground again.
    pub fn take_back(&self) {
        set_foreground(self.own_group);
    }
}

/// tcsetpgrp from what may be a background group: SIGTTOU is blocked
/// meanwhile, as shells do, so the call is not stopped.
fn set_foreground(pgid: Pid) {
    let mut block = SigSet::empty();
    block.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&block), Some(&mut old)).is_ok() {
        let _ = nix::unistd::tcsetpgrp(std::io::stdin(), pgid);
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn exit_codes() {
        let st = Command::new("sh").args(["-c", "exit 7"]).status().unwrap();
        assert_eq!(exit_code(st), 7);
        let st = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(exit_code(st), 128 + 9);
    }

    #[test]
    fn waits_for_a_signal_and_times_out() {
        let set = SignalSet::new(&[libc::SIGUSR2]).unwrap();
        let t = Instant::now();
        assert!(
            set.wait(Some(Duration::from_millis(50)))
                .unwrap()
                .is_empty()
        );
        assert!(t.elapsed() >= Duration::from_millis(50));
        signal_hook::low_level::raise(libc::SIGUSR2).unwrap();
        assert_eq!(
            set.wait(Some(Duration::from_secs(5))).unwrap(),
            vec![libc::SIGUSR2]
        );
        assert!(set.take().is_empty());
    }
}
