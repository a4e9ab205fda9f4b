//! Writes the seed corpus of every fuzz target into `corpus/<target>/`,
//! made with the libraries' own writers: real `LISTEN_*` triples, snapshot
//! files saved by shm-restore's `Saver`, protocol headers written by
//! shm-snapshot's `Publisher`, and state regions written by shm-state
//! (closed, held open, stopped inside a transaction, of an older layout).
//!
//! ```text
//! cargo +nightly run --manifest-path tests/fuzz/Cargo.toml --example make_seeds
//! ```
//!
//! The output is deterministic but for the pids, start times and times
//! recorded in the state and snapshot seeds.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use shm_fd_fuzz::{HEADER_PAD, ROOT_VERSION, Root, STATE_PROTOCOL, join_listen_env, state_input};
use shm_restore::{DirStorage, Extent, Image, SaveOptions, Saver};
use shm_snapshot::{DATA_OFFSET, HEADER_LEN, HeapBuffer, Publisher};
use shm_state::{Layout, Source, State, Tx};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn corpus(target: &str) -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result {
    fs::write(dir.join(name), bytes)?;
    println!("{:>7} bytes  {}", bytes.len(), dir.join(name).display());
    Ok(())
}

fn listen_env() -> Result {
    let dir = corpus("listen_env")?;
    let cases: [(&str, [Option<&str>; 3]); 14] = [
        ("unset", [None, None, None]),
        ("one-shared-fd", [Some("1"), Some("SHM_SHARED_FD"), None]),
        (
            "three-with-pid",
            [Some("3"), Some("a:SHM_SHARED_FD:c"), Some("42")],
        ),
        ("names-unset", [Some("2"), None, None]),
        ("zero-fds", [Some("0"), Some(""), None]),
        ("systemd-spaces", [Some("2"), Some("my sock:"), Some("1")]),
        ("stale-names", [None, Some("a:b"), Some("7")]),
        ("not-a-number", [Some("x"), None, None]),
        ("too-many", [Some("5000"), None, None]),
        ("count-mismatch", [Some("2"), Some("a"), None]),
        ("non-ascii", [Some("1"), Some("\u{e9}"), None]),
        ("pid-zero", [Some("1"), Some("a"), Some("0")]),
        ("sizes", [Some("64M"), Some("1GiB"), Some("4096")]),
        ("durations", [Some("100ms"), Some("0.5s"), Some("1m")]),
    ];
    for (name, values) in cases {
        write(
            &dir,
            name,
            &join_listen_env(values.map(|v| v.map(str::as_bytes))),
        )?;
    }
    let control = join_listen_env([Some(b"1"), Some(b"a\x01\n"), Some(b"2147483648")]);
    write(&dir, "control-chars", &control)?;
    Ok(())
}

/// Saves `image` with shm-restore's saver and returns the file's bytes.
fn saved(image: &Image) -> Result<Vec<u8>> {
    let tmp = tempfile::tempdir()?;
    let mut saver = Saver::new(
        DirStorage::new(tmp.path()),
        OsStr::new("seed.snap"),
        SaveOptions::default(),
    );
    saver.save(image, shm_restore::now_ns())?;
    saver.wait_retired();
    Ok(fs::read(tmp.path().join("seed.snap"))?)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn snapshot_reader() -> Result {
    let dir = corpus("snapshot_reader")?;
    write(
        &dir,
        "dense-100",
        &saved(&Image::from_bytes(pattern(100, 1)))?,
    )?;
    write(&dir, "dense-1", &saved(&Image::from_bytes(vec![0x5a]))?)?;
    // A 1 MiB memfd holding three runs of data: holes stay holes.
    let runs = [(0u64, 200u64), (64 << 10, 3000), ((1 << 20) - 10, 10)];
    let mut bytes = Vec::new();
    for (i, &(_, len)) in runs.iter().enumerate() {
        bytes.extend(pattern(len as usize, i as u8));
    }
    let extents = runs
        .iter()
        .map(|&(offset, len)| Extent { offset, len })
        .collect();
    let sparse = Image::from_parts(1 << 20, extents, bytes)?;
    let file = saved(&sparse)?;
    write(&dir, "sparse-3-runs", &file)?;
    // The same file with one flipped bit in the data: checksum damage.
    let mut flipped = file.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x10;
    write(&dir, "sparse-bad-chunk", &flipped)?;
    Ok(())
}

/// The first bytes of a protocol region, as a `snapshot_header` input:
/// trailing zeros cut, padded back by the target.
fn header_input(region: &[u8]) -> Vec<u8> {
    let end = region.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut out = vec![HEADER_PAD];
    out.extend_from_slice(&region[..end]);
    out
}

fn region_bytes(buffer: &HeapBuffer) -> Vec<u8> {
    let region = buffer.region();
    let mut out = vec![0u8; region.len()];
    region.copy_to(&mut out);
    out
}

fn snapshot_header() -> Result {
    let dir = corpus("snapshot_header")?;
    let len = HEADER_LEN + 64;
    write(&dir, "blank", &[HEADER_PAD])?;
    write(&dir, "too-small", &[0, 1, 2, 3])?;

    // Committed three times, with data.
    let buffer = HeapBuffer::new(len);
    let (mut publisher, _) = Publisher::open(buffer.region())?;
    for i in 1..=3u64 {
        let update = publisher.begin();
        update.data().store_u64(0, i);
        update.commit();
    }
    let committed = region_bytes(&buffer);
    write(&dir, "committed", &header_input(&committed))?;
    // Stopped inside an update (what a kill -9 there leaves).
    publisher.enter_update();
    publisher.data().store_u64(8, 99);
    write(&dir, "in-update", &header_input(&region_bytes(&buffer)))?;

    // A set-up cut short: the fixed fields written, not yet the magic.
    let mut setup = committed.clone();
    setup[..8].fill(0);
    setup[64..].fill(0);
    write(&dir, "setup-cut-short", &header_input(&setup))?;
    // Someone else's data in the first page.
    write(&dir, "foreign", &header_input(&pattern(len, 7)))?;
    // A region whose length is not a multiple of 8 (tail bytes).
    let mut odd = committed.clone();
    odd.truncate(HEADER_LEN + 13);
    write(&dir, "committed-odd-length", &{
        let mut v = vec![0u8];
        v.extend_from_slice(&odd);
        v
    })?;
    // The protocol page shm-state writes in front of its state.
    let state = State::<Root>::open(
        Source::heap(Vec::new()),
        small_layout().with_snapshot_protocol(),
    )?;
    let closed = state.close()?.into_heap().ok_or("not a heap source")?;
    write(
        &dir,
        "shm-state-page",
        &header_input(&closed[..DATA_OFFSET + 64]),
    )?;
    Ok(())
}

fn small_layout() -> Layout<Root> {
    Layout::new(ROOT_VERSION).journal_len(4096).initial_len(0)
}

/// Fills every structure of the root (a transaction's worth).
fn fill(tx: &mut Tx<'_, Root>, round: u64) -> shm_state::Result<()> {
    let mut root = *tx.root()?;
    if root.items.is_null() {
        root.items = tx.new_vec()?;
        root.names = tx.new_map()?;
        root.index = tx.new_map()?;
        root.events = tx.new_log()?;
        root.cell = tx.new_cell([0; 2])?;
    }
    root.counter += 1;
    tx.set_root(root)?;
    for i in 0..4 {
        let n = round * 10 + i;
        let name = format!("name-{n}");
        tx.vec(root.items)?.push(n)?;
        tx.map(root.names)?.insert(&n, name.as_bytes())?;
        tx.map(root.index)?.insert(name.as_bytes(), &n)?;
        tx.log(root.events)?
            .append(format!("event {n}").as_bytes())?;
    }
    tx.set_cell(root.cell, [round, root.counter])?;
    if round > 0 {
        tx.map(root.names)?.remove(&(round * 10 - 1))?;
        tx.vec(root.items)?.pop()?;
    }
    Ok(())
}

/// A closed state after `rounds` filling transactions: the whole region.
fn filled(protocol: bool, rounds: u64) -> Result<Vec<u8>> {
    let layout = if protocol {
        small_layout().with_snapshot_protocol()
    } else {
        small_layout()
    };
    let mut state = State::<Root>::open(Source::heap(Vec::new()), layout)?;
    for round in 0..rounds {
        state.transaction(|tx| fill(tx, round))?;
    }
    Ok(state.close()?.into_heap().ok_or("not a heap source")?)
}

/// The bytes of a state file copied while a transaction is half done (as
/// a kill -9 or a stop-and-copy snapshot there leaves them).
fn interrupted(protocol: bool) -> Result<Vec<u8>> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("state");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let layout = if protocol {
        small_layout().with_snapshot_protocol()
    } else {
        small_layout()
    };
    // SAFETY: the file is this function's own; nothing else writes or
    // truncates it while the state is open.
    let mut state = State::<Root>::open(unsafe { Source::file(file) }, layout)?;
    state.transaction(|tx| fill(tx, 0))?;
    let copied = state.transaction(|tx| {
        fill(tx, 1)?;
        // Roll this one back once copied: the copy is the interrupted state.
        Err::<(), _>(Stop::Copied(fs::read(&path)))
    });
    drop(state);
    match copied {
        Err(Stop::Copied(copy)) => Ok(copy?),
        Err(Stop::State(e)) => Err(e.into()),
        Ok(()) => Err("the copying transaction committed".into()),
    }
}

/// How the transaction that copies the state file ends.
enum Stop {
    State(shm_state::Error),
    Copied(std::io::Result<Vec<u8>>),
}

impl From<shm_state::Error> for Stop {
    fn from(e: shm_state::Error) -> Self {
        Stop::State(e)
    }
}

/// A state of an older layout: version 0, whose root was one counter.
fn older_layout() -> Result<Vec<u8>> {
    let mut state = State::<u64>::open(
        Source::heap(Vec::new()),
        Layout::new(0).journal_len(4096).initial_len(0),
    )?;
    state.transaction(|tx| {
        *tx.root_mut()? = 41;
        Ok::<_, shm_state::Error>(())
    })?;
    Ok(state.close()?.into_heap().ok_or("not a heap source")?)
}

fn state_open() -> Result {
    let dir = corpus("state_open")?;
    write(&dir, "blank", &[0])?;
    write(&dir, "blank-protocol", &[STATE_PROTOCOL])?;
    write(&dir, "fresh", &state_input(0, &filled(false, 0)?))?;
    write(&dir, "filled", &state_input(0, &filled(false, 3)?))?;
    write(
        &dir,
        "filled-protocol",
        &state_input(STATE_PROTOCOL, &filled(true, 3)?),
    )?;
    write(&dir, "interrupted", &state_input(0, &interrupted(false)?))?;
    write(
        &dir,
        "interrupted-protocol",
        &state_input(STATE_PROTOCOL, &interrupted(true)?),
    )?;
    // Held open: the lock names this (soon gone) process.
    let mut held = State::<Root>::open(Source::heap(Vec::new()), small_layout())?;
    held.transaction(|tx| fill(tx, 0))?;
    write(&dir, "lock-held", &state_input(0, &held.image()))?;
    drop(held);
    write(&dir, "older-layout", &state_input(0, &older_layout()?))?;
    Ok(())
}

fn main() -> Result {
    listen_env()?;
    snapshot_reader()?;
    snapshot_header()?;
    state_open()?;
    Ok(())
}
