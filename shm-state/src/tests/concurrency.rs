//! Opens racing for the lock, in threads and in processes (ported from
//! the correctness review's reproducers, `repro -- <name>`).

use super::*;

#[test]
fn a_second_open_of_a_live_state_is_locked() {
    let file = tempfile::tempfile().unwrap();
    let other = file.try_clone().unwrap();
    // SAFETY: the temp file is ours alone and never truncated.
    let s = State::<Root>::open(unsafe { Source::file(file) }, layout()).unwrap();
    // SAFETY: as above.
    let e = State::<Root>::open(
        unsafe { Source::file(other.try_clone().unwrap()) },
        layout(),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Locked { pid } if pid == std::process::id()),
        "{e}"
    );
    drop(s);
    // SAFETY: as above.
    let s = State::<Root>::open(unsafe { Source::file(other) }, layout()).unwrap();
    assert_eq!(s.report().generation, 2);
}

#[test]
fn a_copy_of_a_held_region_is_not_held() {
    let s = fresh();
    let image = s.image();
    // The copy's lock names this process and a live handle, but of other
    // memory: the copy is free, and its lock is taken over.
    let copy = open(image.clone()).unwrap();
    assert_eq!(copy.report().took_over_from, Some(std::process::id()));
    drop(copy);
    // Once the handle is gone too, the same.
    drop(s);
    let s2 = open(image).unwrap();
    assert_eq!(s2.report().took_over_from, Some(std::process::id()));
}

/// `repro -- race`: threads racing to open one state (an existing one, and
/// an empty file that each wants to create) are let in one at a time.
#[test]
fn concurrent_opens_in_threads_admit_exactly_one() {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::{Arc, Barrier};
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing");
    drop(open_path(&existing).unwrap());
    let rounds = env_count("SHM_STATE_LOCK_ROUNDS", 200);
    for round in 0..rounds {
        let path = if round % 4 == 0 {
            dir.path().join(format!("new-{round}"))
        } else {
            existing.clone()
        };
        let barrier = Arc::new(Barrier::new(3));
        let admitted = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (barrier, admitted, path) = (barrier.clone(), admitted.clone(), path.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let r = open_path(&path);
                    // Judged after the second wait: a thread that panicked
                    // before it would leave the others waiting forever.
                    let verdict = match &r {
                        Ok(_) => {
                            admitted.fetch_add(1, SeqCst);
                            Ok(())
                        }
                        Err(Error::Locked { pid }) if *pid == std::process::id() => Ok(()),
                        Err(e) => Err(format!("round {round}: {e}")),
                    };
                    barrier.wait(); // hold it until every thread has tried
                    drop(r);
                    verdict
                })
            })
            .collect();
        let verdicts: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for v in &verdicts {
            assert!(v.is_ok(), "{verdicts:?}");
        }
        assert_eq!(admitted.load(SeqCst), 1, "round {round}");
        let s = open_path(&path).unwrap();
        s.verify().unwrap();
    }
}

/// The child side of `concurrent_opens_in_processes_admit_one_at_a_time`
/// (does nothing unless that test runs this binary with `LOCK_CHILD` set):
/// at the given instant, opens the state, holds it 20 ms, and prints when
/// it held it.
#[test]
fn lock_race_child() {
    let Ok(arg) = std::env::var(LOCK_CHILD) else {
        return;
    };
    let (path, at) = arg.split_once('|').unwrap();
    let at: u128 = at.parse().unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    };
    while now() < at {
        std::hint::spin_loop();
    }
    match open_path(std::path::Path::new(path)) {
        Ok(s) => {
            let from = now();
            std::thread::sleep(std::time::Duration::from_millis(20));
            println!("held {from} {}", now());
            drop(s);
            std::process::exit(0);
        }
        Err(Error::Locked { .. }) => std::process::exit(10),
        Err(e) => {
            println!("error {e}");
            std::process::exit(11);
        }
    }
}

/// `repro -- prace`: processes racing to open one state never hold it at
/// the same time.
#[test]
fn concurrent_opens_in_processes_admit_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    drop(open_path(&path).unwrap());
    let exe = std::env::current_exe().unwrap();
    let rounds = env_count("SHM_STATE_LOCK_PROC_ROUNDS", 20);
    let mut admitted_total = 0;
    for round in 0..rounds {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            + 60_000_000;
        let kids: Vec<_> = (0..3)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "tests::concurrency::lock_race_child",
                        "--nocapture",
                        "-q",
                    ])
                    .env(LOCK_CHILD, format!("{}|{at}", path.display()))
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut held: Vec<(u128, u128)> = Vec::new();
        for kid in kids {
            let out = kid.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            match out.status.code() {
                Some(0) => {
                    let line = text.lines().find(|l| l.starts_with("held ")).unwrap();
                    let mut f = line[5..].split(' ').map(|v| v.parse::<u128>().unwrap());
                    held.push((f.next().unwrap(), f.next().unwrap()));
                }
                Some(10) => {}
                other => panic!("round {round}: child exited {other:?}: {text}"),
            }
        }
        admitted_total += held.len();
        held.sort();
        for w in held.windows(2) {
            assert!(
                w[0].1 < w[1].0,
                "round {round}: two processes held the state at once: {held:?}"
            );
        }
    }
    assert!(admitted_total >= rounds as usize);
    open_path(&path).unwrap().verify().unwrap();
}

/// A refused (locked) open does not touch the live holder's snapshot
/// protocol page (it used to clear its `waiters` word).
#[test]
fn a_locked_open_leaves_the_holders_protocol_page_alone() {
    let fd =
        shm_fd::SharedFd::create("shm-state-waiters", shm_fd::CreateOptions::default()).unwrap();
    let other = fd.try_clone().unwrap();
    let l = || layout().with_snapshot_protocol();
    // SAFETY: a private memfd, sealed against shrinking.
    let s = State::<Root>::open(unsafe { Source::shared(fd) }, l()).unwrap();
    let map = other.map_raw(1).unwrap();
    // SAFETY: 8-aligned word inside the mapping, accessed atomically.
    let waiters = unsafe {
        std::sync::atomic::AtomicU64::from_ptr(
            map.as_mut_ptr().add(shm_snapshot::OFF_WAITERS).cast(),
        )
    };
    waiters.store(1, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: as above.
    let e = State::<Root>::open(unsafe { Source::shared(other.try_clone().unwrap()) }, l())
        .unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert_eq!(waiters.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(s);
}
