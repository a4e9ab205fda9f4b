//! Reading and verifying snapshot files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Damage, Error, Result};
use crate::format::{self, Chunk, HEADER_LEN, Header};
use crate::image::{Extent, Image};
use crate::parallel;

/// The largest snapshot data size loaded unless configured otherwise
/// (`--max-size`): a file claiming more is treated as damaged.
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
pub enum ReadError {
    /// Its contents are damaged.
    Damaged(Damage),
    /// Reading it failed.
    Io(io::Error),
}

impl ReadError {
    pub(crate) fn into_error(self, path: &Path) -> Error {
        match self {
            ReadError::Damaged(damage) => Error::Corrupt {
                path: path.to_owned(),
                damage,
            },
            ReadError::Io(e) => Error::io("reading", path, e),
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
    /// are rejected as [`Damage::TooLarge`].
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
/// snapshot instead of hanging the open or the reads.
pub(crate) fn open_for_reading(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Reads only the header of `r`, validated against its length (no data
/// checksums): cheap, for deciding whether a file is the one last written.
pub fn read_header<R: ReadAt + ?Sized>(r: &R, max_data_len: u64) -> Result<Header, ReadError> {
    let len = r.size()?;
    let mut buf = vec![0u8; len.min(HEADER_LEN as u64) as usize];
    r.read_exact_at(&mut buf, 0)?;
    Ok(Header::decode(&buf, len, max_data_len)?)
}

/// Reads the header and the chunk table of `r`, both validated (the table's
/// CRC and rules); the data is not read.
fn read_header_and_table<R: ReadAt + ?Sized>(
    r: &R,
    max_data_len: u64,
) -> Result<(Header, Vec<Chunk>), ReadError> {
    let header = read_header(r, max_data_len)?;
    // decode() checked data_offset + stored_len == file length and
    // chunk_count <= stored_len, so the table is inside the file and its
    // size fits in memory only as far as the file itself does.
    let table_len = (header.data_offset - HEADER_LEN as u64) as usize;
    let mut table = vec![0u8; table_len];
    r.read_exact_at(&mut table, HEADER_LEN as u64)?;
    let entries = header.chunk_count as usize * format::ENTRY_LEN;
    let chunks = format::decode_table(&table[..entries], &header)?;
    Ok((header, chunks))
}

/// Reads and verifies a whole snapshot from `r`.
pub fn read_snapshot<R: ReadAt + ?Sized>(r: &R, max_data_len: u64) -> Result<Snapshot, ReadError> {
    let (header, chunks) = read_header_and_table(r, max_data_len)?;
    let stored = usize::try_from(header.stored_len)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "snapshot too large"))?;
    let mut data = vec![0u8; stored];
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
pub fn verify<R: ReadAt + Sync + ?Sized>(
    r: &R,
    max_data_len: u64,
) -> Result<(Header, Vec<Chunk>), ReadError> {
    let (header, chunks) = read_header_and_table(r, max_data_len)?;
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
/// (the file could have changed since). Holes stay holes.
pub fn copy_into<R: ReadAt + Sync + ?Sized>(
    r: &R,
    header: &Header,
    chunks: &[Chunk],
    memfd: &File,
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
        }
        Ok(())
    });
    results.into_iter().collect()
}

/// Where each chunk's bytes are in the file (validated by `decode_table`:
/// they add up to `stored_len`, so no sum overflows).
fn file_offsets(header: &Header, chunks: &[Chunk]) -> Vec<u64> {
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
fn split(header: &Header, chunks: &[Chunk]) -> Vec<std::ops::Range<usize>> {
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
    /// `Ok` when the whole file is valid.
    pub verdict: Result<()>,
}

/// Inspects the snapshot at `path`: decodes what it can and verifies the
/// rest, for a report.
pub fn inspect(path: &Path, max_data_len: u64) -> Inspection {
    let file = match open_for_reading(path) {
        Ok(f) => f,
        Err(e) => {
            return Inspection {
                header: None,
                verdict: Err(Error::io("opening", path, e)),
            };
        }
    };
    let header = read_header(&file, max_data_len).ok();
    let verdict = verify(&file, max_data_len)
        .map(drop)
        .map_err(|e| e.into_error(path));
    Inspection { header, verdict }
}

/// Formats nanoseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
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
            SaveOptions {
                chunk_size: 4096,
                ..SaveOptions::default()
            },
        );
        saver.save(&Image::from_bytes(data.clone()), 1).unwrap();
        (dir.join("s.snap"), data)
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
        copy_into(&file, &header, &chunks, &memfd).unwrap();
        assert_eq!(Image::read_from(&memfd).unwrap().to_dense(), data);

        // The file changed after the verification: the copy sees it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[header.data_offset as usize + 25 * 4096] ^= 1;
        let other = shm_fd::SharedFd::create("copy-test", Default::default())
            .unwrap()
            .into_file();
        match copy_into(bytes.as_slice(), &header, &chunks, &other) {
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
