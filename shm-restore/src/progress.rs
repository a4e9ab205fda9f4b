//! Counting the bytes of a long load or save, for a progress display.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How far a load ([`crate::restore`]) or a save (see
/// [`Saver::set_progress`](crate::Saver::set_progress)) has come, in
/// bytes: the library counts as it reads or writes, and any other thread
/// may read the count, e.g. to draw a progress line. Clones share one
/// count. The library itself prints nothing.
///
/// A save counts the data bytes it writes (total: the bytes stored, holes
/// excluded). A load reads every stored byte twice, once when it verifies
/// the whole file and once when it copies it into the memfd, and counts
/// both (total: twice the bytes stored); a fallback on `.prev` starts the
/// count again. Counting costs one atomic addition per chunk (1 MiB by
/// default).
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Count>);

#[derive(Debug, Default)]
struct Count {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// A count at zero.
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Bytes done and the total, of the operation under way or the last
    /// one; `(0, 0)` before the first has begun.
    pub fn get(&self) -> (u64, u64) {
        // Relaxed: a display needs no order with the data, and a value one
        // update behind is as good as the current one.
        let total = self.0.total.load(Ordering::Relaxed);
        (self.0.done.load(Ordering::Relaxed).min(total), total)
    }

    /// An operation of `total` bytes begins.
    pub(crate) fn begin(&self, total: u64) {
        self.0.done.store(0, Ordering::Relaxed);
        self.0.total.store(total, Ordering::Relaxed);
    }

    /// The operation under way turns out `bytes` larger.
    pub(crate) fn extend(&self, bytes: u64) {
        self.0.total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` more are done.
    pub(crate) fn add(&self, bytes: u64) {
        self.0.done.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_count_and_done_never_passes_total() {
        let p = Progress::new();
        assert_eq!(p.get(), (0, 0));
        let q = p.clone();
        q.begin(10);
        q.add(4);
        assert_eq!(p.get(), (4, 10));
        q.add(40);
        assert_eq!(p.get(), (10, 10));
        q.begin(3);
        assert_eq!(p.get(), (0, 3));
    }
}
