//! Save and restore throughput against `cp`, sparse saves, and the idle
//! wrapper's CPU use. Run with `cargo bench -p shm-restore`; figures go to
//! BENCHMARKS.md (section `shm-restore`).
//!
//! Every ratio compares with a baseline measured in the same run, on the
//! same files and directories. Each figure is the median of `BENCH_RUNS`
//! runs (default 5). `BENCH_DIR` picks the directory for snapshot files
//! (default: the system temp dir); `BENCH_IDLE_SECS` the idle measurement
//! (default 10).

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shm_fd::{CreateOptions, SharedFd};
use std::os::unix::process::CommandExt;

use shm_restore::{Capture, DirStorage, SaveOptions, Saver, StopGroup};

const MIB: usize = 1 << 20;

fn runs() -> usize {
    env_num("BENCH_RUNS", 5)
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Medians of `f` and `g`, run alternately (so slow phases of the disk's
/// write-back hit both alike).
fn time_pair(mut f: impl FnMut(), mut g: impl FnMut()) -> (Duration, Duration) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs() {
        let t = Instant::now();
        f();
        a.push(t.elapsed());
        let t = Instant::now();
        g();
        b.push(t.elapsed());
    }
    (median(a), median(b))
}

fn memfd(name: &str) -> File {
    let shared = SharedFd::create(name, CreateOptions::default()).unwrap();
    shm_restore::reopen_memfd(&shared).unwrap()
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

fn save(memfd: &File, dir: &Path) {
    let mut saver = Saver::new(
        DirStorage::new(dir),
        OsStr::new("bench.snap"),
        SaveOptions::default(),
    );
    saver.save_memfd(memfd, shm_restore::now_ns()).unwrap();
}

fn sh(script: &str) {
    let st = Command::new("sh").args(["-c", script]).status().unwrap();
    assert!(st.success(), "{script}");
}

fn mb_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn row(what: &str, d: Duration, bytes: Option<usize>, base: &str, bd: Duration, bb: Option<usize>) {
    let (thr, bthr, ratio) = match (bytes, bb) {
        (Some(b), Some(bb)) => (
            format!("{:.0} MiB/s", mb_s(b, d)),
            format!("{:.0} MiB/s", mb_s(bb, bd)),
            mb_s(b, d) / mb_s(bb, bd),
        ),
        _ => (
            String::new(),
            String::new(),
            bd.as_secs_f64() / d.as_secs_f64(),
        ),
    };
    println!(
        "| {what} | {:.1} ms {thr} | {base} | {:.1} ms {bthr} | {ratio:.2}x |",
        d.as_secs_f64() * 1e3,
        bd.as_secs_f64() * 1e3
    );
}

fn main() {
    let base: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    println!(
        "snapshot dir: {} ; runs per figure: {}",
        base.display(),
        runs()
    );
    println!();
    println!(
        "| measurement | shm-restore | baseline | baseline time | speed ratio (higher is better) |"
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
    let mut saver = Saver::new(
        DirStorage::new(dir.path()),
        OsStr::new("bench.snap"),
        SaveOptions::default(),
    );
    let (saved, cp) = time_pair(
        || {
            saver.save_memfd(&big, shm_restore::now_ns()).unwrap();
        },
        || {
            sh(&format!(
                "cp {} {} && sync {}",
                src.display(),
                dst.display(),
                dst.display()
            ))
        },
    );
    std::fs::remove_file(&dst).unwrap();
    row(
        "save 256 MiB after the command exited (stream, CRC, write, fsync, .prev, rename, dir fsync)",
        saved,
        Some(len),
        "cp + sync",
        cp,
        Some(len),
    );

    // 1b. The pause of a save while the command runs: its process group is
    //     stopped for the copy of the 256 MiB into private memory.
    let mut sleeper = Command::new("sleep")
        .arg("1000")
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stop = StopGroup::new(sleeper.id() as i32, Duration::from_secs(5));
    let pauses: Vec<Duration> = (0..runs())
        .map(|_| stop.capture(&big).unwrap().pause().unwrap())
        .collect();
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let pause = median(pauses);

    // 2. Restore of that snapshot vs cp of the file into /dev/shm.
    let snap = dir.path().join("bench.snap");
    let shm_copy = shm.path().join("copy");
    let (restored, cp_shm) = time_pair(
        || {
            let m = memfd("bench-restore");
            let out = shm_restore::restore(&snap, &m, u64::MAX, 0).unwrap();
            assert!(matches!(out, shm_restore::LoadOutcome::Loaded { .. }));
        },
        || {
            let _ = std::fs::remove_file(&shm_copy);
            sh(&format!("cp {} {}", snap.display(), shm_copy.display()))
        },
    );
    let _ = std::fs::remove_file(&shm_copy);
    row(
        "restore 256 MiB (verify, load into memfd)",
        restored,
        Some(len),
        "cp to /dev/shm",
        cp_shm,
        Some(len),
    );
    println!();
    println!(
        "pause of a save while the command runs (SIGSTOP, wait, copy 256 MiB, SIGCONT): {:.1} ms",
        pause.as_secs_f64() * 1e3
    );
    drop(big);
    std::fs::remove_file(&src).unwrap();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }

    // 3. Sparse: 1 GiB memfd with 1 MiB of data (256 scattered pages) vs a
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
    let (t_sparse, t_dense) = time_pair(|| save(&sparse, &sub_s), || save(&dense, &sub_d));
    row(
        "save 1 GiB memfd holding 1 MiB (256 pages)",
        t_sparse,
        None,
        "save 1 MiB memfd",
        t_dense,
        None,
    );
    let snap_len = std::fs::metadata(sub_s.join("bench.snap")).unwrap().len();
    println!();
    println!(
        "sparse snapshot file: {snap_len} bytes; sparse/dense save time: {:.2} (goal <= 2)",
        t_sparse.as_secs_f64() / t_dense.as_secs_f64()
    );

    // 4. Idle wrapper CPU with --interval 100ms and an unchanged 1 MiB memfd.
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
        ticking.as_secs_f64() * 1e3,
        ticking.as_secs_f64() / secs as f64 * 100.0,
        quiet.as_secs_f64() * 1e3
    );
}

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
