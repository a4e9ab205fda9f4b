//! Where a file's data is (`SEEK_DATA` / `SEEK_HOLE`): the one home of the
//! extent search that the snapshotter ([`crate::SparseCopy`]), shm-restore
//! and the examples share. A memfd's holes read as zero and cost no memory;
//! skipping them keeps a copy of a large, mostly empty memfd small, and
//! reading a hole through a mapping would allocate it.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// The data extents of `file` within its first `len` bytes: sorted,
/// disjoint byte ranges, each cut at `len`. Everything outside them is a
/// hole (reads as zero). A file system without hole support reports its
/// whole length as one extent.
///
/// `SEEK_DATA` moves the file offset: pass this process's own open file
/// description (for a memfd, open `/proc/self/fd/N` again, as
/// shm-fd's `SharedFd::reopen` does), not a `dup` shared with the program
/// that uses the offset.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    data_in(file, 0..len, len, &mut out)?;
    Ok(out)
}

/// The data extents of `file` (of length `len`) now, given `earlier`, its
/// data extents found at some moment before (sorted and disjoint, as
/// [`data_extents`] returns them): for a copy made while nothing writes the
/// file, with the search done before (e.g. before the program that writes
/// it was stopped).
///
/// Every earlier extent is kept (cut at `len`), and each hole between them
/// (and after the last, up to `len`) is searched again: one `SEEK_DATA`
/// from the hole's start, plus a `SEEK_HOLE` for each run of data found in
/// it. That is exact, because of what a memfd can do in between:
/// - a hole written since is data now, and the search of that hole finds it;
/// - data never turns into a hole by itself; a page the program punched
///   out (`fallocate`) reads as zeros, so copying it as an extent still
///   copies what the memfd holds;
/// - a memfd that grew has a longer last hole, searched up to `len`; one
///   that shrank has its extents cut at `len`.
///
/// So the extents returned cover every byte that is data when the call
/// runs, and whatever else they cover reads as zeros. When nothing changed
/// it costs one `lseek` per hole, where a fresh search costs two per
/// extent. Moves the file offset, as [`data_extents`] does.
pub fn data_extents_since(
    file: &File,
    len: u64,
    earlier: &[Range<u64>],
) -> io::Result<Vec<Range<u64>>> {
    let mut out = Vec::with_capacity(earlier.len() + 1);
    let mut at = 0u64;
    for e in earlier {
        let start = e.start.max(at);
        if start >= len {
            break;
        }
        let end = e.end.min(len);
        data_in(file, at..start, len, &mut out)?;
        if end > start {
            push_merged(&mut out, start..end);
        }
        at = at.max(end);
    }
    data_in(file, at..len, len, &mut out)?;
    Ok(out)
}

/// Appends to `out` the data `file` (of length `len`) holds within `range`.
fn data_in(file: &File, range: Range<u64>, len: u64, out: &mut Vec<Range<u64>>) -> io::Result<()> {
    let mut from = range.start;
    while from < range.end {
        let Some(start) = seek(file, from, libc::SEEK_DATA)? else {
            break; // no data from `from` to the end of the file
        };
        if start >= range.end {
            break;
        }
        let end = seek(file, start, libc::SEEK_HOLE)?
            .unwrap_or(len)
            .min(range.end);
        if end <= start {
            // Only while something changes the file: a page between the
            // two seeks turned into a hole again. Search on from the next
            // byte rather than loop.
            from = start + 1;
            continue;
        }
        push_merged(out, start..end);
        from = end;
    }
    Ok(())
}

/// Appends `r` to `out`, joined with the last extent when they touch.
fn push_merged(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    match out.last_mut() {
        Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
        _ => out.push(r),
    }
}

/// `lseek(file, offset, whence)`; `None` when there is no data (or hole)
/// at or after `offset` (`ENXIO`: the file ends, or shrank under us).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows off_t"))?;
    // SAFETY: lseek only moves the file offset of the fd, which `file`
    // keeps open for the call; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_the_data_between_holes_and_cuts_at_len() {
        let f = tempfile_in_memory();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1; 4096], 8 << 20).unwrap();
        f.write_all_at(&[2; 8192], 32 << 20).unwrap();
        let all = data_extents(&f, 64 << 20).unwrap();
        assert_eq!(
            all,
            vec![(8 << 20)..(8 << 20) + 4096, (32 << 20)..(32 << 20) + 8192]
        );
        // Cut at len: the second extent is halved, nothing past it.
        let cut = data_extents(&f, (32 << 20) + 4096).unwrap();
        assert_eq!(cut[1], (32 << 20)..(32 << 20) + 4096);
        assert!(data_extents(&f, 0).unwrap().is_empty());
        // All holes: no extent.
        let empty = tempfile_in_memory();
        empty.set_len(1 << 20).unwrap();
        assert!(data_extents(&empty, 1 << 20).unwrap().is_empty());
    }

    /// A memfd (holes are exact there), opened as a plain File.
    fn tempfile_in_memory() -> File {
        // SAFETY: memfd_create with a valid C string; the fd it returns is
        // new and owned by the File.
        unsafe {
            let fd = libc::memfd_create(c"extents-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "{}", io::Error::last_os_error());
            std::os::fd::FromRawFd::from_raw_fd(fd)
        }
    }
}
