//! Shared pieces of the fuzz targets and of the seed generator
//! (`examples/make_seeds.rs`): the input encodings, the root type of the
//! `state_open` target, and checksum repair for snapshot files.
//!
//! Each target's input is plain bytes; the encodings here are what the
//! generator writes and the targets read, so a seed made by the generator
//! is a valid input of its target. Bytes that do not fit an encoding are
//! still read (missing fields are empty or zero): every input is a test.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use shm_state::{Bytes, StateCell, StateLog, StateMap, StateVec};

/// `listen_env` input: byte 0 says which of `LISTEN_FDS`, `LISTEN_FDNAMES`
/// and `LISTEN_PID` are set (bits 0, 1, 2); the rest holds their values in
/// that order, separated by NUL bytes (which no environment value can
/// hold).
pub fn split_listen_env(data: &[u8]) -> [Option<&OsStr>; 3] {
    let Some((&mask, rest)) = data.split_first() else {
        return [None, None, None];
    };
    let mut parts = rest.splitn(3, |&b| b == 0);
    std::array::from_fn(|i| {
        let value = OsStr::from_bytes(parts.next().unwrap_or_default());
        (mask & (1 << i) != 0).then_some(value)
    })
}

/// Encodes a `listen_env` input (the inverse of [`split_listen_env`]).
pub fn join_listen_env(values: [Option<&[u8]>; 3]) -> Vec<u8> {
    let mut mask = 0u8;
    let mut out = vec![0];
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        if let Some(v) = v {
            mask |= 1 << i;
            out.extend_from_slice(v);
        }
    }
    out[0] = mask;
    out
}

/// The root of the state the `state_open` target opens: one of each
/// structure shm-state offers, so a seed reaches all of their readers.
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct Root {
    /// Counts the target's own transactions.
    pub counter: u64,
    /// A vector of numbers.
    pub items: StateVec<u64>,
    /// Numbers to byte strings.
    pub names: StateMap<u64, Bytes>,
    /// Byte strings to numbers.
    pub index: StateMap<Bytes, u64>,
    /// An append-only log.
    pub events: StateLog,
    /// A cell of a small POD value.
    pub cell: StateCell<[u64; 2]>,
}

/// The layout version of [`Root`].
pub const ROOT_VERSION: u32 = 1;

/// `state_open` flag: open with shm-snapshot's protocol page in front
/// (`Layout::with_snapshot_protocol`).
pub const STATE_PROTOCOL: u8 = 1;
/// `state_open` flag: pad the region with zeros to the length shm-state
/// gives a heap region (the protocol page, if any, plus a multiple of
/// 64 KiB), so that seeds need not store the zeros at the end of a state.
pub const STATE_PAD: u8 = 2;
/// The granularity [`STATE_PAD`] pads to.
pub const STATE_PAD_TO: usize = 1 << 16;

/// Bytes in front of the state in a region with the `flags` given: the
/// shm-snapshot header page with [`STATE_PROTOCOL`].
fn state_base(flags: u8) -> usize {
    if flags & STATE_PROTOCOL != 0 {
        shm_snapshot::DATA_OFFSET
    } else {
        0
    }
}

/// `state_open` input: byte 0 holds the flags ([`STATE_PROTOCOL`],
/// [`STATE_PAD`]; the other bits pick the operations of the target's
/// transaction), the rest is the region's bytes. Returns the flags and
/// the region.
pub fn state_region(data: &[u8]) -> (u8, Vec<u8>) {
    let Some((&flags, image)) = data.split_first() else {
        return (0, Vec::new());
    };
    let mut region = image.to_vec();
    if flags & STATE_PAD != 0 && !region.is_empty() {
        let base = state_base(flags);
        let len = base
            + region
                .len()
                .saturating_sub(base)
                .next_multiple_of(STATE_PAD_TO);
        region.resize(len.max(region.len()), 0);
    }
    (flags, region)
}

/// Encodes a `state_open` input from a whole region (as `State::close`
/// gives it back): its trailing zeros are cut and [`STATE_PAD`] is set when
/// padding gives them back.
pub fn state_input(flags: u8, region: &[u8]) -> Vec<u8> {
    let end = region.iter().rposition(|&b| b != 0).map_or(1, |i| i + 1);
    let mut out = vec![flags | STATE_PAD];
    out.extend_from_slice(&region[..end.min(region.len())]);
    if state_region(&out).1 != region {
        out = vec![flags & !STATE_PAD];
        out.extend_from_slice(region);
    }
    out
}

/// `snapshot_header` flag: pad the region with zeros to a whole
/// shm-snapshot header page plus 64 bytes of data.
pub const HEADER_PAD: u8 = 1;

/// `snapshot_header` input: byte 0 holds flags ([`HEADER_PAD`]; bits 1..8
/// pick the length's remainder mod 8 when padding, so regions with a tail
/// of single bytes are reached too), the rest is the region's first bytes.
pub fn header_region(data: &[u8]) -> Vec<u8> {
    let Some((&flags, bytes)) = data.split_first() else {
        return Vec::new();
    };
    let mut region = bytes.to_vec();
    if flags & HEADER_PAD != 0 {
        let want = shm_snapshot::HEADER_LEN + 64 + usize::from((flags >> 1) & 7);
        if region.len() < want {
            region.resize(want, 0);
        }
    }
    region
}

const SNAP_HEADER_LEN: usize = shm_restore::format::HEADER_LEN;
const SNAP_ENTRY_LEN: usize = shm_restore::format::ENTRY_LEN;
const OFF_CHUNK_COUNT: usize = 48;
const OFF_DATA_OFFSET: usize = 72;
const OFF_TABLE_CRC: usize = 80;
const OFF_HEADER_CRC: usize = 124;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Rewrites the checksums of a snapshot file (docs/snapshot-format.md)
/// so that they match its bytes: each chunk's CRC whose entry and bytes
/// are inside the file, the table's CRC and the header's CRC. Fields that
/// do not fit are left alone.
///
/// Random mutations almost never keep three layers of CRC32 right; with
/// this, the `snapshot_reader` target also reaches the checks behind them
/// (table rules, lengths, offsets) with mutated values.
pub fn repair_snapshot_crcs(bytes: &mut [u8]) {
    if bytes.len() < SNAP_HEADER_LEN {
        return;
    }
    let count = u64_at(bytes, OFF_CHUNK_COUNT);
    let data_offset = u64_at(bytes, OFF_DATA_OFFSET);
    let table_end = count
        .checked_mul(SNAP_ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(SNAP_HEADER_LEN as u64))
        .filter(|&end| end <= bytes.len() as u64);
    if let Some(table_end) = table_end {
        let table_end = table_end as usize;
        let mut at = data_offset;
        for entry in (SNAP_HEADER_LEN..table_end).step_by(SNAP_ENTRY_LEN) {
            let len = u32::from_le_bytes(bytes[entry + 8..entry + 12].try_into().expect("4"));
            let Some(end) = at.checked_add(u64::from(len)) else {
                break;
            };
            if end > bytes.len() as u64 {
                break;
            }
            let crc = crc32fast::hash(&bytes[at as usize..end as usize]);
            bytes[entry + 12..entry + 16].copy_from_slice(&crc.to_le_bytes());
            at = end;
        }
        let crc = crc32fast::hash(&bytes[SNAP_HEADER_LEN..table_end]);
        bytes[OFF_TABLE_CRC..OFF_TABLE_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32fast::hash(&bytes[..OFF_HEADER_CRC]);
    bytes[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_env_encoding_round_trips() {
        let values: [Option<&[u8]>; 3] = [Some(b"2"), None, Some(b"")];
        let data = join_listen_env(values);
        let split = split_listen_env(&data);
        assert_eq!(split[0], Some(OsStr::new("2")));
        assert_eq!(split[1], None);
        assert_eq!(split[2], Some(OsStr::new("")));
    }

    #[test]
    fn state_input_cuts_and_pads() {
        let mut region = vec![0u8; 4096 + STATE_PAD_TO];
        region[5000] = 7;
        let input = state_input(STATE_PROTOCOL, &region);
        assert_eq!(input.len(), 5002);
        assert_eq!(state_region(&input), (STATE_PROTOCOL | STATE_PAD, region));
        // Not a padded length: kept whole.
        let input = state_input(0, &[1, 0, 0]);
        assert_eq!(state_region(&input), (0, vec![1, 0, 0]));
    }
}
