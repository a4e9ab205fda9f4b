//! Issue 13, part 2: the pause a program sees while `--snapshot protocol`
//! saves it, at a commit every millisecond. The program (this binary run
//! again, see [`program`]) keeps 256 MiB behind a shm-snapshot header and
//! commits every 1 ms an update of 8 words in 8 places far apart; it
//! records when each commit began. The bench saves it once in full, then
//! 20 times in a row (deltas, `--max-chain 8`: a compaction from the
//! chain's files every 8th), as `shm-restore --snapshot protocol` does,
//! twice:
//!
//! - **map off**: the program does not keep the dirty map, so the save
//!   copies while it runs and, when every optimistic copy is torn by a
//!   commit, stops the program for the copy (the behaviour before);
//! - **map on**: it marks its writes, and the save converges on the cells
//!   written meanwhile without stopping it.
//!
//! The longest pause is the longest gap between two of the program's
//! commits minus its 1 ms period (p100 over the saves' window); the
//! throughput is its commits per second in the saves' window against a
//! window of the same length with no save, just before.
//!
//! ```text
//! cargo bench -p shm-fd-tests --bench converge
//! BENCH_CONVERGE_MIB=64 BENCH_SAVES=20 cargo bench -p shm-fd-tests --bench converge
//! ```

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use shm_fd::{CreateOptions, SharedFd};
use shm_fd_tests::Kid;
use shm_fd_tests::bench::{env_or, load_average, machine};
use shm_restore::{CaptureMethod, Captured, DirStorage, SaveOptions, Saver, SnapshotProtocol};

const ROLE: &str = "SHM_FD_CONVERGE_PROGRAM";
const MIB: u64 = 1 << 20;

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The program: commits every millisecond for `secs` seconds on the memfd
/// on fd 3, marking its writes when `marking`, then prints the start time
/// of every commit (monotonic ns), one per line.
fn program(secs: u64, marking: bool) {
    // SAFETY: the bench passes the memfd on fd 3, owned by nothing else.
    let file = unsafe { File::from_raw_fd(3) };
    let len = file.metadata().unwrap().len();
    let map = memmap2::MmapOptions::new()
        .len(len as usize)
        .map_raw(&file)
        .unwrap();
    let region = shm_snapshot::Region::from_mmap(&map);
    let (mut publisher, _) = if marking {
        shm_snapshot::Publisher::open_marking(region).unwrap()
    } else {
        shm_snapshot::Publisher::open(region).unwrap()
    };
    let dirty = if marking {
        shm_snapshot::DirtyMap::enable(region, len)
    } else {
        None
    };
    let data = publisher.data();
    let words = (data.len() / 8) as u64;
    let start = Instant::now();
    let mut starts = Vec::new();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        n += 1;
        starts.push(now_ns());
        let update = publisher.begin();
        for k in 0..8u64 {
            // Eight places 1/8 of the memfd apart, each moving slowly.
            let w = k * (words / 8) + (n * 8) % 4096;
            if let Some(d) = &dirty {
                d.mark(shm_snapshot::DATA_OFFSET as u64 + w * 8, 8);
            }
            update.data().store_u64((w * 8) as usize, n);
        }
        update.commit();
        let next = start + Duration::from_millis(n);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let out: Vec<String> = starts.iter().map(u64::to_string).collect();
    println!("{}", out.join("\n"));
}

struct Run {
    /// The longest gap in the windows of saves that did not compact.
    plain_max_ms: f64,
    /// The longest gap in the window without saves just before (the
    /// baseline: what the machine's scheduling alone gives).
    idle_max_ms: f64,
    pauses_max_ms: f64,
    pause_p100_ms: f64,
    ratio: f64,
    kinds: String,
    save_ms: f64,
}

fn run(mib: u64, saves: usize, marking: bool) -> Run {
    let work = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let shared = SharedFd::create("bench-converge", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    let len = mib * MIB + shm_snapshot::DATA_OFFSET as u64;
    let piece: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    for off in (shm_snapshot::DATA_OFFSET as u64..len).step_by(MIB as usize) {
        memfd
            .write_all_at(&piece[..(len - off).min(MIB) as usize], off)
            .unwrap();
    }
    let secs = 6 + saves as u64 / 4;
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(ROLE, format!("{secs} {}", u8::from(marking)))
        .process_group(0);
    let fd = shared.as_raw_fd();
    let mut child = Kid::start(cmd, "program", work.path(), Some(fd));
    if std::env::var_os("BENCH_NICE").is_some() {
        // SAFETY: setpriority on this thread (0: the caller); the threads it
        // starts later inherit it.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    }
    let mut capture = SnapshotProtocol::new(child.pid() as i32, Duration::from_secs(5));
    let mut saver = Saver::new(
        DirStorage::new(snaps.path()),
        "s.snap".as_ref(),
        SaveOptions::default(),
    );
    // Warm up, then a window without saves, then the saves. The first,
    // full save is made before both (a wrapper that loaded a snapshot
    // starts from it as the basis of its deltas).
    std::thread::sleep(Duration::from_millis(500));
    let first = capture.capture(&memfd).unwrap();
    saver.save_captured(&first, &memfd, 0).unwrap();
    drop(first);
    saver.wait_retired();
    std::thread::sleep(Duration::from_millis(1000));
    let idle_from = now_ns();
    std::thread::sleep(Duration::from_millis(1500));
    let idle_to = now_ns();
    let mut kinds = String::new();
    let mut save_time = Vec::new();
    let mut phases: Vec<(u64, u64, u64, char)> = Vec::new();
    let saves_from = now_ns();
    for i in 0..saves {
        let t = Instant::now();
        let t0 = now_ns();
        let got = match saver.delta_basis() {
            Some(b) => capture.capture_changes(&memfd, &b).unwrap(),
            None => capture.capture(&memfd).unwrap(),
        };
        kinds.push(match &got {
            Captured::Changes { pause: None, .. } => 'd',
            Captured::Copied { pause: None, .. } => 'f',
            Captured::Changes { .. } | Captured::Copied { .. } => 'S',
            Captured::Unchanged { .. } => 'u',
            _ => '?',
        });
        let t1 = now_ns();
        let out = saver.save_captured(&got, &memfd, i as u64 + 1).unwrap();
        if let shm_restore::SaveOutcome::Saved(r) = &out
            && r.compacted.is_some()
        {
            kinds.pop();
            kinds.push('c');
        }
        saver.wait_retired();
        save_time.push(t.elapsed());
        phases.push((t0, t1, now_ns(), kinds.chars().last().unwrap_or('?')));
    }
    let saves_to = now_ns();
    let (out, _) = child.success();
    let starts: Vec<u64> = out.lines().filter_map(|l| l.parse().ok()).collect();
    let gaps_in = |from: u64, to: u64| -> (Vec<u64>, usize) {
        let inside: Vec<u64> = starts
            .iter()
            .copied()
            .filter(|&t| t >= from && t <= to)
            .collect();
        let gaps = inside.windows(2).map(|w| w[1] - w[0]).collect();
        (gaps, inside.len())
    };
    let (gaps, commits) = gaps_in(saves_from, saves_to);
    let window = saves_to - saves_from;
    // The commit rate and the longest gap in the 1.5 s without saves.
    let (idle_gaps, idle_commits) = gaps_in(idle_from, idle_to);
    let idle_max_ms = idle_gaps.iter().copied().max().unwrap_or(0) as f64 / 1e6;
    let idle_rate = idle_commits as f64 / (idle_to - idle_from) as f64;
    let rate = commits as f64 / window as f64;
    let max_gap = gaps.iter().copied().max().unwrap_or(0) as f64 / 1e6;
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        let mut sorted = gaps.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let top: Vec<String> = sorted
            .iter()
            .take(8)
            .map(|g| format!("{:.2}", *g as f64 / 1e6))
            .collect();
        eprintln!("map {marking}: longest gaps (ms) {}", top.join(" "));
        // Where the longest gaps fall: in a capture or in a save's write.
        let inside: Vec<u64> = starts
            .iter()
            .copied()
            .filter(|&t| t >= saves_from && t <= saves_to)
            .collect();
        let mut with_gap: Vec<(u64, u64)> =
            inside.windows(2).map(|w| (w[1] - w[0], w[0])).collect();
        with_gap.sort_unstable_by(|a, b| b.cmp(a));
        for &(g, at) in with_gap.iter().take(5) {
            let ms = |ns: u64| ns as f64 / 1e6;
            let phase = phases
                .iter()
                .enumerate()
                .find_map(|(i, &(a, b, c, k))| {
                    if at >= a && at < b {
                        Some(format!("capture ({k}) {i}, {:.2} ms into it", ms(at - a)))
                    } else if at >= b && at < c {
                        Some(format!(
                            "save ({k}) {i}, {:.2} ms into its {:.2} ms",
                            ms(at - b),
                            ms(c - b)
                        ))
                    } else {
                        None
                    }
                })
                .unwrap_or_else(|| "between".into());
            eprintln!("  gap {:.2} ms from {phase}", g as f64 / 1e6);
        }
    }
    // Gaps that began inside a save which did not compact its chain.
    let plain_max_ms = starts
        .windows(2)
        .filter(|w| {
            phases
                .iter()
                .any(|&(a, _, c, k)| k != 'c' && w[0] >= a && w[0] < c)
        })
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    save_time.sort();
    Run {
        plain_max_ms,
        idle_max_ms,
        pauses_max_ms: max_gap,
        pause_p100_ms: (max_gap - 1.0).max(0.0),
        ratio: rate / idle_rate,
        kinds,
        save_ms: save_time[save_time.len() / 2].as_secs_f64() * 1e3,
    }
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let mut it = role.split(' ');
        let secs = it.next().unwrap().parse().unwrap();
        let marking = it.next() == Some("1");
        program(secs, marking);
        return;
    }
    let mib: u64 = env_or("BENCH_CONVERGE_MIB", 256);
    let saves: usize = env_or("BENCH_SAVES", 20);
    println!(
        "a program committing every 1 ms, {mib} MiB, {saves} saves in a row \
         (--snapshot protocol, deltas); {}; load {}",
        machine(),
        load_average()
    );
    println!(
        "\n| dirty map | saves (f full, d delta, c delta + compaction, no stop; S stopped) | median save | longest gap between commits | longest pause (gap - 1 ms) | ... in saves without a compaction | longest pause with no save (1.5 s before) | commits/s during the saves vs idle |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for marking in [false, true] {
        let r = run(mib, saves, marking);
        println!(
            "| {} | {} | {:.1} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2}x |",
            if marking { "on" } else { "off" },
            r.kinds,
            r.save_ms,
            r.pauses_max_ms,
            r.pause_p100_ms,
            (r.plain_max_ms - 1.0).max(0.0),
            (r.idle_max_ms - 1.0).max(0.0),
            r.ratio
        );
    }
}
