//! `rpc run`: a fresh state, one server and N clients (this program again,
//! each dying with `run`), requests per second, and the check.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use shm_fd::process::die_with_parent;
use shm_fd::{CreateOptions, Handover, SharedFd};
use shm_state::{Layout, SharedState, Source};

use crate::{
    Cli, Fail, MAX_CLIENTS, MAX_PEERS, Root, check_state, init_state, request_stop, setup,
    with_damage_code,
};

/// How long a client waits for an answer in a run (a server that died
/// fails the run after it).
const CLIENT_TIMEOUT: &str = "30";

/// The options of `rpc run`.
#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// Number of client processes (1 to 67; the server is one more).
    #[arg(long, value_name = "N", default_value_t = 64)]
    clients: u32,
    /// How long the clients send requests, in seconds (fractions allowed).
    #[arg(
        long,
        value_name = "S",
        default_value_t = 3.0,
        allow_negative_numbers = true
    )]
    seconds: f64,
}

/// The options of `run`, checked.
struct Plan {
    /// Number of clients.
    clients: u32,
    /// How long they send.
    seconds: Duration,
}

fn plan(args: &RunArgs) -> Result<Plan, Fail> {
    if !(1..=MAX_CLIENTS).contains(&args.clients) {
        return Err(Fail(
            2,
            format!(
                "--clients {}: give 1 to {MAX_CLIENTS} (a shared state's peer table holds {MAX_PEERS} processes: the clients and the server)",
                args.clients
            ),
        ));
    }
    let seconds = Duration::try_from_secs_f64(args.seconds)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(24 * 3600))
        .ok_or_else(|| {
            Fail(
                2,
                format!(
                    "--seconds {}: give a number of seconds above 0, at most a day",
                    args.seconds
                ),
            )
        })?;
    Ok(Plan {
        clients: args.clients,
        seconds,
    })
}

/// Where the server and the clients find the state.
enum Shared {
    /// The memfd, on fd 3 without close-on-exec (`LISTEN_FDS`).
    Memfd(shm_fd::PassedFds),
    /// The file, opened by path.
    File(PathBuf),
}

/// Creates the state's backing: a new memfd called `name` (also put on fd
/// 3 for the children), or the file at `path`, which must be new or
/// empty.
fn create_source(file: Option<&Path>, name: &str) -> Result<(Source, Shared), Fail> {
    match file {
        Some(path) => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Fail(3, format!("{}: {e}", path.display())))?;
            let len = f
                .metadata()
                .map_err(|e| Fail(3, format!("{}: {e}", path.display())))?
                .len();
            if len != 0 {
                return Err(Fail(
                    3,
                    format!(
                        "{} already holds {len} bytes: a run starts from an empty state; give a new path",
                        path.display()
                    ),
                ));
            }
            // SAFETY: the file was empty, so it is this run's own; only
            // the processes this run starts open it, all through shm-state
            // (whose writer lock orders their writes), and nothing
            // truncates it.
            let source = unsafe { Source::file(f) };
            Ok((source, Shared::File(path.to_path_buf())))
        }
        None => {
            let handover = Handover::reuse_or_create(Vec::new(), name, CreateOptions::default())?;
            // SAFETY: `run` calls this before it opens any file of its own,
            // so fd 3, which `install` replaces if it is open and is not
            // the new memfd, was inherited and has no owner here.
            let passed = unsafe { handover.install() }?;
            let own = passed
                .shared()
                .try_clone_to_owned()
                .map_err(|e| Fail(3, format!("dup of the memfd: {e}")))?;
            let fd = SharedFd::adopt(own, name)?;
            // SAFETY: the memfd was just created here and sealed against
            // shrinking (the default CreateOptions); only the processes
            // this run starts get it, and they write it through shm-state
            // only.
            let source = unsafe { Source::shared(fd) };
            Ok((source, Shared::Memfd(passed)))
        }
    }
}

/// One process of the run (the server or a client).
struct Proc {
    /// `the server` or `client K`, for messages.
    label: String,
    child: Child,
    /// Its stdout, read a line at a time.
    out: BufReader<ChildStdout>,
}

/// The running processes. Dropping it kills (by pid) and reaps every one
/// not reaped yet, so that none outlives an early return.
#[derive(Default)]
struct Procs(Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            // Kill only sends SIGKILL to a child not yet waited for (so
            // never to a reused pid); wait reaps it.
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Starts `rpc ARGS` on the shared state with its stdout piped, stderr
/// inherited, dying with this process.
fn spawn(
    exe: &Path,
    args: &[&str],
    shared: &Shared,
    name: &str,
    stdin: Stdio,
    label: String,
) -> Result<Proc, Fail> {
    let mut cmd = Command::new(exe);
    match shared {
        Shared::Memfd(passed) => {
            cmd.args(["--name", name]);
            passed.configure(&mut cmd, None);
        }
        Shared::File(path) => {
            cmd.arg("--file").arg(path);
            for var in ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"] {
                cmd.env_remove(var);
            }
        }
    }
    cmd.args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = die_with_parent(&mut cmd)
        .spawn()
        .map_err(|e| Fail(3, format!("cannot start {label}: {e}")))?;
    let out = BufReader::new(child.stdout.take().expect("piped"));
    Ok(Proc { label, child, out })
}

/// What happened to a process, for messages.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}

/// Reads one line from a process; `None` at end of file. A process that
/// says nothing until `deadline` fails the run (a hung process is killed
/// rather than waited for forever).
fn read_line(p: &mut Proc, deadline: Instant) -> Result<Option<String>, Fail> {
    // A process writes each line with one write, so a line has arrived
    // whole once its first byte is readable.
    while p.out.buffer().is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail(
                3,
                format!(
                    "{} did not answer in time (hung?); every process was killed",
                    p.label
                ),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: p.out.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd that outlives the call, and the
        // count passed is 1; its fd is the process's stdout pipe, open.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == -1 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Fail(3, format!("poll on {}: {e}", p.label)));
            }
        } else if n == 1 {
            break;
        }
    }
    let mut line = String::new();
    let n = p
        .out
        .read_line(&mut line)
        .map_err(|e| Fail(3, format!("reading from {}: {e}", p.label)))?;
    Ok((n != 0).then(|| line.trim_end().to_owned()))
}

/// The process ended (or said something else) without the line
/// expected: reaps it and says how. Exit 1 (a wrong answer, a refused
/// request) is an inconsistency; anything else a failure of the run.
fn ended(p: &mut Proc, expected: &str) -> Fail {
    let (how, code) = match p.child.wait() {
        Ok(status) => (
            describe(status),
            if status.code() == Some(1) { 1 } else { 3 },
        ),
        Err(e) => (format!("could not be waited for ({e})"), 3),
    };
    Fail(
        code,
        format!(
            "{} {how} before it {expected} (its message, if any, is above)",
            p.label
        ),
    )
}

/// Reads the line a process starts with (`prefix`), or fails.
fn expect_line(p: &mut Proc, prefix: &str, deadline: Instant, what: &str) -> Result<String, Fail> {
    match read_line(p, deadline)? {
        Some(line) if line.starts_with(prefix) => Ok(line),
        Some(line) => Err(Fail(
            3,
            format!("{} said {line:?} instead of {prefix:?}...", p.label),
        )),
        None => Err(ended(p, what)),
    }
}

/// A client's last line, `answered A (R in this run; ...)`: A and R.
fn parse_answered(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("answered ")?;
    let (total, rest) = rest.split_once(" (")?;
    let (this_run, _) = rest.split_once(" in this run")?;
    Some((total.parse().ok()?, this_run.parse().ok()?))
}

/// `rpc run`; returns whether the run is consistent.
pub(crate) fn run(cli: &Cli, args: &RunArgs) -> Result<bool, Fail> {
    let plan = plan(args)?;
    let (source, shared) = create_source(cli.file.as_deref(), &cli.name)?;
    let mut state = SharedState::<Root>::open(source, Layout::new(1))?;
    init_state(&mut state, plan.clients)?;
    // Leave the peer table while the run goes, so that 67 clients fit.
    let source = state.close()?;

    let exe = std::env::current_exe().map_err(|e| {
        Fail(
            3,
            format!("cannot find this program to start it again: {e}"),
        )
    })?;
    let mut server = Procs::default();
    server.0.push(spawn(
        &exe,
        &["serve"],
        &shared,
        &cli.name,
        Stdio::null(),
        "the server".into(),
    )?);
    // An open waits at most 30 s for the other openers.
    let deadline = Instant::now() + Duration::from_secs(60);
    expect_line(&mut server.0[0], "serving ", deadline, "attached its rings")?;

    let (go_read, go_write) =
        std::io::pipe().map_err(|e| Fail(3, format!("cannot create a pipe: {e}")))?;
    let mut clients = Procs::default();
    let secs = plan.seconds.as_secs_f64().to_string();
    for k in 0..plan.clients {
        let go = go_read
            .try_clone()
            .map_err(|e| Fail(3, format!("dup of a pipe: {e}")))?;
        let id = k.to_string();
        clients.0.push(spawn(
            &exe,
            &[
                "client",
                "--id",
                &id,
                "--seconds",
                &secs,
                "--timeout",
                CLIENT_TIMEOUT,
                "--wait-start",
            ],
            &shared,
            &cli.name,
            Stdio::from(go),
            format!("client {k}"),
        )?);
    }
    drop(go_read);
    for c in &mut clients.0 {
        expect_line(c, "ready", deadline, "opened the state")?;
    }
    // Every client waits for the end of its stdin: closing the pipe's only
    // write end starts them all at once.
    drop(go_write);
    let began = Instant::now();

    let deadline = began + plan.seconds + Duration::from_secs(60);
    let mut reported = Vec::with_capacity(clients.0.len());
    for c in &mut clients.0 {
        let line = match read_line(c, deadline)? {
            Some(line) => line,
            None => {
                let mut fail = ended(c, "reported its answers");
                if let Ok(Some(status)) = server.0[0].child.try_wait() {
                    fail.1 += &format!("; the server {}", describe(status));
                }
                return Err(fail);
            }
        };
        let (total, this_run) = parse_answered(&line).ok_or_else(|| {
            Fail(
                3,
                format!("{} reported an unreadable line: {line:?}", c.label),
            )
        })?;
        let status = c
            .child
            .wait()
            .map_err(|e| Fail(3, format!("waiting for {}: {e}", c.label)))?;
        if !status.success() {
            // Exit 1: it got a wrong answer (said above).
            let code = if status.code() == Some(1) { 1 } else { 3 };
            return Err(Fail(
                code,
                format!("{} {} after its report", c.label, describe(status)),
            ));
        }
        reported.push((total, this_run));
    }
    let elapsed = began.elapsed().as_secs_f64();
    drop(clients);

    // The source `close` gave back: this run's own memfd or file.
    let mut state =
        SharedState::<Root>::open(source, Layout::new(1)).map_err(with_damage_code(1))?;
    let (_, slots) = setup(&mut state, 1)?;
    request_stop(&mut state, &slots)?;
    let s = &mut server.0[0];
    let served = expect_line(s, "served ", deadline, "stopped")?;
    let status = s
        .child
        .wait()
        .map_err(|e| Fail(3, format!("waiting for the server: {e}")))?;
    if !status.success() {
        return Err(Fail(
            3,
            format!("the server {} after it stopped", describe(status)),
        ));
    }
    drop(shared);

    let requests: u64 = reported.iter().map(|r| r.1).sum();
    let fewest = reported.iter().map(|r| r.1).min().unwrap_or(0);
    let most = reported.iter().map(|r| r.1).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} clients, {elapsed:.2} s: {requests} requests, {:.0} requests/s",
        plan.clients,
        requests as f64 / elapsed
    )?;
    writeln!(
        out,
        "per client: fewest {fewest}, most {most} answered; server: {served}"
    )?;

    let mut checked = check_state(&mut state)?;
    state.close()?;
    let answered: u64 = reported.iter().map(|r| r.0).sum();
    if answered != checked.answered {
        checked.problems.push(format!(
            "the clients reported {answered} answers, the state counts {}",
            checked.answered
        ));
    }
    match checked.problems.split_first() {
        None => {
            writeln!(
                out,
                "consistent: every request sent was applied once and answered right ({} sent, {} answered, {} in flight); heap and accounts verify",
                checked.sent,
                checked.answered,
                checked.requests + checked.responses
            )?;
            Ok(true)
        }
        Some((first, rest)) => {
            let more = match rest.len() {
                0 => String::new(),
                n => format!(" (and {n} more problems)"),
            };
            eprintln!("rpc: inconsistent: {first}{more}");
            Ok(false)
        }
    }
}
