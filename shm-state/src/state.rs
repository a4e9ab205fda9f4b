//! Opening a state: creating, validating, recovering, locking, migrating;
//! and the typed handle with its transactions.

use std::fmt;
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::Pod;
use shm_fd::SharedFd;

use crate::error::{Error, Result, StoredLayout};
use crate::format::*;
use crate::journal;
use crate::lock::{self, Claim, LockCells, LockWords};
use crate::mem::{Backing, HeaderPage, Mem};
use crate::owner;
use crate::snapshot::{CommitHook, Publisher};
use crate::tx::{Core, TxCore, heap_bounds};

/// Where a state's bytes live.
///
/// A heap buffer is safe to use as it is. A memfd or a file is memory other
/// processes can reach, so building a source from one is `unsafe`: see the
/// constructors' contracts.
#[derive(Debug)]
pub struct Source(SourceKind);

#[derive(Debug)]
enum SourceKind {
    Heap(Vec<u8>),
    Shared(SharedFd),
    File(File),
}

impl Source {
    /// A region in a heap buffer (empty for a new state, or the bytes of a
    /// closed one, e.g. from [`State::close`] or [`State::image`]).
    pub fn heap(bytes: Vec<u8>) -> Source {
        Source(SourceKind::Heap(bytes))
    }

    /// The shared memfd (e.g. `SharedFd::from_env(shm_fd::DEFAULT_NAME)`).
    ///
    /// # Safety
    ///
    /// While the state is open:
    /// - no other process writes the memfd, except shm-state itself (whose
    ///   lock word refuses a second opener) and a snapshot restore of a
    ///   stopped program;
    /// - the memfd is not truncated (the watcher's `F_SEAL_SHRINK`, on by
    ///   default in `shm-fd`, guarantees this).
    pub unsafe fn shared(fd: SharedFd) -> Source {
        Source(SourceKind::Shared(fd))
    }

    /// A regular file, opened for reading and writing.
    ///
    /// # Safety
    ///
    /// Same contract as [`Source::shared`]: no other writer, and the file is
    /// not truncated while the state is open (nothing seals a file; a
    /// truncation kills this process with SIGBUS).
    ///
    /// # Durability
    ///
    /// Commits are not flushed to disk (no `msync` per transaction): the
    /// file survives the process's crash like a memfd, but not a machine
    /// crash, after which it may hold any mix of old and new pages.
    /// [`State::close`] flushes it. Use shm-restore snapshots to survive
    /// machine crashes.
    pub unsafe fn file(file: File) -> Source {
        Source(SourceKind::File(file))
    }

    /// The heap bytes, if this is a heap source.
    pub fn into_heap(self) -> Option<Vec<u8>> {
        match self.0 {
            SourceKind::Heap(v) => Some(v),
            _ => None,
        }
    }

    /// The memfd, if this is a memfd source.
    pub fn into_shared(self) -> Option<SharedFd> {
        match self.0 {
            SourceKind::Shared(fd) => Some(fd),
            _ => None,
        }
    }

    /// The file, if this is a file source.
    pub fn into_file(self) -> Option<File> {
        match self.0 {
            SourceKind::File(f) => Some(f),
            _ => None,
        }
    }
}

/// The old root handed to a migration: the layout it was stored with and a
/// copy of its bytes (read it with `bytemuck::pod_read_unaligned`).
#[derive(Debug, Clone)]
pub struct OldRoot {
    /// The layout recorded in the region.
    pub layout: StoredLayout,
    /// The old root's bytes (`layout.root_size` of them; zeros if the old
    /// state never stored a root).
    pub bytes: Vec<u8>,
}

/// A migration from an older layout: runs inside the transaction that
/// switches the layout, with the new root zeroed. Returning an error leaves
/// the state untouched.
pub type Migrate<R> = Box<dyn FnOnce(&mut Tx<'_, R>, &OldRoot) -> Result<()>>;

/// What the program expects of the state: its root layout version, sizes
/// for a new region, a migration and a commit hook.
pub struct Layout<R> {
    /// The program's layout version, recorded in the region. Bump it when
    /// the meaning of the root changes even if its size does not.
    pub version: u32,
    /// Journal capacity in bytes for a new region (multiple of 64, at least
    /// 4096). Bounds what one transaction may overwrite and free (not what
    /// it may allocate): each 64-byte line it overwrites costs 88 bytes,
    /// each block it frees 40, so the default 1 MiB holds about 11 900
    /// lines or 26 000 freed blocks (clearing a map of byte strings frees
    /// one block per key or value). A transaction past it fails with
    /// [`Error::JournalFull`] and rolls back. Ignored when the region exists.
    pub journal_len: u64,
    /// Initial heap size in bytes for a new region; it grows on demand.
    pub initial_len: u64,
    /// Called when the region's layout differs; without it such a region is
    /// refused with [`Error::LayoutMismatch`].
    pub migrate: Option<Migrate<R>>,
    /// Told about every transaction's start and commit (for a program's
    /// own bookkeeping; ignored when `snapshot_protocol` is on).
    pub commit_hook: Option<Box<dyn CommitHook>>,
    /// Publish every commit through shm-snapshot's protocol: the first page
    /// of the memfd (or file, or buffer) holds shm-snapshot's header and the
    /// shm-state region starts at [`shm_snapshot::DATA_OFFSET`]. A snapshot
    /// taken by shm-snapshot's `Snapshotter` while the program runs is then
    /// always a committed state. Must be the same on every open of a state.
    pub snapshot_protocol: bool,
}

impl<R> Layout<R> {
    /// Default journal capacity: 1 MiB (memfd pages cost nothing until used).
    pub const DEFAULT_JOURNAL_LEN: u64 = 1 << 20;
    /// Default initial heap size: 64 KiB.
    pub const DEFAULT_INITIAL_LEN: u64 = 1 << 16;

    /// Layout `version` with default sizes, no migration, no hook.
    pub fn new(version: u32) -> Layout<R> {
        Layout {
            version,
            journal_len: Self::DEFAULT_JOURNAL_LEN,
            initial_len: Self::DEFAULT_INITIAL_LEN,
            migrate: None,
            commit_hook: None,
            snapshot_protocol: false,
        }
    }

    /// Checks the sizes: a journal of 4096 bytes to 2 GiB in whole 64-byte
    /// lines, and a journal and initial heap that fit the largest region
    /// (2^48 bytes). [`State::open`] calls it first, before it maps or
    /// writes anything, whether or not the region exists yet.
    pub fn check(&self) -> Result<()> {
        if self.journal_len < 4096
            || !self.journal_len.is_multiple_of(LINE)
            || self.journal_len > journal::MAX_JOURNAL_LEN
        {
            return Err(Error::unsupported(format!(
                "journal length {} must be a multiple of 64 from 4096 to 2^31",
                self.journal_len
            )));
        }
        let total = HEADER_LEN
            .checked_add(self.journal_len)
            .and_then(|t| t.checked_add(self.initial_len))
            .filter(|&t| t <= crate::mem::MAX_BACKING);
        if total.is_none() {
            return Err(Error::unsupported(format!(
                "journal length {} plus initial length {} exceed the largest region (2^48 bytes)",
                self.journal_len, self.initial_len
            )));
        }
        Ok(())
    }

    /// Publishes commits through shm-snapshot's protocol (see
    /// [`Layout::snapshot_protocol`]).
    pub fn with_snapshot_protocol(mut self) -> Self {
        self.snapshot_protocol = true;
        self
    }

    /// Sets the journal capacity for a new region.
    pub fn journal_len(mut self, len: u64) -> Self {
        self.journal_len = len;
        self
    }

    /// Sets the initial heap size for a new region.
    pub fn initial_len(mut self, len: u64) -> Self {
        self.initial_len = len;
        self
    }

    /// Supplies the migration from older layouts.
    pub fn migrate(
        mut self,
        f: impl FnOnce(&mut Tx<'_, R>, &OldRoot) -> Result<()> + 'static,
    ) -> Self {
        self.migrate = Some(Box::new(f));
        self
    }

    /// Supplies the commit hook.
    pub fn commit_hook(mut self, hook: impl CommitHook + 'static) -> Self {
        self.commit_hook = Some(Box::new(hook));
        self
    }
}

impl<R> Default for Layout<R> {
    fn default() -> Self {
        Layout::new(1)
    }
}

impl<R> fmt::Debug for Layout<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layout")
            .field("version", &self.version)
            .field("journal_len", &self.journal_len)
            .field("initial_len", &self.initial_len)
            .field("migrate", &self.migrate.is_some())
            .field("commit_hook", &self.commit_hook.is_some())
            .field("snapshot_protocol", &self.snapshot_protocol)
            .finish()
    }
}

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

/// What [`State::open`] did.
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
}

impl fmt::Display for OpenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, generation {}", self.opened, self.generation)?;
        if let Some(from) = self.migrated_from {
            write!(f, ", migrated from {from}")?;
        }
        Ok(())
    }
}

/// A state: a typed root of type `R` and the structures it points to,
/// inside a region of memory, changed only by transactions.
///
/// Reads borrow the state (`&self`); transactions take it mutably, and the
/// region may be remapped only inside one, so no reference into the region
/// outlives a remap.
pub struct State<R> {
    pub(crate) core: Core,
    /// This handle's key in the process's handle registry (0: released).
    nonce: u64,
    /// The lock word while this handle holds it.
    held: u64,
    /// The nonce word it stored (the nonce and the identity's check).
    lock_nonce: u64,
    /// Set while opening: the lock words as found, put back if the open fails.
    restore_lock: Option<LockWords>,
    report: OpenReport,
    _root: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for State<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("root", &std::any::type_name::<R>())
            .field("len", &self.core.mem.len())
            .field("report", &self.report)
            .finish()
    }
}

/// What a look at the region before the lock found.
enum Peek {
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
fn peek(mem: &mut Mem) -> Result<Peek> {
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
    let atomic = TX_WORD as usize..ATOMIC_END as usize;
    if head
        .iter()
        .enumerate()
        .all(|(i, &b)| b == 0 || atomic.contains(&i))
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
        if &magic == MAGIC && format != FORMAT_VERSION {
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
enum Found {
    /// Nothing of a state yet (blank, or a creation cut short before it
    /// stored anything else): create one.
    Fresh,
    Existing,
}

/// True when every byte of `off..` is zero.
fn zero_from(mem: &Mem, off: u64) -> Result<bool> {
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
fn inspect(mem: &Mem) -> Result<Found> {
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
    let untouched = (tx == 0 || tx == tx_word(0, false))
        && mem
            .bytes("header", ATOMIC_END, HEADER_LEN - ATOMIC_END)?
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

/// Creates a state in a region that holds nothing (see [`inspect`]): the
/// creating magic first (one atomic store), then the header, then the
/// commit word of sequence 0, then the final magic. The lock words are left
/// alone (the lock is held).
fn create(mem: &mut Mem, journal_len: u64, initial_len: u64, root: StoredLayout) -> Result<()> {
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

/// Validates the superblock (the geometry, written once at creation);
/// returns `(journal_len, heap_off)`.
fn check_superblock(mem: &Mem) -> Result<(u64, u64)> {
    let format = u32_at(mem, "format version", SB_FORMAT)?;
    if format != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    let stored_crc = u32_at(mem, "superblock checksum", SB_CRC)?;
    let crc = superblock_crc(mem)?;
    if crc != stored_crc {
        return Err(Error::corrupt(
            "superblock checksum",
            SB_CRC,
            format!("stored {stored_crc:#010x}, computed {crc:#010x}"),
        ));
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

fn check_reserved(mem: &Mem, start: u64, end: u64) -> Result<()> {
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
fn read_layout(mem: &Mem) -> Result<StoredLayout> {
    Ok(StoredLayout {
        version: u32_at(mem, "user version", DY_USER_VERSION)?,
        root_size: u32_at(mem, "root size", DY_ROOT_SIZE)?,
        root_align: u32_at(mem, "root alignment", DY_ROOT_ALIGN)?,
    })
}

/// Validates the dynamic header (after any recovery); returns the stored
/// root layout.
fn check_dynamic(mem: &Mem, heap_off: u64) -> Result<StoredLayout> {
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
    for (start, end) in [
        (FREE_HEADS + FREE_SLOTS * 8, PEERS),
        (PEERS, PEERS + PEER_COUNT * PEER_ENTRY),
    ] {
        check_reserved(mem, start, end)?;
    }
    Ok(layout)
}

/// The lock words of `mem` as atomic cells.
fn lock_cells(mem: &Mem) -> Result<LockCells<'_, AtomicU64>> {
    Ok(LockCells {
        word: mem.atomic_u64(LOCK_PID)?,
        start: mem.atomic_u64(LOCK_START)?,
        nonce: mem.atomic_u64(LOCK_NONCE)?,
        boot: [mem.atomic_u64(LOCK_BOOT)?, mem.atomic_u64(LOCK_BOOT + 8)?],
        dev: mem.atomic_u64(LOCK_DEV)?,
        ino: mem.atomic_u64(LOCK_INO)?,
    })
}

/// Takes the lock of `mem` for this process's handle `nonce` (registered
/// on `mem`'s memory, see [`owner::register_handle`]; see [`lock::claim`]),
/// judging a holder it finds with [`owner::holds`]. Returns the claim, the
/// nonce word stored, and the holder whose lock was taken over (dead, or a
/// holder of other memory).
fn lock(mem: &Mem, nonce: u64) -> Result<(Claim, u64, Option<u32>)> {
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

/// Puts the lock words back as they were found (see [`lock::unlock`]).
fn unlock(mem: &Mem, claim: Claim) {
    if let Ok(cells) = lock_cells(mem) {
        lock::unlock(&cells, claim);
    }
}

/// Releases a held lock (see [`lock::release`]).
fn release_lock(mem: &Mem, held: u64, nonce: u64) {
    if let Ok(cells) = lock_cells(mem) {
        lock::release(&cells, held, nonce);
    }
}

fn root_layout<R: Pod>(version: u32) -> Result<StoredLayout> {
    let size = u32::try_from(size_of::<R>()).map_err(|_| Error::TooLarge {
        what: "root type",
        len: size_of::<R>() as u64,
    })?;
    if align_of::<R>() > 16 {
        return Err(Error::unsupported(format!(
            "root alignment {} exceeds 16",
            align_of::<R>()
        )));
    }
    Ok(StoredLayout {
        version,
        root_size: size,
        root_align: align_of::<R>() as u32,
    })
}

/// What the steps of an open under the lock found.
struct Prepared {
    journal_len: u64,
    heap_off: u64,
    stored: StoredLayout,
    opened: Opened,
    publisher: Publisher,
}

/// The steps of an open that run under the lock before the state handle
/// exists: creation, the superblock, recovery, the dynamic header.
///
/// Everything recovery relies on (the superblock, the commit word, the
/// journal records) is checked before anything is written, so that damage
/// leaves the region as it was; then the commit publisher is attached, and
/// only then does creation or recovery write, inside an update, so that a
/// snapshot copied meanwhile is never taken for a committed state.
fn prepare(
    mem: &mut Mem,
    layout: &mut Layout<impl Pod>,
    expected: StoredLayout,
) -> Result<Prepared> {
    // Another process may have grown the backing since it was mapped.
    mem.refresh()?;
    let recovery = match inspect(mem)? {
        Found::Fresh => None,
        Found::Existing => {
            let geometry = check_superblock(mem)?;
            let (seq, open) = read_tx_word(mem.load_u64(TX_WORD)?)?;
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
        Publisher::attach_protocol(mem)?
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
            // What the rollback overwrites, kept so that damage found after
            // it (in header lines the interrupted transaction did not
            // journal) leaves the region exactly as it was found.
            let found = journal::current_images(mem, &records)?;
            publisher.begin_update();
            journal::apply_rollback(mem, &records, seq)?;
            let checked = check_dynamic(mem, geometry.1);
            if checked.is_err() {
                journal::undo_rollback(mem, &records, &found, seq)?;
            }
            publisher.commit();
            let opened = Opened::Recovered {
                records: records.len(),
            };
            (geometry, opened, checked?)
        }
    };
    Ok(Prepared {
        journal_len,
        heap_off,
        stored,
        opened,
        publisher,
    })
}

/// The first `base` bytes of `source` (zeros for an empty one), for the
/// read-only protocol check; a backing holding fewer is someone else's data.
fn first_page(source: &SourceKind, base: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let read = |fd: std::os::fd::BorrowedFd<'_>| -> Result<Vec<u8>> {
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(|e| Error::io("dup of the state's fd", e))?,
        );
        let len = file.metadata().map_err(|e| Error::io("fstat", e))?.len();
        let mut page = vec![0u8; base];
        if len == 0 {
            return Ok(page);
        }
        if len < base as u64 {
            let mut head = [0u8; 8];
            let n = (len as usize).min(8);
            file.read_exact_at(&mut head[..n], 0)
                .map_err(|e| Error::io("reading the protocol page", e))?;
            return Err(Error::NotAState { found: head });
        }
        file.read_exact_at(&mut page, 0)
            .map_err(|e| Error::io("reading the protocol page", e))?;
        Ok(page)
    };
    match source {
        SourceKind::Heap(v) => {
            if !v.is_empty() && v.len() < base {
                let mut head = [0u8; 8];
                let n = v.len().min(8);
                head[..n].copy_from_slice(&v[..n]);
                return Err(Error::NotAState { found: head });
            }
            let mut page = vec![0u8; base];
            let n = v.len().min(base);
            page[..n].copy_from_slice(&v[..n]);
            Ok(page)
        }
        SourceKind::Shared(fd) => read(fd.as_fd()),
        SourceKind::File(f) => read(f.as_fd()),
    }
}

impl<R: Pod> State<R> {
    /// Opens (or creates) the state in `source`.
    ///
    /// An empty or all-zero region gets a new state ([`Opened::Created`]). A
    /// region holding a state is validated; an interrupted transaction is
    /// rolled back ([`Opened::Recovered`]); a different root layout runs
    /// `layout.migrate` or fails (a newer stored version always fails:
    /// [`Error::Downgrade`]). Anything else (foreign data, a damaged
    /// header) is an error and the region is left as it was.
    pub fn open(source: Source, mut layout: Layout<R>) -> Result<State<R>> {
        let expected = root_layout::<R>(layout.version)?;
        let base = if layout.snapshot_protocol {
            shm_snapshot::DATA_OFFSET
        } else {
            0
        };
        layout.check()?;
        // A backing shorter than the protocol page but not empty is
        // someone else's data; the page itself is read, never mapped.
        let page = if layout.snapshot_protocol {
            Some(first_page(&source.0, base)?)
        } else {
            None
        };
        let mut mem = match source.0 {
            SourceKind::Heap(v) => Mem::heap(v, 64, base)?,
            SourceKind::Shared(fd) => Mem::shared(fd, HEADER_LEN, base)?,
            SourceKind::File(f) => Mem::file(f, HEADER_LEN, base)?,
        };
        let found = peek(&mut mem)?;
        if let Some(page) = page {
            // Read-only: a foreign first page is refused before any write.
            Publisher::check_protocol(&page)?;
        }
        if let Peek::Blank = found
            && mem.len() < HEADER_LEN
        {
            // Room for the lock words (growing never shrinks the backing).
            mem.grow_blank(HEADER_LEN)?;
        }
        let nonce = owner::register_handle(mem.identity());
        let result = Self::open_locked(mem, nonce, expected, &mut layout);
        if result.is_err() {
            owner::unregister_handle(nonce);
        }
        result
    }

    fn open_locked(
        mut mem: Mem,
        nonce: u64,
        expected: StoredLayout,
        layout: &mut Layout<R>,
    ) -> Result<State<R>> {
        let (claim, lock_nonce, took_over_from) = lock(&mem, nonce)?;
        // Until the state handle exists, a failure puts the lock words back.
        let refuse = |mem: &Mem, e: Error| {
            unlock(mem, claim);
            Err(e)
        };
        let Prepared {
            journal_len,
            heap_off,
            stored,
            opened,
            publisher,
        } = match prepare(&mut mem, layout, expected) {
            Ok(p) => p,
            Err(e) => return refuse(&mem, e),
        };
        let migrate = if stored == expected {
            None
        } else if stored.version > expected.version {
            return refuse(&mem, Error::Downgrade { stored, expected });
        } else {
            match layout.migrate.take() {
                Some(m) => Some(m),
                None => return refuse(&mem, Error::LayoutMismatch { stored, expected }),
            }
        };
        let previous_pid = u32_at(&mem, "last opener", DY_LAST_PID).unwrap_or(0);
        let mut state = State {
            core: Core::new(mem, journal_len, heap_off, publisher),
            nonce,
            held: claim.held,
            lock_nonce,
            restore_lock: Some(claim.previous),
            report: OpenReport {
                opened,
                generation: 0,
                previous_pid,
                took_over_from,
                migrated_from: None,
            },
            _root: PhantomData,
        };
        // From here on, dropping `state` puts the lock words back.
        let opened_code = match opened {
            Opened::Created => 1u32,
            Opened::Reopened => 2,
            Opened::Recovered { .. } => 3,
        };
        let generation = state.transaction(|tx| {
            let generation = u64_at(tx.core.mem(), "generation", DY_GENERATION)?.wrapping_add(1);
            tx.core.write_u64("generation", DY_GENERATION, generation)?;
            let seq = tx.core.seq();
            tx.core.write_u64("open sequence", DY_OPEN_SEQ, seq)?;
            let mut last = [0u8; 8];
            last[..4].copy_from_slice(&std::process::id().to_le_bytes());
            last[(DY_LAST_OPEN - DY_LAST_PID) as usize..]
                .copy_from_slice(&opened_code.to_le_bytes());
            tx.core.write("last opener", DY_LAST_PID, &last)?;
            if let Some(migrate) = migrate {
                let old = tx.replace_root(stored, expected)?;
                migrate(tx, &old)?;
            } else if u64_at(tx.core.mem(), "root offset", DY_ROOT)? == 0 {
                let root = tx
                    .core
                    .alloc(Kind::Root, u64::from(expected.root_size), true)?;
                tx.core.write_u64("root offset", DY_ROOT, root.off)?;
            }
            Ok::<_, Error>(generation)
        })?;
        state.restore_lock = None;
        state.report.generation = generation;
        if stored != expected {
            state.report.migrated_from = Some(stored);
        }
        Ok(state)
    }

    /// What the open did: created, reopened or recovered, and the generation.
    pub fn report(&self) -> &OpenReport {
        &self.report
    }

    /// The layout recorded in the region.
    pub fn stored_layout(&self) -> Result<StoredLayout> {
        read_layout(&self.core.mem)
    }

    /// The root.
    pub fn root(&self) -> Result<&R> {
        root_ref(&self.core.mem, self.core.heap()?)
    }

    /// Runs `f` as one transaction: if it returns `Ok`, every change it made
    /// becomes visible at once; if it returns `Err` or panics, or the process
    /// dies before the commit, none does.
    pub fn transaction<T, E: From<Error>>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_, R>) -> Result<T, E>,
    ) -> Result<T, E> {
        let core = TxCore::begin(&mut self.core)?;
        let mut tx = Tx {
            core,
            _root: PhantomData,
        };
        match f(&mut tx) {
            Ok(v) => {
                tx.core.commit()?;
                Ok(v)
            }
            Err(e) => {
                tx.core.abort();
                Err(e)
            }
        }
    }

    /// The number of transactions run since the state was created,
    /// committed or rolled back (every open runs one): the sequence number
    /// in the commit word.
    pub fn commits(&self) -> Result<u64> {
        let (seq, _) = read_tx_word(self.core.mem.load_u64(TX_WORD)?)?;
        Ok(seq)
    }

    /// The region's current size in bytes.
    pub fn region_len(&self) -> u64 {
        self.core.mem.len()
    }

    /// Bytes allocated in the heap (block headers included).
    pub fn used_bytes(&self) -> Result<u64> {
        u64_at(&self.core.mem, "used bytes", DY_USED)
    }

    /// A copy of the whole region (for tests, or to save it elsewhere).
    pub fn image(&self) -> Vec<u8> {
        self.core.mem.to_vec()
    }

    /// Closes the state (releasing its lock and flushing a file) and gives
    /// the source back, to reopen it later.
    pub fn close(mut self) -> Result<Source> {
        self.release();
        self.core.mem.flush()?;
        let mut core = std::mem::replace(
            &mut self.core,
            Core::new(Mem::empty(), 0, 0, Publisher::default()),
        );
        let page = std::mem::take(&mut core.publisher).into_page();
        if let Some(page) = &page {
            page.flush()?;
        }
        // A heap state's protocol page goes back in front of its region.
        let prefix = match page {
            Some(HeaderPage::Heap(buf)) => Some(HeaderPage::Heap(buf)),
            _ => core.mem.take_heap_prefix().map(HeaderPage::Heap),
        }
        .map(|p| p.to_vec())
        .unwrap_or_default();
        Ok(Source(match core.mem.into_backing() {
            Backing::Heap(lines) => SourceKind::Heap(
                prefix
                    .into_iter()
                    .chain(lines.iter().flat_map(|l| l.0))
                    .collect(),
            ),
            Backing::Shared { fd, .. } => SourceKind::Shared(fd),
            Backing::File { file, .. } => SourceKind::File(file),
        }))
    }
}

impl<R> State<R> {
    fn release(&mut self) {
        if self.nonce == 0 {
            return;
        }
        match self.restore_lock.take() {
            Some(previous) => unlock(
                &self.core.mem,
                Claim {
                    previous,
                    held: self.held,
                },
            ),
            None => release_lock(&self.core.mem, self.held, self.lock_nonce),
        }
        owner::unregister_handle(self.nonce);
        self.nonce = 0;
    }
}

impl<R> Drop for State<R> {
    fn drop(&mut self) {
        self.release();
    }
}

pub(crate) fn root_ref<R: Pod>(mem: &Mem, heap: (u64, u64)) -> Result<&R> {
    let off = u64_at(mem, "root offset", DY_ROOT)?;
    if off == 0 {
        return Err(Error::NullHandle { kind: "root" });
    }
    let b = Block::expect(mem, heap, off, Kind::Root)?.need(size_of::<R>() as u64)?;
    let bytes = mem.bytes("root", b.payload(), size_of::<R>() as u64)?;
    bytemuck::try_from_bytes(bytes).map_err(|e| {
        Error::corrupt(
            "root",
            b.payload(),
            format!("cannot view as the root type: {e:?}"),
        )
    })
}

/// A transaction on a state with root `R`: the only way to change it.
///
/// Structures are reached through their handles (`tx.vec(handle)`, ...);
/// each view borrows the transaction, so none outlives a remap.
pub struct Tx<'s, R> {
    pub(crate) core: TxCore<'s>,
    _root: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for Tx<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl<R: Pod> Tx<'_, R> {
    /// The root as it is now in this transaction.
    pub fn root(&self) -> Result<&R> {
        root_ref(self.core.mem(), self.core.heap()?)
    }

    /// The root, for changing (its before-image is journaled first).
    pub fn root_mut(&mut self) -> Result<&mut R> {
        let heap = self.core.heap()?;
        let off = u64_at(self.core.mem(), "root offset", DY_ROOT)?;
        if off == 0 {
            return Err(Error::NullHandle { kind: "root" });
        }
        let b =
            Block::expect(self.core.mem(), heap, off, Kind::Root)?.need(size_of::<R>() as u64)?;
        let bytes = self
            .core
            .bytes_mut("root", b.payload(), size_of::<R>() as u64)?;
        bytemuck::try_from_bytes_mut(bytes).map_err(|e| {
            Error::corrupt(
                "root",
                b.payload(),
                format!("cannot view as the root type: {e:?}"),
            )
        })
    }

    /// Replaces the whole root.
    pub fn set_root(&mut self, root: R) -> Result<()> {
        *self.root_mut()? = root;
        Ok(())
    }

    /// Swaps in a zeroed root of the new layout and records that layout (in
    /// the dynamic header, journaled like the root); returns the old root.
    fn replace_root(&mut self, stored: StoredLayout, expected: StoredLayout) -> Result<OldRoot> {
        let heap = self.core.heap()?;
        let old_off = u64_at(self.core.mem(), "root offset", DY_ROOT)?;
        let old_len = u64::from(stored.root_size);
        let mut bytes = Vec::new();
        if old_off != 0 {
            // Validated before anything is allocated for it.
            let b = Block::expect(self.core.mem(), heap, old_off, Kind::Root)?.need(old_len)?;
            bytes.extend_from_slice(self.core.mem().bytes("root", b.payload(), old_len)?);
            self.core.free(old_off, Kind::Root)?;
        } else {
            bytes
                .try_reserve_exact(stored.root_size as usize)
                .map_err(|_| Error::TooLarge {
                    what: "stored root",
                    len: old_len,
                })?;
            bytes.resize(stored.root_size as usize, 0);
        }
        let root = self
            .core
            .alloc(Kind::Root, u64::from(expected.root_size), true)?;
        self.core.write_u64("root offset", DY_ROOT, root.off)?;
        let mut fields = [0u8; 12];
        fields[0..4].copy_from_slice(&expected.version.to_le_bytes());
        fields[4..8].copy_from_slice(&expected.root_size.to_le_bytes());
        fields[8..12].copy_from_slice(&expected.root_align.to_le_bytes());
        self.core.write("root layout", DY_USER_VERSION, &fields)?;
        Ok(OldRoot {
            layout: stored,
            bytes,
        })
    }
}
