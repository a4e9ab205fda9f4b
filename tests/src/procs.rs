//! Finding processes by pid (never by name) for the tests that kill
//! wrappers, and making sure none outlives its test.

use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
pub use shm_fd::process::ProcStat;

/// One process: a pid and its start time, so that a pid the kernel has
/// given to a new process since is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks after boot).
    pub start_time: u64,
}

impl Proc {
    /// The process `pid` as it is now, if it runs.
    pub fn of(pid: i32) -> Option<Proc> {
        ProcStat::read(pid)
            .filter(|s| !s.has_ended())
            .map(|s| Proc::from(&s))
    }

    /// Whether it still runs (a zombie does not).
    pub fn is_running(&self) -> bool {
        shm_fd::process::is_running(self.pid, self.start_time)
    }

    /// Waits up to `bound` for it to end; true if it did.
    pub fn ended_within(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(5));
        }
        true
    }

    /// SIGKILL, if it is still this process.
    pub fn kill(&self) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

impl From<&ProcStat> for Proc {
    fn from(s: &ProcStat) -> Proc {
        Proc {
            pid: s.pid,
            start_time: s.start_time,
        }
    }
}

/// The running children of `parent`.
pub fn children(parent: i32) -> Vec<ProcStat> {
    shm_fd::process::processes()
        .into_iter()
        .filter(|p| p.ppid == parent && !p.has_ended())
        .collect()
}

/// The running child of `parent` that a wrapper started as its command (or
/// run): it is in a process group led by another process (the group
/// keeper, which leads the group the command joins before it runs), not in
/// its parent's group. The keeper itself leads its group, so it is never
/// taken for the command.
pub fn command_child(parent: i32) -> Option<Proc> {
    let parent_group = ProcStat::read(parent)?.pgrp;
    children(parent)
        .iter()
        .find(|p| p.pgrp != p.pid && p.pgrp != parent_group)
        .map(Proc::from)
}

/// Polls `f` until it gives a value, for at most `bound`; panics naming
/// `what` when it never does.
pub fn poll_for<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5));
    }
}

/// Processes a test started (directly or not) that must not outlive it,
/// even when an assertion fails: dropping the sweep sends SIGKILL, by pid
/// (after a check of the start time), to each process still running and,
/// for a tree, to everything below it too; a tree's root, the test's own
/// child, is reaped.
#[derive(Debug, Default)]
pub struct Sweep {
    trees: Vec<Proc>,
    single: Vec<Proc>,
}

impl Sweep {
    /// Remembers `p`.
    pub fn add(&mut self, p: Proc) {
        if !self.single.contains(&p) {
            self.single.push(p);
        }
    }

    /// Remembers the test's child `pid` and whatever will run below it.
    pub fn add_tree(&mut self, pid: u32) {
        if let Some(p) = Proc::of(pid as i32) {
            self.trees.push(p);
        }
    }
}

/// `pid` and every process below it, parents before children.
fn tree(pid: i32) -> Vec<Proc> {
    let all = shm_fd::process::processes();
    let mut found: Vec<Proc> = all
        .iter()
        .filter(|p| p.pid == pid)
        .map(Proc::from)
        .collect();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i].pid;
        found.extend(
            all.iter()
                .filter(|p| p.ppid == parent && !p.has_ended())
                .map(Proc::from),
        );
        i += 1;
    }
    found
}

impl Drop for Sweep {
    fn drop(&mut self) {
        for root in &self.trees {
            // Not reaped yet (running, or a zombie): still the test's child.
            let Some(now) = ProcStat::read(root.pid).filter(|s| s.start_time == root.start_time)
            else {
                continue;
            };
            if !now.has_ended() {
                // Stopped first, so that it starts nothing new meanwhile.
                let _ = kill(Pid::from_raw(root.pid), Signal::SIGSTOP);
                for p in tree(root.pid).iter().rev() {
                    p.kill();
                }
            }
            let _ = nix::sys::wait::waitpid(Pid::from_raw(root.pid), None);
        }
        for p in &self.single {
            p.kill();
        }
    }
}

/// A shell script that prints `pid pgrp ppid keeper-ppid keeper-pgrp` from
/// a command's first instruction: its own pid and group, its parent (the
/// wrapper), and the parent and group of its group's leader.
pub const GROUP_PROBE: &str = "read -r _ _ _ _ pg _ < /proc/$$/stat; \
     read -r _ _ _ kp kg _ < /proc/$pg/stat; echo $$ $pg $PPID $kp $kg";

/// Checks [`GROUP_PROBE`]'s output: the command runs, from its start, in a
/// group led by another child of the wrapper (the group keeper).
pub fn assert_in_keepers_group(out: &str) {
    let f: Vec<i32> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
    let [pid, pgrp, wrapper, keeper_parent, keeper_group] = f[..] else {
        panic!("unexpected probe output {out:?}");
    };
    assert_ne!(pgrp, pid, "the command leads its own group: {out}");
    assert_eq!(
        keeper_parent, wrapper,
        "the group's leader is not the wrapper's child: {out}"
    );
    assert_eq!(
        keeper_group, pgrp,
        "the group's leader leads another group: {out}"
    );
}
