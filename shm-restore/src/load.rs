//! Loading a snapshot into the memfd before the program starts, falling
//! back on `.prev` when the snapshot is damaged.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::chain::{Link, copy_chain_into, series_of, verify_chain};
use crate::error::{Error, Result};
use crate::format::{Chunk, Header};
use crate::progress::Progress;
use crate::save::{move_aside, prev_path};
use crate::snapshot::{ReadError, copy_into};
use crate::storage::{DirStorage, Storage};

/// Why the snapshot itself was not loaded and `.prev` was.
#[derive(Debug)]
pub struct Fallback {
    /// What is wrong with the snapshot (damaged, or missing).
    pub problem: Error,
    /// Where the damaged snapshot was moved (`<SNAPSHOT>.corrupt-<time>`);
    /// `None` when it was missing.
    pub moved_to: Option<PathBuf>,
    /// Why moving it aside failed, if it did (it then stays in place and
    /// the next save moves it).
    pub move_error: Option<Error>,
}

/// What [`restore`] did.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadOutcome {
    /// No snapshot and no `.prev` exist: the program starts empty.
    NoSnapshot,
    /// The memfd already held data (a restart under the same watcher): the
    /// live memory wins and nothing was loaded.
    LiveKept {
        /// The memfd's size.
        len: u64,
    },
    /// A snapshot was loaded into the memfd.
    Loaded {
        /// The file loaded.
        path: PathBuf,
        /// Its header.
        header: Header,
        /// The memfd's chunk table after the load: the file's own table
        /// for a full snapshot; for a delta, computed from the memfd (a
        /// delta's table lists only the cells it replaces).
        chunks: Vec<Chunk>,
        /// The headers of the chain loaded, `header` first, down to its
        /// full snapshot (just `header` for a full snapshot).
        chain: Vec<Header>,
        /// Set when `.prev` was loaded instead of the snapshot.
        fallback: Option<Box<Fallback>>,
    },
}

/// Loads the snapshot at `snapshot` (or its `.prev`) into `memfd` if the
/// memfd is empty.
///
/// - memfd not empty: [`LoadOutcome::LiveKept`], nothing read.
/// - snapshot valid: loaded.
/// - snapshot damaged and `.prev` valid: `.prev` loaded, the snapshot moved
///   to `<SNAPSHOT>.corrupt-<time>` (after the load succeeded).
/// - snapshot missing and `.prev` valid: `.prev` loaded.
/// - both missing: [`LoadOutcome::NoSnapshot`].
/// - snapshot valid but holding more than `max_data_len` bytes:
///   [`Error::TooLarge`], `.prev` not tried (it is older; the user chose
///   the limit and decides), the memfd and every file left as they were.
/// - otherwise [`Error::NothingValid`] (or the I/O error): the memfd and
///   every file are left as they were.
///
/// Every file is read with bounded work: a header's counts and lengths are
/// checked against each other and the file's length before anything is
/// allocated, and the chunk table is read piece by piece (see
/// [`crate::verify`]), so a damaged or hostile file is refused as damage,
/// never by an abort.
///
/// `memfd` should be a private open file description (see
/// [`shm_fd::SharedFd::reopen`]). `now_ns` names the corrupt file. The
/// bytes read are counted into `progress`, if given (see [`Progress`]).
pub fn restore(
    snapshot: &Path,
    memfd: &File,
    max_data_len: u64,
    now_ns: u64,
    progress: Option<&Progress>,
) -> Result<LoadOutcome> {
    let len = memfd
        .metadata()
        .map_err(|e| Error::io("fstat", "the memfd", e))?
        .len();
    // Live memory is data, not size: a memfd that was only sized, or that
    // an earlier failed load punched clean, holds nothing to keep.
    if len > 0
        && !crate::image::data_extents(memfd, len)
            .map_err(|e| Error::io("looking for data in", "the memfd", e))?
            .is_empty()
    {
        return Ok(LoadOutcome::LiveKept { len });
    }
    let prev = prev_path(snapshot);
    let main_problem = match Verified::open(snapshot, max_data_len, progress) {
        Ok(s) => match load(snapshot.to_owned(), s, memfd, progress) {
            // Damaged between the check and the copy: try `.prev` as for
            // any other damage (the memfd was emptied again).
            Err(e) if e.is_corrupt() => e,
            other => return other,
        },
        Err(e) if e.is_corrupt() || e.is_not_found() => e,
        Err(e) => return Err(e),
    };
    let missing = main_problem.is_not_found();
    match Verified::open(&prev, max_data_len, progress) {
        Ok(s) => {
            let mut fallback = Fallback {
                problem: main_problem,
                moved_to: None,
                move_error: None,
            };
            // Load first: if the memfd refuses, nothing has been renamed.
            let mut outcome = load(prev, s, memfd, progress)?;
            if !missing {
                match DirStorage::for_snapshot(snapshot)
                    .map_err(|e| Error::io("moving aside", snapshot, e))
                    .and_then(|(mut storage, name)| {
                        let to = move_aside(&mut storage, &name, now_ns)?;
                        Ok(storage.path_of(&to))
                    }) {
                    Ok(to) => fallback.moved_to = Some(to),
                    Err(e) => fallback.move_error = Some(e),
                }
            }
            if let LoadOutcome::Loaded { fallback: f, .. } = &mut outcome {
                *f = Some(Box::new(fallback));
            }
            Ok(outcome)
        }
        Err(e) if e.is_not_found() && missing => Ok(LoadOutcome::NoSnapshot),
        Err(e) if e.is_not_found() => Err(Error::NothingValid {
            main: Box::new(main_problem),
            prev: None,
        }),
        Err(e) => Err(Error::NothingValid {
            main: Box::new(main_problem),
            prev: Some(Box::new(e)),
        }),
    }
}

/// Drops everything a failed load put into `memfd`: truncates it to 0, or,
/// when it is sealed against shrinking, punches out all its data (the size
/// stays; [`restore`] treats a memfd without data as empty).
fn discard(memfd: &File) -> io::Result<()> {
    match memfd.set_len(0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let len = memfd.metadata()?.len();
            let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
            nix::fcntl::fallocate(memfd, flags, 0, len as i64).map_err(io::Error::from)
        }
        other => other,
    }
}

/// A snapshot file whose every checksum was verified, with the bases it
/// applies to when it is a delta (head first).
struct Verified {
    links: Vec<Link<File>>,
}

impl Verified {
    fn open(path: &Path, max_data_len: u64, progress: Option<&Progress>) -> Result<Verified> {
        let (mut storage, name) =
            DirStorage::for_snapshot(path).map_err(|e| Error::io("opening", path, e))?;
        let series = series_of(&name);
        let links = verify_chain(&mut storage, &series, &name, max_data_len, progress).map_err(
            |e| match e {
                ReadError::Io(e) if e.kind() == io::ErrorKind::NotFound => {
                    Error::io("opening", path, e)
                }
                e => e.into_error(path),
            },
        )?;
        Ok(Verified { links })
    }
}

fn load(
    path: PathBuf,
    snapshot: Verified,
    memfd: &File,
    progress: Option<&Progress>,
) -> Result<LoadOutcome> {
    let Verified { links } = snapshot;
    let header = links[0].header;
    let copied = match &links[..] {
        [full] => copy_into(&full.reader, &full.header, &full.chunks, memfd, progress),
        chain => copy_chain_into(chain, memfd, progress),
    };
    if copied.is_err() {
        // Leave no half-loaded state behind: the watcher keeps the memfd,
        // and a later start would take a partial copy for live memory.
        discard(memfd)
            .map_err(|e| Error::io("emptying again after a failed load", "the memfd", e))?;
    }
    copied.map_err(|e| match e {
        ReadError::Io(e) if e.raw_os_error() == Some(libc::EPERM) => Error::io(
            "loading the snapshot into",
            "the memfd",
            io::Error::new(
                e.kind(),
                format!(
                    "it is sealed against growing to the snapshot's {} bytes",
                    header.data_len
                ),
            ),
        ),
        ReadError::Io(e) => Error::io("loading the snapshot into the memfd from", &path, e),
        e => e.into_error(&path),
    })?;
    let chain: Vec<Header> = links.iter().map(|l| l.header).collect();
    let chunks = if links.len() == 1 {
        links
            .into_iter()
            .next()
            .map(|l| l.chunks)
            .unwrap_or_default()
    } else {
        drop(links);
        crate::image::probe_table(memfd, header.chunk_size)
            .map_err(|e| Error::io("reading back", "the memfd", e))?
            .1
    };
    Ok(LoadOutcome::Loaded {
        path,
        header,
        chunks,
        chain,
        fallback: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;
    use crate::save::{SaveOptions, Saver};
    use crate::storage::DirStorage;
    use shm_fd::{CreateOptions, SharedFd};
    use std::ffi::OsStr;

    fn memfd() -> File {
        SharedFd::create("load-test", CreateOptions::default())
            .unwrap()
            .into_file()
    }

    fn save(dir: &Path, bytes: &[u8]) {
        let mut saver = Saver::new(
            DirStorage::new(dir),
            OsStr::new("s.snap"),
            SaveOptions::default(),
        );
        saver.save(&Image::from_bytes(bytes.to_vec()), 1).unwrap();
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn loaded(m: &File) -> Vec<u8> {
        Image::read_from(m).unwrap().to_dense()
    }

    #[test]
    fn loads_the_snapshot_and_keeps_live_memory() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        let m = memfd();
        assert!(matches!(
            restore(&path, &m, u64::MAX, 0, None).unwrap(),
            LoadOutcome::NoSnapshot
        ));
        save(d.path(), b"hello");
        assert!(matches!(
            restore(&path, &m, u64::MAX, 0, None).unwrap(),
            LoadOutcome::Loaded { fallback: None, .. }
        ));
        assert_eq!(loaded(&m), b"hello");
        // Non-empty memfd: live wins.
        save(d.path(), b"other");
        assert!(matches!(
            restore(&path, &m, u64::MAX, 0, None).unwrap(),
            LoadOutcome::LiveKept { len: 5 }
        ));
        assert_eq!(loaded(&m), b"hello");
    }

    #[test]
    fn a_load_that_fails_midway_leaves_no_data_and_the_next_start_loads_again() {
        // The file is damaged after it was verified (as by a concurrent
        // truncation or an I/O error): the memfd, which the watcher keeps,
        // must not hold a partial copy that a later start takes for live
        // memory and saves over the good snapshot.
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        let data = vec![0x5Au8; 3 << 20];
        save(d.path(), &data);
        let good = std::fs::read(&path).unwrap();
        let m = memfd(); // sealed against shrinking, as shm-fd's
        let verified = Verified::open(&path, u64::MAX, None).unwrap();
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = load(path.clone(), verified, &m, None).unwrap_err();
        assert!(e.is_corrupt(), "{e}");
        let len = m.metadata().unwrap().len();
        assert!(
            crate::image::data_extents(&m, len).unwrap().is_empty(),
            "a partial copy was left in the memfd"
        );
        // With the file good again, the next start loads it (the sized but
        // empty memfd is not "live memory").
        std::fs::write(&path, &good).unwrap();
        assert!(matches!(
            restore(&path, &m, u64::MAX, 0, None).unwrap(),
            LoadOutcome::Loaded { fallback: None, .. }
        ));
        assert_eq!(loaded(&m), data);
    }

    #[test]
    fn after_a_copy_that_met_damage_prev_is_loaded_into_the_same_memfd() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        save(d.path(), b"old");
        save(d.path(), b"new");
        let m = memfd();
        // Damage the main file between its verification and its copy.
        let verified = Verified::open(&path, u64::MAX, None).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            load(path.clone(), verified, &m, None)
                .unwrap_err()
                .is_corrupt()
        );
        // restore() sees the damage at verification now, and uses .prev.
        let out = restore(&path, &m, u64::MAX, 0, None).unwrap();
        assert!(
            matches!(
                out,
                LoadOutcome::Loaded {
                    fallback: Some(_),
                    ..
                }
            ),
            "{out:?}"
        );
        assert_eq!(loaded(&m), b"old");
    }

    #[test]
    fn a_save_and_a_load_count_every_byte_into_their_progress() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        let data = vec![0x5Au8; 3 << 20];
        let progress = Progress::new();
        let mut saver = Saver::new(
            DirStorage::new(d.path()),
            OsStr::new("s.snap"),
            SaveOptions::default(),
        );
        saver.set_progress(Some(progress.clone()));
        saver.save(&Image::from_bytes(data.clone()), 1).unwrap();
        assert_eq!(progress.get(), (3 << 20, 3 << 20));
        // A load reads it twice: verified, then copied.
        let m = memfd();
        let loaded = Progress::new();
        restore(&path, &m, u64::MAX, 0, Some(&loaded)).unwrap();
        assert_eq!(loaded.get(), (6 << 20, 6 << 20));
    }

    #[test]
    fn damaged_snapshot_falls_back_on_prev_and_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        save(d.path(), b"old");
        save(d.path(), b"new");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let m = memfd();
        let out = restore(&path, &m, u64::MAX, 1_700_000_000_000_000_000, None).unwrap();
        let LoadOutcome::Loaded {
            fallback: Some(f), ..
        } = out
        else {
            panic!("{out:?}")
        };
        assert!(f.problem.to_string().contains("CRC32"), "{}", f.problem);
        let moved = f.moved_to.unwrap();
        assert!(
            moved.ends_with("s.snap.corrupt-20231114T221320Z"),
            "{moved:?}"
        );
        assert_eq!(std::fs::read(&moved).unwrap(), bytes, "kept byte for byte");
        assert!(!path.exists());
        assert_eq!(loaded(&m), b"old");
    }

    #[test]
    fn missing_snapshot_with_prev_loads_prev() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        save(d.path(), b"old");
        save(d.path(), b"new");
        std::fs::remove_file(&path).unwrap();
        let m = memfd();
        let out = restore(&path, &m, u64::MAX, 0, None).unwrap();
        assert!(matches!(
            out,
            LoadOutcome::Loaded {
                fallback: Some(_),
                ..
            }
        ));
        assert_eq!(loaded(&m), b"old");
    }

    #[test]
    fn nothing_valid_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        save(d.path(), b"old");
        save(d.path(), b"new");
        let main = std::fs::read(&path).unwrap();
        std::fs::write(&path, &main[..200]).unwrap();
        let prev = prev_path(&path);
        let mut p = std::fs::read(&prev).unwrap();
        p.truncate(p.len() - 1);
        std::fs::write(&prev, &p).unwrap();
        let before = files(d.path());
        let m = memfd();
        let e = restore(&path, &m, u64::MAX, 0, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("s.snap is truncated") && msg.contains("s.snap.prev is truncated"),
            "{msg}"
        );
        assert!(e.is_corrupt());
        assert_eq!(files(d.path()), before);
        assert_eq!(m.metadata().unwrap().len(), 0);

        // Damaged snapshot and no .prev at all: refused too.
        std::fs::remove_file(&prev).unwrap();
        let e = restore(&path, &m, u64::MAX, 0, None).unwrap_err();
        assert!(e.to_string().contains("no .prev file"), "{e}");
    }

    #[test]
    fn a_fifo_in_the_snapshots_place_is_refused_not_waited_on() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        nix::unistd::mkfifo(
            &path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let e = restore(&path, &memfd(), u64::MAX, 0, None).unwrap_err();
        assert!(
            e.is_corrupt() && e.to_string().contains("is truncated"),
            "{e}"
        );
        // A save moves it aside instead of hanging on it, too.
        let mut saver = Saver::new(
            DirStorage::new(d.path()),
            OsStr::new("s.snap"),
            SaveOptions::default(),
        );
        let crate::save::SaveOutcome::Saved(r) =
            saver.save(&Image::from_bytes(b"x".to_vec()), 1).unwrap()
        else {
            panic!()
        };
        assert!(r.moved_corrupt.is_some());
    }

    #[test]
    fn oversized_snapshot_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        save(d.path(), &[1u8; 10_000]);
        let e = restore(&path, &memfd(), 9_999, 0, None).unwrap_err();
        assert!(e.to_string().contains("more than the maximum 9999"), "{e}");
    }

    /// A snapshot above the maximum is not damaged: refused with nothing
    /// changed, not moved aside with `.prev` loaded in its place (which
    /// the next saves would then overwrite).
    #[test]
    fn a_snapshot_above_the_maximum_is_refused_not_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        save(d.path(), &[1u8; 100]);
        save(d.path(), &[2u8; 10_000]);
        let before = files(d.path());
        let m = memfd();
        let e = restore(&path, &m, 5_000, 0, None).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::TooLarge {
                    data_len: 10_000,
                    max: 5_000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.is_unloadable() && !e.is_corrupt(), "{e}");
        assert!(
            e.to_string()
                .ends_with("s.snap holds 10000 bytes, more than the maximum 5000 (see --max-size)"),
            "{e}"
        );
        assert_eq!(files(d.path()), before);
        assert_eq!(m.metadata().unwrap().len(), 0);
        // A damaged snapshot whose .prev is above the maximum: nothing
        // valid, both named.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(100);
        std::fs::write(&path, &bytes).unwrap();
        let e = restore(&path, &m, 50, 0, None).unwrap_err();
        assert!(
            e.to_string().contains("s.snap is truncated")
                && e.to_string().contains("s.snap.prev holds 100 bytes"),
            "{e}"
        );
    }

    #[test]
    fn sealed_memfd_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        save(d.path(), b"data");
        let fd = SharedFd::create("sealed", CreateOptions::default()).unwrap();
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_GROW),
        )
        .unwrap();
        let e = restore(&path, &fd.into_file(), u64::MAX, 0, None).unwrap_err();
        assert!(e.to_string().contains("sealed against growing"), "{e}");
    }
}
