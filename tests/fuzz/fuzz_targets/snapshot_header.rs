//! shm-snapshot's protocol header in the first page of a region of
//! arbitrary bytes: the snapshotter's readers (`probe`, `has_protocol`,
//! `committed_generation`, `try_copy_consistent`, `Snapshotter::capture`)
//! and the program's side (`Publisher::check`, `Publisher::open`, an
//! update and its commit). Nothing panics; the readers agree and write
//! nothing; a refused open writes nothing; a kept copy is the region with
//! the documented header fix-up; a commit is seen by the next probe.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shm_fd_fuzz::header_region;
use shm_snapshot::{
    CaptureOutcome, CopyOutcome, Error, HEADER_LEN, OFF_SEQ, OFF_WAITERS, Protocol, Publisher,
    Region, Snapshotter, committed_generation, has_protocol, probe, try_copy_consistent,
};

/// Region memory of exactly the input's length (so the bytes after the
/// last whole word are reached too), 8-aligned.
struct Buffer {
    words: Vec<u64>,
    len: usize,
}

impl Buffer {
    fn new(bytes: &[u8]) -> Buffer {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Buffer {
            words,
            len: bytes.len(),
        }
    }

    /// The buffer as a region, for as long as it is borrowed.
    fn region(&mut self) -> Region<'_> {
        // SAFETY: `words` is 8-aligned and holds at least `len` bytes; the
        // mutable borrow keeps every other access to it away while the
        // region lives, so it is accessed only through the region.
        unsafe { Region::from_raw_parts(self.words.as_mut_ptr().cast(), self.len) }
    }
}

fn contents(region: Region<'_>) -> Vec<u8> {
    let mut out = vec![0u8; region.len()];
    region.copy_to(&mut out);
    out
}

/// A kept copy: the region with the committed sequence value `seq` and a
/// zero waiter word.
fn fixed(bytes: &[u8], seq: u64) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    out[OFF_WAITERS..OFF_WAITERS + 8].copy_from_slice(&0u64.to_le_bytes());
    out
}

fn seq_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[OFF_SEQ..OFF_SEQ + 8].try_into().expect("8 bytes"))
}

fn one_line(message: &str) {
    assert!(
        !message.contains('\n'),
        "a message of several lines: {message}"
    );
}

fn check(bytes: &[u8]) {
    let mut buffer = Buffer::new(bytes);
    let region = buffer.region();
    let len = bytes.len();

    // The snapshotter's readers and the program's dry run agree.
    let probed = probe(region);
    let checked = Publisher::check(region);
    let present = match (&probed, &checked) {
        (
            Ok(Protocol::Present {
                generation,
                updating,
            }),
            Ok(o),
        ) => {
            assert!(!o.created && o.generation == *generation && o.interrupted == *updating);
            Some((*generation, *updating))
        }
        (Ok(Protocol::Absent), Ok(o)) => {
            assert!(o.created && o.generation == 0 && !o.interrupted, "{o:?}");
            None
        }
        (Ok(Protocol::Absent), Err(Error::ForeignData | Error::TooSmall { .. })) => None,
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string());
            None
        }
        _ => panic!("probe and Publisher::check disagree: {probed:?} / {checked:?}"),
    };
    if let Err(e) = &checked {
        one_line(&e.to_string());
    }
    assert_eq!(has_protocol(region), present.is_some());
    assert_eq!(committed_generation(region), present.map(|(g, _)| g));
    assert_eq!(contents(region), bytes, "a reader wrote to the region");

    // One optimistic copy.
    let mut dst = vec![0u8; len];
    let outcome = try_copy_consistent(region, &mut dst);
    match (&outcome, present) {
        (Ok(CopyOutcome::Consistent { generation }), Some((g, false))) => {
            assert_eq!(*generation, g);
            assert_eq!(dst, fixed(bytes, seq_of(bytes)));
        }
        (Ok(CopyOutcome::Updating { generation }), Some((g, true))) => assert_eq!(*generation, g),
        (Ok(CopyOutcome::NoProtocol), None) => assert!(probed.is_ok()),
        (Err(e), None) => assert_eq!(
            Some(e.to_string()),
            probed.as_ref().err().map(|p| p.to_string())
        ),
        _ => panic!("try_copy_consistent: {outcome:?}, probe said {present:?}"),
    }
    let mut short = vec![0u8; len.saturating_sub(1)];
    if len > 0 {
        assert!(matches!(
            try_copy_consistent(region, &mut short),
            Err(Error::LengthMismatch { .. })
        ));
    }

    // A whole capture, with a "stop" that only runs the copy.
    let mut snapshotter = Snapshotter::new().max_tries(2).wait(Duration::ZERO);
    let mut copy = vec![0u8; len];
    let captured = snapshotter
        .capture(region, &mut copy, |copy_now| copy_now())
        .unwrap_or_else(|e| panic!("capture failed: {e}"));
    match (&captured, present) {
        (
            CaptureOutcome::Consistent {
                generation,
                tries: 1,
            },
            Some((g, false)),
        ) => {
            assert_eq!(*generation, g);
            assert_eq!(copy, fixed(bytes, seq_of(bytes)));
            let again = snapshotter.capture(region, &mut copy, |copy_now| copy_now());
            assert!(
                matches!(again, Ok(CaptureOutcome::Unchanged { generation }) if generation == g),
                "{again:?}"
            );
        }
        (
            CaptureOutcome::Stopped {
                generation,
                in_update: true,
                tries: 2,
            },
            Some((g, true)),
        ) => {
            assert_eq!(*generation, g);
            assert_eq!(copy, fixed(bytes, seq_of(bytes)));
        }
        (
            CaptureOutcome::Plain {
                reason,
                first: true,
            },
            None,
        ) => {
            one_line(reason);
            assert_eq!(copy, bytes);
        }
        _ => panic!("capture: {captured:?}, probe said {present:?}"),
    }
    // Only the waiter word may change: a capture that waited for an
    // update to commit raised it and cleared it again.
    let mut expected = bytes.to_vec();
    if let Some((_, true)) = present {
        expected[OFF_WAITERS..OFF_WAITERS + 8].fill(0);
    }
    assert_eq!(contents(region), expected, "a snapshot wrote to the region");

    // The program's side.
    match (Publisher::open(region), checked) {
        (Ok((mut publisher, opened)), Ok(expected)) => {
            assert_eq!(opened, expected);
            assert_eq!(publisher.generation(), opened.generation);
            assert_eq!(publisher.is_updating(), opened.interrupted);
            assert_eq!(publisher.data().len(), len - HEADER_LEN);
            assert_eq!(region.load_u64(OFF_WAITERS), 0);
            let mut generation = publisher.commit();
            assert_eq!(
                generation,
                opened.generation + u64::from(opened.interrupted)
            );
            let update = publisher.begin();
            let data = update.data();
            let stamp = generation.to_le_bytes();
            let n = data.len().min(stamp.len());
            data.write(0, &stamp[..n]);
            generation = update.commit();
            assert_eq!(
                generation,
                opened.generation + u64::from(opened.interrupted) + 1
            );
            // Sequence values near 2^63 are damage by definition; below,
            // the next reader sees the commit.
            if generation < 1 << 60 {
                let seen = probe(region);
                assert!(
                    matches!(seen, Ok(Protocol::Present { generation: g, updating: false }) if g == generation),
                    "{seen:?} after commit {generation}"
                );
            }
        }
        (Err(e), Err(expected)) => {
            assert_eq!(e.to_string(), expected.to_string());
            assert_eq!(
                contents(region),
                bytes,
                "a refused open wrote to the region"
            );
        }
        (got, expected) => panic!("Publisher::open {got:?}, check said {expected:?}"),
    }
}

fuzz_target!(|data: &[u8]| check(&header_region(data)));
