//! The protocol over heap memory: header set-up and validation, commits,
//! the optimistic copy, the snapshotter's decisions, and a writer thread
//! that never stops while snapshots are taken.
#![cfg(not(loom))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shm_snapshot::{
    CaptureOutcome, CopyOutcome, DATA_OFFSET, Error, HEADER_LEN, HeapBuffer, OFF_SEQ, OFF_WAITERS,
    Protocol, Publisher, Region, Snapshotter, committed_generation, has_protocol, probe,
    try_copy_consistent,
};

fn bytes(r: Region<'_>) -> Vec<u8> {
    let mut v = vec![0; r.len()];
    r.copy_to(&mut v);
    v
}

type CopyFn<'a> = &'a mut dyn FnMut() -> std::io::Result<()>;

fn no_stop(_: CopyFn<'_>) -> std::io::Result<()> {
    panic!("the fallback must not be used here")
}

/// A fallback with nothing to stop (single-threaded tests).
fn plain_copy(copy: CopyFn<'_>) -> std::io::Result<()> {
    copy()
}

#[test]
fn open_writes_the_documented_header_once() {
    let buf = HeapBuffer::new(HEADER_LEN + 64);
    assert_eq!(probe(buf.region()).unwrap(), Protocol::Absent);
    let (mut p, opened) = Publisher::open(buf.region()).unwrap();
    assert!(opened.created && !opened.interrupted && opened.generation == 0);
    let b = bytes(buf.region());
    assert_eq!(&b[0..8], b"shm-snap");
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 4096);
    assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 0);
    assert_eq!(
        u32::from_le_bytes(b[20..24].try_into().unwrap()),
        crc32fast_hash(&b[..20])
    );
    assert!(b[24..HEADER_LEN].iter().all(|&x| x == 0));
    assert_eq!(p.data().len(), 64);

    let u = p.begin();
    u.data().store_u64(0, 42);
    assert_eq!(u.commit(), 1);
    assert_eq!(
        u64::from_le_bytes(
            bytes(buf.region())[OFF_SEQ..OFF_SEQ + 8]
                .try_into()
                .unwrap()
        ),
        2
    );
    let (p, opened) = Publisher::open(buf.region()).unwrap();
    assert!(!opened.created && !opened.interrupted);
    assert_eq!(opened.generation, 1);
    assert_eq!(p.data().load_u64(0), 42);
    assert_eq!(committed_generation(buf.region()), Some(1));
    assert!(has_protocol(buf.region()));
}

// Independent CRC-32 (IEEE, reflected), so the test does not trust the
// crate's choice of checksum function.
fn crc32fast_hash(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn foreign_data_is_refused_and_left_alone() {
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    buf.region().store_u64(16, 7);
    let before = bytes(buf.region());
    assert!(matches!(
        Publisher::open(buf.region()),
        Err(Error::ForeignData)
    ));
    assert_eq!(bytes(buf.region()), before);
    assert_eq!(probe(buf.region()).unwrap(), Protocol::Absent);
    let mut dst = vec![0; buf.region().len()];
    assert_eq!(
        try_copy_consistent(buf.region(), &mut dst).unwrap(),
        CopyOutcome::NoProtocol
    );
}

#[test]
fn damaged_headers_are_errors_not_protocol() {
    let buf = HeapBuffer::new(HEADER_LEN);
    Publisher::open(buf.region()).unwrap();
    // Flip a bit in the data-offset field: the checksum catches it.
    let w = buf.region().load_u64(8);
    buf.region().store_u64(8, w ^ (1 << 40));
    let e = Publisher::open(buf.region()).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(probe(buf.region()).is_err());
    assert!(!has_protocol(buf.region()));

    // A version 2 header with a valid checksum: unsupported, named.
    let buf = HeapBuffer::new(HEADER_LEN);
    Publisher::open(buf.region()).unwrap();
    let mut head = [0u8; 24];
    buf.region().read(0, &mut head);
    head[8] = 2;
    let crc = crc32fast_hash(&head[..20]);
    head[20..24].copy_from_slice(&crc.to_le_bytes());
    buf.region().write(0, &head);
    let e = Publisher::open(buf.region()).unwrap_err();
    assert!(matches!(e, Error::UnsupportedVersion { version: 2 }), "{e}");
    assert!(e.to_string().contains("version 2"), "{e}");

    let small = HeapBuffer::new(HEADER_LEN - 8);
    let e = Publisher::open(small.region()).unwrap_err();
    assert!(matches!(e, Error::TooSmall { .. }), "{e}");
    assert_eq!(probe(small.region()).unwrap(), Protocol::Absent);
}

#[test]
fn copy_is_kept_only_outside_updates() {
    let buf = HeapBuffer::new(HEADER_LEN + 32);
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    let mut dst = vec![0; buf.region().len()];
    // Generation 0 (nothing committed yet) is a consistent state.
    assert_eq!(
        try_copy_consistent(buf.region(), &mut dst).unwrap(),
        CopyOutcome::Consistent { generation: 0 }
    );
    let u = p.begin();
    u.data().store_u64(8, 5);
    assert_eq!(
        try_copy_consistent(buf.region(), &mut dst).unwrap(),
        CopyOutcome::Updating { generation: 0 }
    );
    u.commit();
    assert_eq!(
        try_copy_consistent(buf.region(), &mut dst).unwrap(),
        CopyOutcome::Consistent { generation: 1 }
    );
    assert_eq!(dst, bytes(buf.region()));
    let mut short = vec![0; 10];
    assert!(matches!(
        try_copy_consistent(buf.region(), &mut short),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn interrupted_update_is_reported_and_finished_by_commit() {
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    {
        let (mut p, _) = Publisher::open(buf.region()).unwrap();
        p.begin().commit();
        let u = p.begin();
        u.data().store_u64(0, 9);
        // The "crash": the update and its publisher end without a commit.
    }
    let (mut p, opened) = Publisher::open(buf.region()).unwrap();
    assert!(opened.interrupted);
    assert_eq!(opened.generation, 1);
    assert!(p.is_updating());
    assert_eq!(
        probe(buf.region()).unwrap(),
        Protocol::Present {
            generation: 1,
            updating: true
        }
    );
    // begin() inside the interrupted update does not move the sequence.
    p.begin();
    assert_eq!(p.commit(), 2);
    assert_eq!(p.commit(), 2, "commit outside an update is a no-op");
}

#[test]
fn snapshotter_skips_when_nothing_was_committed() {
    let buf = HeapBuffer::new(HEADER_LEN + 16);
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    let mut s = Snapshotter::new();
    let mut dst = vec![0; buf.region().len()];
    assert_eq!(
        s.capture(buf.region(), &mut dst, no_stop).unwrap(),
        CaptureOutcome::Consistent {
            generation: 0,
            tries: 1
        }
    );
    dst.fill(0xAA);
    assert_eq!(
        s.capture(buf.region(), &mut dst, no_stop).unwrap(),
        CaptureOutcome::Unchanged { generation: 0 }
    );
    assert!(
        dst.iter().all(|&b| b == 0xAA),
        "unchanged: destination untouched"
    );
    let u = p.begin();
    u.data().store_u64(0, 1);
    u.commit();
    assert!(matches!(
        s.capture(buf.region(), &mut dst, no_stop).unwrap(),
        CaptureOutcome::Consistent { generation: 1, .. }
    ));
    assert_eq!(s.last_generation(), Some(1));
    s.forget();
    assert!(matches!(
        s.capture(buf.region(), &mut dst, no_stop).unwrap(),
        CaptureOutcome::Consistent { generation: 1, .. }
    ));
}

#[test]
fn snapshotter_falls_back_to_the_stop_copy() {
    let buf = HeapBuffer::new(HEADER_LEN + 16);
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    let mut dst = vec![0; buf.region().len()];
    // Stuck inside an update: every try fails, the fallback runs once.
    p.enter_update();
    p.data().store_u64(0, 3);
    let mut s = Snapshotter::new()
        .max_tries(2)
        .wait(Duration::from_millis(1));
    let mut stops = 0;
    let c = s
        .capture(buf.region(), &mut dst, |copy| {
            stops += 1;
            copy()
        })
        .unwrap();
    assert_eq!(
        c,
        CaptureOutcome::Stopped {
            generation: 0,
            in_update: true,
            tries: 2
        }
    );
    assert_eq!(stops, 1);
    assert_eq!(
        u64::from_le_bytes(dst[DATA_OFFSET..DATA_OFFSET + 8].try_into().unwrap()),
        3
    );
    p.commit();
    // max_tries 0: always the stop copy, and it reports the commit.
    let mut s = Snapshotter::new().max_tries(0);
    assert_eq!(
        s.capture(buf.region(), &mut dst, plain_copy).unwrap(),
        CaptureOutcome::Stopped {
            generation: 1,
            in_update: false,
            tries: 0
        }
    );
    // A failing fallback is an error naming it.
    let e = Snapshotter::new()
        .max_tries(0)
        .capture(buf.region(), &mut dst, |_| {
            Err(std::io::Error::other("no such process"))
        })
        .unwrap_err();
    assert!(e.to_string().contains("stopping the program"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
    // A fallback that forgets to run the copy is an error, not a stale copy.
    let e = Snapshotter::new()
        .max_tries(0)
        .capture(buf.region(), &mut dst, |_| Ok(()))
        .unwrap_err();
    assert!(e.to_string().contains("without running the copy"), "{e}");
}

#[test]
fn without_header_it_is_plain_mode_said_once() {
    let buf = HeapBuffer::new(HEADER_LEN + 16);
    let mut s = Snapshotter::new();
    let mut dst = vec![0; buf.region().len()];
    let first = s.capture(buf.region(), &mut dst, plain_copy).unwrap();
    assert!(
        matches!(first, CaptureOutcome::Plain { first: true, .. }),
        "{first:?}"
    );
    let again = s.capture(buf.region(), &mut dst, plain_copy).unwrap();
    assert!(
        matches!(again, CaptureOutcome::Plain { first: false, .. }),
        "{again:?}"
    );
    // The program sets the protocol up later: from then on it is used.
    Publisher::open(buf.region()).unwrap();
    assert!(matches!(
        s.capture(buf.region(), &mut dst, no_stop).unwrap(),
        CaptureOutcome::Consistent { .. }
    ));
}

#[test]
fn kept_copy_has_committed_sequence_and_no_waiter() {
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    p.begin().commit();
    buf.region().store_u64(OFF_WAITERS, 1); // a snapshotter "asleep"
    let mut dst = vec![0; buf.region().len()];
    try_copy_consistent(buf.region(), &mut dst).unwrap();
    assert_eq!(&dst[OFF_WAITERS..OFF_WAITERS + 8], &[0; 8]);
    assert_eq!(&dst[OFF_SEQ..OFF_SEQ + 8], &2u64.to_le_bytes());
}

#[test]
fn region_bounds_and_bytes() {
    let buf = HeapBuffer::new(32);
    let r = buf.region();
    r.write(3, b"hello world");
    let mut out = [0u8; 11];
    r.read(3, &mut out);
    assert_eq!(&out, b"hello world");
    assert!(r.subregion(4, 8).is_none(), "misaligned");
    assert!(r.subregion(8, 30).is_none(), "too long");
    assert!(r.subregion(usize::MAX - 7, 16).is_none(), "overflow");
    assert_eq!(r.subregion(8, 24).unwrap().len(), 24);
    let caught = std::panic::catch_unwind(|| buf.region().load_u64(32));
    assert!(
        caught.is_err(),
        "out of range offsets panic like slice indexing"
    );
}

/// Accounts whose total never changes, updated in place by transfers; the
/// last word counts transfers. A torn copy breaks the total.
const ACCOUNTS: usize = 4096;
const TOTAL: u64 = ACCOUNTS as u64 * 1000;

fn verify(snapshot: &[u8]) -> Result<u64, String> {
    let word = |i: usize| {
        let at = DATA_OFFSET + i * 8;
        u64::from_le_bytes(snapshot[at..at + 8].try_into().unwrap())
    };
    let sum: u64 = (0..ACCOUNTS).map(word).sum();
    if sum != TOTAL {
        return Err(format!("total is {sum}, not {TOTAL}"));
    }
    Ok(word(ACCOUNTS))
}

fn writer(buf: Arc<HeapBuffer>, stop: Arc<AtomicBool>, pause: Arc<AtomicU64>) -> u64 {
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    {
        let u = p.begin();
        for i in 0..ACCOUNTS {
            u.data().store_u64(i * 8, 1000);
        }
        u.commit();
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        // The heap stand-in for SIGSTOP: park between updates on request.
        if pause.load(Ordering::Acquire) == 1 {
            pause.store(2, Ordering::Release);
            while pause.load(Ordering::Acquire) != 0 {
                std::thread::yield_now();
            }
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (a, b) = ((x as usize) % ACCOUNTS, ((x >> 32) as usize) % ACCOUNTS);
        let u = p.begin();
        let d = u.data();
        let amount = d.load_u64(a * 8).min(x % 50);
        d.store_u64(a * 8, d.load_u64(a * 8) - amount);
        d.store_u64(b * 8, d.load_u64(b * 8) + amount);
        n += 1;
        d.store_u64(ACCOUNTS * 8, n);
        u.commit();
        // Bursts of commits with short breaks, so that optimistic copies
        // both fail (inside bursts) and succeed (in the breaks).
        if n % 512 == 0 {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    n
}

#[test]
fn every_kept_snapshot_of_a_busy_writer_verifies() {
    let buf = Arc::new(HeapBuffer::new(DATA_OFFSET + (ACCOUNTS + 1) * 8));
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicU64::new(0));
    let w = {
        let (buf, stop, pause) = (buf.clone(), stop.clone(), pause.clone());
        std::thread::spawn(move || writer(buf, stop, pause))
    };
    while !has_protocol(buf.region()) || committed_generation(buf.region()) == Some(0) {
        std::thread::yield_now();
    }
    let mut dst = vec![0; buf.region().len()];
    let mut s = Snapshotter::new().max_tries(3);
    let (mut consistent, mut stopped, mut torn, mut broken, mut last_count) = (0, 0, 0, 0, 0);
    let rounds = if cfg!(miri) { 10 } else { 300 };
    for _ in 0..rounds {
        // Raw optimistic copies: count the ones the protocol rejects.
        if let CopyOutcome::Changed { .. } = try_copy_consistent(buf.region(), &mut dst).unwrap() {
            torn += 1;
            if verify(&dst).is_err() {
                broken += 1;
            }
        }
        let c = s
            .capture(buf.region(), &mut dst, |copy| {
                pause.store(1, Ordering::Release);
                while pause.load(Ordering::Acquire) != 2 {
                    std::thread::yield_now();
                }
                let r = copy();
                pause.store(0, Ordering::Release);
                r
            })
            .unwrap();
        match c {
            CaptureOutcome::Consistent { .. } => consistent += 1,
            CaptureOutcome::Stopped { in_update, .. } => {
                assert!(!in_update, "the heap stand-in stops between updates");
                stopped += 1;
            }
            CaptureOutcome::Unchanged { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
        let count = verify(&dst).unwrap_or_else(|e| panic!("kept snapshot is torn: {e}"));
        assert!(count >= last_count, "snapshots go forward");
        last_count = count;
    }
    stop.store(true, Ordering::Relaxed);
    let n = w.join().unwrap();
    eprintln!(
        "{rounds} rounds: {consistent} consistent, {stopped} stopped, {torn} raw copies rejected \
         ({broken} of them visibly torn), {n} transfers"
    );
    assert!(consistent + stopped > 0);
    assert!(last_count > 0, "the writer made progress");
}

/// One wait for generation 1 while another thread commits after
/// `delay`: the generation seen and how long the wait took.
fn wait_while_committing(delay: Duration, timeout: Duration) -> (Option<u64>, Duration) {
    let buf = Arc::new(HeapBuffer::new(HEADER_LEN + 8));
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    p.enter_update();
    let b2 = buf.clone();
    let t = std::thread::spawn(move || {
        let s = Snapshotter::new();
        let start = Instant::now();
        let g = s.wait_for_generation(b2.region(), 0, timeout);
        (g, start.elapsed())
    });
    std::thread::sleep(delay);
    p.commit();
    t.join().unwrap()
}

#[test]
fn waiting_snapshotter_is_woken_by_the_commit() {
    // Without the futex wake the waiter would sleep out its whole
    // IDLE_SLICE (250 ms) before seeing the commit made after 20 ms. A
    // loaded machine can delay one attempt; a missing wake fails all.
    let limit = Snapshotter::IDLE_SLICE * 4 / 5;
    let mut waits = Vec::new();
    for _ in 0..3 {
        let (g, waited) = wait_while_committing(Duration::from_millis(20), Duration::from_secs(20));
        assert_eq!(g, Some(1));
        waits.push(waited);
        if waited < limit {
            break;
        }
    }
    // Under Miri only the wait and wake paths themselves are checked (for
    // undefined behaviour), not that the wake arrived: the commit checks
    // `waiters` with a relaxed load and no fence, which the protocol
    // allows to miss a waiter (docs/snapshot-protocol.md, "Sleeping
    // without polling"; the wait then ends at its slice). On hardware the
    // window is a store buffer's drain, and a waiter that has slept for
    // 20 ms is always seen; Miri's weak-memory emulation may show the
    // commit a stale `waiters` for as long as it likes, and does.
    #[cfg(not(miri))]
    assert!(
        waits.iter().any(|&w| w < limit),
        "woken by the commit, not by the end of a {:?} slice: {waits:?}",
        Snapshotter::IDLE_SLICE
    );
    // Nothing committed: it sleeps until the timeout, then reports the
    // unchanged generation.
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    p.begin().commit();
    let start = Instant::now();
    let g = Snapshotter::new().wait_for_generation(buf.region(), 1, Duration::from_millis(30));
    assert_eq!(g, Some(1));
    assert!(start.elapsed() >= Duration::from_millis(30));
}

#[test]
fn wait_for_generation_with_duration_max_waits_without_deadline() {
    // `Instant::now() + Duration::MAX` overflows (a panic); it must mean
    // "no deadline" instead.
    let (g, _) = wait_while_committing(Duration::from_millis(20), Duration::MAX);
    assert_eq!(g, Some(1));
}

#[test]
#[cfg_attr(miri, ignore = "memfd_create and mmap are not available under Miri")]
fn read_only_mappings_are_refused_not_crashed_into() {
    let fd = shm_fd::SharedFd::create("ro", shm_fd::CreateOptions::default()).unwrap();
    fd.grow_to(8192).unwrap();
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        fd.as_raw_fd()
    }))
    .unwrap();
    let map = memmap2::MmapOptions::new().map_raw_read_only(&ro).unwrap();
    let e = Region::try_from_mmap(&map).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    assert!(std::panic::catch_unwind(|| Region::from_mmap(&map)).is_err());
    // A writable mapping is fine.
    let rw = fd.map_raw(0).unwrap();
    Region::try_from_mmap(&rw).unwrap().store_u64(0, 1);
}

/// A header page as `Header::init` leaves it after writing some of the
/// words before the magic (a kill -9 or a stopped copy mid set-up).
fn setup_cut_short(words: &[usize]) -> HeapBuffer {
    let good = HeapBuffer::new(HEADER_LEN + 8);
    Publisher::open(good.region()).unwrap();
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    for &off in words {
        buf.region().store_u64(off, good.region().load_u64(off));
    }
    buf
}

#[test]
fn a_header_setup_cut_short_is_blank_not_foreign() {
    for words in [&[8][..], &[16], &[8, 16]] {
        let buf = setup_cut_short(words);
        assert_eq!(probe(buf.region()).unwrap(), Protocol::Absent);
        assert!(Publisher::check(buf.region()).unwrap().created, "{words:?}");
        let (_, opened) = Publisher::open(buf.region())
            .unwrap_or_else(|e| panic!("set-up cut after words {words:?}: {e}"));
        assert!(opened.created && opened.generation == 0 && !opened.interrupted);
        assert!(has_protocol(buf.region()));
        // The finished header is the one a blank page gets.
        let fresh = HeapBuffer::new(HEADER_LEN + 8);
        Publisher::open(fresh.region()).unwrap();
        assert_eq!(bytes(buf.region()), bytes(fresh.region()));
    }
    // Anything else stays foreign: other values in those words, or any
    // other byte of the page set.
    let buf = setup_cut_short(&[8, 16]);
    buf.region().store_u64(8, 1);
    assert!(matches!(
        Publisher::open(buf.region()),
        Err(Error::ForeignData)
    ));
    for off in [24, OFF_SEQ, OFF_WAITERS, HEADER_LEN - 8] {
        let buf = setup_cut_short(&[8, 16]);
        buf.region().store_u64(off, 1);
        let before = bytes(buf.region());
        assert!(
            matches!(Publisher::open(buf.region()), Err(Error::ForeignData)),
            "byte {off} set"
        );
        assert!(matches!(
            Publisher::check(buf.region()),
            Err(Error::ForeignData)
        ));
        assert_eq!(bytes(buf.region()), before, "refused, untouched");
    }
}

#[test]
fn check_reports_what_open_would_do_without_writing() {
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    let o = Publisher::check(buf.region()).unwrap();
    assert!(o.created);
    assert!(
        bytes(buf.region()).iter().all(|&b| b == 0),
        "nothing written"
    );
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    p.begin().commit();
    p.enter_update();
    let o = Publisher::check(buf.region()).unwrap();
    assert!(!o.created && o.interrupted && o.generation == 1);
}

/// A valid header whose sequence word is `seq`.
fn header_with_seq(seq: u64) -> HeapBuffer {
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    Publisher::open(buf.region()).unwrap();
    buf.region().store_u64(OFF_SEQ, seq);
    buf
}

#[test]
fn a_sequence_word_of_2_pow_63_or_more_is_corrupt_everywhere() {
    for seq in [u64::MAX, u64::MAX - 1, 1 << 63, (1 << 63) + 1] {
        let buf = header_with_seq(seq);
        let before = bytes(buf.region());
        let e = Publisher::open(buf.region()).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{seq:#x}: {e}");
        assert!(e.to_string().contains("sequence word"), "{e}");
        assert_eq!(bytes(buf.region()), before, "refused, untouched");
        assert!(Publisher::check(buf.region()).is_err());
        assert!(probe(buf.region()).is_err());
        assert!(!has_protocol(buf.region()));
        assert_eq!(committed_generation(buf.region()), None);
        let mut dst = vec![0; buf.region().len()];
        assert!(matches!(
            try_copy_consistent(buf.region(), &mut dst),
            Err(Error::Corrupt { .. })
        ));
        // The snapshotter still takes a snapshot: a plain one, as it is.
        let c = Snapshotter::new()
            .capture(buf.region(), &mut dst, plain_copy)
            .unwrap();
        assert!(matches!(c, CaptureOutcome::Plain { .. }), "{c:?}");
        assert_eq!(dst, before);
        let g = Snapshotter::new().wait_for_generation(buf.region(), 0, Duration::ZERO);
        assert_eq!(g, None);
    }
    // The largest valid value: an interrupted update that commits without
    // overflow, and the generation goes forward.
    let buf = header_with_seq((1 << 63) - 1);
    let (mut p, opened) = Publisher::open(buf.region()).unwrap();
    assert!(opened.interrupted);
    assert_eq!(p.commit(), 1 << 62);
}

#[test]
fn random_header_bytes_never_panic() {
    // Fuzz-style: valid headers with random damage (random words, bytes,
    // sequence values around the limits). Open, check, probe, copy,
    // capture and wait must return, never panic. Iterations:
    // SHM_SNAPSHOT_FUZZ_ROUNDS (default 3000).
    let rounds: u64 = std::env::var("SHM_SNAPSHOT_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(miri) { 10 } else { 3000 });
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let edges = [
        0,
        1,
        2,
        3,
        (1 << 63) - 2,
        (1 << 63) - 1,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
    ];
    let (mut opened_ok, mut refused) = (0, 0);
    for _ in 0..rounds {
        let buf = HeapBuffer::new(HEADER_LEN + 64);
        if next() % 8 != 0 {
            Publisher::open(buf.region()).unwrap();
        }
        for _ in 0..1 + next() % 4 {
            let r = next();
            match r % 5 {
                0 => buf.region().store_u64(OFF_SEQ, next()),
                1 => buf
                    .region()
                    .store_u64(OFF_SEQ, edges[(next() % 9) as usize]),
                2 => {
                    let off = (next() as usize % (HEADER_LEN / 8)) * 8;
                    buf.region().store_u64(off, next());
                }
                3 => {
                    let off = next() as usize % 24;
                    buf.region().write(off, &[next() as u8]);
                }
                _ => buf.region().store_u64(OFF_WAITERS, next()),
            }
        }
        let region = buf.region();
        let _ = probe(region);
        let _ = Publisher::check(region);
        let mut dst = vec![0; region.len()];
        let _ = try_copy_consistent(region, &mut dst);
        let _ = Snapshotter::new()
            .max_tries(1)
            .wait(Duration::ZERO)
            .capture(region, &mut dst, plain_copy);
        let _ = Snapshotter::new().wait_for_generation(region, 0, Duration::ZERO);
        match Publisher::open(region) {
            Ok((mut p, opened)) => {
                opened_ok += 1;
                let g = p.begin().commit();
                assert!(g > opened.generation, "the generation went forward");
                assert!(g <= 1 << 62);
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!("{rounds} damaged headers: {opened_ok} opened, {refused} refused");
    assert!(opened_ok > 0 && refused > 0);
}

#[test]
fn header_fields_with_a_valid_checksum_are_still_checked() {
    // Rewrites bytes 0..24 with a field changed and a matching CRC, so
    // that the data offset and flags checks (not the checksum) catch it.
    let with_field = |off: usize, value: u32| {
        let buf = HeapBuffer::new(HEADER_LEN);
        Publisher::open(buf.region()).unwrap();
        let mut head = [0u8; 24];
        buf.region().read(0, &mut head);
        head[off..off + 4].copy_from_slice(&value.to_le_bytes());
        let crc = crc32fast_hash(&head[..20]);
        head[20..24].copy_from_slice(&crc.to_le_bytes());
        buf.region().write(0, &head);
        buf
    };
    let buf = with_field(12, 8192);
    let e = Publisher::open(buf.region()).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("data offset is 8192"), "{e}");
    assert!(probe(buf.region()).is_err());
    let buf = with_field(16, 1);
    let e = Publisher::open(buf.region()).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("flags are 0x1"), "{e}");
    assert!(probe(buf.region()).is_err());
}

#[test]
fn open_clears_a_stale_waiter_flag() {
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    Publisher::open(buf.region()).unwrap();
    buf.region().store_u64(OFF_WAITERS, 1); // a snapshotter killed asleep
    Publisher::open(buf.region()).unwrap();
    assert_eq!(buf.region().load_u64(OFF_WAITERS), 0);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "two publishers on one region")]
fn two_publishers_on_one_region_are_caught_in_debug_builds() {
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    let (mut first, _) = Publisher::open(buf.region()).unwrap();
    let (mut second, _) = Publisher::open(buf.region()).unwrap();
    first.begin().commit();
    // The second one would store seq 1 again after seq 2: caught.
    second.enter_update();
}

#[test]
#[cfg_attr(miri, ignore = "memfd_create and mmap are not available under Miri")]
fn misaligned_mappings_are_refused_not_misused() {
    let fd = shm_fd::SharedFd::create("align", shm_fd::CreateOptions::default()).unwrap();
    fd.grow_to(3 * 4096).unwrap();
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            fd.as_raw_fd()
        }))
        .unwrap();
    for (offset, len) in [(3u64, 0usize), (3, 16), (4097, 8), (4, 64)] {
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&rw)
            .unwrap();
        assert_ne!(
            map.as_ptr() as usize % 8,
            0,
            "offset {offset} maps misaligned"
        );
        let e = Region::try_from_mmap(&map).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{offset}: {e}");
        assert!(e.to_string().contains("8-aligned"), "{e}");
    }
    // Offsets that are multiples of 8 work, also inside a page.
    for offset in [8u64, 4096 + 64] {
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(64)
            .map_raw(&rw)
            .unwrap();
        let r = Region::try_from_mmap(&map).unwrap_or_else(|e| panic!("offset {offset}: {e}"));
        r.store_u64(0, offset);
        assert_eq!(r.load_u64(0), offset);
    }
}

/// An `OwnedPublisher` keeps its memory: the same protocol as `Publisher`
/// (header set-up, odd/even sequence, interrupted updates), with no
/// lifetime to uphold, over a heap buffer and (next test) over a memfd
/// mapping that a separate snapshotter mapping sees.
#[test]
fn an_owned_publisher_follows_the_protocol_over_the_memory_it_owns() {
    use shm_snapshot::OwnedPublisher;
    let (mut p, opened) = OwnedPublisher::open(HeapBuffer::new(HEADER_LEN + 64)).unwrap();
    assert!(opened.created && opened.generation == 0);
    p.enter_update();
    assert!(p.is_updating());
    p.data().store_u64(0, 7);
    assert_eq!(p.commit(), 1);
    assert_eq!(p.commit(), 1, "commit outside an update is a no-op");
    p.enter_update();
    // Taken back mid-update, the memory says so to the next publisher.
    let buf = p.into_inner();
    assert_eq!(
        probe(buf.region()).unwrap(),
        Protocol::Present {
            generation: 1,
            updating: true
        }
    );
    let (mut p, opened) = OwnedPublisher::open(buf).unwrap();
    assert!(!opened.created && opened.interrupted && opened.generation == 1);
    assert_eq!(p.data().load_u64(0), 7);
    assert_eq!(p.commit(), 2);
}

#[test]
#[cfg_attr(miri, ignore = "memfd_create and mmap are not available under Miri")]
fn an_owned_publisher_over_its_own_mapping_of_the_header_page() {
    use shm_snapshot::{MappedRegion, OwnedPublisher};
    // A mapping of the memfd's first page only, owned by the publisher;
    // the snapshotter's own mapping of the whole memfd sees its commits.
    let fd = shm_fd::SharedFd::create("owned-publisher", Default::default()).unwrap();
    let whole = fd.map_raw((DATA_OFFSET + 4096) as u64).unwrap();
    let page = memmap2::MmapOptions::new()
        .len(HEADER_LEN)
        .map_raw(&fd)
        .unwrap();
    let (mut p, _) = OwnedPublisher::open(MappedRegion::new(page).unwrap()).unwrap();
    assert_eq!(p.data().len(), 0);
    p.enter_update();
    assert_eq!(
        probe(Region::from_mmap(&whole)).unwrap(),
        Protocol::Present {
            generation: 0,
            updating: true
        }
    );
    p.commit();
    assert_eq!(committed_generation(Region::from_mmap(&whole)), Some(1));
    assert_eq!(
        OwnedPublisher::check(p.memory()).unwrap().generation,
        1,
        "check reads the owned memory without writing"
    );
}

#[test]
fn an_owned_publisher_refuses_foreign_data_and_short_memory() {
    use shm_snapshot::OwnedPublisher;
    let buf = HeapBuffer::new(HEADER_LEN);
    buf.region().store_u64(0, 0x1234);
    assert!(matches!(
        OwnedPublisher::open(buf).unwrap_err(),
        Error::ForeignData
    ));
    assert!(matches!(
        OwnedPublisher::open(HeapBuffer::new(64)).unwrap_err(),
        Error::TooSmall { .. }
    ));
}

/// Bytes 80..88 (the futex wake word) are reached half by half, which must
/// not change what any read or write of a region sees there.
#[test]
fn the_wake_word_reads_and_writes_like_any_other_bytes() {
    use shm_snapshot::OFF_WAKE;
    let buf = HeapBuffer::new(HEADER_LEN + 64);
    let pattern: Vec<u8> = (0..HEADER_LEN as u32 + 64)
        .map(|i| (i * 7 + 3) as u8)
        .collect();
    buf.region().copy_from(&pattern);
    assert_eq!(bytes(buf.region()), pattern);
    let mut b = [0u8; 24];
    buf.region().read(OFF_WAKE - 8, &mut b);
    assert_eq!(&b[..], &pattern[OFF_WAKE - 8..OFF_WAKE + 16]);
    let word = u64::from_le_bytes(pattern[OFF_WAKE..OFF_WAKE + 8].try_into().unwrap());
    assert_eq!(buf.region().load_u64(OFF_WAKE), word);
    // Whole aligned words, over the narrow word and clear of it (the
    // write's fast path), read back.
    let words: Vec<u8> = (0..64u8).map(|i| i ^ 0x5A).collect();
    for at in [OFF_WAKE - 8, OFF_WAKE - 32, OFF_WAKE + 8, 64] {
        buf.region().write(at, &words[..40]);
        let mut back = [0u8; 40];
        buf.region().read(at, &mut back);
        assert_eq!(&back[..], &words[..40], "40 bytes at {at}");
    }
    buf.region().store_u64(OFF_WAKE, 0x1122_3344_5566_7788);
    buf.region().write(OFF_WAKE + 3, &[0xAB]);
    let part = buf.region().subregion(64, 32).unwrap();
    assert_eq!(part.load_u64(OFF_WAKE - 64), 0x1122_3344_AB66_7788);
    assert!(!part.is_zero());
    // A commit that finds a waiter bumps the low half; the high half stays.
    let buf = HeapBuffer::new(HEADER_LEN + 8);
    let (mut p, _) = Publisher::open(buf.region()).unwrap();
    buf.region().store_u64(OFF_WAITERS, 1);
    p.begin().commit();
    assert_eq!(buf.region().load_u64(OFF_WAKE), 1);
    p.begin().commit();
    assert_eq!(buf.region().load_u64(OFF_WAKE), 2);
}
