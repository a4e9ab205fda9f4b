//! Background priority for work that must not slow the command down.

/// Lowers this thread's CPU and I/O priority while it lives (nice 19, the
/// idle I/O class), for work that must not slow the command down; the
/// threads it starts meanwhile inherit both. Restores them when dropped.
/// Best effort: a priority that cannot be set, or whose nice could not be
/// raised back (no privilege, RLIMIT_NICE), is left as it is.
pub(crate) struct Background {
    nice: Option<i32>,
    ioprio: Option<i64>,
}

impl Background {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;

    pub(crate) fn enter() -> Background {
        // SAFETY: gettid, getpriority, setpriority and ioprio_get/set take
        // integers and touch no memory of ours.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            let known = *libc::__errno_location() == 0;
            // Lowered only when it can be raised back: as root, or within
            // RLIMIT_NICE (an unprivileged thread cannot undo a nice).
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let can_restore = libc::geteuid() == 0
                || (libc::getrlimit(libc::RLIMIT_NICE, &mut limit) == 0
                    && limit.rlim_cur as i64 >= 20 - i64::from(old));
            let nice =
                (known && can_restore && libc::setpriority(libc::PRIO_PROCESS, tid, 19) == 0)
                    .then_some(old);
            let old_io = libc::syscall(libc::SYS_ioprio_get, Self::IOPRIO_WHO_PROCESS, 0);
            let ioprio = (old_io >= 0
                && libc::syscall(
                    libc::SYS_ioprio_set,
                    Self::IOPRIO_WHO_PROCESS,
                    0,
                    Self::IOPRIO_CLASS_IDLE << 13,
                ) == 0)
                .then_some(old_io);
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
                libc::syscall(libc::SYS_ioprio_set, Self::IOPRIO_WHO_PROCESS, 0, io);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn priorities() -> (i32, i64) {
        // SAFETY: as in `enter`.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
            let io = libc::syscall(libc::SYS_ioprio_get, Background::IOPRIO_WHO_PROCESS, 0);
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
                assert_eq!(inside.1 >> 13, Background::IOPRIO_CLASS_IDLE);
            }
            // SAFETY: geteuid takes nothing and cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                assert!(
                    b.nice.is_some() && b.ioprio.is_some(),
                    "as root both are set"
                );
            }
            drop(b);
            assert_eq!(priorities(), before);
        })
        .join()
        .unwrap();
    }
}
