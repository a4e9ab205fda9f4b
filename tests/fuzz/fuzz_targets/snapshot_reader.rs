//! The snapshot reader behind `shm-restore --check` and the restore:
//! `inspect` (what `--check` runs, here on a memfd through its
//! `/proc/self/fd` path), and `read_header`, `verify` (the check behind
//! `--check` and every load) and `read_snapshot` over the input's bytes;
//! then all of it again after the input's three CRC layers were made to
//! match (`repair_snapshot_crcs`), so that the checks behind them see
//! mutated values too. Each returns `Ok` or an error, never panics, and
//! allocates no more than the file's size justifies; no read goes outside
//! the bytes; the readers agree with each other (same damage, same size
//! verdict); what they accept encodes back to the same bytes.
#![no_main]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shm_fd_fuzz::repair_snapshot_crcs;
use shm_restore::format::{self, HEADER_LEN};
use shm_restore::{
    DEFAULT_MAX_DATA_LEN, Error, ReadError, inspect, read_header, read_snapshot, verify,
};

/// One memfd per fuzzing process, rewritten for every input: the file
/// `inspect` opens by path, as `shm-restore --check FILE` does.
fn scratch() -> &'static (File, PathBuf) {
    static SCRATCH: OnceLock<(File, PathBuf)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let options = shm_fd::CreateOptions {
            size: 0,
            seal_shrink: false,
        };
        let file = shm_fd::SharedFd::create("fuzz-snapshot", options)
            .expect("memfd_create")
            .into_file();
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, path)
    })
}

fn one_line(message: &str) {
    assert!(
        !message.contains('\n'),
        "a message of several lines: {message}"
    );
}

/// A reader over bytes only fails to read outside them: every read must
/// have been bounded by the header's checks first.
fn no_io<T>(what: &str, r: &Result<T, ReadError>) {
    if let Err(e) = r {
        assert!(
            !matches!(e, ReadError::Io(_)),
            "{what}: {e} (a read out of bounds or an allocation failure on a byte slice)"
        );
        one_line(&e.to_string());
    }
}

/// The damage both readers must name, as text.
fn damage(r: &Result<impl std::fmt::Debug, ReadError>) -> Option<String> {
    match r {
        Err(ReadError::Damaged(d)) => Some(d.to_string()),
        _ => None,
    }
}

fn check(bytes: &[u8]) {
    let max = DEFAULT_MAX_DATA_LEN;
    let header = read_header(bytes, u64::MAX);
    no_io("read_header", &header);
    if let Ok(h) = &header {
        assert_eq!(h.file_len(), bytes.len() as u64);
        // A header accepted as it is encodes to the same bytes.
        assert_eq!(&h.encode()[..], &bytes[..HEADER_LEN]);
    }
    let limited = read_header(bytes, max);
    no_io("read_header with a maximum", &limited);
    match (&header, &limited) {
        (Ok(h), Ok(l)) => assert!(h == l && h.data_len <= max),
        (Ok(h), Err(ReadError::TooLarge { data_len, .. })) => {
            assert!(h.data_len > max && *data_len == h.data_len)
        }
        (Err(_), Err(_)) => assert_eq!(damage(&header), damage(&limited)),
        _ => panic!("read_header: {header:?} without a maximum, {limited:?} with one"),
    }

    // The check behind --check and loads, and the reader holding the data.
    let verified = verify(bytes, u64::MAX);
    no_io("verify", &verified);
    let read = read_snapshot(bytes, u64::MAX);
    no_io("read_snapshot", &read);
    match (&verified, &read) {
        (Ok((h, chunks)), Ok(snapshot)) => {
            assert_eq!(h, snapshot.header());
            assert_eq!(chunks.as_slice(), snapshot.chunks());
            assert_eq!(Ok(h), header.as_ref().map_err(drop));
            let table = format::encode_table(chunks);
            assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + table.len()], &table[..]);
            let image = snapshot.clone().into_image();
            assert_eq!(image.data_len(), h.data_len);
            assert_eq!(image.bytes().len() as u64, h.stored_len);
            assert_eq!(shm_restore::stored_len(image.extents()), h.stored_len);
        }
        (Err(_), Err(_)) => {
            let same = damage(&verified);
            assert!(same.is_some(), "not damage: {verified:?}");
            assert_eq!(
                same,
                damage(&read),
                "verify and read_snapshot name other damage"
            );
        }
        _ => panic!("verify {verified:?} but read_snapshot {read:?}"),
    }
    let read_limited = read_snapshot(bytes, max);
    no_io("read_snapshot with a maximum", &read_limited);
    match (&read, &read_limited) {
        (Ok(s), Ok(l)) => assert!(s == l && s.header().data_len <= max),
        (Ok(s), Err(ReadError::TooLarge { .. })) => assert!(s.header().data_len > max),
        // A size over the maximum is refused before the table is read.
        (Err(_), Err(ReadError::TooLarge { .. })) => assert!(limited.is_err()),
        (Err(_), Err(_)) => assert_eq!(damage(&read), damage(&read_limited)),
        _ => panic!("read_snapshot: {read:?} without a maximum, {read_limited:?} with one"),
    }

    // `shm-restore --check FILE`.
    let (file, path) = scratch();
    file.set_len(0).expect("truncating the scratch memfd");
    file.write_all_at(bytes, 0)
        .expect("writing the scratch memfd");
    let inspection = inspect(path, max);
    assert_eq!(inspection.header.as_ref(), header.as_ref().ok());
    match (&inspection.verdict, &verified) {
        (Ok(()), Ok((h, _))) => assert!(h.data_len <= max),
        (Err(e @ Error::TooLarge { .. }), Ok((h, _))) => {
            assert!(h.data_len > max);
            assert!(
                !e.is_corrupt(),
                "a valid file too large reported as damage: {e}"
            );
        }
        (Err(e), Err(ReadError::Damaged(d))) => {
            let message = e.to_string();
            one_line(&message);
            assert!(e.is_corrupt(), "damage not reported as such: {e}");
            assert!(
                message.ends_with(&d.to_string()),
                "--check says {message:?}, verify {d}"
            );
        }
        (verdict, verified) => panic!("--check {verdict:?} but verify {verified:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= HEADER_LEN {
        let mut repaired = data.to_vec();
        repair_snapshot_crcs(&mut repaired);
        if repaired != data {
            check(&repaired);
        }
    }
});
