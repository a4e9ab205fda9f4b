//! A private, sparse copy of a memfd's contents: what a capture produces, a
//! save writes and a load puts back.
//!
//! Only the memfd's data extents (found with `SEEK_DATA` / `SEEK_HOLE`) are
//! copied, so a 1 GiB memfd holding 1 MiB of data costs 1 MiB of memory and
//! work, and writing the image back leaves the holes as holes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::format::Chunk;
use crate::parallel;

/// A run of data bytes of the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Where the run starts in the memfd.
    pub offset: u64,
    /// How many bytes it holds.
    pub len: u64,
}

/// A sparse copy of a memfd: its size, its data extents and their bytes
/// (stored one after the other in extent order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Image {
    data_len: u64,
    extents: Vec<Extent>,
    bytes: Vec<u8>,
}

impl Image {
    /// Builds an image from its parts, checking that the extents are
    /// non-empty, sorted, non-overlapping, inside `data_len`, and that
    /// `bytes` holds exactly their data.
    pub fn from_parts(
        data_len: u64,
        extents: Vec<Extent>,
        bytes: Vec<u8>,
    ) -> Result<Image, &'static str> {
        let mut end_of_previous = 0u64;
        let mut total = 0u64;
        for e in &extents {
            if e.len == 0 {
                return Err("an extent is empty");
            }
            if e.offset < end_of_previous {
                return Err("extents overlap or are out of order");
            }
            end_of_previous = e
                .offset
                .checked_add(e.len)
                .filter(|&end| end <= data_len)
                .ok_or("an extent ends beyond the data size")?;
            total += e.len;
        }
        if total != bytes.len() as u64 {
            return Err("the bytes do not match the extents' total length");
        }
        Ok(Image {
            data_len,
            extents,
            bytes,
        })
    }

    /// A dense image of `bytes` (one extent covering everything).
    pub fn from_bytes(bytes: Vec<u8>) -> Image {
        let len = bytes.len() as u64;
        let extents = if len == 0 {
            Vec::new()
        } else {
            vec![Extent { offset: 0, len }]
        };
        Image {
            data_len: len,
            extents,
            bytes,
        }
    }

    /// Copies the memfd's data extents into memory.
    ///
    /// `memfd` must be this process's own open file description of the
    /// memfd (see [`shm_fd::SharedFd::reopen`]): `SEEK_DATA` moves the file
    /// offset, which a `dup` would share with the program.
    pub fn read_from(memfd: &File) -> io::Result<Image> {
        Image::read_into(memfd, Vec::new())
    }

    /// As [`Image::read_from`], reusing `buf`'s memory (its length and
    /// contents do not matter). A buffer whose pages are already faulted in
    /// ([`prefaulted`]) makes the copy run at memory speed: a capture that
    /// pauses the program prepares one before the pause.
    pub fn read_into(memfd: &File, buf: Vec<u8>) -> io::Result<Image> {
        let data_len = memfd.metadata()?.len();
        let extents = data_extents(memfd, data_len)?;
        let bytes = read_extents(memfd, &extents, buf)?;
        Ok(Image {
            data_len,
            extents,
            bytes,
        })
    }

    /// As [`Image::read_into`], with the extent search done earlier:
    /// `searched` are the memfd's data extents found before (e.g. before the
    /// program was stopped). They are checked again for what changed since
    /// (`data_extents_since`), which costs one `lseek` per hole between
    /// them instead of two per extent, so the copy is of the memfd as it is
    /// now. Only exact while nothing writes the memfd during the call.
    pub fn read_searched(memfd: &File, searched: &[Extent], buf: Vec<u8>) -> io::Result<Image> {
        let data_len = memfd.metadata()?.len();
        let extents = data_extents_since(memfd, data_len, searched)?;
        let bytes = read_extents(memfd, &extents, buf)?;
        Ok(Image {
            data_len,
            extents,
            bytes,
        })
    }

    /// Gives back the memory of the image's bytes, for [`Image::read_into`].
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The memfd size the image was taken of, holes included.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// True when the memfd was empty (size 0).
    pub fn is_empty(&self) -> bool {
        self.data_len == 0
    }

    /// The data extents, in order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The extents' bytes, one after the other.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Splits the extents into chunks at every multiple of `chunk_size`
    /// ([`format::split_at_cells`]): `(memfd offset, bytes)`, in order.
    ///
    /// [`format::split_at_cells`]: crate::format::split_at_cells
    pub fn chunks(&self, chunk_size: u32) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let mut at = 0usize;
        self.extents.iter().flat_map(move |e| {
            let start = at;
            at += e.len as usize;
            let bytes = &self.bytes[start..at];
            crate::format::split_at_cells(e.offset, e.len, chunk_size).map(move |(offset, n)| {
                let from = (offset - e.offset) as usize;
                (offset, &bytes[from..from + n as usize])
            })
        })
    }

    /// The chunk table for `chunk_size`: each chunk's place, length and CRC
    /// (a large image on a few threads).
    pub fn table(&self, chunk_size: u32) -> Vec<Chunk> {
        let chunks: Vec<(u64, &[u8])> = self.chunks(chunk_size).collect();
        let lens: Vec<u64> = chunks.iter().map(|c| c.1.len() as u64).collect();
        let runs = parallel::split_even(&lens, parallel::workers(self.bytes.len() as u64));
        parallel::run_each(runs, |run| {
            chunks[run]
                .iter()
                .map(|&(offset, bytes)| Chunk {
                    offset,
                    len: bytes.len() as u32,
                    crc: crc32fast::hash(bytes),
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Writes the image into an empty memfd: grows it to the image's size
    /// and writes the extents, leaving the rest as holes.
    pub fn write_into(&self, memfd: &File) -> io::Result<()> {
        if self.data_len > 0 {
            memfd.set_len(self.data_len)?;
        }
        let mut at = 0usize;
        for e in &self.extents {
            let end = at + e.len as usize;
            memfd.write_all_at(&self.bytes[at..end], e.offset)?;
            at = end;
        }
        Ok(())
    }

    /// The full contents, holes as zeros (for tests and small images).
    pub fn to_dense(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.data_len as usize];
        let mut at = 0usize;
        for e in &self.extents {
            let end = at + e.len as usize;
            out[e.offset as usize..(e.offset + e.len) as usize]
                .copy_from_slice(&self.bytes[at..end]);
            at = end;
        }
        out
    }
}

/// The number of data bytes in `extents`.
pub fn stored_len(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// A zeroed buffer of `len` bytes whose pages are faulted in, so that
/// copying into it later takes no page faults.
pub fn prefaulted(len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    grow_zeroed(&mut buf, len)?;
    Ok(buf)
}

/// Appends zeros to `buf` up to `len` bytes, writing every new byte (so
/// every new page is faulted in); an allocation failure is an error, not
/// an abort.
fn grow_zeroed(buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    buf.try_reserve_exact(len.saturating_sub(buf.len()))
        .map_err(|_| out_of_memory(len))?;
    // In steps of memcpy, fast in unoptimised builds too.
    while buf.len() < len {
        let n = (len - buf.len()).min(ZEROS.len());
        buf.extend_from_slice(&ZEROS[..n]);
    }
    Ok(())
}

fn out_of_memory(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::OutOfMemory,
        format!("cannot allocate {len} bytes for a copy of the memfd"),
    )
}

/// Reads the data `extents` of `memfd` into `buf`, sized to exactly their
/// length (its memory reused, and its contents overwritten, not zeroed
/// first: a [`prefaulted`] buffer of the right size costs no page fault and
/// no `memset`).
pub(crate) fn read_extents(memfd: &File, extents: &[Extent], buf: Vec<u8>) -> io::Result<Vec<u8>> {
    let total = usize::try_from(stored_len(extents))
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "memfd data too large"))?;
    let mut bytes = buf;
    // Shrinking writes nothing; growing zeroes only the new part.
    bytes.truncate(total);
    grow_zeroed(&mut bytes, total)?;
    copy_extents(memfd, extents, &mut bytes)?;
    Ok(bytes)
}

/// Reads the data `extents` of `memfd` into `bytes` (which holds exactly
/// their length), in pieces split over a few threads when large.
fn copy_extents(memfd: &File, extents: &[Extent], bytes: &mut [u8]) -> io::Result<()> {
    const PIECE: u64 = 4 << 20;
    let mut pieces = Vec::new(); // (memfd offset, length)
    for e in extents {
        let mut off = 0;
        while off < e.len {
            let n = PIECE.min(e.len - off);
            pieces.push((e.offset + off, n));
            off += n;
        }
    }
    let lens: Vec<u64> = pieces.iter().map(|p| p.1).collect();
    let runs = parallel::split_even(&lens, parallel::workers(bytes.len() as u64));
    let mut work = Vec::with_capacity(runs.len());
    let mut rest = bytes;
    for run in runs {
        let n: u64 = lens[run.clone()].iter().sum();
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n as usize);
        work.push((&pieces[run], head));
        rest = tail;
    }
    parallel::run_each(work, |(pieces, buf)| {
        let mut at = 0usize;
        for &(offset, n) in pieces {
            let end = at + n as usize;
            memfd.read_exact_at(&mut buf[at..end], offset)?;
            at = end;
        }
        Ok(())
    })
    .into_iter()
    .collect()
}

/// The data extents of `file` (of length `len`), from `SEEK_DATA` /
/// `SEEK_HOLE` ([`shm_snapshot::data_extents`]). A file system without
/// hole support reports one extent.
///
/// Moves the file offset: pass a private open file description.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<Extent>> {
    Ok(shm_snapshot::data_extents(file, len)?
        .into_iter()
        .map(|r| Extent {
            offset: r.start,
            len: r.end - r.start,
        })
        .collect())
}

/// The data extents of `file` (of length `len`) now, given `earlier`, its
/// data extents found at some moment before: the earlier ones kept and the
/// holes between them searched again
/// ([`shm_snapshot::data_extents_since`], which says why that is exact).
/// Moves the file offset: pass a private open file description.
pub fn data_extents_since(file: &File, len: u64, earlier: &[Extent]) -> io::Result<Vec<Extent>> {
    let earlier: Vec<_> = earlier
        .iter()
        .map(|e| e.offset..e.offset.saturating_add(e.len))
        .collect();
    Ok(shm_snapshot::data_extents_since(file, len, &earlier)?
        .into_iter()
        .map(|r| Extent {
            offset: r.start,
            len: r.end - r.start,
        })
        .collect())
}

/// Appends `start..end` to `out`, joined with the last extent when they
/// touch.
pub(crate) fn push_merged(out: &mut Vec<Extent>, start: u64, end: u64) {
    match out.last_mut() {
        Some(last) if last.offset + last.len >= start => {
            last.len = last.len.max(end - last.offset);
        }
        _ => out.push(Extent {
            offset: start,
            len: end - start,
        }),
    }
}

/// The chunk table of the memfd's data `extents` (chunks split at cells,
/// [`crate::format::split_at_cells`]), read through a reused buffer per
/// thread (a few threads for a large memfd): no copy of the whole.
pub(crate) fn memfd_table(
    memfd: &File,
    extents: &[Extent],
    chunk_size: u32,
) -> io::Result<Vec<Chunk>> {
    let pieces: Vec<(u64, u32)> = extents
        .iter()
        .flat_map(|e| crate::format::split_at_cells(e.offset, e.len, chunk_size))
        .collect();
    crcs_of(memfd, &pieces)
}

/// The chunks `pieces` (`(offset, length)`, in order) of the memfd with
/// their CRCs, read through a reused buffer per thread (a few threads when
/// they add up to much).
pub(crate) fn crcs_of(memfd: &File, pieces: &[(u64, u32)]) -> io::Result<Vec<Chunk>> {
    let lens: Vec<u64> = pieces.iter().map(|p| u64::from(p.1)).collect();
    let runs = parallel::split_even(&lens, parallel::workers(lens.iter().sum()));
    let tables = parallel::run_each(runs, |run| {
        let mut buf = Vec::new();
        let mut table = Vec::with_capacity(run.len());
        for &(offset, n) in &pieces[run] {
            buf.resize(n as usize, 0);
            memfd.read_exact_at(&mut buf, offset)?;
            table.push(Chunk {
                offset,
                len: n,
                crc: crc32fast::hash(&buf),
            });
        }
        Ok::<_, io::Error>(table)
    });
    let mut table = Vec::with_capacity(pieces.len());
    for t in tables {
        table.extend(t?);
    }
    Ok(table)
}

/// The chunk table the memfd's current contents would have, computed by
/// reading it without a copy of the whole (one `chunk_size` buffer).
///
/// Used to tell whether the memfd changed since the last save without
/// stopping the program: the result need not be consistent, only equal to
/// the last table if nothing changed. Returns `(size, table)`.
pub fn probe_table(memfd: &File, chunk_size: u32) -> io::Result<(u64, Vec<Chunk>)> {
    let data_len = memfd.metadata()?.len();
    let extents = data_extents(memfd, data_len)?;
    Ok((data_len, memfd_table(memfd, &extents, chunk_size)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm_fd::{CreateOptions, SharedFd};

    pub(crate) fn memfd() -> File {
        SharedFd::create("image-test", CreateOptions::default())
            .unwrap()
            .into_file()
    }

    #[test]
    fn sparse_memfd_round_trip_keeps_holes() {
        let f = memfd();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 10_000], 20 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let img = Image::read_from(&f).unwrap();
        assert_eq!(img.data_len(), 64 << 20);
        // Page granularity: 3 extents, a few pages in all.
        assert_eq!(img.extents().len(), 3, "{:?}", img.extents());
        assert!(img.bytes().len() <= 5 * 4096);

        let g = memfd();
        img.write_into(&g).unwrap();
        assert_eq!(g.metadata().unwrap().len(), 64 << 20);
        assert_eq!(data_extents(&g, 64 << 20).unwrap(), img.extents());
        assert_eq!(Image::read_from(&g).unwrap(), img);
        assert_eq!(&img.to_dense()[..4], b"head");
    }

    #[test]
    fn read_into_reuses_any_buffer_and_copies_on_threads() {
        let f = memfd();
        f.set_len(1 << 20).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        f.write_all_at(&data, 8192).unwrap();
        f.write_all_at(b"end", (1 << 20) - 3).unwrap();
        let fresh = Image::read_from(&f).unwrap();
        assert_eq!(&fresh.to_dense()[8192..8192 + data.len()], &data[..]);
        for buf in [
            Vec::new(),
            vec![9u8; 10],
            vec![9u8; 2 << 20],
            prefaulted(4096).unwrap(),
        ] {
            let cap = buf.capacity();
            let img = Image::read_into(&f, buf).unwrap();
            assert_eq!(img, fresh);
            if cap >= img.bytes().len() {
                assert_eq!(img.into_bytes().capacity(), cap, "the buffer was reused");
            }
        }
        assert!(prefaulted(10_000).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn extents_searched_earlier_are_rechecked_for_what_changed_since() {
        let page = 4096u64;
        let f = memfd();
        f.set_len(64 * page).unwrap();
        for p in [4, 5, 20, 40] {
            f.write_all_at(&[p as u8; 4096], p * page).unwrap();
        }
        let earlier = data_extents(&f, 64 * page).unwrap();
        assert_eq!(earlier.len(), 3);
        // Nothing changed: the same extents.
        assert_eq!(
            data_extents_since(&f, 64 * page, &earlier).unwrap(),
            earlier
        );

        // Since the search: data in the first hole, in the middle of one,
        // right after an extent, in the last one, past the old end; and a
        // page punched out of an extent.
        for p in [0, 12, 13, 21, 63, 70] {
            f.write_all_at(&[0xA0 + p as u8; 4096], p * page).unwrap();
        }
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (5 * page) as i64,
            page as i64,
        )
        .unwrap();
        let len = f.metadata().unwrap().len();
        let now = Image::read_from(&f).unwrap();
        let rechecked = Image::read_searched(&f, &earlier, Vec::new()).unwrap();
        assert_eq!(rechecked.data_len(), len);
        assert_eq!(rechecked.to_dense(), now.to_dense());
        // Every extent found now is inside one of the re-checked ones; the
        // punched page is still covered (it reads as the zeros it holds).
        for e in now.extents() {
            assert!(
                rechecked
                    .extents()
                    .iter()
                    .any(|r| r.offset <= e.offset && e.offset + e.len <= r.offset + r.len),
                "{e:?} missing from {:?}",
                rechecked.extents()
            );
        }
        assert_eq!(
            rechecked.extents(),
            [
                Extent {
                    offset: 0,
                    len: page
                },
                Extent {
                    offset: 4 * page,
                    len: 2 * page
                },
                Extent {
                    offset: 12 * page,
                    len: 2 * page
                },
                Extent {
                    offset: 20 * page,
                    len: 2 * page
                },
                Extent {
                    offset: 40 * page,
                    len: page
                },
                Extent {
                    offset: 63 * page,
                    len: page
                },
                Extent {
                    offset: 70 * page,
                    len: page
                },
            ]
        );
        // The teeth: the earlier extents alone miss the new pages.
        let stale = read_extents(&f, &earlier, Vec::new()).unwrap();
        assert_ne!(stale.len(), rechecked.bytes().len());

        // A shorter length cuts the earlier extents.
        let cut = data_extents_since(&f, 4 * page + 10, &earlier).unwrap();
        assert_eq!(
            cut,
            [
                Extent {
                    offset: 0,
                    len: page
                },
                Extent {
                    offset: 4 * page,
                    len: 10
                }
            ]
        );
    }

    #[test]
    fn chunks_split_extents() {
        let img = Image::from_parts(
            20_000,
            vec![
                Extent {
                    offset: 0,
                    len: 5000,
                },
                Extent {
                    offset: 12_288,
                    len: 4096,
                },
            ],
            vec![1; 9096],
        )
        .unwrap();
        let c: Vec<(u64, usize)> = img.chunks(4096).map(|(o, b)| (o, b.len())).collect();
        assert_eq!(c, [(0, 4096), (4096, 904), (12_288, 4096)]);
        assert_eq!(img.table(4096).len(), 3);
    }

    #[test]
    fn from_parts_validates() {
        let e = |offset, len| Extent { offset, len };
        assert!(Image::from_parts(10, vec![e(0, 11)], vec![0; 11]).is_err());
        assert!(Image::from_parts(10, vec![e(5, 2), e(0, 2)], vec![0; 4]).is_err());
        assert!(Image::from_parts(10, vec![e(0, 2)], vec![0; 3]).is_err());
        assert!(Image::from_parts(10, vec![e(0, 0)], vec![]).is_err());
        assert!(Image::from_parts(u64::MAX, vec![e(u64::MAX, 2)], vec![0; 2]).is_err());
    }

    #[test]
    fn probe_matches_the_table() {
        let f = memfd();
        f.write_all_at(&[3u8; 10_000], 4096).unwrap();
        let img = Image::read_from(&f).unwrap();
        let (len, table) = probe_table(&f, 4096).unwrap();
        assert_eq!(len, img.data_len());
        assert_eq!(table, img.table(4096));
        f.write_all_at(b"x", 5000).unwrap();
        assert_ne!(probe_table(&f, 4096).unwrap().1, table);
    }
}
