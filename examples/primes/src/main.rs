//! `primes`: fills a table of primes in the shared memfd, at most 1000 more
//! per run, so it takes many runs (e.g. under `watch`) to finish.
//!
//! The table is 125,000 little-endian `u64` slots (1,000,000 bytes); slot
//! `i` holds the `i`-th prime, `0` marks the end. Each run prints
//! `generated N more primes, total T` to stderr; once the table is full it
//! prints every prime to stdout, one per line.
//!
//! ```text
//! shm-fd watch -n 0.1 ./target/release/primes
//! ```

use std::io::{BufWriter, Write};
use std::process::ExitCode;

use clap::Parser;

const AFTER_HELP: &str = "\
Takes no arguments: the table lives in the shared memfd passed by shm-fd
(LISTEN_FDS / LISTEN_FDNAMES), e.g.
  shm-fd watch -n 0.1 ./target/release/primes

Exit codes:
  0  success
  1  no memfd passed, the memfd does not hold a primes table, or a
     system error
  2  bad command line";

/// No options: clap is here for `--help`, `--version` and refusing
/// arguments the program would otherwise ignore.
#[derive(Parser, Debug)]
#[command(version, about = "Fill a table of primes in the shared memfd, 1000 more per run", after_help = AFTER_HELP)]
struct Cli {}

const TABLE_BYTES: usize = 1_000_000;
const SLOTS: usize = TABLE_BYTES / 8;
const PER_RUN: usize = 1000;

fn main() -> ExitCode {
    Cli::parse();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("primes: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: the first thing the program does after parsing its command
    // line (which opens no file): the fd LISTEN_FDS names was inherited and
    // has no other owner here.
    let shared = unsafe { shm_fd::SharedFd::from_env(shm_fd::DEFAULT_NAME) }?;
    // SAFETY: under shm-fd one program runs on the memfd at a time and the
    // watcher sealed it against shrinking, so nothing else writes the bytes
    // or truncates the file while the map lives.
    let mut map = unsafe { shared.map_mut(TABLE_BYTES as u64)? };
    let table: &mut [u8] = &mut map[..TABLE_BYTES];

    let get = |t: &[u8], i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap());
    let mut len = (0..SLOTS).take_while(|&i| get(table, i) != 0).count();
    // A table someone else wrote must still be a table of primes in order.
    if len == 1 || (len >= 2 && (get(table, 0) != 2 || get(table, 1) != 3)) {
        return Err("the shared memory does not hold a primes table".into());
    }
    if len == 0 {
        table[..8].copy_from_slice(&2u64.to_le_bytes());
        table[8..16].copy_from_slice(&3u64.to_le_bytes());
        len = 2;
    }

    let target = (len + PER_RUN).min(SLOTS);
    let before = len;
    let mut candidate = get(table, len - 1) + 2;
    while len < target {
        let is_prime = (1..len)
            .map(|i| get(table, i))
            .take_while(|p| p * p <= candidate)
            .all(|p| candidate % p != 0);
        if is_prime {
            table[len * 8..len * 8 + 8].copy_from_slice(&candidate.to_le_bytes());
            len += 1;
        }
        candidate += 2;
    }
    eprintln!("generated {} more primes, total {len}", len - before);

    if len == SLOTS {
        let mut out = BufWriter::new(std::io::stdout().lock());
        for i in 0..SLOTS {
            writeln!(out, "{}", get(table, i))?;
        }
        out.flush()?;
    }
    Ok(())
}
