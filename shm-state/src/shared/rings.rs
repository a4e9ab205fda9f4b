//! Pushing to and popping from a ring shared by two processes: each in a
//! transaction together with the caller's own change (exactly once, see
//! `crate::ring`), and, for the `_wait` calls, sleeping while the ring is
//! full or empty.
//!
//! A waiter looks at the ring through a lock-free read ([`View`]), spins
//! briefly on the commit word, then sleeps on the ring's tail (a consumer)
//! or head (a producer): a futex wait on the word's low half, counted in
//! `ring_waiters`, which the writer of a transaction that moved that word
//! wakes once the transaction is over, and only when some ring waiter is
//! counted (`Held`'s drop; the handshake is `wake.rs`'s, checked under
//! loom). So no system call per message while no one waits, and commits
//! elsewhere wake no ring waiter. Every [`PEER_NAP`] it wakes by itself
//! to judge the other end, whose death commits nothing and so wakes no
//! one: a producer (consumer) recorded
//! with [`RingMut::attach`](crate::RingMut::attach) that is no longer alive
//! while the ring is empty (full) ends the wait with [`Error::PeerGone`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::format::RING_WAITERS;
use crate::handle::StateRing;
use crate::ring::RingEnd;
use crate::shared::{RingView, SharedState, sys, wake};
use crate::state::Tx;

/// How long a waiter spins on the commit word before it sleeps: a reply
/// that comes within it costs no futex wake-up on either side.
const SPIN: Duration = Duration::from_micros(20);
/// The longest sleep between two judgements of the other end.
const PEER_NAP: Duration = Duration::from_millis(50);

/// What a wait waits for.
#[derive(Clone, Copy)]
enum Want {
    /// A frame to pop (the consumer's wait).
    Frame,
    /// Room for a frame of this many bytes (the producer's wait).
    Room(usize),
}

impl Want {
    fn ready(self, v: &RingView) -> bool {
        match self {
            Want::Frame => !v.is_empty(),
            Want::Room(len) => v.fits(len),
        }
    }

    /// The end whose work ends the wait.
    fn other(self) -> RingEnd {
        match self {
            Want::Frame => RingEnd::Producer,
            Want::Room(_) => RingEnd::Consumer,
        }
    }

    fn describe(self, v: &RingView) -> String {
        let what = match self {
            Want::Frame => "a frame in the ring".to_string(),
            Want::Room(len) => format!(
                "room for a frame of {len} bytes in the ring ({} bytes free)",
                v.free_bytes()
            ),
        };
        let end = self.other();
        match v.attached(end) {
            None => format!("{what} (no {end} ever attached)"),
            Some(pid) => format!("{what} ({end}: process {pid}, alive)"),
        }
    }
}

impl<R: Pod> SharedState<R> {
    /// Pops the oldest frame of `ring` and runs `effect` with it, in one
    /// transaction: a crash anywhere (kill -9 included) leaves both done
    /// or neither, and an error from `effect` rolls both back (the frame
    /// stays). `Ok(None)`, with nothing committed, when the ring is empty.
    pub fn try_pop<T, E: From<Error>>(
        &mut self,
        ring: StateRing,
        effect: impl FnOnce(&mut Tx<'_, R>, Vec<u8>) -> Result<T, E>,
    ) -> Result<Option<T>, E> {
        if self.read(|v| v.ring(ring))?.is_empty() {
            return Ok(None);
        }
        self.transaction(|tx| {
            let Some(frame) = tx.ring(ring)?.pop()? else {
                return Ok(None);
            };
            effect(tx, frame).map(Some)
        })
    }

    /// As [`SharedState::try_pop`], waiting while the ring is empty: for
    /// at most `timeout` ([`Error::TimedOut`]), and only while the producer
    /// may still push ([`Error::PeerGone`] once the process recorded as the
    /// producer is gone and the ring is empty; while none ever attached,
    /// one may still come). Frames a dead producer pushed are still popped.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytemuck::{Pod, Zeroable};
    /// use shm_state::{Error, Layout, RingEnd, SharedState, Source, StateRing};
    ///
    /// #[derive(Clone, Copy, Pod, Zeroable)]
    /// #[repr(C)]
    /// struct Root {
    ///     jobs: StateRing,
    ///     done: u64,
    /// }
    ///
    /// # fn main() -> Result<(), Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let file = std::fs::File::options().read(true).write(true).create(true)
    /// #     .truncate(false).open(dir.path().join("state")).unwrap();
    /// // SAFETY: the file is shared only through SharedState, never truncated.
    /// let mut state = SharedState::<Root>::open(unsafe { Source::file(file) }, Layout::new(1))?;
    /// let jobs = state.transaction(|tx| {
    ///     let jobs = tx.new_ring(64 * 1024, 1024)?;
    ///     tx.root_mut()?.jobs = jobs;
    ///     Ok::<_, Error>(jobs)
    /// })?;
    /// // The producer (usually another process): a frame pushed.
    /// state.push_wait(jobs, b"job 1", Duration::from_secs(1), |_| Ok::<_, Error>(()))?;
    /// // The consumer: the frame taken and its effect applied, one transaction.
    /// state.attach(jobs, RingEnd::Consumer)?;
    /// let job = state.pop_wait(jobs, Duration::from_secs(1), |tx, frame| {
    ///     tx.root_mut()?.done += 1;
    ///     Ok::<_, Error>(frame)
    /// })?;
    /// assert_eq!(job, b"job 1");
    /// assert_eq!(state.read(|v| v.root())?.done, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn pop_wait<T, E: From<Error>>(
        &mut self,
        ring: StateRing,
        timeout: Duration,
        effect: impl FnOnce(&mut Tx<'_, R>, Vec<u8>) -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = Instant::now().checked_add(timeout);
        let mut effect = Some(effect);
        loop {
            self.wait_ring(ring, Want::Frame, timeout, deadline)?;
            let popped = self.transaction(|tx| {
                let Some(frame) = tx.ring(ring)?.pop()? else {
                    // Taken meanwhile (a second consumer): wait again.
                    return Ok(None);
                };
                let effect = effect
                    .take()
                    .expect("runs once: only a popped frame takes it");
                effect(tx, frame).map(Some)
            })?;
            if let Some(t) = popped {
                return Ok(t);
            }
        }
    }

    /// Pushes `frame` to `ring` and runs `effect`, in one transaction (both
    /// or neither, as for [`SharedState::try_pop`]). `Ok(None)`, with
    /// nothing committed, when the ring has no room for the frame now; a
    /// frame longer than the ring's largest is [`Error::TooLarge`].
    pub fn try_push<T, E: From<Error>>(
        &mut self,
        ring: StateRing,
        frame: &[u8],
        effect: impl FnOnce(&mut Tx<'_, R>) -> Result<T, E>,
    ) -> Result<Option<T>, E> {
        let v = self.read(|v| v.ring(ring))?;
        if frame.len() as u64 <= u64::from(v.max_frame()) && !v.fits(frame.len()) {
            return Ok(None);
        }
        self.transaction(|tx| {
            // Pushed first: a ring without room changes nothing.
            if !tx.ring(ring)?.push(frame)? {
                return Ok(None);
            }
            effect(tx).map(Some)
        })
    }

    /// As [`SharedState::try_push`], waiting while the ring has no room:
    /// for at most `timeout` ([`Error::TimedOut`]), and only while the
    /// consumer may still pop ([`Error::PeerGone`] once the process
    /// recorded as the consumer is gone and the frame does not fit).
    pub fn push_wait<T, E: From<Error>>(
        &mut self,
        ring: StateRing,
        frame: &[u8],
        timeout: Duration,
        effect: impl FnOnce(&mut Tx<'_, R>) -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = Instant::now().checked_add(timeout);
        let mut effect = Some(effect);
        loop {
            let max = self.read(|v| v.ring(ring))?.max_frame();
            if frame.len() as u64 > u64::from(max) {
                return Err(Error::TooLarge {
                    what: "ring frame",
                    len: frame.len() as u64,
                }
                .into());
            }
            self.wait_ring(ring, Want::Room(frame.len()), timeout, deadline)?;
            let pushed = self.transaction(|tx| {
                if !tx.ring(ring)?.push(frame)? {
                    return Ok(None);
                }
                let effect = effect.take().expect("runs once: only a push takes it");
                effect(tx).map(Some)
            })?;
            if let Some(t) = pushed {
                return Ok(t);
            }
        }
    }

    /// Records this process at `end` of `ring` (a transaction of its own;
    /// inside one, [`RingMut::attach`](crate::RingMut::attach)).
    pub fn attach(&mut self, ring: StateRing, end: RingEnd) -> Result<()> {
        self.transaction(|tx| tx.ring(ring)?.attach(end))
    }

    /// Returns once `want` holds for `ring`; errors when `deadline` (from
    /// `timeout`; `None`: never) passes first or the other end is gone.
    fn wait_ring(
        &mut self,
        ring: StateRing,
        want: Want,
        timeout: Duration,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let spin_until = Instant::now() + SPIN;
        let mut spins = 0u32;
        // The other end is judged (two `/proc` reads) at the first look and
        // then once per PEER_NAP, not at every look.
        let mut judge_at = Instant::now();
        loop {
            let seen = self.commit_word();
            let v = self.read(|v| v.ring(ring))?;
            if want.ready(&v) {
                return Ok(());
            }
            let end = want.other();
            let now = Instant::now();
            if now >= judge_at {
                judge_at = now + PEER_NAP;
                if let Some(pid) = v.attached(end)
                    && !v.alive(end)
                {
                    // The end may have pushed (popped) and ended after the
                    // look above: a dead process commits nothing more, so
                    // a look now settles it. Gone only if still not ready
                    // and no other process attached meanwhile.
                    let again = self.read(|v| v.ring(ring))?;
                    if want.ready(&again) {
                        return Ok(());
                    }
                    if again.attached(end) == Some(pid) {
                        return Err(Error::PeerGone { end, pid });
                    }
                    continue;
                }
            }
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::TimedOut {
                    waiting_for: want.describe(&v),
                    after: timeout,
                });
            }
            if now < spin_until {
                // Spin until the next commit (any), a bounded while.
                while self.commit_word() == seen && spins % 64 != 63 {
                    std::hint::spin_loop();
                    spins += 1;
                }
                spins += 1;
                continue;
            }
            let nap = deadline.map_or(PEER_NAP, |d| (d - now).min(PEER_NAP));
            let nap = nap.min(judge_at.saturating_duration_since(now));
            self.sleep_on_ring(&v, want, nap)?;
        }
    }

    /// Sleeps (at most `nap`) unless the ring's tail (`Want::Frame`: a
    /// push moves it) or head (`Want::Room`: a pop moves it) moved since
    /// the look `v`: a futex wait on the word's low half, counted in
    /// `ring_waiters` so that the writer of a transaction that touched a
    /// ring wakes it (`Held`'s drop), and only it: commits elsewhere do
    /// not wake this waiter. (The low half repeats only after 4 GiB went
    /// through the ring between the look and the sleep; the nap bounds
    /// even that.)
    fn sleep_on_ring(&mut self, v: &RingView, want: Want, nap: Duration) -> Result<()> {
        self.check_fork()?;
        let h = v.header();
        let (off, seen) = match want {
            Want::Frame => (h.at + 8, h.tail as u32),
            Want::Room(_) => (h.at, h.head as u32),
        };
        let word = self.state.core.mem.atomic_u32(off)?;
        let mut timed_out = false;
        wake::sleep_unless(
            self.page.u64(RING_WAITERS),
            || word.load(Ordering::SeqCst) != seen,
            || timed_out = sys::wait(word, seen, nap),
        );
        self.stats.ring_sleeps += 1;
        self.stats.ring_naps += u64::from(timed_out);
        Ok(())
    }
}
