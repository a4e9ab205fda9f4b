//! The untyped transaction engine: journaled writes, the allocator, commit
//! and rollback.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{Ordering, compiler_fence, fence};

use crate::error::{Error, Result};
use crate::format::*;
use crate::journal::{self, Journal, TxKey};
use crate::mem::Mem;
use crate::snapshot::Publisher;

/// Line numbers are already well spread; a multiply is all the hashing they need.
#[derive(Default)]
pub(crate) struct LineHasher(u64);

impl Hasher for LineHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The lines journaled in the open transaction. Most transactions touch a
/// handful of lines, so they are kept in a small array searched linearly;
/// a large transaction spills them into a hash set.
#[derive(Debug, Default)]
struct LineSet {
    small: [u64; SMALL_LINES],
    n: usize,
    spill: HashSet<u64, BuildHasherDefault<LineHasher>>,
}

const SMALL_LINES: usize = 16;

/// A spill set that grew past this many entries is dropped rather than
/// cleared, so that one huge transaction does not slow every later
/// `clear` (which is linear in the capacity).
const SPILL_KEEP: usize = 1 << 12;

impl LineSet {
    /// Inlined as far as the empty set (a transaction's first write asks
    /// it) and the first entry.
    #[inline(always)]
    fn contains(&self, line: u64) -> bool {
        match self.n {
            0 => false,
            1 => self.small[0] == line,
            _ => self.contains_many(line),
        }
    }

    #[inline(never)]
    fn contains_many(&self, line: u64) -> bool {
        if self.n <= SMALL_LINES {
            self.small[..self.n].contains(&line)
        } else {
            self.spill.contains(&line)
        }
    }

    /// Adds a line that is not in the set.
    fn insert(&mut self, line: u64) {
        if self.n < SMALL_LINES {
            self.small[self.n] = line;
        } else {
            if self.n == SMALL_LINES {
                self.spill.extend(self.small);
            }
            self.spill.insert(line);
        }
        self.n += 1;
    }

    #[inline(always)]
    fn clear(&mut self) {
        if self.n > SMALL_LINES {
            self.clear_spill();
        }
        self.n = 0;
    }

    #[cold]
    #[inline(never)]
    fn clear_spill(&mut self) {
        if self.spill.capacity() > SPILL_KEEP {
            self.spill = HashSet::default();
        } else {
            self.spill.clear();
        }
    }
}

/// The heap ranges a transaction journaled exactly: a write of at most
/// [`EXACT_MAX`] bytes to heap lines not yet journaled, sharing no line
/// with another such range, takes a record of just those bytes (32 to 56
/// bytes instead of a whole line's 88), up to [`EXACT_SLOTS`] of them per
/// transaction. A later write inside one of these ranges needs no record;
/// any other write to their lines journals the lines whole. So a line
/// takes at most one exact record and one whole one, and the rollback,
/// newest record first, still ends with every byte's oldest before-image.
#[derive(Debug)]
struct ExactSet {
    /// The first `n` are the ranges; the rest are [`UNUSED`].
    ranges: [(u64, u64); EXACT_SLOTS],
    n: usize,
}

/// An unused slot of [`ExactSet::ranges`]: covers nothing.
const UNUSED: (u64, u64) = (u64::MAX, 0);

impl Default for ExactSet {
    fn default() -> ExactSet {
        ExactSet {
            ranges: [UNUSED; EXACT_SLOTS],
            n: 0,
        }
    }
}

pub(crate) const EXACT_SLOTS: usize = 8;
/// The largest write journaled exactly.
const EXACT_MAX: u64 = 32;

impl ExactSet {
    /// Whether `off..end` lies inside one of the ranges: every slot
    /// compared without a branch, as most writes of a big transaction
    /// ask and are not inside one.
    #[inline(always)]
    fn covers(&self, off: u64, end: u64) -> bool {
        if self.n == 0 {
            return false;
        }
        // The first two slots always (unused ones cover nothing): most
        // transactions hold one or two ranges.
        let inside = |(s, e): (u64, u64)| (s <= off) & (end <= e);
        let mut hit = inside(self.ranges[0]) | inside(self.ranges[1]);
        if self.n > 2 {
            for &r in &self.ranges[2..] {
                hit |= inside(r);
            }
        }
        hit
    }

    #[inline(always)]
    fn clear(&mut self) {
        // Most transactions hold one or two ranges (`covers` reads both).
        self.ranges[0] = UNUSED;
        self.ranges[1] = UNUSED;
        if self.n > 2 {
            self.ranges[2..].fill(UNUSED);
        }
        self.n = 0;
    }

    /// Whether one of the ranges shares a line with `first..=last`.
    #[inline(always)]
    fn near(&self, first: u64, last: u64) -> bool {
        let near = |(s, e): (u64, u64)| s / LINE <= last && first <= (e - 1) / LINE;
        match self.n {
            0 => false,
            1 => near(self.ranges[0]),
            n => self.ranges[..n].iter().any(|&r| near(r)),
        }
    }
}

/// A map's header block and table block, validated by a view of the map
/// in a transaction of this handle: the next view of the same map compares
/// the first word of each block header (kind and class) with the one
/// checked, instead of checking them again (`map::tx_header`), while the
/// rest of the check still holds.
///
/// The rest is where the blocks lie: 16-aligned inside the heap, ending
/// below its top. Offsets and classes are those checked, and the heap top
/// only shrinks by a rollback. So this holds from the transaction `seq`
/// that checked them for as long as every transaction since is this
/// handle's and committed, and is forgotten when a transaction rolls back,
/// when one frees either block (at its commit, where the block becomes
/// free), and when a transaction begins after one that was not this
/// handle's (another process's, on a shared state), which `seq` tells.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KnownMap {
    /// The last transaction of this handle, since the check.
    pub seq: u64,
    /// The map's block, and the first word of its header.
    pub map: u64,
    pub map_word: u64,
    /// Its table's block (0: none), the first word of its header, and its
    /// capacity.
    pub table: u64,
    pub table_word: u64,
    pub table_cap: u64,
}

/// An open region: the memory and what was validated about it on open.
#[derive(Debug)]
pub(crate) struct Core {
    pub publisher: Publisher,
    pub mem: Mem,
    pub journal_len: u64,
    /// The journal transactions write: the region's format decides (see
    /// [`Journal::of_format`]); set by the open.
    pub journal: Journal,
    pub heap_off: u64,
    pub poisoned: bool,
    // Per-transaction bookkeeping, kept here to reuse the allocations.
    logged: LineSet,
    /// Small heap ranges journaled exactly (not as whole lines) in the
    /// open transaction; see [`TxCore::prepare`].
    exact: ExactSet,
    fresh: BTreeMap<u64, u64>,
    pending_free: Vec<u64>,
    /// Rings this transaction touched, with their head and tail as it
    /// found them (the committed ones): `(ring block, head, tail)`.
    ring_heads: Vec<(u64, u64, u64)>,
    /// The same offsets (divided by 16), for the double-free check: a big
    /// clear frees tens of thousands of blocks.
    pending_set: HashSet<u64, BuildHasherDefault<LineHasher>>,
    /// The blocks of the map viewed last, as validated (see [`KnownMap`]).
    pub known_map: Option<KnownMap>,
    /// The commit word this handle stored last, and its sequence number:
    /// the next `begin` that finds the same word knows what it says
    /// without decoding it again (decoding depends on the word alone).
    last_committed: Option<(u64, u64)>,
}

impl Core {
    pub(crate) fn new(mem: Mem, journal_len: u64, heap_off: u64, publisher: Publisher) -> Core {
        Core {
            mem,
            journal_len,
            journal: Journal::Legacy,
            heap_off,
            publisher,
            poisoned: false,
            logged: LineSet::default(),
            exact: ExactSet::default(),
            fresh: BTreeMap::new(),
            pending_free: Vec::new(),
            ring_heads: Vec::new(),
            pending_set: HashSet::default(),
            known_map: None,
            last_committed: None,
        }
    }

    /// Forgets the known map if `off` is one of its blocks.
    fn forget_block(&mut self, off: u64) {
        if self
            .known_map
            .is_some_and(|k| k.map == off || (k.table == off && off != 0))
        {
            self.known_map = None;
        }
    }

    /// The rings the last transaction touched (their block offsets, head
    /// and tail as it found them), to wake their waiters once it is over.
    pub(crate) fn rings_touched(&self) -> &[(u64, u64, u64)] {
        &self.ring_heads
    }

    /// Forgets them (woken).
    pub(crate) fn clear_rings_touched(&mut self) {
        self.ring_heads.clear();
    }

    /// The heap's bounds `(heap_off, heap_top)`, the top read and checked.
    #[inline(always)]
    pub(crate) fn heap(&self) -> Result<(u64, u64)> {
        heap_bounds(&self.mem, self.heap_off)
    }
}

/// `(heap_off, heap_top)` with the top read from the header and checked.
#[inline]
pub(crate) fn heap_bounds(mem: &Mem, heap_off: u64) -> Result<(u64, u64)> {
    let top = u64_at(mem, "heap top", DY_HEAP_TOP)?;
    if top < heap_off || top > mem.len() || !top.is_multiple_of(16) {
        return Err(bad_heap_top(mem, heap_off, top));
    }
    Ok((heap_off, top))
}

#[cold]
#[inline(never)]
fn bad_write_target(off: u64, len: u64) -> Error {
    Error::corrupt(
        "write target",
        off,
        format!("{len} bytes run past the region"),
    )
}

#[cold]
#[inline(never)]
fn bad_heap_top(mem: &Mem, heap_off: u64, top: u64) -> Error {
    Error::corrupt(
        "heap top",
        DY_HEAP_TOP,
        format!(
            "{top:#x} is not a 16-aligned offset in {heap_off:#x}..={:#x}",
            mem.len()
        ),
    )
}

/// A transaction in progress over a [`Core`].
///
/// Every write to memory that existed before the transaction goes through
/// [`TxCore::write`] (or is prepared with [`TxCore::prepare`]), which first
/// journals the before-image of the lines it touches. Memory allocated in
/// this transaction is not journaled: rolling back frees it again.
#[derive(Debug)]
pub(crate) struct TxCore<'a> {
    pub core: &'a mut Core,
    seq: u64,
    /// The commit word that marks it open.
    open_word: u64,
    /// What this transaction's journal records are bound to.
    key: TxKey,
    pos: u64,
    start_top: u64,
    finished: bool,
    /// Changes made so far (writes, allocations, frees): an operation that
    /// fails after this moved has left its work half done.
    changes: u64,
    /// The first operation that failed part way: the transaction cannot
    /// commit (see [`TxCore::op`]).
    failed: Option<String>,
}

impl<'a> TxCore<'a> {
    // Inlined, as `map::header` is: an `Err` is large, so a `Result`
    // comes back through memory, and the caller's wide loads of the
    // callee's narrow stores stall on store forwarding.
    #[inline(always)]
    pub(crate) fn begin(core: &'a mut Core) -> Result<TxCore<'a>> {
        if core.poisoned {
            return Err(Error::Poisoned);
        }
        let word = core.mem.atomic_u64(TX_WORD)?.load(Ordering::Acquire);
        let (last, open) = match core.last_committed {
            Some((committed, seq)) if committed == word => (seq, false),
            _ => read_tx_word(word).inspect_err(|_| core.poisoned = true)?,
        };
        if open {
            // Only a foreign writer can leave this set while we hold the lock.
            core.poisoned = true;
            return Err(Error::corrupt(
                "commit word",
                TX_WORD,
                "a transaction is marked open although this process holds the state",
            ));
        }
        if last >= MAX_SEQ {
            return Err(Error::unsupported(format!(
                "the state has run {last} transactions, the most its commit word counts"
            )));
        }
        let seq = last + 1;
        if core.known_map.is_some_and(|k| k.seq != last) {
            // A transaction ran that was not this handle's.
            core.known_map = None;
        }
        let (_, start_top) = core.heap()?;
        core.logged.clear();
        core.exact.clear();
        // Most transactions allocate and free nothing: an empty set is
        // left alone (a map's `clear` is not free even then).
        if !core.fresh.is_empty() {
            core.fresh.clear();
        }
        core.pending_free.clear();
        core.ring_heads.clear();
        if core.pending_set.capacity() > SPILL_KEEP {
            core.pending_set = HashSet::default();
        } else if !core.pending_set.is_empty() {
            core.pending_set.clear();
        }
        let key = TxKey::new(seq);
        core.publisher.begin_update();
        if core.journal == Journal::Claimed {
            // Before the open word: while this transaction is open, the
            // head's claim is its own (docs/state-format.md, *Journal*).
            journal::claim_nothing(&mut core.mem, &key)?;
        }
        let open_word = tx_word(seq, true);
        core.mem.store_word(TX_WORD, open_word)?;
        // The open word is visible before any write of the transaction: a
        // reader in another process (a shared state's, a snapshotter) that
        // sees one of the writes sees the word open, or a later one.
        fence(Ordering::Release);
        let pos = core.journal.first_pos();
        Ok(TxCore {
            core,
            seq,
            open_word,
            key,
            pos,
            start_top,
            finished: false,
            changes: 0,
            failed: None,
        })
    }

    /// This transaction's sequence number.
    #[inline(always)]
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// How many changes this transaction has made (see [`TxCore::settle`]).
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    /// Ends one operation that started when [`TxCore::changes`] was
    /// `before`: if it failed after changing something, the transaction is
    /// marked failed and will roll back instead of committing, even if the
    /// closure ignores the error.
    pub(crate) fn settle<T>(&mut self, before: u64, result: &Result<T>) {
        if let Err(e) = result {
            self.settle_err(before, e);
        }
    }

    /// [`TxCore::settle`] of an operation that failed with `e`.
    pub(crate) fn settle_err(&mut self, before: u64, e: &Error) {
        if self.changes != before && self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
    }

    /// Runs one operation under [`TxCore::settle`].
    pub(crate) fn op<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let before = self.changes;
        let result = f(self);
        self.settle(before, &result);
        result
    }

    pub(crate) fn mem(&self) -> &Mem {
        &self.core.mem
    }

    #[inline(always)]
    pub(crate) fn heap(&self) -> Result<(u64, u64)> {
        self.core.heap()
    }

    /// Journals the before-image of `off..off+len` unless the range is
    /// fresh in this transaction, so that the caller may then write it.
    ///
    /// Before-images are taken in whole lines, once per line per
    /// transaction, except for a small write to heap lines not journaled
    /// yet, which takes a record of just its bytes (see [`ExactSet`]). The
    /// header below the heap is always journaled in whole lines: the commit
    /// rewrites the dynamic header's checksum unjournaled when its line was.
    #[inline]
    pub(crate) fn prepare(&mut self, off: u64, len: u64) -> Result<()> {
        self.prepare_as(off, len, EXACT_MAX)
    }

    /// [`TxCore::prepare`], journaling exactly only writes of at most
    /// `exact_max` bytes (0: whole lines only).
    #[inline(always)]
    fn prepare_as(&mut self, off: u64, len: u64, exact_max: u64) -> Result<()> {
        let end = match off.checked_add(len) {
            Some(e) if e <= self.core.mem.len() => e,
            _ => return Err(bad_write_target(off, len)),
        };
        if len == 0 || off >= self.start_top {
            return Ok(());
        }
        if touches_atomics(off, len) {
            return Err(Error::corrupt(
                "write target",
                off,
                "a journaled write may not touch the commit and lock words, the shared line or the peer table",
            ));
        }
        if !self.core.fresh.is_empty() && self.in_fresh_block(off, end) {
            return Ok(());
        }
        let first = off / LINE;
        let last = (end - 1) / LINE;
        if len <= exact_max && off >= self.core.heap_off {
            let logged = &self.core.logged;
            let first_logged = logged.contains(first);
            let last_logged = if last == first {
                first_logged
            } else {
                logged.contains(last)
            };
            if first_logged && last_logged {
                return Ok(());
            }
            let exact = &self.core.exact;
            if !first_logged && !last_logged {
                if exact.covers(off, end) {
                    return Ok(());
                }
                if exact.n < EXACT_SLOTS && !exact.near(first, last) {
                    self.append_record(off, len)?;
                    // Marked once the before-image is in, as below.
                    let exact = &mut self.core.exact;
                    exact.ranges[exact.n] = (off, end);
                    exact.n += 1;
                    compiler_fence(Ordering::SeqCst);
                    return Ok(());
                }
            }
            if first == last {
                // One line, known not to be journaled: no second look.
                self.journal_lines(first, first + 1)?;
                compiler_fence(Ordering::SeqCst);
                return Ok(());
            }
        }
        self.prepare_lines(first, last)
    }

    /// Journals the lines `first..=last` that are not journaled yet, a
    /// run of adjacent ones as one record.
    fn prepare_lines(&mut self, first: u64, last: u64) -> Result<()> {
        let mut line = first;
        while line <= last {
            if self.core.logged.contains(line) {
                line += 1;
                continue;
            }
            let run_start = line;
            line += 1;
            while line <= last && !self.core.logged.contains(line) {
                line += 1;
            }
            self.journal_lines(run_start, line)?;
        }
        compiler_fence(Ordering::SeqCst);
        Ok(())
    }

    /// Appends the before-image of `off..off+len` to this transaction's
    /// journal as one record ([`journal::append`]), moving the position on.
    #[inline(always)]
    fn append_record(&mut self, off: u64, len: u64) -> Result<()> {
        self.pos = journal::append(
            &mut self.core.mem,
            self.core.journal,
            self.core.journal_len,
            self.pos,
            &self.key,
            off,
            len,
        )?;
        Ok(())
    }

    /// Journals the lines `start..end` (none journaled yet) as one record.
    fn journal_lines(&mut self, start: u64, end: u64) -> Result<()> {
        let from = start * LINE;
        let stop = (end * LINE).min(self.core.mem.len());
        self.append_record(from, stop - from)?;
        // Marked only once their before-image is in: a failed append (a
        // full journal) leaves them unjournaled, and a later write in this
        // transaction journals them then.
        for l in start..end {
            self.core.logged.insert(l);
        }
        Ok(())
    }

    /// Writes `data` at `off`, journaling first.
    #[inline(always)]
    pub(crate) fn write(&mut self, what: &'static str, off: u64, data: &[u8]) -> Result<()> {
        self.prepare(off, data.len() as u64)?;
        self.changes += 1;
        self.core.mem.write(what, off, data)
    }

    /// Journals exactly `off..off+len` (a block header being freed: a
    /// 40-byte record instead of a whole line's 88) unless its lines are
    /// already journaled or it is fresh. The lines are not marked
    /// journaled: a later write to them journals them whole, and the
    /// rollback, newest record first, still ends with these bytes' own
    /// before-image.
    fn prepare_exact(&mut self, off: u64, len: u64) -> Result<()> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.core.mem.len() && off >= self.core.heap_off)
            .ok_or_else(|| Error::corrupt("write target", off, "not a heap range"))?;
        if len == 0 || off >= self.start_top {
            return Ok(());
        }
        if self.in_fresh_block(off, end) {
            return Ok(());
        }
        if (off / LINE..=(end - 1) / LINE).all(|line| self.core.logged.contains(line)) {
            return Ok(());
        }
        self.append_record(off, len)?;
        compiler_fence(Ordering::SeqCst);
        Ok(())
    }

    /// Whether `off..off+len` was allocated in this transaction (past the
    /// heap top at its start, or inside a block taken from a free list):
    /// not part of the committed state, written without journaling.
    #[inline(always)]
    pub(crate) fn is_fresh(&self, off: u64, len: u64) -> bool {
        let Some(end) = off.checked_add(len) else {
            return false;
        };
        off >= self.start_top || (!self.core.fresh.is_empty() && self.in_fresh_block(off, end))
    }

    /// Whether `off..end` lies inside a block this transaction took from a
    /// free list.
    #[inline(never)]
    fn in_fresh_block(&self, off: u64, end: u64) -> bool {
        self.core
            .fresh
            .range(..=off)
            .next_back()
            .is_some_and(|(_, &fresh_end)| end <= fresh_end)
    }

    /// Whether this transaction may have written the byte at `off` (or
    /// allocated it): its line journaled whole, or the byte inside an exact
    /// record or fresh memory. `false` means the byte is as committed.
    #[inline(always)]
    pub(crate) fn may_have_written_byte(&self, off: u64) -> bool {
        self.core.exact.covers(off, off + 1)
            || self.core.logged.contains(off / LINE)
            || self.is_fresh(off, 1)
    }

    /// Writes bytes that are not part of the committed state without
    /// journaling them: bytes past a length field (a log chunk's `used`)
    /// that only grows within a transaction and is itself journaled, so a
    /// rollback puts them back beyond the end again; a map slot whose
    /// control byte says, as committed, that it is free (the control byte
    /// is journaled).
    #[inline(always)]
    pub(crate) fn write_tail(&mut self, what: &'static str, off: u64, data: &[u8]) -> Result<()> {
        if off < self.core.heap_off {
            // Only heap bytes may skip the journal (the header's checksum
            // relies on every header write being logged).
            return Err(Error::corrupt(
                what,
                off,
                "an unjournaled write outside the heap",
            ));
        }
        self.changes += 1;
        self.core.mem.write(what, off, data)
    }

    /// The head of the ring at `ring` as this transaction first saw it
    /// (the committed head): `head` now if this is the first look, which
    /// also records `tail`.
    pub(crate) fn ring_head_at_start(&mut self, ring: u64, head: u64, tail: u64) -> u64 {
        match self.core.ring_heads.iter().find(|(r, _, _)| *r == ring) {
            Some(&(_, h, _)) => h,
            None => {
                self.core.ring_heads.push((ring, head, tail));
                head
            }
        }
    }

    pub(crate) fn write_u64(&mut self, what: &'static str, off: u64, v: u64) -> Result<()> {
        self.write(what, off, &v.to_le_bytes())
    }

    /// Mutable bytes at `off`, journaled first.
    pub(crate) fn bytes_mut(
        &mut self,
        what: &'static str,
        off: u64,
        len: u64,
    ) -> Result<&mut [u8]> {
        self.prepare(off, len)?;
        self.changes += 1;
        self.core.mem.bytes_mut(what, off, len)
    }

    /// Allocates a block of `kind` with a payload of at least `len` bytes,
    /// zeroed when asked. Reuses a free block of the size class, or takes
    /// new space at the heap top, growing the region when it is full.
    pub(crate) fn alloc(&mut self, kind: Kind, len: u64, zeroed: bool) -> Result<Block> {
        let class = class_for(len)?;
        let cap = class_size(class);
        let head_off = FREE_HEADS + u64::from(class) * 8;
        let head = read_free_head(self.mem(), head_off)?;
        let block = if head != 0 {
            let heap = self.heap()?;
            let b = Block::expect(self.mem(), heap, head, Kind::Free)?;
            if b.class != class {
                return Err(Error::corrupt(
                    "free list",
                    head,
                    format!("a class {} block on the class {class} list", b.class),
                ));
            }
            let next = b.aux;
            if next != 0 && (next < heap.0 || next >= heap.1 || !next.is_multiple_of(16)) {
                return Err(Error::corrupt(
                    "free list",
                    head,
                    format!("next block {next:#x} is not a block offset in the heap"),
                ));
            }
            self.write_u64("free list head", head_off, free_head(next))?;
            // Its whole line, not just the header: a rollback then puts back
            // the start of the free block's payload in that line too, so an
            // aborted allocation of a small block (a refused migration's
            // root) leaves the region byte for byte as it was.
            self.prepare_as(b.off, BLOCK_HEADER, 0)?;
            self.write("block header", b.off, &block_header(kind, class, len))?;
            let payload = b.payload();
            self.core.fresh.insert(payload, payload + cap);
            Block {
                off: b.off,
                kind,
                class,
                aux: len,
            }
        } else {
            let (_, top) = self.heap()?;
            let new_top = top.checked_add(BLOCK_HEADER + cap).ok_or(Error::TooLarge {
                what: "region",
                len: u64::MAX,
            })?;
            if new_top > self.mem().len() {
                let doubled = self.mem().len().saturating_mul(2);
                let want = new_top.max(doubled).next_multiple_of(1 << 16);
                self.core.mem.grow(want)?;
            }
            self.write("block header", top, &block_header(kind, class, len))?;
            self.write_u64("heap top", DY_HEAP_TOP, new_top)?;
            Block {
                off: top,
                kind,
                class,
                aux: len,
            }
        };
        let used = u64_at(self.mem(), "used bytes", DY_USED)?;
        self.write_u64("used bytes", DY_USED, used.wrapping_add(BLOCK_HEADER + cap))?;
        if zeroed {
            self.core.mem.zero("new block", block.payload(), cap)?;
        }
        Ok(block)
    }

    /// Frees the block at `off`, which must hold a `kind`, when the
    /// transaction commits (so that no block freed here is reused by this
    /// same transaction, whose rollback must find its contents intact).
    pub(crate) fn free(&mut self, off: u64, kind: Kind) -> Result<()> {
        let heap = self.heap()?;
        let b = Block::read(self.mem(), heap, off)?;
        if b.kind == Kind::Free || self.core.pending_set.contains(&(off / 16)) {
            return Err(Error::corrupt("block", off, "freed twice"));
        }
        if b.kind != kind {
            return Err(Error::corrupt(
                kind.name(),
                off,
                format!("block holds a {}, not a {}", b.kind.name(), kind.name()),
            ));
        }
        self.changes += 1;
        self.core.pending_free.push(off);
        self.core.pending_set.insert(off / 16);
        Ok(())
    }

    /// Makes every change visible at once: applies deferred frees, seals
    /// the dynamic header's checksum (if the transaction changed it) and
    /// stores the commit word.
    ///
    /// Taken by reference, not by value: moving the transaction in would
    /// copy it with wide loads right after the operations' narrow stores to
    /// it, which stalls on store forwarding. The caller drops it
    /// afterwards, which does nothing once it is finished.
    #[inline(always)]
    pub(crate) fn commit(&mut self) -> Result<()> {
        self.commit_or_abort()
    }

    #[inline(always)]
    fn commit_or_abort(&mut self) -> Result<()> {
        if self.failed.is_some() {
            return Err(self.abort_failed());
        }
        // `Ok` rebuilt, not the result moved (see `MapMut::changing`).
        match self.commit_inner() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.abort_with(e)),
        }
    }

    /// The commit of a transaction an operation left half done: rolled
    /// back instead.
    #[cold]
    #[inline(never)]
    fn abort_failed(&mut self) -> Error {
        let first = self.failed.take().unwrap_or_default();
        self.abort_inner();
        Error::Incomplete { first }
    }

    /// A commit that failed with `e`: rolled back.
    #[cold]
    #[inline(never)]
    fn abort_with(&mut self, e: Error) -> Error {
        self.abort_inner();
        e
    }

    #[inline(always)]
    fn commit_inner(&mut self) -> Result<()> {
        if !self.core.pending_free.is_empty() {
            self.free_pending()?;
        }
        // Every write to the dynamic header went through `prepare`, which
        // logged its line: an untouched header keeps its checksum.
        if self.core.logged.contains(DY_START / LINE) {
            let crc = dynamic_crc(self.mem())?;
            self.core
                .mem
                .write("header checksum", DY_CRC, &crc.to_le_bytes())?;
        }
        compiler_fence(Ordering::SeqCst);
        let committed = committed_from_open(self.open_word);
        self.core.mem.store_word(TX_WORD, committed)?;
        self.core.last_committed = Some((committed, self.seq));
        self.finished = true;
        if let Some(k) = &mut self.core.known_map {
            k.seq = self.seq;
        }
        self.core.publisher.commit();
        Ok(())
    }

    /// Applies the deferred frees (the commit's first step).
    #[inline(never)]
    fn free_pending(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.core.pending_free);
        for &off in &pending {
            // Free from here on: a map view must check it again.
            self.core.forget_block(off);
            let heap = self.heap()?;
            let b = Block::read(self.mem(), heap, off)?;
            if b.kind == Kind::Free {
                return Err(Error::corrupt("block", off, "freed twice"));
            }
            let head_off = FREE_HEADS + u64::from(b.class) * 8;
            let head = read_free_head(self.mem(), head_off)?;
            self.prepare_exact(off, BLOCK_HEADER)?;
            self.core.mem.write(
                "block header",
                off,
                &block_header(Kind::Free, b.class, head),
            )?;
            self.write_u64("free list head", head_off, free_head(off))?;
            let used = u64_at(self.mem(), "used bytes", DY_USED)?;
            self.write_u64(
                "used bytes",
                DY_USED,
                used.wrapping_sub(BLOCK_HEADER + b.capacity()),
            )?;
        }
        self.core.pending_free = pending;
        Ok(())
    }

    /// Undoes every change of this transaction (by reference, as
    /// [`TxCore::commit`]).
    #[inline(always)]
    pub(crate) fn abort(&mut self) {
        self.abort_inner();
    }

    #[inline(never)]
    fn abort_inner(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.core.known_map = None;
        match journal::rollback_own(
            &mut self.core.mem,
            self.core.journal,
            self.core.journal_len,
            self.seq,
            self.pos,
        ) {
            Ok(_) => self.core.publisher.commit(),
            // The journal in memory is intact, so reopening recovers; this
            // handle refuses further work.
            Err(_) => self.core.poisoned = true,
        }
    }
}

impl Drop for TxCore<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if !self.finished {
            self.abort_inner();
        }
    }
}
