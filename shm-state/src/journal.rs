//! The undo journal: before-images of every range a transaction writes.
//!
//! Format 7 (`docs/state-format.md`, *Journal*): the journal's first 64
//! bytes are its head, whose first word is the *claim* of the open
//! transaction: "every record before journal position `p` is complete",
//! with a check that binds it to the transaction's sequence number. The
//! records follow from position [`JOURNAL_HEAD`]: `check u64, len u32,
//! 0 u32, target u64`, then `len` bytes of before-image padded to 8. The
//! check is a 64-bit hash of the sequence number and everything after it
//! (see [`record_check`]): a record of another transaction, a torn one
//! and a damaged one fail it.
//!
//! An append writes the record (one write for a small one), then stores
//! the claim past it (one aligned 8-byte store), and only then may the
//! range be written. So at every instant the claim names the records that
//! are complete, plus at most one more that was completed but not yet
//! claimed (whose range is untouched): recovery tells a crash from damage
//! without a per-record CRC or an end marker. Regions of formats 4 to 6
//! keep their journal (see [`legacy`]); recovery recognises either.

mod legacy;

/// The reader of formats 4 to 6 alone, as a build of those formats runs it.
#[cfg(test)]
pub(crate) use legacy::recovery_records as legacy_recovery_records;

use crate::error::{Error, Result};
use crate::format::{JOURNAL_OFF, RECORD_HEADER, TX_WORD, fmix, touches_atomics, tx_word, u64_at};
use crate::mem::Mem;

/// One valid record found by a scan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    /// Where the before-image belongs.
    pub target: u64,
    /// Its length.
    pub len: u64,
    /// Where the before-image is stored in the journal.
    pub data: u64,
}

/// The largest journal whose positions a claim can name.
pub(crate) const MAX_JOURNAL_LEN: u64 = 1 << 31;

/// Journal bytes before the first record (format 7): the head, whose first
/// word is the claim; the rest of the line is not used.
pub(crate) const JOURNAL_HEAD: u64 = 64;

/// The largest before-image appended through one stack buffer.
const SMALL: u64 = 32;

/// Which journal a transaction writes: the region's format decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Journal {
    /// Formats 4 to 6: CRC-32 records and end markers ([`legacy`]).
    Legacy,
    /// Format 7: a head claim and hash-checked records.
    Claimed,
}

impl Journal {
    /// The journal a region of `format` is written with.
    pub(crate) fn of_format(format: u32) -> Journal {
        if format >= 7 {
            Journal::Claimed
        } else {
            Journal::Legacy
        }
    }

    /// The position of a transaction's first record.
    #[inline(always)]
    pub(crate) fn first_pos(self) -> u64 {
        match self {
            Journal::Legacy => 0,
            Journal::Claimed => JOURNAL_HEAD,
        }
    }
}

const P: u64 = 0x9E37_79B9_7F4A_7C15;
const CHECK_SALT: u64 = 0x6A09_E667_F3BC_C908;
const CLAIM_SALT: u64 = 0xBB67_AE85_84CA_A73B;

#[inline(always)]
fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8"))
}

/// A record's check: a hash of transaction `seq` (its [`TxKey`]) and
/// `covered`, the record's bytes after the check (`len`, `0`, `target`,
/// the padded data; a multiple of 8). Four lanes, seeded from `seq`, take
/// the words in turn, each step `h = rotl((h ^ w) * P, 31)`, a bijection of
/// `h` for a given word and of the word for a given `h`; the lanes are
/// combined by XOR (rotated) and one more multiply. So a change confined
/// to one word (any number of its bits) always changes the check, and
/// other damage, or a record of another transaction, passes with a chance
/// of about 2^-64.
#[inline]
fn record_check(key: &TxKey, covered: &[u8]) -> u64 {
    debug_assert!(covered.len().is_multiple_of(8));
    let mut h = lanes(key);
    let mut chunks = covered.chunks_exact(32);
    for c in &mut chunks {
        for (lane, h) in h.iter_mut().enumerate() {
            *h = step(*h, word(c, lane * 8));
        }
    }
    for (lane, w) in chunks.remainder().chunks_exact(8).enumerate() {
        h[lane] = step(h[lane], word(w, 0));
    }
    finish(h)
}

#[inline(always)]
fn lanes(key: &TxKey) -> [u64; 4] {
    let s = key.check_seed;
    [s, s ^ P, s ^ CLAIM_SALT, s ^ CHECK_SALT]
}

#[inline(always)]
fn step(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(P).rotate_left(31)
}

#[inline(always)]
fn finish(h: [u64; 4]) -> u64 {
    let x = h[0] ^ h[1].rotate_left(16) ^ h[2].rotate_left(32) ^ h[3].rotate_left(48);
    (x ^ (x >> 32)).wrapping_mul(P)
}

/// What a transaction's records and claims are bound to: its sequence
/// number, and the two values derived from it, computed once per
/// transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxKey {
    pub(crate) seq: u64,
    check_seed: u64,
    claim_mask: u32,
}

impl TxKey {
    #[inline(always)]
    pub(crate) fn new(seq: u64) -> TxKey {
        TxKey {
            seq,
            check_seed: (seq ^ CHECK_SALT).wrapping_mul(P),
            claim_mask: fmix(seq ^ CLAIM_SALT) as u32,
        }
    }
}

/// The bytes a record of `len` data bytes takes.
pub(crate) fn record_size(len: u64) -> u64 {
    RECORD_HEADER + len.next_multiple_of(8)
}

/// The claim word: "every record of the transaction before journal
/// position `pos` is complete". Bits 0..32 the position, bits 32..64 the
/// position XOR the low half of a hash of its sequence number: a flipped bit of either
/// half breaks it, and a claim left by another transaction passes with a
/// chance of 2^-32.
#[inline(always)]
pub(crate) fn claim(key: &TxKey, pos: u64) -> u64 {
    let pos = pos as u32;
    let check = pos ^ key.claim_mask;
    u64::from(pos) | (u64::from(check) << 32)
}

/// Stores the claim of nothing (position [`JOURNAL_HEAD`]) of the
/// transaction `key` in the head: done before the transaction's open word,
/// so that while it runs the head never holds a claim an earlier
/// transaction left, whose check could match this one's (one time in
/// 2^32) and make a transaction interrupted before its first claim look
/// damaged.
#[inline(always)]
pub(crate) fn claim_nothing(mem: &mut Mem, key: &TxKey) -> Result<()> {
    mem.store_word(JOURNAL_OFF, claim(key, JOURNAL_HEAD))
}

/// The position a claim word names, if it is the transaction's.
fn read_claim(key: &TxKey, word: u64) -> Option<u64> {
    let pos = u64::from(word as u32);
    (claim(key, pos) == word).then_some(pos)
}

#[cold]
#[inline(never)]
fn full(journal_len: u64) -> Error {
    Error::JournalFull {
        capacity: journal_len,
    }
}

/// Appends a record holding the current contents of `target..target+len`
/// at journal position `pos` of a `kind` journal; returns the next
/// position. The caller has checked that `target..target+len` is inside
/// the region; it writes the range only after this returns.
#[inline(always)]
pub(crate) fn append(
    mem: &mut Mem,
    kind: Journal,
    journal_len: u64,
    pos: u64,
    key: &TxKey,
    target: u64,
    len: u64,
) -> Result<u64> {
    match kind {
        Journal::Legacy => legacy::append(mem, journal_len, pos, key.seq, target, len),
        // Nothing to keep (no caller asks; a record never has `len` 0).
        Journal::Claimed if len == 0 => Ok(pos),
        Journal::Claimed if len <= SMALL => append_small(mem, journal_len, pos, key, target, len),
        Journal::Claimed => append_large(mem, journal_len, pos, key, target, len),
    }
}

/// The end of a record of `len` bytes at `pos`, if it fits the journal.
#[inline(always)]
fn record_end(journal_len: u64, pos: u64, len: u64) -> Option<(u64, u32)> {
    let len32 = u32::try_from(len).ok()?;
    let end = pos.checked_add(record_size(len))?;
    (end <= journal_len).then_some((end, len32))
}

/// The `i`th little-endian word of `src`, zero-padded past its end.
#[inline(always)]
fn padded_word(src: &[u8], i: usize) -> u64 {
    let at = i * 8;
    if at + 8 <= src.len() {
        word(src, at)
    } else {
        src.get(at..)
            .unwrap_or(&[])
            .iter()
            .rev()
            .fold(0u64, |w, &b| (w << 8) | u64::from(b))
    }
}

/// A record of at most [`SMALL`] bytes, built in words kept in registers
/// (read from the range, hashed, stored into the journal one by one): one
/// write of the whole record, then the claim. Dispatched on the number of
/// data words, so that each case is straight-line code.
#[inline(always)]
fn append_small(
    mem: &mut Mem,
    journal_len: u64,
    pos: u64,
    key: &TxKey,
    target: u64,
    len: u64,
) -> Result<u64> {
    match len.div_ceil(8) {
        1 => append_words::<1>(mem, journal_len, pos, key, target, len),
        2 => append_words::<2>(mem, journal_len, pos, key, target, len),
        3 => append_words::<3>(mem, journal_len, pos, key, target, len),
        _ => append_words::<4>(mem, journal_len, pos, key, target, len),
    }
}

/// [`append_small`] of a before-image of `N` words (`len` bytes, `8 * N -
/// 7 ..= 8 * N` of them).
#[inline(always)]
fn append_words<const N: usize>(
    mem: &mut Mem,
    journal_len: u64,
    pos: u64,
    key: &TxKey,
    target: u64,
    len: u64,
) -> Result<u64> {
    let Some((end, len32)) = record_end(journal_len, pos, len) else {
        return Err(full(journal_len));
    };
    let src = mem.bytes("journaled range", target, len)?;
    let mut d = [0u64; N];
    for (i, w) in d.iter_mut().enumerate() {
        *w = padded_word(src, i);
    }
    let len_word = u64::from(len32);
    // `record_check` of `len_word, target, d`: word `i` to lane `i % 4`.
    let mut h = lanes(key);
    h[0] = step(h[0], len_word);
    h[1] = step(h[1], target);
    for (i, &w) in d.iter().enumerate() {
        h[(i + 2) % 4] = step(h[(i + 2) % 4], w);
    }
    let check = finish(h);
    mem.write_with(
        "journal",
        JOURNAL_OFF + pos,
        end - pos,
        #[inline(always)]
        |dst| {
            // The record's length, known here once (`end - pos` is
            // `record_size(len)`): the stores below are then unchecked.
            debug_assert_eq!(dst.len(), 24 + 8 * N);
            let dst = &mut dst[..24 + 8 * N];
            dst[0..8].copy_from_slice(&check.to_le_bytes());
            dst[8..16].copy_from_slice(&len_word.to_le_bytes());
            dst[16..24].copy_from_slice(&target.to_le_bytes());
            // One store per word, from registers (`N` is a constant: the loop
            // unrolls).
            for (i, &w) in d.iter().enumerate() {
                dst[24 + i * 8..32 + i * 8].copy_from_slice(&w.to_le_bytes());
            }
        },
    )?;
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    mem.store_word(JOURNAL_OFF, claim(key, end))?;
    Ok(end)
}

/// A record of any length: its fields, the before-image copied in place,
/// the check over both, then the claim.
fn append_large(
    mem: &mut Mem,
    journal_len: u64,
    pos: u64,
    key: &TxKey,
    target: u64,
    len: u64,
) -> Result<u64> {
    let Some((end, len32)) = record_end(journal_len, pos, len) else {
        return Err(full(journal_len));
    };
    let at = JOURNAL_OFF + pos;
    let mut fields = [0u8; 16];
    fields[0..4].copy_from_slice(&len32.to_le_bytes());
    fields[8..16].copy_from_slice(&target.to_le_bytes());
    mem.write("journal", at + 8, &fields)?;
    mem.copy_within("journaled range", target, at + RECORD_HEADER, len)?;
    let pad = len.next_multiple_of(8) - len;
    if pad != 0 {
        mem.write(
            "journal",
            at + RECORD_HEADER + len,
            &[0u8; 8][..pad as usize],
        )?;
    }
    let check = record_check(key, mem.bytes("journal record", at + 8, end - pos - 8)?);
    mem.write("journal", at, &check.to_le_bytes())?;
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    mem.store_word(JOURNAL_OFF, claim(key, end))?;
    Ok(end)
}

/// The record of transaction `seq` at position `pos`, if one is there
/// intact. A record naming a range outside the region, over the atomic
/// words or over the journal is corruption, not the end.
fn record_at(mem: &Mem, journal_len: u64, key: &TxKey, pos: u64) -> Result<Option<Record>> {
    if pos.saturating_add(RECORD_HEADER) > journal_len {
        return Ok(None);
    }
    let at = JOURNAL_OFF + pos;
    let h = mem.bytes("journal record", at, RECORD_HEADER)?;
    let check = word(h, 0);
    let len = u64::from(u32::from_le_bytes(h[8..12].try_into().expect("4")));
    let zero = u32::from_le_bytes(h[12..16].try_into().expect("4"));
    let target = word(h, 16);
    if len == 0 || zero != 0 || record_size(len) > journal_len - pos {
        return Ok(None);
    }
    let covered = mem.bytes("journal record", at + 8, record_size(len) - 8)?;
    if record_check(key, covered) != check {
        return Ok(None);
    }
    check_target(mem, journal_len, at, target, len)?;
    Ok(Some(Record {
        target,
        len,
        data: at + RECORD_HEADER,
    }))
}

/// A valid record's range: inside the region, off the atomic words and
/// the journal (else the journal is damaged).
pub(crate) fn check_target(
    mem: &Mem,
    journal_len: u64,
    at: u64,
    target: u64,
    len: u64,
) -> Result<()> {
    let Some(end) = target.checked_add(len).filter(|&e| e <= mem.len()) else {
        return Err(Error::corrupt(
            "journal record",
            at,
            format!("before-image of {len} bytes for offset {target:#x} runs past the region"),
        ));
    };
    let overlaps = |start: u64, stop: u64| target < stop && end > start;
    if touches_atomics(target, end - target) || overlaps(JOURNAL_OFF, JOURNAL_OFF + journal_len) {
        return Err(Error::corrupt(
            "journal record",
            at,
            format!(
                "before-image for offset {target:#x} overlaps the commit/lock words, the shared line, the peer table or the journal"
            ),
        ));
    }
    Ok(())
}

/// The valid records of transaction `seq` from [`JOURNAL_HEAD`], in the
/// order they were written, and the position where the scan stopped.
pub(crate) fn scan(mem: &Mem, journal_len: u64, seq: u64) -> Result<(Vec<Record>, u64)> {
    let key = TxKey::new(seq);
    let mut records = Vec::new();
    let mut pos = JOURNAL_HEAD;
    while let Some(r) = record_at(mem, journal_len, &key, pos)? {
        records.push(r);
        pos += record_size(r.len);
    }
    Ok((records, pos))
}

/// The claim of transaction `seq` in the journal's head, if it has one.
fn head_claim(mem: &Mem, seq: u64) -> Result<Option<u64>> {
    Ok(read_claim(
        &TxKey::new(seq),
        u64_at(mem, "journal claim", JOURNAL_OFF)?,
    ))
}

/// The records to roll back an interrupted transaction `seq` with, read
/// and checked without writing anything, from a journal of either kind:
/// a journal that starts with an intact record of `seq` in the old layout
/// (CRC-32 and sequence number) is one of formats 4 to 6; else a format 7
/// journal holds transaction `seq`'s claim or a record of it at
/// [`JOURNAL_HEAD`]; otherwise it is read as a journal of formats 4 to 6
/// (an upgrading opening transaction writes that one: the region's format
/// at its start decides, and the format field it rewrites may be either).
pub(crate) fn recovery_records(mem: &Mem, journal_len: u64, seq: u64) -> Result<Vec<Record>> {
    if legacy::starts_with_record(mem, journal_len, seq)? {
        return legacy::recovery_records(mem, journal_len, seq);
    }
    let claimed = head_claim(mem, seq)?;
    if claimed.is_none() && record_at(mem, journal_len, &TxKey::new(seq), JOURNAL_HEAD)?.is_none() {
        return legacy::recovery_records(mem, journal_len, seq);
    }
    let (records, stop) = scan(mem, journal_len, seq)?;
    // Where the last record starts: past the claim, only it can be.
    let last_start = records.last().map(|r| r.data - RECORD_HEADER - JOURNAL_OFF);
    let damaged = |what: String| Err(Error::corrupt("journal", JOURNAL_OFF, what));
    match claimed {
        // No claim of `seq`: only the first record can have been completed
        // (an append stores its claim before the next record is written).
        None if records.len() > 1 => damaged(format!(
            "{} records of the interrupted transaction, but its claim is damaged; refusing to guess how far they run",
            records.len()
        )),
        None => Ok(records),
        Some(c) if stop < c => damaged(format!(
            "the record at {:#x} is damaged, yet the transaction's claim says its records run to {:#x}; \
             refusing to roll back half of the transaction",
            JOURNAL_OFF + stop,
            JOURNAL_OFF + c
        )),
        // Past the claim: at most the one record completed before its claim.
        Some(c) if c == stop || last_start == Some(c) => Ok(records),
        Some(c) => damaged(format!(
            "the claim names journal position {c:#x}, the records run to {stop:#x}"
        )),
    }
}

/// Writes the before-images of `records` back, newest first, then marks
/// transaction `seq` finished. Idempotent: a crash part way leaves the
/// journal intact for the next try.
pub(crate) fn apply_rollback(mem: &mut Mem, records: &[Record], seq: u64) -> Result<()> {
    let mut buf = Vec::new();
    for r in records.iter().rev() {
        buf.clear();
        buf.extend_from_slice(mem.bytes("journal record", r.data, r.len)?);
        mem.write("rolled-back range", r.target, &buf)?;
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    mem.store_word(TX_WORD, tx_word(seq, false))?;
    Ok(())
}

/// The current contents of every range `records` would roll back, in
/// their order (what [`undo_rollback`] writes back). Bounded by the journal
/// (each record's range is no longer than its before-image); an allocation
/// that fails is an error before anything is written.
pub(crate) fn current_images(mem: &Mem, records: &[Record]) -> Result<Vec<u8>> {
    let total: u64 = records.iter().map(|r| r.len).sum();
    let mut out = Vec::new();
    out.try_reserve_exact(usize::try_from(total).unwrap_or(usize::MAX))
        .map_err(|_| Error::TooLarge {
            what: "rollback images",
            len: total,
        })?;
    for r in records {
        out.extend_from_slice(mem.bytes("rolled-back range", r.target, r.len)?);
    }
    Ok(out)
}

/// Undoes [`apply_rollback`] of `records` after all, from `images` (see
/// [`current_images`]): the commit word is marked open again first, so
/// that a crash part way leaves a journal the next open rolls back again,
/// then every range gets its contents as found (all taken from the one
/// state found, so the order does not matter).
pub(crate) fn undo_rollback(
    mem: &mut Mem,
    records: &[Record],
    images: &[u8],
    seq: u64,
) -> Result<()> {
    mem.store_word(TX_WORD, tx_word(seq, true))?;
    // As at a transaction's start: a reader of a shared state that sees any
    // write below sees the word open again.
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    let mut at = 0usize;
    for r in records {
        let len = r.len as usize;
        mem.write("rolled-back range", r.target, &images[at..at + len])?;
        at += len;
    }
    Ok(())
}

/// Rolls back this process's own open transaction `seq`, whose records in
/// a `kind` journal end at position `end`: the scan must find exactly
/// those (and the claim name their end), else the journal in memory was
/// damaged and nothing is written.
pub(crate) fn rollback_own(
    mem: &mut Mem,
    kind: Journal,
    journal_len: u64,
    seq: u64,
    end: u64,
) -> Result<usize> {
    if kind == Journal::Legacy {
        return legacy::rollback_own(mem, journal_len, seq, end);
    }
    let (records, found_end) = scan(mem, journal_len, seq)?;
    let claimed = head_claim(mem, seq)?;
    if found_end != end || (end != JOURNAL_HEAD && claimed != Some(end)) {
        return Err(records_end_elsewhere(found_end, end));
    }
    apply_rollback(mem, &records, seq)?;
    Ok(records.len())
}

/// A rollback of this process's own transaction found its records ending
/// at journal position `found_end`, where it wrote them up to `end`.
#[cold]
fn records_end_elsewhere(found_end: u64, end: u64) -> Error {
    Error::corrupt(
        "journal",
        JOURNAL_OFF + found_end,
        format!(
            "the open transaction's records end at {:#x}, not at {:#x}",
            JOURNAL_OFF + found_end,
            JOURNAL_OFF + end
        ),
    )
}

#[cfg(test)]
mod check {
    use super::*;

    /// A small record, its check built from words in registers, is the
    /// record recovery reads: the check over its bytes, the range and the
    /// before-image, for every length.
    #[test]
    fn small_records_read_back_as_written() {
        let seq = 0x1234_5678_9abc;
        let key = TxKey::new(seq);
        let journal_len = 4096;
        let target = JOURNAL_OFF + journal_len + 8;
        for len in 1..=SMALL {
            let mut region = vec![0u8; (target + 64) as usize];
            for (i, b) in region[target as usize..][..len as usize]
                .iter_mut()
                .enumerate()
            {
                *b = (i * 37 + 5) as u8;
            }
            let mut mem = Mem::heap(region, 0, 0).unwrap();
            let end = append_small(&mut mem, journal_len, JOURNAL_HEAD, &key, target, len).unwrap();
            assert_eq!(end, JOURNAL_HEAD + record_size(len));
            let r = record_at(&mem, journal_len, &key, JOURNAL_HEAD)
                .unwrap()
                .unwrap_or_else(|| panic!("len {len}: the record does not read back"));
            assert_eq!((r.target, r.len), (target, len));
            assert_eq!(
                mem.bytes("test", r.data, len).unwrap(),
                mem.bytes("test", target, len).unwrap()
            );
            assert_eq!(head_claim(&mem, seq).unwrap(), Some(end));
        }
    }
}
