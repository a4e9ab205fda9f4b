//! The ring: order, wrap, room, frame checks, crash atomicity of a pop and
//! a push with the state they go with, and a rollback of a pop and a push
//! in one transaction.

use std::collections::VecDeque;

use super::*;
use crate::StateRing;

/// A fresh state whose root's `n` holds a ring's offset.
fn with_ring(cap: u64, max_frame: u32) -> (State<Root>, StateRing) {
    let mut s = fresh();
    let ring = s
        .transaction(|tx| {
            let ring = tx.new_ring(cap, max_frame)?;
            tx.root_mut()?.n = ring.offset();
            Ok::<_, Error>(ring)
        })
        .unwrap();
    (s, ring)
}

fn ring_of(s: &State<Root>) -> StateRing {
    StateRing::from_off(s.root().unwrap().n)
}

/// An error that carries what an aborted transaction read.
#[derive(Debug)]
enum Peek {
    Frames(Vec<Vec<u8>>),
    Failed(Error),
}
impl From<Error> for Peek {
    fn from(e: Error) -> Self {
        Peek::Failed(e)
    }
}

/// Every frame in the ring, oldest first (popped in a transaction that is
/// then rolled back).
fn contents(s: &mut State<Root>) -> Result<Vec<Vec<u8>>> {
    let ring = ring_of(s);
    match s.transaction(|tx| {
        let mut r = tx.ring(ring)?;
        let mut out = Vec::new();
        while let Some(f) = r.pop()? {
            out.push(f);
        }
        Err::<(), _>(Peek::Frames(out))
    }) {
        Err(Peek::Frames(f)) => Ok(f),
        Err(Peek::Failed(e)) => Err(e),
        Ok(()) => unreachable!(),
    }
}

fn frame(n: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (n as usize * 31 + i) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pushes_and_pops_keep_order_across_wraps_and_reopens(
        ops in proptest::collection::vec((any::<bool>(), 0usize..=120), 1..120)
    ) {
        let (mut s, ring) = with_ring(512, 120);
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        for (i, (push, len)) in ops.into_iter().enumerate() {
            if push {
                let f = frame(i as u64, len);
                let empty = model.is_empty();
                let pushed = s.transaction(|tx| tx.ring(ring)?.push(&f)).unwrap();
                prop_assert!(pushed || !empty, "an empty ring refused a frame of {} bytes", len);
                if pushed {
                    model.push_back(f);
                }
            } else {
                let got = s.transaction(|tx| tx.ring(ring)?.pop()).unwrap();
                prop_assert_eq!(got, model.pop_front());
            }
            if i % 10 == 9 {
                s = reopen(s);
            }
            let len = s.transaction(|tx| tx.ring(ring)?.len()).unwrap();
            prop_assert_eq!(len, model.len() as u64);
        }
        prop_assert_eq!(contents(&mut s).unwrap(), Vec::from(model));
    }
}

#[test]
fn a_full_ring_refuses_and_a_frame_too_large_is_an_error() {
    let (mut s, ring) = with_ring(64, 40);
    // 64 bytes hold two 16-byte frames (8 + 8) and a 24-byte one.
    let mut pushed = 0;
    while s.transaction(|tx| tx.ring(ring)?.push(&[7u8; 8])).unwrap() {
        pushed += 1;
    }
    assert_eq!(pushed, 4);
    let e = s
        .transaction(|tx| tx.ring(ring)?.push(&[0u8; 41]))
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let e = s.transaction(|tx| tx.new_ring(64, 57)).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
    assert_eq!(contents(&mut s).unwrap().len(), 4);
}

#[test]
fn a_damaged_frame_length_is_refused_not_followed() {
    let (mut s, ring) = with_ring(256, 100);
    s.transaction(|tx| tx.ring(ring)?.push(b"hello ring"))
        .unwrap();
    let data = ring.offset() + crate::format::BLOCK_HEADER + crate::ring::RING_HEADER;
    let img = s.close().unwrap().into_heap().unwrap();
    for bit in 0..32 {
        let mut bad = img.clone();
        bad[data as usize + bit / 8] ^= 1 << (bit % 8);
        let mut s = open(bad).unwrap();
        let e = s.transaction(|tx| tx.ring(ring)?.pop()).unwrap_err();
        assert!(matches!(e, Error::Corrupted(_)), "bit {bit}: {e}");
    }
    // Untouched, it pops.
    let mut s = open(img).unwrap();
    let f = s.transaction(|tx| tx.ring(ring)?.pop()).unwrap();
    assert_eq!(f.as_deref(), Some(&b"hello ring"[..]));
}

#[test]
fn a_pop_and_a_push_in_one_rolled_back_transaction_leave_the_ring_as_it_was() {
    let (mut s, ring) = with_ring(128, 48);
    // Fill the ring so that the next push wraps into the popped space.
    for n in 0..3 {
        assert!(
            s.transaction(|tx| tx.ring(ring)?.push(&frame(n, 32)))
                .unwrap()
        );
    }
    let before = contents(&mut s).unwrap();
    let r = s.transaction(|tx| {
        let mut r = tx.ring(ring)?;
        r.pop()?;
        assert!(r.push(&frame(9, 32))?, "the popped space takes the frame");
        Err::<(), _>(Error::unsupported("roll it back"))
    });
    assert!(r.is_err());
    assert_eq!(contents(&mut s).unwrap(), before);
    let s = reopen(s);
    let mut s = s;
    assert_eq!(contents(&mut s).unwrap(), before);
}

#[test]
fn a_crash_at_any_write_of_a_pop_and_a_push_with_their_state_is_all_or_nothing() {
    let mut rng = Rng(0x0005_eed0_0000_0042);
    let (mut s, ring) = with_ring(512, 64);
    for n in 0..5 {
        s.transaction(|tx| tx.ring(ring)?.push(&frame(n, 40)))
            .unwrap();
    }
    let base = s.close().unwrap().into_heap().unwrap();
    let state_of = |s: &mut State<Root>| {
        let cell = *s.cell(s.root().unwrap().cell).unwrap();
        (contents(s).unwrap(), cell)
    };
    let before = state_of(&mut open(base.clone()).unwrap());
    let mut after = None;
    let mut points = 0;
    for n in 0.. {
        let mut s = open(base.clone()).unwrap();
        s.core.mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: rng.below(72) as usize,
            image: None,
        });
        // The consumer's effect and the producer's frames in one
        // transaction: the cell counts what was taken.
        s.transaction(|tx| {
            let root = *tx.root()?;
            let f = tx.ring(ring)?.pop()?.expect("a frame");
            tx.set_cell(root.cell, f.len() as u64)?;
            let mut r = tx.ring(ring)?;
            assert!(r.push(&frame(100, 60))?);
            assert!(r.push(&frame(101, 20))?);
            Ok::<_, Error>(())
        })
        .unwrap();
        let image = s.core.mem.crash.take().unwrap().image;
        let done = state_of(&mut s);
        after.get_or_insert(done.clone());
        drop(s);
        let Some(image) = image else { break };
        points += 1;
        let mut s = open(image).unwrap_or_else(|e| panic!("crash at write {n}: {e}"));
        let got = state_of(&mut s);
        assert!(
            got == before || Some(&got) == after.as_ref(),
            "crash at write {n}: neither before nor after: {got:?}"
        );
    }
    assert!(points > 3, "{points} crash points");
    assert_ne!(Some(&before), after.as_ref());
}

#[test]
fn an_empty_ring_takes_its_largest_frame_wherever_its_position() {
    for first in (0..=48).step_by(8) {
        let (mut s, ring) = with_ring(64, 56);
        assert!(
            s.transaction(|tx| tx.ring(ring)?.push(&vec![1u8; first]))
                .unwrap()
        );
        assert!(s.transaction(|tx| tx.ring(ring)?.pop()).unwrap().is_some());
        // Empty, at position 8 + first: the largest frame still fits.
        let big = frame(7, 56);
        assert!(
            s.transaction(|tx| tx.ring(ring)?.push(&big)).unwrap(),
            "after a frame of {first} bytes"
        );
        let s = reopen(s);
        let mut s = s;
        assert_eq!(contents(&mut s).unwrap(), vec![big]);
    }
}

#[test]
fn many_pushes_in_one_transaction_do_not_fill_the_journal() {
    // 16 KiB of journal (the tests' layout), 40 KiB of frames in one
    // transaction: frame bytes past the committed tail are not journaled.
    let (mut s, ring) = with_ring(64 << 10, 2048);
    s.transaction(|tx| {
        let mut r = tx.ring(ring)?;
        for n in 0..40 {
            assert!(r.push(&frame(n, 1024))?);
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let got = contents(&mut s).unwrap();
    assert_eq!(got.len(), 40);
    assert!(
        got.iter()
            .enumerate()
            .all(|(n, f)| *f == frame(n as u64, 1024))
    );
}
