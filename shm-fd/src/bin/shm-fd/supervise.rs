//! `--restart`: stay as the parent ("the watcher") and keep the command
//! running, so the memfd outlives every run of it.
//!
//! Each run is started in a process group of its own, and the watcher is a
//! child subreaper, so that stopping or reloading a run reaches everything
//! it started (`sh -c`, `watch`, ...) and a new run never writes the memfd
//! next to a leftover of the old one: the next run starts only when the
//! watcher has no child left at all (orphans of the run, re-parented to
//! it, included). Each run is tied to the watcher's life
//! ([`shm_fd::process::spawn_group`]): when the watcher dies, the run and
//! its process group die with it. When the watcher owns the terminal, it
//! hands the terminal to each run's group (as a shell does with a job).

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use shm_fd::PassedFds;
use shm_fd::process::{GroupKeeper, ProcStat, SignalSet, SpawnError, Terminal, spawn_group};

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
/// How often to look whether a finished run's processes are gone (its
/// group's remaining members need not be our children, so no SIGCHLD
/// tells).
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
            Ok((run, mut keeper)) => {
                if let Some(t) = &terminal {
                    t.give_to(run.pgid);
                }
                let result = watch_run(run, &mut keeper, &signals, terminal.as_ref());
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
            // Without a keeper no run starts: the watcher's death would
            // leave it running.
            Err(SpawnError::Keeper(e)) if first => {
                return Err(Failure(EXIT_SETUP, SpawnError::Keeper(e).to_string()));
            }
            Err(e @ SpawnError::Keeper(_)) => {
                warn(format_args!("{e}; trying again"));
                Ended::Exited(EXIT_SETUP.into())
            }
            // The command is gone on the first try: a usage problem.
            Err(SpawnError::Command(e)) if first => {
                return Err(spawn_failure(&args.command[0], e));
            }
            // Later it may be a rebuild replacing the binary: retry.
            Err(SpawnError::Command(e)) => {
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
        // The delay before the next run: none after a run of MIN_UPTIME or
        // more; FIRST_BACKOFF after a fast success; after fast failures,
        // FIRST_BACKOFF doubling with each one in a row, up to MAX_BACKOFF.
        // A long run or a success starts the doubling over.
        let delay = if ran >= MIN_UPTIME {
            backoff = FIRST_BACKOFF;
            Duration::ZERO
        } else if ended.success() {
            backoff = FIRST_BACKOFF;
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
            reap_all(None, false, None).map_err(setup)?;
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

/// A run's main process and its process group (led by its keeper).
#[derive(Debug, Clone, Copy)]
struct Run {
    pid: Pid,
    pgid: Pid,
}

/// Starts a run in a new process group, tied to the watcher's life;
/// returns its main process and group, and the group's keeper.
///
/// Called from the main thread (the watcher's only one): the run's
/// `PR_SET_PDEATHSIG` fires when the thread that started it ends.
fn spawn(
    args: &Args,
    passed: &PassedFds,
    self_exe: &Path,
) -> Result<(Run, GroupKeeper), SpawnError> {
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
    let (child, keeper) = spawn_group(&mut cmd)?;
    let pid = Pid::from_raw(child.id() as i32);
    // The keeper leads the group until it is stopped, after the run.
    let pgid = keeper.pgid().unwrap_or(pid);
    Ok((Run { pid, pgid }, keeper))
}

/// Waits for `run` (its main process, and its group) to end,
/// acting on signals meanwhile. The run has ended when its main process
/// has, its process group is empty but for `keeper`, and the watcher has
/// no other child left (orphans of the run are re-parented to it); then
/// the keeper is stopped and every child reaped.
///
/// Leftovers get SIGTERM, and SIGKILL after [`STOP_GRACE`]; when the main
/// process was killed by SIGKILL, at once: that is how a wrapper such as
/// `shm-restore` dies unannounced, and what it left runs unsupervised
/// (its command already got SIGKILL from its `PR_SET_PDEATHSIG`).
fn watch_run(
    run: Run,
    keeper: &mut GroupKeeper,
    signals: &SignalSet,
    terminal: Option<&Terminal>,
) -> std::io::Result<(Ended, Mode)> {
    let mut mode = Mode::Running;
    let mut ended = None;
    // When to SIGKILL whatever of the run is still there.
    let mut kill_at: Option<Instant> = None;
    // Everything left gets SIGKILL, on every look.
    let mut killing = false;
    // Leftover children already sent SIGTERM.
    let mut termed: HashSet<Pid> = HashSet::new();
    let pgid = run.pgid;
    loop {
        let seen = reap_all(Some(run.pid), terminal.is_some(), Some(keeper))?;
        if let Some(e) = seen.ended {
            ended = Some(e);
        } else if seen.stopped
            && let Some(t) = terminal
        {
            suspend_with(pgid, t);
        }
        if let Some(at) = kill_at
            && Instant::now() >= at
            && !killing
        {
            warn(format_args!(
                "the command's processes ignored SIGTERM for {STOP_GRACE:?}; killing them"
            ));
            killing = true;
            signal_run(run, keeper, ended.is_none(), Some(Signal::SIGKILL));
        }
        if let Some(end) = ended {
            let left = Leftovers::find(pgid, keeper);
            if left.is_empty() {
                // Nothing of the run runs any more: the keeper's work is done.
                keeper.stop();
                if reap_all(None, false, None)?.no_child_left {
                    return Ok((end, mode));
                }
            } else if killing {
                left.signal(run, keeper, Signal::SIGKILL);
            } else if end == Ended::Killed(Signal::SIGKILL) {
                warn(format_args!(
                    "the command was killed by SIGKILL; killing the {} it left",
                    left.describe()
                ));
                killing = true;
                left.signal(run, keeper, Signal::SIGKILL);
            } else {
                if kill_at.is_none() {
                    warn(format_args!(
                        "the command ended but left {}; stopping them",
                        left.describe()
                    ));
                    // Group members that are not our children are reached
                    // through the group; the keeper blocks SIGTERM. A
                    // stopped process gets its SIGTERM once continued.
                    signal_run(run, keeper, ended.is_none(), Some(Signal::SIGTERM));
                    signal_run(run, keeper, ended.is_none(), Some(Signal::SIGCONT));
                    kill_at = Some(Instant::now() + STOP_GRACE);
                }
                for &pid in &left.children {
                    if termed.insert(pid) {
                        let _ = kill(pid, Signal::SIGTERM);
                        let _ = kill(pid, Signal::SIGCONT);
                    }
                }
            }
        }
        let mut timeout = kill_at
            .filter(|_| !killing)
            .map(|at| at.saturating_duration_since(Instant::now()));
        if ended.is_some() {
            timeout = Some(timeout.map_or(GROUP_POLL, |t| t.min(GROUP_POLL)));
        }
        for sig in signals.wait(timeout)? {
            if FORWARDED.contains(&sig) {
                // The group may be gone already; then there is no one to tell.
                signal_run(run, keeper, ended.is_none(), Signal::try_from(sig).ok());
                mode = Mode::Stopping;
                kill_at.get_or_insert(Instant::now() + STOP_GRACE);
            } else if sig == libc::SIGHUP && terminal.is_some_and(Terminal::hung_up) {
                // The terminal went away: stop, as a shell's jobs do.
                signal_run(run, keeper, ended.is_none(), Some(Signal::SIGHUP));
                mode = Mode::Stopping;
                kill_at.get_or_insert(Instant::now() + STOP_GRACE);
            } else if sig == libc::SIGHUP && mode == Mode::Running {
                warn(format_args!("SIGHUP: restarting the command"));
                signal_run(run, keeper, ended.is_none(), Some(Signal::SIGTERM));
                mode = Mode::Reloading;
                kill_at.get_or_insert(Instant::now() + STOP_GRACE);
            }
        }
    }
}

/// Sends `sig` to the run's process group, by its id only while that id
/// is the run's: while the group's keeper (its leader) is an unreaped
/// child; or, once the keeper is gone (killed, or stopped because without
/// /proc it cannot be told from the other members), while the run's main
/// process (a member) is not reaped yet, or while the group still has
/// members (a group id is not reused while the group exists; only a group
/// that empties between the look and the signal, and whose id is taken
/// again in that instant, could be missed or hit).
fn signal_run(run: Run, keeper: &GroupKeeper, main_unreaped: bool, sig: Option<Signal>) {
    if keeper.pgid().is_some() {
        let _ = keeper.signal_group(sig);
    } else if main_unreaped || !group_is_empty(run.pgid) {
        let _ = killpg(run.pgid, sig);
    }
}

/// What is left of a run whose main process has ended.
#[derive(Debug, Default)]
struct Leftovers {
    /// Live members of its process group, the keeper aside.
    group: usize,
    /// Live children of the watcher, the keeper aside: orphans of the run
    /// (re-parented to the watcher, a subreaper), in any group.
    children: Vec<Pid>,
}

impl Leftovers {
    fn find(pgid: Pid, keeper: &mut GroupKeeper) -> Leftovers {
        let me = std::process::id() as i32;
        let mut left = Leftovers::default();
        if ProcStat::read(me).is_none() {
            // Without /proc the keeper cannot be told from other members:
            // it goes first, and the group is what the kernel says.
            keeper.stop();
            if !group_is_empty(pgid) {
                left.group = 1;
            }
            return left;
        }
        let keeper = keeper.pid();
        for p in shm_fd::process::processes() {
            if p.has_ended() || Some(Pid::from_raw(p.pid)) == keeper {
                continue;
            }
            if p.ppid == me {
                left.children.push(Pid::from_raw(p.pid));
            } else if p.pgrp == pgid.as_raw() {
                left.group += 1;
            }
        }
        left
    }

    fn is_empty(&self) -> bool {
        self.group == 0 && self.children.is_empty()
    }

    /// `1 process`, `3 processes`.
    fn describe(&self) -> String {
        match self.group + self.children.len() {
            1 => "1 process".to_owned(),
            n => format!("{n} processes"),
        }
    }

    /// Sends `sig` to the group (through its keeper, while it is there)
    /// and to each leftover child, by pid (our unreaped children, so no
    /// pid can have been reused).
    fn signal(&self, run: Run, keeper: &GroupKeeper, sig: Signal) {
        if self.group > 0 {
            signal_run(run, keeper, false, Some(sig));
        }
        for &pid in &self.children {
            let _ = kill(pid, sig);
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
    /// The watcher has no child left at all (`ECHILD`).
    no_child_left: bool,
}

/// Reaps every finished child (runs' processes and orphans re-parented to
/// us), and with `untraced` also notices `main` being stopped. A reaped
/// keeper is reported to `keeper`, so it is never signalled again.
fn reap_all(
    main: Option<Pid>,
    untraced: bool,
    mut keeper: Option<&mut GroupKeeper>,
) -> std::io::Result<Reaped> {
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
            Ok(WaitStatus::StillAlive) => return Ok(seen),
            Err(Errno::ECHILD) => {
                seen.no_child_left = true;
                return Ok(seen);
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(k) = keeper.as_deref_mut() {
            k.note_reaped(pid);
        }
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
