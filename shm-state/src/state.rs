//! The typed handle on an open state, and its transactions.

use crate::check::{Peek, peek, read_layout};
use crate::error::{Error, Result, StoredLayout};
use crate::format::*;
use crate::journal::Journal;
use crate::layout::{Layout, OldRoot, root_layout};
use crate::lock::{Claim, LockWords};
use crate::mem::{Backing, HeaderPage, Mem};
use crate::open::{
    Exclusive, OpenHooks, OpenReport, Opened, Prepared, prepare, release_lock, unlock,
};
use crate::owner;
use crate::snapshot::Publisher;
use crate::source::{Source, SourceKind, first_page};
use crate::tx::{Core, TxCore};
use bytemuck::Pod;
use std::fmt;
use std::marker::PhantomData;

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
        let (mem, expected) = Self::map_source(source, &mut layout)?;
        let nonce = owner::register_handle(mem.identity());
        let result =
            Self::open_locked(mem, nonce, expected, &mut layout, &mut Exclusive::default());
        if result.is_err() {
            owner::unregister_handle(nonce);
        }
        result
    }

    /// The steps of an open before any lock: the layout checked, the
    /// backing mapped, its header looked at read-only (foreign data and
    /// unknown formats refused), a blank region grown to hold the header.
    pub(crate) fn map_source(
        source: Source,
        layout: &mut Layout<R>,
    ) -> Result<(Mem, StoredLayout)> {
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
        Ok((mem, expected))
    }

    /// The steps of an open from the lock on: `hooks` takes the lock and
    /// adds what the mode (exclusive or shared) needs around the common
    /// steps (see `docs/state-format.md`, *Open*).
    pub(crate) fn open_locked(
        mut mem: Mem,
        nonce: u64,
        expected: StoredLayout,
        layout: &mut Layout<R>,
        hooks: &mut impl OpenHooks,
    ) -> Result<State<R>> {
        let (claim, lock_nonce, took_over_from) = hooks.lock(&mem, nonce)?;
        if let Err(e) = hooks.locked(&mem, nonce) {
            unlock(&mem, claim);
            return Err(e);
        }
        // Until the state handle exists, a failure puts the lock words back.
        let refuse = |mem: &Mem, hooks: &mut dyn OpenHooks, e: Error| {
            hooks.failed(mem);
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
            Err(e) => return refuse(&mem, hooks, e),
        };
        let migrate = if stored == expected {
            None
        } else if stored.version > expected.version {
            return refuse(&mem, hooks, Error::Downgrade { stored, expected });
        } else {
            match layout.migrate.take() {
                Some(m) => match hooks.may_migrate(&mem) {
                    Ok(()) => Some(m),
                    Err(e) => return refuse(&mem, hooks, e),
                },
                None => return refuse(&mem, hooks, Error::LayoutMismatch { stored, expected }),
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
                upgraded_from: None,
            },
            _root: PhantomData,
        };
        // From here on, dropping `state` puts the lock words back.
        let opened_code = match opened {
            Opened::Created => 1u32,
            Opened::Reopened => 2,
            Opened::Recovered { .. } => 3,
        };
        // An older format is upgraded by this transaction, unless the
        // hooks say not now (see `OpenHooks::may_upgrade`).
        let stored_format = match u32_at(&state.core.mem, "format version", SB_FORMAT) {
            Ok(f) => f,
            Err(e) => {
                hooks.failed(&state.core.mem);
                return Err(e);
            }
        };
        let upgrade =
            stored_format < FORMAT_VERSION && hooks.may_upgrade(&state.core.mem, stored_format);
        // The opening transaction writes the journal of the format it
        // starts from (an upgrade rewrites the format inside it).
        state.core.journal = Journal::of_format(stored_format);
        let opening = state.transaction(|tx| {
            let generation = u64_at(tx.core.mem(), "generation", DY_GENERATION)?.wrapping_add(1);
            tx.core.write_u64("generation", DY_GENERATION, generation)?;
            let seq = tx.core.seq();
            tx.core.write_u64("open sequence", DY_OPEN_SEQ, seq)?;
            let mut last = [0u8; 8];
            last[..4].copy_from_slice(&std::process::id().to_le_bytes());
            last[(DY_LAST_OPEN - DY_LAST_PID) as usize..]
                .copy_from_slice(&opened_code.to_le_bytes());
            tx.core.write("last opener", DY_LAST_PID, &last)?;
            // An older format's superblock is rewritten in this journaled
            // transaction: a crash rolls the upgrade back with the rest.
            let format = u32_at(tx.core.mem(), "format version", SB_FORMAT)?;
            if upgrade && format < FORMAT_VERSION {
                tx.core
                    .write("format version", SB_FORMAT, &FORMAT_VERSION.to_le_bytes())?;
                let crc = superblock_crc(tx.core.mem())?;
                tx.core
                    .write("superblock checksum", SB_CRC, &crc.to_le_bytes())?;
            }
            if let Some(migrate) = migrate {
                let old = tx.replace_root(stored, expected)?;
                migrate(tx, &old)?;
            } else if u64_at(tx.core.mem(), "root offset", DY_ROOT)? == 0 {
                let root = tx
                    .core
                    .alloc(Kind::Root, u64::from(expected.root_size), true)?;
                tx.core.write_u64("root offset", DY_ROOT, root.off)?;
            }
            Ok::<_, Error>((generation, format))
        });
        let (generation, format) = match opening {
            Ok(v) => v,
            Err(e) => {
                hooks.failed(&state.core.mem);
                return Err(e);
            }
        };
        hooks.opened(&state.core.mem);
        if upgrade && format < FORMAT_VERSION {
            state.core.journal = Journal::of_format(FORMAT_VERSION);
        }
        state.restore_lock = None;
        state.report.generation = generation;
        if stored != expected {
            state.report.migrated_from = Some(stored);
        }
        if upgrade && format < FORMAT_VERSION {
            state.report.upgraded_from = Some(format);
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
    /// A handle on no memory, holding nothing (to move a state out of a
    /// value that is dropped).
    pub(crate) fn placeholder() -> State<R> {
        State {
            core: Core::new(Mem::empty(), 0, 0, Publisher::default()),
            nonce: 0,
            held: 0,
            lock_nonce: 0,
            restore_lock: None,
            report: OpenReport {
                opened: Opened::Reopened,
                generation: 0,
                previous_pid: 0,
                took_over_from: None,
                migrated_from: None,
                upgraded_from: None,
            },
            _root: PhantomData,
        }
    }

    /// Releases the open lock (a shared state, once opened) but keeps the
    /// handle registered: the handle goes on without the lock.
    pub(crate) fn release_open_lock(&mut self) {
        if self.nonce != 0 && self.restore_lock.is_none() {
            release_lock(&self.core.mem, self.held, self.lock_nonce);
            self.held = 0;
        }
    }

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
