//! `--restart`: stay as the parent ("the watcher") and keep the command
//! running, so the memfd outlives every run of it.
//!
//! Each run is started in a process group of its own, and the watcher is a
//! child subreaper, so that stopping or reloading a run reaches everything
//! it started (`sh -c`, `watch`, ...) and a new run never writes the memfd
//! next to a leftover of the old one. When the watcher owns the terminal,
//! it hands the terminal to each run's group (as a shell does with a job).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use shm_fd::PassedFds;
use shm_fd::process::{SignalSet, Terminal};

use crate::{
    Args, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SETUP, Failure, Restart, spawn_failure, warn,
};

/// A run shorter than this counts as a fast exit and is restarted after a
/// delay.
const MIN_UPTIME: Duration = Duration::from_secs(1);
/// The first delay after a fast failure; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a run's processes get to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often to look whether a finished run's group has emptied (its
/// remaining members need not be our children, so no SIGCHLD tells).
const GROUP_POLL: Duration = Duration::from_millis(20);

const FORWARDED: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// How a run's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Exited(i32),
    Killed(Signal),
}

impl Ended {
    fn exit_code(self) -> u8 {
        match self {
            Ended::Exited(code) => code as u8,
            Ended::Killed(sig) => 128u8.wrapping_add(sig as i32 as u8),
        }
    }

    fn success(self) -> bool {
        self == Ended::Exited(0)
    }

    /// What a user interrupting from the terminal looks like.
    fn interrupted(self) -> bool {
        matches!(
            self,
            Ended::Killed(Signal::SIGINT | Signal::SIGQUIT) | Ended::Exited(130 | 131)
        )
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Exited(code) => write!(f, "exited with status {code}"),
            Ended::Killed(sig) => write!(f, "killed by {sig}"),
        }
    }
}

/// What the watcher is doing with the current run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    /// A forwarded stop signal: when the run ends, so does the watcher.
    Stopping,
    /// SIGHUP: the run was sent SIGTERM; start again when it has ended.
    Reloading,
}

pub(crate) fn run(
    args: &Args,
    passed: &PassedFds,
    when: Restart,
    self_exe: &Path,
) -> Result<u8, Failure> {
    let setup = |e: std::io::Error| Failure(EXIT_SETUP, format!("signal handling: {e}"));
    // Orphans of a run are re-parented to us, so we can reap them and know
    // when a run has really ended.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn(format_args!("cannot become a child subreaper: {e}"));
    }
    // Registered before the first spawn so no child exit goes unnoticed.
    let signals = SignalSet::new(&[
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGHUP,
    ])
    .map_err(setup)?;
    let terminal = Terminal::if_foreground();
    let mut backoff = FIRST_BACKOFF;
    let mut first = true;
    // The status to exit with if told to stop between runs.
    let mut last = 0;
    loop {
        // A stop signal that arrived as the last run ended is not for the
        // next one.
        if signals.take().iter().any(|s| FORWARDED.contains(s)) {
            return Ok(last);
        }
        let started = Instant::now();
        let ended = match spawn(args, passed, self_exe) {
            Ok(pgid) => {
                if let Some(t) = &terminal {
                    t.give_to(pgid);
                }
                let result = watch_run(pgid, &signals, terminal.as_ref());
                if let Some(t) = &terminal {
                    t.take_back();
                }
                let (ended, mode) = result.map_err(setup)?;
                match mode {
                    Mode::Stopping => return Ok(ended.exit_code()),
                    Mode::Reloading => {
                        last = ended.exit_code();
                        first = false;
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                    Mode::Running => {}
                }
                if let Some(t) = &terminal
                    && (ended.interrupted() || t.hung_up())
                {
                    // Ctrl-C / Ctrl-\ went to the run's group, not to us;
                    // a hung-up terminal has no one left to run for.
                    return Ok(ended.exit_code());
                }
                // `--pid` runs through a nested shm-fd, which reports a
                // command it cannot start as 127 / 126.
                let cannot_start = ended == Ended::Exited(EXIT_NOT_FOUND.into())
                    || ended == Ended::Exited(EXIT_CANNOT_EXECUTE.into());
                if first && args.pid && cannot_start {
                    return Ok(ended.exit_code());
                }
                ended
            }
            // The command is gone on the first try: a usage problem.
            Err(e) if first => return Err(spawn_failure(&args.command[0], e)),
            // Later it may be a rebuild replacing the binary: retry.
            Err(e) => {
                let Failure(code, msg) = spawn_failure(&args.command[0], e);
                warn(format_args!("{msg}"));
                Ended::Exited(code.into())
            }
        };
        first = false;
        let ran = started.elapsed();
        if when == Restart::OnFailure && ended.success() {
            return Ok(0);
        }
        let delay = if ran >= MIN_UPTIME {
            backoff = FIRST_BACKOFF;
            Duration::ZERO
        } else if ended.success() {
            FIRST_BACKOFF
        } else {
            let d = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            d
        };
        if !delay.is_zero() {
            warn(format_args!(
                "{} {ended} after {ran:.1?}; restarting in {delay:.1?}",
                args.command[0].to_string_lossy(),
            ));
        }
        // Sleep out the delay, still answering signals (and reaping).
        last = ended.exit_code();
        let deadline = Instant::now() + delay;
        let mut got = signals.take();
        loop {
            reap_all(None, false).map_err(setup)?;
            if got.iter().any(|s| FORWARDED.contains(s)) {
                return Ok(last);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if got.contains(&libc::SIGHUP) || left.is_zero() {
                break;
            }
            got = signals.wait(Some(left)).map_err(setup)?;
        }
    }
}

/// Starts a run in a new process group; returns the group id (= its pid).
fn spawn(args: &Args, passed: &PassedFds, self_exe: &Path) -> std::io::Result<Pid> {
    let mut cmd = if args.pid {
        // The child's pid is unknown before it starts; a nested `shm-fd
        // --pid` (which reuses the inherited memfd) sets LISTEN_PID to its
        // own pid and execs the command, keeping that pid.
        let mut cmd = Command::new(self_exe);
        cmd.args(["--pid", "--name", &args.name, "--"]);
        cmd.args(&args.command);
        cmd
    } else {
        let mut cmd = Command::new(&args.command[0]);
        cmd.args(&args.command[1..]);
        cmd
    };
    passed.configure(&mut cmd, None);
    // process_group keeps std on posix_spawn (no pre_exec hook needed).
    let child = cmd.process_group(0).spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// Waits for the run whose main process (and group) is `pgid` to end,
/// acting on signals meanwhile. The run has ended when its main process
/// has and its process group is empty; leftovers get SIGTERM, then SIGKILL.
fn watch_run(
    pgid: Pid,
    signals: &SignalSet,
    terminal: Option<&Terminal>,
) -> std::io::Result<(Ended, Mode)> {
    let mut mode = Mode::Running;
    let mut ended = None;
    // When to SIGKILL whatever of the group is still there.
    let mut kill_at: Option<Instant> = None;
    loop {
        let seen = reap_all(Some(pgid), terminal.is_some())?;
        if let Some(e) = seen.ended {
            ended = Some(e);
        } else if seen.stopped
            && let Some(t) = terminal
        {
            suspend_with(pgid, t);
        }
        if let Some(end) = ended {
            if group_is_empty(pgid) {
                return Ok((end, mode));
            }
            if kill_at.is_none() {
                warn(format_args!(
                    "the command ended but left processes in its group; stopping them"
                ));
                let _ = killpg(pgid, Signal::SIGTERM);
                kill_at = Some(Instant::now() + STOP_GRACE);
            }
        }
        if let Some(at) = kill_at
            && Instant::now() >= at
        {
            warn(format_args!(
                "the command's processes ignored SIGTERM for {STOP_GRACE:?}; killing them"
            ));
            let _ = killpg(pgid, Signal::SIGKILL);
            kill_at = Some(Instant::now() + Duration::from_secs(3600));
        }
        let mut timeout = kill_at.map(|at| at.saturating_duration_since(Instant::now()));
        if ended.is_some() {
            timeout = Some(timeout.map_or(GROUP_POLL, |t| t.min(GROUP_POLL)));
        }
        for sig in signals.wait(timeout)? {
            if FORWARDED.contains(&sig) {
                // The group may be gone already; then there is no one to tell.
                let _ = killpg(pgid, Signal::try_from(sig).ok());
                mode = Mode::Stopping;
                kill_at.get_or_insert(Instant::now() + STOP_GRACE);
            } else if sig == libc::SIGHUP && terminal.is_some_and(Terminal::hung_up) {
                // The terminal went away: stop, as a shell's jobs do.
                let _ = killpg(pgid, Signal::SIGHUP);
                mode = Mode::Stopping;
                kill_at.get_or_insert(Instant::now() + STOP_GRACE);
            } else if sig == libc::SIGHUP && mode == Mode::Running {
                warn(format_args!("SIGHUP: restarting the command"));
                let _ = killpg(pgid, Signal::SIGTERM);
                mode = Mode::Reloading;
                kill_at.get_or_insert(Instant::now() + STOP_GRACE);
            }
        }
    }
}

/// What [`reap_all`] saw of a run's main process.
#[derive(Debug, Default)]
struct Reaped {
    /// It ended, so.
    ended: Option<Ended>,
    /// It was stopped (Ctrl-Z); only reported when asked for.
    stopped: bool,
}

/// Reaps every finished child (runs' processes and orphans re-parented to
/// us), and with `untraced` also notices `main` being stopped.
fn reap_all(main: Option<Pid>, untraced: bool) -> std::io::Result<Reaped> {
    let mut flags = WaitPidFlag::WNOHANG;
    if untraced {
        flags |= WaitPidFlag::WUNTRACED;
    }
    let mut seen = Reaped::default();
    loop {
        let (pid, end) = match waitpid(None, Some(flags)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Ended::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Ended::Killed(sig)),
            Ok(WaitStatus::Stopped(pid, _)) => {
                seen.stopped |= Some(pid) == main;
                continue;
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(seen),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if Some(pid) == main {
            seen.ended = Some(end);
        }
    }
}

/// The run was stopped from the terminal (Ctrl-Z): take the terminal back
/// and stop ourselves, so the shell sees the whole job stopped; when it
/// continues us (`fg` or `bg`), continue the run, in the foreground again
/// if we are.
fn suspend_with(pgid: Pid, terminal: &Terminal) {
    terminal.take_back();
    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
    if terminal.owns_foreground() {
        terminal.give_to(pgid);
    } else {
        let _ = killpg(pgid, Signal::SIGCONT);
    }
}

fn group_is_empty(pgid: Pid) -> bool {
    killpg(pgid, None) == Err(Errno::ESRCH)
}
