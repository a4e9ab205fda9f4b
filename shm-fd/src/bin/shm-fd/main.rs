//! `shm-fd`: create (or reuse) the shared memfd and run a command with it.

use std::ffi::OsString;
use std::io::{ErrorKind, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use clap::{Parser, ValueEnum};
use shm_fd::{CreateOptions, Handover, ListenEnv, PassedFds};

mod supervise;

pub(crate) const EXIT_SETUP: u8 = 1;
const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_CANNOT_EXECUTE: u8 = 126;
pub(crate) const EXIT_NOT_FOUND: u8 = 127;

const AFTER_HELP: &str = "\
The command gets the memfd on an inherited fd, described the systemd way:
LISTEN_FDS=<count> LISTEN_FDNAMES=<names> (fds 3, 4, ...). A memfd with the
name that is already inherited is reused; otherwise a new one is created (and
uploaded to systemd's fd store when NOTIFY_SOCKET is set).

In --restart mode on a terminal, each run gets the terminal's foreground;
a run that dies from Ctrl-C or Ctrl-\\ (or exits 130/131) ends the watcher,
as in a shell loop; a command that catches Ctrl-C and exits 0 is restarted
under `always` (use Ctrl-\\). A terminal hang-up ends the watcher too.

A --restart run dies with the watcher, even with a kill -9 of it: the
command gets SIGKILL (PR_SET_PDEATHSIG) and a keeper in its process group
(shm-fd-keeper) kills the rest of the group.

Exit status:
  (exec mode)  the command's own status: shm-fd becomes the command
  --restart    the last child's status, or 128+N if signal N killed it
  1            setup failed (bad LISTEN_* variables, memfd creation,
               --restart's process-group keeper, ...)
  2            usage error
  126          the command cannot be executed
  127          the command was not found";

/// Keep a program's state in a shared memfd across its runs.
#[derive(Debug, Parser)]
#[command(name = "shm-fd", version, after_help = AFTER_HELP)]
struct Args {
    /// Name of the fd in LISTEN_FDNAMES.
    #[arg(long, value_name = "NAME", default_value = shm_fd::DEFAULT_NAME, value_parser = parse_name)]
    name: String,

    /// Initial size of a newly created memfd: bytes, or with a suffix
    /// K/M/G/T (KiB/MiB/GiB/TiB, powers of 1024); at most 128T.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_memfd_size)]
    size: u64,

    /// Do not seal a new memfd against shrinking (F_SEAL_SHRINK).
    #[arg(long)]
    no_seal: bool,

    /// Set LISTEN_PID to the pid the command runs as (by default it is
    /// left unset, so the fd flows through wrappers such as `watch`).
    #[arg(long)]
    pid: bool,

    /// Stay as a watcher and run the command again when it exits
    /// (`always`) or when it fails or crashes (`on-failure`). A run of 1 s
    /// or more is restarted at once; a shorter one after 0.1 s if it
    /// succeeded, and after a delay that doubles with each fast failure in
    /// a row (0.1 s, 0.2 s, ... up to 10 s) if it failed. Each run
    /// gets its own process group: SIGTERM, SIGINT and SIGQUIT are
    /// forwarded to it; SIGHUP restarts it (SIGTERM, up to 10 s, SIGKILL;
    /// start again, state kept). A run's leftover processes (its group,
    /// and processes re-parented to the watcher) are stopped before the
    /// next starts: SIGTERM, SIGKILL after 10 s, or at once when the run
    /// was killed by SIGKILL. A run dies with the watcher.
    #[arg(long, value_name = "WHEN")]
    restart: Option<Restart>,

    /// The command to run, and its arguments.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        num_args = 1..
    )]
    command: Vec<OsString>,
}

fn parse_memfd_size(text: &str) -> Result<u64, String> {
    let size = shm_fd::units::parse_size(text)?;
    CreateOptions {
        size,
        ..CreateOptions::default()
    }
    .validate()
    .map_err(|_| {
        format!(
            "{text:?} is larger than the largest memfd shm-fd creates (128T = {} bytes)",
            CreateOptions::MAX_SIZE
        )
    })?;
    Ok(size)
}

fn parse_name(name: &str) -> Result<String, String> {
    shm_fd::check_name(name).map_err(|reason| format!("{name:?} {reason}"))?;
    if name.len() > shm_fd::MAX_MEMFD_NAME_LEN {
        return Err(format!("{name:?} is longer than 249 bytes"));
    }
    Ok(name.to_owned())
}

/// When the watcher starts the command again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Restart {
    /// After every exit.
    Always,
    /// After a non-zero exit or a death by signal; a clean exit ends the
    /// watcher.
    OnFailure,
}

fn main() -> ExitCode {
    // Set up the fds before anything else opens a descriptor: the
    // placement below may replace stray fds on 3, 4, ... (see `install`).
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, msg)) => {
            say(format_args!("{msg}"));
            ExitCode::from(code)
        }
    }
}

/// Prints `shm-fd: <msg>` on stderr. A failed write (closed pipe, full
/// disk) is ignored: losing a message must never cost the watcher, and
/// with it the memfd.
fn say(msg: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "shm-fd: {msg}");
}

/// Prints `shm-fd: warning: <msg>` on stderr (see [`say`]).
pub(crate) fn warn(msg: std::fmt::Arguments<'_>) {
    say(format_args!("warning: {msg}"));
}

/// An exit code with the one-line message explaining it.
struct Failure(u8, String);

fn run(args: Args) -> Result<u8, Failure> {
    let setup = |e: shm_fd::Error| Failure(EXIT_SETUP, e.to_string());
    let env = ListenEnv::from_process_env().map_err(setup)?;
    if let Some(env) = &env
        && let Some(pid) = env.pid().filter(|_| !env.is_for(std::process::id()))
    {
        warn(format_args!(
            "ignoring LISTEN_FDS={}: LISTEN_PID={pid} names another process",
            env.len()
        ));
    }
    // Resolved now: /proc/self/exe would name the command after an exec.
    let self_exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let options = CreateOptions {
        size: args.size,
        seal_shrink: !args.no_seal,
    };
    // SAFETY: nothing in this process has opened a file yet (clap, the
    // environment and current_exe leave none open), so every fd above 2,
    // those LISTEN_FDS names included, was inherited and has no owner here.
    let handover =
        unsafe { Handover::adopt_or_create(env.as_ref(), &args.name, options) }.map_err(setup)?;
    if handover.created()
        && let Some(socket) = std::env::var_os("NOTIFY_SOCKET")
        && let Err(e) = shm_fd::notify_fd_store(&socket, &args.name, handover.shared())
    {
        warn(format_args!(
            "cannot upload the memfd to systemd's fd store: {e}"
        ));
    }
    if options.seal_shrink && !handover.shrink_sealed().unwrap_or(false) {
        warn(format_args!(
            "the inherited memfd `{}` cannot be sealed against shrinking",
            args.name
        ));
    }
    // SAFETY: nothing in this process has opened a descriptor yet apart
    // from the hand-over's own (clap and the environment open none), so
    // whatever sits on 3, 4, ... is an inherited stray that nothing owns.
    let passed = unsafe { handover.install() }.map_err(setup)?;

    match args.restart {
        None => Err(exec(&args, &passed)),
        Some(when) => supervise::run(&args, &passed, when, &self_exe),
    }
}

/// Replaces this process with the command; returns only on failure.
fn exec(args: &Args, passed: &PassedFds) -> Failure {
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    passed.configure(&mut cmd, args.pid.then(std::process::id));
    spawn_failure(&args.command[0], cmd.exec())
}

/// The exit code and message for a command that could not be started.
pub(crate) fn spawn_failure(program: &OsString, e: std::io::Error) -> Failure {
    let program = program.to_string_lossy();
    match e.kind() {
        ErrorKind::NotFound => Failure(EXIT_NOT_FOUND, format!("{program}: command not found")),
        _ => Failure(
            EXIT_CANNOT_EXECUTE,
            format!("{program}: cannot execute: {e}"),
        ),
    }
}
