//! The snapshot protocol's header page is memory the snapshotter writes:
//! shm-state never maps it with the region, reads it before anything is
//! mapped or grown, and hands a heap state's page back on close.

use std::os::unix::fs::FileExt;

use super::*;

fn protocol() -> Layout<Root> {
    layout().with_snapshot_protocol()
}

fn memfd_with(bytes: &[u8]) -> shm_fd::SharedFd {
    let fd = shm_fd::SharedFd::create("protocol-page", shm_fd::CreateOptions::default()).unwrap();
    fd.try_clone()
        .unwrap()
        .into_file()
        .write_all_at(bytes, 0)
        .unwrap();
    fd
}

fn open_protocol(fd: &shm_fd::SharedFd) -> Result<State<Root>> {
    // SAFETY: a private memfd of this test, sealed against shrinking.
    State::open(
        unsafe { Source::shared(fd.try_clone().unwrap()) },
        protocol(),
    )
}

#[test]
fn a_foreign_page_sized_memfd_is_refused_without_being_grown() {
    let fd = memfd_with(&[b'x'; 4096]);
    let e = open_protocol(&fd).unwrap_err();
    assert!(matches!(e, Error::Snapshot(_)), "{e}");
    assert_eq!(fd.len().unwrap(), 4096, "a refused open grew the memfd");
    // Shorter than the page: not a state, untouched.
    let fd = memfd_with(b"short");
    let e = open_protocol(&fd).unwrap_err();
    assert!(matches!(e, Error::NotAState { .. }), "{e}");
    assert_eq!(fd.len().unwrap(), 5);
}

#[test]
fn a_memfd_holding_only_the_protocol_page_gets_a_state() {
    // A protocol page set up by a program that never stored a region.
    let buf = shm_snapshot::HeapBuffer::new(shm_snapshot::HEADER_LEN);
    shm_snapshot::Publisher::open(buf.region()).unwrap();
    let mut page = vec![0u8; shm_snapshot::HEADER_LEN];
    buf.region().copy_to(&mut page);
    let fd = memfd_with(&page);
    let s = open_protocol(&fd).unwrap();
    assert_eq!(s.report().opened, Opened::Created);
    assert!(fd.len().unwrap() > 4096);
}

#[test]
fn a_heap_state_gives_its_protocol_page_back_on_close() {
    let s = State::<Root>::open(Source::heap(Vec::new()), protocol()).unwrap();
    let region = s.image();
    let bytes = s.close().unwrap().into_heap().unwrap();
    assert_eq!(&bytes[..8], b"shm-snap");
    assert_eq!(bytes.len(), shm_snapshot::DATA_OFFSET + region.len());
    assert_eq!(&bytes[shm_snapshot::DATA_OFFSET..][..8], crate::MAGIC);
    let s = State::<Root>::open(Source::heap(bytes), protocol()).unwrap();
    assert_eq!(s.report().opened, Opened::Reopened);
}
