//! The snapshot file format: constants, header and chunk table encoding,
//! and validation. Pure functions over bytes; no I/O.
//!
//! Version 1 is a full snapshot; version 2 is a *delta*: the same layout,
//! whose header names the snapshot it applies to (its base, by generation
//! and header CRC) and whose table lists whole chunk-sized cells of the
//! memfd that replace the base's (see [`Base`]).
//!
//! `docs/snapshot-format.md` describes the same layout byte by byte; the
//! constants here and the tables there must agree.
//!
//! ```text
//! [0, 128)                      header (CRC32 over bytes 0..124 at 124)
//! [128, 128 + 16 * chunk_count) chunk table (CRC32 in the header)
//! [.., data_offset)             zero padding up to a 4096-byte boundary
//! [data_offset, file_len)       the stored chunks' bytes, in table order
//! ```

use crate::error::Damage;

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"SHMSNAP\0";
/// The format version of a full snapshot.
pub const VERSION: u32 = 1;
/// The format version of a delta snapshot (see [`Base`]).
pub const VERSION_DELTA: u32 = 2;
/// The most deltas a chain may hold above its full snapshot: a delta whose
/// `depth` is larger is damage. (Writers compact far earlier; see
/// `SaveOptions::max_chain`.)
pub const MAX_DEPTH: u32 = 1024;
/// The size of the header in bytes.
pub const HEADER_LEN: usize = 128;
/// The size of one chunk table entry in bytes.
pub const ENTRY_LEN: usize = 16;
/// The data region starts on a multiple of this.
pub const DATA_ALIGN: u64 = 4096;
/// The chunk size `shm-restore` writes: each chunk of at most this many
/// bytes carries its own CRC32, so damage is located to within 256 KiB,
/// and a delta stores the 256 KiB cells that changed.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
/// The smallest chunk size a file may declare.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// The largest chunk size a file may declare.
pub const MAX_CHUNK_SIZE: u32 = 1 << 26;

// Field offsets in the header (see docs/snapshot-format.md).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_CHUNK_SIZE: usize = 16;
const OFF_FLAGS: usize = 20;
const OFF_DATA_LEN: usize = 24;
const OFF_GENERATION: usize = 32;
const OFF_SAVED_AT: usize = 40;
const OFF_CHUNK_COUNT: usize = 48;
const OFF_STORED_LEN: usize = 56;
const OFF_TABLE_OFFSET: usize = 64;
const OFF_DATA_OFFSET: usize = 72;
const OFF_TABLE_CRC: usize = 80;
const OFF_RESERVED: usize = 84;
// Version 2 only: the base, in the bytes version 1 reserves.
const OFF_BASE_GENERATION: usize = 84;
const OFF_BASE_CRC: usize = 92;
const OFF_DEPTH: usize = 96;
const OFF_RESERVED_2: usize = 100;
const OFF_HEADER_CRC: usize = 124;

/// What a delta snapshot (format version 2) applies to.
///
/// A delta's memfd is its base's memfd, cut or extended (with zeros) to the
/// delta's `data_len`, with every cell the delta's table lists replaced by
/// the stored bytes. A cell is the `chunk_size` bytes at a multiple of
/// `chunk_size` (the last one ends at `data_len`); each table entry is one
/// whole cell, stored dense (zeros included).
///
/// The base is the snapshot of generation `generation` whose header CRC
/// (bytes 124..128) is `header_crc`, found next to the delta under the
/// name `<NAME>.gen-<generation>` (see `shm_restore::base_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    /// The base's generation: less than the delta's.
    pub generation: u64,
    /// The base's header CRC: names its exact contents, since the header
    /// covers the table's CRC, which covers every chunk's.
    pub header_crc: u32,
    /// How many deltas the chain holds up to this one: 1 when the base is
    /// a full snapshot, else the base's depth + 1. `1..=MAX_DEPTH`.
    pub depth: u32,
}

/// The decoded, validated header of a snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The largest number of bytes one chunk may hold.
    pub chunk_size: u32,
    /// The size of the memfd the snapshot was taken of, holes included.
    pub data_len: u64,
    /// Counts the saves of this snapshot series, 1 for the first.
    pub generation: u64,
    /// When the save captured the data: nanoseconds since the Unix epoch.
    pub saved_at_ns: u64,
    /// The number of entries in the chunk table.
    pub chunk_count: u64,
    /// The number of data bytes stored (the sum of the chunk lengths).
    pub stored_len: u64,
    /// Where the data region starts in the file.
    pub data_offset: u64,
    /// CRC32 of the chunk table.
    pub table_crc: u32,
    /// `Some` for a delta (format version 2): what it applies to.
    pub base: Option<Base>,
}

impl Header {
    /// The header's own CRC32 (bytes 124..128 of its encoding): what a
    /// delta names its base by.
    pub fn crc(&self) -> u32 {
        get_u32(&self.encode(), OFF_HEADER_CRC)
    }

    /// True for a delta snapshot.
    pub fn is_delta(&self) -> bool {
        self.base.is_some()
    }

    /// The file length this header implies.
    pub fn file_len(&self) -> u64 {
        // Checked in `decode`; `new` builds it from an in-memory image.
        self.data_offset + self.stored_len
    }

    /// Encodes the header, computing its CRC.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(
            &mut b,
            OFF_VERSION,
            if self.base.is_some() {
                VERSION_DELTA
            } else {
                VERSION
            },
        );
        put_u32(&mut b, OFF_HEADER_LEN, HEADER_LEN as u32);
        put_u32(&mut b, OFF_CHUNK_SIZE, self.chunk_size);
        put_u32(&mut b, OFF_FLAGS, 0);
        put_u64(&mut b, OFF_DATA_LEN, self.data_len);
        put_u64(&mut b, OFF_GENERATION, self.generation);
        put_u64(&mut b, OFF_SAVED_AT, self.saved_at_ns);
        put_u64(&mut b, OFF_CHUNK_COUNT, self.chunk_count);
        put_u64(&mut b, OFF_STORED_LEN, self.stored_len);
        put_u64(&mut b, OFF_TABLE_OFFSET, HEADER_LEN as u64);
        put_u64(&mut b, OFF_DATA_OFFSET, self.data_offset);
        put_u32(&mut b, OFF_TABLE_CRC, self.table_crc);
        if let Some(base) = self.base {
            put_u64(&mut b, OFF_BASE_GENERATION, base.generation);
            put_u32(&mut b, OFF_BASE_CRC, base.header_crc);
            put_u32(&mut b, OFF_DEPTH, base.depth);
        }
        let crc = crc32fast::hash(&b[..OFF_HEADER_CRC]);
        put_u32(&mut b, OFF_HEADER_CRC, crc);
        b
    }

    /// Decodes and validates a header read from a file of `file_len` bytes.
    ///
    /// `bytes` holds the first bytes of the file (up to [`HEADER_LEN`]).
    /// Every size, count and offset is checked against the others and
    /// against the file length with checked arithmetic, so that reads
    /// based on the header stay inside the file: the table and the data
    /// fit in it exactly, there are no more chunks than stored bytes, and
    /// no more stored bytes than `chunk_count` full chunks hold.
    ///
    /// The data size is not compared with a maximum here: a file holding
    /// more than a reader accepts is not damaged (see
    /// the snapshot reader's `read_header`).
    pub fn decode(bytes: &[u8], file_len: u64) -> Result<Header, Damage> {
        let n = bytes.len().min(MAGIC.len());
        if bytes[..n] != MAGIC[..n] {
            return Err(Damage::BadMagic);
        }
        if bytes.len() < OFF_VERSION + 4 || file_len < (OFF_VERSION + 4) as u64 {
            return Err(Damage::Truncated {
                len: file_len,
                expected: HEADER_LEN as u64,
            });
        }
        let version = get_u32(bytes, OFF_VERSION);
        if version != VERSION && version != VERSION_DELTA {
            return Err(Damage::UnsupportedVersion { version });
        }
        if bytes.len() < HEADER_LEN || file_len < HEADER_LEN as u64 {
            return Err(Damage::Truncated {
                len: file_len,
                expected: HEADER_LEN as u64,
            });
        }
        let stored = get_u32(bytes, OFF_HEADER_CRC);
        let computed = crc32fast::hash(&bytes[..OFF_HEADER_CRC]);
        if stored != computed {
            return Err(Damage::HeaderChecksum { stored, computed });
        }
        let bad = |field: &'static str, problem: String| Damage::BadHeader { field, problem };
        let header_len = get_u32(bytes, OFF_HEADER_LEN);
        if header_len as usize != HEADER_LEN {
            return Err(bad(
                "header_len",
                format!("is {header_len}, not {HEADER_LEN}"),
            ));
        }
        let flags = get_u32(bytes, OFF_FLAGS);
        if flags != 0 {
            return Err(bad("flags", format!("has unknown bits {flags:#x}")));
        }
        let reserved_from = if version == VERSION {
            OFF_RESERVED
        } else {
            OFF_RESERVED_2
        };
        if bytes[reserved_from..OFF_HEADER_CRC].iter().any(|&b| b != 0) {
            return Err(bad("reserved", "bytes are not zero".into()));
        }
        let generation = get_u64(bytes, OFF_GENERATION);
        let base = if version == VERSION_DELTA {
            let base = Base {
                generation: get_u64(bytes, OFF_BASE_GENERATION),
                header_crc: get_u32(bytes, OFF_BASE_CRC),
                depth: get_u32(bytes, OFF_DEPTH),
            };
            if base.generation == 0 || base.generation >= generation {
                return Err(bad(
                    "base_generation",
                    format!(
                        "is {}, not in 1..{generation} (before the delta's own)",
                        base.generation
                    ),
                ));
            }
            if !(1..=MAX_DEPTH).contains(&base.depth) {
                return Err(bad(
                    "depth",
                    format!("is {}, not in 1..={MAX_DEPTH}", base.depth),
                ));
            }
            Some(base)
        } else {
            None
        };
        let chunk_size = get_u32(bytes, OFF_CHUNK_SIZE);
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(bad(
                "chunk_size",
                format!(
                    "{chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
                ),
            ));
        }
        let data_len = get_u64(bytes, OFF_DATA_LEN);
        let table_offset = get_u64(bytes, OFF_TABLE_OFFSET);
        if table_offset != HEADER_LEN as u64 {
            return Err(bad(
                "table_offset",
                format!("is {table_offset}, not {HEADER_LEN}"),
            ));
        }
        let chunk_count = get_u64(bytes, OFF_CHUNK_COUNT);
        let data_offset = get_u64(bytes, OFF_DATA_OFFSET);
        let expected_data_offset = data_offset_for(chunk_count)
            .ok_or_else(|| bad("chunk_count", format!("{chunk_count} is impossibly large")))?;
        if data_offset != expected_data_offset {
            return Err(bad(
                "data_offset",
                format!(
                    "is {data_offset}, {chunk_count} chunks put the data at {expected_data_offset}"
                ),
            ));
        }
        let stored_len = get_u64(bytes, OFF_STORED_LEN);
        if stored_len > data_len {
            return Err(bad(
                "stored_len",
                format!("{stored_len} exceeds the data size {data_len}"),
            ));
        }
        // Every chunk holds at least one stored byte: a larger count is
        // damage (and would size the table buffer from a lie).
        if chunk_count > stored_len {
            return Err(bad(
                "chunk_count",
                format!("{chunk_count} exceeds the {stored_len} stored bytes"),
            ));
        }
        // Every chunk holds at most chunk_size bytes: fewer chunks than
        // that needs is damage too.
        if chunk_count
            .checked_mul(u64::from(chunk_size))
            .is_some_and(|most| stored_len > most)
        {
            return Err(bad(
                "chunk_count",
                format!(
                    "{chunk_count} chunks of at most {chunk_size} bytes cannot hold the \
                     {stored_len} stored bytes"
                ),
            ));
        }
        let expected_len = data_offset
            .checked_add(stored_len)
            .ok_or_else(|| bad("stored_len", format!("{stored_len} overflows")))?;
        if file_len < expected_len {
            return Err(Damage::Truncated {
                len: file_len,
                expected: expected_len,
            });
        }
        if file_len > expected_len {
            return Err(Damage::TrailingBytes {
                len: file_len,
                expected: expected_len,
            });
        }
        Ok(Header {
            chunk_size,
            data_len,
            generation,
            saved_at_ns: get_u64(bytes, OFF_SAVED_AT),
            chunk_count,
            stored_len,
            data_offset,
            table_crc: get_u32(bytes, OFF_TABLE_CRC),
            base,
        })
    }
}

/// One entry of the chunk table: `len` bytes of the memfd at `offset`,
/// stored in the data region after the chunks before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Where the bytes belong in the memfd.
    pub offset: u64,
    /// How many bytes (1 ..= chunk_size).
    pub len: u32,
    /// CRC32 of the bytes.
    pub crc: u32,
}

/// Splits the memfd bytes `offset..offset + len` at every multiple of
/// `chunk_size`: the chunks a writer stores for a data extent, each inside
/// one cell, so that the chunks of a cell can be compared between saves.
/// Yields `(offset, len)` pairs.
pub fn split_at_cells(offset: u64, len: u64, chunk_size: u32) -> impl Iterator<Item = (u64, u32)> {
    let size = u64::from(chunk_size.max(1));
    let end = offset.saturating_add(len);
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let cell_end = (at / size).saturating_add(1).saturating_mul(size);
        let n = cell_end.min(end) - at;
        let here = at;
        at += n;
        Some((here, n as u32))
    })
}

/// Where the data region starts for a table of `chunk_count` entries, or
/// `None` if that overflows.
pub fn data_offset_for(chunk_count: u64) -> Option<u64> {
    let table_end = chunk_count
        .checked_mul(ENTRY_LEN as u64)?
        .checked_add(HEADER_LEN as u64)?;
    table_end.checked_next_multiple_of(DATA_ALIGN)
}

/// Encodes the chunk table.
pub fn encode_table(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.len() * ENTRY_LEN);
    for c in chunks {
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
        out.extend_from_slice(&c.crc.to_le_bytes());
    }
    out
}

/// Decodes and validates the chunk table of `header` held in `bytes`
/// (exactly `16 * chunk_count` bytes): as [`TableDecoder`], in one piece.
pub fn decode_table(bytes: &[u8], header: &Header) -> Result<Vec<Chunk>, Damage> {
    let expected = header
        .chunk_count
        .checked_mul(ENTRY_LEN as u64)
        .filter(|&n| n == bytes.len() as u64);
    if expected.is_none() {
        return Err(Damage::BadTable {
            index: 0,
            problem: format!(
                "is {} bytes, {} entries need {}",
                bytes.len(),
                header.chunk_count,
                header.chunk_count.saturating_mul(ENTRY_LEN as u64)
            ),
        });
    }
    let mut decoder = TableDecoder::new(header);
    let mut chunks = Vec::with_capacity(bytes.len() / ENTRY_LEN);
    decoder.push(bytes, &mut chunks)?;
    decoder.finish()?;
    Ok(chunks)
}

/// Decodes a chunk table piece by piece, so that a reader holds one piece
/// of the table at a time and stops at the first impossible entry: a
/// table that is damaged (or a sparse file's zeros) costs the work of
/// reading up to that entry, not of its declared size.
///
/// Each entry is checked as it arrives: non-empty, at most `chunk_size`
/// long, after the previous chunk's end (sorted, not overlapping), inside
/// `data_len`, and no more entries than `chunk_count`. [`TableDecoder::finish`]
/// then checks the count, the sum of the lengths against `stored_len` and
/// the table's CRC.
#[derive(Debug, Clone)]
pub struct TableDecoder {
    chunk_size: u32,
    data_len: u64,
    chunk_count: u64,
    stored_len: u64,
    table_crc: u32,
    whole_cells: bool,
    index: u64,
    end_of_previous: u64,
    stored: u64,
    crc: crc32fast::Hasher,
}

impl TableDecoder {
    /// A decoder of the table `header` describes.
    pub fn new(header: &Header) -> TableDecoder {
        TableDecoder {
            chunk_size: header.chunk_size,
            data_len: header.data_len,
            chunk_count: header.chunk_count,
            stored_len: header.stored_len,
            table_crc: header.table_crc,
            whole_cells: header.is_delta(),
            index: 0,
            end_of_previous: 0,
            stored: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Decodes the next entries, `bytes` holding a whole number of them,
    /// appending each valid one to `out`. Stops at the first bad entry.
    ///
    /// # Panics
    ///
    /// If `bytes` is not a multiple of [`ENTRY_LEN`] long (a caller's
    /// mistake, not the file's).
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Chunk>) -> Result<(), Damage> {
        assert!(
            bytes.len().is_multiple_of(ENTRY_LEN),
            "whole table entries only"
        );
        self.crc.update(bytes);
        for e in bytes.chunks_exact(ENTRY_LEN) {
            let index = self.index;
            let bad = |problem: String| Damage::BadTable { index, problem };
            if index >= self.chunk_count {
                return Err(bad(format!(
                    "is past the {} entries the header declares",
                    self.chunk_count
                )));
            }
            let chunk = Chunk {
                offset: get_u64(e, 0),
                len: get_u32(e, 8),
                crc: get_u32(e, 12),
            };
            if chunk.len == 0 || chunk.len > self.chunk_size {
                return Err(bad(format!(
                    "has length {}, not 1..={}",
                    chunk.len, self.chunk_size
                )));
            }
            if index > 0 && chunk.offset < self.end_of_previous {
                return Err(bad(format!(
                    "starts at {}, before the previous chunk's end {}",
                    chunk.offset, self.end_of_previous
                )));
            }
            let end = chunk
                .offset
                .checked_add(u64::from(chunk.len))
                .filter(|&end| end <= self.data_len)
                .ok_or_else(|| {
                    bad(format!(
                        "covers {}+{}, beyond the data size {}",
                        chunk.offset, chunk.len, self.data_len
                    ))
                })?;
            if self.whole_cells {
                let size = u64::from(self.chunk_size);
                let cell_len = size.min(self.data_len - chunk.offset);
                if !chunk.offset.is_multiple_of(size) || u64::from(chunk.len) != cell_len {
                    return Err(bad(format!(
                        "covers {}+{}, not a whole cell of {size} bytes (a delta \
                         stores whole cells)",
                        chunk.offset, chunk.len
                    )));
                }
            }
            // Cannot overflow: the chunks lie apart inside data_len.
            self.stored += u64::from(chunk.len);
            if self.stored > self.stored_len {
                return Err(bad(format!(
                    "brings the stored bytes to {}, more than the {} the header says",
                    self.stored, self.stored_len
                )));
            }
            self.end_of_previous = end;
            self.index += 1;
            out.push(chunk);
        }
        Ok(())
    }

    /// Checks what only the whole table tells: as many entries as
    /// declared, their lengths adding up to `stored_len`, and the CRC.
    pub fn finish(self) -> Result<(), Damage> {
        if self.index != self.chunk_count {
            return Err(Damage::BadTable {
                index: self.index,
                problem: format!(
                    "is missing: the table ends after {} of {} entries",
                    self.index, self.chunk_count
                ),
            });
        }
        if self.stored != self.stored_len {
            return Err(Damage::BadTable {
                index: self.chunk_count,
                problem: format!(
                    "chunks hold {} bytes, the header says {}",
                    self.stored, self.stored_len
                ),
            });
        }
        let computed = self.crc.finalize();
        if computed != self.table_crc {
            return Err(Damage::TableChecksum {
                stored: self.table_crc,
                computed,
            });
        }
        Ok(())
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(chunks: &[Chunk], data_len: u64) -> Header {
        Header {
            chunk_size: MIN_CHUNK_SIZE,
            data_len,
            generation: 7,
            saved_at_ns: 1_700_000_000_000_000_000,
            chunk_count: chunks.len() as u64,
            stored_len: chunks.iter().map(|c| u64::from(c.len)).sum(),
            data_offset: data_offset_for(chunks.len() as u64).unwrap(),
            table_crc: crc32fast::hash(&encode_table(chunks)),
            base: None,
        }
    }

    #[test]
    fn header_round_trips_and_offsets_match_the_doc() {
        let chunks = [Chunk {
            offset: 4096,
            len: 100,
            crc: 5,
        }];
        let h = header(&chunks, 8192);
        let b = h.encode();
        assert_eq!(&b[..8], b"SHMSNAP\0");
        assert_eq!(b[8..12], 1u32.to_le_bytes());
        assert_eq!(b[12..16], 128u32.to_le_bytes());
        assert_eq!(b[24..32], 8192u64.to_le_bytes());
        assert_eq!(b[32..40], 7u64.to_le_bytes());
        assert_eq!(b[72..80], 4096u64.to_le_bytes());
        assert_eq!(Header::decode(&b, 4196), Ok(h));
    }

    #[test]
    fn a_delta_header_round_trips_and_its_fields_are_where_the_doc_says() {
        let cells = [Chunk {
            offset: 8192,
            len: 4096,
            crc: 9,
        }];
        let mut h = header(&cells, 3 * 4096);
        h.base = Some(Base {
            generation: 6,
            header_crc: 0xDEAD_BEEF,
            depth: 3,
        });
        let b = h.encode();
        assert_eq!(b[8..12], 2u32.to_le_bytes());
        assert_eq!(b[84..92], 6u64.to_le_bytes());
        assert_eq!(b[92..96], 0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(b[96..100], 3u32.to_le_bytes());
        assert!(b[100..124].iter().all(|&x| x == 0));
        assert_eq!(Header::decode(&b, 4096 + 4096), Ok(h));
        assert_eq!(h.crc(), u32::from_le_bytes(b[124..128].try_into().unwrap()));
        // Every flipped bit is caught, as for version 1.
        for bit in 0..HEADER_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::decode(&c, 8192).is_err(), "bit {bit}");
        }
        // Impossible chain fields, with a matching CRC.
        for (generation, depth, field) in [
            (0, 1, "base_generation"),
            (7, 1, "base_generation"),
            (8, 1, "base_generation"),
            (6, 0, "depth"),
            (6, MAX_DEPTH + 1, "depth"),
        ] {
            let mut bad = h;
            bad.base = Some(Base {
                generation,
                header_crc: 1,
                depth,
            });
            match Header::decode(&bad.encode(), 8192) {
                Err(Damage::BadHeader { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{generation}/{depth}: {other:?}"),
            }
        }
        // Reserved bytes after the chain fields must be zero.
        let mut r = b;
        r[110] = 1;
        let crc = crc32fast::hash(&r[..124]);
        r[124..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Header::decode(&r, 8192),
            Err(Damage::BadHeader {
                field: "reserved",
                ..
            })
        ));
    }

    #[test]
    fn a_delta_table_holds_whole_cells_only() {
        let delta = |chunks: &[Chunk], data_len: u64| {
            let mut h = header(chunks, data_len);
            h.base = Some(Base {
                generation: 1,
                header_crc: 0,
                depth: 1,
            });
            decode_table(&encode_table(chunks), &h)
        };
        let c = |offset, len| Chunk {
            offset,
            len,
            crc: 0,
        };
        // Whole cells, the last one cut at data_len.
        assert!(delta(&[c(0, 4096), c(8192, 100)], 8292).is_ok());
        for (chunks, len) in [
            (vec![c(1, 4095)], 8192),   // not at a cell's start
            (vec![c(0, 4095)], 8192),   // short of the cell
            (vec![c(4096, 100)], 8192), // short, not the last cell
            (vec![c(8192, 99)], 8292),  // short of the cut last cell
        ] {
            assert!(
                matches!(delta(&chunks, len), Err(Damage::BadTable { index: 0, .. })),
                "{chunks:?}"
            );
        }
        // The same chunks are fine in a full snapshot.
        assert!(decode_table(&encode_table(&[c(1, 4095)]), &header(&[c(1, 4095)], 8192)).is_ok());
    }

    #[test]
    fn extents_split_at_cells() {
        let v: Vec<_> = split_at_cells(4000, 9000, 4096).collect();
        assert_eq!(v, [(4000, 96), (4096, 4096), (8192, 4096), (12288, 712)]);
        assert_eq!(split_at_cells(0, 0, 4096).count(), 0);
        let v: Vec<_> = split_at_cells(u64::MAX - 10, 10, 4096).collect();
        assert_eq!(v, [(u64::MAX - 10, 10)]);
    }

    #[test]
    fn every_flipped_header_bit_is_detected() {
        let h = header(&[], 10);
        let b = h.encode();
        for bit in 0..HEADER_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::decode(&c, 4096).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn header_rejects_bad_sizes() {
        let h = header(&[], 10);
        let b = h.encode();
        assert!(matches!(
            Header::decode(&b, 4095),
            Err(Damage::Truncated { .. })
        ));
        assert!(matches!(
            Header::decode(&b, 4097),
            Err(Damage::TrailingBytes { .. })
        ));
        assert!(matches!(
            Header::decode(&b[..50], 50),
            Err(Damage::Truncated { .. })
        ));
        assert!(matches!(
            Header::decode(b"garbage", 7),
            Err(Damage::BadMagic)
        ));
        let mut v3 = b;
        v3[8] = 3;
        assert!(matches!(
            Header::decode(&v3, 4096),
            Err(Damage::UnsupportedVersion { version: 3 })
        ));
        // Version 2 with version 1's bytes: the CRC no longer matches.
        let mut v2 = b;
        v2[8] = 2;
        assert!(matches!(
            Header::decode(&v2, 4096),
            Err(Damage::HeaderChecksum { .. })
        ));
        // A huge chunk count with a correct CRC must not overflow.
        let mut huge = h;
        huge.chunk_count = u64::MAX / 8;
        assert!(Header::decode(&huge.encode(), 4096).is_err());
        // A sparse file can be as long as a huge table says: more chunks
        // than stored bytes is refused before any table is read.
        let mut sparse = h;
        sparse.chunk_count = 1 << 36;
        sparse.data_offset = data_offset_for(1 << 36).unwrap();
        let len = sparse.data_offset;
        let e = Header::decode(&sparse.encode(), len).unwrap_err();
        assert!(e.to_string().contains("chunk_count"), "{e}");
    }

    #[test]
    fn table_rules() {
        let ok = [
            Chunk {
                offset: 0,
                len: 10,
                crc: 1,
            },
            Chunk {
                offset: 4096,
                len: 4096,
                crc: 2,
            },
        ];
        let h = header(&ok, 8192);
        assert_eq!(decode_table(&encode_table(&ok), &h).unwrap(), ok);
        for bad in [
            [ok[1], ok[0]],
            [ok[0], Chunk { offset: 5, ..ok[1] }],
            [
                ok[0],
                Chunk {
                    offset: 8000,
                    ..ok[1]
                },
            ],
            [ok[0], Chunk { len: 0, ..ok[1] }],
        ] {
            let h = header(&bad, 8192);
            assert!(
                matches!(
                    decode_table(&encode_table(&bad), &h),
                    Err(Damage::BadTable { .. })
                ),
                "{bad:?}"
            );
        }
        // A changed CRC field breaks only the table's CRC.
        let mut t = encode_table(&ok);
        t[12] ^= 1;
        assert!(matches!(
            decode_table(&t, &h),
            Err(Damage::TableChecksum { .. })
        ));
        // A changed offset is located at its entry, before the CRC.
        let mut t = encode_table(&ok);
        t[3] ^= 1;
        assert!(matches!(
            decode_table(&t, &h),
            Err(Damage::BadTable { index: 0, .. })
        ));
    }

    #[test]
    fn header_bounds_chunk_count_by_stored_len_both_ways() {
        let one = [Chunk {
            offset: 0,
            len: 100,
            crc: 0,
        }];
        // More chunks than stored bytes.
        let mut h = header(&one, 8192);
        h.chunk_count = 101;
        h.data_offset = data_offset_for(101).unwrap();
        let e = Header::decode(&h.encode(), h.file_len()).unwrap_err();
        assert!(
            e.to_string().contains("exceeds the 100 stored bytes"),
            "{e}"
        );
        // More stored bytes than chunk_count full chunks hold.
        let mut h = header(&one, 1 << 20);
        h.stored_len = u64::from(MIN_CHUNK_SIZE) + 1;
        let e = Header::decode(&h.encode(), h.file_len()).unwrap_err();
        assert!(e.to_string().contains("cannot hold"), "{e}");
        // Exactly full is fine.
        h.stored_len = u64::from(MIN_CHUNK_SIZE);
        assert!(Header::decode(&h.encode(), h.file_len()).is_ok());
    }

    /// The sparse-file attack at the header level: 2^32 one-byte chunks in
    /// a file exactly as long as that needs passes the header checks (the
    /// table must be read to see that it is zeros), so the table reader
    /// must not size anything by `chunk_count`.
    #[test]
    fn a_header_declaring_2_pow_32_chunks_can_be_consistent() {
        let mut h = header(&[], 0);
        h.chunk_count = 1 << 32;
        h.stored_len = 1 << 32;
        h.data_len = 1 << 33;
        h.data_offset = data_offset_for(1 << 32).unwrap();
        let decoded = Header::decode(&h.encode(), h.file_len()).unwrap();
        assert_eq!(decoded.chunk_count, 1 << 32);
        let mut chunks = Vec::new();
        let e = TableDecoder::new(&decoded)
            .push(&[0u8; 4096], &mut chunks)
            .unwrap_err();
        assert_eq!(
            e,
            Damage::BadTable {
                index: 0,
                problem: "has length 0, not 1..=4096".into()
            }
        );
        assert!(chunks.is_empty());
    }

    #[test]
    fn table_decoder_checks_each_bound_as_entries_arrive() {
        let c = |offset, len| Chunk {
            offset,
            len,
            crc: 0,
        };
        let ok = [c(0, 4096), c(4096, 10), c(8192, 4096)];
        let h = header(&ok, 3 * 4096);
        // Entry by entry gives the same table as all at once.
        let table = encode_table(&ok);
        let mut d = TableDecoder::new(&h);
        let mut out = Vec::new();
        for e in table.chunks(ENTRY_LEN) {
            d.push(e, &mut out).unwrap();
        }
        d.finish().unwrap();
        assert_eq!(out, ok);

        let problem = |chunks: &[Chunk], h: &Header| -> (u64, String) {
            let mut out = Vec::new();
            let mut d = TableDecoder::new(h);
            match d
                .push(&encode_table(chunks), &mut out)
                .and_then(|()| d.finish())
            {
                Err(Damage::BadTable { index, problem }) => (index, problem),
                other => panic!("{chunks:?}: {other:?}"),
            }
        };
        let cases: [(&[Chunk], u64, &str); 7] = [
            (&[c(0, 4097)], 0, "has length 4097"),
            (&[c(0, 0)], 0, "has length 0"),
            (
                &[c(0, 4096), c(100, 10)],
                1,
                "before the previous chunk's end 4096",
            ),
            (&[c(3 * 4096 - 5, 10)], 0, "beyond the data size"),
            (&[c(u64::MAX - 2, 10)], 0, "beyond the data size"),
            (
                &[c(0, 4096), c(4096, 4096), c(8192, 4096)],
                2,
                "to 12288, more than the 8202 the header says",
            ),
            (&[c(0, 4096)], 1, "after 1 of 3 entries"),
        ];
        for (chunks, index, want) in cases {
            let (i, p) = problem(chunks, &h);
            assert_eq!(i, index, "{chunks:?}: {p}");
            assert!(p.contains(want), "{chunks:?}: {p}");
        }
        // More entries than declared.
        let mut two = h;
        two.chunk_count = 2;
        let (i, p) = problem(&ok, &two);
        assert_eq!(i, 2);
        assert!(p.contains("past the 2 entries"), "{p}");
        // The lengths fall short of stored_len.
        let mut short = h;
        short.stored_len += 1;
        let (i, p) = problem(&ok, &short);
        assert_eq!(i, 3);
        assert!(p.contains("the header says 8203"), "{p}");
    }
}
