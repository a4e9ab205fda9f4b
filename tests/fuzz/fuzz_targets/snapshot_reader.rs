//! The snapshot reader behind `shm-restore --check` and the restore:
//! `inspect` (what `--check` runs: the header, then every chunk's CRC,
//! here on a memfd through its `/proc/self/fd` path), and `read_header`
//! and `read_snapshot` over the input's bytes, and again after its checksums were made to match
//! (`repair_snapshot_crcs`), so that the checks behind them see mutated
//! values too. Each returns `Ok` or a damage report, never panics, and
//! allocates no more than the file's size justifies; the readers agree
//! with each other, and what they accept encodes back to the same bytes.
#![no_main]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shm_fd_fuzz::repair_snapshot_crcs;
use shm_restore::format::{self, HEADER_LEN};
use shm_restore::{DEFAULT_MAX_DATA_LEN, ReadError, inspect, read_header, read_snapshot};

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

/// A reader over bytes only fails on reads outside them: every read must
/// have been bounded by the header's checks first.
fn damage_only<T>(what: &str, r: &Result<T, ReadError>) {
    if let Err(ReadError::Io(e)) = r {
        panic!("{what}: an I/O error reading a byte slice (a read out of bounds): {e}");
    }
}

fn check(bytes: &[u8]) {
    let max = DEFAULT_MAX_DATA_LEN;
    let header = read_header(bytes, max);
    damage_only("read_header", &header);
    if let Ok(h) = &header {
        assert_eq!(h.file_len(), bytes.len() as u64);
        // A header accepted as it is encodes to the same bytes.
        assert_eq!(&h.encode()[..], &bytes[..HEADER_LEN]);
    }

    let read = read_snapshot(bytes, max);
    damage_only("read_snapshot", &read);
    match &read {
        Ok(snapshot) => {
            let h = snapshot.header();
            assert_eq!(Ok(h), header.as_ref().map_err(drop));
            let chunks = snapshot.chunks();
            let table = format::encode_table(chunks);
            assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + table.len()], &table[..]);
            let image = snapshot.clone().into_image();
            assert_eq!(image.data_len(), h.data_len);
            assert_eq!(image.bytes().len() as u64, h.stored_len);
            assert_eq!(shm_restore::stored_len(image.extents()), h.stored_len);
        }
        Err(e) => one_line(&format!("{e:?}")),
    }

    // `shm-restore --check FILE`.
    let (file, path) = scratch();
    file.set_len(0).expect("truncating the scratch memfd");
    file.write_all_at(bytes, 0)
        .expect("writing the scratch memfd");
    let inspection = inspect(path, max);
    assert_eq!(inspection.header.as_ref(), header.as_ref().ok());
    match (&inspection.verdict, &read) {
        (Ok(()), Ok(_)) => {}
        (Err(e), Err(ReadError::Damaged(damage))) => {
            // The threaded check of `--check` and the plain read of a
            // restore name the same damage.
            let message = e.to_string();
            one_line(&message);
            assert!(e.is_corrupt(), "not reported as damage: {e}");
            assert!(
                message.ends_with(&damage.to_string()),
                "--check says {message:?}, read_snapshot {damage}"
            );
        }
        (verdict, read) => panic!("--check {verdict:?} but read_snapshot {read:?}"),
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
