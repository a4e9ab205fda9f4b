//! `clients`: many client processes share one hash map in a shm-state
//! [`SharedState`] and hammer it with gets and inserts; `clients run`
//! prints the operations per second and then checks that the map holds
//! exactly what the clients committed.
//!
//! Modelled on an inter-process hash map benchmark in which 64 client
//! processes send their gets and inserts to a server over shared-memory
//! ring buffers. Here there is no server: every client maps the same memfd
//! (or file), inserts under shm-state's cross-process writer lock, one
//! transaction per insert, and gets without any lock (a seqlock read of
//! copies, run again when a commit raced it).
//!
//! What the check relies on: client `i` owns the keys `(i << 32) | n` for
//! `n < K` and is their only writer; every value carries its key, the
//! number of the insert that wrote it, and a checksum of both. A get of
//! anyone's key must return nothing or a well-formed value (a torn read
//! fails the run), and a get of one of the client's own keys exactly its
//! last insert of it. Each client reports how many of its keys it wrote
//! and a digest of their last values; at the end the map must match every
//! report.

mod worker;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use clap::{Args, Parser, Subcommand, ValueEnum};
use shm_fd::process::die_with_parent;
use shm_fd::{CreateOptions, Handover, SharedFd};
use shm_state::{Layout, SharedState, Source, State, StateMap};

const AFTER_HELP: &str = "\
`clients run` creates a fresh state (in a new memfd, or in --file), starts
the clients, lets them run for --seconds, then prints one line
  N clients, S s: T operations (G gets, I inserts), R ops/s
and the result of the final check: the heap and the map verify, and
every client's keys hold the values of its last inserts.

At most 68 clients: a shared state's peer table holds 68 processes (the
parent leaves it while the clients run). The clients die with the parent.

Exit codes:
  0  the run is consistent
  1  inconsistent: a client read a torn or wrong value, or the map does not
     hold what the clients committed (the message says what)
  2  bad command line
  3  the state cannot be used: the memfd or file cannot be created or
     opened, --file already holds data, the state is full or damaged at
     the start, a client cannot start or dies, or a system error";

/// The most processes that can share one state: the size of shm-state's
/// peer table (`Error::PeersFull`).
const MAX_CLIENTS: u32 = shm_state::MAX_PEERS as u32;

/// The name the memfd is passed to the clients under (`LISTEN_FDNAMES`).
const MEMFD_NAME: &str = shm_fd::DEFAULT_NAME;

#[derive(Parser, Debug)]
#[command(version, about = "Many processes hammer one shared hash map; ops/s and a consistency check", after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Start the clients, count their operations, check the map.
    Run(RunArgs),
    /// One client; `run` starts these (the memfd is passed as shm-fd
    /// passes it, on LISTEN_FDS).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

/// The options of `clients run`.
#[derive(Args, Debug)]
struct RunArgs {
    /// Number of client processes (1 to 64).
    #[arg(long, value_name = "N", default_value_t = MAX_CLIENTS)]
    clients: u32,
    /// How long the clients run, in seconds (fractions allowed).
    #[arg(
        long,
        value_name = "S",
        default_value_t = 3.0,
        allow_negative_numbers = true
    )]
    seconds: f64,
    /// Keys each client owns and inserts (gets go to anyone's).
    #[arg(long, value_name = "K", default_value_t = 1000)]
    keys: u32,
    /// The fraction of operations that are gets; the rest are inserts.
    #[arg(
        long,
        value_name = "R",
        default_value_t = 0.9,
        allow_negative_numbers = true
    )]
    get_ratio: f64,
    /// Keep the state in this file (new, or empty) instead of a new memfd.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Tests the checks: client 0 damages one of its keys (`stale`,
    /// `lose`: after its last operation, so that only the final check can
    /// catch it; `torn`: before its first, for the clients' gets).
    #[arg(long, value_name = "HOW", hide = true)]
    corrupt: Option<Corrupt>,
}

/// How `--corrupt` makes client 0 damage its own keys (without reporting
/// it).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Corrupt {
    /// Put back an older, well-formed value of one of its keys: a lost
    /// update, which only the digest of its last values shows.
    Stale,
    /// Remove one of its keys: the count of its keys shows it.
    Lose,
    /// Store a value whose checksum is wrong, as a torn read would look,
    /// before its first operation, and leave that key alone: the clients'
    /// gets catch it.
    Torn,
}

/// The root, version 1: the map and the shape of the run.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    /// Every client's keys.
    map: StateMap<u64, Value>,
    /// Number of clients in the run.
    clients: u64,
    /// Keys each client owns.
    keys: u64,
}

/// A value: its key, the number of the insert (of the key's client) that
/// wrote it, and a checksum of both, so that a value read torn, or under
/// another key, shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Value {
    key: u64,
    seq: u64,
    check: u64,
}

impl Value {
    fn new(key: u64, seq: u64) -> Value {
        Value {
            key,
            seq,
            check: mix(key, seq),
        }
    }

    /// True when the value is one some client could have written for `key`.
    fn well_formed_for(&self, key: u64) -> bool {
        self.key == key && self.seq != 0 && self.check == mix(key, self.seq)
    }
}

/// Key `n` of client `slot`.
fn key_of(slot: u64, n: u64) -> u64 {
    (slot << 32) | n
}

/// The checksum of a key and an insert number (a 64-bit finalizer, so
/// every bit of both moves every bit of the result).
fn mix(key: u64, seq: u64) -> u64 {
    fn fmix(mut x: u64) -> u64 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
    fmix(key ^ fmix(seq ^ 0x9e37_79b9_7f4a_7c15))
}

/// What a client reports when it ends (one line on its stdout).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Report {
    gets: u64,
    hits: u64,
    inserts: u64,
    /// Its keys it inserted at least once.
    keys: u64,
    /// The wrapping sum of `mix(key, seq)` over those keys' last inserts.
    digest: u64,
    retries: u64,
    locked: u64,
    recoveries: u64,
}

impl Report {
    const FIELDS: [&'static str; 8] = [
        "gets",
        "hits",
        "inserts",
        "keys",
        "digest",
        "retries",
        "locked",
        "recoveries",
    ];

    fn values(&self) -> [u64; 8] {
        [
            self.gets,
            self.hits,
            self.inserts,
            self.keys,
            self.digest,
            self.retries,
            self.locked,
            self.recoveries,
        ]
    }

    /// The line a client prints: `done gets=G hits=H ...`.
    fn line(&self) -> String {
        let mut s = String::from("done");
        for (name, v) in Self::FIELDS.iter().zip(self.values()) {
            s.push_str(&format!(" {name}={v}"));
        }
        s
    }

    /// Parses [`Report::line`]'s output.
    fn parse(line: &str) -> Option<Report> {
        let mut words = line.split_whitespace();
        if words.next()? != "done" {
            return None;
        }
        let mut v = [0u64; 8];
        for (name, slot) in Self::FIELDS.iter().zip(v.iter_mut()) {
            let (n, value) = words.next()?.split_once('=')?;
            if n != *name {
                return None;
            }
            *slot = value.parse().ok()?;
        }
        if words.next().is_some() {
            return None;
        }
        let [
            gets,
            hits,
            inserts,
            keys,
            digest,
            retries,
            locked,
            recoveries,
        ] = v;
        Some(Report {
            gets,
            hits,
            inserts,
            keys,
            digest,
            retries,
            locked,
            recoveries,
        })
    }
}

/// A failure with its exit code.
struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(3, e.to_string())
    }
}

/// Maps a shm-state error to a failure: exit `code` if the state is
/// damaged (corrupt or truncated), 3 otherwise.
fn with_damage_code(code: u8) -> impl Fn(shm_state::Error) -> Fail {
    move |e| match e {
        shm_state::Error::Corrupted(_) | shm_state::Error::Truncated { .. } => {
            Fail(code, e.to_string())
        }
        e => Fail(3, e.to_string()),
    }
}

/// The options of `run`, checked.
struct Plan {
    clients: u32,
    seconds: Duration,
    keys: u32,
    get_ratio: f64,
}

fn plan(args: &RunArgs) -> Result<Plan, Fail> {
    if !(1..=MAX_CLIENTS).contains(&args.clients) {
        return Err(Fail(
            2,
            format!(
                "--clients {}: give 1 to {MAX_CLIENTS} (a shared state's peer table holds {MAX_CLIENTS} processes)",
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
    if args.keys == 0 {
        return Err(Fail(
            2,
            "--keys 0: every client needs at least one key".into(),
        ));
    }
    if !(0.0..=1.0).contains(&args.get_ratio) {
        return Err(Fail(
            2,
            format!(
                "--get-ratio {}: give a fraction from 0 to 1",
                args.get_ratio
            ),
        ));
    }
    Ok(Plan {
        clients: args.clients,
        seconds,
        keys: args.keys,
        get_ratio: args.get_ratio,
    })
}

/// Where the clients find the state.
enum Shared {
    /// The memfd, on fd 3 without close-on-exec (`LISTEN_FDS`).
    Memfd(shm_fd::PassedFds),
    /// The file, opened by path.
    File(PathBuf),
}

/// Creates the state's backing: a new memfd (also put on fd 3 for the
/// clients), or the file at `path`, which must be new or empty.
fn create_source(file: Option<&Path>) -> Result<(Source, Shared), Fail> {
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
            // the clients this run starts open it, all through shm-state
            // (whose writer lock orders their writes), and nothing
            // truncates it.
            let source = unsafe { Source::file(f) };
            Ok((source, Shared::File(path.to_path_buf())))
        }
        None => {
            let handover =
                Handover::reuse_or_create(Vec::new(), MEMFD_NAME, CreateOptions::default())?;
            // SAFETY: `run` calls this before it opens any file of its own,
            // so fd 3, which `install` replaces if it is open and is not
            // the new memfd, was inherited and has no owner here.
            let passed = unsafe { handover.install() }?;
            let own = passed
                .shared()
                .try_clone_to_owned()
                .map_err(|e| Fail(3, format!("dup of the memfd: {e}")))?;
            let fd = SharedFd::adopt(own, MEMFD_NAME)?;
            // SAFETY: the memfd was just created here and sealed against
            // shrinking (the default CreateOptions); only the clients this
            // run starts get it, and they write it through shm-state only.
            let source = unsafe { Source::shared(fd) };
            Ok((source, Shared::Memfd(passed)))
        }
    }
}

/// One running client.
struct Client {
    slot: u32,
    child: Child,
    out: BufReader<ChildStdout>,
}

/// The running clients. Dropping it kills (by pid) and reaps every one
/// not reaped yet, so that none outlives an early return.
struct Clients(Vec<Client>);

impl Drop for Clients {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // Kill only sends SIGKILL to a child not yet waited for (so
            // never to a reused pid); wait reaps it.
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}

/// What happened to a client, for messages.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}

/// Reads one line from a client; `None` at end of file. A client that
/// says nothing until `deadline` fails the run (a hung client is killed
/// rather than waited for forever).
fn read_line(c: &mut Client, deadline: Instant) -> Result<Option<String>, Fail> {
    // A client writes each line with one write, so a line has arrived
    // whole once its first byte is readable.
    while c.out.buffer().is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail(
                3,
                format!(
                    "client {} did not answer in time (hung?); every client was killed",
                    c.slot
                ),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: c.out.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd that outlives the call, and the
        // count passed is 1; its fd is the client's stdout pipe, open.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == -1 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Fail(3, format!("poll on client {}: {e}", c.slot)));
            }
        } else if n == 1 {
            break;
        }
    }
    let mut line = String::new();
    let n = c
        .out
        .read_line(&mut line)
        .map_err(|e| Fail(3, format!("reading from client {}: {e}", c.slot)))?;
    Ok((n != 0).then(|| line.trim_end().to_owned()))
}

/// The client ended without the line expected: reaps it and says how.
fn ended(c: &mut Client, expected: &str) -> Fail {
    let (how, code) = match c.child.wait() {
        // A client exits 1 when it read a torn or wrong value.
        Ok(status) => (
            describe(status),
            if status.code() == Some(1) { 1 } else { 3 },
        ),
        Err(e) => (format!("could not be waited for ({e})"), 3),
    };
    Fail(
        code,
        format!(
            "client {} {how} before it {expected} (its message, if any, is above)",
            c.slot
        ),
    )
}

/// Starts the clients and waits until every one has opened the state.
fn start(plan: &Plan, shared: &Shared, corrupt: Option<Corrupt>) -> Result<Clients, Fail> {
    let exe = std::env::current_exe()
        .map_err(|e| Fail(3, format!("cannot find this program to start clients: {e}")))?;
    let (go_read, go_write) =
        std::io::pipe().map_err(|e| Fail(3, format!("cannot create a pipe: {e}")))?;
    let mut clients = Clients(Vec::new());
    for slot in 0..plan.clients {
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .args(["--slot", &slot.to_string()])
            .args(["--seconds", &plan.seconds.as_secs_f64().to_string()])
            .args(["--get-ratio", &plan.get_ratio.to_string()]);
        if let (0, Some(how)) = (slot, corrupt) {
            let how = how.to_possible_value().expect("not skipped");
            cmd.args(["--corrupt", how.get_name()]);
        }
        match shared {
            Shared::Memfd(passed) => passed.configure(&mut cmd, None),
            Shared::File(path) => {
                cmd.arg("--file").arg(path);
                for var in ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"] {
                    cmd.env_remove(var);
                }
            }
        }
        let go = go_read
            .try_clone()
            .map_err(|e| Fail(3, format!("dup of a pipe: {e}")))?;
        cmd.stdin(go)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = die_with_parent(&mut cmd)
            .spawn()
            .map_err(|e| Fail(3, format!("cannot start client {slot}: {e}")))?;
        let out = BufReader::new(child.stdout.take().expect("piped"));
        clients.0.push(Client { slot, child, out });
    }
    drop(go_read);
    // An open waits at most 30 s for the other openers.
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in &mut clients.0 {
        match read_line(c, deadline)? {
            Some(line) if line == "ready" => {}
            Some(line) => {
                return Err(Fail(
                    3,
                    format!("client {} said {line:?} instead of \"ready\"", c.slot),
                ));
            }
            None => return Err(ended(c, "opened the state")),
        }
    }
    // Every client waits for the end of its stdin: closing the pipe's only
    // write end starts them all at once.
    drop(go_write);
    Ok(clients)
}

/// Waits for every client's report; a client that ends without one fails
/// the run.
fn collect(clients: &mut Clients, seconds: Duration) -> Result<Vec<Report>, Fail> {
    let deadline = Instant::now() + seconds + Duration::from_secs(60);
    let mut reports = Vec::with_capacity(clients.0.len());
    for c in &mut clients.0 {
        let line = match read_line(c, deadline)? {
            Some(line) => line,
            None => return Err(ended(c, "reported its operations")),
        };
        let report = Report::parse(&line).ok_or_else(|| {
            Fail(
                3,
                format!("client {} reported an unreadable line: {line:?}", c.slot),
            )
        })?;
        let status = c
            .child
            .wait()
            .map_err(|e| Fail(3, format!("waiting for client {}: {e}", c.slot)))?;
        if !status.success() {
            return Err(Fail(
                3,
                format!("client {} {} after its report", c.slot, describe(status)),
            ));
        }
        reports.push(report);
    }
    Ok(reports)
}

/// What the final check found.
struct Checked {
    /// Every problem, one line each.
    problems: Vec<String>,
    /// Entries in the map.
    entries: u64,
}

/// The final check, under the writer lock: the heap and the map verify,
/// every entry is a well-formed value of a key some client owns, and each
/// client's keys are as many, and hold the same last values, as it
/// reported.
fn check(state: &State<Root>, reports: &[Report]) -> Result<Checked, shm_state::Error> {
    let mut problems = Vec::new();
    if let Err(e) = state.verify() {
        problems.push(format!("heap: {e}"));
    }
    let root = *state.root()?;
    let map = state.map(root.map)?;
    if let Err(e) = map.verify() {
        problems.push(format!("map: {e}"));
    }
    let mut found = vec![(0u64, 0u64); reports.len()];
    for entry in map.iter() {
        let (&key, value) = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("map entry: {e}"));
                break;
            }
        };
        let (slot, n) = (key >> 32, key & 0xFFFF_FFFF);
        let Some(report) = reports.get(slot as usize) else {
            problems.push(format!(
                "key {key:#x} belongs to client {slot}, and there are {} clients",
                reports.len()
            ));
            continue;
        };
        if n >= root.keys {
            problems.push(format!(
                "client {slot}'s key #{n} is in the map, and clients own {} keys",
                root.keys
            ));
        }
        if !value.well_formed_for(key) {
            problems.push(format!(
                "client {slot}'s key #{n} holds a value no client wrote: {value:?}"
            ));
            continue;
        }
        if value.seq > report.inserts {
            problems.push(format!(
                "client {slot}'s key #{n} holds insert #{}, and the client committed {} inserts",
                value.seq, report.inserts
            ));
        }
        let f = &mut found[slot as usize];
        f.0 += 1;
        f.1 = f.1.wrapping_add(mix(key, value.seq));
    }
    for (slot, (report, (keys, digest))) in reports.iter().zip(found).enumerate() {
        if keys != report.keys {
            problems.push(format!(
                "client {slot}: {keys} of its keys are in the map, but it inserted {} different keys",
                report.keys
            ));
        } else if digest != report.digest {
            problems.push(format!(
                "client {slot}: its {keys} keys do not all hold the values of its last inserts \
                 (digest {digest:#018x}, it reported {:#018x})",
                report.digest
            ));
        }
    }
    Ok(Checked {
        problems,
        entries: map.len(),
    })
}

/// `clients run`; returns whether the run is consistent.
fn run(args: &RunArgs) -> Result<bool, Fail> {
    let plan = plan(args)?;
    let (source, shared) = create_source(args.file.as_deref())?;
    let mut state = SharedState::<Root>::open(source, Layout::new(1))?;
    state.transaction(|tx| {
        let map = tx.new_map()?;
        tx.set_root(Root {
            map,
            clients: u64::from(plan.clients),
            keys: u64::from(plan.keys),
        })
    })?;
    // Leave the peer table while the clients run, so that all 64 fit.
    let source = state.close()?;

    let mut clients = start(&plan, &shared, args.corrupt)?;
    let began = Instant::now();
    let reports = collect(&mut clients, plan.seconds)?;
    let elapsed = began.elapsed().as_secs_f64();
    drop(clients);
    drop(shared);

    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let (gets, inserts) = (sum(|r| r.gets), sum(|r| r.inserts));
    let ops = gets + inserts;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} clients, {elapsed:.2} s: {ops} operations ({gets} gets, {inserts} inserts), {:.0} ops/s",
        plan.clients,
        ops as f64 / elapsed
    )?;
    writeln!(
        out,
        "gets found a value {} times; reads ran again {} times, {} under the writer lock; {} recoveries",
        sum(|r| r.hits),
        sum(|r| r.retries),
        sum(|r| r.locked),
        sum(|r| r.recoveries)
    )?;

    // The source `close` gave back: this run's own memfd or file.
    let mut state =
        SharedState::<Root>::open(source, Layout::new(1)).map_err(with_damage_code(1))?;
    let checked = state
        .with_lock(|s| check(s, &reports))
        .map_err(with_damage_code(1))?;
    state.close()?;
    match checked.problems.split_first() {
        None => {
            writeln!(
                out,
                "consistent: heap and map verify; the map's {} keys hold every client's last inserts",
                checked.entries
            )?;
            Ok(true)
        }
        Some((first, rest)) => {
            let more = match rest.len() {
                0 => String::new(),
                n => format!(" (and {n} more problems)"),
            };
            eprintln!("clients: inconsistent: {first}{more}");
            Ok(false)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Action::Run(args) => run(args),
        Action::Worker(args) => worker::main(args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Fail(code, msg)) => {
            let who = match &cli.command {
                Action::Worker(args) => format!("clients: client {}", args.slot),
                Action::Run(_) => "clients".into(),
            };
            eprintln!("{who}: {msg}");
            ExitCode::from(code)
        }
    }
}
