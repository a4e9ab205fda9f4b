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
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows off_t"))?;
        // SAFETY: lseek only moves the file offset of `fd`, which `file`
        // keeps open for the call; no memory is passed.
        let r = unsafe { libc::lseek(fd, offset, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `offset`: the file
            // ends, or shrank under us.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        out.push(start..end);
        at = end;
    }
    Ok(out)
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
