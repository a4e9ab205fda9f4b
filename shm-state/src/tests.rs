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
    // Issue 10: found, expected, and what to do.
    let msg = e.to_string();
    assert!(
        msg.contains("holds layout version 1") && msg.contains("expects layout version 2"),
        "{e}"
    );
    assert!(
        msg.contains("add a migration") && msg.contains("empty memfd"),
        "{e}"
    );
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
fn a_copy_of_a_held_region_is_not_held() {
    let s = fresh();
    let image = s.image();
    // The copy's lock names this process and a live handle, but of other
    // memory: the copy is free, and its lock is taken over.
    let copy = open(image.clone()).unwrap();
    assert_eq!(copy.report().took_over_from, Some(std::process::id()));
    drop(copy);
    // Once the handle is gone too, the same.
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
fn a_state_with_its_magic_or_header_zeroed_is_refused_not_recreated() {
    let mut s = fresh();
    s.transaction(|tx| {
        tx.root_mut()?.n = 5;
        Ok::<_, Error>(())
    })
    .unwrap();
    let img = s.close().unwrap().into_heap().unwrap();
    let mut no_magic = img.clone();
    no_magic[..8].fill(0);
    let mut no_header = img.clone();
    no_header[..4096].fill(0);
    let mut creating = img.clone();
    creating[..8].copy_from_slice(crate::format::CREATING_MAGIC);
    for (name, bad) in [
        ("magic zeroed", no_magic),
        ("header zeroed", no_header),
        ("creating magic over a used state", creating),
    ] {
        let e = open(bad.clone()).unwrap_err();
        assert!(
            matches!(e, Error::Corrupted(_)),
            "{name}: {e} (must never be a silent reset)"
        );
        // Refused without a write: a file copy is byte for byte the same.
        let file = tempfile::tempfile().unwrap();
        std::fs::write(
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)),
            &bad,
        )
        .unwrap();
        // SAFETY: a private temp file, never truncated.
        let source = unsafe { Source::file(file.try_clone().unwrap()) };
        assert!(State::<Root>::open(source, layout()).is_err());
        let after = std::fs::read(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ))
        .unwrap();
        assert!(after == bad, "{name}: the refused open changed the file");
    }
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

#[test]
fn a_crash_at_any_write_of_creation_or_reopen_leaves_an_openable_state() {
    let existing = fresh().close().unwrap().into_heap().unwrap();
    let model = dump(&open(existing.clone()).unwrap()).unwrap();
    let mut points = 0;
    for start in [Vec::new(), existing.clone()] {
        for n in 0.. {
            let mut done = false;
            for torn in [0usize, 3, 8, 64] {
                let Some(image) = open_crashing(start.clone(), layout(), n, torn) else {
                    done = true;
                    break;
                };
                points += 1;
                let s = open(image).unwrap_or_else(|e| {
                    panic!(
                        "start {} bytes, crash at write {n} torn {torn}: {e}",
                        start.len()
                    )
                });
                s.verify().unwrap();
                if start.is_empty() {
                    assert_eq!(s.root().unwrap().n, 0);
                } else {
                    assert_eq!(dump(&s).unwrap(), model, "crash at write {n}");
                }
            }
            if done {
                break;
            }
        }
    }
    assert!(points > 20, "{points} crash points");
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
    // Every bit of the checksummed and validated header bytes (the lock
    // words at 0xC8..0x100 are not checked: see docs; the commit word at
    // 0xC0 carries its own check byte).
    for byte in (0..4096usize).filter(|b| !(0xC8..0x100).contains(b)) {
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
        let word = mem.load_u64(crate::format::TX_WORD).unwrap();
        let (seq, is_open) = crate::format::read_tx_word(word).unwrap();
        assert!(is_open);
        let jl = 16 << 10;
        let records = crate::journal::recovery_records(&mem, jl, seq).unwrap();
        crate::journal::apply_rollback(&mut mem, &records, seq).unwrap();
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
            let (records, _) = crate::journal::scan(tx.core.mem(), 16 << 10, tx.core.seq())?;
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
fn regions_of_formats_1_to_3_are_refused_and_left_untouched() {
    use std::io::{Read, Seek, Write};
    for old in [1u32, 2, 3] {
        let mut img = fresh().close().unwrap().into_heap().unwrap();
        img[8..12].copy_from_slice(&old.to_le_bytes());
        let crc = crc32fast::hash(&img[..0x7C]);
        img[0x7C..0x80].copy_from_slice(&crc.to_le_bytes());
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&img).unwrap();
        // SAFETY: a private temp file, never truncated.
        let source = unsafe { Source::file(file.try_clone().unwrap()) };
        let e = State::<Root>::open(source, layout()).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedFormat { found, supported: 4 } if found == old),
            "{e}"
        );
        let mut after = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut after).unwrap();
        assert!(after == img, "a refused open changed the region");
    }
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

#[test]
fn a_crash_at_any_write_of_a_migration_reopens_migrated_or_not_at_all() {
    #[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
    #[repr(C)]
    struct V1 {
        a: u64,
        b: u64,
    }
    #[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
    #[repr(C)]
    struct V2 {
        b: u64,
        a: u64,
    }
    let mut s = State::<V1>::open(Source::heap(Vec::new()), Layout::new(1)).unwrap();
    s.transaction(|tx| tx.set_root(V1 { a: 1, b: 2 })).unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let v2 = || {
        Layout::<V2>::new(2).migrate(|tx, old| {
            let o: V1 = bytemuck::pod_read_unaligned(&old.bytes);
            tx.set_root(V2 { b: o.b, a: o.a })
        })
    };
    let v1_layout = StoredLayout {
        version: 1,
        root_size: 16,
        root_align: 8,
    };
    let mut points = 0;
    for n in 0.. {
        let Some(image) = open_crashing(base.clone(), v2(), n, 5) else {
            break;
        };
        points += 1;
        // The old program still reads the old root, or is refused (newer
        // layout) if the migration had committed: never a wrong root.
        match State::<V1>::open(Source::heap(image.clone()), Layout::new(1)) {
            Ok(s) => {
                assert_eq!(*s.root().unwrap(), V1 { a: 1, b: 2 }, "crash at write {n}");
                assert_eq!(s.stored_layout().unwrap(), v1_layout);
            }
            Err(e) => assert!(
                matches!(e, Error::Downgrade { .. }),
                "crash at write {n}: {e}"
            ),
        }
        let s = State::<V2>::open(Source::heap(image), v2())
            .unwrap_or_else(|e| panic!("crash at write {n}: reopen refused: {e}"));
        assert_eq!(*s.root().unwrap(), V2 { b: 2, a: 1 }, "crash at write {n}");
        assert_eq!(s.stored_layout().unwrap().version, 2);
        s.verify().unwrap();
    }
    assert!(points > 10, "{points} crash points");
}

#[test]
fn a_newer_layout_version_is_refused_even_with_a_migration() {
    let bytes = fresh().close().unwrap().into_heap().unwrap();
    let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = called.clone();
    let l = Layout::<Root>::new(0).migrate(move |_, _| {
        c.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    });
    let e = State::open(Source::heap(bytes.clone()), l).unwrap_err();
    assert!(matches!(e, Error::Downgrade { .. }), "{e}");
    assert!(e.to_string().contains("refusing to downgrade"), "{e}");
    assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(open(bytes).unwrap().root().unwrap().n, 0);
}

// Ported from the correctness review's reproducers (`repro -- <name>`).

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

/// `repro -- race`: threads racing to open one state (an existing one, and
/// an empty file that each wants to create) are let in one at a time.
#[test]
fn concurrent_opens_in_threads_admit_exactly_one() {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::{Arc, Barrier};
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing");
    drop(open_path(&existing).unwrap());
    let rounds = env_count("SHM_STATE_LOCK_ROUNDS", 200);
    for round in 0..rounds {
        let path = if round % 4 == 0 {
            dir.path().join(format!("new-{round}"))
        } else {
            existing.clone()
        };
        let barrier = Arc::new(Barrier::new(3));
        let admitted = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (barrier, admitted, path) = (barrier.clone(), admitted.clone(), path.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let r = open_path(&path);
                    match &r {
                        Ok(_) => {
                            admitted.fetch_add(1, SeqCst);
                        }
                        Err(Error::Locked { pid }) => assert_eq!(*pid, std::process::id()),
                        Err(e) => panic!("round {round}: {e}"),
                    }
                    barrier.wait(); // hold it until every thread has tried
                    drop(r);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(SeqCst), 1, "round {round}");
        let s = open_path(&path).unwrap();
        s.verify().unwrap();
    }
}

const LOCK_CHILD: &str = "SHM_STATE_LOCK_CHILD";

/// The child side of `concurrent_opens_in_processes_admit_one_at_a_time`
/// (does nothing unless that test runs this binary with `LOCK_CHILD` set):
/// at the given instant, opens the state, holds it 20 ms, and prints when
/// it held it.
#[test]
fn lock_race_child() {
    let Ok(arg) = std::env::var(LOCK_CHILD) else {
        return;
    };
    let (path, at) = arg.split_once('|').unwrap();
    let at: u128 = at.parse().unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    };
    while now() < at {
        std::hint::spin_loop();
    }
    match open_path(std::path::Path::new(path)) {
        Ok(s) => {
            let from = now();
            std::thread::sleep(std::time::Duration::from_millis(20));
            println!("held {from} {}", now());
            drop(s);
            std::process::exit(0);
        }
        Err(Error::Locked { .. }) => std::process::exit(10),
        Err(e) => {
            println!("error {e}");
            std::process::exit(11);
        }
    }
}

/// `repro -- prace`: processes racing to open one state never hold it at
/// the same time.
#[test]
fn concurrent_opens_in_processes_admit_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    drop(open_path(&path).unwrap());
    let exe = std::env::current_exe().unwrap();
    let rounds = env_count("SHM_STATE_LOCK_PROC_ROUNDS", 20);
    let mut admitted_total = 0;
    for round in 0..rounds {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            + 60_000_000;
        let kids: Vec<_> = (0..3)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args(["--exact", "tests::lock_race_child", "--nocapture", "-q"])
                    .env(LOCK_CHILD, format!("{}|{at}", path.display()))
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut held: Vec<(u128, u128)> = Vec::new();
        for kid in kids {
            let out = kid.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            match out.status.code() {
                Some(0) => {
                    let line = text.lines().find(|l| l.starts_with("held ")).unwrap();
                    let mut f = line[5..].split(' ').map(|v| v.parse::<u128>().unwrap());
                    held.push((f.next().unwrap(), f.next().unwrap()));
                }
                Some(10) => {}
                other => panic!("round {round}: child exited {other:?}: {text}"),
            }
        }
        admitted_total += held.len();
        held.sort();
        for w in held.windows(2) {
            assert!(
                w[0].1 < w[1].0,
                "round {round}: two processes held the state at once: {held:?}"
            );
        }
    }
    assert!(admitted_total >= rounds as usize);
    open_path(&path).unwrap().verify().unwrap();
}

/// A refused (locked) open does not touch the live holder's snapshot
/// protocol page (it used to clear its `waiters` word).
#[test]
fn a_locked_open_leaves_the_holders_protocol_page_alone() {
    let fd =
        shm_fd::SharedFd::create("shm-state-waiters", shm_fd::CreateOptions::default()).unwrap();
    let other = fd.try_clone().unwrap();
    let l = || layout().with_snapshot_protocol();
    // SAFETY: a private memfd, sealed against shrinking.
    let s = State::<Root>::open(unsafe { Source::shared(fd) }, l()).unwrap();
    let map = other.map_raw(1).unwrap();
    // SAFETY: 8-aligned word inside the mapping, accessed atomically.
    let waiters = unsafe {
        std::sync::atomic::AtomicU64::from_ptr(
            map.as_mut_ptr().add(shm_snapshot::OFF_WAITERS).cast(),
        )
    };
    waiters.store(1, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: as above.
    let e = State::<Root>::open(unsafe { Source::shared(other.try_clone().unwrap()) }, l())
        .unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert_eq!(waiters.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(s);
}

/// `repro -- swallow`: an operation that fails part way poisons the
/// transaction even if the closure ignores its error and returns `Ok`.
#[test]
fn an_error_the_closure_swallows_still_rolls_the_transaction_back() {
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct R3 {
        v: StateVec<u64>,
        m: StateMap<u64, u64>,
        b: StateMap<u64, Bytes>,
    }
    let l = || Layout::<R3>::new(1).journal_len(4096);
    let mut s = State::<R3>::open(Source::heap(Vec::new()), l()).unwrap();
    s.transaction(|tx| {
        let r = R3 {
            v: tx.new_vec()?,
            m: tx.new_map()?,
            b: tx.new_map()?,
        };
        tx.set_root(r)?;
        tx.vec(r.v)?.extend_from_slice(&vec![0u64; 8 * 100])?;
        tx.map(r.m)?.insert(&1, &1)?;
        tx.map(r.b)?.insert(&1, b"old")?;
        Ok::<_, Error>(())
    })
    .unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let (mut incomplete, mut clean_failures) = (0, 0);
    for k in 20..60u64 {
        for replace in [false, true] {
            let mut s = State::<R3>::open(Source::heap(base.clone()), l()).unwrap();
            let r = *s.root().unwrap();
            let res = s.transaction(|tx| {
                for i in 0..k {
                    tx.vec(r.v)?.set(i * 8, 1)?; // one journaled line each
                }
                let inner = if replace {
                    tx.map(r.b)?.insert(&1, &[7u8; 300]).map(|_| ())
                } else {
                    tx.map(r.m)?.insert(&2, &2).map(|_| ())
                };
                Ok::<_, Error>(inner.is_err())
            });
            let m = s.map(r.m).unwrap();
            m.verify().unwrap();
            let b = s.map(r.b).unwrap();
            b.verify().unwrap();
            s.verify().unwrap();
            match res {
                Err(Error::Incomplete { .. }) => {
                    incomplete += 1;
                    // Rolled back whole: the vec sets are gone too.
                    assert_eq!(s.vec(r.v).unwrap()[0], 0, "k {k}");
                    assert_eq!(m.len(), 1);
                    assert_eq!(b.get(&1).unwrap(), Some(&b"old"[..]));
                }
                Ok(true) => {
                    // Failed before changing anything: the rest commits.
                    clean_failures += 1;
                    assert_eq!(s.vec(r.v).unwrap()[0], 1);
                    assert_eq!(m.get(&2).unwrap(), None);
                    assert_eq!(b.get(&1).unwrap(), Some(&b"old"[..]));
                }
                Ok(false) => {
                    if replace {
                        assert_eq!(b.get(&1).unwrap(), Some(&[7u8; 300][..]));
                    } else {
                        assert_eq!(m.get(&2).unwrap(), Some(&2));
                    }
                }
                // A `?` on a failed vec set: an ordinary rollback.
                Err(Error::JournalFull { .. }) => assert_eq!(s.vec(r.v).unwrap()[0], 0),
                Err(e) => panic!("k {k}: {e}"),
            }
            drop(s);
        }
    }
    assert!(incomplete > 0, "no operation failed part way");
    assert!(clean_failures > 0, "no operation failed before writing");
}

fn put_u64(img: &mut [u8], off: u64, v: u64) {
    img[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(img: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(img[off as usize..off as usize + 8].try_into().unwrap())
}

/// `repro -- tombs / len / log / reserve`: counts in a damaged region and
/// huge requests are errors, not arithmetic overflow panics.
#[test]
fn damaged_counts_and_huge_sizes_are_errors_not_panics() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| {
        let mut m = tx.map(r.map)?;
        for k in 0..6u64 {
            m.insert(&k, &k)?;
        }
        tx.log(r.log)?.append(b"x")
    })
    .unwrap();
    let img = s.close().unwrap().into_heap().unwrap();
    let map_hdr = r.map.offset() + 16;
    // A removal that leaves a tombstone, then the header's count zeroed.
    let mut with_tomb = None;
    for k in 0..6u64 {
        let mut s = open(img.clone()).unwrap();
        s.transaction(|tx| tx.map(r.map)?.remove(&k)).unwrap();
        let after = s.close().unwrap().into_heap().unwrap();
        if get_u64(&after, map_hdr + 8) == 1 {
            with_tomb = Some((k, after));
            break;
        }
    }
    let (k, mut bad) = with_tomb.expect("a tombstone");
    put_u64(&mut bad, map_hdr + 8, 0);
    let mut s = open(bad).unwrap();
    let e = s
        .transaction(|tx| tx.map(r.map)?.insert(&k, &99))
        .unwrap_err();
    assert!(e.to_string().contains("tombstone"), "{e}");
    // Entries in the table, none in the header's count.
    let mut bad = img.clone();
    put_u64(&mut bad, map_hdr, 0);
    let mut s = open(bad).unwrap();
    let e = s.transaction(|tx| tx.map(r.map)?.remove(&3)).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    // A log whose record count is at its maximum.
    let mut bad = img.clone();
    put_u64(&mut bad, r.log.offset() + 16, u64::MAX);
    let mut s = open(bad).unwrap();
    let e = s.transaction(|tx| tx.log(r.log)?.append(b"y")).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    // Sizes past the format's largest block.
    let mut s = open(img).unwrap();
    for n in [(1u64 << 60) + 1, u64::MAX / 8, u64::MAX] {
        let e = s
            .transaction(|tx| {
                let v = tx.new_vec::<u64>()?;
                tx.vec(v)?.reserve(n)
            })
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{n}: {e}");
    }
}

/// `repro -- foreign`: a byte-string slot naming another kind of block
/// cannot free it, and `verify` checks the root pointer.
#[test]
fn a_map_slot_cannot_free_a_block_of_another_kind() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.map(r.bmap)?.insert(b"k", b"v").map(|_| ()))
        .unwrap();
    let img = s.close().unwrap().into_heap().unwrap();
    let root_block = get_u64(&img, 0x90);
    let hdr = r.bmap.offset() + 16;
    let (cap, table) = (get_u64(&img, hdr + 16), get_u64(&img, hdr + 24));
    let mut bad = img.clone();
    for i in 0..cap {
        let at = table + 16 + i * 24;
        if get_u64(&img, at) > 1 {
            put_u64(&mut bad, at + 16, root_block); // the value names the root
        }
    }
    let mut s = open(bad).unwrap();
    let e = s
        .transaction(|tx| tx.map(r.bmap)?.remove(b"k"))
        .unwrap_err();
    assert!(e.to_string().contains("not a byte string"), "{e}");
    s.verify().unwrap();
    assert_eq!(s.root().unwrap().n, 0);
    // A root pointer naming another block is caught by verify.
    let root_len = size_of::<Root>() as u64;
    let other = r.vec.offset();
    s.core
        .mem
        .write("test", crate::format::DY_ROOT, &other.to_le_bytes())
        .unwrap();
    let _ = root_len;
    let e = s.verify().unwrap_err();
    assert!(e.to_string().contains("root"), "{e}");
}

/// `repro -- u128`: map items aligned above 8 are refused up front (slots
/// are 8-aligned: they could be stored but never read in place).
#[test]
fn map_items_aligned_above_8_are_refused() {
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct R2 {
        m: StateMap<[u64; 2], u64>,
    }
    let mut s = State::<R2>::open(Source::heap(Vec::new()), Layout::new(1)).unwrap();
    let e = s
        .transaction(|tx| tx.new_map::<u128, u64>().map(|_| ()))
        .unwrap_err();
    assert!(matches!(e, Error::UnsupportedType { .. }), "{e}");
    let e = s
        .transaction(|tx| tx.new_map::<u64, u128>().map(|_| ()))
        .unwrap_err();
    assert!(e.to_string().contains("alignment 16 exceeds 8"), "{e}");
    // A map of the same size but 8-aligned keys, viewed as u128 keys.
    let m = s
        .transaction(|tx| {
            let m = tx.new_map::<[u64; 2], u64>()?;
            tx.set_root(R2 { m })?;
            tx.map(m)?.insert(&[1, 2], &3)?;
            Ok::<_, Error>(m)
        })
        .unwrap();
    assert_eq!(s.map(m).unwrap().get(&[1, 2]).unwrap(), Some(&3));
    let as_u128: StateMap<u128, u64> = StateMap::from_off(m.offset());
    assert!(matches!(s.map(as_u128), Err(Error::UnsupportedType { .. })));
}

/// `repro -- clear`: freeing journals only the freed block's header (a
/// 40-byte record, was 88), so a map of 12 000 byte-string entries (24 000
/// blocks; the old limit was ~11 900 frees) clears within the default 1 MiB
/// journal.
#[test]
fn clearing_12k_byte_string_entries_fits_the_default_journal() {
    #[derive(Clone, Copy, Pod, Zeroable)]
    #[repr(C)]
    struct R {
        m: StateMap<Bytes, Bytes>,
    }
    let mut s = State::<R>::open(Source::heap(Vec::new()), Layout::new(1)).unwrap();
    let m = s
        .transaction(|tx| {
            let m = tx.new_map()?;
            tx.set_root(R { m })?;
            Ok::<_, Error>(m)
        })
        .unwrap();
    for chunk in 0..12u32 {
        s.transaction(|tx| {
            let mut map = tx.map(m)?;
            for i in 0..1000u32 {
                map.insert(&(chunk * 1000 + i).to_le_bytes(), b"v")?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let before = s.verify().unwrap();
    s.transaction(|tx| tx.map(m)?.clear()).unwrap();
    let after = s.verify().unwrap();
    assert_eq!(s.map(m).unwrap().len(), 0);
    assert!(after.free_blocks >= before.free_blocks + 24_000);
    // And a crash in the middle of such a clear still rolls back whole.
    let image = s.image();
    drop(s);
    let mut s = State::<R>::open(Source::heap(image), Layout::new(1)).unwrap();
    s.transaction(|tx| {
        let mut map = tx.map(m)?;
        for i in 0..50u32 {
            map.insert(&i.to_le_bytes(), &[1; 40])?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let keys = |s: &State<R>| s.map(m).unwrap().len();
    for n in [60u64, 120, 200] {
        let mut s = State::<R>::open(Source::heap(base.clone()), Layout::new(1)).unwrap();
        s.core.mem.crash = Some(CrashPlan {
            countdown: n,
            torn_prefix: 11,
            image: None,
        });
        s.transaction(|tx| tx.map(m)?.clear()).unwrap();
        let image = s.core.mem.crash.take().unwrap().image.expect("crashed");
        drop(s);
        let s = State::<R>::open(Source::heap(image), Layout::new(1)).unwrap();
        assert!(matches!(s.report().opened, Opened::Recovered { .. }), "{n}");
        assert_eq!(keys(&s), 50, "{n}");
        s.map(m).unwrap().verify().unwrap();
        s.verify().unwrap();
    }
}

/// `repro -- fuzz`: random damage in the heap, then every kind of change:
/// errors, never a panic (debug builds check every overflow).
#[test]
fn random_damage_then_changes_never_panic() {
    let img = populated();
    let heap_off = 4096 + (16 << 10);
    let r = *open(img.clone()).unwrap().root().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let runs = env_count("SHM_STATE_FUZZ", 3000);
    let mut opened = 0;
    for _ in 0..runs {
        let mut bad = img.clone();
        for _ in 0..1 + rng.below(4) {
            let i = heap_off + rng.below((bad.len() - heap_off) as u64) as usize;
            let w = i & !7;
            match rng.below(3) {
                0 => bad[i] ^= 1 << rng.below(8),
                1 => put_u64(&mut bad, w as u64, rng.below(4096)),
                _ => put_u64(&mut bad, w as u64, u64::MAX),
            }
        }
        let Ok(mut s) = open(bad) else { continue };
        opened += 1;
        let k = rng.below(80);
        let _ = s.transaction(|tx| {
            let _ = tx.vec(r.vec).and_then(|mut v| {
                v.push(1)?;
                v.pop()?;
                v.set(k, 3)
            });
            let _ = tx.map(r.map).and_then(|mut m| {
                m.insert(&k, &1)?;
                m.remove(&(k + 1))?;
                Ok(())
            });
            let _ = tx.map(r.bmap).and_then(|mut m| {
                m.insert(b"k1", b"zz")?;
                m.remove(format!("k{k}").as_bytes())?;
                Ok(())
            });
            let _ = tx.log(r.log).and_then(|mut l| l.append(b"rec"));
            let _ = tx.cell_mut(r.cell).map(|c| *c = c.wrapping_add(1));
            Ok::<_, Error>(())
        });
        let _ = s.transaction(|tx| {
            tx.map(r.bmap)?.clear()?;
            tx.log(r.log)?.clear()?;
            tx.map(r.map)?.clear()?;
            tx.vec(r.vec)?.reserve(100)
        });
        let _ = dump(&s);
    }
    assert!(
        opened > runs / 2,
        "{opened} of {runs} damaged images opened"
    );
}

mod damage;
mod lock;
mod miri;
mod protocol_page;
mod regressions;
