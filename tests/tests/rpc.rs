//! Black-box tests of `rpc`: a server answers client processes over
//! shm-state rings, each request applied once (in the transaction that
//! pops it and pushes the answer) and answered once (popped in the
//! transaction that records it answered), across kill -9.
//!
//! - `rpc run` with 64 clients for a second ends consistent, every client
//!   answered.
//! - The server killed (kill -9, by pid) at random moments while 8
//!   clients run, started again each time; then every client started
//!   again with a count: each ends with all its answers, each checked
//!   right by the client (an answer is the sum of the client's requests
//!   so far, so a request applied twice or lost makes every later answer
//!   wrong), and `rpc check` finds the state consistent; the test also
//!   checks each account itself.
//! - Clients killed at random and started again with the same id: the
//!   same, and a restarted client waits for the answer to a request it
//!   sent before it died (the server refuses a request sent twice, which
//!   fails the client and the check).
//! - One server and one process per client number at a time.
//! - A state that is not rpc's is refused in one line; a consistent state
//!   changed behind rpc's back (a sum off by one, a request counted sent
//!   but never pushed) fails `rpc check` with exit 1.
//!
//! Every process is the test's own child with `PR_SET_PDEATHSIG`, killed
//! only by its pid and always reaped; every wait is bounded ([`BOUND`]).
//! The test opens the state itself (a [`SharedState`] of the same root
//! type, a peer like the others) to follow the counters. Environment:
//! `RPC_KILLS` (kills in each kill test, default 40), `RPC_SEED=N` to
//! replay a run's random choices.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use shm_fd_tests::{BOUND, Kid, Rng, cmd, cpu_time, env_count, killed, run_within, text};
use shm_state::{Layout, SharedState, Source, StateMap, StateRing, StateVec};

/// Clients in the kill tests.
const CLIENTS: u64 = 8;

/// The writer lock: a futex word of shm-state's header (no snapshot
/// page before the region here), bits 0..30 its holder's thread id
/// (`docs/state-format.md`).
const WLOCK: u64 = 0x300;
const WLOCK_TID: u64 = 0x3FFF_FFFF;

/// The root, as `examples/rpc` defines it (version 1; a different size is
/// refused by the open, on either side).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    accounts: StateMap<u64, Account>,
    slots: StateVec<Slot>,
    clients: u64,
    stop: u64,
    served: u64,
    servers: u64,
}

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Slot {
    requests: StateRing,
    responses: StateRing,
    sent: u64,
    answered: u64,
    wrong: u64,
    first_wrong: u64,
    starts: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Account {
    applied: u64,
    last: u64,
    sum: u64,
    refused: u64,
    first_refused: u64,
}

/// The sum after requests 1..=n, each applied once, counted here one by
/// one: request `i` adds `i` unless `i` is a multiple of 4 (a get).
fn sum_after(n: u64) -> u64 {
    (1..=n).filter(|i| i % 4 != 0).sum()
}

/// How the rpc tests judge a process that should succeed.
trait SuccessStarting {
    /// Waits (at most [`BOUND`]) and checks that it exited 0 with stdout
    /// starting with `want`, stderr empty; returns stdout.
    fn success_starting(&mut self, want: &str) -> String;
}

impl SuccessStarting for Kid {
    fn success_starting(&mut self, want: &str) -> String {
        let (o, _) = self.success_with(&format!("{want:?} first, an empty stderr"), |o, e| {
            o.starts_with(want) && e.is_empty()
        });
        o
    }
}

/// One rpc state: a memfd the test created (as `shm-fd` would), passed
/// to every `rpc` the test starts as `shm-fd` passes it (fd 3,
/// `LISTEN_FDS=1`, `LISTEN_FDNAMES`), and open in the test as a
/// [`SharedState`] to read the counters.
struct Rpc {
    /// The memfd, for the children and for raw reads of the lock word.
    mem: File,
    state: SharedState<Root>,
    started: AtomicUsize,
    dir: tempfile::TempDir,
}

impl Rpc {
    /// A new memfd set up by `rpc init --clients N`.
    fn new(clients: u64) -> Rpc {
        let fd = shm_fd::SharedFd::create(shm_fd::DEFAULT_NAME, Default::default()).unwrap();
        let mem = fd.try_clone().unwrap().into_file();
        let dir = tempfile::tempdir().unwrap();
        let mut rpc = Rpc {
            mem,
            // Opened first (creating an empty state with a zeroed root),
            // then set up by `rpc init` below.
            state: {
                // SAFETY: the memfd is this test's own, sealed against
                // shrinking, written only through shm-state (here and in
                // the rpc processes).
                let source = unsafe { Source::shared(fd) };
                SharedState::open(source, Layout::new(1)).unwrap()
            },
            started: AtomicUsize::new(0),
            dir,
        };
        let n = clients.to_string();
        rpc.start(&["init", "--clients", &n])
            .success_starting(&format!("set up for {clients} clients\n"));
        assert_eq!(rpc.root().clients, clients);
        rpc
    }

    /// Starts `rpc args...` on the memfd.
    fn start(&self, args: &[&str]) -> Kid {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let label = format!("{n:05}-rpc-{}", args.join("-"));
        let mut c = cmd("rpc");
        c.env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", shm_fd::DEFAULT_NAME)
            .args(args);
        Kid::start(c, label, self.dir.path(), Some(self.mem.as_raw_fd()))
    }

    /// Starts client `k`, sending until requests 1..=`requests` are
    /// answered (`None`: until it is killed).
    fn client(&self, k: u64, requests: Option<u64>) -> Kid {
        let k = k.to_string();
        let mut args = vec!["client", "--id", &k, "--timeout", "60"];
        let r = requests.map(|r| r.to_string());
        if let Some(r) = &r {
            args.extend(["--requests", r]);
        }
        self.start(&args)
    }

    /// Every client killed (they run without a count), then started
    /// again with a count a little above the most any has answered:
    /// each must end by itself with all its answers. The count.
    fn finish_clients(&mut self, clients: &mut [Kid]) -> u64 {
        for c in clients.iter_mut() {
            let status = c.kill();
            assert!(
                killed(status),
                "{} ended by itself ({status}): {}",
                c.label(),
                c.stderr()
            );
        }
        let count = self.slots().iter().map(|s| s.answered).max().unwrap() + 10;
        for (k, c) in clients.iter_mut().enumerate() {
            *c = self.client(k as u64, Some(count));
        }
        for c in clients.iter_mut() {
            c.success_starting(&format!("answered {count} ("));
        }
        count
    }

    fn root(&mut self) -> Root {
        self.state.read(|v| v.root()).unwrap()
    }

    fn slots(&mut self) -> Vec<Slot> {
        let h = self.root().slots;
        self.state.read(|v| v.vec(h)).unwrap()
    }

    fn account(&mut self, k: u64) -> Account {
        let h = self.root().accounts;
        self.state
            .read(|v| v.map(h)?.get(&k))
            .unwrap()
            .unwrap_or_default()
    }

    /// Sleeps on the commit word until `f` holds or `bound` passes; true
    /// if it held.
    fn wait_until(&mut self, bound: Duration, mut f: impl FnMut(&Root, &[Slot]) -> bool) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let word = self.state.commit_word();
            let (root, slots) = (self.root(), self.slots());
            if f(&root, &slots) {
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

    /// Whether the writer lock is held by a thread of process `pid`.
    fn lock_held_by(&self, pid: u32) -> bool {
        // SAFETY: a read-only mapping of the memfd's first page (shm-state
        // never shrinks it); the word is only read, atomically.
        let map = unsafe { memmap2::MmapOptions::new().len(4096).map(&self.mem) }.unwrap();
        let word = &map[WLOCK as usize..WLOCK as usize + 4];
        // SAFETY: 4 bytes at a 4-aligned offset of a page-aligned mapping
        // that outlives the reference; other processes change the word
        // only with atomic operations.
        let word = unsafe { &*(word.as_ptr() as *const AtomicU32) };
        let deadline = Instant::now() + Duration::from_millis(50);
        let mut checked = 0u64;
        while Instant::now() < deadline {
            let tid = u64::from(word.load(Ordering::Acquire)) & WLOCK_TID;
            if tid != 0 && tid != checked {
                if Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
                    return true;
                }
                checked = tid;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Every client's `requests` were sent, applied once each and
    /// answered right; nothing is in flight; `rpc check` agrees.
    fn assert_complete(&mut self, requests: u64) {
        let root = self.root();
        let slots = self.slots();
        let mut taken = 0;
        for (k, s) in slots.iter().enumerate() {
            let a = self.account(k as u64);
            assert_eq!(
                (s.sent, s.answered, s.wrong),
                (requests, requests, 0),
                "client {k}: {s:?}"
            );
            assert_eq!(
                a,
                Account {
                    applied: requests,
                    last: requests,
                    sum: sum_after(requests),
                    refused: 0,
                    first_refused: 0
                },
                "client {k}'s account"
            );
            taken += a.applied;
        }
        assert_eq!(root.served, taken);
        let total = requests * slots.len() as u64;
        self.start(&["check"]).success_starting(&format!(
            "{} clients: {total} sent, {total} answered; 0 requests and 0 responses in flight\n",
            slots.len()
        ));
    }

    /// Stops the server (`rpc stop`) and checks that it exits 0.
    fn stop(&mut self, server: &mut Kid) {
        self.start(&["stop"])
            .success_starting("stopped: server process ");
        server.success_starting("serving ");
        assert!(server.stdout().contains("\nserved "), "{}", server.stdout());
    }
}

/// The numbers of `N clients, S s: T requests, R requests/s`.
fn requests_line(line: &str) -> Option<(u64, f64, u64, f64)> {
    let (n, rest) = line.split_once(" clients, ")?;
    let (s, rest) = rest.split_once(" s: ")?;
    let (t, rest) = rest.split_once(" requests, ")?;
    let r = rest.strip_suffix(" requests/s")?;
    Some((
        n.parse().ok()?,
        s.parse().ok()?,
        t.parse().ok()?,
        r.parse().ok()?,
    ))
}

#[test]
fn sixty_four_clients_for_a_second_end_consistent_and_every_client_answered() {
    let out = run_within(
        cmd("rpc").args(["run", "--clients", "64", "--seconds", "1"]),
        Duration::from_secs(120),
    );
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stdout: {o}\nstderr: {e}");
    assert!(e.is_empty(), "{e}");
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines.len(), 3, "{o}");
    let (n, s, total, rate) =
        requests_line(lines[0]).unwrap_or_else(|| panic!("not a requests line: {:?}", lines[0]));
    assert_eq!(n, 64, "{o}");
    assert!((1.0..60.0).contains(&s), "{o}");
    assert!(total > 0, "{o}");
    let expected = total as f64 / s;
    assert!((rate - expected).abs() <= expected * 0.01 + 1.0, "{o}");
    let fewest: u64 = lines[1]
        .strip_prefix("per client: fewest ")
        .and_then(|r| r.split(',').next())
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("not a per-client line: {:?}", lines[1]));
    assert!(fewest > 0, "a client got no answer: {o}");
    assert!(
        lines[1].contains(&format!("; server: served {total} requests")),
        "{o}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "consistent: every request sent was applied once and answered right ({total} sent, {total} answered, 0 in flight)"
        )),
        "{o}"
    );
}

/// The server killed with SIGKILL (by pid) `RPC_KILLS` times (default 40)
/// while 8 clients send requests, and started again at once each time.
/// A quarter of the kills come within 3 ms of the server's start (exec,
/// open, attach), a quarter the moment it is seen holding the writer lock
/// (in a transaction; looked for up to 50 ms), the others once it has
/// served 1 to 40 more requests (at most 200 ms). Then the clients are
/// started again with a count a little above the most any answered; each
/// must end with all its answers (it checks each), the accounts must hold
/// each request applied once, and `rpc check` must agree.
#[test]
fn server_killed_at_random_applies_and_answers_every_request_once() {
    let kills = env_count("RPC_KILLS", 40);
    let mut rng = Rng::seeded("RPC_SEED", "rpc server kills");
    let start = Instant::now();
    let mut rpc = Rpc::new(CLIENTS);
    let mut server = rpc.start(&["serve"]);
    assert!(rpc.wait_until(BOUND, |r, _| r.servers == 1));
    // One server at a time.
    let mut second = rpc.start(&["serve"]);
    let status = second.wait(BOUND);
    assert!(
        status.code() == Some(3)
            && second.stderr()
                == format!(
                    "rpc: server: another server (process {}) serves this state\n",
                    server.pid()
                ),
        "{status}: {}",
        second.stderr()
    );
    let mut clients: Vec<Kid> = (0..CLIENTS).map(|k| rpc.client(k, None)).collect();
    let (mut early, mut holding) = (0usize, 0usize);
    for _ in 0..kills {
        match rng.below(4) {
            0 => {
                early += 1;
                sleep(Duration::from_micros(rng.below(3000)));
            }
            1 => {
                if rpc.lock_held_by(server.pid()) {
                    holding += 1;
                }
            }
            _ => {
                let target = rpc.root().served + 1 + rng.below(40);
                rpc.wait_until(Duration::from_millis(200), |r, _| r.served >= target);
            }
        }
        let status = server.kill();
        assert!(
            killed(status),
            "the server ended by itself ({status}): {}",
            server.stderr()
        );
        server = rpc.start(&["serve"]);
    }
    let killing = start.elapsed();
    let served_then = rpc.root().served;
    let count = rpc.finish_clients(&mut clients);
    rpc.stop(&mut server);
    // Servers that got as far as attaching (an early kill may come
    // before; the second one was refused before).
    let servers = rpc.root().servers;
    assert!(
        (2..=kills as u64 + 1).contains(&servers),
        "{servers} servers"
    );
    rpc.assert_complete(count);
    eprintln!(
        "rpc server kills: {kills} kills of the server ({early} within 3 ms of its start, {holding} seen holding the writer lock; {servers} starts attached) while {CLIENTS} clients ran ({served_then} requests served then); the clients ended at {count} requests each; kills took {killing:?}, all {:?}",
        start.elapsed()
    );
}

/// Random clients killed with SIGKILL `RPC_KILLS` times (default 40),
/// each started again at once with the same id. A quarter of the kills
/// come within 3 ms of the victim's start; the others once it has had 1
/// to 10 more answers (at most 200 ms). A restarted client must go on
/// from its committed counters: with a request sent and not yet answered,
/// it waits for that answer (sending it again would be refused by the
/// server and fail the client and the check). At least one kill must
/// catch a client with a request in flight. Then every client is started
/// again with a count, and must end with all its answers; the accounts
/// and `rpc check` must agree.
#[test]
fn clients_killed_at_random_and_restarted_get_every_answer_once() {
    let kills = env_count("RPC_KILLS", 40);
    let mut rng = Rng::seeded("RPC_SEED", "rpc client kills");
    let start = Instant::now();
    let mut rpc = Rpc::new(CLIENTS);
    let mut clients: Vec<Kid> = (0..CLIENTS).map(|k| rpc.client(k, None)).collect();
    // One process per client number.
    assert!(rpc.wait_until(BOUND, |_, s| s[0].starts == 1));
    let mut twin = rpc.client(0, None);
    let status = twin.wait(BOUND);
    assert!(
        status.code() == Some(3)
            && twin.stderr()
                == format!(
                    "rpc: client 0: client 0 already runs (process {})\n",
                    clients[0].pid()
                ),
        "{status}: {}",
        twin.stderr()
    );
    let mut server = rpc.start(&["serve"]);
    let (mut early, mut in_flight) = (0usize, 0usize);
    for _ in 0..kills {
        let k = rng.below(CLIENTS) as usize;
        if rng.below(4) == 0 {
            early += 1;
            sleep(Duration::from_micros(rng.below(3000)));
        } else {
            let target = rpc.slots()[k].answered + 1 + rng.below(10);
            rpc.wait_until(Duration::from_millis(200), |_, s| s[k].answered >= target);
        }
        let status = clients[k].kill();
        assert!(
            killed(status),
            "{} ended by itself ({status}): {}",
            clients[k].label(),
            clients[k].stderr()
        );
        let s = rpc.slots()[k];
        if s.sent > s.answered {
            in_flight += 1;
        }
        clients[k] = rpc.client(k as u64, None);
    }
    let killing = start.elapsed();
    let count = rpc.finish_clients(&mut clients);
    rpc.stop(&mut server);
    // Starts that got as far as attaching (an early kill may come
    // before; the twin was refused before).
    let starts: u64 = rpc.slots().iter().map(|s| s.starts).sum();
    assert!(
        (CLIENTS + 1..=2 * CLIENTS + kills as u64).contains(&starts),
        "{starts} starts"
    );
    rpc.assert_complete(count);
    eprintln!(
        "rpc client kills: {kills} kills of random clients ({early} within 3 ms of a start, {in_flight} with a request in flight; {starts} starts attached, the final ones included); the clients ended at {count} requests each; kills took {killing:?}, all {:?}",
        start.elapsed()
    );
    assert!(
        kills < 20 || in_flight > 0,
        "none of {kills} kills caught a client with a request in flight"
    );
}

/// Waiting costs no CPU: a server with no request to serve, and clients
/// whose server was killed while they wait for an answer, each use well
/// under 100 ms of CPU in a second (a busy loop would use all of it); the
/// clients go on when a server comes back.
#[test]
fn an_idle_server_and_clients_whose_server_is_gone_wait_without_cpu() {
    const MAX: Duration = Duration::from_millis(100);
    let mut rpc = Rpc::new(2);
    let mut server = rpc.start(&["serve"]);
    assert!(rpc.wait_until(BOUND, |r, _| r.servers == 1));
    sleep(Duration::from_millis(100));
    let idle = server.cpu_during(Duration::from_secs(1));
    let mut clients: Vec<Kid> = (0..2).map(|k| rpc.client(k, None)).collect();
    assert!(rpc.wait_until(BOUND, |_, s| s.iter().all(|s| s.answered >= 10)));
    assert!(killed(server.kill()));
    // Each client sends its next request and waits for the answer.
    assert!(rpc.wait_until(BOUND, |_, s| s.iter().all(|s| s.sent > s.answered)));
    sleep(Duration::from_millis(100));
    let before: Vec<Duration> = clients.iter().map(|c| cpu_time(c.pid())).collect();
    sleep(Duration::from_secs(1));
    let waiting: Vec<Duration> = clients
        .iter_mut()
        .zip(before)
        .map(|(c, b)| {
            assert!(c.poll().is_none(), "{} ended: {}", c.label(), c.stderr());
            cpu_time(c.pid()) - b
        })
        .collect();
    let mut server = rpc.start(&["serve"]);
    let count = rpc.finish_clients(&mut clients);
    rpc.stop(&mut server);
    rpc.assert_complete(count);
    eprintln!(
        "rpc waits: CPU in 1 s: an idle server {idle:?}, clients whose server is gone {waiting:?}"
    );
    assert!(idle < MAX, "the idle server used {idle:?}");
    assert!(
        waiting.iter().all(|&w| w < MAX),
        "the waiting clients used {waiting:?}"
    );
}

/// Runs `rpc ARGS` (no memfd passed): exit code, stdout, stderr.
fn rpc_run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = run_within(cmd("rpc").args(args), BOUND);
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

/// A state that is not rpc's, or no state at all, is refused in one line
/// (exit 3); a consistent rpc state changed behind rpc's back fails the
/// check (exit 1), naming the client and what disagrees.
#[test]
fn check_refuses_other_states_and_catches_a_state_changed_behind_its_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    // Another example's state (the same library, another root).
    let other = path("clients.state");
    let out = run_within(
        cmd("clients").args([
            "run",
            "--clients",
            "2",
            "--seconds",
            "0.1",
            "--file",
            &other,
        ]),
        BOUND,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    std::fs::write(path("noise"), [0x5Au8; 65536]).unwrap();
    for (args, want) in [
        (vec!["--file", &other, "check"], "rpc: not an rpc state: "),
        (
            vec!["--file", &path("noise"), "check"],
            "rpc: not an rpc state: ",
        ),
        (vec!["--file", &path("missing"), "check"], "rpc: "),
        (vec!["check"], "rpc: no shared memory fd"),
        (vec!["--file", &path("missing"), "serve"], "rpc: server: "),
    ] {
        let (code, o, e) = rpc_run(&args);
        assert_eq!(code, Some(3), "{args:?}\nstdout: {o}\nstderr: {e}");
        assert!(o.is_empty(), "{args:?}: {o}");
        assert!(
            e.starts_with(want) && e.lines().count() == 1,
            "{args:?}: {e}"
        );
    }
    assert!(!Path::new(&path("missing")).exists());

    // A consistent state, then changed by hand.
    let state = path("rpc.state");
    let (code, o, e) = rpc_run(&[
        "--file",
        &state,
        "run",
        "--clients",
        "2",
        "--seconds",
        "0.3",
    ]);
    assert_eq!(code, Some(0), "stdout: {o}\nstderr: {e}");
    let (code, o, e) = rpc_run(&["--file", &state, "check"]);
    assert_eq!(code, Some(0), "stdout: {o}\nstderr: {e}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&state)
        .unwrap();
    // SAFETY: the file is this test's; no rpc process runs on it now.
    let source = unsafe { Source::file(file) };
    let mut s = SharedState::<Root>::open(source, Layout::new(1)).unwrap();
    let root = s.read(|v| v.root()).unwrap();
    // Client 0's sum as if a request had been applied twice; client 1
    // counting a request sent that is in no ring.
    s.transaction(|tx| {
        let mut a = *tx.map(root.accounts)?.get(&0)?.unwrap();
        a.sum += 1;
        tx.map(root.accounts)?.insert(&0, &a)?;
        tx.vec(root.slots)?.get_mut(1)?.sent += 1;
        Ok::<_, shm_state::Error>(())
    })
    .unwrap();
    drop(s);
    let (code, _, e) = rpc_run(&["--file", &state, "check"]);
    assert_eq!(code, Some(1), "{e}");
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert!(
        lines[0].starts_with("rpc check: client 0: its sum is ")
            && lines[0].ends_with("a request was applied twice or lost"),
        "{e}"
    );
    assert!(
        lines[1].starts_with(
            "rpc check: client 1: 0 request(s) in its ring, expected the 1 not yet applied"
        ),
        "{e}"
    );
}

/// `rpc --help` documents the exit codes and hides the start signal,
/// `--version` gives the workspace's version (as for the other examples in
/// `examples_cli.rs`), and bad command lines exit 2.
#[test]
fn help_documents_the_exit_codes_and_bad_command_lines_exit_2() {
    let (code, o, e) = rpc_run(&["--help"]);
    assert_eq!(code, Some(0), "{e}");
    for want in [
        "Exit codes:",
        "0  success",
        "1  inconsistent",
        "2  bad command line",
        "3  the state cannot be used",
    ] {
        assert!(o.contains(want), "no {want:?} in:\n{o}");
    }
    assert!(o.contains("\nUsage: rpc "), "{o}");
    assert!(!o.contains("wait-start"), "{o}");
    let (code, o, e) = rpc_run(&["--version"]);
    assert_eq!(code, Some(0), "{e}");
    assert_eq!(o, format!("rpc {}\n", env!("CARGO_PKG_VERSION")));
    for args in [
        &["run", "--clients", "0"][..],
        &["run", "--clients", "68"],
        &["run", "--seconds", "0"],
        &["run", "--seconds", "-1"],
        &["run", "--clients", "many"],
        &["client", "--id", "0", "--timeout=-1"],
    ] {
        let (code, o, e) = rpc_run(args);
        assert_eq!(code, Some(2), "{args:?}\nstdout: {o}\nstderr: {e}");
        assert!(o.is_empty(), "{args:?}: {o}");
        if args[1] != "--clients" || args[2] != "many" {
            assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        }
    }
}
