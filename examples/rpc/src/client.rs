//! `rpc client --id K`: sends request `sent + 1` (pushed in the same
//! transaction as it records `sent`), waits for its answer (popped in the
//! same transaction as it records `answered`, after checking it), and
//! again, until its count or its time is up.
//!
//! A client started again with the same id goes on from its committed
//! counters: with `sent > answered`, the request is in the server's ring
//! or answered in its own, and it waits for that answer instead of
//! sending the request again. A server that is gone (killed) while the
//! client waits is waited for, up to `--timeout`, until a new one
//! attaches.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clap::Args;
use shm_state::{Error, RingEnd, RingView, SharedState, StateRing};

use crate::{
    Cli, Fail, Request, Response, Root, Slot, deadline_in, open, seconds, setup, sum_after,
    with_damage_code,
};

/// The longest sleep of a client waiting for a server that is gone (a
/// new server's attach commits, which ends the sleep at once).
const NAP: Duration = Duration::from_millis(100);

/// The options of `rpc client`.
#[derive(Args, Debug)]
pub(crate) struct ClientArgs {
    /// This client's number, 0 to N-1 (`rpc init --clients N`).
    #[arg(long, value_name = "K")]
    pub(crate) id: u32,
    /// Stop once requests 1..=N have been answered (counted across
    /// restarts: the state's count).
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Stop sending after this many seconds (fractions allowed); the last
    /// request's answer is still waited for. Without --requests or
    /// --seconds the client runs until it is killed.
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,
    /// Give up (exit 3) when an answer, or room for a request, does not
    /// come within this many seconds.
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    timeout: f64,
    /// Say `ready` once attached, then wait for the end of stdin before
    /// the first request (`rpc run` starts every client at once so).
    #[arg(long, hide = true)]
    wait_start: bool,
}

/// A client at work.
struct Client {
    state: SharedState<Root>,
    root: Root,
    slot: Slot,
    key: u64,
    timeout: Duration,
    /// Its committed counters.
    sent: u64,
    answered: u64,
    /// Times it found the server gone and waited for another.
    server_gone: u64,
}

impl Client {
    /// Pushes request `n` and records it sent, in one transaction; waits
    /// while the ring has no room.
    fn send(&mut self, n: u64) -> Result<(), Fail> {
        let frame = Request::new(self.key, n);
        let frame = bytemuck::bytes_of(&frame);
        let deadline = deadline_in(self.timeout);
        loop {
            let left = left(deadline);
            let (slots, key) = (self.root.slots, self.key);
            let pushed = self.state.push_wait(self.slot.requests, frame, left, |tx| {
                tx.vec(slots)?.get_mut(key)?.sent = n;
                Ok::<_, Error>(())
            });
            match pushed {
                Ok(()) => {
                    self.sent = n;
                    return Ok(());
                }
                Err(Error::PeerGone { pid, .. }) => {
                    self.wait_for_server(self.slot.requests, RingEnd::Consumer, pid, deadline)?
                }
                Err(Error::TimedOut { waiting_for, .. }) => {
                    return Err(Fail(
                        3,
                        format!(
                            "no room for request {n} in {:?}: waited for {waiting_for}",
                            self.timeout
                        ),
                    ));
                }
                Err(e) => return Err(with_damage_code(3)(e)),
            }
        }
    }

    /// Pops the answer to request `n`, checks it and records it answered
    /// (and, if wrong, the wrong answer), in one transaction; waits while
    /// none is there. The check's verdict.
    fn receive(&mut self, n: u64) -> Result<Result<(), String>, Fail> {
        let deadline = deadline_in(self.timeout);
        loop {
            let left = left(deadline);
            let (slots, key) = (self.root.slots, self.key);
            let popped = self.state.pop_wait(self.slot.responses, left, |tx, frame| {
                let verdict = judge(key, n, &frame);
                let mut v = tx.vec(slots)?;
                let s = v.get_mut(key)?;
                s.answered = n;
                if verdict.is_err() {
                    s.wrong += 1;
                    if s.first_wrong == 0 {
                        s.first_wrong = n;
                    }
                }
                Ok::<_, Error>(verdict)
            });
            match popped {
                Ok(verdict) => {
                    self.answered = n;
                    return Ok(verdict);
                }
                Err(Error::PeerGone { pid, .. }) => {
                    self.wait_for_server(self.slot.responses, RingEnd::Producer, pid, deadline)?
                }
                Err(Error::TimedOut { waiting_for, .. }) => {
                    return Err(Fail(
                        3,
                        format!(
                            "no answer to request {n} in {:?}: waited for {waiting_for}",
                            self.timeout
                        ),
                    ));
                }
                Err(e) => return Err(with_damage_code(3)(e)),
            }
        }
    }

    /// The server recorded at `end` of `ring` (process `gone`) is gone:
    /// waits until another one attaches there, or the ring is ready
    /// anyway, sleeping on the commit word (a server's attach commits).
    fn wait_for_server(
        &mut self,
        ring: StateRing,
        end: RingEnd,
        gone: u32,
        deadline: Option<Instant>,
    ) -> Result<(), Fail> {
        self.server_gone += 1;
        let ready = |v: &RingView| match end {
            RingEnd::Producer => !v.is_empty(),
            RingEnd::Consumer => v.fits(size_of::<Request>()),
        };
        loop {
            let word = self.state.commit_word();
            let v = self
                .state
                .read(|v| v.ring(ring))
                .map_err(with_damage_code(3))?;
            if v.alive(end) || ready(&v) {
                return Ok(());
            }
            let left = left(deadline);
            if left.is_zero() {
                return Err(Fail(
                    3,
                    format!(
                        "the server (process {gone}) is gone and no other came within {:?}",
                        self.timeout
                    ),
                ));
            }
            self.state.wait_for_commit_after(word, left.min(NAP))?;
        }
    }
}

/// The time left until `deadline` (`Duration::MAX`: none).
fn left(deadline: Option<Instant>) -> Duration {
    deadline.map_or(Duration::MAX, |d| {
        d.saturating_duration_since(Instant::now())
    })
}

/// Whether `frame` is the right answer to request `n` of client `key`:
/// the server's answer to that request, applied, with the sum of
/// requests 1..=n each applied once.
fn judge(key: u64, n: u64, frame: &[u8]) -> Result<(), String> {
    let Some(r) = Response::decode(frame) else {
        return Err(format!(
            "the answer to request {n} is malformed ({} bytes)",
            frame.len()
        ));
    };
    if r.client != key || r.n != n {
        return Err(format!(
            "the answer to request {n} is one to client {}'s request {}",
            r.client, r.n
        ));
    }
    if r.refused != 0 {
        return Err(format!(
            "the server refused request {n}: it was not the next it expected (sent twice, or one before it lost)"
        ));
    }
    let want = sum_after(n);
    if r.sum != want {
        return Err(format!(
            "the answer to request {n} is {}, expected {want}: a request was applied twice or lost",
            r.sum
        ));
    }
    Ok(())
}

/// Blocks until stdin ends: `rpc run` closes the pipe's write end to
/// start every client at once.
fn wait_for_start() -> Result<(), Fail> {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Fail(3, format!("waiting for the start: {e}"))),
        }
    }
}

/// `rpc client`; `Ok(false)` after a wrong answer (recorded in the state).
pub(crate) fn main(cli: &Cli, args: &ClientArgs) -> Result<bool, Fail> {
    let timeout = seconds("--timeout", args.timeout)?;
    let run_for = args.seconds.map(|s| seconds("--seconds", s)).transpose()?;
    let damage = with_damage_code(3);
    let mut state = open(cli, false, 3)?;
    let (root, slots) = setup(&mut state, 3)?;
    let key = u64::from(args.id);
    let Some(&slot) = slots.get(args.id as usize) else {
        return Err(Fail(
            3,
            format!(
                "--id {}: the state is set up for clients 0 to {}",
                args.id,
                slots.len() - 1
            ),
        ));
    };
    // One process per client number: a ring has one consumer.
    let me = std::process::id();
    let v = state.read(|v| v.ring(slot.responses)).map_err(&damage)?;
    if let Some(pid) = v.attached(RingEnd::Consumer)
        && pid != me
        && v.alive(RingEnd::Consumer)
    {
        return Err(Fail(
            3,
            format!("client {key} already runs (process {pid})"),
        ));
    }
    let (sent, answered) = state
        .transaction(|tx| {
            tx.ring(slot.requests)?.attach(RingEnd::Producer)?;
            tx.ring(slot.responses)?.attach(RingEnd::Consumer)?;
            let mut v = tx.vec(root.slots)?;
            let s = v.get_mut(key)?;
            s.starts += 1;
            Ok::<_, Error>((s.sent, s.answered))
        })
        .map_err(&damage)?;
    let mut out = std::io::stdout().lock();
    if args.wait_start {
        writeln!(out, "ready")?;
        out.flush()?;
        wait_for_start()?;
    }
    // `None`: no time limit (none given, or too far to represent).
    let stop_at = run_for.and_then(deadline_in);
    let mut c = Client {
        state,
        root,
        slot,
        key,
        timeout,
        sent,
        answered,
        server_gone: 0,
    };
    let first = c.answered;
    let verdict = loop {
        if c.sent == c.answered {
            let enough = args.requests.is_some_and(|n| c.answered >= n);
            let late = stop_at.is_some_and(|d| Instant::now() >= d);
            if enough || late {
                break Ok(());
            }
            c.send(c.sent + 1)?;
        }
        // Sent before it answered: the answer to the oldest unanswered.
        let n = c.answered + 1;
        if let Err(wrong) = c.receive(n)? {
            break Err(wrong);
        }
    };
    let line = format!(
        "answered {} ({} in this run; the server was gone {} times)",
        c.answered,
        c.answered - first,
        c.server_gone
    );
    match verdict {
        Ok(()) => {
            writeln!(out, "{line}")?;
            Ok(true)
        }
        Err(wrong) => {
            writeln!(out, "{line}")?;
            eprintln!("rpc: client {key}: wrong answer: {wrong}");
            Ok(false)
        }
    }
}
