//! Tying a command's processes to the life of the wrapper that started it:
//! the `unsafe` part (fork, prctl, signal masks), kept to this one module.
//!
//! Two pieces, because `PR_SET_PDEATHSIG` reaches only a direct child:
//!
//! - the command gets `PR_SET_PDEATHSIG(SIGKILL)` before its `exec`, and
//!   dies at once if the wrapper is already gone by then (its parent pid
//!   is no longer the wrapper's);
//! - a *group keeper*, a forked copy of the wrapper that never `exec`s,
//!   leads a new process group with `PR_SET_PDEATHSIG` of a signal it
//!   blocks and waits for. The command joins that group before its `exec`,
//!   so every process of the run is in the keeper's group from its first
//!   instruction; when the wrapper dies the keeper kills the whole group
//!   (`kill(-pgid, SIGKILL)`), grandchildren included. As a member it also
//!   keeps the group's id from being reused while it waits. When the run
//!   ends normally the wrapper kills it by pid and reaps it
//!   ([`GroupKeeper::stop`]).
//!
//! The keeper leads the group, rather than joining the command's own: a
//! keeper that joined after the command started would leave a window in
//! which a wrapper killed after the command's first `fork` lost its
//! grandchildren.
//!
//! `PR_SET_PDEATHSIG` fires when the parent *thread* exits, not the
//! process: both are started from the main thread, the one that lives as
//! long as the wrapper, and refused from any other.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::die_with_parent;

/// The signal a keeper gets when the wrapper dies. It is blocked in the
/// keeper except while it waits, and a keeper that gets it from anyone
/// else (its parent pid unchanged; shm-restore continuing the group after
/// a stop-mode save) ignores it. SIGCONT, because its sending continues a
/// stopped keeper, whatever the mask: a wrapper killed right after it
/// stopped the group (a stop-mode save) leaves a stopped keeper, and when
/// the group's members had not all stopped yet as it became orphaned, the
/// kernel continues nobody — a keeper waiting for SIGUSR2 then stayed
/// stopped, with its group, for good.
const KEEPER_SIGNAL: libc::c_int = libc::SIGCONT;

/// The keeper's name in `ps` (`/proc/PID/comm`, at most 15 bytes).
const KEEPER_NAME: &[u8] = b"shm-fd-keeper\0";

/// True on the process's main thread (the one whose exit ends the
/// process), the only thread a command or keeper may be started from.
pub fn on_main_thread() -> bool {
    nix::unistd::gettid() == nix::unistd::getpid()
}

fn not_main_thread() -> io::Error {
    io::Error::other(
        "a command can only be tied to the wrapper from its main thread \
         (PR_SET_PDEATHSIG follows the thread that started it)",
    )
}

/// A process that kills a command's process group when the wrapper (its
/// parent) dies; see the module docs.
///
/// Its pid stays valid while this value holds it: the keeper is this
/// process's child and is reaped only by [`GroupKeeper::stop`], or by the
/// caller, who then reports it through [`GroupKeeper::note_reaped`] (a
/// supervisor that reaps with `waitpid(-1)` must do so, or a later
/// [`GroupKeeper::stop`] could signal a reused pid).
#[derive(Debug)]
pub struct GroupKeeper {
    pid: Option<Pid>,
}

impl GroupKeeper {
    /// Forks a keeper, the leader of a new process group ([`GroupKeeper::pgid`])
    /// for the command to join; when this process dies, the keeper kills
    /// that group.
    ///
    /// The keeper closes every fd it inherited (it holds no memfd, pipe or
    /// terminal open) and blocks every signal except the one it waits for.
    /// Refused outside the main thread.
    pub fn start() -> io::Result<GroupKeeper> {
        if !on_main_thread() {
            return Err(not_main_thread());
        }
        let plan = KeeperPlan::new();
        let mut saved = Mask::empty();
        // Every signal blocked over the fork, so that none runs one of
        // this process's handlers in the child before it has set its own.
        // SAFETY: pthread_sigmask reads and writes the two masks we own.
        let blocked =
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &plan.block_all.0, &mut saved.0) };
        if blocked != 0 {
            return Err(io::Error::from_raw_os_error(blocked));
        }
        // SAFETY: the child runs only `keeper_main`, which makes raw,
        // async-signal-safe system calls on memory prepared before the
        // fork, and never returns; the parent goes on as usual.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: we are the freshly forked child (see above).
            unsafe { keeper_main(&plan) }
        }
        let fork_error = io::Error::last_os_error();
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved.0, std::ptr::null_mut()) };
        if pid == -1 {
            return Err(fork_error);
        }
        let mut keeper = GroupKeeper {
            pid: Some(Pid::from_raw(pid)),
        };
        // The keeper leads a group of its own before anyone can join it.
        // It makes the same call itself; whichever comes first wins, and
        // from here on the group exists (classic job-control shells do the
        // same with their jobs). If this fails, the keeper is of no use.
        let own = Pid::from_raw(pid);
        if let Err(e) = nix::unistd::setpgid(own, own) {
            keeper.stop();
            return Err(e.into());
        }
        Ok(keeper)
    }

    /// The id of the keeper's process group (its pid), for the command to
    /// join; `None` once the keeper is stopped or reaped.
    pub fn pgid(&self) -> Option<Pid> {
        self.pid
    }

    /// Sends `sig` (or, with `None`, only checks) to the keeper's group.
    /// Refused with `ESRCH` once the keeper is stopped or reaped: only
    /// while the keeper is an unreaped child is the group id sure not to
    /// be someone else's.
    pub fn signal_group(&self, sig: Option<Signal>) -> nix::Result<()> {
        let pgid = self.pgid().ok_or(Errno::ESRCH)?;
        nix::sys::signal::killpg(pgid, sig)
    }

    /// The keeper's pid, until it is stopped or reaped.
    pub fn pid(&self) -> Option<Pid> {
        self.pid
    }

    /// Tells the keeper that the caller's `waitpid` reaped `pid`; returns
    /// true when that was the keeper (which is then gone for good).
    pub fn note_reaped(&mut self, pid: Pid) -> bool {
        let was = self.pid == Some(pid);
        if was {
            self.pid = None;
        }
        was
    }

    /// Kills the keeper (SIGKILL, by pid) and reaps it: the run it guarded
    /// ended normally. Does nothing once it is gone.
    pub fn stop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        let _ = kill(pid, Signal::SIGKILL);
        while waitpid(pid, None) == Err(Errno::EINTR) {}
    }
}

impl Drop for GroupKeeper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`spawn_group`] could not do.
#[derive(Debug)]
pub enum SpawnError {
    /// The group keeper could not be started or could not lead a group of
    /// its own; nothing is left running.
    Keeper(io::Error),
    /// The command could not be started (not found, not executable, ...).
    Command(io::Error),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Keeper(e) => write!(f, "cannot start the process-group keeper: {e}"),
            SpawnError::Command(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpawnError::Keeper(e) | SpawnError::Command(e) => Some(e),
        }
    }
}

/// Starts `cmd` in a new process group tied to this process: the command
/// dies with SIGKILL when this process dies (`PR_SET_PDEATHSIG`, set
/// before its `exec`; at once if this process is gone by then), and the
/// [`GroupKeeper`] that leads the group kills the rest of the group then.
/// Call it from the main thread.
///
/// The group's id is the keeper's pid ([`GroupKeeper::pgid`]), not the
/// command's: the keeper is forked first and the command joins its group
/// before it runs, so a failure to start the keeper starts nothing, and
/// nothing the command starts is ever outside the keeper's reach. Stop the
/// keeper with [`GroupKeeper::stop`] once the run has ended and its group
/// is empty but for the keeper.
pub fn spawn_group(cmd: &mut Command) -> Result<(Child, GroupKeeper), SpawnError> {
    let keeper = GroupKeeper::start().map_err(SpawnError::Keeper)?;
    let pgid = keeper
        .pgid()
        .ok_or_else(|| SpawnError::Keeper(io::Error::from(Errno::ESRCH)))?;
    let child = die_with_parent(cmd.process_group(pgid.as_raw()))
        .spawn()
        .map_err(SpawnError::Command)?;
    Ok((child, keeper))
}

/// A signal set (`sigset_t`), built before the fork.
struct Mask(libc::sigset_t);

impl Mask {
    fn empty() -> Mask {
        // SAFETY: sigset_t is plain data, and sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t we own.
        unsafe { libc::sigemptyset(&mut set) };
        Mask(set)
    }

    fn all_but(except: Option<libc::c_int>) -> Mask {
        let mut mask = Mask::empty();
        // SAFETY: `mask.0` is an initialised sigset_t we own, and `except`
        // is a valid signal number.
        unsafe {
            libc::sigfillset(&mut mask.0);
            if let Some(sig) = except {
                libc::sigdelset(&mut mask.0, sig);
            }
        }
        mask
    }
}

/// Everything the keeper needs after the fork, prepared before it so that
/// the child allocates nothing.
struct KeeperPlan {
    parent: libc::pid_t,
    parent_group: libc::pid_t,
    block_all: Mask,
    /// The mask while waiting: everything blocked but [`KEEPER_SIGNAL`].
    wait: Mask,
    action: libc::sigaction,
    /// fds to close when `close_range` is missing (kernels before 5.9).
    open_fds: Vec<libc::c_int>,
}

impl KeeperPlan {
    fn new() -> KeeperPlan {
        // SAFETY: sigaction is plain data; every field the kernel reads is
        // set below (handler, mask, flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_mask = Mask::all_but(None).0;
        action.sa_flags = 0;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_else(|_| (0..1024).collect());
        KeeperPlan {
            parent: std::process::id() as libc::pid_t,
            parent_group: nix::unistd::getpgrp().as_raw(),
            block_all: Mask::all_but(None),
            wait: Mask::all_but(Some(KEEPER_SIGNAL)),
            action,
            open_fds,
        }
    }
}

/// The handler of [`KEEPER_SIGNAL`]: it only ends the keeper's
/// `sigsuspend`, which then looks at its parent.
extern "C" fn wake(_: libc::c_int) {}

/// The keeper's whole life, in the forked child.
///
/// # Safety
///
/// Only in the child of a fork, with every signal blocked. It makes only
/// raw, async-signal-safe system calls on memory prepared before the fork
/// (no allocation, no lock), and ends the process.
unsafe fn keeper_main(plan: &KeeperPlan) -> ! {
    // SAFETY: every call below is a plain system call on integers or on
    // memory in `plan` (valid: it was built before the fork and the child
    // has its own copy); none allocates or takes a lock.
    unsafe {
        // Hold nothing open: not the memfd, not a pipe someone waits to see
        // closed, not a terminal that should hang up.
        let (first, last, flags): (libc::c_long, libc::c_long, libc::c_long) =
            (0, u32::MAX as libc::c_long, 0);
        if libc::syscall(libc::SYS_close_range, first, last, flags) != 0 {
            for &fd in &plan.open_fds {
                libc::close(fd);
            }
        }
        // Lead a group of our own (the parent makes the same call).
        libc::setpgid(0, 0);
        libc::prctl(libc::PR_SET_NAME, KEEPER_NAME.as_ptr() as libc::c_ulong);
        libc::sigaction(KEEPER_SIGNAL, &plan.action, std::ptr::null_mut());
        if libc::prctl(libc::PR_SET_PDEATHSIG, KEEPER_SIGNAL as libc::c_ulong) == -1 {
            libc::_exit(1);
        }
        loop {
            // Checked before every wait, so a parent that died before the
            // prctl above is seen too.
            if libc::getppid() != plan.parent {
                let group = libc::getpgrp();
                // Still in the wrapper's group (the setpgid failed): no
                // group of our own, nothing to keep.
                if group != plan.parent_group {
                    libc::kill(-group, libc::SIGKILL);
                }
                libc::_exit(0);
            }
            libc::sigsuspend(&plan.wait.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The keeper itself is tested through the binaries (tests/tests/),
    // whose main threads start it: a forked copy of this multi-threaded
    // test process could not run test code safely.

    #[test]
    fn refused_outside_the_main_thread() {
        // The test harness runs tests on threads of their own.
        if on_main_thread() {
            return;
        }
        assert!(GroupKeeper::start().is_err());
        let e = spawn_group(&mut Command::new("true")).unwrap_err();
        assert!(matches!(e, SpawnError::Keeper(_)), "{e}");
        assert!(e.to_string().contains("main thread"), "{e}");
    }
}
