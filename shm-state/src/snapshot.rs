//! The seam to shm-snapshot: every transaction tells the snapshot protocol
//! when it starts changing memory and when the memory is a committed state
//! again, so that a snapshot copied while the program runs is a committed
//! state.

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

/// The hook a state publishes its commits through (none by default).
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    hook: Option<Box<dyn CommitHook>>,
}

impl Publisher {
    pub(crate) fn new(hook: Option<Box<dyn CommitHook>>) -> Publisher {
        Publisher { hook }
    }

    pub(crate) fn begin_update(&mut self) {
        if let Some(h) = self.hook.as_mut() {
            h.begin_update();
        }
    }

    pub(crate) fn commit(&mut self) {
        if let Some(h) = self.hook.as_mut() {
            h.commit();
        }
    }
}
