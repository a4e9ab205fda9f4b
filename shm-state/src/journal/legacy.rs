//! The undo journal of formats 4 to 6, read to recover an interrupted
//! transaction of such a region and written while a region stays format 6
//! or older (shared with a process of an older build, see
//! `SharedOpen::may_upgrade`). `docs/state-format.md`, *Journal, formats 4
//! to 6*.
//!
//! A record is `crc u32, len u32, seq u64, offset u64` followed by `len`
//! bytes of before-image, padded to 8. The CRC-32 covers every byte after
//! itself (`len` to the end of the data) in one contiguous run. A record
//! counts only if its `seq` is the open transaction's and its CRC matches;
//! the scan stops at the first one that does not. A record is complete
//! before the range it covers is written, so a torn record means its range
//! was never touched.
//!
//! Each append also keeps an *end marker* after the records (`crc` =
//! [`END_MARKER`], `len` 0, the seq, and a checked claim of how far the
//! records are complete), so that recovery tells a record a crash cut short
//! (its range untouched) from a complete record damaged later (its range
//! possibly written): see [`append`] and [`recovery_records`].

use super::{Record, apply_rollback, check_target};
use crate::error::{Error, Result};
use crate::format::{JOURNAL_OFF, RECORD_HEADER};
use crate::mem::Mem;

/// The `crc` field of an end marker, which has no CRC: its `claim` word
/// carries its own check.
pub(crate) const END_MARKER: u32 = 0x444E_4545; // "EEND"
const CLAIM_SALT: u32 = 0x5AA5_C33C;

/// The CRC of a record: bytes `+4..+24+len` (everything after the CRC
/// field up to the end of the data), one contiguous run.
#[inline]
fn record_crc(covered: &[u8]) -> u32 {
    // A hasher made once and copied: `crc32fast::hash` detects the CPU's
    // features on every call, a fifth of the cost of a short record.
    static PROTOTYPE: std::sync::OnceLock<crc32fast::Hasher> = std::sync::OnceLock::new();
    let mut h = PROTOTYPE.get_or_init(crc32fast::Hasher::new).clone();
    h.update(covered);
    h.finalize()
}

/// The bytes a record of `len` data bytes takes.
pub(crate) fn record_size(len: u64) -> u64 {
    RECORD_HEADER + len.next_multiple_of(8)
}

/// An end marker's claim word: "every record of transaction `seq` before
/// journal position `pos` is complete", with a check over both.
fn claim(seq: u64, pos: u64) -> u64 {
    let pos = pos as u32;
    let check = pos ^ (seq as u32) ^ ((seq >> 32) as u32) ^ CLAIM_SALT;
    u64::from(pos) | (u64::from(check) << 32)
}

/// The position a claim word names, if its check holds for `seq`.
fn read_claim(seq: u64, word: u64) -> Option<u64> {
    let pos = u64::from(word as u32);
    (claim(seq, pos) == word).then_some(pos)
}

/// Appends a record holding the current contents of `target..target+len` at
/// journal position `pos`; returns the next position. The caller has checked
/// that `target..target+len` is inside the region.
///
/// Three steps, each leaving a journal that recovery reads right:
/// 1. an end marker after the record's place, claiming the records before
///    `pos` complete (the previous marker, at `pos`, claims the same);
/// 2. the record in place: its fields, the before-image, then the CRC over
///    both, so a record cut short anywhere fails its CRC;
/// 3. the marker's claim moved past the record (one 8-byte store).
pub(crate) fn append(
    mem: &mut Mem,
    journal_len: u64,
    pos: u64,
    seq: u64,
    target: u64,
    len: u64,
) -> Result<u64> {
    let size = record_size(len);
    let end = pos.checked_add(size).filter(|&e| {
        e.checked_add(RECORD_HEADER)
            .is_some_and(|t| t <= journal_len)
    });
    let (Some(end), Ok(len32)) = (end, u32::try_from(len)) else {
        return Err(Error::JournalFull {
            capacity: journal_len,
        });
    };
    let marker = JOURNAL_OFF + end;
    let mut m = [0u8; 24];
    m[0..4].copy_from_slice(&END_MARKER.to_le_bytes());
    m[8..16].copy_from_slice(&seq.to_le_bytes());
    m[16..24].copy_from_slice(&claim(seq, pos).to_le_bytes());
    mem.write("journal end marker", marker, &m)?;
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    let at = JOURNAL_OFF + pos;
    let mut fields = [0u8; 20];
    fields[0..4].copy_from_slice(&len32.to_le_bytes());
    fields[4..12].copy_from_slice(&seq.to_le_bytes());
    fields[12..20].copy_from_slice(&target.to_le_bytes());
    mem.write("journal", at + 4, &fields)?;
    mem.copy_within("journaled range", target, at + RECORD_HEADER, len)?;
    let crc = record_crc(mem.bytes("journal record", at + 4, RECORD_HEADER - 4 + len)?);
    mem.write("journal", at, &crc.to_le_bytes())?;
    mem.store_word(marker + 16, claim(seq, end))?;
    Ok(end)
}

/// What a journal position holds for transaction `seq`.
enum Entry {
    Record(Record),
    /// An end marker, and the position it claims.
    End(u64),
    /// Neither, intact: another transaction's, torn or damaged.
    Other,
}

/// The valid records of transaction `seq`, in the order they were written,
/// and the journal position where the scan stopped (after the last one: an
/// end marker, or the record a crash cut short). A record naming a range
/// outside the region is corruption, not the end.
pub(crate) fn scan(mem: &Mem, journal_len: u64, seq: u64) -> Result<(Vec<Record>, u64)> {
    let mut records = Vec::new();
    let mut pos = 0u64;
    while pos + RECORD_HEADER <= journal_len {
        let Entry::Record(r) = entry_at(mem, journal_len, seq, pos)? else {
            break;
        };
        records.push(r);
        pos += record_size(r.len);
    }
    Ok((records, pos))
}

/// Whether the journal starts with an intact record of transaction `seq`
/// (a format 7 journal never does: its position 0 holds the claim, and a
/// zero or older sequence number at +8).
pub(crate) fn starts_with_record(mem: &Mem, journal_len: u64, seq: u64) -> Result<bool> {
    Ok(matches!(
        entry_at(mem, journal_len, seq, 0)?,
        Entry::Record(_)
    ))
}

/// The entry of transaction `seq` at journal position `pos`.
fn entry_at(mem: &Mem, journal_len: u64, seq: u64, pos: u64) -> Result<Entry> {
    let at = JOURNAL_OFF + pos;
    let h = mem.bytes("journal record", at, RECORD_HEADER)?;
    let crc = u32::from_le_bytes(h[0..4].try_into().expect("4"));
    let len = u64::from(u32::from_le_bytes(h[4..8].try_into().expect("4")));
    let rseq = u64::from_le_bytes(h[8..16].try_into().expect("8"));
    let target = u64::from_le_bytes(h[16..24].try_into().expect("8"));
    if rseq != seq {
        return Ok(Entry::Other);
    }
    if len == 0 {
        return Ok(match read_claim(seq, target) {
            Some(claimed) if crc == END_MARKER => Entry::End(claimed),
            _ => Entry::Other,
        });
    }
    if record_size(len) > journal_len - pos {
        return Ok(Entry::Other);
    }
    let covered = mem.bytes("journal record", at + 4, RECORD_HEADER - 4 + len)?;
    if record_crc(covered) != crc {
        return Ok(Entry::Other);
    }
    let data = at + RECORD_HEADER;
    check_target(mem, journal_len, at, target, len)?;
    Ok(Entry::Record(Record { target, len, data }))
}

/// The records to roll back an interrupted transaction `seq` with, read
/// and checked without writing anything.
///
/// The scan stops at the first entry that is not an intact record. After a
/// crash that is the end marker, or the record being appended when the
/// process died, whose range was never touched. A damaged record looks the
/// same, so the end markers of the transaction decide: the newest intact
/// one claims how far the records are complete, and a scan that stops
/// short of that claim met damage (a flipped bit, a stray write). Records
/// without any intact marker are damage too (every append writes one
/// before its record). Rolling back only the records before the damage
/// would leave the transaction half undone, so both are refused.
pub(crate) fn recovery_records(mem: &Mem, journal_len: u64, seq: u64) -> Result<Vec<Record>> {
    let (records, stop) = scan(mem, journal_len, seq)?;
    let mut claimed: Option<u64> = None;
    // Every 8-aligned position from `stop` on, over one slice of the rest
    // of the journal: a marker starts with its tag and holds `seq` at +8;
    // only those are decoded. (The whole journal is looked at, so a marker
    // past damage is found; one pass costs ~1 ns per 8 bytes.)
    let rest = journal_len.saturating_sub(stop);
    let tail = mem.bytes("journal", JOURNAL_OFF + stop, rest)?;
    let tag = END_MARKER.to_le_bytes();
    let seq_bytes = seq.to_le_bytes();
    let mut at = 0usize;
    while at as u64 + RECORD_HEADER <= rest {
        if tail[at..at + 4] == tag
            && tail[at + 8..at + 16] == seq_bytes
            && let Ok(Entry::End(c)) = entry_at(mem, journal_len, seq, stop + at as u64)
        {
            claimed = claimed.max(Some(c));
        }
        at += 8;
    }
    match claimed {
        Some(c) if stop < c => Err(Error::corrupt(
            "journal record",
            JOURNAL_OFF + stop,
            format!(
                "damaged, yet the transaction's end marker says its records run to {:#x}; \
                 refusing to roll back half of the transaction",
                JOURNAL_OFF + c
            ),
        )),
        None if !records.is_empty() => Err(Error::corrupt(
            "journal",
            JOURNAL_OFF + stop,
            "the interrupted transaction's end marker is damaged; refusing to guess how far its records run",
        )),
        _ => Ok(records),
    }
}

/// Rolls back this process's own open transaction `seq`, whose records end
/// at journal position `end`: the scan must find exactly those, else the
/// journal in memory was damaged and nothing is written.
pub(crate) fn rollback_own(mem: &mut Mem, journal_len: u64, seq: u64, end: u64) -> Result<usize> {
    let (records, found_end) = scan(mem, journal_len, seq)?;
    if found_end != end {
        return Err(super::records_end_elsewhere(found_end, end));
    }
    apply_rollback(mem, &records, seq)?;
    Ok(records.len())
}
