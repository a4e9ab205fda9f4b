//! The shared memfd: creating, validating, sizing and mapping it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use memmap2::{MmapMut, MmapOptions, MmapRaw};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::env::{ListenEnv, check_name};
use crate::error::{Error, Result};

/// The seals of a memfd (`F_GET_SEALS`), as a small bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seals(u32);

impl Seals {
    /// No further seals can be added (`F_SEAL_SEAL`).
    pub const SEAL: Seals = Seals(libc::F_SEAL_SEAL as u32);
    /// The file cannot shrink (`F_SEAL_SHRINK`).
    pub const SHRINK: Seals = Seals(libc::F_SEAL_SHRINK as u32);
    /// The file cannot grow (`F_SEAL_GROW`).
    pub const GROW: Seals = Seals(libc::F_SEAL_GROW as u32);
    /// The contents cannot be written (`F_SEAL_WRITE`).
    pub const WRITE: Seals = Seals(libc::F_SEAL_WRITE as u32);

    /// The raw `F_SEAL_*` bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every seal in `other` is set.
    pub fn contains(self, other: Seals) -> bool {
        self.0 & other.0 == other.0
    }
}

/// How [`SharedFd::create`] makes a new memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Initial size in bytes (the memfd reads as zeros; no memory is used
    /// until written).
    pub size: u64,
    /// Seal against shrinking (`F_SEAL_SHRINK`), so that no process can cut
    /// the file under another one's mapping (which would SIGBUS it).
    pub seal_shrink: bool,
}

impl CreateOptions {
    /// The largest [`CreateOptions::size`] accepted: 128 TiB on 64-bit
    /// targets (all a process can map on x86-64 and arm64 with 4-level page
    /// tables: a larger memfd could never be mapped whole), `isize::MAX`
    /// bytes on 32-bit ones.
    pub const MAX_SIZE: u64 = if usize::BITS >= 64 {
        1 << 47
    } else {
        isize::MAX as u64
    };

    /// Checks the options before anything is created: a size above
    /// [`CreateOptions::MAX_SIZE`] is [`Error::InvalidOption`].
    /// [`SharedFd::create`] and [`crate::Handover`] call it first.
    pub fn validate(&self) -> Result<()> {
        if self.size > Self::MAX_SIZE {
            return Err(Error::InvalidOption {
                option: "size",
                value: self.size.to_string(),
                reason: format!(
                    "is larger than the largest memfd this crate creates ({} bytes = 128 TiB)",
                    Self::MAX_SIZE
                ),
            });
        }
        Ok(())
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            seal_shrink: true,
        }
    }
}

/// An owned, validated memfd: the shared memory a program keeps its state in.
///
/// Obtained from the environment ([`SharedFd::from_env`]), by validating an
/// fd ([`SharedFd::adopt`]), or by creating one ([`SharedFd::create`]). The fd
/// is close-on-exec; a producer passes it on explicitly (see
/// [`crate::PassedFds`]).
#[derive(Debug)]
pub struct SharedFd {
    fd: OwnedFd,
    name: String,
}

impl SharedFd {
    /// Creates a new memfd called `name` (the name shows in
    /// `/proc/PID/fd/` as `/memfd:NAME`).
    ///
    /// The options are checked first ([`CreateOptions::validate`]): with bad
    /// ones nothing is created.
    pub fn create(name: &str, options: CreateOptions) -> Result<Self> {
        options.validate()?;
        check_name(name).map_err(|reason| Error::InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        if name.len() > MAX_MEMFD_NAME_LEN {
            return Err(Error::InvalidName {
                name: name.to_owned(),
                reason: "is longer than 249 bytes (memfd_create's limit)",
            });
        }
        let flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        // Ask for a non-executable memfd (Linux 6.3+; required under
        // vm.memfd_noexec=2); older kernels reject the flag with EINVAL.
        let fd = match memfd_create(
            name,
            flags | MFdFlags::from_bits_retain(libc::MFD_NOEXEC_SEAL),
        ) {
            Err(nix::errno::Errno::EINVAL) => memfd_create(name, flags),
            other => other,
        }
        .map_err(|e| Error::io("memfd_create", e))?;
        let shared = SharedFd {
            fd,
            name: name.to_owned(),
        };
        if options.size > 0 {
            shared.grow_to(options.size)?;
        }
        if options.seal_shrink {
            shared.seal_shrink()?;
        }
        Ok(shared)
    }

    /// Validates that `fd` is a memfd and takes it as the shared fd `name`.
    ///
    /// The fd is set close-on-exec. A file of another kind (a regular file,
    /// a pipe, ...), one opened read-only, or one sealed against writing is
    /// [`Error::BadFd`].
    pub fn adopt(fd: OwnedFd, name: &str) -> Result<Self> {
        validate(fd.as_fd(), name)?;
        nix::fcntl::fcntl(&fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(|e| Error::io("fcntl(F_SETFD)", e))?;
        Ok(SharedFd {
            fd,
            name: name.to_owned(),
        })
    }

    /// Adds `F_SEAL_SHRINK` unless it is already set. A memfd whose seals
    /// are frozen (`F_SEAL_SEAL`) without it is an error.
    pub fn seal_shrink(&self) -> Result<()> {
        if self.seals()?.contains(Seals::SHRINK) {
            return Ok(());
        }
        fcntl(&self.fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK))
            .map_err(|e| Error::io("fcntl(F_ADD_SEALS, F_SEAL_SHRINK)", e))?;
        Ok(())
    }

    /// Finds the fd called `name` in a parsed hand-over, checks that it is
    /// meant for this process, takes it and validates it.
    ///
    /// # Safety
    ///
    /// This adopts fd `3 + i` (the fd called `name`) as with
    /// [`ListenEnv::take`], whose contract the caller must uphold: nothing
    /// else in this process owns that fd number (call it early in `main`,
    /// before the program opens files of its own).
    ///
    /// ```compile_fail,E0133
    /// let shared = shm_fd::SharedFd::from_listen_env(None, shm_fd::DEFAULT_NAME);
    /// ```
    pub unsafe fn from_listen_env(env: Option<&ListenEnv>, name: &str) -> Result<Self> {
        let env = env.ok_or_else(|| Error::NotPassed {
            name: name.to_owned(),
        })?;
        let own_pid = std::process::id();
        if let Some(listen_pid) = env.pid().filter(|_| !env.is_for(own_pid)) {
            return Err(Error::NotForThisProcess {
                listen_pid,
                own_pid,
            });
        }
        let index = env.position(name).ok_or_else(|| Error::NameNotFound {
            name: name.to_owned(),
            passed: env.names().to_vec(),
        })?;
        let fd = env.fd_of(name).expect("position() found the name");
        // Validate through a borrow first: if LISTEN_FDS is stale and the
        // number belongs to one of our own files, it must not be taken (and
        // closed on the error path).
        if crate::sys::fd_is_open(fd) {
            // SAFETY: the fd is open (checked just above) and the borrow does
            // not outlive this statement; nothing closes it meanwhile.
            validate(unsafe { BorrowedFd::borrow_raw(fd) }, name)?;
        }
        // SAFETY: forwarded from this function's contract.
        Self::adopt(unsafe { env.take(index) }?, name)
    }

    /// The consumer's one call: reads `LISTEN_FDS`, `LISTEN_FDNAMES` and
    /// `LISTEN_PID` and returns the memfd called `name`.
    ///
    /// When the program was not started under a watcher the error is
    /// [`Error::NotPassed`], whose message tells the user what to do.
    ///
    /// # Safety
    ///
    /// As for [`SharedFd::from_listen_env`]: the fd number the variables
    /// name must have no other owner in this process. Call it once, early
    /// in `main`, before the program opens files of its own; then every
    /// open fd above 2 was inherited and nothing owns it yet.
    ///
    /// Outside `unsafe` it does not compile:
    ///
    /// ```compile_fail,E0133
    /// let shared = shm_fd::SharedFd::from_env(shm_fd::DEFAULT_NAME);
    /// ```
    pub unsafe fn from_env(name: &str) -> Result<Self> {
        let env = ListenEnv::from_process_env()?;
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::from_listen_env(env.as_ref(), name) }
    }

    /// The fd's name in `LISTEN_FDNAMES`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current size in bytes.
    pub fn len(&self) -> Result<u64> {
        let stat = nix::sys::stat::fstat(&self.fd).map_err(|e| Error::io("fstat", e))?;
        Ok(stat.st_size as u64)
    }

    /// True when the memfd holds no bytes (a fresh watcher's).
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The seals currently set.
    pub fn seals(&self) -> Result<Seals> {
        let bits = fcntl(&self.fd, FcntlArg::F_GET_SEALS)
            .map_err(|e| Error::io("fcntl(F_GET_SEALS)", e))?;
        Ok(Seals(bits as u32))
    }

    /// Grows the memfd to at least `min_len` bytes; never shrinks it.
    /// Returns the size afterwards.
    ///
    /// Two processes growing an *unsealed* memfd at once can race (the
    /// smaller `ftruncate` may land last and shrink it); the default
    /// `F_SEAL_SHRINK` makes concurrent growth safe.
    pub fn grow_to(&self, min_len: u64) -> Result<u64> {
        let len = self.len()?;
        if len >= min_len {
            return Ok(len);
        }
        let wanted = i64::try_from(min_len).map_err(|_| Error::CannotGrow {
            len,
            wanted: min_len,
        })?;
        match nix::unistd::ftruncate(&self.fd, wanted) {
            Ok(()) => Ok(min_len),
            // Sealed: either against growing, or against shrinking because
            // another process grew it past `min_len` since our fstat.
            Err(nix::errno::Errno::EPERM) => match self.len()? {
                now if now >= min_len => Ok(now),
                now => Err(Error::CannotGrow {
                    len: now,
                    wanted: min_len,
                }),
            },
            Err(e) => Err(Error::io("ftruncate", e)),
        }
    }

    /// Maps the whole memfd, growing it first to at least `min_len` bytes,
    /// as raw memory: the safe base for memory other processes may change.
    ///
    /// A memfd of size 0 cannot be mapped: pass a non-zero `min_len`.
    pub fn map_raw(&self, min_len: u64) -> Result<MmapRaw> {
        let len = self.map_len(min_len)?;
        MmapOptions::new()
            .len(len)
            .map_raw(&self.fd)
            .map_err(|e| Error::io("mmap", e))
    }

    /// Maps the whole memfd as a mutable byte slice, growing it first to at
    /// least `min_len` bytes.
    ///
    /// # Safety
    ///
    /// The slice aliases memory other processes can reach, and Rust assumes
    /// that nothing changes the bytes behind a `&mut [u8]` but the slice
    /// itself. The caller must make sure that, while the map lives:
    /// - nothing else writes any byte of the memfd: no other process, and
    ///   no other mapping of it in this one. That rules this function out
    ///   for a program that uses shm-snapshot's protocol: its snapshotter
    ///   (`shm-restore --snapshot protocol`) writes the header page (its
    ///   waiters word) while the program runs. Such a program maps its data
    ///   with [`SharedFd::map_mut_range`] from `shm_snapshot::DATA_OFFSET`,
    ///   and reaches the header only through [`SharedFd::map_raw`] and
    ///   `shm_snapshot::Region`. (A snapshotter that only reads, such as
    ///   shm-restore's default mode, which pauses the program for its copy,
    ///   writes nothing.)
    /// - the memfd is not truncated below the mapped length (the default
    ///   `F_SEAL_SHRINK` guarantees this; with `--no-seal` it is on you).
    pub unsafe fn map_mut(&self, min_len: u64) -> Result<MmapMut> {
        let len = self.map_len(min_len)?;
        // SAFETY: the caller upholds this function's contract: no other
        // writer of the memfd, and no shrinking under the mapping.
        unsafe { MmapOptions::new().len(len).map_mut(&self.fd) }.map_err(|e| Error::io("mmap", e))
    }

    /// Maps `len` bytes of the memfd from `offset` on as a mutable byte
    /// slice, growing the memfd first to at least `offset + len` bytes.
    ///
    /// `offset` must be a multiple of the page size, so that the mapping
    /// holds none of the bytes before it; `len` must not be 0, and
    /// `offset + len` must be a possible memfd size. Otherwise the error is
    /// [`Error::InvalidRange`], and nothing is grown or mapped.
    ///
    /// This is how a program keeps a `&mut [u8]` over its data while
    /// another party may write elsewhere in the memfd, e.g. shm-snapshot's
    /// header page before `shm_snapshot::DATA_OFFSET` (on machines whose
    /// pages are larger than that offset, map the memfd raw instead).
    ///
    /// # Safety
    ///
    /// As for [`SharedFd::map_mut`], but for the mapped range only: while
    /// the map lives, nothing else writes the bytes `offset .. offset + len`
    /// (no other process, no other mapping in this one), and the memfd is
    /// not truncated below `offset + len`.
    pub unsafe fn map_mut_range(&self, offset: u64, len: usize) -> Result<MmapMut> {
        let bad = |reason: &'static str| Error::InvalidRange {
            offset,
            len: len as u64,
            reason,
        };
        if len == 0 {
            return Err(bad("the length is 0"));
        }
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        if !offset.is_multiple_of(page) {
            return Err(bad("the offset is not a multiple of the page size"));
        }
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len))
            .filter(|&end| end <= i64::MAX as u64)
            .ok_or_else(|| bad("the range ends past the largest possible memfd"))?;
        self.grow_to(end)?;
        // SAFETY: the caller upholds this function's contract for the
        // mapped range: no other writer of those bytes, and no shrinking
        // below `end` (just grown to at least that).
        unsafe { MmapOptions::new().offset(offset).len(len).map_mut(&self.fd) }
            .map_err(|e| Error::io("mmap", e))
    }

    fn map_len(&self, min_len: u64) -> Result<usize> {
        let len = self.grow_to(min_len)?;
        if len == 0 {
            return Err(Error::io(
                "mmap",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "the memfd is empty"),
            ));
        }
        usize::try_from(len).map_err(|_| {
            Error::io(
                "mmap",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "memfd larger than the address space",
                ),
            )
        })
    }

    /// Gives up the wrapper, returning the fd.
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    /// Gives up the wrapper, returning the memfd as a [`File`] (for reading,
    /// writing, seeking).
    pub fn into_file(self) -> File {
        File::from(self.fd)
    }

    /// Opens the memfd again (through `/proc/self/fd`), giving a new open
    /// file description: its file offset is this process's own, not shared
    /// with the child that inherited the fd (whose `read`/`write` move it),
    /// so `SEEK_DATA` / `SEEK_HOLE` and positioned I/O are safe to mix.
    pub fn reopen(&self) -> Result<SharedFd> {
        let path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("reopening the memfd through /proc/self/fd", e))?;
        SharedFd::adopt(file.into(), &self.name)
    }

    /// Duplicates the fd (close-on-exec; the file offset is shared).
    pub fn try_clone(&self) -> Result<SharedFd> {
        Ok(SharedFd {
            fd: self.fd.try_clone().map_err(|e| Error::io("dup", e))?,
            name: self.name.clone(),
        })
    }
}

impl AsFd for SharedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<SharedFd> for OwnedFd {
    fn from(s: SharedFd) -> OwnedFd {
        s.fd
    }
}

/// The longest name `memfd_create` accepts (its 255-byte limit less the
/// `memfd:` prefix).
pub const MAX_MEMFD_NAME_LEN: usize = 249;

/// Checks that `fd` is a memfd this process can map for writing.
fn validate(fd: BorrowedFd<'_>, name: &str) -> Result<()> {
    let raw = fd.as_raw_fd();
    let bad = |problem: String| Error::BadFd {
        fd: raw,
        name: name.to_owned(),
        problem,
    };
    let stat = nix::sys::stat::fstat(fd).map_err(|e| bad(format!("cannot be examined: {e}")))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(bad("is not a memfd (not a regular file)".into()));
    }
    // Only shared-memory files (memfd, tmpfs, hugetlbfs) know seals.
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS)
        .map_err(|_| bad(format!("is not a memfd (it is {})", describe_fd(raw))))?;
    // Among those, insist on a memfd where /proc tells (without /proc, the
    // seals check above is the best available).
    if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{raw}"))
        && !target
            .as_os_str()
            .as_encoded_bytes()
            .starts_with(b"/memfd:")
    {
        return Err(bad(format!("is not a memfd (it is {})", target.display())));
    }
    if seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 {
        return Err(bad("is sealed against writing".into()));
    }
    let access =
        fcntl(fd, FcntlArg::F_GETFL).map_err(|e| bad(format!("cannot be examined: {e}")))?;
    if access & libc::O_ACCMODE != libc::O_RDWR {
        return Err(bad("is not open for reading and writing".into()));
    }
    Ok(())
}

fn describe_fd(raw: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "another kind of file".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_seal_grow_map() {
        let fd = SharedFd::create(
            "test-memfd",
            CreateOptions {
                size: 100,
                seal_shrink: true,
            },
        )
        .unwrap();
        assert_eq!(fd.len().unwrap(), 100);
        assert!(fd.seals().unwrap().contains(Seals::SHRINK));
        assert!(!fd.seals().unwrap().contains(Seals::GROW));
        assert_eq!(fd.grow_to(50).unwrap(), 100, "never shrinks");
        let map = fd.map_raw(4096).unwrap();
        assert_eq!(map.len(), 4096);
        // A sealed memfd refuses to shrink even when asked directly.
        assert_eq!(
            nix::unistd::ftruncate(&fd, 10),
            Err(nix::errno::Errno::EPERM)
        );
    }

    #[test]
    fn unsealed_when_asked() {
        let fd = SharedFd::create(
            "x",
            CreateOptions {
                size: 0,
                seal_shrink: false,
            },
        )
        .unwrap();
        assert!(!fd.seals().unwrap().contains(Seals::SHRINK));
        assert!(fd.is_empty().unwrap());
        assert!(fd.map_raw(0).is_err(), "an empty memfd cannot be mapped");
    }

    #[test]
    fn grow_sealed_is_a_clear_error() {
        let fd = SharedFd::create("g", CreateOptions::default()).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW)).unwrap();
        let e = fd.grow_to(10).unwrap_err();
        assert!(matches!(e, Error::CannotGrow { len: 0, wanted: 10 }), "{e}");
    }

    #[test]
    fn adopt_rejects_regular_files_and_pipes() {
        let file = tempfile::tempfile().unwrap();
        let e = SharedFd::adopt(file.into(), "n").unwrap_err().to_string();
        assert!(e.contains("is not a memfd"), "{e}");
        let (r, _w) = nix::unistd::pipe().unwrap();
        let e = SharedFd::adopt(r, "n").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let fd = SharedFd::create("ok", CreateOptions::default()).unwrap();
        SharedFd::adopt(fd.into_owned_fd(), "ok").unwrap();
        let fd = SharedFd::create("ro", CreateOptions::default()).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).unwrap();
        let e = SharedFd::adopt(fd.into_owned_fd(), "ro")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sealed against writing"), "{e}");
        // A read-only open of a memfd cannot be mapped for writing.
        let fd = SharedFd::create("rdonly", CreateOptions::default()).unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let ro = std::fs::File::open(path).unwrap();
        let e = SharedFd::adopt(ro.into(), "rdonly")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not open for reading and writing"), "{e}");
    }

    #[test]
    fn grow_race_on_a_sealed_memfd_is_not_an_error() {
        let fd = SharedFd::create("race", CreateOptions::default()).unwrap();
        let other = fd.try_clone().unwrap();
        other.grow_to(8192).unwrap();
        // As if our fstat had seen 0 before the other grew it: ftruncate(10)
        // would shrink, the seal refuses, and the answer is still "big enough".
        assert_eq!(
            nix::unistd::ftruncate(&fd, 10),
            Err(nix::errno::Errno::EPERM)
        );
        assert_eq!(fd.grow_to(10).unwrap(), 8192);
    }

    #[test]
    fn reopen_has_its_own_offset() {
        use std::io::{Seek, SeekFrom};
        let fd = SharedFd::create(
            "re",
            CreateOptions {
                size: 100,
                seal_shrink: true,
            },
        )
        .unwrap();
        let mut a = fd.try_clone().unwrap().into_file();
        let mut b = fd.reopen().unwrap().into_file();
        a.seek(SeekFrom::Start(40)).unwrap();
        assert_eq!(b.stream_position().unwrap(), 0);
        let mut dup = fd.try_clone().unwrap().into_file();
        assert_eq!(
            dup.stream_position().unwrap(),
            40,
            "a dup shares the offset"
        );
    }

    #[test]
    fn seal_shrink_is_idempotent() {
        let fd = SharedFd::create(
            "s",
            CreateOptions {
                size: 0,
                seal_shrink: false,
            },
        )
        .unwrap();
        fd.seal_shrink().unwrap();
        fd.seal_shrink().unwrap();
        assert!(fd.seals().unwrap().contains(Seals::SHRINK));
    }

    fn page_size() -> u64 {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .unwrap()
            .unwrap() as u64
    }

    #[test]
    fn map_mut_range_refuses_bad_ranges_and_grows_nothing() {
        let fd = SharedFd::create("range", CreateOptions::default()).unwrap();
        let page = page_size();
        let top_page = u64::MAX - u64::MAX % page;
        for (offset, len, why) in [
            (1, 10, "not a multiple of the page size"),
            (page + 8, 10, "not a multiple of the page size"),
            (page, 0, "the length is 0"),
            (top_page, page as usize, "past the largest possible memfd"),
            (1 << 63, 1, "past the largest possible memfd"),
            (
                (i64::MAX as u64 + 1) - page,
                page as usize + 1,
                "past the largest possible memfd",
            ),
        ] {
            // SAFETY: nothing is mapped (every range is refused); were one
            // mapped, this process alone has the memfd.
            let e = unsafe { fd.map_mut_range(offset, len) }.unwrap_err();
            assert!(
                matches!(e, Error::InvalidRange { offset: o, len: l, .. } if o == offset && l == len as u64),
                "{offset} {len}: {e}"
            );
            let text = e.to_string();
            assert!(text.contains(why), "{offset} {len}: {text}");
            assert!(text.contains(&format!("at offset {offset}")), "{text}");
        }
        assert_eq!(fd.len().unwrap(), 0, "a refused range grows nothing");
    }

    #[test]
    fn map_mut_range_maps_exactly_the_range() {
        use std::os::unix::fs::FileExt;
        let fd = SharedFd::create("range-ok", CreateOptions::default()).unwrap();
        let page = page_size();
        let file = fd.try_clone().unwrap().into_file();
        file.write_all_at(b"head", 0).unwrap();
        // SAFETY: this process alone has the memfd, and this is its only
        // mutable mapping.
        let mut data = unsafe { fd.map_mut_range(page, 100) }.unwrap();
        assert_eq!(data.len(), 100);
        assert_eq!(fd.len().unwrap(), page + 100, "grown to the range's end");
        assert_eq!(&data[..4], [0; 4]);
        data[..4].copy_from_slice(b"data");
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, page).unwrap();
        assert_eq!(&buf, b"data", "the map starts at the offset");
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"head", "the page before is not touched");
        drop(data);
        // A larger memfd is not shrunk by a smaller range.
        fd.grow_to(4 * page).unwrap();
        // SAFETY: as above.
        let data = unsafe { fd.map_mut_range(0, 10) }.unwrap();
        assert_eq!(&data[..4], b"head");
        assert_eq!(fd.len().unwrap(), 4 * page);
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_created() {
        for size in [CreateOptions::MAX_SIZE + 1, i64::MAX as u64, u64::MAX] {
            let options = CreateOptions {
                size,
                seal_shrink: true,
            };
            let e = options.validate().unwrap_err();
            assert!(
                matches!(e, Error::InvalidOption { option: "size", .. }),
                "{e}"
            );
            let text = SharedFd::create("big", options).unwrap_err().to_string();
            assert!(
                text.starts_with(&format!("invalid size {size}: is larger than")),
                "{text}"
            );
        }
        CreateOptions {
            size: CreateOptions::MAX_SIZE,
            seal_shrink: true,
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(SharedFd::create(&"n".repeat(250), CreateOptions::default()).is_err());
        SharedFd::create(&"n".repeat(249), CreateOptions::default()).unwrap();
        for name in ["", "a:b", "with space"] {
            assert!(matches!(
                SharedFd::create(name, CreateOptions::default()),
                Err(Error::InvalidName { .. })
            ));
        }
    }
}
