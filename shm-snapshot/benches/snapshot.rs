//! shm-snapshot benchmarks: `cargo bench -p shm-snapshot`.
//!
//! 1. Cost of a commit in the program vs plain writes of the same bytes.
//! 2. Longest pause a running program sees while a 256 MiB memfd is
//!    snapshotted: protocol mode vs stop mode (a child process).
//! 3. Snapshotter CPU while the program commits nothing.
//! 4. The fallback pause with `SparseCopy` on a fragmented memfd.
//! 5. The wrapper's CPU (`shm-restore`, plain stop mode vs `--snapshot
//!    restore-v1`) while primes-snapshot commits nothing; needs the release
//!    binaries (`cargo build --release --workspace`), else it is skipped.
//!
//! Plain `std::time::Instant` timing; every ratio is against a baseline
//! measured in the same run.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use shm_fd::{CreateOptions, SharedFd};
use shm_snapshot::{
    CaptureOutcome, CopyTarget, DATA_OFFSET, Publisher, Region, Snapshotter, SparseCopy,
};

const CHILD_ENV: &str = "SHM_SNAPSHOT_BENCH_CHILD";
const BIG: usize = 256 << 20;

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    // `cargo bench` passes `--bench`; nothing to parse.
    println!(
        "shm-snapshot benchmarks (debug = {})",
        cfg!(debug_assertions)
    );
    commit_cost();
    pauses();
    idle_cpu();
    sparse_fallback();
    wrapper_cpu();
}

fn black_box<T>(x: T) -> T {
    std::hint::black_box(x)
}

fn commit_cost() {
    let fd = SharedFd::create("bench-commit", CreateOptions::default()).unwrap();
    let map = fd.map_raw((DATA_OFFSET + (1 << 20)) as u64).unwrap();
    let (mut p, _) = Publisher::open(Region::from_mmap(&map)).unwrap();
    let data = p.data();
    println!("\n## 1. commit cost (memfd mapping, per update)\n");
    println!("| bytes written | plain writes | begin + writes + commit | ratio |");
    println!("|---:|---:|---:|---:|");
    for bytes in [8usize, 64, 512, 4096] {
        let words = bytes / 8;
        let iters = (20_000_000 / words).max(200_000);
        let once = |f: &mut dyn FnMut(u64)| {
            let t = Instant::now();
            for i in 0..iters as u64 {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        };
        let mut plain_op = |i: u64| {
            for w in 0..words {
                data.store_u64(w * 8, black_box(i));
            }
        };
        let (mut plain, mut proto) = (f64::MAX, f64::MAX);
        // Interleaved rounds, best of each: both see the same machine state.
        for _ in 0..7 {
            plain = plain.min(once(&mut plain_op));
            proto = proto.min(once(&mut |i| {
                let u = p.begin();
                let d = u.data();
                for w in 0..words {
                    d.store_u64(w * 8, black_box(i));
                }
                u.commit();
            }));
        }
        println!(
            "| {bytes} | {plain:.2} ns | {proto:.2} ns | {:.2}x |",
            proto / plain
        );
    }
}

/// The child: a program on the 256 MiB memfd that wakes every millisecond,
/// records how late it woke (the pause it saw), and commits every
/// `commit_every` ticks (0: never). Answers "max" on stdin with the
/// longest lateness since the last question, in microseconds.
fn child(spec: &str) {
    let mut it = spec.split(':');
    let path = it.next().unwrap();
    let commit_every: u64 = it.next().unwrap().parse().unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let map = memmap2::MmapOptions::new().map_raw(&file).unwrap();
    let (mut p, _) = Publisher::open(Region::from_mmap(&map)).unwrap();
    let max = Arc::new(AtomicU64::new(0));
    let m2 = max.clone();
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        for line in BufReader::new(std::io::stdin()).lines() {
            if line.is_err() {
                break;
            }
            writeln!(out, "{}", m2.swap(0, Ordering::Relaxed)).unwrap();
        }
        std::process::exit(0);
    });
    let tick = Duration::from_millis(1);
    let mut n = 0u64;
    loop {
        let t = Instant::now();
        std::thread::sleep(tick);
        let late = t.elapsed().saturating_sub(tick).as_micros() as u64;
        max.fetch_max(late, Ordering::Relaxed);
        n += 1;
        if commit_every > 0 && n.is_multiple_of(commit_every) {
            let u = p.begin();
            // A chunk of work: 64 KiB spread over the mapping.
            let d = u.data();
            for k in 0..8192usize {
                d.store_u64((k * 4096 * 7 + (n as usize % 512) * 8) % (BIG - 8), n);
            }
            u.commit();
        }
    }
}

struct Child {
    proc: std::process::Child,
    input: std::process::ChildStdin,
    output: BufReader<std::process::ChildStdout>,
}

impl Child {
    fn spawn(fd: &SharedFd, commit_every: u64) -> Child {
        let spec = format!(
            "/proc/{}/fd/{}:{commit_every}",
            std::process::id(),
            fd.as_raw_fd()
        );
        let mut proc = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = proc.stdin.take().unwrap();
        let output = BufReader::new(proc.stdout.take().unwrap());
        std::thread::sleep(Duration::from_millis(200));
        Child {
            proc,
            input,
            output,
        }
    }

    fn max_pause_us(&mut self) -> u64 {
        writeln!(self.input, "max").unwrap();
        let mut l = String::new();
        self.output.read_line(&mut l).unwrap();
        l.trim().parse().unwrap()
    }

    /// The stop mode: SIGSTOP, wait until stopped, run `copy`, SIGCONT.
    fn stopped(&self, copy: &mut dyn FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
        let pid = Pid::from_raw(self.proc.id() as i32);
        kill(pid, Signal::SIGSTOP)?;
        waitpid(pid, Some(WaitPidFlag::WUNTRACED))?;
        let r = copy();
        kill(pid, Signal::SIGCONT)?;
        r
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

fn big_memfd() -> (SharedFd, memmap2::MmapRaw) {
    let fd = SharedFd::create("bench-256m", CreateOptions::default()).unwrap();
    let map = fd.map_raw((DATA_OFFSET + BIG) as u64).unwrap();
    // Fill every page, as a program with 256 MiB of state would.
    let r = Region::from_mmap(&map);
    let (mut p, _) = Publisher::open(r).unwrap();
    let u = p.begin();
    let d = u.data();
    for off in (0..BIG).step_by(4096) {
        d.store_u64(off, off as u64 | 1);
    }
    u.commit();
    (fd, map)
}

fn pauses() {
    let (fd, map) = big_memfd();
    let src = Region::from_mmap(&map);
    let mut dst = vec![0u8; src.len()];
    src.copy_to(&mut dst); // first touch of the destination's pages
    let t = Instant::now();
    src.copy_to(&mut dst);
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("\n## 2. longest pause the program sees, 256 MiB memfd\n");
    println!("one copy of the 256 MiB mapping: {copy_ms:.1} ms (atomic 8-byte loads)\n");
    println!(
        "| program commits | mode | snapshots | outcome | longest pause (max over runs) | during the tries | during the stop | time in tries before a stop | idle baseline |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|");
    for (every, label) in [(100u64, "every 100 ms"), (1, "every 1 ms")] {
        let mut child = Child::spawn(&fd, every);
        // Baseline: the same child with no snapshot running.
        std::thread::sleep(Duration::from_millis(300));
        child.max_pause_us();
        std::thread::sleep(Duration::from_millis(1000));
        let idle = child.max_pause_us();
        let runs = 8;
        let (mut worst, mut worst_tries, mut worst_stop) = (0, 0, 0);
        let mut tries_time = Duration::ZERO;
        let mut kinds = std::collections::BTreeMap::new();
        let mut s = Snapshotter::new();
        for _ in 0..runs {
            s.forget();
            child.max_pause_us();
            let start = Instant::now();
            // The lateness up to the fallback's stop (the tries), asked of
            // the child just before it is stopped.
            let mut before_stop = None;
            let c = s
                .capture(src, &mut dst, |copy| {
                    before_stop = Some((child.max_pause_us(), start.elapsed()));
                    child.stopped(copy)
                })
                .unwrap();
            let kind = match c {
                CaptureOutcome::Consistent { .. } => "consistent",
                CaptureOutcome::Stopped { .. } => "fallback stop",
                _ => "other",
            };
            *kinds.entry(kind).or_insert(0) += 1;
            std::thread::sleep(Duration::from_millis(20));
            let after = child.max_pause_us();
            let (tries, stop) = match before_stop {
                Some((tries, took)) => {
                    tries_time += took;
                    (tries, after)
                }
                None => (after, 0),
            };
            worst_tries = worst_tries.max(tries);
            worst_stop = worst_stop.max(stop);
            worst = worst.max(tries).max(stop);
        }
        let outcome: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let stops = kinds.get("fallback stop").copied().unwrap_or(0);
        let mean_tries = if stops > 0 {
            format!("{:.0} ms", tries_time.as_secs_f64() * 1e3 / stops as f64)
        } else {
            "-".into()
        };
        println!(
            "| {label} | protocol | {runs} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {mean_tries} | {:.1} ms |",
            outcome.join(", "),
            worst as f64 / 1e3,
            worst_tries as f64 / 1e3,
            worst_stop as f64 / 1e3,
            idle as f64 / 1e3
        );
        let mut worst = 0;
        for _ in 0..runs {
            child.max_pause_us();
            child
                .stopped(&mut || {
                    src.copy_to(&mut dst);
                    Ok(())
                })
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            worst = worst.max(child.max_pause_us());
        }
        println!(
            "| {label} | stop | {runs} | {runs} stopped | {:.1} ms | - | {:.1} ms | - | {:.1} ms |",
            worst as f64 / 1e3,
            worst as f64 / 1e3,
            idle as f64 / 1e3
        );
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives on
    // this stack frame for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn idle_cpu() {
    let (fd, map) = big_memfd();
    let src = Region::from_mmap(&map);
    let mut dst = vec![0u8; src.len()];
    let _child = Child::spawn(&fd, 0); // commits nothing
    let span = Duration::from_secs(3);
    let interval = Duration::from_millis(100);
    println!("\n## 3. snapshotter CPU while the program commits nothing (256 MiB, 3 s)\n");
    println!("| snapshotter | CPU time | CPU share | vs copying every interval |");
    println!("|---|---:|---:|---:|");
    let run = |dst: &mut Vec<u8>, f: &mut dyn FnMut(&mut Vec<u8>)| {
        let cpu = thread_cpu();
        let start = Instant::now();
        while start.elapsed() < span {
            f(dst);
        }
        thread_cpu() - cpu
    };
    let always = run(&mut dst, &mut |dst| {
        src.copy_to(dst);
        std::thread::sleep(interval);
    });
    let mut s = Snapshotter::new();
    s.capture(src, &mut dst, |_| unreachable!()).unwrap(); // the first, kept snapshot
    let skip = run(&mut dst, &mut |dst| {
        s.capture(src, dst, |_| unreachable!()).unwrap();
        std::thread::sleep(interval);
    });
    let s2 = Snapshotter::new();
    let gen_now = shm_snapshot::committed_generation(src).unwrap();
    let sleeper = run(&mut dst, &mut |_| {
        s2.wait_for_generation(src, gen_now, span);
    });
    let share = |d: Duration| d.as_secs_f64() / span.as_secs_f64() * 100.0;
    let ratio = |d: Duration| d.as_secs_f64() / always.as_secs_f64();
    println!(
        "| copy every 100 ms (no protocol skip) | {:.1} ms | {:.2} % | 1.00x |",
        always.as_secs_f64() * 1e3,
        share(always)
    );
    println!(
        "| capture every 100 ms (Unchanged: skipped) | {:.2} ms | {:.3} % | {:.5}x |",
        skip.as_secs_f64() * 1e3,
        share(skip),
        ratio(skip)
    );
    println!(
        "| wait_for_generation (futex sleep) | {:.2} ms | {:.3} % | {:.5}x |",
        sleeper.as_secs_f64() * 1e3,
        share(sleeper),
        ratio(sleeper)
    );
}

/// A 256 MiB memfd with data in `pages` (page indexes into the data
/// region) and holes elsewhere.
fn memfd_with_pages(pages: impl Iterator<Item = usize>) -> (SharedFd, memmap2::MmapRaw) {
    let fd = SharedFd::create("bench-sparse", CreateOptions::default()).unwrap();
    let map = fd.map_raw((DATA_OFFSET + BIG) as u64).unwrap();
    let (mut p, _) = Publisher::open(Region::from_mmap(&map)).unwrap();
    let u = p.begin();
    for page in pages {
        u.data().store_u64(page * 4096, page as u64 | 1);
    }
    u.commit();
    (fd, map)
}

/// The fallback stop with a `SparseCopy`: the time the program is stopped
/// is the extent search (two `lseek`s per extent) plus the copy. A memfd
/// whose 128 MiB of data lie in 32768 one-page extents (every other page)
/// vs the same 128 MiB in one extent.
fn sparse_fallback() {
    println!("\n## 4. fallback stop with SparseCopy, 256 MiB memfd holding 128 MiB\n");
    println!(
        "| data layout | extents | copy while stopped (median) | longest pause the program sees | vs one extent |"
    );
    println!("|---|---:|---:|---:|---:|");
    let pages = BIG / 4096;
    let layouts: [(&str, Box<dyn Iterator<Item = usize>>); 2] = [
        ("one extent (first half)", Box::new(0..pages / 2)),
        ("every other page", Box::new((0..pages).step_by(2))),
    ];
    let mut base = None;
    for (label, which) in layouts {
        let (fd, map) = memfd_with_pages(which);
        let src = Region::from_mmap(&map);
        let own = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let mut copy = SparseCopy::new(&own);
        copy.copy_from(src).unwrap(); // first touch of the copy's buffer
        let extents = copy.extents.len();
        let mut child = Child::spawn(&fd, 0);
        let (mut times, mut worst) = (Vec::new(), 0);
        for _ in 0..8 {
            child.max_pause_us();
            let mut took = Duration::ZERO;
            child
                .stopped(&mut || {
                    let t = Instant::now();
                    copy.copy_from(src)?;
                    took = t.elapsed();
                    Ok(())
                })
                .unwrap();
            times.push(took);
            std::thread::sleep(Duration::from_millis(20));
            worst = worst.max(child.max_pause_us());
        }
        times.sort();
        let median = times[times.len() / 2].as_secs_f64() * 1e3;
        let base_ms = *base.get_or_insert(median);
        println!(
            "| {label} | {extents} | {median:.1} ms | {:.1} ms | {:.2}x |",
            worst as f64 / 1e3,
            median / base_ms
        );
    }
}

/// utime + stime of `pid`, from `/proc/<pid>/stat` (clock ticks).
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Time on CPU of all threads of `pid` (first field of each
/// `/proc/<pid>/task/*/schedstat`, nanoseconds): finer than the 10 ms
/// ticks of utime + stime.
fn process_schedstat(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// The wrapper's CPU while its command commits nothing: `shm-fd
/// shm-restore --interval 100ms [--snapshot restore-v1] primes-snapshot`,
/// the command done with its first chunk and asleep; utime + stime of the
/// wrapper process over 10 s.
fn wrapper_cpu() {
    println!("\n## 5. wrapper CPU while the command commits nothing (100 MiB memfd, 10 s)\n");
    let Some(bins) = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.to_path_buf()))
    else {
        println!("skipped: cannot find the target directory");
        return;
    };
    let bin = |n: &str| bins.join(n);
    let missing: Vec<&str> = ["shm-fd", "shm-restore", "primes-snapshot"]
        .into_iter()
        .filter(|n| !bin(n).exists())
        .collect();
    if !missing.is_empty() {
        println!(
            "skipped: {} not built in {} (run `cargo build --release --workspace` first)",
            missing.join(", "),
            bins.display()
        );
        return;
    }
    let help = Command::new(bin("shm-restore")).arg("--help").output();
    let has_protocol =
        help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("restore-v1"));
    let span = Duration::from_secs(10);
    println!(
        "| wrapper | interval | utime + stime over 10 s | on CPU (schedstat) | CPU share | vs stop mode |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut base = None;
    let modes: &[(&str, &[&str])] = &[
        ("shm-restore (stop mode)", &[]),
        (
            "shm-restore --snapshot restore-v1",
            &["--snapshot", "restore-v1"],
        ),
    ];
    for (label, flags) in modes {
        if !flags.is_empty() && !has_protocol {
            println!(
                "| {label} | 100 ms | not measured: this shm-restore has no --snapshot | | | |"
            );
            continue;
        }
        let dir = BenchDir::new();
        let snap = dir.0.join("idle.snap");
        let mut wrapper = Command::new(bin("shm-fd"))
            .arg(bin("shm-restore"))
            .args(["-q", "--interval", "100ms"])
            .args(*flags)
            .arg(&snap)
            .arg(bin("primes-snapshot"))
            .args(["--interval-ms", "100000000", "--span", "4096"])
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // shm-fd execs shm-restore: same pid. Let it start and take its
        // first save of the committed chunk.
        let pid = wrapper.id();
        std::thread::sleep(Duration::from_secs(1));
        let (Some(before), Some(sched_before), t) =
            (process_cpu(pid), process_schedstat(pid), Instant::now())
        else {
            println!("| {label} | 100 ms | the wrapper exited early | | | |");
            continue;
        };
        std::thread::sleep(span);
        let cpu = process_cpu(pid).map(|after| after - before);
        let sched = process_schedstat(pid).map(|after| after.saturating_sub(sched_before));
        let secs = t.elapsed().as_secs_f64();
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let _ = wrapper.wait();
        let (Some(cpu), Some(sched)) = (cpu, sched) else {
            println!("| {label} | 100 ms | the wrapper exited early | | | |");
            continue;
        };
        let ticks_ms = cpu.as_secs_f64() * 1e3;
        let ms = sched.as_secs_f64() * 1e3;
        let base_ms = *base.get_or_insert(ms);
        let ratio = if base_ms > 0.0 {
            format!("{:.3}x", ms / base_ms)
        } else {
            "-".into()
        };
        println!(
            "| {label} | 100 ms | {ticks_ms:.0} ms | {ms:.2} ms | {:.3} % | {ratio} |",
            ms / 1e3 / secs * 100.0
        );
    }
    let hz = {
        // SAFETY: sysconf only reads a system constant.
        unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
    };
    println!(
        "\n(/proc/<pid>/stat utime + stime, {hz} ticks a second; schedstat in ns; ratio on schedstat)"
    );
}

/// A directory of this run's own under the temp dir, removed on drop.
struct BenchDir(std::path::PathBuf);

impl BenchDir {
    fn new() -> BenchDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("shm-snapshot-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        BenchDir(dir)
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
