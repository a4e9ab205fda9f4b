//! What the program expects of the state (its root layout, sizes,
//! migration), and the layout as stored.

use crate::error::{Error, Result, StoredLayout};
use crate::format::*;
use crate::journal;
use crate::snapshot::CommitHook;
use crate::state::Tx;
use bytemuck::Pod;
use std::fmt;

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
    /// (2^48 bytes). [`State::open`](crate::State::open) calls it first, before it maps or
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

pub(crate) fn root_layout<R: Pod>(version: u32) -> Result<StoredLayout> {
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
