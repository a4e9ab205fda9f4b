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
//! The same for version 2 (deltas): a delta saved by a real `Saver` and
//! its base are mutated (header, table, chain fields, whole-cell rule,
//! every length; the base while the delta is intact), written next to
//! each other in a directory and run through `inspect` (`--check`) and
//! `restore` into a fresh memfd, which must load exactly the state the
//! chain describes (computed here independently, link by link), fall back
//! on `.prev`, or refuse, as `docs/snapshot-format.md` says.
//!
//! This test binary has a global allocator that records the largest
//! single allocation while a reader runs (and refuses any over 256 MiB,
//! so a reader that sizes a buffer by a count from the file fails here
//! instead of taking the machine's memory). Its tests take turns
//! (`SERIAL`), so no other test's allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use shm_restore::format::{self, Base, Chunk, ENTRY_LEN, HEADER_LEN, Header, MAX_DEPTH};
use shm_restore::{
    DEFAULT_MAX_DATA_LEN, DirStorage, Error, Extent, Image, LoadOutcome, ReadAt, ReadError,
    SaveOptions, SaveOutcome, Saver, data_extents, inspect, read_header, read_snapshot, restore,
    verify,
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

/// Held by each test for its whole run: the allocation record is global.
static SERIAL: Mutex<()> = Mutex::new(());

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
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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

// ---------------------------------------------------------------------
// Version 2: a delta and its base.

/// The series name of the delta tests' files (bases are `state.snap.gen-N`).
const SERIES: &str = "state.snap";
/// The chunk size (and cell) of the delta tests.
const CELL: usize = 4096;
/// The memfd of the delta tests: 16 whole cells and a last one of 1000
/// bytes.
const STATE_LEN: usize = 16 * CELL + 1000;
/// States are compared byte by byte up to here; past it they must hold
/// no data (a mutated size may declare terabytes of holes).
const CAP: u64 = 1 << 20;
/// The time of every save and load (names `.corrupt-` files).
const NOW: u64 = 1_700_000_000_000_000_000;

/// A sparse image of the dense `state`: its cells of zeros are holes.
fn image_of(state: &[u8]) -> Image {
    let mut extents: Vec<Extent> = Vec::new();
    let mut bytes = Vec::new();
    for (i, cell) in state.chunks(CELL).enumerate() {
        if cell.iter().all(|&b| b == 0) {
            continue;
        }
        let offset = (i * CELL) as u64;
        match extents.last_mut() {
            Some(e) if e.offset + e.len == offset => e.len += cell.len() as u64,
            _ => extents.push(Extent {
                offset,
                len: cell.len() as u64,
            }),
        }
        bytes.extend_from_slice(cell);
    }
    Image::from_parts(state.len() as u64, extents, bytes).unwrap()
}

/// A full snapshot (generation 1) and a delta on it (generation 2), both
/// written by a real `Saver`, with the states they hold.
struct Series {
    /// `state.snap.gen-1`: the full snapshot, 13 chunks, a hole in cells
    /// 6..10.
    base: Vec<u8>,
    /// `state.snap`: the delta, 3 whole cells (1, 7 of the hole, and the
    /// last one of 1000 bytes).
    delta: Vec<u8>,
    /// The state of the base.
    old: Vec<u8>,
    /// The state of the delta.
    new: Vec<u8>,
}

fn delta_series() -> Series {
    let dir = tempfile::tempdir().unwrap();
    let options = SaveOptions::builder()
        .chunk_size(CELL as u32)
        .max_chain(8)
        .build()
        .unwrap();
    let mut saver = Saver::new(DirStorage::new(dir.path()), OsStr::new(SERIES), options);
    let mut old: Vec<u8> = (0..STATE_LEN).map(|i| (i * 7 % 253) as u8 | 1).collect();
    old[6 * CELL..10 * CELL].fill(0);
    saver.save(&image_of(&old), NOW).unwrap();
    let mut new = old.clone();
    new[CELL + 5] ^= 0xFF;
    new[7 * CELL + 9] = 0x42;
    new[16 * CELL + 999] ^= 0xFF;
    let report = match saver.save(&image_of(&new), NOW + 1).unwrap() {
        SaveOutcome::Saved(r) => r,
        other => panic!("the second save: {other:?}"),
    };
    let b = report.base.expect("the second save is a delta");
    assert_eq!((report.generation, b.generation, b.depth), (2, 1, 1));
    saver.wait_retired();
    let delta = std::fs::read(dir.path().join(SERIES)).unwrap();
    let base = std::fs::read(dir.path().join(format!("{SERIES}.gen-1"))).unwrap();
    assert_eq!(get(&delta, 8, 4), 2, "version 2");
    assert_eq!(get_u64(&delta, 48), 3, "three cells");
    assert_eq!(get(&base, 8, 4), 1, "version 1");
    assert_eq!(get_u64(&base, 48), 13);
    Series {
        base,
        delta,
        old,
        new,
    }
}

/// A memfd's contents: its size and its first `CAP` bytes (no data past
/// them).
#[derive(Clone, PartialEq, Eq)]
struct State {
    len: u64,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "State {{ len: {}, crc of the first {} bytes: {:#010x} }}",
            self.len,
            self.bytes.len(),
            crc32fast::hash(&self.bytes)
        )
    }
}

impl State {
    fn empty(len: u64) -> State {
        State {
            len,
            bytes: vec![0; len.min(CAP) as usize],
        }
    }

    fn dense(bytes: &[u8]) -> State {
        State {
            len: bytes.len() as u64,
            bytes: bytes.to_vec(),
        }
    }

    /// Cut or extended with zeros to `len`.
    fn resize(&mut self, len: u64) {
        self.len = len;
        self.bytes.resize(len.min(CAP) as usize, 0);
    }

    fn put(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i as u64;
            if at < CAP {
                self.bytes[at as usize] = b;
            } else {
                assert_eq!(b, 0, "a test file holds data past {CAP}");
            }
        }
    }
}

/// The files of a snapshot directory, by name.
type Files = BTreeMap<String, Vec<u8>>;

fn prev_name() -> String {
    format!("{SERIES}.prev")
}

fn gen_name(generation: u64) -> String {
    format!("{SERIES}.gen-{generation}")
}

/// The state the snapshot `bytes` describes with its chain, computed here
/// link by link from the format's rules (each file checked alone by
/// `read_snapshot`, the links by generation, header CRC, depth and chunk
/// size; a delta's state is its base's cut or extended to its size with
/// its cells replaced); `None` when the chain is broken anywhere.
fn chain_state(files: &Files, bytes: &[u8], head_chunk_size: u32) -> Option<State> {
    let s = read_snapshot(bytes, u64::MAX).ok()?;
    let h = *s.header();
    let mut state = match h.base {
        None => State::empty(h.data_len),
        Some(base) => {
            let b = files.get(&gen_name(base.generation))?;
            let bh = read_header(b.as_slice(), u64::MAX).ok()?;
            if bh.generation != base.generation
                || bh.crc() != base.header_crc
                || bh.base.map_or(0, |x| x.depth) + 1 != base.depth
                || (bh.is_delta() && bh.chunk_size != head_chunk_size)
            {
                return None;
            }
            // Depths strictly fall along a chain: the walk ends.
            let mut state = chain_state(files, b, head_chunk_size)?;
            state.resize(h.data_len);
            state
        }
    };
    let chunks = s.chunks().to_vec();
    let image = s.into_image();
    let mut at = 0;
    for c in chunks {
        let n = c.len as usize;
        state.put(c.offset, &image.bytes()[at..at + n]);
        at += n;
    }
    Some(state)
}

/// What a file (with its chain) is to a load with the maximum `max`.
#[derive(Debug, PartialEq)]
enum Head {
    Missing,
    Damaged,
    /// Its header is intact and declares more than `max` (refused before
    /// the table or any base is read).
    TooLarge,
    Valid(State),
}

fn head(files: &Files, name: &str, max: u64) -> Head {
    let Some(bytes) = files.get(name) else {
        return Head::Missing;
    };
    match read_header(bytes.as_slice(), u64::MAX) {
        Err(_) => Head::Damaged,
        Ok(h) if h.data_len > max => Head::TooLarge,
        Ok(h) => chain_state(files, bytes, h.chunk_size).map_or(Head::Damaged, Head::Valid),
    }
}

/// The outcome of a load.
#[derive(Debug, PartialEq)]
enum Load {
    Loaded { state: State, fallback: bool },
    NoSnapshot,
    TooLarge,
    NothingValid,
}

/// What `restore` must do with `files` (the table of "Loading" in
/// docs/snapshot-format.md).
fn expected_load(files: &Files, max: u64) -> Load {
    let main = head(files, SERIES, max);
    match main {
        Head::Valid(state) => {
            return Load::Loaded {
                state,
                fallback: false,
            };
        }
        Head::TooLarge => return Load::TooLarge,
        Head::Missing | Head::Damaged => {}
    }
    match head(files, &prev_name(), max) {
        Head::Valid(state) => Load::Loaded {
            state,
            fallback: true,
        },
        Head::Missing if main == Head::Missing => Load::NoSnapshot,
        _ => Load::NothingValid,
    }
}

fn write_dir(dir: &Path, files: &Files) {
    for e in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn read_dir_files(dir: &Path) -> Files {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn memfd() -> File {
    shm_fd::SharedFd::create("snapshot-mutations", Default::default())
        .unwrap()
        .into_file()
}

fn memfd_state(m: &File) -> State {
    let len = m.metadata().unwrap().len();
    let mut bytes = vec![0; len.min(CAP) as usize];
    FileExt::read_exact_at(m, &mut bytes, 0).unwrap();
    let past: Vec<Extent> = data_extents(m, len)
        .unwrap()
        .into_iter()
        .filter(|e| e.offset + e.len > CAP)
        .collect();
    assert!(past.is_empty(), "data past {CAP}: {past:?}");
    State { len, bytes }
}

fn memfd_is_empty(m: &File) -> bool {
    let len = m.metadata().unwrap().len();
    len == 0 || data_extents(m, len).unwrap().is_empty()
}

/// What a load of `files` may allocate for its set of replaced cells: it
/// holds one entry per delta table entry (already read, so bounded by
/// the files' bytes), never a bit per cell of a declared size.
fn cell_map_bound(files: &Files, _max: u64) -> usize {
    files.values().map(|b| b.len()).sum::<usize>() * 4
}

/// A hand-built delta: its name, `data_len`, `chunk_size` and cells
/// (offset, bytes).
type HandDelta = (&'static str, u64, u32, Vec<(u64, Vec<u8>)>);
/// A chain case: its name and the (file, byte, value) edits making it.
type ChainCase = (&'static str, Vec<(usize, usize, u64)>);

/// Counts of the delta sweep.
#[derive(Debug, Default)]
struct Tally {
    /// Directories loaded (each with `inspect` and `restore`).
    dirs: usize,
    /// `restore` calls.
    loads: usize,
    /// Loads of the snapshot itself (its chain valid).
    loaded: usize,
    /// Loads of `.prev` in its place.
    fallbacks: usize,
    /// Loads refused (nothing valid, or too large).
    refused: usize,
    /// The largest allocation seen during a load, and its case.
    largest: (usize, String),
}

/// Writes `files` into `dir`, then runs `inspect` (`--check`) and
/// `restore` into a fresh memfd at each maximum of `maxes`, checking each
/// against the chain computed here: the state loaded is exactly the one
/// the chain (or `.prev`'s) describes; a refusal changes no file and
/// leaves the memfd empty; a fallback moves the snapshot aside byte for
/// byte; nothing panics; no allocation exceeds the files' real bytes, one
/// table piece, a chunk and the head's cell map.
fn disk_case(what: &str, dir: &Path, files: &Files, maxes: &[u64], tally: &mut Tally) {
    tally.dirs += 1;
    let real: usize = files.values().map(Vec::len).sum();
    let path = dir.join(SERIES);
    for &max in maxes {
        let bound = real + (64 << 10) + 4096 + (16 << 10) + cell_map_bound(files, max);
        write_dir(dir, files);

        // --check: the whole chain verified at any size, then the size.
        let want_check = match head(files, SERIES, u64::MAX) {
            Head::Valid(s) if s.len > max => "too large",
            Head::Valid(_) => "valid",
            Head::Missing => "missing",
            _ => "damaged",
        };
        LARGEST.store(0, Ordering::Relaxed);
        TRACKING.store(true, Ordering::Relaxed);
        let inspection = inspect(&path, max);
        TRACKING.store(false, Ordering::Relaxed);
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest <= bound,
            "{what}: --check allocated {largest}, bound {bound}"
        );
        let got_check = match &inspection.verdict {
            Ok(()) => "valid",
            Err(Error::TooLarge { .. }) => "too large",
            Err(e) if e.is_corrupt() => {
                assert!(!e.to_string().contains('\n'), "{what}: {e}");
                "damaged"
            }
            Err(e) if e.is_not_found() => "missing",
            Err(e) => panic!("{what}: --check: {e}"),
        };
        assert_eq!(got_check, want_check, "{what} (max {max}): {inspection:?}");
        if got_check == "valid" {
            let h = inspection.header.unwrap();
            let depth = h.base.map_or(0, |b| b.depth) as usize;
            assert_eq!(inspection.bases.len(), depth, "{what}");
        }
        assert_eq!(read_dir_files(dir), *files, "{what}: --check changed files");

        // The load.
        let want = expected_load(files, max);
        let m = memfd();
        LARGEST.store(0, Ordering::Relaxed);
        TRACKING.store(true, Ordering::Relaxed);
        let outcome = restore(&path, &m, max, NOW, None);
        TRACKING.store(false, Ordering::Relaxed);
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest <= bound,
            "{what} (max {max}): the load allocated {largest}, bound {bound}"
        );
        if largest > tally.largest.0 {
            tally.largest = (largest, format!("{what} (max {max})"));
        }
        tally.loads += 1;
        let got = match outcome {
            Ok(LoadOutcome::Loaded {
                fallback,
                header,
                chain,
                ..
            }) => {
                assert_eq!(chain.first(), Some(&header), "{what}");
                assert_eq!(
                    chain.len(),
                    1 + header.base.map_or(0, |b| b.depth) as usize,
                    "{what}"
                );
                Load::Loaded {
                    state: memfd_state(&m),
                    fallback: fallback.is_some(),
                }
            }
            Ok(LoadOutcome::NoSnapshot) => Load::NoSnapshot,
            Ok(other) => panic!("{what}: {other:?}"),
            Err(Error::TooLarge { .. }) => Load::TooLarge,
            Err(e @ Error::NothingValid { .. }) => {
                assert!(!e.to_string().contains('\n'), "{what}: {e}");
                Load::NothingValid
            }
            Err(e) => panic!("{what} (max {max}): an error other than damage or size: {e}"),
        };
        assert_eq!(got, want, "{what} (max {max})");
        match got {
            Load::Loaded {
                fallback: false, ..
            } => {
                tally.loaded += 1;
                assert_eq!(read_dir_files(dir), *files, "{what}: a load changed files");
            }
            Load::Loaded { fallback: true, .. } => {
                tally.fallbacks += 1;
                // The damaged snapshot moved aside, byte for byte; nothing
                // else changed.
                let mut now = read_dir_files(dir);
                if let Some(main) = files.get(SERIES) {
                    let moved: Vec<String> = now
                        .keys()
                        .filter(|n| n.starts_with(&format!("{SERIES}.corrupt-")))
                        .cloned()
                        .collect();
                    assert_eq!(moved.len(), 1, "{what}: {moved:?}");
                    assert_eq!(now.remove(&moved[0]).as_ref(), Some(main), "{what}");
                    now.insert(SERIES.to_owned(), main.clone());
                }
                assert_eq!(now, *files, "{what}: a fallback changed other files");
            }
            Load::TooLarge | Load::NothingValid => {
                tally.refused += 1;
                assert_eq!(
                    read_dir_files(dir),
                    *files,
                    "{what}: a refusal changed files"
                );
                assert!(memfd_is_empty(&m), "{what}: a refusal left data");
            }
            Load::NoSnapshot => {}
        }
    }
}

/// `state.snap` = `delta`, `state.snap.gen-1` = `base`, `.prev` = `prev`.
fn dir_of(delta: Option<&[u8]>, base: Option<&[u8]>, prev: Option<&[u8]>) -> Files {
    let mut f = Files::new();
    for (name, bytes) in [
        (SERIES.to_owned(), delta),
        (gen_name(1), base),
        (prev_name(), prev),
    ] {
        if let Some(b) = bytes {
            f.insert(name, b.to_vec());
        }
    }
    f
}

/// The header and table fields of a delta: as `fields`, with the chain
/// fields in place of the first reserved bytes.
fn delta_fields(chunks: usize) -> Vec<(String, usize, usize)> {
    let mut f = fields(chunks);
    let at = f.iter().position(|(n, ..)| n == "reserved").unwrap();
    f.splice(
        at..=at,
        [
            ("base_generation", 84, 8),
            ("base_crc", 92, 4),
            ("depth", 96, 4),
            ("reserved", 100, 8),
            ("reserved", 116, 8),
        ]
        .iter()
        .map(|&(n, at, size)| (n.to_owned(), at, size)),
    );
    f
}

/// Recomputes every chunk CRC inside the file, then the table's and the
/// header's (as `fix_crcs`): a mutated file made valid as far as its
/// checksums go.
fn fix_all_crcs(b: &mut [u8]) {
    let count = get_u64(b, 48) as usize;
    let mut at = get_u64(b, 72) as usize;
    for i in 0..count {
        let e = HEADER_LEN + i * ENTRY_LEN;
        if e + ENTRY_LEN > b.len() {
            break;
        }
        let len = get(b, e + 8, 4) as usize;
        if at + len > b.len() {
            break;
        }
        let crc = crc32fast::hash(&b[at..at + len]);
        b[e + 12..e + 16].copy_from_slice(&crc.to_le_bytes());
        at += len;
    }
    fix_crcs(b);
}

/// A delta made here, not by a `Saver`: valid in every respect the
/// arguments do not break (CRCs, lengths, the data region).
fn build_delta(
    data_len: u64,
    chunk_size: u32,
    generation: u64,
    base: Base,
    cells: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    let chunks: Vec<Chunk> = cells
        .iter()
        .map(|(offset, bytes)| Chunk {
            offset: *offset,
            len: bytes.len() as u32,
            crc: crc32fast::hash(bytes),
        })
        .collect();
    let table = format::encode_table(&chunks);
    let data_offset = format::data_offset_for(chunks.len() as u64).unwrap();
    let header = Header {
        chunk_size,
        data_len,
        generation,
        saved_at_ns: NOW,
        chunk_count: chunks.len() as u64,
        stored_len: cells.iter().map(|(_, b)| b.len() as u64).sum(),
        data_offset,
        table_crc: crc32fast::hash(&table),
        base: Some(base),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(&table);
    out.resize(data_offset as usize, 0);
    for (_, bytes) in cells {
        out.extend_from_slice(bytes);
    }
    out
}

/// The delta sweep's files and counts.
struct Sweep<'a> {
    dir: &'a Path,
    base: &'a [u8],
    delta: &'a [u8],
    tally: Tally,
    memory_runs: usize,
    base_cases: usize,
}

impl Sweep<'_> {
    /// Runs `bytes` (a delta, read as `file_len` bytes: more is a sparse
    /// tail) through the readers of one file and, when it is real and
    /// `maxes` is not empty, with the base intact through --check and
    /// loads at each maximum (`.prev` an intact copy of the base), and at
    /// the default maximum without a `.prev`.
    fn run_delta(&mut self, what: &str, bytes: Vec<u8>, file_len: u64, maxes: &[u64]) {
        self.memory_runs += 1;
        check(
            what,
            &Fake {
                bytes: bytes.clone(),
                len: file_len,
            },
        );
        if file_len != bytes.len() as u64 || maxes.is_empty() {
            return;
        }
        let base = Some(self.base);
        let files = dir_of(Some(&bytes), base, base);
        disk_case(what, self.dir, &files, maxes, &mut self.tally);
        let files = dir_of(Some(&bytes), base, None);
        let what = format!("{what}, no .prev");
        let default = [DEFAULT_MAX_DATA_LEN];
        disk_case(&what, self.dir, &files, &default, &mut self.tally);
    }

    /// Loads the intact delta over the base `b` (`None`: missing), with
    /// `.prev` an intact copy of the base, the same file as `b` (as a
    /// save leaves them: two names of one inode), or missing. The delta
    /// must never load over a base that is not byte for byte the one it
    /// names.
    fn run_base(&mut self, what: &str, b: Option<Vec<u8>>) {
        self.base_cases += 1;
        let bb = b.as_deref();
        for (prev, label) in [
            (Some(self.base), "an intact .prev"),
            (bb, ".prev the same file"),
            (None, "no .prev"),
        ] {
            let files = dir_of(Some(self.delta), bb, prev);
            if bb != Some(self.base) {
                assert!(
                    !matches!(head(&files, SERIES, u64::MAX), Head::Valid(_)),
                    "{what}: the oracle took a changed base"
                );
            }
            let what = format!("base {what}, {label}");
            let default = [DEFAULT_MAX_DATA_LEN];
            disk_case(&what, self.dir, &files, &default, &mut self.tally);
        }
    }
}

#[test]
fn every_mutation_of_a_delta_and_of_its_base_loads_its_chain_falls_back_or_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = std::time::Instant::now();
    let Series {
        base,
        delta,
        old,
        new,
    } = delta_series();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let len = delta.len() as u64;
    let chunks = get_u64(&delta, 48) as usize;
    let table_end = HEADER_LEN + chunks * ENTRY_LEN;
    let mut tally = Tally::default();
    let both = [u64::MAX, DEFAULT_MAX_DATA_LEN];
    let default = [DEFAULT_MAX_DATA_LEN];

    // The chain as saved: the new state; without the delta, `.prev`'s.
    let saved = dir_of(Some(&delta), Some(&base), Some(&base));
    assert_eq!(
        expected_load(&saved, u64::MAX),
        Load::Loaded {
            state: State::dense(&new),
            fallback: false
        }
    );
    disk_case("the delta as saved", dir, &saved, &both, &mut tally);
    assert_eq!(
        expected_load(&dir_of(None, Some(&base), Some(&base)), u64::MAX),
        Load::Loaded {
            state: State::dense(&old),
            fallback: true
        }
    );
    // A maximum below the delta's size: refused, .prev not tried.
    disk_case("the delta, max 10000", dir, &saved, &[10_000], &mut tally);
    assert_eq!(expected_load(&saved, 10_000), Load::TooLarge);
    let mut cx = Sweep {
        dir,
        base: &base,
        delta: &delta,
        tally,
        memory_runs: 0,
        base_cases: 0,
    };

    // 1. Every byte of the delta's header and table set to hostile
    // values, with the CRCs as they were and made to match.
    for at in 0..table_end {
        for value in [0x00u8, 0x01, 0x7F, 0x80, 0xFE, 0xFF, delta[at] ^ 0x10] {
            if value == delta[at] {
                continue;
            }
            let mut b = delta.clone();
            b[at] = value;
            cx.run_delta(
                &format!("delta byte {at} = {value:#04x}"),
                b.clone(),
                len,
                &default,
            );
            if !(124..128).contains(&at) {
                fix_crcs(&mut b);
                cx.run_delta(
                    &format!("delta byte {at} = {value:#04x}, CRCs fixed"),
                    b,
                    len,
                    &default,
                );
            }
        }
    }

    // 2. Every field set to hostile numbers, CRCs fixed; also in a file
    // as long as the mutated header declares.
    for (name, at, size) in delta_fields(chunks) {
        let orig = get(&delta, at, size.min(8));
        for value in hostile(size.min(8), orig, len) {
            let mut b = delta.clone();
            put(&mut b, at, size.min(8), value);
            if name != "header_crc" {
                fix_crcs(&mut b);
            }
            let what = format!("delta {name} = {value}");
            cx.run_delta(&what, b.clone(), len, &both);
            if let Some(declared) = declared_len(&b).filter(|&d| d != len) {
                if declared < len {
                    b.truncate(declared as usize);
                }
                cx.run_delta(
                    &format!("{what}, file of {declared} bytes"),
                    b,
                    declared,
                    &both,
                );
            }
        }
    }

    // 3. The chain fields around their limits (CRCs fixed): the header
    // refuses base_generation outside 1..generation and depth outside
    // 1..=1024; a depth, generation or CRC that disagrees with the base
    // breaks the chain.
    let base_crc = get(&base, 124, 4) as u32;
    let generation = get_u64(&delta, 32);
    assert_eq!(generation, 2);
    let chain_cases: Vec<ChainCase> = vec![
        ("base_generation 0", vec![(84, 8, 0)]),
        ("base_generation = generation", vec![(84, 8, generation)]),
        (
            "base_generation > generation",
            vec![(84, 8, generation + 1)],
        ),
        ("base_generation u64::MAX", vec![(84, 8, u64::MAX)]),
        ("depth 0", vec![(96, 4, 0)]),
        ("depth 2 (the base is full)", vec![(96, 4, 2)]),
        ("depth 1024", vec![(96, 4, u64::from(MAX_DEPTH))]),
        ("depth 1025", vec![(96, 4, u64::from(MAX_DEPTH) + 1)]),
        ("depth u32::MAX", vec![(96, 4, u64::from(u32::MAX))]),
        (
            "base_crc off by one bit",
            vec![(92, 4, u64::from(base_crc ^ 1))],
        ),
        ("base_crc 0", vec![(92, 4, 0)]),
        ("reserved byte 100", vec![(100, 1, 1)]),
        ("reserved byte 123", vec![(123, 1, 0x80)]),
        ("version 1 with chain fields", vec![(8, 4, 1)]),
        ("version 3", vec![(8, 4, 3)]),
        // Valid: a later generation on the same base.
        ("generation 3", vec![(32, 8, 3)]),
        ("generation u64::MAX", vec![(32, 8, u64::MAX)]),
        // The base named by generation 3, which does not exist.
        ("generation 5 on base 3", vec![(32, 8, 5), (84, 8, 3)]),
    ];
    for (what, sets) in &chain_cases {
        let mut b = delta.clone();
        for &(at, size, value) in sets {
            put(&mut b, at, size, value);
        }
        fix_crcs(&mut b);
        cx.run_delta(&format!("delta {what}, CRCs fixed"), b, len, &both);
    }
    // Generation 5 on base 3, where state.snap.gen-3 holds the base
    // (whose generation is 1): broken, not loaded.
    let mut on_3 = delta.clone();
    put(&mut on_3, 32, 8, 5);
    put(&mut on_3, 84, 8, 3);
    fix_crcs(&mut on_3);
    let mut files = dir_of(Some(&on_3), Some(&base), Some(&base));
    files.insert(gen_name(3), base.clone());
    assert_eq!(head(&files, SERIES, u64::MAX), Head::Damaged);
    disk_case(
        "a delta on base 3, .gen-3 of generation 1",
        cx.dir,
        &files,
        &both,
        &mut cx.tally,
    );
    // The valid ones did load the new state.
    for what in ["generation 3", "generation u64::MAX"] {
        let (_, sets) = chain_cases.iter().find(|(w, _)| *w == what).unwrap();
        let mut b = delta.clone();
        for &(at, size, value) in sets {
            put(&mut b, at, size, value);
        }
        fix_crcs(&mut b);
        assert_eq!(
            expected_load(&dir_of(Some(&b), Some(&base), None), u64::MAX),
            Load::Loaded {
                state: State::dense(&new),
                fallback: false
            },
            "{what}"
        );
    }

    // 4. Deltas made here: valid ones (no cells, cut, grown, a larger
    // cell than the base's, a huge sparse size) load what their chain
    // says; each break of the whole-cell rule is refused as such.
    let b1 = Base {
        generation: 1,
        header_crc: base_crc,
        depth: 1,
    };
    let cell_of = |state: &[u8], offset: usize, n: usize| state[offset..offset + n].to_vec();
    let mut changed = old.clone();
    changed[CELL..2 * CELL].fill(0x77);
    let valid: Vec<HandDelta> = vec![
        (
            "cells 1 and 16",
            STATE_LEN as u64,
            CELL as u32,
            vec![
                (CELL as u64, cell_of(&changed, CELL, CELL)),
                (16 * CELL as u64, cell_of(&changed, 16 * CELL, 1000)),
            ],
        ),
        ("no cells", STATE_LEN as u64, CELL as u32, vec![]),
        (
            "no cells, cut inside cell 7",
            7 * CELL as u64 + 100,
            CELL as u32,
            vec![],
        ),
        ("no cells, grown", 100_000, CELL as u32, vec![]),
        (
            "cell 0 only, cut inside cell 1",
            CELL as u64 + 904,
            CELL as u32,
            vec![(0, vec![0x33; CELL])],
        ),
        (
            "the last cell, grown to 5000 bytes",
            16 * CELL as u64 + 5000,
            CELL as u32,
            vec![(16 * CELL as u64, vec![0x44; CELL])],
        ),
        (
            "a cell of 8192 over the full snapshot's 4096",
            STATE_LEN as u64,
            2 * CELL as u32,
            vec![(2 * CELL as u64, vec![0x55; 2 * CELL])],
        ),
        (
            "a cell of zeros (a hole when loaded)",
            STATE_LEN as u64,
            CELL as u32,
            vec![(2 * CELL as u64, vec![0; CELL])],
        ),
        // The load's set of replaced cells grows with the deltas' table
        // entries, not with data_len / chunk_size (a bitmap of that size,
        // 32 MiB for the 1 TiB below, was the first version; see
        // cell_map_bound).
        (
            "1 TiB of holes after cell 0",
            1 << 40,
            CELL as u32,
            vec![(0, vec![0x66; CELL])],
        ),
        (
            "64 GiB of holes after cell 0",
            DEFAULT_MAX_DATA_LEN,
            CELL as u32,
            vec![(0, vec![0x66; CELL])],
        ),
    ];
    for (what, data_len, chunk_size, cells) in valid {
        let d = build_delta(data_len, chunk_size, 2, b1, &cells);
        let files = dir_of(Some(&d), Some(&base), Some(&base));
        let Head::Valid(state) = head(&files, SERIES, u64::MAX) else {
            panic!("made delta {what}: not valid here");
        };
        assert_eq!(state.len, data_len, "{what}");
        cx.run_delta(&format!("made delta: {what}"), d, u64::MAX, &[]);
        // (The in-memory readers only: the loads follow.)
        disk_case(
            &format!("made delta: {what}"),
            cx.dir,
            &files,
            &both,
            &mut cx.tally,
        );
        disk_case(
            &format!("made delta: {what}, max 10000"),
            cx.dir,
            &files,
            &[10_000],
            &mut cx.tally,
        );
    }
    let cut_last = cell_of(&old, 16 * CELL, 999);
    let broken: Vec<HandDelta> = vec![
        (
            "a cell at 4097",
            STATE_LEN as u64,
            CELL as u32,
            vec![(CELL as u64 + 1, vec![1; CELL - 1])],
        ),
        (
            "a cell of 4095 bytes",
            STATE_LEN as u64,
            CELL as u32,
            vec![(CELL as u64, vec![1; CELL - 1])],
        ),
        (
            "a cell in two chunks",
            STATE_LEN as u64,
            CELL as u32,
            vec![
                (CELL as u64, vec![1; CELL / 2]),
                (CELL as u64 + CELL as u64 / 2, vec![2; CELL / 2]),
            ],
        ),
        (
            "the last cell short by one",
            STATE_LEN as u64,
            CELL as u32,
            vec![(16 * CELL as u64, cut_last)],
        ),
        (
            "the last cell of 1000 in a size of 1001 more",
            STATE_LEN as u64 + 1,
            CELL as u32,
            vec![(16 * CELL as u64, vec![3; 1000])],
        ),
        (
            "a 4096 cell in a delta of 8192 cells",
            STATE_LEN as u64,
            2 * CELL as u32,
            vec![(2 * CELL as u64, vec![4; CELL])],
        ),
    ];
    for (what, data_len, chunk_size, cells) in broken {
        let d = build_delta(data_len, chunk_size, 2, b1, &cells);
        match verify(d.as_slice(), u64::MAX) {
            Err(ReadError::Damaged(e)) => {
                assert!(e.to_string().contains("not a whole cell"), "{what}: {e}")
            }
            other => panic!("made delta {what}: {other:?}"),
        }
        cx.run_delta(&format!("made delta: {what}"), d, u64::MAX, &[]);
        let d = build_delta(data_len, chunk_size, 2, b1, &cells);
        let files = dir_of(Some(&d), Some(&base), Some(&base));
        disk_case(
            &format!("made delta: {what}"),
            cx.dir,
            &files,
            &both,
            &mut cx.tally,
        );
    }

    // 5. Every length of the delta (every prefix to the readers of one
    // file; through the loads, every prefix up to the data and then every
    // 7th), and zeros appended.
    for cut in 0..len {
        let bytes = delta[..cut as usize].to_vec();
        if cut <= 4096 + 64 || cut % 7 == 0 || len - cut < 64 {
            cx.run_delta(&format!("delta cut to {cut} bytes"), bytes, cut, &default);
        } else {
            cx.memory_runs += 1;
            check(
                &format!("delta cut to {cut} bytes"),
                &Fake { bytes, len: cut },
            );
        }
    }
    for extra in [1usize, 4096] {
        let mut b = delta.clone();
        b.resize(b.len() + extra, 0);
        let l = b.len() as u64;
        cx.run_delta(
            &format!("delta with {extra} zeros appended"),
            b,
            l,
            &default,
        );
    }

    // 6. The base mutated while the delta is intact, with `.prev` an
    // intact copy of the base, the same file as the base (as a save
    // leaves them: two names of one inode), or missing. The delta must
    // never load over a base that is not byte for byte the one it names.
    let base_table_end = HEADER_LEN + 13 * ENTRY_LEN;
    for at in 0..base_table_end {
        for value in [0x00u8, 0xFF, base[at] ^ 0x10] {
            if value == base[at] {
                continue;
            }
            let mut b = base.clone();
            b[at] = value;
            cx.run_base(&format!("byte {at} = {value:#04x}"), Some(b.clone()));
            if !(124..128).contains(&at) {
                fix_crcs(&mut b);
                cx.run_base(&format!("byte {at} = {value:#04x}, CRCs fixed"), Some(b));
            }
        }
    }
    // A data byte of every chunk, with the chunk CRCs as they were (the
    // chunk is damaged) and made to match (a valid file, not the base).
    let data_offset = get_u64(&base, 72) as usize;
    let mut at = data_offset;
    for i in 0..13 {
        let n = get(&base, HEADER_LEN + i * ENTRY_LEN + 8, 4) as usize;
        for flip in [at, at + n - 1] {
            let mut b = base.clone();
            b[flip] ^= 0x01;
            cx.run_base(&format!("chunk {i} byte {flip} flipped"), Some(b.clone()));
            fix_all_crcs(&mut b);
            assert!(verify(b.as_slice(), u64::MAX).is_ok());
            cx.run_base(
                &format!("chunk {i} byte {flip} flipped, CRCs fixed"),
                Some(b),
            );
        }
        at += n;
    }
    // Every length: each up to the data, then every 61st, the last 64.
    let base_len = base.len();
    for cut in 0..base_len {
        if cut <= data_offset + 64 || cut % 61 == 0 || base_len - cut < 64 {
            cx.run_base(&format!("cut to {cut} bytes"), Some(base[..cut].to_vec()));
        }
    }
    let mut longer = base.clone();
    longer.push(0);
    cx.run_base("one zero appended", Some(longer));
    cx.run_base("missing", None);
    // Another valid snapshot of generation 1 in the base's place.
    let other = {
        let d = tempfile::tempdir().unwrap();
        let options = SaveOptions::builder()
            .chunk_size(CELL as u32)
            .build()
            .unwrap();
        let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(SERIES), options);
        let mut s = old.clone();
        s[5] ^= 1;
        saver.save(&image_of(&s), NOW).unwrap();
        saver.wait_retired();
        std::fs::read(d.path().join(SERIES)).unwrap()
    };
    assert_eq!(get_u64(&other, 32), 1);
    cx.run_base("another valid snapshot of generation 1", Some(other));
    // The delta itself in the base's place (generation 2).
    cx.run_base("the delta itself", Some(delta.clone()));
    // The base, valid but with another save time: its CRC differs.
    let mut retimed = base.clone();
    put(&mut retimed, 40, 8, NOW + 7);
    fix_crcs(&mut retimed);
    cx.run_base("saved at another time", Some(retimed));

    let Sweep {
        tally,
        memory_runs,
        base_cases,
        ..
    } = cx;
    println!(
        "version 2: {memory_runs} mutated deltas through the readers of one file; {base_cases} \
         mutated bases; {} directories, {} loads: {} of the chain, {} of .prev, {} refused; \
         largest allocation in a load {} bytes ({}); {:.1?}",
        tally.dirs,
        tally.loads,
        tally.loaded,
        tally.fallbacks,
        tally.refused,
        tally.largest.0,
        tally.largest.1,
        started.elapsed()
    );
    assert!(tally.loaded > 0 && tally.fallbacks > 0 && tally.refused > 0);
}
