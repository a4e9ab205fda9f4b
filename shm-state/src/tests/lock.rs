//! The lock names a holder that a copy cannot fake: pid, start time, boot
//! id and the identity (device, inode) of the memory it was taken in.

use std::os::unix::fs::FileExt;

use super::*;
use crate::format::{
    LOCK_BOOT, LOCK_CLAIMING, LOCK_DEV, LOCK_INO, LOCK_NONCE, LOCK_PID, LOCK_START,
};

fn file_of(fd: &shm_fd::SharedFd) -> std::fs::File {
    fd.try_clone().unwrap().into_file()
}

/// Copies the memfd `from` into a new memfd, byte for byte.
fn copy_of(from: &shm_fd::SharedFd, name: &str) -> shm_fd::SharedFd {
    let len = from.len().unwrap() as usize;
    let mut bytes = vec![0u8; len];
    file_of(from).read_exact_at(&mut bytes, 0).unwrap();
    let to = memfd(name);
    file_of(&to).write_all_at(&bytes, 0).unwrap();
    to
}

fn put(fd: &shm_fd::SharedFd, off: u64, v: u64) {
    file_of(fd).write_all_at(&v.to_le_bytes(), off).unwrap();
}

fn get(fd: &shm_fd::SharedFd, off: u64) -> u64 {
    let mut b = [0u8; 8];
    file_of(fd).read_exact_at(&mut b, off).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn a_copy_of_a_held_memfd_opens_while_a_second_opener_of_it_is_refused() {
    let fd = memfd("lock-held");
    let mut s = open_fd(&fd).unwrap();
    s.transaction(|tx| {
        tx.root_mut()?.n = 41;
        Ok::<_, Error>(())
    })
    .unwrap();
    // The same memfd, through another fd: the live holder refuses it.
    let e = open_fd(&fd).unwrap_err();
    assert!(
        matches!(e, Error::Locked { pid } if pid == std::process::id()),
        "{e}"
    );
    // Its bytes in another memfd: nobody holds that memory.
    let copy = copy_of(&fd, "lock-copy");
    let c = open_fd(&copy).unwrap();
    assert_eq!(c.root().unwrap().n, 41);
    assert_eq!(c.report().took_over_from, Some(std::process::id()));
    // And a copy of the copy while both are held.
    let copy2 = copy_of(&copy, "lock-copy2");
    assert!(open_fd(&copy2).is_ok());
    drop(c);
    drop(s);
    assert!(open_fd(&fd).is_ok());
}

/// Lock words naming another live process (a child), written into a closed
/// state's memfd: held only when they name this memory on this boot.
#[test]
fn a_live_process_holds_only_the_memory_it_locked_on_this_boot() {
    let fd = memfd("lock-forged");
    drop(open_fd(&fd).unwrap());
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = u64::from(child.id());
    let start = crate::owner::start_time(child.id()).unwrap();
    let (dev, ino) = (get(&fd, LOCK_DEV), get(&fd, LOCK_INO));
    let boot = crate::owner::boot_id();
    // The words a holder stores (the nonce word carries their check).
    let forge = |fd: &shm_fd::SharedFd, word: u64, boot0: u64, ino: u64| {
        let words = crate::owner::sealed(crate::lock::LockWords {
            word,
            start,
            nonce: 99,
            boot: [boot0, boot[1]],
            dev,
            ino,
        });
        put(fd, LOCK_PID, word);
        put(fd, LOCK_START, start);
        put(fd, LOCK_NONCE, words.nonce);
        put(fd, LOCK_BOOT, boot0);
        put(fd, LOCK_BOOT + 8, boot[1]);
        put(fd, LOCK_DEV, dev);
        put(fd, LOCK_INO, ino);
    };
    forge(&fd, pid, boot[0], ino);
    let e = open_fd(&fd).unwrap_err();
    assert!(
        matches!(e, Error::Locked { pid: p } if u64::from(p) == pid),
        "{e}"
    );
    // Another boot's lock (a snapshot restored after a reboot): free.
    forge(&fd, pid, boot[0] ^ 1, ino);
    let s = open_fd(&fd).unwrap();
    assert_eq!(s.report().took_over_from, Some(child.id()));
    drop(s);
    // The lock of other memory (the bytes were copied here): free.
    forge(&fd, pid, boot[0], ino ^ 0x10);
    assert!(open_fd(&fd).is_ok());
    // Caught claiming, by a process that does not map this memfd: free.
    forge(&fd, pid | LOCK_CLAIMING, boot[0], ino);
    assert!(open_fd(&fd).is_ok());
    // Settled and right, but the holder has died: free.
    forge(&fd, pid, boot[0], ino);
    assert!(open_fd(&fd).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
    let s = open_fd(&fd).unwrap();
    assert_eq!(s.report().took_over_from, Some(pid as u32));
}

/// Recovery writes inside an update that the commit publisher sees, before
/// the open's own transaction: a snapshot copied during recovery is never
/// taken for a committed state.
#[test]
fn recovery_is_published_as_an_update_of_its_own() {
    use std::sync::{Arc, Mutex};
    #[derive(Debug, Clone)]
    struct Events(Arc<Mutex<Vec<&'static str>>>);
    impl CommitHook for Events {
        fn begin_update(&mut self) {
            self.0.lock().unwrap().push("begin");
        }
        fn commit(&mut self) {
            self.0.lock().unwrap().push("commit");
        }
    }
    let mut s = fresh();
    let r = *s.root().unwrap();
    s.core.mem.crash = Some(CrashPlan {
        countdown: 6,
        torn_prefix: 0,
        image: None,
    });
    s.transaction(|tx| tx.vec(r.vec)?.extend_from_slice(&[5; 100]))
        .unwrap();
    let crashed = s.core.mem.crash.take().unwrap().image.unwrap();
    drop(s);
    let events = Events(Arc::default());
    let s =
        State::<Root>::open(Source::heap(crashed), layout().commit_hook(events.clone())).unwrap();
    assert!(matches!(s.report().opened, Opened::Recovered { .. }));
    assert_eq!(
        *events.0.lock().unwrap(),
        ["begin", "commit", "begin", "commit"],
        "the rollback, then the open's transaction"
    );

    // Through shm-snapshot's protocol on a memfd: the recovery is one more
    // generation than a plain reopen publishes.
    let fd = memfd("lock-protocol");
    let l = || layout().with_snapshot_protocol();
    // SAFETY: a private memfd, sealed against shrinking.
    let mut s =
        State::<Root>::open(unsafe { Source::shared(fd.try_clone().unwrap()) }, l()).unwrap();
    s.transaction(|tx| {
        let v = tx.new_vec::<u32>()?;
        tx.root_mut()?.vec = v;
        Ok::<_, Error>(())
    })
    .unwrap();
    drop(s);
    let generation = |fd: &shm_fd::SharedFd| {
        let map = fd.map_raw(1).unwrap();
        shm_snapshot::committed_generation(shm_snapshot::Region::from_mmap(&map)).unwrap()
    };
    let g0 = generation(&fd);
    // A transaction left open, as a kill -9 would: the commit word says so.
    let base = shm_snapshot::DATA_OFFSET as u64;
    let word = get(&fd, base + 0xC0);
    let (seq, _) = crate::format::read_tx_word(word).unwrap();
    put(&fd, base + 0xC0, crate::format::tx_word(seq + 1, true));
    // SAFETY: as above.
    let s = State::<Root>::open(unsafe { Source::shared(fd.try_clone().unwrap()) }, l()).unwrap();
    assert_eq!(s.report().opened, Opened::Recovered { records: 0 });
    drop(s);
    assert_eq!(
        generation(&fd),
        g0 + 2,
        "recovery and open, one update each"
    );
    // SAFETY: as above.
    drop(State::<Root>::open(unsafe { Source::shared(fd.try_clone().unwrap()) }, l()).unwrap());
    assert_eq!(generation(&fd), g0 + 3);
}
