//! Layouts: a changed root layout is refused, migrated, or (newer)
//! refused even with a migration; a crash in a migration.

use super::*;

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
