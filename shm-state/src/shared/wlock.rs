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

/// What a waiter does between looks at the word: sleep while it holds
/// `seen` (a futex wait with a timeout), and judge whether the holder `seen`
/// names is dead (a holder the kernel could not mark: a copied or restored
/// region, a kernel without robust lists).
pub(crate) trait Wait {
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
            std::hint::spin_loop();
            #[cfg(shm_state_loom)]
            loom::thread::yield_now();
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
/// marking done by hand); every waiter gets the lock in the end.
#[cfg(all(test, shm_state_loom))]
mod model {
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
    use loom::thread;

    use super::*;

    struct Yield;
    impl Wait for Yield {
        fn sleep(&mut self, _seen: u32) {
            loom::thread::yield_now();
        }
        fn holder_dead(&mut self, _seen: u32) -> bool {
            false
        }
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(3);
        builder.check(f);
    }

    #[test]
    fn one_holder_at_a_time_and_a_death_is_seen_by_the_next() {
        model(|| {
            let word = Arc::new(AtomicU32::new(0));
            let inside = Arc::new(AtomicUsize::new(0));
            let deaths_seen = Arc::new(AtomicUsize::new(0));
            let run = |tid: u32, dies: bool| {
                let (word, inside, deaths_seen) =
                    (word.clone(), inside.clone(), deaths_seen.clone());
                thread::spawn(move || {
                    if acquire(&*word, tid, &mut Yield) == Taken::OwnerDied {
                        deaths_seen.fetch_add(1, SeqCst);
                    }
                    assert_eq!(inside.fetch_add(1, SeqCst), 0, "two holders");
                    inside.fetch_sub(1, SeqCst);
                    if dies {
                        // The kernel at the thread's exit: holder bits
                        // gone, owner died, waiters kept.
                        let v = word.load(SeqCst);
                        assert_eq!(holder(v), tid);
                        word.store(WLOCK_OWNER_DIED | (v & WLOCK_WAITERS), SeqCst);
                    } else {
                        release(&*word, false);
                    }
                })
            };
            let a = run(1, true);
            let b = run(2, false);
            a.join().unwrap();
            b.join().unwrap();
            let v = word.load(SeqCst);
            assert_eq!(holder(v), 0);
            // The death was seen by the one who came after it, or is still
            // marked for the next.
            assert!(
                deaths_seen.load(SeqCst) == 1 || v & WLOCK_OWNER_DIED != 0,
                "a death went unnoticed: {v:#x}"
            );
        });
    }
}
