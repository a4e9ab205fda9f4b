//! The commit word as a seqlock: how a reader that takes no lock knows
//! that what it copied is one committed state, never part of a
//! transaction (`docs/state-format.md`, *Sharing a state*).
//!
//! Every transaction already stores the commit word twice: open
//! (`tx_word(seq, true)`, bit 0 set) before its first write, committed
//! (`tx_word(seq, false)`) after its last one. The writer (one at a time,
//! under the writer lock) and the readers follow this protocol:
//!
//! | writer                                    | reader                                   |
//! |-------------------------------------------|------------------------------------------|
//! | [`write_begin`]: store the open word,     | [`read_begin`]: load the word (Acquire); |
//! | then `fence(Release)`                     | open: refuse (wait for the commit)       |
//! | write the data in place                   | copy the data (Relaxed atomic loads)     |
//! | [`write_commit`]: store the committed     | [`read_end`]: `fence(Acquire)`, load the |
//! | word (Release)                            | word again (Relaxed): keep the copy only |
//! |                                           | if it did not change                     |
//!
//! [`read_consistent`] is the reader's three steps in one call.
//!
//! Why each ordering is needed (each one's removal makes a loom model
//! below accept a torn copy; see `model`):
//!
//! - **Release on the committed store, Acquire on the first load.** A
//!   reader that loads the committed word of transaction N synchronizes
//!   with its store: every write of N (and of the transactions before it)
//!   happens before the copy, which therefore reads nothing older (read
//!   coherence). Without the pair, the copy may read some words as they
//!   were before N and others as N left them, and the word, unchanged,
//!   vouches for the mix.
//! - **`fence(Release)` after the open store, `fence(Acquire)` before the
//!   second load.** If the copy read any write of transaction N+1, the
//!   writer's release fence (before that write) synchronizes with the
//!   reader's acquire fence (after the load that read it), so the open
//!   store of N+1 happens before the second load, which then reads the
//!   open word of N+1 or a later word, never the first one. A release
//!   *store* of the open word would not do: release orders what comes
//!   before a store, and the data writes come after it (they could become
//!   visible before the open word). Likewise an acquire *load* the second
//!   time would not do: acquire orders what comes after a load, and the
//!   copy comes before it. Each fence is the other's half: without either,
//!   the second load may still read the first word after the copy read a
//!   write of the next transaction.
//! - **Relaxed second load.** The acquire fence before it gives the
//!   ordering; the value is only compared.
//! - **The open store.** `Release` in [`write_begin`] (as the real commit
//!   path stores it, `Mem::store_word`); the seqlock alone needs only
//!   `Relaxed` there, the fence after it does the work.
//!
//! "Unchanged" means no transaction began in between because every
//! transaction stores words no earlier one stored (the sequence number
//! grows; a rollback commits the rolled-back transaction's own number), so
//! no ABA up to the 2^55 transactions the word counts. A writer that dies
//! mid-transaction leaves the word open: readers refuse until a recovery
//! rolls it back and stores the next word.
//!
//! The data words are read with atomic loads (a plain read racing the
//! writer would be a data race): the copy may be torn, and the check above
//! is what throws a torn copy away, so the copy must not act on what it
//! read before the check (no pointer chasing without bounds checks).
//!
//! Written over any atomic 64-bit cell with its fence ([`SeqWord`]), so
//! that the same code runs on the region's commit word and, under
//! `--cfg shm_state_loom`, on loom's atomics with threads standing in for
//! processes:
//! `RUSTFLAGS="--cfg shm_state_loom" cargo test -p shm-state --release --lib shared::seqlock::model`.

// `SharedState::read` uses `read_begin` and `read_end`; the writer side in
// the real code is `TxCore::begin` (the open word through `Mem::store_word`,
// the crash-test seam, then the same release fence) and the commit in
// `TxCore::commit_inner` and the journal's rollbacks, so `read_consistent`,
// `write_begin` and `write_commit` serve the models, which pin the orderings
// those copy.
#![cfg_attr(not(all(test, shm_state_loom)), allow(dead_code))]

use std::sync::atomic::Ordering;

use crate::format::TX_OPEN;
use crate::lock::Word;

/// An atomic 64-bit cell and the fence that orders accesses to it: std's
/// for the region's words, loom's under the model (a std fence is
/// invisible to loom, a loom fence outside a model panics).
pub(crate) trait SeqWord: Word {
    fn fence(order: Ordering);
}

impl SeqWord for std::sync::atomic::AtomicU64 {
    #[inline]
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order);
    }
}

#[cfg(shm_state_loom)]
impl SeqWord for loom::sync::atomic::AtomicU64 {
    fn fence(order: Ordering) {
        loom::sync::atomic::fence(order);
    }
}

/// A committed word a reader saw at [`read_begin`]: the copy made after it
/// is kept if [`read_end`] finds the word unchanged.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl Ticket {
    /// The committed word (its check byte is the caller's to verify).
    pub(crate) fn word(self) -> u64 {
        self.0
    }
}

/// What one read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome<T> {
    /// The attempt ran between two commits: its value, and the committed
    /// word it ran under.
    Consistent(T, u64),
    /// A transaction is open (this word): the attempt did not run. Wait
    /// for the commit, or recover if the writer is dead.
    Open(u64),
    /// A transaction began while the attempt ran: its value is thrown away.
    Torn,
}

/// The reader's first step: the commit word, with acquire ordering (so
/// that the copy after it sees every write the word's transaction made).
/// `Ok` with a ticket when it is committed; `Err` with the word when a
/// transaction is open (copy nothing: wait for the commit). The caller
/// verifies the word's check byte (`format::read_tx_word`) if it cares:
/// only bit 0 is looked at here.
#[inline]
pub(crate) fn read_begin<W: SeqWord>(word: &W) -> Result<Ticket, u64> {
    let w = word.load(Ordering::Acquire);
    if w & TX_OPEN != 0 {
        Err(w)
    } else {
        Ok(Ticket(w))
    }
}

/// The reader's last step, after the copy: an acquire fence (pairing with
/// the writer's release fence in [`write_begin`]), then the commit word
/// again, relaxed. True when it is still the ticket's: no transaction
/// began while the copy ran, so the copy is the ticket's committed state.
#[inline]
pub(crate) fn read_end<W: SeqWord>(word: &W, ticket: Ticket) -> bool {
    W::fence(Ordering::Acquire);
    word.load(Ordering::Relaxed) == ticket.0
}

/// One optimistic read: [`read_begin`], `attempt` (which reads the data
/// with relaxed atomic loads) if the word is committed, [`read_end`].
#[inline]
pub(crate) fn read_consistent<W: SeqWord, T>(word: &W, attempt: impl FnOnce() -> T) -> Outcome<T> {
    let ticket = match read_begin(word) {
        Ok(ticket) => ticket,
        Err(open) => return Outcome::Open(open),
    };
    let value = attempt();
    if read_end(word, ticket) {
        Outcome::Consistent(value, ticket.0)
    } else {
        Outcome::Torn
    }
}

/// The writer's first step (under the writer lock), before any write of
/// the transaction: stores the `open` word, then a release fence, so that
/// a reader that reads any later write also sees the word open (or later).
#[inline]
pub(crate) fn write_begin<W: SeqWord>(word: &W, open: u64) {
    debug_assert!(open & TX_OPEN != 0, "not an open word: {open:#x}");
    word.store(open, Ordering::Release);
    W::fence(Ordering::Release);
}

/// The writer's last step, after every write of the transaction: stores
/// the `committed` word with release ordering, so that a reader that
/// loads it (acquire) sees all of them.
#[inline]
pub(crate) fn write_commit<W: SeqWord>(word: &W, committed: u64) {
    debug_assert!(committed & TX_OPEN == 0, "an open word: {committed:#x}");
    word.store(committed, Ordering::Release);
}

/// The protocol under loom: a writer thread runs transactions that change
/// two data words together (`a = n`, `b = !n`), stored relaxed (standing in
/// for the plain stores of a writer in another process); a reader thread
/// reads both with [`read_consistent`] and checks every copy it keeps.
#[cfg(all(test, shm_state_loom))]
mod model {
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64;
    use loom::thread;

    use super::*;
    use crate::format::tx_word;

    /// The region in the model: the commit word and two data words.
    struct Region {
        word: AtomicU64,
        a: AtomicU64,
        b: AtomicU64,
    }

    impl Region {
        /// As after `n` committed transactions.
        fn new(n: u64) -> Region {
            Region {
                word: AtomicU64::new(tx_word(n, false)),
                a: AtomicU64::new(n),
                b: AtomicU64::new(!n),
            }
        }
    }

    /// The seqlock's two sides; the real one, and mutants that each drop
    /// one ordering (which the model must catch).
    trait Protocol: 'static {
        fn begin(word: &AtomicU64, open: u64);
        fn commit(word: &AtomicU64, committed: u64);
        fn read<T>(word: &AtomicU64, attempt: impl FnOnce() -> T) -> Outcome<T>;
    }

    struct Real;
    impl Protocol for Real {
        fn begin(word: &AtomicU64, open: u64) {
            write_begin(word, open);
        }
        fn commit(word: &AtomicU64, committed: u64) {
            write_commit(word, committed);
        }
        fn read<T>(word: &AtomicU64, attempt: impl FnOnce() -> T) -> Outcome<T> {
            read_consistent(word, attempt)
        }
    }

    /// Writes a transaction's `n`: open, `a`, then (unless the writer dies
    /// first) `b`, commit.
    fn transaction<P: Protocol>(region: &Region, n: u64, dies: bool) {
        P::begin(&region.word, tx_word(n, true));
        region.a.store(n, Ordering::Relaxed);
        if dies {
            return; // killed: the word stays open, `a` and `b` disagree
        }
        region.b.store(!n, Ordering::Relaxed);
        P::commit(&region.word, tx_word(n, false));
    }

    /// One read; a kept copy must be whole and the state of the commit
    /// it was read under. Returns what it found.
    fn read<P: Protocol>(region: &Region) -> Outcome<(u64, u64)> {
        let outcome = P::read(&region.word, || {
            (
                region.a.load(Ordering::Relaxed),
                region.b.load(Ordering::Relaxed),
            )
        });
        match outcome {
            Outcome::Consistent((a, b), word) => {
                assert_eq!(b, !a, "kept a torn copy: a = {a}, b = {:#x}", b);
                assert_eq!(
                    tx_word(a, false),
                    word,
                    "torn: kept the state of commit {a} under another word"
                );
            }
            Outcome::Open(word) => assert!(word & TX_OPEN != 0),
            Outcome::Torn => {}
        }
        outcome
    }

    /// Without a preemption bound (unless `LOOM_MAX_PREEMPTIONS` sets
    /// one): every interleaving, and every value each relaxed load may
    /// return, of these two threads (about 1.2 million executions for
    /// [`whole_commits`], half a minute in release mode).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        loom::model::Builder::new().check(f);
    }

    /// Two transactions while a reader reads twice: every copy kept is one
    /// committed state (never a mix, never the open transaction's); once
    /// the writer is done, a read keeps the last commit.
    fn whole_commits<P: Protocol>() {
        model(|| {
            let region = Arc::new(Region::new(0));
            let reader = {
                let region = region.clone();
                thread::spawn(move || {
                    for _ in 0..2 {
                        read::<P>(&region);
                    }
                })
            };
            for n in 1..=2 {
                transaction::<P>(&region, n, false);
            }
            reader.join().unwrap();
            assert_eq!(
                read::<P>(&region),
                Outcome::Consistent((2, !2), tx_word(2, false))
            );
        });
    }

    #[test]
    fn readers_keep_only_whole_commits() {
        whole_commits::<Real>();
    }

    /// The writer commits one transaction, then dies in the next after its
    /// first write: no reader keeps the half-written state, and after the
    /// death every read finds the transaction open.
    #[test]
    fn a_writer_that_dies_mid_transaction_leaves_nothing_torn_to_keep() {
        model(|| {
            let region = Arc::new(Region::new(0));
            let reader = {
                let region = region.clone();
                thread::spawn(move || {
                    for _ in 0..2 {
                        if let Outcome::Consistent((a, _), _) = read::<Real>(&region) {
                            assert!(a <= 1, "kept the dead writer's state");
                        }
                    }
                })
            };
            transaction::<Real>(&region, 1, false);
            transaction::<Real>(&region, 2, true);
            reader.join().unwrap();
            assert_eq!(read::<Real>(&region), Outcome::Open(tx_word(2, true)));
        });
    }

    // The model has teeth: each ordering the module docs call necessary,
    // dropped, lets the reader keep a torn copy in some interleaving.

    /// The writer without `fence(Release)` after the open store.
    struct NoWriterFence;
    impl Protocol for NoWriterFence {
        fn begin(word: &AtomicU64, open: u64) {
            word.store(open, Ordering::Release);
        }
        fn commit(word: &AtomicU64, committed: u64) {
            write_commit(word, committed);
        }
        fn read<T>(word: &AtomicU64, attempt: impl FnOnce() -> T) -> Outcome<T> {
            read_consistent(word, attempt)
        }
    }

    /// The reader without `fence(Acquire)` before the second load.
    struct NoReaderFence;
    impl Protocol for NoReaderFence {
        fn begin(word: &AtomicU64, open: u64) {
            write_begin(word, open);
        }
        fn commit(word: &AtomicU64, committed: u64) {
            write_commit(word, committed);
        }
        fn read<T>(word: &AtomicU64, attempt: impl FnOnce() -> T) -> Outcome<T> {
            let before = word.load(Ordering::Acquire);
            if before & TX_OPEN != 0 {
                return Outcome::Open(before);
            }
            let value = attempt();
            if word.load(Ordering::Relaxed) == before {
                Outcome::Consistent(value, before)
            } else {
                Outcome::Torn
            }
        }
    }

    /// The reader's first load relaxed.
    struct RelaxedFirstLoad;
    impl Protocol for RelaxedFirstLoad {
        fn begin(word: &AtomicU64, open: u64) {
            write_begin(word, open);
        }
        fn commit(word: &AtomicU64, committed: u64) {
            write_commit(word, committed);
        }
        fn read<T>(word: &AtomicU64, attempt: impl FnOnce() -> T) -> Outcome<T> {
            let before = word.load(Ordering::Relaxed);
            if before & TX_OPEN != 0 {
                return Outcome::Open(before);
            }
            let value = attempt();
            if read_end(word, Ticket(before)) {
                Outcome::Consistent(value, before)
            } else {
                Outcome::Torn
            }
        }
    }

    /// The writer's commit store relaxed.
    struct RelaxedCommit;
    impl Protocol for RelaxedCommit {
        fn begin(word: &AtomicU64, open: u64) {
            write_begin(word, open);
        }
        fn commit(word: &AtomicU64, committed: u64) {
            word.store(committed, Ordering::Relaxed);
        }
        fn read<T>(word: &AtomicU64, attempt: impl FnOnce() -> T) -> Outcome<T> {
            read_consistent(word, attempt)
        }
    }

    /// The reader that copies under an open word too.
    struct IgnoresOpen;
    impl Protocol for IgnoresOpen {
        fn begin(word: &AtomicU64, open: u64) {
            write_begin(word, open);
        }
        fn commit(word: &AtomicU64, committed: u64) {
            write_commit(word, committed);
        }
        fn read<T>(word: &AtomicU64, attempt: impl FnOnce() -> T) -> Outcome<T> {
            let before = word.load(Ordering::Acquire);
            let value = attempt();
            if read_end(word, Ticket(before)) {
                Outcome::Consistent(value, before & !TX_OPEN)
            } else {
                Outcome::Torn
            }
        }
    }

    #[test]
    #[should_panic(expected = "torn")]
    fn without_the_writers_release_fence_a_torn_copy_is_kept() {
        whole_commits::<NoWriterFence>();
    }

    #[test]
    #[should_panic(expected = "torn")]
    fn without_the_readers_acquire_fence_a_torn_copy_is_kept() {
        whole_commits::<NoReaderFence>();
    }

    #[test]
    #[should_panic(expected = "torn")]
    fn with_a_relaxed_first_load_a_torn_copy_is_kept() {
        whole_commits::<RelaxedFirstLoad>();
    }

    #[test]
    #[should_panic(expected = "torn")]
    fn with_a_relaxed_commit_a_torn_copy_is_kept() {
        whole_commits::<RelaxedCommit>();
    }

    #[test]
    #[should_panic(expected = "torn")]
    fn copying_under_an_open_word_keeps_a_torn_copy() {
        whole_commits::<IgnoresOpen>();
    }
}
