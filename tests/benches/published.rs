//! Published values: shm-state's published value (`tx.new_published`,
//! `SharedState::publish_value`, `SharedState::read_published_value`)
//! against Cloudflare's `mmap-sync` crate (`Synchronizer::write`,
//! `write_raw`, `read`) doing the same, every ratio measured in the same
//! run (goal: at least as fast, while also surviving kill -9 of the writer
//! and shm-restore snapshots).
//!
//! Two value shapes, the same fields on both sides: `quote`, 6 `u64`s (48
//! bytes), and `page`, 512 `u64`s (4 KiB). Field `i` of version `seq` holds
//! `seq + i`, so the sum of the fields tells a whole version from a torn
//! one. shm-state stores the struct's bytes (`bytemuck::Pod`); mmap-sync
//! stores the rkyv 0.7 archive of the same struct (`strict`: a `repr(C)`
//! archive of plain `u64`s, checked at the start to be byte for byte the
//! struct's bytes).
//!
//! 1. **Write**, one writer, no readers, one process: shm-state
//!    `publish_value` (writer lock, copy into the slot not holding the
//!    latest version, CRC-32, release stores) against mmap-sync `write`
//!    (rkyv serialisation into a reused buffer, `check_archived_root` of
//!    it, wyhash, copy into the data file not being read, `msync` of its
//!    mapping, version swap) and `write_raw` (the struct's bytes, already
//!    archived: wyhash, copy, `msync`, swap). The value's first field
//!    changes every operation.
//! 2. **Read in the writer's process**, nothing publishing: the latest
//!    version read and *touched*: its fields summed and the sum checked
//!    (what a user does with a value; it makes mmap-sync's zero-copy
//!    reference pay for reading the bytes, as shm-state pays for its
//!    copy). shm-state `read_published_value` copies the slot between two
//!    loads of its sequence and checks its CRC-32 (a torn or damaged copy
//!    is never returned); mmap-sync `read(false)` takes a reader count on
//!    the current data file and references the archive in place, no
//!    check; `read(true)` adds rkyv's validation (`check_archived_root`:
//!    the archive's layout, not its bytes' integrity). Neither of
//!    mmap-sync's reads checks a checksum: its 24-bit checksum is only part
//!    of the version word. Reference lines (no ratio): the same touch of a
//!    value in local memory, and a copy + CRC-32 (crc32fast, as
//!    shm-state) + touch.
//! 3. **Read from another process while a writer publishes**: a child
//!    (this executable run again) publishes new versions every
//!    `PUBLISHED_BENCH_INTERVAL_US` µs (0: back to back), the bench reads
//!    and touches the latest as fast as it can. Reported: ns per read,
//!    distinct versions seen, torn reads (sum wrong), failed reads, and the
//!    writer's publishes per second and mean time per publish.
//!
//! Ratios: mmap-sync's time per operation over shm-state's in the same
//! round (above 1: shm-state faster); the median over the rounds and the
//! range. The modes of a round run one after the other, their order
//! reversed every other round.
//!
//! mmap-sync keeps a value in three files under a path prefix
//! (`PREFIX_state`, `PREFIX_data_0`, `PREFIX_data_1`); they go in
//! `PUBLISHED_BENCH_DIR` (default `/dev/shm`, tmpfs, where its `msync` is
//! cheap; on a disk it writes back every version) and are removed at the
//! end. Its writer sleeps `MS_SLEEP_NS` (1 µs here, 1 s by default) between
//! looks while a reader still holds the data file it is about to rewrite;
//! its grace time (after which it takes the file anyway) is 1 s.
//! shm-state's value lives in a memfd the bench places on fd 3
//! (`LISTEN_FDS`), as a watcher passes it. Children die with the bench
//! (`PR_SET_PDEATHSIG`) and are reaped by it (killed by pid first if they
//! still run).
//!
//! Run: `scripts/bench-published`, i.e. `cargo bench -p shm-fd-tests
//! --features mmap-sync-bench --bench published`. Without the feature
//! only shm-state's lines run. Environment:
//! - `PUBLISHED_BENCH_SECS`: seconds per phase of parts 1 and 2 (default
//!   0.2);
//! - `PUBLISHED_BENCH_XSECS`: seconds per phase of part 3 (default 1);
//! - `PUBLISHED_BENCH_ROUNDS`: rounds (default 7);
//! - `PUBLISHED_BENCH_INTERVAL_US`: part 3's writer intervals, µs (default
//!   `100,0`);
//! - `PUBLISHED_BENCH_DIR`: mmap-sync's directory (default `/dev/shm`);
//! - `PUBLISHED_BENCH_PARTS`: the parts to run (default `1,2,3`).
//!
//! Without `--bench` (`cargo test --benches`) it runs a few milliseconds of
//! each part.

use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
#[cfg(feature = "mmap-sync-bench")]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use shm_fd::{CreateOptions, Handover, PassedFds, SharedFd};
use shm_fd_tests::bench::{env_or as env, load_average, machine, median, ns, rate, ratio_range};
use shm_fd_tests::die_with_parent;
use shm_state::{Layout, SharedState, Source, StatePublished};

/// The environment variable that makes this executable a child (a
/// writer); its value is the role.
const ROLE: &str = "PUBLISHED_BENCH_ROLE";
/// Operations between two looks at the clock.
const BATCH: u64 = 64;
/// Operations before the timed ones, per phase.
const WARM: u64 = 2000;

// --------------------------------------------------------------- values

/// A small value: a quote.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[cfg_attr(
    feature = "mmap-sync-bench",
    derive(rkyv::Archive, rkyv::Serialize),
    archive(check_bytes)
)]
#[repr(C)]
struct Quote {
    seq: u64,
    bid: u64,
    ask: u64,
    bid_size: u64,
    ask_size: u64,
    time: u64,
}

/// A 4 KiB value.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[cfg_attr(
    feature = "mmap-sync-bench",
    derive(rkyv::Archive, rkyv::Serialize),
    archive(check_bytes)
)]
#[repr(C)]
struct Page {
    words: [u64; 512],
}

/// The wrapping sum of `words` and whether it is the sum of one version
/// (`words[i] == seq + i` with `seq = words[0]`): `(seq, whole)`.
#[inline]
fn sum_check(words: &[u64]) -> (u64, bool) {
    let sum = words.iter().fold(0u64, |a, &w| a.wrapping_add(w));
    let n = words.len() as u64;
    let expected = words[0].wrapping_mul(n).wrapping_add(n * (n - 1) / 2);
    (words[0], sum == expected)
}

/// What the bench does with both shapes.
trait Shape: Pod + Archivable {
    const NAME: &'static str;
    /// Version `seq`: field `i` holds `seq + i`.
    fn make(seq: u64) -> Self;
    /// Changes the first field only (the writes of part 1).
    fn set_seq(&mut self, seq: u64);
    /// Reads every field: `(seq, whole)`, see [`sum_check`].
    fn touch(&self) -> (u64, bool);
    fn handle(root: &Root) -> StatePublished;
}

impl Shape for Quote {
    const NAME: &'static str = "quote";

    fn make(seq: u64) -> Quote {
        Quote {
            seq,
            bid: seq + 1,
            ask: seq + 2,
            bid_size: seq + 3,
            ask_size: seq + 4,
            time: seq + 5,
        }
    }

    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }

    #[inline]
    fn touch(&self) -> (u64, bool) {
        sum_check(&[
            self.seq,
            self.bid,
            self.ask,
            self.bid_size,
            self.ask_size,
            self.time,
        ])
    }

    fn handle(root: &Root) -> StatePublished {
        root.quote
    }
}

impl Shape for Page {
    const NAME: &'static str = "page";

    fn make(seq: u64) -> Page {
        let mut words = [0u64; 512];
        for (i, w) in words.iter_mut().enumerate() {
            *w = seq + i as u64;
        }
        Page { words }
    }

    fn set_seq(&mut self, seq: u64) {
        self.words[0] = seq;
    }

    #[inline]
    fn touch(&self) -> (u64, bool) {
        sum_check(&self.words)
    }

    fn handle(root: &Root) -> StatePublished {
        root.page
    }
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    quote: StatePublished,
    page: StatePublished,
}

// ------------------------------------------------------------- mmap-sync

#[cfg(not(feature = "mmap-sync-bench"))]
trait Archivable {}
#[cfg(not(feature = "mmap-sync-bench"))]
impl<T> Archivable for T {}

#[cfg(feature = "mmap-sync-bench")]
use ms::{Archivable, MsSync};

#[cfg(feature = "mmap-sync-bench")]
mod ms {
    use std::time::Duration;

    use rkyv::bytecheck::CheckBytes;
    use rkyv::ser::serializers::AllocSerializer;
    use rkyv::validation::validators::DefaultValidator;

    use super::{Page, Quote, Shape, sum_check};

    /// How long mmap-sync's writer sleeps between looks while a reader
    /// holds the data file it is about to rewrite (the crate's default is
    /// 1 s, which would stall part 3's writer for a second at each such
    /// overlap).
    pub(crate) const MS_SLEEP_NS: u64 = 1_000;
    /// mmap-sync's grace time: after it, the writer takes a data file a
    /// reader still holds (resets the count).
    pub(crate) const GRACE: Duration = Duration::from_secs(1);

    /// mmap-sync's synchroniser: its default hasher (wyhash), no writer
    /// lock (one writer, as here), its default serialiser scratch space,
    /// and [`MS_SLEEP_NS`].
    pub(crate) type MsSync = mmap_sync::synchronizer::Synchronizer<
        wyhash::WyHash,
        mmap_sync::locks::LockDisabled,
        1024,
        MS_SLEEP_NS,
    >;

    /// A shape mmap-sync can write and read: rkyv-archivable, its archive
    /// checkable, and touchable in place.
    pub(crate) trait Archivable:
        rkyv::Archive<Archived: for<'b> CheckBytes<DefaultValidator<'b>>>
        + rkyv::Serialize<AllocSerializer<1024>>
    {
        /// As [`Shape::touch`], on the archive in the mapping.
        fn touch_archived(a: &Self::Archived) -> (u64, bool);
    }

    impl Archivable for Quote {
        #[inline]
        fn touch_archived(a: &Self::Archived) -> (u64, bool) {
            sum_check(&[a.seq, a.bid, a.ask, a.bid_size, a.ask_size, a.time])
        }
    }

    impl Archivable for Page {
        #[inline]
        fn touch_archived(a: &Self::Archived) -> (u64, bool) {
            sum_check(&a.words)
        }
    }

    /// Checks that mmap-sync stores exactly the struct's bytes for `T`
    /// (so `write_raw` of them is a write of the archive).
    pub(crate) fn check_archive<T: Shape>() {
        let v = T::make(7);
        let archived = rkyv::to_bytes::<T, 1024>(&v).expect("rkyv serialisation");
        assert_eq!(
            archived.as_slice(),
            bytemuck::bytes_of(&v),
            "rkyv's archive of a {} is not its bytes",
            T::NAME
        );
    }

    /// One read of the latest version, touched: `(seq, whole)`, or `None`
    /// when mmap-sync failed.
    #[inline]
    pub(crate) fn read<T: Shape>(s: &mut MsSync, check: bool) -> Option<(u64, bool)> {
        // SAFETY: the `ReadResult` (and the reference into the mapping it
        // derefs to) is dropped at the end of this function, far within
        // the writer's 1 s grace time; the archive was written by this
        // bench's writer from the same type definition (and is validated
        // when `check` is true).
        let r = unsafe { s.read::<T>(check) };
        r.ok().map(|g| T::touch_archived(&g))
    }

    /// The three files of a prefix.
    pub(crate) fn files(prefix: &str) -> [String; 3] {
        [
            format!("{prefix}_state"),
            format!("{prefix}_data_0"),
            format!("{prefix}_data_1"),
        ]
    }
}

// --------------------------------------------------------------- config

struct Config {
    quick: bool,
    secs: f64,
    xsecs: f64,
    rounds: u64,
    intervals: Vec<u64>,
    #[cfg_attr(not(feature = "mmap-sync-bench"), allow(dead_code))]
    dir: String,
    parts: Vec<u64>,
}

impl Config {
    fn from_env() -> Config {
        let list = |var: &str, default: &str| -> Vec<u64> {
            std::env::var(var)
                .unwrap_or_else(|_| default.into())
                .split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{var}: numbers"))
                })
                .collect()
        };
        let dir = std::env::var("PUBLISHED_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
        let dir = if std::path::Path::new(&dir).is_dir() {
            dir
        } else {
            std::env::temp_dir().to_string_lossy().into_owned()
        };
        // `cargo test --benches` runs benches without --bench: keep it quick.
        if !std::env::args().any(|a| a == "--bench") {
            return Config {
                quick: true,
                secs: 0.005,
                xsecs: 0.02,
                rounds: 1,
                intervals: vec![100],
                dir,
                parts: vec![1, 2, 3],
            };
        }
        Config {
            quick: false,
            secs: env("PUBLISHED_BENCH_SECS", 0.2),
            xsecs: env("PUBLISHED_BENCH_XSECS", 1.0),
            rounds: env("PUBLISHED_BENCH_ROUNDS", 7u64).max(1),
            intervals: list("PUBLISHED_BENCH_INTERVAL_US", "100,0"),
            dir,
            parts: list("PUBLISHED_BENCH_PARTS", "1,2,3"),
        }
    }

    fn warm(&self) -> u64 {
        if self.quick { 50 } else { WARM }
    }
}

// -------------------------------------------------------------- timing

/// Runs `op` (given the operation's number) `warm` times, then in batches
/// of [`BATCH`] until `secs` have passed: nanoseconds per timed operation.
fn per_op(warm: u64, secs: f64, mut op: impl FnMut(u64)) -> f64 {
    for i in 0..warm {
        op(i);
    }
    let dur = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut n = warm;
    loop {
        for _ in 0..BATCH {
            op(n);
            n += 1;
        }
        if t0.elapsed() >= dur {
            break;
        }
    }
    t0.elapsed().as_nanos() as f64 / (n - warm) as f64
}

/// What a phase of reads saw.
#[derive(Default, Clone, Copy)]
struct Reads {
    ns: f64,
    reads: u64,
    /// Reads whose version differed from the read before.
    fresh: u64,
    /// Reads whose fields did not add up to one version.
    torn: u64,
    /// Reads that failed.
    failed: u64,
}

/// As [`per_op`], for reads: `read` returns `(seq, whole)` or `None`
/// (failed).
fn reads(warm: u64, secs: f64, mut read: impl FnMut() -> Option<(u64, bool)>) -> Reads {
    let mut r = Reads::default();
    let mut last = u64::MAX;
    let mut timed = false;
    let ns = per_op(warm, secs, |i| {
        if !timed && i == warm {
            timed = true;
            r = Reads::default();
        }
        r.reads += 1;
        match read() {
            Some((seq, whole)) => {
                r.torn += u64::from(!whole);
                if seq != last {
                    r.fresh += 1;
                    last = seq;
                }
            }
            None => r.failed += 1,
        }
    });
    r.ns = ns;
    r
}

// ------------------------------------------------------------- children

/// A child: this executable as a writer. Killed (by pid, if it still runs)
/// and reaped when dropped.
struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    reaped: bool,
}

impl Kid {
    /// Starts a writer with `args`, its stdin and stdout pipes to the
    /// bench; the memfd on fd 3 is passed to it. Call it from the main
    /// thread (see [`die_with_parent`]).
    fn spawn(passed: &PassedFds, args: &[String]) -> Kid {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.env(ROLE, "writer")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        passed.configure(&mut cmd, None);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawning a writer");
        Kid {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            reaped: false,
        }
    }

    /// The child's next line (without the newline).
    fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.stdout.read_line(&mut l).expect("reading a writer");
        if n == 0 {
            let pid = self.child.id();
            let status = self.child.wait();
            self.reaped = true;
            panic!("the writer (pid {pid}) ended without a word: {status:?}");
        }
        l.trim_end().to_owned()
    }

    /// Closes its stdin (its signal to stop), reads its report and waits
    /// for its successful end.
    fn finish(mut self) -> Vec<f64> {
        drop(self.stdin.take());
        let report = self
            .line()
            .split(' ')
            .map(|x| x.parse().expect("a writer's report"))
            .collect();
        let status = self.child.wait().expect("waiting for a writer");
        self.reaped = true;
        assert!(status.success(), "the writer ended badly: {status}");
        report
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.reaped {
            return;
        }
        // Not reaped yet, so the pid is still this child's.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

/// `writer SIDE SHAPE INTERVAL_US PREFIX`: publishes versions 1, 2, ... of
/// SHAPE every INTERVAL_US µs (0: back to back) through SIDE (`ours`:
/// the state on fd 3; `mmap`: mmap-sync at PREFIX), says `ready` after
/// the first, and at the end of its stdin says `PUBLISHES BUSY_NS
/// WORST_NS` (the time spent in publishes, the longest one).
fn writer(args: &[String]) {
    // Sleep to the next deadline precisely (1 µs of slack, not 50).
    // SAFETY: prctl(PR_SET_TIMERSLACK) with a number takes no pointer and
    // only sets this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut input = std::io::stdin();
        while matches!(input.read(&mut buf), Ok(n) if n > 0) {}
        flag.store(true, Ordering::Relaxed);
    });
    let interval = Duration::from_micros(args[2].parse().expect("interval"));
    match args[1].as_str() {
        "quote" => write_loop::<Quote>(&args[0], interval, &args[3], &stop),
        "page" => write_loop::<Page>(&args[0], interval, &args[3], &stop),
        other => panic!("no shape {other}"),
    }
}

fn write_loop<T: Shape>(side: &str, interval: Duration, prefix: &str, stop: &AtomicBool) {
    let mut publish: Box<dyn FnMut(&T)> = match side {
        "ours" => {
            let (mut state, root) = open_passed();
            let h = T::handle(&root);
            Box::new(move |v| {
                state.publish_value(h, v).expect("publish");
            })
        }
        #[cfg(feature = "mmap-sync-bench")]
        "mmap" => {
            let mut s = MsSync::with_params(prefix.as_ref());
            Box::new(move |v| {
                s.write(v, ms::GRACE).expect("mmap-sync write");
            })
        }
        other => panic!("no writer side {other} (prefix {prefix})"),
    };
    let (mut n, mut busy, mut worst) = (0u64, 0u64, 0u64);
    let mut next = Instant::now();
    while n == 0 || !stop.load(Ordering::Relaxed) {
        n += 1;
        let v = T::make(n);
        let t = Instant::now();
        publish(&v);
        let took = t.elapsed().as_nanos() as u64;
        busy += took;
        worst = worst.max(took);
        if n == 1 {
            say("ready");
        }
        if !interval.is_zero() {
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }
    say(&format!("{n} {busy} {worst}"));
}

fn open_shared(fd: SharedFd) -> (SharedState<Root>, Root) {
    // SAFETY: the bench's own memfd, sealed against shrinking (the
    // default of `CreateOptions`); the bench's processes write it only
    // through shm-state, whose writer lock orders their writes.
    let source = unsafe { Source::shared(fd) };
    let mut s =
        SharedState::<Root>::open(source, Layout::new(1)).expect("opening the shared state");
    let root = s.read(|v| v.root()).expect("root");
    (s, root)
}

/// A child's open of the state on fd 3.
fn open_passed() -> (SharedState<Root>, Root) {
    // SAFETY: called first in the writer's role, before it opens any file:
    // fd 3, named by LISTEN_FDS, was inherited from the bench and nothing
    // in this process owns it.
    let fd = unsafe { SharedFd::from_env(shm_fd::DEFAULT_NAME) }.expect("the memfd on fd 3");
    open_shared(fd)
}

// ---------------------------------------------------------------- bench

/// The bench's own handles.
struct Bench {
    cfg: Config,
    passed: PassedFds,
    state: SharedState<Root>,
    root: Root,
    /// mmap-sync prefixes made (their files are removed at the end).
    #[cfg_attr(not(feature = "mmap-sync-bench"), allow(dead_code))]
    prefixes: Vec<String>,
}

impl Bench {
    #[cfg(feature = "mmap-sync-bench")]
    fn prefix(&mut self, what: &str) -> String {
        let p = format!(
            "{}/published-bench-{}-{what}",
            self.cfg.dir,
            std::process::id()
        );
        if !self.prefixes.contains(&p) {
            self.prefixes.push(p.clone());
        }
        p
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        #[cfg(feature = "mmap-sync-bench")]
        for p in &self.prefixes {
            for f in ms::files(p) {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// A mode of a part: its name and whether it is shm-state's (the
/// baseline of the ratios) or a reference line (no ratio).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// shm-state's: the baseline of the ratios.
    Ours,
    /// mmap-sync's: a ratio to the baseline.
    Theirs,
    /// A reference line: no ratio.
    Reference,
}

/// What a phase runs.
#[derive(Clone, Copy, PartialEq)]
#[cfg_attr(not(feature = "mmap-sync-bench"), allow(dead_code))]
enum Op {
    /// shm-state `publish_value`.
    Publish,
    /// mmap-sync `write`.
    MsWrite,
    /// mmap-sync `write_raw` of the struct's bytes (its archive).
    MsWriteRaw,
    /// Reference: the value stored word by word with relaxed atomic stores
    /// (as shm-state's region writes), and its CRC-32.
    RefStoreCrc,
    /// shm-state `read_published_value`, touched.
    Read,
    /// shm-state `read_published_value_into` a reused `T`, touched there.
    ReadInto,
    /// mmap-sync `read(check_bytes)`, touched in place.
    MsRead(bool),
    /// Reference: a touch of a value in local memory.
    RefTouch,
    /// Reference: a copy (memcpy), its CRC-32, a touch.
    RefCopyCrc,
    /// Reference: a copy word by word with relaxed atomic loads (as
    /// shm-state's region reads), its CRC-32, a touch.
    RefAtomicCopyCrc,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Publish => "shm-state publish_value (lock, copy, CRC-32)",
            Op::MsWrite => "mmap-sync write (rkyv serialise + validate, wyhash, copy, msync)",
            Op::MsWriteRaw => "mmap-sync write_raw (the archived bytes: wyhash, copy, msync)",
            Op::RefStoreCrc => "reference: relaxed atomic stores word by word + CRC-32",
            Op::Read => "shm-state read_published_value (copy, CRC check) + touch",
            Op::ReadInto => "shm-state read_published_value_into (reused T) + touch",
            Op::MsRead(false) => "mmap-sync read(check_bytes false) (in place) + touch",
            Op::MsRead(true) => "mmap-sync read(check_bytes true) (rkyv validation) + touch",
            Op::RefTouch => "reference: touch of a value in local memory",
            Op::RefCopyCrc => "reference: memcpy + CRC-32 + touch",
            Op::RefAtomicCopyCrc => "reference: relaxed atomic loads word by word + CRC-32 + touch",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Op::Publish | Op::Read => Kind::Ours,
            Op::MsWrite | Op::MsWriteRaw | Op::MsRead(_) => Kind::Theirs,
            _ => Kind::Reference,
        }
    }
}

/// Prints a table: per shape and mode, the median ns per operation over
/// the rounds and the median (range) of the rounds' ratios to shm-state's
/// (theirs / ours). `got[shape][mode][round]`.
fn table(shapes: &[&str], modes: &[Op], got: &[Vec<Vec<f64>>]) {
    println!(
        "\n   {:<6} | {:<66} | {:>10} | {:>24}",
        "value", "mode (medians over the rounds)", "per op", "its time / shm-state's"
    );
    let ours = modes
        .iter()
        .position(|m| m.kind() == Kind::Ours)
        .expect("ours");
    for (s, shape) in shapes.iter().enumerate() {
        for (m, mode) in modes.iter().enumerate() {
            let ratio = match mode.kind() {
                Kind::Ours => "1 (baseline)".to_owned(),
                Kind::Reference => "-".to_owned(),
                Kind::Theirs => ratio_range(
                    &got[s][m]
                        .iter()
                        .zip(&got[s][ours])
                        .map(|(t, o)| t / o)
                        .collect::<Vec<_>>(),
                ),
            };
            println!(
                "   {:<6} | {:<66} | {:>10} | {:>24}",
                shape,
                mode.name(),
                ns(median(got[s][m].clone())),
                ratio
            );
        }
    }
}

/// The order of `n` modes in `round`: forwards, then backwards.
fn order(n: usize, round: u64) -> Vec<usize> {
    let mut o: Vec<usize> = (0..n).collect();
    if round.is_multiple_of(2) {
        o.reverse();
    }
    o
}

/// The words of a value.
#[cfg(feature = "mmap-sync-bench")]
fn words<T: Shape>(v: &T) -> &[u64] {
    bytemuck::cast_slice(std::slice::from_ref(v))
}

/// The words of a value, mutable.
#[cfg(feature = "mmap-sync-bench")]
fn words_mut<T: Shape>(v: &mut T) -> &mut [u64] {
    bytemuck::cast_slice_mut(std::slice::from_mut(v))
}

/// Prints the phases of the last round, per shape, in the order of the
/// table.
fn round_line(round: u64, cells: impl Iterator<Item = String>) {
    println!(
        "   round {round}: {} (per shape, in the order of the table)",
        cells.collect::<Vec<_>>().join(", ")
    );
}

// ---------------------------------------------------- part 1: writes

fn write_modes() -> Vec<Op> {
    #[allow(unused_mut)]
    let mut modes = vec![Op::Publish];
    #[cfg(feature = "mmap-sync-bench")]
    modes.extend([Op::MsWrite, Op::MsWriteRaw, Op::RefStoreCrc]);
    modes
}

fn write_phase<T: Shape>(b: &mut Bench, op: Op, round: u64) -> f64 {
    let (warm, secs) = (b.cfg.warm(), b.cfg.secs);
    let mut v = T::make(0);
    let base = round << 40;
    match op {
        Op::Publish => {
            let h = T::handle(&b.root);
            let state = &mut b.state;
            per_op(warm, secs, |i| {
                v.set_seq(base + i);
                state.publish_value(h, black_box(&v)).expect("publish");
            })
        }
        #[cfg(feature = "mmap-sync-bench")]
        Op::MsWrite | Op::MsWriteRaw => {
            let prefix = b.prefix(&format!("w-{}", T::NAME));
            let mut s = MsSync::with_params(prefix.as_ref());
            if op == Op::MsWrite {
                per_op(warm, secs, |i| {
                    v.set_seq(base + i);
                    s.write(black_box(&v), ms::GRACE).expect("mmap-sync write");
                })
            } else {
                per_op(warm, secs, |i| {
                    v.set_seq(base + i);
                    s.write_raw::<T>(bytemuck::bytes_of(black_box(&v)), ms::GRACE)
                        .expect("mmap-sync write_raw");
                })
            }
        }
        #[cfg(feature = "mmap-sync-bench")]
        Op::RefStoreCrc => {
            let dst: Vec<AtomicU64> = words(&v).iter().map(|_| AtomicU64::new(0)).collect();
            per_op(warm, secs, |i| {
                v.set_seq(base + i);
                for (d, &w) in dst.iter().zip(words(black_box(&v))) {
                    d.store(w, Ordering::Relaxed);
                }
                // Else the stores into memory nothing reads are dropped.
                black_box(&dst);
                black_box(crc32fast::hash(bytemuck::bytes_of(&v)));
            })
        }
        _ => unreachable!(),
    }
}

fn writes(b: &mut Bench) {
    let modes = write_modes();
    println!(
        "\n1. write: one writer, no readers, one process; {} s per phase, {} round(s) \
         (load average {})",
        b.cfg.secs,
        b.cfg.rounds,
        load_average()
    );
    let shapes = [Quote::NAME, Page::NAME];
    let mut got = vec![vec![Vec::new(); modes.len()]; shapes.len()];
    for round in 1..=b.cfg.rounds {
        for m in order(modes.len(), round) {
            got[0][m].push(write_phase::<Quote>(b, modes[m], round));
            got[1][m].push(write_phase::<Page>(b, modes[m], round));
        }
        round_line(
            round,
            got.iter()
                .flat_map(|s| s.iter().map(|m| ns(*m.last().expect("a phase")))),
        );
    }
    table(&shapes, &modes, &got);
}

// ----------------------------------------------- part 2: local reads

fn local_read_modes() -> Vec<Op> {
    #[allow(unused_mut)]
    let mut modes = vec![Op::Read, Op::ReadInto];
    #[cfg(feature = "mmap-sync-bench")]
    modes.extend([
        Op::MsRead(false),
        Op::MsRead(true),
        Op::RefTouch,
        Op::RefCopyCrc,
        Op::RefAtomicCopyCrc,
    ]);
    modes
}

/// Part 2's readers of one shape: mmap-sync's, on a value its writer
/// wrote once.
struct LocalReaders {
    #[cfg(feature = "mmap-sync-bench")]
    ms: MsSync,
}

fn local_readers<T: Shape>(b: &mut Bench) -> LocalReaders {
    b.state
        .publish_value(T::handle(&b.root), &T::make(7))
        .expect("publish");
    #[cfg(feature = "mmap-sync-bench")]
    {
        let prefix = b.prefix(&format!("r-{}", T::NAME));
        let mut w = MsSync::with_params(prefix.as_ref());
        w.write(&T::make(7), ms::GRACE).expect("mmap-sync write");
        LocalReaders {
            ms: MsSync::with_params(prefix.as_ref()),
        }
    }
    #[cfg(not(feature = "mmap-sync-bench"))]
    LocalReaders {}
}

/// shm-state's reads, touched: `read_published_value` or (`into`)
/// `read_published_value_into` a reused `T`.
fn our_reads<T: Shape>(b: &mut Bench, into: bool, secs: f64) -> Reads {
    let warm = b.cfg.warm();
    let h = T::handle(&b.root);
    let state = &mut b.state;
    if into {
        let mut v = T::zeroed();
        reads(warm, secs, || {
            state.read_published_value_into(h, &mut v).ok().flatten()?;
            Some(v.touch())
        })
    } else {
        reads(warm, secs, || {
            state
                .read_published_value::<T>(h)
                .ok()
                .flatten()
                .map(|(_, v)| v.touch())
        })
    }
}

fn local_read_phase<T: Shape>(b: &mut Bench, r: &mut LocalReaders, op: Op) -> Reads {
    let (warm, secs) = (b.cfg.warm(), b.cfg.secs);
    let _ = (&r, warm);
    let got = match op {
        Op::Read | Op::ReadInto => our_reads::<T>(b, op == Op::ReadInto, secs),
        #[cfg(feature = "mmap-sync-bench")]
        Op::MsRead(check) => reads(warm, secs, || ms::read::<T>(&mut r.ms, check)),
        #[cfg(feature = "mmap-sync-bench")]
        Op::RefTouch => {
            let v = T::make(7);
            reads(warm, secs, || Some(black_box(&v).touch()))
        }
        #[cfg(feature = "mmap-sync-bench")]
        Op::RefCopyCrc => {
            let v = T::make(7);
            let mut copy = T::zeroed();
            reads(warm, secs, || {
                copy = *black_box(&v);
                black_box(crc32fast::hash(bytemuck::bytes_of(&copy)));
                Some(copy.touch())
            })
        }
        #[cfg(feature = "mmap-sync-bench")]
        Op::RefAtomicCopyCrc => {
            let src: Vec<AtomicU64> = words(&T::make(7))
                .iter()
                .map(|&w| AtomicU64::new(w))
                .collect();
            let mut copy = T::zeroed();
            reads(warm, secs, || {
                for (d, s) in words_mut(&mut copy).iter_mut().zip(black_box(&src)) {
                    *d = s.load(Ordering::Relaxed);
                }
                black_box(crc32fast::hash(bytemuck::bytes_of(&copy)));
                Some(copy.touch())
            })
        }
        _ => unreachable!(),
    };
    assert!(
        got.torn == 0 && got.failed == 0,
        "part 2, {}, {}: {} torn and {} failed reads of an unchanging value",
        T::NAME,
        op.name(),
        got.torn,
        got.failed
    );
    got
}

fn local_reads(b: &mut Bench) {
    let modes = local_read_modes();
    println!(
        "\n2. read the latest version and touch it (sum its fields, check the sum), in the \
         writer's process, nothing publishing; {} s per phase, {} round(s) (load average {})",
        b.cfg.secs,
        b.cfg.rounds,
        load_average()
    );
    let shapes = [Quote::NAME, Page::NAME];
    let mut rq = local_readers::<Quote>(b);
    let mut rp = local_readers::<Page>(b);
    let mut got = vec![vec![Vec::new(); modes.len()]; shapes.len()];
    for round in 1..=b.cfg.rounds {
        for m in order(modes.len(), round) {
            got[0][m].push(local_read_phase::<Quote>(b, &mut rq, modes[m]).ns);
            got[1][m].push(local_read_phase::<Page>(b, &mut rp, modes[m]).ns);
        }
        round_line(
            round,
            got.iter()
                .flat_map(|s| s.iter().map(|m| ns(*m.last().expect("a phase")))),
        );
    }
    table(&shapes, &modes, &got);
}

// ------------------------------------------- part 3: reads across processes

fn cross_modes() -> Vec<Op> {
    #[allow(unused_mut)]
    let mut modes = vec![Op::Read];
    #[cfg(feature = "mmap-sync-bench")]
    modes.extend([Op::MsRead(false), Op::MsRead(true)]);
    modes
}

/// One phase of part 3: the reads and the writer's report (publishes,
/// busy ns, worst ns).
struct Cross {
    r: Reads,
    secs: f64,
    writer: Vec<f64>,
}

fn cross_phase<T: Shape>(b: &mut Bench, op: Op, interval: u64) -> Cross {
    let secs = b.cfg.xsecs;
    let ours = op.kind() == Kind::Ours;
    #[cfg(feature = "mmap-sync-bench")]
    let prefix = if ours {
        "-".to_owned()
    } else {
        b.prefix(&format!("x-{}", T::NAME))
    };
    #[cfg(not(feature = "mmap-sync-bench"))]
    let prefix = "-".to_owned();
    let side = if ours { "ours" } else { "mmap" };
    let args = [
        side.to_owned(),
        T::NAME.to_owned(),
        interval.to_string(),
        prefix.clone(),
    ];
    let mut kid = Kid::spawn(&b.passed, &args);
    assert_eq!(kid.line(), "ready");
    let t0 = Instant::now();
    let r = match op {
        Op::Read => our_reads::<T>(b, false, secs),
        #[cfg(feature = "mmap-sync-bench")]
        Op::MsRead(check) => {
            let mut s = MsSync::with_params(prefix.as_ref());
            reads(b.cfg.warm(), secs, || ms::read::<T>(&mut s, check))
        }
        _ => unreachable!(),
    };
    let writer = kid.finish();
    Cross {
        r,
        secs: t0.elapsed().as_secs_f64(),
        writer,
    }
}

fn cross_reads(b: &mut Bench) {
    let modes = cross_modes();
    let shapes = [Quote::NAME, Page::NAME];
    for interval in b.cfg.intervals.clone() {
        let every = if interval == 0 {
            "back to back".to_owned()
        } else {
            format!("every {interval} µs")
        };
        println!(
            "\n3. read from another process while a writer (a child) publishes {every}: \
             the bench reads the latest version and touches it; {} s per phase, {} round(s) \
             (load average {})",
            b.cfg.xsecs,
            b.cfg.rounds,
            load_average()
        );
        let mut got: Vec<Vec<Vec<Cross>>> = shapes
            .iter()
            .map(|_| modes.iter().map(|_| Vec::new()).collect())
            .collect();
        for round in 1..=b.cfg.rounds {
            for m in order(modes.len(), round) {
                got[0][m].push(cross_phase::<Quote>(b, modes[m], interval));
                got[1][m].push(cross_phase::<Page>(b, modes[m], interval));
            }
            let line: Vec<String> = (0..shapes.len())
                .flat_map(|s| modes.iter().enumerate().map(move |(m, _)| (s, m)))
                .map(|(s, m)| {
                    let c = got[s][m].last().expect("a phase");
                    format!(
                        "{} ({} versions, {} torn, {} failed)",
                        ns(c.r.ns),
                        c.r.fresh,
                        c.r.torn,
                        c.r.failed
                    )
                })
                .collect();
            println!("   round {round}: {}", line.join(", "));
        }
        let times: Vec<Vec<Vec<f64>>> = got
            .iter()
            .map(|s| {
                s.iter()
                    .map(|m| m.iter().map(|c| c.r.ns).collect())
                    .collect()
            })
            .collect();
        table(&shapes, &modes, &times);
        println!(
            "\n   {:<6} | {:<58} | {:>14} | {:>8} | {:>8} | {:>16} | {:>13} | {:>12}",
            "value",
            "mode (sums and medians over the rounds)",
            "versions seen/s",
            "torn",
            "failed",
            "writer publishes/s",
            "per publish",
            "worst publish"
        );
        for (s, shape) in shapes.iter().enumerate() {
            for (m, mode) in modes.iter().enumerate() {
                let cs = &got[s][m];
                let med = |f: &dyn Fn(&Cross) -> f64| median(cs.iter().map(f).collect());
                println!(
                    "   {:<6} | {:<58} | {:>14} | {:>8} | {:>8} | {:>16} | {:>13} | {:>12}",
                    shape,
                    mode.name(),
                    rate(med(&|c| c.r.fresh as f64 / c.secs)),
                    cs.iter().map(|c| c.r.torn).sum::<u64>(),
                    cs.iter().map(|c| c.r.failed).sum::<u64>(),
                    rate(med(&|c| c.writer[0] / c.secs)),
                    ns(med(&|c| c.writer[1] / c.writer[0])),
                    ns(cs.iter().map(|c| c.writer[2]).fold(0.0, f64::max)),
                );
            }
        }
        println!("   (load average now {})", load_average());
    }
}

fn main() {
    if std::env::var_os(ROLE).is_some() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        return writer(&args);
    }
    // Before anything else is opened: the state's memfd goes on fd 3, with
    // the LISTEN_* description every child gets.
    let memfd = SharedFd::create("published-bench", CreateOptions::default()).expect("memfd");
    let handover = Handover::from_entries(
        vec![(shm_fd::DEFAULT_NAME.to_owned(), memfd.into_owned_fd())],
        shm_fd::DEFAULT_NAME,
    )
    .expect("hand-over");
    // SAFETY: first thing in main, when the bench has opened nothing of its
    // own: no object of this process owns fd 3.
    let passed = unsafe { handover.install() }.expect("placing the memfd on fd 3");

    let cfg = Config::from_env();
    println!(
        "published-value benchmarks{}: {}, load average {}",
        if cfg.quick { " (quick mode)" } else { "" },
        machine(),
        load_average()
    );
    #[cfg(feature = "mmap-sync-bench")]
    {
        ms::check_archive::<Quote>();
        ms::check_archive::<Page>();
        println!(
            "mmap-sync 2.0 (rkyv 0.7, wyhash), its files in {}; values: quote {} B, page {} B",
            cfg.dir,
            size_of::<Quote>(),
            size_of::<Page>()
        );
    }
    #[cfg(not(feature = "mmap-sync-bench"))]
    println!(
        "(shm-state only: the mmap-sync comparison needs `--features mmap-sync-bench`, \
         see scripts/bench-published)"
    );
    let own = SharedFd::adopt(
        passed.shared().try_clone_to_owned().expect("dup"),
        shm_fd::DEFAULT_NAME,
    )
    .and_then(|fd| fd.reopen())
    .expect("reopening the memfd");
    let (mut state, mut root) = open_shared(own);
    if root.quote.is_null() {
        root = state
            .transaction(|tx| {
                let root = Root {
                    quote: tx.new_published(size_of::<Quote>() as u32)?,
                    page: tx.new_published(size_of::<Page>() as u32)?,
                };
                tx.set_root(root)?;
                Ok::<_, shm_state::Error>(root)
            })
            .expect("creating the published values");
    }
    let mut b = Bench {
        cfg,
        passed,
        state,
        root,
        prefixes: Vec::new(),
    };
    if b.cfg.parts.contains(&1) {
        writes(&mut b);
    }
    if b.cfg.parts.contains(&2) {
        local_reads(&mut b);
    }
    if b.cfg.parts.contains(&3) {
        cross_reads(&mut b);
    }
    println!("\nload average at the end: {}", load_average());
}
