//! Opening a region: creating a state in a blank one, taking the lock,
//! and preparing a state for use (recovery, migration), reported as an
//! [`OpenReport`].

use crate::check::{
    Found, check_dynamic, check_superblock, check_superblock_crc, inspect, superblock_geometry,
};
use crate::error::{Error, Result, StoredLayout};
use crate::format::*;
use crate::journal;
use crate::layout::Layout;
use crate::lock::{self, Claim, LockCells, LockWords};
use crate::mem::Mem;
use crate::owner;
use crate::snapshot::Publisher;
use bytemuck::Pod;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// How an open found the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The region was empty: a new state was created.
    Created,
    /// The region held a state whose last transaction had committed.
    Reopened,
    /// The previous owner died inside a transaction, which was rolled back.
    Recovered {
        /// How many journal records were written back.
        records: usize,
    },
}

impl fmt::Display for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Opened::Created => write!(f, "created"),
            Opened::Reopened => write!(f, "reopened"),
            Opened::Recovered { records } => write!(
                f,
                "recovered (an interrupted transaction was rolled back, {records} records)"
            ),
        }
    }
}

/// What [`State::open`](crate::State::open) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Created, reopened or recovered.
    pub opened: Opened,
    /// The open counter, one more on every open (1 for a new state).
    pub generation: u64,
    /// The pid of the previous opener (0 for a new state).
    pub previous_pid: u32,
    /// The lock word still named a dead process, whose lock was taken over.
    pub took_over_from: Option<u32>,
    /// The layout migrated from, if a migration ran.
    pub migrated_from: Option<StoredLayout>,
    /// The region's format before this open upgraded it (4: see
    /// `docs/state-format.md`, *Format history*).
    pub upgraded_from: Option<u32>,
}

impl fmt::Display for OpenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, generation {}", self.opened, self.generation)?;
        if let Some(from) = self.migrated_from {
            write!(f, ", migrated from {from}")?;
        }
        if let Some(format) = self.upgraded_from {
            write!(f, ", upgraded from format {format}")?;
        }
        Ok(())
    }
}

/// Creates a state in a region that holds nothing (see [`inspect`]): the
/// creating magic first (one atomic store), then the header, then the
/// commit word of sequence 0, then the final magic. The lock words are left
/// alone (the lock is held).
pub(crate) fn create(
    mem: &mut Mem,
    journal_len: u64,
    initial_len: u64,
    root: StoredLayout,
) -> Result<()> {
    // The sizes were checked by `Layout::check` before the open began.
    let heap_off = JOURNAL_OFF
        .checked_add(journal_len)
        .ok_or(Error::TooLarge {
            what: "journal",
            len: journal_len,
        })?;
    let total = heap_off
        .checked_add(initial_len)
        .and_then(|t| t.checked_next_multiple_of(1 << 16))
        .ok_or(Error::TooLarge {
            what: "initial heap",
            len: initial_len,
        })?;
    mem.grow(total)?;
    let mut h = [0u8; TX_WORD as usize];
    let put = |h: &mut [u8], off: u64, bytes: &[u8]| {
        h[off as usize..off as usize + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut h, SB_MAGIC, MAGIC);
    put(&mut h, SB_FORMAT, &FORMAT_VERSION.to_le_bytes());
    put(&mut h, SB_HEADER_LEN, &(HEADER_LEN as u32).to_le_bytes());
    put(&mut h, SB_JOURNAL_OFF, &JOURNAL_OFF.to_le_bytes());
    put(&mut h, SB_JOURNAL_LEN, &journal_len.to_le_bytes());
    put(&mut h, SB_HEAP_OFF, &heap_off.to_le_bytes());
    let sb_crc = crc32fast::hash(&h[..SB_CRC as usize]);
    put(&mut h, SB_CRC, &sb_crc.to_le_bytes());
    put(&mut h, DY_HEAP_TOP, &heap_off.to_le_bytes());
    put(&mut h, DY_USER_VERSION, &root.version.to_le_bytes());
    put(&mut h, DY_ROOT_SIZE, &root.root_size.to_le_bytes());
    put(&mut h, DY_ROOT_ALIGN, &root.root_align.to_le_bytes());
    let dy_crc = crc32fast::hash(&h[DY_START as usize..DY_CRC as usize]);
    put(&mut h, DY_CRC, &dy_crc.to_le_bytes());
    mem.store_word(SB_MAGIC, u64::from_le_bytes(*CREATING_MAGIC))?;
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    mem.write("header", 8, &h[8..])?;
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    mem.store_word(TX_WORD, tx_word(0, false))?;
    mem.store_word(SB_MAGIC, u64::from_le_bytes(*MAGIC))?;
    Ok(())
}

/// The lock words of `mem` as atomic cells.
pub(crate) fn lock_cells(mem: &Mem) -> Result<LockCells<'_, AtomicU64>> {
    Ok(LockCells {
        word: mem.atomic_u64(LOCK_PID)?,
        start: mem.atomic_u64(LOCK_START)?,
        nonce: mem.atomic_u64(LOCK_NONCE)?,
        boot: mem.atomic_u64(LOCK_BOOT)?,
        boot_hi: Some(mem.atomic_u64(LOCK_BOOT + 8)?),
        dev: mem.atomic_u64(LOCK_DEV)?,
        ino: mem.atomic_u64(LOCK_INO)?,
    })
}

/// Takes the lock of `mem` for this process's handle `nonce` (registered
/// on `mem`'s memory, see [`owner::register_handle`]; see [`lock::claim`]),
/// judging a holder it finds with [`owner::holds`]. Returns the claim, the
/// nonce word stored, and the holder whose lock was taken over (dead, or a
/// holder of other memory).
pub(crate) fn lock(mem: &Mem, nonce: u64) -> Result<(Claim, u64, Option<u32>)> {
    let cells = lock_cells(mem)?;
    let ours = mem.identity();
    // Read before the claim, so that the claiming window is a few stores.
    let mine = owner::sealed(LockWords {
        word: u64::from(std::process::id()),
        start: owner::own_start_time(),
        nonce,
        boot: owner::boot_id(),
        dev: ours.dev,
        ino: ours.ino,
    });
    let (claim, took_over) = lock::claim(&cells, std::process::id(), &mine, |found, claiming| {
        owner::holds(found, ours, claiming, nonce)
    })
    .map_err(|pid| Error::Locked { pid })?;
    Ok((claim, mine.nonce, took_over))
}

/// What an open does around its common steps: how it takes the open lock,
/// what it checks holding it, and what it undoes or finishes after.
pub(crate) trait OpenHooks {
    /// Takes the open lock (see [`lock`]).
    fn lock(&mut self, mem: &Mem, nonce: u64) -> Result<(Claim, u64, Option<u32>)>;
    /// Holding the open lock, before the region is read for the open. On
    /// an error, undoes its own work.
    fn locked(&mut self, mem: &Mem, nonce: u64) -> Result<()>;
    /// The open failed after [`OpenHooks::locked`].
    fn failed(&mut self, mem: &Mem);
    /// The open succeeded (the opening transaction committed).
    fn opened(&mut self, mem: &Mem);
    /// The stored layout differs and a migration would run: refused when
    /// the migration cannot be done now.
    fn may_migrate(&mut self, _mem: &Mem) -> Result<()> {
        Ok(())
    }
    /// The region is of the older format `from`: whether the opening
    /// transaction may upgrade it to [`FORMAT_VERSION`] now (a shared
    /// open does not upgrade a format 5 or 6 region while another process,
    /// perhaps of an older build, shares it).
    fn may_upgrade(&mut self, _mem: &Mem, _from: u32) -> bool {
        true
    }
}

/// An exclusive open ([`State::open`](crate::State::open)): the open lock
/// is the state's lock for as long as the handle lives, and is refused
/// while a live process shares the state.
#[derive(Debug, Default)]
pub(crate) struct Exclusive {
    page: Option<crate::shared::page::SharedPage>,
    nonce: u64,
}

impl OpenHooks for Exclusive {
    fn lock(&mut self, mem: &Mem, nonce: u64) -> Result<(Claim, u64, Option<u32>)> {
        lock(mem, nonce)
    }

    fn locked(&mut self, mem: &Mem, nonce: u64) -> Result<()> {
        let Some(map) = mem.map_header()? else {
            return Ok(()); // a heap buffer: no other process can share it
        };
        let page = crate::shared::page::SharedPage::new(map)?;
        // Pairs with the fence after a peer's registration: either the
        // peer sees this lock, or this sees its entry.
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(&(_, pid)) =
            crate::shared::peers::live_peers(&page, mem.identity(), nonce).first()
        {
            return Err(Error::Locked { pid });
        }
        self.page = Some(page);
        self.nonce = nonce;
        Ok(())
    }

    fn failed(&mut self, _mem: &Mem) {}

    fn opened(&mut self, mem: &Mem) {
        // No live peer (checked under the lock): entries and a writer lock
        // left by dead ones are stale. Cleared only now, so that a refused
        // open leaves the region as it was.
        if let Some(page) = self.page.take() {
            crate::shared::peers::reclaim_dead(&page, mem.identity(), self.nonce);
            page.wlock().store(0, Ordering::Release);
            // A reader killed while counted left the count up for good.
            page.u64(READ_WAITERS).store(0, Ordering::Release);
            page.u64(RING_WAITERS).store(0, Ordering::Release);
        }
    }
}

/// Puts the lock words back as they were found (see [`lock::unlock`]).
pub(crate) fn unlock(mem: &Mem, claim: Claim) {
    if let Ok(cells) = lock_cells(mem) {
        lock::unlock(&cells, claim);
    }
}

/// Releases a held lock (see [`lock::release`]).
pub(crate) fn release_lock(mem: &Mem, held: u64, nonce: u64) {
    if let Ok(cells) = lock_cells(mem) {
        lock::release(&cells, held, nonce);
    }
}

/// What the steps of an open under the lock found.
pub(crate) struct Prepared {
    pub(crate) journal_len: u64,
    pub(crate) heap_off: u64,
    pub(crate) stored: StoredLayout,
    pub(crate) opened: Opened,
    pub(crate) publisher: Publisher,
}

/// The steps of an open that run under the lock before the state handle
/// exists: creation, the superblock, recovery, the dynamic header.
///
/// Everything recovery relies on (the superblock, the commit word, the
/// journal records) is checked before anything is written, so that damage
/// leaves the region as it was; then the commit publisher is attached, and
/// only then does creation or recovery write, inside an update, so that a
/// snapshot copied meanwhile is never taken for a committed state.
pub(crate) fn prepare(
    mem: &mut Mem,
    layout: &mut Layout<impl Pod>,
    expected: StoredLayout,
) -> Result<Prepared> {
    // Another process may have grown the backing since it was mapped.
    mem.refresh()?;
    let recovery = match inspect(mem)? {
        Found::Fresh => None,
        Found::Existing => {
            let (seq, open) = read_tx_word(mem.load_u64(TX_WORD)?)?;
            // An interrupted upgrade may have left the superblock half
            // rewritten: its checksum is checked after the rollback.
            let geometry = if open {
                superblock_geometry(mem)?
            } else {
                check_superblock(mem)?
            };
            let open_seq = u64_at(mem, "open sequence", DY_OPEN_SEQ)?;
            if seq < open_seq {
                return Err(Error::corrupt(
                    "commit word",
                    TX_WORD,
                    format!(
                        "sequence {seq} is below the last open's {open_seq}: the word went back (damaged memory)"
                    ),
                ));
            }
            // Recovery needs only the geometry: everything it restores (the
            // root, the layout, the dynamic header) is validated after it.
            let records = if open {
                Some(journal::recovery_records(mem, geometry.0, seq)?)
            } else {
                None
            };
            Some((geometry, seq, records))
        }
    };
    let mut publisher = if layout.snapshot_protocol {
        let publisher = Publisher::attach_protocol(mem)?;
        // The open turned the dirty map off; this state marks every write.
        mem.enable_dirty_map()?;
        publisher
    } else {
        Publisher::new(layout.commit_hook.take())
    };
    let ((journal_len, heap_off), opened, stored) = match recovery {
        None => {
            publisher.begin_update();
            let created = create(mem, layout.journal_len, layout.initial_len, expected);
            // A creation that failed (growing the backing) wrote nothing:
            // the protocol page goes back to its committed value either way.
            publisher.commit();
            created?;
            let geometry = check_superblock(mem)?;
            let stored = check_dynamic(mem, geometry.1)?;
            (geometry, Opened::Created, stored)
        }
        Some((geometry, _, None)) => {
            let stored = check_dynamic(mem, geometry.1)?;
            (geometry, Opened::Reopened, stored)
        }
        Some((geometry, seq, Some(records))) => {
            let stored = rollback_checked(mem, &records, seq, geometry.1, &mut publisher)?;
            let opened = Opened::Recovered {
                records: records.len(),
            };
            (geometry, opened, stored)
        }
    };
    // The journal means nothing between transactions: a snapshot taken
    // then may keep an older copy of it.
    mem.declare_scratch(crate::format::JOURNAL_OFF, journal_len)?;
    Ok(Prepared {
        journal_len,
        heap_off,
        stored,
        opened,
        publisher,
    })
}

/// Rolls back the interrupted transaction `seq` (its `records`, already
/// validated) inside an update of `publisher`, then checks the dynamic
/// header; damage found then (in header lines the interrupted transaction
/// did not journal) undoes the rollback, so the region is left exactly as
/// it was found.
fn rollback_checked(
    mem: &mut Mem,
    records: &[journal::Record],
    seq: u64,
    heap_off: u64,
    publisher: &mut Publisher,
) -> Result<StoredLayout> {
    let found = journal::current_images(mem, records)?;
    publisher.begin_update();
    journal::apply_rollback(mem, records, seq)?;
    let checked = check_superblock_crc(mem).and_then(|()| check_dynamic(mem, heap_off));
    if checked.is_err() {
        journal::undo_rollback(mem, records, &found, seq)?;
        // The interrupted transaction is open again and its journal
        // matters: the update stays open, so a snapshot taken now keeps
        // the journal (it is scratch only between updates).
        return checked;
    }
    publisher.commit();
    checked
}

/// Recovery outside an open: a shared state's writer that took the writer
/// lock from a holder that died. If the commit word says a transaction is
/// open, its journal is checked and rolled back (see [`prepare`]); returns
/// the number of records written back, `None` when nothing was open.
pub(crate) fn recover(
    mem: &mut Mem,
    journal_len: u64,
    heap_off: u64,
    publisher: &mut Publisher,
) -> Result<Option<usize>> {
    let (seq, open) = read_tx_word(mem.load_u64(TX_WORD)?)?;
    if !open {
        return Ok(None);
    }
    let records = journal::recovery_records(mem, journal_len, seq)?;
    rollback_checked(mem, &records, seq, heap_off, publisher)?;
    Ok(Some(records.len()))
}
