//! The program's side: marking updates and publishing commits.

use crate::error::Error;
use crate::header::{self, DATA_OFFSET, Found, HEADER_LEN, Header};
use crate::region::{HeapBuffer, Region};
use crate::sync::{Ordering, fence};

/// The program's handle on the protocol: the single writer of a region's
/// header and data.
///
/// Every change to the data region happens between [`Publisher::begin`] and
/// [`Update::commit`] (or [`Publisher::enter_update`] and
/// [`Publisher::commit`]). A snapshot taken by [`crate::Snapshotter`] then
/// always equals the data as of some commit, and a copy of memory that
/// changed while it was taken is thrown away.
///
/// Committing never waits for a snapshotter: it is two stores and a load
/// (plus a `futex` wake system call only while a snapshotter sleeps waiting
/// for this commit).
///
/// Only one `Publisher` may write a region at a time (one program per
/// memfd, as shm-fd hands it over): the sequence word is its own, and a
/// second one would reuse sequence values, so a snapshotter could keep a
/// copy torn by the other's update. Debug builds check the word at every
/// [`Publisher::enter_update`].
#[derive(Debug)]
pub struct Publisher<'a> {
    header: Header<'a>,
    data: Region<'a>,
    /// The sequence word's value as this writer last stored it.
    seq: u64,
}

/// How [`Publisher::open`] found the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenedHeader {
    /// The header was written just now (the memfd's first page was blank).
    pub created: bool,
    /// The last committed generation (0 before the first commit).
    pub generation: u64,
    /// The previous writer stopped inside an update (it crashed, or the
    /// state was saved by stopping it mid-update): the data region may hold
    /// a half-done change. The publisher starts inside that update; repair
    /// the data, then [`Publisher::commit`].
    pub interrupted: bool,
}

impl<'a> Publisher<'a> {
    /// Takes the header at the start of `region` (the whole memfd mapping),
    /// writing a fresh one when the first page is blank.
    ///
    /// The data region is `region` from [`DATA_OFFSET`] on (see
    /// [`Publisher::data`]). Errors: the region is shorter than a header
    /// ([`Error::TooSmall`]), the first page holds something else
    /// ([`Error::ForeignData`], left untouched), or the header is damaged
    /// ([`Error::Corrupt`], also for a sequence word of 2^63 or more, or
    /// [`Error::UnsupportedVersion`]); on an error nothing is written.
    ///
    /// One `Publisher` per region: two would both believe they own the
    /// sequence word (debug builds catch it at the next
    /// [`Publisher::enter_update`]).
    ///
    /// The open turns the header's dirty map off (see
    /// [`crate::DirtyMap`]): this program is not known to mark its writes.
    /// One that does opens with [`Publisher::open_marking`].
    pub fn open(region: Region<'a>) -> Result<(Publisher<'a>, OpenedHeader), Error> {
        Publisher::open_with(region, false)
    }

    /// As [`Publisher::open`], for a program that marks every write in the
    /// dirty map ([`crate::DirtyMap::enable`] after the open, then
    /// [`crate::DirtyMap::mark`] before each write): a map that is on stays
    /// on, with its marks.
    pub fn open_marking(region: Region<'a>) -> Result<(Publisher<'a>, OpenedHeader), Error> {
        Publisher::open_with(region, true)
    }

    fn open_with(
        region: Region<'a>,
        marking: bool,
    ) -> Result<(Publisher<'a>, OpenedHeader), Error> {
        let (header, opened) = take_header(region, marking)?;
        let data = region
            .subregion(DATA_OFFSET, region.len() - DATA_OFFSET)
            .expect("take_header checked the region holds a header");
        let seq = 2 * opened.generation + u64::from(opened.interrupted);
        Ok((Publisher { header, data, seq }, opened))
    }

    /// What [`Publisher::open`] would find in `region`, checked without
    /// writing anything: the same errors, and on success `created` says
    /// that the first page is blank (`open` would write a fresh header).
    ///
    /// For a program that wants to refuse foreign state before it grows or
    /// writes the memfd.
    pub fn check(region: Region<'_>) -> Result<OpenedHeader, Error> {
        check_header(region)
    }

    /// The data region: the memfd after the header page, to its end.
    ///
    /// Read it any time; write it only inside an update.
    pub fn data(&self) -> Region<'a> {
        self.data
    }

    /// The last committed generation.
    pub fn generation(&self) -> u64 {
        self.seq / 2
    }

    /// True between [`Publisher::enter_update`] and [`Publisher::commit`].
    pub fn is_updating(&self) -> bool {
        self.seq % 2 == 1
    }

    /// Starts an update; the data region may be changed until
    /// [`Update::commit`]. Dropping the [`Update`] without committing
    /// leaves the publisher inside the update (snapshots will not take
    /// that state as committed).
    pub fn begin(&mut self) -> Update<'_, 'a> {
        self.enter_update();
        Update { publisher: self }
    }

    /// Marks the start of an update (no-op when already inside one).
    ///
    /// The odd sequence value is stored, then a release fence orders it
    /// before every later store to the data region: a snapshotter that sees
    /// any of those stores also sees the odd value when it re-checks.
    pub fn enter_update(&mut self) {
        enter_update(self.header, &mut self.seq);
    }

    /// Publishes the data region as it is now as the next generation, and
    /// leaves the update; returns the new generation. Outside an update it
    /// is a no-op returning the current generation.
    ///
    /// The even sequence value is stored with `Release`: a snapshotter that
    /// loads it with `Acquire` sees every store of the update.
    pub fn commit(&mut self) -> u64 {
        commit(self.header, &mut self.seq)
    }
}

/// An update in progress; [`Update::commit`] publishes it.
#[derive(Debug)]
pub struct Update<'p, 'a> {
    publisher: &'p mut Publisher<'a>,
}

impl<'a> Update<'_, 'a> {
    /// The data region, to change.
    pub fn data(&self) -> Region<'a> {
        self.publisher.data
    }

    /// Publishes the update; returns the new generation.
    pub fn commit(self) -> u64 {
        self.publisher.commit()
    }
}

/// Takes the header at the start of `region`, writing a fresh one when the
/// first page is blank: [`Publisher::open`]'s work, shared with
/// [`OwnedPublisher::open`].
fn take_header(region: Region<'_>, marking: bool) -> Result<(Header<'_>, OpenedHeader), Error> {
    let (header, created) = match header::find(region)? {
        Found::Valid(h) => (h, false),
        Found::Foreign => return Err(Error::ForeignData),
        Found::Blank => {
            let page = region.subregion(0, HEADER_LEN).ok_or(Error::TooSmall {
                len: region.len(),
                needed: HEADER_LEN,
            })?;
            (Header::init(page), true)
        }
    };
    if region.len() < DATA_OFFSET {
        return Err(Error::TooSmall {
            len: region.len(),
            needed: DATA_OFFSET,
        });
    }
    let seq = header.load_seq(Ordering::Acquire)?;
    if seq % 2 == 1 {
        // Resuming the interrupted update: store its odd value as our
        // own and fence, as `enter_update` does, so that our repair
        // stores are ordered after an odd value a snapshotter's
        // re-check must then see (the odd store we loaded was the
        // previous writer's, which orders nothing of ours).
        header.seq().store(seq.to_le(), Ordering::Relaxed);
        fence(Ordering::Release);
    }
    // A stale waiter flag (a snapshotter killed while it slept) would
    // only cost a wake per commit; the snapshotter sets it again when
    // it sleeps, so it is safe to clear here.
    header.waiters().store(0, Ordering::Relaxed);
    // A program that marks its writes in the dirty map turns it on again
    // after the open; one that does not must not leave a map on that a
    // snapshotter would trust.
    #[cfg(not(loom))]
    if !marking {
        crate::dirty::disable(region);
    }
    #[cfg(loom)]
    let _ = marking;
    let opened = OpenedHeader {
        created,
        generation: seq / 2,
        interrupted: seq % 2 == 1,
    };
    Ok((header, opened))
}

/// [`Publisher::check`]'s work, shared with [`OwnedPublisher::check`].
fn check_header(region: Region<'_>) -> Result<OpenedHeader, Error> {
    match header::find(region)? {
        Found::Foreign => Err(Error::ForeignData),
        Found::Blank => Ok(OpenedHeader {
            created: true,
            generation: 0,
            interrupted: false,
        }),
        Found::Valid(h) => {
            let seq = h.load_seq(Ordering::Acquire)?;
            Ok(OpenedHeader {
                created: false,
                generation: seq / 2,
                interrupted: seq % 2 == 1,
            })
        }
    }
}

/// Marks the start of an update (no-op when `seq` is odd already): the odd
/// value is stored, then a release fence orders it before every later
/// store to the data region, so a snapshotter that sees any of those
/// stores also sees the odd value when it re-checks.
#[inline]
fn enter_update(header: Header<'_>, seq: &mut u64) {
    if *seq % 2 == 1 {
        return;
    }
    debug_assert_eq!(
        u64::from_le(header.seq().load(Ordering::Relaxed)),
        *seq,
        "the sequence word changed behind this Publisher: two publishers on one region"
    );
    *seq += 1;
    header.seq().store(seq.to_le(), Ordering::Relaxed);
    fence(Ordering::Release);
}

/// Stores the next even value with `Release` (no-op outside an update) and
/// wakes a sleeping snapshotter; returns the generation.
#[inline]
fn commit(header: Header<'_>, seq: &mut u64) -> u64 {
    if *seq % 2 == 1 {
        *seq += 1;
        header.seq().store(seq.to_le(), Ordering::Release);
        if header.waiters().load(Ordering::Relaxed) != 0 {
            crate::futex::wake(header);
        }
    }
    *seq / 2
}

/// Memory that hands out a [`Region`] of itself, borrowed from it: what an
/// [`OwnedPublisher`] owns, so that the type system (not a convention)
/// keeps the memory alive as long as the publisher writes to it.
///
/// `as_region` must return a region over the same memory, of the same
/// length, at every call: the publisher validates the header once, at
/// [`OwnedPublisher::open`]. A region that shrank makes the publisher
/// panic (a bounds check), never touch memory outside it.
pub trait AsRegion {
    /// The memory as a [`Region`].
    fn as_region(&self) -> Region<'_>;
}

impl AsRegion for HeapBuffer {
    fn as_region(&self) -> Region<'_> {
        self.region()
    }
}

impl<T: AsRegion + ?Sized> AsRegion for Box<T> {
    fn as_region(&self) -> Region<'_> {
        (**self).as_region()
    }
}

impl<T: AsRegion + ?Sized> AsRegion for std::sync::Arc<T> {
    fn as_region(&self) -> Region<'_> {
        (**self).as_region()
    }
}

/// A shared mapping ([`memmap2::MmapRaw`]) checked once to be writable and
/// 8-aligned, seen as a [`Region`]: memory an [`OwnedPublisher`] can own.
#[cfg(not(loom))]
#[derive(Debug)]
pub struct MappedRegion {
    map: memmap2::MmapRaw,
}

#[cfg(not(loom))]
impl MappedRegion {
    /// Takes `map` after the checks of [`Region::try_from_mmap`] (made
    /// writable, 8-aligned), which then need not be repeated per access.
    pub fn new(map: memmap2::MmapRaw) -> std::io::Result<MappedRegion> {
        Region::try_from_mmap(&map)?;
        Ok(MappedRegion { map })
    }

    /// Flushes the mapping to its file (`msync`), for a file-backed one.
    pub fn flush(&self) -> std::io::Result<()> {
        self.map.flush()
    }

    /// Gives the mapping back.
    pub fn into_inner(self) -> memmap2::MmapRaw {
        self.map
    }
}

#[cfg(not(loom))]
impl AsRegion for MappedRegion {
    fn as_region(&self) -> Region<'_> {
        // SAFETY: `new` checked (through `Region::try_from_mmap`) that the
        // mapping is 8-aligned and made it writable; it stays mapped while
        // `self` is borrowed, which bounds the region's lifetime; the
        // MmapRaw hands out raw pointers only, so this process reaches the
        // bytes only through `Region`s (atomically).
        unsafe { Region::from_raw_parts(self.map.as_mut_ptr(), self.map.len()) }
    }
}

/// A [`Publisher`] that owns the memory it publishes through (a
/// [`MappedRegion`], a [`HeapBuffer`], anything [`AsRegion`]): no lifetime
/// to uphold by hand, for a program that keeps its publisher in a struct
/// next to other state.
///
/// The same protocol as [`Publisher`], and the same rule: one publisher
/// per region.
#[derive(Debug)]
pub struct OwnedPublisher<M> {
    mem: M,
    /// The sequence word's value as this writer last stored it.
    seq: u64,
}

impl<M: AsRegion> OwnedPublisher<M> {
    /// As [`Publisher::open`], over memory the publisher keeps.
    pub fn open(mem: M) -> Result<(OwnedPublisher<M>, OpenedHeader), Error> {
        OwnedPublisher::open_with(mem, false)
    }

    /// As [`Publisher::open_marking`], over memory the publisher keeps.
    pub fn open_marking(mem: M) -> Result<(OwnedPublisher<M>, OpenedHeader), Error> {
        OwnedPublisher::open_with(mem, true)
    }

    fn open_with(mem: M, marking: bool) -> Result<(OwnedPublisher<M>, OpenedHeader), Error> {
        let (_, opened) = take_header(mem.as_region(), marking)?;
        let seq = 2 * opened.generation + u64::from(opened.interrupted);
        Ok((OwnedPublisher { mem, seq }, opened))
    }

    /// As [`Publisher::check`].
    pub fn check(mem: &M) -> Result<OpenedHeader, Error> {
        check_header(mem.as_region())
    }

    fn header(&self) -> Header<'_> {
        Header::validated(self.mem.as_region())
    }

    /// The data region (from [`DATA_OFFSET`] on; empty when the memory is
    /// just the header page). Write it only inside an update.
    pub fn data(&self) -> Region<'_> {
        let region = self.mem.as_region();
        region
            .subregion(DATA_OFFSET, region.len().saturating_sub(DATA_OFFSET))
            .unwrap_or_else(|| panic!("a validated shm-snapshot region shrank"))
    }

    /// Takes up the sequence word as the header holds it now, for
    /// publishers in several processes that take turns on one region under
    /// a lock of their own (shm-state's shared states): each, once it holds
    /// that lock, continues from the last value any of them stored. An
    /// update left open by a publisher that died stays open (odd), so the
    /// next [`OwnedPublisher::commit`] ends it. A damaged word (2^63 or
    /// more) is left to [`OwnedPublisher::enter_update`]'s usual handling:
    /// this publisher keeps its own value.
    pub fn resync(&mut self) {
        let seq = u64::from_le(self.header().seq().load(Ordering::Acquire));
        if seq < 1 << 63 {
            self.seq = seq;
        }
    }

    /// The last committed generation.
    pub fn generation(&self) -> u64 {
        self.seq / 2
    }

    /// True between [`OwnedPublisher::enter_update`] and
    /// [`OwnedPublisher::commit`].
    pub fn is_updating(&self) -> bool {
        self.seq % 2 == 1
    }

    /// As [`Publisher::enter_update`].
    pub fn enter_update(&mut self) {
        let mut seq = self.seq;
        enter_update(self.header(), &mut seq);
        self.seq = seq;
    }

    /// As [`Publisher::commit`].
    pub fn commit(&mut self) -> u64 {
        let mut seq = self.seq;
        let generation = commit(self.header(), &mut seq);
        self.seq = seq;
        generation
    }

    /// The memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Gives the memory back (the header keeps its last stored state).
    pub fn into_inner(self) -> M {
        self.mem
    }
}
