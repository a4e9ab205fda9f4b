//! Sharing the controlling terminal with a child's process group, as a
//! shell does with its jobs.

use std::io::IsTerminal;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, sigprocmask};
use nix::unistd::Pid;

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
