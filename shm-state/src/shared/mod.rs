//! Many processes, one state: [`SharedState`].
//!
//! Several processes open the same memfd (or file) with
//! [`SharedState::open`]. Each registers in the region's peer table
//! (`peers`); writers take turns under the writer lock (`wlock`), a futex
//! word the kernel releases for a holder that dies (`sys::Robust`); readers
//! take no lock at all: they copy what they read through a [`View`] and
//! keep it only if the commit word did not move meanwhile (a seqlock over
//! the commit word every transaction already stores). The design, its
//! guarantees and its costs: `docs/state-format.md`, *Sharing a state*.

#[cfg(all(test, shm_state_loom))]
mod loom_futex;
pub(crate) mod page;
pub(crate) mod peers;
mod rings;
pub(crate) mod seqlock;
mod sys;
mod view;
mod wake;
pub(crate) mod wlock;

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::format::*;
use crate::handle::StatePublished;
use crate::layout::Layout;
use crate::lock::{Claim, LockWords};
use crate::mem::{Identity, Mem};
use crate::open::{self, OpenHooks, OpenReport};
use crate::owner;
use crate::source::Source;
use crate::state::{State, Tx};

use page::SharedPage;
use wlock::Taken;

pub use peers::MAX_PEERS;
pub use view::{MapView, RingView, View};

/// How long an opener waits for another opener of the same state (which
/// holds the open lock only while it opens) before it gives up.
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// How long a waiter sleeps on the writer lock before it looks at the
/// holder again (the kernel wakes it at once when the holder dies; this
/// bounds the wait when it cannot: a copied region, no robust lists).
const LOCK_NAP: Duration = Duration::from_millis(20);
/// How long a reader sleeps on an open transaction before it looks again.
const READ_NAP: Duration = Duration::from_millis(10);
/// Optimistic reads that saw a commit before a read takes the writer lock
/// (so that a stream of writers cannot starve a reader).
const OPTIMISTIC_READS: u32 = 16;

/// A state several processes use at once.
///
/// Every process opens the memfd (or file) with [`SharedState::open`].
/// [`SharedState::transaction`] runs one transaction at a time across all
/// of them, under a writer lock in the region; [`SharedState::read`] reads
/// without any lock and returns copies, never a half-done transaction.
/// A process that dies holding the writer lock (kill -9 at any
/// instruction) has its transaction rolled back by the next writer or
/// reader, which goes on.
///
/// One handle per process and state: a second open of the same memory in
/// one process is refused ([`Error::Locked`]); threads share the handle
/// (behind a `Mutex`). A handle is not carried across `fork`.
///
/// A state is shared or exclusive, not both at once: [`State::open`] is
/// refused while a live process shares the state, and
/// [`SharedState::open`] while a [`State`] holds it.
pub struct SharedState<R> {
    state: State<R>,
    /// Dropped (its thread joined) before `page` is unmapped.
    robust: Option<sys::Robust>,
    page: SharedPage,
    entry: peers::Entry,
    tid: u32,
    /// `sys::forks()` when opened: a handle used in a forked child is
    /// refused (its robust thread and its peer entry are the parent's).
    forks: u64,
    ours: Identity,
    nonce: u64,
    stats: Stats,
    /// The last map header a read validated (see `view::MapCache`).
    map_cache: Cell<Option<view::MapCache>>,
    /// The last published value read: its block offset and geometry,
    /// validated once (a published value's block never moves, grows or
    /// is freed once created). Every read still checks each access
    /// against the region.
    published_cache: Option<(u64, u64, crate::published::Geometry)>,
    /// Lock-free tries of a published read before it reads under the
    /// writer lock (64; tests set fewer).
    published_tries: u32,
}

/// Counters of one handle's reads and transactions (for tests and
/// benchmarks).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Reads that saw a commit while they ran, and ran again.
    pub read_retries: u64,
    /// Reads that ended under the writer lock (after
    /// too many retries).
    pub locked_reads: u64,
    /// Interrupted transactions of dead writers this handle rolled back.
    pub recoveries: u64,
    /// Sleeps of the waiting ring calls on a ring's head or tail.
    pub ring_sleeps: u64,
    /// Those that ran out their nap (at most 50 ms) instead of being woken
    /// by a move of the word (or finding it moved).
    pub ring_naps: u64,
}

impl<R> fmt::Debug for SharedState<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedState")
            .field("state", &self.state)
            .field("slot", &self.entry.slot)
            .field("tid", &self.tid)
            .finish()
    }
}

/// The writer lock's view of the peers, for a waiter.
struct Waiter<'p> {
    page: &'p SharedPage,
    slot: usize,
    ours: Identity,
    nonce: u64,
    /// The last sleep ended with the word unchanged (it timed out): the
    /// holder has held the lock for a while, and is judged in full.
    stale: bool,
}

impl wlock::Wait for Waiter<'_> {
    fn sleep(&mut self, seen: u32) {
        sys::wait(self.page.wlock(), seen, LOCK_NAP);
        self.stale = self.page.wlock().load(Ordering::Acquire) == seen;
    }

    /// The holder (a thread id) is dead when no thread has its id (a
    /// signal-0 `kill`, no `/proc`), or, once a sleep timed out with the
    /// word unchanged, when the peer entry the lock's holder record names
    /// is dead (its identity: a copied or restored region names threads of
    /// other memory) or, before the holder stored that record, when no
    /// other peer lives at all. A death the kernel sees is marked in the
    /// word anyway: this is for what it cannot see.
    fn holder_dead(&mut self, seen: u32) -> bool {
        let tid = wlock::holder(seen);
        if !owner::pid_exists(tid) {
            return true;
        }
        if !self.stale {
            return false;
        }
        let h = self.page.u64(WLOCK_HOLDER).load(Ordering::Acquire);
        let slot = (h >> 32) as usize;
        if h as u32 == tid && (1..=peers::MAX_PEERS).contains(&slot) && slot - 1 != self.slot {
            return peers::live(self.page, slot - 1, self.ours, self.nonce).is_none();
        }
        peers::live_peers(self.page, self.ours, self.nonce)
            .iter()
            .all(|&(s, _)| s == self.slot)
    }
}

fn acquire_writer(page: &SharedPage, tid: u32, slot: usize, ours: Identity, nonce: u64) -> Taken {
    let mut waiter = Waiter {
        page,
        slot,
        ours,
        nonce,
        stale: false,
    };
    let taken = wlock::acquire(page.wlock(), tid, &mut waiter);
    page.u64(WLOCK_HOLDER).store(
        ((slot as u64 + 1) << 32) | u64::from(tid),
        Ordering::Release,
    );
    taken
}

/// Releases the writer lock and wakes who waits: one writer, every reader.
fn release_writer(page: &SharedPage, died: bool) {
    if wlock::release(page.wlock(), died) {
        sys::wake(page.wlock(), 1);
    }
    // Sleepers on the commit word (`wake.rs`: no wake-up lost).
    wake::notify(page.u64(READ_WAITERS), || {
        sys::wake(page.u32(TX_WORD), i32::MAX)
    });
}

/// The open of a shared state: the open lock is waited for while another
/// peer opens, and the writer lock is held for the open's own steps
/// (recovery, creation, migration, the opening transaction).
/// A peer entry registered by an open that has not succeeded yet: put
/// back when dropped (an error or a panic), unless kept.
struct Registered<'p> {
    page: &'p SharedPage,
    entry: Option<peers::Entry>,
}

impl Registered<'_> {
    fn keep(mut self) {
        self.entry = None;
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            peers::put_back(self.page, entry);
        }
    }
}

struct SharedOpen<'p> {
    page: &'p SharedPage,
    slot: usize,
    tid: u32,
    ours: Identity,
    nonce: u64,
    taken: Option<Taken>,
    /// The writer lock and its holder record as found: put back when the
    /// open is refused, so that the region is left as it was.
    before: (u32, u64),
}

/// A panic while the open holds the writer lock (in a migration, a commit
/// hook) releases it, marked owner-died: the region may hold half of the
/// opening transaction, which the next writer rolls back.
impl Drop for SharedOpen<'_> {
    fn drop(&mut self) {
        if self.taken.take().is_some() {
            release_writer(self.page, true);
        }
    }
}

impl SharedOpen<'_> {
    /// The pids of the other live peers.
    fn others(&self) -> Vec<u32> {
        peers::live_peers(self.page, self.ours, self.nonce)
            .into_iter()
            .filter(|&(slot, _)| slot != self.slot)
            .map(|(_, pid)| pid)
            .collect()
    }
}

impl OpenHooks for SharedOpen<'_> {
    fn lock(&mut self, mem: &Mem, nonce: u64) -> Result<(Claim, u64, Option<u32>)> {
        let deadline = Instant::now() + OPEN_WAIT;
        let mut nap = Duration::from_micros(100);
        // The holder last judged not to be a peer: refused only when the
        // next try names it again (it may have died, or finished its open
        // and left, between the try and the look at the peers).
        let mut not_a_peer = None;
        loop {
            match open::lock(mem, nonce) {
                Err(Error::Locked { pid }) if Instant::now() < deadline => {
                    let opening = peers::live_peers(self.page, mem.identity(), nonce)
                        .iter()
                        .any(|&(_, p)| p == pid);
                    if opening {
                        // Another peer is opening: it holds the lock briefly.
                        not_a_peer = None;
                        std::thread::sleep(nap);
                        nap = (nap * 2).min(Duration::from_millis(5));
                    } else if not_a_peer == Some(pid) {
                        // An exclusive State holds it.
                        return Err(Error::Locked { pid });
                    } else {
                        // Looked again after a moment: an exclusive opener
                        // that is being refused holds it only that long.
                        not_a_peer = Some(pid);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                other => return other,
            }
        }
    }

    fn locked(&mut self, mem: &Mem, nonce: u64) -> Result<()> {
        self.before = (
            self.page.wlock().load(Ordering::Acquire),
            self.page.u64(WLOCK_HOLDER).load(Ordering::Acquire),
        );
        self.taken = Some(acquire_writer(
            self.page,
            self.tid,
            self.slot,
            mem.identity(),
            nonce,
        ));
        Ok(())
    }

    fn failed(&mut self, _mem: &Mem) {
        let Some(taken) = self.taken.take() else {
            return;
        };
        let (wlock, holder) = self.before;
        self.page.u64(WLOCK_HOLDER).store(holder, Ordering::Release);
        // The lock word as found, unless someone sleeps on it now (then it
        // is released as usual, and they are woken).
        let word = self.page.wlock();
        let now = word.load(Ordering::Acquire);
        if wlock::holder(wlock) != 0
            || now & WLOCK_WAITERS != 0
            || word
                .compare_exchange(now, wlock, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
        {
            release_writer(self.page, taken == Taken::OwnerDied);
        }
    }

    fn opened(&mut self, _mem: &Mem) {
        // No other live peer: no one can be asleep counted in the wait
        // counts (a waiter is a peer), so counts a killed waiter left up
        // are reset (they only cost writers spare wake-ups).
        if self.others().is_empty() {
            self.page.u64(READ_WAITERS).store(0, Ordering::Release);
            self.page.u64(RING_WAITERS).store(0, Ordering::Release);
        }
    }

    /// A format 5 or 6 region keeps its format while another process
    /// shares it: that process may be of a format 5 build, which does not
    /// know the peer entries 64..68 or `ring_waiters`, or of a format 5 or
    /// 6 build, which reads only the journal of formats 4 to 6 (this build
    /// writes that one there meanwhile). A format 4 region has no sharers
    /// of an older build: format 4 builds only open exclusively.
    fn may_upgrade(&mut self, _mem: &Mem, from: u32) -> bool {
        from < 5 || self.others().is_empty()
    }

    fn may_migrate(&mut self, _mem: &Mem) -> Result<()> {
        let others = self.others();
        match others.first() {
            // The others read the root as the old layout.
            Some(&pid) => Err(Error::unsupported(format!(
                "the state's layout needs a migration, but {} other process(es) share it (process {pid} among them) and read the old layout; migrate when it is the only one",
                others.len()
            ))),
            None => Ok(()),
        }
    }
}

impl<R: Pod> SharedState<R> {
    /// Opens (or creates) the state in `source` for sharing with other
    /// processes that open the same memfd or file this way.
    ///
    /// As [`State::open`] (creation, recovery, migration, validation), and:
    /// the process is registered in the region's peer table (a dead
    /// peer's entry is taken over; [`Error::PeersFull`] when 68 live
    /// processes share it already), and the open waits for other peers'
    /// opens and for a running transaction. A heap buffer cannot be
    /// shared ([`Error::UnsupportedType`]).
    pub fn open(source: Source, mut layout: Layout<R>) -> Result<SharedState<R>> {
        let (mem, expected) = State::map_source(source, &mut layout)?;
        let Some(map) = mem.map_header()? else {
            return Err(Error::unsupported(
                "a heap buffer cannot be shared between processes; open a memfd or a file",
            ));
        };
        let page = SharedPage::new(map)?;
        let ours = mem.identity();
        let nonce = owner::register_handle(ours);
        let opened = (|| {
            if owner::another_handle_on(ours, nonce) {
                return Err(Error::Locked {
                    pid: std::process::id(),
                });
            }
            let mine = owner::sealed(LockWords {
                word: u64::from(std::process::id()),
                start: owner::own_start_time(),
                nonce,
                boot: peers::boot(),
                dev: ours.dev,
                ino: ours.ino,
            });
            // A format 5 region (one a format 5 build may share) offers the
            // 64 entries of format 5 only; its upgrade waits for an open
            // that finds no other peer (`may_upgrade`). The format is read
            // before the open lock: an upgrade meanwhile only makes this
            // opener keep to 64.
            let format = page.u32(SB_FORMAT).load(Ordering::Acquire);
            let entry = peers::register(&page, ours, nonce, &mine, peers::slots_for(format))?;
            // From here until the open succeeds, an error or a panic (a
            // migration's, a commit hook's) puts the entry back.
            let registered = Registered {
                page: &page,
                entry: Some(entry),
            };
            let robust = sys::Robust::start(page.wlock()).ok();
            let tid = robust.as_ref().map_or_else(sys::gettid, |r| r.tid());
            let mut hooks = SharedOpen {
                page: &page,
                slot: entry.slot,
                tid,
                taken: None,
                before: (0, 0),
                ours,
                nonce,
            };
            let state = State::open_locked(mem, nonce, expected, &mut layout, &mut hooks)?;
            // Opened: the writer lock goes as usual (the hooks' drop would
            // release it marked owner-died, as after a panic).
            hooks.taken = None;
            release_writer(&page, false);
            registered.keep();
            Ok((state, robust, entry, tid))
        })();
        let (mut state, robust, entry, tid) = match opened {
            Ok(v) => v,
            Err(e) => {
                owner::unregister_handle(nonce);
                return Err(e);
            }
        };
        state.release_open_lock();
        Ok(SharedState {
            state,
            robust,
            page,
            entry,
            tid,
            forks: sys::forks(),
            ours,
            nonce,
            stats: Stats::default(),
            map_cache: Cell::new(None),
            published_cache: None,
            published_tries: 64,
        })
    }

    /// What the open did (see [`State::report`]).
    pub fn report(&self) -> &OpenReport {
        self.state.report()
    }

    /// This handle's entry in the peer table (below [`MAX_PEERS`]).
    pub fn slot(&self) -> usize {
        self.entry.slot
    }

    /// Whether the kernel releases this process's writer lock if it dies
    /// (robust futexes); without them, a dead holder is found by its
    /// identity when a waiter looks (every 20 ms).
    pub fn is_robust(&self) -> bool {
        self.robust.is_some()
    }

    /// Counters of this handle's reads and recoveries.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The region's size as this handle maps it.
    pub fn region_len(&self) -> u64 {
        self.state.region_len()
    }

    /// The pids of the live processes sharing the state (this one
    /// included); entries of dead peers are freed on the way.
    pub fn peers(&self) -> Vec<u32> {
        peers::reclaim_dead(&self.page, self.ours, self.nonce);
        peers::live_peers(&self.page, self.ours, self.nonce)
            .into_iter()
            .map(|(_, pid)| pid)
            .collect()
    }

    fn check_fork(&self) -> Result<()> {
        if sys::forks() != self.forks {
            return Err(Error::unsupported(
                "a shared state's handle was opened by the parent of this process (fork); open the state again",
            ));
        }
        Ok(())
    }

    /// Takes the writer lock and gets the region ready (see [`take_over`]):
    /// the lock is released when the guard is dropped, a panic included.
    fn hold(&mut self) -> Result<Held<'_, R>> {
        let taken = acquire_writer(&self.page, self.tid, self.entry.slot, self.ours, self.nonce);
        let mut held = Held {
            page: &self.page,
            state: &mut self.state,
            failed: true,
        };
        take_over(held.state, &mut self.stats, taken)?;
        held.failed = false;
        Ok(held)
    }

    /// Runs `f` as one transaction under the writer lock (see
    /// [`State::transaction`]): waits while another process writes, and
    /// first rolls back the transaction of a writer that died.
    pub fn transaction<T, E: From<Error>>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_, R>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.check_fork()?;
        let held = self.hold()?;
        held.state.transaction(f)
    }

    /// Reads the state without the writer lock: `f` gets a [`View`] of the
    /// last committed state and returns copies of what it needs.
    ///
    /// `f` may run more than once: a run during which another process
    /// committed is thrown away (after 16 such runs, `f` runs once more
    /// under the writer lock). An error from a run that saw no commit is
    /// returned (damaged memory); an error from a torn run is not.
    pub fn read<T, E: From<Error>>(
        &mut self,
        mut f: impl FnMut(&View<'_, R>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.check_fork()?;
        let mut retries = 0;
        loop {
            // The seqlock (`seqlock.rs`, checked under loom): an acquire load
            // of a committed word, the copy, an acquire fence and the same
            // word again.
            let ticket = match seqlock::read_begin(self.page.u64(TX_WORD)) {
                Ok(ticket) => {
                    read_tx_word(ticket.word())?;
                    ticket
                }
                Err(open) => {
                    read_tx_word(open)?;
                    self.wait_for_commit(open)?;
                    continue;
                }
            };
            let Some(result) =
                Self::read_once(&mut self.state, &self.map_cache, ticket.word(), &mut f)?
            else {
                continue; // the region grew: mapped again
            };
            if seqlock::read_end(self.page.u64(TX_WORD), ticket) {
                return result;
            }
            self.stats.read_retries += 1;
            retries += 1;
            if retries >= OPTIMISTIC_READS {
                return self.read_locked(f);
            }
        }
    }

    /// One run of `f` over the region as it is; `None` when the heap top
    /// lies past this mapping (the region was remapped: run again).
    fn read_once<T, E: From<Error>>(
        state: &mut State<R>,
        cache: &Cell<Option<view::MapCache>>,
        word: u64,
        f: &mut impl FnMut(&View<'_, R>) -> Result<T, E>,
    ) -> Result<Option<Result<T, E>>> {
        let heap_off = state.core.heap_off;
        let len = state.core.mem.len();
        // SAFETY: while a region lives, this process touches the memory
        // only through it: the handle is borrowed mutably, no slice of the
        // region is alive (transactions and views of this handle need
        // `&mut self`), and no other handle of this process is on this
        // memory (`SharedState::open` refuses a second one).
        let region = unsafe { state.core.mem.shared_region() };
        let top = region.load_u64(DY_HEAP_TOP as usize);
        if top > len {
            // Another writer grew the region (or the word is torn: then
            // the next look at the commit word sends us round again).
            state.core.mem.refresh()?;
            return Ok(if top > state.core.mem.len() {
                Some(Err(Error::corrupt(
                    "heap top",
                    DY_HEAP_TOP,
                    format!("{top:#x} lies past the end of the region"),
                )
                .into()))
            } else {
                None
            });
        }
        // SAFETY: as above.
        let region = unsafe { state.core.mem.shared_region() };
        let view = View::new(region, (heap_off, top), word, cache);
        Ok(Some(f(&view)))
    }

    /// `f` under the writer lock: no writer can run, so one run is
    /// consistent.
    fn read_locked<T, E: From<Error>>(
        &mut self,
        mut f: impl FnMut(&View<'_, R>) -> Result<T, E>,
    ) -> Result<T, E> {
        let held = self.hold()?;
        // Nothing changes while the lock is held (a cache of its own: the
        // handle's is borrowed with it).
        let word = held.state.core.mem.load_u64(TX_WORD)?;
        let cache = Cell::new(None);
        let result = loop {
            if let Some(r) = Self::read_once(held.state, &cache, word, &mut f)? {
                break r;
            }
        };
        drop(held);
        self.stats.locked_reads += 1;
        result
    }

    /// Runs `f` on the state under the writer lock, with the whole read
    /// API of [`State`] (slices and references into the region, `verify`,
    /// logs): no other process writes while the lock is held. For reads
    /// that need more than a [`View`] offers, or a check of everything;
    /// it makes writers wait, so keep it short.
    pub fn with_lock<T, E: From<Error>>(
        &mut self,
        f: impl FnOnce(&State<R>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.check_fork()?;
        let held = self.hold()?;
        f(held.state)
    }

    /// Sleeps until another process commits a transaction (any: a wake
    /// names no structure), or `timeout` passes, whichever is first. For
    /// waiting on a condition a [`View`] can see (a ring that is empty or
    /// full): check it with [`SharedState::read`], then call this with the
    /// time left, and check again. The sleep is a futex wait on the commit
    /// word; a committing writer wakes sleepers only when there are some
    /// (no system call per transaction otherwise).
    pub fn wait_for_commit_after(&mut self, seen: u64, timeout: Duration) -> Result<()> {
        self.check_fork()?;
        let page = &self.page;
        wake::sleep_unless_changed(page.u64(TX_WORD), page.u64(READ_WAITERS), seen, || {
            sys::wait(page.u32(TX_WORD), seen as u32, timeout);
        });
        Ok(())
    }

    /// Publishes `bytes` as the next version of a published value (see
    /// [`Tx::new_published`]); returns the version (1 for the first).
    /// Publishers take turns under the writer lock, but the value's slots
    /// are not journaled: readers ([`SharedState::read_published`]) never
    /// wait for a publish, and a publisher killed in one leaves the last
    /// version readable.
    pub fn publish(&mut self, h: StatePublished, bytes: &[u8]) -> Result<u64> {
        self.check_fork()?;
        let held = self.hold()?;
        let mem = &held.state.core.mem;
        let heap = held.state.core.heap()?;
        // SAFETY: the writer lock is held and the handle borrowed mutably:
        // no slice of the region is alive in this process while the
        // region is used (see `read_once`).
        let region = unsafe { mem.shared_region() };
        let g = published_geometry(&region, heap, h)?;
        // An update of the snapshot protocol, like a transaction: a
        // snapshot copied meanwhile is not kept as consistent.
        held.state.core.publisher.begin_update();
        let (at, len) = crate::published::slots_span(g);
        mem.mark_written(at, len);
        let version = crate::published::publish(&region, g, bytes);
        held.state.core.publisher.commit();
        version
    }

    /// Publishes a POD value as the next version (its bytes, see
    /// [`SharedState::publish`]); read it back with
    /// [`SharedState::read_published_value`].
    pub fn publish_value<T: Pod>(&mut self, h: StatePublished, value: &T) -> Result<u64> {
        self.publish(h, bytemuck::bytes_of(value))
    }

    /// The latest complete version of a published value and its bytes
    /// (`None` before the first publish), without any lock: never torn,
    /// never waiting for a publisher while publishes are rarer than its
    /// copies (a read retries when one completes while it copies; after
    /// 64 such retries in a row it reads under the writer lock, where no
    /// publish runs).
    pub fn read_published(&mut self, h: StatePublished) -> Result<Option<(u64, Vec<u8>)>> {
        let mut bytes = Vec::new();
        Ok(self
            .read_published_into(h, &mut bytes)?
            .map(|version| (version, bytes)))
    }

    /// As [`SharedState::read_published`], into `bytes` (resized to the
    /// version's length; reused, no allocation once it is large enough):
    /// the version, or `None` (and `bytes` unspecified) before the first
    /// publish.
    pub fn read_published_into(
        &mut self,
        h: StatePublished,
        bytes: &mut Vec<u8>,
    ) -> Result<Option<u64>> {
        self.read_published_with(h, bytes)
    }

    /// The latest complete version of a published POD value
    /// ([`SharedState::publish_value`]): as
    /// [`SharedState::read_published`], copied straight into a `T`. A
    /// version of another length than `T`'s is
    /// [`Error::UnsupportedType`].
    pub fn read_published_value<T: Pod>(&mut self, h: StatePublished) -> Result<Option<(u64, T)>> {
        let mut value = T::zeroed();
        let version = self.read_published_value_into(h, &mut value)?;
        Ok(version.map(|v| (v, value)))
    }

    /// As [`SharedState::read_published_value`], into `value` (no copy of
    /// a `T` on the way out: for a large `T`, reuse one): the version, or
    /// `None` (and `value` unspecified) before the first publish.
    pub fn read_published_value_into<T: Pod>(
        &mut self,
        h: StatePublished,
        value: &mut T,
    ) -> Result<Option<u64>> {
        self.read_published_with(
            h,
            &mut crate::published::Exact(bytemuck::bytes_of_mut(value)),
        )
    }

    fn read_published_with(
        &mut self,
        h: StatePublished,
        out: &mut impl crate::published::Sink,
    ) -> Result<Option<u64>> {
        self.check_fork()?;
        let heap_off = self.state.core.heap_off;
        for _ in 0..2 {
            let len = self.state.core.mem.len();
            // SAFETY: as in `read_once`: the handle is borrowed mutably and
            // no other handle of this process is on this memory.
            let region = unsafe { self.state.core.mem.shared_region() };
            let top = region.load_u64(DY_HEAP_TOP as usize);
            if top > len {
                self.state.core.mem.refresh()?;
                continue;
            }
            let off = h.off()?;
            // The block header's first word (kind and class), checked on
            // every read: a freed (or reused) block is noticed.
            let head = (off < top && off % 8 == 0 && off + 8 <= len)
                .then(|| region.load_u64(off as usize));
            let g = match self.published_cache {
                Some((at, word, g)) if at == off && head == Some(word) => g,
                _ => {
                    // Kept for later reads only if validated under one
                    // committed commit word (the block is not one a
                    // transaction still open could roll back).
                    let word = self.page.u64(TX_WORD);
                    let before = word.load(Ordering::Acquire);
                    let g = published_geometry(&region, (heap_off, top), h)?;
                    fence(Ordering::Acquire);
                    if read_tx_word(before).is_ok_and(|(_, open)| !open)
                        && word.load(Ordering::Acquire) == before
                        && let Some(word) = head
                    {
                        self.published_cache = Some((off, word, g));
                    }
                    g
                }
            };
            return match crate::published::read_latest(&region, g, self.published_tries, out)? {
                crate::published::Latest::Read(version) => Ok(version),
                // A writer publishing faster than this copies: read under
                // the writer lock, where no publish runs (a reader that
                // dies holding it is taken over like any holder).
                crate::published::Latest::Contended => {
                    let held = self.hold()?;
                    // SAFETY: as above; the writer lock is held too.
                    let region = unsafe { held.state.core.mem.shared_region() };
                    // Tries enough to step past one damaged slot.
                    match crate::published::read_latest(&region, g, 4, out)? {
                        crate::published::Latest::Read(version) => Ok(version),
                        crate::published::Latest::Contended => Err(Error::corrupt(
                            "published value",
                            g.slots[0],
                            "its slots change while the writer lock is held (damaged memory, or a writer that does not take the lock)",
                        )),
                    }
                }
            };
        }
        Err(Error::corrupt(
            "heap top",
            DY_HEAP_TOP,
            "lies past the end of the region",
        ))
    }

    /// Sets the lock-free tries of a published read (tests).
    #[cfg(test)]
    pub(crate) fn set_published_tries(&mut self, tries: u32) {
        self.published_tries = tries;
    }

    /// The commit word now: what [`SharedState::wait_for_commit_after`]
    /// waits to see change.
    pub fn commit_word(&self) -> u64 {
        self.page.u64(TX_WORD).load(Ordering::Acquire)
    }

    /// Waits until the commit word is no longer `open_word` (a transaction
    /// in progress): spins briefly, then sleeps on the commit word; a
    /// writer found dead is rolled back here, under the writer lock.
    fn wait_for_commit(&mut self, open_word: u64) -> Result<()> {
        let word = self.page.u64(TX_WORD);
        for _ in 0..64 {
            std::hint::spin_loop();
            if word.load(Ordering::Acquire) != open_word {
                return Ok(());
            }
        }
        // A transaction is open but no one holds the lock: its writer died
        // (the kernel cleared its id). Taking the lock rolls it back.
        if wlock::holder(self.page.wlock().load(Ordering::Acquire)) == 0 {
            return self.hold().map(drop);
        }
        let page = &self.page;
        wake::sleep_unless_changed(word, page.u64(READ_WAITERS), open_word, || {
            sys::wait(page.u32(TX_WORD), open_word as u32, READ_NAP);
        });
        // Still open after the nap: judge the holder (the kernel marks a
        // death it sees; this is for what it cannot see).
        let v = self.page.wlock().load(Ordering::Acquire);
        if word.load(Ordering::Acquire) == open_word {
            let mut waiter = Waiter {
                page: &self.page,
                slot: self.entry.slot,
                ours: self.ours,
                nonce: self.nonce,
                stale: true,
            };
            if wlock::holder(v) == 0 || wlock::Wait::holder_dead(&mut waiter, v) {
                return self.hold().map(drop);
            }
        }
        Ok(())
    }

    /// Leaves the peer table and gives the source back.
    pub fn close(mut self) -> Result<Source> {
        self.leave();
        let state = std::mem::replace(&mut self.state, State::placeholder());
        state.close()
    }
}

/// The writer lock, held, with the state it guards: released when
/// dropped, so that a panic in a transaction's closure (rolled back by the
/// transaction) never leaves the lock held by a live process. Released
/// marked "owner died" when the region was left needing a recovery (a
/// failed take-over, a rollback that failed).
struct Held<'h, R> {
    page: &'h SharedPage,
    state: &'h mut State<R>,
    failed: bool,
}

impl<R> Drop for Held<'_, R> {
    fn drop(&mut self) {
        release_writer(self.page, self.failed || self.state.core.poisoned);
        // The rings the transaction touched: their waiters sleep on the
        // head's or the tail's low half (`rings.rs`), woken when it moved
        // and some ring has a waiter (`wake.rs`: no wake-up lost).
        let core = &mut self.state.core;
        let mem = &core.mem;
        let moved = |&(ring, head, tail): &(u64, u64, u64)| {
            let at = ring + BLOCK_HEADER;
            [(at, head), (at + 8, tail)]
                .into_iter()
                .filter(|&(off, was)| mem.load_u64(off).is_ok_and(|now| now != was))
        };
        let rings = core.rings_touched();
        if rings.iter().flat_map(moved).next().is_some() {
            wake::notify(self.page.u64(RING_WAITERS), || {
                for (off, _) in rings.iter().flat_map(moved) {
                    if let Ok(word) = mem.atomic_u32(off) {
                        sys::wake(word, i32::MAX);
                    }
                }
            });
        }
        core.clear_rings_touched();
    }
}

/// A published value's block and geometry, read through `region` (its
/// block and largest length never change once created).
fn published_geometry(
    region: &shm_snapshot::Region<'_>,
    heap: (u64, u64),
    h: StatePublished,
) -> Result<crate::published::Geometry> {
    let b = view::block(region, heap, h.off()?, Kind::Published)?;
    let max_len = view::read_u64(region, "published value", b.payload())?;
    crate::published::geometry(b, max_len)
}

/// Holding the writer lock: follows the region if another writer grew
/// it, continues the snapshot protocol's sequence, and rolls back the
/// transaction of a writer that died in it.
fn take_over<R>(state: &mut State<R>, stats: &mut Stats, taken: Taken) -> Result<()> {
    let core = &mut state.core;
    let top = core.mem.load_u64(DY_HEAP_TOP)?;
    if taken == Taken::OwnerDied || top > core.mem.len() {
        core.mem.refresh()?;
    }
    core.publisher.resync();
    if open::recover(
        &mut core.mem,
        core.journal_len,
        core.heap_off,
        &mut core.publisher,
    )?
    .is_some()
    {
        stats.recoveries += 1;
    }
    Ok(())
}

impl<R> SharedState<R> {
    fn leave(&mut self) {
        if self.nonce == 0 {
            return;
        }
        self.nonce = 0;
        if sys::forks() != self.forks {
            // A copy of the handle in a forked child: the entry is the
            // parent's, and the robust thread does not exist here (joining
            // it would touch the parent's thread records). Both are left
            // alone.
            std::mem::forget(self.robust.take());
            return;
        }
        peers::release(&self.page, self.entry);
        drop(self.robust.take());
    }
}

impl<R> Drop for SharedState<R> {
    fn drop(&mut self) {
        self.leave();
    }
}
