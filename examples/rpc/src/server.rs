//! `rpc serve`: takes the clients' requests, applies each to the client's
//! account and pushes the answer onto the client's response ring, all in
//! one transaction per request ([`SharedState::try_pop`]), until `rpc
//! stop`.
//!
//! The server never blocks on one ring: it looks at every ring in one
//! lock-free read, serves each client with a request waiting (and room
//! for the answer) once, and looks again. When no request waits it
//! sleeps on the commit word, which the next client's push wakes.

use std::io::Write;
use std::time::Duration;

use shm_state::{RingEnd, SharedState, Tx};

use crate::{Account, Cli, Fail, Op, Request, Response, Root, Slot, open, setup, with_damage_code};

/// The longest sleep between two looks at the rings: a client killed
/// inside its push transaction commits nothing and wakes no one (the
/// next look, a read, rolls it back).
const NAP: Duration = Duration::from_millis(500);

/// What stops one request's transaction.
enum Step {
    /// The response ring had no room after all: rolled back, the request
    /// stays for the next round.
    Full,
    /// The state failed (damage, or a system error).
    State(shm_state::Error),
}

impl From<shm_state::Error> for Step {
    fn from(e: shm_state::Error) -> Self {
        Step::State(e)
    }
}

/// Applies the request in `frame` of client `key` to its account and
/// pushes the answer onto `responses` (inside the caller's transaction,
/// with the pop). A request that is malformed, another client's, or not
/// the account's next is refused: counted in the account, answered as
/// refused, not applied.
fn apply(
    tx: &mut Tx<'_, Root>,
    accounts: shm_state::StateMap<u64, Account>,
    key: u64,
    slot: &Slot,
    frame: &[u8],
) -> Result<(), Step> {
    let mut a = tx.map(accounts)?.get(&key)?.copied().unwrap_or_default();
    let answer = match Request::decode(frame) {
        Some(r) if r.client == key && r.n == a.last.wrapping_add(1) => {
            if r.op == Op::Add as u64 {
                a.sum = a.sum.wrapping_add(r.value);
            }
            a.applied += 1;
            a.last = r.n;
            Response::new(key, r.n, false, a.sum)
        }
        got => {
            a.refused += 1;
            if a.first_refused == 0 {
                a.first_refused = got.map_or(u64::MAX, |r| r.n);
            }
            Response::new(key, got.map_or(0, |r| r.n), true, a.sum)
        }
    };
    tx.map(accounts)?.insert(&key, &a)?;
    if !tx.ring(slot.responses)?.push(bytemuck::bytes_of(&answer))? {
        return Err(Step::Full);
    }
    tx.root_mut()?.served += 1;
    Ok(())
}

/// `rpc serve`.
pub(crate) fn serve(cli: &Cli) -> Result<(), Fail> {
    let damage = with_damage_code(3);
    let mut state: SharedState<Root> = open(cli, false, 3)?;
    let (root, slots) = setup(&mut state, 3)?;
    // One server at a time (two would both be correct, each request in
    // one transaction, but the rings record one consumer).
    let me = std::process::id();
    let first = state.read(|v| v.ring(slots[0].requests)).map_err(&damage)?;
    if let Some(pid) = first.attached(RingEnd::Consumer)
        && pid != me
        && first.alive(RingEnd::Consumer)
    {
        return Err(Fail(
            3,
            format!("another server (process {pid}) serves this state"),
        ));
    }
    state
        .transaction(|tx| {
            for s in &slots {
                tx.ring(s.requests)?.attach(RingEnd::Consumer)?;
                tx.ring(s.responses)?.attach(RingEnd::Producer)?;
            }
            let r = tx.root_mut()?;
            r.servers += 1;
            r.stop = 0;
            Ok::<_, shm_state::Error>(())
        })
        .map_err(&damage)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "serving {} clients", slots.len())?;
    out.flush()?;
    let (mut served, mut sleeps, mut full) = (0u64, 0u64, 0u64);
    let mut ready = Vec::with_capacity(slots.len());
    loop {
        // The word before the look: a commit after it ends the sleep.
        let word = state.commit_word();
        let stop = state
            .read(|v| {
                ready.clear();
                for (k, s) in slots.iter().enumerate() {
                    if !v.ring(s.requests)?.is_empty()
                        && v.ring(s.responses)?.fits(size_of::<Response>())
                    {
                        ready.push(k);
                    }
                }
                Ok::<_, shm_state::Error>(v.root()?.stop != 0)
            })
            .map_err(&damage)?;
        if stop {
            break;
        }
        if ready.is_empty() {
            state.wait_for_commit_after(word, NAP)?;
            sleeps += 1;
            continue;
        }
        for &k in &ready {
            let slot = &slots[k];
            let key = k as u64;
            match state.try_pop(slot.requests, |tx, frame| {
                apply(tx, root.accounts, key, slot, &frame)
            }) {
                Ok(Some(())) => served += 1,
                Ok(None) => {}
                Err(Step::Full) => full += 1,
                Err(Step::State(e)) => return Err(damage(e)),
            }
        }
    }
    writeln!(
        out,
        "served {served} requests (slept {sleeps} times; {full} waited for room for the answer)"
    )?;
    Ok(())
}
