//! Waiting for signals without a busy loop (signal-hook's flags and a
//! self-pipe).

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use signal_hook::SigId;

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

#[cfg(test)]
mod tests {
    use super::*;

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
