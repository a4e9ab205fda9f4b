//! The save protocol: write a temp file, fsync it, keep the previous
//! snapshot as `.prev`, rename the temp file over the snapshot, fsync the
//! directory. `docs/snapshot-format.md` lists what a crash after each step
//! leaves behind.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::capture::Captured;
use crate::error::{Damage, Error, Result};
use crate::format::{self, Chunk, DEFAULT_CHUNK_SIZE, HEADER_LEN, Header};
use crate::image::{Extent, Image, data_extents};
use crate::parallel;
use crate::snapshot::{DEFAULT_MAX_DATA_LEN, ReadError, file_time, read_header, verify};
use crate::storage::Storage;

/// After this many bytes written, the save asks the disk to start writing
/// them back (see [`Storage::start_writeback`]), so the final fsync finds
/// most of the file on its way.
const WRITEBACK_STEP: usize = 8 << 20;

/// How [`Saver`] writes snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveOptions {
    /// Bytes per checksummed chunk (a power of two in
    /// [`format::MIN_CHUNK_SIZE`]`..=`[`format::MAX_CHUNK_SIZE`]).
    pub chunk_size: u32,
    /// The most bytes handed to one write call.
    pub write_size: usize,
    /// Files claiming more data than this are treated as damaged.
    pub max_data_len: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            write_size: 1 << 20,
            max_data_len: DEFAULT_MAX_DATA_LEN,
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveReport {
    /// The new snapshot's generation.
    pub generation: u64,
    /// The memfd size saved (holes included).
    pub data_len: u64,
    /// The data bytes written (holes excluded).
    pub stored_len: u64,
    /// The snapshot file's length.
    pub file_len: u64,
    /// True when the previous snapshot was kept as `.prev`.
    pub kept_previous: bool,
    /// A damaged file found in the snapshot's place, moved aside (its new
    /// path and what is wrong with it) instead of being overwritten.
    pub moved_corrupt: Option<(PathBuf, Damage)>,
}

/// The result of [`Saver::save`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// A new snapshot is in place.
    Saved(SaveReport),
    /// The memfd held no data (size 0, or only holes): nothing was
    /// written, the snapshot is untouched.
    SkippedEmpty,
    /// The capture found nothing changed since the last one
    /// ([`Captured::Unchanged`]): nothing was written.
    SkippedUnchanged,
}

/// The `.prev` path of a snapshot: `<SNAPSHOT>.prev`.
pub fn prev_path(snapshot: &Path) -> PathBuf {
    let mut p = snapshot.as_os_str().to_owned();
    p.push(".prev");
    PathBuf::from(p)
}

fn with_suffix(name: &OsStr, prefix: &str, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(name);
    s.push(suffix);
    s
}

/// Moves the file `name` aside as `<name>.corrupt-<time>` (adding `-2`,
/// `-3`, ... if taken), never replacing anything. Returns the new name.
pub fn move_aside<S: Storage>(storage: &mut S, name: &OsStr, now_ns: u64) -> Result<OsString> {
    let base = with_suffix(name, "", &format!(".corrupt-{}", file_time(now_ns)));
    for n in 1u32.. {
        let to = if n == 1 {
            base.clone()
        } else {
            with_suffix(&base, "", &format!("-{n}"))
        };
        match storage.rename_noreplace(name, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(e) => {
                return Err(Error::io(
                    "moving aside the damaged",
                    storage.path_of(name),
                    e,
                ));
            }
        }
    }
    unreachable!("the loop returns")
}

/// Where a save reads the data from.
enum Source<'a> {
    /// A private copy.
    Image(&'a Image),
    /// The memfd itself, which nothing writes meanwhile.
    Memfd {
        file: &'a File,
        data_len: u64,
        extents: Vec<Extent>,
    },
}

impl Source<'_> {
    fn data_len(&self) -> u64 {
        match self {
            Source::Image(i) => i.data_len(),
            Source::Memfd { data_len, .. } => *data_len,
        }
    }

    fn extents(&self) -> &[Extent] {
        match self {
            Source::Image(i) => i.extents(),
            Source::Memfd { extents, .. } => extents,
        }
    }
}

/// The chunks `(memfd offset, length)` of `extents`: each extent split
/// into pieces of at most `chunk_size` bytes from its start.
fn chunk_layout(extents: &[Extent], chunk_size: u32) -> Vec<(u64, u32)> {
    let size = u64::from(chunk_size.max(1));
    let mut out = Vec::new();
    for e in extents {
        let mut off = 0;
        while off < e.len {
            let n = size.min(e.len - off);
            out.push((e.offset + off, n as u32));
            off += n;
        }
    }
    out
}

/// Saves images to one snapshot file through a [`Storage`], keeping track
/// of the generation and of what was last saved.
#[derive(Debug)]
pub struct Saver<S: Storage> {
    storage: S,
    name: OsString,
    prev_name: OsString,
    options: SaveOptions,
    generation: u64,
    /// The generation of the file we last wrote or fully verified in the
    /// snapshot's place: such a file is kept as `.prev` without re-reading.
    trusted: Option<u64>,
    /// The size and chunk table of the last saved or loaded state.
    last: Option<(u64, Vec<Chunk>)>,
    seq: u64,
}

impl<S: Storage> Saver<S> {
    /// A saver of the snapshot `name` in `storage`. The generation continues
    /// from the highest found in the snapshot's and `.prev`'s headers.
    pub fn new(mut storage: S, name: &OsStr, options: SaveOptions) -> Saver<S> {
        let prev_name = with_suffix(name, "", ".prev");
        let mut generation = 0;
        for n in [name, prev_name.as_os_str()] {
            // Any size: a file above the maximum still counts its saves.
            let header = storage
                .open(n)
                .ok()
                .flatten()
                .and_then(|r| read_header(&r, u64::MAX).ok());
            if let Some(h) = header {
                generation = generation.max(h.generation);
            }
        }
        Saver {
            storage,
            name: name.to_owned(),
            prev_name,
            options,
            generation,
            trusted: None,
            last: None,
            seq: 0,
        }
    }

    /// Tells the saver which state was loaded into the memfd: a later
    /// [`Saver::is_unchanged`] compares with it. `in_place` says the file
    /// now in the snapshot's place is the one loaded (and verified).
    pub fn note_loaded(&mut self, header: &Header, chunks: &[Chunk], in_place: bool) {
        self.generation = self.generation.max(header.generation);
        if in_place {
            self.trusted = Some(header.generation);
        }
        if header.chunk_size == self.options.chunk_size {
            self.last = Some((header.data_len, chunks.to_vec()));
        }
    }

    /// The generation of the last snapshot written or found.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The options.
    pub fn options(&self) -> &SaveOptions {
        &self.options
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Waits until the previous snapshot replaced by the last save is
    /// closed (its blocks freed), which happens in the background
    /// ([`Storage::retire`]).
    pub fn wait_retired(&mut self) {
        self.storage.wait_retired();
    }

    /// True when a memfd of `data_len` bytes with this chunk `table` (see
    /// [`crate::probe_table`]) holds what was last saved or loaded.
    pub fn is_unchanged(&self, data_len: u64, table: &[Chunk]) -> bool {
        matches!(&self.last, Some((len, t)) if *len == data_len && t == table)
    }

    /// Saves `image` as the new snapshot, stamped `saved_at_ns` (ns since
    /// the Unix epoch). An empty image (size 0) is never written.
    ///
    /// On error the snapshot and `.prev` are as they were and the temp file
    /// is removed, except when only the final directory fsync failed: then
    /// the new snapshot is in place but may not survive a machine crash.
    pub fn save(&mut self, image: &Image, saved_at_ns: u64) -> Result<SaveOutcome> {
        self.save_from(Source::Image(image), saved_at_ns)
    }

    /// Saves the memfd's current contents by streaming them to the file
    /// (no private copy of the whole): for a memfd nothing writes while the
    /// save runs, e.g. after the program exited ([`Captured::Quiescent`]).
    /// Otherwise as [`Saver::save`].
    ///
    /// [`Captured::Quiescent`]: crate::Captured::Quiescent
    pub fn save_memfd(&mut self, memfd: &File, saved_at_ns: u64) -> Result<SaveOutcome> {
        let fail = |e| Error::io("reading", "the memfd", e);
        let data_len = memfd.metadata().map_err(fail)?.len();
        let extents = data_extents(memfd, data_len).map_err(fail)?;
        self.save_from(
            Source::Memfd {
                file: memfd,
                data_len,
                extents,
            },
            saved_at_ns,
        )
    }

    /// Saves what a [`Capture`](crate::Capture) returned: the copy, or the
    /// quiescent memfd itself.
    pub fn save_captured(
        &mut self,
        captured: &Captured,
        memfd: &File,
        saved_at_ns: u64,
    ) -> Result<SaveOutcome> {
        match captured {
            Captured::Copied { image, .. } => self.save(image, saved_at_ns),
            Captured::Quiescent => self.save_memfd(memfd, saved_at_ns),
            Captured::Unchanged { .. } => Ok(SaveOutcome::SkippedUnchanged),
        }
    }

    fn save_from(&mut self, source: Source<'_>, saved_at_ns: u64) -> Result<SaveOutcome> {
        // No data at all (size 0, or only holes: a memfd that was sized
        // but never written, or one a failed load punched clean) is never
        // worth replacing a snapshot with.
        if source.data_len() == 0 || source.extents().is_empty() {
            return Ok(SaveOutcome::SkippedEmpty);
        }
        let generation = self.generation.saturating_add(1);
        let chunk_size = self.options.chunk_size;
        let layout = chunk_layout(source.extents(), chunk_size);
        let data_offset = format::data_offset_for(layout.len() as u64)
            .filter(|&o| usize::try_from(o).is_ok())
            .ok_or_else(|| {
                Error::io(
                    "encoding",
                    self.storage.path_of(&self.name),
                    std::io::Error::other("chunk table too large"),
                )
            })?;

        self.seq += 1;
        let pid = std::process::id();
        let tmp = with_suffix(&self.name, ".", &format!(".tmp-{pid}-{}", self.seq));
        let mut file = self
            .storage
            .create_new(&tmp)
            .map_err(|e| Error::io("creating", self.storage.path_of(&tmp), e))?;
        let written = self.write_temp(&mut file, &tmp, &source, &layout, data_offset, |table| {
            let table_bytes = format::encode_table(table);
            let header = Header {
                chunk_size,
                data_len: source.data_len(),
                generation,
                saved_at_ns,
                chunk_count: table.len() as u64,
                stored_len: table.iter().map(|c| u64::from(c.len)).sum(),
                data_offset,
                table_crc: crc32fast::hash(&table_bytes),
            };
            let mut front = vec![0u8; data_offset as usize];
            front[..HEADER_LEN].copy_from_slice(&header.encode());
            front[HEADER_LEN..HEADER_LEN + table_bytes.len()].copy_from_slice(&table_bytes);
            front
        });
        drop(file);
        let table = match written {
            Ok(t) => t,
            Err(e) => return Err(self.discard(&tmp, e)),
        };
        // The old `.prev`, held open so that replacing it does not free its
        // blocks inside the save (see `Storage::retire`).
        let mut old_prev = None;
        let kept = self.keep_previous(saved_at_ns, &mut old_prev);
        let result = match kept {
            Ok(moved_corrupt) => self.install(&tmp, &source, table, data_offset, moved_corrupt),
            Err(e) => Err(self.discard(&tmp, e)),
        };
        if let Some(file) = old_prev {
            self.storage.retire(file);
        }
        result
    }

    /// Renames the finished temp file over the snapshot and makes the
    /// directory durable.
    fn install(
        &mut self,
        tmp: &OsStr,
        source: &Source<'_>,
        table: Vec<Chunk>,
        data_offset: u64,
        moved_corrupt: Option<(OsString, Damage)>,
    ) -> Result<SaveOutcome> {
        let generation = self.generation.saturating_add(1);
        if let Err(e) = self.storage.rename(tmp, &self.name) {
            let e = Error::io(
                "renaming the new snapshot to",
                self.storage.path_of(&self.name),
                e,
            );
            return Err(self.discard(tmp, e));
        }
        // The new snapshot is in place from here on.
        let kept_previous = moved_corrupt.is_none() && self.trusted.is_some();
        let stored_len: u64 = table.iter().map(|c| u64::from(c.len)).sum();
        self.generation = generation;
        self.trusted = Some(generation);
        self.last = Some((source.data_len(), table));
        self.storage.sync_dir().map_err(|e| {
            Error::io(
                "fsync of the directory (the new snapshot may not survive a crash)",
                self.storage.path_of(OsStr::new(".")),
                e,
            )
        })?;
        Ok(SaveOutcome::Saved(SaveReport {
            generation,
            data_len: source.data_len(),
            stored_len,
            file_len: data_offset + stored_len,
            kept_previous,
            moved_corrupt: moved_corrupt.map(|(n, d)| (self.storage.path_of(&n), d)),
        }))
    }

    /// Writes the data in pieces of whole chunks with each chunk's CRC, then
    /// the header and table (made by `front` from the finished table) at
    /// offset 0, then fsyncs. Returns the table.
    ///
    /// A large private image has its CRCs computed on another thread while
    /// this one writes; the memfd itself is read once into a buffer that is
    /// both checksummed and written, so that a concurrent writer cannot make
    /// the file disagree with its checksums.
    fn write_temp(
        &mut self,
        file: &mut S::File,
        tmp: &OsStr,
        source: &Source<'_>,
        layout: &[(u64, u32)],
        data_offset: u64,
        front: impl FnOnce(&[Chunk]) -> Vec<u8>,
    ) -> Result<Vec<Chunk>> {
        let chunk_size = self.options.chunk_size;
        let table = match source {
            Source::Image(image) if parallel::workers(image.bytes().len() as u64) > 1 => {
                std::thread::scope(|s| {
                    let crcs = s.spawn(move || image.table(chunk_size));
                    let written = self.write_data(file, tmp, source, layout, data_offset, false);
                    let table = crcs
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    debug_assert!(
                        table
                            .iter()
                            .map(|c| (c.offset, c.len))
                            .eq(layout.iter().copied())
                    );
                    written.map(|_| table)
                })?
            }
            _ => self.write_data(file, tmp, source, layout, data_offset, true)?,
        };
        // The header last: a temp file cut short has no valid header.
        let front = front(&table);
        self.storage
            .write_at(file, 0, &front)
            .map_err(|e| Error::io("writing", self.storage.path_of(tmp), e))?;
        self.storage
            .sync_file(file)
            .map_err(|e| Error::io("fsync of", self.storage.path_of(tmp), e))?;
        Ok(table)
    }

    /// Writes the data region in pieces of whole chunks, asking the disk to
    /// start writing back every `WRITEBACK_STEP` bytes. Returns the chunk
    /// table, with CRCs only if `with_crcs` (else zero).
    fn write_data(
        &mut self,
        file: &mut S::File,
        tmp: &OsStr,
        source: &Source<'_>,
        layout: &[(u64, u32)],
        data_offset: u64,
        with_crcs: bool,
    ) -> Result<Vec<Chunk>> {
        let piece_max = self
            .options
            .write_size
            .max(self.options.chunk_size as usize);
        let mut table = Vec::with_capacity(layout.len());
        let mut buf = Vec::new();
        let mut pos = 0usize; // in the data region
        let mut hinted = 0usize; // data before this is being written back
        let mut i = 0;
        while i < layout.len() {
            let mut j = i;
            let mut len = 0usize;
            while j < layout.len() && (j == i || len + layout[j].1 as usize <= piece_max) {
                len += layout[j].1 as usize;
                j += 1;
            }
            let piece: &[u8] = match source {
                Source::Image(image) => &image.bytes()[pos..pos + len],
                Source::Memfd { file: memfd, .. } => {
                    buf.resize(len, 0);
                    let mut at = 0;
                    for &(offset, n) in &layout[i..j] {
                        memfd
                            .read_exact_at(&mut buf[at..at + n as usize], offset)
                            .map_err(|e| Error::io("reading", "the memfd", e))?;
                        at += n as usize;
                    }
                    &buf
                }
            };
            let mut at = 0;
            for &(offset, n) in &layout[i..j] {
                let bytes = &piece[at..at + n as usize];
                let crc = if with_crcs { crc32fast::hash(bytes) } else { 0 };
                table.push(Chunk {
                    offset,
                    len: n,
                    crc,
                });
                at += n as usize;
            }
            self.storage
                .write_at(file, data_offset + pos as u64, piece)
                .map_err(|e| Error::io("writing", self.storage.path_of(tmp), e))?;
            pos += len;
            i = j;
            if pos - hinted >= WRITEBACK_STEP {
                self.storage.start_writeback(
                    file,
                    data_offset + hinted as u64,
                    (pos - hinted) as u64,
                );
                hinted = pos;
            }
        }
        Ok(table)
    }

    /// Keeps the file now in the snapshot's place as `.prev` when it is
    /// valid; moves it aside when it is damaged. Sets `trusted` to whether
    /// a previous snapshot was kept.
    ///
    /// Only damage ([`ReadError::Damaged`]) makes a file "damaged": a file
    /// that cannot be read is an error of this save, and any size is
    /// accepted (the maximum is about loading, and a file above it is
    /// still somebody's good snapshot).
    fn keep_previous(
        &mut self,
        now_ns: u64,
        old_prev: &mut Option<S::Reader>,
    ) -> Result<Option<(OsString, Damage)>> {
        let path = self.storage.path_of(&self.name);
        let reader = match self.storage.open(&self.name) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.trusted = None;
                return Ok(None);
            }
            Err(e) => return Err(Error::io("opening", path, e)),
        };
        let known = matches!((read_header(&reader, u64::MAX), self.trusted),
            (Ok(h), Some(g)) if h.generation == g);
        if !known {
            match verify(&reader, u64::MAX) {
                Ok((h, _)) => self.trusted = Some(h.generation),
                Err(ReadError::Damaged(damage)) => {
                    drop(reader);
                    let moved = move_aside(&mut self.storage, &self.name, now_ns)?;
                    self.trusted = None;
                    return Ok(Some((moved, damage)));
                }
                Err(e) => return Err(e.into_error(&path)),
            }
        }
        drop(reader);
        // Not an error if this fails: the rename then frees it inline.
        *old_prev = self.storage.open(&self.prev_name).ok().flatten();
        self.seq += 1;
        let pid = std::process::id();
        let link = with_suffix(&self.name, ".", &format!(".prev-tmp-{pid}-{}", self.seq));
        self.storage.link(&self.name, &link).map_err(|e| {
            Error::io(
                "linking the previous snapshot as",
                self.storage.path_of(&link),
                e,
            )
        })?;
        if let Err(e) = self.storage.rename(&link, &self.prev_name) {
            let _ = self.storage.remove(&link);
            return Err(Error::io(
                "renaming the previous snapshot to",
                self.storage.path_of(&self.prev_name),
                e,
            ));
        }
        Ok(None)
    }

    fn discard(&mut self, tmp: &OsStr, e: Error) -> Error {
        // Best effort: after a crash-like failure this fails too, and the
        // next start removes the file (see `remove_stale_temps`).
        let _ = self.storage.remove(tmp);
        e
    }
}

/// Removes temp files a killed `shm-restore` left next to the snapshot
/// `name` in `dir` (`.<name>.tmp-<pid>-<n>`, `.<name>.prev-tmp-<pid>-<n>`
/// of processes that no longer exist). Returns the removed paths.
pub fn remove_stale_temps(dir: &Path, name: &OsStr) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    let prefixes = [
        with_suffix(name, ".", ".tmp-"),
        with_suffix(name, ".", ".prev-tmp-"),
    ];
    for entry in entries.flatten() {
        let file = entry.file_name();
        let bytes = file.as_encoded_bytes();
        for prefix in &prefixes {
            let Some(rest) = bytes.strip_prefix(prefix.as_encoded_bytes()) else {
                continue;
            };
            let Some(pid) = std::str::from_utf8(rest)
                .ok()
                .and_then(|r| r.split_once('-'))
                .and_then(|(pid, seq)| {
                    seq.parse::<u64>().ok()?;
                    pid.parse::<i32>().ok()
                })
            else {
                continue;
            };
            let alive = pid > 0
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    != Err(nix::errno::Errno::ESRCH);
            if !alive && std::fs::remove_file(entry.path()).is_ok() {
                removed.push(entry.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests;
