//! The snapshotter's side: copying a region while its program runs and
//! keeping the copy only when the protocol proves it equals a commit.

use std::io;
use std::time::Duration;

use crate::error::Error;
use crate::header::{self, Found, Header};
use crate::region::Region;
use crate::sync::{Ordering, fence};
use crate::target::{CopyTarget, copied_seq, fix_header};

/// Whether a region carries the protocol, and where its program is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// No header: the program does not use shm-snapshot (or has not set it
    /// up yet).
    Absent,
    /// A valid header.
    Present {
        /// The last committed generation.
        generation: u64,
        /// The program is inside an update right now.
        updating: bool,
    },
}

/// Looks for the header in `src` (a whole memfd mapping).
///
/// A header with the right magic but damaged fields (or a sequence word
/// of 2^63 or more) is an error, not [`Protocol::Absent`], so that the
/// caller can say what is wrong.
pub fn probe(src: Region<'_>) -> Result<Protocol, Error> {
    match header::find(src) {
        Ok(Found::Valid(h)) => {
            let seq = h.load_seq(Ordering::Acquire)?;
            Ok(Protocol::Present {
                generation: seq / 2,
                updating: seq % 2 == 1,
            })
        }
        Ok(Found::Blank | Found::Foreign) | Err(Error::TooSmall { .. }) => Ok(Protocol::Absent),
        Err(e) => Err(e),
    }
}

/// True when `src` starts with a valid header.
pub fn has_protocol(src: Region<'_>) -> bool {
    matches!(probe(src), Ok(Protocol::Present { .. }))
}

/// The last committed generation, when `src` carries the protocol.
pub fn committed_generation(src: Region<'_>) -> Option<u64> {
    match probe(src) {
        Ok(Protocol::Present { generation, .. }) => Some(generation),
        _ => None,
    }
}

/// The result of one optimistic copy ([`try_copy_consistent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyOutcome {
    /// The destination holds exactly the data of this committed generation.
    Consistent {
        /// The generation copied.
        generation: u64,
    },
    /// The program was inside an update; nothing was copied.
    Updating {
        /// The last committed generation.
        generation: u64,
    },
    /// The program committed or started an update while the copy ran: the
    /// destination may be torn and must not be kept.
    Changed {
        /// The sequence value before the copy.
        before: u64,
        /// The sequence value after it.
        after: u64,
    },
    /// `src` carries no header; nothing was copied.
    NoProtocol,
}

/// Copies `src` into `dst` without stopping the program, and says whether
/// the copy equals a committed state.
///
/// The seqlock read: load the sequence word (`Acquire`); if it is odd the
/// program is inside an update, stop. Copy with relaxed loads, then an
/// `Acquire` fence and a second load of the sequence word. If both loads
/// saw the same even value, no store of any update was seen by the copy
/// (an update's first data store is ordered after its odd sequence store
/// by the writer's release fence), so the copy equals the commit.
///
/// In the kept copy, the header's sequence word is the committed value and
/// its waiter word is zero, as a restored program should find them.
/// A dense `dst` (`[u8]`, `Vec<u8>`) must be exactly as long as `src`; a
/// [`crate::SparseCopy`] copies only the memfd's data extents.
pub fn try_copy_consistent<T: CopyTarget + ?Sized>(
    src: Region<'_>,
    dst: &mut T,
) -> Result<CopyOutcome, Error> {
    check_len(src, dst)?;
    let header = match header::find(src) {
        Ok(Found::Valid(h)) => h,
        Ok(Found::Blank | Found::Foreign) | Err(Error::TooSmall { .. }) => {
            return Ok(CopyOutcome::NoProtocol);
        }
        Err(e) => return Err(e),
    };
    let before = header.load_seq(Ordering::Acquire)?;
    if before & 1 == 1 {
        return Ok(CopyOutcome::Updating {
            generation: before / 2,
        });
    }
    dst.copy_from(src).map_err(Error::Copy)?;
    fence(Ordering::Acquire);
    let after = u64::from_le(header.seq().load(Ordering::Relaxed));
    if after != before {
        return Ok(CopyOutcome::Changed { before, after });
    }
    if let Some(h) = dst.header_mut() {
        fix_header(h, before);
    }
    Ok(CopyOutcome::Consistent {
        generation: before / 2,
    })
}

fn check_len<T: CopyTarget + ?Sized>(src: Region<'_>, dst: &T) -> Result<(), Error> {
    match dst.required_len() {
        Some(n) if n != src.len() => Err(Error::LengthMismatch {
            source_len: src.len(),
            destination_len: n,
        }),
        _ => Ok(()),
    }
}

/// Sleeps until the program leaves the update it is in (commits), at most
/// `timeout`; returns at once when it is not updating.
///
/// It raises the waiter word so that the program's next commit wakes it
/// with a futex, so the wait is neither a spin nor a fixed sleep. A commit
/// whose check of the waiter word raced with the raise may not wake it:
/// then the wait ends at `timeout`, never later.
fn wait_for_commit(header: Header<'_>, timeout: Duration) {
    let seq = header.seq();
    let now = u64::from_le(seq.load(Ordering::Acquire));
    if now & 1 == 0 {
        return;
    }
    let woken = crate::futex::wake_value(header);
    header.waiters().store(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    // Sleep only if the value did not change since: FUTEX_WAIT re-checks
    // the wake word atomically, so a commit that bumped it since is seen.
    if u64::from_le(seq.load(Ordering::Relaxed)) == now {
        crate::futex::wait(header, woken, timeout);
    }
    header.waiters().store(0, Ordering::Relaxed);
}

/// Runs the copy inside the caller's stop; the copy's own error wins over
/// the stop's.
fn stop_and_copy<T: CopyTarget + ?Sized>(
    src: Region<'_>,
    dst: &mut T,
    stopped: impl FnOnce(&mut dyn FnMut() -> io::Result<()>) -> io::Result<()>,
) -> Result<(), Error> {
    let mut copied = false;
    let mut copy_error = None;
    let mut copy = || {
        copied = true;
        dst.copy_from(src).map_err(|e| {
            let msg = e.to_string();
            copy_error = Some(e);
            io::Error::other(msg)
        })
    };
    let stop = stopped(&mut copy);
    if let Some(e) = copy_error {
        return Err(Error::Copy(e));
    }
    stop.map_err(Error::Fallback)?;
    if !copied {
        return Err(Error::Fallback(io::Error::other(
            "the fallback returned without running the copy",
        )));
    }
    Ok(())
}

/// What [`Snapshotter::capture`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureOutcome {
    /// Nothing was committed since the last kept snapshot (same generation,
    /// same length): nothing was copied and the destination is untouched.
    Unchanged {
        /// The generation the last kept snapshot holds.
        generation: u64,
    },
    /// The destination holds a committed generation, copied while the
    /// program ran.
    Consistent {
        /// The generation copied.
        generation: u64,
        /// Copies attempted (1 = the first try succeeded).
        tries: u32,
    },
    /// Every optimistic try failed; the destination was copied by the
    /// fallback, with the program stopped.
    Stopped {
        /// The last committed generation at the stop.
        generation: u64,
        /// The program was stopped inside an update: the copy is the state
        /// a crash at that moment would leave (the program learns it from
        /// [`crate::OpenedHeader::interrupted`] when it is restored).
        in_update: bool,
        /// Optimistic copies attempted before the stop.
        tries: u32,
    },
    /// The memory carries no usable header; the destination was copied by
    /// the fallback, as in a plain stop-and-copy snapshot.
    Plain {
        /// Why the protocol is not used (e.g. "no shm-snapshot header").
        reason: String,
        /// True the first time this happens in a row (so that a wrapper
        /// says so once).
        first: bool,
    },
}

/// Takes snapshots of one running program's memory: skips the copy when
/// nothing was committed since the last kept one, copies optimistically a
/// bounded number of times, and falls back to a stop-and-copy.
///
/// One `Snapshotter` per memfd. The memory's length may change between
/// captures (the memfd may grow); each capture needs a destination of the
/// current length.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    max_tries: u32,
    wait: Duration,
    last: Option<(u64, usize)>,
    plain: bool,
}

impl Default for Snapshotter {
    fn default() -> Self {
        Snapshotter::new()
    }
}

impl Snapshotter {
    /// Default number of optimistic copies before the fallback stop.
    pub const DEFAULT_TRIES: u32 = 4;
    /// Longest single sleep of [`Snapshotter::wait_for_generation`].
    pub const IDLE_SLICE: Duration = Duration::from_millis(250);
    /// Default longest sleep waiting for the program to commit, per try.
    pub const DEFAULT_WAIT: Duration = Duration::from_millis(20);

    /// A snapshotter with [`Self::DEFAULT_TRIES`] and
    /// [`Self::DEFAULT_WAIT`].
    pub fn new() -> Snapshotter {
        Snapshotter {
            max_tries: Self::DEFAULT_TRIES,
            wait: Self::DEFAULT_WAIT,
            last: None,
            plain: false,
        }
    }

    /// Sets the number of optimistic copies before the fallback stop
    /// (0: always stop).
    pub fn max_tries(mut self, tries: u32) -> Snapshotter {
        self.max_tries = tries;
        self
    }

    /// Sets the longest sleep, per try, waiting for a program that is
    /// inside an update to commit.
    pub fn wait(mut self, wait: Duration) -> Snapshotter {
        self.wait = wait;
        self
    }

    /// Forgets the last kept snapshot, so the next capture copies even if
    /// nothing was committed (call it when saving the last copy failed).
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// The generation of the last kept snapshot, if any.
    pub fn last_generation(&self) -> Option<u64> {
        self.last.map(|(g, _)| g)
    }

    /// Takes a snapshot of `src` into `dst` (a dense buffer exactly as long
    /// as `src`, or a [`crate::SparseCopy`]).
    ///
    /// - No header, or a damaged one (checksum, version, a sequence word
    ///   of 2^63 or more): copies it as it is with the program stopped
    ///   ([`CaptureOutcome::Plain`], whose `reason` says which).
    /// - Same committed generation and length as the last kept snapshot,
    ///   not inside an update: copies nothing ([`CaptureOutcome::Unchanged`]).
    /// - Otherwise up to `max_tries` optimistic copies, sleeping (futex,
    ///   bounded by `wait`) while the program is inside an update
    ///   ([`CaptureOutcome::Consistent`]); then a copy with the program stopped
    ///   ([`CaptureOutcome::Stopped`]).
    ///
    /// `stopped` is the fallback: it stops the program (e.g. `SIGSTOP` to
    /// its process group, then waiting until every thread is stopped),
    /// calls the copy function it is given exactly once (also when the
    /// program is already gone: then nothing writes the memory), and lets
    /// the program continue (also when the copy fails). The program is never made to wait
    /// except inside `stopped`.
    pub fn capture<T: CopyTarget + ?Sized>(
        &mut self,
        src: Region<'_>,
        dst: &mut T,
        stopped: impl FnOnce(&mut dyn FnMut() -> io::Result<()>) -> io::Result<()>,
    ) -> Result<CaptureOutcome, Error> {
        check_len(src, dst)?;
        let header = match header::find(src) {
            Ok(Found::Valid(h)) => h,
            Ok(Found::Blank) => return self.plain(src, dst, "no shm-snapshot header", stopped),
            Ok(Found::Foreign) => {
                let reason = "the first page is not a shm-snapshot header";
                return self.plain(src, dst, reason, stopped);
            }
            Err(e) => return self.plain(src, dst, &e.to_string(), stopped),
        };
        let seq = match header.load_seq(Ordering::Acquire) {
            Ok(seq) => seq,
            Err(e) => return self.plain(src, dst, &e.to_string(), stopped),
        };
        self.plain = false;
        if seq & 1 == 0 && self.last == Some((seq / 2, src.len())) {
            return Ok(CaptureOutcome::Unchanged {
                generation: seq / 2,
            });
        }
        let mut tries = 0;
        while tries < self.max_tries {
            wait_for_commit(header, self.wait);
            tries += 1;
            let outcome = match try_copy_consistent(src, dst) {
                Ok(o) => o,
                // The header turned bad during the tries (a hostile or
                // broken writer): copy it as it is, with the program stopped.
                Err(e @ (Error::Corrupt { .. } | Error::UnsupportedVersion { .. })) => {
                    return self.plain(src, dst, &e.to_string(), stopped);
                }
                Err(e) => return Err(e),
            };
            match outcome {
                CopyOutcome::Consistent { generation } => {
                    self.last = Some((generation, src.len()));
                    return Ok(CaptureOutcome::Consistent { generation, tries });
                }
                CopyOutcome::Updating { .. } | CopyOutcome::Changed { .. } => {}
                CopyOutcome::NoProtocol => {
                    return self.plain(src, dst, "the shm-snapshot header vanished", stopped);
                }
            }
        }
        stop_and_copy(src, dst, stopped)?;
        let Some(h) = dst.header_mut() else {
            return Err(Error::Copy(io::Error::other(
                "the copy holds no header page",
            )));
        };
        let seq = match crate::header::checked_seq(copied_seq(h)) {
            Ok(seq) => seq,
            // Copied as it is (the program was stopped): a plain snapshot.
            Err(e) => return Ok(self.plain_after_copy(&e.to_string())),
        };
        fix_header(h, seq);
        let generation = seq / 2;
        let in_update = seq & 1 == 1;
        self.last = (!in_update).then_some((generation, src.len()));
        Ok(CaptureOutcome::Stopped {
            generation,
            in_update,
            tries,
        })
    }

    fn plain<T: CopyTarget + ?Sized>(
        &mut self,
        src: Region<'_>,
        dst: &mut T,
        reason: &str,
        stopped: impl FnOnce(&mut dyn FnMut() -> io::Result<()>) -> io::Result<()>,
    ) -> Result<CaptureOutcome, Error> {
        stop_and_copy(src, dst, stopped)?;
        Ok(self.plain_after_copy(reason))
    }

    fn plain_after_copy(&mut self, reason: &str) -> CaptureOutcome {
        let first = !self.plain;
        self.plain = true;
        self.last = None;
        CaptureOutcome::Plain {
            reason: reason.to_owned(),
            first,
        }
    }

    /// Sleeps until the program commits a generation newer than `after`,
    /// or `timeout` passes; returns the committed generation then (`None`
    /// without a usable header, e.g. a damaged sequence word). A
    /// `timeout` too large to add to the clock (`Duration::MAX`) waits
    /// without a deadline. A wrapper can use this instead of a plain sleep
    /// between interval snapshots, to wake only when there is something
    /// to save.
    pub fn wait_for_generation(
        &self,
        src: Region<'_>,
        after: u64,
        timeout: Duration,
    ) -> Option<u64> {
        let Ok(Found::Valid(header)) = header::find(src) else {
            return None;
        };
        // A timeout too long to add (`Duration::MAX`) means no deadline.
        let deadline = std::time::Instant::now().checked_add(timeout);
        loop {
            let seq = header.seq();
            let Ok(now) = header.load_seq(Ordering::Acquire) else {
                return None;
            };
            if now / 2 > after {
                return Some(now / 2);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                None => Self::IDLE_SLICE,
            };
            if left.is_zero() {
                return Some(now / 2);
            }
            let woken = crate::futex::wake_value(header);
            header.waiters().store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if u64::from_le(seq.load(Ordering::Relaxed)) == now {
                // Bounded slices: a wake missed in the race described at
                // `wait_for_commit` delays the return by one slice at most.
                crate::futex::wait(header, woken, left.min(Self::IDLE_SLICE));
            }
            header.waiters().store(0, Ordering::Relaxed);
        }
    }
}
