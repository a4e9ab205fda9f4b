//! The bridge from the original shm-fd (crates.io `shm-fd` 0.5, issue 10
//! §4): a program built against the original's library keeps its state
//! under our `shm-fd`, and our programs run with the fd passed the way the
//! original `shm-fd` binary passes it. `docs/migrating.md` describes both.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use shm_fd_tests::{bin, cmd, run, text};

fn b(name: &str) -> String {
    bin(name).to_str().unwrap().to_owned()
}

/// Runs `shm-fd [args] sh -c script` and returns (code, stdout, stderr).
fn shm_sh(args: &[&str], script: &str) -> (Option<i32>, String, String) {
    let out = run(cmd("shm-fd").args(args).args(["sh", "-c", script]));
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

#[test]
fn a_program_on_the_original_library_keeps_its_state_under_our_shm_fd() {
    let (orig, counter) = (b("orig-api-counter"), b("counter"));
    let (code, out, err) = shm_sh(&[], &format!("{orig}; {orig}; {orig}"));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "1\n2\n3\n", "{err}");
    // Both libraries find the same memfd, and the same word in it.
    let (code, out, err) = shm_sh(&[], &format!("{orig}; {counter}; {orig}"));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "1\n2\n3\n", "{err}");
    // The original's library compares LISTEN_PID with its pid: `--pid`
    // (shm-fd execs the command, which keeps the pid) passes that check.
    let out = run(cmd("shm-fd").args(["--pid", &orig]));
    assert_eq!(text(&out).0, "1\n", "{:?}", text(&out));
    assert!(out.status.success());
    // A restart by our watcher keeps the memfd for it too.
    let (code, out, err) = shm_sh(
        &["--restart", "on-failure"],
        &format!("n=$({orig}) && echo $n && [ $n -ge 3 ]"),
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "1\n2\n3\n", "{err}");
}

/// A memfd as the original `shm-fd` creates it: `memfd_create("persistent",
/// MFD_ALLOW_SEALING)`, empty, with no seal.
fn original_memfd() -> OwnedFd {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    memfd_create(
        "persistent",
        MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC,
    )
    .expect("memfd_create")
}

/// `command` with `memfd` passed exactly as the original `shm-fd` binary
/// passes its memfd (its `ListenInit::wrap_proc`): on fd 3 without
/// close-on-exec, `LISTEN_FDS=1`, `LISTEN_FDNAMES=SHM_SHARED_FD`, and
/// `LISTEN_PID` left as it was (unset here: [`cmd`] removes it).
fn as_the_original_passes(mut command: Command, memfd: &OwnedFd) -> Command {
    command
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "SHM_SHARED_FD");
    let raw = memfd.as_raw_fd();
    // SAFETY: between fork and exec the hook calls only fcntl and dup2,
    // which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let done = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if done == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

#[test]
fn our_counter_runs_with_the_fd_passed_the_way_the_original_passes_it() {
    // The test holds the memfd, as the original `shm-fd` (or systemd's fd
    // store) does, and passes it to each run.
    let memfd = original_memfd();
    for expected in 1..=3 {
        let out = run(&mut as_the_original_passes(cmd("counter"), &memfd));
        let (o, e) = text(&out);
        assert!(out.status.success(), "run {expected}: {e}");
        assert_eq!(o, format!("{expected}\n"), "{e}");
    }
    // Through a wrapper, as under the original's `shm-fd watch ...`.
    let c = b("counter");
    let mut sh = Command::new("sh");
    sh.args(["-c", &format!("{c}; {c}")])
        .env_remove("LISTEN_PID");
    let out = run(&mut as_the_original_passes(sh, &memfd));
    assert_eq!(text(&out).0, "4\n5\n", "{:?}", text(&out));
    // Our shm-fd under it reuses that memfd rather than making its own.
    let out = run(as_the_original_passes(cmd("shm-fd"), &memfd).arg(&c));
    assert_eq!(text(&out).0, "6\n", "{:?}", text(&out));
    // The state is in the memfd the "original" holds.
    let mut word = [0u8; 8];
    std::fs::File::from(memfd.try_clone().unwrap())
        .read_exact_at(&mut word, 0)
        .unwrap();
    assert_eq!(u64::from_le_bytes(word), 6);
}

/// The primes `primes-snapshot` printed, checked to be the first ones.
fn printed_primes(out: &std::process::Output) -> usize {
    let (o, e) = text(out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    let printed: Vec<u64> = o.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(printed, shm_fd_tests::first_primes(printed.len()), "{e}");
    printed.len()
}

#[test]
fn primes_snapshot_takes_the_originals_positional_arguments() {
    let ps = b("primes-snapshot");
    // The original's `primes-snapshot <interval_ms> <limit>`.
    let out = run(cmd("shm-fd").args([&ps, "1", "10000"]));
    assert!(printed_primes(&out) >= 10000);
    // The named form keeps working, and mixes with the other positional.
    let out = run(cmd("shm-fd").args([&ps, "--interval-ms", "1", "--limit", "10000"]));
    assert!(printed_primes(&out) >= 10000);
    let out = run(cmd("shm-fd").args([&ps, "1", "--limit", "10000"]));
    assert!(printed_primes(&out) >= 10000);
    // A positional with its own named option as well: usage error.
    for args in [
        ["1", "--interval-ms", "2"].as_slice(),
        &["--limit", "5", "1", "7"],
        &["1", "2", "3"],
    ] {
        let out = run(cmd("shm-fd").arg(&ps).args(args));
        let (o, e) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {e}");
        assert!(o.is_empty() && e.starts_with("error: "), "{args:?}: {e}");
    }
}

/// A raw image as the original shm-restore writes it (the memfd's bytes as
/// a plain file): `data_len` pseudo-random bytes from `seed`, then a hole
/// of 2 MiB, then 4 bytes at the end.
fn write_raw(path: &Path, seed: u64, data_len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes: Vec<u8> = (0..data_len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    bytes.resize(data_len + (2 << 20), 0);
    bytes.extend_from_slice(b"tail");
    let file = std::fs::File::create(path).unwrap();
    file.write_all_at(&bytes[..data_len], 0).unwrap();
    file.write_all_at(b"tail", (data_len + (2 << 20)) as u64)
        .unwrap();
    bytes
}

/// The files of `dir` with their bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect()
}

/// `shm-restore --import-raw RAW SNAP [extra]`: (exit code, stderr).
fn import(raw: &Path, snap: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = run(cmd("shm-restore")
        .arg("--import-raw")
        .arg(raw)
        .arg(snap)
        .args(extra));
    let (o, e) = text(&out);
    assert!(o.is_empty(), "{o}");
    (out.status.code(), e)
}

/// What a program finds in the memfd `shm-restore SNAP` loads.
fn loaded_bytes(snap: &Path) -> Vec<u8> {
    let out_file = snap.with_extension("out");
    let out = run(cmd("shm-restore").arg(snap).args([
        "sh",
        "-c",
        "cat /proc/self/fd/3 > \"$0\"",
        out_file.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{:?}", text(&out));
    let bytes = std::fs::read(&out_file).unwrap();
    std::fs::remove_file(&out_file).unwrap();
    bytes
}

#[test]
fn import_raw_round_trip_keeps_the_bytes_and_leaves_holes_out() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, snap) = (dir.path().join("state.raw"), dir.path().join("state.snap"));
    let bytes = write_raw(&raw, 7, 300_000);
    let (code, err) = import(&raw, &snap, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("imported"), "{err}");
    let out = run(cmd("shm-restore").arg("--check").arg(&snap));
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}{e}");
    assert!(o.contains("checksums:      ok"), "{o}");
    // About 300 KB stored of the 2.3 MB (file system blocks round the
    // extents): the 2 MiB hole is left out, as a save leaves a memfd's.
    let size = bytes.len();
    let stored: u64 = o
        .split_once(&format!("data size:      {size} bytes ("))
        .and_then(|(_, rest)| rest.split_once(" stored"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no data size line for {size} bytes: {o}"));
    assert!((300_004..400_000).contains(&stored), "{o}");
    assert!(loaded_bytes(&snap) == bytes, "the loaded memfd differs");
}

#[test]
fn import_raw_replaces_a_snapshot_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("state.snap");
    let (raw_a, raw_b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    write_raw(&raw_a, 1, 5000);
    let b_bytes = write_raw(&raw_b, 2, 7000);
    assert_eq!(import(&raw_a, &snap, &[]).0, Some(0));
    let before = files(dir.path());

    let (code, err) = import(&raw_b, &snap, &[]);
    assert_eq!(code, Some(73), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(snap.to_str().unwrap()), "{err}");
    assert_eq!(files(dir.path()), before, "refused: every file as it was");

    let (code, err) = import(&raw_b, &snap, &["--force"]);
    assert_eq!(code, Some(0), "{err}");
    let after = files(dir.path());
    // The replaced snapshot is kept as .prev, as a save keeps it; no temp
    // file is left. The new snapshot also has its chain name (generation
    // 2), the base of the next save's delta.
    assert_eq!(after["state.snap.prev"], before["state.snap"]);
    assert_eq!(after["state.snap.gen-2"], after["state.snap"]);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        [
            "a.raw",
            "b.raw",
            "state.snap",
            "state.snap.gen-2",
            "state.snap.prev"
        ]
    );
    assert!(loaded_bytes(&snap) == b_bytes, "the loaded memfd differs");
}

#[test]
fn import_raw_refusals_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("state.snap");
    let raw = dir.path().join("state.raw");
    let check = |raw: &Path, extra: &[&str], want: i32, says: &str| {
        let before = files(dir.path());
        let (code, err) = import(raw, &snap, extra);
        assert_eq!(code, Some(want), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(files(dir.path()), before, "{err}");
    };
    check(&raw, &[], 66, "state.raw: cannot read it: no such file");
    check(dir.path(), &[], 66, "not a regular file");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    check(&raw, &[], 65, "holds no data");
    write_raw(&raw, 3, 1000);
    check(
        &raw,
        &["--max-size", "1M"],
        65,
        "more than the maximum 1048576",
    );
    // Found in review: a FIFO made the import wait for a writer forever;
    // one of our own snapshots (the arguments swapped) was imported as
    // data, its header becoming the program's state.
    // (In a directory of its own: `files` reads every file it lists.)
    let fifo_dir = tempfile::tempdir().unwrap();
    let fifo = fifo_dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    check(&fifo, &[], 66, "not a regular file");
    let (code, err) = import(&raw, &snap, &[]);
    assert_eq!(code, Some(0), "{err}");
    let other = dir.path().join("other.snap");
    let before = files(dir.path());
    let (code, err) = import(&snap, &other, &[]);
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("is a shm-restore snapshot already"), "{err}");
    assert_eq!(files(dir.path()), before, "{err}");
    let (code, err) = import(&snap, &snap, &["--force"]);
    assert_eq!(code, Some(65), "{err}");
    assert_eq!(files(dir.path()), before, "{err}");
    std::fs::remove_file(&snap).unwrap();
    // --force belongs to --import-raw.
    let out = run(cmd("shm-restore").args(["--force"]).arg(&snap).arg("true"));
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(!snap.exists());
}
