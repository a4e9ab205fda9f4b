//! Start-up time against state size: how long a program takes from its
//! launch until its state is ready to use, when the state is
//!
//! - `shm-fd`: already in a memfd that a watcher (this bench) holds and
//!   passes through `shm-fd`; the program maps it and reads one record;
//! - `shm-fd-touch`: the same, and the program then reads one word of
//!   every page (what a program that scans its whole state pays later,
//!   in page faults, instead of at the start);
//! - `shm-restore`: in a snapshot file, which `shm-restore` verifies and
//!   loads into a new memfd before it starts the program, which then maps
//!   it and reads one record (as after a reboot, with the file in the page
//!   cache);
//! - `file`: in a plain file of records, which the program reads and
//!   deserialises into a `HashMap<u64, Vec<u8>>` (no checksum);
//! - `sqlite`: in a SQLite table, which the program reads whole into the
//!   same `HashMap` (the analogue of `file`);
//! - `sqlite-open`: in the same table, which the program opens and queries
//!   for one record (start-up stays small; every later lookup is a query).
//!
//! The state is `size / 256` records of 256 bytes: a `u64` key (0, 1, ...,
//! little-endian) and 248 bytes of pseudo-random value. "Ready" means the
//! program has checked the record with key `n / 2` and written `ready` to
//! its stdout; the clock runs from before the spawn until that line
//! arrives (the exit, and freeing the memory, are outside it). All files
//! are read warm from the page cache (each method runs once untimed before
//! the timed runs); the residency is printed and written to the CSV.
//!
//! Run: `cargo bench -p shm-fd-tests --features sqlite-bench --bench
//! startup_size` (without the feature the SQLite lines are skipped);
//! `scripts/plot-startup` runs it and draws `docs/startup.svg` from the
//! CSV. Environment:
//! - `STARTUP_BENCH_SIZES`: comma-separated sizes (default
//!   `1M,16M,256M,1G,4G`; `K`/`M`/`G` are powers of 1024);
//! - `STARTUP_BENCH_RUNS`: timed runs per method and size (default 5; the
//!   median is reported with the fastest and slowest);
//! - `STARTUP_BENCH_DIR`: where the generated files are kept between runs
//!   (default `target/startup-bench`; about 3.1x the sizes on disk);
//! - `STARTUP_BENCH_CSV`: the CSV written (default `<DIR>/startup.csv`).
//!
//! The runs of one size alternate between the methods (A, B, C, ..., A,
//! B, C, ...), so machine load hits all of them alike.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shm_fd::{CreateOptions, Handover, PassedFds, SharedFd};

/// The environment variable that makes this executable a benchmarked
/// program; its value is the method.
const ROLE: &str = "STARTUP_BENCH_ROLE";
/// The state file a `file` or `sqlite*` program reads.
const STATE: &str = "STARTUP_BENCH_STATE";
/// Bytes per record: an 8-byte key and the value.
const RECORD: usize = 256;
const VALUE: usize = RECORD - 8;
/// Bumped when the generated files change, so old ones are made again.
const DATA_VERSION: &str = "startup-bench data v1, 256-byte records";

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        return program(&role);
    }
    // Before anything else is opened: the memfd the watcher holds goes on
    // fd 3 (a new one for each size: shm-fd seals it against shrinking).
    let mut passed = Some(watcher_memfd());
    let sizes: Vec<u64> = std::env::var("STARTUP_BENCH_SIZES")
        .unwrap_or_else(|_| "1M,16M,256M,1G,4G".to_owned())
        .split(',')
        .map(|s| shm_fd::units::parse_size(s).expect("STARTUP_BENCH_SIZES"))
        .collect();
    let runs: usize = env_or("STARTUP_BENCH_RUNS", 5).max(1);
    let exe = std::env::current_exe().expect("current_exe");
    // The bench runs from target/<profile>/deps/.
    let target = exe.ancestors().nth(3).expect("target dir").to_path_buf();
    let dir = std::env::var_os("STARTUP_BENCH_DIR")
        .map_or_else(|| target.join("startup-bench"), PathBuf::from);
    std::fs::create_dir_all(&dir).expect("creating STARTUP_BENCH_DIR");
    let csv_path = std::env::var_os("STARTUP_BENCH_CSV")
        .map_or_else(|| dir.join("startup.csv"), PathBuf::from);
    let shm_fd = shm_fd_tests::bin("shm-fd");
    let shm_restore = shm_fd_tests::bin("shm-restore");

    let mut csv = format!(
        "# start-up time vs state size: cargo bench -p shm-fd-tests --features sqlite-bench \
         --bench startup_size\n# machine: {}\n# records: {RECORD} bytes; page cache warm; \
         {runs} timed runs per point, alternating between methods\n",
        machine()
    );
    if !cfg!(feature = "sqlite-bench") {
        println!("SQLite: skipped (run with `--features sqlite-bench`)");
    }
    println!("start-up time vs state size, {runs} runs each (median, fastest-slowest)");
    for &size in &sizes {
        // The last size's memfd is closed first, so fd 3 is free again.
        drop(passed.take());
        let passed = passed.insert(watcher_memfd());
        let files = StateFiles::make(&dir, size, passed);
        fill_memfd(passed, &files.plain);
        let load_before = load_average();
        let mut methods = Method::all();
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); methods.len()];
        // Round 0 is the untimed warm-up.
        for round in 0..=runs {
            for (m, t) in methods.iter_mut().zip(times.iter_mut()) {
                let d = m.run(&exe, &shm_fd, &shm_restore, &files);
                if round > 0 {
                    t.push(d);
                }
            }
        }
        let cached = files.cached();
        let load_after = load_average();
        println!(
            "{} ({} records; load average {load_before} -> {load_after}; in page cache: {cached})",
            human(size),
            size / RECORD as u64
        );
        csv += &format!(
            "# {}: load average {load_before} -> {load_after}; in page cache: {cached}\n",
            human(size)
        );
        for (m, mut t) in methods.iter().zip(times) {
            t.sort();
            let (median, min, max) = (t[t.len() / 2], t[0], t[t.len() - 1]);
            println!(
                "  {:<14} {:>10.2} ms ({:.2}-{:.2})",
                m.id,
                ms(median),
                ms(min),
                ms(max)
            );
            csv += &format!(
                "{size},{},{},{:.6},{:.6},{:.6}\n",
                m.id,
                t.len(),
                median.as_secs_f64(),
                min.as_secs_f64(),
                max.as_secs_f64()
            );
        }
    }
    drop(passed);
    let header = "size_bytes,method,runs,median_s,min_s,max_s\n";
    let (comments, rows): (Vec<&str>, Vec<&str>) = csv.lines().partition(|l| l.starts_with('#'));
    let text = format!("{}\n{header}{}\n", comments.join("\n"), rows.join("\n"));
    std::fs::write(&csv_path, text).expect("writing the CSV");
    println!("wrote {}", csv_path.display());
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// CPU model, cores, memory and kernel, for the CSV's header.
fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "{model}, {cores} cores, {:.0} GiB, Linux {}",
        mem_kib as f64 / (1 << 20) as f64,
        read("/proc/sys/kernel/osrelease").trim()
    )
}

/// The 1-minute load average.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| Some(l.split_whitespace().next()?.to_owned()))
        .unwrap_or_else(|| "?".to_owned())
}

/// The memfd the bench holds as the watcher, placed on fd 3 with the
/// `LISTEN_*` description a child gets.
fn watcher_memfd() -> PassedFds {
    let memfd = SharedFd::create(
        "startup-bench",
        CreateOptions {
            size: 0,
            // Resized for each state size.
            seal_shrink: false,
        },
    )
    .expect("memfd");
    let handover = Handover::from_entries(
        vec![(shm_fd::DEFAULT_NAME.to_owned(), memfd.into_owned_fd())],
        shm_fd::DEFAULT_NAME,
    )
    .expect("hand-over");
    // SAFETY: called first thing in main, when the bench has opened
    // nothing, and again after the previous hand-over was dropped (closing
    // fd 3); every file the bench opens in between is closed again, so no
    // object of this process owns fd 3.
    unsafe { handover.install() }.expect("placing the memfd on fd 3")
}

/// A private open file description of the passed memfd.
fn shared_file(passed: &PassedFds) -> File {
    let fd = passed.shared().try_clone_to_owned().expect("dup");
    SharedFd::adopt(fd, shm_fd::DEFAULT_NAME)
        .and_then(|s| s.reopen())
        .expect("reopening the memfd")
        .into_file()
}

/// Puts the state of `plain` into the passed memfd (outside the clock).
fn fill_memfd(passed: &PassedFds, plain: &Path) {
    let mut memfd = shared_file(passed);
    let mut from = File::open(plain).expect("state file");
    std::io::copy(&mut from, &mut memfd).expect("filling the memfd");
}

/// The record with key `i`: the key, then a value no compressor or
/// deduplication could shorten.
fn record(i: u64, out: &mut [u8; RECORD]) {
    out[..8].copy_from_slice(&i.to_le_bytes());
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in out[8..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
}

/// The generated state of one size: the same records as a plain file, a
/// shm-restore snapshot and a SQLite database. Made once and kept.
struct StateFiles {
    plain: PathBuf,
    snapshot: PathBuf,
    sqlite: PathBuf,
    records: u64,
}

impl StateFiles {
    fn make(dir: &Path, size: u64, passed: &PassedFds) -> StateFiles {
        assert!(
            size >= RECORD as u64 && size.is_multiple_of(RECORD as u64),
            "sizes are whole records of {RECORD} bytes"
        );
        let dir = dir.join(size.to_string());
        let files = StateFiles {
            plain: dir.join("state.bin"),
            snapshot: dir.join("state.snap"),
            sqlite: dir.join("state.db"),
            records: size / RECORD as u64,
        };
        let done = dir.join("done");
        let want = format!(
            "{DATA_VERSION}, sqlite {}\n",
            cfg!(feature = "sqlite-bench")
        );
        if std::fs::read_to_string(&done).is_ok_and(|d| d == want) {
            return files;
        }
        let started = Instant::now();
        println!("making the {} state in {}", human(size), dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the state directory");

        let mut w = BufWriter::with_capacity(1 << 20, File::create(&files.plain).unwrap());
        let mut rec = [0u8; RECORD];
        for i in 0..files.records {
            record(i, &mut rec);
            w.write_all(&rec).unwrap();
        }
        w.into_inner().unwrap().sync_all().unwrap();

        // The snapshot as shm-restore saves it: from a memfd holding them.
        fill_memfd(passed, &files.plain);
        let mut saver = shm_restore::Saver::new(
            shm_restore::DirStorage::new(&dir),
            OsStr::new("state.snap"),
            shm_restore::SaveOptions::default(),
        );
        saver
            .save_memfd(&shared_file(passed), shm_restore::now_ns())
            .expect("saving the snapshot");
        saver.wait_retired();

        #[cfg(feature = "sqlite-bench")]
        make_sqlite(&files.sqlite, files.records);
        std::fs::write(&done, want).unwrap();
        println!("  made in {:.1} s", started.elapsed().as_secs_f64());
        files
    }

    /// How much of each file is in the page cache, as `name pct%`.
    fn cached(&self) -> String {
        let mut out = Vec::new();
        for (name, path) in [
            ("file", &self.plain),
            ("snapshot", &self.snapshot),
            ("sqlite", &self.sqlite),
        ] {
            let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
                continue;
            };
            let res = Command::new("fincore")
                .args(["--bytes", "--noheadings", "--output", "RES"])
                .arg(path)
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<u64>().ok());
            out.push(match res {
                Some(r) => format!("{name} {:.0}%", r as f64 * 100.0 / len.max(1) as f64),
                None => format!("{name} ?"),
            });
        }
        out.join(", ")
    }
}

#[cfg(feature = "sqlite-bench")]
fn make_sqlite(path: &Path, records: u64) {
    let mut db = rusqlite::Connection::open(path).unwrap();
    // Only while filling it: a crash here just means making it again.
    db.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
        .unwrap();
    db.execute_batch("CREATE TABLE state (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        .unwrap();
    let tx = db.transaction().unwrap();
    {
        let mut insert = tx
            .prepare("INSERT INTO state (k, v) VALUES (?1, ?2)")
            .unwrap();
        let mut rec = [0u8; RECORD];
        for i in 0..records {
            record(i, &mut rec);
            insert.execute((i as i64, &rec[8..])).unwrap();
        }
    }
    tx.commit().unwrap();
    db.execute_batch("PRAGMA journal_mode = DELETE").unwrap();
    drop(db);
    File::open(path).unwrap().sync_all().unwrap();
}

/// One way of keeping the state, as a line of the plot.
struct Method {
    id: &'static str,
}

impl Method {
    fn all() -> Vec<Method> {
        let mut ids = vec!["shm-fd", "shm-fd-touch", "shm-restore", "file"];
        if cfg!(feature = "sqlite-bench") {
            ids.extend(["sqlite", "sqlite-open"]);
        }
        ids.into_iter().map(|id| Method { id }).collect()
    }

    /// Starts the program this way, waits until it is ready and returns
    /// the time that took; then ends it (outside the clock).
    fn run(
        &mut self,
        exe: &Path,
        shm_fd: &Path,
        shm_restore: &Path,
        files: &StateFiles,
    ) -> Duration {
        let mut cmd = match self.id {
            // The watcher's memfd is inherited on fd 3; shm-fd reuses it
            // and execs the program.
            "shm-fd" | "shm-fd-touch" => {
                let mut c = Command::new(shm_fd);
                c.arg(exe)
                    .env("LISTEN_FDS", "1")
                    .env("LISTEN_FDNAMES", shm_fd::DEFAULT_NAME);
                c
            }
            // A reboot: no memfd passed; shm-restore creates one and loads
            // the snapshot into it.
            "shm-restore" => {
                let mut c = Command::new(shm_restore);
                c.arg("-q").arg(&files.snapshot).arg("--").arg(exe);
                c.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
                c
            }
            "file" => {
                let mut c = Command::new(exe);
                c.env(STATE, &files.plain);
                c
            }
            _ => {
                let mut c = Command::new(exe);
                c.env(STATE, &files.sqlite);
                c
            }
        };
        cmd.env(ROLE, self.id)
            .env_remove("LISTEN_PID")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().expect("starting the program");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("reading the program's output");
        let took = start.elapsed();
        assert_eq!(line, "ready\n", "{} did not get ready", self.id);
        finish(child, self.id == "shm-restore");
        took
    }
}

/// Ends a program that is ready: closing its stdin ends it. Under
/// shm-restore, SIGKILL ends the wrapper instead (and, with it, the
/// program), so that it does not save the state back on the way out.
fn finish(mut child: Child, kill: bool) {
    if kill {
        child.kill().expect("kill");
    }
    drop(child.stdin.take());
    let status = child.wait().expect("wait");
    assert!(kill || status.success(), "the program failed: {status}");
}

/// The benchmarked program: gets its state ready the way `role` says,
/// checks the record with key n/2, says `ready`, and waits for the end of
/// its stdin.
fn program(role: &str) {
    let checked = match role {
        "shm-fd" | "shm-restore" | "shm-fd-touch" => {
            // SAFETY: this program opened nothing before: the fd LISTEN_FDS
            // names was inherited and has no other owner here.
            let shared = unsafe { SharedFd::from_env(shm_fd::DEFAULT_NAME) }.expect("memfd");
            let map = shared.map_raw(1).expect("map");
            if role == "shm-fd-touch" {
                let mut sum = 0u64;
                for page in (0..map.len()).step_by(4096) {
                    // SAFETY: `page` is inside the mapping; a volatile read
                    // so the loop is not optimised away.
                    sum = sum.wrapping_add(u64::from(unsafe {
                        std::ptr::read_volatile(map.as_ptr().add(page))
                    }));
                }
                std::hint::black_box(sum);
            }
            let n = map.len() / RECORD;
            let mut rec = [0u8; RECORD];
            // SAFETY: record n/2 lies inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    map.as_ptr().add(n / 2 * RECORD),
                    rec.as_mut_ptr(),
                    RECORD,
                )
            };
            check(n as u64 / 2, &rec)
        }
        "file" => {
            let path = std::env::var_os(STATE).expect("state path");
            let file = File::open(path).expect("state file");
            let n = file.metadata().unwrap().len() / RECORD as u64;
            let map = deserialise(BufReader::with_capacity(1 << 20, file), n);
            lookup(&map, n / 2)
        }
        #[cfg(feature = "sqlite-bench")]
        "sqlite" | "sqlite-open" => {
            use rusqlite::OpenFlags;
            let path = std::env::var_os(STATE).expect("state path");
            let db = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .expect("opening the database");
            let n = db
                .query_row("SELECT max(k) + 1 FROM state", [], |r| r.get::<_, i64>(0))
                .expect("max(k)") as u64;
            if role == "sqlite-open" {
                let v: Vec<u8> = db
                    .query_row("SELECT v FROM state WHERE k = ?1", [n as i64 / 2], |r| {
                        r.get(0)
                    })
                    .expect("one record");
                let mut rec = [0u8; RECORD];
                rec[..8].copy_from_slice(&(n / 2).to_le_bytes());
                rec[8..].copy_from_slice(&v);
                check(n / 2, &rec)
            } else {
                let mut map = std::collections::HashMap::with_capacity(n as usize);
                let mut all = db.prepare("SELECT k, v FROM state").unwrap();
                let mut rows = all.query([]).unwrap();
                while let Some(row) = rows.next().unwrap() {
                    let k: i64 = row.get(0).unwrap();
                    let v = row.get_ref(1).unwrap().as_blob().unwrap().to_vec();
                    map.insert(k as u64, v);
                }
                lookup(&map, n / 2)
            }
        }
        other => panic!("unknown role {other}"),
    };
    assert!(
        checked,
        "{role}: the record read back is not the one written"
    );
    let mut out = std::io::stdout().lock();
    out.write_all(b"ready\n").unwrap();
    out.flush().unwrap();
    drop(out);
    // Wait for the end (stdin closed), holding the state.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// What a serialise-to-file program does at start: each record's key and
/// value into a map.
fn deserialise(mut r: impl Read, n: u64) -> std::collections::HashMap<u64, Vec<u8>> {
    let mut map = std::collections::HashMap::with_capacity(n as usize);
    let mut rec = [0u8; RECORD];
    for _ in 0..n {
        r.read_exact(&mut rec).expect("reading a record");
        let key = u64::from_le_bytes(rec[..8].try_into().unwrap());
        map.insert(key, rec[8..].to_vec());
    }
    map
}

fn lookup(map: &std::collections::HashMap<u64, Vec<u8>>, key: u64) -> bool {
    let mut rec = [0u8; RECORD];
    rec[..8].copy_from_slice(&key.to_le_bytes());
    match map.get(&key) {
        Some(v) if v.len() == VALUE => {
            rec[8..].copy_from_slice(v);
            check(key, &rec)
        }
        _ => false,
    }
}

fn check(key: u64, rec: &[u8; RECORD]) -> bool {
    let mut want = [0u8; RECORD];
    record(key, &mut want);
    *rec == want
}
