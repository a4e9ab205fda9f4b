//! Opening a state: creating, validating, recovering, locking, migrating;
//! and the typed handle with its transactions.

use std::fmt;
use std::fs::File;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;

use bytemuck::Pod;
use shm_fd::SharedFd;

use crate::error::{Error, Result, StoredLayout};
use crate::format::*;
use crate::journal;
use crate::mem::{Backing, Mem};
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
    /// 4096). Bounds what one transaction may overwrite (not what it may
    /// allocate). Ignored when the region exists.
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
    nonce: u64,
    /// Set while opening: how to put the lock words back if the open fails.
    restore_lock: Option<PreviousLock>,
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

/// What open decided about the region's first bytes.
enum Found {
    Fresh,
    Existing,
}

fn inspect(mem: &Mem) -> Result<Found> {
    let head_len = mem.len().min(HEADER_LEN);
    let head = mem.bytes("header", 0, head_len)?;
    if head.iter().all(|&b| b == 0) {
        return Ok(Found::Fresh);
    }
    let mut magic = [0u8; 8];
    let n = head.len().min(8);
    magic[..n].copy_from_slice(&head[..n]);
    if &magic == MAGIC {
        if mem.len() < HEADER_LEN {
            return Err(Error::Truncated {
                needed: HEADER_LEN,
                len: mem.len(),
            });
        }
        return Ok(Found::Existing);
    }
    // A creation interrupted before its last store (the magic) left a
    // complete header without it: ours, and safe to create again.
    if magic == [0; 8] && head.len() as u64 == HEADER_LEN {
        let mut sb = head[..SB_CRC as usize].to_vec();
        sb[..8].copy_from_slice(MAGIC);
        let stored = u32::from_le_bytes(head[SB_CRC as usize..][..4].try_into().expect("4"));
        if crc32fast::hash(&sb) == stored {
            return Ok(Found::Fresh);
        }
    }
    Err(Error::NotAState { found: magic })
}

/// Writes a new header: every byte but the magic first, the magic last.
fn create(mem: &mut Mem, journal_len: u64, initial_len: u64, root: StoredLayout) -> Result<()> {
    if journal_len < 4096 || !journal_len.is_multiple_of(LINE) {
        return Err(Error::unsupported(format!(
            "journal length {journal_len} must be a multiple of 64 and at least 4096"
        )));
    }
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
    let mut h = vec![0u8; HEADER_LEN as usize];
    let put = |h: &mut [u8], off: u64, bytes: &[u8]| {
        h[off as usize..off as usize + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut h, SB_MAGIC, MAGIC);
    put(&mut h, SB_FORMAT, &FORMAT_VERSION.to_le_bytes());
    put(&mut h, SB_HEADER_LEN, &(HEADER_LEN as u32).to_le_bytes());
    put(&mut h, SB_JOURNAL_OFF, &JOURNAL_OFF.to_le_bytes());
    put(&mut h, SB_JOURNAL_LEN, &journal_len.to_le_bytes());
    put(&mut h, SB_HEAP_OFF, &heap_off.to_le_bytes());
    put(&mut h, SB_USER_VERSION, &root.version.to_le_bytes());
    put(&mut h, SB_ROOT_SIZE, &root.root_size.to_le_bytes());
    put(&mut h, SB_ROOT_ALIGN, &root.root_align.to_le_bytes());
    let sb_crc = crc32fast::hash(&h[..SB_CRC as usize]);
    put(&mut h, SB_CRC, &sb_crc.to_le_bytes());
    put(&mut h, DY_HEAP_TOP, &heap_off.to_le_bytes());
    let dy_crc = crc32fast::hash(&h[DY_START as usize..DY_CRC as usize]);
    put(&mut h, DY_CRC, &dy_crc.to_le_bytes());
    // The first journal record slot is cleared, so that no stale bytes can
    // pass for a record of transaction 1.
    mem.zero("journal", JOURNAL_OFF, RECORD_HEADER)?;
    mem.write("header", 8, &h[8..])?;
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    mem.write("header", 0, &h[..8])?;
    Ok(())
}

/// Validates the superblock; returns `(journal_len, heap_off, stored layout)`.
fn check_superblock(mem: &Mem) -> Result<(u64, u64, StoredLayout)> {
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
    if heap_off > mem.len() {
        return Err(Error::Truncated {
            needed: heap_off,
            len: mem.len(),
        });
    }
    let layout = StoredLayout {
        version: u32_at(mem, "user version", SB_USER_VERSION)?,
        root_size: u32_at(mem, "root size", SB_ROOT_SIZE)?,
        root_align: u32_at(mem, "root align", SB_ROOT_ALIGN)?,
    };
    Ok((journal_len, heap_off, layout))
}

/// Validates the dynamic header (after any recovery).
fn check_dynamic(mem: &Mem, heap_off: u64, layout: StoredLayout) -> Result<()> {
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
    let root = u64_at(mem, "root offset", DY_ROOT)?;
    if root != 0 {
        Block::expect(mem, heap, root, Kind::Root)?.need(u64::from(layout.root_size))?;
    }
    for class in 0..FREE_SLOTS as u32 {
        let head_off = FREE_HEADS + u64::from(class) * 8;
        let head = u64_at(mem, "free list head", head_off)?;
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
        (DY_RESERVED, DY_RESERVED + 8),
        (DY_LAST_OPEN + 4, DY_CRC),
        (LOCK_NONCE + 8, FREE_HEADS),
        (FREE_HEADS + FREE_SLOTS * 8, PEERS),
        (PEERS, PEERS + PEER_COUNT * PEER_ENTRY),
    ] {
        let reserved = mem.bytes("reserved header bytes", start, end - start)?;
        if let Some(i) = reserved.iter().position(|&b| b != 0) {
            return Err(Error::corrupt(
                "reserved header bytes",
                start + i as u64,
                "must be zero in format 2",
            ));
        }
    }
    Ok(())
}

/// The lock words as found before this open took them.
#[derive(Clone, Copy)]
struct PreviousLock([u64; 3]);

/// Puts the lock words back as they were (when open fails after taking
/// them), so that a refused region is left byte for byte as it was.
fn unlock(mem: &Mem, previous: PreviousLock) {
    for (off, v) in [LOCK_PID, LOCK_START, LOCK_NONCE]
        .into_iter()
        .zip(previous.0)
    {
        if let Ok(w) = mem.atomic_u64(off) {
            w.store(v, Ordering::Release);
        }
    }
}

/// Rolls back an interrupted transaction, if any (returning how many
/// records were written back), then validates the dynamic header.
fn recover_and_check(
    mem: &mut Mem,
    journal_len: u64,
    heap_off: u64,
    stored: StoredLayout,
) -> Result<Option<usize>> {
    let word = mem.atomic_u64(TX_WORD)?.load(Ordering::Acquire);
    let records = if word & 1 != 0 {
        Some(journal::rollback(mem, journal_len, word >> 1)?)
    } else {
        None
    };
    check_dynamic(mem, heap_off, stored)?;
    Ok(records)
}

fn lock(mem: &Mem, nonce: u64) -> Result<(Option<u32>, PreviousLock)> {
    let word = mem.atomic_u64(LOCK_PID)?;
    let current = word.load(Ordering::Acquire);
    let pid = current as u32;
    let start = mem.atomic_u64(LOCK_START)?.load(Ordering::Acquire);
    let their_nonce = mem.atomic_u64(LOCK_NONCE)?.load(Ordering::Acquire);
    let previous = PreviousLock([current, start, their_nonce]);
    if owner::holder_alive(pid, start, their_nonce) {
        return Err(Error::Locked { pid });
    }
    let me = u64::from(std::process::id());
    if word
        .compare_exchange(current, me, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(Error::Locked {
            pid: word.load(Ordering::Acquire) as u32,
        });
    }
    mem.atomic_u64(LOCK_START)?
        .store(owner::own_start_time(), Ordering::Release);
    mem.atomic_u64(LOCK_NONCE)?.store(nonce, Ordering::Release);
    Ok(((pid != 0).then_some(pid), previous))
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

impl<R: Pod> State<R> {
    /// Opens (or creates) the state in `source`.
    ///
    /// An empty or all-zero region gets a new state ([`Opened::Created`]). A
    /// region holding a state is validated; an interrupted transaction is
    /// rolled back ([`Opened::Recovered`]); a different root layout runs
    /// `layout.migrate` or fails. Anything else (foreign data, a damaged
    /// header) is an error and the region is left as it was.
    pub fn open(source: Source, mut layout: Layout<R>) -> Result<State<R>> {
        let expected = root_layout::<R>(layout.version)?;
        let base = if layout.snapshot_protocol {
            shm_snapshot::DATA_OFFSET
        } else {
            0
        };
        let mut mem = match source.0 {
            SourceKind::Heap(v) => Mem::heap(v, 64, base)?,
            SourceKind::Shared(fd) => Mem::shared(fd, 1, base)?,
            SourceKind::File(f) => Mem::file(f, 1, base)?,
        };

        if mem.prefix().1 < base {
            // Shorter than shm-snapshot's header page, and not empty (an
            // empty backing was grown): someone else's data.
            return Err(Error::NotAState {
                found: mem.backing_head(),
            });
        }
        let mut created = false;
        if let Found::Fresh = inspect(&mem)? {
            create(&mut mem, layout.journal_len, layout.initial_len, expected)?;
            created = true;
        }
        let (journal_len, heap_off, stored) = check_superblock(&mem)?;
        // Attached after any creation (which remaps), so it points at the
        // mapping in use; later remaps re-attach it (TxCore::alloc).
        let publisher = if layout.snapshot_protocol {
            Some(Publisher::attach_protocol(&mem)?)
        } else {
            None
        };
        let nonce = owner::register_nonce();
        let result = Self::open_locked(
            mem,
            publisher,
            nonce,
            journal_len,
            heap_off,
            stored,
            expected,
            created,
            &mut layout,
        );
        if result.is_err() {
            owner::unregister_nonce(nonce);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn open_locked(
        mut mem: Mem,
        publisher: Option<Publisher>,
        nonce: u64,
        journal_len: u64,
        heap_off: u64,
        stored: StoredLayout,
        expected: StoredLayout,
        created: bool,
        layout: &mut Layout<R>,
    ) -> Result<State<R>> {
        let (took_over_from, previous_lock) = lock(&mem, nonce)?;
        let mut opened = if created {
            Opened::Created
        } else {
            Opened::Reopened
        };
        let checked = recover_and_check(&mut mem, journal_len, heap_off, stored);
        match checked {
            Ok(Some(records)) => opened = Opened::Recovered { records },
            Ok(None) => {}
            Err(e) => {
                unlock(&mem, previous_lock);
                return Err(e);
            }
        }
        let previous_pid = u32_at(&mem, "last opener", DY_LAST_PID).unwrap_or(0);
        let publisher = publisher.unwrap_or_else(|| Publisher::new(layout.commit_hook.take()));
        let mut state = State {
            core: Core::new(mem, journal_len, heap_off, publisher),
            nonce,
            restore_lock: Some(previous_lock),
            report: OpenReport {
                opened,
                generation: 0,
                previous_pid,
                took_over_from,
                migrated_from: None,
            },
            _root: PhantomData,
        };
        // From here on, dropping `state` releases the lock.
        let migrate = if stored != expected {
            match layout.migrate.take() {
                Some(m) => Some(m),
                None => {
                    return Err(Error::LayoutMismatch { stored, expected });
                }
            }
        } else {
            None
        };
        let opened_code = match opened {
            Opened::Created => 1u32,
            Opened::Reopened => 2,
            Opened::Recovered { .. } => 3,
        };
        let generation = state.transaction(|tx| {
            let generation = u64_at(tx.core.mem(), "generation", DY_GENERATION)?.wrapping_add(1);
            tx.core.write_u64("generation", DY_GENERATION, generation)?;
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
        Ok(check_superblock(&self.core.mem)?.2)
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
        Ok(self.core.mem.atomic_u64(TX_WORD)?.load(Ordering::Acquire) >> 1)
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
            Core::new(Mem::heap(Vec::new(), 0, 0)?, 0, 0, Publisher::default()),
        );
        // The protocol publisher points into the mapping: gone before it.
        drop(std::mem::take(&mut core.publisher));
        Ok(Source(match core.mem.into_backing() {
            Backing::Heap(lines) => SourceKind::Heap(lines.iter().flat_map(|l| l.0).collect()),
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
        if let Some(previous) = self.restore_lock.take() {
            unlock(&self.core.mem, previous);
        } else if let Ok(w) = self.core.mem.atomic_u64(LOCK_PID)
            && w.load(Ordering::Acquire) == u64::from(std::process::id())
        {
            w.store(0, Ordering::Release);
        }
        owner::unregister_nonce(self.nonce);
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

    /// Swaps in a zeroed root of the new layout and records that layout;
    /// returns the old root.
    fn replace_root(&mut self, stored: StoredLayout, expected: StoredLayout) -> Result<OldRoot> {
        let heap = self.core.heap()?;
        let old_off = u64_at(self.core.mem(), "root offset", DY_ROOT)?;
        let mut bytes = vec![0u8; stored.root_size as usize];
        if old_off != 0 {
            let b = Block::expect(self.core.mem(), heap, old_off, Kind::Root)?
                .need(u64::from(stored.root_size))?;
            bytes.copy_from_slice(self.core.mem().bytes(
                "root",
                b.payload(),
                u64::from(stored.root_size),
            )?);
            self.core.free(old_off)?;
        }
        let root = self
            .core
            .alloc(Kind::Root, u64::from(expected.root_size), true)?;
        self.core.write_u64("root offset", DY_ROOT, root.off)?;
        let mut sb = [0u8; 12];
        sb[0..4].copy_from_slice(&expected.version.to_le_bytes());
        sb[4..8].copy_from_slice(&expected.root_size.to_le_bytes());
        sb[8..12].copy_from_slice(&expected.root_align.to_le_bytes());
        self.core.write("superblock", SB_USER_VERSION, &sb)?;
        self.core.prepare(SB_CRC, 4)?;
        let crc = superblock_crc(self.core.mem())?;
        self.core
            .write("superblock checksum", SB_CRC, &crc.to_le_bytes())?;
        Ok(OldRoot {
            layout: stored,
            bytes,
        })
    }
}
