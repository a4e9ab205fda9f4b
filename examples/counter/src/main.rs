//! `counter`: the smallest shm-fd program. Each run increments the
//! little-endian `u64` at offset 0 of the shared memfd and prints it.
//!
//! ```text
//! shm-fd sh -c './counter; ./counter; ./counter'   # prints 1, 2, 3
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
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
    // SAFETY: the first thing the program does, before it opens any file:
    // the fd LISTEN_FDS names was inherited and has no other owner here.
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
