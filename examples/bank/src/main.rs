//! `bank`: accounts in a shm-state vector, moved between by random
//! transfers, one transaction each. Whatever kills it, `bank check` finds
//! the total unchanged. Any number of `bank run`s and `bank check`s may
//! share one state at once (a [`SharedState`]): transfers take turns under
//! the writer lock, and `check` reads the balances without any lock.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use clap::{Parser, Subcommand};
use shm_state::{Layout, SharedState, Source, State, StateCell, StateLog, StateMap, StateVec};

const AFTER_HELP: &str = "\
The state lives in the shared memfd passed by a watcher (`shm-fd bank ...`,
`shm-fd shm-restore bank.snap bank ...`) or, with --file, in a regular file.

Exit codes:
  0  success; for `check`: every invariant holds
  1  `check`: an invariant does not hold, or the state is damaged (the
     message says which)
  2  bad command line
  3  the state cannot be used: no memfd passed, not a bank (or not
     initialized, or already initialized), damaged (`init`, `run`), held
     by a live process that does not share it, shared by 68 processes
     already, a transfer total that would overflow 64 bits, or a system
     error

Many `bank run` and `bank check` processes may use one state at once.";

#[derive(Parser, Debug)]
#[command(version, about = "Random transfers between accounts, each one transaction", after_help = AFTER_HELP)]
struct Cli {
    /// Keep the state in this file instead of the passed memfd.
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
    /// Create N accounts holding B each.
    Init {
        /// Number of accounts.
        #[arg(long, value_name = "N")]
        accounts: u32,
        /// Initial balance of each account.
        #[arg(long, value_name = "B")]
        balance: u64,
    },
    /// Transfer random amounts between random accounts until stopped
    /// (SIGINT/SIGTERM), or for --seconds, or --transfers.
    Run {
        /// Stop after this many seconds (fractions allowed).
        #[arg(long, value_name = "S")]
        seconds: Option<f64>,
        /// Stop after this many transfers.
        #[arg(long, value_name = "N")]
        transfers: Option<u64>,
        /// Seed of the random transfers (default: from the clock and pid).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Verify the structures and that the total is N*B; print the total.
    Check,
}

/// The bank's root, version 1.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Bank {
    /// One balance per account.
    accounts: StateVec<u64>,
    /// Account number -> transfers it took part in.
    activity: StateMap<u64, u64>,
    /// Totals over all transfers.
    stats: StateCell<Stats>,
    /// One record per `run`: "generation G pid P".
    runs: StateLog,
    /// Balance each account started with.
    initial: u64,
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Stats {
    transfers: u64,
    moved: u64,
}

/// A failure with its exit code.
struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(3, e.to_string())
    }
}

/// Opens the bank's state; a damaged one fails with exit code `on_damage`.
fn open(cli: &Cli, on_damage: u8) -> Result<SharedState<Bank>, Fail> {
    let source = match &cli.file {
        Some(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Fail(3, format!("{}: {e}", path.display())))?;
            // SAFETY: the file is the bank's own, shared only with other
            // banks (shm-state's writer lock orders their writes), and
            // nothing truncates it.
            unsafe { Source::file(file) }
        }
        None => {
            // SAFETY: opened once, before the program opens any file of its
            // own: the fd LISTEN_FDS names was inherited and has no owner.
            let fd = unsafe { shm_fd::SharedFd::from_env(&cli.name) }?;
            // SAFETY: the watcher passed the memfd to banks only and sealed
            // it against shrinking; shm-state's writer lock orders their
            // writes.
            unsafe { Source::shared(fd) }
        }
    };
    SharedState::open(source, Layout::new(1).with_snapshot_protocol())
        .map_err(with_damage_code(on_damage))
}

fn initialized(state: &mut SharedState<Bank>, on_damage: u8) -> Result<Bank, Fail> {
    let bank = state
        .read(|v| v.root())
        .map_err(with_damage_code(on_damage))?;
    if bank.accounts.is_null() {
        return Err(Fail(
            3,
            "the bank is not initialized: run `bank init` first".into(),
        ));
    }
    Ok(bank)
}

fn init(cli: &Cli, accounts: u32, balance: u64) -> Result<(), Fail> {
    if accounts < 2 {
        return Err(Fail(2, "--accounts must be at least 2".into()));
    }
    if u64::from(accounts).checked_mul(balance).is_none() {
        return Err(Fail(
            2,
            "--accounts times --balance overflows 64 bits".into(),
        ));
    }
    let mut state = open(cli, 3)?;
    state.transaction(|tx| {
        let root = *tx.root()?;
        if !root.accounts.is_null() {
            let n = tx.vec(root.accounts)?.len()?;
            return Err(Fail(
                3,
                format!("the bank is already initialized ({n} accounts)"),
            ));
        }
        let accounts_vec = tx.new_vec()?;
        let mut v = tx.vec(accounts_vec)?;
        v.reserve(u64::from(accounts))?;
        for _ in 0..accounts {
            v.push(balance)?;
        }
        let bank = Bank {
            accounts: accounts_vec,
            activity: tx.new_map()?,
            stats: tx.new_cell(Stats::zeroed())?,
            runs: tx.new_log()?,
            initial: balance,
        };
        Ok(tx.set_root(bank)?)
    })?;
    println!("initialized {accounts} accounts of {balance}");
    Ok(())
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn run(cli: &Cli, seconds: Option<f64>, limit: Option<u64>, seed: Option<u64>) -> Result<(), Fail> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let deadline = match seconds {
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            return Err(Fail(
                2,
                format!("--seconds {s} is not a non-negative number"),
            ));
        }
        Some(s) => Some(Instant::now() + Duration::from_secs_f64(s)),
        None => None,
    };
    let mut state = open(cli, 3)?;
    eprintln!("bank: {}", state.report());
    let bank = initialized(&mut state, 3)?;
    let n = state.read(|v| v.vec_len(bank.accounts))?;
    let generation = state.report().generation;
    state.transaction(|tx| {
        let record = format!("generation {generation} pid {}", std::process::id());
        tx.log(bank.runs)?.append(record.as_bytes())
    })?;
    let seed = seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        t ^ u64::from(std::process::id()).rotate_left(32)
    });
    let mut rng = Rng(seed | 1);
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed)
        && limit.is_none_or(|l| done < l)
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        let from = rng.next() % n;
        let to = (from + 1 + rng.next() % (n - 1)) % n;
        state.transaction(|tx| {
            let mut accounts = tx.vec(bank.accounts)?;
            let balance = *accounts.get(from)?.unwrap_or(&0);
            let amount = if balance == 0 {
                0
            } else {
                rng.next() % (balance + 1)
            };
            *accounts.get_mut(from)? -= amount;
            *accounts.get_mut(to)? += amount;
            let mut activity = tx.map(bank.activity)?;
            for account in [from, to] {
                let c = activity.get(&account)?.copied().unwrap_or(0);
                activity.insert(&account, &(c + 1))?;
            }
            let stats = tx.cell_mut(bank.stats)?;
            let (Some(transfers), Some(moved)) = (
                stats.transfers.checked_add(1),
                stats.moved.checked_add(amount),
            ) else {
                return Err(Fail(
                    3,
                    format!(
                        "the transfer statistics would overflow 64 bits ({} transfers, {} moved); \
                         nothing more can be recorded",
                        stats.transfers, stats.moved
                    ),
                ));
            };
            stats.transfers = transfers;
            stats.moved = moved;
            Ok::<_, Fail>(())
        })?;
        done += 1;
    }
    eprintln!("bank: {done} transfers");
    Ok(())
}

/// `check` reports a damaged state as a failed check (exit 1), like a
/// broken invariant; other errors keep their exit code.
fn damaged(e: shm_state::Error) -> Fail {
    with_damage_code(1)(e)
}

/// Maps a shm-state error to a failure, exit code `code` if the state is
/// damaged (corrupt or truncated), 3 otherwise.
fn with_damage_code(code: u8) -> impl Fn(shm_state::Error) -> Fail {
    move |e| match e {
        shm_state::Error::Corrupted(_) | shm_state::Error::Truncated { .. } => {
            Fail(code, e.to_string())
        }
        e => Fail(3, e.to_string()),
    }
}

/// Checks every invariant; returns the failures. The balances are read
/// twice: without any lock (a [`shm_state::View`]: another bank may be
/// committing transfers meanwhile, and the read must still see a
/// committed state), and with the rest under the writer lock.
fn check(cli: &Cli) -> Result<bool, Fail> {
    let mut state = open(cli, 1)?;
    eprintln!("bank: {}", state.report());
    let bank = initialized(&mut state, 1)?;
    let mut problems = Vec::new();
    let expected_total = |n: u64| u128::from(n) * u128::from(bank.initial);
    let unlocked = state.read(|v| v.vec(bank.accounts)).map_err(damaged)?;
    let unlocked_total: u128 = unlocked.iter().map(|&b| u128::from(b)).sum();
    if unlocked_total != expected_total(unlocked.len() as u64) {
        problems.push(format!(
            "read without the lock: total is {unlocked_total}, expected {}",
            expected_total(unlocked.len() as u64)
        ));
    }
    let peers = state.peers().len();
    let summary = state
        .with_lock(|state| check_locked(state, &bank, &mut problems))
        .map_err(damaged)?;
    println!(
        "{summary}, generation {}, {peers} peers",
        state.report().generation
    );
    for p in &problems {
        eprintln!("bank check: {p}");
    }
    Ok(problems.is_empty())
}

/// The checks under the writer lock; returns the summary line.
fn check_locked(
    state: &State<Bank>,
    bank: &Bank,
    problems: &mut Vec<String>,
) -> Result<String, shm_state::Error> {
    if let Err(e) = state.verify() {
        problems.push(format!("heap: {e}"));
    }
    let accounts = state.vec(bank.accounts)?;
    let n = accounts.len() as u64;
    let total: u128 = accounts.iter().map(|&b| u128::from(b)).sum();
    let expected = u128::from(n) * u128::from(bank.initial);
    if total != expected {
        problems.push(format!(
            "total is {total}, expected {expected} ({n} accounts x {})",
            bank.initial
        ));
    }
    let activity = state.map(bank.activity)?;
    if let Err(e) = activity.verify() {
        problems.push(format!("activity map: {e}"));
    }
    let mut involvements = 0u64;
    for entry in activity.iter() {
        let (&account, &count) = entry?;
        if account >= n {
            problems.push(format!("activity names account {account} of {n}"));
        }
        involvements += count;
    }
    let stats = *state.cell(bank.stats)?;
    if involvements != 2 * stats.transfers {
        problems.push(format!(
            "{} transfers recorded but accounts took part in {involvements} (expected twice as many)",
            stats.transfers
        ));
    }
    let runs = state.log(bank.runs)?;
    if let Err(e) = runs.verify() {
        problems.push(format!("run log: {e}"));
    }
    Ok(format!(
        "total {total} ({n} accounts x {}), {} transfers, {} runs",
        bank.initial,
        stats.transfers,
        runs.len(),
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Init { accounts, balance } => init(&cli, *accounts, *balance).map(|()| true),
        Command::Run {
            seconds,
            transfers,
            seed,
        } => run(&cli, *seconds, *transfers, *seed).map(|()| true),
        Command::Check => check(&cli),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Fail(code, msg)) => {
            eprintln!("bank: {msg}");
            ExitCode::from(code)
        }
    }
}
