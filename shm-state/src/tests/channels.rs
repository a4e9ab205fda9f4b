//! Rings between processes through the library's waiting calls
//! (`SharedState::{try_pop, pop_wait, try_push, push_wait}`) and POD
//! published values: real processes (this binary, see `shared.rs`), each
//! killed by pid and reaped.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::shared::{child, expect_line, init, kill9, open_shared};
use super::*;
use crate::{RingEnd, StatePublished, StateRing};

/// The ring's data bytes: small, so that both sides wait often.
const CAP: u64 = 256;
const MAX_FRAME: u32 = 64;
/// Frames the producer role pushes.
const FRAMES: u64 = 3000;

/// Frame `n`: `n` (8 bytes) and `n % 50` bytes derived from it.
fn frame(n: u64) -> Vec<u8> {
    let mut f = n.to_le_bytes().to_vec();
    f.extend((0..n % 50).map(|i| (n as u8).wrapping_mul(7).wrapping_add(i as u8)));
    f
}

fn ring_of(s: &mut SharedState<Root>) -> StateRing {
    StateRing::from_off(s.read(|v| v.root()).unwrap().n)
}

/// A shared state with a ring whose handle is in `root.n`.
fn with_ring(path: &std::path::Path) -> (SharedState<Root>, StateRing) {
    let mut s = open_shared(path).unwrap();
    init(&mut s);
    let ring = s
        .transaction(|tx| {
            let r = tx.new_ring(CAP, MAX_FRAME)?;
            tx.root_mut()?.n = r.offset();
            Ok::<_, Error>(r)
        })
        .unwrap();
    (s, ring)
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);

    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The ring roles of `shared::shared_child`.
pub(super) fn role(role: &str, s: &mut SharedState<Root>) {
    let ring = ring_of(s);
    match role {
        // Pushes frames 1..=FRAMES, each with `cell = n` in its
        // transaction, waiting while the ring is full; then ends.
        "ring-producer" => {
            s.attach(ring, RingEnd::Producer).unwrap();
            println!("attached");
            let r = s.read(|v| v.root()).unwrap();
            for n in 1..=FRAMES {
                s.push_wait(ring, &frame(n), Duration::from_secs(30), |tx| {
                    tx.set_cell(r.cell, n)
                })
                .unwrap();
            }
            println!("pushed");
        }
        // Pushes 100 frames, one every 2 ms (the consumer sleeps between
        // them), then ends.
        "ring-slow-producer" => {
            s.attach(ring, RingEnd::Producer).unwrap();
            println!("attached");
            for n in 1..=100 {
                std::thread::sleep(Duration::from_millis(2));
                s.push_wait(ring, &frame(n), Duration::from_secs(30), |_| {
                    Ok::<_, Error>(())
                })
                .unwrap();
            }
        }
        // Commits a transaction that touches no ring every millisecond
        // until killed.
        "ticker" => {
            let r = s.read(|v| v.root()).unwrap();
            println!("ticking");
            for n in 1.. {
                s.transaction(|tx| tx.set_cell(r.cell, n)).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Attaches at one end and holds it, doing nothing.
        "ring-idle-producer" | "ring-idle-consumer" => {
            let end = if role == "ring-idle-producer" {
                RingEnd::Producer
            } else {
                RingEnd::Consumer
            };
            s.attach(ring, end).unwrap();
            println!("attached");
            std::thread::sleep(Duration::from_secs(60));
        }
        // Attaches as the consumer and pops until the ring stays empty
        // for 2 s, then prints how many frames it took.
        "ring-drain" => {
            s.attach(ring, RingEnd::Consumer).unwrap();
            println!("attached");
            let mut got = 0;
            loop {
                match s.pop_wait(ring, Duration::from_secs(2), |_, f| Ok::<_, Error>(f)) {
                    Ok(_) => got += 1,
                    Err(Error::TimedOut { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            println!("drained {got}");
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn a_consumer_waiting_on_a_small_ring_gets_every_frame_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let (mut s, ring) = with_ring(&path);
    s.attach(ring, RingEnd::Consumer).unwrap();
    let mut kid = child("ring-producer", &path);
    expect_line(&mut kid, "attached");
    let r = s.read(|v| v.root()).unwrap();
    for n in 1..=FRAMES {
        // The consumer's effect: the count of frames taken, in `vec[0]`.
        let f = s
            .pop_wait(ring, Duration::from_secs(30), |tx, f| {
                tx.vec(r.vec)?.set(0, n as u32)?;
                Ok::<_, Error>(f)
            })
            .unwrap();
        assert_eq!(f, frame(n), "frame {n}");
    }
    expect_line(&mut kid, "pushed");
    assert_eq!(kid.wait().unwrap().code(), Some(0));
    let (pushed, taken) = s
        .read(|v| Ok::<_, Error>((v.cell(r.cell)?, v.vec_get(r.vec, 0)?)))
        .unwrap();
    assert_eq!((pushed, taken), (FRAMES, Some(FRAMES as u32)));
    // The producer ended and the ring is empty: no wait, "peer gone".
    let e = s
        .pop_wait(ring, Duration::from_secs(30), |_, f| Ok::<_, Error>(f))
        .unwrap_err();
    assert!(
        matches!(e, Error::PeerGone { end: RingEnd::Producer, pid } if pid == kid.id()),
        "{e}"
    );
    assert!(e.to_string().contains("producer"), "{e}");
}

#[test]
fn an_empty_ring_blocks_the_consumer_without_cpu_until_the_producer_dies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let (mut s, ring) = with_ring(&path);
    // No producer ever attached: a wait times out, naming that.
    let e = s
        .pop_wait(ring, Duration::from_millis(100), |_, f| Ok::<_, Error>(f))
        .unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    assert!(e.to_string().contains("no producer ever attached"), "{e}");
    // try_pop of an empty ring commits nothing.
    let word = s.commit_word();
    assert_eq!(s.try_pop(ring, |_, f| Ok::<_, Error>(f)).unwrap(), None);
    assert_eq!(s.commit_word(), word, "an empty try_pop committed");

    let mut kid = child("ring-idle-producer", &path);
    expect_line(&mut kid, "attached");
    // A live, idle producer: a 1 s wait sleeps (this thread's CPU time
    // stays near zero) and times out naming it.
    let cpu = thread_cpu();
    let e = s
        .pop_wait(ring, Duration::from_secs(1), |_, f| Ok::<_, Error>(f))
        .unwrap_err();
    let used = thread_cpu() - cpu;
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("process {}, alive", kid.id())),
        "{e}"
    );
    assert!(
        used < Duration::from_millis(50),
        "{used:?} of CPU in a 1 s wait"
    );
    // Killed while the consumer waits (30 s): the wait ends with
    // "peer gone", not the timeout.
    let pid = kid.id();
    let (tx, rx) = mpsc::channel();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        kill9(&mut kid);
        tx.send(Instant::now()).unwrap();
    });
    let e = s
        .pop_wait(ring, Duration::from_secs(30), |_, f| Ok::<_, Error>(f))
        .unwrap_err();
    let seen = Instant::now();
    killer.join().unwrap();
    assert!(
        matches!(e, Error::PeerGone { end: RingEnd::Producer, pid: p } if p == pid),
        "{e}"
    );
    eprintln!(
        "the producer's death was seen {:?} after the kill",
        seen.saturating_duration_since(rx.recv().unwrap())
    );
}

#[test]
fn a_full_ring_blocks_the_producer_until_the_consumer_dies_then_a_new_one_drains_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let (mut s, ring) = with_ring(&path);
    s.attach(ring, RingEnd::Producer).unwrap();
    let mut idle = child("ring-idle-consumer", &path);
    expect_line(&mut idle, "attached");
    let r = s.read(|v| v.root()).unwrap();
    // Fill the ring: try_push says when it is full, committing nothing.
    let mut pushed = 0;
    while let Some(()) = s
        .try_push(ring, &frame(pushed + 1), |tx| {
            tx.set_cell(r.cell, pushed + 1)
        })
        .unwrap()
    {
        pushed += 1;
    }
    assert!(pushed > 3, "{pushed} frames filled a {CAP}-byte ring");
    let word = s.commit_word();
    assert_eq!(
        s.try_push(ring, &frame(pushed + 1), |tx| tx.set_cell(r.cell, 0))
            .unwrap(),
        None
    );
    assert_eq!(s.commit_word(), word, "a full try_push committed");
    // A frame longer than the ring's largest is an error, waiting or not.
    for e in [
        s.try_push(ring, &[0; 65], |_| Ok::<_, Error>(()))
            .unwrap_err(),
        s.push_wait(ring, &[0; 65], Duration::from_secs(30), |_| {
            Ok::<_, Error>(())
        })
        .unwrap_err(),
    ] {
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }
    // A live idle consumer: the producer's wait sleeps, then times out.
    let cpu = thread_cpu();
    let e = s
        .push_wait(ring, &frame(pushed + 1), Duration::from_secs(1), |_| {
            Ok::<_, Error>(())
        })
        .unwrap_err();
    let used = thread_cpu() - cpu;
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    assert!(e.to_string().contains("room for a frame"), "{e}");
    assert!(
        used < Duration::from_millis(50),
        "{used:?} of CPU in a 1 s wait"
    );
    // The consumer dies while the producer waits: "peer gone".
    let pid = idle.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        kill9(&mut idle);
    });
    let e = s
        .push_wait(ring, &frame(pushed + 1), Duration::from_secs(30), |_| {
            Ok::<_, Error>(())
        })
        .unwrap_err();
    killer.join().unwrap();
    assert!(
        matches!(e, Error::PeerGone { end: RingEnd::Consumer, pid: p } if p == pid),
        "{e}"
    );
    // A new consumer attaches and carries on: the producer's wait ends.
    let mut drain = child("ring-drain", &path);
    expect_line(&mut drain, "attached");
    for n in pushed + 1..=pushed + 20 {
        s.push_wait(ring, &frame(n), Duration::from_secs(30), |tx| {
            tx.set_cell(r.cell, n)
        })
        .unwrap();
    }
    expect_line(&mut drain, &format!("drained {}", pushed + 20));
    assert_eq!(drain.wait().unwrap().code(), Some(0));
}

#[test]
fn an_effect_that_fails_leaves_the_frame_in_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let (mut s, ring) = with_ring(&path);
    let r = s.read(|v| v.root()).unwrap();
    s.push_wait(ring, b"one", Duration::from_secs(1), |tx| {
        tx.set_cell(r.cell, 1)
    })
    .unwrap();
    // The effect fails after changing the state: both roll back.
    let e = s
        .pop_wait(ring, Duration::from_secs(1), |tx, _| {
            tx.set_cell(r.cell, 99)?;
            Err::<(), _>(Error::unsupported("the effect failed"))
        })
        .unwrap_err();
    assert!(e.to_string().contains("the effect failed"), "{e}");
    assert_eq!(s.read(|v| v.cell(r.cell)).unwrap(), 1);
    assert_eq!(
        s.try_pop(ring, |_, f| Ok::<_, Error>(f)).unwrap(),
        Some(b"one".to_vec())
    );
    // A push whose effect fails leaves no frame.
    let e = s
        .try_push(ring, b"two", |_| Err::<(), _>(Error::unsupported("no")))
        .unwrap_err();
    assert!(e.to_string().contains("no"), "{e}");
    assert_eq!(s.read(|v| v.ring(ring)).unwrap().len(), 0);
}

#[test]
fn a_pod_value_is_published_and_read_back_whole() {
    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C)]
    struct Quote {
        bid: u64,
        ask: u64,
        seq: u32,
        pad: u32,
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    let h: StatePublished = s
        .transaction(|tx| tx.new_published(std::mem::size_of::<Quote>() as u32))
        .unwrap();
    assert_eq!(s.read_published_value::<Quote>(h).unwrap(), None);
    for i in 1..=100u64 {
        let q = Quote {
            bid: i,
            ask: i + 1,
            seq: i as u32,
            pad: 0,
        };
        assert_eq!(s.publish_value(h, &q).unwrap(), i);
        assert_eq!(s.read_published_value::<Quote>(h).unwrap(), Some((i, q)));
    }
    // Read as a type of another size: an error naming both sizes.
    let e = s.read_published_value::<u64>(h).unwrap_err();
    assert!(matches!(e, Error::UnsupportedType { .. }), "{e}");
    assert!(e.to_string().contains("holds 24 bytes, not the 8"), "{e}");
    let mut buf = Vec::with_capacity(64);
    assert_eq!(s.read_published_into(h, &mut buf).unwrap(), Some(100));
    assert_eq!(buf.len(), 24);
}

#[test]
fn a_push_wakes_the_sleeping_consumer_and_other_commits_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let (mut s, ring) = with_ring(&path);
    s.attach(ring, RingEnd::Consumer).unwrap();
    let mut kid = child("ring-slow-producer", &path);
    expect_line(&mut kid, "attached");
    let before = s.stats();
    for n in 1..=100 {
        let f = s
            .pop_wait(ring, Duration::from_secs(30), |_, f| Ok::<_, Error>(f))
            .unwrap();
        assert_eq!(f, frame(n));
    }
    assert_eq!(kid.wait().unwrap().code(), Some(0));
    let after = s.stats();
    let (sleeps, naps) = (
        after.ring_sleeps - before.ring_sleeps,
        after.ring_naps - before.ring_naps,
    );
    eprintln!("100 frames 2 ms apart: {sleeps} sleeps on the tail, {naps} ran out their nap");
    // Each frame comes 2 ms after the last, far past the 20 µs spin: the
    // consumer sleeps for most of them, and the push wakes it (a sleep
    // that runs out its nap, up to 50 ms, is a wake-up the push did not
    // make).
    assert!(sleeps >= 50, "{sleeps} sleeps for 100 frames 2 ms apart");
    assert!(
        naps * 4 <= sleeps,
        "{naps} of {sleeps} sleeps were not woken by a push"
    );

    // Commits that do not move the tail (a vector's, a cell's, a map's)
    // wake no one asleep on it: beside a live, idle producer, a consumer of
    // the empty ring sleeps through the commits of a writer in another
    // process (one a millisecond), each of its sleeps running out its nap.
    let mut idle = child("ring-idle-producer", &path);
    expect_line(&mut idle, "attached");
    let mut writer = child("ticker", &path);
    expect_line(&mut writer, "ticking");
    let (before, word) = (s.stats(), s.commit_word());
    let e = s
        .pop_wait(ring, Duration::from_millis(300), |_, f| Ok::<_, Error>(f))
        .unwrap_err();
    let commits = (s.commit_word() & ((1 << 56) - 1)) / 2 - (word & ((1 << 56) - 1)) / 2;
    kill9(&mut writer);
    kill9(&mut idle);
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    let after = s.stats();
    let sleeps = after.ring_sleeps - before.ring_sleeps;
    let naps = after.ring_naps - before.ring_naps;
    eprintln!(
        "300 ms beside a writer ({commits} commits): {sleeps} sleeps, {naps} ran out their nap"
    );
    assert!(
        commits >= 20,
        "the writer committed only {commits} times in 300 ms"
    );
    assert!(sleeps >= 3, "{sleeps} sleeps in 300 ms");
    assert!(
        sleeps <= naps + 2,
        "{sleeps} sleeps, only {naps} ran out their nap: other commits woke the waiter"
    );
}

#[test]
fn a_published_read_that_keeps_losing_the_race_reads_under_the_writer_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    let h: StatePublished = s.transaction(|tx| tx.new_published(64)).unwrap();
    s.publish(h, b"one").unwrap();
    // No lock-free try at all: every read is the locked one.
    s.set_published_tries(0);
    assert_eq!(s.read_published(h).unwrap(), Some((1, b"one".to_vec())));
    s.publish(h, b"two").unwrap();
    assert_eq!(s.read_published(h).unwrap(), Some((2, b"two".to_vec())));
}

#[test]
fn a_freed_ring_and_a_freed_published_value_give_their_blocks_back_and_errors_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let (mut s, ring) = with_ring(&path);
    let p: StatePublished = s.transaction(|tx| tx.new_published(64)).unwrap();
    s.push_wait(ring, b"left in the ring", Duration::from_secs(1), |_| {
        Ok::<_, Error>(())
    })
    .unwrap();
    s.publish(p, b"one").unwrap();
    // The read caches the published value's geometry.
    assert_eq!(s.read_published(p).unwrap(), Some((1, b"one".to_vec())));
    let live = |s: &mut SharedState<Root>| s.with_lock(|st| st.verify()).unwrap().live_blocks;
    let before = live(&mut s);

    // A free in a transaction that fails is rolled back with it.
    let e = s
        .transaction(|tx| {
            tx.ring(ring)?.free()?;
            tx.free_published(p)?;
            Err::<(), _>(Error::unsupported("rolled back"))
        })
        .unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    assert_eq!(live(&mut s), before);
    assert_eq!(s.read(|v| v.ring(ring)).unwrap().len(), 1);
    assert_eq!(s.read_published(p).unwrap(), Some((1, b"one".to_vec())));

    s.transaction(|tx| {
        tx.ring(ring)?.free()?;
        tx.free_published(p)
    })
    .unwrap();
    assert_eq!(live(&mut s), before - 2, "two blocks given back");
    // Stale handles: errors, not frames or versions (the cached geometry
    // is checked against the block header on every read).
    let e = s.read(|v| v.ring(ring)).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    let e = s.try_pop(ring, |_, f| Ok::<_, Error>(f)).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    let e = s.read_published(p).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    // Freed twice: refused.
    let e = s.transaction(|tx| tx.free_published(p)).unwrap_err();
    assert!(e.is_corruption(), "{e}");
}
