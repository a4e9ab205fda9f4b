//! Regression tests for the format 2 fast paths (see BENCHMARKS.md,
//! `## shm-state`): each pins one shortcut to the behaviour it must keep;
//! and commits published through the snapshot protocol.

use super::*;

#[test]
fn commits_are_published_through_the_snapshot_protocol() {
    use shm_snapshot::{Protocol, Region, probe};
    let fd = shm_fd::SharedFd::create("shm-state-snap", shm_fd::CreateOptions::default()).unwrap();
    let watcher = fd.try_clone().unwrap();
    let probe_fd = |fd: &shm_fd::SharedFd| {
        let map = fd.map_raw(1).unwrap();
        match probe(Region::from_mmap(&map)).unwrap() {
            Protocol::Present {
                generation,
                updating,
                ..
            } => (generation, updating),
            other => panic!("no protocol header: {other:?}"),
        }
    };
    let layout = || layout().with_snapshot_protocol();
    // SAFETY: a private memfd, sealed against shrinking.
    let mut s = State::<Root>::open(unsafe { Source::shared(fd) }, layout()).unwrap();
    let (g0, updating) = probe_fd(&watcher);
    assert!(!updating);
    let r = s
        .transaction(|tx| {
            let v = tx.new_vec::<u32>()?;
            tx.root_mut()?.vec = v;
            // Inside the transaction the header says "updating".
            assert!(probe_fd(&watcher).1);
            let mut vec = tx.vec(v)?;
            for i in 0..100_000 {
                vec.push(i)?; // grows the memfd: the publisher follows the remap
            }
            Ok::<_, Error>(*tx.root()?)
        })
        .unwrap();
    let (g1, updating) = probe_fd(&watcher);
    assert!(!updating && g1 == g0 + 1, "{g0} -> {g1}");
    // A failed transaction leaves the header committed again.
    let _ = s.transaction(|tx| {
        tx.vec(r.vec)?.push(1)?;
        Err::<(), _>(Error::Migration("no".into()))
    });
    assert!(!probe_fd(&watcher).1);
    // A consistent copy of the whole memfd, reopened, holds the committed data.
    let map = watcher.map_raw(1).unwrap();
    let region = Region::from_mmap(&map);
    let mut copy = vec![0u8; region.len()];
    region.copy_to(&mut copy);
    drop(s);
    let s = State::<Root>::open(Source::heap(copy), layout()).unwrap();
    assert_eq!(s.vec(r.vec).unwrap().len(), 100_000);
    drop(s);
    // Reopen the memfd itself; without the protocol it is refused clearly.
    // SAFETY: as above.
    let e = State::<Root>::open(
        unsafe { Source::shared(watcher.try_clone().unwrap()) },
        self::layout(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::NotAState { .. }), "{e}");
    // SAFETY: as above.
    let s = State::<Root>::open(unsafe { Source::shared(watcher) }, layout()).unwrap();
    assert_eq!(s.report().opened, Opened::Reopened);
    assert_eq!(s.vec(r.vec).unwrap()[99_999], 99_999);
}

#[test]
fn every_line_is_journaled_once_per_transaction() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[7u32; 2000]))
        .unwrap();
    let before = dump(&s).unwrap();
    let e = s
        .transaction(|tx| {
            let mut v = tx.vec(r.vec)?;
            // 40 elements 64 bytes apart, twice: 40 lines, 40 records. The
            // first writes take records of just their 4 bytes (see
            // `ExactSet`), the rest whole lines.
            for round in 0..2u32 {
                for i in 0..40u32 {
                    v.set(u64::from(i) * 16, round * 100 + i)?;
                }
            }
            let (records, _) = crate::journal::scan(tx.core.mem(), 16 << 10, tx.core.seq())?;
            assert_eq!(records.len(), 40);
            let exact = crate::tx::EXACT_SLOTS;
            assert!(records[..exact].iter().all(|r| r.len == 4));
            assert!(records[exact..].iter().all(|r| r.len == 64));
            Err::<(), _>(Error::Migration("roll back".into()))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Migration(_)));
    assert_eq!(dump(&s).unwrap(), before);
}

#[test]
fn small_heap_writes_take_exact_records_and_the_rest_of_their_line_is_journaled_whole() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[7u32; 64]))
        .unwrap();
    let before = dump(&s).unwrap();
    let e = s
        .transaction(|tx| {
            let records = |tx: &Tx<'_, Root>| {
                crate::journal::scan(tx.core.mem(), 16 << 10, tx.core.seq())
                    .unwrap()
                    .0
            };
            // Element 1: a 4-byte record; written again, no new one.
            tx.vec(r.vec)?.set(1, 100)?;
            tx.vec(r.vec)?.set(1, 101)?;
            let at = records(tx)[0].target;
            assert_eq!(records(tx).len(), 1);
            // Another element of its line: the line is journaled whole,
            // after element 1 had changed (its exact record keeps the old
            // value); written again, no new record.
            let other = if at % 64 < 60 { 2 } else { 0 };
            let mut v = tx.vec(r.vec)?;
            v.set(other, 102)?;
            v.set(other, 103)?;
            v.set(1, 104)?;
            let rs = records(tx);
            assert_eq!(rs.iter().map(|r| r.len).collect::<Vec<_>>(), [4, 64]);
            assert_eq!(rs[1].target, at / 64 * 64);
            Err::<(), _>(Error::Migration("roll back".into()))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Migration(_)));
    assert_eq!(dump(&s).unwrap(), before);
    // The same after a crash: the open rolls both records back.
    let mut s = reopen(s);
    let image = {
        let mut image = None;
        let _ = s.transaction(|tx| {
            tx.vec(r.vec)?.set(1, 100)?;
            let at = crate::journal::scan(tx.core.mem(), 16 << 10, tx.core.seq())?.0[0].target;
            let mut v = tx.vec(r.vec)?;
            v.set(if at % 64 < 60 { 2 } else { 0 }, 102)?;
            v.set(1, 104)?;
            image = Some(tx.core.mem().to_vec());
            Err::<(), _>(Error::Migration("roll back".into()))
        });
        image.unwrap()
    };
    let s = open(image).unwrap();
    assert!(matches!(
        s.report().opened,
        Opened::Recovered { records: 2 }
    ));
    assert_eq!(dump(&s).unwrap(), before);
}

#[test]
fn a_transaction_that_does_not_allocate_leaves_the_dynamic_header_alone() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[1, 2, 3]))
        .unwrap();
    let dynamic = |s: &State<Root>| s.image()[0x80..0xC0].to_vec();
    let before = dynamic(&s);
    let seq = s.commits().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.set(1, 5)).unwrap();
    assert_eq!(dynamic(&s), before, "header line rewritten");
    assert_eq!(s.commits().unwrap(), seq + 1);
    // A rolled-back transaction consumes its sequence number too.
    let _ = s.transaction(|tx| {
        tx.vec(r.vec)?.set(1, 6)?;
        Err::<(), _>(Error::Migration("no".into()))
    });
    assert_eq!(s.commits().unwrap(), seq + 2);
    // An allocating one rewrites it, checksum included (reopen checks it).
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[0; 100]))
        .unwrap();
    assert_ne!(dynamic(&s), before);
    let s = reopen(s);
    assert_eq!(s.vec(r.vec).unwrap()[..3], [1, 5, 3]);
    assert_eq!(s.vec(r.vec).unwrap().len(), 103);
}

/// A map with entries, viewed once in a committed transaction: its blocks
/// are known to the handle.
fn known_map_state() -> (State<Root>, Root) {
    let (mut s, r) = with_map((0..20u64).map(|k| (k, k)));
    assert_eq!(s.transaction(|tx| tx.map(r.map)?.len()).unwrap(), 20);
    let k = s.core.known_map.expect("the view's blocks are known");
    assert_eq!(k.map, r.map.offset());
    (s, r)
}

/// A view that knows the map's blocks compares their header words instead
/// of checking them again: the handle must forget them when the rest of
/// the check stops holding. Each case pins the forgetting (the handle's
/// state) and the behaviour (a view of a stale handle fails as it does
/// without the shortcut).
#[test]
fn known_map_blocks_are_forgotten_when_freed() {
    let (mut s, r) = known_map_state();
    // Later committed transactions of this handle keep them, views of
    // the map or not.
    for n in 1..=2 {
        s.transaction(|tx| tx.set_root(Root { n, ..r })).unwrap();
    }
    assert!(s.core.known_map.is_some());
    s.transaction(|tx| tx.map(r.map)?.insert(&100, &100))
        .unwrap();
    assert!(s.core.known_map.is_some());
    // The map freed: its block is a free block again, and a view of the
    // stale handle fails as it does without the shortcut.
    s.transaction(|tx| tx.map(r.map)?.free()).unwrap();
    assert!(s.core.known_map.is_none());
    let e = s.transaction(|tx| tx.map(r.map).map(|_| ())).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    assert!(e.to_string().contains("free block"), "{e}");
}

#[test]
fn known_map_blocks_are_forgotten_on_rollback() {
    let (mut s, _) = known_map_state();
    // A map made and viewed in a transaction that rolls back: its blocks
    // lie past the heap top again.
    let mut made = None;
    let e = s
        .transaction(|tx| {
            let h = tx.new_map::<u64, u64>()?;
            // Viewed, not grown: the header is the one the view knows.
            assert_eq!(tx.map(h)?.len()?, 0);
            made = Some(h);
            Err::<(), _>(Error::unsupported("rolled back"))
        })
        .unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    assert!(s.core.known_map.is_none());
    let h = made.unwrap();
    let e = s.transaction(|tx| tx.map(h).map(|_| ())).unwrap_err();
    assert!(e.is_corruption(), "{e}");
}

#[test]
fn known_map_blocks_are_forgotten_after_another_writers_transaction() {
    let (mut s, r) = known_map_state();
    // Another process's committed transaction, as it leaves the region:
    // the map's block freed and the commit word one further.
    let at = r.map.offset();
    let word = s.core.mem.load_u64(crate::format::TX_WORD).unwrap();
    let (seq, open) = crate::format::read_tx_word(word).unwrap();
    assert!(!open);
    let free = crate::format::block_header(crate::format::Kind::Free, 6, 0);
    s.core.mem.write("test", at, &free).unwrap();
    s.core
        .mem
        .store_word(
            crate::format::TX_WORD,
            crate::format::tx_word(seq + 1, false),
        )
        .unwrap();
    let e = s.transaction(|tx| tx.map(r.map).map(|_| ())).unwrap_err();
    assert!(e.to_string().contains("free block"), "{e}");
    assert!(s.core.known_map.is_none());
}

/// A map freed and then viewed again in the same transaction (the free
/// takes effect at the commit, so the view checks and remembers the
/// blocks again): the commit forgets them.
#[test]
fn known_map_blocks_freed_and_viewed_again_are_forgotten_at_commit() {
    let (mut s, r) = known_map_state();
    s.transaction(|tx| {
        tx.map(r.map)?.free()?;
        assert_eq!(tx.map(r.map)?.len()?, 0);
        assert!(tx.core.core.known_map.is_some());
        Ok::<_, Error>(())
    })
    .unwrap();
    assert!(s.core.known_map.is_none());
    let e = s.transaction(|tx| tx.map(r.map).map(|_| ())).unwrap_err();
    assert!(e.to_string().contains("free block"), "{e}");
}

/// A block header changed without a transaction (a stray write; a process
/// that writes without the protocol): the header word no longer matches
/// the one checked, and the view checks the block again and fails, as it
/// does without the shortcut. Fails if the words are not compared.
#[test]
fn known_map_blocks_are_checked_again_when_their_header_word_changes() {
    use crate::format::{Kind, block_header};
    for table in [false, true] {
        let (mut s, r) = known_map_state();
        let k = s.core.known_map.unwrap();
        let (at, class) = if table {
            (k.table, (k.table_word >> 32) as u32)
        } else {
            (k.map, (k.map_word >> 32) as u32)
        };
        assert_ne!(at, 0);
        s.core
            .mem
            .write("test", at, &block_header(Kind::Free, class, 0))
            .unwrap();
        let e = s
            .transaction(|tx| tx.map(r.map)?.insert(&100, &100))
            .unwrap_err();
        assert!(e.to_string().contains("free block"), "table {table}: {e}");
    }
}

/// `begin` knows the commit word this handle stored last without decoding
/// it again: any other word, a damaged one included, is decoded and
/// checked. Fails if the remembered word is used without comparing it.
#[test]
fn a_commit_word_changed_after_this_handles_commit_is_checked_again() {
    let (mut s, r) = known_map_state();
    let word = s.core.mem.load_u64(crate::format::TX_WORD).unwrap();
    s.transaction(|tx| tx.set_root(Root { n: 1, ..r })).unwrap();
    // The same word is read back as committed: the next one runs.
    s.transaction(|tx| tx.set_root(Root { n: 2, ..r })).unwrap();
    assert_eq!(s.root().unwrap().n, 2);
    let now = s.core.mem.load_u64(crate::format::TX_WORD).unwrap();
    assert_ne!(now, word);
    for bit in [0, 1, 40, 57] {
        let (mut s, _) = known_map_state();
        s.transaction(|tx| tx.set_root(Root { n: 1, ..r })).unwrap();
        let w = s.core.mem.load_u64(crate::format::TX_WORD).unwrap();
        s.core
            .mem
            .store_word(crate::format::TX_WORD, w ^ (1 << bit))
            .unwrap();
        let e = s
            .transaction(|tx| tx.set_root(Root { n: 3, ..r }))
            .unwrap_err();
        assert!(
            e.to_string().contains("commit word") || e.to_string().contains("open"),
            "bit {bit}: {e}"
        );
    }
}
