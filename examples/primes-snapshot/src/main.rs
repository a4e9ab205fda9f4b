//! `primes-snapshot`: a long-running prime generator over a 100 MiB shared
//! memfd, committing its progress through shm-snapshot after every chunk,
//! so `shm-restore` can save it at any moment without stopping it.
//!
//! ```text
//! shm-fd shm-restore --snapshot restore-v1 primes.snap ./target/release/primes-snapshot --limit 1000000
//! ```
//!
//! Layout of the data region (after shm-snapshot's header page), all
//! little-endian `u64`:
//!
//! | offset | field                                                   |
//! |--------|---------------------------------------------------------|
//! | 0      | magic `b"primesnp"`                                     |
//! | 8      | count: primes in the table                              |
//! | 16     | next: the first (odd) number not examined yet           |
//! | 24..64 | reserved, zero                                          |
//! | 64     | the table: prime `i` at `64 + 8 i`                      |
//!
//! Each chunk sieves `[next, min(next + SPAN, next²))` with the primes
//! already in the table, appends what it finds and moves `count` and
//! `next`, all in one shm-snapshot update. A restored (or crashed) state
//! is checked before use.
//!
//! Output, like `primes`: `generated N more primes, total T` on stderr
//! after each chunk (every chunk with `--verbose`, else at most once a
//! second); when the table holds `--limit` primes (or is full) every prime
//! in it is printed to stdout, one per line, and the program exits 0.
//!
//! Exit codes: 0 done; 1 the state in the memfd is damaged or not ours; 2
//! usage; 3 no memfd was passed or it cannot be mapped.

use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use shm_snapshot::{DATA_OFFSET, Publisher, Region};

const DATA_LEN: usize = 100 << 20;
const MAGIC: u64 = u64::from_le_bytes(*b"primesnp");
const OFF_MAGIC: usize = 0;
const OFF_COUNT: usize = 8;
const OFF_NEXT: usize = 16;
const OFF_TABLE: usize = 64;
const CAPACITY: usize = (DATA_LEN - OFF_TABLE) / 8;

const EXIT_STATE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_MEMFD: u8 = 3;

/// A long-running prime generator committing through shm-snapshot.
#[derive(Parser, Debug)]
#[command(
    name = "primes-snapshot",
    after_help = "Exit codes: 0 done (table printed); 1 the memfd holds damaged or foreign \
                  state (left untouched); 2 usage; 3 no memfd passed (run under shm-fd) or \
                  it cannot be mapped."
)]
struct Args {
    /// Sleep this long between chunks (milliseconds).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Stop once the table holds at least N primes, printing the table.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Numbers sieved per chunk (even, at least 2).
    #[arg(long, default_value_t = 1 << 16, value_parser = parse_span)]
    span: u64,
    /// Report every chunk on stderr (default: at most once a second).
    #[arg(long)]
    verbose: bool,
}

fn parse_span(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 2 || n & 1 != 0 || n > 1 << 30 {
        return Err("the span must be even, between 2 and 2^30".into());
    }
    Ok(n)
}

enum Failure {
    State(String),
    Memfd(String),
    Output(std::io::Error),
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::State(m)) => {
            eprintln!("primes-snapshot: {m}");
            ExitCode::from(EXIT_STATE)
        }
        Err(Failure::Memfd(m)) => {
            eprintln!("primes-snapshot: {m}");
            ExitCode::from(EXIT_MEMFD)
        }
        // A closed stdout (e.g. `| head`) is not worth a complaint.
        Err(Failure::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Output(e)) => {
            eprintln!("primes-snapshot: writing the table: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    let shared = shm_fd::SharedFd::from_env(shm_fd::DEFAULT_NAME)
        .map_err(|e| Failure::Memfd(e.to_string()))?;
    refuse_foreign(&shared)?;
    let map = shared
        .map_raw((DATA_OFFSET + DATA_LEN) as u64)
        .map_err(|e| Failure::Memfd(e.to_string()))?;
    let (mut publisher, opened) =
        Publisher::open(Region::from_mmap(&map)).map_err(|e| Failure::State(e.to_string()))?;
    let data = publisher
        .data()
        .subregion(0, DATA_LEN)
        .ok_or_else(|| Failure::Memfd("the memfd is smaller than its mapping".into()))?;
    let (state, fresh) = State::load(data, opened.created)?;
    if fresh || opened.interrupted {
        // Fresh: the first prime and the fields, as one update. Interrupted:
        // a half-done chunk left primes past `count` and nothing else, so
        // the checked fields are the state; commit them as they are.
        publisher.enter_update();
        if fresh {
            data.store_u64(OFF_MAGIC, MAGIC);
            data.store_u64(OFF_TABLE, 2);
        }
        state.store(data);
        publisher.commit();
    }
    let mut state = state;
    let mut last_report = Instant::now();
    let mut reported = state.count;
    loop {
        if args.limit.is_some_and(|l| state.count >= l) || state.count as usize >= CAPACITY {
            eprintln!(
                "generated {} more primes, total {} (generation {})",
                state.count - reported,
                state.count,
                publisher.generation()
            );
            return print_table(data, state.count).map_err(Failure::Output);
        }
        let update = publisher.begin();
        state.chunk(update.data(), args.span);
        state.store(update.data());
        let generation = update.commit();
        if args.verbose || last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "generated {} more primes, total {} (generation {generation})",
                state.count - reported,
                state.count
            );
            reported = state.count;
            last_report = Instant::now();
        }
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
}

/// Fails, before the memfd is grown or written, when it holds state that
/// is not under the shm-snapshot protocol.
fn refuse_foreign(shared: &shm_fd::SharedFd) -> Result<(), Failure> {
    let len = shared.len().map_err(|e| Failure::Memfd(e.to_string()))?;
    if len == 0 {
        return Ok(());
    }
    let map = shared
        .map_raw(0)
        .map_err(|e| Failure::Memfd(e.to_string()))?;
    let region = Region::from_mmap(&map);
    match shm_snapshot::probe(region) {
        Ok(shm_snapshot::Protocol::Absent) if !region.is_zero() => {
            Err(Failure::State(shm_snapshot::Error::ForeignData.to_string()))
        }
        Err(e) => Err(Failure::State(e.to_string())),
        Ok(_) => Ok(()),
    }
}

/// The checked progress fields.
struct State {
    count: u64,
    next: u64,
}

impl State {
    /// Reads and checks the state; `true` with the start state when the
    /// data region is blank (nothing is written here). Anything that does
    /// not add up is an error, never a panic.
    fn load(data: Region<'_>, created: bool) -> Result<(State, bool), Failure> {
        let magic = data.load_u64(OFF_MAGIC);
        if magic == 0 && data.load_u64(OFF_COUNT) == 0 && data.load_u64(OFF_NEXT) == 0 {
            if !created && data.load_u64(OFF_TABLE) != 0 {
                return Err(Failure::State(
                    "the data region holds data but no primes-snapshot magic".into(),
                ));
            }
            return Ok((State { count: 1, next: 3 }, true));
        }
        if magic != MAGIC {
            return Err(Failure::State(format!(
                "the data region does not hold a primes-snapshot table (magic {magic:#018x})"
            )));
        }
        let count = data.load_u64(OFF_COUNT);
        let next = data.load_u64(OFF_NEXT);
        let bad = |why: String| Failure::State(format!("damaged state: {why}"));
        if count == 0 || count as usize > CAPACITY {
            return Err(bad(format!("count {count} is outside 1..={CAPACITY}")));
        }
        let last = data.load_u64(OFF_TABLE + (count as usize - 1) * 8);
        if data.load_u64(OFF_TABLE) != 2 {
            return Err(bad("the table does not start with 2".into()));
        }
        if next & 1 == 0 || next <= last {
            return Err(bad(format!(
                "next {next} does not follow the last prime {last}"
            )));
        }
        if count > 1 && data.load_u64(OFF_TABLE + (count as usize - 2) * 8) >= last {
            return Err(bad("the last primes are not increasing".into()));
        }
        Ok((State { count, next }, false))
    }

    fn store(&self, data: Region<'_>) {
        data.store_u64(OFF_COUNT, self.count);
        data.store_u64(OFF_NEXT, self.next);
    }

    /// Sieves the next chunk into the table (past `count`) and advances.
    fn chunk(&mut self, data: Region<'_>, span: u64) {
        let lo = self.next;
        let hi = lo.saturating_add(span).min(lo.saturating_mul(lo));
        // Odd numbers lo, lo+2, ..., < hi.
        let n = ((hi - lo) / 2) as usize;
        let mut composite = vec![false; n];
        for i in 1..self.count as usize {
            let p = data.load_u64(OFF_TABLE + i * 8);
            if p.saturating_mul(p) >= hi {
                break;
            }
            let mut m = (lo.div_ceil(p) * p).max(p * p);
            if m & 1 == 0 {
                m += p;
            }
            while m < hi {
                composite[((m - lo) / 2) as usize] = true;
                m += 2 * p;
            }
        }
        for (i, c) in composite.iter().enumerate() {
            if self.count as usize >= CAPACITY {
                self.next = lo + 2 * i as u64;
                return;
            }
            if !c {
                data.store_u64(OFF_TABLE + self.count as usize * 8, lo + 2 * i as u64);
                self.count += 1;
            }
        }
        self.next = hi;
    }
}

fn print_table(data: Region<'_>, count: u64) -> std::io::Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    for i in 0..count as usize {
        writeln!(out, "{}", data.load_u64(OFF_TABLE + i * 8))?;
    }
    out.flush()
}
