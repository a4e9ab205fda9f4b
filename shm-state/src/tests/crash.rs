//! Crashes at every write (creation, reopen, transactions, recovery),
//! with torn writes: every crash leaves a state that opens to old or new.

use super::*;

#[test]
fn a_crash_at_any_write_of_creation_or_reopen_leaves_an_openable_state() {
    let existing = fresh().close().unwrap().into_heap().unwrap();
    let model = dump(&open(existing.clone()).unwrap()).unwrap();
    let mut points = 0;
    for start in [Vec::new(), existing.clone()] {
        for n in 0.. {
            let mut done = false;
            for torn in [0usize, 3, 8, 64] {
                let Some(image) = open_crashing(start.clone(), layout(), n, torn) else {
                    done = true;
                    break;
                };
                points += 1;
                let s = open(image).unwrap_or_else(|e| {
                    panic!(
                        "start {} bytes, crash at write {n} torn {torn}: {e}",
                        start.len()
                    )
                });
                s.verify().unwrap();
                if start.is_empty() {
                    assert_eq!(s.root().unwrap().n, 0);
                } else {
                    assert_eq!(dump(&s).unwrap(), model, "crash at write {n}");
                }
            }
            if done {
                break;
            }
        }
    }
    assert!(points > 20, "{points} crash points");
}

#[test]
fn crash_at_any_write_of_a_multi_structure_transaction() {
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| {
                for i in 0..20 {
                    tx.vec(r.vec)?.push(i)?;
                    tx.map(r.map)?.insert(&u64::from(i), &1)?;
                    tx.map(r.bmap)?.insert(&[i as u8], b"old value")?;
                }
                tx.log(r.log)?.append(b"first")
            })
            .unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            tx.root_mut()?.n += 1;
            *tx.cell_mut(r.cell)? = 77;
            tx.vec(r.vec)?.set(3, 1000)?;
            tx.vec(r.vec)?.pop()?;
            for i in 20..40 {
                tx.vec(r.vec)?.push(i)?; // grows: reallocates
            }
            tx.map(r.map)?.insert(&5, &555)?;
            tx.map(r.map)?.remove(&6)?;
            for k in 100..120 {
                tx.map(r.map)?.insert(&k, &k)?; // grows the table
            }
            tx.map(r.bmap)?.insert(&[1], b"a new, longer value")?;
            tx.map(r.bmap)?.remove(&[2])?;
            tx.log(r.log)?.append(b"second")?;
            Ok(())
        },
    );
}

#[test]
fn crash_at_any_write_while_freeing_and_reusing() {
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| {
                for i in 0..30u8 {
                    tx.map(r.bmap)?.insert(&[i], &[i; 40])?;
                }
                Ok::<_, Error>(())
            })
            .unwrap();
            s.transaction(|tx| tx.map(r.bmap)?.clear()).unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            // Reuses the blocks freed by the clear.
            for i in 0..30u8 {
                tx.map(r.bmap)?.insert(&[i, i], &[i; 33])?;
            }
            tx.log(r.log)?.clear()?;
            tx.log(r.log)?.append(b"again")?;
            Ok(())
        },
    );
}

#[test]
fn a_crash_during_recovery_recovers_again() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[1, 2, 3]))
        .unwrap();
    let before = dump(&s).unwrap();
    s.core.mem.crash = Some(CrashPlan {
        countdown: 12,
        torn_prefix: 3,
        image: None,
    });
    s.transaction(|tx| {
        tx.vec(r.vec)?.set(0, 9)?;
        tx.map(r.map)?.insert(&1, &2)?;
        tx.root_mut()?.n = 3;
        Ok::<_, Error>(())
    })
    .unwrap();
    let crashed = s.core.mem.crash.take().unwrap().image.unwrap();
    drop(s);
    // Crash the recovery itself at each of its writes.
    for n in 0..20 {
        let mut mem = crate::mem::Mem::heap(crashed.clone(), 0, 0).unwrap();
        mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: 5,
            image: None,
        });
        let word = mem.load_u64(crate::format::TX_WORD).unwrap();
        let (seq, is_open) = crate::format::read_tx_word(word).unwrap();
        assert!(is_open);
        let jl = 16 << 10;
        let records = crate::journal::recovery_records(&mem, jl, seq).unwrap();
        crate::journal::apply_rollback(&mut mem, &records, seq).unwrap();
        let Some(image) = mem.crash.take().unwrap().image else {
            break;
        };
        let s = open(image).unwrap();
        assert_eq!(dump(&s).unwrap(), before, "recovery crashed at write {n}");
    }
}

#[test]
fn crash_at_any_write_of_a_transaction_touching_many_lines() {
    // More lines than the inline journaled-line set holds, each written
    // twice: the spill set must still journal every line exactly once.
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[7u32; 2000]))
                .unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            let mut v = tx.vec(r.vec)?;
            for round in 0..2u32 {
                for i in 0..40u32 {
                    v.set(u64::from(i) * 16, round * 100 + i)?;
                }
            }
            Ok(())
        },
    );
}
