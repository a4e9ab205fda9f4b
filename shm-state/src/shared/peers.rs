//! The peer table (`docs/state-format.md`, *The peer table*): one entry
//! per process sharing a state, written with the lock's claim protocol
//! (`crate::lock`) and judged with the lock's rules (`owner::holds`), so
//! that a reused pid, a state restored from a snapshot or copied into other
//! memory never passes for a live peer.

use std::sync::atomic::{Ordering, fence};

use crate::error::{Error, Result};
use crate::format::{LOCK_CLAIMING, PEER_COUNT};
use crate::lock::{self, Claim, LockWords};
use crate::mem::Identity;
use crate::owner;
use crate::shared::page::SharedPage;

/// The number of entries: the most processes that share one state.
pub const MAX_PEERS: usize = PEER_COUNT as usize;

const PID_MASK: u64 = 0xFFFF_FFFF;

/// A peer entry this process holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub slot: usize,
    pub held: u64,
    pub nonce: u64,
    /// The entry's words as found: put back when the open is refused, so
    /// that the region is left as it was.
    previous: LockWords,
}

/// The pid entry `slot` names if it is a live peer of the memory `ours`
/// (judged as the lock is, for the handle `my_nonce`), else `None`.
pub(crate) fn live(page: &SharedPage, slot: usize, ours: Identity, my_nonce: u64) -> Option<u32> {
    let cells = page.peer(slot);
    let word = cells.word.load(Ordering::Acquire);
    if word & PID_MASK == 0 {
        return None;
    }
    let found = cells.read(word);
    judge(&found, word, ours, my_nonce).then(|| found.pid())
}

/// The lock's judgement, but for this process's own entries: one is live
/// when its nonce is a handle of this process on this memory (the lock
/// asks about *another* handle, since its opener claims it itself).
fn judge(found: &LockWords, word: u64, ours: Identity, my_nonce: u64) -> bool {
    if found.pid() == std::process::id() && word & LOCK_CLAIMING == 0 {
        return owner::is_handle_on(found.nonce, ours);
    }
    owner::holds_on_boot(found, ours, word & LOCK_CLAIMING != 0, my_nonce, boot())
}

/// This boot's id as a peer entry records it: its two words folded into
/// one (a peer entry has room for 6 words; the fold of two random 64-bit
/// words is as unlikely to repeat on another boot as either).
pub(crate) fn boot() -> [u64; 2] {
    let [lo, hi] = owner::boot_id();
    [lo ^ hi, 0]
}

/// Every live peer: `(slot, pid)`.
pub(crate) fn live_peers(page: &SharedPage, ours: Identity, my_nonce: u64) -> Vec<(usize, u32)> {
    (0..MAX_PEERS)
        .filter_map(|slot| live(page, slot, ours, my_nonce).map(|pid| (slot, pid)))
        .collect()
}

/// The entries an opener may take in a region of format `format`: all of
/// them from format 6 on; in a format 5 region only the 64 its builds
/// know (entries 64..68 are reserved bytes there, which a format 5 build
/// requires zero and does not judge).
pub(crate) fn slots_for(format: u32) -> usize {
    if format >= 6 { MAX_PEERS } else { 64 }
}

/// Takes a free entry, or the entry of a dead peer, among the first
/// `slots`, for this process (identity words `mine`, see
/// `owner::sealed`). Fails with [`Error::PeersFull`] when every one of
/// them names a live peer.
pub(crate) fn register(
    page: &SharedPage,
    ours: Identity,
    my_nonce: u64,
    mine: &LockWords,
    slots: usize,
) -> Result<Entry> {
    let me = std::process::id();
    for slot in 0..slots.min(MAX_PEERS) {
        let cells = page.peer(slot);
        if let Ok((Claim { held, previous }, _)) = lock::claim(&cells, me, mine, |found, _| {
            judge(found, found.word, ours, my_nonce)
        }) {
            // Whoever takes the open lock after this sees the entry (an
            // exclusive opener then refuses): see `SharedState::open`.
            fence(Ordering::SeqCst);
            return Ok(Entry {
                slot,
                held,
                nonce: mine.nonce,
                previous,
            });
        }
    }
    Err(Error::PeersFull {
        max: slots.min(MAX_PEERS),
    })
}

/// Gives an entry back (if it is still ours).
pub(crate) fn release(page: &SharedPage, entry: Entry) {
    lock::release(&page.peer(entry.slot), entry.held, entry.nonce);
}

/// Gives back the entry of a refused open: its words as they were found
/// (see `lock::unlock`).
pub(crate) fn put_back(page: &SharedPage, entry: Entry) {
    lock::unlock(
        &page.peer(entry.slot),
        Claim {
            previous: entry.previous,
            held: entry.held,
        },
    );
}

/// Frees the entries of dead peers (each by compare-and-swap from the word
/// judged, so a peer registering meanwhile is never thrown out); returns
/// their pids.
pub(crate) fn reclaim_dead(page: &SharedPage, ours: Identity, my_nonce: u64) -> Vec<u32> {
    let mut freed = Vec::new();
    for slot in 0..MAX_PEERS {
        let cells = page.peer(slot);
        let word = cells.word.load(Ordering::Acquire);
        if word & PID_MASK == 0 {
            continue;
        }
        let found = cells.read(word);
        if judge(&found, word, ours, my_nonce) {
            continue;
        }
        let free = word & !PID_MASK & !LOCK_CLAIMING;
        if cells
            .word
            .compare_exchange(word, free, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            freed.push(found.pid());
        }
    }
    freed
}
