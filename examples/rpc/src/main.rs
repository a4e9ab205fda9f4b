//! `rpc`: a server answers the requests of many client processes over
//! rings in one shm-state [`SharedState`], and every request is applied
//! once and answered once even when the server or a client is killed
//! (kill -9, at any instruction) and started again.
//!
//! Modelled on an inter-process hash map in which 64 client processes send
//! their requests to a server over shared-memory ring buffers. Here each
//! client `K` has two rings in the state: requests (client → server) and
//! responses (server → client), and a slot with its counters; the server
//! keeps one account per client in a [`StateMap`].
//!
//! Exactly once, in three transactions per request:
//! - the client pushes request `n` and records `sent = n` (one
//!   transaction: [`SharedState::push_wait`]);
//! - the server pops it, applies it to the client's account and pushes
//!   the response (one transaction: [`SharedState::try_pop`]);
//! - the client pops the response, checks it and records `answered = n`
//!   (one transaction: [`SharedState::pop_wait`]).
//!
//! A killed process's transaction is rolled back whole, so a restarted
//! client continues from its committed counters (waiting for the answer
//! to a request it sent before it died, never sending it again) and the
//! server never applies a request twice nor loses one. Request `n` adds
//! `n` to the client's sum, or (every fourth) reads it, and the answer is
//! the sum: an answer is right only if every earlier request was applied
//! exactly once, so a double apply shows at the client's next answer, and
//! in `rpc check`.
//!
//! Waiting: a client sleeps in `pop_wait` (a futex wait on the state's
//! commit word); the server, when no request ring holds a request, sleeps
//! on the commit word too ([`SharedState::wait_for_commit_after`]), so an
//! idle run costs no CPU. With many clients the waiting, not the work,
//! is what a request costs (`BENCHMARKS.md`, *Request/response over
//! rings*).

mod client;
mod run;
mod server;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use clap::{Parser, Subcommand};
use shm_state::{Layout, RingEnd, SharedState, Source, StateMap, StateRing, StateVec};

const AFTER_HELP: &str = "\
`rpc run` makes a fresh state (in a new memfd, or in --file), starts one
server and --clients clients (this program again: `rpc serve`, `rpc
client --id K`), lets them run for --seconds, stops them and prints
  N clients, S s: T requests, R requests/s
and the result of `rpc check`.

The parts also run on their own, on the memfd a watcher passes, e.g.
  shm-fd sh -c 'rpc init --clients 2 && { rpc serve & rpc client --id 0 --requests 500 &
                rpc client --id 1 --requests 500; wait $!; rpc stop; wait; rpc check; }'
or on --file. The server and the clients may be killed (any signal, kill
-9 included) and started again at any time: each continues from what it
committed; a client started again with the same --id first waits for
the answer to the request it sent before it died.

`rpc check` looks at the counters, the accounts and the rings: every
request sent was applied once, its answer is right, and the requests
and answers in the rings are exactly those not yet applied or not yet
taken (`answered+1..=sent`).

Exit codes:
  0  success: the run or the check is consistent, a client got every
     answer it waited for and each was right, the server stopped
  1  inconsistent: a client got a wrong answer, or one refusing its
     request as out of sequence (recorded in the state), or the check
     found the counters, accounts or rings disagreeing, or the state
     damaged
  2  bad command line
  3  the state cannot be used: no memfd passed, not an rpc state (or
     not set up: `rpc init`), damaged (`serve`, `client`), another
     server or the same client already running, no answer within
     --timeout, 68 processes sharing it already, a process of `run`
     failed, or a system error";

/// The most processes that can share one state (shm-state's peer table):
/// the server and the clients.
const MAX_PEERS: u32 = shm_state::MAX_PEERS as u32;

/// The most clients: every peer but the server.
const MAX_CLIENTS: u32 = MAX_PEERS - 1;

/// Data bytes of each ring: a client has at most one request (and one
/// response) in flight, so a few frames of room are plenty.
const RING_BYTES: u64 = 512;
/// The largest frame a ring takes (requests and responses are 40 bytes).
const MAX_FRAME: u32 = 64;

#[derive(Parser, Debug)]
#[command(version, about = "A server answers many client processes over rings in shared memory, each request exactly once", after_help = AFTER_HELP)]
struct Cli {
    /// Keep the state in this file instead of the passed memfd (`run`:
    /// a new or empty file).
    #[arg(long, value_name = "PATH", global = true)]
    file: Option<PathBuf>,
    /// Name of the memfd in LISTEN_FDNAMES.
    #[arg(long, value_name = "NAME", default_value = shm_fd::DEFAULT_NAME, global = true)]
    name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a fresh state, start a server and the clients, count the
    /// requests answered, stop them, check the state.
    Run(run::RunArgs),
    /// Set up the rings, counters and accounts for N clients.
    Init {
        /// Number of clients (1 to 67).
        #[arg(long, value_name = "N")]
        clients: u32,
    },
    /// Answer the clients' requests until `rpc stop`.
    Serve,
    /// Send requests one at a time, each after the answer to the last.
    Client(client::ClientArgs),
    /// Tell the server to stop, and wait until it has.
    Stop {
        /// Give up waiting after this many seconds (fractions allowed).
        #[arg(long, value_name = "S", default_value_t = 30.0)]
        timeout: f64,
    },
    /// Check that every request was applied once and answered right, and
    /// that the rings hold exactly what is in flight; print the counts.
    Check,
}

/// The root, version 1.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    /// Client number -> what the server applied for it.
    accounts: StateMap<u64, Account>,
    /// One slot per client: its rings and counters.
    slots: StateVec<Slot>,
    /// Number of clients (null `slots`: not set up).
    clients: u64,
    /// Set by `rpc stop`: the server exits (a server clears it when it
    /// starts).
    stop: u64,
    /// Requests the server took, in all (applied or refused).
    served: u64,
    /// Times a server started on this state.
    servers: u64,
}

/// A client's rings and counters. The client writes the counters; the
/// server writes only the rings.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Slot {
    /// Requests, client → server.
    requests: StateRing,
    /// Responses, server → client.
    responses: StateRing,
    /// Requests 1..=sent were pushed.
    sent: u64,
    /// Responses to requests 1..=answered were taken and checked.
    answered: u64,
    /// Answers that were wrong (0 in a consistent state).
    wrong: u64,
    /// The request whose answer was the first wrong one (0: none).
    first_wrong: u64,
    /// Times a client with this number started.
    starts: u64,
}

/// What the server applied for one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Account {
    /// Requests applied.
    applied: u64,
    /// The number of the last request applied: the next must be `last+1`.
    last: u64,
    /// The sum of the values the requests added (wrapping).
    sum: u64,
    /// Requests refused: malformed, another client's, or out of sequence.
    refused: u64,
    /// The number of the first refused request (`u64::MAX`: malformed).
    first_refused: u64,
}

/// What request `n` asks: every fourth reads the sum, the others add `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Read the sum.
    Get = 0,
    /// Add the request's value to the sum.
    Add = 1,
}

fn op_of(n: u64) -> Op {
    if n.is_multiple_of(4) {
        Op::Get
    } else {
        Op::Add
    }
}

/// The sum after requests 1..=n, each applied once: the adds of every
/// number not a multiple of 4 (wrapping, as the server adds).
fn sum_after(n: u64) -> u64 {
    let tri = |k: u64| (u128::from(k) * (u128::from(k) + 1) / 2) as u64;
    tri(n).wrapping_sub(tri(n / 4).wrapping_mul(4))
}

/// A 64-bit finalizer over the fields of a frame: a frame read torn, or
/// another client's, shows.
fn mix(words: &[u64]) -> u64 {
    fn fmix(mut x: u64) -> u64 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
    words
        .iter()
        .fold(0x9e37_79b9_7f4a_7c15, |h, &w| fmix(h ^ fmix(w)))
}

/// A request frame: client `client` asks its request `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Request {
    /// The client's number.
    client: u64,
    /// The request's number: 1, 2, 3, ... for each client.
    n: u64,
    /// [`Op`] as a number.
    op: u64,
    /// What an add adds (`n`; 0 for a get).
    value: u64,
    /// [`mix`] of the fields above.
    check: u64,
}

impl Request {
    /// The request `n` of client `client`, as the clients make them.
    fn new(client: u64, n: u64) -> Request {
        let op = op_of(n);
        let value = if op == Op::Add { n } else { 0 };
        let fields = [client, n, op as u64, value];
        Request {
            client,
            n,
            op: op as u64,
            value,
            check: mix(&fields),
        }
    }

    /// The request a frame holds, if it is one a client made.
    fn decode(frame: &[u8]) -> Option<Request> {
        let r: Request = read_frame(frame)?;
        (r == Request::new(r.client, r.n)).then_some(r)
    }
}

/// A response frame: the answer to request `n` of client `client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Response {
    /// The client's number.
    client: u64,
    /// The number of the request answered.
    n: u64,
    /// 0: applied; 1: refused (malformed or out of sequence).
    refused: u64,
    /// The client's sum after the request.
    sum: u64,
    /// [`mix`] of the fields above.
    check: u64,
}

impl Response {
    fn new(client: u64, n: u64, refused: bool, sum: u64) -> Response {
        let refused = u64::from(refused);
        Response {
            client,
            n,
            refused,
            sum,
            check: mix(&[client, n, refused, sum]),
        }
    }

    /// The response a frame holds, if it is one the server made.
    fn decode(frame: &[u8]) -> Option<Response> {
        let r: Response = read_frame(frame)?;
        (r == Response::new(r.client, r.n, r.refused != 0, r.sum) && r.refused <= 1).then_some(r)
    }
}

/// A POD frame of exactly `T`'s size (frames popped are not aligned).
fn read_frame<T: Pod>(frame: &[u8]) -> Option<T> {
    (frame.len() == size_of::<T>()).then(|| bytemuck::pod_read_unaligned(frame))
}

/// A failure with its exit code.
struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(3, e.to_string())
    }
}

/// Maps a shm-state error to a failure: exit `code` if the state is
/// damaged (corrupt or truncated), 3 otherwise; a state of another
/// program says so.
fn with_damage_code(code: u8) -> impl Fn(shm_state::Error) -> Fail {
    move |e| match e {
        shm_state::Error::Corrupted(_) | shm_state::Error::Truncated { .. } => {
            Fail(code, e.to_string())
        }
        shm_state::Error::LayoutMismatch { .. }
        | shm_state::Error::Downgrade { .. }
        | shm_state::Error::NotAState { .. } => Fail(3, format!("not an rpc state: {e}")),
        e => Fail(3, e.to_string()),
    }
}

/// A number of seconds as a duration (`Duration::MAX` for one too long to
/// represent); `what` names the option in the message.
fn seconds(what: &str, s: f64) -> Result<Duration, Fail> {
    if !(s.is_finite() && s >= 0.0) {
        return Err(Fail(
            2,
            format!("{what} {s}: give a non-negative number of seconds"),
        ));
    }
    Ok(Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
}

/// An instant `d` from now (`None`: never).
fn deadline_in(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// Opens the state: `--file` (created if `create`), else the memfd passed
/// on `LISTEN_FDS`. A damaged state fails with exit code `on_damage`.
fn open(cli: &Cli, create: bool, on_damage: u8) -> Result<SharedState<Root>, Fail> {
    let source = match &cli.file {
        Some(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(path)
                .map_err(|e| Fail(3, format!("{}: {e}", path.display())))?;
            // SAFETY: the file is rpc's own, shared only with other rpc
            // processes (shm-state's writer lock orders their writes), and
            // nothing truncates it.
            unsafe { Source::file(file) }
        }
        None => {
            // SAFETY: opened once, before the program opens any file of its
            // own: the fd LISTEN_FDS names was inherited and has no owner.
            let fd = unsafe { shm_fd::SharedFd::from_env(&cli.name) }?;
            // SAFETY: the watcher (or `rpc run`) passed the memfd to rpc
            // processes only and sealed it against shrinking; shm-state's
            // writer lock orders their writes.
            unsafe { Source::shared(fd) }
        }
    };
    SharedState::open(source, Layout::new(1)).map_err(with_damage_code(on_damage))
}

/// The root and the slots of a state that `rpc init` set up.
fn setup(state: &mut SharedState<Root>, on_damage: u8) -> Result<(Root, Vec<Slot>), Fail> {
    let damage = with_damage_code(on_damage);
    let root = state.read(|v| v.root()).map_err(&damage)?;
    if root.slots.is_null() || root.accounts.is_null() {
        return Err(Fail(
            3,
            "no rpc state here yet: `rpc init --clients N` sets one up".into(),
        ));
    }
    let slots = state.read(|v| v.vec(root.slots)).map_err(&damage)?;
    if slots.len() as u64 != root.clients {
        return Err(Fail(
            on_damage,
            format!(
                "the state names {} clients but holds {} slots",
                root.clients,
                slots.len()
            ),
        ));
    }
    Ok((root, slots))
}

/// Creates the accounts and a slot with two rings per client, as one
/// transaction; refused if the state is set up already.
fn init_state(state: &mut SharedState<Root>, clients: u32) -> Result<(), Fail> {
    if !(1..=MAX_CLIENTS).contains(&clients) {
        return Err(Fail(
            2,
            format!(
                "--clients {clients}: give 1 to {MAX_CLIENTS} (a shared state's peer table holds {MAX_PEERS} processes: the clients and the server)"
            ),
        ));
    }
    state
        .transaction(|tx| {
            let root = *tx.root()?;
            if !root.slots.is_null() {
                return Ok(Err(Fail(
                    3,
                    format!(
                        "the state is set up already, for {} clients; use a new memfd or file",
                        root.clients
                    ),
                )));
            }
            let accounts = tx.new_map()?;
            let slots = tx.new_vec()?;
            let mut made = Vec::with_capacity(clients as usize);
            for _ in 0..clients {
                made.push(Slot {
                    requests: tx.new_ring(RING_BYTES, MAX_FRAME)?,
                    responses: tx.new_ring(RING_BYTES, MAX_FRAME)?,
                    ..Slot::zeroed()
                });
            }
            tx.vec(slots)?.extend_from_slice(&made)?;
            *tx.root_mut()? = Root {
                accounts,
                slots,
                clients: u64::from(clients),
                ..Root::zeroed()
            };
            Ok::<_, shm_state::Error>(Ok(()))
        })
        .map_err(with_damage_code(3))?
}

fn init(cli: &Cli, clients: u32) -> Result<bool, Fail> {
    let mut state = open(cli, true, 3)?;
    init_state(&mut state, clients)?;
    println!("set up for {clients} clients");
    Ok(true)
}

/// Sets the stop flag; returns the server's pid if one was attached and
/// alive just before (looked at first: a server may see the flag and end
/// at once).
fn request_stop(state: &mut SharedState<Root>, slots: &[Slot]) -> Result<Option<u32>, Fail> {
    let damage = with_damage_code(3);
    let v = state.read(|v| v.ring(slots[0].requests)).map_err(&damage)?;
    let server = v
        .attached(RingEnd::Consumer)
        .filter(|_| v.alive(RingEnd::Consumer));
    state
        .transaction(|tx| {
            tx.root_mut()?.stop = 1;
            Ok::<_, shm_state::Error>(())
        })
        .map_err(&damage)?;
    Ok(server)
}

fn stop(cli: &Cli, timeout: f64) -> Result<bool, Fail> {
    let timeout = seconds("--timeout", timeout)?;
    let mut state = open(cli, false, 3)?;
    let (_, slots) = setup(&mut state, 3)?;
    let Some(pid) = request_stop(&mut state, &slots)? else {
        println!("stop requested; no server is running");
        return Ok(true);
    };
    let deadline = deadline_in(timeout);
    loop {
        let word = state.commit_word();
        let v = state
            .read(|v| v.ring(slots[0].requests))
            .map_err(with_damage_code(3))?;
        if v.attached(RingEnd::Consumer) != Some(pid) || !v.alive(RingEnd::Consumer) {
            println!("stopped: server process {pid} ended");
            return Ok(true);
        }
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return Err(Fail(
                3,
                format!("server process {pid} still runs {timeout:?} after the stop request"),
            ));
        }
        // The server's exit commits nothing: look again every 20 ms.
        state.wait_for_commit_after(word, left.min(Duration::from_millis(20)))?;
    }
}

/// What `rpc check` found.
struct Checked {
    /// Clients the state is set up for.
    clients: u64,
    /// Requests sent, all clients together.
    sent: u64,
    /// Requests answered, all clients together.
    answered: u64,
    /// Requests in the request rings (sent, not yet applied).
    requests: u64,
    /// Responses in the response rings (applied, not yet taken).
    responses: u64,
    /// Every problem, one line each.
    problems: Vec<String>,
}

/// The frames of every ring, the slots and the accounts, all from one
/// transaction that pops every frame and is then rolled back.
enum Peek {
    /// What the look found.
    Taken(Box<Peeked>),
    /// The look failed (damage).
    Failed(shm_state::Error),
}

/// Everything `rpc check` compares, from one transaction.
struct Peeked {
    root: Root,
    slots: Vec<Slot>,
    /// Every account: client number, account.
    accounts: Vec<(u64, Account)>,
    /// Per client: the frames in its rings.
    frames: Vec<InFlight>,
}

/// The frames in one client's rings, oldest first.
struct InFlight {
    /// Requests sent and not yet applied.
    requests: Vec<Vec<u8>>,
    /// Answers pushed and not yet taken.
    responses: Vec<Vec<u8>>,
}

impl From<shm_state::Error> for Peek {
    fn from(e: shm_state::Error) -> Self {
        Peek::Failed(e)
    }
}

/// Looks at everything in one consistent state (the writer lock held
/// throughout), changing nothing.
fn peek(state: &mut SharedState<Root>) -> Result<Peeked, shm_state::Error> {
    let peeked = state.transaction(|tx| {
        let root = *tx.root()?;
        let slots = tx.vec(root.slots)?.as_slice()?.to_vec();
        let mut accounts = Vec::new();
        for entry in tx.map(root.accounts)?.as_ref()?.iter() {
            let (&k, &a) = entry?;
            accounts.push((k, a));
        }
        let mut frames = Vec::with_capacity(slots.len());
        for s in &slots {
            let mut all = |ring: StateRing| -> Result<Vec<Vec<u8>>, shm_state::Error> {
                let mut r = tx.ring(ring)?;
                let mut v = Vec::new();
                while let Some(f) = r.pop()? {
                    v.push(f);
                }
                Ok(v)
            };
            let requests = all(s.requests)?;
            let responses = all(s.responses)?;
            frames.push(InFlight {
                requests,
                responses,
            });
        }
        // An error: the transaction is rolled back, nothing is taken.
        Err::<(), _>(Peek::Taken(Box::new(Peeked {
            root,
            slots,
            accounts,
            frames,
        })))
    });
    match peeked {
        Err(Peek::Taken(p)) => Ok(*p),
        Err(Peek::Failed(e)) => Err(e),
        Ok(()) => unreachable!("the look is always rolled back"),
    }
}

/// Checks a state that `rpc init` set up: the heap and the accounts
/// verify, and for every client `K` (slot: `sent`, `answered`; account:
/// `applied`, `last`, `sum`):
/// `answered <= last <= sent`, `applied == last`, `sum` is the sum of
/// requests 1..=last, the request ring holds exactly requests
/// `last+1..=sent` and the response ring the right answers to
/// `answered+1..=last`; no wrong answer or refused request is recorded;
/// the server's count is the accounts' total.
fn check_state(state: &mut SharedState<Root>) -> Result<Checked, Fail> {
    let damage = with_damage_code(1);
    let (root, _) = setup(state, 1)?;
    let mut problems = Vec::new();
    let verified = state.with_lock(|s| {
        let heap = s.verify().map(drop);
        let accounts = s.map(root.accounts).and_then(|m| m.verify());
        Ok::<_, shm_state::Error>((heap, accounts))
    });
    match verified.map_err(&damage)? {
        (Err(e), _) => problems.push(format!("heap: {e}")),
        (_, Err(e)) => problems.push(format!("accounts: {e}")),
        _ => {}
    }
    let p = peek(state).map_err(&damage)?;
    let mut c = Checked {
        clients: p.root.clients,
        sent: 0,
        answered: 0,
        requests: 0,
        responses: 0,
        problems,
    };
    let problems = &mut c.problems;
    if p.slots.len() as u64 != p.root.clients {
        problems.push(format!(
            "the state names {} clients but holds {} slots",
            p.root.clients,
            p.slots.len()
        ));
    }
    let mut taken = 0u64;
    for &(k, a) in &p.accounts {
        if k >= p.slots.len() as u64 {
            problems.push(format!(
                "an account for client {k}, and there are {} clients",
                p.slots.len()
            ));
        }
        taken = taken.wrapping_add(a.applied).wrapping_add(a.refused);
    }
    if taken != p.root.served {
        problems.push(format!(
            "the server counted {} requests taken, the accounts {taken}",
            p.root.served
        ));
    }
    for (
        k,
        (
            s,
            InFlight {
                requests,
                responses,
            },
        ),
    ) in p.slots.iter().zip(&p.frames).enumerate()
    {
        let key = k as u64;
        let a = p
            .accounts
            .iter()
            .find(|(c, _)| *c == key)
            .map_or_else(Account::default, |&(_, a)| a);
        c.sent += s.sent;
        c.answered += s.answered;
        c.requests += requests.len() as u64;
        c.responses += responses.len() as u64;
        let mut bad = |p: String| problems.push(format!("client {k}: {p}"));
        if s.wrong != 0 {
            bad(format!(
                "{} wrong answer(s) recorded, the first to its request {}",
                s.wrong, s.first_wrong
            ));
        }
        if a.refused != 0 {
            let first = match a.first_refused {
                u64::MAX => "a malformed frame".to_string(),
                n => format!("request {n}"),
            };
            bad(format!(
                "the server refused {} request(s), the first {first}, after request {}",
                a.refused, a.last
            ));
        }
        if a.applied != a.last {
            bad(format!(
                "the server applied {} requests and the last was request {}: some were applied twice or skipped",
                a.applied, a.last
            ));
        }
        if a.sum != sum_after(a.last) {
            bad(format!(
                "its sum is {}, and requests 1..={} applied once each make {}: a request was applied twice or lost",
                a.sum,
                a.last,
                sum_after(a.last)
            ));
        }
        if !(s.answered <= a.last && a.last <= s.sent) {
            bad(format!(
                "answered {}, applied up to {}, sent {}: expected answered <= applied <= sent",
                s.answered, a.last, s.sent
            ));
            continue;
        }
        if requests.len() as u64 != s.sent - a.last {
            bad(format!(
                "{} request(s) in its ring, expected the {} not yet applied ({}..={})",
                requests.len(),
                s.sent - a.last,
                a.last + 1,
                s.sent
            ));
        } else if let Some((f, n)) = requests
            .iter()
            .zip(a.last + 1..)
            .find(|(f, n)| Request::decode(f) != Some(Request::new(key, *n)))
        {
            bad(format!(
                "the request ring holds {:?} where request {n} belongs",
                Request::decode(f)
            ));
        }
        if responses.len() as u64 != a.last - s.answered {
            bad(format!(
                "{} response(s) in its ring, expected the {} not yet taken ({}..={})",
                responses.len(),
                a.last - s.answered,
                s.answered + 1,
                a.last
            ));
        } else if let Some((f, n)) = responses.iter().zip(s.answered + 1..).find(|(f, n)| {
            Response::decode(f) != Some(Response::new(key, *n, false, sum_after(*n)))
        }) {
            bad(format!(
                "the response ring holds {:?} where the answer to request {n} belongs",
                Response::decode(f)
            ));
        }
    }
    Ok(c)
}

fn check(cli: &Cli) -> Result<bool, Fail> {
    let mut state = open(cli, false, 1)?;
    let c = check_state(&mut state)?;
    println!(
        "{} clients: {} sent, {} answered; {} requests and {} responses in flight",
        c.clients, c.sent, c.answered, c.requests, c.responses
    );
    for p in &c.problems {
        eprintln!("rpc check: {p}");
    }
    Ok(c.problems.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run::run(&cli, args),
        Command::Init { clients } => init(&cli, *clients),
        Command::Serve => server::serve(&cli).map(|()| true),
        Command::Client(args) => client::main(&cli, args),
        Command::Stop { timeout } => stop(&cli, *timeout),
        Command::Check => check(&cli),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Fail(code, msg)) => {
            let who = match &cli.command {
                Command::Client(args) => format!("rpc: client {}", args.id),
                Command::Serve => "rpc: server".into(),
                _ => "rpc".into(),
            };
            eprintln!("{who}: {msg}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_after_adds_every_number_but_the_fourths() {
        let mut sum = 0u64;
        for n in 1..=1000 {
            if op_of(n) == Op::Add {
                sum += n;
            }
            assert_eq!(sum_after(n), sum, "n = {n}");
        }
        assert_eq!(sum_after(0), 0);
    }

    #[test]
    fn frames_round_trip_and_a_changed_byte_shows() {
        let r = Request::new(3, 17);
        let mut f = bytemuck::bytes_of(&r).to_vec();
        assert_eq!(Request::decode(&f), Some(r));
        f[9] ^= 1;
        assert_eq!(Request::decode(&f), None);
        let a = Response::new(3, 17, false, sum_after(17));
        let f = bytemuck::bytes_of(&a).to_vec();
        assert_eq!(Response::decode(&f), Some(a));
        assert_eq!(Response::decode(&f[1..]), None);
    }
}
