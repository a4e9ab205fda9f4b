//! Black-box tests of the shm-state examples `bank` and `kv`: crash
//! atomicity under real SIGKILLs (under the real `shm-fd`), snapshots taken
//! while `bank run` works and restored with `shm-restore`, and bad input.
//!
//! Counts are sized for CI; for a longer run set
//! `SHM_STATE_KILLS=5000 SHM_STATE_RESTORES=300` (see docs/state-format.md).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shm_fd_tests::{Rng, bin, cmd, env_count, run, run_within, text};

/// The longest a `bank` or `kv` of these tests may take before the test
/// fails instead of hanging (a deadlock), far above what they need.
const BOUND: Duration = Duration::from_secs(60);

fn b(name: &str) -> String {
    bin(name).to_str().unwrap().to_owned()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn bank_run_killed_hundreds_of_times_keeps_its_total() {
    let kills = env_count("SHM_STATE_KILLS", 300);
    let mut rng = Rng::seeded("SHM_STATE_SEED", "shm_state");
    // Kill after 0..30 ms: some during start-up, most inside the transfer loop.
    let delays: Vec<String> = (0..kills)
        .map(|_| format!("0.{:03}", rng.below(30)))
        .collect();
    let script = r#"
        bank="$1"; shift
        "$bank" init --accounts 64 --balance 1000 >/dev/null || exit 90
        i=0
        for d in "$@"; do
            "$bank" run & p=$!
            sleep "$d"
            kill -9 "$p"
            wait "$p"
            "$bank" check >/dev/null || { echo "check failed after kill $i" >&2; exit 91; }
            i=$((i + 1))
        done
        "$bank" check
    "#;
    let out = run(cmd("shm-fd")
        .args(["sh", "-c", script, "sh", &b("bank")])
        .args(&delays));
    let (o, e) = text(&out);
    assert!(!e.contains("panicked"), "{e}");
    assert!(out.status.success(), "exit {:?}\n{o}\n{e}", out.status);
    // Each kill's next opener is `bank check`; it reports a rollback when the
    // kill landed inside a transaction.
    let recovered = count(&e, "bank: recovered");
    let checks = count(&e, "bank: reopened") + recovered;
    eprintln!("{kills} kills, {recovered} landed inside a transaction; final: {o}");
    assert!(checks > kills, "every check opened the state:\n{e}");
    assert!(
        recovered >= 3,
        "only {recovered} of {kills} kills interrupted a transaction"
    );
    assert!(o.starts_with("total 64000 (64 accounts x 1000), "), "{o}");
    let transfers: u64 = o
        .split(", ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(transfers > 0, "{o}");
}

/// The children of `pid` (Linux /proc).
fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn bank_snapshots_taken_while_it_runs_restore_to_a_committed_state() {
    let rounds = env_count("SHM_STATE_RESTORES", 15);
    let mut rng = Rng::seeded("SHM_STATE_SEED", "shm_state");
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("bank.snap");
    let out = run(cmd("shm-restore").arg(&snap).args([
        &b("bank"),
        "init",
        "--accounts",
        "32",
        "--balance",
        "500",
    ]));
    assert!(out.status.success(), "{:?}", text(&out));
    let mut recovered = 0;
    for round in 0..rounds {
        // shm-restore saves every 5 ms while `bank run` works (stopping its
        // process group for each copy); then the machine "loses power":
        // both die by SIGKILL, and only the last snapshot remains.
        let mut child = cmd("shm-restore")
            .args(["--quiet", "--interval", "5ms"])
            .arg(&snap)
            .args([&b("bank"), "run", "--seconds", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Once `bank run` has started (a loaded machine may take a while
        // to get there), let it work for a random while.
        let started = std::time::Instant::now();
        while !children(child.id()).iter().any(|&k| {
            std::fs::read(format!("/proc/{k}/cmdline")).is_ok_and(|c| c.ends_with(b"5\0"))
        }) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "round {round}: bank never started"
            );
            sleep(Duration::from_millis(2));
        }
        sleep(Duration::from_millis(40 + rng.below(120)));
        let kids = children(child.id());
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        for k in &kids {
            let _ = kill(Pid::from_raw(*k), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(*k), Signal::SIGKILL);
        }
        let _ = child.wait();
        assert!(
            !kids.is_empty(),
            "round {round}: shm-restore had no child to kill"
        );
        // The children were reparented; wait until they are gone.
        for k in &kids {
            while Path::new(&format!("/proc/{k}")).exists()
                && !std::fs::read_to_string(format!("/proc/{k}/stat"))
                    .unwrap_or_default()
                    .contains(") Z")
            {
                sleep(Duration::from_millis(2));
            }
        }
        let out = run(cmd("shm-restore").arg(&snap).args([&b("bank"), "check"]));
        let (o, e) = text(&out);
        assert!(
            out.status.success(),
            "round {round}: bank check after restore failed: {o}\n{e}"
        );
        assert!(o.starts_with("total 16000 "), "{o}");
        recovered += count(&e, "bank: recovered");
    }
    eprintln!("{rounds} restores, {recovered} of them rolled back a transaction");
    // Snapshots are taken by stopping bank mid-flight; most land inside a
    // transaction, so the recovery path must have been exercised.
    assert!(
        recovered >= 1,
        "no snapshot caught a transaction in progress"
    );
}

fn kv(snap: &Path, args: &[&str]) -> (i32, String, String) {
    let out = run(cmd("shm-fd")
        .args([&b("shm-restore"), "--quiet"])
        .arg(snap)
        .arg(b("kv"))
        .args(args));
    let (o, e) = text(&out);
    (out.status.code().unwrap_or(-1), o, e)
}

#[test]
fn kv_keeps_keys_across_runs_under_shm_restore() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("kv.snap");
    assert_eq!(kv(&snap, &["set", "greeting", "hello"]).0, 0);
    assert_eq!(kv(&snap, &["set", "empty", ""]).0, 0);
    assert_eq!(kv(&snap, &["set", "greeting", "hello, world"]).0, 0);
    let (code, o, _) = kv(&snap, &["get", "greeting"]);
    assert_eq!((code, o.as_str()), (0, "hello, world\n"));
    let (code, o, _) = kv(&snap, &["list"]);
    assert_eq!((code, o.as_str()), (0, "empty\t\ngreeting\thello, world\n"));
    assert_eq!(kv(&snap, &["del", "empty"]).0, 0);
    let (code, _, e) = kv(&snap, &["del", "empty"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("no such key: empty"), "{e}");
    let (code, _, e) = kv(&snap, &["get", "missing"]);
    assert_eq!(code, 1, "{e}");
    let (code, o, _) = kv(&snap, &["list"]);
    assert_eq!((code, o.as_str()), (0, "greeting\thello, world\n"));
}

#[test]
fn kv_in_one_watcher_and_in_a_file() {
    let script = r#"
        kv="$1"
        "$kv" set a 1 && "$kv" set b 2 && "$kv" del a && "$kv" list
    "#;
    let out = run(cmd("shm-fd").args(["sh", "-c", script, "sh", &b("kv")]));
    let (o, e) = text(&out);
    assert!(out.status.success(), "{e}");
    assert_eq!(o, "b\t2\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kv.state");
    let f = file.to_str().unwrap();
    assert!(
        run(cmd("kv").args(["--file", f, "set", "k", "v"]))
            .status
            .success()
    );
    let out = run(cmd("kv").args(["--file", f, "get", "k"]));
    assert_eq!(text(&out).0, "v\n");
}

#[test]
fn examples_fail_clearly_on_bad_input() {
    // No memfd passed.
    for name in ["bank", "kv"] {
        let args: &[&str] = if name == "bank" {
            &["check"]
        } else {
            &["list"]
        };
        let out = run(cmd(name).args(args));
        let (o, e) = text(&out);
        assert_eq!(out.status.code(), Some(3), "{name}: {e}");
        assert!(o.is_empty());
        assert!(e.contains("run this program under shm-fd"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // Bad command line.
    assert_eq!(run(cmd("bank").arg("transfer")).status.code(), Some(2));
    assert_eq!(
        run(cmd("kv").args(["set", "only-key"])).status.code(),
        Some(2)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bank.state");
    let f = file.to_str().unwrap();
    // Not initialized; initialized twice.
    let out = run(cmd("bank").args(["--file", f, "run", "--transfers", "1"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).1.contains("not initialized"), "{:?}", text(&out));
    assert!(
        run(cmd("bank").args(["--file", f, "init", "--accounts", "4", "--balance", "9"]))
            .status
            .success()
    );
    let out = run(cmd("bank").args(["--file", f, "init", "--accounts", "4", "--balance", "9"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).1.contains("already initialized"));
    // A file that is not a state: refused, left untouched.
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, b"some notes, not a bank\n").unwrap();
    let out = run(cmd("bank").args(["--file", other.to_str().unwrap(), "check"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out).1.contains("not a shm-state region"),
        "{:?}",
        text(&out)
    );
    assert!(
        std::fs::read(&other).unwrap() == b"some notes, not a bank\n",
        "the file was changed"
    );
    // A larger foreign file: refused by the snapshot header check, untouched.
    let big = vec![b'x'; 10_000];
    std::fs::write(&other, &big).unwrap();
    let out = run(cmd("kv").args(["--file", other.to_str().unwrap(), "list"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out).1.contains("not a shm-state region"),
        "{:?}",
        text(&out)
    );
    assert!(
        std::fs::read(&other).unwrap() == big,
        "the file was changed"
    );
}

#[test]
fn bank_check_catches_a_changed_balance_and_a_damaged_header() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bank.state");
    let f = file.to_str().unwrap();
    // A balance with a recognisable byte pattern.
    let balance = 0x0123_4567_89ab_cdefu64;
    let init = run(cmd("bank").args([
        "--file",
        f,
        "init",
        "--accounts",
        "3",
        "--balance",
        &balance.to_string(),
    ]));
    assert!(init.status.success(), "{:?}", text(&init));
    let ok = run(cmd("bank").args(["--file", f, "check"]));
    assert_eq!(ok.status.code(), Some(0), "{:?}", text(&ok));
    let mut bytes = std::fs::read(&file).unwrap();
    let pat = balance.to_le_bytes();
    let at = bytes
        .windows(8)
        .position(|w| w == pat)
        .expect("balance in the file");
    bytes[at] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let out = run(cmd("bank").args(["--file", f, "check"]));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{o}{e}");
    assert!(e.contains("bank check: total is"), "{e}");
    // A flipped bit in the header: a damaged state fails the check (exit 1,
    // as the issue asks), with a one-line error, and the file is untouched.
    bytes[at] ^= 1;
    // shm-state's header starts after shm-snapshot's page (4096 bytes).
    bytes[4096 + 0x90] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let out = run(cmd("bank").args(["--file", f, "check"]));
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("corrupt state: header checksum"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        std::fs::read(&file).unwrap() == bytes,
        "the file was changed"
    );
}

#[test]
fn bank_run_with_huge_balances_stops_cleanly_instead_of_overflowing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bank.state");
    let f = file.to_str().unwrap();
    let init = run(cmd("bank").args([
        "--file",
        f,
        "init",
        "--accounts",
        "2",
        "--balance",
        "9000000000000000000",
    ]));
    assert!(init.status.success(), "{:?}", text(&init));
    let out = run(cmd("bank").args(["--file", f, "run", "--transfers", "200", "--seed", "7"]));
    let (_, e) = text(&out);
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(out.status.code(), Some(3), "{e}");
    assert!(e.contains("would overflow 64 bits"), "{e}");
    // The transfer that could not be recorded was rolled back whole.
    let out = run(cmd("bank").args(["--file", f, "check"]));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}{e}");
    assert!(o.starts_with("total 18000000000000000000 "), "{o}");
}

/// Several `kv set` at once on one memfd: kv shares its state (issue 11),
/// so every one of them lands (none is locked out, none sees another's
/// open transaction), and every key that was set is there with its value.
#[test]
fn parallel_kv_sets_under_one_watcher_all_land() {
    let script = r#"
        kv="$1"
        for i in 1 2 3 4 5 6; do
            ( "$kv" set "k$i" "v$i" 2>>"$2"; echo "code k$i $?" ) &
        done
        wait
        "$kv" list
    "#;
    let dir = tempfile::tempdir().unwrap();
    let errors = dir.path().join("stderr");
    for round in 0..5 {
        let out = run_within(
            cmd("shm-fd").args(["sh", "-c", script, "sh", &b("kv"), errors.to_str().unwrap()]),
            BOUND,
        );
        let (o, e) = text(&out);
        assert!(out.status.success(), "round {round}: {o}{e}");
        let stderr = std::fs::read_to_string(&errors).unwrap_or_default();
        assert!(stderr.is_empty(), "round {round}: {stderr}");
        let mut set = Vec::new();
        for line in o.lines().filter(|l| l.starts_with("code ")) {
            let mut f = line.split(' ').skip(1);
            let (key, code) = (f.next().unwrap(), f.next().unwrap());
            assert_eq!(code, "0", "round {round}: kv set {key}: {stderr}");
            set.push(key.to_owned());
        }
        assert_eq!(set.len(), 6, "round {round}: {o}");
        let mut listed: Vec<String> = o
            .lines()
            .filter(|l| !l.starts_with("code "))
            .map(|l| {
                let (k, v) = l.split_once('\t').unwrap();
                assert_eq!(&k[1..], &v[1..], "{l}");
                k.to_owned()
            })
            .collect();
        listed.sort();
        set.sort();
        assert_eq!(listed, set, "round {round}");
    }
}

/// A second bank on a live bank's state shares it (issue 11): a `bank
/// check` and a second `bank run` while the first runs both succeed, the
/// check counting the running bank as a live peer; the running bank is not
/// disturbed and stops cleanly on SIGTERM.
#[test]
fn a_second_bank_on_a_live_state_shares_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bank.state");
    let f = file.to_str().unwrap();
    assert!(
        run(cmd("bank").args(["--file", f, "init", "--accounts", "2", "--balance", "1"]))
            .status
            .success()
    );
    let mut running = cmd("bank")
        .args(["--file", f, "run", "--seconds", "20"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has opened the state (its report line).
    let mut stderr = running.stderr.take().unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut stderr, &mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("bank: "));
    let out = run_within(cmd("bank").args(["--file", f, "check"]), BOUND);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}{e}");
    assert!(o.starts_with("total 2 (2 accounts x 1), "), "{o}");
    assert!(
        o.ends_with(", 2 peers\n"),
        "the running bank and the check: {o}"
    );
    let out = run_within(
        cmd("bank").args(["--file", f, "run", "--transfers", "100"]),
        BOUND,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        running.try_wait().unwrap(),
        None,
        "the first bank still runs"
    );
    kill(Pid::from_raw(running.id() as i32), Signal::SIGTERM).unwrap();
    assert!(running.wait().unwrap().success());
    let out = run_within(cmd("bank").args(["--file", f, "check"]), BOUND);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}{e}");
    assert!(o.contains(", 2 runs, "), "{o}");
    assert!(o.ends_with(", 1 peers\n"), "{o}");
    let _ = std::io::stderr().flush();
    let _ = Command::new("true").status();
}

/// The state of process `pid` (field 3 of /proc/PID/stat), if it exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Runs `bank check` with `memfd` passed on fd 3, the way a watcher does
/// (for at most [`BOUND`]).
fn bank_check_on(memfd: &std::fs::File) -> std::process::Output {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = memfd.as_raw_fd();
    let mut c = cmd("bank");
    c.arg("check")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "SHM_SHARED_FD");
    // SAFETY: dup2 is async-signal-safe; it puts the memfd on 3 (without
    // close-on-exec) in the child, between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if fd == 3 {
                nix::fcntl::fcntl(
                    std::os::fd::BorrowedFd::borrow_raw(3),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_within(&mut c, BOUND)
}

/// The transfer count of `bank check`'s line.
fn transfers(line: &str) -> u64 {
    line.split(", ")
        .find_map(|f| f.strip_suffix(" transfers"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no transfer count in {line:?}"))
}

/// The lock and the peer table are bound to the memory: the bytes of a
/// live bank's memfd, copied into a fresh memfd while the bank runs
/// (stopped for the copy, as a snapshot does, so that the copy is a state
/// the bank had, often in the middle of a transfer, its writer lock held),
/// name the bank as a peer and often as the lock's holder, a thread that
/// lives; yet no one holds the copy: `bank check` on it recovers, passes,
/// and is its only peer. The live memfd itself is shared (issue 11; before,
/// a second opener was refused with "in use by process N"): a `bank check`
/// through a second open file description passes while the bank runs,
/// counts the bank as a live peer, and does not take the state over: the
/// bank goes on transferring.
#[test]
fn a_copy_of_a_live_banks_memfd_has_no_live_peer_and_the_memfd_itself_is_shared() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::CommandExt;
    let copies = env_count("SHM_STATE_COPIES", 20);
    let script = format!(
        "{bank} init --accounts 64 --balance 1000 >/dev/null && exec {bank} run --seconds 120",
        bank = b("bank")
    );
    let mut child = cmd("shm-fd")
        .args(["sh", "-c", &script])
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let group = Pid::from_raw(pid as i32);
    // shm-fd and sh exec: the pid becomes bank's once `run` started.
    let started = std::time::Instant::now();
    while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.ends_with(b"120\0")) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "bank never ran"
        );
        sleep(Duration::from_millis(10));
    }
    sleep(Duration::from_millis(200));
    let live = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/fd/3"))
        .unwrap();
    let (mut recovered, mut held) = (0, 0);
    for i in 0..copies {
        // A consistent copy: the bank stopped at whatever instruction.
        kill(group, Signal::SIGSTOP).unwrap();
        while proc_state(pid) != Some('T') {
            sleep(Duration::from_millis(1));
        }
        let len = live.metadata().unwrap().len() as usize;
        let mut bytes = vec![0u8; len];
        live.read_exact_at(&mut bytes, 0).unwrap();
        kill(group, Signal::SIGCONT).unwrap();
        // The writer lock (shm-state's header, after shm-snapshot's page,
        // + 0x300): bits 0..30 the holder's thread, here one of the bank's.
        let lock = u32::from_le_bytes(bytes[4096 + 0x300..4096 + 0x304].try_into().unwrap());
        held += usize::from(lock & 0x3FFF_FFFF != 0);
        let copy: std::fs::File =
            nix::sys::memfd::memfd_create("bank-copy", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap()
                .into();
        copy.write_all_at(&bytes, 0).unwrap();
        let out = bank_check_on(&copy);
        let (o, e) = text(&out);
        assert!(
            out.status.success(),
            "copy {i}: bank check on the copy: {:?}\n{o}\n{e}",
            out.status
        );
        assert!(o.starts_with("total 64000 (64 accounts x 1000), "), "{o}");
        assert!(
            o.ends_with(", 1 peers\n"),
            "copy {i}: the bank is no peer of its copy: {o}"
        );
        recovered += count(&e, "bank: recovered");
        sleep(Duration::from_millis(rand_ms(i)));
    }
    // The live memfd through a second open file description: shared.
    let out = bank_check_on(&live);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{:?}\n{o}\n{e}", out.status);
    assert!(o.starts_with("total 64000 (64 accounts x 1000), "), "{o}");
    assert!(
        o.ends_with(", 2 peers\n"),
        "the running bank and the check: {o}"
    );
    // Not taken over: the bank still runs, and goes on transferring.
    let before = transfers(&o);
    let started = std::time::Instant::now();
    loop {
        assert!(
            matches!(proc_state(pid), Some(s) if s != 'Z'),
            "the bank stopped running"
        );
        let out = bank_check_on(&live);
        let (o, e) = text(&out);
        assert!(out.status.success(), "{o}\n{e}");
        if transfers(&o) > before {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "the bank made no transfer after the check: {o}"
        );
        sleep(Duration::from_millis(10));
    }
    kill(group, Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    eprintln!(
        "{copies} copies of a live bank checked, {held} with its writer lock held, \
         {recovered} needed a rollback"
    );
    assert!(
        copies < 10 || held > 0,
        "no copy caught the bank holding its writer lock"
    );
}

/// A spread of pauses between copies (0..20 ms), so that they land at
/// different points of the transfer loop.
fn rand_ms(i: usize) -> u64 {
    (i as u64 * 7919) % 20
}
