//! A save while the program runs must copy a state the program actually
//! had. A writer process keeps two words of a 16 MiB memfd in step (first
//! `A = n`, then `B = n`, so at every instant `A == B` or `A == B + 1`);
//! a copy taken while it runs is checked for that invariant.
//!
//! The writer is this test binary itself, started again with
//! `TEAR_WRITER_MEMFD` set (see `writer_child`). The same holds for copies
//! kept through shm-snapshot's protocol, with a writer that commits its
//! updates (`protocol_writer_child`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use shm_fd::{CreateOptions, SharedFd};
use shm_restore::{CaptureMethod, Captured, Image, StopGroup};

const LEN: usize = 16 << 20;
const ENV: &str = "TEAR_WRITER_MEMFD";

/// The writer's loop; a no-op in a normal test run.
#[test]
fn writer_child() {
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: the parent test only reads the memfd, and it never shrinks.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    assert_eq!(map.len(), LEN);
    let base = map.as_mut_ptr();
    for n in 1u64.. {
        // SAFETY: both offsets are 8-byte aligned and inside the mapping.
        unsafe { base.cast::<u64>().write_volatile(n) };
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { base.add(LEN - 8).cast::<u64>().write_volatile(n) };
        fence(Ordering::Release);
    }
}

/// Kills the writer's process group when dropped (also on a failed assert).
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn words(image: &Image) -> (u64, u64) {
    let dense = image.to_dense();
    let a = u64::from_ne_bytes(dense[..8].try_into().unwrap());
    let b = u64::from_ne_bytes(dense[LEN - 8..].try_into().unwrap());
    (a, b)
}

fn consistent((a, b): (u64, u64)) -> bool {
    a == b || a == b + 1
}

#[test]
fn a_copy_made_under_stop_group_is_never_torn() {
    let shared = SharedFd::create(
        "tear",
        CreateOptions {
            size: LEN as u64,
            seal_shrink: true,
        },
    )
    .unwrap();
    let memfd: File = shared.reopen().unwrap().into_file();
    // Make every page data, so a copy takes a while from first to last.
    std::os::unix::fs::FileExt::write_all_at(&memfd, &vec![1u8; LEN], 0).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
        .env(
            ENV,
            format!("/proc/{}/fd/{}", std::process::id(), shared.as_raw_fd()),
        )
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let _writer = Writer(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while words(&Image::read_from(&memfd).unwrap()).1 < 1000 {
        assert!(Instant::now() < deadline, "the writer did not start");
    }

    // The control: copies without the pause do tear (else this test could
    // not tell a working capture from a broken one).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut torn = false;
    while !torn && Instant::now() < deadline {
        torn = !consistent(words(&Image::read_from(&memfd).unwrap()));
    }
    assert!(torn, "unpaused copies never tore: the check has no teeth");

    let rounds: usize = std::env::var("SHM_RESTORE_TEAR_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut capture = StopGroup::new(pgid, Duration::from_secs(5));
    let mut pauses = Vec::new();
    let mut last = 0;
    for i in 0..rounds {
        let got = capture.capture(&memfd).unwrap();
        let Captured::Copied { image, pause, .. } = got else {
            panic!("the writer's group is alive: a copy is needed")
        };
        let w = words(&image);
        assert!(consistent(w), "round {i}: torn copy {w:?}");
        assert!(w.1 >= last, "round {i}: went back in time");
        last = w.1;
        pauses.push(pause.unwrap());
    }
    assert!(last > 1000, "the writer made progress between captures");
    pauses.sort();
    eprintln!(
        "pause for a 16 MiB copy: median {:?}, max {:?}",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
}

const PROTOCOL_ENV: &str = "TEAR_PROTOCOL_WRITER_MEMFD";
/// The protocol writer's data region: two words kept in step, first and
/// last.
const DLEN: usize = 1 << 20;

/// The protocol writer's loop: each update sets `A = n`, then `B = n`,
/// then commits; every 32 updates it rests 3 ms, long enough for an
/// optimistic copy of the 1 MiB region to succeed. A no-op in a normal
/// test run.
#[test]
fn protocol_writer_child() {
    let Some(path) = std::env::var_os(PROTOCOL_ENV) else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let map = memmap2::MmapOptions::new()
        .len(shm_snapshot::DATA_OFFSET + DLEN)
        .map_raw(&file)
        .unwrap();
    let region = shm_snapshot::Region::try_from_mmap(&map).unwrap();
    let (mut publisher, _) = shm_snapshot::Publisher::open(region).unwrap();
    for n in 1u64.. {
        let update = publisher.begin();
        update.data().store_u64(0, n);
        update.data().store_u64(DLEN - 8, n);
        update.commit();
        if n % 32 == 0 {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
}

#[test]
fn copies_kept_through_the_snapshot_protocol_are_committed_states() {
    use shm_restore::SnapshotProtocol;
    use shm_snapshot::CaptureOutcome as Got;
    let shared = SharedFd::create(
        "tear-protocol",
        CreateOptions {
            size: (shm_snapshot::DATA_OFFSET + DLEN) as u64,
            seal_shrink: true,
        },
    )
    .unwrap();
    let memfd: File = shared.reopen().unwrap().into_file();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "protocol_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            PROTOCOL_ENV,
            format!("/proc/{}/fd/{}", std::process::id(), shared.as_raw_fd()),
        )
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let _writer = Writer(child);
    let word = |image: &Image, at: usize| {
        let dense = image.to_dense();
        let at = shm_snapshot::DATA_OFFSET + at;
        u64::from_le_bytes(dense[at..at + 8].try_into().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while word(&Image::read_from(&memfd).unwrap(), DLEN - 8) < 100 {
        assert!(Instant::now() < deadline, "the writer did not start");
    }

    // The control: plain copies of this writer made while it runs do tear.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut torn = false;
    while !torn && Instant::now() < deadline {
        let image = Image::read_from(&memfd).unwrap();
        torn = word(&image, 0) != word(&image, DLEN - 8);
    }
    assert!(torn, "unpaused copies never tore: the check has no teeth");

    // 100 captures with the default tries, then 20 that always stop.
    let mut capture = SnapshotProtocol::new(pgid, Duration::from_secs(5));
    let mut always_stop = SnapshotProtocol::new(pgid, Duration::from_secs(5))
        .with_snapshotter(shm_snapshot::Snapshotter::new().max_tries(0));
    let (mut consistent, mut stopped, mut last) = (0, 0, 0);
    for i in 0..120 {
        std::thread::sleep(Duration::from_millis(2));
        let got = if i < 100 {
            capture.capture(&memfd).unwrap()
        } else {
            always_stop.capture(&memfd).unwrap()
        };
        let (image, how) = match got {
            Captured::Copied {
                image,
                protocol: Some(how),
                ..
            } => (image, how),
            Captured::Unchanged { .. } => continue,
            other => panic!("round {i}: {other:?}"),
        };
        let (a, b) = (word(&image, 0), word(&image, DLEN - 8));
        match how {
            Got::Consistent { .. } => {
                assert_eq!(a, b, "round {i}: a kept copy is torn");
                consistent += 1;
            }
            Got::Stopped { in_update, .. } => {
                // Stopped inside an update: A may be one ahead, as a
                // crash there would leave it.
                assert!(a == b || (in_update && a == b + 1), "round {i}: {a} {b}");
                stopped += 1;
            }
            other => panic!("round {i}: the writer uses the protocol: {other:?}"),
        }
        assert!(b >= last, "round {i}: went back in time");
        last = b;
    }
    eprintln!("kept while running: {consistent}, stopped: {stopped}");
    assert!(consistent > 0, "no copy was kept without a stop");
    // (An always-stop capture may still find nothing committed: Unchanged.)
    assert!(stopped >= 10, "the fallback stop was not exercised");
}
