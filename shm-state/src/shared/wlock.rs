//! The writer lock of a shared state: a 32-bit futex word in the header
//! page (`docs/state-format.md`, *The writer lock*).
//!
//! Bits 0..30 name the holder (its robust thread's id, see `sys::Robust`),
//! bit 30 is "owner died" (set by the kernel when that thread exits holding
//! the lock, or by a peer that judged the holder dead), bit 31 "waiters"
//! (someone sleeps on the word, so a release must wake one). Uncontended, a
//! transaction costs one compare-and-swap to take it and one swap to
//! release it.
//!
//! Written over any atomic 32-bit cell ([`Word32`]) and with the sleeping
//! and the judging of holders left to the caller, so that the same code
//! runs on the region's word and, under `--cfg shm_state_loom`, on loom's
//! atomics with threads standing in for processes:
//! `RUSTFLAGS="--cfg shm_state_loom" cargo test -p shm-state --release --lib shared::wlock::model`.

use std::sync::atomic::Ordering;

use crate::format::{WLOCK_OWNER_DIED, WLOCK_TID, WLOCK_WAITERS};

/// An atomic 32-bit cell.
pub(crate) trait Word32 {
    fn load(&self, order: Ordering) -> u32;
    fn swap(&self, value: u32, order: Ordering) -> u32;
    fn compare_exchange(
        &self,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u32, u32>;
}

macro_rules! impl_word32 {
    ($t:ty) => {
        impl Word32 for $t {
            fn load(&self, order: Ordering) -> u32 {
                <$t>::load(self, order)
            }
            fn swap(&self, value: u32, order: Ordering) -> u32 {
                <$t>::swap(self, value, order)
            }
            fn compare_exchange(
                &self,
                current: u32,
                new: u32,
                success: Ordering,
                failure: Ordering,
            ) -> Result<u32, u32> {
                <$t>::compare_exchange(self, current, new, success, failure)
            }
        }
    };
}

impl_word32!(std::sync::atomic::AtomicU32);
#[cfg(shm_state_loom)]
impl_word32!(loom::sync::atomic::AtomicU32);

/// How the lock was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// From a holder that released it: the region holds a committed state.
    Clean,
    /// From a holder that died holding it (the kernel or a peer marked it):
    /// its transaction, if one was open, must be rolled back first.
    OwnerDied,
}

/// What a waiter does between looks at the word: spin once (a spin-loop
/// hint; the loom model yields instead, and only its waiter calls into
/// loom, so the real code runs under `--cfg shm_state_loom` too), sleep
/// while it holds `seen` (a futex wait with a timeout), and judge whether
/// the holder `seen` names is dead (a holder the kernel could not mark: a
/// copied or restored region, a kernel without robust lists).
pub(crate) trait Wait {
    fn spin(&mut self) {
        std::hint::spin_loop();
    }
    fn sleep(&mut self, seen: u32);
    fn holder_dead(&mut self, seen: u32) -> bool;
}

/// Spins before the first sleep: a transaction usually ends within them.
const SPINS: u32 = if cfg!(shm_state_loom) { 1 } else { 64 };

/// Takes the lock for `tid` (non-zero, at most 30 bits).
///
/// A free word (no holder bits) is taken with one compare-and-swap, which
/// keeps the waiters bit (and sets it if this caller slept: others may
/// sleep still, and its release must wake the next). A held word is spun
/// on briefly, then slept on with the waiters bit set; a holder judged dead
/// is marked "owner died" (by compare-and-swap from the word judged, so a
/// release meanwhile is never overwritten) and the word is taken from that.
pub(crate) fn acquire<W: Word32>(word: &W, tid: u32, wait: &mut impl Wait) -> Taken {
    debug_assert!(tid != 0 && tid & !WLOCK_TID == 0);
    let mut slept = false;
    let mut spins = 0;
    let mut seen = word.load(Ordering::Acquire);
    loop {
        if seen & WLOCK_TID == 0 {
            let waiters = if slept {
                WLOCK_WAITERS
            } else {
                seen & WLOCK_WAITERS
            };
            match word.compare_exchange(seen, tid | waiters, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) if seen & WLOCK_OWNER_DIED != 0 => return Taken::OwnerDied,
                Ok(_) => return Taken::Clean,
                Err(now) => {
                    seen = now;
                    continue;
                }
            }
        }
        if spins < SPINS {
            spins += 1;
            wait.spin();
            seen = word.load(Ordering::Acquire);
            continue;
        }
        if wait.holder_dead(seen) {
            let died = WLOCK_OWNER_DIED | (seen & WLOCK_WAITERS);
            seen = match word.compare_exchange(seen, died, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => died,
                Err(now) => now,
            };
            continue;
        }
        if seen & WLOCK_WAITERS == 0 {
            match word.compare_exchange(
                seen,
                seen | WLOCK_WAITERS,
                Ordering::Relaxed,
                Ordering::Acquire,
            ) {
                Ok(_) => seen |= WLOCK_WAITERS,
                Err(now) => {
                    seen = now;
                    continue;
                }
            }
        }
        wait.sleep(seen);
        slept = true;
        seen = word.load(Ordering::Acquire);
    }
}

/// Releases the lock; true when a waiter must be woken. `died` leaves the
/// word marked "owner died" (a holder that could not finish a recovery:
/// the next one tries again).
pub(crate) fn release<W: Word32>(word: &W, died: bool) -> bool {
    let free = if died { WLOCK_OWNER_DIED } else { 0 };
    word.swap(free, Ordering::SeqCst) & WLOCK_WAITERS != 0
}

/// The lock's holder bits, 0 when free.
pub(crate) fn holder(word: u32) -> u32 {
    word & WLOCK_TID
}

/// The protocol under loom: threads take the lock, check that they are
/// alone, and release it, or "die" holding it (the kernel's robust-list
/// marking done by hand, or a peer's judgement). Sleeping is a futex
/// without the timeout the real sleep has, so a lost wake-up leaves a
/// waiter asleep for good, which loom reports as a deadlock (and a waiter
/// that spins for good exceeds its branch bound).
#[cfg(all(test, shm_state_loom))]
mod model {
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use loom::thread;

    use super::*;
    use crate::shared::loom_futex::Futex;

    /// A waiter of the model: sleeps on the futex; `dead` is a holder the
    /// kernel could not mark (a copied region), which waiters judge dead
    /// (0: none).
    struct Waiter<'s> {
        shared: &'s Shared,
        dead: u32,
    }

    impl Wait for Waiter<'_> {
        fn spin(&mut self) {
            thread::yield_now();
        }
        fn sleep(&mut self, seen: u32) {
            self.shared
                .futex
                .wait(|| self.shared.word.load(SeqCst) != seen);
        }
        fn holder_dead(&mut self, seen: u32) -> bool {
            self.dead != 0 && holder(seen) == self.dead
        }
    }

    /// What the lock protects, in a loom cell: an access not ordered after
    /// the previous holder's (two holders at once, or a lock that does not
    /// synchronize) is a causality violation loom reports.
    #[derive(Default)]
    struct Protected {
        /// Holders so far.
        holders: u32,
        /// The last holder died holding the lock.
        died: bool,
        /// Holders that took the lock as `Taken::OwnerDied`.
        deaths_seen: u32,
    }

    struct Shared {
        word: AtomicU32,
        futex: Futex,
        protected: UnsafeCell<Protected>,
    }

    impl Shared {
        fn new(word: u32) -> Arc<Shared> {
            Arc::new(Shared {
                word: AtomicU32::new(word),
                futex: Futex::default(),
                protected: UnsafeCell::new(Protected::default()),
            })
        }

        /// Takes the lock, checks that the death of the holder before, and
        /// only that, is seen; then releases the lock (waking a sleeper if
        /// the waiters bit says so, as `release_writer` does), or dies
        /// holding it.
        fn hold(&self, tid: u32, dies: bool, dead: u32) {
            let taken = acquire(&self.word, tid, &mut Waiter { shared: self, dead });
            self.protected.with_mut(|p| {
                // SAFETY: a loom cell; loom checks that no other access
                // races with this one (the lock's job).
                let p = unsafe { &mut *p };
                assert_eq!(
                    taken == Taken::OwnerDied,
                    p.died,
                    "tid {tid} took the lock {taken:?} after a holder that {}",
                    if p.died { "died" } else { "released it" }
                );
                p.holders += 1;
                p.deaths_seen += u32::from(taken == Taken::OwnerDied);
                p.died = dies;
            });
            if dies {
                self.die(tid);
            } else if release(&self.word, false) {
                self.futex.wake_one();
            }
        }

        /// The kernel at the exit of a thread that holds the lock
        /// (`handle_futex_death`): a compare-and-swap loop from the word as
        /// it is to "owner died", keeping the waiters bit, the holder bits
        /// gone; then one sleeper is woken if the bit was set. (A load and
        /// a plain store, as this model first did, drops a waiters bit set
        /// in between.)
        fn die(&self, tid: u32) {
            let mut v = self.word.load(SeqCst);
            loop {
                assert_eq!(holder(v), tid, "dying without the lock: {v:#x}");
                let died = WLOCK_OWNER_DIED | (v & WLOCK_WAITERS);
                match self.word.compare_exchange(v, died, SeqCst, SeqCst) {
                    Ok(_) => break,
                    Err(now) => v = now,
                }
            }
            if v & WLOCK_WAITERS != 0 {
                self.futex.wake_one();
            }
        }

        /// After every thread: the lock is free, every thread held it, and
        /// the one death was seen by the holder after it, or is still
        /// marked for the next one.
        fn check_end(&self, holders: u32) {
            let v = self.word.load(SeqCst);
            assert_eq!(holder(v), 0, "the lock is still held: {v:#x}");
            // SAFETY: every thread is joined.
            let p = self.protected.with(|p| unsafe { &*p });
            assert_eq!(p.holders, holders);
            assert_eq!(v & WLOCK_OWNER_DIED != 0, p.died, "word {v:#x}");
            assert_eq!(p.deaths_seen + u32::from(p.died), 1, "deaths seen");
        }
    }

    /// Loom with a preemption bound (unless `LOOM_MAX_PREEMPTIONS` sets
    /// one), or none: two threads are explored whole in milliseconds; three
    /// take a second with a bound of 3 (23,000 executions), seven with 4.
    fn model(preemptions: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        if let Some(bound) = preemptions {
            builder.preemption_bound.get_or_insert(bound);
        }
        builder.check(f);
    }

    #[test]
    fn one_holder_at_a_time_and_a_death_is_seen_by_the_next() {
        model(None, || {
            let shared = Shared::new(0);
            let dying = {
                let shared = shared.clone();
                thread::spawn(move || shared.hold(1, true, 0))
            };
            shared.hold(2, false, 0);
            dying.join().unwrap();
            shared.check_end(2);
        });
    }

    /// Three threads (the main one is the third): one dies holding the
    /// lock (marked by the kernel), two take and release it. Only with two
    /// waiters can a wake-up be lost to a waiter that, woken, takes the
    /// lock without setting the waiters bit again; preemption bound 3.
    #[test]
    fn three_threads_one_dies_the_next_holder_sees_it() {
        model(Some(3), || {
            let shared = Shared::new(0);
            let spawn = |tid: u32, dies: bool| {
                let shared = shared.clone();
                thread::spawn(move || shared.hold(tid, dies, 0))
            };
            let dying = spawn(1, true);
            let other = spawn(2, false);
            shared.hold(3, false, 0);
            dying.join().unwrap();
            other.join().unwrap();
            shared.check_end(3);
        });
    }

    /// A holder the kernel could not mark (tid 9, dead, in a copied
    /// region): two waiters judge it dead and race to mark the word; one
    /// takes the lock as `OwnerDied`, the other after it cleanly.
    #[test]
    fn a_holder_judged_dead_is_taken_over_once() {
        model(None, || {
            let shared = Shared::new(9);
            shared.protected.with_mut(|p| {
                // SAFETY: no other thread yet.
                unsafe { (*p).died = true };
            });
            let other = {
                let shared = shared.clone();
                thread::spawn(move || shared.hold(2, false, 9))
            };
            shared.hold(1, false, 9);
            other.join().unwrap();
            let v = shared.word.load(SeqCst);
            assert_eq!(v, 0, "word {v:#x}");
            // SAFETY: every thread is joined.
            let p = shared.protected.with(|p| unsafe { &*p });
            assert_eq!((p.holders, p.deaths_seen, p.died), (2, 1, false));
        });
    }
}
