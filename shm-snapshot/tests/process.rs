//! The protocol across processes, as `shm-restore` uses it: a child
//! process mutates a memfd constantly (transfers between accounts whose
//! total never changes) while the parent snapshots it in a loop with
//! [`SparseCopy`] and a real `SIGSTOP` fallback. Every kept snapshot must
//! add up, and the snapshotter must not allocate the memfd's holes.
#![cfg(not(loom))]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use shm_fd::{CreateOptions, SharedFd};
use shm_snapshot::{CaptureOutcome, DATA_OFFSET, Publisher, Region, Snapshotter, SparseCopy};

const CHILD_ENV: &str = "SHM_SNAPSHOT_TEST_WRITER";
const ACCOUNTS: usize = 256;
/// One account every 4 pages: the pages between stay holes.
const STRIDE: usize = 4 * 4096;
const DATA_LEN: usize = ACCOUNTS * STRIDE;
const TOTAL: u64 = ACCOUNTS as u64 * 1000;

fn account(i: usize) -> usize {
    i * STRIDE
}

/// Not a test on its own: the writer the parent test starts (this test
/// binary, re-run with `CHILD_ENV` set). Without the variable it returns.
#[test]
fn writer_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let map = memmap2::MmapOptions::new().map_raw(&file).unwrap();
    let (mut p, opened) = Publisher::open(Region::from_mmap(&map)).unwrap();
    assert!(opened.created);
    {
        let u = p.begin();
        for i in 0..ACCOUNTS {
            u.data().store_u64(account(i), 1000);
        }
        u.commit();
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut n = 0u64;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (a, b) = ((x as usize) % ACCOUNTS, ((x >> 32) as usize) % ACCOUNTS);
        let u = p.begin();
        let d = u.data();
        let amount = d.load_u64(account(a)).min(x % 100);
        d.store_u64(account(a), d.load_u64(account(a)) - amount);
        d.store_u64(account(b), d.load_u64(account(b)) + amount);
        u.commit();
        n += 1;
        // Bursts and breaks: copies fail inside bursts, succeed in breaks.
        if n.is_multiple_of(200) {
            std::thread::sleep(Duration::from_millis(15));
        }
    }
}

/// The total of the accounts in a sparse copy (an account in a hole
/// counts 0, which breaks the total: accounts are never holes).
fn total(copy: &SparseCopy<'_>) -> u64 {
    let mut sum = 0;
    for i in 0..ACCOUNTS {
        let at = DATA_OFFSET + account(i);
        let mut base = 0;
        for r in &copy.extents {
            if r.contains(&at) {
                let o = base + at - r.start;
                sum += u64::from_le_bytes(copy.bytes[o..o + 8].try_into().unwrap());
                break;
            }
            base += r.end - r.start;
        }
    }
    sum
}

fn allocated(fd: &SharedFd) -> u64 {
    nix::sys::stat::fstat(fd).unwrap().st_blocks as u64 * 512
}

struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn snapshots_of_a_running_writer_process_always_add_up() {
    let fd = SharedFd::create("snapshot-test", CreateOptions::default()).unwrap();
    let map = fd.map_raw((DATA_OFFSET + DATA_LEN) as u64).unwrap();
    let writer = Writer(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(
                CHILD_ENV,
                format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()),
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = Pid::from_raw(writer.0.id() as i32);
    let src = Region::from_mmap(&map);
    let deadline = Instant::now() + Duration::from_secs(30);
    while shm_snapshot::committed_generation(src).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the writer did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Our own open file description, for SEEK_DATA / SEEK_HOLE.
    let own = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    let mut copy = SparseCopy::new(&own);
    let mut s = Snapshotter::new().max_tries(3);
    let data_before = allocated(&fd);
    let rounds: usize = std::env::var("SHM_SNAPSHOT_PROCESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(80);
    let (mut consistent, mut stopped, mut mid_update, mut unchanged) = (0, 0, 0, 0);
    let mut last_generation = 0;
    // A loaded machine (other builds on the 2 cores) can stretch copies
    // past the writer's breaks for a while: past `rounds`, go on (at most
    // 20 s) until one optimistic copy was kept.
    let mut overtime = None;
    let mut next_round = 0;
    loop {
        let round = next_round;
        next_round += 1;
        if round >= rounds {
            let end = *overtime.get_or_insert_with(|| Instant::now() + Duration::from_secs(20));
            if consistent > 0 || Instant::now() > end {
                break;
            }
        }
        // Land on every phase of the writer's bursts and breaks.
        std::thread::sleep(Duration::from_millis(3 + (round as u64 * 7) % 11));
        let c = s
            .capture(src, &mut copy, |run| {
                kill(pid, Signal::SIGSTOP)?;
                waitpid(pid, Some(WaitPidFlag::WUNTRACED))?;
                let r = run();
                kill(pid, Signal::SIGCONT)?;
                r
            })
            .unwrap();
        let generation = match c {
            CaptureOutcome::Consistent { generation, .. } => {
                consistent += 1;
                generation
            }
            CaptureOutcome::Stopped {
                generation,
                in_update: false,
                ..
            } => {
                stopped += 1;
                generation
            }
            CaptureOutcome::Stopped {
                in_update: true, ..
            } => {
                // A crash-like copy: the protocol says so; not checked.
                mid_update += 1;
                continue;
            }
            CaptureOutcome::Unchanged { .. } => {
                unchanged += 1;
                continue;
            }
            other => panic!("round {round}: unexpected {other:?}"),
        };
        assert_eq!(
            total(&copy),
            TOTAL,
            "round {round}: kept snapshot of generation {generation} ({c:?}) is torn"
        );
        assert!(generation >= last_generation);
        last_generation = generation;
        assert_eq!(copy.len, src.len());
        // Only data was copied: the header page, and the account pages.
        let copied: usize = copy.extents.iter().map(|r| r.end - r.start).sum();
        assert!(copied <= 4096 + ACCOUNTS * 4096, "{copied} bytes copied");
    }
    eprintln!(
        "{} rounds: {consistent} consistent, {stopped} stopped between updates, \
         {mid_update} stopped inside an update, {unchanged} unchanged",
        next_round - 1
    );
    assert!(consistent > 0, "no optimistic snapshot was ever kept");
    assert_eq!(
        allocated(&fd),
        data_before,
        "the snapshotter allocated holes of the memfd"
    );
}
