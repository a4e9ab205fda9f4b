//! Black-box tests of the `shm-restore` command (with `shm-fd`, `primes`
//! and `counter`): progress across watchers, signals, saves while running,
//! kill -9 during saves, and every bad input.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use shm_fd_tests::procs::{
    GROUP_PROBE, Proc, ProcStat, Sweep, assert_in_keepers_group, children, command_child, poll_for,
};
use shm_fd_tests::{OnTerminal, bin, cmd, crc32, first_primes, recv_with_fd, run, text};

fn b(name: &str) -> String {
    bin(name).to_str().unwrap().to_owned()
}

/// The files of `dir` with their bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// `shm-restore [args]` with the command `cmd`, run to the end:
/// (exit code, stdout, stderr).
fn restore(args: &[&str], command: &[&str]) -> (i32, String, String) {
    let out = run(cmd("shm-restore").args(args).arg("--").args(command));
    result(&out)
}

fn result(out: &Output) -> (i32, String, String) {
    let (o, e) = text(out);
    assert!(!e.contains("panicked"), "{e}");
    (out.status.code().unwrap_or(-1), o, e)
}

/// Runs `counter` under `shm-restore snap` and returns the value it printed.
fn count(snap: &Path) -> u64 {
    let (code, out, err) = restore(&[snap.to_str().unwrap()], &[&b("counter")]);
    assert_eq!(code, 0, "{err}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?} {err}"))
}

/// Saves `n` runs of the counter into `snap`, each save keeping the previous
/// as `.prev`.
fn counted(snap: &Path, n: u64) {
    for i in 1..=n {
        assert_eq!(count(snap), i);
    }
}

fn with_suffix(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    o.into()
}

#[test]
fn primes_across_130_separate_watchers_end_with_the_full_table() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("primes.snap");
    let mut last = None;
    for i in 1..=130 {
        let out = run(cmd("shm-fd").args([
            &b("shm-restore"),
            "-q",
            snap.to_str().unwrap(),
            &b("primes"),
        ]));
        let (code, o, e) = result(&out);
        assert_eq!(code, 0, "run {i}: {e}");
        let total = 1000 * i + 2;
        if total < 125_000 {
            assert_eq!(
                e.trim(),
                format!("generated 1000 more primes, total {total}"),
                "run {i}"
            );
            assert!(o.is_empty());
        }
        last = Some(o);
    }
    let table: Vec<u64> = last.unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(table, first_primes(125_000));
}

/// Starts `shm-restore [args] snap sh -c script` with stdout piped.
fn spawn(args: &[&str], snap: &Path, script: &str) -> Child {
    cmd("shm-restore")
        .args(args)
        .arg(snap)
        .args(["sh", "-c", script])
        .env("COUNTER", b("counter"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads stdout lines of `child` until one equals `want`; returns them.
fn read_until(child: &mut Child, want: &str) -> Vec<String> {
    let out = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        let done = line == want;
        lines.push(line);
        if done {
            return lines;
        }
    }
    panic!("no {want:?} in {lines:?}");
}

fn finish(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    let (_, e) = text(&out);
    assert!(!e.contains("panicked"), "{e}");
    (out.status.code().unwrap_or(-1), e)
}

#[test]
fn sigterm_and_sigint_are_forwarded_and_the_state_saved() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    for (n, sig) in [(1, Signal::SIGTERM), (2, Signal::SIGINT)] {
        let mut child = spawn(&[], &snap, "$COUNTER; echo ready; exec sleep 1000");
        let lines = read_until(&mut child, "ready");
        assert_eq!(lines[0], n.to_string());
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let t = Instant::now();
        let (code, err) = finish(child);
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(code, 128 + sig as i32, "{sig}: {err}");
        assert!(err.contains("saved"), "{err}");
    }
    assert_eq!(count(&snap), 3, "the next start continues from the saves");
}

/// Kills the wrapper and the command's group (pgid printed by the script).
fn kill_all(child: &mut Child, pgid: i32) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    child.wait().unwrap();
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5));
    }
}

fn generation(snap: &Path) -> Option<u64> {
    let out = run(cmd("shm-restore").arg("--check").arg(snap));
    let (o, _) = text(&out);
    o.lines()
        .find_map(|l| l.trim().strip_prefix("generation:"))
        .and_then(|g| g.trim().parse().ok())
}

#[test]
fn sigusr1_and_interval_save_while_the_command_runs() {
    // Its process group (field 5 of /proc/self/stat), which the group
    // keeper leads: not $$.
    let script = "read -r _ _ _ _ pg _ < /proc/$$/stat; echo $pg; $COUNTER; $COUNTER; echo ready; \
                  exec sleep 1000";
    for args in [&[][..], &["--interval", "50ms"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("s.snap");
        let mut child = spawn(args, &snap, script);
        let lines = read_until(&mut child, "ready");
        let pgid: i32 = lines[0].parse().unwrap();
        if args.is_empty() {
            sleep(Duration::from_millis(100));
            assert!(!snap.exists(), "no save without SIGUSR1 or --interval");
            kill(Pid::from_raw(child.id() as i32), Signal::SIGUSR1).unwrap();
        }
        wait_for("a save while running", || generation(&snap).is_some());
        let gen_now = generation(&snap).unwrap();
        if !args.is_empty() {
            // Unchanged memory: the interval writes nothing new.
            sleep(Duration::from_millis(300));
            assert_eq!(generation(&snap), Some(gen_now), "unchanged memfd re-saved");
        }
        // No exit save: the state must come from the save while running.
        kill_all(&mut child, pgid);
        assert_eq!(count(&snap), 3, "{args:?}");
    }
}

/// A small deterministic generator for kill delays (seeded per run).
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *state >> 33
}

#[test]
fn kill_9_during_large_saves_always_leaves_a_valid_snapshot() {
    // SHM_RESTORE_KILL_ROUNDS=200 for a long run; the default keeps CI fast.
    let rounds: u64 = std::env::var("SHM_RESTORE_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("big.snap");
    let snap_s = snap.to_str().unwrap();
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let write = |round: u64| {
        cmd("shm-restore")
            .args(["-q", snap_s, "sh", "-c"])
            .arg(format!("yes r{round:03} | head -c 24M >&3"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let read = || {
        let (code, out, err) = restore(&["-q", snap_s], &["sh", "-c", "head -c 4 /dev/fd/3"]);
        assert_eq!(code, 0, "{err}");
        out
    };
    assert_eq!(finish(write(0)).0, 0);
    let mut state = "r000".to_string();
    let mut killed_mid_save = 0;
    for round in 1..=rounds {
        let mut child = write(round);
        // Wait until the save has started (its temp file exists), then
        // kill at a random point of it.
        let tmp_prefix = ".big.snap.tmp-";
        let started = Instant::now();
        loop {
            let saving = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(tmp_prefix));
            if saving || child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20));
            sleep(Duration::from_micros(200));
        }
        sleep(Duration::from_micros(lcg(&mut seed) % 40_000));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let status = child.wait().unwrap();
        if status.code().is_none() {
            killed_mid_save += 1;
        }
        let check = run(cmd("shm-restore").arg("--check").arg(&snap));
        let (o, e) = text(&check);
        assert_eq!(check.status.code(), Some(0), "round {round}: {o}{e}");
        let now = read();
        let new = format!("r{round:03}");
        assert!(
            now == state || now == new,
            "round {round}: loaded {now:?}, expected {state:?} or {new:?} (seed {seed})"
        );
        state = now;
        // The reading run removed the killed save's temp file.
        let left: Vec<String> = files(dir.path())
            .into_keys()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
    assert!(killed_mid_save > 0, "no round killed the wrapper");
}

#[test]
fn a_damaged_snapshot_falls_back_on_prev_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 3); // s.snap holds 3, s.snap.prev holds 2
    let mut bytes = std::fs::read(&snap).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // a data byte: only the chunk CRC sees it
    std::fs::write(&snap, &bytes).unwrap();
    let (code, out, err) = restore(&[snap.to_str().unwrap()], &[&b("counter")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "3", "continued from .prev (2)");
    assert!(
        err.contains("WARNING") && err.contains("CRC32") && err.contains("s.snap.corrupt-"),
        "{err}"
    );
    let kept: Vec<(String, Vec<u8>)> = files(dir.path())
        .into_iter()
        .filter(|(n, _)| n.starts_with("s.snap.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].1, bytes, "the damaged file is kept byte for byte");
    assert_eq!(count(&snap), 4);
}

/// Every bad snapshot without a valid `.prev`: exit 65, a one-line message
/// naming the file and the damage, every file byte for byte as before, and
/// the command never started.
#[test]
fn bad_snapshots_are_refused_with_65_and_left_as_they_were() {
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage, &str, &[&str]); 6] = [
        (
            "truncated",
            |b| b.truncate(b.len() - 3),
            "is truncated",
            &[],
        ),
        (
            "flipped data",
            |b| {
                let l = b.len() - 1;
                b[l] ^= 4
            },
            "chunk 0",
            &[],
        ),
        ("wrong version", |b| b[8] = 9, "format version 9", &[]),
        (
            "not a snapshot",
            |b| b[..8].copy_from_slice(b"garbage!"),
            "not a shm-restore snapshot",
            &[],
        ),
        ("empty file", |b| b.clear(), "is truncated", &[]),
        (
            "oversized",
            |_| {},
            "more than the maximum 4",
            &["--max-size", "4"],
        ),
    ];
    for (what, damage, message, extra) in cases {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("s.snap");
        counted(&snap, 1);
        let mut bytes = std::fs::read(&snap).unwrap();
        damage(&mut bytes);
        std::fs::write(&snap, &bytes).unwrap();
        let before = files(dir.path());
        let mut args = extra.to_vec();
        args.push(snap.to_str().unwrap());
        let (code, out, err) = restore(&args, &["sh", "-c", "echo started"]);
        assert_eq!(code, 65, "{what}: {err}");
        assert!(out.is_empty(), "{what}: the command ran");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(
            err.contains("s.snap") && err.contains(message),
            "{what}: {err}"
        );
        assert_eq!(files(dir.path()), before, "{what}: files changed");
        let check = run(cmd("shm-restore").args(extra).arg("--check").arg(&snap));
        assert_eq!(check.status.code(), Some(1), "{what}: --check");
        assert!(text(&check).0.contains("BAD"), "{what}");
    }
}

#[test]
fn damaged_snapshot_and_damaged_prev_are_both_named() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 2);
    let prev = with_suffix(&snap, ".prev");
    for p in [&snap, &prev] {
        let b = std::fs::read(p).unwrap();
        std::fs::write(p, &b[..b.len() - 1]).unwrap();
    }
    let before = files(dir.path());
    let (code, _, err) = restore(&[snap.to_str().unwrap()], &[&b("counter")]);
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("s.snap is truncated") && err.contains("s.snap.prev is truncated"),
        "{err}"
    );
    assert_eq!(files(dir.path()), before);
}

#[test]
fn check_reports_what_the_file_holds() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 2);
    let out = run(cmd("shm-restore").arg("--check").arg(&snap));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    for want in [
        "format version: 1",
        "data size:      8 bytes",
        "generation:     2",
        "saved at:       20",
        "checksums:      ok",
    ] {
        assert!(o.contains(want), "{want:?} in {o}");
    }
    let missing = run(cmd("shm-restore")
        .arg("--check")
        .arg(dir.path().join("nope")));
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing).1.contains("nope"));
}

#[test]
fn live_memory_wins_over_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 5);
    // Under one watcher: the first counter fills the memfd, then
    // shm-restore finds it non-empty and must not load the 5.
    let script = format!(
        "{c} && {r} {s} {c}",
        c = b("counter"),
        r = b("shm-restore"),
        s = snap.display()
    );
    let out = run(cmd("shm-fd").args(["sh", "-c", &script]));
    let (code, o, e) = result(&out);
    assert_eq!(code, 0, "{e}");
    assert_eq!(o, "1\n2\n");
    assert!(e.contains("already holds 8 bytes"), "{e}");
    assert_eq!(count(&snap), 3, "the live state was saved");
}

#[test]
fn an_empty_memfd_never_overwrites_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.snap");
    counted(&good, 1);
    let snap = dir.path().join("s.snap");
    // The snapshot appears while the (empty) memfd's command runs.
    let (code, _, err) = restore(
        &[snap.to_str().unwrap()],
        &["cp", good.to_str().unwrap(), snap.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the memfd holds no data"), "{err}");
    assert_eq!(std::fs::read(&snap).unwrap(), std::fs::read(&good).unwrap());
}

#[test]
fn exit_status_is_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    let s = snap.to_str().unwrap();
    assert_eq!(restore(&[s], &["sh", "-c", "exit 7"]).0, 7);
    assert_eq!(restore(&[s], &["sh", "-c", "kill -9 $$"]).0, 128 + 9);
    let (code, _, err) = restore(&[s], &["/nonexistent/prog"]);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("/nonexistent/prog"), "{err}");
    let (code, _, err) = restore(&[s], &[dir.path().to_str().unwrap()]);
    assert_eq!(code, 126, "{err}");
}

#[test]
fn a_crashing_command_is_saved_too() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    let s = snap.to_str().unwrap();
    let (code, _, err) = restore(&[s], &["sh", "-c", "$0 && kill -SEGV $$", &b("counter")]);
    assert_eq!(code, 128 + 11, "{err}");
    assert_eq!(count(&snap), 2);
}

#[test]
fn bad_environment_and_fds_are_setup_errors() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 1);
    let before = files(dir.path());
    let out = run(cmd("shm-restore")
        .env("LISTEN_FDS", "x")
        .arg(&snap)
        .arg(b("counter")));
    let (code, o, e) = result(&out);
    assert_eq!(code, 1, "{e}");
    assert!(o.is_empty() && e.contains("LISTEN_FDS"), "{e}");
    // fd 3 is a regular file, not a memfd.
    let script = format!(
        "exec 3<{s}; LISTEN_FDS=1 LISTEN_FDNAMES=SHM_SHARED_FD exec {r} {s} {c}",
        s = snap.display(),
        r = b("shm-restore"),
        c = b("counter")
    );
    let out = run(Command::new("sh")
        .args(["-c", &script])
        .env_remove("LISTEN_PID"));
    let (code, o, e) = result(&out);
    assert_eq!(code, 1, "{e}");
    assert!(o.is_empty() && e.contains("not a memfd"), "{e}");
    assert_eq!(files(dir.path()), before);
    // Usage errors.
    assert_eq!(restore(&["--interval", "soon", "x"], &["true"]).0, 2);
    assert_eq!(run(&mut cmd("shm-restore")).status.code(), Some(2));
}

/// Runs `shm-restore snap command...` as nobody when we are root (root
/// ignores permissions); `None` when the binaries are not reachable as
/// nobody here.
fn restore_unprivileged(snap: &Path, command: &[&str]) -> Option<(i32, String, String)> {
    let mut c = cmd("shm-restore");
    c.arg(snap).args(command);
    if nix::unistd::geteuid().is_root() {
        c.uid(65534).gid(65534);
    }
    let (code, o, e) = result(&run(&mut c));
    if o.is_empty() && e.contains("Permission denied") && !e.contains("s.snap") {
        return None;
    }
    Some((code, o, e))
}

/// A temp dir holding `sub/s.snap` (one counter run saved), the dir 0755
/// and the snapshot 0644, so another user can reach them: (dir, sub, snap).
fn snapshot_in_subdir(sub: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join(sub);
    std::fs::create_dir(&sub).unwrap();
    let snap = sub.join("s.snap");
    counted(&snap, 1);
    set_mode(dir.path(), 0o755);
    set_mode(&snap, 0o644);
    (dir, sub, snap)
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Hands `p` to nobody when we are root, for `restore_unprivileged`
/// commands that must change it.
fn give_to_nobody(p: &Path) {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(p, Some(65534.into()), Some(65534.into())).unwrap();
    }
}

#[test]
fn an_unwritable_directory_is_refused_before_the_command_starts_with_73() {
    // Issue 10: the command used to run and the failure came only at the
    // first save.
    let (dir, sub, snap) = snapshot_in_subdir("ro");
    set_mode(&sub, 0o555);
    let before = files(&sub);
    let marker = dir.path().join("ran");
    let script = format!("touch {}", marker.display());
    let outcome = restore_unprivileged(&snap, &["sh", "-c", &script]);
    set_mode(&sub, 0o755);
    let Some((code, o, e)) = outcome else {
        eprintln!("skipped: the binaries are not reachable as nobody here");
        return;
    };
    assert_eq!(code, 73, "{e}");
    assert!(o.is_empty(), "{o}");
    assert!(!marker.exists(), "the command ran");
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(
        e.contains("s.snap") && e.contains("cannot create files in") && e.contains("ro"),
        "{e}"
    );
    assert_eq!(files(&sub), before, "every file as it was");

    // Found in review: a directory that can be written but not read
    // (d-wx) passed, and every save then failed at the directory's fsync.
    let wo = dir.path().join("wo");
    std::fs::create_dir(&wo).unwrap();
    give_to_nobody(&wo);
    set_mode(&wo, 0o300);
    let outcome = restore_unprivileged(&wo.join("s.snap"), &["sh", "-c", &script]);
    set_mode(&wo, 0o755);
    let (code, o, e) = outcome.expect("reachable above");
    assert_eq!(code, 73, "{e}");
    assert!(o.is_empty() && !marker.exists(), "the command ran: {e}");
    assert!(e.contains("cannot open the directory"), "{e}");

    // A directory that does not exist, and a file in the directory's
    // place: refused the same way, nothing started, nothing created.
    for (snap, why) in [
        (dir.path().join("missing/s.snap"), "does not exist"),
        (snap.join("s.snap"), "is not a directory"),
    ] {
        let (code, o, e) = restore(&[snap.to_str().unwrap()], &["sh", "-c", &script]);
        assert_eq!(code, 73, "{e}");
        assert!(o.is_empty() && !marker.exists(), "the command ran: {e}");
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        assert!(e.contains(why) && e.contains("s.snap"), "{e}");
    }
    assert!(!dir.path().join("missing").exists());
}

#[test]
fn a_directory_that_becomes_unwritable_fails_the_final_save_with_74() {
    let (_dir, sub, snap) = snapshot_in_subdir("rw");
    // The command runs as nobody and must be able to chmod it.
    give_to_nobody(&sub);
    let before = files(&sub);
    // The command counts, then takes the write right away from the
    // directory before it exits: the final save cannot be made.
    let script = format!("{} && chmod 555 {}", b("counter"), sub.display());
    let outcome = restore_unprivileged(&snap, &["sh", "-c", &script]);
    set_mode(&sub, 0o755);
    let Some((code, o, e)) = outcome else {
        eprintln!("skipped: the binaries are not reachable as nobody here");
        return;
    };
    assert_eq!(o, "2\n", "{e}");
    assert_eq!(code, 74, "{e}");
    assert!(
        e.contains("save on exit failed") && e.contains("s.snap"),
        "{e}"
    );
    assert_eq!(
        files(&sub),
        before,
        "the previous snapshot is intact, no temp file"
    );
}

/// `shm-restore S sh -c '$COUNTER; echo ready; read x; echo "got $x"'`.
fn reader_on_terminal(snap: &Path) -> OnTerminal {
    let mut c = cmd("shm-restore");
    c.arg(snap)
        .args(["sh", "-c", "$0; echo ready; read x; echo \"got $x\""])
        .arg(b("counter"));
    OnTerminal::spawn(c)
}

#[test]
fn the_command_owns_the_terminal_ctrl_c_reaches_it_and_ctrl_z_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");

    // The command reads a line typed at the terminal (in a background
    // process group it would be stopped by SIGTTIN instead).
    let mut t = reader_on_terminal(&snap);
    t.expect("ready");
    t.type_keys("hello\n");
    t.expect("got hello");
    assert_eq!(t.child.wait().unwrap().code(), Some(0), "{}", t.text());
    t.expect("saved");

    // Ctrl-C goes to the command, which dies of it; the state is saved.
    let mut t = reader_on_terminal(&snap);
    t.expect("ready");
    t.type_keys("\x03");
    let status = t.child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 2), "{}", t.text());
    t.expect("saved");

    // Ctrl-Z stops the command and shm-restore with it (the shell sees its
    // job stopped); continuing shm-restore (`fg`) gives the terminal back
    // to the command, which goes on reading.
    let t = reader_on_terminal(&snap);
    t.expect("ready");
    t.type_keys("\x1a");
    let wrapper = Pid::from_raw(t.child.id() as i32);
    let flags = nix::sys::wait::WaitPidFlag::WUNTRACED;
    match nix::sys::wait::waitpid(wrapper, Some(flags)).unwrap() {
        nix::sys::wait::WaitStatus::Stopped(_, _) => {}
        other => panic!("shm-restore did not stop: {other:?}; {}", t.text()),
    }
    kill(wrapper, Signal::SIGCONT).unwrap();
    t.type_keys("after\n");
    t.expect("got after");
    match nix::sys::wait::waitpid(wrapper, None).unwrap() {
        nix::sys::wait::WaitStatus::Exited(_, 0) => {}
        other => panic!("{other:?}; {}", t.text()),
    }
    t.expect("saved");
    assert_eq!(count(&snap), 4, "each run saved its count");
}

#[test]
fn the_command_starts_with_no_blocked_signals_and_sigpipe_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    let (code, out, err) = restore(
        &[snap.to_str().unwrap()],
        &["grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"],
    );
    assert_eq!(code, 0, "{err}");
    // grep is the command itself: its mask is the one it started with (a
    // shell would block signals around its own forks).
    let field = |name: &str| {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
    };
    assert_eq!(field("SigBlk:"), 0, "blocked signals: {out}{err}");
    let sigpipe = 1 << (libc::SIGPIPE - 1);
    assert_eq!(field("SigIgn:") & sigpipe, 0, "SIGPIPE ignored: {out}{err}");
}

#[test]
fn check_says_what_was_found_what_was_expected_and_what_a_start_does() {
    // Issue 10: `--check` printed "checksums: BAD" and no reason.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 1);
    let good = std::fs::read(&snap).unwrap();
    let check = |extra: &[&str]| {
        let (code, o, _) = result(&run(cmd("shm-restore")
            .args(extra)
            .arg("--check")
            .arg(&snap)));
        (code, o)
    };
    let field = |report: &str, name: &str| -> String {
        report
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {report}"))
            .trim()
            .to_owned()
    };

    // Damaged (trailing bytes), no .prev: found and expected sizes, and
    // that a start refuses with 65 and what to do.
    let mut damaged = good.clone();
    damaged.extend_from_slice(&[0xAB; 7]);
    std::fs::write(&snap, &damaged).unwrap();
    let (code, report) = check(&[]);
    assert_eq!(code, 1, "{report}");
    let problem = field(&report, "problem:");
    assert!(
        problem.contains(&damaged.len().to_string()) && problem.contains(&good.len().to_string()),
        "found and expected lengths: {report}"
    );
    let start = field(&report, "at start:");
    assert!(
        start.contains("exit 65") && start.contains("no ") && start.contains(".prev"),
        "{report}"
    );

    // The same with a valid .prev: a start loads it.
    std::fs::write(with_suffix(&snap, ".prev"), &good).unwrap();
    let (_, report) = check(&[]);
    let start = field(&report, "at start:");
    assert!(
        start.contains("is valid (generation 1") && start.contains("corrupt"),
        "{report}"
    );
    // And a start does that: the counter goes on from the .prev.
    assert_eq!(count(&snap), 2);

    // Valid but over --max-size: the size the limit must reach.
    let (code, report) = check(&["--max-size", "4"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        field(&report, "problem:").contains("more than the maximum 4"),
        "{report}"
    );
    assert!(
        field(&report, "at start:").contains("raise --max-size to at least 8 bytes"),
        "{report}"
    );

    // Missing, with a valid .prev: a start loads the .prev (found in
    // review: --check said "starts with an empty memfd").
    std::fs::remove_file(&snap).unwrap();
    let (_, report) = check(&[]);
    assert_eq!(field(&report, "checksums:"), "not checked", "{report}");
    assert!(
        field(&report, "at start:").contains(".prev is valid"),
        "{report}"
    );
    // Missing, and no .prev: nothing to load.
    std::fs::remove_file(with_suffix(&snap, ".prev")).unwrap();
    let (_, report) = check(&[]);
    assert!(
        field(&report, "at start:").contains("empty memfd"),
        "{report}"
    );
}

#[test]
fn the_command_starts_inside_its_keepers_group() {
    // Issue 9: see `a_run_starts_inside_its_keepers_group` in shm_fd.rs.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    let (code, out, err) = restore(&["-q", snap.to_str().unwrap()], &["sh", "-c", GROUP_PROBE]);
    assert_eq!(code, 0, "{err}");
    assert_in_keepers_group(&out);
}

#[test]
fn sigkill_of_shm_restore_kills_the_command_and_its_process_group() {
    // Issue 9: `shm-restore S cmd` killed with SIGKILL left the command, and
    // what it started in the background, running.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    let mut sweep = Sweep::default();
    let mut wrapper = cmd("shm-restore")
        .arg("-q")
        .arg(&snap)
        .args(["sh", "-c", "sleep 1000 & echo $!; wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    sweep.add_tree(wrapper.id());
    let mut line = String::new();
    BufReader::new(wrapper.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let sleeper = line.trim().parse().unwrap();
    let sleeper = poll_for("the command's sleep", Duration::from_secs(10), || {
        Proc::of(sleeper)
    });
    sweep.add(sleeper);
    let command = poll_for("the command", Duration::from_secs(10), || {
        command_child(wrapper.id() as i32)
    });
    sweep.add(command);
    assert_eq!(
        ProcStat::read(sleeper.pid).map(|s| s.pgrp),
        ProcStat::read(command.pid).map(|s| s.pgrp),
        "the sleep is a grandchild in the command's process group"
    );
    kill(Pid::from_raw(wrapper.id() as i32), Signal::SIGKILL).unwrap();
    wrapper.wait().unwrap();
    assert!(
        command.ended_within(Duration::from_secs(10)),
        "the command outlived shm-restore"
    );
    assert!(
        sleeper.ended_within(Duration::from_secs(10)),
        "the command's background process outlived shm-restore"
    );
}

/// A small random number generator for kill times (xorshift64*).
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn kill_9_of_shm_restore_under_a_watcher_leaves_no_second_writer_and_no_torn_snapshot() {
    // Issue 9: under `shm-fd --restart always shm-restore ... bank run`, a
    // SIGKILL of shm-restore left `bank` running; the watcher started a new
    // run beside it, and the snapshots of the two writers were torn. Now
    // every process of a run must be gone before the next run starts, and
    // every snapshot saved meanwhile holds the bank's total.
    let kills: usize = std::env::var("SHM_FD_ORPHAN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("bank.snap");
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let (accounts, balance) = (64u64, 1000u64);
    let (code, _, err) = restore(
        &["-q", snap.to_str().unwrap()],
        &[
            &b("bank"),
            "init",
            "--accounts",
            &accounts.to_string(),
            "--balance",
            &balance.to_string(),
        ],
    );
    assert_eq!(code, 0, "{err}");

    let log = dir.path().join("watcher.log");
    let mut sweep = Sweep::default();
    let mut watcher = cmd("shm-fd")
        .args(["--restart", "always", &b("shm-restore"), "-q"])
        .args(["--interval", "20ms"])
        .arg(&snap)
        .args([&b("bank"), "run", "--seconds", "600"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    sweep.add_tree(watcher.id());
    let watcher_pid = watcher.id() as i32;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}, {kills} kills");
    let bound = Duration::from_secs(20);
    let mut previous: Vec<Proc> = Vec::new();
    for round in 0..kills {
        let wrapper = poll_for(&format!("run {round}'s shm-restore"), bound, || {
            command_child(watcher_pid).filter(|p| !previous.contains(p))
        });
        // The watcher started this run only once nothing of the last one
        // was left.
        let alive: Vec<&Proc> = previous.iter().filter(|p| p.is_running()).collect();
        assert!(
            alive.is_empty(),
            "round {round}: run started while the last one's processes {alive:?} \
             ran; {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let bank = poll_for(&format!("run {round}'s bank"), bound, || {
            command_child(wrapper.pid)
        });
        // Runs shorter than 1 s make the watcher back off (0.1 s, doubling):
        // every third run lives past that, the others die young.
        let delay = if round % 3 == 2 {
            1100 + next_random(&mut seed) % 200
        } else {
            10 + next_random(&mut seed) % 400
        };
        sleep(Duration::from_millis(delay));
        // Everything of this run: the watcher's children (shm-restore, the
        // run's group keeper) and shm-restore's (bank, its keeper).
        previous = children(watcher_pid)
            .iter()
            .chain(children(wrapper.pid).iter())
            .map(Proc::from)
            .collect();
        previous.push(bank);
        previous.push(wrapper);
        for p in &previous {
            sweep.add(*p);
        }
        kill(Pid::from_raw(wrapper.pid), Signal::SIGKILL).unwrap();
        copy_series(&snap, &copies.join(format!("{round}")));
        assert!(
            bank.ended_within(bound),
            "round {round}: bank {} outlived its shm-restore",
            bank.pid
        );
    }
    signal_and_wait(&mut watcher, bound);
    copy_series(&snap, &copies.join("last"));

    let mut checked = 0;
    for entry in std::fs::read_dir(&copies).unwrap() {
        let copy = entry.unwrap().path().join(snap.file_name().unwrap());
        let out = run(cmd("shm-restore")
            .arg("-q")
            .arg(&copy)
            .args([&b("bank"), "check"]));
        let (code, o, e) = result(&out);
        let total = accounts * balance;
        assert!(
            code == 0 && o.starts_with(&format!("total {total} ({accounts} accounts x {balance})")),
            "{}: exit {code}: {o}{e}",
            copy.display()
        );
        checked += 1;
    }
    assert_eq!(checked, kills + 1);
    eprintln!("{kills} kills, {checked} snapshots checked");
}

/// SIGTERM to `child`, then waits at most `bound` for it (SIGKILL after).
fn signal_and_wait(child: &mut Child, bound: Duration) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            child.wait().unwrap();
            panic!("{} did not stop within {bound:?} of SIGTERM", child.id());
        }
        sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_memfd_created_here_is_uploaded_to_the_fd_store() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 2);
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let out = run(cmd("shm-restore")
        .env("NOTIFY_SOCKET", &path)
        .arg(&snap)
        .arg(b("counter")));
    let (code, o, e) = result(&out);
    assert_eq!((code, o.as_str()), (0, "3\n"), "{e}");
    let (message, fd) = recv_with_fd(&sock);
    assert_eq!(message, "FDSTORE=1\nFDNAME=SHM_SHARED_FD\n");
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    assert!(
        target.to_str().unwrap().starts_with("/memfd:SHM_SHARED_FD"),
        "{target:?}"
    );
    // The very memfd the command ran on: it holds the counter's 3.
    let mut value = [0u8; 8];
    std::fs::File::from(fd)
        .read_exact_at(&mut value, 0)
        .unwrap();
    assert_eq!(u64::from_le_bytes(value), 3);

    // An inherited memfd is shm-fd's to upload (once), not ours again.
    let out = run(cmd("shm-fd")
        .env("NOTIFY_SOCKET", &path)
        .arg(b("shm-restore"))
        .arg(&snap)
        .arg(b("counter")));
    let (code, o, e) = result(&out);
    assert_eq!((code, o.as_str()), (0, "4\n"), "{e}");
    let (message, _) = recv_with_fd(&sock);
    assert_eq!(message, "FDSTORE=1\nFDNAME=SHM_SHARED_FD\n");
    sock.set_nonblocking(true).unwrap();
    assert!(
        sock.recv(&mut [0u8; 64]).is_err(),
        "a second FDSTORE message arrived"
    );

    // A failed upload is a warning; the command runs and is saved.
    let out = run(cmd("shm-restore")
        .env("NOTIFY_SOCKET", "/nonexistent/notify")
        .arg(&snap)
        .arg(b("counter")));
    let (code, o, e) = result(&out);
    assert_eq!((code, o.as_str()), (0, "5\n"), "{e}");
    assert!(
        e.contains("warning: cannot upload the memfd to systemd's fd store"),
        "{e}"
    );
    // A refused start (no valid snapshot) uploads nothing.
    std::fs::write(&snap, b"garbage").unwrap();
    std::fs::remove_file(with_suffix(&snap, ".prev")).unwrap();
    let out = run(cmd("shm-restore")
        .env("NOTIFY_SOCKET", &path)
        .arg(&snap)
        .arg(b("counter")));
    assert_eq!(out.status.code(), Some(65));
    assert!(
        sock.recv(&mut [0u8; 64]).is_err(),
        "a refused start uploaded"
    );
}

/// Lines of `err` that are the plain-mode notice of `--snapshot restore-v1`.
fn plain_notices(err: &str) -> usize {
    err.lines()
        .filter(|l| l.contains("the command does not use shm-snapshot"))
        .count()
}

/// `shm-restore --snapshot restore-v1 [extra] SNAP primes-snapshot`, with a
/// chunk committed every 30 ms.
fn primes_snapshot_under_protocol(snap: &Path, extra: &[&str]) -> Child {
    cmd("shm-restore")
        .args(["--snapshot", "restore-v1"])
        .args(extra)
        .arg(snap)
        .arg(b("primes-snapshot"))
        .args(["--interval-ms", "30", "--span", "4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn snapshot_protocol_saves_committed_states_of_a_running_program() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("primes.snap");

    // Saves on SIGUSR1 between commits copy without stopping the program.
    let wrapper = primes_snapshot_under_protocol(&snap, &[]);
    let pid = Pid::from_raw(wrapper.id() as i32);
    for _ in 0..4 {
        sleep(Duration::from_millis(150));
        kill(pid, Signal::SIGUSR1).unwrap();
    }
    sleep(Duration::from_millis(100));
    kill(pid, Signal::SIGTERM).unwrap();
    let (code, err) = finish(wrapper);
    assert_eq!(code, 128 + 15, "{err}");
    assert_eq!(plain_notices(&err), 0, "{err}");
    let kept = err
        .lines()
        .filter(|l| l.contains("on SIGUSR1") && l.contains("copied while the command ran"))
        .count();
    assert!(kept >= 1, "no save copied without a stop: {err}");

    // With --interval, a tick that finds nothing committed since the last
    // save writes nothing: about one save per commit, not one per tick.
    let before = generation(&snap).unwrap();
    let wrapper = primes_snapshot_under_protocol(&snap, &["--interval", "10ms"]);
    let pid = Pid::from_raw(wrapper.id() as i32);
    sleep(Duration::from_millis(1000));
    kill(pid, Signal::SIGUSR1).unwrap();
    sleep(Duration::from_millis(20));
    let saves = generation(&snap).unwrap() - before;
    kill(pid, Signal::SIGTERM).unwrap();
    let (code, err) = finish(wrapper);
    assert_eq!(code, 128 + 15, "{err}");
    assert_eq!(plain_notices(&err), 0, "{err}");
    assert!(
        (3..60).contains(&saves),
        "{saves} periodic saves in a second of 10 ms ticks and ~30 ms commits: {err}"
    );

    // The file verifies and restores a table of the first primes.
    let check = run(cmd("shm-restore").arg("--check").arg(&snap));
    assert_eq!(check.status.code(), Some(0), "{:?}", text(&check));
    let (code, out, err) = restore(
        &["-q", snap.to_str().unwrap()],
        &[&b("primes-snapshot"), "--limit", "1"],
    );
    assert_eq!(code, 0, "{err}");
    let table: Vec<u64> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert!(table.len() > 1000, "{} primes restored", table.len());
    assert_eq!(table, first_primes(table.len()));
}

#[test]
fn snapshot_protocol_without_a_header_says_so_once_and_saves_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    let data = dir.path().join("data");
    std::fs::write(&data, pattern_bytes(3 * 4096 + 100)).unwrap();
    let script = format!(
        "cat {} >&3; kill -USR1 $PPID; sleep 0.3; kill -USR1 $PPID; sleep 0.3",
        data.display()
    );
    for mode in ["restore-v1", "protocol"] {
        // Each mode from no snapshot: the first save is a full one.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("s.snap")
            {
                std::fs::remove_file(path).unwrap();
            }
        }
        let (code, _, err) = restore(
            &["--snapshot", mode, snap.to_str().unwrap()],
            &["sh", "-c", &script],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(plain_notices(&err), 1, "{mode}: {err}");
        let notice = err
            .lines()
            .find(|l| l.contains("does not use shm-snapshot"))
            .unwrap();
        assert_eq!(
            notice,
            "shm-restore: restore-v1: no shm-snapshot header: the command does not use \
             shm-snapshot; saving as in the plain mode"
        );
        // Saved as in the plain mode: paused for the copy. The second
        // SIGUSR1 finds every chunk as the first save left it: nothing
        // written (a delta would be empty).
        assert_eq!(
            err.lines()
                .filter(|l| l.contains("on SIGUSR1") && l.contains("paused"))
                .count(),
            1,
            "{err}"
        );
        assert_eq!(
            err.lines()
                .filter(|l| l.contains("nothing changed since the last save"))
                .count(),
            2,
            "the second SIGUSR1 and the exit: {err}"
        );
        let (code, out, err) = restore(
            &["-q", snap.to_str().unwrap()],
            &[
                "sh",
                "-c",
                "cat /dev/fd/3 | od -An -tx1 | tr -d ' \\n' | head -c 64",
            ],
        );
        assert_eq!(code, 0, "{err}");
        let want: String = pattern_bytes(32)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(out, want);
    }
    // An unknown mode is a usage error.
    assert_eq!(
        restore(
            &["--snapshot", "sometimes", snap.to_str().unwrap()],
            &["true"]
        )
        .0,
        2
    );
}

/// Deterministic non-zero bytes.
fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251 + 1) as u8).collect()
}

#[test]
fn a_terminal_hang_up_stops_the_command_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    // The command ignores SIGHUP (its sleeps do not): only shm-restore's
    // SIGTERM after the grace period ends it.
    let mut c = cmd("shm-restore");
    c.arg(&snap)
        .args([
            "sh",
            "-c",
            "trap '' HUP; $0; echo ready; while :; do sleep 0.1; done",
        ])
        .arg(b("counter"));
    let t = OnTerminal::spawn(c);
    t.expect("ready");
    let started = Instant::now();
    let mut child = t.hang_up();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert_eq!(count(&snap), 2, "the run's state was saved");
}

/// Writes at `path` a sparse snapshot whose header (with a valid CRC)
/// declares 2^32 one-byte chunks: the file is exactly as long as that
/// header says (about 68 GB, nearly all holes), so every length check
/// passes and only the chunk table's contents (zeros) are wrong.
fn forge_sparse_snapshot(path: &Path) {
    const CHUNKS: u64 = 1 << 32;
    let data_offset = (128 + 16 * CHUNKS).next_multiple_of(4096);
    let stored_len = CHUNKS; // one byte per chunk
    let mut h = [0u8; 128];
    h[0..8].copy_from_slice(b"SHMSNAP\0");
    h[8..12].copy_from_slice(&1u32.to_le_bytes()); // version
    h[12..16].copy_from_slice(&128u32.to_le_bytes()); // header_len
    h[16..20].copy_from_slice(&4096u32.to_le_bytes()); // chunk_size
    h[24..32].copy_from_slice(&(2 * CHUNKS).to_le_bytes()); // data_len: 8 GiB
    h[32..40].copy_from_slice(&99u64.to_le_bytes()); // generation
    h[48..56].copy_from_slice(&CHUNKS.to_le_bytes()); // chunk_count
    h[56..64].copy_from_slice(&stored_len.to_le_bytes());
    h[64..72].copy_from_slice(&128u64.to_le_bytes()); // table_offset
    h[72..80].copy_from_slice(&data_offset.to_le_bytes());
    let crc = crc32(&h[..124]);
    h[124..128].copy_from_slice(&crc.to_le_bytes());
    let f = std::fs::File::create(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &h, 0).unwrap();
    f.set_len(data_offset + stored_len).unwrap();
}

/// What identifies a file without reading it all (the forged snapshot is
/// 68 GB of holes): inode, length, modification time and first 4 KiB.
fn fingerprint(path: &Path) -> (u64, u64, i64, i64, Vec<u8>) {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    let mut head = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .take(4096)
        .read_to_end(&mut head)
        .unwrap();
    (m.ino(), m.len(), m.mtime(), m.mtime_nsec(), head)
}

/// The names in `dir` with each file's fingerprint.
fn fingerprints(dir: &Path) -> BTreeMap<String, (u64, u64, i64, i64, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), fingerprint(&e.path()))
        })
        .collect()
}

/// Issue 9, part 3: a sparse snapshot whose header declares 2^32 chunks
/// made `shm-restore` abort on a 64 GiB allocation (exit 134) instead of
/// treating the file as damaged.
#[test]
fn a_sparse_snapshot_declaring_2_pow_32_chunks_is_damage_not_an_abort() {
    // With a valid .prev: the .prev is loaded, the forged file kept.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 2); // s.snap holds 2, s.snap.prev holds 1
    forge_sparse_snapshot(&snap);
    let forged = fingerprint(&snap);
    let started = Instant::now();
    let (code, out, err) = restore(&[snap.to_str().unwrap()], &[&b("counter")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "2", "continued from .prev (1)");
    assert!(
        err.contains("WARNING") && err.contains("chunk table") && err.contains("s.snap.corrupt-"),
        "{err}"
    );
    let kept: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().contains("s.snap.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        fingerprint(&kept[0]),
        forged,
        "kept as it was, only renamed"
    );
    assert_eq!(count(&snap), 3);

    // Without .prev: exit 65, the command not started, nothing changed.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 1);
    forge_sparse_snapshot(&snap);
    let before = fingerprints(dir.path());
    let (code, out, err) = restore(&[snap.to_str().unwrap()], &["sh", "-c", "echo started"]);
    assert_eq!(code, 65, "{err}");
    assert!(out.is_empty(), "the command ran");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("s.snap") && err.contains("chunk table"),
        "{err}"
    );
    assert_eq!(fingerprints(dir.path()), before, "files changed");
    // --check says BAD, it does not abort either.
    let check = run(cmd("shm-restore").arg("--check").arg(&snap));
    assert_eq!(check.status.code(), Some(1), "{}", text(&check).1);
    assert!(text(&check).0.contains("BAD"));
    assert_eq!(fingerprints(dir.path()), before, "files changed");
    // Bounded work: the table's first entry is already wrong.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// Issue 9, part 3: a memfd larger than `--max-size` was saved (a file no
/// later start could load), and the next save renamed that good snapshot
/// to `.corrupt-*`. A save that cannot be done changes no file.
#[test]
fn a_memfd_larger_than_max_size_is_not_saved_and_no_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    counted(&snap, 2);
    let before = files(dir.path());
    // The command grows the memfd (fd 3) to 8 KiB, past the 4 KiB limit.
    let (code, out, err) = restore(
        &["--max-size", "4K", snap.to_str().unwrap()],
        &["sh", "-c", "head -c 8192 /dev/zero >&3 && echo grown"],
    );
    assert_eq!(out, "grown\n", "{err}");
    assert_eq!(code, 74, "the final save failed: {err}");
    assert!(
        err.contains("save on exit failed") && err.contains("8192") && err.contains("4096"),
        "{err}"
    );
    assert_eq!(files(dir.path()), before, "a file changed");
    // The good snapshot still loads.
    assert_eq!(count(&snap), 3);
}

/// Issue 9, part 3: `--interval 0` spun a core at 100%; other zero or
/// absurd durations and sizes misbehaved (an interval of 3e15 hours
/// overflowed the clock: a panic after the command started). Each is a
/// one-line usage error naming the option and the accepted range; nothing
/// is started or created.
#[test]
fn zero_and_absurd_durations_and_sizes_are_usage_errors() {
    let cases: [(&str, &str, &str); 11] = [
        ("--interval", "0", "1ms to 168h"),
        ("--interval", "0s", "1ms to 168h"),
        ("--interval", "0.5ms", "1ms to 168h"),
        ("--interval", "1000000h", "168h"),
        // Past the monotonic clock: panicked after the command started.
        ("--interval", "3000000000000000h", "168h"),
        ("--interval", "99999999999999999999999h", "168h"),
        ("--stop-timeout", "0", "10ms to 1h"),
        ("--stop-timeout", "0ms", "10ms to 1h"),
        ("--stop-timeout", "1000000000h", "1h"),
        ("--max-size", "0", "1 byte"),
        ("--max-size", "99999999999T", "8388607T"),
    ];
    for (option, value, range) in cases {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("s.snap");
        let marker = dir.path().join("started");
        let script = format!("touch {}; echo started", marker.display());
        let started = Instant::now();
        let (code, out, err) = restore(
            &[option, value, snap.to_str().unwrap()],
            &["sh", "-c", &script],
        );
        assert_eq!(code, 2, "{option} {value}: {err}");
        assert!(out.is_empty(), "{option} {value}: the command ran");
        assert_eq!(err.lines().count(), 1, "{option} {value}: {err}");
        assert!(
            err.contains(option) && err.contains(value) && err.contains(range),
            "{option} {value}: {err}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{option} {value}: a file was created"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

/// Fills the memfd on fd 3 with `size` of non-zero bytes (`head -c`'s
/// suffixes), as the command of a save long enough to show progress.
fn fill_script(size: &str) -> String {
    format!("yes 0123456789abcdef | head -c {size} > /dev/fd/3")
}

/// Issue 10: progress is drawn only for a terminal. A save that takes over
/// a second prints its usual lines when stderr is a pipe, and no progress
/// line (nothing redrawn with `\r`).
#[test]
fn a_long_save_prints_no_progress_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    let (code, _, err) = restore(
        &[snap.to_str().unwrap()],
        &["sh", "-c", &fill_script("1536M")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("saved"), "{err}");
    assert!(
        !err.contains('\r') && !err.contains("saving") && !err.contains('%'),
        "{err:?}"
    );
}

/// Checks the progress line of an operation that took `took` (an upper
/// bound, seen from outside) in `shown`: there when it took well over a
/// second, absent when it took under one (as with fast release binaries).
fn check_progress(shown: &str, took: Duration, line: &str, then: &str) {
    let has_line = shown.contains(line);
    if took > Duration::from_millis(1500) {
        assert!(has_line, "no {line:?} in {took:?}: {shown:?}");
        // The line is cleared before the status line that follows it.
        assert!(shown.contains(&format!("\r\x1b[K{then}")), "{shown:?}");
    } else if took < Duration::from_millis(900) {
        assert!(!has_line && !shown.contains('%'), "{took:?}: {shown:?}");
    }
}

/// Issue 10: on a terminal, a save and a load that take over a second show
/// how far they are on one line redrawn in place, cleared at the end; ones
/// under a second show nothing. (2 GiB takes 2-3 s in a debug build.)
#[test]
fn a_long_save_and_load_on_a_terminal_show_progress_and_clear_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.snap");
    // --no-seal: the second command empties the memfd again, so that its
    // exit saves nothing (no second 2 GiB save in this test's time).
    let mut c = cmd("shm-restore");
    c.args(["--no-seal", snap.to_str().unwrap(), "sh", "-c"])
        .arg(fill_script("2G") + "; echo filled");
    let mut t = OnTerminal::spawn(c);
    t.expect("filled");
    let save_started = Instant::now();
    t.expect("shm-restore: saved");
    let took = save_started.elapsed();
    assert_eq!(t.child.wait().unwrap().code(), Some(0), "{:?}", t.text());
    check_progress(
        &t.text(),
        took,
        "\rshm-restore: saving ",
        "shm-restore: saved ",
    );
    assert!(t.text().contains(" of 2.0 GiB (") || took < Duration::from_millis(1500));

    let mut c = cmd("shm-restore");
    c.args([
        "--no-seal",
        snap.to_str().unwrap(),
        "sh",
        "-c",
        ": > /dev/fd/3",
    ]);
    let started = Instant::now();
    let mut t = OnTerminal::spawn(c);
    t.expect("shm-restore: loaded");
    let took = started.elapsed();
    assert_eq!(t.child.wait().unwrap().code(), Some(0), "{:?}", t.text());
    t.expect("left as it was");
    check_progress(
        &t.text(),
        took,
        "\rshm-restore: loading ",
        "shm-restore: loaded ",
    );
    let shown = t.text();
    assert!(
        took < Duration::from_millis(1500)
            || (shown.contains(": checking, ") || shown.contains(": copying, "))
                && shown.contains(" of 2.0 GiB ("),
        "{shown:?}"
    );
}

/// Copies the snapshot `snap` with the files its delta chain needs
/// (`<name>`, `<name>.prev`, `<name>.gen-*`) into the new directory `to`,
/// again until the copy verifies: a save running meanwhile can replace the
/// snapshot and remove a base the copied one named.
fn copy_series(snap: &Path, to: &Path) {
    let dir = snap.parent().unwrap();
    let name = snap.file_name().unwrap().to_string_lossy().into_owned();
    for attempt in 0..20 {
        let _ = std::fs::remove_dir_all(to);
        std::fs::create_dir_all(to).unwrap();
        // The snapshot first, then the bases it may name.
        std::fs::copy(snap, to.join(&name)).unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let file = entry.unwrap().file_name().to_string_lossy().into_owned();
            if file != name && file.starts_with(&name) && !file.contains("tmp") {
                // Removed meanwhile: the verify below tells.
                let _ = std::fs::copy(dir.join(&file), to.join(&file));
            }
        }
        if shm_restore::inspect(&to.join(&name), u64::MAX)
            .verdict
            .is_ok()
        {
            return;
        }
        eprintln!(
            "copy of {} changed under the copy (try {attempt}), again",
            snap.display()
        );
    }
    panic!("no consistent copy of {} in 20 tries", snap.display());
}
