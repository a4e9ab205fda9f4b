//! The sleep/wake handshake between a process waiting for a commit (a
//! reader that met an open transaction, a ring's consumer or producer
//! waiting for the other side) and the committing writer: the sleeper
//! counts itself in `read_waiters` before it looks at the commit word one
//! last time and sleeps on it (a futex wait, which sleeps only while the
//! word still holds what the sleeper saw); the writer, after its commit
//! store, reads the count with a read-modify-write (adding 0), and wakes
//! the sleepers only when there are some — no system call per commit
//! otherwise. The two read-modify-writes of the count are ordered one
//! after the other: if the writer's comes first, the sleeper's increment
//! reads it and acquires the commit store before it looks at the word;
//! if the sleeper's comes first, the writer sees the count. So no wake-up
//! is lost (checked under loom: `shared::wake::model`; a fence and a plain
//! load would do under the C++ model too, but loom checks SeqCst fences
//! only as acquire-release, and the read-modify-write costs no more than
//! the fence on x86). The real sleeps have a timeout too.
//!
//! Generic over the cells, so that the model runs the same code on loom's
//! atomics.

use std::sync::atomic::Ordering;

use crate::shared::seqlock::SeqWord;

/// A counter cell (`read_waiters`).
pub(crate) trait Counter {
    fn fetch_add(&self, v: u64, order: Ordering) -> u64;
    fn fetch_sub(&self, v: u64, order: Ordering) -> u64;
}

macro_rules! impl_counter {
    ($t:ty) => {
        impl Counter for $t {
            fn fetch_add(&self, v: u64, order: Ordering) -> u64 {
                <$t>::fetch_add(self, v, order)
            }
            fn fetch_sub(&self, v: u64, order: Ordering) -> u64 {
                <$t>::fetch_sub(self, v, order)
            }
        }
    };
}

impl_counter!(std::sync::atomic::AtomicU64);
#[cfg(shm_state_loom)]
impl_counter!(loom::sync::atomic::AtomicU64);

/// The sleeper's side: counted in `waiters`, sleeps (`sleep`, a futex wait
/// that sleeps only while `word` is still `seen`) unless `word` moved.
pub(crate) fn sleep_unless_changed<W: SeqWord, C: Counter>(
    word: &W,
    waiters: &C,
    seen: u64,
    sleep: impl FnOnce(),
) {
    sleep_unless(waiters, || word.load(Ordering::SeqCst) != seen, sleep);
}

/// The same handshake for any word: counted in `waiters`, sleeps unless
/// `changed` says the word moved since the look (a ring's waiter and its
/// head or tail, `shared::rings`).
pub(crate) fn sleep_unless<C: Counter>(
    waiters: &C,
    changed: impl FnOnce() -> bool,
    sleep: impl FnOnce(),
) {
    waiters.fetch_add(1, Ordering::SeqCst);
    if !changed() {
        sleep();
    }
    waiters.fetch_sub(1, Ordering::SeqCst);
}

/// The writer's side, after its commit store: wakes the sleepers (`wake`)
/// if any are counted.
pub(crate) fn notify<C: Counter>(waiters: &C, wake: impl FnOnce()) {
    if waiters.fetch_add(0, Ordering::AcqRel) != 0 {
        wake();
    }
}

/// The handshake under loom: a writer commits (a release store of the
/// word, then `notify`), a sleeper waits for a word other than the one it
/// saw. The futex stand-in has no timeout, so a lost wake-up leaves the
/// sleeper asleep for good: loom reports a deadlock. (A writer that reads
/// the count with a plain load instead is kept as `should_panic`.)
#[cfg(all(test, shm_state_loom))]
mod model {
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use loom::thread;

    use super::*;
    use crate::shared::loom_futex::Futex;

    #[derive(Default)]
    struct Shared {
        word: AtomicU64,
        waiters: AtomicU64,
        futex: Futex,
        /// A ring's tail (the `ring` models).
        tail: AtomicU64,
    }

    fn run(rmw: bool) {
        loom::model(move || {
            let s = Arc::new(Shared::default());
            let writer = {
                let s = s.clone();
                thread::spawn(move || {
                    s.word.store(2, Ordering::Release);
                    if rmw {
                        notify(&s.waiters, || s.futex.wake_all());
                    } else if s.waiters.load(SeqCst) != 0 {
                        s.futex.wake_all();
                    }
                })
            };
            // The sleeper saw word 0 (an open transaction, an empty ring)
            // and waits until it moves.
            while s.word.load(Ordering::Acquire) == 0 {
                sleep_unless_changed(&s.word, &s.waiters, 0, || {
                    s.futex.wait(|| s.word.load(SeqCst) != 0)
                });
            }
            writer.join().unwrap();
        });
    }

    #[test]
    fn a_commit_always_wakes_a_sleeper_that_saw_the_old_word() {
        run(true);
    }

    /// A ring's waiter (`shared::rings`, `SharedState::pop_wait`): it looks
    /// at the ring's tail and, finding no frame, sleeps on the tail word
    /// unless it moved (`sleep_unless`, counted in `ring_waiters`); the
    /// producer moves the tail inside its transaction (the commit word
    /// open, the tail, the commit word committed) and then, the
    /// transaction over, wakes the tail word if any ring waiter is counted
    /// (`notify`). No push is slept through: the futex stand-in has no
    /// timeout, so a lost wake-up is a deadlock loom reports.
    fn ring() {
        loom::model(|| {
            let s = Arc::new(Shared::default());
            let producer = {
                let s = s.clone();
                thread::spawn(move || {
                    s.word.store(1, Ordering::Release); // open
                    s.tail.store(8, Ordering::Relaxed);
                    s.word.store(2, Ordering::Release); // committed
                    notify(&s.waiters, || s.futex.wake_all());
                })
            };
            loop {
                let seen = s.tail.load(Ordering::Acquire);
                // A tail that moved: a frame to pop.
                if seen != 0 {
                    break;
                }
                sleep_unless(
                    &s.waiters,
                    || s.tail.load(SeqCst) != seen,
                    || s.futex.wait(|| s.tail.load(SeqCst) != seen),
                );
            }
            producer.join().unwrap();
        });
    }

    #[test]
    fn a_ring_waiter_asleep_on_the_tail_never_misses_a_push() {
        ring();
    }

    #[test]
    #[should_panic]
    fn with_a_plain_load_of_the_count_a_wake_up_can_be_lost() {
        run(false);
    }
}
