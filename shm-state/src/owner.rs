//! The lock word: which live process holds a state.
//!
//! A holder is recorded as its pid and its start time (field 22 of
//! `/proc/PID/stat`, clock ticks since boot), so that a reused pid or a
//! state restored from a snapshot after a reboot is not mistaken for a live
//! holder. Within one process, a random nonce per open handle tells a live
//! handle from one that was leaked or copied.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

static LIVE_NONCES: Mutex<Option<HashSet<u64>>> = Mutex::new(None);

/// The start time of process `pid` in clock ticks since boot, if it exists
/// and is not a zombie.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3 (state); field 22 is 19 further on.
    fields.nth(18)?.parse().ok()
}

/// This process's start time (0 if /proc is unavailable), read once.
pub(crate) fn own_start_time() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    *START.get_or_init(|| start_time(std::process::id()).unwrap_or(0))
}

/// True when the holder recorded as `(pid, start)` / `nonce` is alive.
pub(crate) fn holder_alive(pid: u32, start: u64, nonce: u64) -> bool {
    if pid == 0 {
        return false;
    }
    if pid == std::process::id() {
        return nonce_live(nonce);
    }
    match start_time(pid) {
        Some(now) => start == 0 || now == start,
        // No /proc entry: gone. Without /proc at all, ask the kernel.
        None if std::path::Path::new("/proc/self/stat").exists() => false,
        None => pid_exists(pid),
    }
}

/// True when a process `pid` exists and is not a zombie, whatever its start
/// time: for a lock word caught between its claim and its identity stores
/// (this process's own pid counts as alive: another thread is claiming).
pub(crate) fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    if pid == std::process::id() {
        return true;
    }
    match start_time(pid) {
        Some(_) => true,
        None if std::path::Path::new("/proc/self/stat").exists() => false,
        None => pid_exists(pid),
    }
}

fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A fresh nonce, registered as live in this process.
pub(crate) fn register_nonce() -> u64 {
    let mut guard = LIVE_NONCES.lock().unwrap_or_else(|e| e.into_inner());
    let set = guard.get_or_insert_with(HashSet::new);
    loop {
        let n = random_u64();
        if n != 0 && set.insert(n) {
            return n;
        }
    }
}

pub(crate) fn unregister_nonce(nonce: u64) {
    let mut guard = LIVE_NONCES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(set) = guard.as_mut() {
        set.remove(&nonce);
    }
}

fn nonce_live(nonce: u64) -> bool {
    let guard = LIVE_NONCES.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().is_some_and(|s| s.contains(&nonce))
}

/// A random 64-bit number from std's randomly keyed hasher (no extra crate).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        assert!(own_start_time() > 0);
        assert!(start_time(std::process::id()).is_some());
        let n = register_nonce();
        assert!(holder_alive(std::process::id(), own_start_time(), n));
        unregister_nonce(n);
        assert!(!holder_alive(std::process::id(), own_start_time(), n));
    }

    #[test]
    fn a_reused_pid_is_not_the_holder() {
        // pid 1 exists in every namespace, but not with this start time.
        let start = start_time(1).unwrap_or(0);
        if start != 0 {
            assert!(!holder_alive(1, start + 12345, 7));
            assert!(holder_alive(1, start, 7));
        }
        assert!(!holder_alive(0, 0, 0));
    }
}
