//! Unit tests over heap regions: the fixtures they share (a root with one
//! of each structure, std models, crash arming, damage helpers); the
//! tests themselves are in `tests/`, one concept per file.

use std::collections::{BTreeMap, HashMap};

use bytemuck::{Pod, Zeroable};
use proptest::prelude::*;

use crate::mem::CrashPlan;
use crate::*;

#[derive(Clone, Copy, Pod, Zeroable, Debug)]
#[repr(C)]
struct Root {
    n: u64,
    cell: StateCell<u64>,
    vec: StateVec<u32>,
    map: StateMap<u64, u64>,
    bmap: StateMap<Bytes, Bytes>,
    log: StateLog,
}

fn layout() -> Layout<Root> {
    Layout::new(1).journal_len(16 << 10).initial_len(4096)
}

fn open(bytes: Vec<u8>) -> Result<State<Root>> {
    State::open(Source::heap(bytes), layout())
}

fn reopen(state: State<Root>) -> State<Root> {
    let bytes = state.close().unwrap().into_heap().unwrap();
    open(bytes).unwrap()
}

/// A new state with every structure created.
fn fresh() -> State<Root> {
    let mut s = open(Vec::new()).unwrap();
    s.transaction(|tx| {
        let r = Root {
            n: 0,
            cell: tx.new_cell(0u64)?,
            vec: tx.new_vec()?,
            map: tx.new_map()?,
            bmap: tx.new_map()?,
            log: tx.new_log()?,
        };
        tx.set_root(r)
    })
    .unwrap();
    s
}

/// A new state (see [`fresh`]) whose map holds `entries`, inserted in one
/// transaction.
fn with_map(entries: impl IntoIterator<Item = (u64, u64)>) -> (State<Root>, Root) {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| {
        let mut m = tx.map(r.map)?;
        for (k, v) in entries {
            m.insert(&k, &v)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    (s, r)
}

/// Everything a state holds, as std values.
#[derive(Debug, Clone, PartialEq, Default)]
struct Model {
    n: u64,
    cell: u64,
    vec: Vec<u32>,
    map: BTreeMap<u64, u64>,
    bmap: BTreeMap<Vec<u8>, Vec<u8>>,
    log: Vec<Vec<u8>>,
}

fn dump(s: &State<Root>) -> Result<Model> {
    let r = *s.root()?;
    let map = s.map(r.map)?;
    map.verify()?;
    let bmap = s.map(r.bmap)?;
    bmap.verify()?;
    let log = s.log(r.log)?;
    log.verify()?;
    s.verify()?;
    Ok(Model {
        n: r.n,
        cell: *s.cell(r.cell)?,
        vec: s.vec(r.vec)?.to_vec(),
        map: map
            .iter()
            .map(|e| e.map(|(k, v)| (*k, *v)))
            .collect::<Result<_>>()?,
        bmap: bmap
            .iter()
            .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_>>()?,
        log: log
            .iter()
            .map(|r| r.map(<[u8]>::to_vec))
            .collect::<Result<_>>()?,
    })
}

#[derive(Debug, Clone)]
enum Op {
    SetN(u64),
    Cell(u64),
    Push(u32),
    Pop,
    Set(u16, u32),
    Truncate(u16),
    Insert(u8, u64),
    Remove(u8),
    BInsert(Vec<u8>, Vec<u8>),
    BRemove(Vec<u8>),
    Append(Vec<u8>),
    ClearLog,
    ClearMap,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
    let small_key = || proptest::collection::vec(0u8..4, 0..3);
    prop_oneof![
        1 => any::<u64>().prop_map(Op::SetN),
        1 => any::<u64>().prop_map(Op::Cell),
        4 => any::<u32>().prop_map(Op::Push),
        1 => Just(Op::Pop),
        1 => (any::<u16>(), any::<u32>()).prop_map(|(i, v)| Op::Set(i, v)),
        1 => any::<u16>().prop_map(|n| Op::Truncate(n % 64)),
        4 => (any::<u8>(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k % 48, v)),
        2 => any::<u8>().prop_map(|k| Op::Remove(k % 48)),
        3 => (small_key(), bytes()).prop_map(|(k, v)| Op::BInsert(k, v)),
        1 => small_key().prop_map(Op::BRemove),
        3 => bytes().prop_map(Op::Append),
        1 => Just(Op::ClearLog),
        1 => Just(Op::ClearMap),
    ]
}

fn apply_model(m: &mut Model, op: &Op) {
    match op {
        Op::SetN(n) => m.n = *n,
        Op::Cell(v) => m.cell = *v,
        Op::Push(v) => m.vec.push(*v),
        Op::Pop => {
            m.vec.pop();
        }
        Op::Set(i, v) => {
            if let Some(x) = m.vec.get_mut(*i as usize) {
                *x = *v
            }
        }
        Op::Truncate(n) => m.vec.truncate(*n as usize),
        Op::Insert(k, v) => {
            m.map.insert(u64::from(*k), *v);
        }
        Op::Remove(k) => {
            m.map.remove(&u64::from(*k));
        }
        Op::BInsert(k, v) => {
            m.bmap.insert(k.clone(), v.clone());
        }
        Op::BRemove(k) => {
            m.bmap.remove(k);
        }
        Op::Append(r) => m.log.push(r.clone()),
        Op::ClearLog => m.log.clear(),
        Op::ClearMap => m.map.clear(),
    }
}

fn apply_state(tx: &mut Tx<'_, Root>, op: &Op) -> Result<()> {
    let r = *tx.root()?;
    match op {
        Op::SetN(n) => tx.root_mut()?.n = *n,
        Op::Cell(v) => *tx.cell_mut(r.cell)? = *v,
        Op::Push(v) => tx.vec(r.vec)?.push(*v)?,
        Op::Pop => {
            tx.vec(r.vec)?.pop()?;
        }
        Op::Set(i, v) => {
            let mut vec = tx.vec(r.vec)?;
            if u64::from(*i) < vec.len()? {
                vec.set(u64::from(*i), *v)?;
            } else {
                assert!(matches!(
                    vec.set(u64::from(*i), *v),
                    Err(Error::OutOfRange { .. })
                ));
            }
        }
        Op::Truncate(n) => tx.vec(r.vec)?.truncate(u64::from(*n))?,
        Op::Insert(k, v) => {
            tx.map(r.map)?.insert(&u64::from(*k), v)?;
        }
        Op::Remove(k) => {
            tx.map(r.map)?.remove(&u64::from(*k))?;
        }
        Op::BInsert(k, v) => {
            tx.map(r.bmap)?.insert(k, v)?;
        }
        Op::BRemove(k) => {
            tx.map(r.bmap)?.remove(k)?;
        }
        Op::Append(rec) => tx.log(r.log)?.append(rec)?,
        Op::ClearLog => tx.log(r.log)?.clear()?,
        Op::ClearMap => tx.map(r.map)?.clear()?,
    }
    Ok(())
}

/// Arms the crash seam for the next heap region made on this thread (the
/// next `open`), crashing at write `n` torn after `torn` bytes.
fn arm(n: u64, torn: usize) {
    crate::mem::NEXT_PLAN.with(|p| {
        *p.borrow_mut() = Some(CrashPlan {
            countdown: n,
            torn_prefix: torn,
            image: None,
        })
    });
}

/// Opens `bytes` with a crash armed at write `n`; the image the crash left
/// (None once `n` is past the open's last write).
fn open_crashing<R: Pod>(
    bytes: Vec<u8>,
    layout: Layout<R>,
    n: u64,
    torn: usize,
) -> Option<Vec<u8>> {
    arm(n, torn);
    let mut s = State::<R>::open(Source::heap(bytes), layout).unwrap();
    s.core.mem.crash.take().and_then(|c| c.image)
}

/// A small xorshift generator for the fuzz loops.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn populated() -> Vec<u8> {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| {
        for i in 0..40u64 {
            tx.vec(r.vec)?.push(i as u32)?;
            tx.map(r.map)?.insert(&i, &(i * 3))?;
            tx.map(r.bmap)?
                .insert(format!("k{i}").as_bytes(), &vec![i as u8; i as usize])?;
            tx.log(r.log)?.append(format!("record {i}").as_bytes())?;
        }
        tx.map(r.map)?.remove(&3)?;
        tx.map(r.bmap)?.remove(b"k4")?;
        Ok::<_, Error>(())
    })
    .unwrap();
    s.image()
}

/// Runs `work` as one transaction with a crash injected at every write in
/// turn (each time tearing the write after a random prefix), opens the
/// image the crash left, and checks it holds exactly the state before or
/// the state after the transaction.
fn crash_at_every_write(
    prepare: impl Fn(&mut State<Root>),
    work: impl Fn(&mut Tx<'_, Root>) -> Result<()>,
) {
    let mut rng = Rng(0x00c0_ffee_0000_0001);
    let mut s = fresh();
    prepare(&mut s);
    let before = dump(&s).unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let mut after = None;
    let mut points = 0;
    for n in 0.. {
        let mut s = open(base.clone()).unwrap();
        // Format 7's first write is the head's claim of nothing, before the
        // open word: a crash there leaves no transaction open.
        let claims_first = s.core.journal == crate::journal::Journal::Claimed;
        s.core.mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: rng.below(72) as usize,
            image: None,
        });
        s.transaction(|tx| work(tx)).unwrap();
        let image = s.core.mem.crash.take().unwrap().image;
        let done = dump(&s).unwrap();
        after.get_or_insert(done.clone());
        assert_eq!(after.as_ref(), Some(&done));
        drop(s);
        let Some(image) = image else { break };
        points += 1;
        let s = open(image).unwrap_or_else(|e| panic!("crash at write {n}: open failed: {e}"));
        let got = dump(&s).unwrap_or_else(|e| panic!("crash at write {n}: {e}"));
        assert!(
            got == before || Some(&got) == after.as_ref(),
            "crash at write {n} left a state that is neither before nor after"
        );
        if got == before {
            let before_open = n == 0 && claims_first;
            assert!(
                matches!(s.report().opened, Opened::Recovered { .. })
                    || (before_open && matches!(s.report().opened, Opened::Reopened)),
                "crash at write {n}: {:?}",
                s.report().opened
            );
        }
    }
    assert!(points > 5, "only {points} crash points");
    assert_ne!(Some(&before), after.as_ref());
}

fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn open_path(path: &std::path::Path) -> Result<State<Root>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    // SAFETY: a file in a private temp dir, never truncated.
    State::open(unsafe { Source::file(f) }, layout())
}

const LOCK_CHILD: &str = "SHM_STATE_LOCK_CHILD";

/// A fresh memfd for one test.
fn memfd(name: &str) -> shm_fd::SharedFd {
    shm_fd::SharedFd::create(name, shm_fd::CreateOptions::default()).unwrap()
}

/// Opens the state in `fd` (through a dup of it).
fn open_fd(fd: &shm_fd::SharedFd) -> Result<State<Root>> {
    // SAFETY: a private memfd of this test, sealed against shrinking.
    State::open(unsafe { Source::shared(fd.try_clone().unwrap()) }, layout())
}

/// Opens `image` from a temp file with `layout`: the result, and the
/// file's bytes after the open (a refused open must leave them as given).
fn open_as_file(image: &[u8], layout: Layout<Root>) -> (Result<State<Root>>, Vec<u8>) {
    use std::io::{Read, Seek, Write};
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(image).unwrap();
    // SAFETY: a private temp file, never truncated.
    let source = unsafe { Source::file(file.try_clone().unwrap()) };
    let r = State::<Root>::open(source, layout);
    let mut after = Vec::new();
    file.rewind().unwrap();
    file.read_to_end(&mut after).unwrap();
    (r, after)
}

fn put_u64(img: &mut [u8], off: u64, v: u64) {
    img[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(img: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(img[off as usize..off as usize + 8].try_into().unwrap())
}

mod behaviour;
mod channels;
mod concurrency;
mod corruption;
mod crash;
mod damage;
mod fast_paths;
mod journal;
mod lock;
mod migration;
mod miri;
mod opening;
mod protocol_page;
mod regressions;
mod ring;
mod shared;
