//! Black-box tests of `primes-snapshot` (shm-snapshot's example) under
//! `shm-fd` and `shm-restore`: the table is right, foreign state is
//! refused, and kill -9 of the whole tree at random moments always
//! restarts from a snapshot holding a prefix of the primes, with progress.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use shm_fd_tests::{bin, cmd, first_primes, run, text};

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
/// for a long run).
#[test]
fn kill_9_of_the_whole_tree_restores_a_prefix_and_progresses() {
    let rounds: u32 = std::env::var("SHM_SNAPSHOT_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
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
    for round in 0..rounds {
        let mut wrapper = cmd("shm-restore")
            .args(["-q", "--interval", "20ms", snap.to_str().unwrap(), "--"])
            .args([
                &b("primes-snapshot"),
                "--interval-ms",
                "1",
                "--span",
                "4096",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let program = child_of(wrapper.id(), Instant::now() + Duration::from_secs(10));
        sleep(Duration::from_millis(60 + random(300)));
        kill_tree(&mut wrapper, program);

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
}
