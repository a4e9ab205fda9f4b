//! `orig-api-counter`: the counter of `examples/counter`, written against
//! the original shm-fd's library (crates.io `shm-fd` 0.5, renamed
//! `shm_fd_orig`) the way the original's examples use it: `from_env`,
//! `into_file`, `set_len` with the error ignored, a map of the whole file.
//! The bridge tests run it under our `shm-fd` to check that a program built
//! for the original keeps its state with ours.
//!
//! Each run increments the little-endian `u64` at offset 0 (the same word
//! as `counter`, so the two can share one memfd) and prints it. Exit 1 with
//! a line on stderr when no memfd is found.

use std::os::fd::AsRawFd;
use std::process::ExitCode;

/// The size the program asks for, as the original's `primes` asks for its
/// table: `set_len` unconditionally, its error ignored.
const LEN: u64 = 4096;

fn main() -> ExitCode {
    // SAFETY: first thing in main: the fd the LISTEN_* variables name was
    // inherited and nothing else in this process owns it.
    let Some(shared) = (unsafe { shm_fd_orig::SharedFd::from_env() }) else {
        eprintln!("orig-api-counter: no memfd named SHM_SHARED_FD was passed");
        return ExitCode::FAILURE;
    };
    let file = match shared.into_file() {
        Ok(file) => file,
        Err(e) => {
            eprintln!("orig-api-counter: the passed fd is not a memfd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = file.set_len(LEN);
    // SAFETY: under a watcher this program is the memfd's one writer while
    // it runs, and the memfd is never shrunk below LEN (the original only
    // grows it; ours seals it against shrinking).
    let mut map = match unsafe { memmap2::MmapMut::map_mut(file.as_raw_fd()) } {
        Ok(map) if map.len() >= 8 => map,
        Ok(map) => {
            eprintln!("orig-api-counter: the memfd has only {} bytes", map.len());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("orig-api-counter: cannot map the memfd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let slot: &mut [u8; 8] = (&mut map[..8]).try_into().expect("at least 8 bytes");
    let value = u64::from_le_bytes(*slot).wrapping_add(1);
    *slot = value.to_le_bytes();
    println!("{value}");
    ExitCode::SUCCESS
}
