//! Regressions found by a review of format 4: each of these tests failed on
//! the code as first written.

use std::os::unix::fs::FileExt;

use super::*;
use crate::format::{LOCK_CLAIMING, LOCK_COUNT_SHIFT, LOCK_PID};

/// A lock word caught "claiming" whose pid is this process's own, in memory
/// no thread of this process is claiming: the leftover of a process killed
/// between its claim CAS and its identity stores, whose pid this process
/// now has (a PID namespace gives every run of a service the same pid, e.g.
/// systemd's PrivatePIDs= makes it 1), or a copy of such bytes. Nobody
/// holds it, yet `owner::holds` says "held" (pid == self short-circuits
/// before the heap check and before any maps check), so the open is
/// refused with `Locked { pid: <self> }` for as long as this process lives.
#[test]
fn own_pid_claiming_leftover_in_a_heap_buffer_is_free() {
    let mut img = fresh().close().unwrap().into_heap().unwrap();
    let word = u64::from(std::process::id()) | LOCK_CLAIMING | (7 << LOCK_COUNT_SHIFT);
    img[LOCK_PID as usize..][..8].copy_from_slice(&word.to_le_bytes());
    let r = open(img);
    assert!(
        r.is_ok(),
        "a heap buffer no thread is claiming was refused: {}",
        r.unwrap_err()
    );
}

#[test]
fn own_pid_claiming_leftover_in_a_memfd_is_free() {
    let fd = memfd("review-claim");
    drop(open_fd(&fd).unwrap());
    // What a previous process with this pid left when killed right after
    // its claiming compare-and-swap.
    let word = u64::from(std::process::id()) | LOCK_CLAIMING | (3 << LOCK_COUNT_SHIFT);
    fd.try_clone()
        .unwrap()
        .into_file()
        .write_all_at(&word.to_le_bytes(), LOCK_PID)
        .unwrap();
    for attempt in 0..3 {
        let r = open_fd(&fd);
        assert!(
            r.is_ok(),
            "attempt {attempt}: refused although no thread claims it: {}",
            r.unwrap_err()
        );
    }
}

/// `prepare` enters an update of the protocol header before `create`, and
/// returns with `?` when `create` fails (here: growing the file fails,
/// EFBIG on ext4 for an initial heap of 32 TiB that `Layout::check`
/// accepts), without the matching commit: the header is left "updating"
/// although nothing of the region changed. docs/state-format.md, *Open*:
/// "a protocol header taken in step 4 keeps its last committed value".
/// Every snapshotter then reports the program as mid-update until some
/// later open succeeds.
#[test]
fn a_failed_creation_leaves_the_protocol_header_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let layout = Layout::<Root>::new(1)
        .journal_len(16 << 10)
        .initial_len(1 << 45)
        .with_snapshot_protocol();
    layout.check().unwrap();
    // SAFETY: a private temp file, never truncated.
    let e = State::<Root>::open(unsafe { Source::file(file.try_clone().unwrap()) }, layout)
        .unwrap_err();
    eprintln!("open failed (expected): {e}");
    let mut page = vec![0u8; shm_snapshot::HEADER_LEN];
    file.read_exact_at(&mut page, 0).unwrap();
    let buf = shm_snapshot::HeapBuffer::new(page.len());
    buf.region().write(0, &page);
    let p = shm_snapshot::probe(buf.region()).unwrap();
    assert!(
        !matches!(p, shm_snapshot::Protocol::Present { updating: true, .. }),
        "the refused open left the protocol header mid-update: {p:?}"
    );
}

/// Experiment: every write of a small transaction, torn at every prefix.
#[test]
fn exhaustive_tears_of_a_small_transaction() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| {
        for i in 0..20u32 {
            tx.vec(r.vec)?.push(i)?;
            tx.map(r.map)?.insert(&u64::from(i), &1)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let before = dump(&s).unwrap();
    let base = s.close().unwrap().into_heap().unwrap();
    let work = |tx: &mut Tx<'_, Root>| -> Result<()> {
        let r = *tx.root()?;
        tx.root_mut()?.n += 1;
        tx.vec(r.vec)?.set(3, 1000)?;
        tx.map(r.map)?.remove(&6)?;
        tx.map(r.map)?.insert(&5, &555)?;
        for i in 20..30 {
            tx.vec(r.vec)?.push(i)?;
        }
        Ok(())
    };
    let mut after = None;
    let mut points = 0;
    'outer: for n in 0.. {
        for prefix in 0..90usize {
            let mut s = open(base.clone()).unwrap();
            s.core.mem.crash = Some(CrashPlan {
                countdown: n,
                torn_prefix: prefix,
                image: None,
            });
            s.transaction(|tx| work(tx)).unwrap();
            let image = s.core.mem.crash.take().unwrap().image;
            after.get_or_insert(dump(&s).unwrap());
            drop(s);
            let Some(image) = image else { break 'outer };
            points += 1;
            let s = open(image)
                .unwrap_or_else(|e| panic!("write {n} torn at {prefix}: open failed: {e}"));
            let got = dump(&s).unwrap();
            assert!(
                got == before || Some(&got) == after.as_ref(),
                "write {n} torn at {prefix}"
            );
        }
    }
    eprintln!("{points} crash points");
}

/// lib.rs promises that one flipped bit in a word that decides recovery
/// (it lists the dynamic header's CRC and the free-list heads) "opens to
/// exactly the committed state or is refused as Error::Corrupted, with
/// nothing written". `prepare` checks the dynamic header and the free-list
/// heads only after `apply_rollback` wrote the interrupted transaction's
/// before-images back: a flipped bit there (in a line the interrupted
/// transaction did not journal) is refused, but the region was written.
#[test]
fn damage_found_after_the_rollback_is_refused_with_the_rollback_written() {
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[1u32; 8]))
        .unwrap();
    s.core.mem.crash = Some(CrashPlan {
        countdown: 9,
        torn_prefix: 0,
        image: None,
    });
    // Overwrites vec elements in place: journals only a heap line.
    s.transaction(|tx| {
        for i in 0..8 {
            tx.vec(r.vec)?.set(i, 9)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let img = s.core.mem.crash.take().unwrap().image.unwrap();
    drop(s);
    let (_, open_tx) =
        crate::format::read_tx_word(u64::from_le_bytes(img[0xC0..0xC8].try_into().unwrap()))
            .unwrap();
    assert!(open_tx);
    assert!(open(img.clone()).is_ok(), "undamaged, it recovers");
    for (what, byte) in [
        ("free-list head of class 0", 0x100usize),
        ("used bytes", 0xA0),
    ] {
        let mut bad = img.clone();
        bad[byte] ^= 1;
        let (r, after) = open_as_file(&bad, layout());
        let e = r.unwrap_err();
        assert!(e.is_corruption(), "{what}: {e}");
        let changed: Vec<usize> = (0..bad.len()).filter(|&i| after[i] != bad[i]).collect();
        assert!(
            changed.is_empty(),
            "{what}: refused ({e}) but {} bytes were written, e.g. at {:#x?} (commit word at 0xC0)",
            changed.len(),
            &changed[..changed.len().min(6)]
        );
    }
}

/// A lock caught claiming by a live process that maps the state's file
/// must be held (the claimer is between its compare-and-swap and its
/// settling store; taking it over lets both processes hold the lock, since
/// the claimer's settling store is a plain store). `owner::maps_memory`
/// compares `fstat`'s st_dev with the device in /proc/PID/maps, which
/// differ on btrfs (stat reports the subvolume's anonymous device; maps the
/// superblock's: here 0:29 vs 00:28): the live claimer is judged free.
/// Runs in the temp directory, and in every directory SHM_STATE_FS_DIRS
/// names (`:`-separated), e.g. `SHM_STATE_FS_DIRS=/mnt/btrfs`. Needs
/// python3 (to map the file from another process).
#[test]
fn a_live_claimer_of_a_file_is_held_on_every_filesystem() {
    let tmp = std::env::temp_dir();
    let extra = std::env::var("SHM_STATE_FS_DIRS").unwrap_or_default();
    let dirs: Vec<&str> = std::iter::once(tmp.to_str().unwrap())
        .chain(extra.split(':').filter(|d| !d.is_empty()))
        .collect();
    let mut failures = Vec::new();
    for dir in dirs {
        let path = std::path::Path::new(dir).join(format!("claimer-state-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // SAFETY: a private file of this test, never truncated while open.
        let open_file =
            || State::<Root>::open(unsafe { Source::file(file.try_clone().unwrap()) }, layout());
        drop(open_file().unwrap());
        // Another process that maps the file, standing for a claimer caught
        // between its claim and its settling store.
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import mmap,sys,time\nf=open(sys.argv[1],'r+b')\nm=mmap.mmap(f.fileno(),4096)\nprint('mapped',flush=True)\ntime.sleep(60)",
            )
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "mapped");
        let word = u64::from(child.id()) | LOCK_CLAIMING | (9 << LOCK_COUNT_SHIFT);
        file.write_all_at(&word.to_le_bytes(), LOCK_PID).unwrap();
        match open_file() {
            Err(Error::Locked { pid }) if pid == child.id() => {}
            other => failures.push(format!(
                "{dir}: a live claimer mapping the file was not held: {:?}",
                other.map(|s| s.report().clone())
            )),
        }
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_file(&path).unwrap();
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The same leftover claim, when the dead claimer's pid is now the thread
/// id of one of this process's threads (pids and tids share one number
/// space): /proc/TID exists (a hidden entry) and /proc/TID/maps is this
/// process's maps, which map the memfd being opened, so the leftover is
/// judged held by a live claimer for as long as that thread runs.
#[test]
fn a_leftover_claim_naming_one_of_our_thread_ids_is_free() {
    let fd = memfd("review-tid");
    drop(open_fd(&fd).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() } as u32).unwrap();
        let _ = stop_rx.recv();
    });
    let tid = rx.recv().unwrap();
    assert_ne!(tid, std::process::id());
    let word = u64::from(tid) | LOCK_CLAIMING | (3 << LOCK_COUNT_SHIFT);
    fd.try_clone()
        .unwrap()
        .into_file()
        .write_all_at(&word.to_le_bytes(), LOCK_PID)
        .unwrap();
    let r = open_fd(&fd);
    stop_tx.send(()).unwrap();
    t.join().unwrap();
    assert!(
        r.is_ok(),
        "no process {tid} exists (it is a thread of ours), yet: {}",
        r.unwrap_err()
    );
}

/// Design gap (the format doc accepts it): one flipped bit in a live
/// holder's lock identity words (here the low bit of its inode word)
/// makes the lock "free", and a second opener of the same live memfd is
/// admitted while the first handle still writes.
#[test]
fn one_flipped_bit_in_a_live_lock_admits_a_second_writer() {
    use crate::format::LOCK_INO;
    let fd = memfd("review-flip");
    let first = open_fd(&fd).unwrap();
    assert!(matches!(open_fd(&fd), Err(Error::Locked { .. })));
    let f = fd.try_clone().unwrap().into_file();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, LOCK_INO).unwrap();
    b[0] ^= 1;
    f.write_all_at(&b, LOCK_INO).unwrap();
    let second = open_fd(&fd);
    assert!(
        second.is_err(),
        "a second writer of the live memfd was admitted: {:?}",
        second.map(|s| s.report().clone())
    );
    drop(first);
}

/// A write whose journal record did not fit (a clean `JournalFull`, which
/// leaves the transaction free to go on) must not mark its lines as
/// journaled: a later write to them in the same transaction is journaled
/// then, and a rollback restores it.
#[test]
fn lines_whose_record_did_not_fit_are_journaled_by_the_next_write() {
    let layout = || {
        Layout::<Root>::new(1)
            .journal_len(4096)
            .initial_len(1 << 16)
    };
    let mut s = State::<Root>::open(Source::heap(Vec::new()), layout()).unwrap();
    let v = s
        .transaction(|tx| {
            let v = tx.new_vec::<u32>()?;
            tx.vec(v)?.extend_from_slice(&[7u32; 4000])?;
            tx.root_mut()?.vec = v;
            Ok::<_, Error>(v)
        })
        .unwrap();
    let data = s.vec(v).unwrap().as_ptr() as usize;
    let base = s.core.mem.bytes("region", 0, 8).unwrap().as_ptr() as usize;
    let off = (data - base) as u64;
    let r = s.transaction(|tx| {
        // 16 000 bytes of lines: more than the 4 KiB journal holds.
        let e = tx.core.write("test", off, &[1u8; 16_000]).unwrap_err();
        assert!(matches!(e, Error::JournalFull { .. }), "{e}");
        // The same line again, small: journaled now.
        tx.core.write("test", off, &[2u8; 8])?;
        Err::<(), _>(Error::unsupported("roll it back"))
    });
    assert!(r.is_err());
    assert!(
        s.vec(v).unwrap().iter().all(|&x| x == 7),
        "the rollback left bytes of the aborted transaction"
    );
}
