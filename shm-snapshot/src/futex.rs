//! Sleeping on the sequence word until the program commits, and the
//! program's wake-up: Linux futexes on the word's low 32 bits (the first
//! four bytes, little-endian), shared (not `FUTEX_PRIVATE`) so that they
//! work across processes mapping the same memfd.
//!
//! Correctness never depends on a wake arriving: every wait has a timeout
//! and the caller re-reads the word afterwards.

use std::time::Duration;

use crate::sync::AtomicU64;

/// Sleeps until `word`'s low half is no longer `expected`, a wake, a
/// signal, or `timeout`, whichever comes first.
#[cfg(not(loom))]
pub(crate) fn wait(word: &AtomicU64, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the address is the first 4 bytes of a live, 4-aligned atomic
    // word (little-endian: its low half); FUTEX_WAIT only reads it
    // atomically and compares it with `expected`; `ts` outlives the call.
    // Every outcome (woken, EAGAIN, ETIMEDOUT, EINTR) means "look again",
    // so the result is not needed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr().cast::<u32>(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every snapshotter sleeping on `word`.
#[cfg(not(loom))]
pub(crate) fn wake(word: &AtomicU64) {
    // SAFETY: FUTEX_WAKE only uses the address as a key (it does not
    // dereference memory of ours beyond looking it up); the word is live.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr().cast::<u32>(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Under loom, waiting is letting the other threads run.
#[cfg(loom)]
pub(crate) fn wait(_word: &AtomicU64, _expected: u32, _timeout: Duration) {
    loom::thread::yield_now();
}

/// Under loom, a wake is not needed: waits only yield.
#[cfg(loom)]
pub(crate) fn wake(_word: &AtomicU64) {}
