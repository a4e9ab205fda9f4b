//! Black-box tests of `queue` (issue 12, part 3): a producer and a
//! consumer process pass the numbers 1..=N through a shm-state ring, each
//! push committed with the producer's count and each pop with the
//! consumer's, so that kill -9 of either side at any instruction loses
//! nothing and delivers nothing twice.
//!
//! - Random kill -9 of either side (chosen at random), each restarted at
//!   once, while both run on one memfd made by a real `shm-fd`: the
//!   consumer ends with `received N` (every number once, in order: it
//!   checks each against the last), the producer with `produced N`.
//! - `shm-restore` in the middle: rounds under `shm-restore --interval`,
//!   with kills of single sides inside a round, each round but the last
//!   ended by a "power loss" (SIGKILL of `shm-restore`, its whole group
//!   dies with it); the next round starts from the last snapshot, in a new
//!   memfd. After each loss `queue check` reads the snapshot: the ring
//!   holds exactly the numbers sent and not yet received (`last+1..=sent`)
//!   and the consumer's count equals its last number; the last round ends
//!   with `received N`, so 1..=N arrived in order across every restore.
//! - Waiting costs no CPU: a consumer on an empty ring and a producer on a
//!   full one each use well under 50 ms of CPU in a second.
//! - Peer death while blocked: a waiter whose peer is killed gives up
//!   after its `--timeout` saying the peer is gone (and says "attached but
//!   idle" while the peer lives); a new peer attaching lets a waiting
//!   side carry on.
//!
//! Every process is the test's own child with `PR_SET_PDEATHSIG`
//! (SIGKILL when the test's thread ends), killed only by its pid and
//! always reaped (processes under `shm-restore` die with it: its
//! `PR_SET_PDEATHSIG` and group keeper; the test kills those only by pid
//! and start time); every wait is bounded ([`BOUND`]).
//!
//! The test opens the state itself too (a [`SharedState`] of the same
//! root type, a peer like the others) to follow the counters without
//! parsing output. Environment: `QUEUE_KILLS` (default 1000),
//! `QUEUE_NUMBERS` (default 20000), `QUEUE_RESTORES` (power losses,
//! default 6), `QUEUE_SEED=N` to replay a run's random choices.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use shm_fd_tests::procs::Proc;
use shm_fd_tests::{BOUND, Kid, Rng, bin, cmd, env_count, killed, run_within, text};
use shm_state::{Layout, RingView, SharedState, Source, StateRing};

/// `--timeout` of the sides in the long tests: a side that waits this
/// long for its peer fails the test (exit 3) instead of hanging.
const SIDE_TIMEOUT: &str = "30";

/// The region starts after shm-snapshot's header page (the queue uses the
/// snapshot protocol); the writer lock is a futex word of shm-state's
/// header, bits 0..30 its holder's thread id (`docs/state-format.md`).
const WLOCK: u64 = 4096 + 0x300;
const WLOCK_TID: u64 = 0x3FFF_FFFF;

/// The queue's root, as `examples/queue` defines it (version 1; a
/// different size is refused by the open, on either side).
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
#[repr(C)]
struct Root {
    ring: StateRing,
    sent: u64,
    received: u64,
    last: u64,
    duplicates: u64,
    missing: u64,
    malformed: u64,
    first_problem: u64,
    first_expected: u64,
    first_got: u64,
}

/// How the queue tests judge a process that should succeed.
trait SuccessPrinting {
    /// Waits (at most [`BOUND`]) and checks that it exited 0, printed
    /// `want` and did not panic.
    fn success_printing(&mut self, want: &str);
}

impl SuccessPrinting for Kid {
    fn success_printing(&mut self, want: &str) {
        self.success_with(&format!("{want:?}"), |o, e| {
            o.contains(want) && !e.contains("panicked")
        });
    }
}

/// One queue: a memfd created by a real `shm-fd` (its command, `sleep`,
/// holds it until the queue is dropped: killed by pid then), passed to every `queue` the test starts
/// as `shm-fd` passes it (fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES`), and
/// open in the test as a [`SharedState`] to read the counters.
struct Queue {
    /// The memfd, opened through `/proc/PID/fd/3` of the holder.
    mem: File,
    state: SharedState<Root>,
    _holder: Kid,
    started: AtomicUsize,
    dir: tempfile::TempDir,
}

impl Queue {
    fn new() -> Queue {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cmd("shm-fd");
        c.arg("sleep").arg("3600");
        let holder = Kid::start(c, "holder", dir.path(), None);
        let pid = holder.pid();
        // shm-fd execs the command once the memfd is on fd 3 and sealed.
        let deadline = Instant::now() + BOUND;
        while std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .is_none_or(|c| !c.starts_with(b"sleep\0"))
        {
            assert!(
                Instant::now() < deadline,
                "shm-fd never ran its command: {}",
                holder.stderr()
            );
            sleep(Duration::from_millis(2));
        }
        let proc_fd = format!("/proc/{pid}/fd/3");
        let link = std::fs::read_link(&proc_fd).unwrap();
        assert!(
            link.to_string_lossy()
                .starts_with(&format!("/memfd:{}", shm_fd::DEFAULT_NAME)),
            "fd 3 of shm-fd's command is {link:?}"
        );
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&proc_fd)
                .unwrap()
        };
        let mem = open();
        let fd = shm_fd::SharedFd::adopt(open().into(), shm_fd::DEFAULT_NAME).unwrap();
        // SAFETY: the memfd is written only through shm-state (here and in
        // the queue processes) and sealed against shrinking by shm-fd.
        let source = unsafe { Source::shared(fd) };
        let state = SharedState::open(source, Layout::new(1).with_snapshot_protocol()).unwrap();
        Queue {
            mem,
            state,
            _holder: holder,
            started: AtomicUsize::new(0),
            dir,
        }
    }

    /// Starts `queue args...` on the memfd.
    fn start(&self, args: &[&str]) -> Kid {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let label = format!("{n:05}-queue-{}", args[0]);
        let mut c = cmd("queue");
        c.env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", shm_fd::DEFAULT_NAME)
            .args(args);
        Kid::start(c, label, self.dir.path(), Some(self.mem.as_raw_fd()))
    }

    /// Whether the writer lock is held by a thread of process `pid`.
    fn lock_held_by(&self, pid: u32) -> bool {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        self.mem.read_exact_at(&mut b, WLOCK).unwrap();
        let tid = u64::from(u32::from_le_bytes(b)) & WLOCK_TID;
        tid != 0 && Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
    }

    /// Stops `kid` (SIGSTOP) at a moment it does not hold the writer lock
    /// (a stopped holder would stop every other side too).
    fn stop_outside_the_lock(&self, kid: &mut Kid) {
        let deadline = Instant::now() + BOUND;
        loop {
            assert!(kid.stop(), "{} ended", kid.label());
            if !self.lock_held_by(kid.pid()) {
                return;
            }
            assert!(kid.resume(), "{} ended", kid.label());
            assert!(
                Instant::now() < deadline,
                "{} always holds the lock",
                kid.label()
            );
            sleep(Duration::from_micros(100));
        }
    }

    fn root(&mut self) -> Root {
        self.state.read(|v| v.root()).unwrap()
    }

    /// The ring, once a queue created it.
    fn ring(&mut self) -> Option<RingView> {
        self.state
            .read(|v| {
                let root = v.root()?;
                if root.ring.is_null() {
                    return Ok(None);
                }
                v.ring(root.ring).map(Some)
            })
            .unwrap()
    }

    /// Sleeps on the commit word until `f` holds or `bound` passes; true
    /// if it held.
    fn wait_until(
        &mut self,
        bound: Duration,
        mut f: impl FnMut(&Root, Option<RingView>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let word = self.state.commit_word();
            let root = self.root();
            let ring = self.ring();
            if f(&root, ring) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.state
                .wait_for_commit_after(word, left.min(Duration::from_millis(5)))
                .unwrap();
        }
    }

    /// Checks that the queue ended complete: 1..=n sent and received in
    /// order, no problem recorded, the ring empty; and that `queue check`
    /// agrees.
    fn assert_complete(&mut self, n: u64) {
        let root = self.root();
        assert_eq!((root.sent, root.received, root.last), (n, n, n), "{root:?}");
        assert_eq!(
            (
                root.duplicates,
                root.missing,
                root.malformed,
                root.first_problem
            ),
            (0, 0, 0, 0),
            "{root:?}"
        );
        assert!(self.ring().unwrap().is_empty());
        let mut check = self.start(&["check"]);
        check.success_printing(&format!(
            "sent {n}, received {n}, last {n}, 0 in the ring\n"
        ));
    }
}

/// One side of the queue in the kill test.
struct Side {
    name: &'static str,
    count: u64,
    kid: Option<Kid>,
    /// The last run ended by itself, with its final line.
    done: bool,
    kills: usize,
}

impl Side {
    fn new(q: &Queue, name: &'static str, count: u64) -> Side {
        let mut side = Side {
            name,
            count,
            kid: None,
            done: false,
            kills: 0,
        };
        side.start(q);
        side
    }

    fn start(&mut self, q: &Queue) {
        let count = self.count.to_string();
        let args = [self.name, "--count", &count, "--timeout", SIDE_TIMEOUT];
        self.kid = Some(q.start(&args));
        self.done = false;
    }

    /// Its own counter: numbers sent, or received.
    fn counter(&self, r: &Root) -> u64 {
        match self.name {
            "produce" => r.sent,
            _ => r.received,
        }
    }

    /// How a run that ended is judged: SIGKILL (the test's) is restarted,
    /// exit 0 with the final line is done, anything else fails the test.
    fn ended(&mut self, q: &Queue, status: ExitStatus) {
        let kid = self.kid.take().unwrap();
        if killed(status) {
            self.start(q);
            return;
        }
        let want = match self.name {
            "produce" => format!("produced {}\n", self.count),
            _ => format!("received {}\n", self.count),
        };
        let (o, e) = (kid.stdout(), kid.stderr());
        assert!(
            status.success() && o == want,
            "{} (pid {}) ended with {status}, expected {want:?}\nstdout: {o}\nstderr: {e}",
            kid.label(),
            kid.pid()
        );
        self.done = true;
    }
}

/// Issue 12, 3: a producer and a consumer on one memfd, either killed
/// (kill -9, by pid) at random and restarted at once, `QUEUE_KILLS` times
/// (default 1000), in rounds of `QUEUE_NUMBERS` numbers (default 20000):
/// when both sides have passed the round's count, both start again with a
/// count `QUEUE_NUMBERS` higher, and go on from their committed counters.
/// A quarter of the kills hit a side within 3 ms of its start (exec, open,
/// attach); the others once the victim has committed 1 to 40 more
/// transactions (at most 50 ms: it may be waiting for its peer). The
/// consumer must end each round with `received C` (it checks every number
/// against the last: in order, no duplicate, no gap), the producer with
/// `produced C`, and the state must hold exactly that.
#[test]
fn producer_and_consumer_killed_at_random_deliver_every_number_once_in_order() {
    let n = env_count("QUEUE_NUMBERS", 20_000) as u64;
    let kills = env_count("QUEUE_KILLS", 1000);
    let mut rng = Rng::seeded("QUEUE_SEED", "queue kills");
    let start = Instant::now();
    let mut q = Queue::new();
    let mut sides = [Side::new(&q, "produce", n), Side::new(&q, "consume", n)];
    let (mut early, mut holding, mut done_kills, mut rounds) = (0usize, 0usize, 0usize, 1u64);
    loop {
        // A side that ended by itself (or failed) is judged first.
        for side in sides.iter_mut() {
            if let Some(status) = side.kid.as_mut().and_then(Kid::poll) {
                side.ended(&q, status);
            }
        }
        if done_kills >= kills {
            break;
        }
        if sides.iter().all(|s| s.done) {
            rounds += 1;
            for side in sides.iter_mut() {
                side.count += n;
                side.start(&q);
            }
        }
        let running: Vec<usize> = (0..2).filter(|&i| !sides[i].done).collect();
        let victim = running[rng.below(running.len() as u64) as usize];
        if rng.below(4) == 0 {
            early += 1;
            sleep(Duration::from_micros(rng.below(3000)));
        } else {
            let side = &sides[victim];
            let target = side.counter(&q.root()) + 1 + rng.below(40);
            q.wait_until(Duration::from_millis(50), |r, _| side.counter(r) >= target);
        }
        let side = &mut sides[victim];
        let kid = side.kid.as_mut().unwrap();
        if q.lock_held_by(kid.pid()) {
            holding += 1;
        }
        let status = kid.kill();
        if killed(status) {
            side.kills += 1;
            done_kills += 1;
        }
        side.ended(&q, status);
    }
    let killing = start.elapsed();
    for side in sides.iter_mut() {
        if let Some(kid) = side.kid.as_mut() {
            let status = kid.wait(BOUND);
            side.ended(&q, status);
            assert!(side.done, "{} was killed by someone else", side.name);
        }
    }
    let count = sides[0].count;
    q.assert_complete(count);
    eprintln!(
        "queue kills: {count} numbers in {rounds} rounds, {done_kills} kills ({} of the producer, {} of the consumer; {early} within 3 ms of a start, {holding} holding the writer lock); kills took {killing:?}, all {:?}",
        sides[0].kills,
        sides[1].kills,
        start.elapsed()
    );
}

/// The `queue produce` and `queue consume` processes running below
/// `root` (found through each process's children list; recognised by
/// their command line: the queue binary's path, then the subcommand).
fn queues_under(root: u32) -> Vec<Proc> {
    let queue = bin("queue");
    let queue = queue.as_os_str().as_encoded_bytes();
    let mut todo = vec![root];
    let mut found = Vec::new();
    while let Some(pid) = todo.pop() {
        let kids =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{k}/cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|&b| b == 0);
            if args.next() == Some(queue)
                && args
                    .next()
                    .is_some_and(|a| a == b"produce" || a == b"consume")
            {
                found.extend(Proc::of(k as i32));
            }
            todo.push(k);
        }
    }
    found
}

/// A process's command, state, parent, group and signals, from
/// `/proc/PID/{cmdline,status,wchan}`, for a failure message.
fn status_of(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let fields: Vec<&str> = status
        .lines()
        .filter(|l| {
            [
                "Name:", "State:", "PPid:", "SigPnd:", "ShdPnd:", "SigBlk:", "SigCgt:",
            ]
            .iter()
            .any(|f| l.starts_with(f))
        })
        .collect();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let pgrp = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(2))
        .unwrap_or("?");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let first = cmdline.lines().next().unwrap_or("");
    format!(
        "  pid {pid} pgrp {pgrp} [{}] wchan {}: {first}",
        fields.join(", ").replace('\t', " "),
        std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
    )
}

/// Where shm-state's commit word lies in the memfd: the region starts
/// after shm-snapshot's header page, the word is at its offset 0xC0
/// (`docs/state-format.md`).
const TX_WORD: u64 = 4096 + 0xC0;

/// The sequence number in a commit word (bits 1..56): every transaction,
/// committed or rolled back, takes the next one.
fn seq_of(word: u64) -> u64 {
    (word & ((1 << 56) - 1)) >> 1
}

/// The memfd that process `pid` has on fd 3 (as `shm-fd` passes it),
/// opened for reading: the test's own handle, readable after every
/// process of the round is gone.
fn memfd_of(pid: i32) -> Option<File> {
    let proc_fd = format!("/proc/{pid}/fd/3");
    let f = File::open(&proc_fd).ok()?;
    let link = std::fs::read_link(&proc_fd).ok()?;
    assert!(
        link.to_string_lossy()
            .starts_with(&format!("/memfd:{}", shm_fd::DEFAULT_NAME)),
        "fd 3 of {pid} is {link:?}"
    );
    Some(f)
}

/// The transactions run so far on the memfd `mem`: the sequence number of
/// its commit word, read raw, as a measure of progress (`None` while the
/// memfd does not reach the word: no state in it yet).
fn transactions_in(mem: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    mem.read_exact_at(&mut b, TX_WORD).ok()?;
    Some(seq_of(u64::from_le_bytes(b)))
}

/// Every process below `root` now (by pid and start time).
fn tree_under(root: u32) -> Vec<Proc> {
    let mut todo = vec![root];
    let mut found = Vec::new();
    while let Some(pid) = todo.pop() {
        let kids =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            found.extend(Proc::of(k as i32));
            todo.push(k);
        }
    }
    found
}

/// The counters `queue check` prints: `sent S, received R, last L, K in
/// the ring`.
fn check_line(line: &str) -> [u64; 4] {
    let f: Vec<u64> = line
        .trim_end()
        .split(", ")
        .filter_map(|f| f.split(' ').find_map(|w| w.parse().ok()))
        .collect();
    f.try_into()
        .unwrap_or_else(|_| panic!("not a check line: {line:?}"))
}

/// Runs `shm-restore SNAP queue check` (the snapshot restored into a new
/// memfd) and checks what it prints: the ring holds exactly the numbers
/// sent and not yet received (`queue check` compares every frame), and the
/// consumer's count equals its last number (every number so far received
/// once, in order). Returns `[sent, received, last, in the ring]`, and
/// the sequence number of the commit word SNAP holds now: `shm-restore`
/// saves the memfd when its command exits, so SNAP then holds the memfd
/// as `queue check` left it, whose commit word `od` reads (raw, nothing
/// written) after the check, and the next `shm-restore` of SNAP starts
/// from it.
fn check_snapshot(snap: &Path, what: &str) -> ([u64; 4], u64) {
    let script = format!(r#""$0" check || exit; od -An -v -tx1 -j {TX_WORD} -N 8 /proc/self/fd/3"#);
    let out = run_within(
        cmd("shm-restore")
            .arg("--quiet")
            .arg(snap)
            .args(["sh", "-c", &script])
            .arg(bin("queue")),
        BOUND,
    );
    let (o, e) = text(&out);
    assert!(out.status.success(), "{what}: queue check failed: {o}{e}");
    let mut lines = o.lines();
    let c = check_line(lines.next().unwrap_or(""));
    let word: Vec<u8> = lines
        .flat_map(str::split_whitespace)
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("{what}: not od: {o}")))
        .collect();
    let word: [u8; 8] = word
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: not a commit word: {o}"));
    let [sent, received, last, ring] = c;
    assert_eq!(received, last, "{what}: {o}");
    assert_eq!(sent - last, ring, "{what}: {o}");
    (c, seq_of(u64::from_le_bytes(word)))
}

/// Issue 12, 3, with `shm-restore` in the middle: the producer and the
/// consumer run under `shm-fd shm-restore --interval 5ms SNAP sh -c ...`
/// (a shell loop restarts a side killed by a signal), alternately with
/// `--snapshot protocol` (copies while they run) and the default `stop`.
/// Each round but the last runs a random number of transactions (read
/// from the commit word of its memfd, counted from the one of the
/// snapshot it restored; at most twice an even share of the transactions
/// left, the pushes and pops still to commit, and at most half of them,
/// so that the round cannot end by itself first), during which the test
/// kills up to three single sides (kill -9, by pid and start time), and
/// ends with a SIGKILL of `shm-restore` (a power loss: the group dies
/// with it); the last snapshot is what the next round restores, into a
/// new memfd. After every loss `queue check` on the snapshot finds the
/// ring holding exactly `last+1..=sent` and the consumer's count equal to
/// its last number, and the counters never go back between losses. The
/// last round runs to the end: `received N`, `produced N`, and the
/// snapshot holds `sent N, received N, last N`: across the restores, the
/// consumer took 1..=N once each, in order (counting what it had committed
/// in each restored state).
#[test]
fn producer_and_consumer_restored_from_snapshots_after_power_losses_deliver_every_number_once() {
    let losses = env_count("QUEUE_RESTORES", 6);
    let n = (env_count("QUEUE_NUMBERS", 20_000) as u64 * 2).max(losses as u64 * 2000);
    let mut rng = Rng::seeded("QUEUE_SEED", "queue restores");
    let start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("queue.snap");
    let script = r#"q=$0 n=$1
side() { while :; do "$q" "$@"; s=$?; [ "$s" -ge 128 ] || return "$s"; done; }
side produce --count "$n" --timeout 30 & p=$!
side consume --count "$n" --timeout 30; c=$?
wait "$p"; p=$?
echo "sides $p $c"
[ "$p" = 0 ] && [ "$c" = 0 ]"#;
    let (mut kills, mut partial) = (0usize, 0usize);
    let mut before = [0u64; 4];
    // The sequence number of the commit word the snapshot holds (none
    // before round 0: a new memfd, whose state starts at 0).
    let mut restored = 0u64;
    let mut history = Vec::new();
    for round in 0..=losses {
        let last = round == losses;
        let mut c = cmd("shm-fd");
        c.arg(bin("shm-restore")).arg("--quiet");
        if round % 2 == 0 {
            c.args(["--snapshot", "protocol"]);
        }
        c.args(["--interval", "5ms"])
            .arg(&snap)
            .args(["sh", "-c", script])
            .arg(bin("queue"))
            .arg(n.to_string());
        let mut kid = Kid::start(c, format!("round-{round}"), dir.path(), None);
        // Both sides running.
        let deadline = Instant::now() + BOUND;
        while queues_under(kid.pid()).len() < 2 && kid.poll().is_none() {
            assert!(
                Instant::now() < deadline,
                "round {round}: the sides never started"
            );
            sleep(Duration::from_millis(1));
        }
        if last {
            kid.success_printing("sides 0 0\n");
            let o = kid.stdout();
            assert!(
                o.contains(&format!("produced {n}\n")) && o.contains(&format!("received {n}\n")),
                "round {round}: {o}"
            );
            break;
        }
        // The round's length, in transactions on its memfd counted from
        // the restored commit word (not from the test's first look, which
        // may come after the sides ran thousands of them). The round
        // cannot end by itself before `left` more: the n - sent pushes and
        // n - received pops still to commit, each its own transaction.
        // At most twice an even share of them (a share per round left,
        // the last included), and at most half of them: the power loss
        // comes with half of the work or more still ahead, the test's
        // margin to see the span reached and kill `shm-restore` (a span
        // up to all of `left` let the round end first). Up to three
        // kills of single sides at random points of it.
        let left = (n - before[0]) + (n - before[1]);
        let most = (2 * left / (losses - round + 1) as u64).min(left / 2);
        let span = 1 + rng.below(most.max(1));
        let mut kill_at: Vec<u64> = (0..rng.below(4)).map(|_| rng.below(span)).collect();
        kill_at.sort_unstable();
        // The round's memfd, through the test's own handle (opened from a
        // side's fd 3): its commit word is read even after the round's
        // processes are gone.
        let mut mem: Option<File> = None;
        let mut done = 0;
        let deadline = Instant::now() + BOUND;
        loop {
            let sides = queues_under(kid.pid());
            if mem.is_none() {
                mem = sides.iter().find_map(|p| memfd_of(p.pid));
            }
            if let Some(seq) = mem.as_ref().and_then(transactions_in) {
                assert!(
                    seq >= restored,
                    "round {round}: the memfd's commit word (sequence {seq}) is behind the restored snapshot's ({restored})"
                );
                done = seq - restored;
                if kill_at.first().is_some_and(|&k| k <= done) {
                    kill_at.remove(0);
                    if !sides.is_empty() {
                        let p = &sides[rng.below(sides.len() as u64) as usize];
                        if p.is_running() {
                            p.kill();
                            kills += 1;
                        }
                    }
                }
                if done >= span {
                    break;
                }
            }
            if kid.poll().is_some() || Instant::now() >= deadline {
                // What ran in the end, read through the test's handle.
                if let Some(seq) = mem.as_ref().and_then(transactions_in) {
                    done = seq.saturating_sub(restored);
                }
                panic!(
                    "round {round}: {span} transactions never ran ({done} ran of the {left} at least that the round had to run; shm-restore {}): {}",
                    kid.poll().map_or_else(
                        || format!("still ran after {BOUND:?}"),
                        |s| format!("ended: {s}")
                    ),
                    kid.stderr()
                );
            }
            sleep(Duration::from_micros(500));
        }
        // The power loss: shm-restore dies; its command and the command's
        // group die with it (PR_SET_PDEATHSIG, the group keeper).
        let left = tree_under(kid.pid());
        let status = kid.kill();
        assert!(
            killed(status),
            "round {round}: shm-restore ended first ({status}; the test ran the rounds too long: {}): {}",
            history.join(" "),
            kid.stderr()
        );
        let outlived: Vec<Proc> = left
            .iter()
            .filter(|p| !p.ended_within(Duration::from_secs(10)))
            .copied()
            .collect();
        if !outlived.is_empty() {
            let what: Vec<String> = outlived.iter().map(|p| status_of(p.pid)).collect();
            // Not left behind by the test: killed (by pid and start time)
            // before it fails.
            outlived.iter().for_each(Proc::kill);
            panic!(
                "round {round} ({} mode): {} process(es) of the group outlived shm-restore's SIGKILL by 10 s:\n{}",
                if round % 2 == 0 { "protocol" } else { "stop" },
                outlived.len(),
                what.join("\n")
            );
        }
        let (now, seq) = check_snapshot(&snap, &format!("after power loss {round}"));
        for i in 0..3 {
            assert!(
                now[i] >= before[i],
                "after power loss {round}: the counters went back: {before:?} then {now:?}"
            );
        }
        // Mid-way: numbers sent and not all received (in the ring, or
        // some taken). Under load the consumer often starts late, so a
        // snapshot with frames in the ring and none received yet counts:
        // its restore carries them across.
        if now[0] > 0 && now[1] < n {
            partial += 1;
        }
        history.push(format!("{}/{}", now[0], now[1]));
        before = now;
        restored = seq;
    }
    let (end, _) = check_snapshot(&snap, "at the end");
    assert_eq!(end, [n, n, n, 0]);
    eprintln!(
        "queue restores: {n} numbers, {losses} power losses (snapshot restored after each; sent/received then: {}), {kills} kills of single sides, {:?}",
        history.join(" "),
        start.elapsed()
    );
    assert!(
        partial * 2 >= losses,
        "only {partial} of {losses} power losses left numbers in flight: {}",
        history.join(" ")
    );
}

/// Waiting costs no CPU: a consumer on an empty ring, then a producer on a
/// full one (no consumer attached), each sleeping for a second, use well
/// under 50 ms of CPU (user + system) in it; each goes on when its peer
/// comes.
#[test]
fn a_consumer_on_an_empty_ring_and_a_producer_on_a_full_one_wait_without_cpu() {
    const MAX: Duration = Duration::from_millis(50);
    let mut q = Queue::new();
    let mut c = q.start(&["consume", "--count", "100", "--timeout", SIDE_TIMEOUT]);
    assert!(q.wait_until(BOUND, |_, ring| ring.is_some_and(|r| r.consumer_alive())));
    sleep(Duration::from_millis(100));
    let consumer = c.cpu_during(Duration::from_secs(1));
    let mut p = q.start(&["produce", "--count", "100", "--timeout", SIDE_TIMEOUT]);
    p.success_printing("produced 100\n");
    c.success_printing("received 100\n");

    let mut p = q.start(&["produce", "--count", "10000", "--timeout", SIDE_TIMEOUT]);
    // Full: the producer stopped sending, far from its count.
    let mut sent = 0;
    let full = q.wait_until(BOUND, |r, _| {
        let stuck = r.sent > 200 && r.sent == sent;
        sent = r.sent;
        if !stuck {
            sleep(Duration::from_millis(100));
        }
        stuck
    });
    assert!(full && sent < 10_000, "the producer sent {sent}");
    let producer = p.cpu_during(Duration::from_secs(1));
    let mut c = q.start(&["consume", "--count", "10000", "--timeout", SIDE_TIMEOUT]);
    p.success_printing("produced 10000\n");
    c.success_printing("received 10000\n");
    q.assert_complete(10_000);
    eprintln!(
        "queue waits: CPU in 1 s: consumer on an empty ring {consumer:?}, producer on a full ring ({sent} frames) {producer:?}"
    );
    assert!(consumer < MAX, "the waiting consumer used {consumer:?}");
    assert!(producer < MAX, "the waiting producer used {producer:?}");
}

/// Asserts that `kid` exits 3 saying `want`, within `within`.
fn gives_up(kid: &mut Kid, want: &str, within: Duration) {
    let status = kid.wait(within);
    let e = kid.stderr();
    assert!(
        status.code() == Some(3) && e.contains(want),
        "{}: {status}, expected exit 3 and {want:?}: {e}",
        kid.label()
    );
}

/// Peer death while blocked, the consumer's side: a consumer whose
/// producer is alive but idle (stopped) gives up after `--timeout` saying
/// so; one whose producer is killed while it waits gives up after its
/// `--timeout` saying "producer gone"; and a consumer waiting with no
/// producer carries on when a new one attaches: it receives every number
/// from where the first producer stopped, once, in order.
#[test]
fn a_waiting_consumer_sees_its_producer_gone_and_carries_on_with_a_new_one() {
    let mut q = Queue::new();
    let mut p1 = q.start(&["produce", "--count", "1000000", "--timeout", SIDE_TIMEOUT]);
    let mut c1 = q.start(&["consume", "--count", "1000000", "--timeout", "1"]);
    assert!(q.wait_until(BOUND, |r, _| r.received > 100));
    q.stop_outside_the_lock(&mut p1);
    gives_up(
        &mut c1,
        "nothing in the ring for 1 s (the producer is attached but sends nothing)",
        BOUND,
    );
    let mut c2 = q.start(&["consume", "--count", "1000000", "--timeout", "2"]);
    assert!(q.wait_until(BOUND, |_, ring| {
        ring.is_some_and(|r| r.consumer_alive() && r.is_empty())
    }));
    sleep(Duration::from_millis(200));
    assert!(c2.poll().is_none(), "{}", c2.stderr());
    let killed_at = Instant::now();
    assert!(killed(p1.kill()));
    gives_up(
        &mut c2,
        "nothing in the ring for 2 s (producer gone: none is attached, or it ended)",
        Duration::from_secs(2 + 10),
    );
    let after = killed_at.elapsed();
    assert!(
        after < Duration::from_secs(2 + 5),
        "gave up {after:?} after the kill"
    );
    // A new producer for a waiting consumer.
    let target = q.root().sent + 5000;
    let t = target.to_string();
    let mut c3 = q.start(&["consume", "--count", &t, "--timeout", SIDE_TIMEOUT]);
    assert!(q.wait_until(BOUND, |_, ring| ring.is_some_and(|r| r.consumer_alive())));
    sleep(Duration::from_millis(200));
    assert!(c3.poll().is_none(), "{}", c3.stderr());
    let mut p2 = q.start(&["produce", "--count", &t, "--timeout", SIDE_TIMEOUT]);
    p2.success_printing(&format!("produced {target}\n"));
    c3.success_printing(&format!("received {target}\n"));
    q.assert_complete(target);
}

/// Peer death while blocked, the producer's side: a producer whose
/// consumer is alive but idle (stopped) gives up after `--timeout` saying
/// so; one whose consumer is killed while it waits on the full ring gives
/// up saying "consumer gone"; and a producer waiting on the full ring
/// with no consumer carries on when a new one attaches.
#[test]
fn a_waiting_producer_sees_its_consumer_gone_and_carries_on_with_a_new_one() {
    let mut q = Queue::new();
    let mut c1 = q.start(&["consume", "--count", "1000000", "--timeout", SIDE_TIMEOUT]);
    let mut p1 = q.start(&["produce", "--count", "1000000", "--timeout", "1"]);
    assert!(q.wait_until(BOUND, |r, _| r.received > 100));
    q.stop_outside_the_lock(&mut c1);
    gives_up(
        &mut p1,
        "no room in the ring for 1 s (the consumer is attached but takes nothing)",
        BOUND,
    );
    let mut p2 = q.start(&["produce", "--count", "1000000", "--timeout", "2"]);
    assert!(q.wait_until(BOUND, |_, ring| ring.is_some_and(|r| r.producer_alive())));
    sleep(Duration::from_millis(200));
    assert!(p2.poll().is_none(), "{}", p2.stderr());
    let killed_at = Instant::now();
    assert!(killed(c1.kill()));
    gives_up(
        &mut p2,
        "no room in the ring for 2 s (consumer gone: none is attached, or it ended)",
        Duration::from_secs(2 + 10),
    );
    let after = killed_at.elapsed();
    assert!(
        after < Duration::from_secs(2 + 5),
        "gave up {after:?} after the kill"
    );
    // A new consumer for a producer waiting on the full ring.
    let target = q.root().sent + 5000;
    let t = target.to_string();
    let mut p3 = q.start(&["produce", "--count", &t, "--timeout", SIDE_TIMEOUT]);
    assert!(q.wait_until(BOUND, |_, ring| ring.is_some_and(|r| r.producer_alive())));
    sleep(Duration::from_millis(200));
    assert!(p3.poll().is_none(), "{}", p3.stderr());
    let mut c2 = q.start(&["consume", "--count", &t, "--timeout", SIDE_TIMEOUT]);
    p3.success_printing(&format!("produced {target}\n"));
    c2.success_printing(&format!("received {target}\n"));
    q.assert_complete(target);
}

/// `queue --help` documents the exit codes, `--version` the workspace's
/// version, and a bad `--timeout` is a usage error (exit 2).
#[test]
fn queue_answers_help_and_version_and_refuses_a_bad_timeout() {
    let out = run_within(cmd("queue").arg("--help"), BOUND);
    let (o, e) = text(&out);
    assert!(out.status.success() && e.is_empty(), "{o}{e}");
    assert!(o.starts_with("A producer and a consumer"), "{o}");
    assert!(
        o.contains("Usage: queue") && o.contains("Exit codes:"),
        "{o}"
    );
    let out = run_within(cmd("queue").arg("--version"), BOUND);
    assert_eq!(
        text(&out).0,
        format!("queue {}\n", env!("CARGO_PKG_VERSION"))
    );
    let dir = tempfile::tempdir().unwrap();
    let out = run_within(
        cmd("queue").arg("--file").arg(dir.path().join("q")).args([
            "consume",
            "--count",
            "1",
            "--timeout=-1",
        ]),
        BOUND,
    );
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{o}{e}");
    assert!(
        e.contains("--timeout -1 is not a non-negative number"),
        "{e}"
    );
}
