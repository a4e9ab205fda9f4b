//! Damaged regions: flipped and random bytes, impossible counts and
//! sizes, blocks of the wrong kind: an error, never a panic or UB.

use super::*;

#[test]
fn flipped_header_bits_are_detected() {
    let img = populated();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // Every bit of the checksummed and validated header bytes (the lock
    // words at 0xC8..0x100, the shared line 0x300..0x340 and the peer table
    // 0x340..0x1000 are judged, not checked: see docs; the commit word at
    // 0xC0 carries its own check byte).
    for byte in (0..0x300usize).filter(|b| !(0xC8..0x100).contains(b)) {
        let bit = rng.below(8);
        let mut bad = img.clone();
        bad[byte] ^= 1 << bit;
        let r = open(bad);
        assert!(
            r.is_err(),
            "flipping bit {bit} of header byte {byte:#x} went unnoticed"
        );
    }
}

#[test]
fn random_damage_never_panics() {
    let img = populated();
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    let mut opened = 0;
    for _ in 0..3000 {
        let mut bad = img.clone();
        for _ in 0..1 + rng.below(8) {
            let i = rng.below(bad.len() as u64) as usize;
            bad[i] ^= 1 << rng.below(8);
        }
        if rng.below(10) == 0 {
            let cut = rng.below(bad.len() as u64) as usize;
            bad.truncate(cut);
        }
        if let Ok(s) = open(bad) {
            opened += 1;
            // Reading everything either works or reports an error.
            let _ = dump(&s);
        }
    }
    assert!(opened > 0, "flips in data blocks still open");
    // Random bytes everywhere.
    for _ in 0..200 {
        let len = 64 + rng.below(20_000) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(open(bytes).is_err());
    }
}

/// `repro -- tombs / len / log / reserve`: counts in a damaged region and
/// huge requests are errors, not arithmetic overflow panics.
#[test]
fn damaged_counts_and_huge_sizes_are_errors_not_panics() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| {
        let mut m = tx.map(r.map)?;
        for k in 0..6u64 {
            m.insert(&k, &k)?;
        }
        tx.log(r.log)?.append(b"x")
    })
    .unwrap();
    let img = s.close().unwrap().into_heap().unwrap();
    let map_hdr = r.map.offset() + 16;
    // A removal that leaves a tombstone, then the header's count zeroed.
    let mut with_tomb = None;
    for k in 0..6u64 {
        let mut s = open(img.clone()).unwrap();
        s.transaction(|tx| tx.map(r.map)?.remove(&k)).unwrap();
        let after = s.close().unwrap().into_heap().unwrap();
        if get_u64(&after, map_hdr + 8) == 1 {
            with_tomb = Some((k, after));
            break;
        }
    }
    let (k, mut bad) = with_tomb.expect("a tombstone");
    put_u64(&mut bad, map_hdr + 8, 0);
    let mut s = open(bad).unwrap();
    let e = s
        .transaction(|tx| tx.map(r.map)?.insert(&k, &99))
        .unwrap_err();
    assert!(e.to_string().contains("tombstone"), "{e}");
    // Entries in the table, none in the header's count.
    let mut bad = img.clone();
    put_u64(&mut bad, map_hdr, 0);
    let mut s = open(bad).unwrap();
    let e = s.transaction(|tx| tx.map(r.map)?.remove(&3)).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    // A log whose record count is at its maximum.
    let mut bad = img.clone();
    put_u64(&mut bad, r.log.offset() + 16, u64::MAX);
    let mut s = open(bad).unwrap();
    let e = s.transaction(|tx| tx.log(r.log)?.append(b"y")).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    // Sizes past the format's largest block.
    let mut s = open(img).unwrap();
    for n in [(1u64 << 60) + 1, u64::MAX / 8, u64::MAX] {
        let e = s
            .transaction(|tx| {
                let v = tx.new_vec::<u64>()?;
                tx.vec(v)?.reserve(n)
            })
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{n}: {e}");
    }
}

/// A damaged live slot met by the rebuild of a full table fails the insert
/// before anything changed: the transaction's other work commits, and the
/// map keeps its table.
#[test]
fn a_damaged_slot_fails_the_growth_before_it_changes_anything() {
    // Seven entries fill a table of 8 slots: the eighth rebuilds it.
    let (s, r) = with_map((0..7u64).map(|k| (k, k)));
    let img = s.close().unwrap().into_heap().unwrap();
    let hdr = r.map.offset() + 16;
    let (cap, table) = (get_u64(&img, hdr + 16), get_u64(&img, hdr + 24));
    assert_eq!(cap, 8);
    let mut bad = img.clone();
    let live = (0..cap)
        .find(|&i| img[(table + 16 + i) as usize] >= 0x80)
        .expect("a live slot");
    // Its tag no longer has its control byte as top byte.
    let at = table + 16 + cap + live * 24;
    put_u64(&mut bad, at, get_u64(&img, at) ^ (1 << 56));
    let mut s = open(bad).unwrap();
    let used = s.used_bytes().unwrap();
    let e = s
        .transaction(|tx| {
            let e = tx.map(r.map)?.insert(&100, &100).unwrap_err();
            tx.set_root(Root { n: 7, ..r })?;
            Ok::<_, Error>(e)
        })
        .unwrap();
    assert!(e.to_string().contains("a live slot with tag"), "{e}");
    assert_eq!(s.root().unwrap().n, 7, "the transaction committed");
    assert_eq!(s.used_bytes().unwrap(), used, "no table was allocated");
    let img = s.close().unwrap().into_heap().unwrap();
    assert_eq!(get_u64(&img, hdr + 16), 8);
    assert_eq!(get_u64(&img, hdr + 24), table);
}

/// A free block forged over the end of a map's table, on the free list the
/// rebuilt table is taken from: `alloc` writes its header into bytes the
/// rebuild has checked already, and the rebuild refuses the overlap
/// instead of copying them. The transaction rolls back; the map is intact.
#[test]
fn a_free_block_forged_over_the_old_table_fails_the_growth() {
    use crate::format::{FREE_HEADS, Kind, block_header, class_for, free_head};
    // Fourteen entries fill a table of 16 slots: the fifteenth rebuilds
    // it at 32.
    let (mut s, r) = with_map((0..14u64).map(|k| (k, k * 3)));
    // Room past the table for the forged block (a class 10 block).
    s.transaction(|tx| tx.vec(r.vec)?.reserve(4096)).unwrap();
    let hdr = r.map.offset() + 16;
    let img = s.image();
    let (cap, table) = (get_u64(&img, hdr + 16), get_u64(&img, hdr + 24));
    assert_eq!(cap, 16);
    // The old table's bytes: 16 control bytes, 16 slots of 24 bytes.
    let end = table + 16 + cap * 25;
    let forged = end - 16;
    let class = class_for(32 * 25).unwrap();
    s.core
        .mem
        .write("test", forged, &block_header(Kind::Free, class, 0))
        .unwrap();
    s.core
        .mem
        .write(
            "test",
            FREE_HEADS + u64::from(class) * 8,
            &free_head(forged).to_le_bytes(),
        )
        .unwrap();
    let before = s.image();
    let e = s
        .transaction(|tx| tx.map(r.map)?.insert(&100, &1).map(|_| ()))
        .unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
    // Rolled back: the map's header and table (forged block included)
    // byte for byte as they were, the key absent.
    let after = s.image();
    let map_bytes = |img: &[u8]| img[hdr as usize..(hdr + 48) as usize].to_vec();
    assert_eq!(map_bytes(&after), map_bytes(&before));
    assert_eq!(
        after[table as usize..(end + 16) as usize],
        before[table as usize..(end + 16) as usize]
    );
    assert_eq!(s.map(r.map).unwrap().get(&100).unwrap(), None);
}

/// `repro -- foreign`: a byte-string slot naming another kind of block
/// cannot free it, and `verify` checks the root pointer.
#[test]
fn a_map_slot_cannot_free_a_block_of_another_kind() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.map(r.bmap)?.insert(b"k", b"v").map(|_| ()))
        .unwrap();
    let img = s.close().unwrap().into_heap().unwrap();
    let root_block = get_u64(&img, 0x90);
    let hdr = r.bmap.offset() + 16;
    let (cap, table) = (get_u64(&img, hdr + 16), get_u64(&img, hdr + 24));
    let mut bad = img.clone();
    for i in 0..cap {
        // A table with control bytes: `cap` of them before the slots.
        let at = table + 16 + cap + i * 24;
        if img[(table + 16 + i) as usize] >= 0x80 {
            put_u64(&mut bad, at + 16, root_block); // the value names the root
        }
    }
    let mut s = open(bad).unwrap();
    let e = s
        .transaction(|tx| tx.map(r.bmap)?.remove(b"k"))
        .unwrap_err();
    assert!(e.to_string().contains("not a byte string"), "{e}");
    s.verify().unwrap();
    assert_eq!(s.root().unwrap().n, 0);
    // A root pointer naming another block is caught by verify.
    let root_len = size_of::<Root>() as u64;
    let other = r.vec.offset();
    s.core
        .mem
        .write("test", crate::format::DY_ROOT, &other.to_le_bytes())
        .unwrap();
    let _ = root_len;
    let e = s.verify().unwrap_err();
    assert!(e.to_string().contains("root"), "{e}");
}

/// `repro -- fuzz`: random damage in the heap, then every kind of change:
/// errors, never a panic (debug builds check every overflow).
#[test]
fn random_damage_then_changes_never_panic() {
    let img = populated();
    let heap_off = 4096 + (16 << 10);
    let r = *open(img.clone()).unwrap().root().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let runs = env_count("SHM_STATE_FUZZ", 3000);
    let mut opened = 0;
    for _ in 0..runs {
        let mut bad = img.clone();
        for _ in 0..1 + rng.below(4) {
            let i = heap_off + rng.below((bad.len() - heap_off) as u64) as usize;
            let w = i & !7;
            match rng.below(3) {
                0 => bad[i] ^= 1 << rng.below(8),
                1 => put_u64(&mut bad, w as u64, rng.below(4096)),
                _ => put_u64(&mut bad, w as u64, u64::MAX),
            }
        }
        let Ok(mut s) = open(bad) else { continue };
        opened += 1;
        let k = rng.below(80);
        let _ = s.transaction(|tx| {
            let _ = tx.vec(r.vec).and_then(|mut v| {
                v.push(1)?;
                v.pop()?;
                v.set(k, 3)
            });
            let _ = tx.map(r.map).and_then(|mut m| {
                m.insert(&k, &1)?;
                m.remove(&(k + 1))?;
                Ok(())
            });
            let _ = tx.map(r.bmap).and_then(|mut m| {
                m.insert(b"k1", b"zz")?;
                m.remove(format!("k{k}").as_bytes())?;
                Ok(())
            });
            let _ = tx.log(r.log).and_then(|mut l| l.append(b"rec"));
            let _ = tx.cell_mut(r.cell).map(|c| *c = c.wrapping_add(1));
            Ok::<_, Error>(())
        });
        let _ = s.transaction(|tx| {
            tx.map(r.bmap)?.clear()?;
            tx.log(r.log)?.clear()?;
            tx.map(r.map)?.clear()?;
            tx.vec(r.vec)?.reserve(100)
        });
        let _ = dump(&s);
    }
    assert!(
        opened > runs / 2,
        "{opened} of {runs} damaged images opened"
    );
}
