//! Model check of the seqlock core with loom: every interleaving (up to a
//! preemption bound) of a writer making updates and a snapshotter copying.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p shm-snapshot --release --test loom`
//! (raise `LOOM_MAX_PREEMPTIONS`, default 2 here, for a deeper search).
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use shm_snapshot::{DATA_OFFSET, HeapBuffer, Outcome, Publisher, try_copy_consistent};

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
                Outcome::Consistent { generation } => {
                    assert_eq!(word(&dst, 0), generation, "first word torn");
                    assert_eq!(word(&dst, 1), generation, "second word torn");
                }
                Outcome::Updating { .. } | Outcome::Changed { .. } => {}
                other => panic!("header was set up before the writer ran: {other:?}"),
            }
        });
        w.join().unwrap();
        r.join().unwrap();
    });
}

/// The header is written by the program while the snapshotter looks: it
/// sees either no protocol or a complete, valid header, never an error.
#[test]
fn header_setup_races_with_probe() {
    builder().check(|| {
        let buf = Arc::new(HeapBuffer::new(DATA_OFFSET + 8));
        let w = {
            let buf = buf.clone();
            thread::spawn(move || {
                Publisher::open(buf.region()).unwrap();
            })
        };
        let r = {
            let buf = buf.clone();
            thread::spawn(move || shm_snapshot::probe(buf.region()).map(|_| ()))
        };
        w.join().unwrap();
        r.join().unwrap().expect("never a damaged header");
    });
}
