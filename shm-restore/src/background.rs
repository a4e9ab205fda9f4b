//! Background priority for work that must not slow the command down.

/// Lowers this thread's CPU and I/O priority while it lives (nice 19, the
/// idle I/O class), for work that must not slow the command down; the
/// threads it starts meanwhile inherit both. Restores them when dropped.
/// Best effort: a priority that cannot be set is left as it is, and so is
/// a nice this thread could not raise back (tried before it is lowered:
/// no CAP_SYS_NICE, or not within RLIMIT_NICE).
pub(crate) struct Background {
    nice: Option<i32>,
    ioprio: Option<i64>,
}

const IOPRIO_WHO_PROCESS: libc::c_long = 1;
const IOPRIO_CLASS_IDLE: libc::c_long = 3;

impl Background {
    pub(crate) fn enter() -> Background {
        // SAFETY: gettid, getpriority, setpriority and ioprio_get/set take
        // integers and touch no memory of ours.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            let known = *libc::__errno_location() == 0;
            // Lowered only when it can be raised back: the kernel is asked
            // (raising it by one step, then back, which lowering always
            // may), as neither the user id nor the limits tell it in every
            // case (root without CAP_SYS_NICE in a container).
            let can_restore = known
                && old > -20
                && libc::setpriority(libc::PRIO_PROCESS, tid, old - 1) == 0
                && libc::setpriority(libc::PRIO_PROCESS, tid, old) == 0;
            let nice =
                (can_restore && libc::setpriority(libc::PRIO_PROCESS, tid, 19) == 0).then_some(old);
            let old_io = libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0);
            let ioprio = (old_io >= 0 && set_idle_io()).then_some(old_io);
            Background { nice, ioprio }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            if let Some(n) = self.nice {
                libc::setpriority(libc::PRIO_PROCESS, tid, n);
            }
            if let Some(io) = self.ioprio {
                libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, io);
            }
        }
    }
}

/// Puts this thread in the idle I/O class; whether it could.
fn set_idle_io() -> bool {
    // SAFETY: ioprio_set takes integers and touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << 13,
        ) == 0
    }
}

/// Lowers this thread's priorities for the rest of its life (nice 19, the
/// idle I/O class): for a thread that does only such work, where nothing
/// needs raising back, so any user may. Best effort.
pub(crate) fn lower_for_good() {
    // SAFETY: gettid and setpriority take integers and touch no memory of
    // ours.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
    }
    set_idle_io();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn priorities() -> (i32, i64) {
        // SAFETY: as in `enter`.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
            let io = libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0);
            (nice, io)
        }
    }

    /// Inside, nice 19 and the idle I/O class; after, what it was (on a
    /// thread of its own: priorities are per thread).
    #[test]
    fn background_lowers_and_restores_this_threads_priorities() {
        std::thread::spawn(|| {
            let before = priorities();
            let b = Background::enter();
            let inside = priorities();
            if b.nice.is_some() {
                assert_eq!(inside.0, 19);
            }
            if b.ioprio.is_some() {
                assert_eq!(inside.1 >> 13, IOPRIO_CLASS_IDLE);
            }
            // Whatever could be lowered is raised back: a thread that
            // may not raise its nice again is not lowered (the main thread
            // of `shm-restore` runs compactions under this).
            drop(b);
            assert_eq!(priorities(), before);
        })
        .join()
        .unwrap();
    }

    /// For good: nice 19 whatever the privileges (lowering needs none).
    #[test]
    fn lower_for_good_lowers_this_thread_only() {
        let here = priorities();
        std::thread::spawn(|| {
            lower_for_good();
            assert_eq!(priorities().0, 19);
        })
        .join()
        .unwrap();
        assert_eq!(priorities(), here);
    }
}
