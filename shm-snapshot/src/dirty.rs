//! The dirty map: which cells of the memfd a program wrote since the
//! snapshotter last looked, so that an incremental snapshot reads only
//! those (docs/snapshot-protocol.md, *The dirty map*).
//!
//! The map lives in the header page: a control word at [`OFF_DIRTY`] and
//! one bit per cell of `1 << shift` memfd bytes at [`OFF_DIRTY_MAP`]. The
//! program sets a cell's bit before it writes any byte of the cell
//! ([`DirtyMap::mark`]); the snapshotter takes the bits and clears them at
//! the instant it captures ([`take_dirty`]). An open of the header turns
//! the map off ([`crate::Publisher::open`]); a program that marks all its
//! writes opens with [`crate::Publisher::open_marking`], which leaves the
//! map as it is, and turns it on ([`DirtyMap::enable`]), which, when the
//! map was off, sets every bit (writes made while it was off were not
//! marked) and clears the scratch range.

use crate::header::{HEADER_LEN, OFF_DIRTY, OFF_DIRTY_MAP, OFF_SCRATCH};
use crate::region::Region;
use crate::sync::Ordering;

/// The low half of the control word when the map is on: `"dmap"`.
const DIRTY_MAGIC: u32 = u32::from_le_bytes(*b"dmap");
/// The memfd's first bytes, which a program need not mark: a snapshotter
/// always reads them (the header page's sequence word changes at every
/// commit, unmarked, and a program's own header words, such as
/// shm-state's commit and lock words in the page after it, may be written
/// without marks too). 64 KiB: enough for those pages, and small enough
/// that reading it at every capture costs little.
pub const ALWAYS_READ: u64 = 64 << 10;
/// How many cells the map covers: one bit each in the rest of the header
/// page (24576). Writes past them are not marked; a snapshotter reads
/// those cells.
pub const DIRTY_CELLS: u64 = ((HEADER_LEN - OFF_DIRTY_MAP) * 8) as u64;
/// The smallest cell the map marks: 4 KiB (`1 << 12`), for a memfd of up
/// to 96 MiB.
pub const MIN_SHIFT: u32 = 12;
/// The largest cell: 1 GiB (`1 << 30`).
pub const MAX_SHIFT: u32 = 30;

/// The cell size (log2) the map uses for a memfd of `len` bytes: the
/// smallest that covers it with [`DIRTY_CELLS`] cells (64 KiB for 1 GiB,
/// 1 MiB for 24 GiB), at least [`MIN_SHIFT`], at most [`MAX_SHIFT`].
pub fn shift_for(len: u64) -> u32 {
    (MIN_SHIFT..MAX_SHIFT)
        .find(|&s| DIRTY_CELLS << s >= len)
        .unwrap_or(MAX_SHIFT)
}

fn control(shift: u32) -> u64 {
    u64::from(DIRTY_MAGIC) | (u64::from(shift) << 32)
}

/// The program's side of the dirty map, over the header page of a memfd
/// whose header this program opened.
#[derive(Debug, Clone, Copy)]
pub struct DirtyMap<'a> {
    page: Region<'a>,
    map: Region<'a>,
    shift: u32,
}

impl<'a> DirtyMap<'a> {
    /// Turns the map on in `page`, the first [`HEADER_LEN`] bytes of the
    /// memfd (a valid header: call it after
    /// [`crate::Publisher::open_marking`]), with cells sized for a memfd of
    /// `len` bytes ([`shift_for`]). When the map was off, or had another
    /// cell size, every bit is set first (what was written meanwhile is
    /// unknown) and the scratch range cleared. `None` when `page` is
    /// shorter than a header. Call it again when the memfd grows past the
    /// cells' cover ([`DirtyMap::covers`]).
    ///
    /// From here on the program must [`DirtyMap::mark`] every range before
    /// it writes it, for as long as it writes the memfd: a snapshotter
    /// trusts the map to tell every cell that changed.
    pub fn enable(page: Region<'a>, len: u64) -> Option<DirtyMap<'a>> {
        let page = page.subregion(0, HEADER_LEN)?;
        let map = page.subregion(OFF_DIRTY_MAP, HEADER_LEN - OFF_DIRTY_MAP)?;
        let word = page.word(OFF_DIRTY);
        let shift = shift_for(len);
        if word.load(Ordering::Acquire) != control(shift) {
            for i in 0..map.len() / 8 {
                map.word(i * 8).store(u64::MAX, Ordering::Relaxed);
            }
            // Another program's scratch range is not this one's.
            page.word(OFF_SCRATCH + 8).store(0, Ordering::Relaxed);
            page.word(OFF_SCRATCH).store(0, Ordering::Relaxed);
            // The bits before the control word: a snapshotter that sees the
            // map on sees them set.
            word.store(control(shift), Ordering::Release);
        }
        Some(DirtyMap { page, map, shift })
    }

    /// Whether the cells cover the memfd's first `len` bytes.
    pub fn covers(&self, len: u64) -> bool {
        DIRTY_CELLS << self.shift >= len
    }

    /// log2 of the cell size.
    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// The map of `page` as [`DirtyMap::enable`] left it, for marking (it
    /// does not turn the map on). `None` when `page` is shorter than a
    /// header.
    pub fn attach(page: Region<'a>) -> Option<DirtyMap<'a>> {
        let page = page.subregion(0, HEADER_LEN)?;
        let map = page.subregion(OFF_DIRTY_MAP, HEADER_LEN - OFF_DIRTY_MAP)?;
        let shift = shift_of(page.word(OFF_DIRTY).load(Ordering::Acquire))?;
        Some(DirtyMap { page, map, shift })
    }

    /// Declares the memfd bytes `start..start + len` *scratch*: what they
    /// hold matters only while an update runs (an undo journal, say). A
    /// snapshotter that captures between updates may then leave cells
    /// inside the range as an earlier snapshot had them; one that captures
    /// inside an update reads them as any marked cell. Writes to the range
    /// are marked all the same. Replaces an earlier declaration; every
    /// open of the header clears it.
    pub fn declare_scratch(&self, start: u64, len: u64) {
        self.page.word(OFF_SCRATCH).store(start, Ordering::Relaxed);
        self.page
            .word(OFF_SCRATCH + 8)
            .store(len, Ordering::Release);
    }

    /// Marks the memfd bytes `offset..offset + len` (offsets in the memfd,
    /// the header page included) as written. Call it before the write:
    /// the bit is set with an Acquire read-modify-write, so no later store
    /// of this thread becomes visible before it.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.shift;
        let last = (offset.saturating_add(len - 1) >> self.shift).min(DIRTY_CELLS - 1);
        let mut cell = first;
        while cell <= last {
            let word = self.map.word((cell / 64) as usize * 8);
            let bit = 1u64 << (cell % 64);
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Acquire);
            }
            cell += 1;
        }
    }
}

/// The cells a program marked, as [`take_dirty`] found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyCells {
    shift: u32,
    words: Vec<u64>,
    scratch: Option<(u64, u64)>,
}

impl DirtyCells {
    /// Whether any byte of `offset..offset + len` may have been written:
    /// true when a cell it touches is marked or lies past the map.
    pub fn any(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset >> self.shift;
        let last = offset.saturating_add(len - 1) >> self.shift;
        (first..=last).any(|cell| {
            self.words
                .get((cell / 64) as usize)
                .is_none_or(|w| w & (1 << (cell % 64)) != 0)
        })
    }

    /// The program's scratch range (`start..end`, memfd offsets), as it was
    /// declared when the cells were taken ([`DirtyMap::declare_scratch`]).
    pub fn scratch(&self) -> Option<std::ops::Range<u64>> {
        let (start, len) = self.scratch?;
        Some(start..start.checked_add(len)?)
    }

    /// log2 of the cell size the marks are in.
    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// The number of cells marked.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds the cells `other` marked.
    pub fn merge(&mut self, other: &DirtyCells) {
        if self.shift != other.shift {
            // Not the same cells: everything counts as written.
            self.words.iter_mut().for_each(|w| *w = u64::MAX);
            return;
        }
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }
}

/// The snapshotter's side: takes the cells marked in `page` (the memfd's
/// first [`HEADER_LEN`] bytes) and clears them, or `None` when the map is
/// off (or `page` holds no header-sized page). Each map word is swapped
/// with zero: a mark made during the call is either taken now or left for
/// the next call, never lost.
///
/// A snapshot is exact only for cells the program cannot write during the
/// copy that follows: take the cells with the program stopped, or (copying
/// while it runs) after loading an even sequence word, and keep the copy
/// only if the word is unchanged after it (see `docs/snapshot-protocol.md`).
pub fn take_dirty(page: Region<'_>) -> Option<DirtyCells> {
    let page = page.subregion(0, HEADER_LEN)?;
    let shift = shift_of(page.word(OFF_DIRTY).load(Ordering::Acquire))?;
    let map = page.subregion(OFF_DIRTY_MAP, HEADER_LEN - OFF_DIRTY_MAP)?;
    let len = page.word(OFF_SCRATCH + 8).load(Ordering::Acquire);
    let start = page.word(OFF_SCRATCH).load(Ordering::Relaxed);
    let scratch = (len > 0).then_some((start, len));
    let words = (0..map.len() / 8)
        .map(|i| map.word(i * 8).swap(0, Ordering::AcqRel))
        .collect();
    Some(DirtyCells {
        shift,
        words,
        scratch,
    })
}

/// The cell shift (log2 of the cell size) that a control word (the
/// little-endian value at [`OFF_DIRTY`]) names, or `None` when it says the
/// map is off. For a program that marks through its own pointer to the
/// page: it reads the control word before it marks, so that it marks with
/// the cells another process may have enabled since.
pub fn control_shift(control: u64) -> Option<u32> {
    shift_of(control)
}

/// The cell shift of a control word that says the map is on.
fn shift_of(control: u64) -> Option<u32> {
    let shift = (control >> 32) as u32;
    (control as u32 == DIRTY_MAGIC && (MIN_SHIFT..=MAX_SHIFT).contains(&shift)).then_some(shift)
}

/// Gives marks taken by [`take_dirty`] back to the map in `page` (ORs
/// them in), when the map is still on with the same cells: for a
/// snapshotter that took them while the program was inside an update,
/// which may still write cells it marked before the stop; the next capture
/// then reads those cells again. Returns whether they were given back.
pub fn give_back_dirty(page: Region<'_>, cells: &DirtyCells) -> bool {
    let Some(page) = page.subregion(0, HEADER_LEN) else {
        return false;
    };
    if shift_of(page.word(OFF_DIRTY).load(Ordering::Acquire)) != Some(cells.shift) {
        return false;
    }
    let Some(map) = page.subregion(OFF_DIRTY_MAP, HEADER_LEN - OFF_DIRTY_MAP) else {
        return false;
    };
    for (i, &w) in cells.words.iter().enumerate() {
        if w != 0 {
            map.word(i * 8).fetch_or(w, Ordering::AcqRel);
        }
    }
    true
}

/// Turns the map off (an open by a program that does not mark its writes
/// does): a snapshotter then takes nothing until a program enables it
/// again. A map already off is left as it is (nothing written).
pub(crate) fn disable(page: Region<'_>) {
    if page.len() >= HEADER_LEN && page.word(OFF_DIRTY).load(Ordering::Relaxed) != 0 {
        page.word(OFF_DIRTY).store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::HeapBuffer;

    #[test]
    fn marks_are_taken_once_and_cells_past_the_map_always_count() {
        let buf = HeapBuffer::new(HEADER_LEN);
        let page = buf.region();
        assert_eq!(take_dirty(page), None, "off in a fresh page");
        const SHIFT: u32 = 20;
        let map = DirtyMap::enable(page, 24 << 30).unwrap();
        assert_eq!(map.shift(), SHIFT);
        assert_eq!(page.load_u64(OFF_DIRTY), control(SHIFT));
        // Enabling a map that was off marks everything.
        let all = take_dirty(page).unwrap();
        assert_eq!(all.count(), DIRTY_CELLS);
        let none = take_dirty(page).unwrap();
        assert_eq!(none.count(), 0);
        assert!(!none.any(0, 1 << 30));
        assert!(none.any(DIRTY_CELLS << SHIFT, 1), "past the map");
        // Two cells from a range crossing a boundary, one from a byte.
        map.mark((3 << 20) - 1, 2);
        map.mark(70 << 20, 1);
        map.mark(u64::MAX - 5, 5); // past the map: no bit, no panic
        let got = take_dirty(page).unwrap();
        assert_eq!(got.count(), 3);
        assert!(got.any(2 << 20, 1) && got.any(3 << 20, 1) && got.any(70 << 20, 1));
        assert!(!got.any(4 << 20, 66 << 20));
        assert_eq!(take_dirty(page).unwrap().count(), 0);
        // Enabling again while on keeps the bits.
        map.mark(5 << 20, 1);
        DirtyMap::enable(page, 24 << 30).unwrap();
        assert_eq!(take_dirty(page).unwrap().count(), 1);
        // Another cell size: everything again.
        let small = DirtyMap::enable(page, 1 << 20).unwrap();
        assert_eq!(small.shift(), MIN_SHIFT);
        assert_eq!(take_dirty(page).unwrap().count(), DIRTY_CELLS);
        small.mark(8192, 1);
        let got = take_dirty(page).unwrap();
        assert!(got.any(8192, 1) && !got.any(4096, 4096) && !got.any(12288, 4096));
        let map = DirtyMap::enable(page, 24 << 30).unwrap();
        take_dirty(page);
        // The scratch range goes with the marks; enabling a map that was
        // off clears it.
        assert_eq!(take_dirty(page).unwrap().scratch(), None);
        map.declare_scratch(8192, 1 << 20);
        assert_eq!(
            take_dirty(page).unwrap().scratch(),
            Some(8192..8192 + (1 << 20))
        );
        map.declare_scratch(u64::MAX, 2);
        assert_eq!(take_dirty(page).unwrap().scratch(), None, "overflows");
        // Off: nothing to take; on again: everything.
        disable(page);
        assert_eq!(take_dirty(page), None);
        DirtyMap::enable(page, 24 << 30).unwrap();
        let all = take_dirty(page).unwrap();
        assert_eq!(all.count(), DIRTY_CELLS);
        assert_eq!(all.scratch(), None, "cleared when the map came on");
    }

    #[test]
    fn a_damaged_control_word_turns_the_map_off() {
        let buf = HeapBuffer::new(HEADER_LEN);
        let page = buf.region();
        DirtyMap::enable(page, 1 << 30).unwrap();
        page.store_u64(OFF_DIRTY, control(11));
        assert_eq!(take_dirty(page), None);
        page.store_u64(OFF_DIRTY, control(31));
        assert_eq!(take_dirty(page), None);
        page.store_u64(OFF_DIRTY, 0x1234);
        assert_eq!(take_dirty(page), None);
        assert!(DirtyMap::enable(buf.region().subregion(0, 1024).unwrap(), 1).is_none());
        assert_eq!(
            (shift_for(0), shift_for(96 << 20), shift_for((96 << 20) + 1)),
            (12, 12, 13)
        );
        assert_eq!((shift_for(1 << 30), shift_for(u64::MAX)), (16, MAX_SHIFT));
    }

    #[test]
    fn marks_given_back_are_taken_again() {
        let buf = HeapBuffer::new(HEADER_LEN);
        let page = buf.region();
        let map = DirtyMap::enable(page, 1 << 30).unwrap();
        take_dirty(page);
        map.mark(3 << 16, 1);
        let taken = take_dirty(page).unwrap();
        assert_eq!(take_dirty(page).unwrap().count(), 0);
        assert!(give_back_dirty(page, &taken));
        let again = take_dirty(page).unwrap();
        assert_eq!(again, taken);
        // Not into a map with other cells.
        DirtyMap::enable(page, 1 << 20).unwrap();
        assert!(!give_back_dirty(page, &taken));
    }

    #[test]
    fn merged_cells_are_the_union() {
        let buf = HeapBuffer::new(HEADER_LEN);
        let page = buf.region();
        let map = DirtyMap::enable(page, 24 << 30).unwrap();
        take_dirty(page);
        map.mark(1 << 20, 1);
        let mut a = take_dirty(page).unwrap();
        map.mark(9 << 20, 1);
        let b = take_dirty(page).unwrap();
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert!(a.any(1 << 20, 1) && a.any(9 << 20, 1));
    }
}
