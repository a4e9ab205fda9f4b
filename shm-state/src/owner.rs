//! The lock word: which live process holds a state, in which memory.
//!
//! A holder is recorded as its pid, its start time (field 22 of
//! `/proc/PID/stat`, clock ticks since boot) and the boot id, so that a
//! reused pid or a state restored from a snapshot after a reboot is not
//! mistaken for a live holder; and with the device and inode of the memory
//! it holds (the memfd's or file's), so that the same bytes copied into
//! other memory (a second memfd, a restored snapshot, a heap buffer) are
//! seen as unheld. Within one process, a random nonce per open handle tells
//! a live handle from one that was leaked or copied.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use crate::lock::LockWords;
use crate::mem::Identity;

/// True when the lock words name a live holder of the memory `ours`.
///
/// A settled lock (claiming bit clear) is held when it was taken in this
/// memory (device and inode) on this boot, and its holder is alive with the
/// recorded start time (in this process: with a live nonce). A lock being
/// claimed (bit set: its other words are being written) is held when the
/// claimer is alive and maps this memory (`/proc/PID/maps`; when that
/// cannot be read, it counts as held); no other process can be claiming a
/// heap buffer of ours.
pub(crate) fn holds(lock: &LockWords, ours: Identity, claiming: bool) -> bool {
    let pid = lock.pid();
    if pid == 0 {
        return false;
    }
    if claiming {
        if !pid_alive(pid) {
            return false;
        }
        if pid == std::process::id() {
            return true;
        }
        if ours.is_private() {
            return false;
        }
        return maps_memory(pid, ours).unwrap_or(true);
    }
    if lock.boot != boot_id() || lock.dev != ours.dev || lock.ino != ours.ino {
        return false;
    }
    holder_alive(pid, lock.start, lock.nonce)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`) as two words, read
/// once; zeros where it cannot be read.
pub(crate) fn boot_id() -> [u64; 2] {
    static BOOT: OnceLock<[u64; 2]> = OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|text| parse_boot_id(&text))
            .unwrap_or([0, 0])
    })
}

/// Parses a boot id (`8-4-4-4-12` hex digits) into two words.
fn parse_boot_id(text: &str) -> Option<[u64; 2]> {
    let hex: String = text.trim().chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let v = u128::from_str_radix(&hex, 16).ok()?;
    Some([v as u64, (v >> 64) as u64])
}

/// Whether process `pid` maps the memory `ours` (a line of
/// `/proc/PID/maps` with its device and inode); `None` when the maps
/// cannot be read (another user's process, no /proc).
fn maps_memory(pid: u32, ours: Identity) -> Option<bool> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let (major, minor) = (
        u64::from(libc::major(ours.dev)),
        u64::from(libc::minor(ours.dev)),
    );
    Some(maps.lines().any(|line| {
        // address perms offset dev inode [path]
        let mut f = line.split_ascii_whitespace();
        let (Some(dev), Some(ino)) = (f.nth(3), f.next()) else {
            return false;
        };
        let Some((maj, min)) = dev.split_once(':') else {
            return false;
        };
        u64::from_str_radix(maj, 16) == Ok(major)
            && u64::from_str_radix(min, 16) == Ok(minor)
            && ino.parse::<u64>() == Ok(ours.ino)
    }))
}

static LIVE_NONCES: Mutex<Option<HashSet<u64>>> = Mutex::new(None);

/// The start time of process `pid` in clock ticks since boot, if it exists
/// and is not a zombie.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = shm_fd::process::ProcStat::read(i32::try_from(pid).ok()?)?;
    (!stat.has_ended()).then_some(stat.start_time)
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
    fn boot_ids_parse_and_this_boot_has_one() {
        assert_eq!(
            parse_boot_id("0123abcd-0000-0000-0000-00000000ffff\n"),
            Some([0x0000_0000_0000_ffff, 0x0123_abcd_0000_0000])
        );
        assert_eq!(parse_boot_id("not a boot id"), None);
        if std::path::Path::new("/proc/sys/kernel/random/boot_id").exists() {
            assert_ne!(boot_id(), [0, 0]);
        }
    }

    #[test]
    fn a_claimer_counts_only_when_it_maps_the_memory() {
        use std::os::fd::AsFd;
        let fd = shm_fd::SharedFd::create("owner-maps", Default::default()).unwrap();
        let st = nix::sys::stat::fstat(fd.as_fd()).unwrap();
        let ours = Identity {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let me = std::process::id();
        assert_eq!(maps_memory(me, ours), Some(false));
        let map = fd.map_raw(4096).unwrap();
        assert_eq!(maps_memory(me, ours), Some(true));
        drop(map);
        // Another process that does not map it: not its claimer.
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let lock = LockWords {
            word: u64::from(child.id()) | crate::format::LOCK_CLAIMING,
            start: 0,
            nonce: 0,
            boot: boot_id(),
            dev: ours.dev,
            ino: ours.ino,
        };
        assert!(!holds(&lock, ours, true));
        // Settled, with this memory's identity and its real start time: held.
        let settled = LockWords {
            word: u64::from(child.id()),
            start: start_time(child.id()).unwrap(),
            ..lock
        };
        assert!(holds(&settled, ours, false));
        // The same words in other memory, or from another boot: not held.
        let other = Identity {
            ino: ours.ino + 1,
            ..ours
        };
        assert!(!holds(&settled, other, false));
        let other_boot = LockWords {
            boot: [settled.boot[0] ^ 1, settled.boot[1]],
            ..settled
        };
        assert!(!holds(&other_boot, ours, false));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!holds(&settled, ours, false));
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
