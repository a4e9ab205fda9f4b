//! What `shm-fd` adds to starting a program.
//!
//! `cargo bench -p shm-fd --bench startup` prints:
//! 1. `shm-fd true` against `env true` (the baseline: another exec-ing
//!    wrapper), median and mean over many runs, and their ratio;
//! 2. the start of a program that maps the whole memfd, under `shm-fd`,
//!    with 1 MiB and with 1 GiB of data in it (the ratio should stay ~1:
//!    mapping does not touch the pages).
//!
//! `SHM_FD_BENCH_RUNS` sets the number of runs (default 400).

use std::process::Command;
use std::time::{Duration, Instant};

use shm_fd::{CreateOptions, Handover, SharedFd};

const CHILD_ENV: &str = "SHM_FD_BENCH_CHILD";

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return map_and_touch();
    }
    // `cargo bench` passes `--bench`; nothing else to parse.
    let runs: usize = std::env::var("SHM_FD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let shm_fd = env!("CARGO_BIN_EXE_shm-fd");

    println!("shm-fd startup, {runs} runs each (median / mean)");
    let base = time_runs(runs, || Command::new("env").arg("true").status());
    let ours = time_runs(runs, || Command::new(shm_fd).arg("true").status());
    report("env true (baseline)", base, base);
    report("shm-fd true", ours, base);

    let me = std::env::current_exe().expect("current_exe");
    let mut small = None;
    for (label, size) in [("1 MiB", 1u64 << 20), ("1 GiB", 1u64 << 30)] {
        let memfd = filled_memfd(size);
        let timing = with_passed(memfd, |fd_env| {
            time_runs(runs, || {
                Command::new(shm_fd)
                    .arg(&me)
                    .envs(fd_env.iter().cloned())
                    .env(CHILD_ENV, "1")
                    .status()
            })
        });
        let base = *small.get_or_insert(timing);
        report(&format!("shm-fd + map, {label} filled"), timing, base);
    }
}

/// Median and mean wall time of `runs` runs of `f`.
fn time_runs(
    runs: usize,
    mut f: impl FnMut() -> std::io::Result<std::process::ExitStatus>,
) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let status = f().expect("spawn");
        times.push(t.elapsed());
        assert!(status.success(), "a benchmarked command failed");
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / runs as u32;
    (times[runs / 2], mean)
}

fn report(
    label: &str,
    (median, mean): (Duration, Duration),
    (base_median, _): (Duration, Duration),
) {
    println!(
        "  {label:<32} {:>9.1?} / {:>9.1?}   {:.2}x",
        median,
        mean,
        median.as_secs_f64() / base_median.as_secs_f64()
    );
}

fn filled_memfd(size: u64) -> SharedFd {
    let memfd = SharedFd::create(
        "bench",
        CreateOptions {
            size,
            seal_shrink: true,
        },
    )
    .unwrap();
    let map = memfd.map_raw(size).unwrap();
    // SAFETY: the mapping is `size` bytes long and only this process has
    // the memfd yet.
    unsafe { std::ptr::write_bytes(map.as_mut_ptr(), 0xA5, size as usize) };
    memfd
}

/// Runs `f` with `memfd` placed on fd 3 and the LISTEN_* variables that
/// describe it, so the `shm-fd` under test reuses it.
fn with_passed<T>(memfd: SharedFd, f: impl FnOnce(&[(&str, String)]) -> T) -> T {
    let entries = vec![(shm_fd::DEFAULT_NAME.to_owned(), memfd.into_owned_fd())];
    let handover = Handover::from_entries(entries, shm_fd::DEFAULT_NAME).unwrap();
    // SAFETY: the bench holds no descriptor of its own on 3 (it opened
    // nothing but the memfd, which is part of the hand-over).
    let passed = unsafe { handover.install() }.unwrap();
    f(&[
        ("LISTEN_FDS", passed.listen_fds()),
        ("LISTEN_FDNAMES", passed.listen_fdnames()),
    ])
}

fn map_and_touch() {
    let shared = SharedFd::from_env(shm_fd::DEFAULT_NAME).expect("memfd");
    let map = shared.map_raw(1).expect("map");
    // SAFETY: both offsets are inside the mapping.
    let (a, b) = unsafe { (*map.as_ptr(), *map.as_ptr().add(map.len() - 1)) };
    assert_eq!((a, b), (0xA5, 0xA5));
}
