//! The header page of a shared state as atomic cells: the commit word, the
//! writer lock, the readers' wait count and the peer table, in a mapping
//! of its own that never moves (see `Mem::map_header`).

use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::MmapRaw;

use crate::error::{Error, Result};
use crate::format::*;
use crate::lock::LockCells;

/// One page mapped at the region's start, reached only through atomics.
#[derive(Debug)]
pub(crate) struct SharedPage {
    map: MmapRaw,
}

impl SharedPage {
    pub(crate) fn new(map: MmapRaw) -> Result<SharedPage> {
        if map.len() < HEADER_LEN as usize || !(map.as_ptr() as usize).is_multiple_of(8) {
            return Err(Error::unsupported("the header page mapping is too short"));
        }
        Ok(SharedPage { map })
    }

    /// The 8-byte word at `off`: one of the format's constant offsets.
    pub(crate) fn u64(&self, off: u64) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= HEADER_LEN,
            "word {off:#x}"
        );
        // SAFETY: the mapping is at least HEADER_LEN bytes (checked in
        // `new`), page-aligned, and lives as long as `self`; `off` is an
        // 8-aligned offset inside it (asserted). The words reached here
        // (commit word, lock and peer words) are accessed only atomically
        // in this process: `Mem` refuses slices over them.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off as usize).cast()) }
    }

    /// The 4-byte word at `off` (the writer lock, the commit word's low
    /// half as a futex key).
    pub(crate) fn u32(&self, off: u64) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= HEADER_LEN,
            "word {off:#x}"
        );
        // SAFETY: as in `u64`, for a 4-aligned 4-byte word.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(off as usize).cast()) }
    }

    /// The writer lock word.
    pub(crate) fn wlock(&self) -> &AtomicU32 {
        self.u32(WLOCK)
    }

    /// The cells of peer entry `slot` (the lock's identity words, the boot
    /// id in one word).
    pub(crate) fn peer(&self, slot: usize) -> LockCells<'_, AtomicU64> {
        let at = peer_at(slot as u64);
        LockCells {
            word: self.u64(at),
            start: self.u64(at + 8),
            nonce: self.u64(at + 16),
            boot: self.u64(at + 24),
            boot_hi: None,
            dev: self.u64(at + 32),
            ino: self.u64(at + 40),
        }
    }
}
