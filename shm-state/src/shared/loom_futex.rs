//! FUTEX_WAIT and FUTEX_WAKE for the loom models (`wlock::model`,
//! `wake::model`): the kernel compares the word and queues the sleeper
//! under one lock (the hash bucket's), which a waker takes too, so a wake
//! after the word changed finds the sleeper queued, or the sleeper saw the
//! change and did not sleep. There is no timeout (the real sleeps have
//! one): a lost wake-up leaves a sleeper asleep for good, which loom
//! reports as a deadlock.

use loom::sync::{Condvar, Mutex};

#[derive(Default)]
pub(crate) struct Futex {
    bucket: Mutex<()>,
    sleepers: Condvar,
}

impl Futex {
    /// Sleeps until a wake, unless `changed` (the word's compare, made
    /// under the bucket's lock) says the word no longer holds what the
    /// sleeper expects.
    pub(crate) fn wait(&self, changed: impl FnOnce() -> bool) {
        let queued = self.bucket.lock().unwrap();
        if !changed() {
            drop(self.sleepers.wait(queued).unwrap());
        }
    }

    pub(crate) fn wake_one(&self) {
        let _bucket = self.bucket.lock().unwrap();
        self.sleepers.notify_one();
    }

    pub(crate) fn wake_all(&self) {
        let _bucket = self.bucket.lock().unwrap();
        self.sleepers.notify_all();
    }
}
