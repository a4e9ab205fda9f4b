//! Black-box tests of `primes-snapshot` (shm-snapshot's example) under
//! `shm-fd` and `shm-restore`: the table is right, foreign state is
//! refused, and kill -9 of the whole tree at random moments always
//! restarts from a snapshot holding a prefix of the primes, with progress.
//! Memfds crafted byte by byte (from `docs/snapshot-protocol.md` and the
//! layout in primes-snapshot's docs, with an independent CRC) pin what a
//! start does with interrupted, damaged and foreign state.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use shm_fd_tests::{bin, cmd, crc32, first_primes, run, text};

fn b(name: &str) -> String {
    bin(name).to_str().unwrap().to_owned()
}

/// Parses a printed table, one prime per line.
fn table(out: &str) -> Vec<u64> {
    out.lines()
        .map(|l| l.parse().unwrap_or_else(|_| panic!("not a number: {l:?}")))
        .collect()
}

fn assert_prefix_of_primes(got: &[u64], what: &str) {
    let want = first_primes(got.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: entry {i} is {} but the {i}-th prime is {} ({} entries)",
            got[i],
            want[i],
            got.len()
        );
    }
}

#[test]
fn table_is_the_primes_and_runs_continue() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("p.snap");
    let s = snap.to_str().unwrap();
    let out =
        run(cmd("shm-restore").args(["-q", s, "--", &b("primes-snapshot"), "--limit", "3000"]));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    let first = table(&o);
    assert!(first.len() >= 3000, "{} primes", first.len());
    assert_prefix_of_primes(&first, "first run");
    assert!(e.contains("generated") && e.contains("total"), "{e}");

    // The next run continues from the saved state: a longer table that
    // starts with the first one.
    let out =
        run(cmd("shm-restore").args(["-q", s, "--", &b("primes-snapshot"), "--limit", "20000"]));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    let second = table(&o);
    assert!(second.len() >= 20000);
    assert_eq!(&second[..first.len()], &first[..]);
    assert_prefix_of_primes(&second, "second run");
}

#[test]
fn outside_a_watcher_and_on_foreign_state_it_fails_cleanly() {
    let out = run(&mut cmd("primes-snapshot"));
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{e}");
    assert!(e.contains("shm-fd"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    let out = run(cmd("primes-snapshot").arg("--span").arg("3"));
    assert_eq!(out.status.code(), Some(2));

    // `primes` keeps its table at offset 0 of the memfd: that is not a
    // shm-snapshot header, and primes-snapshot must neither use nor touch it.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("other.snap");
    let s = snap.to_str().unwrap();
    let out = run(cmd("shm-restore").args(["-q", s, "--", &b("primes")]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let out = run(cmd("shm-restore").args(["-q", s, "--", &b("primes-snapshot"), "--limit", "10"]));
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("not a shm-snapshot header"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // Refused before anything was touched: `primes` goes on with its table
    // (a grown or rewritten memfd would make it fail or start over).
    let out = run(cmd("shm-restore").args(["-q", s, "--", &b("primes")]));
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(e.contains("total 2002"), "the primes table survived: {e}");
}

/// The pid of `parent`'s first child, once it has one.
fn child_of(parent: u32, deadline: Instant) -> Option<i32> {
    while Instant::now() < deadline {
        let path = format!("/proc/{parent}/task/{parent}/children");
        let first = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
        if first.is_some() {
            return first;
        }
        sleep(Duration::from_millis(2));
    }
    None
}

/// kill -9 of the wrapper and of the program (its own process group).
fn kill_tree(wrapper: &mut Child, program: Option<i32>) {
    let _ = kill(Pid::from_raw(wrapper.id() as i32), Signal::SIGKILL);
    if let Some(pid) = program {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = wrapper.wait();
    if let Some(pid) = program {
        // Not our child: wait until it is gone so the next round starts
        // clean (the kernel reaps it once its parent is dead).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.contains(") Z") {
                break;
            }
            sleep(Duration::from_millis(2));
        }
    }
}

/// The table the snapshot file restores (by running the program with
/// `--limit 1`, which prints the restored table and exits).
fn restored_table(snap: &Path) -> Vec<u64> {
    let out = run(cmd("shm-restore").args([
        "-q",
        snap.to_str().unwrap(),
        "--",
        &b("primes-snapshot"),
        "--limit",
        "1",
    ]));
    let (o, e) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "restart from the snapshot failed: {e}"
    );
    table(&o)
}

/// Rounds of kill -9 (env `SHM_SNAPSHOT_KILL_ROUNDS`, default 8; try 200
/// for a long run), plain stop mode.
#[test]
fn kill_9_of_the_whole_tree_restores_a_prefix_and_progresses() {
    kill_9_rounds(&[], "1");
}

/// The same with `--snapshot restore-v1`, where saves copy the memfd while
/// primes-snapshot runs; SIGUSR1 saves in each round must report, at
/// least once over the rounds, a committed state copied without stopping
/// the command, and the command must never be taken for one without the
/// protocol. The command sleeps 10 ms between chunks so that a copy (slow
/// in a debug build) fits between commits; with 1 ms every try fails and
/// every save is the fallback stop.
#[test]
fn kill_9_in_protocol_mode_restores_a_prefix_and_copies_while_running() {
    let stderr = kill_9_rounds(&["--snapshot", "restore-v1"], "10");
    assert!(
        !stderr.contains("does not use shm-snapshot"),
        "the protocol was not recognised: {stderr}"
    );
    let kept = stderr.matches("copied while the command ran").count();
    let stopped = stderr.matches("optimistic tries").count();
    eprintln!("SIGUSR1 saves: {kept} copied while running, {stopped} after a stop");
    assert!(
        kept > 0,
        "no save copied a committed state without stopping the command: {stderr}"
    );
}

/// Runs the kill -9 rounds with `flags` for shm-restore and primes-snapshot
/// sleeping `interval_ms` between chunks; returns the wrappers' stderr (of
/// all rounds).
fn kill_9_rounds(flags: &[&str], interval_ms: &str) -> String {
    let rounds: u32 = std::env::var("SHM_SNAPSHOT_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}, flags {flags:?}");
    let mut x = seed;
    let mut random = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("primes.snap");
    let mut last_len = 0;
    let mut lens = Vec::new();
    let mut stderr = String::new();
    for round in 0..rounds {
        let log = dir.path().join(format!("stderr-{round}"));
        let mut wrapper = cmd("shm-restore")
            .args(["--interval", "20ms"])
            .args(flags)
            .args([snap.to_str().unwrap(), "--"])
            .args([
                &b("primes-snapshot"),
                "--interval-ms",
                interval_ms,
                "--span",
                "4096",
            ])
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let program = child_of(wrapper.id(), Instant::now() + Duration::from_secs(10));
        let wait = 60 + random(300);
        // Saves that report how they copied (periodic ones are silent).
        for _ in 0..2 {
            sleep(Duration::from_millis(wait / 3));
            let _ = kill(Pid::from_raw(wrapper.id() as i32), Signal::SIGUSR1);
        }
        sleep(Duration::from_millis(wait - 2 * (wait / 3)));
        kill_tree(&mut wrapper, program);
        stderr += &std::fs::read_to_string(&log).unwrap_or_default();

        let got = restored_table(&snap);
        assert_prefix_of_primes(&got, &format!("round {round} (seed {seed})"));
        assert!(
            got.len() >= last_len,
            "round {round}: the snapshot went back from {last_len} to {} primes",
            got.len()
        );
        last_len = got.len();
        lens.push(got.len());
    }
    eprintln!("restored table lengths: {lens:?}");
    assert!(
        last_len > 1000,
        "no progress over {rounds} rounds: {lens:?} (seed {seed})"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

// ---- crafted memfds ------------------------------------------------------

const PAGE: u64 = 4096;
/// primes-snapshot's data region: magic, count, next, table at +64.
const DATA: u64 = PAGE;

/// Bytes 0..24 of a valid version 1 shm-snapshot header.
fn header_bytes() -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(b"shm-snap");
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&4096u32.to_le_bytes());
    let crc = crc32(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A memfd made here, handed to a command as fd 3 with `LISTEN_FDS=1`.
struct Memfd(File);

impl Memfd {
    fn new(len: u64) -> Memfd {
        let fd = nix::sys::memfd::memfd_create(
            "shm-snapshot-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .unwrap();
        let file = File::from(fd);
        file.set_len(len).unwrap();
        Memfd(file)
    }

    /// A memfd with a valid header whose sequence word is `seq`.
    fn with_header(seq: u64) -> Memfd {
        let m = Memfd::new(PAGE + (1 << 20));
        m.write(0, &header_bytes());
        m.u64(64, seq);
        m
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        self.0.write_all_at(bytes, at).unwrap();
    }

    fn u64(&self, at: u64, v: u64) {
        self.write(at, &v.to_le_bytes());
    }

    fn read_u64(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        self.0.read_exact_at(&mut b, at).unwrap();
        u64::from_le_bytes(b)
    }

    fn bytes(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.0.read_exact_at(&mut b, 0).unwrap();
        b
    }

    /// primes-snapshot's state: magic, count, next and a table.
    fn primes_state(&self, magic: bool, count: u64, next: u64, table: &[u64]) {
        if magic {
            self.write(DATA, b"primesnp");
        }
        self.u64(DATA + 8, count);
        self.u64(DATA + 16, next);
        for (i, p) in table.iter().enumerate() {
            self.u64(DATA + 64 + 8 * i as u64, *p);
        }
    }

    fn allocated(&self) -> u64 {
        nix::sys::stat::fstat(&self.0).unwrap().st_blocks as u64 * 512
    }

    /// Runs `primes-snapshot args` on this memfd (killed after 60 s: a
    /// start must never loop).
    fn run(&self, args: &[&str], stdout: Stdio) -> Output {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec 3<>"$0" && exec "$@""#)
            .arg(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.0.as_raw_fd()
            ))
            .arg(bin("primes-snapshot"))
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "SHM_SHARED_FD")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "primes-snapshot {args:?} did not finish in 60 s: {}",
                    text(&out).1
                );
            }
            sleep(Duration::from_millis(5));
        }
        child.wait_with_output().unwrap()
    }

    /// Runs with `--limit n`: the table it prints, or its exit code and
    /// stderr.
    fn table(&self, n: u64) -> Result<Vec<u64>, (Option<i32>, String)> {
        let out = self.run(&["--limit", &n.to_string()], Stdio::piped());
        let (o, e) = text(&out);
        assert!(!e.contains("panicked"), "{e}");
        match out.status.code() {
            Some(0) => Ok(table(&o)),
            code => Err((code, e)),
        }
    }
}

#[test]
fn a_header_setup_cut_short_is_taken_up_not_refused() {
    // Header::init writes bytes 8..24 as two words, then the magic: a
    // kill -9 (or a stopped copy) in between leaves one or both words.
    for words in [&[8u64][..], &[16], &[8, 16]] {
        let m = Memfd::new(PAGE + (1 << 20));
        let h = header_bytes();
        for &w in words {
            m.write(w, &h[w as usize..w as usize + 8]);
        }
        let got = m
            .table(10)
            .unwrap_or_else(|e| panic!("set-up cut after words {words:?}: {e:?}"));
        assert!(got.len() >= 10 && got == first_primes(got.len()), "{got:?}");
        assert_eq!(&m.bytes(24)[..], &h[..], "the header was completed");
    }
}

#[test]
fn interrupted_updates_are_repaired_on_start() {
    let primes = first_primes(6); // 2 3 5 7 11 13
    // (what, state: magic, count, next, table)
    type Case = (&'static str, bool, u64, u64, Vec<u64>);
    let cases: Vec<Case> = vec![
        (
            "chunk cut between count and next",
            true,
            6,
            9,
            primes.clone(),
        ),
        (
            "chunk cut between count and next, first chunk",
            true,
            2,
            0,
            vec![2, 3],
        ),
        ("chunk cut before count", true, 4, 9, primes.clone()),
        ("set-up cut before the magic", false, 1, 3, vec![2]),
        ("set-up cut before next", false, 1, 0, vec![2]),
        ("set-up cut before count", false, 0, 0, vec![2]),
        (
            "older set-up (magic first) cut before count",
            true,
            0,
            0,
            vec![2],
        ),
        ("older set-up cut before the table", true, 0, 0, vec![]),
        ("older set-up cut before next", true, 1, 0, vec![2]),
    ];
    for (what, magic, count, next, table) in cases {
        let m = Memfd::with_header(2 * 5 + 1); // generation 5, inside an update
        m.primes_state(magic, count, next, &table);
        let got = m.table(30).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(got, first_primes(got.len()), "{what}");
        assert!(got.len() >= 30, "{what}");
        assert_eq!(m.read_u64(64) % 2, 0, "{what}: the repair was committed");
        assert!(m.read_u64(64) / 2 > 5, "{what}: generations go on");
    }
    // The same fields without the interrupted flag are damage: the repair
    // only applies to a cut the protocol reports.
    let m = Memfd::with_header(10);
    m.primes_state(true, 6, 9, &primes);
    let (code, e) = m.table(30).unwrap_err();
    assert_eq!(code, Some(1), "{e}");
    assert!(
        e.contains("next 9 does not follow the last prime 13"),
        "{e}"
    );
}

#[test]
fn damaged_states_fail_with_exit_1_never_panic_or_loop() {
    let big = u64::MAX;
    type Case = (&'static str, u64, u64, Vec<u64>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "zero in the table",
            3,
            5,
            vec![2, 0, 3],
            "table entry 1 is 0",
        ),
        ("even entry", 3, 7, vec![2, 4, 5], "table entry 1 is 4"),
        (
            "not increasing",
            4,
            11,
            vec![2, 3, 7, 5],
            "table entry 3 is 5",
        ),
        (
            "next at 2^64",
            2,
            big,
            vec![2, 3],
            "next 18446744073709551615",
        ),
        (
            "next far past the last prime",
            2,
            1 << 40,
            vec![2, 3],
            "does not follow",
        ),
        ("next even", 3, 8, vec![2, 3, 5], "does not follow"),
        (
            "table not starting with 2",
            2,
            5,
            vec![3, 5],
            "does not start with 2",
        ),
        ("count beyond the table", 1 << 40, 5, vec![2, 3], "count"),
        (
            "primes near 2^64",
            3,
            big,
            vec![2, 3, big - 2],
            "too close to 2^64",
        ),
    ];
    for (what, count, next, table, message) in cases {
        let m = Memfd::with_header(4);
        m.primes_state(true, count, next, &table);
        let before = m.bytes((PAGE + 4096) as usize);
        let (code, e) = m.table(30).map(|t| t.len()).unwrap_err();
        assert_eq!(code, Some(1), "{what}: {e}");
        assert!(
            e.contains("damaged state") && e.contains(message),
            "{what}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{what}: one line: {e}");
        // Refused at load (or, for the last case, at the first chunk,
        // whose update is never committed): the state is as it was.
        let after = m.bytes((PAGE + 4096) as usize);
        assert_eq!(after[PAGE as usize..], before[PAGE as usize..], "{what}");
    }
}

#[test]
fn a_corrupt_sequence_word_is_refused_not_a_panic() {
    for seq in [u64::MAX, 1 << 63] {
        let m = Memfd::with_header(seq);
        m.primes_state(true, 2, 5, &[2, 3]);
        let before = m.bytes((PAGE + 4096) as usize);
        let (code, e) = m.table(10).unwrap_err();
        assert_eq!(code, Some(1), "seq {seq:#x}: {e}");
        assert!(e.contains("corrupt shm-snapshot header"), "{e}");
        assert!(e.contains("sequence word"), "{e}");
        assert_eq!(m.bytes((PAGE + 4096) as usize), before, "untouched");
    }
}

#[test]
fn a_large_empty_memfd_is_not_allocated_by_the_start() {
    // The foreign-state check must look only at data extents: reading a
    // 512 MiB hole through the mapping would allocate all of it.
    let m = Memfd::new(512 << 20);
    let got = m.table(10).unwrap();
    assert!(got.len() >= 10 && got == first_primes(got.len()), "{got:?}");
    let used = m.allocated();
    assert!(used < 4 << 20, "{used} bytes allocated after the start");

    // Data after a blank first page is still found (and refused), without
    // allocating the holes around it.
    let m = Memfd::new(512 << 20);
    m.u64(300 << 20, 7);
    let (code, e) = m.table(10).unwrap_err();
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("not a shm-snapshot header"), "{e}");
    assert!(m.allocated() < 4 << 20, "{} bytes allocated", m.allocated());
    assert_eq!(m.read_u64(300 << 20), 7, "untouched");
    assert_eq!(m.read_u64(0), 0, "no header written");
}

#[test]
fn a_failed_table_print_has_its_own_exit_code() {
    let m = Memfd::new(0);
    let full = File::options().write(true).open("/dev/full").unwrap();
    let out = m.run(&["--limit", "5000"], Stdio::from(full));
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{e}");
    assert!(e.contains("writing the table"), "{e}");
    let help = run(cmd("primes-snapshot").arg("--help"));
    let (o, _) = text(&help);
    assert!(o.contains("4 printing the table failed"), "{o}");
}
