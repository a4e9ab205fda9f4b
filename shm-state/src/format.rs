//! The region format: offsets, sizes and tags, byte for byte as
//! `docs/state-format.md` describes them. All integers are little-endian.

use crate::error::{Error, Result};
use crate::mem::Mem;

#[cfg(target_endian = "big")]
compile_error!("shm-state stores native-endian POD values and supports little-endian targets only");

/// The magic at offset 0 of every region.
pub const MAGIC: &[u8; 8] = b"SHMSTATE";
/// The magic stored first (one atomic 8-byte store) while a region is being
/// created; [`MAGIC`] replaces it once the header is complete.
pub const CREATING_MAGIC: &[u8; 8] = b"SHMSTNEW";
/// The format version this library writes and reads.
pub const FORMAT_VERSION: u32 = 7;
/// The oldest format this library opens: a format 4, 5 or 6 region is upgraded
/// to [`FORMAT_VERSION`] by its first open's (journaled) opening
/// transaction.
pub const OLDEST_FORMAT: u32 = 4;
/// The header's size: one page at the start of the region.
pub const HEADER_LEN: u64 = 4096;

// Superblock: the geometry, written once when the region is created and
// never again (its checksum covers 0..SB_CRC with the final magic).
pub(crate) const SB_MAGIC: u64 = 0x00;
pub(crate) const SB_FORMAT: u64 = 0x08;
pub(crate) const SB_HEADER_LEN: u64 = 0x0C;
pub(crate) const SB_JOURNAL_OFF: u64 = 0x10;
pub(crate) const SB_JOURNAL_LEN: u64 = 0x18;
pub(crate) const SB_HEAP_OFF: u64 = 0x20;
pub(crate) const SB_FLAGS: u64 = 0x28;
/// Reserved, zero: `SB_RESERVED..SB_CRC`.
pub(crate) const SB_RESERVED: u64 = 0x2C;
pub(crate) const SB_CRC: u64 = 0x7C;

// Dynamic header: journaled like the heap, checksummed by every commit that
// changes it.
pub(crate) const DY_START: u64 = 0x80;
pub(crate) const DY_GENERATION: u64 = 0x80;
pub(crate) const DY_HEAP_TOP: u64 = 0x88;
pub(crate) const DY_ROOT: u64 = 0x90;
/// The sequence number of the last open's own transaction: the commit
/// word's sequence never goes below it (format 4; format 1 kept a commit
/// counter here, formats 2 and 3 a zero).
pub(crate) const DY_OPEN_SEQ: u64 = 0x98;
pub(crate) const DY_USED: u64 = 0xA0;
pub(crate) const DY_LAST_PID: u64 = 0xA8;
pub(crate) const DY_LAST_OPEN: u64 = 0xAC;
/// The root layout: user version, root size, root alignment (u32 each). In
/// the dynamic header so that a migration changes it in the same journaled
/// transaction as the root it describes.
pub(crate) const DY_USER_VERSION: u64 = 0xB0;
pub(crate) const DY_ROOT_SIZE: u64 = 0xB4;
pub(crate) const DY_ROOT_ALIGN: u64 = 0xB8;
pub(crate) const DY_CRC: u64 = 0xBC;

// Words only ever accessed atomically, outside the checksums and the journal.
pub(crate) const TX_WORD: u64 = 0xC0;
pub(crate) const LOCK_PID: u64 = 0xC8;
pub(crate) const LOCK_START: u64 = 0xD0;
pub(crate) const LOCK_NONCE: u64 = 0xD8;
/// The holder's boot id (`/proc/sys/kernel/random/boot_id`, 16 bytes).
pub(crate) const LOCK_BOOT: u64 = 0xE0;
/// The device and inode of the memory the lock was taken in.
pub(crate) const LOCK_DEV: u64 = 0xF0;
pub(crate) const LOCK_INO: u64 = 0xF8;
/// End of the atomic words' line.
pub(crate) const ATOMIC_END: u64 = 0x100;
/// Lock word bit 32: set from the claiming compare-and-swap until the
/// holder's start time, nonce, boot id and memory identity are stored.
pub(crate) const LOCK_CLAIMING: u64 = 1 << 32;
/// Lock word bits 33..64: a claim counter, one more on every claim, so that
/// a compare-and-swap never succeeds on a word that changed hands and back.
pub(crate) const LOCK_COUNT_SHIFT: u32 = 33;

/// The commit word: bit 0 set while a transaction is open, bits 1..56 the
/// transaction's sequence number, bits 56..64 a check byte over bits
/// 0..56 ([`tx_check`]), so that no single flipped bit (nor a zeroed or
/// random word, but for 1 in 256) passes for another state.
pub(crate) const TX_OPEN: u64 = 1;
/// The largest sequence number (55 bits: 10^16 transactions).
pub(crate) const MAX_SEQ: u64 = (1 << 55) - 1;
const TX_CHECK_SHIFT: u32 = 56;
const TX_CHECK_SALT: u64 = 0xA5;

/// murmur3's 64-bit finaliser: a bijection that spreads every bit (the
/// end of the map hash, and the journal's claim check).
#[inline(always)]
pub(crate) fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The check byte of the commit word's low 56 bits: their 7 bytes XORed
/// together, XOR 0xA5 (so that an all-zero word does not check).
#[inline]
pub(crate) fn tx_check(low: u64) -> u64 {
    let mut x = low & ((1 << TX_CHECK_SHIFT) - 1);
    x ^= x >> 32;
    x ^= x >> 16;
    x ^= x >> 8;
    (x ^ TX_CHECK_SALT) & 0xFF
}

/// The commit word for transaction `seq`, open or committed.
#[inline]
pub(crate) fn tx_word(seq: u64, open: bool) -> u64 {
    debug_assert!(seq <= MAX_SEQ);
    let low = (seq << 1) | u64::from(open);
    low | (tx_check(low) << TX_CHECK_SHIFT)
}

/// The committed word of the transaction whose open word is `open`
/// (`tx_word(seq, true)`): the check byte is an XOR fold of the low bits,
/// so clearing the open bit flips the check's lowest bit as well.
#[inline(always)]
pub(crate) fn committed_from_open(open: u64) -> u64 {
    open ^ TX_OPEN ^ (1 << TX_CHECK_SHIFT)
}

/// Decodes a commit word: `(seq, open)`, or damage.
#[inline]
pub(crate) fn read_tx_word(word: u64) -> Result<(u64, bool)> {
    let low = word & ((1 << TX_CHECK_SHIFT) - 1);
    if word >> TX_CHECK_SHIFT != tx_check(low) {
        return Err(bad_tx_word(word));
    }
    Ok((low >> 1, low & TX_OPEN != 0))
}

#[cold]
#[inline(never)]
fn bad_tx_word(word: u64) -> Error {
    Error::corrupt(
        "commit word",
        TX_WORD,
        format!(
            "{word:#018x} fails its check byte (damaged memory); refusing to guess whether a transaction was open"
        ),
    )
}

// Allocator free lists: one head per size class, each a block offset in
// bits 0..48 and a check in bits 48..64 ([`free_head`]); 0 for an empty list.
pub(crate) const FREE_HEADS: u64 = 0x100;
/// Number of free-list heads (classes `MIN_CLASS..=MAX_CLASS` are used).
pub(crate) const FREE_SLOTS: u64 = 64;

// The shared line (format 5): words other processes change while a state
// is shared, only ever accessed atomically (never journaled, never sliced).
/// The writer lock: a 32-bit futex word (bits 0..30 the holder's robust
/// thread id, bit 30 the kernel's "owner died", bit 31 "waiters"); bytes
/// 0x304..0x308 are zero and never accessed.
pub(crate) const WLOCK: u64 = 0x300;
/// The writer lock's holder: bits 0..32 its thread id (as in `WLOCK`),
/// bits 32..40 its peer slot + 1 (0: not shared, an exclusive holder).
pub(crate) const WLOCK_HOLDER: u64 = 0x308;
/// Readers asleep waiting for an open transaction to end (a count).
pub(crate) const READ_WAITERS: u64 = 0x310;
/// Ring waiters asleep on a ring's head or tail (a count, format 6): a
/// writer whose transaction touched a ring wakes those words only when it
/// is not 0.
pub(crate) const RING_WAITERS: u64 = 0x318;
/// The start of the shared line (it ends at 0x340, where the peer table
/// begins: `0x300..HEADER_LEN` is only ever accessed atomically).
pub(crate) const SHARED_START: u64 = 0x300;
/// `WLOCK` bits (the kernel's robust-futex bits).
pub(crate) const WLOCK_TID: u32 = 0x3FFF_FFFF;
pub(crate) const WLOCK_OWNER_DIED: u32 = 0x4000_0000;
pub(crate) const WLOCK_WAITERS: u32 = 0x8000_0000;

/// The peer table (format 5): one entry per process sharing the state.
pub(crate) const PEERS: u64 = 0x400;
/// Peer table entry size: each entry is the lock's identity words
/// (`LOCK_PID..ATOMIC_END`, same meaning) with the boot id's two words
/// folded into one: word, start, nonce, boot, dev, ino.
pub(crate) const PEER_ENTRY: u64 = 48;
/// Entries `0..64` lie at `PEERS` (format 5 on); format 6 adds entries
/// `64..68` at `PEERS_MORE`, the 192 bytes that were reserved before them.
pub(crate) const PEER_COUNT: u64 = 68;
pub(crate) const PEERS_MORE: u64 = 0x340;

/// The offset of peer entry `slot` (`slot < PEER_COUNT`).
#[inline]
pub(crate) const fn peer_at(slot: u64) -> u64 {
    if slot < 64 {
        PEERS + slot * PEER_ENTRY
    } else {
        PEERS_MORE + (slot - 64) * PEER_ENTRY
    }
}

/// True when `off..off + len` touches a word other processes access
/// atomically: the commit and lock words, the shared line and the peer
/// table (together `0x300..0x1000`).
#[inline(always)]
pub(crate) fn touches_atomics(off: u64, len: u64) -> bool {
    off < HEADER_LEN
        && len != 0
        && [(TX_WORD, ATOMIC_END), (SHARED_START, HEADER_LEN)]
            .iter()
            .any(|&(start, end)| off < end && off.saturating_add(len) > start)
}

/// The journal starts right after the header.
pub(crate) const JOURNAL_OFF: u64 = HEADER_LEN;
/// A journal record's fixed part: `check u64, len u32, 0 u32, target u64`
/// (format 7; formats 4 to 6: `crc u32, len u32, seq u64, target u64`).
pub(crate) const RECORD_HEADER: u64 = 24;
/// Before-images are taken in whole lines of this many bytes.
pub(crate) const LINE: u64 = 64;

/// Block header: kind u32, class u32, aux u64.
pub(crate) const BLOCK_HEADER: u64 = 16;
/// Smallest and largest size class: payloads of 2^class bytes.
pub(crate) const MIN_CLASS: u32 = 4;
pub(crate) const MAX_CLASS: u32 = 40;
/// Block kinds: a fixed high half so that stray data rarely looks valid.
pub(crate) const KIND_BASE: u32 = 0x5354_0000;

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    Free = KIND_BASE | 1,
    Root = KIND_BASE | 2,
    Cell = KIND_BASE | 3,
    Vec = KIND_BASE | 4,
    VecData = KIND_BASE | 5,
    Map = KIND_BASE | 6,
    MapTable = KIND_BASE | 7,
    Bytes = KIND_BASE | 8,
    Log = KIND_BASE | 9,
    LogChunk = KIND_BASE | 10,
    Ring = KIND_BASE | 11,
    Published = KIND_BASE | 12,
}

impl Kind {
    pub(crate) fn from_u32(v: u32) -> Option<Kind> {
        Some(match v.checked_sub(KIND_BASE)? {
            1 => Kind::Free,
            2 => Kind::Root,
            3 => Kind::Cell,
            4 => Kind::Vec,
            5 => Kind::VecData,
            6 => Kind::Map,
            7 => Kind::MapTable,
            8 => Kind::Bytes,
            9 => Kind::Log,
            10 => Kind::LogChunk,
            11 => Kind::Ring,
            12 => Kind::Published,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Free => "free block",
            Kind::Root => "root",
            Kind::Cell => "cell",
            Kind::Vec => "vec header",
            Kind::VecData => "vec data",
            Kind::Map => "map header",
            Kind::MapTable => "map table",
            Kind::Bytes => "byte string",
            Kind::Log => "log header",
            Kind::LogChunk => "log chunk",
            Kind::Ring => "ring",
            Kind::Published => "published value",
        }
    }
}

/// Payload sizes of the structure headers.
pub(crate) const VEC_HEADER: u64 = 32; // len, cap, data, elem_size u32, elem_align u32
pub(crate) const MAP_HEADER: u64 = 48; // len, tombs, cap, table, key kind/size, val kind/size
pub(crate) const LOG_HEADER: u64 = 32; // count, bytes, first chunk, last chunk
pub(crate) const CHUNK_HEADER: u64 = 16; // next chunk, used bytes
pub(crate) const LOG_RECORD_HEADER: u64 = 8; // len u32, reserved u32

const HEAD_CHECK_SALT: u64 = 0x5AC3;
const HEAD_OFFSET_BITS: u32 = 48;

/// The check of a free-list head's offset: its three 16-bit limbs XORed
/// together, XOR a salt with several bits set, so that no single flipped
/// bit of the word (an empty head's included) gives a valid head.
#[inline]
fn head_check(off: u64) -> u64 {
    (off ^ (off >> 16) ^ (off >> 32) ^ HEAD_CHECK_SALT) & 0xFFFF
}

/// The stored form of a free-list head pointing at the block at `off`
/// (0: an empty list). Offsets are below 2^48 (`mem::MAX_BACKING`).
#[inline]
pub(crate) fn free_head(off: u64) -> u64 {
    if off == 0 {
        return 0;
    }
    debug_assert!(off < 1 << HEAD_OFFSET_BITS);
    off | (head_check(off) << HEAD_OFFSET_BITS)
}

/// Reads the free-list head stored at `at`: the block offset (0: empty),
/// or damage.
#[inline]
pub(crate) fn read_free_head(mem: &Mem, at: u64) -> Result<u64> {
    let word = u64_at(mem, "free list head", at)?;
    if word == 0 {
        return Ok(0);
    }
    let off = word & ((1 << HEAD_OFFSET_BITS) - 1);
    if off == 0 || word >> HEAD_OFFSET_BITS != head_check(off) {
        return Err(bad_free_head(at, word));
    }
    Ok(off)
}

#[cold]
#[inline(never)]
fn bad_free_head(at: u64, word: u64) -> Error {
    Error::corrupt(
        "free list head",
        at,
        format!("{word:#018x} fails its check (damaged memory)"),
    )
}

/// Little-endian field access on a region.
#[inline]
pub(crate) fn u64_at(mem: &Mem, what: &'static str, off: u64) -> Result<u64> {
    let b = mem.bytes(what, off, 8)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

#[inline]
pub(crate) fn u32_at(mem: &Mem, what: &'static str, off: u64) -> Result<u32> {
    let b = mem.bytes(what, off, 4)?;
    Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

/// The CRC-32 of the superblock (bytes `0..SB_CRC`).
pub(crate) fn superblock_crc(mem: &Mem) -> Result<u32> {
    Ok(crc32fast::hash(mem.bytes("superblock", 0, SB_CRC)?))
}

/// The CRC-32 of the dynamic header (bytes `DY_START..DY_CRC`).
pub(crate) fn dynamic_crc(mem: &Mem) -> Result<u32> {
    Ok(crc32fast::hash(mem.bytes(
        "dynamic header",
        DY_START,
        DY_CRC - DY_START,
    )?))
}

/// The payload size of a size class.
pub(crate) fn class_size(class: u32) -> u64 {
    1u64 << class
}

/// The smallest class whose payload holds `len` bytes (checked before any
/// arithmetic, so that no length can overflow it).
pub(crate) fn class_for(len: u64) -> Result<u32> {
    if len > class_size(MAX_CLASS) {
        return Err(Error::TooLarge {
            what: "allocation",
            len,
        });
    }
    Ok(len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS))
}

/// A validated block: its offset, kind, class and aux word.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Block {
    pub off: u64,
    pub kind: Kind,
    pub class: u32,
    pub aux: u64,
}

impl Block {
    /// The payload's offset.
    pub(crate) fn payload(&self) -> u64 {
        self.off + BLOCK_HEADER
    }

    /// The payload's capacity in bytes.
    pub(crate) fn capacity(&self) -> u64 {
        class_size(self.class)
    }

    /// Reads and validates the block at `off`: inside the heap, aligned, a
    /// known kind and class, ending at or before the heap top.
    #[inline(always)]
    pub(crate) fn read(mem: &Mem, heap: (u64, u64), off: u64) -> Result<Block> {
        Block::check_offset(heap, off)?;
        let h = mem.bytes("block header", off, BLOCK_HEADER)?;
        Block::decode(heap, off, h.try_into().expect("16"))
    }

    /// Checks that `off` may be a block of the heap `heap`: 16-aligned,
    /// inside it.
    #[inline(always)]
    pub(crate) fn check_offset(heap: (u64, u64), off: u64) -> Result<()> {
        let (heap_off, heap_top) = heap;
        if off < heap_off || off >= heap_top || !off.is_multiple_of(16) {
            return Err(bad_block_offset(off, heap));
        }
        Ok(())
    }

    /// Validates the header `h` of the block at `off` (an offset that
    /// passed [`Block::check_offset`]): a known kind and class, ending at
    /// or before the heap top.
    #[inline(always)]
    pub(crate) fn decode(heap: (u64, u64), off: u64, h: &[u8; 16]) -> Result<Block> {
        let heap_top = heap.1;
        let kind_raw = u32::from_le_bytes(h[0..4].try_into().expect("4"));
        let class = u32::from_le_bytes(h[4..8].try_into().expect("4"));
        let aux = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let Some(kind) = Kind::from_u32(kind_raw) else {
            return Err(bad_block(off, format!("unknown kind {kind_raw:#x}")));
        };
        if !(MIN_CLASS..=MAX_CLASS).contains(&class) {
            return Err(bad_block(off, format!("size class {class} out of range")));
        }
        let end = off.checked_add(BLOCK_HEADER + class_size(class));
        if end.is_none_or(|e| e > heap_top) {
            return Err(bad_block(
                off,
                format!("class {class} block runs past the heap top {heap_top:#x}"),
            ));
        }
        Ok(Block {
            off,
            kind,
            class,
            aux,
        })
    }

    /// Like [`Block::read`], and checks the kind.
    #[inline(always)]
    pub(crate) fn expect(mem: &Mem, heap: (u64, u64), off: u64, kind: Kind) -> Result<Block> {
        Block::read(mem, heap, off)?.of_kind(kind)
    }

    /// Checks the kind of a decoded block.
    #[inline(always)]
    pub(crate) fn of_kind(self, kind: Kind) -> Result<Block> {
        if self.kind != kind {
            return Err(wrong_kind(self, kind));
        }
        Ok(self)
    }

    /// Checks that the payload holds at least `len` bytes.
    #[inline(always)]
    pub(crate) fn need(self, len: u64) -> Result<Block> {
        if len > self.capacity() {
            return Err(too_small(self, len));
        }
        Ok(self)
    }
}

// The error paths of `Block`, kept out of line so that the checks inline.

#[cold]
#[inline(never)]
fn bad_block_offset(off: u64, (heap_off, heap_top): (u64, u64)) -> Error {
    Error::corrupt(
        "block offset",
        off,
        format!("not a 16-aligned offset inside the heap {heap_off:#x}..{heap_top:#x}"),
    )
}

#[cold]
#[inline(never)]
fn bad_block(off: u64, problem: String) -> Error {
    Error::corrupt("block header", off, problem)
}

#[cold]
#[inline(never)]
fn wrong_kind(b: Block, kind: Kind) -> Error {
    Error::corrupt(
        kind.name(),
        b.off,
        format!("block holds a {}, not a {}", b.kind.name(), kind.name()),
    )
}

#[cold]
#[inline(never)]
fn too_small(b: Block, len: u64) -> Error {
    Error::corrupt(
        b.kind.name(),
        b.off,
        format!("needs {len} bytes but the block holds {}", b.capacity()),
    )
}

/// Encodes a block header.
pub(crate) fn block_header(kind: Kind, class: u32, aux: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
    h[4..8].copy_from_slice(&class.to_le_bytes());
    h[8..16].copy_from_slice(&aux.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `committed_from_open` gives what `tx_word` gives, for any
        /// sequence number, and the word decodes as committed.
        #[test]
        fn the_committed_word_follows_from_the_open_one(seq in 0..=MAX_SEQ) {
            let committed = committed_from_open(tx_word(seq, true));
            prop_assert_eq!(committed, tx_word(seq, false));
            prop_assert_eq!(read_tx_word(committed).unwrap(), (seq, false));
        }
    }
}
