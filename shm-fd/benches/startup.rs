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
    if let Ok(name) = std::env::var(CHILD_ENV) {
        return map_and_touch(&name);
    }
    // `cargo bench` passes `--bench`; nothing else to parse.
    let runs: usize = std::env::var("SHM_FD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let shm_fd = env!("CARGO_BIN_EXE_shm-fd");

    println!("shm-fd startup, {runs} runs each (median / mean)");
    let [base, ours] = time_interleaved(
        runs,
        [
            &mut || Command::new("env").arg("true").status(),
            &mut || Command::new(shm_fd).arg("true").status(),
        ],
    );
    report("env true (baseline)", base, base);
    report("shm-fd true", ours, base);

    // Both memfds are passed at once (as SHM_SHARED_FD and BIG), and the
    // runs alternate, so load on the machine hits both alike.
    let me = std::env::current_exe().expect("current_exe");
    let small = filled_memfd(1 << 20);
    let big = filled_memfd(1 << 30);
    let [t_small, t_big] = with_passed(small, big, |fd_env| {
        let run = |name: &str| {
            Command::new(shm_fd)
                .args(["--name", name])
                .arg(&me)
                .envs(fd_env.iter().cloned())
                .env(CHILD_ENV, name)
                .status()
        };
        time_interleaved(
            runs,
            [&mut || run(shm_fd::DEFAULT_NAME), &mut || run("BIG")],
        )
    });
    report("shm-fd + map, 1 MiB filled", t_small, t_small);
    report("shm-fd + map, 1 GiB filled", t_big, t_small);
}

type Run<'a> = &'a mut dyn FnMut() -> std::io::Result<std::process::ExitStatus>;

/// Median and mean wall time of `runs` runs of each of `fs`, alternating
/// between them run by run.
fn time_interleaved<const N: usize>(
    runs: usize,
    mut fs: [Run<'_>; N],
) -> [(Duration, Duration); N] {
    let mut times: [Vec<Duration>; N] = std::array::from_fn(|_| Vec::with_capacity(runs));
    for _ in 0..runs {
        for (f, t) in fs.iter_mut().zip(times.iter_mut()) {
            let start = Instant::now();
            let status = f().expect("spawn");
            t.push(start.elapsed());
            assert!(status.success(), "a benchmarked command failed");
        }
    }
    times.map(|mut t| {
        t.sort();
        let mean = t.iter().sum::<Duration>() / runs as u32;
        (t[runs / 2], mean)
    })
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

/// Runs `f` with `small` and `big` placed on fds 3 and 4 (named
/// SHM_SHARED_FD and BIG) and the LISTEN_* variables that describe them.
fn with_passed<T>(small: SharedFd, big: SharedFd, f: impl FnOnce(&[(&str, String)]) -> T) -> T {
    let entries = vec![
        (shm_fd::DEFAULT_NAME.to_owned(), small.into_owned_fd()),
        ("BIG".to_owned(), big.into_owned_fd()),
    ];
    let handover = Handover::from_entries(entries, shm_fd::DEFAULT_NAME).unwrap();
    // SAFETY: the bench holds no descriptor of its own on 3 or 4 (it
    // opened nothing but the memfds, which are part of the hand-over).
    let passed = unsafe { handover.install() }.unwrap();
    f(&[
        ("LISTEN_FDS", passed.listen_fds()),
        ("LISTEN_FDNAMES", passed.listen_fdnames()),
    ])
}

fn map_and_touch(name: &str) {
    // SAFETY: this child run opened nothing before: the fds LISTEN_FDS
    // names were inherited and have no other owner in this process.
    let shared = unsafe { SharedFd::from_env(name) }.expect("memfd");
    let map = shared.map_raw(1).expect("map");
    // SAFETY: both offsets are inside the mapping.
    let (a, b) = unsafe { (*map.as_ptr(), *map.as_ptr().add(map.len() - 1)) };
    assert_eq!((a, b), (0xA5, 0xA5));
}
