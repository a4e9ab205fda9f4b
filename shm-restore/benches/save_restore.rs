//! Save and restore throughput against `cp`, the pause of a save while the
//! command runs, sparse saves, and the idle wrapper's CPU use. Run with
//! `cargo bench -p shm-restore --bench save_restore`; figures go to
//! BENCHMARKS.md (section `shm-restore`).
//!
//! Every ratio compares with a baseline measured in the same run, on the
//! same bytes and directories, with the runs interleaved (A, B, A, B, ...)
//! so that machine load and the disk's write-back phases hit both alike.
//! Each figure is the median of `BENCH_RUNS` runs (default 7), with the
//! fastest and slowest run. Only the operation itself is timed: removing
//! the previous run's output (for `cp`) and dropping the previous memfd
//! (for ours) happen outside the clock. `BENCH_DIR` picks the directory
//! for snapshot files (default: the system temp dir); `BENCH_IDLE_SECS`
//! the idle measurement (default 10); `BENCH_VERBOSE=1` prints every run.
//!
//! `BENCH_ONLY=delta` runs only the incremental saves: a 1 GiB memfd with
//! 1 MiB changed since the last save, saved as a delta, against a full
//! save of the same 1 GiB and a save of a 1 MiB memfd (`BENCH_DELTA_MIB`
//! sets the size, default 1024).
//!
//! `BENCH_ONLY=stop` runs only the pause of `--snapshot stop` mode at
//! 16 MiB, 256 MiB, 1 GiB and on a fragmented memfd (`BENCH_STOP_RUNS`
//! captures each, default 20; p50 and p100), and what the pause is made of.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shm_fd::{CreateOptions, SharedFd};
use shm_restore::{CaptureMethod, Captured, DirStorage, Image, SaveOptions, Saver, StopGroup};

const MIB: usize = 1 << 20;

fn runs() -> usize {
    env_num("BENCH_RUNS", 7).max(1)
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median, fastest and slowest of a series of runs.
#[derive(Debug, Clone, Copy)]
struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    fn of(mut v: Vec<Duration>) -> Stats {
        v.sort();
        Stats {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    fn ms(&self) -> String {
        format!(
            "{:.1} ms ({:.1}–{:.1})",
            ms(self.median),
            ms(self.min),
            ms(self.max)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs each measurement in turn, `runs()` times (A, B, A, B, ...). Each
/// closure times its own critical section and returns that time.
fn interleaved<const N: usize>(mut each: [&mut dyn FnMut() -> Duration; N]) -> [Stats; N] {
    let mut times: [Vec<Duration>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..runs() {
        for (f, t) in each.iter_mut().zip(times.iter_mut()) {
            t.push(f());
        }
    }
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        for t in &times {
            let each: Vec<String> = t.iter().map(|d| format!("{:.0}", ms(*d))).collect();
            eprintln!("runs (ms): {}", each.join(" "));
        }
    }
    times.map(Stats::of)
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn memfd(name: &str) -> File {
    let shared = SharedFd::create(name, CreateOptions::default()).unwrap();
    shared.reopen().unwrap().into_file()
}

/// Non-trivial bytes (so nothing can be compressed or deduplicated).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// A saver writing full snapshots only (no deltas): the throughput rows
/// save the same bytes again and again.
fn saver(dir: &Path) -> Saver<DirStorage> {
    Saver::new(
        DirStorage::new(dir),
        OsStr::new("bench.snap"),
        SaveOptions::builder().max_chain(0).build().unwrap(),
    )
}

fn sh(script: &str) {
    let st = Command::new("sh").args(["-c", script]).status().unwrap();
    assert!(st.success(), "{script}");
}

/// `cp SRC DST && sync DST`, into a fresh DST (removed before the clock).
fn cp_sync(src: &Path, dst: &Path) -> Duration {
    let _ = std::fs::remove_file(dst);
    timed(|| {
        sh(&format!(
            "cp {} {} && sync {}",
            src.display(),
            dst.display(),
            dst.display()
        ))
    })
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// A table row: ours against a baseline moving the same `bytes`; the ratio
/// is of the medians' throughputs.
fn row(what: &str, bytes: usize, ours: Stats, base_what: &str, base: Stats) {
    println!(
        "| {what} | {}, {:.0} MiB/s | {base_what} | {}, {:.0} MiB/s | {:.2}x |",
        ours.ms(),
        mib_s(bytes, ours.median),
        base.ms(),
        mib_s(bytes, base.median),
        base.median.as_secs_f64() / ours.median.as_secs_f64()
    );
}

fn main() {
    if std::env::var("BENCH_ONLY").as_deref() == Ok("stop") {
        stop_pauses();
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("delta") {
        delta_saves();
        return;
    }
    let base: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    println!(
        "snapshot dir: {} ; runs per figure: {} (median, fastest–slowest)",
        base.display(),
        runs()
    );
    println!();
    println!(
        "| measurement | shm-restore | baseline | baseline time | throughput ratio (higher is better) |"
    );
    println!("|---|---|---|---|---|");

    // 1. Save of a filled 256 MiB memfd vs cp of the same bytes + sync.
    let len = 256 * MIB;
    let bytes = pattern(len, 1);
    let big = memfd("bench-256m");
    big.write_all_at(&bytes, 0).unwrap();
    let src = shm.path().join("src");
    std::fs::write(&src, &bytes).unwrap();
    drop(bytes);
    let dst = dir.path().join("cp-copy");
    let mut exit_saver = saver(dir.path());
    let mut retire = Vec::new();
    let mut save_exit = || {
        let d = timed(|| {
            exit_saver.save_memfd(&big, shm_restore::now_ns()).unwrap();
        });
        // The replaced .prev is closed in the background; wait for it
        // outside the clock, so it does not slow the next measurement.
        retire.push(timed(|| exit_saver.wait_retired()));
        d
    };
    let mut cp = || cp_sync(&src, &dst);
    let [saved, cp1] = interleaved([&mut save_exit, &mut cp]);
    row(
        "save 256 MiB after the command exited (stream from the memfd, CRC, write, fsync, .prev, rename, dir fsync)",
        len,
        saved,
        "`cp` + `sync`",
        cp1,
    );
    println!(
        "| … of which freeing the replaced `.prev` afterwards, in the background (not in the time above) | {} | | | |",
        Stats::of(retire).ms()
    );

    // 2. The save of a copy captured while the command runs (after the
    //    pause), and the pause itself.
    let mut sleeper = Command::new("sleep")
        .arg("1000")
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stop = StopGroup::new(sleeper.id() as i32, Duration::from_secs(5));
    let mut pauses = Vec::new();
    let mut running_saver = saver(dir.path());
    let mut save_running = || {
        let captured = stop.capture(&big).unwrap();
        pauses.push(captured.pause().unwrap());
        let Captured::Copied { image, .. } = &captured else {
            panic!("the sleeper is running")
        };
        let d = timed(|| {
            running_saver.save(image, shm_restore::now_ns()).unwrap();
        });
        running_saver.wait_retired();
        d
    };
    let mut cp = || cp_sync(&src, &dst);
    let [saved_running, cp2] = interleaved([&mut save_running, &mut cp]);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    row(
        "save 256 MiB captured while the command runs (CRC, write, fsync, .prev, rename, dir fsync; after the pause)",
        len,
        saved_running,
        "`cp` + `sync`",
        cp2,
    );
    let _ = std::fs::remove_file(&dst);

    // 3. Restore of that snapshot vs cp of the file into /dev/shm.
    let snap = dir.path().join("bench.snap");
    let shm_copy = shm.path().join("copy");
    let mut previous = None;
    let mut restore = || {
        drop(previous.take()); // the last run's memfd, outside the clock
        let t = Instant::now();
        let m = memfd("bench-restore");
        let out = shm_restore::restore(&snap, &m, u64::MAX, 0, None).unwrap();
        let d = t.elapsed();
        assert!(matches!(out, shm_restore::LoadOutcome::Loaded { .. }));
        previous = Some(m);
        d
    };
    let mut cp_shm = || {
        let _ = std::fs::remove_file(&shm_copy);
        timed(|| sh(&format!("cp {} {}", snap.display(), shm_copy.display())))
    };
    let [restored, cp3] = interleaved([&mut restore, &mut cp_shm]);
    row(
        "restore 256 MiB (verify every chunk, load into a new memfd)",
        len,
        restored,
        "`cp` into /dev/shm",
        cp3,
    );
    // 3b. The same with the file not in the page cache (as after a reboot):
    //     both read it from the disk.
    let evict = || {
        let f = File::open(&snap).unwrap();
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    };
    let mut restore_cold = || {
        evict();
        restore()
    };
    let mut cp_shm_cold = || {
        evict();
        cp_shm()
    };
    let [restored_cold, cp3_cold] = interleaved([&mut restore_cold, &mut cp_shm_cold]);
    drop(previous);
    let _ = std::fs::remove_file(&shm_copy);
    row(
        "restore 256 MiB, the file not in the page cache (as after a reboot)",
        len,
        restored_cold,
        "`cp` into /dev/shm, file not cached",
        cp3_cold,
    );
    println!();
    let pause = Stats::of(pauses);
    let mut fresh = Vec::new();
    for _ in 0..runs() {
        fresh.push(timed(|| drop(Image::read_from(&big).unwrap())));
    }
    println!(
        "pause of a save while the command runs (SIGSTOP, wait until stopped, copy 256 MiB into a \
         buffer faulted in before the pause, SIGCONT): {}; a copy into a fresh buffer takes {}",
        pause.ms(),
        Stats::of(fresh).ms()
    );
    drop(big);
    std::fs::remove_file(&src).unwrap();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }

    // 4. Sparse: 1 GiB memfd with 1 MiB of data (256 scattered pages) vs a
    //    dense 1 MiB memfd.
    let sparse = memfd("bench-sparse");
    sparse.set_len(1 << 30).unwrap();
    let page = pattern(4096, 3);
    for i in 0..256u64 {
        sparse.write_all_at(&page, i * (4 << 20)).unwrap();
    }
    let dense = memfd("bench-dense");
    dense.write_all_at(&pattern(MIB, 4), 0).unwrap();
    let sub_s = dir.path().join("sparse");
    let sub_d = dir.path().join("dense");
    std::fs::create_dir(&sub_s).unwrap();
    std::fs::create_dir(&sub_d).unwrap();
    let (mut saver_s, mut saver_d) = (saver(&sub_s), saver(&sub_d));
    let mut save_sparse = || timed(|| drop(saver_s.save_memfd(&sparse, 1).unwrap()));
    let mut save_dense = || timed(|| drop(saver_d.save_memfd(&dense, 1).unwrap()));
    let [t_sparse, t_dense] = interleaved([&mut save_sparse, &mut save_dense]);
    println!();
    println!(
        "| measurement | shm-restore | baseline | baseline time | ratio (ours / baseline, goal <= 2) |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| save 1 GiB memfd holding 1 MiB (256 pages) | {} | save 1 MiB memfd | {} | {:.2} |",
        t_sparse.ms(),
        t_dense.ms(),
        t_sparse.median.as_secs_f64() / t_dense.median.as_secs_f64()
    );
    let snap_len = std::fs::metadata(sub_s.join("bench.snap")).unwrap().len();
    println!();
    println!("sparse snapshot file: {snap_len} bytes");

    // 5. Idle wrapper CPU with --interval 100ms and an unchanged 1 MiB memfd.
    let secs = env_num("BENCH_IDLE_SECS", 10) as u64;
    let exe = env!("CARGO_BIN_EXE_shm-restore");
    let idle = |interval: Option<&str>| -> Duration {
        let snap = dir.path().join("idle.snap");
        let mut c = Command::new(exe);
        c.arg("-q");
        if let Some(i) = interval {
            c.args(["--interval", i]);
        }
        c.arg(&snap)
            .args(["sh", "-c"])
            .arg(format!(
                "head -c 1048576 /dev/urandom >&3; exec sleep {}",
                secs + 5
            ))
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .stdout(Stdio::null());
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500)); // past the start
        let cpu0 = cpu_ns(child.id());
        std::thread::sleep(Duration::from_secs(secs));
        let cpu1 = cpu_ns(child.id());
        let _ = child.kill();
        let _ = child.wait();
        Duration::from_nanos(cpu1 - cpu0)
    };
    let quiet = idle(None);
    let ticking = idle(Some("100ms"));
    println!();
    println!(
        "idle wrapper CPU over {secs} s, unchanged 1 MiB memfd: --interval 100ms {:.1} ms ({:.3}% of one core); \
         no --interval {:.1} ms",
        ms(ticking),
        ticking.as_secs_f64() / secs as f64 * 100.0,
        ms(quiet)
    );
}

/// The pause of `--snapshot stop` mode ([`StopGroup`]) on a command that
/// sleeps: dense memfds of 16 MiB, 256 MiB and 1 GiB (every page filled)
/// and a 256 MiB one holding 128 MiB in every other page (32768 extents).
/// Each row: `BENCH_STOP_RUNS` captures (default 20), the pause the capture
/// reports (SIGSTOP to SIGCONT) at p50 and p100, and the whole capture
/// (extent search, buffer, pause) at p50.
fn stop_pauses() {
    let runs = env_num("BENCH_STOP_RUNS", 20).max(1);
    let mut sleeper = Command::new("sleep")
        .arg("1000")
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = sleeper.id() as i32;
    let mut stop = StopGroup::new(pgid, Duration::from_secs(5));
    println!("stop mode pause, {runs} captures per row, the command sleeps\n");
    println!("| memfd | data | extents | pause p50 | pause p100 | whole capture p50 |");
    println!("|---|---:|---:|---:|---:|---:|");
    let cases = [
        ("16 MiB", 16 * MIB, false),
        ("256 MiB", 256 * MIB, false),
        ("1 GiB", 1024 * MIB, false),
        ("256 MiB, every other page", 256 * MIB, true),
    ];
    for (name, len, fragmented) in cases {
        let m = memfd("bench-stop");
        if fragmented {
            m.set_len(len as u64).unwrap();
            let page = pattern(4096, 5);
            for p in (0..len / 4096).step_by(2) {
                m.write_all_at(&page, (p * 4096) as u64).unwrap();
            }
        } else {
            let chunk = pattern(len.min(64 * MIB), 6);
            for off in (0..len).step_by(chunk.len()) {
                m.write_all_at(&chunk, off as u64).unwrap();
            }
        }
        let extents = shm_restore::data_extents(&m, len as u64).unwrap();
        let data = shm_restore::stored_len(&extents);
        let (mut pauses, mut wholes) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            let got = stop.capture(&m).unwrap();
            wholes.push(t.elapsed());
            pauses.push(got.pause().unwrap());
            assert!(matches!(got, Captured::Copied { .. }));
            drop(got); // freeing the copy: outside the clock
        }
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            let each: Vec<String> = pauses.iter().map(|d| format!("{:.1}", ms(*d))).collect();
            eprintln!("{name} pauses (ms): {}", each.join(" "));
        }
        let (p, w) = (Stats::of(pauses), Stats::of(wholes));
        println!(
            "| {name} | {} MiB | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            data >> 20,
            extents.len(),
            ms(p.median),
            ms(p.max),
            ms(w.median)
        );
        // BEGIN after-only
        stop_breakdown(pgid, &m, runs);
        // END after-only
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

// BEGIN after-only
/// What a stop-mode pause of `m` is made of: stopping the group and
/// waiting until it is stopped, with no copy; the extent search made
/// before the stop; the re-check of its holes made in it; the copy.
/// Medians of `runs`.
fn stop_breakdown(pgid: i32, m: &File, runs: usize) {
    use nix::sys::signal::{Signal, killpg};
    let group = nix::unistd::Pid::from_raw(pgid);
    let len = m.metadata().unwrap().len();
    let (mut stops, mut searches, mut rechecks, mut copies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        stops.push(timed(|| {
            killpg(group, Signal::SIGSTOP).unwrap();
            shm_restore::wait_until_stopped(pgid, Duration::from_secs(5)).unwrap();
            killpg(group, Signal::SIGCONT).unwrap();
        }));
        let mut searched = Vec::new();
        searches.push(timed(|| {
            searched = shm_restore::data_extents(m, len).unwrap();
        }));
        rechecks.push(timed(|| {
            shm_restore::data_extents_since(m, len, &searched).unwrap();
        }));
        let buf = shm_restore::prefaulted(shm_restore::stored_len(&searched) as usize).unwrap();
        let mut image = None;
        copies.push(timed(|| {
            image = Some(Image::read_searched(m, &searched, buf).unwrap());
        }));
    }
    let med = |v: Vec<Duration>| ms(Stats::of(v).median);
    println!(
        "|  … of which: stop + wait until stopped + SIGCONT {:.2} ms; re-check of the holes {:.2} ms \
         (the search before the stop: {:.2} ms); re-check + copy {:.1} ms | | | | | |",
        med(stops),
        med(rechecks),
        med(searches),
        med(copies)
    );
}
// END after-only

/// CPU time used so far by `pid` (all threads), from /proc/PID/schedstat.
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Incremental saves, as the wrapper makes them while the command runs
/// (`--snapshot stop`: stop the group, copy, continue; then save): a
/// memfd of `BENCH_DELTA_MIB` MiB (default 1024) in which 1 MiB, at a
/// different place each run, changed since the last save, saved as a
/// delta (the default options: the capture computes every chunk's CRC in
/// the stop and copies only the changed chunks); the same memfd saved in full
/// (`--max-chain 0`); and a 1 MiB memfd saved in full. Each time is the
/// whole save: capture, CRCs, write, fsyncs, renames. Interleaved runs.
fn delta_saves() {
    let mib = env_num("BENCH_DELTA_MIB", 1024);
    let len = mib * MIB;
    let base: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let (d_delta, d_full, d_small) = (
        tempfile::tempdir_in(&base).unwrap(),
        tempfile::tempdir_in(&base).unwrap(),
        tempfile::tempdir_in(&base).unwrap(),
    );
    let mut sleeper = Command::new("sleep")
        .arg("1000")
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stop = StopGroup::new(sleeper.id() as i32, Duration::from_secs(5));
    let big = memfd("bench-delta");
    let chunk = pattern(64 * MIB, 8);
    for off in (0..len).step_by(chunk.len()) {
        let n = chunk.len().min(len - off);
        big.write_all_at(&chunk[..n], off as u64).unwrap();
    }
    let small = memfd("bench-delta-small");
    small.write_all_at(&pattern(MIB, 9), 0).unwrap();
    let mut delta_saver = Saver::new(
        DirStorage::new(d_delta.path()),
        OsStr::new("bench.snap"),
        SaveOptions::default(),
    );
    let mut full_saver = Saver::new(
        DirStorage::new(d_full.path()),
        OsStr::new("bench.snap"),
        SaveOptions::builder().max_chain(0).build().unwrap(),
    );
    let mut small_saver = Saver::new(
        DirStorage::new(d_small.path()),
        OsStr::new("bench.snap"),
        SaveOptions::builder().max_chain(0).build().unwrap(),
    );
    let mut capture_and_save = |saver: &mut Saver<DirStorage>, m: &File| {
        let t = Instant::now();
        // As the wrapper does: only the changes, when a delta can follow.
        let captured = match saver.delta_basis() {
            Some(basis) => stop.capture_changes(m, &basis).unwrap(),
            None => stop.capture(m).unwrap(),
        };
        assert!(
            matches!(captured, Captured::Copied { .. } | Captured::Changes { .. }),
            "the sleeper is running"
        );
        let out = saver
            .save_captured(&captured, m, shm_restore::now_ns())
            .unwrap();
        let d = t.elapsed();
        drop(captured);
        saver.wait_retired();
        (d, out)
    };
    // The first save of the series is full.
    capture_and_save(&mut delta_saver, &big);
    let change = pattern(MIB, 10);
    let mut round = 0u64;
    let (mut t_delta, mut t_full, mut t_small) = (Vec::new(), Vec::new(), Vec::new());
    let mut stored = Vec::new();
    for _ in 0..runs() {
        round += 1;
        // 1 MiB changed, at a different place each round (a compaction
        // comes every 8 rounds, or when the deltas pass half the full:
        // counted in the figures, as a user would see it).
        let at = (round * 37 % (len / MIB) as u64) * MIB as u64;
        big.write_all_at(&change[..MIB - round as usize], at)
            .unwrap();
        let (d, out) = capture_and_save(&mut delta_saver, &big);
        t_delta.push(d);
        if let shm_restore::SaveOutcome::Saved(r) = out {
            stored.push((r.stored_len >> 10, r.base.is_some()));
        }
        t_full.push(capture_and_save(&mut full_saver, &big).0);
        small
            .write_all_at(&change[..MIB - round as usize], 0)
            .unwrap();
        t_small.push(capture_and_save(&mut small_saver, &small).0);
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let (delta, full, small) = (Stats::of(t_delta), Stats::of(t_full), Stats::of(t_small));
    println!(
        "incremental saves: {mib} MiB memfd, 1 MiB changed per save, {} runs",
        runs()
    );
    println!("stored per delta run (KiB, delta?): {stored:?}\n");
    println!("| save | time (median, fastest–slowest) | ratio |");
    println!("|---|---|---|");
    println!("| {mib} MiB, 1 MiB changed, delta | {} | |", delta.ms());
    println!(
        "| {mib} MiB in full (`--max-chain 0`) | {} | delta / full = {:.3}x |",
        full.ms(),
        delta.median.as_secs_f64() / full.median.as_secs_f64()
    );
    println!(
        "| a 1 MiB memfd in full | {} | delta / 1 MiB = {:.1}x |",
        small.ms(),
        delta.median.as_secs_f64() / small.median.as_secs_f64()
    );
}
