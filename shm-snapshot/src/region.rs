//! [`Region`]: memory another process may change under us, seen only
//! through atomic loads and stores, and [`HeapBuffer`], the same on the heap
//! for tests and model checking.
//!
//! Shared memory is never turned into `&[u8]` here: a reference promises
//! the bytes do not change, and another process writing them would make
//! that undefined behaviour. Every access goes through `AtomicU64` (whole
//! words) or `AtomicU8` (the bytes after the last whole word), always with
//! the same access size at the same address — except one *narrow* word a
//! region may mark (`Region::narrowed`), which is only ever accessed as two
//! 4-byte halves (the protocol's futex word: the kernel's futex reads 4
//! bytes, and Rust's memory model does not allow racing atomic accesses of
//! different sizes).

use std::fmt;

use crate::sync::{AtomicU8, AtomicU64, Ordering};

/// A view of shared memory as atomic cells: whole 64-bit words, then up to
/// seven trailing bytes.
///
/// One word is special: bytes 80..88 of a region made from scratch
/// ([`Region::from_raw_parts`], [`Region::from_mmap`], [`HeapBuffer::region`];
/// a [`Region::subregion`] keeps it where it lies) are the protocol's futex
/// word ([`crate::OFF_WAKE`]) and are only ever accessed as two 4-byte
/// halves: the kernel's futex reads 4 bytes, and Rust's memory model does
/// not allow racing atomic accesses of different sizes. Reads and writes
/// through the region take those bytes half by half; they hold the same
/// bytes either way. (Code of your own that reaches the same memory other
/// than through a `Region` must not access those 8 bytes as one word while
/// a publisher runs.)
///
/// Loads and stores are `Relaxed`; ordering between them is the protocol's
/// job (see [`crate::Publisher`] and [`crate::try_copy_consistent`]).
/// Offsets are in bytes from the start of the region. Methods that take an
/// offset panic when it is out of range or misaligned, like slice indexing:
/// offsets come from the caller's own layout, never from shared memory.
///
/// # Truncation
///
/// Accessing a mapped page that lies past the end of the file raises
/// `SIGBUS`, which kills the process: that is why memmap2 makes mapping a
/// file `unsafe` for slices, and it holds for a `Region` too. A memfd
/// sealed against shrinking (`F_SEAL_SHRINK`, shm-fd's default) cannot be
/// truncated; with an unsealed memfd, a peer process that truncates it
/// below the mapping makes the next access here crash. Nothing a peer
/// *writes* can cause undefined behaviour, only truncation can crash.
#[derive(Clone, Copy)]
pub struct Region<'a> {
    words: &'a [AtomicU64],
    tail: &'a [AtomicU8],
    /// The index of the word accessed only in 4-byte halves, if any.
    narrow: Option<usize>,
}

impl fmt::Debug for Region<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region").field("len", &self.len()).finish()
    }
}

impl<'a> Region<'a> {
    /// A region over `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// - `ptr` is aligned to 8 bytes and valid for reads and writes of
    ///   `len` bytes for the whole lifetime `'a` (e.g. a live mapping that
    ///   is not truncated below `len`);
    /// - during `'a`, this process accesses those bytes only atomically
    ///   (through this or another `Region`), never through `&[u8]`,
    ///   `&mut [u8]` or plain pointer reads and writes. Other processes are
    ///   outside Rust's model and may do as they like.
    #[cfg(not(loom))]
    #[inline]
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Region<'a> {
        debug_assert!((ptr as usize) & 7 == 0, "region pointer not 8-aligned");
        let words = len / 8;
        // SAFETY: the caller guarantees `ptr` is 8-aligned and valid for
        // `len` bytes during 'a, and only accessed atomically in this
        // process; AtomicU64 has the size and alignment of u64, so the first
        // `len / 8` words are valid `AtomicU64` cells.
        let word_cells = unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), words) };
        // SAFETY: the remaining `len % 8` bytes are inside the caller's
        // `len`; AtomicU8 has the layout of u8 (alignment 1).
        let tail =
            unsafe { std::slice::from_raw_parts(ptr.add(words * 8).cast::<AtomicU8>(), len % 8) };
        Region {
            words: word_cells,
            tail,
            narrow: narrow_word(words),
        }
    }

    /// A region over a whole [`memmap2::MmapRaw`] mapping (such as
    /// shm-fd's `SharedFd::map_raw` returns).
    ///
    /// Panics when the mapping cannot be made writable (a read-only fd):
    /// a `Region` can store, and a store into read-only memory would crash.
    /// [`Region::try_from_mmap`] returns that as an error instead.
    #[cfg(not(loom))]
    pub fn from_mmap(map: &'a memmap2::MmapRaw) -> Region<'a> {
        match Region::try_from_mmap(map) {
            Ok(r) => r,
            Err(e) => panic!("Region::from_mmap needs a writable shared mapping: {e}"),
        }
    }

    /// A region over a whole [`memmap2::MmapRaw`] mapping, which is made
    /// readable and writable (`mprotect`) first; fails when it cannot be
    /// (the file is open read-only or sealed against writes), or when the
    /// mapping does not start 8-aligned (mapped at a file offset that is
    /// not a multiple of 8): [`std::io::ErrorKind::InvalidInput`].
    ///
    /// `MmapRaw` only hands out raw pointers, so as long as nothing in this
    /// process turns the mapping into slices behind our back (which would
    /// need `unsafe` code of its own), atomic access is sound. The memfd
    /// must stay at least as long as the mapping (see the type's docs on
    /// truncation).
    #[cfg(not(loom))]
    pub fn try_from_mmap(map: &'a memmap2::MmapRaw) -> std::io::Result<Region<'a>> {
        let ptr = map.as_mut_ptr();
        // memmap2 maps from the page below the requested file offset and
        // returns the address of that offset, so the pointer is only as
        // aligned as the offset: check it (for empty mappings too).
        if ptr.is_null() || (ptr as usize) & 7 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "mapping at {ptr:p} is not 8-aligned (map the memfd at an offset that is a multiple of 8)"
                ),
            ));
        }
        if map.len() > 0 {
            let page = page_size();
            let below = (ptr as usize) % page;
            let start = ptr.wrapping_sub(below);
            // SAFETY: the range runs from the start of the page holding
            // `ptr` (memmap2 mapped from that page boundary, so it is part
            // of this mapping) to the mapping's end; read+write is what
            // every Region access needs, and for a mapping that already has
            // it nothing changes.
            let r = unsafe {
                libc::mprotect(
                    start.cast(),
                    map.len() + below,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: `ptr` is non-null and 8-aligned (checked above) and valid
        // for reads and (made so just above) writes of `map.len()` bytes
        // while `map` lives ('a), given the memfd is not truncated under
        // it (documented at the type); MmapRaw gives out only raw
        // pointers, so any non-atomic access in this process would be the
        // caller's own unsafe code, which must respect the mapping being
        // shared (documented above).
        Ok(unsafe { Region::from_raw_parts(ptr, map.len()) })
    }

    /// The length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.words.len() * 8 + self.tail.len()
    }

    /// True when the region holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part of this region from `offset` on, `len` bytes long, or `None`
    /// when it does not fit, `offset` is not a multiple of 8, or `len` is
    /// not a multiple of 8 without reaching the end of the region.
    pub fn subregion(&self, offset: usize, len: usize) -> Option<Region<'a>> {
        let end = offset.checked_add(len)?;
        if offset & 7 != 0 || end > self.len() {
            return None;
        }
        let first = offset / 8;
        let words = if end == self.len() {
            self.words.len() - first
        } else if len & 7 != 0 {
            return None;
        } else {
            len / 8
        };
        Some(Region {
            words: &self.words[first..first + words],
            tail: if end == self.len() { self.tail } else { &[] },
            narrow: self
                .narrow
                .and_then(|n| n.checked_sub(first))
                .filter(|&n| n < words),
        })
    }

    /// The 4-byte half `half` (0: bytes 0..4, the low half on a
    /// little-endian machine; 1: bytes 4..8) of the narrow word at byte
    /// `offset`; panics when that word is not the region's narrow one.
    #[cfg(not(loom))]
    pub(crate) fn half(&self, offset: usize, half: usize) -> &'a std::sync::atomic::AtomicU32 {
        assert!(
            offset & 7 == 0 && Some(offset / 8) == self.narrow && half < 2,
            "offset {offset} half {half} is not a half of the region's narrow word"
        );
        let word: &'a AtomicU64 = &self.words[offset / 8];
        // SAFETY: the word's 8 bytes are valid for 'a (they are a cell of
        // `words`) and 8-aligned, so each 4-byte half is a valid, aligned
        // `AtomicU32` cell; this process accesses a narrow word only
        // through such halves (see `narrowed`), so no access of another
        // size races with them.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(word.as_ptr().cast::<u32>().add(half)) }
    }

    /// Loads word `i` (relaxed), half by half when it is the narrow one.
    #[inline]
    fn load_word(&self, i: usize) -> u64 {
        #[cfg(not(loom))]
        if Some(i) == self.narrow {
            let lo = self.half(i * 8, 0).load(Ordering::Relaxed);
            let hi = self.half(i * 8, 1).load(Ordering::Relaxed);
            return u64::from(lo) | (u64::from(hi) << 32);
        }
        self.words[i].load(Ordering::Relaxed)
    }

    /// Stores word `i` (relaxed), half by half when it is the narrow one.
    fn store_word(&self, i: usize, v: u64) {
        #[cfg(not(loom))]
        if Some(i) == self.narrow {
            self.half(i * 8, 0).store(v as u32, Ordering::Relaxed);
            self.half(i * 8, 1)
                .store((v >> 32) as u32, Ordering::Relaxed);
            return;
        }
        self.words[i].store(v, Ordering::Relaxed);
    }

    /// The cell of the 8-aligned word at byte `offset` (never the narrow
    /// one).
    pub(crate) fn word(&self, offset: usize) -> &'a AtomicU64 {
        assert!(offset & 7 == 0, "offset {offset} is not 8-aligned");
        assert!(
            Some(offset / 8) != self.narrow,
            "offset {offset} is the region's narrow word"
        );
        match self.words.get(offset / 8) {
            Some(w) => w,
            None => panic!(
                "offset {offset} is outside the region's {} whole words",
                self.words.len()
            ),
        }
    }

    /// Loads the little-endian `u64` at `offset` (a multiple of 8).
    #[inline]
    pub fn load_u64(&self, offset: usize) -> u64 {
        self.check_word(offset);
        u64::from_le(self.load_word(offset / 8))
    }

    /// Stores `value` as a little-endian `u64` at `offset` (a multiple of 8).
    pub fn store_u64(&self, offset: usize, value: u64) {
        self.check_word(offset);
        self.store_word(offset / 8, value.to_le());
    }

    #[inline]
    fn check_word(&self, offset: usize) {
        assert!(offset & 7 == 0, "offset {offset} is not 8-aligned");
        assert!(
            offset / 8 < self.words.len(),
            "offset {offset} is outside the region's {} whole words",
            self.words.len()
        );
    }

    /// Copies the bytes at `offset..offset + buf.len()` into `buf`.
    #[inline]
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.check_range(offset, buf.len());
        // Whole, aligned words clear of the narrow one: one load each.
        let (first, n) = (offset / 8, buf.len() / 8);
        if offset.is_multiple_of(8)
            && buf.len().is_multiple_of(8)
            && first + n <= self.words.len()
            && self.narrow.is_none_or(|w| w < first || w >= first + n)
        {
            for (chunk, word) in buf.chunks_exact_mut(8).zip(&self.words[first..first + n]) {
                chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
            }
            return;
        }
        let mut i = 0;
        while i < buf.len() {
            let at = offset + i;
            match self.words.get(at / 8) {
                Some(_) => {
                    // One load per word, however many of its bytes we need.
                    let word = self.load_word(at / 8).to_ne_bytes();
                    let from = at % 8;
                    let n = (8 - from).min(buf.len() - i);
                    buf[i..i + n].copy_from_slice(&word[from..from + n]);
                    i += n;
                }
                None => {
                    buf[i] = self.tail[at - self.words.len() * 8].load(Ordering::Relaxed);
                    i += 1;
                }
            }
        }
    }

    /// Writes `bytes` at `offset`.
    ///
    /// Bytes sharing a word with bytes outside the range are written by a
    /// load and a store of that word: only one process may write a region
    /// (the protocol's single writer), so nothing else can change them in
    /// between.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        self.check_range(offset, bytes.len());
        // Whole, aligned words clear of the narrow one: one store each.
        let (first, n) = (offset / 8, bytes.len() / 8);
        if offset.is_multiple_of(8)
            && bytes.len().is_multiple_of(8)
            && first + n <= self.words.len()
            && self.narrow.is_none_or(|w| w < first || w >= first + n)
        {
            for (chunk, word) in bytes.chunks_exact(8).zip(&self.words[first..first + n]) {
                let v = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
                word.store(v, Ordering::Relaxed);
            }
            return;
        }
        let mut i = 0;
        while i < bytes.len() {
            let at = offset + i;
            if at & 7 == 0 && bytes.len() - i >= 8 && at / 8 < self.words.len() {
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[i..i + 8]);
                self.store_word(at / 8, u64::from_ne_bytes(w));
                i += 8;
            } else {
                self.store_byte(at, bytes[i]);
                i += 1;
            }
        }
    }

    /// Copies the whole region into `dst` (which must be exactly as long),
    /// word by word with relaxed loads.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len(),
            "copy_to needs a buffer as long as the region"
        );
        let (body, rest) = dst.split_at_mut(self.words.len() * 8);
        // The words before and after the narrow one in plain loops (the
        // bulk of a snapshot copy), the narrow one half by half.
        let narrow = self.narrow.unwrap_or(self.words.len());
        let (before, after) = body.split_at_mut(narrow * 8);
        for (d, w) in before.chunks_exact_mut(8).zip(self.words) {
            d.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        if narrow < self.words.len() {
            let (d, after) = after.split_at_mut(8);
            d.copy_from_slice(&self.load_word(narrow).to_ne_bytes());
            for (d, w) in after.chunks_exact_mut(8).zip(&self.words[narrow + 1..]) {
                d.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
            }
        }
        for (d, t) in rest.iter_mut().zip(self.tail) {
            *d = t.load(Ordering::Relaxed);
        }
    }

    /// Writes all of `src` (exactly as long as the region) into it.
    pub fn copy_from(&self, src: &[u8]) {
        assert_eq!(
            src.len(),
            self.len(),
            "copy_from needs a buffer as long as the region"
        );
        let (body, rest) = src.split_at(self.words.len() * 8);
        for (i, s) in body.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(s);
            self.store_word(i, u64::from_ne_bytes(b));
        }
        for (s, t) in rest.iter().zip(self.tail) {
            t.store(*s, Ordering::Relaxed);
        }
    }

    /// True when every byte of the region is zero.
    pub fn is_zero(&self) -> bool {
        (0..self.words.len()).all(|i| self.load_word(i) == 0)
            && self.tail.iter().all(|t| t.load(Ordering::Relaxed) == 0)
    }

    #[inline]
    fn check_range(&self, offset: usize, len: usize) {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => {}
            _ => panic!(
                "bytes {offset}..+{len} are outside the region of {} bytes",
                self.len()
            ),
        }
    }

    fn store_byte(&self, at: usize, byte: u8) {
        match self.words.get(at / 8) {
            Some(_) => {
                let mut b = self.load_word(at / 8).to_ne_bytes();
                b[at % 8] = byte;
                self.store_word(at / 8, u64::from_ne_bytes(b));
            }
            None => self.tail[at - self.words.len() * 8].store(byte, Ordering::Relaxed),
        }
    }
}

/// The narrow word of a region of `words` whole words made from scratch:
/// the protocol's futex word ([`crate::OFF_WAKE`]) when the region reaches
/// it. Every region this process makes over a memfd starts at the memfd's
/// start (or is a part of one), so they all agree on it.
#[inline]
fn narrow_word(words: usize) -> Option<usize> {
    let i = crate::header::OFF_WAKE / 8;
    (i < words).then_some(i)
}

#[cfg(not(loom))]
fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Zeroed memory on the heap, as atomic words: the protocol's stand-in for
/// a mapping in unit tests, benchmarks and the loom model.
pub struct HeapBuffer {
    words: Box<[AtomicU64]>,
}

impl fmt::Debug for HeapBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapBuffer")
            .field("len", &(self.words.len() * 8))
            .finish()
    }
}

impl HeapBuffer {
    /// A zeroed buffer of `len` bytes, rounded up to a multiple of 8.
    pub fn new(len: usize) -> HeapBuffer {
        HeapBuffer {
            words: (0..len.div_ceil(8)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The whole buffer as a [`Region`].
    pub fn region(&self) -> Region<'_> {
        Region {
            words: &self.words,
            tail: &[],
            narrow: narrow_word(self.words.len()),
        }
    }
}
