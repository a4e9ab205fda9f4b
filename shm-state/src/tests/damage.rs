//! One flipped bit in a control word, or in the journal of an interrupted
//! transaction, never undoes a committed transaction nor rolls back half of
//! an interrupted one: the open gives exactly the right state, or refuses.

use super::*;

/// A populated state, closed (lock released): its image and contents.
fn committed() -> (Vec<u8>, Model) {
    let s = open(populated()).unwrap();
    let model = dump(&s).unwrap();
    (s.close().unwrap().into_heap().unwrap(), model)
}

/// A populated state killed in the middle of a transaction that changes
/// every structure: the image the crash left, and the state before it.
fn interrupted() -> (Vec<u8>, Model) {
    let mut s = open(populated()).unwrap();
    let before = dump(&s).unwrap();
    let r = *s.root().unwrap();
    s.core.mem.crash = Some(CrashPlan {
        countdown: 40,
        torn_prefix: 0,
        image: None,
    });
    s.transaction(|tx| {
        tx.root_mut()?.n = 77;
        for i in 0..10u64 {
            tx.vec(r.vec)?.set(i, 1000 + i as u32)?;
            tx.map(r.map)?.insert(&(i * 7), &i)?;
        }
        tx.map(r.bmap)?.remove(b"k9")?;
        tx.log(r.log)?.append(b"lost")
    })
    .unwrap();
    let image = s.core.mem.crash.take().unwrap().image.unwrap();
    drop(s);
    let tx = crate::format::read_tx_word(u64::from_le_bytes(image[0xC0..0xC8].try_into().unwrap()));
    assert!(tx.unwrap().1, "the crash must leave a transaction open");
    (image, before)
}

/// Opens `img` with bit `bit` of byte `byte` flipped: true when it opened
/// (to exactly `expected`), false when it was refused as damage.
fn opens_right_or_refuses(img: &[u8], byte: usize, bit: u32, expected: &Model) -> bool {
    let mut bad = img.to_vec();
    bad[byte] ^= 1 << bit;
    match open(bad) {
        Ok(s) => {
            let got = dump(&s).unwrap_or_else(|e| {
                panic!("bit {bit} of byte {byte:#x}: opened, but reading fails: {e}")
            });
            assert!(
                &got == expected,
                "bit {bit} of byte {byte:#x}: opened to another state"
            );
            true
        }
        Err(e) => {
            assert!(
                e.is_corruption() || matches!(e, Error::Locked { .. }),
                "bit {bit} of byte {byte:#x}: refused with {e}, not as damage"
            );
            false
        }
    }
}

/// Every bit of the header's words (superblock, dynamic header, commit
/// word, lock words, free-list heads, reserved bytes), and one bit of each
/// byte of the peer table.
fn header_bits() -> impl Iterator<Item = (usize, u32)> {
    let mut rng = Rng(0x0f1f_2f3f_4f5f_6f7f);
    let words = (0..0x340usize).flat_map(|byte| (0..8).map(move |bit| (byte, bit)));
    let peers: Vec<_> = (0x340..4096usize)
        .map(|byte| (byte, rng.below(8) as u32))
        .collect();
    words.chain(peers)
}

#[test]
fn one_flipped_header_bit_never_undoes_a_committed_transaction() {
    let (img, model) = committed();
    let (mut opened, mut refused) = (0, 0);
    for (byte, bit) in header_bits() {
        if opens_right_or_refuses(&img, byte, bit, &model) {
            opened += 1;
        } else {
            refused += 1;
        }
    }
    // Every bit of the commit word is checked (it used to roll back the
    // committed transaction when bit 0 flipped).
    for bit in 0..64 {
        let (byte, bit) = (0xC0 + bit / 8, bit as u32 % 8);
        let mut bad = img.clone();
        bad[byte] ^= 1 << bit;
        let e = open(bad).unwrap_err();
        assert!(e.to_string().contains("commit word"), "{e}");
    }
    eprintln!("committed image: {opened} flips opened to the committed state, {refused} refused");
    // Flips in the lock words of a released lock are harmless.
    assert!(opened >= 8 * 0x38, "{opened} opened, {refused} refused");
    // Every other bit below the shared line is checked.
    assert!(
        refused >= 8 * (0x300 - 0x38),
        "{opened} opened, {refused} refused"
    );
}

#[test]
fn one_flipped_header_bit_never_half_recovers_an_interrupted_transaction() {
    let (img, before) = interrupted();
    assert_eq!(dump(&open(img.clone()).unwrap()).unwrap(), before);
    let (mut opened, mut refused) = (0, 0);
    for (byte, bit) in header_bits() {
        if opens_right_or_refuses(&img, byte, bit, &before) {
            opened += 1;
        } else {
            refused += 1;
        }
    }
    eprintln!("interrupted image: {opened} flips opened to the state before, {refused} refused");
    assert!(refused >= 8 * (0x300 - 0x38), "{refused} refused");
}

/// Bit flips in the journal of an interrupted transaction: in a record, its
/// header or the journal's claim. Each opens to the state before the
/// transaction or is refused: a damaged record in the middle (or the last
/// one, followed by its terminator) used to end the scan early, rolling
/// back only the records before it.
#[test]
fn one_flipped_journal_bit_never_half_recovers_an_interrupted_transaction() {
    let (img, before) = interrupted();
    let seq = crate::format::read_tx_word(u64::from_le_bytes(img[0xC0..0xC8].try_into().unwrap()))
        .unwrap()
        .0;
    let mem = crate::mem::Mem::heap(img.clone(), 0, 0).unwrap();
    let (records, end) = crate::journal::scan(&mem, 16 << 10, seq).unwrap();
    assert!(records.len() >= 5, "{} records", records.len());
    let journal = crate::format::JOURNAL_OFF as usize;
    let used = journal + end as usize;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut opened, mut refused) = (0, 0);
    for byte in journal..used {
        let bit = rng.below(8) as u32;
        if opens_right_or_refuses(&img, byte, bit, &before) {
            opened += 1;
        } else {
            refused += 1;
        }
    }
    // The first record's data (a before-image) damaged: refused, since
    // intact records follow.
    let first_data =
        journal + (crate::journal::JOURNAL_HEAD + crate::format::RECORD_HEADER) as usize;
    assert!(!opens_right_or_refuses(&img, first_data, 0, &before));
    eprintln!("interrupted journal: {opened} flips opened to the state before, {refused} refused");
    assert!(
        refused > (used - journal) / 2,
        "{opened} opened, {refused} refused"
    );
}

/// A refused open leaves the bytes as they were (a file holds them).
#[test]
fn a_damaged_commit_word_or_journal_is_refused_and_left_untouched() {
    let (committed, _) = committed();
    let (interrupted, _) = interrupted();
    let first_data = (crate::format::JOURNAL_OFF
        + crate::journal::JOURNAL_HEAD
        + crate::format::RECORD_HEADER) as usize;
    for (name, img, byte) in [
        ("commit word bit 0", committed, 0xC0),
        ("first record's data", interrupted, first_data),
    ] {
        let mut bad = img.clone();
        bad[byte] ^= 1;
        let (r, after) = open_as_file(&bad, layout());
        let e = r.unwrap_err();
        assert!(e.is_corruption(), "{name}: {e}");
        assert!(after == bad, "{name}: the refused open changed the region");
    }
}

#[test]
fn slices_never_cover_the_atomic_words() {
    let s = fresh();
    let mem = &s.core.mem;
    for (off, len) in [(0xC0, 8), (0xB8, 16), (0xF8, 8), (0, 4096), (0x80, 0x41)] {
        let e = mem.bytes("test", off, len).unwrap_err();
        assert!(e.to_string().contains("commit and lock words"), "{e}");
    }
    assert!(mem.bytes("test", 0, 0xC0).is_ok());
    assert!(mem.bytes("test", 0x100, 8).is_ok());
    // A copy still holds every byte, the atomic words read atomically.
    let image = s.image();
    assert_eq!(image.len() as u64, mem.len());
    assert_eq!(
        u64::from_le_bytes(image[0xC0..0xC8].try_into().unwrap()),
        mem.load_u64(0xC0).unwrap()
    );
}

#[test]
fn a_bad_layout_is_refused_before_anything_is_touched() {
    let img = fresh().close().unwrap().into_heap().unwrap();
    for (journal, initial) in [(100, 4096), (4096 + 1, 4096), (1 << 20, u64::MAX - 1)] {
        let layout = Layout::<Root>::new(1)
            .journal_len(journal)
            .initial_len(initial);
        assert!(layout.check().is_err());
        let (r, after) = open_as_file(&img, layout);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("journal length"), "{e}");
        assert!(after == img, "journal {journal}: the refused open wrote");
    }
}

/// A stored root size larger than the whole region is damage: a migration
/// used to allocate that much (up to 4 GiB) to hand the old root over
/// (found by the `state_open` fuzz target).
#[test]
fn a_stored_root_larger_than_the_region_is_refused_not_allocated() {
    let mut img = fresh().close().unwrap().into_heap().unwrap();
    img[0x90..0x98].fill(0); // no root block: the old root would be zeros
    img[0xB4..0xB8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let crc = crc32fast::hash(&img[0x80..0xBC]);
    img[0xBC..0xC0].copy_from_slice(&crc.to_le_bytes());
    let layout = Layout::<Root>::new(2)
        .journal_len(16 << 10)
        .migrate(|_, old| panic!("migrated a root of {} bytes", old.bytes.len()));
    let e = State::<Root>::open(Source::heap(img), layout).unwrap_err();
    assert!(e.to_string().contains("root size"), "{e}");
}
