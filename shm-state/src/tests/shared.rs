//! Shared states with real processes: this test binary runs itself as the
//! other peers (`shared_child`, which does nothing unless `SHARED_CHILD`
//! names a role). Every child gets `PR_SET_PDEATHSIG`, is killed by pid
//! only, and is reaped.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::StatePublished;
use crate::shared::wlock;

const SHARED_CHILD: &str = "SHM_STATE_SHARED_CHILD";

pub(super) fn open_shared(path: &Path) -> Result<SharedState<Root>> {
    open_shared_with(path, layout())
}

fn open_shared_with(path: &Path, layout: Layout<Root>) -> Result<SharedState<Root>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    // SAFETY: a file in a private temp dir, shared only by this test's
    // processes through SharedState, never truncated.
    SharedState::open(unsafe { Source::file(f) }, layout)
}

/// Creates every structure of the root (in a fresh state).
pub(super) fn init(s: &mut SharedState<Root>) {
    s.transaction(|tx| {
        if !tx.root()?.vec.is_null() {
            return Ok(());
        }
        let r = Root {
            n: 0,
            cell: tx.new_cell(0u64)?,
            vec: tx.new_vec()?,
            map: tx.new_map()?,
            bmap: tx.new_map()?,
            log: tx.new_log()?,
        };
        tx.set_root(r)?;
        let mut v = tx.vec(r.vec)?;
        for _ in 0..64 {
            v.push(0)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
}

/// Sets every element of the vec, the cell and map[0] to `n`: one
/// transaction, many lines.
fn set_all(tx: &mut Tx<'_, Root>, n: u64) -> Result<()> {
    let r = *tx.root()?;
    let mut v = tx.vec(r.vec)?;
    for i in 0..v.len()? {
        v.set(i, n as u32)?;
    }
    tx.set_cell(r.cell, n)?;
    tx.map(r.map)?.insert(&0, &n)?;
    Ok(())
}

/// A child process running this binary as `role` on `path`; its stdout is
/// piped. It dies with this process.
pub(super) fn child(role: &str, path: &Path) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "tests::shared::shared_child",
        "--nocapture",
        "-q",
    ])
    .env(SHARED_CHILD, format!("{role}|{}", path.display()))
    .stdout(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; it only sets this child's
    // parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().unwrap()
}

/// Waits (at most 30 s) for the child to print `line`.
pub(super) fn expect_line(kid: &mut Child, line: &str) {
    let out = kid.stdout.as_mut().unwrap();
    let mut reader = BufReader::new(out);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = String::new();
    while Instant::now() < deadline {
        got.clear();
        if reader.read_line(&mut got).unwrap() == 0 {
            panic!("the child ended before printing {line:?}");
        }
        if got.trim() == line {
            return;
        }
    }
    panic!("no {line:?} from the child within 30 s");
}

pub(super) fn kill9(kid: &mut Child) {
    kid.kill().unwrap(); // SIGKILL, by pid
    kid.wait().unwrap();
}

/// The other peers (does nothing unless a test below runs this binary with
/// `SHARED_CHILD` set).
#[test]
fn shared_child() {
    let Ok(arg) = std::env::var(SHARED_CHILD) else {
        return;
    };
    let (role, path) = arg.split_once('|').unwrap();
    let mut s = if role == "published" {
        open_shared_with(Path::new(path), layout().with_snapshot_protocol()).unwrap()
    } else {
        open_shared(Path::new(path)).unwrap()
    };
    init(&mut s);
    match role {
        // Holds a handle until killed.
        "hold" => {
            println!("open");
            std::thread::sleep(Duration::from_secs(60));
        }
        // Dies inside a transaction, half of it written.
        "die-in-tx" => {
            let _ = s.transaction(|tx| {
                let r = *tx.root()?;
                tx.vec(r.vec)?.set(0, 7777)?;
                tx.set_cell(r.cell, 7777)?;
                println!("inside");
                std::thread::sleep(Duration::from_secs(60));
                Ok::<_, Error>(())
            });
        }
        // Commits set_all(n) for n = 1, 2, ... as fast as it can, for the
        // seconds in SHM_STATE_RACE_SECS (default 10).
        "writer" => {
            let secs = env_count("SHM_STATE_RACE_SECS", 10);
            let end = Instant::now() + Duration::from_secs(secs);
            println!("writing");
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                s.transaction(|tx| set_all(tx, n)).unwrap();
            }
            println!("wrote {n}");
        }
        // Pushes 200 000 elements, one transaction of 100 each: the
        // region grows under the readers.
        "grower" => {
            println!("growing");
            let r = s.read(|v| v.root()).unwrap();
            for batch in 0..2_000u32 {
                s.transaction(|tx| {
                    let mut v = tx.vec(r.vec)?;
                    let base = v.len()?;
                    for i in 0..100 {
                        v.push((base + i) as u32)?;
                    }
                    tx.map(r.map)?.insert(&u64::from(batch), &(base + 100))
                })
                .unwrap();
            }
            println!("grown");
        }
        // Forks; the child drops its copy of the handle and exits; then
        // this process's entry must still be live.
        "fork-drop" => {
            // SAFETY: the child only drops the copied handle (which, in a
            // forked child, touches no lock and no thread: `leave`) and
            // exits without running destructors or atexit handlers.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                drop(s);
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just forked, by its pid.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(rc, pid);
            let me = std::process::id();
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 && s.peers().contains(&me)
            {
                println!("entry kept");
            } else {
                println!(
                    "entry lost (child status {status:#x}, peers {:?})",
                    s.peers()
                );
            }
            std::thread::sleep(Duration::from_secs(60));
        }
        // Publishes versions until killed: version v's bytes are v as text,
        // repeated to a length that varies with v.
        "publisher" => {
            let h = StatePublished::from_off(s.read(|v| v.root()).unwrap().n);
            println!("publishing");
            loop {
                let next = s.read_published(h).unwrap().map_or(1, |(v, _)| v + 1);
                let got = s.publish(h, &published_bytes(next)).unwrap();
                assert_eq!(got, next);
            }
        }
        // One transaction.
        "one" => {
            s.transaction(|tx| set_all(tx, 99)).unwrap();
            println!("one");
        }
        // 100 transactions through the snapshot protocol.
        "published" => {
            for n in 0..100 {
                s.transaction(|tx| set_all(tx, n)).unwrap();
            }
            println!("published");
        }
        other => super::channels::role(other, &mut s),
    }
    drop(s);
    std::process::exit(0);
}

#[test]
fn a_heap_buffer_cannot_be_shared_and_a_second_handle_in_one_process_is_refused() {
    let e = SharedState::<Root>::open(Source::heap(Vec::new()), layout()).unwrap_err();
    assert!(e.to_string().contains("cannot be shared"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let s = open_shared(&path).unwrap();
    match open_shared(&path) {
        Err(Error::Locked { pid }) => assert_eq!(pid, std::process::id()),
        other => panic!("a second handle: {other:?}"),
    }
    // Nor an exclusive one while this process shares it.
    match open_path(&path) {
        Err(Error::Locked { pid }) => assert_eq!(pid, std::process::id()),
        other => panic!("an exclusive handle: {other:?}"),
    }
    assert_eq!(s.peers(), vec![std::process::id()]);
    drop(s);
    // Closed: the state opens exclusively, and shared again after.
    drop(open_path(&path).unwrap());
    let s = open_shared(&path).unwrap();
    assert_eq!(s.report().generation, 3);
}

#[test]
fn exclusive_and_shared_exclude_each_other_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut kid = child("hold", &path);
    expect_line(&mut kid, "open");
    match open_path(&path) {
        Err(Error::Locked { pid }) => assert_eq!(pid, kid.id()),
        other => panic!("an exclusive open beside a live peer: {other:?}"),
    }
    // A second sharer is fine and sees both.
    let s = open_shared(&path).unwrap();
    let mut peers = s.peers();
    peers.sort();
    let mut want = vec![kid.id(), std::process::id()];
    want.sort();
    assert_eq!(peers, want);
    drop(s);
    kill9(&mut kid);
    // The dead peer's entry does not keep an exclusive opener out, and an
    // exclusive holder keeps a sharer out.
    let held = open_path(&path).unwrap();
    match open_shared(&path) {
        Err(Error::Locked { .. }) => {}
        other => panic!("a sharer beside an exclusive holder: {other:?}"),
    }
    drop(held);
}

#[test]
fn dead_peers_are_found_and_their_entries_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut kids: Vec<Child> = (0..3).map(|_| child("hold", &path)).collect();
    for k in &mut kids {
        expect_line(k, "open");
    }
    let s = open_shared(&path).unwrap();
    assert_eq!(s.peers().len(), 4);
    let mut dead = kids.remove(1);
    let dead_pid = dead.id();
    kill9(&mut dead);
    let peers = s.peers();
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert!(!peers.contains(&dead_pid));
    for mut k in kids {
        kill9(&mut k);
    }
    assert_eq!(s.peers(), vec![std::process::id()]);
}

/// Reads the shared line's writer lock word from the file.
fn wlock_word(path: &Path) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    u32::from_le_bytes(bytes[0x300..0x304].try_into().unwrap())
}

#[test]
fn a_writer_killed_inside_a_transaction_is_rolled_back_by_the_next_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    s.transaction(|tx| set_all(tx, 5)).unwrap();
    let mut kid = child("die-in-tx", &path);
    expect_line(&mut kid, "inside");
    // The child holds the writer lock, its transaction half written.
    assert_ne!(wlock::holder(wlock_word(&path)), 0);
    kill9(&mut kid);
    if s.is_robust() {
        // The kernel marked the lock at the child's death.
        let w = wlock_word(&path);
        assert_eq!(wlock::holder(w), 0, "{w:#x}");
        assert_ne!(w & crate::format::WLOCK_OWNER_DIED, 0, "{w:#x}");
    }
    // A reader does not see the half-written transaction: it rolls it back
    // (under the writer lock) and reads the committed state.
    let r = s.read(|v| v.root()).unwrap();
    let (vec, cell) = s
        .read(|v| Ok::<_, Error>((v.vec(r.vec)?, v.cell(r.cell)?)))
        .unwrap();
    assert!(vec.iter().all(|&x| x == 5), "{vec:?}");
    assert_eq!(cell, 5);
    // The next writer goes on.
    s.transaction(|tx| set_all(tx, 6)).unwrap();
    assert_eq!(s.stats().recoveries, 1, "{:?}", s.stats());
    let vec = s.read(|v| v.vec(r.vec)).unwrap();
    assert!(vec.iter().all(|&x| x == 6), "{vec:?}");
    drop(s);
    open_path(&path).unwrap().verify().unwrap();
}

#[test]
fn a_writer_blocked_behind_a_dying_holder_goes_on_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    let mut kid = child("die-in-tx", &path);
    expect_line(&mut kid, "inside");
    let pid = kid.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        kid.kill().unwrap();
        kid.wait().unwrap();
        Instant::now()
    });
    // Blocks on the lock until the child dies, then recovers and commits.
    let started = Instant::now();
    s.transaction(|tx| set_all(tx, 9)).unwrap();
    let committed = Instant::now();
    let killed = killer.join().unwrap();
    assert!(
        committed >= started + Duration::from_millis(250),
        "the transaction did not wait for the holder (pid {pid})"
    );
    eprintln!(
        "from the holder's reaped death to the next commit: {:?} (robust: {})",
        committed.saturating_duration_since(killed),
        s.is_robust()
    );
    assert_eq!(s.stats().recoveries, 1);
    let r = s.read(|v| v.root()).unwrap();
    assert_eq!(s.read(|v| v.cell(r.cell)).unwrap(), 9);
}

#[test]
fn a_reader_racing_a_writer_never_sees_a_torn_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    let r = s.read(|v| v.root()).unwrap();
    let mut kid = child("writer", &path);
    expect_line(&mut kid, "writing");
    let (mut reads, mut last) = (0u64, 0u64);
    while kid.try_wait().unwrap().is_none() {
        let (vec, cell, m) = s
            .read(|v| Ok::<_, Error>((v.vec(r.vec)?, v.cell(r.cell)?, v.map(r.map)?.get(&0)?)))
            .unwrap();
        // One transaction sets all of them: any mix is a torn read.
        assert!(
            vec.iter().all(|&x| u64::from(x) == cell) && m.unwrap_or(0) == cell,
            "torn read: cell {cell}, map {m:?}, vec {vec:?}"
        );
        assert!(cell >= last, "went back from {last} to {cell}");
        last = cell;
        reads += 1;
    }
    let out = kid.wait_with_output().unwrap();
    assert!(out.status.success());
    let stats = s.stats();
    eprintln!(
        "{reads} reads, last value {last}, {stats:?}, {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(reads > 100 && last > 100, "{reads} reads, last {last}");
    assert!(
        stats.read_retries > 0,
        "no read ever raced a commit: the test proves nothing ({stats:?})"
    );
}

#[test]
fn a_reader_follows_the_region_as_a_writer_grows_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    let r = s.read(|v| v.root()).unwrap();
    let first_len = s.region_len();
    let mut kid = child("grower", &path);
    expect_line(&mut kid, "growing");
    let mut reads = 0u64;
    loop {
        let done = kid.try_wait().unwrap().is_some();
        let (len, last) = s
            .read(|v| {
                let len = v.vec_len(r.vec)?;
                Ok::<_, Error>((len, v.vec_get(r.vec, len - 1)?))
            })
            .unwrap();
        // The elements past the first 64 are their own index.
        if len > 64 {
            assert_eq!(last, Some((len - 1) as u32), "len {len}");
        }
        reads += 1;
        if done {
            assert_eq!(len, 64 + 200_000);
            break;
        }
    }
    assert!(kid.wait().unwrap().success());
    assert!(
        s.region_len() > 4 * first_len,
        "the region did not grow: {first_len} -> {}",
        s.region_len()
    );
    let whole = s.read(|v| v.vec(r.vec)).unwrap();
    assert!(
        whole
            .iter()
            .enumerate()
            .skip(64)
            .all(|(i, &x)| x as usize == i),
        "the elements are not their indexes"
    );
    eprintln!(
        "{reads} reads while the region grew to {} bytes",
        s.region_len()
    );
}

/// The snapshot protocol's sequence word (shm-snapshot's header, offset 64
/// of the first page).
fn protocol_seq(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u64::from_le_bytes(bytes[64..72].try_into().unwrap())
}

#[test]
fn writers_in_turn_continue_the_snapshot_protocols_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared_with(&path, layout().with_snapshot_protocol()).unwrap();
    init(&mut s);
    let mut kid = child("published", &path);
    expect_line(&mut kid, "published");
    assert!(kid.wait().unwrap().success());
    let after_child = protocol_seq(&path);
    assert_eq!(after_child % 2, 0, "left inside an update: {after_child}");
    for n in 0..100 {
        s.transaction(|tx| set_all(tx, n)).unwrap();
    }
    // Each of our commits is one generation more than the child's last:
    // a writer that went on from its own stale count would store values
    // the child already used (a snapshotter could keep a torn copy).
    assert_eq!(protocol_seq(&path), after_child + 200);
}

#[test]
fn a_panic_in_a_transaction_rolls_it_back_and_releases_the_writer_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    s.transaction(|tx| set_all(tx, 3)).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = s.transaction(|tx| {
            set_all(tx, 4)?;
            panic!("in the closure");
            #[allow(unreachable_code)]
            Ok::<_, Error>(())
        });
    }));
    assert!(caught.is_err());
    assert_eq!(wlock_word(&path), 0, "the writer lock is still held");
    // Another process writes, and the panicked transaction left nothing.
    let r = s.read(|v| v.root()).unwrap();
    assert_eq!(s.read(|v| v.cell(r.cell)).unwrap(), 3);
    let mut kid = child("one", &path);
    expect_line(&mut kid, "one");
    assert!(kid.wait().unwrap().success());
    assert_eq!(s.read(|v| v.cell(r.cell)).unwrap(), 99);
}

/// Sets the region's format field (and the superblock checksum) in the
/// file, as a format `format` build left it.
fn set_format(path: &Path, format: u32) {
    use crate::format::{SB_CRC, SB_FORMAT};
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut head = vec![0u8; SB_CRC as usize];
    f.read_exact_at(&mut head, 0).unwrap();
    head[SB_FORMAT as usize..][..4].copy_from_slice(&format.to_le_bytes());
    f.write_all_at(&head[SB_FORMAT as usize..][..4], SB_FORMAT)
        .unwrap();
    f.write_all_at(&crc32fast::hash(&head).to_le_bytes(), SB_CRC)
        .unwrap();
}

fn format_of(path: &Path) -> u32 {
    let b = std::fs::read(path).unwrap();
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

#[test]
fn a_format_5_region_is_upgraded_only_by_an_open_that_finds_no_other_peer() {
    assert_eq!(crate::shared::peers::slots_for(5), 64);
    assert_eq!(crate::shared::peers::slots_for(6), crate::MAX_PEERS);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    drop(open_shared(&path).unwrap());
    // Another process shares the region, which says format 5 (as if that
    // process were of a format 5 build: it opened, then the field was set
    // back; it never touches the superblock again).
    let mut kid = child("hold", &path);
    expect_line(&mut kid, "open");
    set_format(&path, 5);
    let s = open_shared(&path).unwrap();
    assert_eq!(
        s.report().upgraded_from,
        None,
        "upgraded beside another peer"
    );
    assert!(s.slot() < 64, "an entry of format 6 in a format 5 region");
    assert_eq!(format_of(&path), 5);
    drop(s);
    // Alone: the next open upgrades it.
    kill9(&mut kid);
    let s = open_shared(&path).unwrap();
    assert_eq!(s.report().upgraded_from, Some(5));
    drop(s);
    assert_eq!(format_of(&path), crate::FORMAT_VERSION);
}

#[test]
fn a_handle_dropped_in_a_forked_child_leaves_the_parents_entry_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut kid = child("fork-drop", &path);
    expect_line(&mut kid, "entry kept");
    // The parent still counts as a peer: an exclusive opener is refused.
    match open_path(&path) {
        Err(Error::Locked { pid }) => assert_eq!(pid, kid.id()),
        other => panic!("an exclusive open beside the forking peer: {other:?}"),
    }
    kill9(&mut kid);
}

#[test]
fn a_panicking_migration_releases_the_writer_lock_and_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    drop(s);
    let panicked = std::panic::catch_unwind(|| {
        let layout = Layout::<Root>::new(2)
            .journal_len(16 << 10)
            .initial_len(4096)
            .migrate(|_, _| panic!("in the migration"));
        let _ = open_shared_with(&path, layout);
    });
    assert!(panicked.is_err());
    let w = wlock_word(&path);
    assert_eq!(wlock::holder(w), 0, "the writer lock is still held: {w:#x}");
    // The entry went back, and the opening transaction (rolled back as
    // the panic unwound) left nothing: the next open is the second.
    let s = open_shared(&path).unwrap();
    assert_eq!(s.peers(), vec![std::process::id()]);
    assert_eq!(s.report().generation, 2, "{}", s.report());
}

#[test]
fn a_migration_waits_until_no_other_process_shares_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut kid = child("hold", &path);
    expect_line(&mut kid, "open");
    let v2 = || {
        Layout::<Root>::new(2)
            .journal_len(16 << 10)
            .initial_len(4096)
            .migrate(|_, _| Ok(()))
    };
    let e = open_shared_with(&path, v2()).unwrap_err();
    assert!(e.to_string().contains("other process(es) share it"), "{e}");
    kill9(&mut kid);
    let s = open_shared_with(&path, v2()).unwrap();
    assert!(s.report().migrated_from.is_some(), "{}", s.report());
}

/// What version `v` of the published value holds.
fn published_bytes(v: u64) -> Vec<u8> {
    v.to_string().repeat(1 + (v % 50) as usize).into_bytes()
}

#[test]
fn published_values_are_read_whole_while_a_writer_publishes_and_after_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    let h = s
        .transaction(|tx| {
            let h = tx.new_published(4096)?;
            tx.root_mut()?.n = h.offset();
            Ok::<_, Error>(h)
        })
        .unwrap();
    assert_eq!(s.read_published(h).unwrap(), None);
    assert_eq!(s.publish(h, b"first").unwrap(), 1);
    assert_eq!(s.read_published(h).unwrap(), Some((1, b"first".to_vec())));
    let e = s.publish(h, &[0u8; 4097]).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");

    let mut kid = child("publisher", &path);
    expect_line(&mut kid, "publishing");
    let (mut reads, mut last) = (0u64, 1u64);
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        let (v, bytes) = s.read_published(h).unwrap().unwrap();
        assert!(v >= last, "went back from {last} to {v}");
        if v > 1 {
            assert_eq!(bytes, published_bytes(v), "version {v} is torn");
        }
        last = v;
        reads += 1;
    }
    // Killed at a random instruction, likely inside a publish: the last
    // complete version stays readable, whole.
    kill9(&mut kid);
    let (v, bytes) = s.read_published(h).unwrap().unwrap();
    assert!(v >= last);
    assert_eq!(bytes, published_bytes(v));
    eprintln!("{reads} reads while the child published up to version {v}");
    assert!(last > 100, "the child published only {last} versions");
    // A new publisher goes on from there.
    assert_eq!(s.publish(h, &published_bytes(v + 1)).unwrap(), v + 1);
    assert_eq!(
        s.read_published(h).unwrap(),
        Some((v + 1, published_bytes(v + 1)))
    );
}

#[test]
fn a_published_version_whose_bytes_are_damaged_gives_way_to_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut s = open_shared(&path).unwrap();
    init(&mut s);
    let h = s
        .transaction(|tx| {
            let h = tx.new_published(64)?;
            tx.root_mut()?.n = h.offset();
            Ok::<_, Error>(h)
        })
        .unwrap();
    assert_eq!(s.publish(h, b"version one").unwrap(), 1);
    assert_eq!(s.publish(h, b"version two").unwrap(), 2);
    drop(s);
    // Version 2 is in the second slot: flip a bit of its bytes.
    let slot2 = h.offset() + 16 + 16 + (32 + 64) + 32;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[slot2 as usize] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let mut s = open_shared(&path).unwrap();
    assert_eq!(
        s.read_published(h).unwrap(),
        Some((1, b"version one".to_vec()))
    );
    // Damage both: an error, not a guess.
    drop(s);
    let slot1 = h.offset() + 16 + 16 + 32;
    bytes[slot1 as usize] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let mut s = open_shared(&path).unwrap();
    let e = s.read_published(h).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}
