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
//!
//! The commit word and the lock words (`0xC0..0xE0`) may be read or written
//! by another process at any time (a second opener trying the lock), so
//! this process accesses them only through [`Mem::atomic_u64`] and
//! [`Mem::load_u64`]; slices never cover them except in [`Mem::to_vec`],
//! which copies them with atomic loads. Before the lock is held, the header
//! is read only with atomic loads ([`Mem::load_u64`], [`Mem::load_u8`]).

use std::fs::File;
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};
use shm_fd::SharedFd;

use crate::error::{Error, Result};
use crate::format::{ATOMIC_END, TX_WORD};

fn file_len(file: &File) -> Result<u64> {
    Ok(file.metadata().map_err(|e| Error::io("fstat", e))?.len())
}

/// Grows a file to at least `len` bytes without ever shrinking it, even if
/// another process grows it at the same time (`posix_fallocate`).
fn grow_file_no_shrink(file: &File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let too_large = || Error::TooLarge {
        what: "state file",
        len,
    };
    let len = libc::off_t::try_from(len).map_err(|_| too_large())?;
    // SAFETY: a plain system call on an fd we own; it never shrinks a file.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(Error::io(
            "growing the state file",
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

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

#[cfg(test)]
thread_local! {
    /// A crash plan for the next heap region made on this thread, so that a
    /// test can crash `State::open` itself (creation, recovery, migration).
    pub(crate) static NEXT_PLAN: std::cell::RefCell<Option<CrashPlan>> =
        const { std::cell::RefCell::new(None) };
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
        #[allow(unused_mut)]
        let mut mem = Self::from_backing(Backing::Heap(buf), base);
        #[cfg(test)]
        {
            mem.crash = NEXT_PLAN.with(|p| p.borrow_mut().take());
        }
        Ok(mem)
    }

    /// An empty region (what a closed state leaves behind).
    pub(crate) fn empty() -> Mem {
        Self::from_backing(Backing::Heap(Vec::new()), 0)
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
        let len = file_len(&file)?;
        if len == 0 {
            grow_file_no_shrink(&file, min_len.max(1))?;
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

    /// The 8-byte word at `off` as an atomic (for the commit and lock words,
    /// and for reading the header before the lock is held).
    pub(crate) fn atomic_u64(&self, off: u64) -> Result<&AtomicU64> {
        let (o, _) = self.range("atomic word", off, 8)?;
        if !o.is_multiple_of(8) {
            return Err(Error::corrupt("atomic word", off, "not 8-byte aligned"));
        }
        // SAFETY: the 8 bytes are in the region (checked) and 8-aligned
        // (checked; the base is 64-aligned), and valid while `self` is
        // borrowed (module docs). Other processes may access them at the
        // same time, which atomics allow. In this process the commit and lock
        // words are accessed only atomically (module docs); other words are
        // read this way only while no `&mut` slice of them exists (`&self`).
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.add(o).cast::<u64>()) })
    }

    /// An atomic (acquire) load of the little-endian word at `off`.
    pub(crate) fn load_u64(&self, off: u64) -> Result<u64> {
        Ok(u64::from_le(
            self.atomic_u64(off)?
                .load(std::sync::atomic::Ordering::Acquire),
        ))
    }

    /// An atomic load of the byte at `off` (for a region too short to hold
    /// whole words, read before the lock).
    pub(crate) fn load_u8(&self, off: u64) -> Result<u8> {
        let (o, _) = self.range("byte", off, 1)?;
        // SAFETY: the byte is in the region (checked) and valid while `self`
        // is borrowed; an atomic byte has no alignment requirement, and the
        // access is atomic so other processes may write it meanwhile.
        let b = unsafe { std::sync::atomic::AtomicU8::from_ptr(self.ptr.add(o)) };
        Ok(b.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Stores `value` in the atomic word at `off` with release ordering: the
    /// stores that open and commit a transaction, and the magic. An aligned
    /// 8-byte store is never torn, so the crash seam applies it whole or not.
    pub(crate) fn store_word(&mut self, off: u64, value: u64) -> Result<()> {
        #[cfg(test)]
        if let Some(plan) = self.crash.as_mut()
            && plan.image.is_none()
        {
            if plan.countdown > 0 {
                plan.countdown -= 1;
            } else {
                let whole = plan.torn_prefix >= 8;
                if whole {
                    self.atomic_u64(off)?
                        .store(value, std::sync::atomic::Ordering::Release);
                }
                let image = self.to_vec();
                if let Some(plan) = self.crash.as_mut() {
                    plan.image = Some(image);
                }
            }
        }
        self.atomic_u64(off)?
            .store(value, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Maps the backing again at its current size if it grew (another
    /// process may have grown a shared memfd or file since it was mapped).
    pub(crate) fn refresh(&mut self) -> Result<()> {
        let mapped = (self.base + self.len) as u64;
        let now = match &self.backing {
            Backing::Heap(_) => return Ok(()),
            Backing::Shared { fd, .. } => fd.len()?,
            Backing::File { file, .. } => file_len(file)?,
        };
        if now <= mapped {
            return Ok(());
        }
        match &mut self.backing {
            Backing::Heap(_) => {}
            Backing::Shared { fd, map } => *map = fd.map_raw(1)?,
            Backing::File { file, map } => {
                *map = MmapOptions::new()
                    .map_raw(&*file)
                    .map_err(|e| Error::io("mmap", e))?
            }
        }
        self.rebuild();
        Ok(())
    }

    /// Re-derives `ptr` and `len` from the backing after a remap.
    fn rebuild(&mut self) {
        #[cfg(test)]
        let crash = self.crash.take();
        let backing = std::mem::replace(&mut self.backing, Backing::Heap(Vec::new()));
        *self = Self::from_backing(backing, self.base);
        #[cfg(test)]
        {
            self.crash = crash;
        }
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
                // Never shrink: another opener may have grown the file
                // since this mapping was made.
                if file_len(file)? < min_len {
                    file.set_len(min_len)
                        .map_err(|e| Error::io("growing the state file", e))?;
                }
                *map = MmapOptions::new()
                    .map_raw(&*file)
                    .map_err(|e| Error::io("mmap", e))?;
            }
        }
        self.rebuild();
        Ok(())
    }

    /// Grows a blank region that is too short to hold the lock words to
    /// `min_len` bytes, before the lock is taken: never shrinks the backing
    /// (a concurrent opener may be growing it too).
    pub(crate) fn grow_blank(&mut self, min_len: u64) -> Result<()> {
        if let Backing::File { file, .. } = &self.backing {
            grow_file_no_shrink(file, min_len.saturating_add(self.base as u64))?;
            return self.refresh();
        }
        // A memfd only grows (`SharedFd::grow_to`), a heap is ours alone.
        self.grow(min_len)
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

    /// A copy of every byte of the region; the commit and lock words are
    /// copied with atomic loads.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let Ok(mut v) = self.bytes("region", 0, self.len as u64).map(|b| {
            let mut v = Vec::with_capacity(b.len());
            let cut = b.len().min(TX_WORD as usize);
            v.extend_from_slice(&b[..cut]);
            v
        }) else {
            return Vec::new();
        };
        let mut off = v.len() as u64;
        while off < ATOMIC_END && off + 8 <= self.len as u64 {
            let w = self.load_u64(off).unwrap_or(0);
            v.extend_from_slice(&w.to_le_bytes());
            off += 8;
        }
        if let Ok(rest) = self.bytes("region", off, self.len as u64 - off) {
            v.extend_from_slice(rest);
        }
        v
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
