//! A small tour of the heap-backed paths for Miri, which checks that the
//! region's slices, its atomic words and the protocol page never alias
//! unsoundly (`cargo +nightly miri test -p shm-state --lib tests::miri`;
//! `.ci/run` runs it when a nightly toolchain with Miri is present). The
//! other tests cover the same paths at sizes Miri would take hours on.

use super::*;

#[test]
fn transactions_reopen_abort_and_copy() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| {
        tx.root_mut()?.n = 1;
        *tx.cell_mut(r.cell)? = 5;
        tx.vec(r.vec)?.extend_from_slice(&[1, 2, 3])?;
        tx.map(r.map)?.insert(&1, &10)?;
        tx.map(r.bmap)?.insert(b"k", b"v")?;
        tx.log(r.log)?.append(b"event")
    })
    .unwrap();
    let model = dump(&s).unwrap();
    // An aborted transaction rolls back in place.
    let _ = s.transaction(|tx| {
        tx.vec(r.vec)?.set(0, 9)?;
        tx.map(r.map)?.remove(&1)?;
        Err::<(), _>(Error::Migration("no".into()))
    });
    assert_eq!(dump(&s).unwrap(), model);
    // A copy (atomic words read atomically) opens to the same state while
    // the original is held.
    let copy = open(s.image()).unwrap();
    assert_eq!(dump(&copy).unwrap(), model);
    drop(copy);
    let s = reopen(s);
    assert_eq!(dump(&s).unwrap(), model);
}

#[test]
fn an_interrupted_transaction_is_rolled_back() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    let before = dump(&s).unwrap();
    s.core.mem.crash = Some(CrashPlan {
        countdown: 5,
        torn_prefix: 3,
        image: None,
    });
    s.transaction(|tx| {
        tx.vec(r.vec)?.extend_from_slice(&[7; 40])?;
        tx.map(r.map)?.insert(&2, &20)
    })
    .unwrap();
    let crashed = s.core.mem.crash.take().unwrap().image.unwrap();
    drop(s);
    let s = open(crashed).unwrap();
    assert!(matches!(s.report().opened, Opened::Recovered { .. }));
    assert_eq!(dump(&s).unwrap(), before);
}

#[test]
fn the_protocol_page_of_a_heap_state() {
    let l = || layout().with_snapshot_protocol();
    let mut s = State::<Root>::open(Source::heap(Vec::new()), l()).unwrap();
    s.transaction(|tx| {
        tx.root_mut()?.n = 3;
        Ok::<_, Error>(())
    })
    .unwrap();
    let bytes = s.close().unwrap().into_heap().unwrap();
    let s = State::<Root>::open(Source::heap(bytes), l()).unwrap();
    assert_eq!(s.root().unwrap().n, 3);
}
