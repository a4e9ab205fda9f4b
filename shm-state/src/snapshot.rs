//! The seam to shm-snapshot: every transaction tells the snapshot protocol
//! when it starts changing memory and when the memory is a committed state
//! again, so that a snapshot copied while the program runs is a committed
//! state.

use crate::error::{Error, Result};
use crate::mem::Mem;

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
#[derive(Debug, Default)]
pub(crate) enum Publisher {
    #[default]
    None,
    Hook(Box<dyn CommitHook>),
    Protocol(shm_snapshot::Publisher<'static>),
}

impl Publisher {
    pub(crate) fn new(hook: Option<Box<dyn CommitHook>>) -> Publisher {
        match hook {
            Some(h) => Publisher::Hook(h),
            None => Publisher::None,
        }
    }

    /// Takes (or writes, on a blank page) the shm-snapshot header in the
    /// bytes before `mem`'s region. Called again after every remap.
    pub(crate) fn attach_protocol(mem: &Mem) -> Result<Publisher> {
        let (ptr, len) = mem.prefix();
        // SAFETY: the prefix is the first `len` bytes of the live backing,
        // 8-aligned (a mapping or a 64-aligned buffer); shm-state never
        // makes slices of it (its region starts after it), so this process
        // touches those bytes only through shm-snapshot's atomic `Region`.
        // The `'static` lifetime is upheld by hand: the publisher is
        // replaced before any remap is used ([`Publisher::remapped`]) and
        // `Core` drops it before the memory (field order).
        let region = unsafe { shm_snapshot::Region::from_raw_parts(ptr, len) };
        let (p, _opened) = shm_snapshot::Publisher::open(region).map_err(Error::Snapshot)?;
        Ok(Publisher::Protocol(p))
    }

    /// Checks the protocol header in the bytes before `mem`'s region without
    /// writing anything: foreign or damaged data is refused before the open
    /// writes the lock words.
    pub(crate) fn check_protocol(mem: &Mem) -> Result<()> {
        let (ptr, len) = mem.prefix();
        // SAFETY: as in `attach_protocol`; the region lives only for this
        // call, and `check` only loads.
        let region = unsafe { shm_snapshot::Region::from_raw_parts(ptr, len) };
        shm_snapshot::Publisher::check(region).map_err(Error::Snapshot)?;
        Ok(())
    }

    /// The backing was remapped: re-take the protocol header at its new
    /// address (inside the update in progress, which it keeps).
    pub(crate) fn remapped(&mut self, mem: &Mem) -> Result<()> {
        if let Publisher::Protocol(_) = self {
            // Drop the old one first: it points into the old mapping.
            *self = Publisher::None;
            *self = Self::attach_protocol(mem)?;
        }
        Ok(())
    }

    pub(crate) fn begin_update(&mut self) {
        match self {
            Publisher::None => {}
            Publisher::Hook(h) => h.begin_update(),
            Publisher::Protocol(p) => p.enter_update(),
        }
    }

    pub(crate) fn commit(&mut self) {
        match self {
            Publisher::None => {}
            Publisher::Hook(h) => h.commit(),
            Publisher::Protocol(p) => {
                p.commit();
            }
        }
    }
}
