//! Model check of the seqlock core with loom: every interleaving (up to a
//! preemption bound) of a writer making updates and a snapshotter copying.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p shm-snapshot --release --test loom`
//! (raise `LOOM_MAX_PREEMPTIONS`, default 2 here, for a deeper search).
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use shm_snapshot::{CopyOutcome, DATA_OFFSET, HeapBuffer, Publisher, try_copy_consistent};

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b
}

fn word(copy: &[u8], i: usize) -> u64 {
    let at = DATA_OFFSET + 8 * i;
    u64::from_le_bytes(copy[at..at + 8].try_into().unwrap())
}

/// Two data words that every commit sets to the same value (the
/// generation): a kept copy must hold two equal words, equal to the
/// generation it claims.
#[test]
fn kept_copy_equals_the_commit_it_names() {
    builder().check(|| {
        let buf = Arc::new(HeapBuffer::new(DATA_OFFSET + 16));
        Publisher::open(buf.region()).unwrap();
        let w = {
            let buf = buf.clone();
            thread::spawn(move || {
                let (mut p, _) = Publisher::open(buf.region()).unwrap();
                for g in 1..=2u64 {
                    let u = p.begin();
                    u.data().store_u64(0, g);
                    u.data().store_u64(8, g);
                    assert_eq!(u.commit(), g);
                }
            })
        };
        // The snapshotter runs on a thread of its own too: loom explores
        // more orders between two spawned threads than with the model's
        // main thread.
        let r = thread::spawn(move || {
            let mut dst = vec![0u8; buf.region().len()];
            match try_copy_consistent(buf.region(), &mut dst).unwrap() {
                CopyOutcome::Consistent { generation } => {
                    assert_eq!(word(&dst, 0), generation, "first word torn");
                    assert_eq!(word(&dst, 1), generation, "second word torn");
                }
                CopyOutcome::Updating { .. } | CopyOutcome::Changed { .. } => {}
                other => panic!("header was set up before the writer ran: {other:?}"),
            }
        });
        w.join().unwrap();
        r.join().unwrap();
    });
}

/// The header is written by the program while the snapshotter looks: it
/// sees either no protocol or a complete, valid header, never an error;
/// and the page is never taken for foreign data at any moment of the
/// set-up (`Publisher::check` says what a restarted program's `open`
/// would do with it: a set-up cut short must be taken up again, not
/// refused forever). A copy with the program *stopped* sees a prefix of
/// the set-up's stores, pinned by the unit test
/// `a_header_setup_cut_short_is_blank_not_foreign`.
#[test]
fn header_setup_races_with_probe() {
    builder().check(|| {
        let buf = Arc::new(HeapBuffer::new(DATA_OFFSET + 8));
        let w = {
            let buf = buf.clone();
            thread::spawn(move || {
                // Set-up, then at once an update: a reader that saw the
                // magic still zero must not then take the odd sequence word
                // for foreign data.
                let (mut p, _) = Publisher::open(buf.region()).unwrap();
                p.enter_update();
            })
        };
        let r = {
            let buf = buf.clone();
            thread::spawn(move || {
                let probed = shm_snapshot::probe(buf.region()).map(|_| ());
                let checked = Publisher::check(buf.region()).map(|_| ());
                (probed, checked)
            })
        };
        w.join().unwrap();
        let (probed, checked) = r.join().unwrap();
        probed.expect("never a damaged header");
        if let Err(e) = checked {
            panic!("the page was refused during the set-up: {e}");
        }
    });
}

/// A program restarted after a crash inside an update resumes it (the
/// crashed writer's odd sequence value, stored here by a thread that then
/// stops) and writes its repair, while a snapshotter copies: a kept copy
/// never holds a repair store without its commit.
#[test]
fn resumed_update_is_not_kept_half_repaired() {
    builder().check(|| {
        let buf = Arc::new(HeapBuffer::new(DATA_OFFSET + 16));
        Publisher::open(buf.region()).unwrap();
        let crashed = {
            let buf = buf.clone();
            thread::spawn(move || {
                let (mut p, _) = Publisher::open(buf.region()).unwrap();
                p.enter_update();
            })
        };
        let restarted = {
            let buf = buf.clone();
            thread::spawn(move || {
                // Starts once it sees the crashed writer's odd value.
                while !matches!(
                    shm_snapshot::probe(buf.region()),
                    Ok(shm_snapshot::Protocol::Present { updating: true, .. })
                ) {
                    thread::yield_now();
                }
                let (mut p, opened) = Publisher::open(buf.region()).unwrap();
                assert!(opened.interrupted);
                p.data().store_u64(0, 7);
                p.data().store_u64(8, 7);
                p.commit();
            })
        };
        let reader = thread::spawn(move || {
            let mut dst = vec![0u8; buf.region().len()];
            if let CopyOutcome::Consistent { generation } =
                try_copy_consistent(buf.region(), &mut dst).unwrap()
            {
                let expect = if generation == 1 { 7 } else { 0 };
                assert_eq!(word(&dst, 0), expect, "generation {generation} torn");
                assert_eq!(word(&dst, 1), expect, "generation {generation} torn");
            }
        });
        crashed.join().unwrap();
        restarted.join().unwrap();
        reader.join().unwrap();
    });
}
