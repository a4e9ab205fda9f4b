//! The save protocol under crashes and failures, through the simulated
//! storage: a crash at every write, fsync, link and rename must leave a disk
//! from which loading yields the old or the new state, never anything else.

use super::*;
use crate::image::Extent;
use crate::load::{LoadOutcome, restore};
use crate::snapshot::Snapshot;
use crate::storage::DirStorage;
use crate::storage::sim::{DiskImage, Fault, SimStorage, materialize};
use shm_fd::{CreateOptions, SharedFd};
use std::fs::File;

const NAME: &str = "state.snap";

/// Full saves only (`max_chain` 0): the protocol of a full save as it was
/// before deltas. With deltas on, a full save also links its chain name and
/// removes unneeded ones (`delta_tests.rs` crashes those at every step).
fn options() -> SaveOptions {
    SaveOptions::builder()
        .chunk_size(4096)
        .write_size(4096)
        .max_chain(0)
        .build()
        .unwrap()
}

/// A sparse image whose bytes depend on `seed`.
fn image(seed: u8) -> Image {
    let mut bytes: Vec<u8> = (0..10_000u32).map(|i| (i as u8) ^ seed).collect();
    bytes.extend(std::iter::repeat_n(seed, 3000));
    Image::from_parts(
        100_000,
        vec![
            Extent {
                offset: 0,
                len: 10_000,
            },
            Extent {
                offset: 50_000,
                len: 3000,
            },
        ],
        bytes,
    )
    .unwrap()
}

fn memfd() -> File {
    SharedFd::create("crash-test", CreateOptions::default())
        .unwrap()
        .into_file()
}

/// A disk holding a snapshot of `image(1)` (generation 2) and its `.prev`
/// (`image(0)`, generation 1), as two real saves made them.
fn old_disk() -> SimStorage {
    let sim = SimStorage::default();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
    saver.save(&image(0), 1).unwrap();
    saver.save(&image(1), 2).unwrap();
    sim
}

/// Loads `disk` as a fresh start would and returns the memfd's contents.
fn load_state(disk: &DiskImage) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().unwrap();
    materialize(disk, dir.path());
    let m = memfd();
    match restore(&dir.path().join(NAME), &m, u64::MAX, 0, None) {
        Ok(LoadOutcome::Loaded { .. }) => Ok(Image::read_from(&m).unwrap().to_dense()),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn names(disk: &DiskImage) -> Vec<String> {
    disk.keys()
        .map(|k| k.to_string_lossy().into_owned())
        .collect()
}

/// The number of storage operations one save performs.
fn ops_of_one_save() -> usize {
    let sim = old_disk();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
    sim.fail_at(usize::MAX, Fault::Crash);
    saver.save(&image(2), 3).unwrap();
    sim.ops()
}

#[test]
fn crash_at_every_step_loads_old_or_new() {
    let old = image(1).to_dense();
    let new = image(2).to_dense();
    let steps = ops_of_one_save();
    // create, 4 data writes, header, fsync, link, rename, rename, dir fsync
    assert_eq!(steps, 11, "the protocol's steps changed: update the docs");
    let mut seen_new = false;
    for step in 1..=steps {
        let sim = old_disk();
        let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
        sim.fail_at(step, Fault::Crash);
        assert!(saver.save(&image(2), 3).is_err(), "step {step}");
        for disk in sim.crash_images() {
            let got = load_state(&disk)
                .unwrap_or_else(|e| panic!("crash at step {step}, disk {:?}: {e}", names(&disk)));
            assert!(
                got == old || got == new,
                "crash at step {step}: loaded neither state, disk {:?}",
                names(&disk)
            );
            seen_new |= got == new;
        }
    }
    assert!(seen_new, "no crash image held the new state");

    // A save that returned Ok is durable: every crash image loads it.
    let sim = old_disk();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
    saver.save(&image(2), 3).unwrap();
    for disk in sim.crash_images() {
        assert_eq!(load_state(&disk).unwrap(), new, "{:?}", names(&disk));
    }
}

#[test]
fn the_crash_model_catches_a_rename_without_fsync() {
    // The same steps as a save, minus the fsync of the temp file: a crash
    // after the rename can leave an empty snapshot, which the check sees.
    let sim = old_disk();
    let mut good = sim.clone();
    let mut f = good.create_new(OsStr::new(".tmp")).unwrap();
    good.write_at(&mut f, 0, b"new contents").unwrap();
    good.rename(OsStr::new(".tmp"), OsStr::new(NAME)).unwrap();
    good.sync_dir().unwrap();
    let broken = sim
        .crash_images()
        .iter()
        .any(|disk| disk.get(OsStr::new(NAME)).is_some_and(|d| d.is_empty()));
    assert!(
        broken,
        "the model must expose unsynced data behind a rename"
    );
}

/// The step of a save that renames the new snapshot over the old one
/// (create, 4 data writes, header, fsync, link = 8 steps before it).
const COMMIT_STEP: usize = 9;

#[test]
fn no_space_at_every_step_keeps_the_old_snapshot_and_cleans_up() {
    let old = image(1).to_dense();
    let new = image(2).to_dense();
    let steps = ops_of_one_save();
    for step in 1..=steps {
        let sim = old_disk();
        let before = sim.current();
        let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
        sim.fail_at(step, Fault::NoSpace);
        let e = saver.save(&image(2), 3).unwrap_err();
        assert!(e.to_string().contains("No space left"), "step {step}: {e}");
        let after = sim.current();
        let leftovers: Vec<_> = names(&after)
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "step {step}: left {leftovers:?}");
        let state = load_state(&after).unwrap();
        if step <= COMMIT_STEP {
            // Up to and including the commit: a save that cannot be done
            // changes no file, `.prev` included.
            assert_eq!(state, old, "step {step}");
            assert_eq!(after, before, "step {step}: a file changed");
            assert!(!matches!(e, Error::AfterCommit(_)), "step {step}: {e}");
        } else {
            // After the commit the new snapshot is in place, and the
            // error (so the message) says so.
            assert_eq!(state, new, "step {step}");
            assert!(matches!(e, Error::AfterCommit(_)), "step {step}: {e}");
            assert!(e.to_string().contains("new snapshot"), "step {step}: {e}");
            let prev = OsStr::new("state.snap.prev");
            if step == COMMIT_STEP + 1 {
                // Keeping the old snapshot as .prev failed: .prev is the
                // older one still.
                assert_eq!(after[prev], before[prev], "step {step}");
            } else {
                assert_eq!(after[prev], before[OsStr::new(NAME)], "step {step}");
            }
        }
    }
}

/// Issue 9, part 3: a memfd larger than `max_data_len` was saved (a file
/// no start could load) and the next save moved that good snapshot aside
/// as damaged. It is refused before any file operation.
#[test]
fn a_memfd_larger_than_max_data_len_is_refused_and_no_file_changes() {
    let sim = old_disk();
    let before = sim.current();
    let small = SaveOptions::builder()
        .chunk_size(4096)
        .max_data_len(99_999)
        .build()
        .unwrap();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), small);
    sim.fail_at(usize::MAX, Fault::Crash); // counts the operations
    let e = saver.save(&image(2), 3).unwrap_err(); // 100_000 bytes
    assert!(
        matches!(
            e,
            Error::MemfdTooLarge {
                data_len: 100_000,
                max: 99_999
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("100000 bytes, more than the maximum 99999"),
        "{e}"
    );
    assert!(!e.is_corrupt());
    assert_eq!(sim.ops(), 0, "no file operation at all");
    assert_eq!(sim.current(), before);
    // The memfd itself, streamed: the same.
    let m = memfd();
    m.set_len(100_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&m, b"data", 50_000).unwrap();
    assert!(matches!(
        saver.save_memfd(&m, 4),
        Err(Error::MemfdTooLarge { .. })
    ));
    assert_eq!(sim.current(), before);
    // A later save within the limit keeps the good snapshot as .prev.
    let fits = Image::from_bytes(vec![5; 1000]);
    let SaveOutcome::Saved(r) = saver.save(&fits, 5).unwrap() else {
        panic!()
    };
    assert!(r.kept_previous && r.moved_corrupt.is_none(), "{r:?}");
    assert_eq!(
        sim.current()[OsStr::new("state.snap.prev")],
        before[OsStr::new(NAME)]
    );
}

/// A valid snapshot holding more than this saver's maximum (the limit
/// was lowered between runs) is somebody's good snapshot: kept as
/// `.prev`, never renamed to `.corrupt-*`.
#[test]
fn a_valid_snapshot_above_the_maximum_is_kept_as_prev_not_moved_aside() {
    let sim = old_disk(); // state.snap holds 100_000 bytes
    let main = sim.current()[OsStr::new(NAME)].clone();
    let small = SaveOptions::builder()
        .chunk_size(4096)
        .max_data_len(50_000)
        .build()
        .unwrap();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), small);
    assert_eq!(saver.generation(), 2, "its generation still counts");
    let SaveOutcome::Saved(r) = saver.save(&Image::from_bytes(vec![1; 10_000]), 3).unwrap() else {
        panic!()
    };
    assert!(r.moved_corrupt.is_none(), "{r:?}");
    assert!(r.kept_previous);
    assert_eq!(r.generation, 3);
    let after = sim.current();
    assert_eq!(after[OsStr::new("state.snap.prev")], main);
    assert!(
        !names(&after).iter().any(|n| n.contains("corrupt")),
        "{:?}",
        names(&after)
    );
}

/// The damaged file in the snapshot's place is given its `.corrupt-*`
/// name by a link: when the commit then fails, that name is dropped and
/// the damaged file is where it was.
#[test]
fn a_failed_commit_leaves_a_damaged_file_in_place_and_no_corrupt_name() {
    let sim = old_disk();
    let mut bad = sim.current()[OsStr::new(NAME)].clone();
    bad[5000] ^= 1;
    sim.put(NAME, bad);
    let before = sim.current();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
    sim.fail_at(COMMIT_STEP, Fault::NoSpace);
    assert!(saver.save(&image(2), 3).is_err());
    assert_eq!(sim.current(), before);
    // And with the commit done: the damaged file kept byte for byte.
    let SaveOutcome::Saved(r) = saver.save(&image(2), 1_700_000_000_000_000_000).unwrap() else {
        panic!()
    };
    let (kept, _) = r.moved_corrupt.unwrap();
    assert!(
        kept.ends_with("state.snap.corrupt-20231114T221320Z"),
        "{kept:?}"
    );
    let after = sim.current();
    assert_eq!(after[kept.file_name().unwrap()], before[OsStr::new(NAME)]);
    assert_eq!(
        after[OsStr::new("state.snap.prev")],
        before[OsStr::new("state.snap.prev")]
    );
}

#[test]
fn save_options_are_checked_when_built() {
    let d = SaveOptions::default();
    assert_eq!(SaveOptions::builder().build().unwrap(), d);
    assert_eq!(
        (
            d.chunk_size(),
            d.write_size(),
            d.max_data_len(),
            d.max_chain()
        ),
        (256 << 10, 1 << 20, DEFAULT_MAX_DATA_LEN, 8)
    );
    // Large chunks make the default write size one chunk.
    let big = SaveOptions::builder().chunk_size(1 << 26).build().unwrap();
    assert_eq!(big.write_size(), 1 << 26);
    let tiny = SaveOptions::builder()
        .chunk_size(4096)
        .write_size(4096)
        .max_data_len(1)
        .build()
        .unwrap();
    assert_eq!(tiny.max_data_len(), 1);
    assert!(
        SaveOptions::builder()
            .max_data_len(SaveOptions::MAX_DATA_LEN)
            .write_size(SaveOptions::MAX_WRITE_SIZE)
            .build()
            .is_ok()
    );

    let refused = |b: SaveOptionsBuilder, option: &str, accepted: &str| {
        let e = b.build().unwrap_err();
        assert_eq!(e.option, option, "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with(option) && text.contains("out of range") && text.contains(accepted),
            "{text}"
        );
    };
    for chunk_size in [0, 1, 1000, 4095, 4097, 6144, 1 << 27, u32::MAX] {
        refused(
            SaveOptions::builder().chunk_size(chunk_size),
            "chunk_size",
            "a power of two in 4096..=67108864",
        );
    }
    for write_size in [0, 1, 4095, (1 << 30) + 1, usize::MAX] {
        refused(
            SaveOptions::builder()
                .chunk_size(4096)
                .write_size(write_size),
            "write_size",
            "4096..=1073741824",
        );
    }
    // A write holds whole chunks.
    refused(
        SaveOptions::builder().chunk_size(1 << 20).write_size(4096),
        "write_size",
        "1048576..=",
    );
    for max in [0, SaveOptions::MAX_DATA_LEN + 1, u64::MAX] {
        refused(
            SaveOptions::builder().max_data_len(max),
            "max_data_len",
            "1..=9223372036854775807",
        );
    }
}

#[test]
fn save_keeps_prev_and_counts_generations() {
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options());
    assert_eq!(
        saver.save(&Image::default(), 1).unwrap(),
        SaveOutcome::SkippedEmpty
    );
    assert!(
        !d.path().join(NAME).exists(),
        "an empty memfd writes nothing"
    );
    let SaveOutcome::Saved(r1) = saver.save(&image(0), 1).unwrap() else {
        panic!()
    };
    assert_eq!((r1.generation, r1.kept_previous), (1, false));
    assert_eq!(r1.stored_len, 13_000, "holes are not written");
    let SaveOutcome::Saved(r2) = saver.save(&image(1), 2).unwrap() else {
        panic!()
    };
    assert_eq!((r2.generation, r2.kept_previous), (2, true));
    let main = Snapshot::open(&d.path().join(NAME), u64::MAX).unwrap();
    let prev = Snapshot::open(&prev_path(&d.path().join(NAME)), u64::MAX).unwrap();
    assert_eq!(main.header().generation, 2);
    assert_eq!(prev.header().generation, 1);
    assert_eq!(main.header().saved_at_ns, 2);
    assert_eq!(main.into_image(), image(1));
    assert_eq!(prev.into_image(), image(0));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.path().join(NAME))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // A new saver continues the generation.
    let mut again = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options());
    let SaveOutcome::Saved(r3) = again.save(&image(2), 3).unwrap() else {
        panic!()
    };
    assert_eq!((r3.generation, r3.kept_previous), (3, true));
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        2,
        "no leftovers"
    );
}

#[test]
fn a_damaged_file_in_the_snapshots_place_is_moved_aside_not_kept_as_prev() {
    let sim = old_disk();
    let prev_before = sim.current()[OsStr::new("state.snap.prev")].clone();
    let mut bad = sim.current()[OsStr::new(NAME)].clone();
    bad[5000] ^= 1;
    sim.put(NAME, bad.clone());
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
    let SaveOutcome::Saved(r) = saver.save(&image(2), 1_700_000_000_000_000_000).unwrap() else {
        panic!()
    };
    let (moved, damage) = r.moved_corrupt.unwrap();
    assert!(
        matches!(damage, Damage::ChunkChecksum { index: 0, .. }),
        "{damage}"
    );
    let after = sim.current();
    assert_eq!(after[moved.file_name().unwrap()], bad);
    assert_eq!(after[OsStr::new("state.snap.prev")], prev_before);
    assert!(!r.kept_previous);
}

#[test]
fn a_symlink_in_the_temp_files_place_is_not_followed() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("target");
    std::fs::write(&target, b"precious").unwrap();
    let pid = std::process::id();
    std::os::unix::fs::symlink(&target, d.path().join(format!(".{NAME}.tmp-{pid}-1"))).unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options());
    assert!(saver.save(&image(0), 1).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    // The next attempt uses a fresh name and succeeds.
    saver.save(&image(0), 1).unwrap();
}

#[test]
fn stale_temps_of_dead_processes_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let me = std::process::id();
    for n in [
        format!(".{NAME}.tmp-{dead_pid}-3"),
        format!(".{NAME}.prev-tmp-{dead_pid}-4"),
        format!(".{NAME}.tmp-{me}-1"),
        format!(".other.tmp-{dead_pid}-1"),
        NAME.to_string(),
    ] {
        std::fs::write(d.path().join(n), b"x").unwrap();
    }
    let removed = remove_stale_temps(d.path(), OsStr::new(NAME));
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 3);
}

#[test]
fn unchanged_detection() {
    let d = tempfile::tempdir().unwrap();
    let m = memfd();
    m.set_len(100_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&m, b"abc", 70_000).unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options());
    let (len, table) = crate::image::probe_table(&m, 4096).unwrap();
    assert!(!saver.is_unchanged(len, &table));
    saver.save(&Image::read_from(&m).unwrap(), 1).unwrap();
    let (len, table) = crate::image::probe_table(&m, 4096).unwrap();
    assert!(saver.is_unchanged(len, &table));
    std::os::unix::fs::FileExt::write_all_at(&m, b"x", 70_001).unwrap();
    let (len, table) = crate::image::probe_table(&m, 4096).unwrap();
    assert!(!saver.is_unchanged(len, &table));
}

#[test]
fn replacing_prev_hands_the_old_one_to_retire_and_changes_no_step() {
    let sim = old_disk(); // state.snap = image(1), .prev = image(0)
    let old_prev = sim.current()[OsStr::new("state.snap.prev")].clone();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options());
    saver.save(&image(2), 3).unwrap();
    // The old .prev was held open across the rename and then retired (so
    // that its blocks are freed outside the save), not dropped inline.
    assert_eq!(sim.retired(), vec![old_prev]);
    // The first save of a series has no .prev to replace.
    let fresh = SimStorage::default();
    Saver::new(fresh.clone(), OsStr::new(NAME), options())
        .save(&image(0), 1)
        .unwrap();
    assert!(fresh.retired().is_empty());
}

#[test]
fn large_saves_start_writeback_in_order_without_gaps() {
    let sim = SimStorage::default();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), SaveOptions::default());
    let len = 3 * super::WRITEBACK_STEP + 12_345;
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    saver.save(&Image::from_bytes(bytes.clone()), 1).unwrap();
    let hints = sim.hints();
    assert_eq!(hints.len(), 3, "{hints:?}");
    let data_offset = format::data_offset_for(len.div_ceil(1 << 20) as u64).unwrap();
    let mut next = data_offset;
    for &(_, offset, n) in &hints {
        assert_eq!(offset, next, "{hints:?}");
        assert!(n >= super::WRITEBACK_STEP as u64);
        next += n;
    }
    assert!(next <= data_offset + len as u64);
    assert_eq!(load_state(&sim.current()).unwrap(), bytes);
}

#[test]
fn an_image_saved_with_crcs_on_another_thread_verifies() {
    // Big enough for the threaded CRC pass (the unit-test threshold is
    // small), with holes, and chunks split across extents.
    let img = image(7);
    assert!(img.bytes().len() as u64 >= crate::parallel::PARALLEL_MIN_BYTES);
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options());
    saver.save(&img, 1).unwrap();
    let loaded = Snapshot::open(&d.path().join(NAME), u64::MAX).unwrap();
    assert_eq!(loaded.chunks(), img.table(4096));
    assert_eq!(loaded.into_image(), img);
}

#[test]
fn a_memfd_with_size_but_no_data_never_replaces_a_snapshot() {
    // Sized but never written (or punched clean by a failed load): saving
    // it would replace a good snapshot with zeros.
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options());
    let SaveOutcome::Saved(_) = saver.save(&image(0), 1).unwrap() else {
        panic!()
    };
    let before = std::fs::read(d.path().join(NAME)).unwrap();
    let m = memfd();
    m.set_len(1 << 20).unwrap();
    assert_eq!(saver.save_memfd(&m, 2).unwrap(), SaveOutcome::SkippedEmpty);
    assert_eq!(std::fs::read(d.path().join(NAME)).unwrap(), before);
    assert!(!prev_path(&d.path().join(NAME)).exists());
}

#[test]
fn a_crafted_maximal_generation_saturates_instead_of_overflowing() {
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options());
    saver.generation = u64::MAX;
    let SaveOutcome::Saved(r) = saver.save(&image(0), 1).unwrap() else {
        panic!()
    };
    assert_eq!(r.generation, u64::MAX);
}
