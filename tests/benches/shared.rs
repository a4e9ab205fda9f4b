//! Many processes, one state (issue 11): shm-state's [`SharedState`]
//! against Redis and SQLite, every ratio measured in the same run.
//!
//! 1. **Reads.** N reader processes (default 1, 2, 4) each get keys of a
//!    `u64 -> u64` map for a fixed time, one `state.read(|v|
//!    v.map(h)?.get(&k))` per get (a lock-free seqlock read returning a
//!    copy); against N client processes each sending Redis `GET` over a
//!    Unix socket (no pipelining: one round trip per get). Reported: gets/s
//!    per process, and gets per CPU-second (the readers' CPU time; for
//!    Redis the clients' and the server's, from `INFO cpu`). Also
//!    `shm-state batch`: 100 gets inside one `state.read` (the cost of a
//!    get once a read is open).
//! 2. **Writes, one process.** One-key insert transactions
//!    (`state.transaction(|tx| tx.map(h)?.insert(&k, &v))`, the writer
//!    lock taken and released each time) against Redis `SET` and against
//!    SQLite in WAL mode with `synchronous=NORMAL`, one `INSERT OR
//!    REPLACE` per transaction (autocommit); the single-process `State` on
//!    its own memfd as a reference. New keys each round for every side.
//! 3. **Death of a writer.** A victim process opens the state, inserts a
//!    key in a transaction and then sleeps (or spins, every other death)
//!    holding the writer lock; a waiter process is blocked on the lock
//!    (the bench waits until its main thread sleeps in `futex`, read from
//!    `/proc/PID/task/PID/syscall`). The bench takes a CLOCK_MONOTONIC
//!    timestamp, sends SIGKILL to the victim by pid, reaps it with
//!    `waitpid` and takes a second timestamp; the waiter, once its
//!    transaction has committed, writes its own CLOCK_MONOTONIC timestamps
//!    (lock taken and rollback done; committed) to the bench through a
//!    pipe (its stdout). Every death is checked: the waiter rolled one
//!    transaction back and does not see the victim's key.
//!
//! All children are this executable run again with `SHARED_BENCH_ROLE` set;
//! they die with the bench (`PR_SET_PDEATHSIG`) and are reaped by it. The
//! state is a memfd the bench places on fd 3 (`LISTEN_FDS`), as a watcher
//! passes it.
//!
//! Run: `scripts/bench-shared`, which starts a redis-server on a Unix
//! socket in a temporary directory and runs `cargo bench -p shm-fd-tests
//! --features redis-bench,sqlite-bench --bench shared`. Without
//! `redis-bench` (or without `SHARED_BENCH_REDIS`) and `sqlite-bench` those
//! comparisons are skipped and the shm-state lines still run. Environment:
//! - `SHARED_BENCH_REDIS`: the redis-server's Unix socket;
//! - `SHARED_BENCH_READERS`: reader counts (default `1,2,4`);
//! - `SHARED_BENCH_SECS`: seconds per read phase (default 2);
//! - `SHARED_BENCH_ROUNDS`: rounds of the read and write parts, alternating
//!   shm-state and the others (default 5; medians reported, and the
//!   median and range of the rounds' ratios);
//! - `SHARED_BENCH_KEYS`: keys in the read map (default 100000);
//! - `SHARED_BENCH_INSERTS`: insert transactions per side and round
//!   (default 50000);
//! - `SHARED_BENCH_DEATHS`: writer deaths (default 200, half sleeping,
//!   half spinning);
//! - `SHARED_BENCH_JOURNAL`: the shared state's journal length (default
//!   shm-state's, 1 MiB; `K`/`M` suffixes are powers of 1024);
//! - `SHARED_BENCH_PARTS`: the parts to run (default `1,2,3`).
//!
//! Without `--bench` (`cargo test --benches`) it runs a few milliseconds of
//! each part.

use std::io::{BufRead, BufReader, Write};
#[cfg(feature = "sqlite-bench")]
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shm_fd::{CreateOptions, Handover, PassedFds, SharedFd};
use shm_fd_tests::bench::{env_or as env, load_average, machine, median, rate, ratio_range};
use shm_fd_tests::die_with_parent;
use shm_state::{Layout, SharedState, Source, State, StateMap};

/// The environment variable that makes this executable a child; its value
/// is the role (`reader`, `waiter`, `victim`).
const ROLE: &str = "SHARED_BENCH_ROLE";
/// The redis-server's Unix socket.
const REDIS_SOCKET: &str = "SHARED_BENCH_REDIS";
/// The key a victim inserts before it dies; its rollback removes it.
const VICTIM_KEY: u64 = u64::MAX - 1;
/// Keys of the insert part start here (apart from the read keys).
const INSERT_BASE: u64 = 1 << 40;

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    /// The map the readers read.
    reads: StateMap<u64, u64>,
    /// The map of the insert part.
    inserts: StateMap<u64, u64>,
    /// The map of the death part.
    deaths: StateMap<u64, u64>,
}

struct Config {
    quick: bool,
    readers: Vec<usize>,
    secs: f64,
    rounds: u64,
    keys: u64,
    inserts: u64,
    deaths: u64,
    /// The parts to run (1, 2, 3).
    parts: Vec<u32>,
}

impl Config {
    fn from_env() -> Config {
        // `cargo test --benches` runs benches without --bench: keep it quick.
        if !std::env::args().any(|a| a == "--bench") {
            return Config {
                quick: true,
                readers: vec![1, 2],
                secs: 0.05,
                rounds: 1,
                keys: 1000,
                inserts: 1000,
                deaths: 4,
                parts: vec![1, 2, 3],
            };
        }
        let readers = std::env::var("SHARED_BENCH_READERS")
            .unwrap_or_else(|_| "1,2,4".into())
            .split(',')
            .map(|n| n.trim().parse().expect("SHARED_BENCH_READERS: counts"))
            .collect();
        Config {
            quick: false,
            readers,
            secs: env("SHARED_BENCH_SECS", 2.0),
            rounds: env("SHARED_BENCH_ROUNDS", 5u64).max(1),
            keys: env("SHARED_BENCH_KEYS", 100_000u64).max(1),
            inserts: env("SHARED_BENCH_INSERTS", 50_000u64).max(1),
            deaths: env("SHARED_BENCH_DEATHS", 200u64).max(1),
            parts: std::env::var("SHARED_BENCH_PARTS")
                .unwrap_or_else(|_| "1,2,3".into())
                .split(',')
                .map(|n| n.trim().parse().expect("SHARED_BENCH_PARTS: 1, 2, 3"))
                .collect(),
        }
    }
}

/// Keys in a scrambled order (a bijection of 0..n).
fn keys(n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24)
        .collect()
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the one timespec it is given, which
    // lives on this stack frame.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes.
fn mono_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC)
}

/// This process's CPU time (all its threads) in nanoseconds.
fn cpu_ns() -> u64 {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

// ---------------------------------------------------------------- Redis

/// A connection to the bench's redis-server.
#[cfg(feature = "redis-bench")]
struct Redis(redis::Connection);

/// Without the `redis-bench` feature there is no connection:
/// [`redis_socket`] refuses, so none is ever made.
#[cfg(not(feature = "redis-bench"))]
struct Redis;

/// The redis-server's socket, or why the Redis lines are skipped.
fn redis_socket() -> Result<String, &'static str> {
    if !cfg!(feature = "redis-bench") {
        return Err("run with `--features redis-bench` (scripts/bench-shared does)");
    }
    std::env::var(REDIS_SOCKET)
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or("set SHARED_BENCH_REDIS to a redis-server's Unix socket (scripts/bench-shared does)")
}

#[cfg(feature = "redis-bench")]
impl Redis {
    fn connect(socket: &str) -> Redis {
        let con = redis::Client::open(format!("unix://{socket}"))
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connecting to redis-server at {socket}: {e}"));
        Redis(con)
    }

    fn get(&mut self, k: u64) -> Option<u64> {
        redis::cmd("GET")
            .arg(k)
            .query(&mut self.0)
            .expect("redis GET")
    }

    fn set(&mut self, k: u64, v: u64) {
        redis::cmd("SET")
            .arg(k)
            .arg(v)
            .exec(&mut self.0)
            .expect("redis SET");
    }

    /// Many SETs in one pipeline (for filling, not timed).
    fn set_all(&mut self, kvs: impl Iterator<Item = (u64, u64)>) {
        let mut p = redis::pipe();
        for (k, v) in kvs {
            p.cmd("SET").arg(k).arg(v).ignore();
        }
        p.exec(&mut self.0).expect("redis SET pipeline");
    }

    fn info(&mut self, section: &str) -> String {
        redis::cmd("INFO")
            .arg(section)
            .query(&mut self.0)
            .expect("redis INFO")
    }

    /// The server's CPU time so far (user + system, all its threads), in
    /// nanoseconds.
    fn server_cpu_ns(&mut self) -> u64 {
        let info = self.info("cpu");
        let field = |name: &str| -> f64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in INFO cpu"))
        };
        ((field("used_cpu_user") + field("used_cpu_sys")) * 1e9) as u64
    }

    fn version(&mut self) -> String {
        let info = self.info("server");
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_owned()
    }
}

#[cfg(not(feature = "redis-bench"))]
impl Redis {
    fn connect(_socket: &str) -> Redis {
        unreachable!("redis_socket() refuses without the redis-bench feature")
    }
    fn get(&mut self, _k: u64) -> Option<u64> {
        unreachable!()
    }
    fn set(&mut self, _k: u64, _v: u64) {
        unreachable!()
    }
    fn set_all(&mut self, _kvs: impl Iterator<Item = (u64, u64)>) {
        unreachable!()
    }
    fn server_cpu_ns(&mut self) -> u64 {
        unreachable!()
    }
    fn version(&mut self) -> String {
        unreachable!()
    }
}

// ------------------------------------------------------------- children

/// A child: this executable in another role, with its stdin and stdout as
/// pipes to the bench. Killed (by pid, if it still runs) and reaped when
/// dropped.
struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    role: String,
}

impl Kid {
    /// Starts `role` with `args`; the memfd on fd 3 is passed to it.
    /// Call it from the main thread (see [`die_with_parent`]).
    fn spawn(passed: &PassedFds, role: &str, args: &[String]) -> Kid {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.env(ROLE, role)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        passed.configure(&mut cmd, None);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawning a child");
        Kid {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            role: role.to_owned(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The child's next line (without the newline).
    fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.stdout.read_line(&mut l).expect("reading a child");
        if n == 0 {
            let pid = self.pid();
            let status = self.child.wait();
            panic!(
                "the {} child (pid {pid}) ended without a word: {status:?}",
                self.role
            );
        }
        l.trim_end().to_owned()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("writing to a child");
        stdin.flush().expect("writing to a child");
    }

    /// Closes its stdin and waits for its successful end.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("waitpid");
        assert!(status.success(), "the {} child: {status}", self.role);
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // Not reaped yet, so the pid is still this child's.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

/// The next line of stdin, `None` at its end.
fn hear() -> Option<String> {
    let mut l = String::new();
    let n = std::io::stdin().read_line(&mut l).expect("stdin");
    (n > 0).then(|| l.trim_end().to_owned())
}

/// `SHARED_BENCH_JOURNAL`: the journal length of the new state, in bytes
/// (default: shm-state's, 1 MiB).
fn journal_len() -> Option<u64> {
    std::env::var("SHARED_BENCH_JOURNAL")
        .ok()
        .map(|v| shm_fd::units::parse_size(&v).expect("SHARED_BENCH_JOURNAL: a size"))
}

fn open_shared(fd: SharedFd) -> (SharedState<Root>, Root) {
    // SAFETY: the bench's own memfd, sealed against shrinking (the
    // default of `CreateOptions`); the bench's processes write it only
    // through shm-state, whose writer lock orders their writes.
    let source = unsafe { Source::shared(fd) };
    let mut layout = Layout::new(1);
    if let Some(len) = journal_len() {
        layout = layout.journal_len(len);
    }
    let mut s = SharedState::<Root>::open(source, layout).expect("opening the shared state");
    let root = s.read(|v| v.root()).expect("root");
    (s, root)
}

/// A child's open of the state on fd 3.
fn open_passed() -> (SharedState<Root>, Root) {
    // SAFETY: called first in the child's role, before it opens any file:
    // fd 3, named by LISTEN_FDS, was inherited from the bench and nothing
    // in this process owns it.
    let fd = unsafe { SharedFd::from_env(shm_fd::DEFAULT_NAME) }.expect("the memfd on fd 3");
    open_shared(fd)
}

fn child(role: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match role {
        "reader" => reader(&args),
        "waiter" => waiter(),
        "victim" => victim(&args),
        _ => panic!("unknown {ROLE}: {role}"),
    }
}

/// What a timed loop did.
struct Timed {
    ops: u64,
    wall_ns: u64,
    cpu_ns: u64,
}

/// Gets per read in the reader mode `shm-batch`.
const BATCH: usize = 100;

/// Runs `op` over `ks` (round and round) for `dur`, `batch` keys per
/// call; counts the keys.
fn timed(ks: &[u64], batch: usize, dur: Duration, mut op: impl FnMut(&[u64])) -> Timed {
    let chunks: Vec<&[u64]> = ks.chunks(batch).collect();
    let (c0, t0) = (cpu_ns(), Instant::now());
    let (mut ops, mut i) = (0, 0);
    loop {
        for _ in 0..16 {
            let c = chunks[i];
            op(c);
            ops += c.len() as u64;
            i += 1;
            if i == chunks.len() {
                i = 0;
            }
        }
        if t0.elapsed() >= dur {
            break;
        }
    }
    Timed {
        ops,
        wall_ns: t0.elapsed().as_nanos() as u64,
        cpu_ns: cpu_ns() - c0,
    }
}

/// `reader MODE KEYS SECS`: says `ready`, waits for `go`, gets keys for
/// SECS seconds and says `OPS WALL_NS CPU_NS RETRIES`. MODE `shm`: one
/// `state.read` per get; `shm-batch`: [`BATCH`] gets in one `state.read`
/// (the cost of a get inside a read); `redis`: one `GET` per round trip.
fn reader(args: &[String]) {
    let mode = args[0].as_str();
    let n: u64 = args[1].parse().expect("keys");
    let dur = Duration::from_secs_f64(args[2].parse().expect("secs"));
    let ks = keys(n);
    let check = |k: u64, v: Option<u64>| {
        assert_eq!(v, Some(k ^ 1), "wrong value read for key {k}");
    };
    let warm = &ks[..ks.len().min(1000)];
    let report = |t: Timed, retries: u64| {
        say(&format!("{} {} {} {retries}", t.ops, t.wall_ns, t.cpu_ns));
    };
    let go = || {
        say("ready");
        assert_eq!(hear().as_deref(), Some("go"));
    };
    match mode {
        "shm" => {
            let (mut s, root) = open_passed();
            let h = root.reads;
            let mut get = |c: &[u64]| {
                for &k in c {
                    let v = s.read(|view| view.map(h)?.get(&k)).expect("read");
                    check(k, v);
                }
            };
            get(warm);
            go();
            let t = timed(&ks, 1, dur, get);
            report(t, s.stats().read_retries);
        }
        "shm-batch" => {
            let (mut s, root) = open_passed();
            let h = root.reads;
            let mut out = Vec::with_capacity(BATCH);
            let mut get = |c: &[u64]| {
                s.read(|view| {
                    let m = view.map(h)?;
                    out.clear();
                    for &k in c {
                        out.push(m.get(&k)?);
                    }
                    Ok::<_, shm_state::Error>(())
                })
                .expect("read");
                for (&k, &v) in c.iter().zip(&out) {
                    check(k, v);
                }
            };
            get(warm);
            go();
            let t = timed(&ks, BATCH, dur, get);
            report(t, s.stats().read_retries);
        }
        "redis" => {
            let mut r = Redis::connect(&redis_socket().expect("redis socket"));
            let mut get = |c: &[u64]| c.iter().for_each(|&k| check(k, r.get(k)));
            get(warm);
            go();
            report(timed(&ks, 1, dur, get), 0);
        }
        _ => panic!("reader mode {mode}"),
    }
}

/// `victim I MODE`: inserts `VICTIM_KEY -> I` in a transaction, says
/// `locked ROBUST`, and sleeps (MODE `sleep`) or spins (`spin`) holding
/// the writer lock until the bench kills it.
fn victim(args: &[String]) {
    let i: u64 = args[0].parse().expect("death number");
    let spin = args[1] == "spin";
    let (mut s, root) = open_passed();
    let robust = s.is_robust();
    let _ = s.transaction(|tx| -> shm_state::Result<()> {
        tx.map(root.deaths)?.insert(&VICTIM_KEY, &i)?;
        say(&format!("locked {robust}"));
        loop {
            if spin {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    });
    unreachable!("a victim's transaction never ends");
}

/// `waiter`: says `ready ROBUST`; then for each `go I`, says `waiting`,
/// runs a transaction (blocked while a victim holds the lock) that checks
/// that the victim's key is gone and inserts `I`, and says `LOCKED_NS
/// COMMITTED_NS RECOVERIES GONE` (CLOCK_MONOTONIC at the start of its
/// closure, i.e. lock taken and the dead writer's transaction rolled back,
/// and after the commit; rollbacks this transaction did; whether the
/// victim's key was absent).
fn waiter() {
    let (mut s, root) = open_passed();
    say(&format!("ready {}", s.is_robust()));
    while let Some(line) = hear() {
        let i: u64 = line
            .strip_prefix("go ")
            .and_then(|i| i.parse().ok())
            .expect("go I");
        say("waiting");
        let before = s.stats().recoveries;
        let mut locked = 0;
        let gone = s
            .transaction(|tx| {
                locked = mono_ns();
                let mut m = tx.map(root.deaths)?;
                let gone = m.get(&VICTIM_KEY)?.is_none();
                m.insert(&i, &i)?;
                Ok::<_, shm_state::Error>(gone)
            })
            .expect("the waiter's transaction");
        let committed = mono_ns();
        let recoveries = s.stats().recoveries - before;
        say(&format!("{locked} {committed} {recoveries} {gone}"));
    }
}

// ---------------------------------------------------------------- bench

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        return child(&role);
    }
    // Before anything else is opened: the state's memfd goes on fd 3, with
    // the LISTEN_* description every child gets.
    let memfd = SharedFd::create("shared-bench", CreateOptions::default()).expect("memfd");
    let handover = Handover::from_entries(
        vec![(shm_fd::DEFAULT_NAME.to_owned(), memfd.into_owned_fd())],
        shm_fd::DEFAULT_NAME,
    )
    .expect("hand-over");
    // SAFETY: first thing in main, when the bench has opened nothing of its
    // own: no object of this process owns fd 3.
    let passed = unsafe { handover.install() }.expect("placing the memfd on fd 3");

    let cfg = Config::from_env();
    println!(
        "shared state benchmarks{}: {}, load average {}",
        if cfg.quick { " (quick mode)" } else { "" },
        machine(),
        load_average()
    );
    let own = SharedFd::adopt(
        passed.shared().try_clone_to_owned().expect("dup"),
        shm_fd::DEFAULT_NAME,
    )
    .and_then(|fd| fd.reopen())
    .expect("reopening the memfd");
    let (mut state, mut root) = open_shared(own);
    if root.reads.is_null() {
        root = state
            .transaction(|tx| {
                let root = Root {
                    reads: tx.new_map()?,
                    inserts: tx.new_map()?,
                    deaths: tx.new_map()?,
                };
                tx.set_root(root)?;
                Ok::<_, shm_state::Error>(root)
            })
            .expect("creating the maps");
    }
    let mut redis = match redis_socket() {
        Ok(socket) => {
            let mut r = Redis::connect(&socket);
            println!("Redis {} on {socket}", r.version());
            Some(r)
        }
        Err(why) => {
            println!("Redis: skipped ({why})");
            None
        }
    };
    if !cfg!(feature = "sqlite-bench") {
        println!("SQLite: skipped (run with `--features sqlite-bench`)");
    }

    if cfg.parts.contains(&1) {
        reads(&cfg, &passed, &mut state, root, redis.as_mut());
    }
    if cfg.parts.contains(&2) {
        inserts(&cfg, &mut state, root, redis.as_mut());
    }
    if cfg.parts.contains(&3) {
        deaths(&cfg, &passed);
    }
    println!("\nload average at the end: {}", load_average());
}

/// One read phase: the sum over its processes.
#[derive(Clone, Copy)]
struct Phase {
    /// Mean over the processes of each one's gets per wall-clock second.
    per_process: f64,
    /// Gets per CPU-second (for Redis: clients' and server's CPU).
    per_cpu: f64,
    /// The sum of the processes' gets per wall-clock second.
    total: f64,
    retries: u64,
}

fn read_phase(
    cfg: &Config,
    passed: &PassedFds,
    mode: &str,
    n: usize,
    mut redis: Option<&mut Redis>,
) -> Phase {
    let args = [mode.to_owned(), cfg.keys.to_string(), cfg.secs.to_string()];
    let mut kids: Vec<Kid> = (0..n)
        .map(|_| Kid::spawn(passed, "reader", &args))
        .collect();
    for k in &mut kids {
        assert_eq!(k.line(), "ready");
    }
    let server0 = redis.as_mut().map(|r| r.server_cpu_ns());
    for k in &mut kids {
        k.send("go");
    }
    let reports: Vec<Vec<u64>> = kids
        .iter_mut()
        .map(|k| {
            k.line()
                .split(' ')
                .map(|x| x.parse().expect("a reader's report"))
                .collect()
        })
        .collect();
    let server = match (server0, redis) {
        (Some(s0), Some(r)) => r.server_cpu_ns() - s0,
        _ => 0,
    };
    for k in kids {
        k.finish();
    }
    let ops: u64 = reports.iter().map(|r| r[0]).sum();
    let cpu: u64 = reports.iter().map(|r| r[2]).sum::<u64>() + server;
    let rates: Vec<f64> = reports
        .iter()
        .map(|r| r[0] as f64 / (r[1] as f64 / 1e9))
        .collect();
    Phase {
        per_process: rates.iter().sum::<f64>() / n as f64,
        per_cpu: ops as f64 / (cpu as f64 / 1e9),
        total: rates.iter().sum(),
        retries: reports.iter().map(|r| r[3]).sum(),
    }
}

/// Part 1: N readers of shm-state against N Redis clients.
fn reads(
    cfg: &Config,
    passed: &PassedFds,
    state: &mut SharedState<Root>,
    root: Root,
    mut redis: Option<&mut Redis>,
) {
    let ks = keys(cfg.keys);
    for chunk in ks.chunks(100) {
        state
            .transaction(|tx| {
                let mut m = tx.map(root.reads)?;
                for &k in chunk {
                    m.insert(&k, &(k ^ 1))?;
                }
                Ok::<_, shm_state::Error>(())
            })
            .expect("filling the read map");
        if let Some(r) = redis.as_mut() {
            r.set_all(chunk.iter().map(|&k| (k, k ^ 1)));
        }
    }
    println!(
        "\n1. map gets from N processes: {} u64 -> u64 keys, {} s per phase, {} round(s), \
         the phases of a round alternating (load average {})",
        cfg.keys,
        cfg.secs,
        cfg.rounds,
        load_average()
    );
    println!(
        "   shm-state: one state.read(|v| v.map(h)?.get(&k)) per get; shm-state batch: {BATCH} \
         gets in one state.read; Redis: one GET per round trip"
    );
    let mut modes = vec![("shm", "shm-state"), ("shm-batch", "shm-state batch")];
    if redis.is_some() {
        modes.push(("redis", "Redis"));
    }
    // [N][mode] -> one phase per round.
    let mut got: Vec<Vec<Vec<Phase>>> = vec![vec![Vec::new(); modes.len()]; cfg.readers.len()];
    for round in 1..=cfg.rounds {
        for (i, &n) in cfg.readers.iter().enumerate() {
            for (m, &(mode, name)) in modes.iter().enumerate() {
                let p = read_phase(
                    cfg,
                    passed,
                    mode,
                    n,
                    redis.as_deref_mut().filter(|_| mode == "redis"),
                );
                println!(
                    "   round {round}, N={n}: {name:<15} {}/s per process ({}/s in all, {} per CPU-s{})",
                    rate(p.per_process),
                    rate(p.total),
                    rate(p.per_cpu),
                    if mode == "redis" {
                        ", clients + server".to_owned()
                    } else {
                        format!(", {} read retries", p.retries)
                    }
                );
                got[i][m].push(p);
            }
        }
    }
    let show = |x: Option<f64>| x.map_or("skipped".to_owned(), rate);
    let med = |v: &Vec<Phase>, f: fn(&Phase) -> f64| -> Option<f64> {
        (!v.is_empty()).then(|| median(v.iter().map(f).collect()))
    };
    println!(
        "\n   {:>2} | {:<15} | {:>14} | {:>14} | {:>16} | {:>14} | {:>16}",
        "N", "", "gets/s/process", "gets/s in all", "vs Redis", "gets per CPU-s", "vs Redis"
    );
    for (i, &n) in cfg.readers.iter().enumerate() {
        let redis_at = modes.iter().position(|&(m, _)| m == "redis");
        for (m, &(_, name)) in modes.iter().enumerate() {
            let ours = &got[i][m];
            // Each round's ratio (the two phases ran minutes apart at
            // most, under the same load), then their median and range.
            let ratio = |f: fn(&Phase) -> f64| -> String {
                let Some(r) = redis_at.filter(|&r| r != m) else {
                    return "-".to_owned();
                };
                let rs: Vec<f64> = ours
                    .iter()
                    .zip(&got[i][r])
                    .map(|(a, b)| f(a) / f(b))
                    .collect();
                ratio_range(&rs)
            };
            println!(
                "   {n:>2} | {name:<15} | {:>14} | {:>14} | {:>16} | {:>14} | {:>16}",
                show(med(ours, |p| p.per_process)),
                show(med(ours, |p| p.total)),
                ratio(|p| p.per_process),
                show(med(ours, |p| p.per_cpu)),
                ratio(|p| p.per_cpu)
            );
        }
    }
    if redis.is_none() {
        println!("   Redis: skipped");
    }
    println!(
        "   (medians over the rounds; ratios: the median of the rounds' ratios, their range \
         in brackets; load average now {})",
        load_average()
    );
}

/// Times `n` operations; the time per operation.
fn per_op(n: u64, f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed() / n as u32
}

/// Part 2: one-key insert transactions from one process.
fn inserts(cfg: &Config, state: &mut SharedState<Root>, root: Root, mut redis: Option<&mut Redis>) {
    let n = cfg.inserts;
    let ks = keys(n);
    // The reference: the single-process State on a memfd of its own.
    let fd = SharedFd::create("shared-bench-exclusive", CreateOptions::default()).expect("memfd");
    // SAFETY: a private memfd of this bench, sealed against shrinking.
    let mut excl =
        State::<Root>::open(unsafe { Source::shared(fd) }, Layout::new(1)).expect("open");
    let excl_map: StateMap<u64, u64> = excl.transaction(|tx| tx.new_map()).expect("map");
    let sqlite = Sqlite::open();
    println!(
        "\n2. one-key insert transactions, one process: {n} new keys per side and round, \
         {} round(s) after a warm-up round, the sides alternating (load average {})",
        cfg.rounds,
        load_average()
    );
    if let Some(s) = &sqlite {
        println!("   SQLite {}", s.describe());
    }
    let (mut shared, mut exclusive, mut red, mut sql) = (vec![], vec![], vec![], vec![]);
    // Round 0 warms every side up (memory, caches, connections) and is
    // not counted.
    for round in 0..=cfg.rounds {
        let base = INSERT_BASE + round * n;
        let h = root.inserts;
        shared.push(per_op(n, || {
            for &k in &ks {
                let k = base + k;
                state
                    .transaction(|tx| tx.map(h)?.insert(&k, &(k ^ 1)))
                    .expect("insert");
            }
        }));
        exclusive.push(per_op(n, || {
            for &k in &ks {
                let k = base + k;
                excl.transaction(|tx| tx.map(excl_map)?.insert(&k, &(k ^ 1)))
                    .expect("insert");
            }
        }));
        if let Some(r) = redis.as_mut() {
            red.push(per_op(n, || {
                for &k in &ks {
                    let k = base + k;
                    r.set(k, k ^ 1);
                }
            }));
        }
        if let Some(s) = &sqlite {
            sql.push(per_op(n, || s.insert_each(ks.iter().map(|&k| base + k))));
        }
        let last = |v: &Vec<Duration>| {
            v.last()
                .map_or("skipped".to_owned(), |d| format!("{d:.2?}"))
        };
        println!(
            "   round {round}{}: shm-state shared {}, exclusive {}, Redis SET {}, SQLite {}",
            if round == 0 { " (warm-up)" } else { "" },
            last(&shared),
            last(&exclusive),
            last(&red),
            last(&sql)
        );
        if round == 0 {
            for v in [&mut shared, &mut exclusive, &mut red, &mut sql] {
                v.clear();
            }
        }
    }
    let med = |v: &[Duration]| -> Option<Duration> {
        (!v.is_empty()).then(|| {
            let mut v = v.to_vec();
            v.sort();
            v[v.len() / 2]
        })
    };
    let rows = [
        ("shm-state SharedState, one insert per transaction", &shared),
        ("shm-state State (single process, reference)", &exclusive),
        ("Redis SET (one round trip each)", &red),
        (
            "SQLite INSERT OR REPLACE, autocommit (WAL, synchronous=NORMAL)",
            &sql,
        ),
    ];
    println!(
        "\n   {:<64} | {:>10} | {:>22}",
        "operation (median per op)", "per op", "its time / SharedState"
    );
    for (name, times) in rows {
        match med(times) {
            Some(d) => {
                // Each round's ratio, then their median and range.
                let rs: Vec<f64> = times
                    .iter()
                    .zip(&shared)
                    .map(|(t, s)| t.as_secs_f64() / s.as_secs_f64())
                    .collect();
                println!(
                    "   {name:<64} | {:>10} | {:>22}",
                    format!("{d:.2?}"),
                    ratio_range(&rs)
                )
            }
            None => println!("   {name:<64} | {:>10} | {:>22}", "skipped", "-"),
        }
    }
    println!(
        "   (ratios: the median of the rounds' ratios, their range in brackets; \
         load average now {})",
        load_average()
    );
}

/// The SQLite side of the insert part: a database in a temporary directory
/// under the target directory (on disk), WAL, `synchronous=NORMAL`.
#[cfg(feature = "sqlite-bench")]
struct Sqlite {
    db: rusqlite::Connection,
    _dir: tempfile::TempDir,
}

#[cfg(not(feature = "sqlite-bench"))]
enum Sqlite {}

#[cfg(feature = "sqlite-bench")]
fn target_dir() -> PathBuf {
    // The bench runs from target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors().nth(3).expect("target dir").to_path_buf()
}

#[cfg(feature = "sqlite-bench")]
impl Sqlite {
    fn open() -> Option<Sqlite> {
        let dir = tempfile::tempdir_in(target_dir()).expect("temporary directory");
        let db = rusqlite::Connection::open(dir.path().join("bench.db")).expect("sqlite open");
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE kv (k INTEGER PRIMARY KEY, v INTEGER NOT NULL);",
        )
        .expect("sqlite setup");
        Some(Sqlite { db, _dir: dir })
    }

    fn describe(&self) -> String {
        let mode: String = self
            .db
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal_mode");
        let sync: i64 = self
            .db
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("synchronous");
        format!(
            "{} (bundled): journal_mode={mode}, synchronous={sync} (1 = NORMAL), database in {}",
            rusqlite::version(),
            self._dir.path().display()
        )
    }

    /// One INSERT OR REPLACE per key, each its own transaction.
    fn insert_each(&self, ks: impl Iterator<Item = u64>) {
        let mut stmt = self
            .db
            .prepare_cached("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)")
            .expect("prepare");
        for k in ks {
            stmt.execute([k as i64, (k ^ 1) as i64]).expect("insert");
        }
    }
}

#[cfg(not(feature = "sqlite-bench"))]
impl Sqlite {
    fn open() -> Option<Sqlite> {
        None
    }
    fn describe(&self) -> String {
        match *self {}
    }
    fn insert_each(&self, _ks: impl Iterator<Item = u64>) {
        match *self {}
    }
}

/// Waits until the main thread of `pid` sleeps in `futex` (the writer
/// lock: the only futex a waiter's main thread waits on after `waiting`).
fn wait_blocked(pid: i32) {
    let path = format!("/proc/{pid}/task/{pid}/syscall");
    let futex = libc::SYS_futex.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let blocked = match std::fs::read_to_string(&path) {
            Ok(s) => s.split(' ').next() == Some(futex.as_str()),
            // No access to the syscall file: a sleeping thread will do.
            Err(_) => std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('S')))
                .unwrap_or(false),
        };
        if blocked {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the waiter (pid {pid}) never blocked on the writer lock"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// `[min, p50, p99, max]` of `v`, in microseconds.
fn spread(v: &[i64]) -> String {
    let mut v = v.to_vec();
    v.sort();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let us = |ns: i64| format!("{:.1}", ns as f64 / 1e3);
    format!(
        "{:>8} | {:>8} | {:>8} | {:>8}",
        us(v[0]),
        us(at(0.5)),
        us(at(0.99)),
        us(v[v.len() - 1])
    )
}

/// Part 3: from a writer's death to the next writer's commit.
fn deaths(cfg: &Config, passed: &PassedFds) {
    println!(
        "\n3. a writer killed (SIGKILL) holding the writer lock, another blocked on it: {} deaths \
         (load average {})",
        cfg.deaths,
        load_average()
    );
    let mut waiter = Kid::spawn(passed, "waiter", &[]);
    let ready = waiter.line();
    let mut robust = vec![format!("waiter {ready}")];
    // Per mode (sleeping, spinning victim): [kill -> locked, kill ->
    // committed, reaped -> committed, kill -> reaped] in ns.
    let mut times: [[Vec<i64>; 4]; 2] = Default::default();
    let mut commit_before_reaped = 0;
    for d in 0..cfg.deaths {
        let spin = d % 2 == 1;
        let mode = if spin { "spin" } else { "sleep" };
        let mut victim = Kid::spawn(passed, "victim", &[d.to_string(), mode.to_owned()]);
        let locked = victim.line();
        if d < 2 {
            robust.push(format!("victim ({mode}) {locked}"));
        }
        waiter.send(&format!("go {d}"));
        assert_eq!(waiter.line(), "waiting");
        wait_blocked(waiter.pid());
        let t_kill = mono_ns();
        kill(Pid::from_raw(victim.pid()), Signal::SIGKILL).expect("kill");
        let status = victim.child.wait().expect("waitpid");
        let t_reaped = mono_ns();
        assert!(!status.success(), "the victim was killed");
        let report: Vec<String> = waiter.line().split(' ').map(str::to_owned).collect();
        let (t_locked, t_commit): (u64, u64) = (
            report[0].parse().expect("ns"),
            report[1].parse().expect("ns"),
        );
        assert_eq!(
            report[2], "1",
            "death {d}: the waiter rolled back {} transactions, not 1",
            report[2]
        );
        assert_eq!(
            report[3], "true",
            "death {d}: the dead victim's insert was visible to the next writer"
        );
        let m = usize::from(spin);
        times[m][0].push(t_locked as i64 - t_kill as i64);
        times[m][1].push(t_commit as i64 - t_kill as i64);
        times[m][2].push(t_commit as i64 - t_reaped as i64);
        times[m][3].push(t_reaped as i64 - t_kill as i64);
        if t_commit < t_reaped {
            commit_before_reaped += 1;
        }
    }
    waiter.finish();
    println!("   robust futexes: {}", robust.join("; "));
    println!(
        "   journal: {}",
        journal_len().map_or("shm-state's default (1 MiB)".to_owned(), |l| format!(
            "{l} bytes"
        ))
    );
    println!(
        "   CLOCK_MONOTONIC: the bench's before kill(2) and after waitpid(2); the waiter's \
         at the start of its transaction's closure and after its commit, sent through a pipe"
    );
    println!(
        "\n   {:<58} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8}",
        "interval (µs)", "runs", "min", "p50", "p99", "max"
    );
    let all: [Vec<i64>; 4] =
        std::array::from_fn(|i| times[0][i].iter().chain(&times[1][i]).copied().collect());
    for (label, set) in [
        ("sleeping victim", &times[0]),
        ("spinning victim", &times[1]),
        ("all", &all),
    ] {
        if set[0].is_empty() {
            continue;
        }
        for (what, v) in [
            ("kill -> waiter has lock, rolled back", &set[0]),
            ("kill -> waiter committed", &set[1]),
            ("reaped -> waiter committed", &set[2]),
            ("kill -> victim reaped (waitpid returned)", &set[3]),
        ] {
            println!(
                "   {:<58} | {:>5} | {}",
                format!("{label}: {what}"),
                v.len(),
                spread(v)
            );
        }
    }
    println!(
        "   (negative: the waiter committed before waitpid returned in the bench; \
         {commit_before_reaped} of {} deaths; load average now {})",
        cfg.deaths,
        load_average()
    );
}
