//! Looking at a region before anything is written to it: what it holds
//! (blank, being created, a state) and whether its header and dynamic
//! header are sound. Read-only.

use crate::error::{Error, Result, StoredLayout};
use crate::format::*;
use crate::journal;
use crate::mem::Mem;
use crate::tx::heap_bounds;

/// What a look at the region before the lock found.
pub(crate) enum Peek {
    /// The header is zero (but for the atomic words): a new state, if the
    /// rest of the region is zero too (checked under the lock).
    Blank,
    /// A header of this format, or one being created.
    Ours,
}

/// Looks at the header before the lock is held, with atomic loads only
/// (another opener may be creating the region right now). Foreign data,
/// other formats and truncated regions are refused here, before anything
/// is written.
pub(crate) fn peek(mem: &mut Mem) -> Result<Peek> {
    // The magic is read first and the rest after it, so a creation that
    // begins in between looks like data under a zero magic: a look that
    // finds that is taken again (a creation stores its magic within
    // microseconds), and refused only when a look a moment later agrees.
    let mut tries = 0;
    loop {
        match peek_once(mem) {
            Err(e) if tries < 3 && read_under_a_zero_magic(&e) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// Whether `e` is what a look finds when it read a zero magic: foreign
/// data, or a header whose magic alone is gone.
fn read_under_a_zero_magic(e: &Error) -> bool {
    match e {
        Error::NotAState { found } => *found == [0; 8],
        Error::Corrupted(c) => c.what == "magic",
        _ => false,
    }
}

fn peek_once(mem: &mut Mem) -> Result<Peek> {
    mem.refresh()?;
    let len = mem.len().min(HEADER_LEN);
    let mut head = vec![0u8; len as usize];
    let words = len / 8;
    for i in 0..words {
        let w = mem.load_u64(i * 8)?;
        head[(i * 8) as usize..][..8].copy_from_slice(&w.to_le_bytes());
    }
    for off in words * 8..len {
        head[off as usize] = mem.load_u8(off)?;
    }
    if head
        .iter()
        .enumerate()
        .all(|(i, &b)| b == 0 || touches_atomics(i as u64, 1))
    {
        return Ok(Peek::Blank);
    }
    let mut magic = [0u8; 8];
    let n = head.len().min(8);
    magic[..n].copy_from_slice(&head[..n]);
    if &magic == MAGIC || &magic == CREATING_MAGIC {
        if mem.len() < HEADER_LEN {
            return Err(Error::Truncated {
                needed: HEADER_LEN,
                len: mem.len(),
            });
        }
        // The format is written before the final magic and never again.
        let format = u32::from_le_bytes(head[SB_FORMAT as usize..][..4].try_into().expect("4"));
        if &magic == MAGIC && !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&format) {
            return Err(Error::UnsupportedFormat {
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        return Ok(Peek::Ours);
    }
    if magic == [0; 8] && head.len() as u64 == HEADER_LEN {
        // A shm-state header (of any format) whose magic alone is gone is
        // damage, not foreign data: say so, and leave it alone.
        let mut sb = head[..SB_CRC as usize].to_vec();
        sb[..8].copy_from_slice(MAGIC);
        let stored = u32::from_le_bytes(head[SB_CRC as usize..][..4].try_into().expect("4"));
        if crc32fast::hash(&sb) == stored {
            return Err(Error::corrupt(
                "magic",
                SB_MAGIC,
                "erased from an otherwise valid shm-state header; refusing to create a state over it",
            ));
        }
    }
    Err(Error::NotAState { found: magic })
}

/// What the header says, read under the lock.
pub(crate) enum Found {
    /// Nothing of a state yet (blank, or a creation cut short before it
    /// stored anything else): create one.
    Fresh,
    Existing,
}

/// True when every byte of `off..` is zero.
pub(crate) fn zero_from(mem: &Mem, off: u64) -> Result<bool> {
    let len = mem.len().saturating_sub(off);
    Ok(mem
        .bytes("region", off.min(mem.len()), len)?
        .iter()
        .all(|&b| b == 0))
}

/// Decides, holding the lock, whether to create the state. A blank header
/// or a creation cut short is created (again) only if nothing else in the
/// region was ever written: no transaction ran (commit word 0, or the
/// sequence-0 word a creation stores before its final magic), the dynamic
/// header holds no generation, root or allocation, and every byte after
/// the lock words is zero. Anything else is damage and is refused.
pub(crate) fn inspect(mem: &Mem) -> Result<Found> {
    if mem.len() < HEADER_LEN {
        return Err(Error::Truncated {
            needed: HEADER_LEN,
            len: mem.len(),
        });
    }
    let below = mem.bytes("header", 0, TX_WORD)?;
    let magic: [u8; 8] = below[..8].try_into().expect("8");
    if &magic == MAGIC {
        return Ok(Found::Existing);
    }
    let tx = mem.load_u64(TX_WORD)?;
    // The shared line and the peer table may hold this opener's own words.
    let untouched = (tx == 0 || tx == tx_word(0, false))
        && mem
            .bytes("header", ATOMIC_END, SHARED_START - ATOMIC_END)?
            .iter()
            .all(|&b| b == 0)
        && zero_from(mem, HEADER_LEN)?;
    let blank = magic == [0; 8] && below.iter().all(|&b| b == 0);
    if blank || &magic == CREATING_MAGIC {
        let dynamic_empty = [DY_GENERATION, DY_ROOT, DY_USED]
            .iter()
            .all(|&off| below[off as usize..][..8] == [0; 8]);
        if untouched && dynamic_empty {
            return Ok(Found::Fresh);
        }
        let problem = if blank {
            "the header is all zero but the region holds data (a damaged state?); refusing to create a state over it"
        } else {
            "a creation was cut short, yet the region holds data; refusing to create a state over it"
        };
        return Err(Error::corrupt("header", 0, problem));
    }
    Err(Error::NotAState { found: magic })
}

/// Validates the superblock (the geometry, written at creation and, by
/// the journaled opening transaction, when an older format is upgraded);
/// returns `(journal_len, heap_off)`.
pub(crate) fn check_superblock(mem: &Mem) -> Result<(u64, u64)> {
    check_superblock_crc(mem)?;
    superblock_geometry(mem)
}

/// The superblock's checksum. An open finding a transaction open checks
/// it after the rollback instead (an upgrade rewrites the superblock in a
/// transaction, so a crash may leave it half written, with its
/// before-image in the journal).
pub(crate) fn check_superblock_crc(mem: &Mem) -> Result<()> {
    let stored_crc = u32_at(mem, "superblock checksum", SB_CRC)?;
    let crc = superblock_crc(mem)?;
    if crc != stored_crc {
        return Err(Error::corrupt(
            "superblock checksum",
            SB_CRC,
            format!("stored {stored_crc:#010x}, computed {crc:#010x}"),
        ));
    }
    Ok(())
}

/// The superblock's format and geometry, each checked (not its checksum:
/// see [`check_superblock_crc`]); returns `(journal_len, heap_off)`.
pub(crate) fn superblock_geometry(mem: &Mem) -> Result<(u64, u64)> {
    let format = u32_at(mem, "format version", SB_FORMAT)?;
    if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&format) {
        return Err(Error::UnsupportedFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    let header_len = u32_at(mem, "header length", SB_HEADER_LEN)?;
    let journal_off = u64_at(mem, "journal offset", SB_JOURNAL_OFF)?;
    let journal_len = u64_at(mem, "journal length", SB_JOURNAL_LEN)?;
    let heap_off = u64_at(mem, "heap offset", SB_HEAP_OFF)?;
    let flags = u32_at(mem, "flags", SB_FLAGS)?;
    if u64::from(header_len) != HEADER_LEN
        || journal_off != JOURNAL_OFF
        || journal_len < 4096
        || !journal_len.is_multiple_of(LINE)
        || journal_len > journal::MAX_JOURNAL_LEN
        || JOURNAL_OFF.checked_add(journal_len) != Some(heap_off)
        || flags != 0
    {
        return Err(Error::corrupt(
            "superblock",
            0,
            format!(
                "inconsistent geometry (header {header_len}, journal {journal_off:#x}+{journal_len:#x}, heap {heap_off:#x}, flags {flags:#x})"
            ),
        ));
    }
    check_reserved(mem, SB_RESERVED, SB_CRC)?;
    if heap_off > mem.len() {
        return Err(Error::Truncated {
            needed: heap_off,
            len: mem.len(),
        });
    }
    Ok((journal_len, heap_off))
}

pub(crate) fn check_reserved(mem: &Mem, start: u64, end: u64) -> Result<()> {
    let reserved = mem.bytes("reserved header bytes", start, end - start)?;
    match reserved.iter().position(|&b| b != 0) {
        Some(i) => Err(Error::corrupt(
            "reserved header bytes",
            start + i as u64,
            format!("must be zero in format {FORMAT_VERSION}"),
        )),
        None => Ok(()),
    }
}

/// The root layout recorded in the dynamic header.
pub(crate) fn read_layout(mem: &Mem) -> Result<StoredLayout> {
    Ok(StoredLayout {
        version: u32_at(mem, "user version", DY_USER_VERSION)?,
        root_size: u32_at(mem, "root size", DY_ROOT_SIZE)?,
        root_align: u32_at(mem, "root alignment", DY_ROOT_ALIGN)?,
    })
}

/// Validates the dynamic header (after any recovery); returns the stored
/// root layout.
pub(crate) fn check_dynamic(mem: &Mem, heap_off: u64) -> Result<StoredLayout> {
    let stored = u32_at(mem, "header checksum", DY_CRC)?;
    let crc = dynamic_crc(mem)?;
    if crc != stored {
        return Err(Error::corrupt(
            "header checksum",
            DY_CRC,
            format!("stored {stored:#010x}, computed {crc:#010x}"),
        ));
    }
    let heap = heap_bounds(mem, heap_off)?;
    let layout = read_layout(mem)?;
    if u64::from(layout.root_size) > mem.len() {
        // A root that could never fit the region: damage (and a migration
        // must not allocate that much to hand the old root over).
        return Err(Error::corrupt(
            "root size",
            DY_ROOT_SIZE,
            format!(
                "{} bytes, more than the whole region ({} bytes)",
                layout.root_size,
                mem.len()
            ),
        ));
    }
    if !layout.root_align.is_power_of_two() || layout.root_align > 16 {
        return Err(Error::corrupt(
            "root alignment",
            DY_ROOT_ALIGN,
            format!("{} is not a power of two up to 16", layout.root_align),
        ));
    }
    let root = u64_at(mem, "root offset", DY_ROOT)?;
    if root != 0 {
        Block::expect(mem, heap, root, Kind::Root)?.need(u64::from(layout.root_size))?;
    }
    for class in 0..FREE_SLOTS as u32 {
        let head_off = FREE_HEADS + u64::from(class) * 8;
        let head = read_free_head(mem, head_off)?;
        if head == 0 {
            continue;
        }
        let b = Block::expect(mem, heap, head, Kind::Free)?;
        if b.class != class {
            return Err(Error::corrupt(
                "free list",
                head_off,
                format!("head of class {class} is a class {} block", b.class),
            ));
        }
    }
    // The shared line and the peer table (0x300..0x1000, entries 64..68
    // at 0x340 included) are judged, not required zero: a format 4 region
    // holds zeros there, which read as "free", and a peer of this build
    // may take an entry at 0x340 before its open upgrades a format 5
    // region.
    check_reserved(mem, FREE_HEADS + FREE_SLOTS * 8, SHARED_START)?;
    Ok(layout)
}
