//! A save while the program runs must copy a state the program actually
//! had. A writer process keeps two words of a 16 MiB memfd in step (first
//! `A = n`, then `B = n`, so at every instant `A == B` or `A == B + 1`);
//! a copy taken while it runs is checked for that invariant.
//!
//! The writer is this test binary itself, started again with
//! `TEAR_WRITER_MEMFD` set (see `writer_child`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use shm_fd::{CreateOptions, SharedFd};
use shm_restore::{Capture, Captured, Image, StopGroup};

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
        let Captured::Copied { image, pause } = got else {
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
