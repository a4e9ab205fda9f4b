//! Black-box tests of shared states (issue 11): many `bank` and `kv`
//! processes at once on one state, as `shm-fd` passes it (a memfd on fd 3,
//! named in `LISTEN_FDNAMES`) or in one `--file`, killed with SIGKILL at
//! random while they work.
//!
//! The memfd is created by a real `shm-fd` (its command, `cat`, holds it
//! until the test ends) and passed to every process the test starts as
//! `shm-fd` passes it to its command: on fd 3, `LISTEN_FDS=1`,
//! `LISTEN_FDNAMES=SHM_SHARED_FD`. The test opens it through
//! `/proc/PID/fd/3` of the holder (the same memfd, sealed by `shm-fd`; a
//! file description of the test's own) and reads its lock words for the
//! statistics and failure messages. (A memfd rather than a `--file` for
//! the kill test: it is the real use; the growth test runs on both.)
//!
//! Every process is the test's own child, with `PR_SET_PDEATHSIG`
//! (SIGKILL when the test's thread ends), killed only by its pid (never
//! by name) and always reaped; every wait is bounded ([`BOUND`]) and fails
//! the test with what the process and the region's lock words looked like
//! instead of hanging.
//!
//! Counts are sized for CI; for a longer run set `SHARED_STATE_KILLS`
//! (default 1000) and `SHARED_STATE_BIG_KEYS` (default 120);
//! `SHARED_STATE_SEED=N` replays a run's random choices (printed first).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use shm_fd_tests::{BOUND, Kid, Rng, bin, cmd, describe, env_count};

/// The region starts after shm-snapshot's header page (the examples use
/// the snapshot protocol); offsets below are shm-state's header
/// (`docs/state-format.md`).
const HEADER: u64 = 4096;
/// The commit word: bit 0 set while a transaction is open.
const TX_WORD: u64 = HEADER + 0xC0;
/// The writer lock: a futex word, bits 0..30 the holder's thread id.
const WLOCK: u64 = HEADER + 0x300;
/// The writer lock's holder record: slot + 1 in bits 32..64, thread id.
const WLOCK_HOLDER: u64 = HEADER + 0x308;
const WLOCK_TID: u64 = 0x3FFF_FFFF;

/// One state that the test's processes share: a memfd created by a real
/// `shm-fd`, or a file.
struct Shared {
    /// The memory, open in the test: passed on (memfd) and read for the
    /// lock words of failure messages (each [`Kid`]'s context holds it
    /// too) and statistics.
    mem: Arc<File>,
    /// `Some` for a file (passed as `--file`), `None` for the memfd.
    file: Option<PathBuf>,
    /// `shm-fd cat`: holds the memfd until the test ends (its stdin is a
    /// pipe of the test's; it ends at EOF, or by PDEATHSIG, or by Drop).
    _holder: Option<Kid>,
    started: AtomicUsize,
    /// Outputs of every process; dropped last.
    dir: tempfile::TempDir,
}

impl Shared {
    /// A memfd created by `shm-fd`, as its command holds it.
    fn memfd() -> Shared {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cmd("shm-fd");
        c.arg("cat");
        let holder = Kid::start_with_stdin(c, "holder", dir.path(), Stdio::piped(), None);
        let pid = holder.pid();
        // shm-fd execs cat once the memfd is on fd 3 and sealed.
        let deadline = Instant::now() + BOUND;
        while std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .as_deref()
            != Some(b"cat\0")
        {
            assert!(
                Instant::now() < deadline,
                "shm-fd never ran cat: {}",
                holder.stderr()
            );
            sleep(Duration::from_millis(2));
        }
        let link = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
        assert!(
            link.to_string_lossy()
                .starts_with(&format!("/memfd:{}", shm_fd::DEFAULT_NAME)),
            "fd 3 of shm-fd's command is {link:?}"
        );
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/3"))
            .unwrap();
        Shared {
            mem: Arc::new(mem),
            file: None,
            _holder: Some(holder),
            started: AtomicUsize::new(0),
            dir,
        }
    }

    /// A file in a temporary directory (empty: the first opener creates
    /// the state in it).
    fn file() -> Shared {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        Shared {
            mem: Arc::new(mem),
            file: Some(path),
            _holder: None,
            started: AtomicUsize::new(0),
            dir,
        }
    }

    /// Starts `name args...` on the state.
    fn start(&self, name: &str, args: &[&str]) -> Kid {
        self.start_gated(name, args, None)
    }

    /// Starts `name args...` on the state; with a gate, the process waits
    /// for [`Gate::open`] before it runs the program (a shell reads the
    /// gate, then execs the program: same pid).
    fn start_gated(&self, name: &str, args: &[&str], gate: Option<&Gate>) -> Kid {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let label = format!("{n:05}-{name}-{}", args.first().unwrap_or(&""));
        let mut c = match gate {
            None => cmd(name),
            Some(_) => {
                // Cleaned as `cmd` cleans its command's environment.
                let mut sh = Command::new("sh");
                for var in [
                    "LISTEN_FDS",
                    "LISTEN_FDNAMES",
                    "LISTEN_PID",
                    "NOTIFY_SOCKET",
                ] {
                    sh.env_remove(var);
                }
                sh.args(["-c", "read -r x; exec \"$0\" \"$@\""])
                    .arg(bin(name));
                sh
            }
        };
        match &self.file {
            Some(path) => {
                c.arg("--file").arg(path);
            }
            None => {
                c.env("LISTEN_FDS", "1")
                    .env("LISTEN_FDNAMES", shm_fd::DEFAULT_NAME);
            }
        }
        c.args(args);
        let stdin = gate.map_or_else(Stdio::null, Gate::stdin);
        let memfd = self.file.is_none().then(|| self.mem.as_raw_fd());
        let mem = Arc::clone(&self.mem);
        Kid::start_with_stdin(c, label, self.dir.path(), stdin, memfd)
            .with_context(move || describe_region(&mem))
    }

    /// Runs `name args...` on the state and checks that it succeeded.
    fn run_ok(&self, name: &str, args: &[&str]) -> (String, String) {
        self.start(name, args).success()
    }

    /// A word of the region (0 if the region is shorter).
    fn word(&self, off: u64, len: usize) -> u64 {
        word(&self.mem, off, len)
    }

    /// Whether the writer lock is held by a thread of process `pid` (when
    /// `pid` is stopped, it holds the lock until it runs again).
    fn lock_held_by(&self, pid: u32) -> bool {
        let tid = self.word(WLOCK, 4) & WLOCK_TID;
        tid != 0 && Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
    }

    /// Whether a transaction is open (its writer may be dead).
    fn transaction_open(&self) -> bool {
        self.word(TX_WORD, 8) & 1 != 0
    }

    /// The region's size now.
    fn len(&self) -> u64 {
        self.mem.metadata().unwrap().len()
    }
}

/// A word of the region in `mem` (0 if the region is shorter).
fn word(mem: &File, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    match mem.read_exact_at(&mut b[..len], off) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}

/// The lock words of the region in `mem`, for a failure message.
fn describe_region(mem: &File) -> String {
    format!(
        "region of {} bytes: writer lock {:#x}, holder {:#x}, commit word {:#x}",
        mem.metadata().map_or(0, |m| m.len()),
        word(mem, WLOCK, 4),
        word(mem, WLOCK_HOLDER, 8),
        word(mem, TX_WORD, 8)
    )
}

/// Many processes that start their program at once: each waits on one
/// pipe (its stdin) until the test closes the write end.
struct Gate {
    read: OwnedFd,
    write: Option<OwnedFd>,
}

impl Gate {
    fn new() -> Gate {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        Gate {
            read,
            write: Some(write),
        }
    }

    fn stdin(&self) -> Stdio {
        Stdio::from(self.read.try_clone().unwrap())
    }

    /// EOF for every waiting process at once.
    fn open(&mut self) {
        self.write = None;
    }
}

/// Parses `bank check`'s line: `total T (N accounts x B), X transfers, R
/// runs, generation G, P peers`; returns (X, R, P), after checking that
/// the total is `total`.
fn bank_line(line: &str, total: &str) -> (u64, u64, u64) {
    assert!(line.starts_with(total), "{line}");
    let num = |suffix: &str| -> u64 {
        line.split(", ")
            .find_map(|f| f.trim().strip_suffix(suffix))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {suffix:?} in {line:?}"))
    };
    (num(" transfers"), num(" runs"), num(" peers"))
}

/// A `bank run` and how long it was asked to run.
struct Run {
    kid: Kid,
    seconds: f64,
}

/// Starts a `bank run` that stops by itself: most after up to 0.3 s or
/// 300 transfers (they end while others are killed), a few after 2 s.
fn start_run(sh: &Shared, rng: &mut Rng) -> Run {
    let (args, seconds) = match rng.below(8) {
        0..=3 => {
            let s = 0.01 + rng.below(290) as f64 / 1000.0;
            (vec!["run".into(), "--seconds".into(), format!("{s:.3}")], s)
        }
        4..=6 => {
            let n = 1 + rng.below(300);
            // No time bound of its own: judged with the longest one.
            (vec!["run".into(), "--transfers".into(), n.to_string()], 2.0)
        }
        _ => (vec!["run".into(), "--seconds".into(), "2".into()], 2.0),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Run {
        kid: sh.start("bank", &args),
        seconds,
    }
}

/// A bank that ended by itself (a run, or a check) must have succeeded.
/// `killed`: the pids the test killed so far, and when, for the message.
fn bank_ended(kid: &mut Kid, killed: &[(u32, Instant)]) -> (String, String) {
    let status = kid.wait(BOUND);
    let (o, e) = (kid.stdout(), kid.stderr());
    let named = e
        .split("in use by process ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse::<u32>().ok());
    let about = named.map_or_else(String::new, |pid| {
        match killed.iter().find(|k| k.0 == pid) {
            Some((_, at)) => format!(
                " (the test SIGKILLed {pid} {:?} ago; {} had started {:?} ago)",
                at.elapsed(),
                kid.label(),
                kid.started().elapsed()
            ),
            None => format!(" ({pid} was not killed by the test: {})", describe(pid)),
        }
    });
    assert!(
        status.success() && !e.contains("panicked"),
        "{} (pid {}) ended with {status}: {o}{e}{about}",
        kid.label(),
        kid.pid()
    );
    (o, e)
}

/// A run that ended by itself must have succeeded.
fn ended_run(run: &mut Run, killed: &[(u32, Instant)]) {
    let (_, e) = bank_ended(&mut run.kid, killed);
    assert!(e.contains(" transfers\n"), "{}: {e}", run.kid.label());
}

/// Issue 11, 1: eight `bank run`s at once on one memfd (created by
/// `shm-fd`, as in real use), SIGKILLed at random instructions (each one
/// killed is replaced), with `bank check`s running meanwhile: every check
/// passes (the total never changes: no half transfer is ever seen or left
/// behind, whoever dies holding the writer lock), every run the test does
/// not kill ends by itself, and every check ends (no deadlock).
#[test]
fn eight_banks_killed_at_random_while_checks_run_keep_the_total() {
    const RUNS: usize = 8;
    const TOTAL: &str = "total 100000 (100 accounts x 1000), ";
    let kills = env_count("SHARED_STATE_KILLS", 1000);
    let mut rng = Rng::seeded("SHARED_STATE_SEED", "eight_banks");
    let start = Instant::now();
    let sh = Shared::memfd();
    sh.run_ok("bank", &["init", "--accounts", "100", "--balance", "1000"]);
    let mut runs: Vec<Run> = (0..RUNS).map(|_| start_run(&sh, &mut rng)).collect();
    let mut checks: Vec<Kid> = Vec::new();
    let (mut killed, mut holding, mut in_tx, mut ended, mut checked, mut recovered) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    let mut last_transfers = 0;
    let mut killed_pids: Vec<(u32, Instant)> = Vec::new();
    let check_done =
        |kid: &mut Kid, killed: &[(u32, Instant)], last: &mut u64, checked: &mut usize| {
            let (o, e) = bank_ended(kid, killed);
            let (transfers, _, peers) = bank_line(&o, TOTAL);
            assert!(
                (1..=(RUNS + 3) as u64).contains(&peers),
                "{}: {o}",
                kid.label()
            );
            *last = (*last).max(transfers);
            *checked += 1;
            count(&e, "bank: recovered")
        };
    while killed < kills {
        sleep(Duration::from_micros(rng.below(12_000)));
        // Runs that ended by themselves.
        for run in runs.iter_mut() {
            if run.kid.poll().is_some() {
                ended_run(run, &killed_pids);
                recovered += count(&run.kid.stderr(), "bank: recovered");
                ended += 1;
                *run = start_run(&sh, &mut rng);
            } else {
                let bound = Duration::from_secs_f64(run.seconds) + BOUND;
                if run.kid.started().elapsed() > bound {
                    run.kid.wait(Duration::ZERO);
                }
            }
        }
        // Kill one. Every other victim is stopped first, to see whether it
        // holds the writer lock (and a transaction is open) at the
        // instruction it dies at; the others die running.
        let victim = &mut runs[rng.below(RUNS as u64) as usize];
        let pid = victim.kid.pid();
        let (held, open) = if rng.below(2) == 0 && victim.kid.stop() {
            let held = sh.lock_held_by(pid);
            (held, held && sh.transaction_open())
        } else {
            (false, false)
        };
        let status = victim.kid.kill();
        if status.signal() == Some(libc::SIGKILL) {
            killed_pids.push((pid, Instant::now()));
            killed += 1;
            holding += usize::from(held);
            in_tx += usize::from(open);
            recovered += count(&victim.kid.stderr(), "bank: recovered");
        } else {
            // It ended just before the kill.
            ended_run(victim, &killed_pids);
            ended += 1;
        }
        *victim = start_run(&sh, &mut rng);
        // A check every few kills, at most two at once.
        if killed % 8 == 0 && checks.len() < 2 {
            checks.push(sh.start("bank", &["check"]));
        }
        let mut i = 0;
        while i < checks.len() {
            if checks[i].poll().is_some() {
                let mut kid = checks.swap_remove(i);
                recovered += check_done(&mut kid, &killed_pids, &mut last_transfers, &mut checked);
            } else {
                if checks[i].started().elapsed() > BOUND {
                    checks[i].wait(Duration::ZERO);
                }
                i += 1;
            }
        }
    }
    // Every run left ends by itself, every check too.
    for run in runs.iter_mut() {
        let bound = Duration::from_secs_f64(run.seconds) + BOUND;
        run.kid.wait(bound);
        ended_run(run, &killed_pids);
        ended += 1;
    }
    for kid in checks.iter_mut() {
        recovered += check_done(kid, &killed_pids, &mut last_transfers, &mut checked);
    }
    let (o, e) = sh.run_ok("bank", &["check"]);
    let (transfers, logged_runs, peers) = bank_line(&o, TOTAL);
    eprintln!(
        "eight_banks: {kills} kills in {:.1} s (of the half stopped first, {holding} held the \
         writer lock, {in_tx} of them inside a transaction), {ended} runs ended by themselves, \
         {checked} concurrent checks passed, {recovered} opens recovered; final: {}",
        start.elapsed().as_secs_f64(),
        o.trim_end()
    );
    assert!(!e.contains("panicked"), "{e}");
    // Only this check is left: no dead bank passes for a live peer.
    assert_eq!(peers, 1, "{o}");
    assert!(transfers >= last_transfers && transfers > 0, "{o}");
    // Every run that ended by itself logged its start.
    assert!(logged_runs >= ended as u64, "{ended} runs ended: {o}");
    assert!(checked >= kills / 16, "only {checked} checks ran");
    // The point of the test: writers died holding the lock, in the middle
    // of a transfer.
    if kills >= 300 {
        assert!(
            in_tx >= 3,
            "only {in_tx} of {kills} kills landed inside a transaction"
        );
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The value `kv` test processes set for key number `i`: distinct lengths,
/// so that they take blocks of different sizes.
fn small_value(i: usize) -> String {
    format!("value-{i}-{}", "x".repeat(i * 37 % 500))
}

/// Issue 11, 2: 64 `kv set`s of distinct keys released at once (as many
/// as the peer table holds), then 64 `kv get`s at once: each key is there
/// with its value; then 64 `kv set`s of one key: one of their values wins,
/// and the key is listed once.
#[test]
fn sixty_four_kv_processes_at_once_lose_nothing() {
    const N: usize = 64;
    let sh = Shared::memfd();
    let keys: Vec<String> = (0..N).map(|i| format!("key-{i}")).collect();
    let values: Vec<String> = (0..N).map(small_value).collect();
    let at_once = |make: &dyn Fn(usize) -> Vec<String>| -> Vec<Kid> {
        let mut gate = Gate::new();
        let mut kids: Vec<Kid> = (0..N)
            .map(|i| {
                let args = make(i);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                sh.start_gated("kv", &args, Some(&gate))
            })
            .collect();
        gate.open();
        for kid in kids.iter_mut() {
            kid.success();
        }
        kids
    };
    at_once(&|i| vec!["set".into(), keys[i].clone(), values[i].clone()]);
    let gets = at_once(&|i| vec!["get".into(), keys[i].clone()]);
    for (i, kid) in gets.iter().enumerate() {
        assert_eq!(kid.stdout(), format!("{}\n", values[i]), "{}", kid.label());
    }
    let (list, _) = sh.run_ok("kv", &["list"]);
    let mut want: Vec<String> = (0..N)
        .map(|i| format!("{}\t{}", keys[i], values[i]))
        .collect();
    want.sort();
    assert_eq!(list.lines().collect::<Vec<_>>(), want);

    // One key, 64 writers, in a state of its own.
    let sh = Shared::memfd();
    let mut gate = Gate::new();
    let mut kids: Vec<Kid> = (0..N)
        .map(|i| sh.start_gated("kv", &["set", "same", &values[i]], Some(&gate)))
        .collect();
    gate.open();
    for kid in kids.iter_mut() {
        kid.success();
    }
    let (got, _) = sh.run_ok("kv", &["get", "same"]);
    let got = got.strip_suffix('\n').unwrap_or(&got).to_owned();
    assert!(values.contains(&got), "kv get same: {got:?}");
    let (list, _) = sh.run_ok("kv", &["list"]);
    assert_eq!(list, format!("same\t{got}\n"));
}

/// Issue 11, 3: a full peer table. As many processes as it holds
/// (`shm_state::MAX_PEERS`, 68 since format 6, bank's help says; issue 11
/// first asked for 48) share a state: `bank
/// run`s, each stopped once it works, outside the writer lock, so that
/// they cost no CPU. The next opener is refused (exit 3, the message names
/// the limit); once one of the sharers is SIGKILLed, a new opener gets its
/// entry (and counts a full table of peers, itself included), and with a
/// new sharer in it the table is full again.
#[test]
fn a_full_peer_table_refuses_the_next_sharer_until_one_dies() {
    const PEERS: usize = shm_state::MAX_PEERS;
    let mut rng = Rng::seeded("SHARED_STATE_SEED", "a_full_peer_table");
    let sh = Shared::memfd();
    sh.run_ok("bank", &["init", "--accounts", "4", "--balance", "100"]);
    // A sharer that holds its peer entry and nothing else.
    let sharer = || {
        let mut kid = sh.start("bank", &["run", "--seconds", "600"]);
        kid.wait_for_stderr("bank: ");
        loop {
            assert!(kid.stop(), "{} ended: {}", kid.label(), kid.stderr());
            if !sh.lock_held_by(kid.pid()) {
                return kid;
            }
            kid.resume();
            sleep(Duration::from_micros(200));
        }
    };
    let mut sharers: Vec<Kid> = (0..PEERS).map(|_| sharer()).collect();
    let refused = |what: &[&str]| {
        let mut kid = sh.start("bank", what);
        let status = kid.wait(BOUND);
        let e = kid.stderr();
        assert_eq!(status.code(), Some(3), "{what:?} with {PEERS} sharers: {e}");
        assert!(
            e.contains(&format!("shared by {PEERS} live processes already")),
            "{what:?} with {PEERS} sharers: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    };
    refused(&["check"]);
    refused(&["run", "--transfers", "1"]);
    // One dies: its entry is free for the next opener.
    let dead = rng.below(PEERS as u64) as usize;
    let status = sharers[dead].kill();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let (o, _) = sh.run_ok("bank", &["check"]);
    let (_, _, peers) = bank_line(&o, "total 400 (4 accounts x 100), ");
    assert_eq!(peers, PEERS as u64, "the sharers left and the check: {o}");
    // Taken by a new sharer: full again.
    sharers[dead] = sharer();
    refused(&["check"]);
    // All dead: the next opener is alone.
    for kid in sharers.iter_mut() {
        kid.kill();
    }
    let (o, _) = sh.run_ok("bank", &["check"]);
    assert_eq!(bank_line(&o, "total 400 ").2, 1, "{o}");
}

/// The value of the big key number `i`: 60..120 KB (an argument is at
/// most 128 KiB), recognisable at every position.
fn big_value(i: usize) -> String {
    let fill = char::from(b'a' + (i % 26) as u8);
    let len = 60_000 + (i * 7919) % 60_000;
    let mut v = format!("{i}:");
    v.extend(std::iter::repeat_n(fill, len));
    v
}

/// Issue 11, 4: one process after another inserts big values with `kv
/// set` (the region grows many times under the readers) while three
/// threads run `kv get` of finished keys and `kv list` the whole time:
/// none dies (SIGBUS on a mapping shorter than the region would), every
/// get returns the value, every list holds every finished key.
fn growth_under_readers(sh: &Shared, test: &str) {
    const READERS: u64 = 3;
    let keys = env_count("SHARED_STATE_BIG_KEYS", 120);
    let rng = Rng::seeded("SHARED_STATE_SEED", test);
    let done = AtomicUsize::new(0);
    let writing = AtomicBool::new(true);
    let start_len = sh.len();
    let (mut growths, mut last_len) = (0usize, start_len);
    let reads = std::thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let mut rng = rng.fork(r + 1);
                let (done, writing) = (&done, &writing);
                s.spawn(move || {
                    let (mut gets, mut lists, mut during) = (0usize, 0usize, 0usize);
                    // At least one round after the last set.
                    let mut last_round = false;
                    while !last_round {
                        last_round = !writing.load(Ordering::SeqCst);
                        let finished = done.load(Ordering::SeqCst);
                        if finished == 0 {
                            sleep(Duration::from_millis(1));
                            continue;
                        }
                        if rng.below(4) == 0 {
                            let mut kid = sh.start("kv", &["list"]);
                            let (o, _) = kid.success();
                            let mut seen = 0;
                            for line in o.lines() {
                                let (k, v) = line.split_once('\t').expect("key<TAB>value");
                                let i: usize = k.strip_prefix("big-").unwrap().parse().unwrap();
                                assert!(v == big_value(i), "{}: value of {k} differs", kid.label());
                                seen += usize::from(i < finished);
                            }
                            assert_eq!(
                                seen,
                                finished,
                                "{}: a finished key is missing",
                                kid.label()
                            );
                            lists += 1;
                        } else {
                            let i = rng.below(finished as u64) as usize;
                            let key = format!("big-{i}");
                            let mut kid = sh.start("kv", &["get", &key]);
                            let (o, _) = kid.success();
                            assert!(
                                o.strip_suffix('\n') == Some(&big_value(i)),
                                "{}: kv get {key} returned {} bytes, not its value",
                                kid.label(),
                                o.len()
                            );
                            gets += 1;
                        }
                        during += usize::from(!last_round);
                    }
                    (gets, lists, during)
                })
            })
            .collect();
        for i in 0..keys {
            let value = big_value(i);
            sh.run_ok("kv", &["set", &format!("big-{i}"), &value]);
            // Grown under the readers' mappings (not created).
            let len = sh.len();
            growths += usize::from(len > last_len && last_len > 0);
            last_len = len;
            done.store(i + 1, Ordering::SeqCst);
        }
        writing.store(false, Ordering::SeqCst);
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
    });
    let (gets, lists, during) = reads;
    eprintln!(
        "{test}: {keys} big values, the region grew {growths} times ({start_len} -> {last_len} \
         bytes); {gets} gets and {lists} lists, {during} of them while values were set"
    );
    // It doubles: 1.2 MB at creation, then 2.4, 4.7, 9.4 and 18.9 MB for
    // the default 120 values (10.8 MB).
    let want = if keys >= 120 { 4 } else { 1 };
    assert!(growths >= want, "the region grew only {growths} times");
    assert!(during >= 3, "only {during} reads ran while values were set");
}

#[test]
fn a_growing_memfd_under_concurrent_readers() {
    growth_under_readers(&Shared::memfd(), "a_growing_memfd");
}

#[test]
fn a_growing_file_under_concurrent_readers() {
    growth_under_readers(&Shared::file(), "a_growing_file");
}
