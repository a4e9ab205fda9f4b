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
//! is checked before use: the table starts with 2, the rest is odd and
//! strictly increasing, `next` is odd, after the last prime and less than
//! 2^31 past it (a chunk spans at most 2^30); anything else is damage
//! (exit 1), never a panic or an endless loop.
//!
//! Order of the stores, so that a stop or crash between any two of them
//! leaves a state the next start repairs (it learns of it from
//! shm-snapshot's `OpenedHeader::interrupted`):
//! - a chunk: the new primes past `count`, then `count`, then `next`. Cut
//!   before `count`: the old state (the extra entries are ignored). Cut
//!   between `count` and `next`: `next` is at or before the last prime;
//!   the sieve was complete before the first append, so every prime below
//!   the chunk's end is in the table and the numbers between the last
//!   prime and the end are composite: `next = last + 2` loses nothing.
//! - the set-up of a fresh region: the first prime, `count`, `next`, then
//!   the magic last. Cut before the magic: the fields are a prefix of the
//!   set-up, which is done again.
//!
//! The original primes-snapshot's positional form is accepted too:
//! `primes-snapshot 1 10000` is `--interval-ms 1 --limit 10000`; a
//! positional given with its named option as well is a usage error.
//!
//! Output, like `primes`: `generated N more primes, total T` on stderr
//! after each chunk (every chunk with `--verbose`, else at most once a
//! second); when the table holds `--limit` primes (or is full) every prime
//! in it is printed to stdout, one per line, and the program exits 0.
//!
//! Exit codes: 0 done; 1 the state in the memfd is damaged or not ours
//! (left untouched); 2 usage; 3 no memfd was passed or it cannot be mapped;
//! 4 printing the table failed (other than a closed pipe, which is 0).

use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::sync::atomic::{Ordering, compiler_fence};
use std::time::{Duration, Instant};

use clap::Parser;
use shm_snapshot::{DATA_OFFSET, HEADER_LEN, OpenedHeader, Publisher, Region};

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
const EXIT_OUTPUT: u8 = 4;
/// How far past the last prime `next` may be: a chunk spans at most 2^30
/// numbers (and prime gaps below 2^64 are under 2000).
const MAX_NEXT_GAP: u64 = 1 << 31;

/// A long-running prime generator committing through shm-snapshot.
#[derive(Parser, Debug)]
#[command(
    name = "primes-snapshot",
    version,
    after_help = "Exit codes: 0 done (table printed); 1 the memfd holds damaged or foreign \
                  state (left untouched); 2 usage; 3 no memfd passed (run under shm-fd) or \
                  it cannot be mapped; 4 printing the table failed."
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
    /// --interval-ms, as the original primes-snapshot takes it
    /// (`primes-snapshot 1 10000`).
    #[arg(value_name = "INTERVAL_MS", conflicts_with = "interval_ms")]
    interval_ms_positional: Option<u64>,
    /// --limit, as the original primes-snapshot takes it.
    #[arg(value_name = "LIMIT", conflicts_with = "limit")]
    limit_positional: Option<u64>,
}

impl Args {
    /// Parses the command line, the original's positional form folded into
    /// the named options.
    fn parse_both_forms() -> Result<Args, clap::Error> {
        let mut args = Args::try_parse()?;
        if let Some(ms) = args.interval_ms_positional.take() {
            args.interval_ms = ms;
        }
        if let Some(n) = args.limit_positional.take() {
            args.limit = Some(n);
        }
        Ok(args)
    }
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
    let args = match Args::parse_both_forms() {
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
            ExitCode::from(EXIT_OUTPUT)
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    // SAFETY: the first thing the program does, before it opens any file:
    // the fd LISTEN_FDS names was inherited and has no other owner here.
    let shared = unsafe { shm_fd::SharedFd::from_env(shm_fd::DEFAULT_NAME) }
        .map_err(|e| Failure::Memfd(e.to_string()))?;
    refuse_foreign(&shared)?;
    let map = shared
        .map_raw((DATA_OFFSET + DATA_LEN) as u64)
        .map_err(|e| Failure::Memfd(e.to_string()))?;
    let region = Region::try_from_mmap(&map).map_err(|e| Failure::Memfd(e.to_string()))?;
    let (mut publisher, opened) =
        Publisher::open(region).map_err(|e| Failure::State(e.to_string()))?;
    let data = publisher
        .data()
        .subregion(0, DATA_LEN)
        .ok_or_else(|| Failure::Memfd("the memfd is smaller than its mapping".into()))?;
    let (mut state, fresh) = State::load(data, &opened)?;
    if fresh {
        // The first prime and the fields, as one update, magic last (see
        // the store order in the crate docs).
        publisher.enter_update();
        data.store_u64(OFF_TABLE, 2);
        state.store(data);
        compiler_fence(Ordering::SeqCst);
        data.store_u64(OFF_MAGIC, MAGIC);
        publisher.commit();
    } else if opened.interrupted {
        // `load` repaired the fields of the half-done update: commit them.
        state.store(data);
        publisher.commit();
    }
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
        state
            .chunk(update.data(), args.span)
            .map_err(|why| Failure::State(format!("damaged state: {why}")))?;
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
/// is not under the shm-snapshot protocol: a first page that is neither a
/// header nor blank, or a blank first page with data after it.
///
/// Only the first page and the memfd's data extents (`SEEK_DATA`) are
/// read: reading a hole of a memfd through a mapping allocates it, and a
/// large empty memfd must stay empty.
fn refuse_foreign(shared: &shm_fd::SharedFd) -> Result<(), Failure> {
    let memfd = |e: &dyn std::fmt::Display| Failure::Memfd(e.to_string());
    let foreign = || Failure::State(shm_snapshot::Error::ForeignData.to_string());
    let len = shared.len().map_err(|e| memfd(&e))?;
    if len == 0 {
        return Ok(());
    }
    let map = shared.map_raw(0).map_err(|e| memfd(&e))?;
    let region = Region::try_from_mmap(&map).map_err(|e| memfd(&e))?;
    if region.len() < HEADER_LEN {
        // Shorter than a page: cheap to read whole.
        return if region.is_zero() {
            Ok(())
        } else {
            Err(foreign())
        };
    }
    let opened = Publisher::check(region).map_err(|e| Failure::State(e.to_string()))?;
    if !opened.created {
        return Ok(()); // a header: `State::load` checks the data region
    }
    // Our own open file description: SEEK_DATA moves its offset.
    let file = shared.reopen().map_err(|e| memfd(&e))?.into_file();
    let extents = shm_snapshot::data_extents(&file, region.len() as u64).map_err(|e| memfd(&e))?;
    for extent in extents {
        // Within the region's length, so both ends fit a usize.
        let (start, end) = (extent.start as usize, extent.end as usize);
        let start = start.max(HEADER_LEN);
        if start >= end {
            continue;
        }
        // Extents are page-aligned; round to words to read whole cells.
        let from = start & !7;
        let to = end.next_multiple_of(8).min(region.len());
        let part = region.subregion(from, to - from).ok_or_else(foreign)?;
        if !part.is_zero() {
            return Err(foreign());
        }
    }
    Ok(())
}

/// The checked progress fields.
struct State {
    count: u64,
    next: u64,
}

impl State {
    /// Reads and checks the state; `true` with the start state when the
    /// data region is blank or holds a set-up cut short (nothing is
    /// written here). After an interrupted update (`opened.interrupted`)
    /// the fields are repaired (see the store order in the crate docs).
    /// Anything that does not add up is an error, never a panic.
    fn load(data: Region<'_>, opened: &OpenedHeader) -> Result<(State, bool), Failure> {
        let magic = data.load_u64(OFF_MAGIC);
        let count = data.load_u64(OFF_COUNT);
        let next = data.load_u64(OFF_NEXT);
        let first = data.load_u64(OFF_TABLE);
        let start = (State { count: 1, next: 3 }, true);
        // What the set-up writes before its magic, each store done or not.
        let setup_prefix =
            matches!(count, 0 | 1) && matches!(next, 0 | 3) && matches!(first, 0 | 2);
        if magic == 0 {
            if count == 0 && next == 0 && (opened.created || first == 0) {
                return Ok(start);
            }
            if opened.interrupted && setup_prefix {
                return Ok(start);
            }
            return Err(Failure::State(
                "the data region holds data but no primes-snapshot magic".into(),
            ));
        }
        if magic != MAGIC {
            return Err(Failure::State(format!(
                "the data region does not hold a primes-snapshot table (magic {magic:#018x})"
            )));
        }
        let bad = |why: String| Failure::State(format!("damaged state: {why}"));
        // Earlier builds wrote the magic first: a set-up they left cut
        // short has the magic and a prefix of the rest.
        if opened.interrupted && setup_prefix && (count == 0 || next == 0) {
            return Ok(start);
        }
        if count == 0 || count as usize > CAPACITY {
            return Err(bad(format!("count {count} is outside 1..={CAPACITY}")));
        }
        if first != 2 {
            return Err(bad("the table does not start with 2".into()));
        }
        // Every prime the sieve will use: odd and strictly increasing
        // (one pass, ~10 ms for a full table).
        let mut last = 2;
        for i in 1..count as usize {
            let p = data.load_u64(OFF_TABLE + i * 8);
            if p & 1 == 0 || p <= last {
                return Err(bad(format!(
                    "table entry {i} is {p}, not an odd number above {last}"
                )));
            }
            last = p;
        }
        let mut next = next;
        if opened.interrupted && next <= last {
            // Cut between the stores of `count` and `next`: the numbers
            // between the last prime and the chunk's end are composite.
            next = if last == 2 { 3 } else { last + 2 };
        }
        if next & 1 == 0 || next <= last || next - last >= MAX_NEXT_GAP {
            return Err(bad(format!(
                "next {next} does not follow the last prime {last}"
            )));
        }
        Ok((State { count, next }, false))
    }

    /// Stores the fields, `count` first (see the store order in the crate
    /// docs); the compiler fences keep the stores in that order.
    fn store(&self, data: Region<'_>) {
        compiler_fence(Ordering::SeqCst);
        data.store_u64(OFF_COUNT, self.count);
        compiler_fence(Ordering::SeqCst);
        data.store_u64(OFF_NEXT, self.next);
    }

    /// Sieves the next chunk into the table (past `count`) and advances.
    /// Arithmetic is checked: a state that would overflow is damage.
    fn chunk(&mut self, data: Region<'_>, span: u64) -> Result<(), String> {
        let lo = self.next;
        let hi = lo
            .checked_add(span)
            .ok_or_else(|| format!("next {lo} is too close to 2^64"))?
            .min(lo.saturating_mul(lo));
        if hi <= lo {
            return Err(format!("next {lo} leaves nothing to sieve"));
        }
        // Odd numbers lo, lo+2, ..., < hi.
        let n = ((hi - lo) / 2) as usize;
        let mut composite = vec![false; n];
        for i in 1..self.count as usize {
            let p = data.load_u64(OFF_TABLE + i * 8);
            if p < 3 {
                return Err(format!("table entry {i} is {p}"));
            }
            if p.saturating_mul(p) >= hi {
                break;
            }
            // p² < hi, so p < 2^32 and these cannot overflow; checked all
            // the same, as the table lives in shared memory.
            let overflow = || format!("sieving {lo}..{hi} by {p} overflows");
            let mut m = lo
                .div_ceil(p)
                .checked_mul(p)
                .ok_or_else(overflow)?
                .max(p * p);
            if m & 1 == 0 {
                m = m.checked_add(p).ok_or_else(overflow)?;
            }
            while m < hi {
                composite[((m - lo) / 2) as usize] = true;
                m = match m.checked_add(2 * p) {
                    Some(m) => m,
                    None => break,
                };
            }
        }
        // Appends only after the sieve is complete (see the store order).
        for (i, c) in composite.iter().enumerate() {
            if self.count as usize >= CAPACITY {
                self.next = lo + 2 * i as u64;
                return Ok(());
            }
            if !c {
                data.store_u64(OFF_TABLE + self.count as usize * 8, lo + 2 * i as u64);
                self.count += 1;
            }
        }
        self.next = hi;
        Ok(())
    }
}

fn print_table(data: Region<'_>, count: u64) -> std::io::Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    for i in 0..count as usize {
        writeln!(out, "{}", data.load_u64(OFF_TABLE + i * 8))?;
    }
    out.flush()
}
