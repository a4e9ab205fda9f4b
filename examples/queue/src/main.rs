//! `queue`: a producer and a consumer, each its own process, pass the
//! numbers 1, 2, 3, ... through a ring of frames in a shm-state
//! [`SharedState`]; either side may be killed (kill -9, at any
//! instruction) and started again at any time.
//!
//! Exactly once: the producer pushes number `n` in the same transaction as
//! it records `sent = n`, and the consumer pops a frame in the same
//! transaction as it records it (`received += 1`, `last = n`). The journal
//! rolls back the ring's tail or head together with the counter, or
//! neither moved, so a restarted side continues from its committed counter
//! and nothing is lost or delivered twice. The consumer checks it: every
//! number must be `last + 1`; a duplicate, a gap or a frame unlike the
//! producer's is recorded in the state and fails the run (exit 1).
//!
//! Waiting: a producer that finds the ring full, or a consumer that finds
//! it empty, sleeps on the commit word
//! ([`SharedState::wait_for_commit_after`]) until the other side commits,
//! so waiting costs no CPU. A peer that died is seen through the pid the
//! ring records ([`RingView::consumer_alive`]); the waiter keeps waiting
//! for a new one to attach, for at most `--timeout` without progress.
//! (`--timeout` bounds the waits for the ring only: a transaction waits
//! for the writer lock as long as a live holder keeps it, e.g. a peer
//! stopped with SIGSTOP inside its transaction; a dead holder's lock is
//! taken over at once.)
//!
//! `queue check` looks at the frames in the ring through a transaction
//! that pops them all and is rolled back: a shared read
//! ([`shm_state::View`]) shows a ring's counts, not its frames.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use clap::{Parser, Subcommand};
use shm_state::{Layout, RingEnd, RingView, SharedState, Source, StateRing};

/// The ring's data bytes.
const RING_BYTES: u64 = 64 * 1024;
/// The largest frame the ring takes (the producer's are 8 to 36 bytes).
const MAX_FRAME: u32 = 1024;
/// The longest single sleep of a waiter: it looks at the ring again after
/// it even without a commit (a writer that died inside a transaction wakes
/// no one; the look rolls it back).
const NAP: Duration = Duration::from_millis(500);

const AFTER_HELP: &str = "\
The state lives in the shared memfd passed by a watcher, e.g.
  shm-fd sh -c 'queue produce --count 100000 & queue consume --count 100000; wait'
  shm-fd shm-restore --snapshot protocol q.snap sh -c 'queue produce ... & queue consume ...; wait'
or, with --file, in a regular file. `produce` and `consume` may be killed
(any signal, kill -9 included) and started again at any time, in any order:
each continues from what it committed, and the consumer receives every
number once, in order.

A side that cannot go on (the ring is full for `produce`, empty for
`consume`) sleeps until the other side commits; after --timeout seconds
without progress it gives up (exit 3), saying whether the other side is
gone (none attached, or it ended) or attached but idle.

Exit codes:
  0  success: `produce` sent every number up to --count (`produced N`),
     `consume` received --count numbers in order (`received N`), `check`
     found the counters and the ring consistent
  1  `consume`: a number came twice, out of order, was skipped, or a
     frame was malformed (recorded in the state: every later `consume`
     and `check` fails too; the message says which); `check`: the ring
     does not hold exactly the numbers sent and not yet received, a
     problem is recorded, or the state is damaged
  2  bad command line
  3  no progress for --timeout seconds, or the state cannot be used: no
     memfd passed, not a queue, damaged (`produce`, `consume`), held by a
     live process that does not share it, shared by 68 processes
     already, or a system error";

#[derive(Parser, Debug)]
#[command(version, about = "A producer and a consumer pass numbers through a ring in shared memory, exactly once", after_help = AFTER_HELP)]
struct Cli {
    /// Keep the state in this file instead of the passed memfd.
    #[arg(long, value_name = "PATH", global = true)]
    file: Option<PathBuf>,
    /// Name of the memfd in LISTEN_FDNAMES.
    #[arg(long, value_name = "NAME", default_value = shm_fd::DEFAULT_NAME, global = true)]
    name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Push the numbers after the last one sent, up to N: one transaction
    /// per number, which also records it sent.
    Produce {
        /// The last number to send.
        #[arg(long, value_name = "N")]
        count: u64,
        /// Give up after this many seconds without room in the ring
        /// (fractions allowed).
        #[arg(long, value_name = "S", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Pop numbers until N have been received: one transaction per
    /// number, which also records it received; each must be the last
    /// one plus one.
    Consume {
        /// How many numbers to have received in all.
        #[arg(long, value_name = "N")]
        count: u64,
        /// Give up after this many seconds with nothing in the ring
        /// (fractions allowed).
        #[arg(long, value_name = "S", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Print `sent S, received R, last L, K in the ring`, and check that
    /// the ring holds exactly the numbers L+1..=S and that the consumer
    /// recorded no problem. Nothing is taken from the ring.
    Check,
}

/// The queue's root, version 1.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    /// The ring the numbers pass through.
    ring: StateRing,
    /// The producer's count: the numbers 1..=sent were pushed.
    sent: u64,
    /// The consumer's count of frames popped.
    received: u64,
    /// The last number the consumer popped (0: none yet).
    last: u64,
    /// Numbers popped at or below `last` (duplicates or reordering).
    duplicates: u64,
    /// Numbers skipped (a frame above `last + 1`).
    missing: u64,
    /// Frames that are not a number as the producer writes them.
    malformed: u64,
    /// The first problem: the frame's place among those received
    /// (1-based; 0: no problem), the number expected, the number that
    /// came (`u64::MAX`: a malformed frame).
    first_problem: u64,
    first_expected: u64,
    first_got: u64,
}

/// A failure with its exit code.
struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(3, e.to_string())
    }
}

/// Maps a shm-state error to a failure, exit code `code` if the state is
/// damaged (corrupt or truncated), 3 otherwise.
fn with_damage_code(code: u8) -> impl Fn(shm_state::Error) -> Fail {
    move |e| match e {
        shm_state::Error::Corrupted(_) | shm_state::Error::Truncated { .. } => {
            Fail(code, e.to_string())
        }
        e => Fail(3, e.to_string()),
    }
}

/// The frame of number `n`: `n` (8 bytes, little endian), then `n % 29`
/// bytes derived from `n`, so that frames of 8 to 36 bytes meet the end of
/// the ring at every offset, and a frame is checked whole.
fn frame(n: u64) -> Vec<u8> {
    let mut f = n.to_le_bytes().to_vec();
    f.extend((0..n % 29).map(|i| (n.wrapping_mul(31).wrapping_add(i) as u8) ^ 0xA5));
    f
}

/// The number a frame carries, if it is the producer's frame of it.
fn number(f: &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(f.get(..8)?.try_into().ok()?);
    (f == frame(n)).then_some(n)
}

/// The ring bytes the frame of `n` takes: an 8-byte frame header and the
/// frame, padded to 8.
fn ring_bytes(n: u64) -> u64 {
    8 + (8 + n % 29).next_multiple_of(8)
}

/// Opens the queue's state (creating the ring on first use); a damaged
/// state fails with exit code `on_damage`.
fn open(cli: &Cli, on_damage: u8) -> Result<(SharedState<Root>, StateRing), Fail> {
    let source = match &cli.file {
        Some(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Fail(3, format!("{}: {e}", path.display())))?;
            // SAFETY: the file is the queue's own, shared only with other
            // queue processes (shm-state's writer lock orders their
            // writes), and nothing truncates it.
            unsafe { Source::file(file) }
        }
        None => {
            // SAFETY: opened once, before the program opens any file of its
            // own: the fd LISTEN_FDS names was inherited and has no owner.
            let fd = unsafe { shm_fd::SharedFd::from_env(&cli.name) }?;
            // SAFETY: the watcher passed the memfd to queue processes only
            // and sealed it against shrinking; shm-state's writer lock
            // orders their writes.
            unsafe { Source::shared(fd) }
        }
    };
    let damage = with_damage_code(on_damage);
    let mut state = SharedState::<Root>::open(source, Layout::new(1).with_snapshot_protocol())
        .map_err(&damage)?;
    let mut ring = state.read(|v| v.root()).map_err(&damage)?.ring;
    if ring.is_null() {
        // The other side may be creating it too: decided under the lock.
        ring = state
            .transaction(|tx| {
                if tx.root()?.ring.is_null() {
                    let ring = tx.new_ring(RING_BYTES, MAX_FRAME)?;
                    tx.root_mut()?.ring = ring;
                }
                Ok(tx.root()?.ring)
            })
            .map_err(&damage)?;
    }
    Ok((state, ring))
}

/// `--timeout S` as a duration (`Duration::MAX`, no deadline, for one too
/// long to represent).
fn timeout(seconds: f64) -> Result<Duration, Fail> {
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(Fail(
            2,
            format!("--timeout {seconds} is not a non-negative number"),
        ));
    }
    Ok(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
}

/// Looks at the root and the ring until `ready` holds, sleeping on the
/// commit word between looks: `Ok` with the look that was ready, or `Err`
/// with the last look when `timeout` passed first.
fn wait_for(
    state: &mut SharedState<Root>,
    ring: StateRing,
    timeout: Duration,
    mut ready: impl FnMut(&Root, &RingView) -> bool,
) -> Result<Result<(Root, RingView), RingView>, Fail> {
    let deadline = Instant::now().checked_add(timeout);
    loop {
        // The word before the look: a commit after the look changes it,
        // and then the sleep below ends at once (no wake-up is lost).
        let word = state.commit_word();
        let (root, view) = state
            .read(|v| Ok::<_, shm_state::Error>((v.root()?, v.ring(ring)?)))
            .map_err(with_damage_code(3))?;
        if ready(&root, &view) {
            return Ok(Ok((root, view)));
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => NAP,
        };
        if left.is_zero() {
            return Ok(Err(view));
        }
        state.wait_for_commit_after(word, left.min(NAP))?;
    }
}

/// The end of a wait for the other side: what the waiter knows of it.
fn peer(alive: bool, who: &str, idle: &str) -> String {
    if alive {
        format!("the {who} is attached but {idle}")
    } else {
        format!("{who} gone: none is attached, or it ended")
    }
}

fn produce(cli: &Cli, count: u64, seconds: f64) -> Result<(), Fail> {
    let timeout = timeout(seconds)?;
    let (mut state, ring) = open(cli, 3)?;
    state
        .transaction(|tx| tx.ring(ring)?.attach(RingEnd::Producer))
        .map_err(with_damage_code(3))?;
    // After a push that did not fit (a frame that meets the end of the
    // ring needs the rest of the lap too), the free bytes to wait for:
    // more than that push saw. Only the consumer frees bytes.
    let mut want_free = 0u64;
    let sent = loop {
        let look = wait_for(&mut state, ring, timeout, |root, view| {
            root.sent >= count
                || view.is_empty()
                || view.free_bytes() >= want_free.max(ring_bytes(root.sent + 1))
        })?;
        let (root, view) = match look {
            Ok(look) => look,
            Err(view) => {
                let sent = state.read(|v| v.root()).map_err(with_damage_code(3))?.sent;
                return Err(Fail(
                    3,
                    format!(
                        "no room in the ring for {seconds} s ({}); {sent} of {count} sent",
                        peer(view.consumer_alive(), "consumer", "takes nothing")
                    ),
                ));
            }
        };
        if root.sent >= count {
            break root.sent;
        }
        let pushed = state
            .transaction(|tx| {
                let root = *tx.root()?;
                if root.sent >= count {
                    return Ok(true); // another producer sent the rest
                }
                let n = root.sent + 1;
                if !tx.ring(ring)?.push(&frame(n))? {
                    return Ok(false);
                }
                tx.root_mut()?.sent = n;
                Ok(true)
            })
            .map_err(with_damage_code(3))?;
        want_free = if pushed { 0 } else { view.free_bytes() + 8 };
    };
    if sent > count {
        eprintln!("queue: {sent} were sent already, more than --count {count}");
    }
    println!("produced {sent}");
    Ok(())
}

/// Records the popped frame `f` in `root`: received, and checked against
/// the last number.
fn receive(root: &mut Root, f: &[u8]) {
    root.received = root.received.saturating_add(1);
    let expected = root.last.saturating_add(1);
    let got = number(f);
    match got {
        Some(n) if n == expected => {
            root.last = n;
            return;
        }
        Some(n) if n < expected => root.duplicates = root.duplicates.saturating_add(1),
        Some(n) => {
            root.missing = root.missing.saturating_add(n - expected);
            root.last = n;
        }
        None => root.malformed = root.malformed.saturating_add(1),
    }
    if root.first_problem == 0 {
        root.first_problem = root.received;
        root.first_expected = expected;
        root.first_got = got.unwrap_or(u64::MAX);
    }
}

/// What the consumer recorded going wrong, if anything.
fn problems(root: &Root) -> Option<String> {
    if root.first_problem == 0 {
        return None;
    }
    let (at, expected, got) = (root.first_problem, root.first_expected, root.first_got);
    let first = if got == u64::MAX {
        format!("frame {at} was malformed, expected number {expected}")
    } else if got < expected {
        format!("frame {at} was number {got} again (or out of order), expected {expected}")
    } else if got == expected + 1 {
        format!("frame {at} was number {got}: number {expected} is missing")
    } else {
        format!(
            "frame {at} was number {got}: numbers {expected} to {} are missing",
            got - 1
        )
    };
    Some(format!(
        "{} duplicate(s), {} missing number(s), {} malformed frame(s); the first: {first}",
        root.duplicates, root.missing, root.malformed
    ))
}

fn consume(cli: &Cli, count: u64, seconds: f64) -> Result<bool, Fail> {
    let timeout = timeout(seconds)?;
    let (mut state, ring) = open(cli, 3)?;
    state
        .transaction(|tx| tx.ring(ring)?.attach(RingEnd::Consumer))
        .map_err(with_damage_code(3))?;
    let root = loop {
        let look = wait_for(&mut state, ring, timeout, |root, view| {
            root.received >= count || !view.is_empty()
        })?;
        match look {
            Ok((root, _)) if root.received >= count => break root,
            Ok(_) => {}
            Err(view) => {
                let received = state
                    .read(|v| v.root())
                    .map_err(with_damage_code(3))?
                    .received;
                return Err(Fail(
                    3,
                    format!(
                        "nothing in the ring for {seconds} s ({}); {received} of {count} received",
                        peer(view.producer_alive(), "producer", "sends nothing")
                    ),
                ));
            }
        }
        state
            .transaction(|tx| {
                let mut root = *tx.root()?;
                if root.received >= count {
                    return Ok(()); // another consumer took the rest
                }
                if let Some(f) = tx.ring(ring)?.pop()? {
                    receive(&mut root, &f);
                    *tx.root_mut()? = root;
                }
                Ok(())
            })
            .map_err(with_damage_code(3))?;
    };
    println!("received {}", root.received);
    match problems(&root) {
        Some(p) => {
            eprintln!("queue: {p}");
            Ok(false)
        }
        None => Ok(true),
    }
}

/// A look at every frame in the ring, through a transaction that pops
/// them all and is then rolled back (a [`shm_state::View`] shows a ring's
/// counts, not its frames).
enum Peek {
    Frames(Root, Vec<Vec<u8>>),
    Failed(shm_state::Error),
}

impl From<shm_state::Error> for Peek {
    fn from(e: shm_state::Error) -> Self {
        Peek::Failed(e)
    }
}

fn check(cli: &Cli) -> Result<bool, Fail> {
    let damaged = with_damage_code(1);
    let (mut state, ring) = open(cli, 1)?;
    let peeked = state.transaction(|tx| {
        let root = *tx.root()?;
        let mut r = tx.ring(ring)?;
        let mut frames = Vec::new();
        while let Some(f) = r.pop()? {
            frames.push(f);
        }
        // An error: the transaction is rolled back, nothing is taken.
        Err::<(), _>(Peek::Frames(root, frames))
    });
    let (root, frames) = match peeked {
        Err(Peek::Frames(root, frames)) => (root, frames),
        Err(Peek::Failed(e)) => return Err(damaged(e)),
        Ok(()) => unreachable!("the look is always rolled back"),
    };
    let view = state.read(|v| v.ring(ring)).map_err(&damaged)?;
    println!(
        "sent {}, received {}, last {}, {} in the ring",
        root.sent,
        root.received,
        root.last,
        frames.len()
    );
    let mut bad = Vec::new();
    if view.len() != frames.len() as u64 {
        bad.push(format!(
            "the ring counts {} frames but {} were taken from it",
            view.len(),
            frames.len()
        ));
    }
    if root.last > root.sent {
        bad.push(format!(
            "the consumer's last number {} is past the {} sent",
            root.last, root.sent
        ));
    } else if frames.len() as u64 != root.sent - root.last {
        bad.push(format!(
            "{} frames in the ring, expected the {} numbers {}..={}",
            frames.len(),
            root.sent - root.last,
            root.last + 1,
            root.sent
        ));
    }
    for (i, (f, n)) in frames.iter().zip(root.last.saturating_add(1)..).enumerate() {
        if number(f) != Some(n) {
            let got = number(f).map_or_else(|| "malformed".into(), |g| format!("number {g}"));
            bad.push(format!(
                "frame {i} in the ring is {got}, expected number {n}"
            ));
            break;
        }
    }
    if let Some(p) = problems(&root) {
        bad.push(format!("the consumer recorded: {p}"));
    }
    for p in &bad {
        eprintln!("queue check: {p}");
    }
    Ok(bad.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Produce { count, timeout } => produce(&cli, *count, *timeout).map(|()| true),
        Command::Consume { count, timeout } => consume(&cli, *count, *timeout),
        Command::Check => check(&cli),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Fail(code, msg)) => {
            eprintln!("queue: {msg}");
            ExitCode::from(code)
        }
    }
}
