//! Where a snapshot copy goes: a dense buffer as long as the memory, or a
//! [`SparseCopy`] holding only the memfd's data extents (holes are not
//! read: reading a hole of a memfd through a mapping would allocate it).

use std::io;
#[cfg(not(loom))]
use std::ops::Range;

use crate::header::{HEADER_LEN, OFF_SEQ, OFF_WAITERS};
use crate::region::Region;

/// A destination for a copy of a [`Region`].
pub trait CopyTarget {
    /// Copies the current contents of `src` (relaxed atomic loads), replacing
    /// any previous copy.
    fn copy_from(&mut self, src: Region<'_>) -> io::Result<()>;

    /// The copy's first [`HEADER_LEN`] bytes, when it holds them.
    fn header_mut(&mut self) -> Option<&mut [u8]>;

    /// The length of memory this target takes a copy of, when fixed in
    /// advance (a dense buffer); `None` when it adapts to the source.
    fn required_len(&self) -> Option<usize>;
}

impl CopyTarget for [u8] {
    fn copy_from(&mut self, src: Region<'_>) -> io::Result<()> {
        src.copy_to(self);
        Ok(())
    }

    fn header_mut(&mut self) -> Option<&mut [u8]> {
        self.get_mut(..HEADER_LEN)
    }

    fn required_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl CopyTarget for Vec<u8> {
    fn copy_from(&mut self, src: Region<'_>) -> io::Result<()> {
        self.as_mut_slice().copy_from(src)
    }

    fn header_mut(&mut self) -> Option<&mut [u8]> {
        self.as_mut_slice().header_mut()
    }

    fn required_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

/// The seq value a copied header holds.
pub(crate) fn copied_seq(header: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&header[OFF_SEQ..OFF_SEQ + 8]);
    u64::from_le_bytes(b)
}

/// Puts the committed sequence value and a zero waiter word into a copied
/// header (the copy's own reads of those words may be from any moment).
pub(crate) fn fix_header(header: &mut [u8], seq: u64) {
    header[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    header[OFF_WAITERS..OFF_WAITERS + 8].copy_from_slice(&0u64.to_le_bytes());
}

/// A copy of a memfd's data extents only: `extents` (sorted, disjoint,
/// the header page always first) and their bytes one after the other in
/// `bytes`. Holes read as zero and are not copied, so a 256 MiB memfd
/// holding 1 MiB of data costs 1 MiB, and the snapshotter never allocates
/// the program's holes.
///
/// The extents are found with `SEEK_DATA` / `SEEK_HOLE` on `memfd`, again
/// for every copy (a hole filled since the last copy is data now). Those
/// move the file offset, so `memfd` must be this process's own open file
/// description (open `/proc/self/fd/N`), not a `dup` shared with the
/// program.
#[cfg(not(loom))]
#[derive(Debug)]
pub struct SparseCopy<'f> {
    memfd: &'f std::fs::File,
    /// The memory's length when copied (holes included).
    pub len: usize,
    /// The copied byte ranges.
    pub extents: Vec<Range<usize>>,
    /// The bytes of `extents`, concatenated.
    pub bytes: Vec<u8>,
}

#[cfg(not(loom))]
impl<'f> SparseCopy<'f> {
    /// An empty copy that will find its extents in `memfd`.
    pub fn new(memfd: &'f std::fs::File) -> SparseCopy<'f> {
        SparseCopy {
            memfd,
            len: 0,
            extents: Vec::new(),
            bytes: Vec::new(),
        }
    }
}

#[cfg(not(loom))]
impl CopyTarget for SparseCopy<'_> {
    fn copy_from(&mut self, src: Region<'_>) -> io::Result<()> {
        let len = src.len();
        // Within `len` (a usize), so every bound converts back.
        let mut extents: Vec<Range<usize>> = crate::data_extents(self.memfd, len as u64)?
            .into_iter()
            .map(|r| r.start as usize..r.end as usize)
            .collect();
        // The header page is always copied (it is data once written; a
        // blank one is copied as zeros, which is what it holds).
        let head = HEADER_LEN.min(len);
        match extents.first_mut() {
            Some(first) if first.start <= head => first.start = 0,
            _ => extents.insert(0, 0..head),
        }
        if let Some(first) = extents.first_mut() {
            first.end = first.end.max(head);
        }
        if extents.len() > 1 && extents[1].start <= extents[0].end {
            let second = extents.remove(1);
            extents[0].end = extents[0].end.max(second.end);
        }
        let total = extents.iter().map(|r| r.end - r.start).sum();
        self.bytes.clear();
        self.bytes.resize(total, 0);
        let mut at = 0;
        for r in &extents {
            let n = r.end - r.start;
            let out = &mut self.bytes[at..at + n];
            match src.subregion(r.start, n) {
                Some(part) => part.copy_to(out),
                None => src.read(r.start, out),
            }
            at += n;
        }
        self.len = len;
        self.extents = extents;
        Ok(())
    }

    fn header_mut(&mut self) -> Option<&mut [u8]> {
        match self.extents.first() {
            Some(r) if r.start == 0 && r.end >= HEADER_LEN => self.bytes.get_mut(..HEADER_LEN),
            _ => None,
        }
    }

    fn required_len(&self) -> Option<usize> {
        None
    }
}
