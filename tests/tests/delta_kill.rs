//! kill -9 of `shm-restore` while it saves deltas: real processes.
//!
//! `shm-restore --interval 5ms --max-chain 4 SNAP -- WRITER` runs a writer
//! (this test binary again, see [`writer_role`]) that keeps a 16 MiB memfd
//! of 16 cells of 1 MiB, each holding a counter in its first 8 bytes over
//! a filler. Step N writes N into cell 0, then into cell i (ascending) for
//! every i with 8^i dividing N: cell 0 changes at every step, cell 1 every
//! 8th, cell 2 every 64th, ..., so that a save (every 5 ms, the group
//! stopped for the copy: a state the program had at one instant) is a
//! delta of a few changed cells over a chain of up to 4, and the cells
//! that rarely change come from older links. Every state the writer ever
//! had satisfies [`consistent`]: with N = cell 0, cell i holds
//! N - N mod 8^i, except that when 8^i divides N the cells from some
//! point of that run on may still hold the step before's value. A torn or
//! mixed-generation restore (a cell from another save than its
//! neighbours, a link applied over the wrong base) breaks it.
//!
//! The test kills the wrapper (SIGKILL, by pid) at random times, checks
//! that its writer dies with it, runs `shm-restore --check SNAP`, and
//! restarts the wrapper, which loads the chain: the writer checks the
//! state it starts from, and the generation loaded must be at least the
//! last one the test saw committed (a kill may lose the save under way,
//! never a committed one). `DELTA_KILLS` sets the number of kills
//! (default 70), `DELTA_KILL_SEED` replays a run.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use shm_fd_tests::procs::{Sweep, command_child, poll_for};
use shm_fd_tests::{BOUND, Kid, Rng, cmd, env_count, killed, run, text};

const CELLS: u64 = 16;
const CELL: u64 = 1 << 20;
/// Set in the writer's environment: this binary is then the writer.
const ROLE: &str = "SHM_FD_DELTA_KILL_WRITER";

/// The period of cell `i`: it is written at the steps 8^i divides.
fn period(i: u64) -> u64 {
    8u64.checked_pow(i as u32).unwrap_or(u64::MAX)
}

/// Whether the counters `c` (cell 0 first) are a state the writer had at
/// some instant; `Err` says what is wrong.
fn consistent(c: &[u64]) -> Result<u64, String> {
    let n = c[0];
    // Cells written at step n (those whose period divides it) are a run
    // 1..=m; the writer may have stopped inside it: new values, then old.
    let mut old_seen = false;
    for i in 1..c.len() as u64 {
        let p = period(i);
        let now = n - n % p;
        let got = c[i as usize];
        if n.is_multiple_of(p) && n > 0 {
            if got == n && !old_seen {
                continue;
            }
            if got == n - p {
                old_seen = true;
                continue;
            }
        } else if got == now {
            continue;
        }
        return Err(format!(
            "cell {i} holds {got}, cell 0 holds {n} (cell {i} changes every {p} steps): {c:?}"
        ));
    }
    Ok(n)
}

fn counters(memfd: &File) -> Vec<u64> {
    (0..CELLS)
        .map(|i| {
            let mut b = [0u8; 8];
            memfd.read_exact_at(&mut b, i * CELL).unwrap();
            u64::from_le_bytes(b)
        })
        .collect()
}

/// The writer: runs only when the kill test starts this binary with
/// [`ROLE`] set (as a test of its own, filtered by name). Works on the
/// memfd `shm-restore` passes on fd 3; checks the state it starts from
/// and says `start N` on stderr (or `INCONSISTENT ...`, exit 3), then
/// counts up until killed.
#[test]
fn writer_role() {
    if std::env::var_os(ROLE).is_none() {
        return;
    }
    // SAFETY: shm-restore passes the memfd on fd 3 (LISTEN_FDS=1), which
    // nothing else in this process owns.
    let memfd = unsafe { File::from_raw_fd(3) };
    let len = memfd.metadata().unwrap().len();
    let mut n = if len < CELLS * CELL {
        memfd.set_len(CELLS * CELL).unwrap();
        0
    } else {
        match consistent(&counters(&memfd)) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("INCONSISTENT {e}");
                std::process::exit(3);
            }
        }
    };
    // Every cell gets a filler, so that each holds data (a full snapshot
    // stores 16 MiB, a delta only its cells). Written at every start, not
    // only on a fresh memfd: a save that caught the first run between its
    // `set_len` and its fillers stored a state of holes, over which every
    // delta would be larger than half the full snapshot (so written full).
    // Rewriting the same bytes changes nothing a save compares.
    let filler: Vec<u8> = (0..CELL - 8).map(|i| (i % 251) as u8 | 1).collect();
    for i in 0..CELLS {
        memfd.write_all_at(&filler, i * CELL + 8).unwrap();
    }
    eprintln!("start {n}");
    loop {
        n += 1;
        for i in 0..CELLS {
            if n % period(i) != 0 {
                break;
            }
            memfd.write_all_at(&n.to_le_bytes(), i * CELL).unwrap();
        }
        sleep(Duration::from_millis(1));
    }
}

/// The generation and format version of the snapshot at `snap` as its
/// header says (no checks: only read while polling).
fn header_of(snap: &Path) -> Option<(u64, u32)> {
    let mut b = [0u8; 128];
    File::open(snap).ok()?.read_exact_at(&mut b, 0).ok()?;
    Some({
        (
            u64::from_le_bytes(b[32..40].try_into().unwrap()),
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
        )
    })
}

/// The generation in `loaded PATH (generation G, ...` of a start's stderr.
fn loaded_generation(err: &str) -> Option<u64> {
    let at = err.find(" (generation ")? + " (generation ".len();
    err[at..].split(',').next()?.parse().ok()
}

#[test]
fn kill_9_during_delta_saves_loads_a_consistent_state_and_never_loses_a_commit() {
    let kills = env_count("DELTA_KILLS", 70);
    let mut rng = Rng::seeded("DELTA_KILL_SEED", "delta_kill");
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("state.snap");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let me = std::env::current_exe().unwrap();
    let mut sweep = Sweep::default();

    let mut last_committed = 0u64; // the newest generation seen in place
    let mut last_start = 0u64; // the counter the last run started from
    let mut generations = std::collections::BTreeMap::new(); // generation -> version
    let (mut delta_lines, mut save_lines) = (0usize, 0usize);
    let (mut killed_runs, mut progressed, mut mid_save) = (0usize, 0usize, 0usize);
    for round in 0..=kills {
        let mut c = cmd("shm-restore");
        c.args(["--interval", "5ms", "--max-chain", "4"])
            .arg(&snap)
            .arg("--")
            .arg(&me)
            .args(["writer_role", "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, "1");
        let mut kid = Kid::start(c, format!("run-{round}"), &logs, None);
        sweep.add_tree(kid.pid());
        let line = kid.wait_for_line("start ");
        let err = kid.stderr();
        assert!(!err.contains("INCONSISTENT"), "round {round}: {err}");
        assert!(!err.contains("WARNING"), "round {round}: a fallback: {err}");
        let start: u64 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("round {round}: {err}"));
        // Progress never goes back: the run starts from what the last
        // run saved, which started from the one before, ...
        assert!(
            start >= last_start,
            "round {round}: started from {start}, the run before from {last_start}"
        );
        if start > last_start {
            progressed += 1;
        }
        last_start = start;
        if round > 0 && last_committed > 0 {
            // Every committed generation survives the kill: the one loaded
            // is at least the newest seen in place before it.
            let g = loaded_generation(&err)
                .unwrap_or_else(|| panic!("round {round}: nothing loaded: {err}"));
            assert!(
                g >= last_committed,
                "round {round}: loaded generation {g}, generation {last_committed} was committed"
            );
        }
        if round == kills {
            // The last run: ended by SIGTERM, its exit save a status line.
            let pid = nix::unistd::Pid::from_raw(kid.pid() as i32);
            sleep(Duration::from_millis(100));
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = kid.wait(BOUND);
            let e = kid.stderr();
            assert!(e.contains("saved "), "the exit save: {status} {e}");
            delta_lines += e.matches(", a delta on generation ").count();
            save_lines += e.matches("saved ").count();
            break;
        }
        let writer = poll_for("the writer", Duration::from_secs(20), || {
            command_child(kid.pid() as i32)
        });
        sweep.add(writer);
        // Runs for a random time, the test watching the generations
        // committed meanwhile; now and then a SIGUSR1 save, which says
        // whether it wrote a delta.
        let deadline = Instant::now() + Duration::from_millis(rng.below(300));
        let usr1 = rng.below(2) == 0;
        while Instant::now() < deadline {
            if let Some((g, v)) = header_of(&snap) {
                last_committed = last_committed.max(g);
                generations.entry(g).or_insert(v);
            }
            if usr1 && rng.below(20) == 0 {
                let pid = nix::unistd::Pid::from_raw(kid.pid() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1);
            }
            sleep(Duration::from_millis(1));
        }
        assert!(killed(kid.kill()), "round {round}: {}", kid.stderr());
        killed_runs += 1;
        // Killed inside a save: its temp file is left (the next start
        // removes it).
        let temps = std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".state.snap.tmp-")
        });
        if temps {
            mid_save += 1;
        }
        let e = kid.stderr();
        assert!(!e.contains("panicked"), "round {round}: {e}");
        delta_lines += e.matches(", a delta on generation ").count();
        save_lines += e.matches("saved ").count();
        assert!(
            writer.ended_within(Duration::from_secs(10)),
            "round {round}: the writer outlived its shm-restore"
        );
        if let Some((g, v)) = header_of(&snap) {
            assert!(
                g >= last_committed,
                "round {round}: generation {g} in place after generation {last_committed}"
            );
            last_committed = g;
            generations.entry(g).or_insert(v);
        }
        if snap.exists() {
            let out = run(cmd("shm-restore").arg("--check").arg(&snap));
            let (o, e) = text(&out);
            assert_eq!(out.status.code(), Some(0), "round {round}: --check: {o}{e}");
        }
    }
    let deltas = generations.values().filter(|&&v| v == 2).count();
    eprintln!(
        "delta_kill: {killed_runs} kills ({mid_save} inside a save's write), {progressed} \
         restarts with progress, counter at \
         {last_start}; {} generations seen in place, {deltas} of them deltas; {save_lines} \
         status lines of SIGUSR1 and exit saves, {delta_lines} of them deltas; {:.1?}",
        generations.len(),
        started.elapsed()
    );
    assert!(deltas > 0, "no delta seen: {generations:?}");
    assert!(progressed > 0, "no run made progress");
}

#[test]
fn the_consistency_check_catches_mixed_states() {
    // What the writer leaves at each instant passes...
    let mut c = vec![0u64; CELLS as usize];
    assert!(consistent(&c).is_ok());
    for n in 1..=300u64 {
        c[0] = n;
        assert!(consistent(&c).is_ok(), "{n} after cell 0: {c:?}");
        for i in 1..CELLS {
            if n % period(i) != 0 {
                break;
            }
            c[i as usize] = n;
            assert!(consistent(&c).is_ok(), "{n} after cell {i}: {c:?}");
        }
    }
    // ... a cell from another instant does not.
    let good = c.clone();
    for (cell, value) in [(1, 288), (2, 192), (0, 295), (1, 304), (3, 512)] {
        let mut bad = good.clone();
        bad[cell] = value;
        assert!(consistent(&bad).is_err(), "{bad:?}");
    }
    // A step caught inside its run of writes passes; new after old does not.
    let mut mid = vec![0u64; CELLS as usize];
    (mid[0], mid[1], mid[2], mid[3]) = (512, 512, 448, 0);
    assert!(consistent(&mid).is_ok(), "{mid:?}");
    (mid[1], mid[2], mid[3]) = (504, 512, 0);
    assert!(consistent(&mid).is_err(), "{mid:?}");
}
