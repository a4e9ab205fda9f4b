//! `--import-raw RAW SNAPSHOT`: a raw image of a memfd (what the original
//! shm-restore wrote: the memfd's bytes as a plain file) saved as a
//! checksummed snapshot, by the same save as at a command's exit.

use std::fs::File;
use std::io::ErrorKind;
use std::path::Path;

use shm_restore::{DirStorage, Error, SaveOutcome, Saver, now_ns};

use crate::supervise::check_writable_dir;
use crate::{
    Args, EXIT_CANNOT_CREATE, EXIT_DATA, EXIT_NO_INPUT, EXIT_SAVE_FAILED, EXIT_USAGE, Failure, warn,
};

/// Imports `raw` into `args.snapshot`; returns the exit code.
pub(crate) fn run(args: &Args, raw: &Path) -> Result<u8, Failure> {
    let snapshot = &args.snapshot;
    let (raw_shown, shown) = (raw.display(), snapshot.display());
    // RAW first: when it cannot be read, nothing else is looked at or made.
    let file =
        open_raw(raw).map_err(|why| Failure(EXIT_NO_INPUT, format!("{raw_shown}: {why}")))?;
    // Already one of our snapshots (the arguments swapped, or the snapshot
    // itself): its header would become the program's data.
    let mut head = [0u8; 8];
    if std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0).is_ok()
        && head == shm_restore::format::MAGIC
    {
        return Err(Failure(
            EXIT_DATA,
            format!(
                "{raw_shown} is a shm-restore snapshot already, not a raw memfd image: not \
                 imported (check the order of the arguments)"
            ),
        ));
    }
    let (storage, name) = DirStorage::for_snapshot(snapshot)
        .map_err(|e| Failure(EXIT_USAGE, format!("{shown}: {e}")))?;
    check_writable_dir(storage.dir())
        .map_err(|why| Failure(EXIT_CANNOT_CREATE, format!("{shown}: {why}")))?;
    // Not a guard against a save running meanwhile: import while no
    // shm-restore uses SNAPSHOT (its next save would replace the import).
    if !args.force && std::fs::symlink_metadata(snapshot).is_ok() {
        return Err(Failure(
            EXIT_CANNOT_CREATE,
            format!(
                "{shown} exists: not replaced (--force replaces it, keeping a valid one as \
                 {shown}.prev)"
            ),
        ));
    }
    let mut saver = Saver::new(storage, &name, args.save_options);
    // The raw file is a quiescent image: saved as a memfd is after its
    // command exited, holes (SEEK_DATA) left out.
    match saver.save_memfd(&file, now_ns()) {
        Ok(SaveOutcome::Saved(r)) => {
            if let Some((moved, damage)) = &r.moved_corrupt {
                warn(format_args!(
                    "WARNING: {shown} {damage}; kept as {} (not as {shown}.prev)",
                    moved.display()
                ));
            }
            if !args.quiet {
                let kept = if r.kept_previous {
                    format!("; the replaced one is kept as {shown}.prev")
                } else {
                    String::new()
                };
                warn(format_args!(
                    "imported {raw_shown} into {shown} (generation {}, {} bytes, {} stored){kept}",
                    r.generation, r.data_len, r.stored_len
                ));
            }
            Ok(0)
        }
        Ok(SaveOutcome::SkippedEmpty | SaveOutcome::SkippedUnchanged) => Err(Failure(
            EXIT_DATA,
            format!(
                "{raw_shown} holds no data (empty, or only holes): nothing to import, {shown} not written"
            ),
        )),
        Err(Error::MemfdTooLarge { data_len, max }) => Err(Failure(
            EXIT_DATA,
            format!(
                "{raw_shown} holds {data_len} bytes, more than the maximum {max} (see --max-size): \
                 not imported, since no start could load such a snapshot"
            ),
        )),
        Err(e @ Error::AfterCommit(_)) => Err(Failure(EXIT_SAVE_FAILED, e.to_string())),
        Err(e) => Err(Failure(
            EXIT_SAVE_FAILED,
            format!("importing {raw_shown} failed: {e}; every file is as it was"),
        )),
    }
}

/// Opens RAW for reading, a regular file only (SEEK_DATA and a size).
fn open_raw(raw: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused
    // below); on a regular file the flag changes nothing.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(raw)
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => "cannot read it: no such file".to_owned(),
            _ => format!("cannot read it: {e}"),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("cannot import it: not a regular file".to_owned());
    }
    Ok(file)
}
