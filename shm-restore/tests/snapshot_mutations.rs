//! Hostile snapshot files: a mutation sweep over a valid snapshot's header
//! and chunk table, run through every reader of file data (`read_header`,
//! `verify` — the `--check` and load path — and `read_snapshot`).
//!
//! Each mutated file must give a validated result or an error of the
//! right kind (damage; "too large" only when the declared size is above
//! the maximum), never a panic, an I/O error (a read outside the lengths
//! the reader validated) or an allocation larger than what the file
//! really holds. Files are in memory: a mutated file may also be "sparse",
//! as long as its header says, reading as zeros past its real bytes, as
//! the 68 GB sparse file of issue 9 does.
//!
//! This test binary has a global allocator that records the largest
//! single allocation while a reader runs (and refuses any over 256 MiB,
//! so a reader that sizes a buffer by a count from the file fails here
//! instead of taking the machine's memory). It holds one test, so no other
//! test's allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use shm_restore::format::{self, ENTRY_LEN, HEADER_LEN};
use shm_restore::{
    DEFAULT_MAX_DATA_LEN, DirStorage, Extent, Image, ReadAt, ReadError, SaveOptions, Saver,
    read_header, read_snapshot, verify,
};

/// Records the largest allocation while `TRACKING` is set.
struct Tracking;

static TRACKING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Larger requests fail while tracking (any reader must cope: no file in
/// this test holds more than a few KiB of real bytes).
const REFUSED_ABOVE: usize = 256 << 20;

fn admit(size: usize) -> bool {
    if !TRACKING.load(Ordering::Relaxed) {
        return true;
    }
    LARGEST.fetch_max(size, Ordering::Relaxed);
    size <= REFUSED_ABOVE
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged (or returns null, which callers of `alloc` must handle).
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by `System` (every allocation goes
        // through this type), with `layout`, as the caller guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// A file: its real bytes, then zeros up to `len` (a sparse tail).
struct Fake {
    bytes: Vec<u8>,
    len: u64,
}

impl ReadAt for Fake {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let real = self.bytes.len() as u64;
        let copied = end.min(real).saturating_sub(offset) as usize;
        if copied > 0 {
            let at = offset as usize;
            buf[..copied].copy_from_slice(&self.bytes[at..at + copied]);
        }
        buf[copied..].fill(0);
        Ok(())
    }
}

/// A valid snapshot of a 20000-byte memfd with a hole: three chunks of a
/// 4096-byte chunk size (4096 + 904 bytes, then 3000 bytes at 12288).
fn base_snapshot() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..8000u32).map(|i| (i * 31 % 251) as u8).collect();
    let image = Image::from_parts(
        20_000,
        vec![
            Extent {
                offset: 0,
                len: 5000,
            },
            Extent {
                offset: 12_288,
                len: 3000,
            },
        ],
        bytes,
    )
    .unwrap();
    let options = SaveOptions::builder().chunk_size(4096).build().unwrap();
    let mut saver = Saver::new(DirStorage::new(dir.path()), OsStr::new("s.snap"), options);
    saver.save(&image, 1_700_000_000_000_000_000).unwrap();
    std::fs::read(dir.path().join("s.snap")).unwrap()
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recomputes the table CRC (in the header) and then the header CRC, so
/// that a mutation reaches the checks behind them.
fn fix_crcs(b: &mut [u8]) {
    let count = get_u64(b, 48);
    let table_end = count
        .checked_mul(ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(HEADER_LEN as u64))
        .filter(|&end| end <= b.len() as u64);
    if let Some(end) = table_end {
        // Only the table's real bytes: a sparse tail's zeros are not in
        // `b`, and a table running into it needs its own CRC, which no
        // writer could have made without writing those bytes.
        let crc = crc32fast::hash(&b[HEADER_LEN..end as usize]);
        b[80..84].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32fast::hash(&b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
}

/// The file length the header in `b` implies, if it is representable.
fn declared_len(b: &[u8]) -> Option<u64> {
    let data_offset = get_u64(b, 72);
    let stored_len = get_u64(b, 56);
    data_offset.checked_add(stored_len)
}

/// What a reader said, comparable between readers.
#[derive(Debug, PartialEq)]
enum Verdict {
    Valid,
    Damaged(String),
    TooLarge,
}

/// Runs every reader on `file`; checks the rules above. Returns the
/// verdict of `verify` at the default maximum.
fn check(what: &str, file: &Fake) -> Verdict {
    let real = file.bytes.len();
    // One table piece (64 KiB, also the largest table reservation), one
    // chunk and the real bytes (read_snapshot holds the data), plus slack
    // for messages.
    let bound = real + (64 << 10) + 4096 + 4096;
    let verdict = |r: Result<(), ReadError>, max: u64, declared: u64| match r {
        Ok(()) => Verdict::Valid,
        Err(ReadError::Damaged(d)) => Verdict::Damaged(d.to_string()),
        Err(ReadError::TooLarge { data_len, max: m }) => {
            assert_eq!((data_len, m), (declared, max), "{what}");
            assert!(data_len > max, "{what}");
            Verdict::TooLarge
        }
        Err(e) => panic!("{what}: an error other than damage or size: {e:?}"),
    };
    let declared = if real >= 32 {
        get_u64(&file.bytes, 24)
    } else {
        0
    };
    let mut verdicts = Vec::new();
    for max in [u64::MAX, DEFAULT_MAX_DATA_LEN, 10_000] {
        LARGEST.store(0, Ordering::Relaxed);
        TRACKING.store(true, Ordering::Relaxed);
        let header = read_header(file, max).map(drop);
        let checked = verify(file, max);
        let snapshot = read_snapshot(file, max);
        TRACKING.store(false, Ordering::Relaxed);
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest <= bound,
            "{what}: allocated {largest} bytes, the file holds {real}"
        );
        // The readers agree: the full ones with each other, and the header
        // reader with them as far as it reads.
        let (v_header, v_checked) = (
            verdict(header, max, declared),
            verdict(checked.as_ref().map(drop).map_err(clone), max, declared),
        );
        let v_snapshot = verdict(snapshot.as_ref().map(drop).map_err(clone), max, declared);
        assert_eq!(v_checked, v_snapshot, "{what}");
        if v_header != Verdict::Valid {
            assert_eq!(v_header, v_checked, "{what}");
        }
        if let (Ok((h, chunks)), Ok(s)) = (checked, snapshot) {
            // A correct load: what the validated table describes.
            assert_eq!(h.file_len(), file.len, "{what}");
            assert_eq!(s.header(), &h, "{what}");
            assert_eq!(s.chunks(), &chunks[..], "{what}");
            let image = s.into_image();
            assert_eq!(image.data_len(), h.data_len, "{what}");
            assert_eq!(image.bytes().len() as u64, h.stored_len, "{what}");
        }
        verdicts.push(v_checked);
    }
    verdicts.swap_remove(1)
}

fn clone(e: &ReadError) -> ReadError {
    match e {
        ReadError::Damaged(d) => ReadError::Damaged(d.clone()),
        ReadError::TooLarge { data_len, max } => ReadError::TooLarge {
            data_len: *data_len,
            max: *max,
        },
        ReadError::Io(e) => ReadError::Io(io::Error::new(e.kind(), e.to_string())),
        _ => panic!("an unknown ReadError: {e:?}"),
    }
}

/// The header fields and every table entry's fields: (name, offset, size).
fn fields(chunks: usize) -> Vec<(String, usize, usize)> {
    let mut f: Vec<(String, usize, usize)> = [
        ("magic", 0, 8),
        ("version", 8, 4),
        ("header_len", 12, 4),
        ("chunk_size", 16, 4),
        ("flags", 20, 4),
        ("data_len", 24, 8),
        ("generation", 32, 8),
        ("saved_at_ns", 40, 8),
        ("chunk_count", 48, 8),
        ("stored_len", 56, 8),
        ("table_offset", 64, 8),
        ("data_offset", 72, 8),
        ("table_crc", 80, 4),
        ("reserved", 84, 8),
        ("header_crc", 124, 4),
    ]
    .iter()
    .map(|&(n, at, size)| (n.to_owned(), at, size))
    .collect();
    for i in 0..chunks {
        let at = HEADER_LEN + i * ENTRY_LEN;
        f.push((format!("entry {i} offset"), at, 8));
        f.push((format!("entry {i} len"), at + 8, 4));
        f.push((format!("entry {i} crc"), at + 12, 4));
    }
    f
}

/// Hostile values for a field of `size` bytes holding `orig`, in a file
/// of `len` bytes: zero, ones, limits of u32/u64 and around them, the
/// format's own limits, and the file's length.
fn hostile(size: usize, orig: u64, len: u64) -> Vec<u64> {
    let mut v = vec![
        0,
        1,
        2,
        4095,
        4096,
        4097,
        1 << 26,
        (1 << 26) + 1,
        (1 << 31) - 1,
        1 << 31,
        u64::from(u32::MAX) - 1,
        u64::from(u32::MAX),
        orig.wrapping_add(1),
        orig.wrapping_sub(1),
        orig.wrapping_mul(2),
        !orig,
    ];
    if size == 8 {
        v.extend([
            1 << 32,
            (1 << 32) + 1,
            1 << 36,
            1 << 40,
            len - 1,
            len,
            len + 1,
            (1 << 63) - 1,
            1 << 63,
            u64::MAX - 4095,
            u64::MAX - 1,
            u64::MAX,
        ]);
    }
    let max = if size == 8 {
        u64::MAX
    } else {
        u64::from(u32::MAX)
    };
    v.retain(|&x| x <= max && x != orig);
    v.sort_unstable();
    v.dedup();
    v
}

fn put(b: &mut [u8], at: usize, size: usize, value: u64) {
    b[at..at + size].copy_from_slice(&value.to_le_bytes()[..size]);
}

fn get(b: &[u8], at: usize, size: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..size].copy_from_slice(&b[at..at + size]);
    u64::from_le_bytes(v)
}

#[test]
fn every_mutation_of_the_header_and_table_is_refused_or_loads_correctly() {
    let base = base_snapshot();
    let len = base.len() as u64;
    let chunks = get_u64(&base, 48) as usize;
    assert_eq!(chunks, 3);
    let table_end = HEADER_LEN + chunks * ENTRY_LEN;
    let mut runs = 0usize;
    let mut valid = 0usize;
    let mut run = |what: &str, file: Fake| {
        runs += 1;
        if check(what, &file) == Verdict::Valid {
            valid += 1;
        }
    };
    run(
        "the base",
        Fake {
            bytes: base.clone(),
            len,
        },
    );

    // 1. Every byte of the header and table set to hostile values: with
    // the CRCs as they were (the CRCs catch it), and with the CRCs made
    // to match (the checks behind them must catch it).
    for at in 0..table_end {
        for value in [0x00u8, 0x01, 0x7F, 0x80, 0xFE, 0xFF, base[at] ^ 0x10] {
            if value == base[at] {
                continue;
            }
            let mut b = base.clone();
            b[at] = value;
            run(
                &format!("byte {at} = {value:#04x}"),
                Fake {
                    bytes: b.clone(),
                    len,
                },
            );
            if !(124..128).contains(&at) {
                fix_crcs(&mut b);
                run(
                    &format!("byte {at} = {value:#04x}, CRCs fixed"),
                    Fake { bytes: b, len },
                );
            }
        }
    }

    // 2. Every field set to hostile numbers, CRCs fixed, in a file as
    // long as before and in one as long as the mutated header declares
    // (a sparse tail of zeros, or cut short).
    for (name, at, size) in fields(chunks) {
        let orig = get(&base, at, size.min(8));
        for value in hostile(size.min(8), orig, len) {
            let mut b = base.clone();
            put(&mut b, at, size.min(8), value);
            if name != "header_crc" {
                fix_crcs(&mut b);
            }
            let what = format!("{name} = {value}");
            run(
                &what,
                Fake {
                    bytes: b.clone(),
                    len,
                },
            );
            if let Some(declared) = declared_len(&b).filter(|&d| d != len) {
                if declared < len {
                    b.truncate(declared as usize);
                }
                run(
                    &format!("{what}, file of {declared} bytes"),
                    Fake {
                        bytes: b,
                        len: declared,
                    },
                );
            }
        }
    }

    // 3. The sparse-file attack of issue 9: huge chunk counts with every
    // header field consistent (data_offset, stored_len, data_len, CRCs)
    // and a file exactly as long, nearly all of it zeros; the three real
    // entries stay at the front of the table.
    for shift in [12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 59] {
        let count = 1u64 << shift;
        for per_chunk in [1u64, 4096] {
            let Some(stored) = count.checked_mul(per_chunk) else {
                continue;
            };
            let Some(data_offset) = format::data_offset_for(count) else {
                continue;
            };
            for data_len in [stored, stored.saturating_mul(2), u64::MAX] {
                let mut b = base[..table_end].to_vec();
                put(&mut b, 24, 8, data_len);
                put(&mut b, 48, 8, count);
                put(&mut b, 56, 8, stored);
                put(&mut b, 72, 8, data_offset);
                fix_crcs(&mut b);
                let Some(file_len) = data_offset.checked_add(stored) else {
                    continue;
                };
                run(
                    &format!("{count} chunks of {per_chunk} bytes, data_len {data_len}"),
                    Fake {
                        bytes: b,
                        len: file_len,
                    },
                );
            }
        }
    }

    // 4. Every length of the file: each prefix, and zeros appended.
    for cut in 0..len {
        run(
            &format!("cut to {cut} bytes"),
            Fake {
                bytes: base[..cut as usize].to_vec(),
                len: cut,
            },
        );
    }
    for extra in [1, 4096, 1 << 32, 1 << 40] {
        run(
            &format!("{extra} zeros appended"),
            Fake {
                bytes: base.clone(),
                len: len + extra,
            },
        );
    }

    println!("{runs} mutated files through every reader, {valid} of them valid");
    assert!(runs > 10_000, "{runs}");
    // What may change and still load, CRCs fixed: the generation, the
    // save time, a larger data_len (more holes at the end), a chunk moved
    // within the gaps; everything else is refused.
    assert!(valid > 0 && valid < runs / 10, "{valid} of {runs}");
}
