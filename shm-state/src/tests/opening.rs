//! What open does with what it finds: a memfd source, foreign data,
//! zeroed headers, older formats, and refused files left byte for byte.

use super::*;

#[test]
fn memfd_source_grows_the_memfd() {
    let fd = shm_fd::SharedFd::create("shm-state-test", shm_fd::CreateOptions::default()).unwrap();
    let dup = fd.try_clone().unwrap();
    // SAFETY: a private memfd, sealed against shrinking.
    let mut s = State::<Root>::open(unsafe { Source::shared(fd) }, layout()).unwrap();
    s.transaction(|tx| {
        let v = tx.new_vec::<u32>()?;
        tx.root_mut()?.vec = v;
        let mut v = tx.vec(v)?;
        for i in 0..50_000 {
            v.push(i)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert!(dup.len().unwrap() >= 200_000);
    drop(s);
    // SAFETY: as above.
    let s = State::<Root>::open(unsafe { Source::shared(dup) }, layout()).unwrap();
    assert_eq!(s.vec(s.root().unwrap().vec).unwrap().len(), 50_000);
}

#[test]
fn foreign_data_is_refused_and_left_untouched() {
    let mut data = b"PRIMES\x00\x01".to_vec();
    data.resize(10_000, 7);
    let e = open(data.clone()).unwrap_err();
    assert!(matches!(e, Error::NotAState { .. }), "{e}");
    // A short region with data, and one with our magic but truncated.
    assert!(matches!(open(vec![1, 2, 3]), Err(Error::NotAState { .. })));
    let img = fresh().image();
    for cut in [8usize, 100, 4095, 4096, 5000, 4096 + 16 * 1024 - 1] {
        let e = open(img[..cut].to_vec()).unwrap_err();
        assert!(e.is_corruption(), "cut at {cut}: {e}");
    }
    let fd = tempfile::tempfile().unwrap();
    std::fs::File::set_len(&fd, 0).unwrap();
    use std::io::Write;
    (&fd).write_all(&data).unwrap();
    // SAFETY: a private temp file.
    let e = State::<Root>::open(unsafe { Source::file(fd.try_clone().unwrap()) }, layout())
        .unwrap_err();
    assert!(matches!(e, Error::NotAState { .. }));
    assert_eq!(
        std::fs::read(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap(),
        data
    );
}

#[test]
fn a_state_with_its_magic_or_header_zeroed_is_refused_not_recreated() {
    let mut s = fresh();
    s.transaction(|tx| {
        tx.root_mut()?.n = 5;
        Ok::<_, Error>(())
    })
    .unwrap();
    let img = s.close().unwrap().into_heap().unwrap();
    let mut no_magic = img.clone();
    no_magic[..8].fill(0);
    let mut no_header = img.clone();
    no_header[..4096].fill(0);
    let mut creating = img.clone();
    creating[..8].copy_from_slice(crate::format::CREATING_MAGIC);
    for (name, bad) in [
        ("magic zeroed", no_magic),
        ("header zeroed", no_header),
        ("creating magic over a used state", creating),
    ] {
        let e = open(bad.clone()).unwrap_err();
        assert!(
            matches!(e, Error::Corrupted(_)),
            "{name}: {e} (must never be a silent reset)"
        );
        // Refused without a write: a file copy is byte for byte the same.
        let file = tempfile::tempfile().unwrap();
        std::fs::write(
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)),
            &bad,
        )
        .unwrap();
        // SAFETY: a private temp file, never truncated.
        let source = unsafe { Source::file(file.try_clone().unwrap()) };
        assert!(State::<Root>::open(source, layout()).is_err());
        let after = std::fs::read(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ))
        .unwrap();
        assert!(after == bad, "{name}: the refused open changed the file");
    }
}

#[test]
fn refused_opens_leave_the_file_byte_for_byte() {
    use std::io::{Read, Seek, Write};
    let read_all = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&populated()).unwrap();
    let before = read_all(&mut file);
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct Other(u64);
    let file_source = |f| {
        // SAFETY: a private temp file, never truncated.
        unsafe { Source::file(f) }
    };
    let attempts: Vec<Box<dyn Fn(std::fs::File) -> Error>> = vec![
        Box::new(|f| State::<Other>::open(file_source(f), Layout::new(1)).unwrap_err()),
        Box::new(|f| State::<Root>::open(file_source(f), Layout::new(2)).unwrap_err()),
        Box::new(|f| {
            let l = Layout::<Other>::new(1).migrate(|_, _| Err(Error::Migration("no".into())));
            State::open(file_source(f), l).unwrap_err()
        }),
    ];
    for (i, attempt) in attempts.iter().enumerate() {
        attempt(file.try_clone().unwrap());
        let after = read_all(&mut file);
        // A failed migration is an aborted transaction: it leaves its journal
        // records and consumes a sequence number, nothing else.
        let bookkeeping = |j: usize| {
            i == 2 && ((0xC0..0xC8).contains(&j) || (0x1000..0x1000 + (16 << 10)).contains(&j))
        };
        let diff: Vec<usize> = (0..before.len().min(after.len()))
            .filter(|&j| before[j] != after[j] && !bookkeeping(j))
            .collect();
        assert!(
            after.len() == before.len() && diff.is_empty(),
            "refused open {i} changed the file: lengths {} -> {}, bytes {diff:x?}",
            before.len(),
            after.len()
        );
    }
    // A damaged dynamic header is found after the lock is taken: restored too.
    let mut bad = before.clone();
    bad[crate::format::DY_USED as usize] ^= 4;
    file.rewind().unwrap();
    file.write_all(&bad).unwrap();
    // SAFETY: a private temp file.
    let e = State::<Root>::open(unsafe { Source::file(file.try_clone().unwrap()) }, layout())
        .unwrap_err();
    assert!(e.to_string().contains("header checksum"), "{e}");
    assert!(
        read_all(&mut file) == bad,
        "a refused open changed the file"
    );
}

#[test]
fn regions_of_formats_1_to_3_are_refused_and_left_untouched() {
    use std::io::{Read, Seek, Write};
    for old in [1u32, 2, 3] {
        let mut img = fresh().close().unwrap().into_heap().unwrap();
        img[8..12].copy_from_slice(&old.to_le_bytes());
        let crc = crc32fast::hash(&img[..0x7C]);
        img[0x7C..0x80].copy_from_slice(&crc.to_le_bytes());
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&img).unwrap();
        // SAFETY: a private temp file, never truncated.
        let source = unsafe { Source::file(file.try_clone().unwrap()) };
        let e = State::<Root>::open(source, layout()).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedFormat { found, supported: crate::FORMAT_VERSION } if found == old),
            "{e}"
        );
        let mut after = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut after).unwrap();
        assert!(after == img, "a refused open changed the region");
    }
}

#[test]
fn regions_of_formats_4_to_6_are_upgraded_by_their_first_open_and_a_crash_rolls_the_upgrade_back() {
    for from in [4u32, 5, 6] {
        upgrade_from(from);
    }
}

fn upgrade_from(from: u32) {
    use crate::format::{SB_CRC, SB_FORMAT};
    // A format 4 or 5 region: the same bytes but the format field (formats
    // 5 and 6 changed no byte of a region outside the shared line and the
    // peer table, which format 4 keeps zero, and entries 64..68, which
    // format 5 keeps zero).
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.map(r.bmap)?.insert(b"k", b"seven").map(|_| ()))
        .unwrap();
    let mut img = s.close().unwrap().into_heap().unwrap();
    img[SB_FORMAT as usize..][..4].copy_from_slice(&from.to_le_bytes());
    let crc = crc32fast::hash(&img[..SB_CRC as usize]);
    img[SB_CRC as usize..][..4].copy_from_slice(&crc.to_le_bytes());
    let old = img.clone();
    let value = |s: &State<Root>| {
        let r = *s.root().unwrap();
        s.map(r.bmap)
            .unwrap()
            .get(b"k")
            .unwrap()
            .map(<[u8]>::to_vec)
    };

    let s = open(img).unwrap();
    assert_eq!(s.report().upgraded_from, Some(from));
    assert!(
        s.report()
            .to_string()
            .contains(&format!("upgraded from format {from}")),
        "{}",
        s.report()
    );
    assert_eq!(value(&s), Some(b"seven".to_vec()));
    let img = s.close().unwrap().into_heap().unwrap();
    assert_eq!(
        u32::from_le_bytes(img[8..12].try_into().unwrap()),
        crate::FORMAT_VERSION
    );
    let s = open(img).unwrap();
    assert_eq!(s.report().upgraded_from, None, "upgraded once");
    drop(s);

    // A crash at every write of the upgrading open leaves a region that
    // opens (upgraded or not) with the data intact.
    let mut points = 0;
    for n in 0.. {
        let Some(torn) = open_crashing(old.clone(), layout(), n, 3) else {
            break;
        };
        points += 1;
        let s = open(torn).unwrap_or_else(|e| panic!("format {from}, crash at write {n}: {e}"));
        assert_eq!(
            value(&s),
            Some(b"seven".to_vec()),
            "format {from}, crash at write {n}"
        );
    }
    assert!(points > 5, "{points} crash points");
}
