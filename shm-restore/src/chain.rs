//! Delta chains: reading a snapshot that is a delta (format version 2)
//! together with the snapshots it applies to, down to a full one.
//!
//! A delta names its base by generation and header CRC
//! ([`format::Base`]); the base is found next to it as
//! `<NAME>.gen-<generation>` ([`base_name`]), where `NAME` is the
//! snapshot's name without a `.prev` or `.gen-<n>` suffix ([`series_of`]).
//! Every link is verified whole (header, table, every chunk's CRC) before
//! anything is loaded, and a base that is missing, is not the file the
//! delta names, or is damaged makes the delta damaged
//! ([`Damage::BrokenChain`]): a load then falls back on `.prev` exactly as
//! for a damaged full snapshot.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use crate::error::Damage;
use crate::format::{self, Chunk, Header};
use crate::image::Extent;
use crate::parallel;
use crate::progress::Progress;
use crate::snapshot::{
    ReadAt, ReadError, file_offsets, read_header_and_table, split, verify_inner,
};
use crate::storage::Storage;

/// The name under which the snapshot of generation `generation` of the
/// series `name` is kept while a delta applies to it: `<name>.gen-<generation>`.
pub fn base_name(name: &OsStr, generation: u64) -> OsString {
    let mut n = name.to_owned();
    n.push(format!(".gen-{generation}"));
    n
}

/// The series a snapshot file belongs to: its name without a `.prev` or
/// `.gen-<digits>` suffix (`state.snap.prev` and `state.snap.gen-7` belong
/// to `state.snap`). Bases are looked up under the series' name.
pub fn series_of(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    if let Some(stem) = bytes.strip_suffix(b".prev")
        && !stem.is_empty()
    {
        return OsStr::from_bytes(stem).to_owned();
    }
    if let Some(at) = bytes.windows(5).rposition(|w| w == b".gen-") {
        let digits = &bytes[at + 5..];
        if at > 0 && !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
            return OsStr::from_bytes(&bytes[..at]).to_owned();
        }
    }
    name.to_owned()
}

/// The generation a `<series>.gen-<n>` name holds, if `name` is one.
pub(crate) fn generation_of_base(series: &OsStr, name: &OsStr) -> Option<u64> {
    let digits = name
        .as_encoded_bytes()
        .strip_prefix(series.as_bytes())?
        .strip_prefix(b".gen-")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || digits[0] == b'0' {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The cells (`(offset, length)`, each a whole cell of `chunk_size` bytes
/// cut at `data_len`) whose chunks in `now` differ from those in `last`.
/// Both tables hold chunks that never cross a cell boundary, sorted. A
/// cell holding the same extents with the same CRCs holds the same bytes
/// (holes read as zeros in both), whatever the two sizes: past the old
/// size the base reads as zeros, and cells past the new size are cut.
pub(crate) fn changed_cells(
    last: &[Chunk],
    now: &[Chunk],
    data_len: u64,
    chunk_size: u32,
) -> Vec<(u64, u32)> {
    let cell = u64::from(chunk_size);
    let index = |c: &Chunk| c.offset / cell;
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    loop {
        let c = match (now.get(i), last.get(j)) {
            (None, None) => break,
            (Some(a), None) => index(a),
            (None, Some(b)) => index(b),
            (Some(a), Some(b)) => index(a).min(index(b)),
        };
        if c * cell >= data_len {
            break;
        }
        let i_end = i + now[i..].iter().take_while(|x| index(x) == c).count();
        let j_end = j + last[j..].iter().take_while(|x| index(x) == c).count();
        if now[i..i_end] != last[j..j_end] {
            out.push((c * cell, cell.min(data_len - c * cell) as u32));
        }
        (i, j) = (i_end, j_end);
    }
    out
}

/// True when no chunk of `table` crosses a multiple of `chunk_size` (the
/// tables this version writes; older ones split extents from their start).
pub(crate) fn cell_aligned(table: &[Chunk], chunk_size: u32) -> bool {
    let cell = u64::from(chunk_size);
    table
        .iter()
        .all(|c| c.offset / cell == (c.offset + u64::from(c.len) - 1) / cell)
}

/// One verified snapshot of a chain.
#[derive(Debug)]
pub(crate) struct Link<R> {
    /// The file, open.
    pub reader: R,
    /// Its header.
    pub header: Header,
    /// Its chunk table.
    pub chunks: Vec<Chunk>,
}

/// Opens and verifies the snapshot `name` and, when it is a delta, every
/// base down to its full snapshot, looked up in `storage` under the names
/// of `series` ([`base_name`]). Returns the links, `name` first.
///
/// `name` missing is an I/O error of kind `NotFound`; a base missing,
/// mismatched (generation, header CRC, depth or chunk size) or damaged is
/// [`Damage::BrokenChain`]. `max_data_len` bounds `name`'s data size
/// ([`ReadError::TooLarge`]); a base is read at any size, since only the
/// part inside `name`'s size is loaded. The bytes checked are counted
/// into `progress` (each link adds twice its stored bytes to the total,
/// for the verify and the copy).
pub(crate) fn verify_chain<S: Storage>(
    storage: &mut S,
    series: &OsStr,
    name: &OsStr,
    max_data_len: u64,
    progress: Option<&Progress>,
) -> Result<Vec<Link<S::Reader>>, ReadError> {
    open_chain(storage, series, name, max_data_len, progress, true)
}

/// [`verify_chain`], checking each link's header and table but not its
/// chunks (`check_data` false): for a reader that checks every chunk's
/// CRC as it reads it ([`Composed`]).
pub(crate) fn open_chain<S: Storage>(
    storage: &mut S,
    series: &OsStr,
    name: &OsStr,
    max_data_len: u64,
    progress: Option<&Progress>,
    check_data: bool,
) -> Result<Vec<Link<S::Reader>>, ReadError> {
    let read = |reader: &S::Reader, max: u64, begin: bool| {
        if check_data {
            verify_inner(reader, max, progress, begin)
        } else {
            read_header_and_table(reader, max)
        }
    };
    let reader = storage
        .open(name)?
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let (header, chunks) = read(&reader, max_data_len, true)?;
    let mut links = vec![Link {
        reader,
        header,
        chunks,
    }];
    let head_chunk_size = header.chunk_size;
    let mut want = header.base;
    while let Some(base) = want {
        let base_file = base_name(series, base.generation);
        let shown = storage.path_of(&base_file).display().to_string();
        let broken = |problem: String| {
            ReadError::Damaged(Damage::BrokenChain {
                base: shown.clone(),
                problem,
            })
        };
        let Some(reader) = storage.open(&base_file)? else {
            return Err(broken("is missing".into()));
        };
        let (header, chunks) = match read(&reader, u64::MAX, false) {
            Ok(v) => v,
            Err(ReadError::Damaged(d)) => return Err(broken(d.to_string())),
            Err(e) => return Err(e),
        };
        if header.generation != base.generation || header.crc() != base.header_crc {
            return Err(broken(format!(
                "is generation {} with header CRC {:#010x}, the delta applies to generation \
                 {} with header CRC {:#010x}",
                header.generation,
                header.crc(),
                base.generation,
                base.header_crc
            )));
        }
        let depth = header.base.map_or(0, |b| b.depth);
        if depth + 1 != base.depth {
            return Err(broken(format!(
                "has {depth} deltas below it, the delta says {}",
                base.depth - 1
            )));
        }
        if header.is_delta() && header.chunk_size != head_chunk_size {
            return Err(broken(format!(
                "has chunk size {}, the chain's deltas {head_chunk_size}",
                header.chunk_size
            )));
        }
        want = header.base;
        links.push(Link {
            reader,
            header,
            chunks,
        });
    }
    Ok(links)
}

/// Copies a verified chain (head first, as [`verify_chain`] returns it)
/// into an empty memfd: the memfd's size becomes the head's, and every
/// byte comes from the newest link that holds it. Walking from the head
/// down, each link contributes the cells no newer link replaced, cut at
/// the smallest size of it and the links above it (a delta that cut the
/// memfd shorter dropped the bytes past its end). Every chunk's CRC is
/// checked again as it is read; all-zero cells of a delta are left as
/// holes. Each chunk read or passed over is counted into `progress`.
pub(crate) fn copy_chain_into<R: ReadAt + Sync>(
    links: &[Link<R>],
    memfd: &File,
    progress: Option<&Progress>,
) -> Result<(), ReadError> {
    let Some(head) = links.first() else {
        return Ok(());
    };
    let data_len = head.header.data_len;
    if data_len > memfd.metadata()?.len() {
        memfd.set_len(data_len)?;
    }
    let cell = u64::from(head.header.chunk_size);
    // The cells a newer link replaced: as many as the deltas' table
    // entries (already in memory), whatever the memfd's size.
    let mut covered = Cells::default();
    let mut limit = u64::MAX;
    let mut buf = Vec::new();
    for link in links {
        limit = limit.min(link.header.data_len);
        let places = file_offsets(&link.header, &link.chunks);
        if link.header.is_delta() {
            for (i, c) in link.chunks.iter().enumerate() {
                let index = c.offset / cell;
                if c.offset < limit && !covered.get(index) {
                    covered.set(index);
                    read_checked(&link.reader, &link.chunks, &places, i, &mut buf)?;
                    let keep = &buf[..(limit - c.offset).min(u64::from(c.len)) as usize];
                    if keep.iter().any(|&b| b != 0) {
                        memfd.write_all_at(keep, c.offset)?;
                    }
                }
                if let Some(p) = progress {
                    p.add(u64::from(c.len));
                }
            }
        } else {
            // The full snapshot at the bottom: on a few threads when large.
            let covered = &covered;
            let results = parallel::run_each(split(&link.header, &link.chunks), |run| {
                let mut buf = Vec::new();
                for i in run {
                    let c = &link.chunks[i];
                    let end = (c.offset + u64::from(c.len)).min(limit);
                    let mut at = c.offset;
                    let mut read = false;
                    while at < end {
                        let index = at / cell;
                        let piece_end = ((index + 1) * cell).min(end);
                        if !covered.get(index) {
                            if !read {
                                read_checked(&link.reader, &link.chunks, &places, i, &mut buf)?;
                                read = true;
                            }
                            let from = (at - c.offset) as usize;
                            let to = (piece_end - c.offset) as usize;
                            memfd.write_all_at(&buf[from..to], at)?;
                        }
                        at = piece_end;
                    }
                    if let Some(p) = progress {
                        p.add(u64::from(c.len));
                    }
                }
                Ok::<_, ReadError>(())
            });
            results.into_iter().collect::<Result<(), _>>()?;
        }
    }
    Ok(())
}

/// One piece of the state a chain holds, in the memfd's order: bytes
/// `from..from + len` of chunk `chunk` of link `link`, at memfd offset
/// `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub link: usize,
    pub chunk: usize,
    pub from: u32,
    pub offset: u64,
    pub len: u32,
}

/// The state a chain (head first, as [`open_chain`] returns it) holds, as
/// pieces of its links' chunks, read without a copy of the whole: what a
/// compaction writes as a full snapshot. Each byte comes from the newest
/// link that holds it, as in [`copy_chain_into`] (cut at the smallest size
/// of a link and those above it); a delta's cell that is all zeros stays a
/// piece of zeros (data, not a hole). Every chunk's CRC is checked when a
/// piece of it is read.
pub(crate) struct Composed<R> {
    links: Vec<Link<R>>,
    /// Each link's chunks' offsets in its file.
    places: Vec<Vec<u64>>,
    pieces: Vec<Piece>,
    extents: Vec<Extent>,
    data_len: u64,
    /// The names of the links below the head, for errors.
    bases: Vec<String>,
}

impl<R: ReadAt> Composed<R> {
    /// The pieces of the chain's state, in memfd order, none crossing a
    /// multiple of `chunk_size` (the chunk size of the snapshot they are
    /// written to).
    ///
    /// `bases` names the links below the head (in order) in what a damaged
    /// chunk of one of them reports ([`Damage::BrokenChain`]).
    ///
    /// Every bound comes from the links' tables (already checked and held
    /// in memory): the pieces' vector is reserved fallibly for at most
    /// one piece per table entry and boundary it crosses, and the cell
    /// arithmetic saturates, so a lying header (a size near `u64::MAX`)
    /// gives an error, never a wrap or an unbounded loop.
    pub(crate) fn new(
        links: Vec<Link<R>>,
        chunk_size: u32,
        bases: Vec<String>,
    ) -> io::Result<Composed<R>> {
        let out = u64::from(chunk_size.max(1));
        let data_len = links.first().map_or(0, |l| l.header.data_len);
        let cell = links
            .first()
            .map_or(1, |l| u64::from(l.header.chunk_size.max(1)));
        // The first multiple of `step` after `at` (u64::MAX past the end).
        let next = |at: u64, step: u64| {
            (at / step)
                .checked_add(1)
                .and_then(|k| k.checked_mul(step))
                .unwrap_or(u64::MAX)
        };
        let end_of = |c: &Chunk| c.offset.saturating_add(u64::from(c.len));
        // At most one piece per entry and per boundary (of a cell or of an
        // output chunk) inside it.
        let most: u64 = links
            .iter()
            .flat_map(|l| l.chunks.iter())
            .map(|c| {
                let last = end_of(c).saturating_sub(1).max(c.offset);
                1u64.saturating_add(last / cell - c.offset / cell)
                    .saturating_add(last / out - c.offset / out)
            })
            .fold(0u64, u64::saturating_add);
        let mut pieces: Vec<Piece> = Vec::new();
        usize::try_from(most)
            .ok()
            .and_then(|n| pieces.try_reserve_exact(n).ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("the chain's state in {most} pieces does not fit in memory"),
                )
            })?;
        let mut covered = Cells::default();
        let mut limit = u64::MAX;
        for (l, link) in links.iter().enumerate() {
            limit = limit.min(link.header.data_len);
            let delta = link.header.is_delta();
            // Cells this link provides: newer links' cells are theirs.
            let mut mine = Vec::new();
            for (i, c) in link.chunks.iter().enumerate() {
                let end = end_of(c).min(limit);
                let mut at = c.offset;
                while at < end {
                    let index = at / cell;
                    // Past `at`: `next` is above it, and so is `end`.
                    let piece_end = next(at, cell).min(next(at, out)).min(end);
                    if !covered.get(index) {
                        pieces.push(Piece {
                            link: l,
                            chunk: i,
                            from: (at - c.offset) as u32,
                            offset: at,
                            len: (piece_end - at) as u32,
                        });
                        if delta {
                            mine.push(index);
                        }
                    }
                    at = piece_end;
                }
            }
            // A delta's entry is a whole cell: it covers the cell for the
            // links below it (marked after the walk, so that a full
            // snapshot's cell split in several chunks keeps them all).
            for index in mine {
                covered.set(index);
            }
        }
        pieces.sort_by_key(|p| p.offset);
        let mut extents: Vec<Extent> = Vec::new();
        for p in &pieces {
            match extents.last_mut() {
                Some(e) if e.offset + e.len == p.offset => e.len += u64::from(p.len),
                _ => extents.push(Extent {
                    offset: p.offset,
                    len: u64::from(p.len),
                }),
            }
        }
        let places = links
            .iter()
            .map(|l| file_offsets(&l.header, &l.chunks))
            .collect();
        Ok(Composed {
            links,
            places,
            pieces,
            extents,
            data_len,
            bases,
        })
    }
}

/// The last chunk [`Pieces::read_piece`] read whole (and checked): its link
/// and index, and its bytes.
#[derive(Default)]
pub(crate) struct ChunkBuf {
    key: Option<(usize, usize)>,
    bytes: Vec<u8>,
}

/// A chain's state as pieces ([`Composed`], whatever its files' type).
pub(crate) trait Pieces {
    /// The state's size (the head's).
    fn data_len(&self) -> u64;

    /// The state's data extents (the pieces, merged).
    fn extents(&self) -> &[Extent];

    /// The pieces, in memfd order.
    fn pieces(&self) -> &[Piece];

    /// Reads piece `i` into `out` (its length) and returns its CRC; a chunk
    /// whose CRC does not match is [`ReadError::Damaged`]. `scratch` keeps
    /// the last chunk read whole for a part of it, so that the pieces of
    /// one chunk (adjacent, in memfd order) read it once.
    fn read_piece(
        &self,
        i: usize,
        out: &mut [u8],
        scratch: &mut ChunkBuf,
    ) -> Result<u32, ReadError>;
}

impl<R: ReadAt> Pieces for Composed<R> {
    fn data_len(&self) -> u64 {
        self.data_len
    }

    fn extents(&self) -> &[Extent] {
        &self.extents
    }

    fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The chunk's own CRC when the piece is the whole chunk (read straight
    /// into `out` and checked there); else the chunk is read into
    /// `scratch` and checked, and the piece's part copied and checksummed.
    fn read_piece(
        &self,
        i: usize,
        out: &mut [u8],
        scratch: &mut ChunkBuf,
    ) -> Result<u32, ReadError> {
        let p = self.pieces[i];
        let link = &self.links[p.link];
        let c = link.chunks[p.chunk];
        let place = self.places[p.link][p.chunk];
        let read = if p.from == 0 && p.len == c.len {
            link.reader
                .read_exact_at(out, place)
                .map_err(ReadError::from)
                .and_then(|()| check_crc(&link.chunks, p.chunk, place, out))
                .map(|()| c.crc)
        } else {
            let key = Some((p.link, p.chunk));
            let read = if scratch.key == key {
                Ok(())
            } else {
                scratch.key = None;
                read_checked(
                    &link.reader,
                    &link.chunks,
                    &self.places[p.link],
                    p.chunk,
                    &mut scratch.bytes,
                )
            };
            read.map(|()| {
                scratch.key = key;
                out.copy_from_slice(&scratch.bytes[p.from as usize..(p.from + p.len) as usize]);
                crc32fast::hash(out)
            })
        };
        match (read, p.link.checked_sub(1).and_then(|b| self.bases.get(b))) {
            (Err(ReadError::Damaged(d)), Some(base)) => {
                Err(ReadError::Damaged(Damage::BrokenChain {
                    base: base.clone(),
                    problem: d.to_string(),
                }))
            }
            (r, _) => r,
        }
    }
}

/// Reads chunk `i` of a link into `buf` and checks its CRC.
fn read_checked<R: ReadAt + ?Sized>(
    r: &R,
    chunks: &[Chunk],
    places: &[u64],
    i: usize,
    buf: &mut Vec<u8>,
) -> Result<(), ReadError> {
    let c = &chunks[i];
    buf.resize(c.len as usize, 0);
    r.read_exact_at(buf, places[i])?;
    check_crc(chunks, i, places[i], buf)
}

/// Checks that `bytes`, read from `place`, are chunk `i` by its CRC.
fn check_crc(chunks: &[Chunk], i: usize, place: u64, bytes: &[u8]) -> Result<(), ReadError> {
    let c = &chunks[i];
    if crc32fast::hash(bytes) != c.crc {
        return Err(ReadError::Damaged(Damage::ChunkChecksum {
            bad: 1,
            total: chunks.len() as u64,
            index: i as u64,
            memfd_offset: c.offset,
            file_offset: place,
            len: c.len,
        }));
    }
    Ok(())
}

/// A set of cell indices, for cells a newer link replaced: one entry per
/// delta table entry at most, so bounded by the tables already read (never
/// by a size a header declares).
#[derive(Default)]
struct Cells(std::collections::BTreeSet<u64>);

impl Cells {
    fn get(&self, index: u64) -> bool {
        self.0.contains(&index)
    }

    fn set(&mut self, index: u64) {
        self.0.insert(index);
    }
}

/// The generations of the chain that `name` heads, read from headers only
/// (no checksums): `name`'s own base, its base's base, ... Used to tell
/// which `.gen-` files are still needed. Stops at the first file that is
/// missing or whose header is not a valid delta header.
pub(crate) fn chain_generations<S: Storage>(
    storage: &mut S,
    series: &OsStr,
    name: &OsStr,
) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    let Some(reader) = storage.open(name)? else {
        return Ok(out);
    };
    // A file that cannot be read is an error (the caller then keeps
    // every base); a damaged header ends the chain.
    let base_of = |r: &S::Reader| match crate::snapshot::read_header(r, u64::MAX) {
        Ok(h) => Ok(h.base),
        Err(ReadError::Io(e)) => Err(e),
        Err(_) => Ok(None),
    };
    let mut want = base_of(&reader)?;
    while let Some(base) = want {
        if out.contains(&base.generation) || out.len() > format::MAX_DEPTH as usize {
            break;
        }
        out.push(base.generation);
        let Some(reader) = storage.open(&base_name(series, base.generation))? else {
            break;
        };
        want = base_of(&reader)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_a_series() {
        let s = OsStr::new("state.snap");
        assert_eq!(base_name(s, 7), "state.snap.gen-7");
        assert_eq!(series_of(OsStr::new("state.snap")), "state.snap");
        assert_eq!(series_of(OsStr::new("state.snap.prev")), "state.snap");
        assert_eq!(series_of(OsStr::new("state.snap.gen-12")), "state.snap");
        assert_eq!(series_of(OsStr::new("state.snap.gen-")), "state.snap.gen-");
        assert_eq!(series_of(OsStr::new("a.gen-x")), "a.gen-x");
        assert_eq!(series_of(OsStr::new(".prev")), ".prev");
        assert_eq!(
            generation_of_base(s, OsStr::new("state.snap.gen-12")),
            Some(12)
        );
        assert_eq!(
            generation_of_base(s, OsStr::new("state.snap.gen-012")),
            None
        );
        assert_eq!(generation_of_base(s, OsStr::new("state.snap.gen-")), None);
        assert_eq!(generation_of_base(s, OsStr::new("state.snap.prev")), None);
        assert_eq!(generation_of_base(s, OsStr::new("other.gen-3")), None);
        assert_eq!(
            generation_of_base(s, OsStr::new("state.snap.gen-99999999999999999999999")),
            None
        );
    }

    /// A full snapshot's link over `data` (no file around it: the chunks'
    /// bytes at `data_offset` 0 of `data`), for `Composed`.
    fn full_link(
        data: Vec<u8>,
        data_len: u64,
        chunk_size: u32,
        chunks: Vec<Chunk>,
    ) -> Link<Vec<u8>> {
        Link {
            header: Header {
                chunk_size,
                data_len,
                generation: 1,
                saved_at_ns: 0,
                chunk_count: chunks.len() as u64,
                stored_len: chunks.iter().map(|c| u64::from(c.len)).sum(),
                data_offset: 0,
                table_crc: 0,
                base: None,
            },
            reader: data,
            chunks,
        }
    }

    #[test]
    fn a_lying_size_near_the_end_of_u64_composes_without_a_wrap() {
        // A table entry at u64::MAX - 10 (a header that says the state is
        // that large): the cell arithmetic must not overflow (a debug
        // panic, a release wrap to 0 and an endless loop before).
        let data = vec![7u8; 10];
        let chunk = Chunk {
            offset: u64::MAX - 10,
            len: 10,
            crc: crc32fast::hash(&data),
        };
        let c = Composed::new(
            vec![full_link(data, u64::MAX, 4096, vec![chunk])],
            4096,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(c.pieces().len(), 1, "{:?}", c.pieces());
        assert_eq!(c.pieces()[0].offset, u64::MAX - 10);
    }

    #[test]
    fn the_pieces_of_one_chunk_read_it_once() {
        // A 64 KiB chunk of a full snapshot written with a larger chunk
        // size than the cells: 16 pieces of 4 KiB, one read of the chunk.
        struct Counting(Vec<u8>, std::cell::Cell<usize>);
        impl ReadAt for Counting {
            fn size(&self) -> io::Result<u64> {
                Ok(self.0.len() as u64)
            }
            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                self.1.set(self.1.get() + 1);
                self.0.as_slice().read_exact_at(buf, offset)
            }
        }
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let chunk = Chunk {
            offset: 0,
            len: 65536,
            crc: crc32fast::hash(&data),
        };
        let link = full_link(Vec::new(), 65536, 65536, vec![chunk]);
        let link = Link {
            reader: Counting(data.clone(), std::cell::Cell::new(0)),
            header: Header {
                chunk_size: 4096,
                ..link.header
            },
            chunks: link.chunks,
        };
        let c = Composed::new(vec![link], 4096, Vec::new()).unwrap();
        assert_eq!(c.pieces().len(), 16);
        let mut scratch = ChunkBuf::default();
        let mut got = Vec::new();
        for (i, p) in c.pieces().iter().enumerate() {
            let mut out = vec![0u8; p.len as usize];
            let crc = c.read_piece(i, &mut out, &mut scratch).unwrap();
            assert_eq!(crc, crc32fast::hash(&out));
            got.extend_from_slice(&out);
        }
        assert_eq!(got, data);
        assert_eq!(c.links[0].reader.1.get(), 1, "reads of the chunk");
    }

    #[test]
    fn cells_set_and_get() {
        let mut c = Cells::default();
        assert!(!c.get(129));
        c.set(129);
        c.set(0);
        c.set(1 << 40);
        assert!(c.get(129) && c.get(0) && !c.get(64) && c.get(1 << 40));
    }
}
