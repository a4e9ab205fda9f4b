//! shm-state benchmarks: map operations against `std::collections::HashMap`
//! in the same run, the same workload against SQLite (with
//! `--features sqlite-bench`) and against serialising to a file at exit, and
//! open / recovery time of a 1 GiB state.
//!
//! Run: `cargo bench -p shm-state` (add `--features sqlite-bench` for the
//! SQLite rows). `SHM_STATE_BENCH_N` sets the number of keys (default
//! 200000), `SHM_STATE_BENCH_ROUNDS` the rounds of the map table (default
//! 3, best of), `SHM_STATE_BENCH_GIB` the size of the large state (default
//! 1).

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use shm_fd::{CreateOptions, SharedFd};
use shm_state::{Layout, Opened, SharedState, Source, State, StateMap, StateVec};

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    map: StateMap<u64, u64>,
    big: StateVec<u64>,
}

fn env(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Keys in a scrambled order (a bijection of 0..n).
fn keys(n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8)
        .collect()
}

fn memfd() -> SharedFd {
    SharedFd::create("shm-state-bench", CreateOptions::default()).expect("memfd")
}

fn open(fd: SharedFd) -> State<Root> {
    // SAFETY: a private memfd of this benchmark, sealed against shrinking.
    let mut s = State::<Root>::open(unsafe { Source::shared(fd) }, Layout::new(1)).expect("open");
    if s.root().unwrap().map.is_null() {
        s.transaction(|tx| {
            let map = tx.new_map()?;
            let big = tx.new_vec()?;
            tx.set_root(Root { map, big })
        })
        .unwrap();
    }
    s
}

struct Row {
    name: String,
    per_op: Duration,
    baseline: Option<Duration>,
}

fn per_op(total: Duration, n: u64) -> Duration {
    total / n.max(1) as u32
}

fn time(n: u64, f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    per_op(t.elapsed(), n)
}

fn print(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!("{:<58} {:>12} {:>10}", "operation", "per op", "ratio");
    for r in rows {
        let ratio = r
            .baseline
            .map(|b| format!("{:.2}x", r.per_op.as_secs_f64() / b.as_secs_f64()))
            .unwrap_or_else(|| "baseline".into());
        println!("{:<58} {:>12?} {:>10}", r.name, r.per_op, ratio);
    }
}

/// One round of every map measurement, each a fresh map.
struct MapRound {
    std_insert: Duration,
    std_get: Duration,
    std_remove: Duration,
    one_tx_insert: Duration,
    get: Duration,
    get_with_view: Duration,
    one_tx_remove: Duration,
    batch_insert: Duration,
    batch_update: Duration,
}

fn map_round(s: &mut State<Root>, n: u64, ks: &[u64]) -> MapRound {
    // std::collections::HashMap, the baseline.
    let mut std_map = HashMap::new();
    let std_insert = time(n, || {
        for &k in ks {
            std_map.insert(k, k ^ 1);
        }
    });
    let std_get = time(n, || {
        for &k in ks.iter().rev() {
            black_box(std_map.get(&k));
        }
    });
    let std_remove = time(n, || {
        for &k in ks {
            black_box(std_map.remove(&k));
        }
    });
    drop(std_map);

    // Fresh maps in the same state: the tables of earlier rounds are on the
    // free lists, as freed memory is in malloc's for the std map.
    let h: StateMap<u64, u64> = s.transaction(|tx| tx.new_map()).unwrap();
    let one_tx_insert = time(n, || {
        for &k in ks {
            s.transaction(|tx| tx.map(h)?.insert(&k, &(k ^ 1))).unwrap();
        }
    });
    let get = time(n, || {
        let m = s.map(h).unwrap();
        for &k in ks.iter().rev() {
            black_box(m.get(&k).unwrap());
        }
    });
    let get_with_view = time(n, || {
        for &k in ks.iter().rev() {
            black_box(s.map(h).unwrap().get(&k).unwrap());
        }
    });
    let one_tx_remove = time(n, || {
        for &k in ks {
            s.transaction(|tx| tx.map(h)?.remove(&k)).unwrap();
        }
    });
    let fresh: StateMap<u64, u64> = s.transaction(|tx| tx.new_map()).unwrap();
    let batch_insert = time(n, || {
        s.transaction(|tx| {
            let mut m = tx.map(fresh)?;
            for &k in ks {
                m.insert(&k, &k)?;
            }
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
    });
    let batch_update = time(n, || {
        for chunk in ks.chunks(1000) {
            s.transaction(|tx| {
                let mut m = tx.map(fresh)?;
                for &k in chunk {
                    m.insert(&k, &(k + 1))?;
                }
                Ok::<_, shm_state::Error>(())
            })
            .unwrap();
        }
    });
    s.transaction(|tx| {
        tx.map(h)?.free()?;
        tx.map(fresh)?.free()
    })
    .unwrap();
    MapRound {
        std_insert,
        std_get,
        std_remove,
        one_tx_insert,
        get,
        get_with_view,
        one_tx_remove,
        batch_insert,
        batch_update,
    }
}

/// Map operations against std's HashMap: `rounds` rounds, each on fresh
/// maps (std and shm-state alternating). The first round runs on fresh
/// memory on both sides (page faults included); later rounds reuse freed
/// memory on both sides (malloc's, shm-state's free lists), and the best
/// time of each row over those is reported too.
fn map_vs_std(n: u64, rounds: u64) {
    let ks = keys(n);
    let mut s = open(memfd());
    let all: Vec<MapRound> = (0..rounds.max(1))
        .map(|_| map_round(&mut s, n, &ks))
        .collect();
    map_table(
        &format!("map of {n} u64 -> u64 (memfd-backed state), first round: fresh memory"),
        &all[..1],
    );
    if all.len() > 1 {
        map_table(
            &format!(
                "map of {n} u64 -> u64 (memfd-backed state), best of rounds 2..={}: reused memory",
                all.len()
            ),
            &all[1..],
        );
    }
}

fn map_table(title: &str, all: &[MapRound]) {
    let mut rows = Vec::new();
    macro_rules! best {
        ($f:ident) => {
            all.iter().map(|r| r.$f).min().unwrap()
        };
    }
    let (std_insert, std_get, std_remove) = (best!(std_insert), best!(std_get), best!(std_remove));
    let (one_tx_insert, get, get_with_view) =
        (best!(one_tx_insert), best!(get), best!(get_with_view));
    let (one_tx_remove, batch_insert, batch_update) = (
        best!(one_tx_remove),
        best!(batch_insert),
        best!(batch_update),
    );
    rows.push(Row {
        name: "std HashMap insert".into(),
        per_op: std_insert,
        baseline: None,
    });
    rows.push(Row {
        name: "shm-state insert, one transaction each".into(),
        per_op: one_tx_insert,
        baseline: Some(std_insert),
    });
    rows.push(Row {
        name: "shm-state insert, all in one transaction (fresh table)".into(),
        per_op: batch_insert,
        baseline: Some(std_insert),
    });
    rows.push(Row {
        name: "shm-state update (existing keys), 1000 per transaction".into(),
        per_op: batch_update,
        baseline: Some(std_insert),
    });
    rows.push(Row {
        name: "std HashMap get".into(),
        per_op: std_get,
        baseline: None,
    });
    rows.push(Row {
        name: "shm-state get (one MapRef)".into(),
        per_op: get,
        baseline: Some(std_get),
    });
    rows.push(Row {
        name: "shm-state get (state.map(h) per get)".into(),
        per_op: get_with_view,
        baseline: Some(std_get),
    });
    rows.push(Row {
        name: "std HashMap remove".into(),
        per_op: std_remove,
        baseline: None,
    });
    rows.push(Row {
        name: "shm-state remove, one transaction each".into(),
        per_op: one_tx_remove,
        baseline: Some(std_remove),
    });
    print(title, &rows);
}

/// Keeping state across restarts the other usual way: serialise a HashMap
/// to a file at exit, read it back at start.
fn vs_serialise(n: u64) {
    let ks = keys(n);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    let map: HashMap<u64, u64> = ks.iter().map(|&k| (k, k ^ 1)).collect();
    let save = time(1, || {
        let mut buf = Vec::with_capacity(map.len() * 16 + 8);
        buf.extend_from_slice(&(map.len() as u64).to_le_bytes());
        for (k, v) in &map {
            buf.extend_from_slice(&k.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
    });
    let load = time(1, || {
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut buf)
            .unwrap();
        let count = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
        let mut m = HashMap::with_capacity(count);
        for e in buf[8..].chunks_exact(16) {
            m.insert(
                u64::from_le_bytes(e[..8].try_into().unwrap()),
                u64::from_le_bytes(e[8..].try_into().unwrap()),
            );
        }
        black_box(m);
    });
    let fd = memfd();
    let keep = fd.try_clone().unwrap();
    let mut s = open(fd);
    let h = s.root().unwrap().map;
    s.transaction(|tx| {
        let mut m = tx.map(h)?;
        for &k in &ks {
            m.insert(&k, &(k ^ 1))?;
        }
        Ok::<_, shm_state::Error>(())
    })
    .unwrap();
    let close = time(1, || {
        black_box(s.close().unwrap());
    });
    let reopen = time(1, || {
        let s = open(keep.try_clone().unwrap());
        assert_eq!(s.report().opened, Opened::Reopened);
        assert_eq!(s.map(h).unwrap().len(), n);
    });
    let rows = [
        Row {
            name: format!("serialise {n} entries to a file at exit (write+fsync)"),
            per_op: save,
            baseline: None,
        },
        Row {
            name: "shm-state close (nothing to write)".into(),
            per_op: close,
            baseline: Some(save),
        },
        Row {
            name: "read the file back into a HashMap at start".into(),
            per_op: load,
            baseline: None,
        },
        Row {
            name: "shm-state reopen (validate header, no recovery)".into(),
            per_op: reopen,
            baseline: Some(load),
        },
    ];
    print(
        "keeping the map across a restart: serialise at exit vs shm-state",
        &rows,
    );
}

#[cfg(feature = "sqlite-bench")]
fn vs_sqlite(n: u64) {
    let ks = keys(n);
    let dir = tempfile::tempdir().unwrap();
    let db = rusqlite::Connection::open(dir.path().join("bench.db")).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;
         CREATE TABLE kv (k INTEGER PRIMARY KEY, v INTEGER NOT NULL);",
    )
    .unwrap();
    let insert = time(n, || {
        let mut stmt = db
            .prepare("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)")
            .unwrap();
        for &k in &ks {
            // One statement = one transaction (autocommit).
            stmt.execute([k as i64, (k ^ 1) as i64]).unwrap();
        }
    });
    let get = time(n, || {
        let mut stmt = db.prepare("SELECT v FROM kv WHERE k = ?1").unwrap();
        for &k in ks.iter().rev() {
            let v: i64 = stmt.query_row([k as i64], |r| r.get(0)).unwrap();
            black_box(v);
        }
    });
    let remove = time(n, || {
        let mut stmt = db.prepare("DELETE FROM kv WHERE k = ?1").unwrap();
        for &k in &ks {
            stmt.execute([k as i64]).unwrap();
        }
    });
    let mut s = open(memfd());
    let h = s.root().unwrap().map;
    let s_insert = time(n, || {
        for &k in &ks {
            s.transaction(|tx| tx.map(h)?.insert(&k, &(k ^ 1))).unwrap();
        }
    });
    let s_get = time(n, || {
        let m = s.map(h).unwrap();
        for &k in ks.iter().rev() {
            black_box(m.get(&k).unwrap());
        }
    });
    let s_remove = time(n, || {
        for &k in &ks {
            s.transaction(|tx| tx.map(h)?.remove(&k)).unwrap();
        }
    });
    let rows = [
        Row {
            name: "SQLite insert, autocommit (WAL, synchronous=OFF)".into(),
            per_op: insert,
            baseline: None,
        },
        Row {
            name: "shm-state insert, one transaction each".into(),
            per_op: s_insert,
            baseline: Some(insert),
        },
        Row {
            name: "SQLite select by primary key (prepared)".into(),
            per_op: get,
            baseline: None,
        },
        Row {
            name: "shm-state get".into(),
            per_op: s_get,
            baseline: Some(get),
        },
        Row {
            name: "SQLite delete, autocommit".into(),
            per_op: remove,
            baseline: None,
        },
        Row {
            name: "shm-state remove, one transaction each".into(),
            per_op: s_remove,
            baseline: Some(remove),
        },
    ];
    print(
        &format!("vs SQLite {} (bundled), {n} keys", rusqlite::version()),
        &rows,
    );
}

#[cfg(not(feature = "sqlite-bench"))]
fn vs_sqlite(_n: u64) {
    println!("\nvs SQLite: skipped (run with `--features sqlite-bench`)");
}

/// Open time of a clean state and recovery time of an interrupted one, at
/// 1 MiB and at `gib` GiB.
fn open_and_recover(gib: u64) {
    let mut rows = Vec::new();
    let mut small_open = None;
    let mut small_recover = None;
    for (label, bytes) in [
        ("1 MiB".to_string(), 1u64 << 20),
        (format!("{gib} GiB"), gib << 30),
    ] {
        let fd = memfd();
        let keep = fd.try_clone().unwrap();
        let mut s = open(fd);
        let big = s.root().unwrap().big;
        let words = bytes / 8;
        s.transaction(|tx| {
            let mut v = tx.vec(big)?;
            v.reserve(words)?;
            let chunk: Vec<u64> = (0..1u64 << 16).collect();
            let mut left = words;
            while left > 0 {
                let k = left.min(chunk.len() as u64);
                v.extend_from_slice(&chunk[..k as usize])?;
                left -= k;
            }
            Ok::<_, shm_state::Error>(())
        })
        .unwrap();
        drop(s);
        // Clean reopen: best of 5.
        let clean = (0..5)
            .map(|_| {
                time(1, || {
                    let s = open(keep.try_clone().unwrap());
                    assert_eq!(s.report().opened, Opened::Reopened);
                })
            })
            .min()
            .unwrap();
        // Interrupted: a child changes 1000 scattered elements inside a
        // transaction and is killed by SIGKILL before it commits.
        let recover = {
            let child = keep.try_clone().unwrap();
            // SAFETY: the benchmark is single-threaded here; the child only
            // opens the state, writes and kills itself.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork");
            if pid == 0 {
                let mut s = open(child);
                let _ = s.transaction(|tx| {
                    let mut v = tx.vec(big)?;
                    for i in 0..1000 {
                        v.set(i * (words / 1000), 7)?;
                    }
                    // SAFETY: kill(2) on our own pid.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                    Ok::<_, shm_state::Error>(())
                });
                unreachable!("killed");
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            time(1, || {
                let s = open(keep.try_clone().unwrap());
                assert!(matches!(
                    s.report().opened,
                    Opened::Recovered { records: 1000.. }
                ));
                assert_eq!(s.vec(big).unwrap()[0], 0);
            })
        };
        rows.push(Row {
            name: format!("open, clean, {label} state"),
            per_op: clean,
            baseline: small_open,
        });
        rows.push(Row {
            name: format!("open + recover 1000 records, {label} state"),
            per_op: recover,
            baseline: small_recover,
        });
        small_open.get_or_insert(clean);
        small_recover.get_or_insert(recover);
    }
    print(
        "open and recovery time (ratio: against the 1 MiB state)",
        &rows,
    );
}

/// One process: a [`SharedState`] against the exclusive [`State`] on the
/// same work, so that the cost of sharing when nobody else is there (the
/// writer lock's compare-and-swap and swap, the reader's seqlock and
/// copies) is a ratio measured in the same run.
fn shared_vs_exclusive(n: u64) {
    let ks = keys(n);
    let mut exclusive = open(memfd());
    // SAFETY: a private memfd of this benchmark, sealed against shrinking.
    let mut shared = SharedState::<Root>::open(unsafe { Source::shared(memfd()) }, Layout::new(1))
        .expect("open");
    let map = shared
        .transaction(|tx| {
            let map = tx.new_map()?;
            let big = tx.new_vec()?;
            tx.set_root(Root { map, big })?;
            Ok::<_, shm_state::Error>(map)
        })
        .unwrap();
    let ex_map = exclusive.root().unwrap().map;
    let ex_insert = time(n, || {
        for &k in &ks {
            exclusive
                .transaction(|tx| tx.map(ex_map)?.insert(&k, &k))
                .unwrap();
        }
    });
    let sh_insert = time(n, || {
        for &k in &ks {
            shared
                .transaction(|tx| tx.map(map)?.insert(&k, &k))
                .unwrap();
        }
    });
    let ex_get = time(n, || {
        let m = exclusive.map(ex_map).unwrap();
        for &k in &ks {
            std::hint::black_box(m.get(&k).unwrap());
        }
    });
    let ex_get_each = time(n, || {
        for &k in &ks {
            std::hint::black_box(*exclusive.map(ex_map).unwrap().get(&k).unwrap().unwrap());
        }
    });
    let sh_get = time(n, || {
        for &k in &ks {
            std::hint::black_box(shared.read(|v| v.map(map)?.get(&k)).unwrap());
        }
    });
    print(
        "shared state, one process (ratio: against the exclusive State)",
        &[
            Row {
                name: "exclusive: one-insert transaction".into(),
                per_op: ex_insert,
                baseline: None,
            },
            Row {
                name: "shared: one-insert transaction (writer lock)".into(),
                per_op: sh_insert,
                baseline: Some(ex_insert),
            },
            Row {
                name: "exclusive: get (one map view for all gets)".into(),
                per_op: ex_get,
                baseline: None,
            },
            Row {
                name: "exclusive: get (a map view per get)".into(),
                per_op: ex_get_each,
                baseline: None,
            },
            Row {
                name: "shared: get (a read per get: seqlock + copy)".into(),
                per_op: sh_get,
                baseline: Some(ex_get_each),
            },
        ],
    );
}

/// Makes glibc's malloc keep freed memory, as the rounds after the first
/// assume on the std side ("later rounds reuse freed memory"): by default
/// a block over 128 KiB (the `HashMap`'s tables here) is mapped fresh and
/// unmapped on free, until a free of such a block raises the threshold, so
/// the baseline's speed depended on whether something else in the process
/// had freed a large block first (this bench's own shm-state side did,
/// until its tables stopped going through a temporary `Vec`: `HashMap`
/// then took 35 ns per insert instead of 24). Fixed here for every run.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's tunables; called before any
    // thread is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    keep_freed_memory();
    // `cargo test --benches` runs benches with --bench absent: keep it quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = if quick {
        2000
    } else {
        env("SHM_STATE_BENCH_N", 200_000)
    };
    let gib = if quick {
        0
    } else {
        env("SHM_STATE_BENCH_GIB", 1)
    };
    println!(
        "shm-state benchmarks ({} keys{})",
        n,
        if quick { ", quick mode" } else { "" }
    );
    map_vs_std(
        n,
        if quick {
            1
        } else {
            env("SHM_STATE_BENCH_ROUNDS", 3)
        },
    );
    vs_serialise(n);
    shared_vs_exclusive(n);
    vs_sqlite(n);
    if gib > 0 {
        open_and_recover(gib);
    }
}
