//! Transactions and structures against std models: what commits,
//! what a failed transaction leaves, growth and reuse, errors of use.

use super::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every structure against a std model, reopening after every operation;
    /// some transactions are aborted and must change nothing.
    #[test]
    fn structures_match_std_models_across_reopens(
        ops in proptest::collection::vec((op_strategy(), 0u8..8), 1..60)
    ) {
        let mut s = fresh();
        let mut model = Model::default();
        for (op, abort) in &ops {
            let abort = *abort == 0;
            let r = s.transaction(|tx| {
                apply_state(tx, op)?;
                if abort { Err(Error::Migration("abort".into())) } else { Ok(()) }
            });
            if abort {
                prop_assert!(r.is_err());
            } else {
                r.unwrap();
                apply_model(&mut model, op);
            }
            s = reopen(s);
            prop_assert_eq!(s.report().opened, Opened::Reopened);
            prop_assert_eq!(&dump(&s).unwrap(), &model);
        }
    }
}

#[test]
fn created_reopened_and_generations_grow() {
    let s = fresh();
    assert_eq!(s.report().opened, Opened::Created);
    assert_eq!(s.report().generation, 1);
    let s = reopen(s);
    assert_eq!(s.report().opened, Opened::Reopened);
    assert_eq!(s.report().generation, 2);
    assert_eq!(s.report().previous_pid, std::process::id());
    let s = reopen(s);
    assert_eq!(s.report().generation, 3);
}

#[test]
fn failed_and_panicking_transactions_change_nothing() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.push(1)).unwrap();
    let before = dump(&s).unwrap();
    let e = s
        .transaction(|tx| {
            tx.vec(r.vec)?.push(2)?;
            tx.map(r.map)?.insert(&1, &1)?;
            tx.root_mut()?.n = 9;
            Err::<(), _>(Error::Migration("no".into()))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Migration(_)));
    assert_eq!(dump(&s).unwrap(), before);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = s.transaction(|tx| {
            tx.vec(r.vec)?.push(3)?;
            tx.log(r.log)?.append(b"x")?;
            panic!("inside a transaction");
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        });
    }));
    assert!(caught.is_err());
    assert_eq!(dump(&s).unwrap(), before);
    s.transaction(|tx| tx.vec(r.vec)?.push(4)).unwrap();
    assert_eq!(s.vec(r.vec).unwrap(), &[1, 4]);
}

#[test]
fn region_grows_and_freed_space_is_reused() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    let len0 = s.region_len();
    s.transaction(|tx| {
        let mut v = tx.vec(r.vec)?;
        for i in 0..100_000 {
            v.push(i)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert!(s.region_len() > len0, "the region grew");
    assert_eq!(s.vec(r.vec).unwrap().len(), 100_000);
    let s = reopen(s);
    assert_eq!(s.vec(r.vec).unwrap()[99_999], 99_999);
    // Churn through maps of byte strings: the heap must settle, not grow.
    let mut s = s;
    let mut peak = 0;
    for round in 0..30u32 {
        s.transaction(|tx| {
            let mut m = tx.map(r.bmap)?;
            for k in 0..50u32 {
                m.insert(&k.to_le_bytes(), &vec![round as u8; 100 + k as usize])?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        s.transaction(|tx| tx.map(r.bmap)?.clear()).unwrap();
        if round == 5 {
            peak = s.region_len();
        }
    }
    assert_eq!(s.region_len(), peak, "steady churn reuses freed blocks");
    let report = s.verify().unwrap();
    assert!(report.free_blocks > 0);
}

#[test]
fn journal_full_is_an_error_and_rolls_back() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&vec![1u32; 20_000]))
        .unwrap();
    let before = dump(&s).unwrap();
    let e = s
        .transaction(|tx| {
            let mut v = tx.vec(r.vec)?;
            for i in 0..20_000 {
                v.set(i, 2)?;
            }
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert!(matches!(e, Error::JournalFull { capacity: 16384 }), "{e}");
    assert_eq!(dump(&s).unwrap(), before);
}

#[test]
fn wrong_types_and_null_handles_are_errors() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    let as_u64: StateVec<u64> = StateVec::from_off(r.vec.offset());
    assert!(matches!(s.vec(as_u64), Err(Error::UnsupportedType { .. })));
    let not_a_vec: StateVec<u32> = StateVec::from_off(r.map.offset());
    assert!(matches!(s.vec(not_a_vec), Err(Error::Corrupted(_))));
    assert!(matches!(
        s.vec(StateVec::<u32>::NULL),
        Err(Error::NullHandle { kind: "vec" })
    ));
    let wrong_map: StateMap<u32, u64> = StateMap::from_off(r.map.offset());
    assert!(s.map(wrong_map).is_err());
    let e = s.transaction(|tx| tx.vec(r.vec)?.set(5, 1)).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { index: 5, len: 0 }));
}

#[test]
fn map_handles_many_keys_and_deletes() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    let mut model = HashMap::new();
    let mut rng = Rng(99);
    for _ in 0..100 {
        s.transaction(|tx| {
            let mut m = tx.map(r.map)?;
            for _ in 0..100 {
                let k = rng.below(2000);
                if rng.below(3) == 0 {
                    assert_eq!(m.remove(&k)?, model.remove(&k).is_some());
                } else {
                    let v = rng.next();
                    assert_eq!(m.insert(&k, &v)?, model.insert(k, v).is_some());
                }
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let m = s.map(r.map).unwrap();
    m.verify().unwrap();
    assert_eq!(m.len(), model.len() as u64);
    for (k, v) in &model {
        assert_eq!(m.get(k).unwrap(), Some(v));
    }
    assert_eq!(m.get(&5000).unwrap(), None);
}

#[test]
fn a_map_view_stays_true_to_the_region_after_a_failed_insert() {
    // A committed table (4096 slots), so that new entries are journaled.
    let (mut s, r) = with_map((0..3000u64).map(|k| (k + 1_000_000, k)));
    let before = dump(&s).unwrap();
    // The 16 KiB journal fills up part way through: the view must go on
    // agreeing with the region (the cached header is re-read).
    let e = s
        .transaction(|tx| {
            let mut m = tx.map(r.map)?;
            // Key 0's value journaled: a new entry's slot is not (only its
            // control byte), a replaced value is.
            m.insert(&0, &0)?;
            m.insert(&0, &0)?;
            let mut inserted = vec![0];
            let failed = (1..500u64).find(|&k| {
                let ok = m.insert(&k, &(k * 3)).is_ok();
                if ok {
                    inserted.push(k);
                }
                !ok
            });
            assert!(failed.is_some(), "the journal never filled");
            assert_eq!(m.len()?, 3000 + inserted.len() as u64);
            let view = m.as_ref()?;
            view.verify()?;
            for &k in &inserted {
                assert_eq!(view.get(&k)?, Some(&(k * 3)));
            }
            // Replacing a value whose line is already journaled still works.
            let k = inserted[0];
            assert!(m.insert(&k, &7)?);
            assert_eq!(m.get(&k)?, Some(&7));
            assert_eq!(m.len()?, 3000 + inserted.len() as u64);
            m.as_ref()?.verify()?;
            Err::<(), _>(Error::Migration("roll back".into()))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Migration(_)), "{e}");
    assert_eq!(dump(&s).unwrap(), before);
}

/// `repro -- swallow`: an operation that fails part way poisons the
/// transaction even if the closure ignores its error and returns `Ok`.
#[test]
fn an_error_the_closure_swallows_still_rolls_the_transaction_back() {
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct R3 {
        v: StateVec<u64>,
        m: StateMap<u64, u64>,
        b: StateMap<u64, Bytes>,
    }
    let l = || Layout::<R3>::new(1).journal_len(4096);
    let mut s = State::<R3>::open(Source::heap(Vec::new()), l()).unwrap();
    s.transaction(|tx| {
        let r = R3 {
            v: tx.new_vec()?,
            m: tx.new_map()?,
            b: tx.new_map()?,
        };
        tx.set_root(r)?;
        tx.vec(r.v)?.extend_from_slice(&vec![0u64; 8 * 100])?;
        tx.map(r.m)?.insert(&1, &1)?;
        tx.map(r.b)?.insert(&1, b"old")?;
        Ok::<_, Error>(())
    })
    .unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let (mut incomplete, mut clean_failures) = (0, 0);
    for k in 20..60u64 {
        for replace in [false, true] {
            let mut s = State::<R3>::open(Source::heap(base.clone()), l()).unwrap();
            let r = *s.root().unwrap();
            let res = s.transaction(|tx| {
                for i in 0..k {
                    tx.vec(r.v)?.set(i * 8, 1)?; // one journaled line each
                }
                let inner = if replace {
                    tx.map(r.b)?.insert(&1, &[7u8; 300]).map(|_| ())
                } else {
                    tx.map(r.m)?.insert(&2, &2).map(|_| ())
                };
                Ok::<_, Error>(inner.is_err())
            });
            let m = s.map(r.m).unwrap();
            m.verify().unwrap();
            let b = s.map(r.b).unwrap();
            b.verify().unwrap();
            s.verify().unwrap();
            match res {
                Err(Error::Incomplete { .. }) => {
                    incomplete += 1;
                    // Rolled back whole: the vec sets are gone too.
                    assert_eq!(s.vec(r.v).unwrap()[0], 0, "k {k}");
                    assert_eq!(m.len(), 1);
                    assert_eq!(b.get(&1).unwrap(), Some(&b"old"[..]));
                }
                Ok(true) => {
                    // Failed before changing anything: the rest commits.
                    clean_failures += 1;
                    assert_eq!(s.vec(r.v).unwrap()[0], 1);
                    assert_eq!(m.get(&2).unwrap(), None);
                    assert_eq!(b.get(&1).unwrap(), Some(&b"old"[..]));
                }
                Ok(false) => {
                    if replace {
                        assert_eq!(b.get(&1).unwrap(), Some(&[7u8; 300][..]));
                    } else {
                        assert_eq!(m.get(&2).unwrap(), Some(&2));
                    }
                }
                // A `?` on a failed vec set: an ordinary rollback.
                Err(Error::JournalFull { .. }) => assert_eq!(s.vec(r.v).unwrap()[0], 0),
                Err(e) => panic!("k {k}: {e}"),
            }
            drop(s);
        }
    }
    assert!(incomplete > 0, "no operation failed part way");
    assert!(clean_failures > 0, "no operation failed before writing");
}

/// `repro -- u128`: map items aligned above 8 are refused up front (slots
/// are 8-aligned: they could be stored but never read in place).
#[test]
fn map_items_aligned_above_8_are_refused() {
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct R2 {
        m: StateMap<[u64; 2], u64>,
    }
    let mut s = State::<R2>::open(Source::heap(Vec::new()), Layout::new(1)).unwrap();
    let e = s
        .transaction(|tx| tx.new_map::<u128, u64>().map(|_| ()))
        .unwrap_err();
    assert!(matches!(e, Error::UnsupportedType { .. }), "{e}");
    let e = s
        .transaction(|tx| tx.new_map::<u64, u128>().map(|_| ()))
        .unwrap_err();
    assert!(e.to_string().contains("alignment 16 exceeds 8"), "{e}");
    // A map of the same size but 8-aligned keys, viewed as u128 keys.
    let m = s
        .transaction(|tx| {
            let m = tx.new_map::<[u64; 2], u64>()?;
            tx.set_root(R2 { m })?;
            tx.map(m)?.insert(&[1, 2], &3)?;
            Ok::<_, Error>(m)
        })
        .unwrap();
    assert_eq!(s.map(m).unwrap().get(&[1, 2]).unwrap(), Some(&3));
    let as_u128: StateMap<u128, u64> = StateMap::from_off(m.offset());
    assert!(matches!(s.map(as_u128), Err(Error::UnsupportedType { .. })));
}

/// `repro -- clear`: freeing journals only the freed block's header (a
/// 40-byte record, was 88), so a map of 12 000 byte-string entries (24 000
/// blocks; the old limit was ~11 900 frees) clears within the default 1 MiB
/// journal.
#[test]
fn clearing_12k_byte_string_entries_fits_the_default_journal() {
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct R {
        m: StateMap<Bytes, Bytes>,
    }
    let mut s = State::<R>::open(Source::heap(Vec::new()), Layout::new(1)).unwrap();
    let m = s
        .transaction(|tx| {
            let m = tx.new_map()?;
            tx.set_root(R { m })?;
            Ok::<_, Error>(m)
        })
        .unwrap();
    for chunk in 0..12u32 {
        s.transaction(|tx| {
            let mut map = tx.map(m)?;
            for i in 0..1000u32 {
                map.insert(&(chunk * 1000 + i).to_le_bytes(), b"v")?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let before = s.verify().unwrap();
    s.transaction(|tx| tx.map(m)?.clear()).unwrap();
    let after = s.verify().unwrap();
    assert_eq!(s.map(m).unwrap().len(), 0);
    assert!(after.free_blocks >= before.free_blocks + 24_000);
    // And a crash in the middle of such a clear still rolls back whole.
    let image = s.image();
    drop(s);
    let mut s = State::<R>::open(Source::heap(image), Layout::new(1)).unwrap();
    s.transaction(|tx| {
        let mut map = tx.map(m)?;
        for i in 0..50u32 {
            map.insert(&i.to_le_bytes(), &[1; 40])?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let keys = |s: &State<R>| s.map(m).unwrap().len();
    for n in [60u64, 120, 200] {
        let mut s = State::<R>::open(Source::heap(base.clone()), Layout::new(1)).unwrap();
        s.core.mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: 11,
            image: None,
        });
        s.transaction(|tx| tx.map(m)?.clear()).unwrap();
        let image = s.core.mem.crash.take().unwrap().image.expect("crashed");
        drop(s);
        let s = State::<R>::open(Source::heap(image), Layout::new(1)).unwrap();
        assert!(matches!(s.report().opened, Opened::Recovered { .. }), "{n}");
        assert_eq!(keys(&s), 50, "{n}");
        s.map(m).unwrap().verify().unwrap();
        s.verify().unwrap();
    }
}
