//! The save protocol: write a temp file, fsync it, keep the previous
//! snapshot as `.prev`, rename the temp file over the snapshot, fsync the
//! directory. `docs/snapshot-format.md` lists what a crash after each step
//! leaves behind.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::capture::Captured;
use crate::chain::{cell_aligned, changed_cells};
use crate::error::{Damage, Error, InvalidOption, Result};
use crate::format::{self, Chunk, DEFAULT_CHUNK_SIZE, HEADER_LEN, Header};
use crate::image::{Extent, Image, data_extents};
use crate::parallel;
use crate::progress::Progress;
use crate::snapshot::{DEFAULT_MAX_DATA_LEN, ReadError, file_time, read_header, verify};
use crate::storage::Storage;

/// After this many bytes written, the save asks the disk to start writing
/// them back (see [`Storage::start_writeback`]), so the final fsync finds
/// most of the file on its way.
const WRITEBACK_STEP: usize = 8 << 20;

/// How [`Saver`] writes snapshots. Always valid: built by
/// [`SaveOptions::builder`] (or [`SaveOptions::default`]), which checks
/// every value, and read-only afterwards.
///
/// ```
/// use shm_restore::SaveOptions;
/// let options = SaveOptions::builder().max_data_len(1 << 30).build()?;
/// assert_eq!(options.max_data_len(), 1 << 30);
/// assert!(SaveOptions::builder().chunk_size(1000).build().is_err());
/// # Ok::<(), shm_restore::InvalidOption>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveOptions {
    chunk_size: u32,
    write_size: usize,
    max_data_len: u64,
    max_chain: u32,
}

impl SaveOptions {
    /// The smallest `write_size` accepted.
    pub const MIN_WRITE_SIZE: usize = 4096;
    /// The largest `write_size` accepted (one write's buffer).
    pub const MAX_WRITE_SIZE: usize = 1 << 30;
    /// The largest `max_data_len` accepted: the largest size a file or a
    /// memfd can have (`off_t`).
    pub const MAX_DATA_LEN: u64 = i64::MAX as u64;
    /// The default [`SaveOptions::max_chain`].
    pub const DEFAULT_MAX_CHAIN: u32 = 8;

    /// A builder starting from the defaults: 256 KiB chunks
    /// ([`format::DEFAULT_CHUNK_SIZE`]), writes of up to 1 MiB (or one
    /// chunk, if larger), at most [`DEFAULT_MAX_DATA_LEN`] bytes of data.
    pub fn builder() -> SaveOptionsBuilder {
        SaveOptionsBuilder {
            chunk_size: DEFAULT_CHUNK_SIZE,
            write_size: None,
            max_data_len: DEFAULT_MAX_DATA_LEN,
            max_chain: SaveOptions::DEFAULT_MAX_CHAIN,
        }
    }

    /// The most deltas a chain holds above its full snapshot (0: every
    /// save is full). A save writes a delta (format version 2: only the
    /// cells of `chunk_size` bytes that changed since the last save) when
    /// the saver knows what the snapshot in place holds (it wrote or loaded
    /// it), the chain is shorter than this, and the chain's deltas
    /// together stay within half the bytes of its full snapshot; otherwise
    /// it writes a full snapshot, which ends the chain (compaction).
    pub fn max_chain(&self) -> u32 {
        self.max_chain
    }

    /// Bytes per checksummed chunk: a power of two in
    /// [`format::MIN_CHUNK_SIZE`]`..=`[`format::MAX_CHUNK_SIZE`].
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The most bytes handed to one write call: at least one chunk, at
    /// most [`SaveOptions::MAX_WRITE_SIZE`].
    pub fn write_size(&self) -> usize {
        self.write_size
    }

    /// The most data (the memfd's size, holes included) a snapshot may
    /// hold: a larger memfd is not saved ([`Error::MemfdTooLarge`]), and a
    /// file declaring more is not loaded. `1..=`[`SaveOptions::MAX_DATA_LEN`].
    pub fn max_data_len(&self) -> u64 {
        self.max_data_len
    }
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            write_size: (1 << 20).max(DEFAULT_CHUNK_SIZE as usize),
            max_data_len: DEFAULT_MAX_DATA_LEN,
            max_chain: SaveOptions::DEFAULT_MAX_CHAIN,
        }
    }
}

/// Builds [`SaveOptions`]; [`SaveOptionsBuilder::build`] checks every
/// value and their combination.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct SaveOptionsBuilder {
    chunk_size: u32,
    write_size: Option<usize>,
    max_data_len: u64,
    max_chain: u32,
}

impl SaveOptionsBuilder {
    /// Bytes per checksummed chunk (see [`SaveOptions::chunk_size`]).
    pub fn chunk_size(mut self, bytes: u32) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// The most bytes handed to one write call (see
    /// [`SaveOptions::write_size`]); by default 1 MiB, or one chunk if
    /// chunks are larger.
    pub fn write_size(mut self, bytes: usize) -> Self {
        self.write_size = Some(bytes);
        self
    }

    /// The most data a snapshot may hold (see
    /// [`SaveOptions::max_data_len`]).
    pub fn max_data_len(mut self, bytes: u64) -> Self {
        self.max_data_len = bytes;
        self
    }

    /// The most deltas above a full snapshot (see
    /// [`SaveOptions::max_chain`]): `0..=`[`format::MAX_DEPTH`].
    pub fn max_chain(mut self, deltas: u32) -> Self {
        self.max_chain = deltas;
        self
    }

    /// The options, or the first value out of range: a chunk size that is
    /// not a power of two in 4 KiB..=64 MiB, a write size smaller than a
    /// chunk or larger than 1 GiB, a maximum data size of 0 or beyond
    /// what a file can hold.
    pub fn build(self) -> Result<SaveOptions, InvalidOption> {
        let chunk_size = self.chunk_size;
        if !chunk_size.is_power_of_two()
            || !(format::MIN_CHUNK_SIZE..=format::MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(InvalidOption {
                option: "chunk_size",
                value: u64::from(chunk_size),
                accepted: format!(
                    "a power of two in {}..={}",
                    format::MIN_CHUNK_SIZE,
                    format::MAX_CHUNK_SIZE
                ),
            });
        }
        // A write holds whole chunks: one smaller than a chunk could not.
        let least = (chunk_size as usize).max(SaveOptions::MIN_WRITE_SIZE);
        let write_size = self
            .write_size
            .unwrap_or_else(|| (1 << 20).max(chunk_size as usize));
        if !(least..=SaveOptions::MAX_WRITE_SIZE).contains(&write_size) {
            return Err(InvalidOption {
                option: "write_size",
                value: write_size as u64,
                accepted: format!(
                    "{least}..={} (at least one chunk of chunk_size {chunk_size})",
                    SaveOptions::MAX_WRITE_SIZE
                ),
            });
        }
        if !(1..=SaveOptions::MAX_DATA_LEN).contains(&self.max_data_len) {
            return Err(InvalidOption {
                option: "max_data_len",
                value: self.max_data_len,
                accepted: format!("1..={}", SaveOptions::MAX_DATA_LEN),
            });
        }
        if self.max_chain > format::MAX_DEPTH {
            return Err(InvalidOption {
                option: "max_chain",
                value: u64::from(self.max_chain),
                accepted: format!("0..={}", format::MAX_DEPTH),
            });
        }
        Ok(SaveOptions {
            chunk_size,
            write_size,
            max_data_len: self.max_data_len,
            max_chain: self.max_chain,
        })
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
    /// `Some` when the save wrote a delta: the snapshot it applies to.
    pub base: Option<format::Base>,
    /// When the delta brought its chain to its bounds and the chain was
    /// compacted right after: the generation of the full snapshot written
    /// (of the same state, from the chain's files).
    pub compacted: Option<u64>,
    /// When that compaction failed: why (the delta is in place, and the
    /// next save tries again).
    pub compaction_failed: Option<String>,
    /// True when the previous snapshot was kept as `.prev`.
    pub kept_previous: bool,
    /// A damaged file found in the snapshot's place, kept under the name
    /// `<SNAPSHOT>.corrupt-<time>` (its new path and what is wrong with it)
    /// instead of being overwritten or kept as `.prev`.
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
    aside(
        storage,
        name,
        now_ns,
        "moving aside the damaged",
        |s, from, to| s.rename_noreplace(from, to),
    )
}

/// Gives the file `name` a second name `<name>.corrupt-<time>` (as
/// [`move_aside`] names it), so that replacing `name` keeps it and a save
/// that fails before replacing it can drop the name again.
fn link_aside<S: Storage>(storage: &mut S, name: &OsStr, now_ns: u64) -> Result<OsString> {
    aside(
        storage,
        name,
        now_ns,
        "keeping the damaged",
        |s, from, to| s.link(from, to),
    )
}

fn aside<S: Storage>(
    storage: &mut S,
    name: &OsStr,
    now_ns: u64,
    op: &'static str,
    mut place: impl FnMut(&mut S, &OsStr, &OsStr) -> std::io::Result<()>,
) -> Result<OsString> {
    let base = with_suffix(name, "", &format!(".corrupt-{}", file_time(now_ns)));
    for n in 1u32.. {
        let to = if n == 1 {
            base.clone()
        } else {
            with_suffix(&base, "", &format!("-{n}"))
        };
        match place(storage, name, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(e) => return Err(Error::io(op, storage.path_of(name), e)),
        }
    }
    unreachable!("the loop returns")
}

/// The file in the snapshot's place when a save begins, and the second
/// name the save gave it (removed again if the save fails before the new
/// snapshot replaces it).
enum Previous {
    /// No file.
    None,
    /// A valid snapshot, linked as `.NAME.prev-tmp-*`: renamed over `.prev`
    /// once the new snapshot is in place.
    Keep { link: OsString },
    /// A damaged file, linked as `NAME.corrupt-<time>`.
    Damaged { link: OsString, damage: Damage },
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
    /// A copy of the cells that changed since a delta basis.
    Changes(&'a Changes),
    /// The state a chain of snapshot files holds, read from them (a
    /// compaction).
    Chain(&'a dyn crate::chain::Pieces),
}

impl Source<'_> {
    fn data_len(&self) -> u64 {
        match self {
            Source::Image(i) => i.data_len(),
            Source::Memfd { data_len, .. } => *data_len,
            Source::Changes(c) => c.data_len,
            Source::Chain(c) => c.data_len(),
        }
    }

    /// The data extents of the whole state; for [`Source::Changes`], of
    /// the changed cells only.
    fn extents(&self) -> &[Extent] {
        match self {
            Source::Image(i) => i.extents(),
            Source::Memfd { extents, .. } => extents,
            Source::Changes(c) => c.image.extents(),
            Source::Chain(c) => c.extents(),
        }
    }

    /// True when the state holds no data at all.
    fn is_empty(&self) -> bool {
        match self {
            Source::Changes(c) => c.table.is_empty(),
            _ => self.extents().is_empty(),
        }
    }
}

/// What a capture compares with to copy only the cells that changed since
/// the snapshot in place ([`Saver::delta_basis`],
/// [`CaptureMethod::capture_changes`]): that snapshot's generation, its
/// whole chunk table, and how many bytes a delta may hold before the
/// chain is compacted instead.
///
/// [`CaptureMethod::capture_changes`]: crate::CaptureMethod::capture_changes
#[derive(Debug, Clone)]
pub struct DeltaBasis {
    pub(crate) generation: u64,
    pub(crate) data_len: u64,
    pub(crate) chunk_size: u32,
    pub(crate) table: Vec<Chunk>,
    pub(crate) budget: u64,
}

impl DeltaBasis {
    /// The generation of the snapshot the changes are counted from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The most bytes of changed cells a delta may hold; a capture that
    /// finds more copies the whole state (the save is then full).
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

/// The cells that changed since a [`DeltaBasis`], copied at one instant
/// with the whole state's chunk table ([`Captured::Changes`]).
#[derive(Debug)]
pub struct Changes {
    pub(crate) basis_generation: u64,
    pub(crate) data_len: u64,
    /// The whole state's chunk table.
    pub(crate) table: Vec<Chunk>,
    /// `(offset, length)` of each changed cell.
    pub(crate) cells: Vec<(u64, u32)>,
    /// The changed cells' data (the rest of the image is holes).
    pub(crate) image: Image,
    /// How many cells the program's dirty map marked, when the capture
    /// used it.
    pub(crate) marked: Option<u64>,
}

impl Changes {
    /// The memfd's size.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// `(memfd offset, length)` of each changed cell.
    pub fn cells(&self) -> &[(u64, u32)] {
        &self.cells
    }

    /// When the capture read only the cells the program marked in its
    /// shm-snapshot dirty map (and the header's, and a few spot checks):
    /// how many cells of the map were marked. `None` when it read every
    /// cell (no map, a change of size, or a spot check that found an
    /// unmarked change).
    pub fn marked(&self) -> Option<u64> {
        self.marked
    }
}

/// The chunks `(memfd offset, length)` of `extents`: each extent split at
/// every multiple of `chunk_size` ([`format::split_at_cells`]).
fn chunk_layout(extents: &[Extent], chunk_size: u32) -> Vec<(u64, u32)> {
    extents
        .iter()
        .flat_map(|e| format::split_at_cells(e.offset, e.len, chunk_size))
        .collect()
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
    /// The chain the snapshot in place heads, when this saver wrote or
    /// loaded it: what a delta would apply to.
    chain: Option<ChainState>,
    /// Set while a compaction saves: the save is a full one.
    full_only: bool,
    /// The generation whose chain name this saver linked and made durable
    /// (the directory fsync of its save succeeded).
    named_durably: Option<u64>,
    seq: u64,
    /// Where saves count the bytes they write.
    progress: Option<Progress>,
}

/// The snapshot in place as a chain: a full snapshot (`depth` 0) or the
/// newest delta of a chain.
#[derive(Debug, Clone, Copy)]
struct ChainState {
    /// Its generation.
    generation: u64,
    /// Its header CRC.
    header_crc: u32,
    /// Deltas in the chain (0 for a full snapshot).
    depth: u32,
    /// The bytes the chain's deltas store together.
    delta_bytes: u64,
    /// The bytes the chain's full snapshot stores.
    full_bytes: u64,
}

impl ChainState {
    /// The chain `headers` make, head first, down to a full snapshot.
    fn of(headers: &[Header]) -> Option<ChainState> {
        let (head, full) = (headers.first()?, headers.last()?);
        if full.is_delta() {
            return None;
        }
        Some(ChainState {
            generation: head.generation,
            header_crc: head.crc(),
            depth: head.base.map_or(0, |b| b.depth),
            delta_bytes: headers[..headers.len() - 1]
                .iter()
                .map(|h| h.stored_len)
                .sum(),
            full_bytes: full.stored_len,
        })
    }
}

/// What a delta save writes: the cells that changed, and the table of the
/// whole current state (which the next save compares with).
struct DeltaPlan {
    /// `(memfd offset, length)` of each changed cell.
    cells: Vec<(u64, u32)>,
    /// The current state's chunk table.
    table: Vec<Chunk>,
    /// What the delta applies to.
    base: format::Base,
}

/// Reads any range of an image as the memfd would: holes as zeros.
struct Dense<'a> {
    image: &'a Image,
    /// Where each extent's bytes start in `image.bytes()`.
    starts: Vec<usize>,
}

impl<'a> Dense<'a> {
    fn new(image: &'a Image) -> Dense<'a> {
        let mut at = 0usize;
        let starts = image
            .extents()
            .iter()
            .map(|e| {
                let here = at;
                at += e.len as usize;
                here
            })
            .collect();
        Dense { image, starts }
    }

    /// The bytes at `offset..offset + len` when one extent holds them all
    /// (no hole among them): a slice of the image, no copy.
    fn slice(&self, offset: u64, len: u64) -> Option<&'a [u8]> {
        let extents = self.image.extents();
        let k = extents.partition_point(|e| e.offset + e.len <= offset);
        let e = extents.get(k)?;
        if e.offset > offset || offset + len > e.offset + e.len {
            return None;
        }
        let start = self.starts[k] + (offset - e.offset) as usize;
        self.image.bytes().get(start..start + len as usize)
    }

    /// Fills `out` (zeroed by the caller) with the bytes at `offset`.
    fn read(&self, offset: u64, out: &mut [u8]) {
        let end = offset + out.len() as u64;
        let extents = self.image.extents();
        // The first extent that ends after `offset`.
        let first = extents.partition_point(|e| e.offset + e.len <= offset);
        for (k, e) in extents.iter().enumerate().skip(first) {
            if e.offset >= end {
                break;
            }
            let from = e.offset.max(offset);
            let to = (e.offset + e.len).min(end);
            let src = self.starts[k] + (from - e.offset) as usize;
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&self.image.bytes()[src..src + (to - from) as usize]);
        }
    }
}

impl<S: Storage> Saver<S> {
    /// A saver of the snapshot `name` in `storage`. The generation continues
    /// from the highest found in the snapshot's and `.prev`'s headers and
    /// in the names of the series' `.gen-` files.
    pub fn new(mut storage: S, name: &OsStr, options: SaveOptions) -> Saver<S> {
        let prev_name = with_suffix(name, "", ".prev");
        let mut generation = storage
            .list()
            .unwrap_or_default()
            .iter()
            .filter_map(|n| crate::chain::generation_of_base(name, n))
            .max()
            .unwrap_or(0);
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
            chain: None,
            full_only: false,
            named_durably: None,
            seq: 0,
            progress: None,
        }
    }

    /// Counts the data bytes the following saves write into `progress`
    /// (each save begins it again at the bytes it stores); `None` stops
    /// counting.
    pub fn set_progress(&mut self, progress: Option<Progress>) {
        self.progress = progress;
    }

    /// Tells the saver which state was loaded into the memfd: `chain` is
    /// the loaded snapshot's header followed by those of its bases (one
    /// header for a full snapshot), `chunks` the memfd's chunk table after
    /// the load ([`LoadOutcome::Loaded`]). A later [`Saver::is_unchanged`]
    /// compares with it. `in_place` says the file now in the snapshot's
    /// place is the one loaded (and verified): the next save may then be a
    /// delta on it.
    ///
    /// [`LoadOutcome::Loaded`]: crate::LoadOutcome::Loaded
    pub fn note_loaded(&mut self, chain: &[Header], chunks: &[Chunk], in_place: bool) {
        let Some(header) = chain.first() else {
            return;
        };
        self.generation = self.generation.max(header.generation);
        if in_place {
            self.trusted = Some(header.generation);
            self.chain = ChainState::of(chain);
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

    /// True when a memfd of `data_len` bytes with this chunk `table` (the
    /// table [`Image::table`] computes for it) holds what was last saved or
    /// loaded.
    pub fn is_unchanged(&self, data_len: u64, table: &[Chunk]) -> bool {
        matches!(&self.last, Some((len, t)) if *len == data_len && t == table)
    }

    /// Saves `image` as the new snapshot, stamped `saved_at_ns` (ns since
    /// the Unix epoch). An empty image (size 0, or no data) is never
    /// written; one larger than [`SaveOptions::max_data_len`] is refused
    /// ([`Error::MemfdTooLarge`]) before anything is written.
    ///
    /// On error every file is as it was (the snapshot, `.prev`, any
    /// damaged file in the snapshot's place) and the temp file is removed,
    /// except when a step after the new snapshot replaced the old one
    /// failed: keeping the old one as `.prev` (the new one is in place,
    /// `.prev` is as it was) or the final directory fsync (the new one is
    /// in place but may not survive a machine crash). The message says so.
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

    /// Saves what a [`CaptureMethod`](crate::CaptureMethod) returned: the copy, or the
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
            Captured::Changes { changes, .. } => {
                self.save_from(Source::Changes(changes), saved_at_ns)
            }
            Captured::Unchanged { .. } => Ok(SaveOutcome::SkippedUnchanged),
        }
    }

    fn save_from(&mut self, source: Source<'_>, saved_at_ns: u64) -> Result<SaveOutcome> {
        // No data at all (size 0, or only holes: a memfd that was sized
        // but never written, or one a failed load punched clean) is never
        // worth replacing a snapshot with.
        if source.data_len() == 0 || source.is_empty() {
            return Ok(SaveOutcome::SkippedEmpty);
        }
        // A snapshot no start would load is not worth replacing one that
        // loads: refused before anything is written.
        if source.data_len() > self.options.max_data_len {
            return Err(Error::MemfdTooLarge {
                data_len: source.data_len(),
                max: self.options.max_data_len,
            });
        }
        let delta = self.plan_delta(&source)?;
        if let Some(plan) = &delta
            && plan.cells.is_empty()
            && self.last.as_ref().map(|l| l.0) == Some(source.data_len())
        {
            return Ok(SaveOutcome::SkippedUnchanged);
        }
        let generation = self.generation.saturating_add(1);
        let chunk_size = self.options.chunk_size;
        let layout = match (&delta, &source) {
            (Some(plan), _) => plan.cells.clone(),
            (None, Source::Chain(c)) => c.pieces().iter().map(|p| (p.offset, p.len)).collect(),
            (None, _) => chunk_layout(source.extents(), chunk_size),
        };
        let base = delta.as_ref().map(|p| p.base);
        if let Some(p) = &self.progress {
            p.begin(layout.iter().map(|&(_, n)| u64::from(n)).sum());
        }
        let data_offset = format::data_offset_for(layout.len() as u64)
            .filter(|&o| usize::try_from(o).is_ok())
            .ok_or_else(|| {
                Error::io(
                    "encoding",
                    self.storage.path_of(&self.name),
                    std::io::Error::other("chunk table too large"),
                )
            })?;
        let header_for = |table: &[Chunk]| Header {
            chunk_size,
            data_len: source.data_len(),
            generation,
            saved_at_ns,
            chunk_count: table.len() as u64,
            stored_len: table.iter().map(|c| u64::from(c.len)).sum(),
            data_offset,
            table_crc: crc32fast::hash(&format::encode_table(table)),
            base,
        };

        self.seq += 1;
        let pid = std::process::id();
        let tmp = with_suffix(&self.name, ".", &format!(".tmp-{pid}-{}", self.seq));
        let mut file = self
            .storage
            .create_new(&tmp)
            .map_err(|e| Error::io("creating", self.storage.path_of(&tmp), e))?;
        let front = |table: &[Chunk]| {
            let table_bytes = format::encode_table(table);
            let mut front = vec![0u8; data_offset as usize];
            front[..HEADER_LEN].copy_from_slice(&header_for(table).encode());
            front[HEADER_LEN..HEADER_LEN + table_bytes.len()].copy_from_slice(&table_bytes);
            front
        };
        let written = match &delta {
            Some(plan) => self.write_delta(
                &mut file,
                &tmp,
                &source,
                &layout,
                &plan.table,
                data_offset,
                front,
            ),
            None => self.write_temp(&mut file, &tmp, &source, &layout, data_offset, front),
        };
        drop(file);
        let written = match written {
            Ok(t) => t,
            Err(e) => return Err(self.discard(&tmp, e)),
        };
        let header = header_for(&written);
        // The state the next save compares with: the whole table, not the
        // delta's cells.
        let table = match delta {
            Some(plan) => plan.table,
            None => written,
        };
        // A delta's base must keep a name of its own once the snapshot's
        // name moves on, durably before the delta takes its place.
        if let Some(base) = base
            && let Err(e) = self.keep_base(base)
        {
            return Err(self.discard(&tmp, e));
        }
        // The old `.prev`, held open so that replacing it does not free its
        // blocks inside the save (see `Storage::retire`).
        let mut old_prev = None;
        let result = match self.link_previous(saved_at_ns, &mut old_prev) {
            Ok(previous) => self.install(&tmp, &header, table, previous),
            Err(e) => Err(self.discard(&tmp, e)),
        };
        if let Some(file) = old_prev {
            self.storage.retire(file);
        }
        if result.is_ok() {
            self.remove_unneeded_bases();
        }
        let mut result = result;
        if let (Ok(SaveOutcome::Saved(report)), Some(chain)) = (&mut result, self.chain)
            && chain.depth > 0
            && (chain.depth >= self.options.max_chain || chain.delta_bytes > chain.full_bytes / 2)
        {
            // The chain reached its bounds: compacted into a full snapshot
            // of the same state, read from the chain's files (the program's
            // memory is not copied again).
            match self.compact(saved_at_ns) {
                Ok(SaveOutcome::Saved(full)) => report.compacted = Some(full.generation),
                Ok(_) => {}
                Err(e) => report.compaction_failed = Some(e.to_string()),
            }
        }
        result
    }

    /// Writes the state the snapshot in place holds (a delta chain) as a
    /// full snapshot, saved as any full snapshot (the same protocol, so a
    /// crash at any step leaves this state or the same state as before).
    /// The data is read from the chain's files piece by piece (each byte
    /// from the newest link that holds it, each chunk checked against its
    /// CRC as it is read) and written as it is read: no copy of the whole
    /// state in memory. A damaged chunk fails the compaction, and the
    /// chain stays in place.
    fn compact(&mut self, saved_at_ns: u64) -> Result<SaveOutcome> {
        // The command runs meanwhile: the compaction yields the CPU and the
        // disk to it (this thread and the workers it starts).
        let _background = crate::background::Background::enter();
        let path = self.storage.path_of(&self.name);
        let name = self.name.clone();
        // Headers and tables checked now; each chunk's CRC as it is read.
        let links = crate::chain::open_chain(
            &mut self.storage,
            &name,
            &name,
            self.options.max_data_len,
            None,
            false,
        )
        .map_err(|e| e.into_error(&path))?;
        // The file in place must be the delta this save just installed:
        // a file someone put there since is not compacted.
        let head = links.first().map(|l| (l.header.generation, l.header.crc()));
        let installed = self.chain.map(|c| (c.generation, c.header_crc));
        if head.is_none() || head != installed {
            return Err(Error::io(
                "compacting the chain of",
                &path,
                std::io::Error::other(
                    "the file in place is not the delta just saved (replaced meanwhile)",
                ),
            ));
        }
        let bases = links
            .iter()
            .skip(1)
            .map(|l| {
                let base = crate::chain::base_name(&name, l.header.generation);
                self.storage.path_of(&base).display().to_string()
            })
            .collect();
        let chain = crate::chain::Composed::new(links, self.options.chunk_size, bases)
            .map_err(|e| Error::io("compacting the chain of", &path, e))?;
        self.full_only = true;
        let result = self.save_from(Source::Chain(&chain), saved_at_ns);
        self.full_only = false;
        result
    }

    /// Whether this save can be a delta, and what it would hold: the
    /// snapshot in place must be one this saver wrote or loaded (so the
    /// last table describes it), with cell-aligned chunks of this chunk
    /// size, and the chain must stay within its bounds (`max_chain`
    /// deltas, half its full snapshot's bytes).
    ///
    /// Finds the changed cells by comparing each cell's chunks (extents
    /// and CRCs) with the last table: the current table is computed from
    /// the source, which reads every data byte once.
    fn plan_delta(&self, source: &Source<'_>) -> Result<Option<DeltaPlan>> {
        if self.full_only {
            return Ok(None);
        }
        let chunk_size = self.options.chunk_size;
        let (Some(chain), Some(basis)) = (self.chain, self.basis()) else {
            if let Source::Changes(c) = source {
                return Err(self.stale_changes(c));
            }
            return Ok(None);
        };
        let (table, cells) = match source {
            Source::Changes(c) => {
                if c.basis_generation != chain.generation {
                    return Err(self.stale_changes(c));
                }
                (c.table.clone(), c.cells.clone())
            }
            Source::Image(image) => {
                let table = image.table(chunk_size);
                let cells = changed_cells(basis.1, &table, source.data_len(), chunk_size);
                (table, cells)
            }
            // A compaction writes a full snapshot.
            Source::Chain(_) => return Ok(None),
            Source::Memfd { file, extents, .. } => {
                let table = crate::image::memfd_table(file, extents, chunk_size)
                    .map_err(|e| Error::io("reading", "the memfd", e))?;
                let cells = changed_cells(basis.1, &table, source.data_len(), chunk_size);
                (table, cells)
            }
        };
        let stored: u64 = cells.iter().map(|&(_, n)| u64::from(n)).sum();
        if stored > basis.0 {
            if let Source::Changes(c) = source {
                return Err(self.stale_changes(c));
            }
            return Ok(None);
        }
        Ok(Some(DeltaPlan {
            cells,
            table,
            base: format::Base {
                generation: chain.generation,
                header_crc: chain.header_crc,
                depth: chain.depth + 1,
            },
        }))
    }

    /// When the next save may be a delta: the bytes it may hold before the
    /// chain is compacted instead, and the table it compares with.
    fn basis(&self) -> Option<(u64, &[Chunk])> {
        let chain = self.chain?;
        let (_, last) = self.last.as_ref()?;
        // A chain at `max_chain` is compacted right after the delta that
        // reaches it; one that could not be is continued up to the format's
        // bound.
        if self.options.max_chain == 0
            || chain.depth + 1 >= format::MAX_DEPTH
            || self.trusted != Some(chain.generation)
            || !cell_aligned(last, self.options.chunk_size)
        {
            return None;
        }
        // A delta of more than half the full snapshot's bytes is written
        // as a full snapshot instead.
        Some((chain.full_bytes / 2, last))
    }

    /// What a capture needs to copy only the cells that changed since the
    /// snapshot in place ([`crate::CaptureMethod::capture_changes`]); `None`
    /// when the next save is a full one (no snapshot this saver wrote or
    /// loaded is in place, the chain is at `max_chain`, or deltas are off).
    pub fn delta_basis(&self) -> Option<DeltaBasis> {
        let (budget, table) = self.basis()?;
        Some(DeltaBasis {
            generation: self.chain?.generation,
            data_len: self.last.as_ref()?.0,
            chunk_size: self.options.chunk_size,
            table: table.to_vec(),
            budget,
        })
    }

    fn stale_changes(&self, c: &Changes) -> Error {
        Error::io(
            "saving",
            self.storage.path_of(&self.name),
            std::io::Error::other(format!(
                "the capture copied the changes since generation {}, which is not the \
                 snapshot in place or cannot take a delta any more; capture the whole memfd",
                c.basis_generation
            )),
        )
    }

    /// Writes a delta's cells, each whole (holes as zeros), with their
    /// CRCs, then the header and table at offset 0, then fsyncs. Returns
    /// the delta's table.
    ///
    /// `whole` is the state's chunk table (the plan's): for an image, which
    /// it was computed from, a cell it holds as one chunk keeps that
    /// chunk's CRC, and cells that lie in one extent of the image are
    /// written straight from it (no copy, no second CRC).
    #[allow(clippy::too_many_arguments)]
    fn write_delta(
        &mut self,
        file: &mut S::File,
        tmp: &OsStr,
        source: &Source<'_>,
        cells: &[(u64, u32)],
        whole: &[Chunk],
        data_offset: u64,
        front: impl FnOnce(&[Chunk]) -> Vec<u8>,
    ) -> Result<Vec<Chunk>> {
        let dense = match source {
            Source::Image(image) => Some(Dense::new(image)),
            Source::Changes(c) => Some(Dense::new(&c.image)),
            Source::Memfd { .. } | Source::Chain(_) => None,
        };
        // The CRC of a cell the table holds whole, as one chunk; only for
        // an image, whose bytes are the ones the table was computed from
        // (a memfd is read again here).
        let known_crc = |offset: u64, n: u32| {
            dense.as_ref()?;
            let k = whole.partition_point(|c| c.offset < offset);
            whole
                .get(k)
                .filter(|c| c.offset == offset && c.len == n)
                .map(|c| c.crc)
        };
        let piece_max = self.options.write_size;
        let mut table = Vec::with_capacity(cells.len());
        let mut buf = Vec::new();
        let mut pos = 0u64;
        let mut i = 0;
        while i < cells.len() {
            // Whole cells per write, up to write_size; from an image, a run
            // of adjacent cells per write (so that it can be written
            // straight from the image).
            let mut j = i;
            let mut len = 0usize;
            while j < cells.len()
                && (j == i
                    || (len + cells[j].1 as usize <= piece_max
                        && (dense.is_none()
                            || cells[j - 1].0 + u64::from(cells[j - 1].1) == cells[j].0)))
            {
                len += cells[j].1 as usize;
                j += 1;
            }
            // From an image the run is adjacent cells (above): one slice
            // when no hole lies among them.
            let direct = dense.as_ref().and_then(|d| d.slice(cells[i].0, len as u64));
            let bytes: &[u8] = match direct {
                Some(slice) => slice,
                None => {
                    buf.clear();
                    buf.resize(len, 0);
                    let mut at = 0;
                    for &(offset, n) in &cells[i..j] {
                        let out = &mut buf[at..at + n as usize];
                        match (&dense, source) {
                            (Some(d), _) => d.read(offset, out),
                            (None, Source::Memfd { file: memfd, .. }) => memfd
                                .read_exact_at(out, offset)
                                .map_err(|e| Error::io("reading", "the memfd", e))?,
                            (None, Source::Chain(_)) => {
                                return Err(Error::io(
                                    "saving",
                                    self.storage.path_of(tmp),
                                    std::io::Error::other("a chain is compacted in full"),
                                ));
                            }
                            (None, _) => unreachable!("an image has its dense reader"),
                        }
                        at += n as usize;
                    }
                    &buf
                }
            };
            let mut at = 0;
            for &(offset, n) in &cells[i..j] {
                let cell = &bytes[at..at + n as usize];
                // The plan's CRC only for bytes straight from the image
                // (a copy fills holes with zeros the table may not have).
                let known = direct.and_then(|_| known_crc(offset, n));
                let crc = known.unwrap_or_else(|| crc32fast::hash(cell));
                debug_assert_eq!(
                    crc,
                    crc32fast::hash(cell),
                    "the plan's CRC of cell {offset}"
                );
                table.push(Chunk {
                    offset,
                    len: n,
                    crc,
                });
                at += n as usize;
            }
            self.storage
                .write_at(file, data_offset + pos, bytes)
                .map_err(|e| Error::io("writing", self.storage.path_of(tmp), e))?;
            if let Some(p) = &self.progress {
                p.add(len as u64);
            }
            pos += len as u64;
            i = j;
        }
        self.finish_temp(file, tmp, front(&table))?;
        Ok(table)
    }

    /// Writes `front` (header, table, padding) at offset 0 of the temp
    /// file, last (a file cut short before has no valid header), and
    /// fsyncs it.
    fn finish_temp(&mut self, file: &mut S::File, tmp: &OsStr, front: Vec<u8>) -> Result<()> {
        self.storage
            .write_at(file, 0, &front)
            .map_err(|e| Error::io("writing", self.storage.path_of(tmp), e))?;
        self.storage
            .sync_file(file)
            .map_err(|e| Error::io("fsync of", self.storage.path_of(tmp), e))
    }

    /// Gives the snapshot in place, which a delta is about to apply to, its
    /// chain name `<NAME>.gen-<generation>` (unless a file of that name
    /// already holds it, by header CRC), and makes that name durable: the
    /// rename that puts the delta in place must never reach the disk
    /// before its base's name does.
    fn keep_base(&mut self, base: format::Base) -> Result<()> {
        let name = crate::chain::base_name(&self.name, base.generation);
        let path = self.storage.path_of(&name);
        let existing = self
            .storage
            .open(&name)
            .map_err(|e| Error::io("opening", &path, e))?;
        match existing.map(|r| read_header(&r, u64::MAX)) {
            Some(Ok(h)) if h.generation == base.generation && h.crc() == base.header_crc => {
                if self.named_durably == Some(base.generation) {
                    return Ok(());
                }
                // Linked by a save whose directory fsync this saver did not
                // see succeed (or by another process): made durable now.
                return self.storage.sync_dir().map_err(|e| {
                    Error::io(
                        "fsync of the directory (before the delta, for its base's name)",
                        self.storage.path_of(OsStr::new(".")),
                        e,
                    )
                });
            }
            Some(_) => {
                // Left by an older series or a crash: not this base.
                self.storage
                    .remove(&name)
                    .map_err(|e| Error::io("removing the stale", &path, e))?;
            }
            None => {}
        }
        self.storage
            .link(&self.name, &name)
            .map_err(|e| Error::io("linking the base of the delta as", &path, e))?;
        self.storage.sync_dir().map_err(|e| {
            Error::io(
                "fsync of the directory (after linking the delta's base)",
                self.storage.path_of(OsStr::new(".")),
                e,
            )
        })
    }

    /// Removes the series' `.gen-` files that neither the snapshot (as the
    /// next delta's base) nor the chains of the snapshot and `.prev` need. Best effort, after the save is durable: a file
    /// left by a crash or an error is removed by a later save.
    fn remove_unneeded_bases(&mut self) {
        // The snapshot's own chain name (the next delta's base), ...
        let mut needed = vec![self.generation];
        // ... and the bases of the snapshot's and `.prev`'s chains.
        for n in [self.name.clone(), self.prev_name.clone()] {
            match crate::chain::chain_generations(&mut self.storage, &self.name, &n) {
                Ok(g) => needed.extend(g),
                // Cannot tell what is needed: keep everything.
                Err(_) => return,
            }
        }
        let Ok(names) = self.storage.list() else {
            return;
        };
        for n in names {
            if let Some(g) = crate::chain::generation_of_base(&self.name, &n)
                && !needed.contains(&g)
            {
                // Held open across the unlink and closed on the side: a
                // compacted chain's full snapshot frees hundreds of MiB,
                // which the save need not wait for.
                let held = self.storage.open(&n).ok().flatten();
                let _ = self.storage.remove(&n);
                if let Some(file) = held {
                    self.storage.retire(file);
                }
            }
        }
    }

    /// Renames the finished temp file over the snapshot (the commit), then
    /// keeps the previous snapshot as `.prev` and makes the directory
    /// durable. A failed commit drops the name `link_previous` added, so
    /// every file is as it was. `table` is the whole state's (what the
    /// next save compares with), `header` the new file's.
    fn install(
        &mut self,
        tmp: &OsStr,
        header: &Header,
        table: Vec<Chunk>,
        previous: Previous,
    ) -> Result<SaveOutcome> {
        let generation = header.generation;
        if let Err(e) = self.storage.rename(tmp, &self.name) {
            let e = Error::io(
                "renaming the new snapshot to",
                self.storage.path_of(&self.name),
                e,
            );
            if let Previous::Keep { link } | Previous::Damaged { link, .. } = &previous {
                // Best effort, as for the temp file: a leftover
                // `.prev-tmp` is removed at the next start.
                let _ = self.storage.remove(link);
            }
            return Err(self.discard(tmp, e));
        }
        // The new snapshot is in place from here on.
        self.generation = generation;
        self.trusted = Some(generation);
        self.last = Some((header.data_len, table));
        self.chain = match (header.base, self.chain) {
            (None, _) => ChainState::of(std::slice::from_ref(header)),
            (Some(base), Some(c)) => Some(ChainState {
                generation,
                header_crc: header.crc(),
                depth: base.depth,
                delta_bytes: c.delta_bytes + header.stored_len,
                full_bytes: c.full_bytes,
            }),
            (Some(_), None) => None,
        };
        let mut kept_previous = false;
        let mut moved_corrupt = None;
        let mut not_kept = None;
        match previous {
            Previous::None => {}
            Previous::Keep { link } => match self.storage.rename(&link, &self.prev_name) {
                Ok(()) => kept_previous = true,
                Err(e) => {
                    let _ = self.storage.remove(&link);
                    not_kept = Some(Error::io(
                        "the new snapshot is in place, but the previous one could not be \
                         kept: renaming it to",
                        self.storage.path_of(&self.prev_name),
                        e,
                    ));
                }
            },
            Previous::Damaged { link, damage } => {
                moved_corrupt = Some((self.storage.path_of(&link), damage));
            }
        }
        // The next save may be a delta on this snapshot: its chain name now,
        // made durable by the directory fsync below, spares that save a
        // directory fsync of its own (`keep_base` finds the name). Best
        // effort: without it, `keep_base` links it then.
        let mut own_named = false;
        if self.options.max_chain > 0 {
            let own = crate::chain::base_name(&self.name, generation);
            own_named = match self.storage.link(&self.name, &own) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    self.storage.remove(&own).is_ok() && self.storage.link(&self.name, &own).is_ok()
                }
                Err(_) => false,
            };
        }
        self.named_durably = None;
        self.storage.sync_dir().map_err(|e| {
            Error::AfterCommit(Box::new(Error::io(
                "fsync of the directory (the new snapshot may not survive a crash)",
                self.storage.path_of(OsStr::new(".")),
                e,
            )))
        })?;
        if own_named {
            self.named_durably = Some(generation);
        }
        if let Some(e) = not_kept {
            return Err(Error::AfterCommit(Box::new(e)));
        }
        Ok(SaveOutcome::Saved(SaveReport {
            generation,
            data_len: header.data_len,
            stored_len: header.stored_len,
            file_len: header.file_len(),
            base: header.base,
            compacted: None,
            compaction_failed: None,
            kept_previous,
            moved_corrupt,
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
        self.finish_temp(file, tmp, front(&table))?;
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
        // Validated: at least one chunk.
        let piece_max = self.options.write_size;
        let mut table = Vec::with_capacity(layout.len());
        let mut buf = Vec::new();
        let mut scratch = crate::chain::ChunkBuf::default(); // a chain's chunk, read whole
        let mut crcs = Vec::new(); // a chain's pieces' CRCs, for one write
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
            crcs.clear();
            let piece: &[u8] = match source {
                Source::Image(image) => &image.bytes()[pos..pos + len],
                // `plan_delta` never lets a copy of changes through to a
                // full save.
                Source::Changes(_) => {
                    return Err(Error::io(
                        "saving",
                        self.storage.path_of(tmp),
                        std::io::Error::other("a copy of the changes only cannot be saved in full"),
                    ));
                }
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
                // The layout is the pieces: each read from its link's file
                // and checked against its chunk's CRC.
                Source::Chain(chain) => {
                    buf.resize(len, 0);
                    let mut at = 0;
                    for (k, &(_, n)) in layout.iter().enumerate().take(j).skip(i) {
                        let crc = chain
                            .read_piece(k, &mut buf[at..at + n as usize], &mut scratch)
                            .map_err(|e| e.into_error(&self.storage.path_of(&self.name)))?;
                        crcs.push(crc);
                        at += n as usize;
                    }
                    &buf
                }
            };
            let mut at = 0;
            for (k, &(offset, n)) in layout[i..j].iter().enumerate() {
                let bytes = &piece[at..at + n as usize];
                let crc = match source {
                    Source::Chain(_) => crcs[k],
                    _ if with_crcs => crc32fast::hash(bytes),
                    _ => 0,
                };
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
            if let Some(p) = &self.progress {
                p.add(len as u64);
            }
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

    /// Gives the file now in the snapshot's place a second name, so that
    /// the rename of the new snapshot over it keeps it: `.prev-tmp` when
    /// it is a valid snapshot (renamed over `.prev` after the commit), or
    /// `.corrupt-<time>` when it is damaged. Nothing is renamed or
    /// replaced here: a save that fails later drops the name again.
    ///
    /// Only damage ([`ReadError::Damaged`]) makes a file "damaged": a file
    /// that cannot be read is an error of this save, and any size is
    /// accepted (the maximum is about loading, and a file above it is
    /// still somebody's good snapshot).
    fn link_previous(&mut self, now_ns: u64, old_prev: &mut Option<S::Reader>) -> Result<Previous> {
        let path = self.storage.path_of(&self.name);
        let reader = match self.storage.open(&self.name) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.trusted = None;
                return Ok(Previous::None);
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
                    let link = link_aside(&mut self.storage, &self.name, now_ns)?;
                    self.trusted = None;
                    return Ok(Previous::Damaged { link, damage });
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
        Ok(Previous::Keep { link })
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
mod delta_tests;
#[cfg(test)]
mod tests;
