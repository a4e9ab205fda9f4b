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
//! Two parts of the backing are memory other processes write while this one
//! holds the state, and are never behind a slice:
//! - the line of atomic words (`0xC0..0x100`: the commit word and the lock
//!   words), which a second opener reads and claims: reached only through
//!   [`Mem::atomic_u64`] / [`Mem::load_u64`]; [`Mem::bytes`] and
//!   [`Mem::bytes_mut`] refuse any range that overlaps it, and
//!   [`Mem::to_vec`] copies it with atomic loads;
//! - shm-snapshot's header page before the region (with the snapshot
//!   protocol), whose waiters word the snapshotter writes: it is not part
//!   of this mapping at all (the region is mapped from the file offset
//!   after it); the protocol publisher owns a mapping of its own of that
//!   page ([`Mem::header_page`]).
//!
//! Before the lock is held, the header is read only with atomic loads
//! ([`Mem::load_u64`], [`Mem::load_u8`]).
//!
//! With the snapshot protocol on a memfd or file, every write through this
//! module first marks its range in shm-snapshot's dirty map
//! ([`Mem::enable_dirty_map`]), so that an incremental snapshot reads only
//! the cells written since the last one.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{MmapOptions, MmapRaw};
use shm_fd::SharedFd;
use shm_snapshot::{AsRegion, HeapBuffer, MappedRegion};

use crate::error::{Error, Result};
use crate::format::{ATOMIC_END, HEADER_LEN, SHARED_START, TX_WORD, touches_atomics};

/// Where a region lives, as far as the lock is concerned: the device and
/// inode of its memfd or file (`fstat`), or `(0, random)` for a heap
/// buffer, which no other process can reach. A lock taken in one region
/// and found in another (a copy of the bytes) names a holder of other
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    fn of(file: std::os::fd::BorrowedFd<'_>) -> Result<Identity> {
        let st = nix::sys::stat::fstat(file).map_err(|e| Error::io("fstat", e))?;
        Ok(Identity {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    fn private() -> Identity {
        Identity {
            dev: 0,
            ino: crate::owner::random_u64() | 1,
        }
    }

    /// True for a heap buffer's identity.
    pub(crate) fn is_private(&self) -> bool {
        self.dev == 0
    }
}

/// The page before the region that holds shm-snapshot's header (with the
/// snapshot protocol), owned by the protocol publisher: a mapping of its
/// own of the memfd's or file's first page, or the heap buffer's first
/// page, moved out of the heap region.
#[derive(Debug)]
pub(crate) enum HeaderPage {
    Mapped(MappedRegion),
    Heap(HeapBuffer),
}

impl AsRegion for HeaderPage {
    fn as_region(&self) -> shm_snapshot::Region<'_> {
        match self {
            HeaderPage::Mapped(m) => m.as_region(),
            HeaderPage::Heap(h) => h.as_region(),
        }
    }
}

impl HeaderPage {
    /// The page's bytes, read atomically.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let region = self.as_region();
        let mut v = vec![0u8; region.len()];
        region.copy_to(&mut v);
        v
    }

    /// Flushes a file's header page to disk (no-op otherwise).
    pub(crate) fn flush(&self) -> Result<()> {
        if let HeaderPage::Mapped(m) = self {
            m.flush().map_err(|e| Error::io("msync", e))?;
        }
        Ok(())
    }
}

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
    /// `map` is `None` while the memfd holds no region yet (nothing past
    /// the protocol page): nothing to map.
    Shared {
        fd: SharedFd,
        map: Option<MmapRaw>,
    },
    File {
        file: File,
        map: Option<MmapRaw>,
    },
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Heap(v) => write!(f, "Heap({} bytes)", v.len() * 64),
            Backing::Shared { fd, map } => {
                write!(
                    f,
                    "Shared({fd:?}, {} bytes)",
                    map.as_ref().map_or(0, |m| m.len())
                )
            }
            Backing::File { file, map } => {
                write!(
                    f,
                    "File({file:?}, {} bytes)",
                    map.as_ref().map_or(0, |m| m.len())
                )
            }
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
    /// The region: the backing from file offset `base` on (for a mapping,
    /// the mapping itself starts there).
    ptr: *mut u8,
    len: usize,
    /// Bytes of the backing before the region (shm-snapshot's header page
    /// when the snapshot protocol is on, else 0): never mapped here.
    base: usize,
    backing: Backing,
    /// A heap backing's first `base` bytes, until the protocol publisher
    /// takes them ([`Mem::header_page`]).
    heap_prefix: Option<HeapBuffer>,
    identity: Identity,
    /// shm-snapshot's dirty map, when writes are marked in it.
    dirty: Option<Dirty>,
    #[cfg(test)]
    pub crash: Option<CrashPlan>,
}

/// A mapping of the backing's first page (shm-snapshot's header) held for
/// the dirty map, and the map's first word in it.
#[derive(Debug)]
struct Dirty {
    _page: MmapRaw,
    words: *const AtomicU64,
    /// The map's control word (its cell size, or off).
    control: *const AtomicU64,
    /// The memfd bytes the cells cover: past them, the map is enabled
    /// again with larger cells.
    covers: u64,
    /// The scratch range declared (region offset, length): declared again
    /// when the map is enabled again (which clears it).
    scratch: Option<(u64, u64)>,
}

// SAFETY: `words` points into `_page`, a shared mapping owned by the same
// value: valid wherever the value is, and only ever reached through
// atomics.
unsafe impl Send for Dirty {}
// SAFETY: as above; `&Dirty` allows only atomic operations on the words.
unsafe impl Sync for Dirty {}

impl Dirty {
    /// Marks the memfd bytes `at..at+len` (`len > 0`) in the map; cells
    /// past the map are not marked (a snapshotter reads them).
    #[inline(never)]
    fn mark(&self, at: u64, len: u64) {
        // The cells as the map says now: another process sharing the state
        // may have enabled it again with larger ones (it grew the region),
        // or a program that does not mark may have turned it off.
        // SAFETY: `control` points into `_page`, kept mapped with `self`;
        // reached only atomically.
        let control = unsafe { &*self.control }.load(std::sync::atomic::Ordering::Relaxed);
        let Some(shift) = shm_snapshot::control_shift(u64::from_le(control)) else {
            return;
        };
        let last = (at.saturating_add(len - 1) >> shift).min(shm_snapshot::DIRTY_CELLS - 1);
        let mut cell = at >> shift;
        while cell <= last {
            // SAFETY: `cell < DIRTY_CELLS`, so word `cell / 64` is inside the
            // map, which `_page` keeps mapped; other processes change these
            // words too, and this one reaches them only atomically.
            let word = unsafe { &*self.words.add((cell / 64) as usize) };
            let bit = 1u64 << (cell % 64);
            if word.load(std::sync::atomic::Ordering::Relaxed) & bit == 0 {
                // Acquire: no later store of this thread (the write being
                // marked) becomes visible before the bit.
                word.fetch_or(bit, std::sync::atomic::Ordering::Acquire);
            }
            cell += 1;
        }
    }
}

/// Rounds `len` up to whole lines.
fn lines_for(len: usize) -> usize {
    len.div_ceil(64)
}

/// Maps `fd` from file offset `base` to its end `total`; `None` when there
/// is nothing past `base` (the caller refused a backing shorter than it).
fn map_from(fd: std::os::fd::BorrowedFd<'_>, base: usize, total: u64) -> Result<Option<MmapRaw>> {
    let len = total.saturating_sub(base as u64);
    if len == 0 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| Error::TooLarge {
        what: "mapping",
        len: total,
    })?;
    MmapOptions::new()
        .offset(base as u64)
        .len(len)
        .map_raw(&fd)
        .map(Some)
        .map_err(|e| Error::io("mmap", e))
}

impl Mem {
    /// A heap region from `bytes` (the whole backing: with `base > 0`, its
    /// first `base` bytes are the protocol page, kept aside), grown with
    /// zeros to at least `min_len` region bytes.
    pub(crate) fn heap(mut bytes: Vec<u8>, min_len: u64, base: usize) -> Result<Mem> {
        let heap_prefix = (base > 0).then(|| {
            let prefix = HeapBuffer::new(base);
            let n = bytes.len().min(base);
            prefix.region().write(0, &bytes[..n]);
            prefix
        });
        bytes.drain(..bytes.len().min(base));
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
        let mut mem = Self::from_backing(Backing::Heap(buf), base, Identity::private());
        mem.heap_prefix = heap_prefix;
        #[cfg(test)]
        {
            mem.crash = NEXT_PLAN.with(|p| p.borrow_mut().take());
        }
        Ok(mem)
    }

    /// An empty region (what a closed state leaves behind).
    pub(crate) fn empty() -> Mem {
        Self::from_backing(Backing::Heap(Vec::new()), 0, Identity::private())
    }

    /// Maps the memfd from `base` on. An empty one is grown to
    /// `base + min_len` bytes; one that holds data is mapped as it is (a
    /// refused open must not grow it), an empty region (just the protocol
    /// page) not at all, until [`Mem::grow_blank`]. The caller has refused a
    /// non-empty memfd shorter than `base`.
    pub(crate) fn shared(fd: SharedFd, min_len: u64, base: usize) -> Result<Mem> {
        let mut total = fd.len()?;
        if total == 0 {
            total = fd.grow_to((base as u64).saturating_add(min_len.max(1)))?;
        }
        let identity = Identity::of(fd.as_fd())?;
        let map = map_from(fd.as_fd(), base, total)?;
        Ok(Self::from_backing(
            Backing::Shared { fd, map },
            base,
            identity,
        ))
    }

    /// Maps the file from `base` on, as [`Mem::shared`] does a memfd.
    pub(crate) fn file(file: File, min_len: u64, base: usize) -> Result<Mem> {
        let mut total = file_len(&file)?;
        if total == 0 {
            let want = (base as u64).saturating_add(min_len.max(1));
            grow_file_no_shrink(&file, want)?;
            total = file_len(&file)?;
        }
        let identity = Identity::of(file.as_fd())?;
        let map = map_from(file.as_fd(), base, total)?;
        Ok(Self::from_backing(
            Backing::File { file, map },
            base,
            identity,
        ))
    }

    fn from_backing(mut backing: Backing, base: usize, identity: Identity) -> Mem {
        let (ptr, len) = match &mut backing {
            Backing::Heap(v) => (v.as_mut_ptr().cast::<u8>(), v.len() * 64),
            Backing::Shared { map: Some(map), .. } | Backing::File { map: Some(map), .. } => {
                (map.as_mut_ptr(), map.len())
            }
            // Nothing mapped: an empty region at a dangling, line-aligned
            // address (no offset is ever in range of it).
            Backing::Shared { map: None, .. } | Backing::File { map: None, .. } => (
                std::ptr::NonNull::<Line>::dangling().as_ptr().cast::<u8>(),
                0,
            ),
        };
        Mem {
            ptr,
            len,
            base,
            backing,
            heap_prefix: None,
            identity,
            dirty: None,
            #[cfg(test)]
            crash: None,
        }
    }

    /// Turns on shm-snapshot's dirty map in the backing's first page (the
    /// protocol header, which the publisher has opened) and marks every
    /// write from now on. Nothing for a heap buffer or a region without
    /// the protocol page.
    pub(crate) fn enable_dirty_map(&mut self) -> Result<()> {
        if self.base < shm_snapshot::HEADER_LEN {
            return Ok(());
        }
        let fd = match &self.backing {
            Backing::Heap(_) => return Ok(()),
            Backing::Shared { fd, .. } => fd.as_fd(),
            Backing::File { file, .. } => file.as_fd(),
        };
        let page = MmapOptions::new()
            .len(shm_snapshot::HEADER_LEN)
            .map_raw(&fd)
            .map_err(|e| Error::io("mmap of the protocol page", e))?;
        let region = shm_snapshot::Region::try_from_mmap(&page)
            .map_err(|e| Error::io("mmap of the protocol page", e))?;
        let total = self.base as u64 + self.len as u64;
        let Some(map) = shm_snapshot::DirtyMap::enable(region, total) else {
            return Ok(());
        };
        let shift = map.shift();
        // SAFETY: the page is HEADER_LEN bytes, page-aligned, and the map
        // (`OFF_DIRTY_MAP..HEADER_LEN`) lies inside it, 8-aligned.
        let words = unsafe { page.as_ptr().add(shm_snapshot::OFF_DIRTY_MAP) }.cast::<AtomicU64>();
        // SAFETY: as above, for the 8-aligned control word at OFF_DIRTY.
        let control = unsafe { page.as_ptr().add(shm_snapshot::OFF_DIRTY) }.cast::<AtomicU64>();
        let scratch = self.dirty.as_ref().and_then(|d| d.scratch);
        self.dirty = Some(Dirty {
            _page: page,
            words,
            control,
            covers: shm_snapshot::DIRTY_CELLS << shift,
            scratch: None,
        });
        if let Some((off, len)) = scratch {
            self.declare_scratch(off, len)?;
        }
        Ok(())
    }

    /// After the region grew: a dirty map whose cells no longer cover it
    /// is enabled again with larger cells (every bit set: a snapshotter
    /// reads everything once). Other processes sharing the state take the
    /// new cells up when they map the grown region, before they write.
    fn grow_dirty_map(&mut self) -> Result<()> {
        let total = self.base as u64 + self.len as u64;
        if self.dirty.as_ref().is_some_and(|d| total > d.covers) {
            // Replaces the map only once the new one is on: until then the
            // old cells stay marked (the snapshotter reads past them).
            self.enable_dirty_map()?;
        }
        Ok(())
    }

    /// Marks the region's bytes `off..off+len` in the dirty map (before
    /// they are written); cells past the map are not marked (a
    /// snapshotter reads them).
    #[inline(always)]
    fn mark(&self, off: u64, len: u64) {
        // Only the check inline: without a dirty map (the common case) a
        // write pays one test; the marking itself is out of line.
        if let Some(d) = &self.dirty
            && len != 0
        {
            d.mark(self.base as u64 + off, len);
        }
    }

    /// Declares the region's bytes `off..off+len` scratch in the dirty map
    /// (the undo journal: meaningless between transactions), so a snapshot
    /// taken between transactions need not copy them again
    /// ([`shm_snapshot::DirtyMap::declare_scratch`]). Nothing without a
    /// dirty map.
    pub(crate) fn declare_scratch(&mut self, off: u64, len: u64) -> Result<()> {
        let base = self.base as u64;
        let Some(d) = &mut self.dirty else {
            return Ok(());
        };
        d.scratch = Some((off, len));
        let region = shm_snapshot::Region::try_from_mmap(&d._page)
            .map_err(|e| Error::io("mmap of the protocol page", e))?;
        if let Some(map) = shm_snapshot::DirtyMap::attach(region) {
            map.declare_scratch(base + off, len);
        }
        Ok(())
    }

    /// Marks `off..off+len` as written for a write that does not go through
    /// this module (a published value's slots, written through a
    /// [`shm_snapshot::Region`]).
    #[inline]
    pub(crate) fn mark_written(&self, off: u64, len: u64) {
        self.mark(off, len);
    }

    /// Where the region lives (see [`Identity`]).
    pub(crate) fn identity(&self) -> Identity {
        self.identity
    }

    /// The bytes before the region as memory of their own, for the
    /// protocol publisher to own: a new mapping of the memfd's or file's
    /// first `base` bytes, or the heap buffer's (taken: at most once).
    pub(crate) fn header_page(&mut self) -> Result<HeaderPage> {
        let map = |fd: std::os::fd::BorrowedFd<'_>| -> Result<HeaderPage> {
            let map = MmapOptions::new()
                .len(self.base)
                .map_raw(&fd)
                .map_err(|e| Error::io("mmap of the protocol page", e))?;
            let region =
                MappedRegion::new(map).map_err(|e| Error::io("mmap of the protocol page", e))?;
            Ok(HeaderPage::Mapped(region))
        };
        match &self.backing {
            Backing::Heap(_) => self
                .heap_prefix
                .take()
                .map(HeaderPage::Heap)
                .ok_or_else(|| Error::unsupported("the heap's protocol page is taken already")),
            Backing::Shared { fd, .. } => map(fd.as_fd()),
            Backing::File { file, .. } => map(file.as_fd()),
        }
    }

    /// A mapping of its own of the region's first page (the header), for a
    /// shared state's writer lock and peer table: it never moves when the
    /// region is remapped, so the kernel's robust list and other threads
    /// can keep its addresses. `None` for a heap buffer.
    pub(crate) fn map_header(&self) -> Result<Option<MmapRaw>> {
        let fd = match &self.backing {
            Backing::Heap(_) => return Ok(None),
            Backing::Shared { fd, .. } => fd.as_fd(),
            Backing::File { file, .. } => file.as_fd(),
        };
        MmapOptions::new()
            .offset(self.base as u64)
            .len(HEADER_LEN as usize)
            .map_raw(&fd)
            .map(Some)
            .map_err(|e| Error::io("mmap of the header page", e))
    }

    /// The region as a [`shm_snapshot::Region`]: atomic access only, for
    /// reading while other processes write (a shared state's readers).
    ///
    /// # Safety
    ///
    /// While the returned region lives, this process must not reach the
    /// memory other than through it (no slice from [`Mem::bytes`] and the
    /// like, no other handle on the same memory).
    pub(crate) unsafe fn shared_region(&self) -> shm_snapshot::Region<'_> {
        // SAFETY: `ptr` is valid for reads and writes of `len` bytes while
        // `self` is borrowed (module docs) and 8-aligned (a mapping at a
        // page offset, or a Vec of 64-aligned lines); the caller promises
        // that this process accesses it only atomically meanwhile.
        unsafe { shm_snapshot::Region::from_raw_parts(self.ptr, self.len) }
    }

    /// A heap backing's protocol page, if no publisher took it.
    pub(crate) fn take_heap_prefix(&mut self) -> Option<HeapBuffer> {
        self.heap_prefix.take()
    }

    /// The region's length in bytes.
    #[inline]
    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    /// Checks `off..off+len` against the region and returns it as `usize`s.
    #[inline(always)]
    fn range(&self, what: &'static str, off: u64, len: u64) -> Result<(usize, usize)> {
        let end = off.checked_add(len).filter(|&e| e <= self.len as u64);
        match end {
            // Both fit in usize: end <= self.len, a usize.
            Some(_) => Ok((off as usize, len as usize)),
            None => Err(self.out_of_range(what, off, len)),
        }
    }

    /// [`Mem::range`] for a slice: also refuses the atomic words' line,
    /// which other processes access while we hold the state.
    #[inline(always)]
    fn slice_range(&self, what: &'static str, off: u64, len: u64) -> Result<(usize, usize)> {
        let r = self.range(what, off, len)?;
        if touches_atomics(off, len) {
            return Err(overlaps_atomics(what, off, len));
        }
        Ok(r)
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

    /// The bytes `off..off+len`, checked (never the atomic words).
    #[inline(always)]
    pub(crate) fn bytes(&self, what: &'static str, off: u64, len: u64) -> Result<&[u8]> {
        let (off, len) = self.slice_range(what, off, len)?;
        // SAFETY: off+len <= self.len (checked by `range`), and `ptr` is valid
        // for self.len bytes while `self` is borrowed (module docs); the
        // range does not overlap the atomic words, the only bytes of the
        // region another process changes while we hold the state.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) })
    }

    /// The bytes `off..off+len` for writing, checked. Writes through the
    /// slice bypass the crash seam; transactions use [`Mem::write`] except for
    /// the `get_mut` accessors, whose ranges are journaled first.
    #[inline(always)]
    pub(crate) fn bytes_mut(
        &mut self,
        what: &'static str,
        off: u64,
        len: u64,
    ) -> Result<&mut [u8]> {
        let (off, len) = self.slice_range(what, off, len)?;
        self.mark(off as u64, len as u64);
        // SAFETY: as in `bytes`; `&mut self` makes the slice unique in this
        // process.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) })
    }

    /// The bytes `src..src+src_len` for reading and `dst..dst+dst_len` for
    /// writing at once, checked like [`Mem::bytes`] and [`Mem::bytes_mut`]
    /// and refused when they overlap. Writes through the second slice
    /// bypass the crash seam, like [`Mem::bytes_mut`]'s: for memory that
    /// is not part of the committed state (a table being built in a block
    /// allocated by this transaction).
    pub(crate) fn split_pair(
        &mut self,
        what: &'static str,
        (src, src_len): (u64, u64),
        (dst, dst_len): (u64, u64),
    ) -> Result<(&[u8], &mut [u8])> {
        let (s, sl) = self.slice_range(what, src, src_len)?;
        let (d, dl) = self.slice_range(what, dst, dst_len)?;
        // Both ends fit in usize (checked against the region's length).
        if s < d + dl && d < s + sl && sl != 0 && dl != 0 {
            return Err(Error::corrupt(
                what,
                dst,
                format!("{dl} bytes overlap the {sl} bytes read at {src:#x}"),
            ));
        }
        self.mark(dst, dst_len);
        // SAFETY: both ranges are inside the region and off the atomic
        // words (`slice_range`), and they do not overlap (checked above),
        // so the shared and the mutable slice never alias; `&mut self`
        // makes them the only slices of the region in this process while
        // they live (module docs).
        unsafe {
            Ok((
                std::slice::from_raw_parts(self.ptr.add(s), sl),
                std::slice::from_raw_parts_mut(self.ptr.add(d), dl),
            ))
        }
    }

    /// Copies `data` to `off`, checked.
    #[inline(always)]
    pub(crate) fn write(&mut self, what: &'static str, off: u64, data: &[u8]) -> Result<()> {
        #[cfg(test)]
        if self.crash_point(off, data)? {
            return Ok(());
        }
        self.bytes_mut(what, off, data.len() as u64)?
            .copy_from_slice(data);
        Ok(())
    }

    /// Writes `len` bytes at `off` that `fill` produces, checked: what
    /// [`Mem::write`] of those bytes does, without a buffer in between
    /// (a caller that stores words from registers straight into the
    /// region: a copy's wide loads of a buffer's narrow stores would stall
    /// on store forwarding). `fill` gets the range, contents unspecified,
    /// and must set every byte.
    #[inline(always)]
    pub(crate) fn write_with(
        &mut self,
        what: &'static str,
        off: u64,
        len: u64,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        #[cfg(test)]
        if self.crash.is_some() {
            // The crash seam sees one write of the whole range.
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 30)];
            fill(&mut buf);
            return self.write(what, off, &buf);
        }
        fill(self.bytes_mut(what, off, len)?);
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst` within the region, checked
    /// (the ranges may overlap).
    #[inline]
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
        let (src, len) = self.slice_range(what, src, len)?;
        let (dst, _) = self.slice_range(what, dst, len as u64)?;
        self.mark(dst as u64, len as u64);
        // SAFETY: both ranges are inside the region and off the atomic words
        // (checked by `slice_range`), `ptr` is valid for reads and writes of
        // the region while `self` is borrowed mutably (module docs), and
        // `ptr::copy` allows overlap.
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
    #[inline(always)]
    pub(crate) fn atomic_u64(&self, off: u64) -> Result<&AtomicU64> {
        let (o, _) = self.range("atomic word", off, 8)?;
        if !o.is_multiple_of(8) {
            return Err(Error::corrupt("atomic word", off, "not 8-byte aligned"));
        }
        // SAFETY: the 8 bytes are in the region (checked) and 8-aligned
        // (checked; the region starts 64-aligned: a mapping at a page
        // offset, or a Vec of 64-aligned lines), and valid while `self` is
        // borrowed (module docs). Other processes may access them at the
        // same time, which atomics allow. In this process the commit and lock
        // words are accessed only atomically (`bytes` refuses them); other
        // words are read this way only while no `&mut` slice of them exists
        // (`&self`).
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.add(o).cast::<u64>()) })
    }

    /// The 4-byte word at `off` as an atomic (a futex word: the low half of
    /// a ring's head or tail, see `shared::rings`).
    #[inline]
    pub(crate) fn atomic_u32(&self, off: u64) -> Result<&AtomicU32> {
        let (o, _) = self.range("atomic word", off, 4)?;
        if !o.is_multiple_of(4) {
            return Err(Error::corrupt("atomic word", off, "not 4-byte aligned"));
        }
        // SAFETY: as in `atomic_u64`, for 4 bytes in the region, 4-aligned
        // (both checked), read or written only atomically by this process
        // while `self` is borrowed shared (no `&mut` slice of them exists).
        Ok(unsafe { AtomicU32::from_ptr(self.ptr.add(o).cast::<u32>()) })
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
    #[inline(always)]
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
        self.mark(off, 8);
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
        self.remap(now)
    }

    /// Maps a memfd or file backing again, `total` bytes long.
    fn remap(&mut self, total: u64) -> Result<()> {
        let base = self.base;
        match &mut self.backing {
            Backing::Heap(_) => {}
            Backing::Shared { fd, map } => *map = map_from(fd.as_fd(), base, total)?,
            Backing::File { file, map } => *map = map_from(file.as_fd(), base, total)?,
        }
        self.rebuild();
        Ok(())
    }

    /// Re-derives `ptr` and `len` from the backing after a remap.
    fn rebuild(&mut self) {
        #[cfg(test)]
        let crash = self.crash.take();
        let backing = std::mem::replace(&mut self.backing, Backing::Heap(Vec::new()));
        let heap_prefix = self.heap_prefix.take();
        let dirty = self.dirty.take();
        *self = Self::from_backing(backing, self.base, self.identity);
        self.heap_prefix = heap_prefix;
        self.dirty = dirty;
        // Best effort: a map that cannot be enabled again is left with
        // its cells (the snapshotter reads the cells past them).
        let _ = self.grow_dirty_map();
        #[cfg(test)]
        {
            self.crash = crash;
        }
    }

    /// Grows the region to at least `min_len` bytes (and remaps it).
    pub(crate) fn grow(&mut self, min_len: u64) -> Result<()> {
        if min_len <= self.len as u64 {
            return Ok(());
        }
        let total = min_len.saturating_add(self.base as u64);
        let too_large = || Error::TooLarge {
            what: "region",
            len: total,
        };
        if usize::try_from(total).is_err() || total > MAX_BACKING {
            return Err(too_large());
        }
        let total = match &mut self.backing {
            Backing::Heap(v) => {
                let lines = lines_for(min_len as usize);
                v.try_reserve_exact(lines.saturating_sub(v.len()))
                    .map_err(|_| too_large())?;
                v.resize(lines, Line([0; 64]));
                self.rebuild();
                return Ok(());
            }
            Backing::Shared { fd, .. } => fd.grow_to(total)?,
            Backing::File { file, .. } => {
                // Never shrink: another opener may have grown the file
                // since this mapping was made.
                if file_len(file)? < total {
                    file.set_len(total)
                        .map_err(|e| Error::io("growing the state file", e))?;
                }
                file_len(file)?
            }
        };
        self.remap(total)
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
        if let Backing::File { map: Some(map), .. } = &self.backing {
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
        let len = self.len as u64;
        let mut v = Vec::with_capacity(self.len);
        let mut off = 0;
        // Plain bytes up to each atomic range, then that range word by word.
        for (start, end) in [(TX_WORD, ATOMIC_END), (SHARED_START, HEADER_LEN)] {
            let cut = len.min(start);
            if off < cut
                && let Ok(b) = self.bytes("region", off, cut - off)
            {
                v.extend_from_slice(b);
            }
            off = cut.max(off);
            while off < end && off + 8 <= len {
                let w = self.load_u64(off).unwrap_or(0);
                v.extend_from_slice(&w.to_le_bytes());
                off += 8;
            }
            while off < end.min(len) {
                v.push(self.load_u8(off).unwrap_or(0));
                off += 1;
            }
        }
        if off < len
            && let Ok(rest) = self.bytes("region", off, len - off)
        {
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

/// The largest backing shm-state maps: offsets stored in the region (free
/// list heads, block offsets) keep their top 16 bits for checks.
pub(crate) const MAX_BACKING: u64 = 1 << 48;

#[cold]
#[inline(never)]
fn overlaps_atomics(what: &'static str, off: u64, len: u64) -> Error {
    Error::corrupt(
        what,
        off,
        format!(
            "{len} bytes at this offset overlap the commit and lock words, the shared line or the peer table"
        ),
    )
}

// The region is plain memory owned by this value; moving it to another
// thread moves the ownership with it.
// SAFETY: `Mem` owns its backing; the raw pointer is only used through
// `&self`/`&mut self`, so the usual borrow rules make it as thread-safe as a
// `Vec<u8>`.
unsafe impl Send for Mem {}

#[cfg(test)]
mod tests {
    use super::*;

    /// `split_pair` gives the two ranges when they are apart (touching
    /// included) and refuses any overlap, the atomic words and a range past
    /// the end.
    #[test]
    fn split_pair_refuses_overlap() {
        let base = HEADER_LEN;
        let mut bytes = vec![0u8; (base + 256) as usize];
        bytes[base as usize..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        let mut mem = Mem::heap(bytes, 0, 0).unwrap();
        let (src, dst) = mem.split_pair("t", (base, 64), (base + 64, 64)).unwrap();
        assert_eq!(src[5], 5);
        dst.copy_from_slice(src);
        assert_eq!(mem.bytes("t", base + 64, 64).unwrap()[5], 5);
        // Empty ranges overlap nothing.
        assert!(mem.split_pair("t", (0, 0), (base, 16)).is_ok());
        for (s, d) in [
            ((base, 64), (base + 63, 8)),
            ((base + 8, 8), (base, 64)),
            ((base, 64), (base, 64)),
        ] {
            let e = mem.split_pair("t", s, d).unwrap_err().to_string();
            assert!(e.contains("overlap"), "{s:?} {d:?}: {e}");
        }
        assert!(mem.split_pair("t", (base, 8), (TX_WORD, 8)).is_err());
        assert!(mem.split_pair("t", (base, 8), (base + 250, 8)).is_err());
        assert_eq!(mem.bytes("t", base + 63, 1).unwrap()[0], 63);
    }
}
