//! `--restart`: stay as the parent ("the watcher") and keep the command
//! running, so the memfd outlives every run of it.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shm_fd::PassedFds;
use shm_fd::process::{SignalSet, exit_code};

use crate::{Args, EXIT_SETUP, Failure, Restart, spawn_failure};

/// A run shorter than this counts as a fast exit and is restarted after a
/// delay.
const MIN_UPTIME: Duration = Duration::from_secs(1);
/// The first delay after a fast failure; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long SIGHUP waits for the child to stop before it is killed.
const RELOAD_GRACE: Duration = Duration::from_secs(10);

const FORWARDED: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// What the watcher is doing with the current child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    /// A forwarded stop signal: when the child ends, so does the watcher.
    Stopping,
    /// SIGHUP: stop the child (killing it at the deadline) and start again.
    Reloading {
        deadline: Instant,
    },
}

pub(crate) fn run(args: &Args, passed: &PassedFds, when: Restart) -> Result<u8, Failure> {
    let setup = |e: std::io::Error| Failure(EXIT_SETUP, format!("signal handling: {e}"));
    // Registered before the first spawn so no child exit goes unnoticed.
    let signals = SignalSet::new(&[
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGHUP,
    ])
    .map_err(setup)?;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let mut child = spawn(args, passed)?;
        let (status, mode) = watch_child(&mut child, &signals).map_err(setup)?;
        let ran = started.elapsed();
        match mode {
            Mode::Stopping => return Ok(exit_code(status)),
            Mode::Reloading { .. } => {
                backoff = FIRST_BACKOFF;
                continue;
            }
            Mode::Running => {}
        }
        if when == Restart::OnFailure && status.success() {
            return Ok(0);
        }
        let delay = if ran >= MIN_UPTIME {
            backoff = FIRST_BACKOFF;
            Duration::ZERO
        } else if status.success() {
            FIRST_BACKOFF
        } else {
            let d = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            d
        };
        if !delay.is_zero() {
            eprintln!(
                "shm-fd: {} ({}) after {:.1?}; restarting in {delay:.1?}",
                describe(status),
                args.command[0].to_string_lossy(),
                ran
            );
        }
        // Sleep out the delay, still answering signals.
        let deadline = Instant::now() + delay;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let got = signals.wait(Some(left)).map_err(setup)?;
            if got.iter().any(|s| FORWARDED.contains(s)) {
                return Ok(exit_code(status));
            }
            if got.contains(&libc::SIGHUP) {
                break;
            }
        }
    }
}

fn spawn(args: &Args, passed: &PassedFds) -> Result<Child, Failure> {
    let mut cmd = if args.pid {
        // The child's pid is unknown before it starts; a nested `shm-fd
        // --pid` (which reuses the inherited memfd) sets LISTEN_PID to its
        // own pid and execs the command, keeping that pid.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args(["--pid", "--name", &args.name, "--"]);
        cmd
    } else {
        Command::new(&args.command[0])
    };
    let program = if args.pid { 0 } else { 1 };
    cmd.args(&args.command[program..]);
    passed.configure(&mut cmd, None);
    cmd.spawn().map_err(|e| spawn_failure(&args.command[0], e))
}

/// Waits for the child to end, acting on signals meanwhile. Returns its
/// status and what the watcher was doing when it ended.
fn watch_child(child: &mut Child, signals: &SignalSet) -> std::io::Result<(ExitStatus, Mode)> {
    let pid = Pid::from_raw(child.id() as i32);
    let mut mode = Mode::Running;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, mode));
        }
        let timeout = match mode {
            Mode::Reloading { deadline } => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    eprintln!(
                        "shm-fd: the command ignored SIGTERM for {RELOAD_GRACE:?}; killing it"
                    );
                    let _ = kill(pid, Signal::SIGKILL);
                    // Still a reload: the kill is ours, not a crash.
                    let status = child.wait()?;
                    return Ok((status, Mode::Reloading { deadline }));
                }
                Some(left)
            }
            _ => None,
        };
        for sig in signals.wait(timeout)? {
            if FORWARDED.contains(&sig) {
                // The child may have ended already; then there is no one to tell.
                let _ = kill(pid, Signal::try_from(sig).ok());
                mode = Mode::Stopping;
            } else if sig == libc::SIGHUP && mode == Mode::Running {
                eprintln!("shm-fd: SIGHUP: restarting the command");
                let _ = kill(pid, Signal::SIGTERM);
                mode = Mode::Reloading {
                    deadline: Instant::now() + RELOAD_GRACE,
                };
            }
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".to_owned(),
    }
}
