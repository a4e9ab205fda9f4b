//! The lock's claim protocol over the lock words (`docs/state-format.md`,
//! *The lock*): one compare-and-swap claims the word, the holder's identity
//! follows, a release store settles it.
//!
//! Written over any atomic 64-bit cell ([`Word`]), so that the same code
//! runs on the region's words and, under `--cfg shm_state_loom`, on loom's
//! atomics, with threads standing in for processes:
//! `RUSTFLAGS="--cfg shm_state_loom" cargo test -p shm-state --release --lib lock::model`.
//! Whether a holder the lock names is alive and holds this memory is the
//! caller's judgement (`owner::holds` for the real thing).

use std::sync::atomic::Ordering;

use crate::format::{LOCK_CLAIMING, LOCK_COUNT_SHIFT};

/// The lock words as read from a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockWords {
    /// pid | claiming bit | claim count.
    pub word: u64,
    pub start: u64,
    pub nonce: u64,
    pub boot: [u64; 2],
    pub dev: u64,
    pub ino: u64,
}

impl LockWords {
    pub(crate) fn pid(&self) -> u32 {
        self.word as u32
    }
}

/// An atomic 64-bit cell.
pub(crate) trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
}

macro_rules! impl_word {
    ($t:ty) => {
        impl Word for $t {
            fn load(&self, order: Ordering) -> u64 {
                <$t>::load(self, order)
            }
            fn store(&self, value: u64, order: Ordering) {
                <$t>::store(self, value, order)
            }
            fn compare_exchange(
                &self,
                current: u64,
                new: u64,
                success: Ordering,
                failure: Ordering,
            ) -> Result<u64, u64> {
                <$t>::compare_exchange(self, current, new, success, failure)
            }
        }
    };
}

impl_word!(std::sync::atomic::AtomicU64);
#[cfg(shm_state_loom)]
impl_word!(loom::sync::atomic::AtomicU64);

/// The lock words' cells.
pub(crate) struct LockCells<'m, W> {
    pub word: &'m W,
    pub start: &'m W,
    pub nonce: &'m W,
    /// The boot id's two words; a peer entry keeps one (the two folded,
    /// see `shared::peers`), and has no second cell.
    pub boot: &'m W,
    pub boot_hi: Option<&'m W>,
    pub dev: &'m W,
    pub ino: &'m W,
}

impl<W: Word> LockCells<'_, W> {
    /// The identity words, with `word` as the lock word (read by the
    /// caller, with acquire ordering, before these).
    pub(crate) fn read(&self, word: u64) -> LockWords {
        LockWords {
            word,
            start: self.start.load(Ordering::Acquire),
            nonce: self.nonce.load(Ordering::Acquire),
            boot: [
                self.boot.load(Ordering::Acquire),
                self.boot_hi.map_or(0, |w| w.load(Ordering::Acquire)),
            ],
            dev: self.dev.load(Ordering::Acquire),
            ino: self.ino.load(Ordering::Acquire),
        }
    }

    /// Stores the identity words (the lock word itself is the caller's).
    fn write(&self, w: &LockWords) {
        self.start.store(w.start, Ordering::Relaxed);
        self.nonce.store(w.nonce, Ordering::Relaxed);
        self.boot.store(w.boot[0], Ordering::Relaxed);
        if let Some(hi) = self.boot_hi {
            hi.store(w.boot[1], Ordering::Relaxed);
        }
        self.dev.store(w.dev, Ordering::Relaxed);
        self.ino.store(w.ino, Ordering::Relaxed);
    }
}

/// The lock as one open claimed it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim {
    /// The lock words as found (put back if the open fails).
    pub previous: LockWords,
    /// The lock word while this handle holds it: pid and claim count.
    pub held: u64,
}

const PID_MASK: u64 = 0xFFFF_FFFF;

/// Takes the lock for process `me` with the identity words `mine`: one
/// compare-and-swap from the word as found (free, or naming a holder that
/// `holds` says does not hold this memory) to `me | CLAIMING | count + 1`;
/// then the identity words; then the claiming bit is cleared with a release
/// store. `holds(found, claiming)` judges a lock caught with the claiming
/// bit by its pid alone (the other words are being written). The claim
/// count makes the swap fail if the word changed hands in between, even
/// back to the same pid. Returns the claim and the pid whose lock was taken
/// over, or the pid of the live holder.
pub(crate) fn claim<W: Word>(
    cells: &LockCells<'_, W>,
    me: u32,
    mine: &LockWords,
    holds: impl Fn(&LockWords, bool) -> bool,
) -> Result<(Claim, Option<u32>), u32> {
    let mut current = cells.word.load(Ordering::Acquire);
    // Every failed swap means another opener moved the word; it then holds
    // or claims it, so the next round refuses. The bound is a safeguard.
    for _ in 0..16 {
        let found = cells.read(current);
        let pid = found.pid();
        if holds(&found, current & LOCK_CLAIMING != 0) {
            return Err(pid);
        }
        let count = ((current >> LOCK_COUNT_SHIFT) + 1) & (u64::MAX >> LOCK_COUNT_SHIFT);
        let claiming = u64::from(me) | LOCK_CLAIMING | (count << LOCK_COUNT_SHIFT);
        match cells
            .word
            .compare_exchange(current, claiming, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                cells.write(mine);
                let held = claiming & !LOCK_CLAIMING;
                // Release: whoever sees the bit clear sees our identity.
                cells.word.store(held, Ordering::Release);
                let claim = Claim {
                    previous: found,
                    held,
                };
                return Ok((claim, (pid != 0).then_some(pid)));
            }
            Err(now) => current = now,
        }
    }
    Err((current & PID_MASK) as u32)
}

/// Puts the lock words back as they were found (an open that fails after
/// taking the lock), so that a refused region is left byte for byte as it
/// was. The claiming bit is set first, so that no opener judges the words
/// while they are being put back.
pub(crate) fn unlock<W: Word>(cells: &LockCells<'_, W>, claim: Claim) {
    if cells
        .word
        .compare_exchange(
            claim.held,
            claim.held | LOCK_CLAIMING,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        return; // not ours any more (never while this process lives)
    }
    cells.write(&claim.previous);
    cells.word.store(claim.previous.word, Ordering::Release);
}

/// Releases a held lock: the word keeps its claim count and loses the pid,
/// only if it is still this handle's (word and nonce).
pub(crate) fn release<W: Word>(cells: &LockCells<'_, W>, held: u64, nonce: u64) {
    if cells.nonce.load(Ordering::Acquire) != nonce {
        return;
    }
    let _ =
        cells
            .word
            .compare_exchange(held, held & !PID_MASK, Ordering::AcqRel, Ordering::Relaxed);
}

/// The claim protocol under loom: threads stand in for processes opening
/// one region; a process "holds" the lock when the words it finds name a
/// pid that is alive (all are, in these models, unless marked dead) and,
/// once settled, this memory's identity.
#[cfg(all(test, shm_state_loom))]
mod model {
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
    use loom::thread;

    use super::*;

    const DEV: u64 = 7;
    const INO: u64 = 42;
    const DEAD: u32 = 9;

    #[derive(Default)]
    struct Region {
        word: AtomicU64,
        start: AtomicU64,
        nonce: AtomicU64,
        boot: [AtomicU64; 2],
        dev: AtomicU64,
        ino: AtomicU64,
        holders: AtomicUsize,
    }

    impl Region {
        fn cells(&self) -> LockCells<'_, AtomicU64> {
            LockCells {
                word: &self.word,
                start: &self.start,
                nonce: &self.nonce,
                boot: &self.boot[0],
                boot_hi: Some(&self.boot[1]),
                dev: &self.dev,
                ino: &self.ino,
            }
        }
    }

    fn mine(pid: u32) -> LockWords {
        LockWords {
            word: 0,
            start: u64::from(pid) * 100,
            nonce: u64::from(pid) * 1000,
            boot: [1, 2],
            dev: DEV,
            ino: INO,
        }
    }

    /// `owner::holds` for the model: a non-zero pid other than `DEAD`,
    /// with this memory's identity once settled.
    fn holds(found: &LockWords, claiming: bool) -> bool {
        let pid = found.pid();
        if pid == 0 || pid == DEAD {
            return false;
        }
        claiming || (found.dev == DEV && found.ino == INO && found.start == u64::from(pid) * 100)
    }

    /// Opens (claims), works holding the lock, then closes (release) or
    /// gives up the open (unlock, the words put back).
    fn open_work_close(region: &Region, pid: u32, refuse: bool) {
        let cells = region.cells();
        let Ok((claim, _)) = claim(&cells, pid, &mine(pid), holds) else {
            return;
        };
        assert_eq!(region.holders.fetch_add(1, SeqCst), 0, "two holders");
        // The settled words name this holder.
        let found = cells.read(region.word.load(Ordering::Acquire));
        assert_eq!(found.pid(), pid);
        assert!(holds(&found, false));
        region.holders.fetch_sub(1, SeqCst);
        if refuse {
            unlock(&cells, claim);
        } else {
            release(&cells, claim.held, mine(pid).nonce);
        }
    }

    /// Loom with a preemption bound of 2 (the usual compromise: bugs that
    /// need more preemptions than that are rare, and the full space of
    /// seven words and two threads takes minutes).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(2);
        builder.check(f);
    }

    #[test]
    fn two_openers_never_hold_the_lock_at_once() {
        model(|| {
            let region = Arc::new(Region::default());
            let other = {
                let region = region.clone();
                thread::spawn(move || open_work_close(&region, 2, false))
            };
            open_work_close(&region, 1, false);
            other.join().unwrap();
            // Both released: free, with a count of the claims made.
            assert_eq!(region.word.load(SeqCst) & PID_MASK, 0);
        });
    }

    #[test]
    fn a_dead_holders_lock_is_taken_over_by_one_opener_at_a_time() {
        model(|| {
            let region = Arc::new(Region::default());
            region.word.store(u64::from(DEAD), SeqCst);
            region.start.store(u64::from(DEAD) * 100, SeqCst);
            region.dev.store(DEV, SeqCst);
            region.ino.store(INO, SeqCst);
            let other = {
                let region = region.clone();
                thread::spawn(move || open_work_close(&region, 2, true))
            };
            open_work_close(&region, 1, false);
            other.join().unwrap();
            let pid = (region.word.load(SeqCst) & PID_MASK) as u32;
            // A refused open puts the dead holder's words back, a closed one
            // leaves the lock free: nobody holds it now.
            assert!(pid == 0 || pid == DEAD, "pid {pid}");
            let words = region.cells().read(region.word.load(SeqCst));
            assert!(!holds(&words, false));
        });
    }
}
