//! Sleeping until the program commits, and the program's wake-up: Linux
//! futexes on the header's wake word ([`crate::OFF_WAKE`]), a 4-byte
//! counter the program bumps at a commit that finds a snapshotter waiting.
//! Shared (not `FUTEX_PRIVATE`), so that they work across processes mapping
//! the same memfd. The wake word is accessed only as a 4-byte atomic (the
//! size the kernel reads), never as part of a whole 8-byte word.
//!
//! Correctness never depends on a wake arriving: every wait has a timeout
//! and the caller re-reads the sequence word afterwards.

use std::time::Duration;

use crate::header::Header;

/// The wake word's value, to wait on (see [`wait`]).
#[cfg(not(loom))]
pub(crate) fn wake_value(header: Header<'_>) -> u32 {
    header.wake().load(std::sync::atomic::Ordering::Acquire)
}

/// Sleeps until the wake word is no longer `expected` (the program bumped
/// it), a wake, a signal, or `timeout`, whichever comes first.
#[cfg(not(loom))]
pub(crate) fn wait(header: Header<'_>, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let word = header.wake();
    // SAFETY: the address is a live, 4-aligned `AtomicU32` (the wake word,
    // only ever accessed 4 bytes at a time); FUTEX_WAIT only reads it
    // atomically and compares it with `expected`; `ts` outlives the call.
    // Every outcome (woken, EAGAIN, ETIMEDOUT, EINTR) means "look again",
    // so the result is not needed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Bumps the wake word and wakes every snapshotter sleeping on it; also
/// wakes snapshotters built before the wake word existed, which sleep on
/// the sequence word's low half (a wake reads no memory).
#[cfg(not(loom))]
pub(crate) fn wake(header: Header<'_>) {
    let word = header.wake();
    word.fetch_add(1, std::sync::atomic::Ordering::Release);
    for addr in [word.as_ptr(), header.seq().as_ptr().cast::<u32>()] {
        // SAFETY: FUTEX_WAKE only uses the address as a key (it does not
        // dereference memory of ours beyond looking it up); both words
        // are live.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                addr,
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0u32,
            );
        }
    }
}

/// Under loom, there is no wake word to read.
#[cfg(loom)]
pub(crate) fn wake_value(_header: Header<'_>) -> u32 {
    0
}

/// Under loom, waiting is letting the other threads run.
#[cfg(loom)]
pub(crate) fn wait(_header: Header<'_>, _expected: u32, _timeout: Duration) {
    loom::thread::yield_now();
}

/// Under loom, a wake is not needed: waits only yield.
#[cfg(loom)]
pub(crate) fn wake(_header: Header<'_>) {}
