//! A delta snapshot (format version 2) and its base, as a load finds
//! them: the input is split into two files written next to each other as
//! `s.snap.gen-1` (the base) and `s.snap` (the delta), optionally with
//! `s.snap.prev` (a copy of the base), then `shm_restore::inspect` (what
//! `shm-restore --check` runs) and `shm_restore::restore` into a fresh
//! memfd run on them; then all of it again with both files' three CRC
//! layers made to match (`repair_snapshot_crcs`), so that the chain
//! checks behind them (generation, base CRC, depth, chunk size, whole
//! cells) see mutated values too.
//!
//! Input: bytes 0..4 are the base's length (u32, little-endian, cut to
//! what follows), byte 4 holds flags (bit 0: write `.prev`; bit 1: name
//! the base after the delta's `base_generation` instead of 1), then the
//! base's bytes, then the delta's.
//!
//! Checks: nothing panics; every message is one line; `--check` and the
//! load agree (a chain `--check` finds valid loads without a fallback,
//! and only such a chain does); a loaded memfd is exactly the head's
//! `data_len` bytes long, and, for a small one, holds the state computed
//! here from the two files (the base cut or extended to the delta's size,
//! the delta's cells over it; `.prev`'s state after a fallback); a refusal
//! leaves the memfd without data.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use shm_fd_fuzz::repair_snapshot_crcs;
use shm_restore::format::HEADER_LEN;
use shm_restore::{DEFAULT_MAX_DATA_LEN, Error, LoadOutcome, inspect, read_snapshot, restore};

/// Flag: write `s.snap.prev`, a copy of the base.
const PREV: u8 = 1;
/// Flag: name the base `s.snap.gen-<the delta's base_generation>`.
const NAMED: u8 = 2;
/// States up to this size are compared byte by byte.
const COMPARED: u64 = 1 << 20;

/// A directory of this process's own, made for one input and removed
/// after it (nothing is left behind unless the process dies inside).
fn dir() -> PathBuf {
    let root = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    root.join(format!("shm-fd-fuzz-delta-{}", std::process::id()))
}

fn one_line(message: &str) {
    assert!(
        !message.contains('\n'),
        "a message of several lines: {message}"
    );
}

fn memfd() -> File {
    let options = shm_fd::CreateOptions {
        size: 0,
        seal_shrink: false,
    };
    shm_fd::SharedFd::create("fuzz-delta", options)
        .expect("memfd_create")
        .into_file()
}

/// The dense state a file describes on its own (a full snapshot), if it
/// is valid and small.
fn full_state(bytes: &[u8]) -> Option<Vec<u8>> {
    let s = read_snapshot(bytes, COMPARED).ok()?;
    if s.header().is_delta() {
        return None;
    }
    Some(s.into_image().to_dense())
}

/// The dense state of `delta` over `base` by the format's rules, if both
/// are valid, the delta names the base exactly, the base is full, and
/// the state is small.
fn chain_state(base: &[u8], delta: &[u8]) -> Option<Vec<u8>> {
    let d = read_snapshot(delta, COMPARED).ok()?;
    let link = d.header().base?;
    let b = read_snapshot(base, u64::MAX).ok()?;
    let bh = *b.header();
    if bh.is_delta()
        || bh.generation != link.generation
        || bh.crc() != link.header_crc
        || link.depth != 1
        || bh.data_len > COMPARED
    {
        return None;
    }
    let mut state = b.into_image().to_dense();
    state.resize(d.header().data_len as usize, 0);
    let chunks = d.chunks().to_vec();
    let image = d.into_image();
    let mut at = 0;
    for c in chunks {
        let (o, n) = (c.offset as usize, c.len as usize);
        state[o..o + n].copy_from_slice(&image.bytes()[at..at + n]);
        at += n;
    }
    Some(state)
}

fn dense(m: &File) -> Vec<u8> {
    let len = m.metadata().expect("fstat").len();
    let mut v = vec![0; len as usize];
    m.read_exact_at(&mut v, 0).expect("reading the memfd");
    v
}

fn check(flags: u8, base: &[u8], delta: &[u8]) {
    let dir = dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("creating the scratch directory");
    let generation = if flags & NAMED != 0 && delta.len() >= 92 {
        u64::from_le_bytes(delta[84..92].try_into().expect("8 bytes"))
    } else {
        1
    };
    std::fs::write(dir.join(format!("s.snap.gen-{generation}")), base).expect("writing");
    std::fs::write(dir.join("s.snap"), delta).expect("writing");
    if flags & PREV != 0 {
        std::fs::write(dir.join("s.snap.prev"), base).expect("writing");
    }
    let path = dir.join("s.snap");
    let max = DEFAULT_MAX_DATA_LEN;

    let inspection = inspect(&path, max);
    let valid = match &inspection.verdict {
        Ok(()) => true,
        Err(e) => {
            one_line(&e.to_string());
            assert!(e.is_unloadable(), "--check: not about the contents: {e}");
            false
        }
    };
    if valid {
        let h = inspection.header.expect("a valid file has a header");
        assert_eq!(
            inspection.bases.len(),
            h.base.map_or(0, |b| b.depth) as usize
        );
    }

    let m = memfd();
    match restore(&path, &m, max, 0, None) {
        Ok(LoadOutcome::Loaded {
            header,
            chain,
            fallback,
            ..
        }) => {
            let len = m.metadata().expect("fstat").len();
            assert_eq!(len, header.data_len, "the memfd is not the head's size");
            assert_eq!(chain.first(), Some(&header));
            assert_eq!(chain.len(), 1 + header.base.map_or(0, |b| b.depth) as usize);
            match fallback {
                None => {
                    assert!(valid, "loaded a chain --check refuses");
                    if let Some(want) = chain_state(base, delta).or_else(|| full_state(delta)) {
                        assert!(dense(&m) == want, "the load differs from the chain");
                    }
                }
                Some(f) => {
                    assert!(!valid, "fell back from a chain --check accepts");
                    one_line(&f.problem.to_string());
                    assert!(flags & PREV != 0, "loaded a .prev that is not there");
                    if let Some(want) = full_state(base) {
                        assert!(dense(&m) == want, "the load differs from .prev");
                    }
                }
            }
        }
        Ok(LoadOutcome::NoSnapshot) => panic!("no snapshot, with s.snap there"),
        Ok(other) => panic!("a fresh memfd: {other:?}"),
        Err(e) => {
            one_line(&e.to_string());
            assert!(
                e.is_unloadable() || matches!(e, Error::Io { .. }),
                "unexpected: {e}"
            );
            if valid {
                // A valid chain is refused only by the system (the memfd
                // cannot take its size).
                assert!(matches!(e, Error::Io { .. }), "--check valid, load: {e}");
            }
            let len = m.metadata().expect("fstat").len();
            assert!(
                len == 0 || shm_restore::data_extents(&m, len).map_or(false, |e| e.is_empty()),
                "a refused load left data"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let split = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    let flags = data[4];
    let rest = &data[5..];
    let (base, delta) = rest.split_at(split.min(rest.len()));
    check(flags, base, delta);
    let (mut b, mut d) = (base.to_vec(), delta.to_vec());
    if b.len() >= HEADER_LEN {
        repair_snapshot_crcs(&mut b);
    }
    if d.len() >= HEADER_LEN {
        repair_snapshot_crcs(&mut d);
    }
    if b != base || d != delta {
        check(flags, &b, &d);
    }
});
