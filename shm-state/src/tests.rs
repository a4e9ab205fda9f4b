//! Unit tests over heap regions: behaviour, crash points, models, corruption.

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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every structure against a std model, reopening after every operation;
    /// some transactions are aborted and must change nothing.
    #[test]
    fn structures_match_std_models_across_reopens(
        ops in proptest::collection::vec((op_strategy(), 0u8..8), 1..60)
    ) {
        let mut s = fresh();
        let mut model = Model::default();
        for (op, abort) in &ops {
            let abort = *abort == 0;
            let r = s.transaction(|tx| {
                apply_state(tx, op)?;
                if abort { Err(Error::Migration("abort".into())) } else { Ok(()) }
            });
            if abort {
                prop_assert!(r.is_err());
            } else {
                r.unwrap();
                apply_model(&mut model, op);
            }
            s = reopen(s);
            prop_assert_eq!(s.report().opened, Opened::Reopened);
            prop_assert_eq!(&dump(&s).unwrap(), &model);
        }
    }
}

#[test]
fn created_reopened_and_generations_grow() {
    let s = fresh();
    assert_eq!(s.report().opened, Opened::Created);
    assert_eq!(s.report().generation, 1);
    let s = reopen(s);
    assert_eq!(s.report().opened, Opened::Reopened);
    assert_eq!(s.report().generation, 2);
    assert_eq!(s.report().previous_pid, std::process::id());
    let s = reopen(s);
    assert_eq!(s.report().generation, 3);
}

#[test]
fn failed_and_panicking_transactions_change_nothing() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.push(1)).unwrap();
    let before = dump(&s).unwrap();
    let e = s
        .transaction(|tx| {
            tx.vec(r.vec)?.push(2)?;
            tx.map(r.map)?.insert(&1, &1)?;
            tx.root_mut()?.n = 9;
            Err::<(), _>(Error::Migration("no".into()))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Migration(_)));
    assert_eq!(dump(&s).unwrap(), before);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = s.transaction(|tx| {
            tx.vec(r.vec)?.push(3)?;
            tx.log(r.log)?.append(b"x")?;
            panic!("inside a transaction");
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        });
    }));
    assert!(caught.is_err());
    assert_eq!(dump(&s).unwrap(), before);
    s.transaction(|tx| tx.vec(r.vec)?.push(4)).unwrap();
    assert_eq!(s.vec(r.vec).unwrap(), &[1, 4]);
}

#[test]
fn region_grows_and_freed_space_is_reused() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    let len0 = s.region_len();
    s.transaction(|tx| {
        let mut v = tx.vec(r.vec)?;
        for i in 0..100_000 {
            v.push(i)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert!(s.region_len() > len0, "the region grew");
    assert_eq!(s.vec(r.vec).unwrap().len(), 100_000);
    let s = reopen(s);
    assert_eq!(s.vec(r.vec).unwrap()[99_999], 99_999);
    // Churn through maps of byte strings: the heap must settle, not grow.
    let mut s = s;
    let mut peak = 0;
    for round in 0..30u32 {
        s.transaction(|tx| {
            let mut m = tx.map(r.bmap)?;
            for k in 0..50u32 {
                m.insert(&k.to_le_bytes(), &vec![round as u8; 100 + k as usize])?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        s.transaction(|tx| tx.map(r.bmap)?.clear()).unwrap();
        if round == 5 {
            peak = s.region_len();
        }
    }
    assert_eq!(s.region_len(), peak, "steady churn reuses freed blocks");
    let report = s.verify().unwrap();
    assert!(report.free_blocks > 0);
}

#[test]
fn layout_mismatch_is_refused_then_migrated() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| {
        tx.root_mut()?.n = 41;
        tx.vec(r.vec)?.push(7)
    })
    .unwrap();
    let bytes = s.close().unwrap().into_heap().unwrap();

    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct RootV2 {
        old: Root,
        extra: u64,
    }
    let e = State::<RootV2>::open(Source::heap(bytes.clone()), Layout::new(2)).unwrap_err();
    assert!(matches!(e, Error::LayoutMismatch { .. }), "{e}");
    assert!(e.to_string().contains("version 1 (root 48 bytes"), "{e}");
    // Same type, other version: refused too.
    let e = State::<Root>::open(Source::heap(bytes.clone()), Layout::new(7)).unwrap_err();
    assert!(matches!(e, Error::LayoutMismatch { .. }), "{e}");
    // A failing migration leaves the state as it was.
    let l = Layout::<RootV2>::new(2).migrate(|_, _| Err(Error::Migration("nope".into())));
    let e = State::open(Source::heap(bytes.clone()), l).unwrap_err();
    assert!(matches!(e, Error::Migration(_)), "{e}");
    let s = State::<Root>::open(Source::heap(bytes), layout()).unwrap();
    assert_eq!(s.root().unwrap().n, 41);
    let bytes = s.close().unwrap().into_heap().unwrap();
    // A working migration.
    let l = Layout::<RootV2>::new(2).migrate(|tx, old| {
        assert_eq!(old.layout.version, 1);
        let old: Root = bytemuck::pod_read_unaligned(&old.bytes);
        let n = old.n;
        tx.set_root(RootV2 { old, extra: n + 1 })
    });
    let s = State::open(Source::heap(bytes), l).unwrap();
    assert_eq!(s.report().migrated_from.unwrap().version, 1);
    let root = *s.root().unwrap();
    assert_eq!(root.extra, 42);
    assert_eq!(s.vec(root.old.vec).unwrap(), &[7]);
    s.verify().unwrap();
    let bytes = s.close().unwrap().into_heap().unwrap();
    let s = State::<RootV2>::open(Source::heap(bytes), Layout::new(2)).unwrap();
    assert_eq!(s.report().opened, Opened::Reopened);
    assert_eq!(s.stored_layout().unwrap().version, 2);
}

#[test]
fn a_second_open_of_a_live_state_is_locked() {
    let file = tempfile::tempfile().unwrap();
    let other = file.try_clone().unwrap();
    // SAFETY: the temp file is ours alone and never truncated.
    let s = State::<Root>::open(unsafe { Source::file(file) }, layout()).unwrap();
    // SAFETY: as above.
    let e = State::<Root>::open(
        unsafe { Source::file(other.try_clone().unwrap()) },
        layout(),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Locked { pid } if pid == std::process::id()),
        "{e}"
    );
    drop(s);
    // SAFETY: as above.
    let s = State::<Root>::open(unsafe { Source::file(other) }, layout()).unwrap();
    assert_eq!(s.report().generation, 2);
}

#[test]
fn a_leaked_handle_is_taken_over() {
    let s = fresh();
    let image = s.image();
    // While the handle lives, a copy of its region is locked by it.
    assert!(matches!(open(image.clone()), Err(Error::Locked { .. })));
    // Once it is gone, the copy's lock word names this process but no live
    // handle: a stale lock, taken over.
    drop(s);
    let s2 = open(image).unwrap();
    assert_eq!(s2.report().took_over_from, Some(std::process::id()));
}

#[test]
fn memfd_source_grows_the_memfd() {
    let fd = shm_fd::SharedFd::create("shm-state-test", shm_fd::CreateOptions::default()).unwrap();
    let dup = fd.try_clone().unwrap();
    // SAFETY: a private memfd, sealed against shrinking.
    let mut s = State::<Root>::open(unsafe { Source::shared(fd) }, layout()).unwrap();
    s.transaction(|tx| {
        let v = tx.new_vec::<u32>()?;
        tx.root_mut()?.vec = v;
        let mut v = tx.vec(v)?;
        for i in 0..50_000 {
            v.push(i)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert!(dup.len().unwrap() >= 200_000);
    drop(s);
    // SAFETY: as above.
    let s = State::<Root>::open(unsafe { Source::shared(dup) }, layout()).unwrap();
    assert_eq!(s.vec(s.root().unwrap().vec).unwrap().len(), 50_000);
}

#[test]
fn foreign_data_is_refused_and_left_untouched() {
    let mut data = b"PRIMES\x00\x01".to_vec();
    data.resize(10_000, 7);
    let e = open(data.clone()).unwrap_err();
    assert!(matches!(e, Error::NotAState { .. }), "{e}");
    // A short region with data, and one with our magic but truncated.
    assert!(matches!(open(vec![1, 2, 3]), Err(Error::NotAState { .. })));
    let img = fresh().image();
    for cut in [8usize, 100, 4095, 4096, 5000, 4096 + 16 * 1024 - 1] {
        let e = open(img[..cut].to_vec()).unwrap_err();
        assert!(e.is_corruption(), "cut at {cut}: {e}");
    }
    let fd = tempfile::tempfile().unwrap();
    std::fs::File::set_len(&fd, 0).unwrap();
    use std::io::Write;
    (&fd).write_all(&data).unwrap();
    // SAFETY: a private temp file.
    let e = State::<Root>::open(unsafe { Source::file(fd.try_clone().unwrap()) }, layout())
        .unwrap_err();
    assert!(matches!(e, Error::NotAState { .. }));
    assert_eq!(
        std::fs::read(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap(),
        data
    );
}

#[test]
fn interrupted_creation_is_created_again() {
    let mut s = fresh();
    s.transaction(|tx| {
        tx.root_mut()?.n = 5;
        Ok::<_, Error>(())
    })
    .unwrap();
    let mut img = s.image();
    img[..8].fill(0);
    let s = open(img).unwrap();
    assert_eq!(s.report().opened, Opened::Created);
    assert_eq!(s.root().unwrap().n, 0);
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

#[test]
fn flipped_header_bits_are_detected() {
    let img = populated();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // Every bit of the checksummed and validated header bytes (the atomic
    // commit and lock words at 0xC0..0xE0 are not checksummed: see docs).
    for byte in (0..4096usize).filter(|b| !(0xC0..0xE0).contains(b)) {
        let bit = rng.below(8);
        let mut bad = img.clone();
        bad[byte] ^= 1 << bit;
        let r = open(bad);
        assert!(
            r.is_err(),
            "flipping bit {bit} of header byte {byte:#x} went unnoticed"
        );
    }
}

#[test]
fn random_damage_never_panics() {
    let img = populated();
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    let mut opened = 0;
    for _ in 0..3000 {
        let mut bad = img.clone();
        for _ in 0..1 + rng.below(8) {
            let i = rng.below(bad.len() as u64) as usize;
            bad[i] ^= 1 << rng.below(8);
        }
        if rng.below(10) == 0 {
            let cut = rng.below(bad.len() as u64) as usize;
            bad.truncate(cut);
        }
        if let Ok(s) = open(bad) {
            opened += 1;
            // Reading everything either works or reports an error.
            let _ = dump(&s);
        }
    }
    assert!(opened > 0, "flips in data blocks still open");
    // Random bytes everywhere.
    for _ in 0..200 {
        let len = 64 + rng.below(20_000) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(open(bytes).is_err());
    }
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
            assert!(
                matches!(s.report().opened, Opened::Recovered { .. }),
                "crash at write {n}"
            );
        }
    }
    assert!(points > 5, "only {points} crash points");
    assert_ne!(Some(&before), after.as_ref());
}

#[test]
fn crash_at_any_write_of_a_multi_structure_transaction() {
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| {
                for i in 0..20 {
                    tx.vec(r.vec)?.push(i)?;
                    tx.map(r.map)?.insert(&u64::from(i), &1)?;
                    tx.map(r.bmap)?.insert(&[i as u8], b"old value")?;
                }
                tx.log(r.log)?.append(b"first")
            })
            .unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            tx.root_mut()?.n += 1;
            *tx.cell_mut(r.cell)? = 77;
            tx.vec(r.vec)?.set(3, 1000)?;
            tx.vec(r.vec)?.pop()?;
            for i in 20..40 {
                tx.vec(r.vec)?.push(i)?; // grows: reallocates
            }
            tx.map(r.map)?.insert(&5, &555)?;
            tx.map(r.map)?.remove(&6)?;
            for k in 100..120 {
                tx.map(r.map)?.insert(&k, &k)?; // grows the table
            }
            tx.map(r.bmap)?.insert(&[1], b"a new, longer value")?;
            tx.map(r.bmap)?.remove(&[2])?;
            tx.log(r.log)?.append(b"second")?;
            Ok(())
        },
    );
}

#[test]
fn crash_at_any_write_while_freeing_and_reusing() {
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| {
                for i in 0..30u8 {
                    tx.map(r.bmap)?.insert(&[i], &[i; 40])?;
                }
                Ok::<_, Error>(())
            })
            .unwrap();
            s.transaction(|tx| tx.map(r.bmap)?.clear()).unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            // Reuses the blocks freed by the clear.
            for i in 0..30u8 {
                tx.map(r.bmap)?.insert(&[i, i], &[i; 33])?;
            }
            tx.log(r.log)?.clear()?;
            tx.log(r.log)?.append(b"again")?;
            Ok(())
        },
    );
}

#[test]
fn a_crash_during_recovery_recovers_again() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[1, 2, 3]))
        .unwrap();
    let before = dump(&s).unwrap();
    s.core.mem.crash = Some(CrashPlan {
        countdown: 12,
        torn_prefix: 3,
        image: None,
    });
    s.transaction(|tx| {
        tx.vec(r.vec)?.set(0, 9)?;
        tx.map(r.map)?.insert(&1, &2)?;
        tx.root_mut()?.n = 3;
        Ok::<_, Error>(())
    })
    .unwrap();
    let crashed = s.core.mem.crash.take().unwrap().image.unwrap();
    drop(s);
    // Crash the recovery itself at each of its writes.
    for n in 0..20 {
        let mut mem = crate::mem::Mem::heap(crashed.clone(), 0, 0).unwrap();
        mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: 5,
            image: None,
        });
        let word = mem
            .atomic_u64(crate::format::TX_WORD)
            .unwrap()
            .load(std::sync::atomic::Ordering::Acquire);
        assert_eq!(word & 1, 1);
        let jl = 16 << 10;
        crate::journal::rollback(&mut mem, jl, word >> 1).unwrap();
        let Some(image) = mem.crash.take().unwrap().image else {
            break;
        };
        let s = open(image).unwrap();
        assert_eq!(dump(&s).unwrap(), before, "recovery crashed at write {n}");
    }
}

#[test]
fn journal_full_is_an_error_and_rolls_back() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&vec![1u32; 20_000]))
        .unwrap();
    let before = dump(&s).unwrap();
    let e = s
        .transaction(|tx| {
            let mut v = tx.vec(r.vec)?;
            for i in 0..20_000 {
                v.set(i, 2)?;
            }
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert!(matches!(e, Error::JournalFull { capacity: 16384 }), "{e}");
    assert_eq!(dump(&s).unwrap(), before);
}

#[test]
fn wrong_types_and_null_handles_are_errors() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    let as_u64: StateVec<u64> = StateVec::from_off(r.vec.offset());
    assert!(matches!(s.vec(as_u64), Err(Error::UnsupportedType { .. })));
    let not_a_vec: StateVec<u32> = StateVec::from_off(r.map.offset());
    assert!(matches!(s.vec(not_a_vec), Err(Error::Corrupted(_))));
    assert!(matches!(
        s.vec(StateVec::<u32>::NULL),
        Err(Error::NullHandle { kind: "vec" })
    ));
    let wrong_map: StateMap<u32, u64> = StateMap::from_off(r.map.offset());
    assert!(s.map(wrong_map).is_err());
    let e = s.transaction(|tx| tx.vec(r.vec)?.set(5, 1)).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { index: 5, len: 0 }));
}

#[test]
fn map_handles_many_keys_and_deletes() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    let mut model = HashMap::new();
    let mut rng = Rng(99);
    for _ in 0..100 {
        s.transaction(|tx| {
            let mut m = tx.map(r.map)?;
            for _ in 0..100 {
                let k = rng.below(2000);
                if rng.below(3) == 0 {
                    assert_eq!(m.remove(&k)?, model.remove(&k).is_some());
                } else {
                    let v = rng.next();
                    assert_eq!(m.insert(&k, &v)?, model.insert(k, v).is_some());
                }
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let m = s.map(r.map).unwrap();
    m.verify().unwrap();
    assert_eq!(m.len(), model.len() as u64);
    for (k, v) in &model {
        assert_eq!(m.get(k).unwrap(), Some(v));
    }
    assert_eq!(m.get(&5000).unwrap(), None);
}

#[test]
fn refused_opens_leave_the_file_byte_for_byte() {
    use std::io::{Read, Seek, Write};
    let read_all = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&populated()).unwrap();
    let before = read_all(&mut file);
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct Other(u64);
    let file_source = |f| {
        // SAFETY: a private temp file, never truncated.
        unsafe { Source::file(f) }
    };
    let attempts: Vec<Box<dyn Fn(std::fs::File) -> Error>> = vec![
        Box::new(|f| State::<Other>::open(file_source(f), Layout::new(1)).unwrap_err()),
        Box::new(|f| State::<Root>::open(file_source(f), Layout::new(2)).unwrap_err()),
        Box::new(|f| {
            let l = Layout::<Other>::new(1).migrate(|_, _| Err(Error::Migration("no".into())));
            State::open(file_source(f), l).unwrap_err()
        }),
    ];
    for (i, attempt) in attempts.iter().enumerate() {
        attempt(file.try_clone().unwrap());
        let after = read_all(&mut file);
        // A failed migration is an aborted transaction: it leaves its journal
        // records and consumes a sequence number, nothing else.
        let bookkeeping = |j: usize| {
            i == 2 && ((0xC0..0xC8).contains(&j) || (0x1000..0x1000 + (16 << 10)).contains(&j))
        };
        let diff: Vec<usize> = (0..before.len().min(after.len()))
            .filter(|&j| before[j] != after[j] && !bookkeeping(j))
            .collect();
        assert!(
            after.len() == before.len() && diff.is_empty(),
            "refused open {i} changed the file: lengths {} -> {}, bytes {diff:x?}",
            before.len(),
            after.len()
        );
    }
    // A damaged dynamic header is found after the lock is taken: restored too.
    let mut bad = before.clone();
    bad[crate::format::DY_USED as usize] ^= 4;
    file.rewind().unwrap();
    file.write_all(&bad).unwrap();
    // SAFETY: a private temp file.
    let e = State::<Root>::open(unsafe { Source::file(file.try_clone().unwrap()) }, layout())
        .unwrap_err();
    assert!(e.to_string().contains("header checksum"), "{e}");
    assert!(
        read_all(&mut file) == bad,
        "a refused open changed the file"
    );
}

#[test]
fn commits_are_published_through_the_snapshot_protocol() {
    use shm_snapshot::{Protocol, Region, probe};
    let fd = shm_fd::SharedFd::create("shm-state-snap", shm_fd::CreateOptions::default()).unwrap();
    let watcher = fd.try_clone().unwrap();
    let probe_fd = |fd: &shm_fd::SharedFd| {
        let map = fd.map_raw(1).unwrap();
        match probe(Region::from_mmap(&map)).unwrap() {
            Protocol::Present {
                generation,
                updating,
                ..
            } => (generation, updating),
            other => panic!("no protocol header: {other:?}"),
        }
    };
    let layout = || layout().with_snapshot_protocol();
    // SAFETY: a private memfd, sealed against shrinking.
    let mut s = State::<Root>::open(unsafe { Source::shared(fd) }, layout()).unwrap();
    let (g0, updating) = probe_fd(&watcher);
    assert!(!updating);
    let r = s
        .transaction(|tx| {
            let v = tx.new_vec::<u32>()?;
            tx.root_mut()?.vec = v;
            // Inside the transaction the header says "updating".
            assert!(probe_fd(&watcher).1);
            let mut vec = tx.vec(v)?;
            for i in 0..100_000 {
                vec.push(i)?; // grows the memfd: the publisher follows the remap
            }
            Ok::<_, Error>(*tx.root()?)
        })
        .unwrap();
    let (g1, updating) = probe_fd(&watcher);
    assert!(!updating && g1 == g0 + 1, "{g0} -> {g1}");
    // A failed transaction leaves the header committed again.
    let _ = s.transaction(|tx| {
        tx.vec(r.vec)?.push(1)?;
        Err::<(), _>(Error::Migration("no".into()))
    });
    assert!(!probe_fd(&watcher).1);
    // A consistent copy of the whole memfd, reopened, holds the committed data.
    let map = watcher.map_raw(1).unwrap();
    let region = Region::from_mmap(&map);
    let mut copy = vec![0u8; region.len()];
    region.copy_to(&mut copy);
    drop(s);
    let s = State::<Root>::open(Source::heap(copy), layout()).unwrap();
    assert_eq!(s.vec(r.vec).unwrap().len(), 100_000);
    drop(s);
    // Reopen the memfd itself; without the protocol it is refused clearly.
    // SAFETY: as above.
    let e = State::<Root>::open(
        unsafe { Source::shared(watcher.try_clone().unwrap()) },
        self::layout(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::NotAState { .. }), "{e}");
    // SAFETY: as above.
    let s = State::<Root>::open(unsafe { Source::shared(watcher) }, layout()).unwrap();
    assert_eq!(s.report().opened, Opened::Reopened);
    assert_eq!(s.vec(r.vec).unwrap()[99_999], 99_999);
}

// Regression tests for the format 2 fast paths (see BENCHMARKS.md,
// `## shm-state`): each pins one shortcut to the behaviour it must keep.

#[test]
fn crash_at_any_write_of_a_transaction_touching_many_lines() {
    // More lines than the inline journaled-line set holds, each written
    // twice: the spill set must still journal every line exactly once.
    crash_at_every_write(
        |s| {
            let r = *s.root().unwrap();
            s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[7u32; 2000]))
                .unwrap();
        },
        |tx| {
            let r = *tx.root()?;
            let mut v = tx.vec(r.vec)?;
            for round in 0..2u32 {
                for i in 0..40u32 {
                    v.set(u64::from(i) * 16, round * 100 + i)?;
                }
            }
            Ok(())
        },
    );
}

#[test]
fn every_line_is_journaled_once_per_transaction() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[7u32; 2000]))
        .unwrap();
    let before = dump(&s).unwrap();
    let e = s
        .transaction(|tx| {
            let mut v = tx.vec(r.vec)?;
            // 40 elements 64 bytes apart, twice: 40 lines, 40 records.
            for round in 0..2u32 {
                for i in 0..40u32 {
                    v.set(u64::from(i) * 16, round * 100 + i)?;
                }
            }
            let word = tx
                .core
                .mem()
                .atomic_u64(crate::format::TX_WORD)?
                .load(std::sync::atomic::Ordering::Acquire);
            let records = crate::journal::scan(tx.core.mem(), 16 << 10, word >> 1)?;
            assert_eq!(records.len(), 40);
            assert!(records.iter().all(|r| r.len == 64));
            Err::<(), _>(Error::Migration("roll back".into()))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Migration(_)));
    assert_eq!(dump(&s).unwrap(), before);
}

#[test]
fn a_transaction_that_does_not_allocate_leaves_the_dynamic_header_alone() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[1, 2, 3]))
        .unwrap();
    let dynamic = |s: &State<Root>| s.image()[0x80..0xC0].to_vec();
    let before = dynamic(&s);
    let seq = s.commits().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.set(1, 5)).unwrap();
    assert_eq!(dynamic(&s), before, "header line rewritten");
    assert_eq!(s.commits().unwrap(), seq + 1);
    // A rolled-back transaction consumes its sequence number too.
    let _ = s.transaction(|tx| {
        tx.vec(r.vec)?.set(1, 6)?;
        Err::<(), _>(Error::Migration("no".into()))
    });
    assert_eq!(s.commits().unwrap(), seq + 2);
    // An allocating one rewrites it, checksum included (reopen checks it).
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[0; 100]))
        .unwrap();
    assert_ne!(dynamic(&s), before);
    let s = reopen(s);
    assert_eq!(s.vec(r.vec).unwrap()[..3], [1, 5, 3]);
    assert_eq!(s.vec(r.vec).unwrap().len(), 103);
}

#[test]
fn a_format_1_region_is_refused_and_left_untouched() {
    use std::io::{Read, Seek, Write};
    let mut img = fresh().close().unwrap().into_heap().unwrap();
    img[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32fast::hash(&img[..0x7C]);
    img[0x7C..0x80].copy_from_slice(&crc.to_le_bytes());
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&img).unwrap();
    // SAFETY: a private temp file, never truncated.
    let source = unsafe { Source::file(file.try_clone().unwrap()) };
    let e = State::<Root>::open(source, layout()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedFormat {
                found: 1,
                supported: 2
            }
        ),
        "{e}"
    );
    let mut after = Vec::new();
    file.rewind().unwrap();
    file.read_to_end(&mut after).unwrap();
    assert!(after == img, "a refused open changed the region");
}

#[test]
fn a_map_view_stays_true_to_the_region_after_a_failed_insert() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    // A committed table (4096 slots), so that new entries are journaled.
    s.transaction(|tx| {
        let mut m = tx.map(r.map)?;
        for k in 0..3000u64 {
            m.insert(&(k + 1_000_000), &k)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let before = dump(&s).unwrap();
    // The 16 KiB journal fills up part way through: the view must go on
    // agreeing with the region (the cached header is re-read).
    let e = s
        .transaction(|tx| {
            let mut m = tx.map(r.map)?;
            let mut inserted = Vec::new();
            let failed = (0..500u64).find(|&k| {
                let ok = m.insert(&k, &(k * 3)).is_ok();
                if ok {
                    inserted.push(k);
                }
                !ok
            });
            assert!(failed.is_some(), "the journal never filled");
            assert_eq!(m.len()?, 3000 + inserted.len() as u64);
            let view = m.as_ref()?;
            view.verify()?;
            for &k in &inserted {
                assert_eq!(view.get(&k)?, Some(&(k * 3)));
            }
            // Replacing a value whose line is already journaled still works.
            let k = inserted[0];
            assert!(m.insert(&k, &7)?);
            assert_eq!(m.get(&k)?, Some(&7));
            assert_eq!(m.len()?, 3000 + inserted.len() as u64);
            m.as_ref()?.verify()?;
            Err::<(), _>(Error::Migration("roll back".into()))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Migration(_)));
    assert_eq!(dump(&s).unwrap(), before);
}
