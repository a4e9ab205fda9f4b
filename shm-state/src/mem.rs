//! The memory a state lives in: a raw `*mut u8 + len` over a heap buffer, a
//! mapped memfd or a mapped file. This is the only module that turns the raw
//! pointer into slices.
//!
//! Safety story, once: `ptr` is valid for reads and writes of `len` bytes for
//! as long as the backing lives, and the backing is only replaced (grown and
//! remapped) through `&mut self`. Every slice handed out borrows `self`, so
//! no slice outlives a remap. Every offset and length is checked against
//! `len` with checked arithmetic before a slice is made. Concurrent writers in
//! other processes are excluded by the contract of [`crate::Source`]'s
//! constructors (and by the lock word between shm-state users).

use std::fs::File;
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};
use shm_fd::SharedFd;

use crate::error::{Error, Result};

/// A 64-byte aligned chunk, so that a heap region is aligned like a mapping
/// for every type shm-state stores (alignment at most 16).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [u8; 64]);

/// Where the bytes live.
pub(crate) enum Backing {
    Heap(Vec<Line>),
    Shared { fd: SharedFd, map: MmapRaw },
    File { file: File, map: MmapRaw },
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Heap(v) => write!(f, "Heap({} bytes)", v.len() * 64),
            Backing::Shared { fd, map } => write!(f, "Shared({fd:?}, {} bytes)", map.len()),
            Backing::File { file, map } => write!(f, "File({file:?}, {} bytes)", map.len()),
        }
    }
}

/// A test seam: after `countdown` more writes, the next write is torn after
/// `torn_prefix` bytes and a copy of the whole region is kept, as a process
/// killed at that instruction would leave it.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct CrashPlan {
    pub countdown: u64,
    pub torn_prefix: usize,
    pub image: Option<Vec<u8>>,
}

#[derive(Debug)]
pub(crate) struct Mem {
    /// The region: the backing from `base` on.
    ptr: *mut u8,
    len: usize,
    /// Bytes of the backing before the region (shm-snapshot's header page
    /// when the snapshot protocol is on, else 0).
    base: usize,
    backing: Backing,
    #[cfg(test)]
    pub crash: Option<CrashPlan>,
}

/// Rounds `len` up to whole lines.
fn lines_for(len: usize) -> usize {
    len.div_ceil(64)
}

impl Mem {
    pub(crate) fn heap(mut bytes: Vec<u8>, min_len: u64, base: usize) -> Result<Mem> {
        let min_len = min_len.saturating_add(base as u64);
        let want = usize::try_from(min_len)
            .map_err(|_| Error::TooLarge {
                what: "heap region",
                len: min_len,
            })?
            .max(bytes.len());
        let want = want.checked_next_multiple_of(64).ok_or(Error::TooLarge {
            what: "heap region",
            len: min_len,
        })?;
        bytes.resize(want, 0);
        let mut buf = vec![Line([0; 64]); lines_for(want)];
        for (line, chunk) in buf.iter_mut().zip(bytes.chunks(64)) {
            line.0[..chunk.len()].copy_from_slice(chunk);
        }
        Ok(Self::from_backing(Backing::Heap(buf), base))
    }

    /// Maps the memfd; an empty one is grown to `base + min_len` bytes, a
    /// non-empty one is mapped as it is (a refused open must not grow it).
    pub(crate) fn shared(fd: SharedFd, min_len: u64, base: usize) -> Result<Mem> {
        let want = if fd.is_empty()? {
            min_len.max(1).saturating_add(base as u64)
        } else {
            1
        };
        let map = fd.map_raw(want)?;
        Ok(Self::from_backing(Backing::Shared { fd, map }, base))
    }

    /// Maps the file; an empty one is grown to `base + min_len` bytes, a
    /// non-empty one is mapped as it is.
    pub(crate) fn file(file: File, min_len: u64, base: usize) -> Result<Mem> {
        let min_len = min_len.saturating_add(base as u64);
        let len = file.metadata().map_err(|e| Error::io("fstat", e))?.len();
        if len == 0 {
            file.set_len(min_len.max(1))
                .map_err(|e| Error::io("growing the state file", e))?;
        }
        let map = MmapOptions::new()
            .map_raw(&file)
            .map_err(|e| Error::io("mmap", e))?;
        Ok(Self::from_backing(Backing::File { file, map }, base))
    }

    /// `base` is at most the backing's length: every constructor maps or
    /// allocates at least `base` bytes (plus one).
    fn from_backing(mut backing: Backing, base: usize) -> Mem {
        let (ptr, len) = match &mut backing {
            Backing::Heap(v) => (v.as_mut_ptr().cast::<u8>(), v.len() * 64),
            Backing::Shared { map, .. } | Backing::File { map, .. } => {
                (map.as_mut_ptr(), map.len())
            }
        };
        let base = base.min(len);
        Mem {
            // SAFETY: base <= len, so the pointer stays inside (or one past)
            // the backing's allocation.
            ptr: unsafe { ptr.add(base) },
            len: len - base,
            base,
            backing,
            #[cfg(test)]
            crash: None,
        }
    }

    /// The bytes before the region (shm-snapshot's header page) as a raw
    /// pointer and length, for the snapshot protocol; empty when base is 0.
    pub(crate) fn prefix(&self) -> (*mut u8, usize) {
        // SAFETY: `ptr` was made as backing start + base (from_backing).
        (unsafe { self.ptr.sub(self.base) }, self.base)
    }

    /// The first (up to) 8 bytes of the backing, for error messages about
    /// a backing too short to hold the prefix.
    pub(crate) fn backing_head(&self) -> [u8; 8] {
        let (ptr, base) = self.prefix();
        let n = (base + self.len).min(8);
        let mut head = [0u8; 8];
        // SAFETY: the backing holds base + len bytes from `ptr`; we copy at
        // most 8 of them, and nothing writes them concurrently in this
        // process (`&self`).
        unsafe { std::ptr::copy_nonoverlapping(ptr, head.as_mut_ptr(), n) };
        head
    }

    /// The region's length in bytes.
    #[inline]
    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    /// Checks `off..off+len` against the region and returns it as `usize`s.
    #[inline]
    fn range(&self, what: &'static str, off: u64, len: u64) -> Result<(usize, usize)> {
        let end = off.checked_add(len).filter(|&e| e <= self.len as u64);
        match end {
            // Both fit in usize: end <= self.len, a usize.
            Some(_) => Ok((off as usize, len as usize)),
            None => Err(self.out_of_range(what, off, len)),
        }
    }

    #[cold]
    #[inline(never)]
    fn out_of_range(&self, what: &'static str, off: u64, len: u64) -> Error {
        Error::corrupt(
            what,
            off,
            format!(
                "{len} bytes at this offset run past the end of the region ({} bytes)",
                self.len
            ),
        )
    }

    /// The bytes `off..off+len`, checked.
    #[inline]
    pub(crate) fn bytes(&self, what: &'static str, off: u64, len: u64) -> Result<&[u8]> {
        let (off, len) = self.range(what, off, len)?;
        // SAFETY: off+len <= self.len (checked by `range`), and `ptr` is valid
        // for self.len bytes while `self` is borrowed (module docs).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) })
    }

    /// The bytes `off..off+len` for writing, checked. Writes through the
    /// slice bypass the crash seam; transactions use [`Mem::write`] except for
    /// the `get_mut` accessors, whose ranges are journaled first.
    pub(crate) fn bytes_mut(
        &mut self,
        what: &'static str,
        off: u64,
        len: u64,
    ) -> Result<&mut [u8]> {
        let (off, len) = self.range(what, off, len)?;
        // SAFETY: as in `bytes`; `&mut self` makes the slice unique in this
        // process.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) })
    }

    /// Copies `data` to `off`, checked.
    pub(crate) fn write(&mut self, what: &'static str, off: u64, data: &[u8]) -> Result<()> {
        #[cfg(test)]
        if self.crash_point(off, data)? {
            return Ok(());
        }
        self.bytes_mut(what, off, data.len() as u64)?
            .copy_from_slice(data);
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst` within the region, checked
    /// (the ranges may overlap).
    pub(crate) fn copy_within(
        &mut self,
        what: &'static str,
        src: u64,
        dst: u64,
        len: u64,
    ) -> Result<()> {
        #[cfg(test)]
        if self.crash.is_some() {
            let data = self.bytes(what, src, len)?.to_vec();
            return self.write(what, dst, &data);
        }
        let (src, len) = self.range(what, src, len)?;
        let (dst, _) = self.range(what, dst, len as u64)?;
        // SAFETY: both ranges are inside the region (checked by `range`),
        // `ptr` is valid for reads and writes of the region while `self` is
        // borrowed mutably (module docs), and `ptr::copy` allows overlap.
        unsafe { std::ptr::copy(self.ptr.add(src), self.ptr.add(dst), len) };
        Ok(())
    }

    /// Fills `off..off+len` with zeros, checked.
    pub(crate) fn zero(&mut self, what: &'static str, off: u64, len: u64) -> Result<()> {
        #[cfg(test)]
        if self.crash.is_some() {
            let zeros = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 30)];
            return self.write(what, off, &zeros);
        }
        self.bytes_mut(what, off, len)?.fill(0);
        Ok(())
    }

    /// The 8-byte word at `off` as an atomic (for the commit and lock words).
    pub(crate) fn atomic_u64(&self, off: u64) -> Result<&AtomicU64> {
        let (o, _) = self.range("atomic word", off, 8)?;
        if !o.is_multiple_of(8) {
            return Err(Error::corrupt("atomic word", off, "not 8-byte aligned"));
        }
        // SAFETY: the 8 bytes are in the region (checked) and 8-aligned
        // (checked; the base is 64-aligned). Those words are only ever
        // accessed atomically while the state is open.
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.add(o).cast::<u64>()) })
    }

    /// Stores `value` in the atomic word at `off` with release ordering: the
    /// one store that commits or opens a transaction.
    pub(crate) fn store_word(&mut self, off: u64, value: u64) -> Result<()> {
        #[cfg(test)]
        if self.crash_point(off, &value.to_le_bytes())? {
            return Ok(());
        }
        self.atomic_u64(off)?
            .store(value, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Grows the region to at least `min_len` bytes (and remaps it). A
    /// snapshot-protocol publisher pointing into the old mapping must be
    /// re-attached before it is used again (`TxCore::alloc` does).
    pub(crate) fn grow(&mut self, min_len: u64) -> Result<()> {
        if min_len <= self.len as u64 {
            return Ok(());
        }
        let min_len = min_len.saturating_add(self.base as u64);
        let too_large = || Error::TooLarge {
            what: "region",
            len: min_len,
        };
        if usize::try_from(min_len).is_err() || min_len > isize::MAX as u64 {
            return Err(too_large());
        }
        match &mut self.backing {
            Backing::Heap(v) => {
                let lines = lines_for(min_len as usize);
                v.try_reserve_exact(lines.saturating_sub(v.len()))
                    .map_err(|_| too_large())?;
                v.resize(lines, Line([0; 64]));
            }
            Backing::Shared { fd, map } => {
                *map = fd.map_raw(min_len)?;
            }
            Backing::File { file, map } => {
                file.set_len(min_len)
                    .map_err(|e| Error::io("growing the state file", e))?;
                *map = MmapOptions::new()
                    .map_raw(&*file)
                    .map_err(|e| Error::io("mmap", e))?;
            }
        }
        #[cfg(test)]
        let crash = self.crash.take();
        let backing = std::mem::replace(&mut self.backing, Backing::Heap(Vec::new()));
        *self = Self::from_backing(backing, self.base);
        #[cfg(test)]
        {
            self.crash = crash;
        }
        Ok(())
    }

    /// Flushes a file-backed region to disk (no-op otherwise).
    pub(crate) fn flush(&self) -> Result<()> {
        if let Backing::File { map, .. } = &self.backing {
            map.flush().map_err(|e| Error::io("msync", e))?;
        }
        Ok(())
    }

    /// Gives back the backing.
    pub(crate) fn into_backing(self) -> Backing {
        self.backing
    }

    /// A copy of every byte of the region.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.bytes("region", 0, self.len as u64)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    /// The crash seam: returns true when this write is the torn one (it was
    /// applied partially and the image taken; the rest is skipped).
    #[cfg(test)]
    fn crash_point(&mut self, off: u64, data: &[u8]) -> Result<bool> {
        let Some(plan) = self.crash.as_mut() else {
            return Ok(false);
        };
        if plan.image.is_some() {
            return Ok(false);
        }
        if plan.countdown > 0 {
            plan.countdown -= 1;
            return Ok(false);
        }
        let prefix = plan.torn_prefix.min(data.len());
        let torn = &data[..prefix];
        self.bytes_mut("region", off, torn.len() as u64)?
            .copy_from_slice(torn);
        let image = self.to_vec();
        if let Some(plan) = self.crash.as_mut() {
            plan.image = Some(image);
        }
        // Finish the write so the in-process run can go on.
        self.bytes_mut("region", off, data.len() as u64)?
            .copy_from_slice(data);
        Ok(true)
    }
}

// The region is plain memory owned by this value; moving it to another
// thread moves the ownership with it.
// SAFETY: `Mem` owns its backing; the raw pointer is only used through
// `&self`/`&mut self`, so the usual borrow rules make it as thread-safe as a
// `Vec<u8>`.
unsafe impl Send for Mem {}
