//! Reading and verifying snapshot files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Damage, Error, Result};
use crate::format::{self, Chunk, HEADER_LEN, Header};
use crate::image::{Extent, Image};
use crate::parallel;
use crate::progress::Progress;

/// The largest snapshot data size loaded (and saved) unless configured
/// otherwise (`--max-size`): a file declaring more is refused
/// ([`ReadError::TooLarge`]), not treated as damaged.
pub const DEFAULT_MAX_DATA_LEN: u64 = 64 << 30;

/// Positioned reads from a file (or a test's in-memory file).
pub trait ReadAt {
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; a short file is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Why a file could not be read as a snapshot.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReadError {
    /// Its contents are damaged.
    Damaged(Damage),
    /// It is intact as far as read, but holds more data than the reader
    /// accepts: refused, not damaged.
    TooLarge {
        /// The data size its header declares.
        data_len: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// Reading it failed, or memory for it could not be had
    /// ([`io::ErrorKind::OutOfMemory`]).
    Io(io::Error),
}

impl ReadError {
    /// The crate's error for this problem with the file at `path`.
    pub fn into_error(self, path: &Path) -> Error {
        match self {
            ReadError::Damaged(damage) => Error::Corrupt {
                path: path.to_owned(),
                damage,
            },
            ReadError::TooLarge { data_len, max } => Error::TooLarge {
                path: path.to_owned(),
                data_len,
                max,
            },
            ReadError::Io(e) => Error::io("reading", path, e),
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Damaged(d) => write!(f, "{d}"),
            ReadError::TooLarge { data_len, max } => {
                write!(f, "holds {data_len} bytes, more than the maximum {max}")
            }
            ReadError::Io(e) => write!(f, "cannot be read: {e}"),
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<Damage> for ReadError {
    fn from(d: Damage) -> Self {
        ReadError::Damaged(d)
    }
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// A verified snapshot held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    header: Header,
    chunks: Vec<Chunk>,
    data: Vec<u8>,
}

impl Snapshot {
    /// Reads and fully verifies the snapshot file at `path`: header, table
    /// and every chunk's CRC. Files whose data size exceeds `max_data_len`
    /// are refused as [`Error::TooLarge`].
    pub fn open(path: &Path, max_data_len: u64) -> Result<Snapshot> {
        let file = open_for_reading(path).map_err(|e| Error::io("opening", path, e))?;
        read_snapshot(&file, max_data_len).map_err(|e| e.into_error(path))
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The chunk table.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The snapshot as an image ready to be written into a memfd.
    pub fn into_image(self) -> Image {
        let mut extents: Vec<Extent> = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            match extents.last_mut() {
                Some(last) if last.offset + last.len == c.offset => last.len += u64::from(c.len),
                _ => extents.push(Extent {
                    offset: c.offset,
                    len: u64::from(c.len),
                }),
            }
        }
        Image::from_parts(self.header.data_len, extents, self.data)
            .expect("a verified table describes a valid image")
    }
}

/// Opens a file that should be a snapshot, for reading. Non-blocking, so
/// that a FIFO (or device) in a snapshot's place is reported as a damaged
/// snapshot instead of hanging the open or the reads; and never as this
/// process's controlling terminal (a tty in a snapshot's place).
pub(crate) fn open_for_reading(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// How much of the chunk table is read at a time (a whole number of
/// entries): the table is never held whole before it is validated.
const TABLE_PIECE: usize = 4096 * format::ENTRY_LEN;

/// Reads only the header of `r`, validated against its length (no data
/// checksums): cheap, for deciding whether a file is the one last written.
/// A file declaring more than `max_data_len` bytes of data is
/// [`ReadError::TooLarge`] (checked after the header is found intact).
pub fn read_header<R: ReadAt + ?Sized>(r: &R, max_data_len: u64) -> Result<Header, ReadError> {
    let len = r.size()?;
    let mut buf = [0u8; HEADER_LEN];
    let n = len.min(HEADER_LEN as u64) as usize;
    r.read_exact_at(&mut buf[..n], 0)?;
    let header = Header::decode(&buf[..n], len)?;
    if header.data_len > max_data_len {
        return Err(ReadError::TooLarge {
            data_len: header.data_len,
            max: max_data_len,
        });
    }
    Ok(header)
}

/// Reads the header and the chunk table of `r`, both validated (the table's
/// entries, count, sum and CRC); the data is not read.
///
/// The table is read [`TABLE_PIECE`] bytes at a time and each entry is
/// checked before the next piece is read, so a table that is damaged (or
/// a sparse file's zeros) is refused at its first bad entry: the memory
/// and work spent grow with the valid entries actually in the file, never
/// with the count its header declares.
pub(crate) fn read_header_and_table<R: ReadAt + ?Sized>(
    r: &R,
    max_data_len: u64,
) -> Result<(Header, Vec<Chunk>), ReadError> {
    let header = read_header(r, max_data_len)?;
    // decode() checked that 16 * chunk_count fits in the file before
    // data_offset (with checked arithmetic).
    let table_len = header.chunk_count * format::ENTRY_LEN as u64;
    let mut piece = vec![0u8; table_len.min(TABLE_PIECE as u64) as usize];
    let mut decoder = format::TableDecoder::new(&header);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut at = 0u64;
    while at < table_len {
        let n = (table_len - at).min(TABLE_PIECE as u64) as usize;
        let buf = &mut piece[..n];
        r.read_exact_at(buf, HEADER_LEN as u64 + at)?;
        chunks
            .try_reserve(n / format::ENTRY_LEN)
            .map_err(|_| out_of_memory("the chunk table", chunks.len() * size_of::<Chunk>()))?;
        decoder.push(buf, &mut chunks)?;
        at += n as u64;
    }
    decoder.finish()?;
    Ok((header, chunks))
}

fn out_of_memory(what: &str, bytes: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::OutOfMemory,
        format!("cannot allocate memory for {what} (beyond {bytes} bytes)"),
    )
}

/// Reads and verifies a whole snapshot from `r`, holding its data in
/// memory (as much as the file stores, which the chunk table, validated
/// first, accounts for byte by byte).
pub fn read_snapshot<R: ReadAt + ?Sized>(r: &R, max_data_len: u64) -> Result<Snapshot, ReadError> {
    let (header, chunks) = read_header_and_table(r, max_data_len)?;
    let stored = usize::try_from(header.stored_len)
        .map_err(|_| out_of_memory("the snapshot's data", usize::MAX))?;
    let mut data = Vec::new();
    data.try_reserve_exact(stored)
        .map_err(|_| out_of_memory("the snapshot's data", stored))?;
    data.resize(stored, 0);
    r.read_exact_at(&mut data, header.data_offset)?;
    if let Some(damage) = check_chunks(&header, &chunks, &data) {
        return Err(damage.into());
    }
    Ok(Snapshot {
        header,
        chunks,
        data,
    })
}

/// Reads and verifies a whole snapshot from `r` without holding its data:
/// each chunk is read into a reused buffer and checked (large files on a
/// few threads, each with its own buffer). Returns the header and the
/// chunk table.
///
/// This is the check behind `shm-restore --check` and behind every load;
/// `r` is a [`File`] or a byte slice (`&[u8]` implements [`ReadAt`]), so
/// a fuzzer can hand it arbitrary bytes. On any input it returns an error
/// or the validated table; it does not panic, and what it allocates is
/// bounded by what the file holds: one table piece, the valid table
/// entries read so far, and one chunk (at most
/// [`format::MAX_CHUNK_SIZE`] bytes) per thread.
///
/// A header declaring more than `max_data_len` bytes of data is refused
/// as [`ReadError::TooLarge`] before anything past the header is read
/// (pass `u64::MAX` to verify any size).
pub fn verify<R: ReadAt + Sync + ?Sized>(
    r: &R,
    max_data_len: u64,
) -> Result<(Header, Vec<Chunk>), ReadError> {
    verify_counting(r, max_data_len, None)
}

/// [`verify`], counting the bytes checked into `progress` for a load:
/// begins it at twice the bytes stored ([`copy_into`] counts the second
/// half).
pub(crate) fn verify_counting<R: ReadAt + Sync + ?Sized>(
    r: &R,
    max_data_len: u64,
    progress: Option<&Progress>,
) -> Result<(Header, Vec<Chunk>), ReadError> {
    verify_inner(r, max_data_len, progress, true)
}

/// [`verify_counting`]; with `begin` false the file's bytes are added to
/// the count under way (the next link of a delta chain) instead of
/// beginning it again.
pub(crate) fn verify_inner<R: ReadAt + Sync + ?Sized>(
    r: &R,
    max_data_len: u64,
    progress: Option<&Progress>,
    begin: bool,
) -> Result<(Header, Vec<Chunk>), ReadError> {
    let (header, chunks) = read_header_and_table(r, max_data_len)?;
    if let Some(p) = progress {
        if begin {
            p.begin(header.stored_len.saturating_mul(2));
        } else {
            p.extend(header.stored_len.saturating_mul(2));
        }
    }
    let places = file_offsets(&header, &chunks);
    let results = parallel::run_each(split(&header, &chunks), |run| {
        let mut buf = Vec::new();
        let mut bad = 0u64;
        let mut first = None;
        for i in run {
            let c = &chunks[i];
            buf.resize(c.len as usize, 0);
            r.read_exact_at(&mut buf, places[i])?;
            if crc32fast::hash(&buf) != c.crc {
                bad += 1;
                first.get_or_insert(i);
            }
            if let Some(p) = progress {
                p.add(u64::from(c.len));
            }
        }
        Ok::<_, io::Error>((bad, first))
    });
    let mut bad = 0u64;
    let mut first = None;
    for result in results {
        let (n, f) = result?;
        bad += n;
        first = first.or(f);
    }
    if let Some(index) = first {
        let c = chunks[index];
        return Err(ReadError::Damaged(Damage::ChunkChecksum {
            bad,
            total: chunks.len() as u64,
            index: index as u64,
            memfd_offset: c.offset,
            file_offset: places[index],
            len: c.len,
        }));
    }
    Ok((header, chunks))
}

/// Copies a snapshot that [`verify`] accepted into an empty memfd, chunk by
/// chunk (large files on a few threads), checking each chunk's CRC again
/// (the file could have changed since). Holes stay holes. Each chunk
/// copied is counted into `progress`.
pub fn copy_into<R: ReadAt + Sync + ?Sized>(
    r: &R,
    header: &Header,
    chunks: &[Chunk],
    memfd: &File,
    progress: Option<&Progress>,
) -> Result<(), ReadError> {
    // Grow only: a memfd sealed against shrinking may already be larger
    // (sized, but holding no data).
    if header.data_len > memfd.metadata()?.len() {
        memfd.set_len(header.data_len)?;
    }
    let places = file_offsets(header, chunks);
    let results = parallel::run_each(split(header, chunks), |run| {
        let mut buf = Vec::new();
        for i in run {
            let c = &chunks[i];
            buf.resize(c.len as usize, 0);
            r.read_exact_at(&mut buf, places[i])?;
            if crc32fast::hash(&buf) != c.crc {
                return Err(ReadError::Damaged(Damage::ChunkChecksum {
                    bad: 1,
                    total: chunks.len() as u64,
                    index: i as u64,
                    memfd_offset: c.offset,
                    file_offset: places[i],
                    len: c.len,
                }));
            }
            memfd.write_all_at(&buf, c.offset)?;
            if let Some(p) = progress {
                p.add(u64::from(c.len));
            }
        }
        Ok(())
    });
    results.into_iter().collect()
}

/// Where each chunk's bytes are in the file (validated by `decode_table`:
/// they add up to `stored_len`, so no sum overflows).
pub(crate) fn file_offsets(header: &Header, chunks: &[Chunk]) -> Vec<u64> {
    let mut at = header.data_offset;
    chunks
        .iter()
        .map(|c| {
            let here = at;
            at += u64::from(c.len);
            here
        })
        .collect()
}

/// The chunk runs a pass over the file's data uses, one per thread.
pub(crate) fn split(header: &Header, chunks: &[Chunk]) -> Vec<std::ops::Range<usize>> {
    let lens: Vec<u64> = chunks.iter().map(|c| u64::from(c.len)).collect();
    parallel::split_even(&lens, parallel::workers(header.stored_len))
}

/// Checks every chunk's CRC; returns the damage (all bad chunks counted,
/// the first located) or `None`.
fn check_chunks(header: &Header, chunks: &[Chunk], data: &[u8]) -> Option<Damage> {
    let mut at = 0usize;
    let mut bad = 0u64;
    let mut first = None;
    for (index, c) in chunks.iter().enumerate() {
        let end = at + c.len as usize;
        if crc32fast::hash(&data[at..end]) != c.crc {
            bad += 1;
            first.get_or_insert((index, at, *c));
        }
        at = end;
    }
    first.map(|(index, at, c)| Damage::ChunkChecksum {
        bad,
        total: chunks.len() as u64,
        index: index as u64,
        memfd_offset: c.offset,
        file_offset: header.data_offset + at as u64,
        len: c.len,
    })
}

/// What `shm-restore --check` reports about a file.
#[derive(Debug)]
pub struct Inspection {
    /// The header, when it could be decoded.
    pub header: Option<Header>,
    /// For a delta whose chain verified: the headers of its bases, its own
    /// base first, down to the full snapshot. Empty otherwise.
    pub bases: Vec<Header>,
    /// `Ok` when the whole file is valid (for a delta: with every base
    /// down to its full snapshot) and holds at most the maximum;
    /// [`Error::TooLarge`] when it is valid but holds more (its checksums
    /// were all checked).
    pub verdict: Result<()>,
}

/// Inspects the snapshot at `path`: decodes what it can and verifies the
/// rest, for a report. A delta is verified with its chain, as a load
/// would ([`crate::series_of`] names the series its bases belong to).
pub fn inspect(path: &Path, max_data_len: u64) -> Inspection {
    let file = match open_for_reading(path) {
        Ok(f) => f,
        Err(e) => {
            return Inspection {
                header: None,
                bases: Vec::new(),
                verdict: Err(Error::io("opening", path, e)),
            };
        }
    };
    let header = read_header(&file, u64::MAX).ok();
    drop(file);
    let (mut storage, name) = match crate::storage::DirStorage::for_snapshot(path) {
        Ok(v) => v,
        Err(e) => {
            return Inspection {
                header,
                bases: Vec::new(),
                verdict: Err(Error::io("opening", path, e)),
            };
        }
    };
    let series = crate::chain::series_of(&name);
    // Every checksum is checked whatever the size (verifying allocates
    // nothing by the data size), then the size against the maximum.
    let mut bases = Vec::new();
    let verdict = crate::chain::verify_chain(&mut storage, &series, &name, u64::MAX, None)
        .and_then(|links| {
            bases = links[1..].iter().map(|l| l.header).collect();
            let h = links[0].header;
            if h.data_len > max_data_len {
                Err(ReadError::TooLarge {
                    data_len: h.data_len,
                    max: max_data_len,
                })
            } else {
                Ok(())
            }
        })
        .map_err(|e| e.into_error(path));
    Inspection {
        header,
        bases,
        verdict,
    }
}

/// Formats nanoseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
#[cfg_attr(not(feature = "cli"), allow(dead_code))] // used by the command
pub fn format_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = (ns / 1_000_000) % 1000;
    let (y, m, d, hh, mm, ss) = civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
}

/// A compact UTC time for file names: `YYYYMMDDTHHMMSSZ`.
pub fn file_time(ns: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(ns / 1_000_000_000);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// Seconds since the epoch to a UTC civil date and time (Howard Hinnant's
/// days-to-civil algorithm).
fn civil(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save::{SaveOptions, Saver};
    use crate::storage::DirStorage;

    /// A saved snapshot of 40 chunks of 4 KiB (enough for the threaded
    /// passes at the unit-test threshold) and its bytes.
    fn saved(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..40 * 4096u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut saver = Saver::new(
            DirStorage::new(dir),
            std::ffi::OsStr::new("s.snap"),
            SaveOptions::builder().chunk_size(4096).build().unwrap(),
        );
        saver.save(&Image::from_bytes(data.clone()), 1).unwrap();
        (dir.join("s.snap"), data)
    }

    /// A file that reads as `head` followed by zeros up to `len` bytes (a
    /// sparse file), counting the bytes read.
    struct Sparse {
        head: Vec<u8>,
        len: u64,
        read: std::sync::atomic::AtomicU64,
    }

    impl Sparse {
        fn new(head: Vec<u8>, len: u64) -> Sparse {
            Sparse {
                head,
                len,
                read: 0.into(),
            }
        }
        fn read(&self) -> u64 {
            self.read.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl ReadAt for Sparse {
        fn size(&self) -> io::Result<u64> {
            Ok(self.len)
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let end = offset.checked_add(buf.len() as u64);
            if end.is_none_or(|end| end > self.len) {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.read
                .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = usize::try_from(offset + i as u64)
                    .ok()
                    .and_then(|at| self.head.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            Ok(())
        }
    }

    /// A header as a writer would make it for `chunk_count` chunks holding
    /// `stored_len` bytes of a `data_len`-byte memfd, with valid CRCs.
    fn forged(chunk_count: u64, stored_len: u64, data_len: u64, table: &[Chunk]) -> Vec<u8> {
        let header = Header {
            chunk_size: 4096,
            data_len,
            generation: 1,
            saved_at_ns: 0,
            chunk_count,
            stored_len,
            data_offset: format::data_offset_for(chunk_count).unwrap(),
            table_crc: crc32fast::hash(&format::encode_table(table)),
            base: None,
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend(format::encode_table(table));
        bytes
    }

    /// Issue 9, part 3: 2^32 chunks declared by a header that agrees with
    /// the (sparse) file's length made the readers allocate a 64 GiB table
    /// buffer and abort. They stop at the first entry, having read one
    /// table piece.
    #[test]
    fn a_sparse_file_declaring_2_pow_32_chunks_is_refused_at_its_first_entry() {
        let n = 1u64 << 32;
        let head = forged(n, n, 2 * n, &[]);
        let file = Sparse::new(head, format::data_offset_for(n).unwrap() + n);
        let h = read_header(&file, u64::MAX).unwrap();
        assert_eq!(h.chunk_count, n);
        let first_entry = |e| {
            matches!(e, ReadError::Damaged(Damage::BadTable { index: 0, ref problem })
                if problem.contains("has length 0"))
        };
        assert!(first_entry(verify(&file, u64::MAX).unwrap_err()));
        assert!(first_entry(read_snapshot(&file, u64::MAX).unwrap_err()));
        let most = 2 * (HEADER_LEN + TABLE_PIECE) as u64 + 2 * HEADER_LEN as u64;
        assert!(file.read() <= most, "read {} bytes", file.read());
    }

    /// Valid entries followed by zeros: the reader stops at the first
    /// zero entry, whatever the count says.
    #[test]
    fn valid_entries_then_zeros_stop_at_the_first_zero_entry() {
        let n = 1u64 << 30;
        let table: Vec<Chunk> = (0..5000)
            .map(|i| Chunk {
                offset: i * 4096,
                len: 1,
                crc: 0,
            })
            .collect();
        let head = forged(n, n, n * 4096, &table);
        let file = Sparse::new(head, format::data_offset_for(n).unwrap() + n);
        match verify(&file, u64::MAX).unwrap_err() {
            ReadError::Damaged(Damage::BadTable { index: 5000, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            file.read() < 3 * TABLE_PIECE as u64 + 1024,
            "{}",
            file.read()
        );
    }

    #[test]
    fn counts_and_lengths_beyond_the_file_are_damage() {
        let d = tempfile::tempdir().unwrap();
        let (path, _) = saved(d.path());
        let good = std::fs::read(&path).unwrap();
        let h = read_header(good.as_slice(), u64::MAX).unwrap();
        let damaged = |mutate: &dyn Fn(&mut Header)| {
            let mut forged = h;
            mutate(&mut forged);
            let mut bytes = good.clone();
            bytes[..HEADER_LEN].copy_from_slice(&forged.encode());
            match verify(bytes.as_slice(), u64::MAX) {
                Err(ReadError::Damaged(d)) => d.to_string(),
                other => panic!("{forged:?}: {other:?}"),
            }
        };
        type Forge = fn(&mut Header);
        let cases: [(Forge, &str); 13] = [
            // Data past the end of the file (the data_len grows with it).
            (
                |h| {
                    h.stored_len += 1;
                    h.data_len += 1;
                    h.chunk_count += 1;
                    h.data_offset = format::data_offset_for(h.chunk_count).unwrap();
                },
                "is truncated",
            ),
            (|h| h.data_offset += 4096, "data_offset is 8192"),
            (
                |h| h.stored_len = u64::MAX,
                "stored_len 18446744073709551615 exceeds",
            ),
            (
                |h| {
                    h.stored_len = u64::MAX;
                    h.data_len = u64::MAX;
                    h.chunk_count = 1 << 52; // * 4096 overflows: any stored_len fits
                    h.data_offset = format::data_offset_for(1 << 52).unwrap();
                },
                "stored_len 18446744073709551615 overflows",
            ),
            // Counts: table entries past data_offset, or past the file.
            (|h| h.chunk_count += 1, "entry 40 has length 0"),
            (
                |h| {
                    h.chunk_count = 1 << 40;
                    h.data_offset = format::data_offset_for(1 << 40).unwrap();
                },
                "exceeds the 163840 stored bytes",
            ),
            (|h| h.chunk_count = u64::MAX, "impossibly large"),
            (|h| h.chunk_count = 1, "cannot hold"),
            // Fewer stored bytes than the table's: the file is longer.
            (|h| h.stored_len -= 1, "trailing bytes"),
            // Lengths: the data inside data_len, chunk sizes.
            (|h| h.data_len = 100, "exceeds the data size 100"),
            (|h| h.data_len -= 1, "exceeds the data size 163839"),
            (|h| h.chunk_size = 3000, "chunk_size 3000"),
            (|h| h.table_crc ^= 1, "corrupt chunk table"),
        ];
        for (forge, want) in cases {
            let got = damaged(&forge);
            assert!(got.contains(want), "want {want:?}: {got}");
        }
    }

    #[test]
    fn too_large_is_refused_after_the_header_is_found_intact() {
        let d = tempfile::tempdir().unwrap();
        let (path, data) = saved(d.path());
        let len = data.len() as u64;
        let good = std::fs::read(&path).unwrap();
        for reader in [
            verify(good.as_slice(), len - 1).map(drop),
            read_snapshot(good.as_slice(), len - 1).map(drop),
        ] {
            match reader {
                Err(ReadError::TooLarge { data_len, max }) => {
                    assert_eq!((data_len, max), (len, len - 1));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(verify(good.as_slice(), len).is_ok());
        // Damage wins over size: a damaged header is damage.
        let mut bad = good.clone();
        bad[30] ^= 1;
        assert!(matches!(
            verify(bad.as_slice(), 1),
            Err(ReadError::Damaged(Damage::HeaderChecksum { .. }))
        ));
        // --check verifies the checksums whatever the size, then refuses.
        let i = inspect(&path, len - 1);
        assert_eq!(i.header.map(|h| h.data_len), Some(len));
        let e = i.verdict.unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(inspect(&path, len).verdict.is_ok());
    }

    #[test]
    fn threaded_verify_counts_every_bad_chunk_and_names_the_first() {
        let d = tempfile::tempdir().unwrap();
        let (path, _) = saved(d.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let data_offset = read_header(bytes.as_slice(), u64::MAX).unwrap().data_offset as usize;
        // Damage chunks 3, 30 and 39: in different threads' runs.
        for chunk in [30, 3, 39] {
            bytes[data_offset + chunk * 4096 + 100] ^= 0x10;
        }
        match verify(bytes.as_slice(), u64::MAX) {
            Err(ReadError::Damaged(Damage::ChunkChecksum {
                bad,
                total,
                index,
                memfd_offset,
                file_offset,
                len,
            })) => {
                assert_eq!((bad, total, index), (3, 40, 3));
                assert_eq!(memfd_offset, 3 * 4096);
                assert_eq!(file_offset, (data_offset + 3 * 4096) as u64);
                assert_eq!(len, 4096);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn threaded_copy_loads_everything_and_rechecks_crcs() {
        let d = tempfile::tempdir().unwrap();
        let (path, data) = saved(d.path());
        let file = File::open(&path).unwrap();
        let (header, chunks) = verify(&file, u64::MAX).unwrap();
        let memfd = shm_fd::SharedFd::create("copy-test", Default::default())
            .unwrap()
            .into_file();
        copy_into(&file, &header, &chunks, &memfd, None).unwrap();
        assert_eq!(Image::read_from(&memfd).unwrap().to_dense(), data);

        // The file changed after the verification: the copy sees it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[header.data_offset as usize + 25 * 4096] ^= 1;
        let other = shm_fd::SharedFd::create("copy-test", Default::default())
            .unwrap()
            .into_file();
        match copy_into(bytes.as_slice(), &header, &chunks, &other, None) {
            Err(ReadError::Damaged(Damage::ChunkChecksum { index: 25, .. })) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time(1_709_210_096_123_000_000),
            "2024-02-29T12:34:56.123Z"
        );
        assert_eq!(file_time(951_782_400_000_000_000), "20000229T000000Z");
    }
}
