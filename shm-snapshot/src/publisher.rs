//! The program's side: marking updates and publishing commits.

use crate::error::Error;
use crate::header::{self, DATA_OFFSET, Found, HEADER_LEN, Header};
use crate::region::Region;
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
pub struct Opened {
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
    pub fn open(region: Region<'a>) -> Result<(Publisher<'a>, Opened), Error> {
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
        let data = region
            .subregion(DATA_OFFSET, region.len() - DATA_OFFSET)
            .ok_or(Error::TooSmall {
                len: region.len(),
                needed: DATA_OFFSET,
            })?;
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
        let opened = Opened {
            created,
            generation: seq / 2,
            interrupted: seq % 2 == 1,
        };
        Ok((Publisher { header, data, seq }, opened))
    }

    /// What [`Publisher::open`] would find in `region`, checked without
    /// writing anything: the same errors, and on success `created` says
    /// that the first page is blank (`open` would write a fresh header).
    ///
    /// For a program that wants to refuse foreign state before it grows or
    /// writes the memfd.
    pub fn check(region: Region<'_>) -> Result<Opened, Error> {
        match header::find(region)? {
            Found::Foreign => Err(Error::ForeignData),
            Found::Blank => Ok(Opened {
                created: true,
                generation: 0,
                interrupted: false,
            }),
            Found::Valid(h) => {
                let seq = h.load_seq(Ordering::Acquire)?;
                Ok(Opened {
                    created: false,
                    generation: seq / 2,
                    interrupted: seq % 2 == 1,
                })
            }
        }
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
        if self.is_updating() {
            return;
        }
        debug_assert_eq!(
            u64::from_le(self.header.seq().load(Ordering::Relaxed)),
            self.seq,
            "the sequence word changed behind this Publisher: two publishers on one region"
        );
        self.seq += 1;
        self.header.seq().store(self.seq.to_le(), Ordering::Relaxed);
        fence(Ordering::Release);
    }

    /// Publishes the data region as it is now as the next generation, and
    /// leaves the update; returns the new generation. Outside an update it
    /// is a no-op returning the current generation.
    ///
    /// The even sequence value is stored with `Release`: a snapshotter that
    /// loads it with `Acquire` sees every store of the update.
    pub fn commit(&mut self) -> u64 {
        if !self.is_updating() {
            return self.generation();
        }
        self.seq += 1;
        let seq = self.header.seq();
        seq.store(self.seq.to_le(), Ordering::Release);
        if self.header.waiters().load(Ordering::Relaxed) != 0 {
            crate::futex::wake(seq);
        }
        self.generation()
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
