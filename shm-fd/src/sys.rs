//! The fd-number juggling that needs `unsafe`: claiming inherited fds and
//! putting fds on the numbers the protocol gives them. Everything else in
//! the crate goes through `nix`'s safe wrappers.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Inherited fds already handed out by [`take_inherited_fd`], so that no fd
/// gets two owners in this process.
static TAKEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

pub(crate) enum TakeError {
    Taken,
    Closed,
    Io(io::Error),
}

/// Whether `fd` is an open descriptor in this process.
pub(crate) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; on a closed
    // or out-of-range number it fails with EBADF and touches nothing.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD only changes the close-on-exec flag of `fd`, which the
    // caller owns; no memory is passed to the kernel.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Claims the inherited fd `fd` for this process: checks it is open, marks
/// it close-on-exec and returns it as an [`OwnedFd`]. Each number is handed
/// out at most once per process.
///
/// # Safety
///
/// No other object in this process owns `fd` (see `ListenEnv::take`).
pub(crate) unsafe fn take_inherited_fd(fd: RawFd) -> Result<OwnedFd, TakeError> {
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if taken.contains(&fd) {
        return Err(TakeError::Taken);
    }
    if !fd_is_open(fd) {
        return Err(TakeError::Closed);
    }
    set_cloexec(fd, true).map_err(TakeError::Io)?;
    taken.push(fd);
    // SAFETY: the caller guarantees that nothing else in this process owns
    // `fd`, and the TAKEN list lets this function give each number out
    // once. The fd is open (checked above), so the OwnedFd is its only
    // owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves `fds` onto the numbers `start, start+1, ...` (fd `i` onto
/// `start + i`) and clears close-on-exec on them, so that a program started
/// from this process inherits them there.
///
/// Returns the fds on their new numbers, in the same order. Fds that already
/// sit on their number are kept as they are; the others are duplicated there
/// and their old numbers closed.
///
/// # Safety
///
/// Any descriptor open on a number in `start .. start + fds.len()` that is not
/// one of `fds` is closed and replaced. The caller must make sure that no
/// other object in this process owns such a descriptor (for example: only
/// call this before opening anything else, as `shm-fd`'s `main` does).
pub(crate) unsafe fn place_fds(fds: Vec<OwnedFd>, start: RawFd) -> io::Result<Vec<OwnedFd>> {
    let n = fds.len() as RawFd;
    let end = start
        .checked_add(n)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many fds"))?;

    // Step 1: every fd not yet on its number goes to a temporary number
    // above the target range, so no later dup3 can overwrite a source.
    let mut staged: Vec<Result<OwnedFd, OwnedFd>> = Vec::with_capacity(fds.len());
    for (i, fd) in fds.into_iter().enumerate() {
        if fd.as_raw_fd() == start + i as RawFd {
            staged.push(Ok(fd));
            continue;
        }
        // SAFETY: F_DUPFD_CLOEXEC duplicates the caller's open `fd` onto the
        // lowest free number >= `end`; no memory is passed to the kernel.
        let tmp = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, end) };
        if tmp == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `tmp` was just returned by the kernel as a new descriptor
        // that nothing else in the process knows about.
        staged.push(Err(unsafe { OwnedFd::from_raw_fd(tmp) }));
        drop(fd);
    }

    // Step 2: duplicate each staged fd onto its target and release the
    // temporary copy; then make every target inheritable.
    let mut placed = Vec::with_capacity(staged.len());
    for (i, entry) in staged.into_iter().enumerate() {
        let target = start + i as RawFd;
        let fd = match entry {
            Ok(fd) => fd,
            Err(tmp) => {
                // SAFETY: `tmp` is open and owned by us; `target` is either
                // free or, by this function's contract, owned by nothing else
                // in the process, so replacing it breaks no other owner.
                if unsafe { libc::dup3(tmp.as_raw_fd(), target, 0) } == -1 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: dup3 succeeded, so `target` is now an open
                // descriptor that only this OwnedFd will own (see above).
                unsafe { OwnedFd::from_raw_fd(target) }
            }
        };
        set_cloexec(fd.as_raw_fd(), false)?;
        placed.push(fd);
    }
    Ok(placed)
}
