//! A fixed workload for instruction counts (callgrind) and profiles (perf)
//! of map transactions: rounds of `n` one-insert transactions, optional
//! gets, then `n` one-remove transactions, on a memfd-backed state.
//!
//! ```text
//! cargo build --release -p shm-state --example tx_profile
//! valgrind --tool=callgrind target/release/examples/tx_profile insert 20000
//! valgrind --tool=callgrind target/release/examples/tx_profile insert 40000
//! ```
//!
//! The difference of the two totals over 200 000 transactions is the
//! instruction count of one transaction (setup cancels out). Modes:
//! `insert` (inserts and removes), `get` (inserts and 5 passes of gets),
//! `all`, `grow` (a new map each round grown by one-insert transactions,
//! as in the bench), `fill` (the same in one transaction), and `batch` (6 rounds of the same `n` keys written 1000 per
//! transaction: fresh inserts, then updates).
use bytemuck::{Pod, Zeroable};
use shm_fd::{CreateOptions, SharedFd};
use shm_state::{Layout, Source, State, StateMap};
use std::hint::black_box;
use std::time::Instant;

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    map: StateMap<u64, u64>,
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or("insert".into());
    let n: u64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let ks: Vec<u64> = (0..n)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8)
        .collect();
    let fd = SharedFd::create("prof", CreateOptions::default()).unwrap();
    // SAFETY: a private memfd of this process.
    let mut s = State::<Root>::open(unsafe { Source::shared(fd) }, Layout::new(1)).unwrap();
    s.transaction(|tx| {
        let map = tx.new_map()?;
        tx.set_root(Root { map })
    })
    .unwrap();
    let h = s.root().unwrap().map;
    if what == "grow" {
        // As the bench's one-insert row: a new map each round, grown from
        // empty by one-insert transactions (its tables then come from the
        // free lists), then freed.
        for round in 0..5u64 {
            let m: StateMap<u64, u64> = s.transaction(|tx| tx.new_map()).unwrap();
            let t = Instant::now();
            for &k in &ks {
                s.transaction(|tx| tx.map(m)?.insert(&k, &(k ^ round)))
                    .unwrap();
            }
            eprintln!("round {round}: grow {:?}", t.elapsed() / n as u32);
            s.transaction(|tx| tx.map(m)?.free()).unwrap();
        }
        return;
    }
    if what == "fill" {
        // As the bench's all-in-one-transaction row: a new map each round,
        // every key inserted in one transaction, then freed.
        for round in 0..5u64 {
            let m: StateMap<u64, u64> = s.transaction(|tx| tx.new_map()).unwrap();
            let t = Instant::now();
            s.transaction(|tx| {
                let mut map = tx.map(m)?;
                for &k in &ks {
                    map.insert(&k, &(k ^ round))?;
                }
                Ok::<_, shm_state::Error>(())
            })
            .unwrap();
            eprintln!("round {round}: fill {:?}", t.elapsed() / n as u32);
            s.transaction(|tx| tx.map(m)?.free()).unwrap();
        }
        return;
    }
    if what == "batch" {
        for round in 0..6u64 {
            let t = Instant::now();
            for chunk in ks.chunks(1000) {
                s.transaction(|tx| {
                    let mut m = tx.map(h)?;
                    for &k in chunk {
                        m.insert(&k, &(k + round))?;
                    }
                    Ok::<_, shm_state::Error>(())
                })
                .unwrap();
            }
            eprintln!("round {round}: batch {:?}", t.elapsed() / n as u32);
        }
        return;
    }
    for round in 0..5 {
        let t = Instant::now();
        for &k in &ks {
            s.transaction(|tx| tx.map(h)?.insert(&k, &(k ^ round)))
                .unwrap();
        }
        let ins = t.elapsed() / n as u32;
        let t = Instant::now();
        if what == "get" || what == "all" {
            for _ in 0..5 {
                let m = s.map(h).unwrap();
                for &k in ks.iter().rev() {
                    black_box(m.get(&k).unwrap());
                }
            }
        }
        let get = t.elapsed() / (5 * n as u32);
        let t = Instant::now();
        if what != "get" {
            for &k in &ks {
                s.transaction(|tx| tx.map(h)?.remove(&k)).unwrap();
            }
        }
        let rem = t.elapsed() / n as u32;
        eprintln!("round {round}: insert {ins:?} get {get:?} remove {rem:?}");
        if what == "get" {
            for &k in &ks {
                s.transaction(|tx| tx.map(h)?.remove(&k)).unwrap();
            }
        }
    }
}
