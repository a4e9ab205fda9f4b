//! `counter`: the smallest shm-fd program. Each run increments the
//! little-endian `u64` at offset 0 of the shared memfd and prints it.
//!
//! ```text
//! shm-fd sh -c './counter; ./counter; ./counter'   # prints 1, 2, 3
//! ```

use std::process::ExitCode;

use clap::Parser;

const AFTER_HELP: &str = "\
Takes no arguments: the counter lives in the shared memfd passed by shm-fd
(LISTEN_FDS / LISTEN_FDNAMES), e.g.
  shm-fd sh -c './counter; ./counter; ./counter'   # prints 1, 2, 3

Exit codes:
  0  success
  1  no memfd passed, or it cannot be mapped
  2  bad command line";

/// No options: clap is here for `--help`, `--version` and refusing
/// arguments the program would otherwise ignore.
#[derive(Parser, Debug)]
#[command(version, about = "Increment the counter in the shared memfd and print it", after_help = AFTER_HELP)]
struct Cli {}

fn main() -> ExitCode {
    Cli::parse();
    match run() {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("counter: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<u64, shm_fd::Error> {
    // SAFETY: the first thing the program does after parsing its command
    // line (which opens no file): the fd LISTEN_FDS names was inherited and
    // has no other owner here.
    let shared = unsafe { shm_fd::SharedFd::from_env(shm_fd::DEFAULT_NAME) }?;
    // SAFETY: under shm-fd one program runs on the memfd at a time and the
    // watcher sealed it against shrinking, so nothing else writes the bytes
    // or truncates the file while the map lives.
    let mut map = unsafe { shared.map_mut(8)? };
    let slot: &mut [u8; 8] = (&mut map[..8]).try_into().expect("mapped at least 8 bytes");
    let value = u64::from_le_bytes(*slot).wrapping_add(1);
    *slot = value.to_le_bytes();
    Ok(value)
}
