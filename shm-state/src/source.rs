//! Where a state's bytes live: a heap buffer, a shared memfd, or a file.

use crate::error::{Error, Result};
use shm_fd::SharedFd;
use std::fs::File;
use std::os::fd::AsFd;

/// Where a state's bytes live.
///
/// A heap buffer is safe to use as it is. A memfd or a file is memory other
/// processes can reach, so building a source from one is `unsafe`: see the
/// constructors' contracts.
#[derive(Debug)]
pub struct Source(pub(crate) SourceKind);

#[derive(Debug)]
pub(crate) enum SourceKind {
    Heap(Vec<u8>),
    Shared(SharedFd),
    File(File),
}

impl Source {
    /// A region in a heap buffer (empty for a new state, or the bytes of a
    /// closed one, e.g. from [`State::close`](crate::State::close) or [`State::image`](crate::State::image)).
    pub fn heap(bytes: Vec<u8>) -> Source {
        Source(SourceKind::Heap(bytes))
    }

    /// The shared memfd (e.g. `SharedFd::from_env(shm_fd::DEFAULT_NAME)`).
    ///
    /// # Safety
    ///
    /// While the state is open:
    /// - no other process writes the memfd, except shm-state itself (whose
    ///   lock word refuses a second opener) and a snapshot restore of a
    ///   stopped program;
    /// - the memfd is not truncated (the watcher's `F_SEAL_SHRINK`, on by
    ///   default in `shm-fd`, guarantees this).
    pub unsafe fn shared(fd: SharedFd) -> Source {
        Source(SourceKind::Shared(fd))
    }

    /// A regular file, opened for reading and writing.
    ///
    /// # Safety
    ///
    /// Same contract as [`Source::shared`]: no other writer, and the file is
    /// not truncated while the state is open (nothing seals a file; a
    /// truncation kills this process with SIGBUS).
    ///
    /// # Durability
    ///
    /// Commits are not flushed to disk (no `msync` per transaction): the
    /// file survives the process's crash like a memfd, but not a machine
    /// crash, after which it may hold any mix of old and new pages.
    /// [`State::close`](crate::State::close) flushes it. Use shm-restore snapshots to survive
    /// machine crashes.
    pub unsafe fn file(file: File) -> Source {
        Source(SourceKind::File(file))
    }

    /// The heap bytes, if this is a heap source.
    pub fn into_heap(self) -> Option<Vec<u8>> {
        match self.0 {
            SourceKind::Heap(v) => Some(v),
            _ => None,
        }
    }

    /// The memfd, if this is a memfd source.
    pub fn into_shared(self) -> Option<SharedFd> {
        match self.0 {
            SourceKind::Shared(fd) => Some(fd),
            _ => None,
        }
    }

    /// The file, if this is a file source.
    pub fn into_file(self) -> Option<File> {
        match self.0 {
            SourceKind::File(f) => Some(f),
            _ => None,
        }
    }
}

/// The first `base` bytes of `source` (zeros for an empty one), for the
/// read-only protocol check; a backing holding fewer is someone else's data.
pub(crate) fn first_page(source: &SourceKind, base: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let read = |fd: std::os::fd::BorrowedFd<'_>| -> Result<Vec<u8>> {
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(|e| Error::io("dup of the state's fd", e))?,
        );
        let len = file.metadata().map_err(|e| Error::io("fstat", e))?.len();
        let mut page = vec![0u8; base];
        if len == 0 {
            return Ok(page);
        }
        if len < base as u64 {
            let mut head = [0u8; 8];
            let n = (len as usize).min(8);
            file.read_exact_at(&mut head[..n], 0)
                .map_err(|e| Error::io("reading the protocol page", e))?;
            return Err(Error::NotAState { found: head });
        }
        file.read_exact_at(&mut page, 0)
            .map_err(|e| Error::io("reading the protocol page", e))?;
        Ok(page)
    };
    match source {
        SourceKind::Heap(v) => {
            if !v.is_empty() && v.len() < base {
                let mut head = [0u8; 8];
                let n = v.len().min(8);
                head[..n].copy_from_slice(&v[..n]);
                return Err(Error::NotAState { found: head });
            }
            let mut page = vec![0u8; base];
            let n = v.len().min(base);
            page[..n].copy_from_slice(&v[..n]);
            Ok(page)
        }
        SourceKind::Shared(fd) => read(fd.as_fd()),
        SourceKind::File(f) => read(f.as_fd()),
    }
}
