//! Incremental saves of a shm-state program (issue 13, part 1): a state of
//! `BENCH_DELTA_MIB` MiB (default 1024) in which one transaction changed
//! 1 MiB since the last save, saved as `shm-restore --snapshot stop` saves
//! it while the program runs (stop the group; the dirty map says which
//! cells to read; copy them; continue; write the delta), against the save
//! of a memfd of 1 MiB in full, measured in the same run (interleaved).
//!
//! ```text
//! cargo bench -p shm-fd-tests --bench delta_state
//! BENCH_DELTA_MIB=256 BENCH_RUNS=15 cargo bench -p shm-fd-tests --bench delta_state
//! BENCH_MODE=protocol cargo bench -p shm-fd-tests --bench delta_state
//! ```
//!
//! `BENCH_MODE=protocol` saves the state as `shm-restore --snapshot
//! protocol` does instead (a converging copy of the marked cells, no
//! stop); the 1 MiB memfd, which has no protocol header, is still copied
//! in a stop.
//!
//! The command whose group a save stops is a sleeper: the state is written
//! by this process, between saves. Each figure is the median of
//! `BENCH_RUNS` rounds (default 9), with the fastest and slowest; `BENCH_DIR`
//! picks the snapshot directory (default: the system temp dir).

use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use shm_fd::{CreateOptions, SharedFd};
use shm_fd_tests::Kid;
use shm_fd_tests::bench::{env_or, load_average, machine};
use shm_restore::{
    CaptureMethod, Captured, DirStorage, SaveOptions, SaveOutcome, Saver, SnapshotProtocol,
    StopGroup,
};
use shm_state::{Layout, Source, State, StateVec};

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    v: StateVec<u64>,
}

const MIB: usize = 1 << 20;

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

fn main() {
    let mib: usize = env_or("BENCH_DELTA_MIB", 1024);
    let runs: usize = env_or("BENCH_RUNS", 9).max(1);
    let base: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let (d_state, d_small) = (
        tempfile::tempdir_in(&base).unwrap(),
        tempfile::tempdir_in(&base).unwrap(),
    );
    let work = tempfile::tempdir().unwrap();
    println!(
        "incremental saves of a shm-state program: {mib} MiB state, 1 MiB changed per save, \
         {runs} runs; {}; load {}",
        machine(),
        load_average()
    );

    // The program's state: a vector of u64 filling `mib` MiB.
    let shared = SharedFd::create("bench-delta-state", CreateOptions::default()).unwrap();
    let memfd = shared.reopen().unwrap().into_file();
    // SAFETY: a memfd of this process; no other process maps it.
    let source = unsafe { Source::shared(shared) };
    let layout = Layout::new(1).with_snapshot_protocol().journal_len(4 << 20);
    let mut state = State::<Root>::open(source, layout).unwrap();
    let words = (mib * MIB / 8) as u64;
    state
        .transaction(|tx| {
            let v = tx.new_vec::<u64>()?;
            // Reserved whole: no copies of a growing vector left behind.
            tx.vec(v)?.reserve(words)?;
            let piece: Vec<u64> = (0..(8 * MIB / 8) as u64).collect();
            let mut done = 0;
            while done < words {
                let n = (words - done).min(piece.len() as u64) as usize;
                tx.vec(v)?.extend_from_slice(&piece[..n])?;
                done += n as u64;
            }
            tx.root_mut()?.v = v;
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
    let v = state.root().unwrap().v;

    let mut sleep = Command::new("sleep");
    sleep.arg("1000").process_group(0);
    let mut sleeper = Kid::start(sleep, "sleeper", work.path(), None);
    let mut stop = StopGroup::new(sleeper.pid() as i32, Duration::from_secs(5));
    let protocol = std::env::var("BENCH_MODE").is_ok_and(|m| m == "protocol");
    let mut state_capture: Box<dyn CaptureMethod> = if protocol {
        Box::new(SnapshotProtocol::new(
            sleeper.pid() as i32,
            Duration::from_secs(5),
        ))
    } else {
        Box::new(StopGroup::new(sleeper.pid() as i32, Duration::from_secs(5)))
    };
    // BENCH_CHUNK_KIB: the chunk (cell) size of both savers, default the
    // library's.
    let chunk: u32 = env_or("BENCH_CHUNK_KIB", SaveOptions::default().chunk_size() >> 10) << 10;
    let mut saver = Saver::new(
        DirStorage::new(d_state.path()),
        "bench.snap".as_ref(),
        SaveOptions::builder().chunk_size(chunk).build().unwrap(),
    );
    let small = SharedFd::create("bench-delta-small", CreateOptions::default())
        .unwrap()
        .reopen()
        .unwrap()
        .into_file();
    let mut small_saver = Saver::new(
        DirStorage::new(d_small.path()),
        "bench.snap".as_ref(),
        SaveOptions::builder()
            .chunk_size(chunk)
            .max_chain(0)
            .build()
            .unwrap(),
    );
    println!(
        "chunk size {} KiB; the state saved as --snapshot {}",
        chunk >> 10,
        if protocol { "protocol" } else { "stop" }
    );
    let save = |saver: &mut Saver<DirStorage>, stop: &mut dyn CaptureMethod, m: &std::fs::File| {
        let t = Instant::now();
        let captured = match saver.delta_basis() {
            Some(basis) => stop.capture_changes(m, &basis).unwrap(),
            None => stop.capture(m).unwrap(),
        };
        let marked = match &captured {
            Captured::Changes { changes, .. } => changes.marked(),
            _ => None,
        };
        let captured_in = t.elapsed();
        let out = saver
            .save_captured(&captured, m, shm_restore::now_ns())
            .unwrap();
        let d = t.elapsed();
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!(
                "capture {:.2} ms (pause {:.2} ms), save {:.2} ms",
                captured_in.as_secs_f64() * 1e3,
                captured.pause().map_or(0.0, |p| p.as_secs_f64() * 1e3),
                (d - captured_in).as_secs_f64() * 1e3
            );
        }
        drop(captured);
        saver.wait_retired();
        (d, out, marked)
    };
    // The first save is full.
    save(&mut saver, &mut *state_capture, &memfd);
    let change: Vec<u64> = (0..(MIB / 8) as u64).map(|i| i ^ 0xA5A5).collect();
    let (mut t_delta, mut t_small, mut shapes) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs as u64 {
        // 1 MiB, contiguous, at a different place each round.
        let at = (round * 37 % (words / (MIB as u64 / 8) - 1) + 1) * (MIB as u64 / 8);
        state
            .transaction(|tx| {
                let mut vec = tx.vec(v)?;
                for (i, x) in change.iter().enumerate() {
                    vec.set(at + i as u64, x ^ round)?;
                }
                Ok::<_, shm_state::Error>(())
            })
            .unwrap();
        let (d, out, marked) = save(&mut saver, &mut *state_capture, &memfd);
        t_delta.push(d);
        if let SaveOutcome::Saved(r) = out {
            shapes.push((r.stored_len / MIB as u64, r.base.is_some(), marked));
        }
        // The same 1 MiB (the values the transaction wrote), dense: a
        // state of 1 MiB of data. (Before 2026-12-06 this wrote one byte
        // per value, 128 KiB of data in a 1 MiB memfd.)
        let values: Vec<u64> = change.iter().map(|x| x ^ round).collect();
        small
            .write_all_at(bytemuck::cast_slice(&values), 0)
            .unwrap();
        assert_eq!(small.metadata().unwrap().len(), MIB as u64);
        t_small.push(save(&mut small_saver, &mut stop, &small).0);
    }
    sleeper.kill();
    let (delta, small) = (stats(t_delta), stats(t_small));
    println!("per save (MiB stored, delta?, cells marked in the dirty map): {shapes:?}\n");
    println!("| save | time (median, fastest–slowest) | ratio |");
    println!("|---|---|---|");
    println!(
        "| {mib} MiB shm-state, 1 MiB changed, delta from the dirty map ({}) | {:.1} ms ({:.1}–{:.1}) | |",
        if protocol {
            "converging copy"
        } else {
            "in a stop"
        },
        delta.0,
        delta.1,
        delta.2
    );
    println!(
        "| a 1 MiB memfd in full | {:.1} ms ({:.1}–{:.1}) | delta / 1 MiB = {:.2}x |",
        small.0,
        small.1,
        small.2,
        delta.0 / small.0
    );
}
