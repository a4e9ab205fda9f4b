//! The format 7 journal (a head claim and hash-checked records) and the
//! journal of formats 4 to 6 it replaces: crashes at every write of
//! one-insert transactions, a claim that tells a record a crash completed
//! but did not claim from damage, and a region kept at format 6 (shared
//! with an older build) written and recovered with the old journal.

use super::*;
use crate::format::{JOURNAL_OFF, RECORD_HEADER, SB_CRC, SB_FORMAT, read_tx_word};
use crate::journal::{self, Journal};
use crate::open::{Exclusive, OpenHooks};

/// `bytes` with the superblock's format field set to `format`.
fn with_format(mut bytes: Vec<u8>, format: u32) -> Vec<u8> {
    bytes[SB_FORMAT as usize..][..4].copy_from_slice(&format.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..SB_CRC as usize]);
    bytes[SB_CRC as usize..][..4].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn format_of(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[SB_FORMAT as usize..][..4].try_into().unwrap())
}

/// An exclusive open that does not upgrade, as a shared open does while a
/// process of an older build shares the region.
#[derive(Default)]
struct KeepFormat(Exclusive);

impl OpenHooks for KeepFormat {
    fn lock(
        &mut self,
        mem: &crate::mem::Mem,
        nonce: u64,
    ) -> Result<(crate::lock::Claim, u64, Option<u32>)> {
        self.0.lock(mem, nonce)
    }
    fn locked(&mut self, mem: &crate::mem::Mem, nonce: u64) -> Result<()> {
        self.0.locked(mem, nonce)
    }
    fn failed(&mut self, mem: &crate::mem::Mem) {
        self.0.failed(mem);
    }
    fn opened(&mut self, mem: &crate::mem::Mem) {
        self.0.opened(mem);
    }
    fn may_upgrade(&mut self, _mem: &crate::mem::Mem, _from: u32) -> bool {
        false
    }
}

fn open_keeping_format(bytes: Vec<u8>) -> State<Root> {
    let mut layout = layout();
    let (mem, expected) = State::<Root>::map_source(Source::heap(bytes), &mut layout).unwrap();
    let nonce = crate::owner::register_handle(mem.identity());
    State::open_locked(
        mem,
        nonce,
        expected,
        &mut layout,
        &mut KeepFormat::default(),
    )
    .unwrap()
}

fn open_seq(img: &[u8]) -> u64 {
    let (seq, open) =
        read_tx_word(u64::from_le_bytes(img[0xC0..0xC8].try_into().unwrap())).unwrap();
    assert!(open, "the image must hold an open transaction");
    seq
}

#[test]
fn a_new_region_writes_the_claimed_journal() {
    let s = fresh();
    assert_eq!(format_of(&s.image()), 7);
    assert_eq!(s.core.journal, Journal::Claimed);
    let s = open(with_format(s.close().unwrap().into_heap().unwrap(), 6)).unwrap();
    assert_eq!(s.report().upgraded_from, Some(6));
    assert_eq!(s.core.journal, Journal::Claimed, "after the upgrade");
    let s = open_keeping_format(with_format(s.close().unwrap().into_heap().unwrap(), 6));
    assert_eq!(s.core.journal, Journal::Legacy, "a region kept at format 6");
}

#[test]
fn a_crash_at_any_write_of_one_insert_or_remove_transactions() {
    // The common case: exact records of a slot and a map header's counts.
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| {
                for i in 0..20u64 {
                    tx.map(r.map)?.insert(&i, &i)?;
                }
                Ok::<_, Error>(())
            })
            .unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            tx.map(r.map)?.insert(&100, &1).map(|_| ())
        },
    );
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| tx.map(r.map)?.insert(&7, &7)).unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            tx.map(r.map)?.remove(&7).map(|_| ())
        },
    );
    // Small and whole-line records in turn, a line journaled whole after
    // an exact range of it.
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[1u32; 64]))
                .unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            let mut v = tx.vec(r.vec)?;
            v.set(0, 5)?;
            v.set(40, 6)?;
            v.set(1, 7)?;
            tx.map(r.map)?.insert(&1, &2)?;
            tx.root_mut()?.n = 9;
            Ok(())
        },
    );
}

/// An interrupted transaction of three or more records, the claim as the
/// transaction left it, and the positions where its records start.
fn interrupted_three() -> (Vec<u8>, Model, Vec<u64>) {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[1u32; 64]))
        .unwrap();
    let before = dump(&s).unwrap();
    // The image just before the commit: every record in, every claim.
    let mut img = None;
    s.transaction(|tx| {
        tx.vec(r.vec)?.set(0, 5)?;
        tx.vec(r.vec)?.set(40, 6)?;
        tx.root_mut()?.n = 3;
        img = Some(tx.core.mem().to_vec());
        Ok::<_, Error>(())
    })
    .unwrap();
    let img = img.unwrap();
    let seq = open_seq(&img);
    let mem = crate::mem::Mem::heap(img.clone(), 0, 0).unwrap();
    let (records, _) = journal::scan(&mem, 16 << 10, seq).unwrap();
    assert!(records.len() >= 3, "{} records", records.len());
    let starts = records
        .iter()
        .map(|r| r.data - RECORD_HEADER - JOURNAL_OFF)
        .collect();
    (img, before, starts)
}

fn claim_word(img: &[u8]) -> u64 {
    u64::from_le_bytes(img[JOURNAL_OFF as usize..][..8].try_into().unwrap())
}

/// The claim word of the transaction `img` holds, naming `pos`.
fn claim_at(img: &[u8], pos: u64) -> u64 {
    // The check half is the position XOR a mask of the sequence number.
    let word = claim_word(img);
    let mask = (word >> 32) as u32 ^ word as u32;
    pos | (u64::from(mask ^ pos as u32) << 32)
}

fn set_claim(img: &mut [u8], word: u64) {
    img[JOURNAL_OFF as usize..][..8].copy_from_slice(&word.to_le_bytes());
}

#[test]
fn the_claim_tells_a_record_completed_by_a_crash_from_damage() {
    let (img, before, starts) = interrupted_three();
    let n = starts.len();
    // As the transaction left it: every record claimed.
    assert_eq!(dump(&open(img.clone()).unwrap()).unwrap(), before);

    // A crash between the last record and its claim: the claim names the
    // last record's start, the record is complete. Rolled back (its range
    // was never written, so that writes back what is there).
    let mut crashed = img.clone();
    set_claim(&mut crashed, claim_at(&img, starts[n - 1]));
    let s = open(crashed.clone()).unwrap();
    assert_eq!(dump(&s).unwrap(), before);
    assert!(matches!(s.report().opened, Opened::Recovered { records } if records == n));

    // ... and torn instead: that record is ignored.
    let mut torn = crashed.clone();
    let last = (JOURNAL_OFF + starts[n - 1]) as usize;
    torn[last + RECORD_HEADER as usize] ^= 0x40;
    let s = open(torn).unwrap();
    assert!(matches!(s.report().opened, Opened::Recovered { records } if records == n - 1));

    // Two complete records past the claim: no crash leaves that.
    let mut back_two = img.clone();
    set_claim(&mut back_two, claim_at(&img, starts[n - 2]));
    let e = open(back_two).unwrap_err();
    assert!(e.is_corruption(), "{e}");

    // A claimed record damaged: refused, not half rolled back.
    let mut damaged = img.clone();
    damaged[(JOURNAL_OFF + starts[1]) as usize + RECORD_HEADER as usize] ^= 1;
    let e = open(damaged).unwrap_err();
    assert!(e.is_corruption(), "{e}");

    // A claim that is not the transaction's (damaged) with several records
    // behind it: refused; with only the first record, rolled back.
    for bit in [0, 17, 40, 63] {
        let mut bad = img.clone();
        set_claim(&mut bad, claim_word(&img) ^ (1 << bit));
        let e = open(bad).unwrap_err();
        assert!(e.is_corruption(), "claim bit {bit}: {e}");
    }
    let mut first_only = img.clone();
    set_claim(&mut first_only, claim_word(&img) ^ (1 << 40));
    let second = (JOURNAL_OFF + starts[1]) as usize;
    first_only[second + 8] ^= 0x80; // the second record torn
    let s = open(first_only).unwrap();
    assert!(matches!(
        s.report().opened,
        Opened::Recovered { records: 1 }
    ));

    // A claim naming a position inside a record: refused.
    let mut inside = img.clone();
    set_claim(&mut inside, claim_at(&img, starts[1] + 8));
    assert!(open(inside).unwrap_err().is_corruption());
}

#[test]
fn no_stale_record_of_an_earlier_transaction_is_rolled_back() {
    // Many transactions write records at the same journal positions with
    // the same contents; a crash right after the open word finds only the
    // earlier ones' records, none of this transaction's.
    let mut s = fresh();
    let r = *s.root().unwrap();
    for i in 0..5u64 {
        s.transaction(|tx| tx.map(r.map)?.insert(&1, &i).map(|_| ()))
            .unwrap();
    }
    let before = dump(&s).unwrap();
    // The second write is the open commit word's store (whole), after the
    // head's claim of nothing.
    s.core.mem.crash = Some(CrashPlan {
        countdown: 1,
        torn_prefix: 8,
        image: None,
    });
    s.transaction(|tx| tx.map(r.map)?.insert(&1, &9).map(|_| ()))
        .unwrap();
    let img = s.core.mem.crash.take().unwrap().image.unwrap();
    drop(s);
    let s = open(img).unwrap();
    assert!(matches!(
        s.report().opened,
        Opened::Recovered { records: 0 }
    ));
    assert_eq!(dump(&s).unwrap(), before);
}

/// A region kept at format 6 (shared with a process of a format 6 build)
/// is written with the old journal: a crash at every write of a
/// transaction leaves a journal that a format 6 build's recovery (the old
/// reader alone) rolls back right, and this build recovers it too (then
/// upgrades).
#[test]
fn a_region_kept_at_format_6_is_written_with_the_old_journal() {
    let base = with_format(populated(), 6);
    let before = dump(&open_keeping_format(base.clone())).unwrap();
    let mut after = None;
    let mut points = 0;
    for n in 0.. {
        let mut s = open_keeping_format(base.clone());
        assert_eq!(s.core.journal, Journal::Legacy);
        let r = *s.root().unwrap();
        s.core.mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: (n as usize * 7) % 72,
            image: None,
        });
        s.transaction(|tx| {
            tx.root_mut()?.n = 5;
            tx.map(r.map)?.insert(&1000, &1)?;
            tx.vec(r.vec)?.set(2, 9)?;
            tx.map(r.bmap)?.insert(b"new", b"value").map(|_| ())
        })
        .unwrap();
        let image = s.core.mem.crash.take().unwrap().image;
        after.get_or_insert_with(|| dump(&s).unwrap());
        drop(s);
        let Some(image) = image else { break };
        points += 1;
        assert_eq!(format_of(&image), 6);
        let (seq, is_open) =
            read_tx_word(u64::from_le_bytes(image[0xC0..0xC8].try_into().unwrap())).unwrap();
        if is_open {
            // What a format 6 build does: the old journal's reader alone.
            let mut mem = crate::mem::Mem::heap(image.clone(), 0, 0).unwrap();
            let records = journal::legacy_recovery_records(&mem, 16 << 10, seq)
                .unwrap_or_else(|e| panic!("crash at write {n}: {e}"));
            journal::apply_rollback(&mut mem, &records, seq).unwrap();
            let old_build = open_keeping_format(mem.to_vec());
            assert_eq!(
                dump(&old_build).unwrap(),
                before,
                "crash at write {n}: the old reader"
            );
        }
        let s = open(image).unwrap_or_else(|e| panic!("crash at write {n}: {e}"));
        let got = dump(&s).unwrap();
        assert!(
            got == before || Some(&got) == after.as_ref(),
            "crash at write {n}"
        );
        assert_eq!(s.report().upgraded_from, Some(6));
    }
    assert!(points > 10, "{points} crash points");
}

#[test]
fn a_region_kept_at_format_6_gets_the_tables_format_6_reads() {
    // Review finding: a region kept at format 6 (a peer of that build
    // shares it) got control-byte tables for maps made or grown there,
    // which the format 6 build refuses.
    let mut s = open_keeping_format(with_format(populated(), 6));
    assert_eq!(s.core.journal, Journal::Legacy);
    let r = *s.root().unwrap();
    let made = s
        .transaction(|tx| {
            let m = tx.new_map::<u64, u64>()?;
            for k in 0..200u64 {
                tx.map(m)?.insert(&k, &k)?;
                // The root's map grows (a rebuild) too.
                tx.map(r.map)?.insert(&(10_000 + k), &k)?;
            }
            Ok::<_, Error>(m)
        })
        .unwrap();
    for (what, off) in [("new map", made.offset()), ("grown map", r.map.offset())] {
        assert_eq!(
            key_kind(&s, off) & crate::map::CTRL_TABLE,
            0,
            "{what}: a control-byte table in a format 6 region"
        );
    }
    assert_eq!(format_of(&s.image()), 6);
}

/// A map's `key_kind` word as stored (the control-table flag in bit 16).
fn key_kind(s: &State<Root>, map: u64) -> u32 {
    let img = s.image();
    let at = (map + 16 + 32) as usize;
    u32::from_le_bytes(img[at..at + 4].try_into().unwrap())
}

/// Maps made by a build of format 6 or older (tables without control
/// bytes) are read and changed as they are, crash-atomically, and get
/// control bytes at their next rebuild.
#[test]
fn maps_without_control_bytes_keep_working_and_convert_at_their_next_rebuild() {
    crate::map::OLD_TABLES.with(|c| c.set(true));
    let old_maps = |s: &mut State<Root>| {
        let r = *s.root().unwrap();
        s.transaction(|tx| {
            for i in 0..20u64 {
                tx.map(r.map)?.insert(&i, &(i * 2))?;
                tx.map(r.bmap)?.insert(&[i as u8], &[i as u8; 9])?;
            }
            tx.map(r.map)?.remove(&3)?;
            tx.map(r.bmap)?.remove(&[4])
        })
        .unwrap();
        assert_eq!(key_kind(s, r.map.offset()) & crate::map::CTRL_TABLE, 0);
        crate::map::OLD_TABLES.with(|c| c.set(false));
    };
    crash_at_every_write(old_maps, |tx| {
        let r = *tx.root()?;
        tx.map(r.map)?.insert(&100, &1)?;
        tx.map(r.map)?.remove(&5)?;
        tx.map(r.map)?.insert(&6, &66)?;
        tx.map(r.bmap)?.insert(&[1], b"longer value")?;
        tx.map(r.bmap)?.remove(&[2])?;
        tx.map(r.bmap)?.insert(&[200], b"new")?;
        Ok(())
    });

    crate::map::OLD_TABLES.with(|c| c.set(true));
    let mut s = fresh();
    old_maps(&mut s);
    let r = *s.root().unwrap();
    // Changed without a rebuild: still no control bytes.
    s.transaction(|tx| tx.map(r.map)?.insert(&1000, &7).map(|_| ()))
        .unwrap();
    assert_eq!(key_kind(&s, r.map.offset()) & crate::map::CTRL_TABLE, 0);
    assert_eq!(s.map(r.map).unwrap().get(&1000).unwrap(), Some(&7));
    s.map(r.map).unwrap().verify().unwrap();
    // Grown: rebuilt with control bytes, every entry kept.
    s.transaction(|tx| {
        for i in 2000..2100u64 {
            tx.map(r.map)?.insert(&i, &i)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_ne!(key_kind(&s, r.map.offset()) & crate::map::CTRL_TABLE, 0);
    let m = s.map(r.map).unwrap();
    m.verify().unwrap();
    assert_eq!(m.len(), 19 + 1 + 100);
    for i in (0..20u64).filter(|&i| i != 3) {
        assert_eq!(m.get(&i).unwrap(), Some(&(i * 2)));
    }
    let s = reopen(s);
    dump(&s).unwrap();
}

/// A slot whose entry this transaction removed holds committed bytes: a
/// new entry written there is journaled (a free slot as committed is
/// written without a record).
#[test]
fn a_slot_freed_and_taken_again_in_one_transaction_is_journaled() {
    let k1 = 77u64;
    let cap = 8u64;
    let home = |k: u64| crate::map::hash(&k.to_le_bytes()) & (cap - 1);
    let k2 = (0..).find(|&k| k != k1 && home(k) == home(k1)).unwrap();
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| tx.map(r.map)?.insert(&k1, &1)).unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            let mut m = tx.map(r.map)?;
            assert!(m.remove(&k1)?);
            m.insert(&k2, &2)?;
            Ok(())
        },
    );
}

#[test]
fn a_claim_an_earlier_transaction_left_is_never_read_as_the_next_one_s() {
    // Review finding: the head's claim carries a 32-bit check of its
    // transaction's sequence number, and the head kept the last claim
    // between transactions. A leftover claim whose check matched the next
    // transaction's (one pair in 2^32) made a crash of that transaction
    // before its first claim look damaged: the open was refused. Each
    // transaction now claims nothing in the head before its open word.
    // Here the leftover matches by construction.
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.map(r.map)?.insert(&1, &1).map(|_| ()))
        .unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let (mut before, mut after, mut points) = (None, None, 0);
    for n in 0.. {
        let mut s = open(base.clone()).unwrap();
        before.get_or_insert_with(|| dump(&s).unwrap());
        let img = s.image();
        let (last, open_now) =
            read_tx_word(u64::from_le_bytes(img[0xC0..0xC8].try_into().unwrap())).unwrap();
        assert!(!open_now);
        // As if an earlier transaction had claimed records up to 4096 and
        // its check matched the next one's.
        let leftover = journal::claim(&journal::TxKey::new(last + 1), 4096);
        s.core.mem.store_word(JOURNAL_OFF, leftover).unwrap();
        s.core.mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: 8,
            image: None,
        });
        s.transaction(|tx| tx.map(r.map)?.insert(&2, &2).map(|_| ()))
            .unwrap();
        let image = s.core.mem.crash.take().unwrap().image;
        after.get_or_insert_with(|| dump(&s).unwrap());
        drop(s);
        let Some(image) = image else { break };
        points += 1;
        let s = open(image).unwrap_or_else(|e| panic!("crash at write {n}: refused: {e}"));
        let got = dump(&s).unwrap();
        assert!(
            Some(&got) == before.as_ref() || Some(&got) == after.as_ref(),
            "crash at write {n}"
        );
    }
    assert!(points > 3, "{points} crash points");
}
