//! Rings between processes (issue 12, part 4): shm-state's ring of frames
//! (`tx.ring(h)?.push`, `tx.ring(h)?.pop`, each inside a transaction of a
//! [`SharedState`]) against a pipe and a Unix socket pair, every ratio
//! measured in the same run. Two processes, the bench and one child.
//!
//! 1. **Round trip of a 64-byte message.** A (the bench) pushes a frame
//!    into ring 1 in one transaction; B (a child) pops it and pushes it
//!    into ring 2 (in one transaction by default: the exactly-once
//!    forward; `2 tx`: a pop transaction, then a push transaction); A pops
//!    it (one transaction). Each side waits as a consumer would: it polls
//!    `state.read(|v| v.ring(h))` (the commit word taken first), for a
//!    spin of S µs (`RINGS_BENCH_SPIN_US`, each value a variant; 0: no
//!    spin), then sleeps in `state.wait_for_commit_after(word, 100 ms)`
//!    and looks again. Baselines: a pipe pair (A writes 64 B into B's
//!    stdin, B reads them and writes them to its stdout, A reads them), a
//!    `socketpair(AF_UNIX, SOCK_STREAM)` and a `SOCK_SEQPACKET` one (B's
//!    stdin and stdout are its end), all blocking. Reported: the mean time
//!    per round trip (and p50, p99 of single round trips), the pipe's time
//!    over it, the sleeps per round trip on each side, the CPU time of
//!    both sides per round trip (the child's from `wait4`, its whole life)
//!    and their involuntary context switches. The `timed` ring variants
//!    also read the clock around each transaction on both sides (which
//!    costs time of its own): where a round trip goes. References: in one
//!    process alone, one push transaction, one pop transaction and one
//!    poll; and the floor, one cache line handed back and forth between
//!    two spinning threads.
//! 2. **Throughput** at 64-byte and 4 KiB frames: A produces for a fixed
//!    time, B consumes, then A pushes an empty frame (the end) and B
//!    reports the frames it got and when it got the end. Ring: one frame
//!    per transaction on both sides (B polls only when the pop's
//!    transaction saw the ring empty: `RingMut::len` after the pop); the
//!    producer, finding the ring full, waits the same way for room.
//!    **Batched**: up to `RINGS_BENCH_BATCH` frames per transaction on
//!    both sides (as many as fit, as many as there are). Pipe: one
//!    `write` of one message, one `read_exact` of one message; "pipe
//!    batched": `RINGS_BENCH_BATCH` messages per `write`, reads of up to
//!    64 KiB. Every frame carries its sequence number in its first and
//!    last 8 bytes and the consumer checks both (and the length).
//!
//! The rings hold `RINGS_BENCH_RING_BYTES` data bytes (default 64 KiB,
//! a pipe's default buffer), frames of up to 4 KiB. All children are this
//! executable run again with `RINGS_BENCH_ROLE` set; they die with the
//! bench (`PR_SET_PDEATHSIG`) and are reaped by it (killed by pid first if
//! they still run). The state is a memfd the bench places on fd 3
//! (`LISTEN_FDS`), as a watcher passes it.
//!
//! Run: `cargo bench -p shm-fd-tests --bench rings`. Environment:
//! - `RINGS_BENCH_SECS`: seconds per phase (default 1);
//! - `RINGS_BENCH_ROUNDS`: rounds, the modes of a round alternating
//!   (default 5; medians reported, and the median and range of the
//!   rounds' ratios);
//! - `RINGS_BENCH_SPIN_US`: the spins of the round-trip variants, in µs
//!   (default `0,20`);
//! - `RINGS_BENCH_TPUT_SPIN_US`: the spin of both sides in part 2
//!   (default 20);
//! - `RINGS_BENCH_BATCH`: frames per transaction (messages per write) in
//!   the batched variants (default 64);
//! - `RINGS_BENCH_RING_BYTES`: the rings' data bytes (default 65536);
//! - `RINGS_BENCH_PARTS`: the parts to run (default `1,2`).
//!
//! Without `--bench` (`cargo test --benches`) it runs a few milliseconds of
//! each mode.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use shm_fd::{CreateOptions, Handover, PassedFds, SharedFd};
use shm_fd_tests::bench::{env_or as env, load_average, machine, median, ns, rate, ratio_range};
use shm_fd_tests::die_with_parent;
use shm_state::{Layout, SharedState, Source, StateRing, View};

/// The environment variable that makes this executable a child; its value
/// is the role (`rt-ring`, `echo`, `ring-sink`, `pipe-sink`).
const ROLE: &str = "RINGS_BENCH_ROLE";
/// The round trip's message, and the small frames of part 2.
const SMALL: usize = 64;
/// The large frames of part 2 (and the rings' largest frame).
const LARGE: usize = 4096;
/// A wait that sees nothing for this long is a hang: the bench stops,
/// saying what it waited for.
const HANG: Duration = Duration::from_secs(10);
/// The timeout of one sleep in `wait_for_commit_after` (a commit wakes it
/// sooner).
const NAP: Duration = Duration::from_millis(100);
/// Round trips before the timed ones, per phase.
const WARM: u64 = 1000;

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    /// Ring 1: A (the bench) to B (the child).
    there: StateRing,
    /// Ring 2: B to A (round trips only).
    back: StateRing,
}

struct Config {
    quick: bool,
    secs: f64,
    rounds: u64,
    /// The spins (µs) of the round-trip variants.
    spins: Vec<u64>,
    /// The spin (µs) of part 2.
    tput_spin: u64,
    batch: usize,
    ring_bytes: u64,
    parts: Vec<u32>,
}

impl Config {
    fn from_env() -> Config {
        let list = |var: &str, default: &str| -> Vec<u64> {
            std::env::var(var)
                .unwrap_or_else(|_| default.into())
                .split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{var}: numbers"))
                })
                .collect()
        };
        // `cargo test --benches` runs benches without --bench: keep it quick.
        if !std::env::args().any(|a| a == "--bench") {
            return Config {
                quick: true,
                secs: 0.02,
                rounds: 1,
                spins: vec![0, 20],
                tput_spin: 20,
                batch: 64,
                ring_bytes: 65536,
                parts: vec![1, 2],
            };
        }
        Config {
            quick: false,
            secs: env("RINGS_BENCH_SECS", 1.0),
            rounds: env("RINGS_BENCH_ROUNDS", 5u64).max(1),
            spins: list("RINGS_BENCH_SPIN_US", "0,20"),
            tput_spin: env("RINGS_BENCH_TPUT_SPIN_US", 20u64),
            batch: env("RINGS_BENCH_BATCH", 64usize).max(1),
            ring_bytes: env("RINGS_BENCH_RING_BYTES", 65536u64),
            parts: list("RINGS_BENCH_PARTS", "1,2")
                .into_iter()
                .map(|p| p as u32)
                .collect(),
        }
    }

    fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }

    fn warm(&self) -> u64 {
        if self.quick { 50 } else { WARM }
    }
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

/// What a process used: CPU time (user + system) and involuntary context
/// switches (the times another task took its core).
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    cpu_ns: u64,
    preempted: u64,
}

impl Usage {
    fn of(ru: &libc::rusage) -> Usage {
        let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
        Usage {
            cpu_ns: ns(ru.ru_utime) + ns(ru.ru_stime),
            preempted: ru.ru_nivcsw as u64,
        }
    }

    /// This process so far.
    fn own() -> Usage {
        // SAFETY: rusage is a struct of integers (and timevals of
        // integers): all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes the one struct it is given, which lives
        // on this stack frame.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        assert_eq!(rc, 0, "getrusage");
        Usage::of(&ru)
    }

    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns - before.cpu_ns,
            preempted: self.preempted - before.preempted,
        }
    }
}

// --------------------------------------------------------------- frames

/// Writes `seq` into the first and the last 8 bytes of `msg`.
fn stamp(msg: &mut [u8], seq: u64) {
    let n = msg.len();
    msg[..8].copy_from_slice(&seq.to_le_bytes());
    msg[n - 8..].copy_from_slice(&seq.to_le_bytes());
}

/// Checks a received frame: `len` bytes stamped with `seq`.
fn check(frame: &[u8], len: usize, seq: u64, what: &str) {
    assert_eq!(
        frame.len(),
        len,
        "{what}: frame {seq} has {} bytes, not {len}",
        frame.len()
    );
    let first = u64::from_le_bytes(frame[..8].try_into().expect("8"));
    let last = u64::from_le_bytes(frame[len - 8..].try_into().expect("8"));
    assert!(
        first == seq && last == seq,
        "{what}: wrong frame: expected number {seq}, got {first} (first bytes) and {last} (last bytes)"
    );
}

// ------------------------------------------------------------- children

/// A child: this executable in another role. Killed (by pid, if it still
/// runs) and reaped when dropped.
struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
    role: String,
    /// Reaped by [`Kid::finish`] (`wait4`): its pid is no longer its.
    reaped: bool,
}

impl Kid {
    /// Starts `role` with `args`, its stdin and stdout pipes to the bench;
    /// the memfd on fd 3 is passed to it. Call it from the main thread
    /// (see [`die_with_parent`]).
    fn spawn(passed: &PassedFds, role: &str, args: &[String]) -> Kid {
        Kid::spawn_with(passed, role, args, Stdio::piped(), Stdio::piped())
    }

    fn spawn_with(
        passed: &PassedFds,
        role: &str,
        args: &[String],
        stdin: Stdio,
        stdout: Stdio,
    ) -> Kid {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.env(ROLE, role).args(args).stdin(stdin).stdout(stdout);
        passed.configure(&mut cmd, None);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawning a child");
        Kid {
            stdin: child.stdin.take(),
            stdout: child.stdout.take().map(BufReader::new),
            child,
            role: role.to_owned(),
            reaped: false,
        }
    }

    /// The child's next line (without the newline).
    fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self
            .stdout
            .as_mut()
            .expect("stdout piped")
            .read_line(&mut l)
            .expect("reading a child");
        if n == 0 {
            let pid = self.child.id();
            let status = self.child.wait();
            panic!(
                "the {} child (pid {pid}) ended without a word: {status:?}",
                self.role
            );
        }
        l.trim_end().to_owned()
    }

    /// The numbers of the child's next line.
    fn numbers(&mut self) -> Vec<u64> {
        self.line()
            .split(' ')
            .map(|x| x.parse().expect("a child's report"))
            .collect()
    }

    /// Closes its stdin and waits for its successful end (`wait4`); what
    /// it used in its life (start-up included: a few milliseconds).
    fn finish(mut self) -> Usage {
        drop(self.stdin.take());
        let pid = self.child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: as in `Usage::own`.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wait4 on our own child's pid (not reaped yet: only
            // this function reaps, once) writes the status and the rusage
            // it is given, both on this stack frame.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            if r == pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), ErrorKind::Interrupted, "wait4({pid}): {e}");
        }
        self.reaped = true;
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the {} child (pid {pid}) ended badly: wait status {status:#x}",
            self.role
        );
        Usage::of(&ru)
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.reaped {
            return;
        }
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

/// This process's stdin, unbuffered (a duplicate of fd 0).
fn raw_stdin() -> File {
    File::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup stdin"),
    )
}

/// This process's stdout, unbuffered (a duplicate of fd 1).
fn raw_stdout() -> File {
    File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup stdout"),
    )
}

// --------------------------------------------------------------- rings

fn open_shared(fd: SharedFd) -> (SharedState<Root>, Root) {
    // SAFETY: the bench's own memfd, sealed against shrinking (the
    // default of `CreateOptions`); the bench's processes write it only
    // through shm-state, whose writer lock orders their writes.
    let source = unsafe { Source::shared(fd) };
    let mut s =
        SharedState::<Root>::open(source, Layout::new(1)).expect("opening the shared state");
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

/// How one side waited.
#[derive(Debug, Default, Clone, Copy)]
struct Waits {
    /// Waits whose first look found the condition false.
    waits: u64,
    /// Looks (reads) that found it false.
    polls: u64,
    /// Calls of `wait_for_commit_after`.
    sleeps: u64,
}

impl Waits {
    fn words(&self) -> String {
        format!("{} {} {}", self.waits, self.polls, self.sleeps)
    }

    fn parse(v: &[u64]) -> Waits {
        Waits {
            waits: v[0],
            polls: v[1],
            sleeps: v[2],
        }
    }
}

/// One process's side of the rings.
struct Side {
    state: SharedState<Root>,
    root: Root,
    spin: Duration,
    w: Waits,
}

impl Side {
    fn new((state, root): (SharedState<Root>, Root), spin_us: u64) -> Side {
        Side {
            state,
            root,
            spin: Duration::from_micros(spin_us),
            w: Waits::default(),
        }
    }

    /// Waits until `ready` holds, as a consumer would: takes the commit
    /// word, reads (`state.read`, lock-free); while the condition is false
    /// it reads again for `spin`, then sleeps until another process
    /// commits (`wait_for_commit_after` the word taken before the read,
    /// so no commit is missed) and reads again.
    fn wait(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&View<'_, Root>) -> shm_state::Result<bool>,
    ) {
        let mut since: Option<Instant> = None;
        loop {
            let word = self.state.commit_word();
            if self.state.read(&mut ready).expect("read") {
                return;
            }
            self.w.polls += 1;
            let t0 = *since.get_or_insert_with(|| {
                self.w.waits += 1;
                Instant::now()
            });
            let waited = t0.elapsed();
            if waited < self.spin {
                std::hint::spin_loop();
                continue;
            }
            assert!(
                waited < HANG,
                "hang: pid {} waited {waited:.1?} for {what} (commit word {word:#x})",
                std::process::id()
            );
            self.state
                .wait_for_commit_after(word, NAP)
                .expect("wait_for_commit_after");
            self.w.sleeps += 1;
        }
    }

    /// Pushes `frame` into ring 1 in one transaction, waiting for room
    /// while the ring is full.
    fn push_there(&mut self, frame: &[u8]) {
        let h = self.root.there;
        let need = 8 + (frame.len() as u64).next_multiple_of(8);
        let mut want = need;
        while !self
            .state
            .transaction(|tx| tx.ring(h)?.push(frame))
            .expect("push")
        {
            // A frame that does not fit before the end of the data takes
            // the rest of it too (a wrap marker): after a wait for `need`
            // bytes that was not enough, wait for twice as many.
            self.wait("room in ring 1", |v| Ok(v.ring(h)?.free_bytes() >= want));
            want = 2 * need;
        }
    }
}

// ------------------------------------------------------- part 1: children

/// `rt-ring SPIN_US TXS TIMED`: B of the ring round trip. Says `ready`;
/// then forwards frames from ring 1 to ring 2 (TXS `1`: pop and push in
/// one transaction; `2`: a pop transaction, then a push transaction) until
/// an empty frame, and says `FORWARDED TX_NS WAITS POLLS SLEEPS`
/// (TX_NS, TIMED `true` only: the time in its transactions, from before
/// the first to after the last of a frame).
fn rt_ring(args: &[String]) {
    let spin: u64 = args[0].parse().expect("spin");
    let two = args[1] == "2";
    let timed = args[2] == "true";
    let mut side = Side::new(open_passed(), spin);
    let Root { there, back } = side.root;
    say("ready");
    let (mut n, mut tx_ns) = (0u64, 0u64);
    loop {
        side.wait("a frame in ring 1", |v| Ok(!v.ring(there)?.is_empty()));
        let t = timed.then(Instant::now);
        let end = if two {
            let f = side
                .state
                .transaction(|tx| tx.ring(there)?.pop())
                .expect("pop")
                .expect("a frame in ring 1: a read saw one, and only B pops");
            if f.is_empty() {
                true
            } else {
                let pushed = side
                    .state
                    .transaction(|tx| tx.ring(back)?.push(&f))
                    .expect("push");
                assert!(pushed, "ring 2 had no room for frame {n}");
                false
            }
        } else {
            side.state
                .transaction(|tx| {
                    let f = tx
                        .ring(there)?
                        .pop()?
                        .expect("a frame in ring 1: a read saw one, and only B pops");
                    if f.is_empty() {
                        return Ok(true);
                    }
                    let pushed = tx.ring(back)?.push(&f)?;
                    assert!(pushed, "ring 2 had no room for frame {n}");
                    Ok::<_, shm_state::Error>(false)
                })
                .expect("forward")
        };
        if end {
            break;
        }
        tx_ns += t.map_or(0, |t| t.elapsed().as_nanos() as u64);
        n += 1;
    }
    say(&format!("{n} {tx_ns} {}", side.w.words()));
}

/// `echo`: B of the pipe and socket round trips: reads 64 bytes from its
/// stdin and writes them to its stdout, until the end of its stdin.
fn echo() {
    let (mut input, mut output) = (raw_stdin(), raw_stdout());
    let mut buf = [0u8; SMALL];
    loop {
        match input.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return,
            Err(e) => panic!("echo: reading: {e}"),
        }
        output.write_all(&buf).expect("echo: writing");
    }
}

// ------------------------------------------------------ part 2: children

/// `ring-sink SIZE SPIN_US BATCH`: the consumer of ring 1. Says `ready`;
/// pops up to BATCH frames per transaction, checking each, until an empty
/// frame; says `FRAMES END_NS WAITS POLLS SLEEPS` (END_NS:
/// CLOCK_MONOTONIC when it popped the empty frame).
fn ring_sink(args: &[String]) {
    let size: usize = args[0].parse().expect("size");
    let spin: u64 = args[1].parse().expect("spin");
    let batch: usize = args[2].parse().expect("batch");
    let mut side = Side::new(open_passed(), spin);
    let there = side.root.there;
    say("ready");
    let (mut seq, mut left) = (0u64, 0u64);
    let mut frames: Vec<Vec<u8>> = Vec::with_capacity(batch);
    loop {
        if left == 0 {
            side.wait("a frame in ring 1", |v| Ok(!v.ring(there)?.is_empty()));
        }
        frames.clear();
        left = side
            .state
            .transaction(|tx| {
                let mut r = tx.ring(there)?;
                while frames.len() < batch {
                    let Some(f) = r.pop()? else { break };
                    let end = f.is_empty();
                    frames.push(f);
                    if end {
                        break;
                    }
                }
                r.len()
            })
            .expect("pop");
        assert!(
            !frames.is_empty(),
            "ring 1: a pop found no frame after a read (or the pop before) saw some"
        );
        for f in &frames {
            if f.is_empty() {
                let end = mono_ns();
                say(&format!("{seq} {end} {}", side.w.words()));
                return;
            }
            check(f, size, seq, "ring 1");
            seq += 1;
        }
    }
}

/// `pipe-sink SIZE BATCH`: reads messages of SIZE bytes from its stdin
/// (BATCH 1: one `read_exact` per message; else reads of up to 64 KiB),
/// checking each, until its end; says `MESSAGES END_NS 0 0 0`.
fn pipe_sink(args: &[String]) {
    let size: usize = args[0].parse().expect("size");
    let batch: usize = args[1].parse().expect("batch");
    let mut input = raw_stdin();
    say("ready");
    let mut seq = 0u64;
    if batch == 1 {
        let mut buf = vec![0u8; size];
        loop {
            match input.read_exact(&mut buf) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("pipe-sink: reading: {e}"),
            }
            check(&buf, size, seq, "pipe");
            seq += 1;
        }
    } else {
        let mut buf = vec![0u8; 65536 + size];
        let mut fill = 0;
        loop {
            let n = input.read(&mut buf[fill..]).expect("pipe-sink: reading");
            if n == 0 {
                assert_eq!(fill, 0, "the pipe ended inside a message");
                break;
            }
            fill += n;
            let whole = fill / size * size;
            for m in buf[..whole].chunks_exact(size) {
                check(m, size, seq, "pipe");
                seq += 1;
            }
            buf.copy_within(whole..fill, 0);
            fill -= whole;
        }
    }
    let end = mono_ns();
    say(&format!("{seq} {end} 0 0 0"));
}

fn child(role: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match role {
        "rt-ring" => rt_ring(&args),
        "echo" => echo(),
        "ring-sink" => ring_sink(&args),
        "pipe-sink" => pipe_sink(&args),
        _ => panic!("unknown {ROLE}: {role}"),
    }
}

// ---------------------------------------------------- part 1: the bench

/// A round-trip mode.
#[derive(Clone, Copy, PartialEq)]
enum Rt {
    /// Ring: the spin (µs) of both sides, B's transactions (1 or 2), and
    /// whether both sides read the clock around their transactions (the
    /// decomposition; those reads cost time of their own, so the other
    /// modes do not).
    Ring(u64, u32, bool),
    Pipe,
    Socket(SockType),
}

impl Rt {
    fn name(self) -> String {
        match self {
            Rt::Ring(spin, txs, false) => format!("ring, spin {spin} µs, B {txs} tx"),
            Rt::Ring(spin, txs, true) => format!("ring, spin {spin} µs, B {txs} tx, timed"),
            Rt::Pipe => "pipe pair".into(),
            Rt::Socket(SockType::Stream) => "socketpair SOCK_STREAM".into(),
            Rt::Socket(_) => "socketpair SOCK_SEQPACKET".into(),
        }
    }
}

/// One phase of round trips.
struct RtPhase {
    /// Mean per round trip, ns.
    mean: f64,
    p50: f64,
    p99: f64,
    trips: u64,
    /// A's and B's CPU time per round trip, ns (B's: its whole life).
    cpu: f64,
    /// A's and B's involuntary context switches.
    preempted: (u64, u64),
    /// A's and B's waits (ring modes).
    a: Waits,
    b: Waits,
    /// Ring modes, per round trip (ns): A's push transaction, B's
    /// transaction(s), A's pop transaction.
    txs: [f64; 3],
}

/// Runs `one(seq)` for `cfg.warm()` round trips, then for the phase's
/// time; the time of each timed one (ns).
fn time_trips(cfg: &Config, mut one: impl FnMut(u64)) -> (Vec<u32>, u64) {
    let warm = cfg.warm();
    for seq in 0..warm {
        one(seq);
    }
    let dur = cfg.dur();
    let mut samples = Vec::with_capacity(1 << 20);
    let t0 = Instant::now();
    let mut prev = t0;
    let mut seq = warm;
    loop {
        one(seq);
        seq += 1;
        let now = Instant::now();
        samples.push((now - prev).as_nanos().min(u32::MAX as u128) as u32);
        prev = now;
        if now - t0 >= dur {
            break;
        }
    }
    (samples, seq)
}

fn rt_phase(cfg: &Config, passed: &PassedFds, side: &mut Side, mode: Rt) -> RtPhase {
    let u0 = Usage::own();
    let mut txs = [0.0; 3];
    let (samples, trips, b_use, b) = match mode {
        Rt::Ring(spin, b_txs, timed) => {
            side.spin = Duration::from_micros(spin);
            side.w = Waits::default();
            let args = [spin.to_string(), b_txs.to_string(), timed.to_string()];
            let mut kid = Kid::spawn(passed, "rt-ring", &args);
            assert_eq!(kid.line(), "ready");
            let Root { there, back } = side.root;
            let mut msg = [0u8; SMALL];
            let (mut push_ns, mut pop_ns) = (0u64, 0u64);
            let (samples, trips) = time_trips(cfg, |seq| {
                stamp(&mut msg, seq);
                let t = timed.then(Instant::now);
                let pushed = side
                    .state
                    .transaction(|tx| tx.ring(there)?.push(&msg))
                    .expect("push");
                push_ns += t.map_or(0, |t| t.elapsed().as_nanos() as u64);
                assert!(pushed, "round trip {seq}: ring 1 had no room for 64 bytes");
                side.wait("a frame in ring 2", |v| Ok(!v.ring(back)?.is_empty()));
                let t = timed.then(Instant::now);
                let got = side
                    .state
                    .transaction(|tx| tx.ring(back)?.pop())
                    .expect("pop")
                    .expect("a frame in ring 2: a read saw one, and only A pops");
                pop_ns += t.map_or(0, |t| t.elapsed().as_nanos() as u64);
                check(&got, SMALL, seq, "ring 2");
            });
            side.push_there(&[]);
            let r = kid.numbers();
            let used = kid.finish();
            assert_eq!(r[0], trips, "B forwarded {} frames, A sent {trips}", r[0]);
            let per = |x: u64| x as f64 / trips as f64;
            txs = [per(push_ns), per(r[1]), per(pop_ns)];
            (samples, trips, used, Waits::parse(&r[2..]))
        }
        Rt::Pipe => {
            let mut kid = Kid::spawn(passed, "echo", &[]);
            let mut to = kid.stdin.take().expect("piped");
            let mut from = kid.stdout.take().expect("piped").into_inner();
            let mut msg = [0u8; SMALL];
            let mut buf = [0u8; SMALL];
            let (samples, trips) = time_trips(cfg, |seq| {
                stamp(&mut msg, seq);
                to.write_all(&msg).expect("pipe write");
                from.read_exact(&mut buf).expect("pipe read");
                check(&buf, SMALL, seq, "pipe");
            });
            drop(to);
            (samples, trips, kid.finish(), Waits::default())
        }
        Rt::Socket(ty) => {
            let (ours, theirs): (OwnedFd, OwnedFd) =
                socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC)
                    .expect("socketpair");
            let dup = theirs.try_clone().expect("dup");
            let kid = Kid::spawn_with(passed, "echo", &[], Stdio::from(theirs), Stdio::from(dup));
            let mut sock = File::from(ours);
            let mut msg = [0u8; SMALL];
            let mut buf = [0u8; SMALL];
            let (samples, trips) = time_trips(cfg, |seq| {
                stamp(&mut msg, seq);
                sock.write_all(&msg).expect("socket write");
                sock.read_exact(&mut buf).expect("socket read");
                check(&buf, SMALL, seq, "socket");
            });
            drop(sock);
            (samples, trips, kid.finish(), Waits::default())
        }
    };
    let a_use = Usage::own().since(u0);
    let mut s = samples;
    let mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64;
    s.sort_unstable();
    let at = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1] as f64;
    // The CPU times cover the warm-up too: divide by every round trip.
    RtPhase {
        mean,
        p50: at(0.5),
        p99: at(0.99),
        trips,
        cpu: (a_use.cpu_ns + b_use.cpu_ns) as f64 / trips as f64,
        preempted: (a_use.preempted, b_use.preempted),
        a: side.w,
        b,
        txs,
    }
}

/// The cost of one push transaction, one pop transaction and one poll
/// (a `state.read` of a ring's view) in this process alone, nothing else
/// running: `[push, pop, poll]` in ns.
fn reference(cfg: &Config, side: &mut Side, size: usize) -> [f64; 3] {
    let h = side.root.there;
    let n: u64 = if cfg.quick { 200 } else { 20_000 };
    // Frames that fit the ring at once (at most 256, to stay in one lap
    // most of the time).
    let per = (cfg.ring_bytes / (8 + size as u64).next_multiple_of(8)).clamp(1, 256);
    let mut msg = vec![0u8; size];
    let (mut push, mut pop) = (Duration::ZERO, Duration::ZERO);
    let mut done = 0;
    while done < n {
        let t = Instant::now();
        for i in 0..per {
            stamp(&mut msg, i);
            let pushed = side
                .state
                .transaction(|tx| tx.ring(h)?.push(&msg))
                .expect("push");
            assert!(pushed, "the reference ring is full");
        }
        push += t.elapsed();
        let t = Instant::now();
        for i in 0..per {
            let f = side
                .state
                .transaction(|tx| tx.ring(h)?.pop())
                .expect("pop")
                .expect("a frame");
            check(&f, size, i, "reference ring");
        }
        pop += t.elapsed();
        done += per;
    }
    let t = Instant::now();
    for _ in 0..n {
        let empty = side
            .state
            .read(|v| Ok::<_, shm_state::Error>(v.ring(h)?.is_empty()))
            .expect("read");
        assert!(empty);
    }
    let poll = t.elapsed();
    let ns = |d: Duration, k: u64| d.as_nanos() as f64 / k as f64;
    [ns(push, done), ns(pop, done), ns(poll, n)]
}

/// The floor of any round trip through shared memory on this machine: two
/// threads hand one cache line back and forth (each spins until the
/// atomic holds its turn, then stores the other's; it yields its core
/// after 10 000 spins, for a loaded machine); ns per round trip.
fn line_round_trip(cfg: &Config) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let n: u64 = if cfg.quick { 10_000 } else { 2_000_000 };
    let turn = AtomicU64::new(0);
    let until = |v: u64| {
        let mut spins = 0u32;
        while turn.load(Ordering::Acquire) != v {
            spins += 1;
            if spins < 10_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    };
    let t = std::thread::scope(|sc| {
        sc.spawn(|| {
            for i in 0..n {
                until(2 * i + 1);
                turn.store(2 * i + 2, Ordering::Release);
            }
        });
        let t = Instant::now();
        for i in 0..n {
            turn.store(2 * i + 1, Ordering::Release);
            until(2 * i + 2);
        }
        t.elapsed()
    });
    t.as_nanos() as f64 / n as f64
}

/// The cost of one `Instant::now()`, ns.
fn clock_read() -> f64 {
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(Instant::now());
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn round_trips(cfg: &Config, passed: &PassedFds, side: &mut Side) {
    let mut modes: Vec<Rt> = cfg.spins.iter().map(|&s| Rt::Ring(s, 1, false)).collect();
    if let Some(&s) = cfg.spins.iter().max() {
        modes.push(Rt::Ring(s, 2, false));
    }
    // The decomposition, with clocks read around the transactions.
    for &s in &cfg.spins {
        modes.push(Rt::Ring(s, 1, true));
    }
    modes.extend([
        Rt::Pipe,
        Rt::Socket(SockType::Stream),
        Rt::Socket(SockType::SeqPacket),
    ]);
    println!(
        "\n1. round trip of a 64-byte message, A (the bench) -> B (a child) -> A: {} s per \
         phase after {} round trips of warm-up, {} round(s), the modes of a round alternating \
         (load average {})",
        cfg.secs,
        cfg.warm(),
        cfg.rounds,
        load_average()
    );
    println!(
        "   ring: A pushes into ring 1 (1 tx); B pops it and pushes it into ring 2 (1 tx, or \
         2 tx: pop, then push); A pops it (1 tx). Waiting: polls of state.read(|v| \
         v.ring(h)) for the spin, then wait_for_commit_after(the word read before the poll, \
         100 ms), again. Pipe / sockets: blocking write and read_exact of 64 bytes."
    );
    let r64 = reference(cfg, side, SMALL);
    println!(
        "   reference, one process alone, 64-byte frame: push transaction {:.0} ns, pop \
         transaction {:.0} ns, one poll (state.read of the ring's view) {:.0} ns; one clock \
         read (Instant::now, taken once per round trip in every mode) {:.0} ns",
        r64[0],
        r64[1],
        r64[2],
        clock_read()
    );
    println!(
        "   reference, the floor: one cache line handed back and forth between two threads \
         (an atomic, both spinning): {} per round trip",
        ns(line_round_trip(cfg))
    );
    let mut got: Vec<Vec<RtPhase>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 1..=cfg.rounds {
        for (m, &mode) in modes.iter().enumerate() {
            let p = rt_phase(cfg, passed, side, mode);
            let waits = match mode {
                Rt::Ring(_, _, timed) => format!(
                    ", sleeps per round trip A {:.3} B {:.3}{}",
                    p.a.sleeps as f64 / p.trips as f64,
                    p.b.sleeps as f64 / p.trips as f64,
                    if timed {
                        format!(
                            "; in transactions per round trip: A push {}, B {}, A pop {}",
                            ns(p.txs[0]),
                            ns(p.txs[1]),
                            ns(p.txs[2]),
                        )
                    } else {
                        String::new()
                    }
                ),
                _ => String::new(),
            };
            println!(
                "   round {round}: {:<32} {:>9} per round trip (p50 {}, p99 {}), {} round trips, \
                 CPU {} per round trip (A + B), preempted A {} B {}{waits}",
                mode.name(),
                ns(p.mean),
                ns(p.p50),
                ns(p.p99),
                p.trips,
                ns(p.cpu),
                p.preempted.0,
                p.preempted.1,
            );
            got[m].push(p);
        }
    }
    let pipe = modes.iter().position(|&m| m == Rt::Pipe).expect("pipe");
    println!(
        "\n   {:<32} | {:>10} | {:>9} | {:>9} | {:>18} | {:>12} | {:>13} | {:>13} | {:>13}",
        "mode (medians over the rounds)",
        "round trip",
        "p50",
        "p99",
        "pipe's time / it",
        "CPU per trip",
        "A sleeps/trip",
        "B sleeps/trip",
        "preempted A,B"
    );
    for (m, &mode) in modes.iter().enumerate() {
        let ps = &got[m];
        let med = |f: fn(&RtPhase) -> f64| median(ps.iter().map(f).collect());
        let ratios: Vec<f64> = ps
            .iter()
            .zip(&got[pipe])
            .map(|(a, p)| p.mean / a.mean)
            .collect();
        let ring = matches!(mode, Rt::Ring(..));
        let per = |f: fn(&RtPhase) -> f64| {
            if ring {
                format!("{:.3}", med(f))
            } else {
                "-".into()
            }
        };
        println!(
            "   {:<32} | {:>10} | {:>9} | {:>9} | {:>18} | {:>12} | {:>13} | {:>13} | {:>13}",
            mode.name(),
            ns(med(|p| p.mean)),
            ns(med(|p| p.p50)),
            ns(med(|p| p.p99)),
            ratio_range(&ratios),
            ns(med(|p| p.cpu)),
            per(|p| p.a.sleeps as f64 / p.trips as f64),
            per(|p| p.b.sleeps as f64 / p.trips as f64),
            format!(
                "{:.0}, {:.0}",
                med(|p| p.preempted.0 as f64),
                med(|p| p.preempted.1 as f64)
            ),
        );
    }
    println!(
        "   (ratios: the median of the rounds' ratios, their range in brackets; goal: the \
         pipe's time / the ring's >= 10x; load average now {})",
        load_average()
    );
    println!(
        "\n   where a ring round trip goes (medians over the rounds; clocks read around each \
         transaction, on both sides):\n   {:<32} | {:>10} | {:>12} | {:>14} | {:>12} | {:>26}",
        "mode", "round trip", "A push tx", "B's tx(s)", "A pop tx", "rest: the two hand-overs"
    );
    for (m, &mode) in modes.iter().enumerate() {
        if !matches!(mode, Rt::Ring(_, _, true)) {
            continue;
        }
        let ps = &got[m];
        let med = |f: &dyn Fn(&RtPhase) -> f64| median(ps.iter().map(f).collect());
        println!(
            "   {:<32} | {:>10} | {:>12} | {:>14} | {:>12} | {:>26}",
            mode.name(),
            ns(med(&|p| p.mean)),
            ns(med(&|p| p.txs[0])),
            ns(med(&|p| p.txs[1])),
            ns(med(&|p| p.txs[2])),
            ns(med(&|p| p.mean - p.txs.iter().sum::<f64>())),
        );
    }
}

// ---------------------------------------------------- part 2: the bench

#[derive(Clone, Copy, PartialEq)]
enum Tp {
    /// Ring, frames per transaction.
    Ring(usize),
    /// Pipe, messages per write.
    Pipe(usize),
}

impl Tp {
    fn name(self) -> String {
        match self {
            Tp::Ring(1) => "ring, 1 frame per tx".into(),
            Tp::Ring(b) => format!("ring BATCHED, <= {b} frames per tx"),
            Tp::Pipe(1) => "pipe, 1 message per write".into(),
            Tp::Pipe(b) => format!("pipe batched, {b} messages per write"),
        }
    }
}

/// One throughput phase.
struct TpPhase {
    msgs: u64,
    /// From the first push (write) to the consumer's end, ns.
    ns: u64,
    /// Producer's and consumer's CPU time, ns (the consumer's: its whole
    /// life).
    cpu: (u64, u64),
    /// Producer's and consumer's involuntary context switches.
    preempted: (u64, u64),
    producer: Waits,
    consumer: Waits,
}

impl TpPhase {
    fn rate(&self) -> f64 {
        self.msgs as f64 / (self.ns as f64 / 1e9)
    }
}

fn tp_phase(cfg: &Config, passed: &PassedFds, side: &mut Side, size: usize, mode: Tp) -> TpPhase {
    let dur = cfg.dur();
    let mut msg = vec![0u8; size];
    let (mut kid, batch) = match mode {
        Tp::Ring(b) => (
            Kid::spawn(
                passed,
                "ring-sink",
                &[size.to_string(), cfg.tput_spin.to_string(), b.to_string()],
            ),
            b,
        ),
        Tp::Pipe(b) => (
            Kid::spawn(passed, "pipe-sink", &[size.to_string(), b.to_string()]),
            b,
        ),
    };
    assert_eq!(kid.line(), "ready");
    side.spin = Duration::from_micros(cfg.tput_spin);
    side.w = Waits::default();
    let h = side.root.there;
    let need = 8 + (size as u64).next_multiple_of(8);
    let (m0, u0, t0) = (mono_ns(), Usage::own(), Instant::now());
    let mut seq = 0u64;
    match mode {
        Tp::Ring(_) => {
            let mut short = false;
            loop {
                for _ in 0..16 {
                    let pushed = side
                        .state
                        .transaction(|tx| {
                            let mut r = tx.ring(h)?;
                            let mut k = 0;
                            while k < batch {
                                stamp(&mut msg, seq + k as u64);
                                if !r.push(&msg)? {
                                    break;
                                }
                                k += 1;
                            }
                            Ok::<_, shm_state::Error>(k)
                        })
                        .expect("push");
                    seq += pushed as u64;
                    if pushed == 0 {
                        // See `Side::push_there`.
                        let want = if short { 2 * need } else { need };
                        side.wait("room in ring 1", |v| Ok(v.ring(h)?.free_bytes() >= want));
                        short = true;
                    } else {
                        short = false;
                    }
                }
                if t0.elapsed() >= dur {
                    break;
                }
            }
            side.push_there(&[]);
        }
        Tp::Pipe(_) => {
            let mut to = kid.stdin.take().expect("piped");
            let mut buf = vec![0u8; size * batch];
            loop {
                for _ in 0..16 {
                    for m in buf.chunks_exact_mut(size) {
                        stamp(m, seq);
                        seq += 1;
                    }
                    to.write_all(&buf).expect("pipe write");
                }
                if t0.elapsed() >= dur {
                    break;
                }
            }
            drop(to);
        }
    }
    let producer = Usage::own().since(u0);
    let r = kid.numbers();
    let consumer = kid.finish();
    assert_eq!(r[0], seq, "the consumer got {} messages of {seq}", r[0]);
    TpPhase {
        msgs: seq,
        ns: r[1] - m0,
        cpu: (producer.cpu_ns, consumer.cpu_ns),
        preempted: (producer.preempted, consumer.preempted),
        producer: side.w,
        consumer: Waits::parse(&r[2..]),
    }
}

fn throughput(cfg: &Config, passed: &PassedFds, side: &mut Side) {
    let modes = [
        Tp::Ring(1),
        Tp::Ring(cfg.batch),
        Tp::Pipe(1),
        Tp::Pipe(cfg.batch),
    ];
    println!(
        "\n2. throughput, one producer (the bench) and one consumer (a child): {} s per phase, \
         {} round(s), the modes of a round alternating; ring of {} data bytes, spin {} µs on \
         both sides (load average {})",
        cfg.secs,
        cfg.rounds,
        cfg.ring_bytes,
        cfg.tput_spin,
        load_average()
    );
    let r4k = reference(cfg, side, LARGE);
    println!(
        "   reference, one process alone, 4 KiB frame: push transaction {:.0} ns, pop \
         transaction {:.0} ns",
        r4k[0], r4k[1]
    );
    // [size][mode] -> one phase per round.
    let sizes = [SMALL, LARGE];
    let mut got: Vec<Vec<Vec<TpPhase>>> = sizes
        .iter()
        .map(|_| modes.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 1..=cfg.rounds {
        for (i, &size) in sizes.iter().enumerate() {
            for (m, &mode) in modes.iter().enumerate() {
                let p = tp_phase(cfg, passed, side, size, mode);
                println!(
                    "   round {round}, {size} B: {:<38} {:>10} msgs/s {:>8.1} MB/s, CPU {} per msg \
                     (producer + consumer), sleeps per 1000 msgs: producer {:.1}, consumer {:.1}; \
                     preempted P {} C {}",
                    mode.name(),
                    rate(p.rate()),
                    p.rate() * size as f64 / 1e6,
                    ns((p.cpu.0 + p.cpu.1) as f64 / p.msgs as f64),
                    p.producer.sleeps as f64 * 1000.0 / p.msgs as f64,
                    p.consumer.sleeps as f64 * 1000.0 / p.msgs as f64,
                    p.preempted.0,
                    p.preempted.1,
                );
                got[i][m].push(p);
            }
        }
    }
    let pipe = modes.iter().position(|&m| m == Tp::Pipe(1)).expect("pipe");
    println!(
        "\n   {:>5} | {:<38} | {:>10} | {:>9} | {:>18} | {:>12} | {:>17} | {:>13}",
        "size",
        "mode (medians over the rounds)",
        "msgs/s",
        "MB/s",
        "vs pipe (1/write)",
        "CPU per msg",
        "sleeps/1000: P, C",
        "preempted P,C"
    );
    for (i, &size) in sizes.iter().enumerate() {
        for (m, &mode) in modes.iter().enumerate() {
            let ps = &got[i][m];
            let med = |f: &dyn Fn(&TpPhase) -> f64| median(ps.iter().map(f).collect());
            let ratios: Vec<f64> = ps
                .iter()
                .zip(&got[i][pipe])
                .map(|(a, p)| a.rate() / p.rate())
                .collect();
            let sleeps = if matches!(mode, Tp::Ring(_)) {
                format!(
                    "{:.1}, {:.1}",
                    med(&|p| p.producer.sleeps as f64 * 1000.0 / p.msgs as f64),
                    med(&|p| p.consumer.sleeps as f64 * 1000.0 / p.msgs as f64)
                )
            } else {
                "-".into()
            };
            println!(
                "   {size:>5} | {:<38} | {:>10} | {:>9.1} | {:>18} | {:>12} | {:>17} | {:>13}",
                mode.name(),
                rate(med(&|p| p.rate())),
                med(&|p| p.rate() * size as f64 / 1e6),
                ratio_range(&ratios),
                ns(med(&|p| (p.cpu.0 + p.cpu.1) as f64 / p.msgs as f64)),
                sleeps,
                format!(
                    "{:.0}, {:.0}",
                    med(&|p| p.preempted.0 as f64),
                    med(&|p| p.preempted.1 as f64)
                ),
            );
        }
    }
    println!(
        "   (MB/s: payload bytes, 10^6; ratios: the median of the rounds' ratios of msgs/s, \
         their range in brackets; load average now {})",
        load_average()
    );
}

// ---------------------------------------------------------------- bench

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        return child(&role);
    }
    // Before anything else is opened: the state's memfd goes on fd 3, with
    // the LISTEN_* description every child gets.
    let memfd = SharedFd::create("rings-bench", CreateOptions::default()).expect("memfd");
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
        "ring benchmarks{}: {}, load average {}",
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
    if root.there.is_null() {
        let (bytes, max) = (cfg.ring_bytes, LARGE as u32);
        root = state
            .transaction(|tx| {
                let root = Root {
                    there: tx.new_ring(bytes, max)?,
                    back: tx.new_ring(bytes, max)?,
                };
                tx.set_root(root)?;
                Ok::<_, shm_state::Error>(root)
            })
            .expect("creating the rings");
    }
    let mut side = Side::new((state, root), 0);
    if cfg.parts.contains(&1) {
        round_trips(&cfg, &passed, &mut side);
    }
    if cfg.parts.contains(&2) {
        throughput(&cfg, &passed, &mut side);
    }
    println!("\nload average at the end: {}", load_average());
}
