//! The seam to shm-snapshot: every transaction tells the snapshot protocol
//! when it starts changing memory and when the memory is a committed state
//! again, so that a snapshot copied while the program runs is a committed
//! state.

use shm_snapshot::{HeapBuffer, OwnedPublisher};

use crate::error::{Error, Result};
use crate::mem::{HeaderPage, Mem};

/// Hooks a transaction calls around its writes.
///
/// `begin_update` is called before the first byte of a transaction is
/// written, `commit` after the commit word is stored (or after a rollback
/// restored the last committed state).
pub trait CommitHook: Send + std::fmt::Debug {
    /// The memory is about to change: a copy taken from now on is torn.
    fn begin_update(&mut self);
    /// The memory holds a committed state again.
    fn commit(&mut self);
}

/// How a state publishes its commits: not at all, through a program's hook,
/// or through shm-snapshot's protocol header in the first page of the
/// memfd (shm-state's region then starts at [`shm_snapshot::DATA_OFFSET`]).
/// The protocol publisher owns its page (a mapping of its own, or the heap
/// buffer's first page), so no remap of the region can leave it dangling.
#[derive(Debug, Default)]
pub(crate) enum Publisher {
    #[default]
    None,
    Hook(Box<dyn CommitHook>),
    Protocol(OwnedPublisher<HeaderPage>),
}

impl Publisher {
    pub(crate) fn new(hook: Option<Box<dyn CommitHook>>) -> Publisher {
        match hook {
            Some(h) => Publisher::Hook(h),
            None => Publisher::None,
        }
    }

    /// Takes (or writes, on a blank page) the shm-snapshot header in the
    /// page before `mem`'s region.
    pub(crate) fn attach_protocol(mem: &mut Mem) -> Result<Publisher> {
        let page = mem.header_page()?;
        // This state marks every write in the dirty map (`Mem::mark`).
        let (p, _opened) = OwnedPublisher::open_marking(page).map_err(Error::Snapshot)?;
        Ok(Publisher::Protocol(p))
    }

    /// Checks the protocol header in a copy of the backing's first page,
    /// without writing anything: foreign or damaged data is refused before
    /// the open writes the lock words.
    pub(crate) fn check_protocol(first_page: &[u8]) -> Result<()> {
        let page = HeapBuffer::new(first_page.len());
        page.region().write(0, first_page);
        OwnedPublisher::check(&page).map_err(Error::Snapshot)?;
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn begin_update(&mut self) {
        if !matches!(self, Publisher::None) {
            self.begin_update_some();
        }
    }

    #[inline(never)]
    fn begin_update_some(&mut self) {
        match self {
            Publisher::None => {}
            Publisher::Hook(h) => h.begin_update(),
            Publisher::Protocol(p) => p.enter_update(),
        }
    }

    /// Continues from the protocol header's sequence word as another
    /// process left it (a shared state's writer, holding the writer lock).
    pub(crate) fn resync(&mut self) {
        if let Publisher::Protocol(p) = self {
            p.resync();
        }
    }

    #[inline(always)]
    pub(crate) fn commit(&mut self) {
        if !matches!(self, Publisher::None) {
            self.commit_some();
        }
    }

    #[inline(never)]
    fn commit_some(&mut self) {
        match self {
            Publisher::None => {}
            Publisher::Hook(h) => h.commit(),
            Publisher::Protocol(p) => {
                p.commit();
            }
        }
    }

    /// The protocol page, for a state being closed (a heap state gives its
    /// first page back with the region).
    pub(crate) fn into_page(self) -> Option<HeaderPage> {
        match self {
            Publisher::Protocol(p) => Some(p.into_inner()),
            _ => None,
        }
    }
}
