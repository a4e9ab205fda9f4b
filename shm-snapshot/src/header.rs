//! The protocol header: the first page of the memfd. Byte layout in
//! `docs/snapshot-protocol.md`; the constants here are its source of truth.

use crate::error::Error;
use crate::region::Region;
use crate::sync::{AtomicU64, Ordering, fence};

/// The first 8 bytes of a header.
pub const MAGIC: [u8; 8] = *b"shm-snap";
/// The header format this crate writes and reads.
pub const VERSION: u32 = 1;
/// Length of the header in bytes: one page, so the user's data region
/// starts page-aligned.
#[cfg(not(loom))]
pub const HEADER_LEN: usize = 4096;
/// Under the loom model the header is shrunk to 128 bytes (the fields are
/// where they always are) so that copies stay small enough to explore.
#[cfg(loom)]
pub const HEADER_LEN: usize = 128;
/// Where the user's data region starts in the memfd; it runs to the end of
/// the memfd (or of the mapping).
pub const DATA_OFFSET: usize = HEADER_LEN;

pub(crate) const OFF_MAGIC: usize = 0;
pub(crate) const OFF_VERSION: usize = 8;
pub(crate) const OFF_DATA_OFFSET: usize = 12;
pub(crate) const OFF_FLAGS: usize = 16;
pub(crate) const OFF_CRC: usize = 20;
/// Bytes covered by the checksum: magic, version, data offset, flags.
pub(crate) const CRC_COVERS: usize = 20;
/// The sequence word: `2 * generation`, plus 1 while an update runs.
pub const OFF_SEQ: usize = 64;
/// The waiter word: non-zero while a snapshotter sleeps on the sequence
/// word and wants a futex wake at the next commit.
pub const OFF_WAITERS: usize = 72;
/// The wake word: a counter (in its low 4 bytes; the high 4 stay zero) that
/// the program bumps at a commit that finds a snapshotter waiting, and that
/// snapshotters sleep on with a futex. Only ever accessed in 4-byte halves
/// (see [`crate::Region`]).
pub const OFF_WAKE: usize = 80;
/// The dirty map's control word: 0 while the map is off; `"dmap"` in its
/// low 4 bytes and the cell shift in the high 4 while it is on (see
/// [`crate::DirtyMap`]).
pub const OFF_DIRTY: usize = 128;
/// The program's scratch range (two words: start and length, memfd
/// offsets): bytes that mean nothing between updates (see
/// [`crate::DirtyMap::declare_scratch`]). Zero while the map is off.
pub const OFF_SCRATCH: usize = 136;
/// The dirty map's bits, one per cell, to the end of the page.
pub const OFF_DIRTY_MAP: usize = 1024;
/// A sequence word at or above this is damage, not a count of steps: it
/// grows by one per begin or commit, so no program reaches 2^63, and the
/// bound leaves room to add without overflow.
pub(crate) const SEQ_LIMIT: u64 = 1 << 63;

#[cfg(target_endian = "big")]
compile_error!(
    "shm-snapshot's header is little-endian and is accessed in place: big-endian targets are not supported"
);

/// The fixed part of a valid v1 header, as bytes `0..24`.
pub(crate) fn static_bytes() -> [u8; 24] {
    let mut b = [0u8; 24];
    b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
    b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 4].copy_from_slice(&(DATA_OFFSET as u32).to_le_bytes());
    b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&0u32.to_le_bytes());
    let crc = crc32fast::hash(&b[..CRC_COVERS]);
    b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What the first page of a region holds.
pub(crate) enum Found<'a> {
    /// All zero: a fresh memfd, no program has set up the protocol.
    Blank,
    /// Something that is not a shm-snapshot header.
    Foreign,
    /// A valid header.
    Valid(Header<'a>),
}

/// A validated header in a region: the two protocol words.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header<'a> {
    page: Region<'a>,
}

impl<'a> Header<'a> {
    /// The header at the start of `region`, which [`find`] validated
    /// earlier (an owned publisher re-derives it from its memory at each
    /// call). Panics, like slice indexing, when `region` is shorter than a
    /// header: its owner broke [`crate::AsRegion`]'s contract.
    pub(crate) fn validated(region: Region<'a>) -> Header<'a> {
        match region.subregion(0, HEADER_LEN) {
            Some(page) => Header { page },
            None => panic!(
                "a validated shm-snapshot header shrank to {} bytes",
                region.len()
            ),
        }
    }

    pub(crate) fn seq(&self) -> &'a AtomicU64 {
        self.page.word(OFF_SEQ)
    }

    pub(crate) fn waiters(&self) -> &'a AtomicU64 {
        self.page.word(OFF_WAITERS)
    }

    /// The wake word's counting half (see [`OFF_WAKE`]).
    #[cfg(not(loom))]
    pub(crate) fn wake(&self) -> &'a std::sync::atomic::AtomicU32 {
        self.page.half(OFF_WAKE, 0)
    }

    /// Loads the sequence word and checks it: a value of 2^63 or more
    /// (not covered by the checksum: it changes at every commit) is
    /// [`Error::Corrupt`].
    pub(crate) fn load_seq(&self, order: Ordering) -> Result<u64, Error> {
        checked_seq(u64::from_le(self.seq().load(order)))
    }

    /// Writes a fresh header into a blank page: the fixed fields first,
    /// then the magic with `Release`, so a reader that sees the magic
    /// (loaded with `Acquire`) sees the rest.
    ///
    /// A set-up cut short (kill -9, or a copy taken with the program
    /// stopped) leaves a page that [`find`] still calls blank, and this
    /// writes the same bytes again: the set-up is idempotent.
    pub(crate) fn init(page: Region<'a>) -> Header<'a> {
        let b = static_bytes();
        page.write(8, &b[8..24]);
        page.store_u64(OFF_SEQ, 0);
        page.store_u64(OFF_WAITERS, 0);
        page.word(OFF_MAGIC)
            .store(u64::from_ne_bytes(MAGIC), Ordering::Release);
        // Orders the magic before any later store to the page (the first
        // update's odd sequence word): a reader that sees such a store and
        // then fences sees the magic too (see `find`).
        fence(Ordering::Release);
        Header { page }
    }
}

/// Looks at the first page of `region`.
///
/// A region shorter than a header is [`Error::TooSmall`]; a header whose
/// magic matches but whose other fixed fields do not check out is
/// [`Error::Corrupt`] or [`Error::UnsupportedVersion`].
pub(crate) fn find(region: Region<'_>) -> Result<Found<'_>, Error> {
    let page = region.subregion(0, HEADER_LEN).ok_or(Error::TooSmall {
        len: region.len(),
        needed: HEADER_LEN,
    })?;
    let magic = page.word(OFF_MAGIC).load(Ordering::Acquire);
    if magic != u64::from_ne_bytes(MAGIC) {
        if magic == 0 && is_blank_or_setup(page) {
            return Ok(Found::Blank);
        }
        // The page is read after the magic: another process may have
        // finished setting the header up (and begun an update, making the
        // page non-blank) in between. If the scan saw such a store, this
        // fence pairs with the release fence in `init`, so the magic is
        // visible now: look at it again before calling the page foreign.
        fence(Ordering::Acquire);
        if page.word(OFF_MAGIC).load(Ordering::Acquire) != u64::from_ne_bytes(MAGIC) {
            return Ok(Found::Foreign);
        }
    }
    let mut b = [0u8; 24];
    page.read(0, &mut b);
    let field = |off: usize| u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    let stored = field(OFF_CRC);
    let computed = crc32fast::hash(&b[..CRC_COVERS]);
    if stored != computed {
        return Err(Error::Corrupt {
            problem: format!(
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
        });
    }
    let version = field(OFF_VERSION);
    if version != VERSION {
        return Err(Error::UnsupportedVersion { version });
    }
    let data_offset = field(OFF_DATA_OFFSET);
    if data_offset as usize != DATA_OFFSET {
        return Err(Error::Corrupt {
            problem: format!("header data offset is {data_offset}, version 1 uses {DATA_OFFSET}"),
        });
    }
    let flags = field(OFF_FLAGS);
    if flags != 0 {
        return Err(Error::Corrupt {
            problem: format!("header flags are {flags:#x}, version 1 defines none"),
        });
    }
    Ok(Found::Valid(Header { page }))
}

/// Checks a sequence value read from shared memory.
pub(crate) fn checked_seq(seq: u64) -> Result<u64, Error> {
    if seq >= SEQ_LIMIT {
        return Err(Error::Corrupt {
            problem: format!(
                "sequence word {seq:#x} is 2^63 or more (no program commits that often)"
            ),
        });
    }
    Ok(seq)
}

/// True for a page (whose magic is zero) that is all zero, or holds what
/// [`Header::init`] writes before the magic: each of the two words at
/// bytes 8..24 is zero or its v1 value (word stores do not tear), and
/// everything else is zero. Such a page is a set-up cut short, not
/// another program's data.
fn is_blank_or_setup(page: Region<'_>) -> bool {
    let b = static_bytes();
    let word = |off: usize| u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"));
    [OFF_VERSION, OFF_FLAGS].into_iter().all(|off| {
        let w = page.word(off).load(Ordering::Relaxed);
        w == 0 || w == word(off)
    }) && page
        .subregion(24, HEADER_LEN - 24)
        .is_some_and(|rest| rest.is_zero())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn static_bytes_match_the_documented_layout() {
        let b = static_bytes();
        assert_eq!(&b[0..8], b"shm-snap");
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[12..16], &[0x00, 0x10, 0, 0]);
        assert_eq!(&b[16..20], &[0, 0, 0, 0]);
        assert_eq!(
            u32::from_le_bytes(b[20..24].try_into().unwrap()),
            crc32fast::hash(&b[..20])
        );
    }
}
