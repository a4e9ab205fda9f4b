//! The I/O seam of the save protocol: every write, fsync, link and rename
//! goes through [`Storage`], so tests can stop a save at each step and see
//! what a crash there leaves on disk.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::snapshot::ReadAt;

/// The operations the save protocol performs, on files of one directory
/// (named by their file names).
pub trait Storage {
    /// A file being written.
    type File;
    /// A file opened for reading.
    type Reader: ReadAt + Sync;

    /// Creates `name`, failing if it exists; mode 0600, never through a
    /// symlink.
    fn create_new(&mut self, name: &OsStr) -> io::Result<Self::File>;
    /// Writes all of `data` at `offset`.
    fn write_at(&mut self, file: &mut Self::File, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes the file's contents and size durable (`fsync`).
    fn sync_file(&mut self, file: &mut Self::File) -> io::Result<()>;
    /// Makes `to` a second name of `from` (`link`); `to` must not exist.
    fn link(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()>;
    /// Renames `from` to `to`, failing if `to` exists.
    fn rename_noreplace(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()>;
    /// Removes `name`.
    fn remove(&mut self, name: &OsStr) -> io::Result<()>;
    /// Makes the directory's entries durable (`fsync` of the directory).
    fn sync_dir(&mut self) -> io::Result<()>;
    /// Opens `name` for reading; `None` if it does not exist.
    fn open(&mut self, name: &OsStr) -> io::Result<Option<Self::Reader>>;
    /// The path of `name`, for messages.
    fn path_of(&self, name: &OsStr) -> PathBuf;
    /// The names in the directory (for finding the `.gen-` files of delta
    /// chains that no snapshot needs any more).
    fn list(&mut self) -> io::Result<Vec<OsString>>;

    /// Starts writing `len` bytes of `file` at `offset` to the disk without
    /// waiting for them. Only a hint that overlaps the disk's work with the
    /// rest of the save: nothing is durable before [`Storage::sync_file`],
    /// and failures are ignored. The default does nothing.
    fn start_writeback(&mut self, file: &mut Self::File, offset: u64, len: u64) {
        let _ = (file, offset, len);
    }

    /// Closes a file opened with [`Storage::open`] whose name has since been
    /// replaced: it may hold the last reference to the old file, whose
    /// blocks are freed when it closes. The default closes it now.
    fn retire(&mut self, file: Self::Reader) {
        drop(file);
    }

    /// Waits until files handed to [`Storage::retire`] are closed.
    fn wait_retired(&mut self) {}
}

/// The real file system: a directory on disk.
///
/// Retired files are closed on a background thread: closing the last
/// reference to a replaced snapshot frees its blocks and pages, which for
/// a file of hundreds of MiB takes tens of milliseconds that a save need
/// not wait for, and that must not take the CPU from the command (the
/// thread runs at background priority and closes one file at a time).
#[derive(Debug)]
pub struct DirStorage {
    dir: PathBuf,
    /// The thread closing retired files, started by the first retire.
    closer: Option<Closer>,
    /// Counts the closes running at once (tests).
    #[cfg(test)]
    probe: Option<std::sync::Arc<dir_tests::CloseProbe>>,
}

impl DirStorage {
    /// Storage in the directory `dir` (which must exist).
    pub fn new(dir: impl Into<PathBuf>) -> DirStorage {
        DirStorage {
            dir: dir.into(),
            closer: None,
            #[cfg(test)]
            probe: None,
        }
    }

    /// Splits a snapshot path into its directory's storage and file name.
    pub fn for_snapshot(path: &Path) -> io::Result<(DirStorage, OsString)> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the snapshot path has no file name",
            )
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        Ok((DirStorage::new(dir), name.to_owned()))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Storage for DirStorage {
    type File = File;
    type Reader = File;

    fn create_new(&mut self, name: &OsStr) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.dir.join(name))
    }

    fn write_at(&mut self, file: &mut File, offset: u64, data: &[u8]) -> io::Result<()> {
        file.write_all_at(data, offset)
    }

    fn sync_file(&mut self, file: &mut File) -> io::Result<()> {
        file.sync_all()
    }

    fn link(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        std::fs::hard_link(self.dir.join(from), self.dir.join(to))
    }

    fn rename(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn rename_noreplace(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        let cwd = nix::fcntl::AT_FDCWD;
        nix::fcntl::renameat2(
            cwd,
            &self.dir.join(from),
            cwd,
            &self.dir.join(to),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(io::Error::from)
    }

    fn remove(&mut self, name: &OsStr) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn open(&mut self, name: &OsStr) -> io::Result<Option<File>> {
        match crate::snapshot::open_for_reading(&self.dir.join(name)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn path_of(&self, name: &OsStr) -> PathBuf {
        self.dir.join(name)
    }

    fn list(&mut self) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(&self.dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    fn start_writeback(&mut self, file: &mut File, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; the fd
        // is open for the whole call because `file` is borrowed.
        let _ = unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
        };
    }

    fn retire(&mut self, file: File) {
        if self.closer.is_none() {
            #[cfg(test)]
            let closer = Closer::start(self.probe.clone());
            #[cfg(not(test))]
            let closer = Closer::start();
            self.closer = closer.ok();
        }
        // Without the thread (it could not start, or ended), closed now.
        if let Some(closer) = &self.closer
            && let Err(std::sync::mpsc::SendError(Retired::Close(file))) =
                closer.queue.send(Retired::Close(file))
        {
            drop(file);
        }
    }

    fn wait_retired(&mut self) {
        if let Some(closer) = &self.closer {
            let (done, closed) = std::sync::mpsc::channel();
            // Answered once every file queued before is closed; an error
            // (the thread ended) means they are.
            if closer.queue.send(Retired::Wait(done)).is_ok() {
                let _ = closed.recv();
            }
        }
    }
}

impl Drop for DirStorage {
    fn drop(&mut self) {
        if let Some(closer) = self.closer.take() {
            // The thread closes what is queued, then ends.
            drop(closer.queue);
            let _ = closer.thread.join();
        }
    }
}

/// What a [`Closer`] is asked to do, in order.
enum Retired {
    Close(File),
    /// Answer once every file queued before is closed.
    Wait(std::sync::mpsc::Sender<()>),
}

/// One thread closing retired files one at a time, at background
/// priority: a compaction retires its old chain (a full snapshot and its
/// deltas) at once, and the kernel's work of several closes side by side
/// can hold both CPUs of a small machine for a millisecond or more, even
/// at nice 19.
#[derive(Debug)]
struct Closer {
    queue: std::sync::mpsc::Sender<Retired>,
    thread: JoinHandle<()>,
}

impl Closer {
    fn start(
        #[cfg(test)] probe: Option<std::sync::Arc<dir_tests::CloseProbe>>,
    ) -> io::Result<Closer> {
        let (queue, inbox) = std::sync::mpsc::channel::<Retired>();
        let thread = std::thread::Builder::new()
            .name("shm-restore-close".into())
            .spawn(move || {
                crate::background::lower_for_good();
                for job in inbox {
                    match job {
                        Retired::Close(file) => {
                            #[cfg(test)]
                            let _closing = probe.as_deref().map(dir_tests::CloseProbe::enter);
                            drop(file);
                        }
                        Retired::Wait(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Closer { queue, thread })
    }
}

/// An in-memory file system that models what a machine crash keeps: file
/// contents become durable at `sync_file`, directory entries at `sync_dir`.
/// It can crash (or fail once, like a full disk) at the Nth operation.
///
/// The directory operations since the last `sync_dir` may reach the disk
/// in any combination (each one or not, in their order): a protocol that
/// needs one name durable before another changes must fsync the directory
/// in between.
#[cfg(test)]
pub(crate) mod sim {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::rc::Rc;

    #[derive(Debug, Clone, Default)]
    struct Inode {
        data: Vec<u8>,
        durable: Vec<u8>,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Fault {
        /// The machine stops: this and every later operation fail.
        Crash,
        /// This one operation fails with ENOSPC; later ones work.
        NoSpace,
    }

    #[derive(Debug, Default)]
    struct State {
        inodes: Vec<Inode>,
        dir: BTreeMap<OsString, usize>,
        durable_dir: BTreeMap<OsString, usize>,
        /// The directory operations since the last `sync_dir`.
        dir_log: Vec<DirOp>,
        ops: usize,
        fault: Option<(usize, Fault)>,
        crashed: bool,
        /// `(file, offset, len)` of every write-back hint, in order.
        hints: Vec<(usize, u64, u64)>,
        /// The contents of every file handed to `retire`.
        retired: Vec<Vec<u8>>,
    }

    /// A change to the directory.
    #[derive(Debug, Clone)]
    enum DirOp {
        /// `name` now names the inode (create, link).
        Insert(OsString, usize),
        /// `from` renamed over `to`.
        Rename(OsString, OsString),
        /// `name` removed.
        Remove(OsString),
    }

    impl DirOp {
        fn apply(&self, dir: &mut BTreeMap<OsString, usize>) {
            match self {
                DirOp::Insert(name, id) => {
                    dir.insert(name.clone(), *id);
                }
                DirOp::Rename(from, to) => {
                    if let Some(id) = dir.remove(from) {
                        dir.insert(to.clone(), id);
                    }
                }
                DirOp::Remove(name) => {
                    dir.remove(name);
                }
            }
        }
    }

    /// A handle on the simulated disk; clones share it.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct SimStorage(Rc<RefCell<State>>);

    /// A file as it would be found after a crash.
    pub(crate) type DiskImage = BTreeMap<OsString, Vec<u8>>;

    impl SimStorage {
        /// Puts a durable file on the disk.
        pub(crate) fn put(&self, name: &str, data: Vec<u8>) {
            let mut s = self.0.borrow_mut();
            let id = s.inodes.len();
            s.inodes.push(Inode {
                data: data.clone(),
                durable: data,
            });
            s.dir.insert(name.into(), id);
            s.durable_dir.insert(name.into(), id);
        }

        /// Makes operation number `n` (from 1) fail with `fault`.
        pub(crate) fn fail_at(&self, n: usize, fault: Fault) {
            let mut s = self.0.borrow_mut();
            s.fault = Some((n, fault));
            s.ops = 0;
        }

        /// How many operations were attempted.
        pub(crate) fn ops(&self) -> usize {
            self.0.borrow().ops
        }

        /// The write-back hints given so far: `(file, offset, len)`.
        pub(crate) fn hints(&self) -> Vec<(usize, u64, u64)> {
            self.0.borrow().hints.clone()
        }

        /// The contents of the files retired so far.
        pub(crate) fn retired(&self) -> Vec<Vec<u8>> {
            self.0.borrow().retired.clone()
        }

        /// The files as a reader would see them now (no crash).
        pub(crate) fn current(&self) -> DiskImage {
            let s = self.0.borrow();
            s.dir
                .iter()
                .map(|(n, &i)| (n.clone(), s.inodes[i].data.clone()))
                .collect()
        }

        /// Every disk a crash now could leave: any combination of the
        /// directory operations since the last `sync_dir` applied to the
        /// durable directory, and each file's contents durable or not (the
        /// two extremes of what the page cache may have written back).
        pub(crate) fn crash_images(&self) -> Vec<DiskImage> {
            let s = self.0.borrow();
            let mut out = Vec::new();
            let n = s.dir_log.len();
            assert!(n <= 12, "{n} directory operations without a sync_dir");
            let dirs: Vec<BTreeMap<OsString, usize>> = (0u32..1 << n)
                .map(|subset| {
                    let mut dir = s.durable_dir.clone();
                    for (i, op) in s.dir_log.iter().enumerate() {
                        if subset & (1 << i) != 0 {
                            op.apply(&mut dir);
                        }
                    }
                    dir
                })
                .collect();
            debug_assert!(n > 0 || dirs[0] == s.dir);
            for dir in &dirs {
                let ids: Vec<usize> = {
                    let mut v: Vec<usize> = dir.values().copied().collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                };
                for mask in 0u32..(1 << ids.len()) {
                    let image = dir
                        .iter()
                        .map(|(n, i)| {
                            let bit = ids.iter().position(|x| x == i).unwrap();
                            let inode = &s.inodes[*i];
                            let data = if mask & (1 << bit) != 0 {
                                &inode.data
                            } else {
                                &inode.durable
                            };
                            (n.clone(), data.clone())
                        })
                        .collect();
                    out.push(image);
                }
            }
            out
        }

        fn step(&self) -> io::Result<()> {
            let mut s = self.0.borrow_mut();
            if s.crashed {
                return Err(io::Error::other("simulated crash"));
            }
            s.ops += 1;
            match s.fault {
                Some((n, Fault::Crash)) if n == s.ops => {
                    s.crashed = true;
                    Err(io::Error::other("simulated crash"))
                }
                Some((n, Fault::NoSpace)) if n == s.ops => {
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                }
                _ => Ok(()),
            }
        }
    }

    /// Writes a disk image into a real directory.
    pub(crate) fn materialize(image: &DiskImage, dir: &Path) {
        for (name, data) in image {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }

    fn not_found() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    impl Storage for SimStorage {
        type File = usize;
        type Reader = Vec<u8>;

        fn create_new(&mut self, name: &OsStr) -> io::Result<usize> {
            self.step()?;
            let mut s = self.0.borrow_mut();
            if s.dir.contains_key(name) {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            let id = s.inodes.len();
            s.inodes.push(Inode::default());
            s.dir.insert(name.to_owned(), id);
            s.dir_log.push(DirOp::Insert(name.to_owned(), id));
            Ok(id)
        }

        fn write_at(&mut self, file: &mut usize, offset: u64, data: &[u8]) -> io::Result<()> {
            self.step()?;
            let mut s = self.0.borrow_mut();
            let d = &mut s.inodes[*file].data;
            let end = offset as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(data);
            Ok(())
        }

        fn sync_file(&mut self, file: &mut usize) -> io::Result<()> {
            self.step()?;
            let mut s = self.0.borrow_mut();
            let inode = &mut s.inodes[*file];
            inode.durable = inode.data.clone();
            Ok(())
        }

        fn link(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()> {
            self.step()?;
            let mut s = self.0.borrow_mut();
            let id = *s.dir.get(from).ok_or_else(not_found)?;
            if s.dir.contains_key(to) {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            s.dir.insert(to.to_owned(), id);
            s.dir_log.push(DirOp::Insert(to.to_owned(), id));
            Ok(())
        }

        fn rename(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()> {
            self.step()?;
            let mut s = self.0.borrow_mut();
            let id = s.dir.remove(from).ok_or_else(not_found)?;
            s.dir.insert(to.to_owned(), id);
            s.dir_log
                .push(DirOp::Rename(from.to_owned(), to.to_owned()));
            Ok(())
        }

        fn rename_noreplace(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()> {
            if self.0.borrow().dir.contains_key(to) {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            self.rename(from, to)
        }

        fn remove(&mut self, name: &OsStr) -> io::Result<()> {
            self.step()?;
            let mut s = self.0.borrow_mut();
            s.dir.remove(name).ok_or_else(not_found)?;
            s.dir_log.push(DirOp::Remove(name.to_owned()));
            Ok(())
        }

        fn sync_dir(&mut self) -> io::Result<()> {
            self.step()?;
            let mut s = self.0.borrow_mut();
            s.durable_dir = s.dir.clone();
            s.dir_log.clear();
            Ok(())
        }

        fn open(&mut self, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
            let s = self.0.borrow();
            Ok(s.dir.get(name).map(|&i| s.inodes[i].data.clone()))
        }

        fn path_of(&self, name: &OsStr) -> PathBuf {
            PathBuf::from("sim").join(name)
        }

        fn list(&mut self) -> io::Result<Vec<OsString>> {
            Ok(self.0.borrow().dir.keys().cloned().collect())
        }

        // A hint makes nothing durable and is not an operation a crash can
        // stop at: the crash tests count the same steps with or without.
        fn start_writeback(&mut self, file: &mut usize, offset: u64, len: u64) {
            self.0.borrow_mut().hints.push((*file, offset, len));
        }

        fn retire(&mut self, file: Vec<u8>) {
            self.0.borrow_mut().retired.push(file);
        }
    }

    impl ReadAt for Vec<u8> {
        fn size(&self) -> io::Result<u64> {
            Ok(<[u8]>::len(self) as u64)
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            <[u8] as ReadAt>::read_exact_at(self, buf, offset)
        }
    }
}

#[cfg(test)]
mod dir_tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// How many closes run at once, and the most that did.
    #[derive(Debug, Default)]
    pub(super) struct CloseProbe {
        now: AtomicUsize,
        most: AtomicUsize,
        closed: AtomicUsize,
    }

    pub(super) struct Closing<'a>(&'a CloseProbe);

    impl CloseProbe {
        /// A close starts: counted, and made slow enough that closes
        /// running side by side would overlap.
        pub(super) fn enter(&self) -> Closing<'_> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            Closing(self)
        }
    }

    impl Drop for Closing<'_> {
        fn drop(&mut self) {
            self.0.now.fetch_sub(1, Ordering::SeqCst);
            self.0.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Files retired one after the other (a compaction's old chain) are
    /// all closed once `wait_retired` returns: each close thread waits for
    /// the one before, and the wait for the last.
    #[test]
    fn every_retired_file_is_closed_after_wait_retired() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = DirStorage::new(dir.path());
        let mut open = Vec::new();
        for i in 0..6 {
            let path = dir.path().join(format!("old-{i}"));
            std::fs::write(&path, vec![i as u8; 256 << 10]).unwrap();
            let file = File::open(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let link = format!("/proc/self/fd/{}", file.as_raw_fd());
            let target = std::fs::read_link(&link).unwrap();
            open.push((link, target));
            storage.retire(file);
        }
        storage.wait_retired();
        for (link, target) in open {
            // Closed: the descriptor is gone, or already another file's.
            assert_ne!(std::fs::read_link(&link).ok(), Some(target), "{link}");
        }
        assert!(storage.closer.is_some());
    }

    /// A compaction retires its old chain at once: the files are closed
    /// one at a time (the kernel's work of closes side by side could hold
    /// every CPU of a small machine), and no retire waits for a close.
    #[test]
    fn retired_files_are_closed_one_at_a_time_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = DirStorage::new(dir.path());
        let probe = Arc::new(CloseProbe::default());
        storage.probe = Some(probe.clone());
        for i in 0..5 {
            let path = dir.path().join(format!("old-{i}"));
            std::fs::write(&path, b"x").unwrap();
            storage.retire(File::open(&path).unwrap());
        }
        // Each close takes 20 ms: a retire that waited for its close would
        // have let at most one more start by now.
        assert!(
            probe.closed.load(Ordering::SeqCst) < 4,
            "the retires waited"
        );
        storage.wait_retired();
        assert_eq!(probe.closed.load(Ordering::SeqCst), 5);
        // Each close took 20 ms: side by side, they would have overlapped.
        assert_eq!(probe.most.load(Ordering::SeqCst), 1, "closes overlapped");
        assert_eq!(probe.now.load(Ordering::SeqCst), 0, "all closed");
    }
}
