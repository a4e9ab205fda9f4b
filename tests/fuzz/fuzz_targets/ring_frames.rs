//! A shm-state ring (`Tx::new_ring`, `RingMut::push` / `pop`) whose
//! block is overwritten with arbitrary bytes between two opens: the ring
//! header (head, tail, frames, capacity, largest frame, attached pids)
//! and the frames' length words and bytes. Every pop of the damaged ring
//! must give a frame, `None` or an error (corrupt), never a panic, a read
//! outside the region or an allocation beyond it; with no damage, the
//! frames come back exactly as pushed, in order.
//!
//! Input: byte 0 picks the ring's data bytes (`16 + 8 * b`), byte 1 the
//! largest frame (a fraction of what fits), byte 2 how many frames are
//! pushed before a pop of a third of them and a second round of pushes
//! (which wraps), then one byte per frame for its length; the rest is
//! damage: 3 bytes each, a 16-bit offset into the ring's block (modulo
//! its size) and the byte written there.
#![no_main]

use bytemuck::{Pod, Zeroable};
use libfuzzer_sys::fuzz_target;
use shm_state::{Error, Layout, Source, State, StateRing};

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    ring: StateRing,
}

fn layout() -> Layout<Root> {
    Layout::new(1).journal_len(16 * 1024).initial_len(0)
}

/// Frame `i` of `len` bytes: recognisable at every position.
fn frame(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j) as u8).collect()
}

fn one_line(e: &Error) {
    let m = e.to_string();
    assert!(!m.contains('\n'), "a message of several lines: {m}");
}

fuzz_target!(|data: &[u8]| {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let cap = 16 + 8 * u64::from(byte(0));
    let max_frame = ((cap - 8) * (u64::from(byte(1)) + 1) / 256).max(1) as u32;
    let pushes = usize::from(byte(2) % 48);
    let lens: Vec<usize> = (0..pushes)
        .map(|i| usize::from(byte(3 + i)) % (max_frame as usize + 1))
        .collect();
    let damage = data.get(3 + pushes..).unwrap_or_default();

    // The ring before the damage: pushes, a pop of a third, pushes again.
    let mut state = State::<Root>::open(Source::heap(Vec::new()), layout()).expect("a fresh state");
    let mut expected = std::collections::VecDeque::new();
    let ring = state
        .transaction(|tx| {
            let ring = tx.new_ring(cap, max_frame)?;
            tx.root_mut()?.ring = ring;
            Ok::<_, Error>(ring)
        })
        .expect("a ring of a valid size");
    let push_some = |state: &mut State<Root>,
                     expected: &mut std::collections::VecDeque<Vec<u8>>,
                     from: usize,
                     to: usize| {
        state
            .transaction(|tx| {
                let mut r = tx.ring(ring)?;
                for (i, &len) in lens.iter().enumerate().take(to).skip(from) {
                    if r.push(&frame(i, len))? {
                        expected.push_back(frame(i, len));
                    }
                }
                Ok::<_, Error>(())
            })
            .expect("pushes to a sound ring");
    };
    push_some(&mut state, &mut expected, 0, pushes / 2);
    state
        .transaction(|tx| {
            let mut r = tx.ring(ring)?;
            for _ in 0..pushes / 6 {
                let got = r.pop()?;
                assert_eq!(got, expected.pop_front());
            }
            Ok::<_, Error>(())
        })
        .expect("pops from a sound ring");
    push_some(&mut state, &mut expected, pushes / 2, pushes);
    let mut img = state.close().expect("close").into_heap().expect("a heap");

    // The damage, inside the ring's block (header, ring header, data).
    let block = ring.offset() as usize;
    let span = 16 + 64 + cap as usize;
    for d in damage.chunks_exact(3) {
        let off = usize::from(u16::from_le_bytes([d[0], d[1]])) % span;
        if let Some(b) = img.get_mut(block + off) {
            *b = d[2];
        }
    }
    let damaged = damage.len() >= 3;

    let mut state = match State::<Root>::open(Source::heap(img), layout()) {
        Ok(s) => s,
        Err(e) => {
            // Only the ring was touched: the open itself has no reason to
            // refuse (it does not walk the ring).
            assert!(damaged, "an undamaged state was refused: {e}");
            one_line(&e);
            return;
        }
    };
    let popped = state.transaction(|tx| {
        let mut r = tx.ring(ring)?;
        let mut got = Vec::new();
        // Bounded: a sound ring holds at most cap / 8 frames.
        for _ in 0..cap / 8 + 2 {
            match r.pop()? {
                Some(f) => {
                    assert!(f.len() <= max_frame as usize || damaged);
                    got.push(f);
                }
                None => break,
            }
        }
        let room = r.push(&frame(9999, (max_frame as usize).min(8)))?;
        Ok::<_, Error>((got, room))
    });
    match popped {
        Ok((got, room)) => {
            if !damaged {
                assert_eq!(got, Vec::from(expected), "frames changed without damage");
                assert!(room, "an emptied ring refused a frame");
            }
        }
        Err(e) => {
            assert!(damaged, "an undamaged ring failed: {e}");
            one_line(&e);
        }
    }
});
