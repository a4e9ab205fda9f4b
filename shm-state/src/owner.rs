//! Who holds a state, in which memory: the judgement behind the lock.
//!
//! A holder is recorded as its pid, its start time (field 22 of
//! `/proc/PID/stat`, clock ticks since boot) and the boot id, so that a
//! reused pid or a state restored from a snapshot after a reboot is not
//! mistaken for a live holder; and with the device and inode of the memory
//! it holds (the memfd's or file's), so that the same bytes copied into
//! other memory (a second memfd, a restored snapshot, a heap buffer) are
//! seen as unheld. The words carry a 16-bit check (in the nonce word's top
//! bits), so that damage to them never makes a live holder look absent.
//!
//! Within this process the lock words are not needed at all: a registry
//! of this process's handles (open, or claiming) says which memory it
//! holds.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::lock::LockWords;
use crate::mem::Identity;

/// This process's handles, open or claiming: nonce -> the memory's identity.
static HANDLES: Mutex<Option<HashMap<u64, Identity>>> = Mutex::new(None);

/// Bits of the nonce word that hold the nonce; the rest hold the check.
const NONCE_BITS: u32 = 48;
const NONCE_MASK: u64 = (1 << NONCE_BITS) - 1;
const CHECK_SALT: u64 = 0xC3A5;

/// The 16-bit check over every word that names a settled holder: the XOR
/// of the pid, start time, nonce, boot id, device and inode, folded to 16
/// bits, and a salt. One flipped bit in any of them changes one bit of the
/// XOR, so of the fold.
fn identity_check(w: &LockWords) -> u64 {
    let x = u64::from(w.pid())
        ^ w.start
        ^ (w.nonce & NONCE_MASK)
        ^ w.boot[0]
        ^ w.boot[1]
        ^ w.dev
        ^ w.ino;
    (x ^ (x >> 16) ^ (x >> 32) ^ (x >> 48) ^ CHECK_SALT) & 0xFFFF
}

/// `w` with its nonce word carrying the check (`w.word` holds the pid it
/// will be settled with).
pub(crate) fn sealed(mut w: LockWords) -> LockWords {
    w.nonce = (w.nonce & NONCE_MASK) | (identity_check(&w) << NONCE_BITS);
    w
}

fn seal_holds(w: &LockWords) -> bool {
    w.nonce >> NONCE_BITS == identity_check(w)
}

/// True when the lock words name a live holder of the memory `ours`, for
/// an opener whose own handle is `my_nonce`.
///
/// - A heap buffer: no other process can reach it; held when another
///   handle of this process is on it.
/// - The claiming bit (the other words are being written): for this
///   process's own pid, held when another handle of this process (open, or
///   claiming right now) is on this memory; for another pid, when it is a
///   live process (not a thread) that maps this memory (`/proc/PID/maps`;
///   when that cannot be read, it counts as held).
/// - Words that fail their seal (damage, any of them, the pid included):
///   held when another handle of this process or another live process maps
///   this memory.
/// - Otherwise, this process's own pid: another handle of this process is
///   on this memory; another pid: the lock was taken in this memory
///   (device and inode) on this boot, and the pid is a live process with
///   the recorded start time.
pub(crate) fn holds(lock: &LockWords, ours: Identity, claiming: bool, my_nonce: u64) -> bool {
    holds_on_boot(lock, ours, claiming, my_nonce, boot_id())
}

/// [`holds`] for words that record this boot as `boot` (a peer entry
/// keeps the boot id's two words folded into one: see `shared::peers`).
pub(crate) fn holds_on_boot(
    lock: &LockWords,
    ours: Identity,
    claiming: bool,
    my_nonce: u64,
    boot: [u64; 2],
) -> bool {
    let pid = lock.pid();
    if pid == 0 {
        return false;
    }
    let mine = pid == std::process::id();
    if ours.is_private() {
        return another_handle_on(ours, my_nonce);
    }
    if claiming {
        return if mine {
            another_handle_on(ours, my_nonce)
        } else {
            is_process(pid) && maps_memory(pid, ours).unwrap_or(true)
        };
    }
    if !seal_holds(lock) {
        return another_handle_on(ours, my_nonce) || mapped_by_another_process(ours);
    }
    if mine {
        return another_handle_on(ours, my_nonce);
    }
    if lock.boot != boot || lock.dev != ours.dev || lock.ino != ours.ino {
        return false;
    }
    holder_alive(pid, lock.start)
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

/// Whether process `pid` maps the memory `ours`: a line of
/// `/proc/PID/maps` with its inode. The device is not compared: on some
/// filesystems (btrfs subvolumes) `/proc/PID/maps` shows another device
/// than `fstat`; a process mapping another file with the same inode number
/// counts too, which errs on the side of "held". `None` when the maps
/// cannot be read (another user's process, no /proc).
fn maps_memory(pid: u32, ours: Identity) -> Option<bool> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    Some(maps.lines().any(|line| {
        // address perms offset dev inode [path]
        line.split_ascii_whitespace()
            .nth(4)
            .is_some_and(|ino| ino.parse::<u64>() == Ok(ours.ino))
    }))
}

/// Whether any live process other than this one maps the memory `ours`
/// (a scan of every `/proc/PID/maps`: only for damaged lock words).
fn mapped_by_another_process(ours: Identity) -> bool {
    let me = std::process::id();
    shm_fd::process::processes()
        .iter()
        .filter_map(|p| u32::try_from(p.pid).ok())
        .filter(|&pid| pid != me && !is_ended(pid))
        .any(|pid| maps_memory(pid, ours).unwrap_or(false))
}

fn is_ended(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(shm_fd::process::ProcStat::read)
        .is_none_or(|p| p.has_ended())
}

/// Whether `pid` is a live process (a thread group's leader, not one of its
/// other threads, whose ids also have `/proc` entries), not a zombie.
/// Without /proc, whether the kernel knows the pid.
fn is_process(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        if std::path::Path::new("/proc/self/status").exists() {
            return false;
        }
        return pid_exists(pid);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    field("Tgid:").and_then(|t| t.parse::<u32>().ok()) == Some(pid)
        && !field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
}

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

/// True when another process `pid` is alive with the start time `start`
/// (0: unknown, any live process with the pid).
pub(crate) fn is_alive(pid: u32, start: u64) -> bool {
    holder_alive(pid, start)
}

fn holder_alive(pid: u32, start: u64) -> bool {
    match start_time(pid) {
        Some(now) => is_process(pid) && (start == 0 || now == start),
        // No /proc entry: gone. Without /proc at all, ask the kernel.
        None if std::path::Path::new("/proc/self/stat").exists() => false,
        None => pid_exists(pid),
    }
}

pub(crate) fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Registers a new handle of this process on the memory `identity` (before
/// it claims the lock); returns its nonce (48 bits, non-zero).
pub(crate) fn register_handle(identity: Identity) -> u64 {
    let mut guard = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    let handles = guard.get_or_insert_with(HashMap::new);
    loop {
        let n = random_u64() & NONCE_MASK;
        if n != 0 && !handles.contains_key(&n) {
            handles.insert(n, identity);
            return n;
        }
    }
}

/// Forgets a handle (closed, or its open failed).
pub(crate) fn unregister_handle(nonce: u64) {
    let mut guard = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handles) = guard.as_mut() {
        handles.remove(&nonce);
    }
}

/// Whether `nonce` (the low 48 bits of a nonce word) is a handle of this
/// process on `ours`, open or claiming.
pub(crate) fn is_handle_on(nonce: u64, ours: Identity) -> bool {
    let guard = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .as_ref()
        .and_then(|h| h.get(&(nonce & NONCE_MASK)))
        .is_some_and(|&id| id == ours)
}

/// Whether a handle of this process other than `except` is on `ours`.
pub(crate) fn another_handle_on(ours: Identity, except: u64) -> bool {
    let guard = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .as_ref()
        .is_some_and(|h| h.iter().any(|(&n, &id)| n != except && id == ours))
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

    fn identity_of(fd: &shm_fd::SharedFd) -> Identity {
        use std::os::fd::AsFd;
        let st = nix::sys::stat::fstat(fd.as_fd()).unwrap();
        Identity {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }

    #[test]
    fn own_handles_are_known_by_the_memory_they_hold() {
        assert!(own_start_time() > 0);
        let fd = shm_fd::SharedFd::create("owner-own", Default::default()).unwrap();
        let ours = identity_of(&fd);
        let lock = LockWords {
            word: u64::from(std::process::id()),
            start: own_start_time(),
            nonce: 0,
            boot: boot_id(),
            dev: ours.dev,
            ino: ours.ino,
        };
        let me = register_handle(ours);
        assert!(!holds(&lock, ours, false, me), "only my own handle");
        let other = register_handle(ours);
        assert!(holds(&lock, ours, false, me));
        assert!(holds(&lock, ours, true, me), "claiming too");
        let copy = Identity {
            ino: ours.ino + 1,
            ..ours
        };
        assert!(!holds(&lock, copy, false, me), "other memory");
        unregister_handle(other);
        assert!(!holds(&lock, ours, true, me));
        unregister_handle(me);
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
    fn another_process_holds_only_what_it_maps_on_this_boot() {
        let fd = shm_fd::SharedFd::create("owner-maps", Default::default()).unwrap();
        let ours = identity_of(&fd);
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
        let claiming = LockWords {
            word: u64::from(child.id()) | crate::format::LOCK_CLAIMING,
            start: 0,
            nonce: 0,
            boot: boot_id(),
            dev: ours.dev,
            ino: ours.ino,
        };
        assert!(!holds(&claiming, ours, true, 0));
        // Settled, sealed, with this memory's identity and its real start
        // time: held.
        let settled = sealed(LockWords {
            word: u64::from(child.id()),
            start: start_time(child.id()).unwrap(),
            nonce: 12345,
            ..claiming
        });
        assert!(holds(&settled, ours, false, 0));
        // The same words in other memory, from another boot, or with a
        // start time the pid does not have: not held.
        let other = Identity {
            ino: ours.ino + 1,
            ..ours
        };
        assert!(!holds(&settled, other, false, 0));
        let other_boot = sealed(LockWords {
            boot: [settled.boot[0] ^ 1, settled.boot[1]],
            ..settled
        });
        assert!(!holds(&other_boot, ours, false, 0));
        let reused = sealed(LockWords {
            start: settled.start + 12345,
            ..settled
        });
        assert!(!holds(&reused, ours, false, 0));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!holds(&settled, ours, false, 0));
    }

    /// One flipped bit of a live holder's words never makes it look absent:
    /// words that fail their check are judged by who maps the memory.
    #[test]
    fn damaged_words_of_a_live_holder_still_hold() {
        use std::os::fd::AsRawFd;
        let fd = shm_fd::SharedFd::create("owner-damage", Default::default()).unwrap();
        let ours = identity_of(&fd);
        // A child that maps the memfd (through its inherited fd).
        // A child that maps the memfd, opened through this process's fd
        // (no fd is inherited: other tests start children meanwhile).
        fd.grow_to(4096).unwrap();
        let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg("import mmap,sys,time\nf=open(sys.argv[1],'r+b')\nm=mmap.mmap(f.fileno(),4096)\ntime.sleep(30)")
            .arg(&path)
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = std::time::Instant::now();
        while maps_memory(pid, ours) != Some(true) {
            if started.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the python3 child never mapped the memfd (is python3 installed?)");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let live = sealed(LockWords {
            word: u64::from(pid),
            start: start_time(pid).unwrap(),
            nonce: 777,
            boot: boot_id(),
            dev: ours.dev,
            ino: ours.ino,
        });
        assert!(holds(&live, ours, false, 0));
        for (name, flip) in [
            (
                "pid, to this process's own",
                LockWords {
                    word: u64::from(std::process::id()),
                    ..live
                },
            ),
            (
                "pid",
                LockWords {
                    word: live.word ^ 4,
                    ..live
                },
            ),
            (
                "start",
                LockWords {
                    start: live.start ^ 1,
                    ..live
                },
            ),
            (
                "boot",
                LockWords {
                    boot: [live.boot[0] ^ 8, live.boot[1]],
                    ..live
                },
            ),
            (
                "dev",
                LockWords {
                    dev: live.dev ^ 1,
                    ..live
                },
            ),
            (
                "ino",
                LockWords {
                    ino: live.ino ^ 1,
                    ..live
                },
            ),
            (
                "nonce",
                LockWords {
                    nonce: live.nonce ^ 1,
                    ..live
                },
            ),
            (
                "check",
                LockWords {
                    nonce: live.nonce ^ (1 << 60),
                    ..live
                },
            ),
        ] {
            assert!(holds(&flip, ours, false, 0), "a flipped {name} bit");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let flipped = LockWords {
            ino: live.ino ^ 1,
            ..live
        };
        assert!(!holds(&flipped, ours, false, 0), "nobody maps it now");
    }
}
