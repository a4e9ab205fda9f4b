//! The kernel's side of sharing: futex waits and wakes on words of the
//! shared header page, and the robust list that makes the kernel release
//! the writer lock of a thread that dies holding it.
//!
//! All of this module's `unsafe` is here: two syscalls and the robust-list
//! head, each argued below.
//!
//! **The robust list** (`set_robust_list(2)`,
//! `Documentation/locking/robust-futexes.rst` in the kernel): when a thread
//! exits, for any reason, SIGKILL included, the kernel walks the list its
//! thread registered and, for every entry whose futex word (at `entry +
//! futex_offset`) holds the exiting thread's id in bits 0..30, sets the word
//! to `OWNER_DIED | (word & WAITERS)` and wakes one waiter. glibc registers
//! a list of its own for every thread (for robust pthread mutexes), so the
//! list here belongs to a thread of our own ([`Robust`]), which does nothing
//! but sleep: that thread's id is what the writer lock records, and its
//! exit (the process dying, or the handle closing) is what the kernel
//! watches. The list's one entry lives in that thread's own memory, with
//! `futex_offset` pointing from it to the writer lock in this process's
//! mapping of the header page (which never moves).

use std::sync::Once;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Sleeps while the 4-byte word at `word` holds `expected`, until a wake,
/// a signal or `timeout`. Shared (not `FUTEX_PRIVATE`): the word is in a
/// memfd or file mapped by other processes. Every outcome means "look
/// again"; true when the sleep ran out `timeout` (for statistics).
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, 4-aligned `AtomicU32`; FUTEX_WAIT reads it
    // atomically and compares it with `expected`, and writes no memory;
    // `ts` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT)
}

/// Wakes up to `n` sleepers on `word` (in any process).
pub(crate) fn wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE uses the address only as a key (the page and
    // offset of a shared mapping); the word is live.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// The kernel's `struct robust_list_head` (64-bit layout).
#[repr(C)]
struct RobustListHead {
    /// The first entry (or the head itself: an empty list).
    list: usize,
    /// From an entry to its futex word, in bytes.
    futex_offset: libc::c_long,
    /// An entry being added or removed (none: we never change the list).
    list_op_pending: usize,
}

/// A thread whose robust list names one futex word in the header page:
/// when the thread exits (the process dies, or [`Robust`] is dropped), the
/// kernel marks that word "owner died" if it still holds the thread's id.
#[derive(Debug)]
pub(crate) struct Robust {
    tid: u32,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Robust {
    /// Starts the thread. `lock` is the writer lock, in a mapping that
    /// outlives the returned value (the caller drops it, which joins the
    /// thread, before unmapping). Fails when the kernel has no robust lists
    /// (`ENOSYS`); the writer lock then falls back on judging holders by
    /// their identity.
    pub(crate) fn start(lock: &AtomicU32) -> std::io::Result<Robust> {
        let lock_addr = lock.as_ptr() as usize;
        let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<u32>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("shm-state-robust".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                // The list: head -> entry -> head. The entry's futex word
                // is at `entry + futex_offset`: the writer lock.
                let entry = Box::new(AtomicU64::new(0));
                let entry_addr = &*entry as *const AtomicU64 as usize;
                let head = Box::new(RobustListHead {
                    list: entry_addr,
                    futex_offset: (lock_addr as libc::c_long)
                        .wrapping_sub(entry_addr as libc::c_long),
                    list_op_pending: 0,
                });
                let head_addr = &*head as *const RobustListHead as usize;
                entry.store(head_addr as u64, Ordering::Release);
                // SAFETY: `head` and `entry` are a valid robust list that
                // lives until this thread returns (both are dropped after
                // the list is unregistered below; if the process dies first,
                // the kernel reads them at this thread's exit, while they
                // still exist); the length is the struct's size, as the
                // syscall requires.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_set_robust_list,
                        head_addr as *const RobustListHead,
                        size_of::<RobustListHead>(),
                    )
                };
                let result = if rc == 0 {
                    Ok(gettid())
                } else {
                    Err(std::io::Error::last_os_error())
                };
                let ok = result.is_ok();
                let _ = ready_tx.send(result);
                if ok {
                    // Sleep until the handle closes (or the process dies).
                    let _ = stop_rx.recv();
                    // Unregister before the list goes: the kernel never
                    // reads a freed head.
                    // SAFETY: a null head with the right size is accepted
                    // and unregisters the list.
                    unsafe {
                        libc::syscall(
                            libc::SYS_set_robust_list,
                            std::ptr::null::<RobustListHead>(),
                            size_of::<RobustListHead>(),
                        );
                    }
                }
                drop(head);
                drop(entry);
            })?;
        match ready_rx.recv() {
            Ok(Ok(tid)) => Ok(Robust {
                tid,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(std::io::Error::other("the robust-list thread ended"))
            }
        }
    }

    /// The thread's id: what the writer lock records for this peer.
    pub(crate) fn tid(&self) -> u32 {
        self.tid
    }
}

impl Drop for Robust {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This thread's id.
pub(crate) fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// How many times this process is a forked child of a process that used
/// this library: a handle remembers the count it was opened with, so a
/// handle carried across `fork` is caught with one load instead of a
/// `getpid` per transaction.
pub(crate) fn forks() -> u64 {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        extern "C" fn in_child() {
            FORKS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the handler only increments an atomic (async-signal-
        // safe, as a handler run in a forked child must be); registering
        // it has no other precondition.
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
    FORKS.load(Ordering::Relaxed)
}

static FORKS: AtomicU64 = AtomicU64::new(0);
