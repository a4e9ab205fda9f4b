//! Delta snapshots and their chains: a save after a full one writes only
//! the cells that changed; loads rebuild the state from the chain; a chain
//! is compacted into a full snapshot past its bounds; a crash at any step
//! of a delta save or of a compaction loads the old or the new state; a
//! missing, replaced or damaged base makes the delta damaged, and the load
//! falls back on `.prev` as for any damaged snapshot.

use super::*;
use crate::image::Extent;
use crate::load::{LoadOutcome, restore};
use crate::storage::DirStorage;
use crate::storage::sim::{DiskImage, Fault, SimStorage, materialize};
use shm_fd::{CreateOptions, SharedFd};
use std::fs::File;

const NAME: &str = "state.snap";
const CELL: usize = 4096;

fn options(max_chain: u32) -> SaveOptions {
    SaveOptions::builder()
        .chunk_size(CELL as u32)
        .write_size(CELL)
        .max_chain(max_chain)
        .build()
        .unwrap()
}

fn memfd() -> File {
    SharedFd::create("delta-test", CreateOptions::default())
        .unwrap()
        .into_file()
}

/// A sparse image of the dense `state`: runs of zero cells are holes.
fn image_of(state: &[u8]) -> Image {
    let mut extents: Vec<Extent> = Vec::new();
    let mut bytes = Vec::new();
    for (i, cell) in state.chunks(CELL).enumerate() {
        if cell.iter().all(|&b| b == 0) {
            continue;
        }
        let offset = (i * CELL) as u64;
        match extents.last_mut() {
            Some(e) if e.offset + e.len == offset => e.len += cell.len() as u64,
            _ => extents.push(Extent {
                offset,
                len: cell.len() as u64,
            }),
        }
        bytes.extend_from_slice(cell);
    }
    Image::from_parts(state.len() as u64, extents, bytes).unwrap()
}

/// A deterministic pseudo-random generator (xorshift), so a failure
/// repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Loads the snapshot in `dir` as a fresh start would: the memfd's
/// contents, dense, and the outcome.
fn load_dir(dir: &Path) -> Result<(Vec<u8>, LoadOutcome), String> {
    let m = memfd();
    match restore(&dir.join(NAME), &m, u64::MAX, 0, None) {
        Ok(o @ LoadOutcome::Loaded { .. }) => Ok((Image::read_from(&m).unwrap().to_dense(), o)),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn load_disk(disk: &DiskImage) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().unwrap();
    materialize(disk, dir.path());
    load_dir(dir.path()).map(|(state, _)| state)
}

fn saved(outcome: Result<SaveOutcome>) -> SaveReport {
    match outcome {
        Ok(SaveOutcome::Saved(r)) => r,
        other => panic!("not saved: {other:?}"),
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// 64 cells of patterned bytes, with a hole in cells 10..14.
fn base_state() -> Vec<u8> {
    let mut s: Vec<u8> = (0..64 * CELL).map(|i| (i % 251) as u8 | 1).collect();
    s[10 * CELL..14 * CELL].fill(0);
    s
}

#[test]
fn a_save_after_a_full_one_writes_only_the_changed_cells() {
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(8));
    let mut state = base_state();
    let full = saved(saver.save(&image_of(&state), 1));
    assert_eq!(full.base, None);
    assert_eq!(full.stored_len, 60 * CELL as u64);

    // Two bytes in two cells, and one cell of the hole filled.
    state[3 * CELL + 7] ^= 0xFF;
    state[40 * CELL] ^= 0xFF;
    state[11 * CELL + 100] = 9;
    let delta = saved(saver.save(&image_of(&state), 2));
    let base = delta.base.expect("a delta");
    assert_eq!((base.generation, base.depth), (1, 1));
    assert_eq!(delta.stored_len, 3 * CELL as u64, "three whole cells");
    assert!(delta.file_len < 5 * CELL as u64, "{}", delta.file_len);
    assert!(d.path().join("state.snap.gen-1").exists());
    let (loaded, outcome) = load_dir(d.path()).unwrap();
    assert_eq!(loaded, state);
    let LoadOutcome::Loaded { chain, chunks, .. } = outcome else {
        unreachable!()
    };
    assert_eq!(chain.len(), 2);
    assert_eq!(chunks, image_of(&state).table(CELL as u32));

    // Punching a cell out and cutting the memfd shorter are changes too.
    state[20 * CELL..21 * CELL].fill(0);
    state.truncate(50 * CELL + 10);
    let delta = saved(saver.save(&image_of(&state), 3));
    assert_eq!(delta.base.unwrap().depth, 2);
    assert_eq!(load_dir(d.path()).unwrap().0, state);
    // Growing it back reads zeros past the cut, not the old bytes.
    state.resize(64 * CELL, 0);
    state[63 * CELL] = 1;
    let delta = saved(saver.save(&image_of(&state), 4));
    assert_eq!(delta.base.unwrap().depth, 3);
    // The cell at the old cut (its extent changed) and the one written.
    assert_eq!(delta.stored_len, 2 * CELL as u64);
    assert_eq!(load_dir(d.path()).unwrap().0, state);
    // Nothing changed: nothing written.
    assert_eq!(
        saver.save(&image_of(&state), 5).unwrap(),
        SaveOutcome::SkippedUnchanged
    );
    // `.prev` is the snapshot before, and loads through its own chain.
    std::fs::remove_file(d.path().join(NAME)).unwrap();
    let (prev, outcome) = load_dir(d.path()).unwrap();
    assert!(matches!(
        outcome,
        LoadOutcome::Loaded {
            fallback: Some(_),
            ..
        }
    ));
    let mut before = state.clone();
    before[63 * CELL] = 0;
    before.truncate(50 * CELL + 10);
    before.resize(64 * CELL, 0);
    assert_eq!(&prev[..50 * CELL + 10], &before[..50 * CELL + 10]);
    assert_eq!(prev.len(), 50 * CELL + 10);
}

/// Random changes, sizes and holes over many saves: every save loads back
/// exactly, chains stay within their bounds, and no `.gen-` file outlives
/// its use.
#[test]
fn random_saves_always_load_back_and_chains_stay_bounded() {
    for max_chain in [1, 3, 8] {
        let d = tempfile::tempdir().unwrap();
        let mut saver = Saver::new(
            DirStorage::new(d.path()),
            OsStr::new(NAME),
            options(max_chain),
        );
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(max_chain));
        let mut state = base_state();
        let (mut deltas, mut fulls) = (0, 0);
        for round in 0..150u64 {
            match rng.below(10) {
                // A few bytes in a few cells.
                0..=5 => {
                    for _ in 0..=rng.below(3) {
                        let at = rng.below(state.len() as u64) as usize;
                        state[at] = rng.next() as u8 | 1;
                    }
                }
                // A cell punched out.
                6 => {
                    let c = rng.below((state.len() / CELL) as u64) as usize * CELL;
                    let end = (c + CELL).min(state.len());
                    state[c..end].fill(0);
                }
                // Shorter or longer, not on a cell boundary.
                7 => {
                    let len = (20 * CELL) as u64 + rng.below((50 * CELL) as u64);
                    state.resize(len as usize, 0);
                }
                // Everything changes.
                8 => state.iter_mut().for_each(|b| *b = b.wrapping_add(1) | 1),
                _ => {}
            }
            match saver.save(&image_of(&state), round + 1).unwrap() {
                SaveOutcome::Saved(r) => match r.base {
                    Some(b) => {
                        deltas += 1;
                        assert!(b.depth <= max_chain, "round {round}");
                    }
                    None => fulls += 1,
                },
                SaveOutcome::SkippedUnchanged => {}
                other => panic!("{other:?}"),
            }
            let (loaded, outcome) = load_dir(d.path()).unwrap();
            assert_eq!(loaded, state, "max_chain {max_chain}, round {round}");
            let LoadOutcome::Loaded { chain, .. } = outcome else {
                unreachable!()
            };
            // The files are the snapshot, .prev and the bases of their
            // chains, nothing more.
            let gens = names_in(d.path())
                .iter()
                .filter(|n| n.contains(".gen-"))
                .count();
            assert!(
                gens <= 2 * max_chain as usize,
                "round {round}: {:?}",
                names_in(d.path())
            );
            assert!(chain.len() <= max_chain as usize + 1);
        }
        assert!(
            deltas > 50 && fulls > 5,
            "{max_chain}: {deltas} deltas, {fulls} fulls"
        );
    }
}

#[test]
fn a_chain_is_compacted_when_its_deltas_grow_past_half_the_full() {
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(100));
    let mut state = base_state(); // 60 cells stored
    saver.save(&image_of(&state), 1).unwrap();
    // Ten cells a save: the fourth delta brings the chain to 40 cells of
    // deltas, past half of the full's 60, and the same save compacts it
    // into a full snapshot of the same state (generation 6, from the
    // chain's files); the next delta applies to that.
    let mut kinds = Vec::new();
    for round in 0..5usize {
        for c in 0..10 {
            state[(20 + c) * CELL + round] ^= 0x55;
        }
        let r = saved(saver.save(&image_of(&state), 2 + round as u64));
        kinds.push((r.base.map_or(0, |b| b.depth), r.compacted));
        assert_eq!(r.compaction_failed, None);
        assert_eq!(load_dir(d.path()).unwrap().0, state);
    }
    assert_eq!(
        kinds,
        [(1, None), (2, None), (3, None), (4, Some(6)), (1, None)]
    );
    // `.prev` is the full snapshot (generation 6), so no old base is kept.
    let names = names_in(d.path());
    assert_eq!(
        names,
        [
            "state.snap",
            "state.snap.gen-6",
            "state.snap.gen-7",
            "state.snap.prev"
        ],
        "{names:?}"
    );
}

#[test]
fn max_chain_zero_writes_full_snapshots_only() {
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(0));
    let mut state = base_state();
    for round in 0..4 {
        state[round] ^= 1;
        assert_eq!(
            saved(saver.save(&image_of(&state), 1 + round as u64)).base,
            None
        );
    }
    assert_eq!(names_in(d.path()), ["state.snap", "state.snap.prev"]);
    assert!(
        SaveOptions::builder()
            .max_chain(format::MAX_DEPTH + 1)
            .build()
            .is_err()
    );
}

/// A saver that loaded a chain (a restart) continues it with a delta; one
/// that did not load what is in place (a new saver) writes a full one.
#[test]
fn a_restart_that_loaded_the_chain_continues_it() {
    let d = tempfile::tempdir().unwrap();
    let mut state = base_state();
    {
        let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(8));
        saver.save(&image_of(&state), 1).unwrap();
        state[5] ^= 1;
        assert!(saved(saver.save(&image_of(&state), 2)).base.is_some());
    }
    let (loaded, outcome) = load_dir(d.path()).unwrap();
    assert_eq!(loaded, state);
    let LoadOutcome::Loaded { chain, chunks, .. } = outcome else {
        unreachable!()
    };
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(8));
    saver.note_loaded(&chain, &chunks, true);
    state[CELL * 30] ^= 1;
    let r = saved(saver.save(&image_of(&state), 3));
    assert_eq!(r.base.map(|b| (b.generation, b.depth)), Some((2, 2)));
    assert_eq!(r.stored_len, CELL as u64);
    assert_eq!(load_dir(d.path()).unwrap().0, state);
    // Not noted: full.
    let mut fresh = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(8));
    state[1] ^= 1;
    assert_eq!(saved(fresh.save(&image_of(&state), 4)).base, None);
    assert_eq!(load_dir(d.path()).unwrap().0, state);
}

/// A disk whose snapshot is a delta of depth 2 (generation 3) on the
/// full generation 1, `.prev` the delta of generation 2, and the saver
/// that wrote them with the state it last saved.
fn chain_disk(max_chain: u32) -> (SimStorage, Saver<SimStorage>, Vec<u8>) {
    chain_disk_after(max_chain, 0)
}

/// [`chain_disk`], then `more` saves of one changed byte each.
fn chain_disk_after(max_chain: u32, more: usize) -> (SimStorage, Saver<SimStorage>, Vec<u8>) {
    let sim = SimStorage::default();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options(max_chain));
    let mut state = base_state();
    saver.save(&image_of(&state), 1).unwrap();
    state[2 * CELL] ^= 0x10;
    saver.save(&image_of(&state), 2).unwrap();
    state[30 * CELL] ^= 0x10;
    saver.save(&image_of(&state), 3).unwrap();
    for i in 0..more {
        state[40 * CELL + i] ^= 0x10;
        saver.save(&image_of(&state), 4 + i as u64).unwrap();
    }
    (sim, saver, state)
}

/// Crash at every storage operation of one more save, with `change`
/// applied to the state: every crash image loads the old or the new state,
/// and a save that returned loads the new one from every image.
fn crash_every_step(
    max_chain: u32,
    more: usize,
    change: impl Fn(&mut Vec<u8>),
    expect_delta: bool,
) -> usize {
    crash_every_step_of(max_chain, more, false, change, expect_delta)
}

/// [`crash_every_step`]; with `unnamed`, the snapshot in place has lost
/// its chain name first (a crash before its save's directory fsync), so a
/// delta save links it and fsyncs the directory itself.
fn crash_every_step_of(
    max_chain: u32,
    more: usize,
    unnamed: bool,
    change: impl Fn(&mut Vec<u8>),
    expect_delta: bool,
) -> usize {
    let disk = |max_chain, more| {
        let (sim, saver, state) = chain_disk_after(max_chain, more);
        if unnamed {
            let mut st = sim.clone();
            let head = format!("state.snap.gen-{}", saver.generation());
            st.remove(OsStr::new(&head)).unwrap();
            st.sync_dir().unwrap();
        }
        (sim, saver, state)
    };
    let (sim, mut saver, old) = disk(max_chain, more);
    let mut new = old.clone();
    change(&mut new);
    sim.fail_at(usize::MAX, Fault::Crash);
    let at = 4 + more as u64;
    let r = saved(saver.save(&image_of(&new), at));
    assert_eq!(r.base.is_some(), expect_delta);
    let steps = sim.ops();
    for disk in sim.crash_images() {
        assert_eq!(load_disk(&disk).unwrap(), new, "after the save");
    }
    let mut seen_new = false;
    for step in 1..=steps {
        let (sim, mut saver, _) = disk(max_chain, more);
        sim.fail_at(step, Fault::Crash);
        let _ = saver.save(&image_of(&new), at);
        for disk in sim.crash_images() {
            let got = load_disk(&disk)
                .unwrap_or_else(|e| panic!("crash at step {step}, disk {:?}: {e}", disk.keys()));
            assert!(
                got == old || got == new,
                "crash at step {step}: neither state, disk {:?}",
                disk.keys()
            );
            seen_new |= got == new;
        }
    }
    assert!(seen_new);
    steps
}

#[test]
fn a_crash_at_every_step_of_a_delta_save_loads_old_or_new() {
    let steps = crash_every_step(8, 0, |s| s[50 * CELL + 3] ^= 0x20, true);
    // create, 1 data write, header, fsync, link .prev-tmp, rename, rename,
    // link of the new snapshot's chain name, directory fsync (the base has
    // its chain name from its own save).
    assert_eq!(steps, 9, "the protocol's steps changed: update the docs");
}

#[test]
fn a_crash_at_every_step_of_a_delta_save_that_names_its_base_loads_old_or_new() {
    let steps = crash_every_step_of(8, 0, true, |s| s[50 * CELL + 3] ^= 0x20, true);
    // As above, plus linking the base's chain name and a directory fsync
    // before the commit.
    assert_eq!(steps, 11);
}

#[test]
fn a_crash_at_every_step_of_a_compaction_loads_old_or_new() {
    // max_chain 3: the fourth save writes the chain's third delta and, in
    // the same call, compacts the chain into a full snapshot read from its
    // files. A crash anywhere in either loads the old or the new state.
    let steps = crash_every_step(3, 0, |s| s[50 * CELL + 3] ^= 0x20, true);
    // The delta's 9, then the full snapshot's: create, 60 data writes,
    // header, fsync, link, rename, rename, link of the chain name,
    // directory fsync, and the removal of bases no chain needs.
    assert!(steps >= 9 + 60 + 8, "{steps} steps");
    let (sim, _, _) = chain_disk_after(3, 0);
    let (_, mut saver, mut state) = chain_disk_after(3, 0);
    state[50 * CELL + 3] ^= 0x20;
    let r = saved(saver.save(&image_of(&state), 4));
    assert_eq!((r.base.map(|b| b.depth), r.compacted), (Some(3), Some(5)));
    drop(sim);
    // The delta after it applies to the full snapshot; `.prev` is that
    // full snapshot, so the old chain's files are gone.
    state[7 * CELL] ^= 1;
    let r = saved(saver.save(&image_of(&state), 5));
    assert_eq!(r.base.map(|b| (b.generation, b.depth)), Some((5, 1)));
    let disk = saver.storage().current();
    let names: Vec<_> = disk.keys().cloned().collect();
    assert_eq!(
        names,
        [
            "state.snap",
            "state.snap.gen-5",
            "state.snap.gen-6",
            "state.snap.prev"
        ]
    );
    assert_eq!(load_disk(&disk).unwrap(), state);
}

#[test]
fn a_full_disk_at_every_step_of_a_delta_save_changes_nothing_before_the_commit() {
    let (_, _, old) = chain_disk(8);
    // create, data, header, fsync, link .prev-tmp, rename (the commit),
    // rename, link of the new snapshot's chain name, directory fsync.
    let steps = 9;
    let commit = 6;
    let own_link = 8;
    for step in 1..=steps {
        let (sim, mut saver, _) = chain_disk(8);
        let before = sim.current();
        let mut new = old.clone();
        new[7] ^= 1;
        sim.fail_at(step, Fault::NoSpace);
        let result = saver.save(&image_of(&new), 4);
        let after = sim.current();
        let state = load_disk(&after).unwrap();
        if step == own_link {
            // Best effort: the next delta's save links it (and fsyncs).
            assert!(result.is_ok(), "step {step}: {result:?}");
            assert!(!after.contains_key(OsStr::new("state.snap.gen-4")));
            assert_eq!(state, new, "step {step}");
            continue;
        }
        let e = result.unwrap_err();
        if step <= commit {
            assert_eq!(after, before, "step {step}: {e}");
            assert_eq!(state, old, "step {step}");
        } else {
            assert_eq!(state, new, "step {step}");
        }
        let leftovers: Vec<_> = after
            .keys()
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "step {step}: {leftovers:?}");
    }
}

/// The chain's files, broken one way or another: the snapshot is damaged
/// and the load falls back on `.prev` (whose own chain is intact) or,
/// when the damage reaches `.prev`'s chain too, refuses as for two damaged
/// snapshots. Nothing is loaded from a broken chain.
#[test]
fn a_missing_replaced_or_damaged_base_falls_back_as_damage_does() {
    let (sim, _, state) = chain_disk(8);
    let disk = sim.current();
    assert_eq!(load_disk(&disk).unwrap(), state);
    let mut prev_state = state.clone();
    prev_state[30 * CELL] ^= 0x10;

    // gen-2 is the snapshot's base only (.prev is generation 2 under its
    // own name): without it the snapshot is damaged, .prev loads.
    for breakage in ["missing", "replaced", "damaged"] {
        let mut d = disk.clone();
        let gen2 = OsStr::new("state.snap.gen-2");
        match breakage {
            "missing" => {
                d.remove(gen2);
            }
            // Another valid snapshot of the same generation.
            "replaced" => {
                let other = SimStorage::default();
                let mut s = Saver::new(other.clone(), OsStr::new("x"), options(0));
                s.save(&image_of(&state), 9).unwrap();
                s.save(&image_of(&prev_state), 9).unwrap();
                d.insert(gen2.into(), other.current()[OsStr::new("x")].clone());
            }
            _ => {
                let f = d.get_mut(gen2).unwrap();
                let n = f.len();
                f[n - 1] ^= 1;
            }
        }
        // .prev names generation 2 too, so it must not share the inode.
        let dir = tempfile::tempdir().unwrap();
        materialize(&d, dir.path());
        let m = memfd();
        let err_or = restore(&dir.path().join(NAME), &m, u64::MAX, 0, None);
        match (breakage, err_or) {
            (
                "missing" | "replaced",
                Ok(LoadOutcome::Loaded {
                    fallback: Some(f),
                    path,
                    ..
                }),
            ) => {
                assert!(path.ends_with("state.snap.prev"));
                let msg = f.problem.to_string();
                assert!(msg.contains("state.snap.gen-2"), "{msg}");
                assert!(f.moved_to.is_some());
                assert_eq!(Image::read_from(&m).unwrap().to_dense(), prev_state);
            }
            (
                "damaged",
                Ok(LoadOutcome::Loaded {
                    fallback: Some(f), ..
                }),
            ) => {
                // A damaged gen-2 breaks the snapshot's chain; .prev is a
                // separate copy here (materialize writes each name).
                assert!(f.problem.to_string().contains("gen-2"), "{}", f.problem);
            }
            (b, other) => panic!("{b}: {other:?}"),
        }
    }

    // The full snapshot at the bottom damaged: both chains are broken.
    let mut d = disk.clone();
    let f = d.get_mut(OsStr::new("state.snap.gen-1")).unwrap();
    let n = f.len();
    f[n - 1] ^= 1;
    let before = d.clone();
    let dir = tempfile::tempdir().unwrap();
    materialize(&d, dir.path());
    let m = memfd();
    let e = restore(&dir.path().join(NAME), &m, u64::MAX, 0, None).unwrap_err();
    assert!(matches!(e, Error::NothingValid { .. }), "{e}");
    assert!(e.to_string().contains("state.snap.gen-1"), "{e}");
    assert_eq!(
        Image::read_from(&m).unwrap().data_len(),
        0,
        "nothing loaded"
    );
    for (name, bytes) in &before {
        assert_eq!(&std::fs::read(dir.path().join(name)).unwrap(), bytes);
    }
}

/// Damage found while copying (after the verify) empties the memfd and
/// falls back, as for a full snapshot.
#[test]
fn check_and_inspect_follow_the_chain() {
    let (sim, _, _) = chain_disk(8);
    let dir = tempfile::tempdir().unwrap();
    materialize(&sim.current(), dir.path());
    let i = crate::inspect(&dir.path().join(NAME), u64::MAX);
    assert!(i.verdict.is_ok(), "{:?}", i.verdict);
    assert_eq!(
        i.bases.iter().map(|h| h.generation).collect::<Vec<_>>(),
        [2, 1]
    );
    std::fs::remove_file(dir.path().join("state.snap.gen-1")).unwrap();
    let i = crate::inspect(&dir.path().join(NAME), u64::MAX);
    let e = i.verdict.unwrap_err();
    assert!(e.is_corrupt(), "{e}");
    assert!(e.to_string().contains("state.snap.gen-1 is missing"), "{e}");
    // .prev (generation 2) is a delta on generation 1 too.
    let i = crate::inspect(&dir.path().join("state.snap.prev"), u64::MAX);
    assert!(i.verdict.unwrap_err().is_corrupt());
}

#[test]
fn the_files_of_a_compacted_chain_are_retired_not_freed_inside_a_save() {
    let sim = SimStorage::default();
    let mut saver = Saver::new(sim.clone(), OsStr::new(NAME), options(2));
    let mut state = base_state();
    saver.save(&image_of(&state), 1).unwrap();
    let full = sim.current()[OsStr::new(NAME)].clone();
    // Two deltas (the second compacts the chain into generation 4)...
    for round in 0..2usize {
        state[(20 + round) * CELL] ^= 0x55;
        saved(saver.save(&image_of(&state), 2 + round as u64));
    }
    assert!(sim.current().contains_key(OsStr::new("state.snap.gen-1")));
    // ... then a delta on generation 4: `.prev` is then generation 4, and
    // the old chain (generations 1 to 3) is no longer needed.
    let before = sim.retired().len();
    state[30 * CELL] ^= 0x55;
    saved(saver.save(&image_of(&state), 4));
    assert!(!sim.current().contains_key(OsStr::new("state.snap.gen-1")));
    // The old full snapshot's last name went, and its file was handed to
    // `retire` by that save (closed on the side: freeing it is not the
    // save's work).
    assert!(
        sim.retired()[before..].contains(&full),
        "the old full snapshot was not retired"
    );
    assert_eq!(load_disk(&sim.current()).unwrap(), state);
}

#[test]
fn a_compaction_reads_every_chunk_checked_and_a_damaged_base_fails_it() {
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(3));
    let mut state = base_state();
    saver.save(&image_of(&state), 1).unwrap();
    for round in 0..2usize {
        state[(10 + round) * CELL + 7] ^= 0x33;
        let r = saved(saver.save(&image_of(&state), 2 + round as u64));
        assert_eq!(r.compacted, None);
    }
    // A byte of a cell no delta replaced, flipped in the full snapshot at
    // the chain's bottom: the compaction that the next delta triggers
    // reads it, and fails naming that file.
    let bottom = d.path().join("state.snap.gen-1");
    let mut bytes = std::fs::read(&bottom).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&bottom, &bytes).unwrap();
    state[40 * CELL] ^= 0x33;
    let r = saved(saver.save(&image_of(&state), 4));
    assert_eq!(r.base.map(|b| b.depth), Some(3));
    assert_eq!(r.compacted, None);
    let why = r
        .compaction_failed
        .expect("the compaction read the damaged chunk");
    assert!(why.contains("state.snap.gen-1"), "{why}");
    // The delta stays in place; no temp file is left.
    let names = names_in(d.path());
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    let head = std::fs::read(d.path().join(NAME)).unwrap();
    assert_eq!(
        u32::from_le_bytes(head[8..12].try_into().unwrap()),
        2,
        "a delta"
    );
}

#[test]
fn a_compaction_writes_the_chain_s_state_piece_by_piece() {
    // Random chains (cells changed, punched to zeros, the size cut and
    // grown) compacted at every third delta: each compacted full snapshot
    // loads the same bytes as the chain it replaced.
    let mut rng = Rng(0x5eed_c0de);
    let d = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(DirStorage::new(d.path()), OsStr::new(NAME), options(3));
    let mut state = base_state();
    saver.save(&image_of(&state), 1).unwrap();
    let mut compactions = 0;
    for round in 0..60u64 {
        match rng.below(8) {
            0 => {
                // Cut or grow by whole cells and a part of one.
                let cells = state.len() / CELL;
                let to = (cells as u64 / 2 + rng.below(cells as u64)) as usize * CELL
                    + rng.below(CELL as u64) as usize;
                state.resize(to.max(CELL), 0);
            }
            1 => {
                let c = rng.below((state.len() / CELL) as u64) as usize;
                let end = ((c + 1) * CELL).min(state.len());
                state[c * CELL..end].fill(0);
            }
            _ => {
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(state.len() as u64) as usize;
                    state[at] = state[at].wrapping_add(1 + rng.below(250) as u8);
                }
            }
        }
        match saver.save(&image_of(&state), 2 + round) {
            Ok(SaveOutcome::Saved(r)) => {
                assert_eq!(r.compaction_failed, None, "round {round}");
                if let Some(g) = r.compacted {
                    compactions += 1;
                    let head = std::fs::read(d.path().join(NAME)).unwrap();
                    assert_eq!(
                        u64::from_le_bytes(head[32..40].try_into().unwrap()),
                        g,
                        "round {round}: the compacted snapshot is in place"
                    );
                    assert_eq!(u32::from_le_bytes(head[8..12].try_into().unwrap()), 1);
                }
            }
            Ok(SaveOutcome::SkippedUnchanged) => {}
            other => panic!("round {round}: {other:?}"),
        }
        let loaded = load_dir(d.path()).unwrap().0;
        assert!(
            loaded == state,
            "round {round}: {} bytes loaded, {} saved, first difference at {:?}",
            loaded.len(),
            state.len(),
            loaded.iter().zip(&state).position(|(a, b)| a != b)
        );
    }
    assert!(compactions >= 5, "{compactions} compactions");
}
