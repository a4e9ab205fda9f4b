//! Tying a child to the life of the process that starts it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the process `cmd` starts die with SIGKILL when the thread that
/// spawns it ends (`PR_SET_PDEATHSIG`), or at once if this process is
/// already gone when the child gets to set that up.
///
/// `PR_SET_PDEATHSIG` follows the *thread* that started the child: spawn
/// `cmd` from the main thread (the one that lives as long as the process)
/// unless the child is meant to die with a shorter-lived thread. It also
/// reaches only this direct child, not its own children: for a whole
/// command tree see `spawn_group` (feature `cli`).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    let hook = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) with a signal number takes no
        // pointer and only sets this (child) process's own attribute.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died between the fork and the prctl: then no
        // signal will ever come, and we are another process's child now.
        // SAFETY: getppid, getpid and kill are plain system calls on
        // integers, async-signal-safe as the time after fork requires.
        unsafe {
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        Ok(())
    };
    // SAFETY: between fork and exec the hook makes only async-signal-safe
    // system calls (prctl, getppid, getpid, kill) and allocates nothing
    // (last_os_error builds an io::Error from the errno, without memory).
    unsafe { cmd.pre_exec(hook) }
}
