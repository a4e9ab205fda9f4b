//! shm-snapshot's dirty map end to end: a shm-state program marks every
//! write, and a stop-mode save of its changes reads only the marked cells
//! (plus the first, and a few spot checks), saves a delta that loads to
//! exactly the memfd; a write the program did not mark is caught by the
//! spot checks; marks taken by a capture whose save failed count again;
//! every byte a shm-state program changes past the first
//! `shm_snapshot::ALWAYS_READ` bytes lies in a cell it marked.

use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use bytemuck::{Pod, Zeroable};
use shm_fd::{CreateOptions, SharedFd};
use shm_fd_tests::Kid;
use shm_restore::{
    CaptureMethod, Captured, DirStorage, Image, LoadOutcome, SaveOptions, SaveOutcome, Saver,
    StopGroup,
};
use shm_state::{Layout, Source, State, StateVec};

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    v: StateVec<u64>,
}

const MIB: u64 = 1 << 20;
/// 48 MiB of u64s.
const LEN: u64 = 6 << 20;

fn dense(memfd: &std::fs::File) -> Vec<u8> {
    Image::read_from(memfd).unwrap().to_dense()
}

fn loads_to(dir: &std::path::Path, want: &[u8]) {
    let m = SharedFd::create("dirty-load", CreateOptions::default())
        .unwrap()
        .into_file();
    let out = shm_restore::restore(&dir.join("s.snap"), &m, u64::MAX, 0, None).unwrap();
    assert!(matches!(out, LoadOutcome::Loaded { .. }), "{out:?}");
    assert!(dense(&m) == want, "the snapshot does not load to the memfd");
}

#[test]
fn a_save_of_a_marking_program_reads_only_what_it_marked() {
    let work = tempfile::tempdir().unwrap();
    let shared = SharedFd::create("dirty-map", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    // SAFETY: a memfd of this test; no other process maps it.
    let source = unsafe { Source::shared(shared) };
    let mut state = State::<Root>::open(source, Layout::new(1).with_snapshot_protocol()).unwrap();
    state
        .transaction(|tx| {
            let v = tx.new_vec::<u64>()?;
            let values: Vec<u64> = (0..LEN).map(|i| i * 7 + 1).collect();
            tx.vec(v)?.extend_from_slice(&values)?;
            tx.root_mut()?.v = v;
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
    let v = state.root().unwrap().v;
    // The command whose group a save stops (this test writes only between
    // the captures).
    let mut sleep = Command::new("sleep");
    sleep.arg("60").process_group(0);
    let mut sleeper = Kid::start(sleep, "sleeper", work.path(), None);
    let mut stop = StopGroup::new(sleeper.pid() as i32, Duration::from_secs(5));
    let mut saver = Saver::new(
        DirStorage::new(work.path()),
        "s.snap".as_ref(),
        SaveOptions::default(),
    );
    let first = stop.capture(&memfd).unwrap();
    assert!(matches!(
        saver.save_captured(&first, &memfd, 1).unwrap(),
        SaveOutcome::Saved(_)
    ));

    // One element changed, far into the vector.
    let far = LEN - 1000;
    state.transaction(|tx| tx.vec(v)?.set(far, 42)).unwrap();
    let basis = saver.delta_basis().expect("a delta follows");
    let got = stop.capture_changes(&memfd, &basis).unwrap();
    let Captured::Changes { changes, .. } = &got else {
        panic!("{got:?}")
    };
    let marked = changes.marked().expect("the dirty map was used");
    assert!((1..=4).contains(&marked), "{marked} cells marked");
    // The first cell (header, journal), and the element's.
    let cells: Vec<u64> = changes.cells().iter().map(|c| c.0 / MIB).collect();
    assert!(cells.len() <= 3 && cells[0] == 0, "{cells:?}");
    let element_cell = *cells.last().unwrap();
    assert!(element_cell > 40, "{cells:?}");
    let r = match saver.save_captured(&got, &memfd, 2).unwrap() {
        SaveOutcome::Saved(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(r.base.is_some());
    assert!(r.stored_len <= 3 * MIB, "{}", r.stored_len);
    loads_to(work.path(), &dense(&memfd));

    // A capture whose save fails: its marks count at the next capture.
    state.transaction(|tx| tx.vec(v)?.set(far, 43)).unwrap();
    let basis = saver.delta_basis().unwrap();
    let lost = stop.capture_changes(&memfd, &basis).unwrap();
    assert!(matches!(lost, Captured::Changes { .. }));
    stop.save_failed();
    drop(lost);
    let again = stop.capture_changes(&memfd, &basis).unwrap();
    let Captured::Changes { changes, .. } = &again else {
        panic!("{again:?}")
    };
    assert!(changes.marked().is_some());
    assert!(
        changes.cells().iter().any(|c| c.0 / MIB == element_cell),
        "the failed save's marks were lost: {:?}",
        changes.cells()
    );
    saver.save_captured(&again, &memfd, 3).unwrap();
    loads_to(work.path(), &dense(&memfd));

    // Writes the program did not mark (straight into the memfd, one byte
    // in every 64 KiB from the eighth MiB on, so in every chunk): the spot
    // checks find one, and the capture reads every cell.
    for at in (8 * MIB..LEN * 8).step_by(64 << 10) {
        memfd.write_all_at(&[0x5A], at + 100).unwrap();
    }
    let basis = saver.delta_basis().unwrap();
    let got = stop.capture_changes(&memfd, &basis).unwrap();
    match &got {
        Captured::Changes { changes, .. } => assert_eq!(changes.marked(), None),
        // More changed than a delta may hold: a whole copy.
        Captured::Copied { .. } => {}
        other => panic!("{other:?}"),
    }
    saver.save_captured(&got, &memfd, 4).unwrap();
    loads_to(work.path(), &dense(&memfd));
    sleeper.kill();
}

/// `--snapshot protocol` with a program that keeps the dirty map: saves
/// while it commits every millisecond are copied by converging passes, with
/// no stop, and every one restores to a state it committed (its invariant
/// holds: element 1 is the sum of the elements from 2 on, and each
/// transaction adds to 4 elements 8 MiB apart and to that sum).
#[test]
fn converging_copies_of_a_program_committing_every_millisecond_are_consistent() {
    use shm_restore::SnapshotProtocol;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let work = tempfile::tempdir().unwrap();
    let shared = SharedFd::create("dirty-converge", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    // SAFETY: a memfd of this test; no other process maps it.
    let source = unsafe { Source::shared(shared) };
    let mut state = State::<Root>::open(source, Layout::new(1).with_snapshot_protocol()).unwrap();
    const N: u64 = 4 << 20; // 32 MiB of u64s
    state
        .transaction(|tx| {
            let v = tx.new_vec::<u64>()?;
            tx.vec(v)?.reserve(N)?;
            tx.vec(v)?.extend_from_slice(&vec![1u64; N as usize])?;
            tx.vec(v)?.set(1, N - 2)?;
            tx.root_mut()?.v = v;
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
    let v = state.root().unwrap().v;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                state
                    .transaction(|tx| {
                        let mut vec = tx.vec(v)?;
                        for k in 0..4 {
                            // Four places far apart, each moving through
                            // a few KiB: a few cells change between saves.
                            let at = 2 + k * (N / 4) + n % 1024;
                            let old = *vec.get(at)?.unwrap();
                            vec.set(at, old + n)?;
                        }
                        let sum = *vec.get(1)?.unwrap();
                        vec.set(1, sum + 4 * n)?;
                        vec.set(0, n)?;
                        Ok::<_, shm_state::Error>(())
                    })
                    .unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        })
    };
    let mut sleep = Command::new("sleep");
    sleep.arg("60").process_group(0);
    let mut sleeper = Kid::start(sleep, "sleeper", work.path(), None);
    let mut capture = SnapshotProtocol::new(sleeper.pid() as i32, Duration::from_secs(5));
    let mut saver = Saver::new(
        DirStorage::new(work.path()),
        "s.snap".as_ref(),
        SaveOptions::builder().max_chain(4).build().unwrap(),
    );
    let (mut deltas, mut fulls) = (0, 0);
    for round in 0..12u64 {
        std::thread::sleep(Duration::from_millis(20));
        let got = match saver.delta_basis() {
            Some(basis) => capture.capture_changes(&memfd, &basis).unwrap(),
            None => capture.capture(&memfd).unwrap(),
        };
        match &got {
            Captured::Changes { pause, changes, .. } => {
                assert_eq!(*pause, None, "round {round}: stopped");
                assert!(changes.marked().is_some());
                deltas += 1;
            }
            Captured::Copied {
                pause, protocol, ..
            } => {
                assert_eq!(*pause, None, "round {round}: stopped ({protocol:?})");
                assert!(
                    format!("{protocol:?}").starts_with("Some(Consistent"),
                    "round {round}: {protocol:?}"
                );
                fulls += 1;
            }
            other => panic!("round {round}: {other:?}"),
        }
        saver.save_captured(&got, &memfd, round + 1).unwrap();
        // What the snapshot restores is a state the program committed.
        let m = SharedFd::create("dirty-converge-load", CreateOptions::default()).unwrap();
        let file = m.reopen().unwrap().into_file();
        let out =
            shm_restore::restore(&work.path().join("s.snap"), &file, u64::MAX, 0, None).unwrap();
        assert!(matches!(out, LoadOutcome::Loaded { .. }));
        // SAFETY: a memfd of this test, opened once.
        let restored = State::<Root>::open(
            unsafe { Source::shared(m) },
            Layout::new(1).with_snapshot_protocol(),
        )
        .unwrap();
        let root = restored.root().unwrap().v;
        let vec = restored.vec(root).unwrap();
        let sum: u64 = vec[2..].iter().sum();
        assert_eq!(
            sum, vec[1],
            "round {round}: a torn state at count {}",
            vec[0]
        );
    }
    stop.store(true, Ordering::Relaxed);
    let commits = writer.join().unwrap();
    sleeper.kill();
    assert!(deltas >= 6 && fulls >= 1, "{deltas} deltas, {fulls} full");
    assert!(commits > 100, "{commits} commits");
}

/// A state that grows past its dirty map's cells turns it on again with
/// larger cells, and declares its journal scratch again (turning the map
/// on clears the range).
#[test]
fn a_growing_state_keeps_its_map_and_its_scratch_range() {
    let shared = SharedFd::create("dirty-grow", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    // SAFETY: a memfd of this test; no other process maps it.
    let source = unsafe { Source::shared(shared) };
    let mut state = State::<Root>::open(source, Layout::new(1).with_snapshot_protocol()).unwrap();
    let page_map = memmap2::MmapOptions::new()
        .len(4096)
        .map_raw(&memfd)
        .unwrap();
    let page = shm_snapshot::Region::from_mmap(&page_map);
    let first = shm_snapshot::take_dirty(page).expect("the map is on");
    let journal = first.scratch().expect("the journal is scratch");
    assert_eq!(first.shift(), shm_snapshot::MIN_SHIFT);
    // 128 MiB: past the 96 MiB that 4 KiB cells cover.
    state
        .transaction(|tx| {
            let v = tx.new_vec::<u64>()?;
            tx.vec(v)?.extend_from_slice(&vec![7u64; 16 << 20])?;
            tx.root_mut()?.v = v;
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
    let grown = shm_snapshot::take_dirty(page).expect("the map is on");
    assert!(grown.shift() > shm_snapshot::MIN_SHIFT, "{}", grown.shift());
    assert_eq!(grown.scratch(), Some(journal));
    assert_eq!(grown.count(), shm_snapshot::DIRTY_CELLS, "every cell, once");
}

/// Set in the child's environment: this binary is then the program of
/// [`a_write_after_the_stop_inside_an_update_is_saved_by_the_next_delta`].
const SLOW_WRITER: &str = "SHM_FD_DIRTY_SLOW_WRITER";

/// The child: opens the state on fd 3, takes `&mut` of one far element
/// (which marks its cell), says so, sleeps, then writes it and commits.
#[test]
fn slow_writer_role() {
    if std::env::var_os(SLOW_WRITER).is_none() {
        return;
    }
    use std::os::fd::FromRawFd;
    // SAFETY: the test passes the memfd on fd 3, owned by nothing else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
    let shared = SharedFd::adopt(owned, "slow").unwrap();
    // SAFETY: this process is the state's only user.
    let source = unsafe { Source::shared(shared) };
    let mut state = State::<Root>::open(source, Layout::new(1).with_snapshot_protocol()).unwrap();
    let v = state.root().unwrap().v;
    state
        .transaction(|tx| {
            let mut vec = tx.vec(v)?;
            let slot = vec.get_mut(LEN - 10)?;
            eprintln!("marked");
            std::thread::sleep(Duration::from_millis(600));
            *slot = 4242;
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
    eprintln!("committed");
    // Alive, so the next save captures with the dirty map (a group that
    // is gone is read directly, every chunk compared).
    std::thread::sleep(Duration::from_secs(20));
}

/// Review finding: a stop that lands between a mark (a `&mut` handed out)
/// and the write takes the mark; the write then lands unmarked after the
/// stop. The snapshotter gives back marks it took inside an update, so the
/// next delta reads that cell again and holds the write.
#[test]
fn a_write_after_the_stop_inside_an_update_is_saved_by_the_next_delta() {
    let work = tempfile::tempdir().unwrap();
    let shared = SharedFd::create("dirty-slow", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    {
        // SAFETY: the state is set up here, then closed before the child
        // opens it: one user at a time.
        let source = unsafe { Source::shared(shared.try_clone().unwrap()) };
        let mut state =
            State::<Root>::open(source, Layout::new(1).with_snapshot_protocol()).unwrap();
        state
            .transaction(|tx| {
                let v = tx.new_vec::<u64>()?;
                tx.vec(v)?.extend_from_slice(&vec![1u64; LEN as usize])?;
                tx.root_mut()?.v = v;
                Ok::<_, shm_state::Error>(())
            })
            .unwrap();
    }
    let mut saver = Saver::new(
        DirStorage::new(work.path()),
        "s.snap".as_ref(),
        SaveOptions::default(),
    );
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "slow_writer_role", "--nocapture"])
        .env(SLOW_WRITER, "1")
        .process_group(0);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&shared);
    let mut child = Kid::start(cmd, "slow-writer", work.path(), Some(fd));
    let mut stop = StopGroup::new(child.pid() as i32, Duration::from_secs(5));
    let first = stop.capture(&memfd).unwrap();
    saver.save_captured(&first, &memfd, 1).unwrap();
    child.wait_for_stderr("marked");
    // The stop lands inside the child's transaction, after its mark.
    let basis = saver.delta_basis().unwrap();
    let inside = stop.capture_changes(&memfd, &basis).unwrap();
    saver.save_captured(&inside, &memfd, 2).unwrap();
    child.wait_for_stderr("committed");
    let basis = saver.delta_basis().unwrap();
    let after = stop.capture_changes(&memfd, &basis).unwrap();
    let Captured::Changes { changes, .. } = &after else {
        panic!("{after:?}")
    };
    assert!(changes.marked().is_some(), "the dirty map was used");
    saver.save_captured(&after, &memfd, 3).unwrap();
    child.kill();
    // The snapshot holds the committed write.
    loads_to(work.path(), &dense(&memfd));
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Mixed {
    map: shm_state::StateMap<u64, u64>,
    blobs: shm_state::StateMap<u64, shm_state::Bytes>,
    v: StateVec<u64>,
    log: shm_state::StateLog,
    ring: shm_state::StateRing,
    cells: [shm_state::StateCell<[u64; 4]>; 4],
}

/// A transaction's error: the library's, or the test's own abort.
#[derive(Debug)]
enum Abort {
    #[allow(dead_code)] // shown by Debug when a transaction fails
    State(shm_state::Error),
    Abort,
}

impl From<shm_state::Error> for Abort {
    fn from(e: shm_state::Error) -> Abort {
        Abort::State(e)
    }
}

/// The memfd's first page (the protocol header, with the dirty map),
/// mapped.
fn header_page(memfd: &std::fs::File) -> memmap2::MmapRaw {
    memmap2::MmapOptions::new()
        .len(shm_snapshot::HEADER_LEN)
        .map_raw(memfd)
        .unwrap()
}

/// Checks that every byte that differs between `before` and `after` (the
/// memfd's bytes; `after` may be longer) past `ALWAYS_READ` lies in a cell
/// `marks` holds, naming `what` on failure; returns how many differ there.
fn changed_bytes_all_marked(
    before: &[u8],
    after: &[u8],
    marks: &shm_snapshot::DirtyCells,
    what: impl Fn() -> String,
) -> u64 {
    let mut changed = 0;
    for (at, (&a, &b)) in after
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&0)))
        .enumerate()
    {
        let at = at as u64;
        if a != b && at >= shm_snapshot::ALWAYS_READ {
            assert!(
                marks.any(at, 1),
                "{}: byte {at:#x} changed ({b:#04x} -> {a:#04x}) in a cell the map did not mark",
                what()
            );
            changed += 1;
        }
    }
    changed
}

/// The memfd's bytes, whole.
fn bytes_of(memfd: &std::fs::File) -> Vec<u8> {
    let len = memfd.metadata().unwrap().len() as usize;
    let mut out = vec![0u8; len];
    memfd.read_exact_at(&mut out, 0).unwrap();
    out
}

#[test]
fn every_write_of_a_shm_state_program_past_the_first_cells_is_marked() {
    // A marking shm-state program's writes of every kind (map inserts,
    // removes and growth, byte values, a vector pushed, set and cut, a log,
    // a ring pushed and popped round its end, cells set, transactions
    // rolled back, a reopen),
    // compared byte by byte with the memfd before them: every byte that
    // changed past the first `ALWAYS_READ` bytes lies in a cell the map
    // marked. A write that skipped its mark would let a delta keep the
    // chain's old bytes.
    let shared = SharedFd::create("dirty-marks", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    let layout = || {
        Layout::new(1)
            .with_snapshot_protocol()
            .journal_len(256 << 10)
    };
    // SAFETY: a memfd of this test; no other process maps it.
    let mut state = State::<Mixed>::open(
        unsafe { Source::shared(shared.reopen().unwrap()) },
        layout(),
    )
    .unwrap();
    state
        .transaction(|tx| {
            let root = Mixed {
                map: tx.new_map()?,
                blobs: tx.new_map()?,
                v: tx.new_vec()?,
                log: tx.new_log()?,
                ring: tx.new_ring(64 << 10, 1024)?,
                cells: [
                    tx.new_cell([0; 4])?,
                    tx.new_cell([1; 4])?,
                    tx.new_cell([2; 4])?,
                    tx.new_cell([3; 4])?,
                ],
            };
            *tx.root_mut()? = root;
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
    let page_map = header_page(&memfd);
    let page = shm_snapshot::Region::try_from_mmap(&page_map).unwrap();
    let mut rng = shm_fd_tests::Rng::seeded("DIRTY_MARKS_SEED", "dirty_marks");
    let (mut checked, mut changed_cells) = (0u64, 0u64);
    for round in 0..60u32 {
        shm_snapshot::take_dirty(page).expect("the map is on");
        let before = bytes_of(&memfd);
        let what = rng.below(11);
        let root = *state.root().unwrap();
        let result = state.transaction(|tx| -> Result<(), Abort> {
            for _ in 0..1 + rng.below(40) {
                let k = rng.below(3000);
                match what {
                    0 => {
                        tx.map(root.map)?.insert(&k, &(k * 3 + u64::from(round)))?;
                    }
                    1 => {
                        tx.map(root.map)?.remove(&k)?;
                    }
                    2 => {
                        let blob = vec![round as u8; 1 + (k % 700) as usize];
                        tx.map(root.blobs)?.insert(&k, &blob)?;
                    }
                    3 => {
                        tx.map(root.blobs)?.remove(&k)?;
                    }
                    4 => {
                        let mut v = tx.vec(root.v)?;
                        v.push(k)?;
                        if !v.is_empty()? {
                            let i = k % v.len()?;
                            v.set(i, k + 1)?;
                        }
                    }
                    5 => {
                        let mut v = tx.vec(root.v)?;
                        let to = v.len()? / 2;
                        v.truncate(to)?;
                    }
                    6 => {
                        tx.log(root.log)?.append(&k.to_le_bytes())?;
                    }
                    7 => {
                        let c = root.cells[(k % 4) as usize];
                        tx.set_cell(c, [k; 4])?;
                    }
                    8 => {
                        let frame = vec![round as u8 | 1; 1 + (k % 1000) as usize];
                        if !tx.ring(root.ring)?.push(&frame)? {
                            tx.ring(root.ring)?.pop()?;
                        }
                    }
                    9 => {
                        tx.ring(root.ring)?.pop()?;
                    }
                    _ => {
                        // Written, then rolled back by the error below.
                        tx.map(root.map)?.insert(&k, &u64::MAX)?;
                        tx.vec(root.v)?.push(u64::MAX)?;
                    }
                }
            }
            if what == 10 {
                return Err(Abort::Abort);
            }
            Ok(())
        });
        assert!(
            matches!((&result, what), (Err(Abort::Abort), 10) | (Ok(()), 0..=9)),
            "round {round}: {result:?}"
        );
        if round % 20 == 19 {
            // A reopen (a new opening transaction) writes too.
            drop(state);
            state = State::<Mixed>::open(
                // SAFETY: as above; the state before was dropped.
                unsafe { Source::shared(shared.reopen().unwrap()) },
                layout(),
            )
            .unwrap();
        }
        let marks = shm_snapshot::take_dirty(page).expect("the map is on");
        checked += changed_bytes_all_marked(&before, &bytes_of(&memfd), &marks, || {
            format!("round {round} (operation {what})")
        });
        changed_cells += marks.count();
    }
    assert!(checked > 10_000, "{checked} changed bytes checked");
    assert!(changed_cells > 0);
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Shared {
    map: shm_state::StateMap<u64, shm_state::Bytes>,
    v: StateVec<u64>,
    ring: shm_state::StateRing,
    published: shm_state::StatePublished,
}

/// Set in the child's environment: this binary is then the writer that
/// [`a_killed_writer_and_the_rollback_after_it_mark_what_they_write`]
/// kills.
const KILLED_WRITER: &str = "SHM_FD_DIRTY_KILLED_WRITER";

fn shared_layout() -> Layout<Shared> {
    Layout::new(1)
        .with_snapshot_protocol()
        .journal_len(256 << 10)
}

/// The child: opens the shared state on fd 3 and runs transactions (map
/// inserts of byte values, vector pushes, ring pushes and pops) and
/// publishes until it is killed.
#[test]
fn killed_writer_role() {
    let Some(seed) = std::env::var_os(KILLED_WRITER) else {
        return;
    };
    use std::os::fd::FromRawFd;
    // SAFETY: the test passes the memfd on fd 3, owned by nothing else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
    let shared = SharedFd::adopt(owned, "killed").unwrap();
    // SAFETY: every opener of this memfd opens it as a SharedState.
    let source = unsafe { Source::shared(shared) };
    let mut state = shm_state::SharedState::<Shared>::open(source, shared_layout()).unwrap();
    let mut n: u64 = seed.to_string_lossy().parse().unwrap();
    let mut rng = shm_fd_tests::Rng::seeded("DIRTY_KILLED_WRITER_SEED", "killed_writer");
    eprintln!("running");
    loop {
        n += 1;
        let root = state
            .transaction(|tx| Ok::<_, shm_state::Error>(*tx.root()?))
            .unwrap();
        state
            .transaction(|tx| {
                for _ in 0..1 + rng.below(30) {
                    let k = rng.below(2000);
                    match rng.below(4) {
                        0 => {
                            let blob = vec![n as u8; 1 + (k % 900) as usize];
                            tx.map(root.map)?.insert(&k, &blob)?;
                        }
                        1 => tx.vec(root.v)?.push(k ^ n)?,
                        2 => {
                            if !tx.ring(root.ring)?.push(&k.to_le_bytes())? {
                                tx.ring(root.ring)?.pop()?;
                            }
                        }
                        _ => {
                            tx.map(root.map)?.remove(&k)?;
                        }
                    }
                }
                Ok::<_, shm_state::Error>(())
            })
            .unwrap();
        let value = [n; 16];
        state.publish_value(root.published, &value).unwrap();
    }
}

#[test]
fn a_killed_writer_and_the_rollback_after_it_mark_what_they_write() {
    // A child writing a shared state (transactions, a published value) is
    // killed (SIGKILL) at a random time, often inside a transaction; the
    // next open rolls that transaction back. Every byte the child and the
    // rollback changed past the first `ALWAYS_READ` bytes lies in a cell
    // the map marked: a delta taken after the rollback misses nothing.
    let work = tempfile::tempdir().unwrap();
    let shared = SharedFd::create("dirty-killed", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    let open = || {
        // SAFETY: every opener of this memfd opens it as a SharedState.
        let source = unsafe { Source::shared(shared.try_clone().unwrap()) };
        shm_state::SharedState::<Shared>::open(source, shared_layout()).unwrap()
    };
    {
        let mut state = open();
        state
            .transaction(|tx| {
                let root = Shared {
                    map: tx.new_map()?,
                    v: tx.new_vec()?,
                    ring: tx.new_ring(32 << 10, 64)?,
                    // 64 KiB a version: the two slots lie in cells of
                    // their own, which only a publish marks.
                    published: tx.new_published(64 << 10)?,
                };
                *tx.root_mut()? = root;
                Ok::<_, shm_state::Error>(())
            })
            .unwrap();
    }
    let page_map = header_page(&memfd);
    let page = shm_snapshot::Region::try_from_mmap(&page_map).unwrap();
    let mut rng = shm_fd_tests::Rng::seeded("DIRTY_KILLED_SEED", "dirty_killed");
    let (mut checked, mut rolled_back) = (0u64, 0usize);
    for round in 0..10u64 {
        shm_snapshot::take_dirty(page).expect("the map is on");
        let before = bytes_of(&memfd);
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "killed_writer_role", "--nocapture"])
            .env(KILLED_WRITER, (round * 1_000_000).to_string())
            .process_group(0);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&shared);
        let mut child = Kid::start(cmd, format!("killed-{round}"), work.path(), Some(fd));
        child.wait_for_stderr("running");
        std::thread::sleep(Duration::from_millis(5 + rng.below(60)));
        child.kill();
        // The next open finds the dead writer's transaction and rolls it
        // back (or finds it committed).
        let state = open();
        if matches!(state.report().opened, shm_state::Opened::Recovered { .. }) {
            rolled_back += 1;
        }
        drop(state);
        let marks = shm_snapshot::take_dirty(page).expect("the map is on");
        checked += changed_bytes_all_marked(&before, &bytes_of(&memfd), &marks, || {
            format!("round {round}")
        });
    }
    eprintln!("dirty_killed: {checked} changed bytes checked, {rolled_back} rollbacks");
    assert!(checked > 10_000, "{checked} changed bytes checked");
}
