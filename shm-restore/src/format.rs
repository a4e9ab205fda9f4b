//! The snapshot file format, version 1: constants, header and chunk table
//! encoding, and validation. Pure functions over bytes; no I/O.
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
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// The size of the header in bytes.
pub const HEADER_LEN: usize = 128;
/// The size of one chunk table entry in bytes.
pub const ENTRY_LEN: usize = 16;
/// The data region starts on a multiple of this.
pub const DATA_ALIGN: u64 = 4096;
/// The chunk size `shm-restore` writes: each chunk of at most this many
/// bytes carries its own CRC32, so damage is located to within 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
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
const OFF_HEADER_CRC: usize = 124;

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
}

impl Header {
    /// The file length this header implies.
    pub fn file_len(&self) -> u64 {
        // Checked in `decode`; `new` builds it from an in-memory image.
        self.data_offset + self.stored_len
    }

    /// Encodes the header, computing its CRC.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut b, OFF_VERSION, VERSION);
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
        let crc = crc32fast::hash(&b[..OFF_HEADER_CRC]);
        put_u32(&mut b, OFF_HEADER_CRC, crc);
        b
    }

    /// Decodes and validates a header read from a file of `file_len` bytes.
    ///
    /// `bytes` holds the first bytes of the file (up to [`HEADER_LEN`]).
    /// Every size and offset is checked against the file length and against
    /// `max_data_len` with checked arithmetic, so later reads based on the
    /// header stay inside the file.
    pub fn decode(bytes: &[u8], file_len: u64, max_data_len: u64) -> Result<Header, Damage> {
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
        if version != VERSION {
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
        if bytes[OFF_RESERVED..OFF_HEADER_CRC].iter().any(|&b| b != 0) {
            return Err(bad("reserved", "bytes are not zero".into()));
        }
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
        if data_len > max_data_len {
            return Err(Damage::TooLarge {
                data_len,
                max: max_data_len,
            });
        }
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
            generation: get_u64(bytes, OFF_GENERATION),
            saved_at_ns: get_u64(bytes, OFF_SAVED_AT),
            chunk_count,
            stored_len,
            data_offset,
            table_crc: get_u32(bytes, OFF_TABLE_CRC),
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

/// Decodes and validates the chunk table of `header`: its CRC, and that the
/// chunks are non-empty, at most `chunk_size` long, sorted, non-overlapping,
/// inside `data_len`, and add up to `stored_len`.
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
    let computed = crc32fast::hash(bytes);
    if computed != header.table_crc {
        return Err(Damage::TableChecksum {
            stored: header.table_crc,
            computed,
        });
    }
    let mut chunks = Vec::with_capacity(bytes.len() / ENTRY_LEN);
    let mut end_of_previous = 0u64;
    let mut stored = 0u64;
    for (index, e) in bytes.chunks_exact(ENTRY_LEN).enumerate() {
        let chunk = Chunk {
            offset: get_u64(e, 0),
            len: get_u32(e, 8),
            crc: get_u32(e, 12),
        };
        let bad = |problem: String| Damage::BadTable {
            index: index as u64,
            problem,
        };
        if chunk.len == 0 || chunk.len > header.chunk_size {
            return Err(bad(format!(
                "has length {}, not 1..={}",
                chunk.len, header.chunk_size
            )));
        }
        if index > 0 && chunk.offset < end_of_previous {
            return Err(bad(format!(
                "starts at {}, before the previous chunk's end {end_of_previous}",
                chunk.offset
            )));
        }
        let end = chunk
            .offset
            .checked_add(u64::from(chunk.len))
            .filter(|&end| end <= header.data_len)
            .ok_or_else(|| {
                bad(format!(
                    "covers {}+{}, beyond the data size {}",
                    chunk.offset, chunk.len, header.data_len
                ))
            })?;
        end_of_previous = end;
        stored += u64::from(chunk.len); // cannot overflow: bounded by data_len
        chunks.push(chunk);
    }
    if stored != header.stored_len {
        return Err(Damage::BadTable {
            index: header.chunk_count,
            problem: format!(
                "chunks hold {stored} bytes, the header says {}",
                header.stored_len
            ),
        });
    }
    Ok(chunks)
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
        assert_eq!(Header::decode(&b, 4196, u64::MAX), Ok(h));
    }

    #[test]
    fn every_flipped_header_bit_is_detected() {
        let h = header(&[], 10);
        let b = h.encode();
        for bit in 0..HEADER_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::decode(&c, 4096, u64::MAX).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn header_rejects_bad_sizes() {
        let h = header(&[], 10);
        let b = h.encode();
        assert!(matches!(
            Header::decode(&b, 4095, u64::MAX),
            Err(Damage::Truncated { .. })
        ));
        assert!(matches!(
            Header::decode(&b, 4097, u64::MAX),
            Err(Damage::TrailingBytes { .. })
        ));
        assert!(matches!(
            Header::decode(&b, 4096, 9),
            Err(Damage::TooLarge { .. })
        ));
        assert!(matches!(
            Header::decode(&b[..50], 50, u64::MAX),
            Err(Damage::Truncated { .. })
        ));
        assert!(matches!(
            Header::decode(b"garbage", 7, u64::MAX),
            Err(Damage::BadMagic)
        ));
        let mut v2 = b;
        v2[8] = 2;
        assert!(matches!(
            Header::decode(&v2, 4096, u64::MAX),
            Err(Damage::UnsupportedVersion { version: 2 })
        ));
        // A huge chunk count with a correct CRC must not overflow.
        let mut huge = h;
        huge.chunk_count = u64::MAX / 8;
        assert!(Header::decode(&huge.encode(), 4096, u64::MAX).is_err());
        // A sparse file can be as long as a huge table says: more chunks
        // than stored bytes is refused before any table is read.
        let mut sparse = h;
        sparse.chunk_count = 1 << 36;
        sparse.data_offset = data_offset_for(1 << 36).unwrap();
        let len = sparse.data_offset;
        let e = Header::decode(&sparse.encode(), len, u64::MAX).unwrap_err();
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
        let mut t = encode_table(&ok);
        t[3] ^= 1;
        assert!(matches!(
            decode_table(&t, &h),
            Err(Damage::TableChecksum { .. })
        ));
    }
}
