//! The undo journal: before-images of every range a transaction writes.
//!
//! A record is `crc u32, len u32, seq u64, offset u64` followed by `len`
//! bytes of before-image, padded to 8. The CRC-32 covers every byte after
//! itself (`len` to the end of the data) in one contiguous run. A record
//! counts only if its `seq` is the open transaction's and its CRC matches;
//! the scan stops at the first one that does not. A record is complete before the range it covers is written, so
//! a torn record means its range was never touched.

use crate::error::{Error, Result};
use crate::format::{FREE_HEADS, JOURNAL_OFF, RECORD_HEADER, TX_WORD};
use crate::mem::Mem;

/// One valid record found by [`scan`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    /// Where the before-image belongs.
    pub target: u64,
    /// Its length.
    pub len: u64,
    /// Where the before-image is stored in the journal.
    pub data: u64,
}

/// The CRC of a record: bytes `+4..+24+len` (everything after the CRC
/// field up to the end of the data), one contiguous run.
fn record_crc(covered: &[u8]) -> u32 {
    crc32fast::hash(covered)
}

/// The bytes a record of `len` data bytes takes.
pub(crate) fn record_size(len: u64) -> u64 {
    RECORD_HEADER + len.next_multiple_of(8)
}

/// Appends a record holding the current contents of `target..target+len` at
/// journal position `pos`; returns the next position. The caller has checked
/// that `target..target+len` is inside the region. The record is written in
/// place: its fields, the before-image, then the CRC over both, so a record
/// cut short anywhere fails its CRC.
pub(crate) fn append(
    mem: &mut Mem,
    journal_len: u64,
    pos: u64,
    seq: u64,
    target: u64,
    len: u64,
) -> Result<u64> {
    let size = record_size(len);
    let end = pos.checked_add(size).filter(|&e| e <= journal_len);
    let (Some(end), Ok(len32)) = (end, u32::try_from(len)) else {
        return Err(Error::JournalFull {
            capacity: journal_len,
        });
    };
    let at = JOURNAL_OFF + pos;
    let mut fields = [0u8; 20];
    fields[0..4].copy_from_slice(&len32.to_le_bytes());
    fields[4..12].copy_from_slice(&seq.to_le_bytes());
    fields[12..20].copy_from_slice(&target.to_le_bytes());
    mem.write("journal", at + 4, &fields)?;
    mem.copy_within("journaled range", target, at + RECORD_HEADER, len)?;
    let crc = record_crc(mem.bytes("journal record", at + 4, RECORD_HEADER - 4 + len)?);
    mem.write("journal", at, &crc.to_le_bytes())?;
    Ok(end)
}

/// The valid records of transaction `seq`, in the order they were written.
/// A record naming a range outside the region is corruption, not the end.
pub(crate) fn scan(mem: &Mem, journal_len: u64, seq: u64) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut pos = 0u64;
    while pos + RECORD_HEADER <= journal_len {
        let at = JOURNAL_OFF + pos;
        let h = mem.bytes("journal record", at, RECORD_HEADER)?;
        let crc = u32::from_le_bytes(h[0..4].try_into().expect("4"));
        let len = u64::from(u32::from_le_bytes(h[4..8].try_into().expect("4")));
        let rseq = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let target = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        if rseq != seq || record_size(len) > journal_len - pos {
            break;
        }
        let covered = mem.bytes("journal record", at + 4, RECORD_HEADER - 4 + len)?;
        if record_crc(covered) != crc {
            break;
        }
        let data = at + RECORD_HEADER;
        let Some(end) = target.checked_add(len).filter(|&e| e <= mem.len()) else {
            return Err(Error::corrupt(
                "journal record",
                at,
                format!("before-image of {len} bytes for offset {target:#x} runs past the region"),
            ));
        };
        let overlaps = |start: u64, stop: u64| target < stop && end > start;
        if overlaps(TX_WORD, FREE_HEADS) || overlaps(JOURNAL_OFF, JOURNAL_OFF + journal_len) {
            return Err(Error::corrupt(
                "journal record",
                at,
                format!(
                    "before-image for offset {target:#x} overlaps the commit/lock words or the journal"
                ),
            ));
        }
        records.push(Record { target, len, data });
        pos += record_size(len);
    }
    Ok(records)
}

/// Rolls transaction `seq` back: writes every before-image back, newest
/// first, then marks the transaction finished. Idempotent: a crash during
/// a rollback leaves the journal intact for the next try.
pub(crate) fn rollback(mem: &mut Mem, journal_len: u64, seq: u64) -> Result<usize> {
    let records = scan(mem, journal_len, seq)?;
    let mut buf = Vec::new();
    for r in records.iter().rev() {
        buf.clear();
        buf.extend_from_slice(mem.bytes("journal record", r.data, r.len)?);
        mem.write("rolled-back range", r.target, &buf)?;
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    mem.store_word(TX_WORD, seq << 1)?;
    Ok(records.len())
}
