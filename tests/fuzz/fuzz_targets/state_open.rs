//! `shm_state::State::open` on a heap region of arbitrary bytes, with the
//! plain layout or with shm-snapshot's protocol page in front. An open
//! that succeeds is followed by reading everything (root, heap check, the
//! vector, both maps, the log, the cell), a committed transaction, a
//! transaction that fails on purpose, and a close and reopen. Errors are
//! fine; panics, aborts and allocations beyond the region's size are not.
//! On a region whose heap checks out (`State::verify`), a failed
//! transaction changes nothing and the closed state reopens with the
//! committed change.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shm_fd_fuzz::{ROOT_VERSION, Root, STATE_PROTOCOL, state_region};
use shm_state::{Error, Layout, Opened, Source, State, Tx};

/// `state_open` flag bits that pick the extra operations of a transaction.
const POP: u8 = 1 << 2;
const REMOVE: u8 = 1 << 3;
const CLEAR_INDEX: u8 = 1 << 4;
const CLEAR_LOG: u8 = 1 << 5;
const TRUNCATE: u8 = 1 << 6;

fn one_line(message: &str) {
    assert!(
        !message.contains('\n'),
        "a message of several lines: {message}"
    );
}

fn layout(flags: u8) -> Layout<Root> {
    // Sizes only matter when a blank region is created: keep it small.
    let layout = Layout::new(ROOT_VERSION)
        .journal_len(4096)
        .initial_len(0)
        .migrate(|tx: &mut Tx<'_, Root>, old| {
            // An older root's first word was the counter.
            let counter = old
                .bytes
                .get(..8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            tx.root_mut()?.counter = counter;
            Ok(())
        });
    if flags & STATE_PROTOCOL != 0 {
        layout.with_snapshot_protocol()
    } else {
        layout
    }
}

/// Reads every structure the root names (errors are fine: the region may
/// be damaged anywhere).
fn read_all(state: &State<Root>) {
    let Ok(root) = state.root().copied() else {
        return;
    };
    if let Ok(items) = state.vec(root.items) {
        let sum = items.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        std::hint::black_box(sum);
    }
    if let Ok(names) = state.map(root.names) {
        let _ = names.verify();
        for entry in names.iter().take(1 << 16) {
            let Ok((key, value)) = entry else { break };
            let _ = names.get(key);
            std::hint::black_box(value.len());
        }
        let _ = names.get(&root.counter);
        std::hint::black_box(names.len());
    }
    if let Ok(index) = state.map(root.index) {
        let _ = index.verify();
        for entry in index.iter().take(1 << 16) {
            let Ok((key, value)) = entry else { break };
            let _ = index.contains_key(key);
            std::hint::black_box(*value);
        }
    }
    if let Ok(log) = state.log(root.events) {
        let _ = log.verify();
        for record in log.iter().take(1 << 16) {
            let Ok(record) = record else { break };
            std::hint::black_box(record.len());
        }
        std::hint::black_box((log.len(), log.data_bytes()));
    }
    if let Ok(cell) = state.cell(root.cell) {
        std::hint::black_box(*cell);
    }
}

/// One transaction's worth of changes: every structure is created if
/// missing and changed once; `flags` adds removals.
fn change(tx: &mut Tx<'_, Root>, flags: u8, payload: &[u8]) -> Result<u64, Error> {
    let mut root = *tx.root()?;
    root.counter = root.counter.wrapping_add(1);
    if root.items.is_null() {
        root.items = tx.new_vec()?;
    }
    if root.names.is_null() {
        root.names = tx.new_map()?;
    }
    if root.index.is_null() {
        root.index = tx.new_map()?;
    }
    if root.events.is_null() {
        root.events = tx.new_log()?;
    }
    if root.cell.is_null() {
        root.cell = tx.new_cell([0u64; 2])?;
    }
    tx.set_root(root)?;
    let counter = root.counter;
    tx.vec(root.items)?.push(counter)?;
    tx.map(root.names)?.insert(&counter, payload)?;
    tx.map(root.index)?.insert(payload, &counter)?;
    tx.log(root.events)?.append(payload)?;
    tx.set_cell(root.cell, [counter, payload.len() as u64])?;
    if flags & POP != 0 {
        tx.vec(root.items)?.pop()?;
    }
    if flags & REMOVE != 0 {
        tx.map(root.names)?.remove(&counter.wrapping_sub(1))?;
    }
    if flags & CLEAR_INDEX != 0 {
        tx.map(root.index)?.clear()?;
    }
    if flags & CLEAR_LOG != 0 {
        tx.log(root.events)?.clear()?;
    }
    if flags & TRUNCATE != 0 {
        tx.vec(root.items)?.truncate(1)?;
    }
    Ok(counter)
}

/// What a transaction that fails on purpose returns.
#[derive(Debug)]
enum Failed {
    State(Error),
    OnPurpose,
}

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed::State(e)
    }
}

fn root_bytes(state: &State<Root>) -> Option<Vec<u8>> {
    state.root().ok().map(|r| bytemuck::bytes_of(r).to_vec())
}

fn exercise(mut state: State<Root>, flags: u8, payload: &[u8]) {
    one_line(&state.report().to_string());
    let _ = state.stored_layout();
    let _ = state.commits();
    let _ = state.used_bytes();
    std::hint::black_box(state.region_len());
    let healthy = match state.verify() {
        Ok(report) => {
            std::hint::black_box(report);
            true
        }
        Err(e) => {
            one_line(&e.to_string());
            false
        }
    };
    read_all(&state);

    let committed = state.transaction(|tx| change(tx, flags, payload));
    if let Err(e) = &committed {
        one_line(&e.to_string());
    }
    read_all(&state);
    let healthy = healthy && state.verify().is_ok();

    // A transaction that changes everything, then fails: none of it stays.
    let before = root_bytes(&state);
    let failed = state.transaction(|tx| {
        change(tx, !flags, payload)?;
        Err::<(), _>(Failed::OnPurpose)
    });
    match &failed {
        Err(Failed::OnPurpose) => {}
        Err(Failed::State(e)) => one_line(&e.to_string()),
        Ok(()) => panic!("a transaction that failed was committed"),
    }
    if healthy {
        assert_eq!(
            root_bytes(&state),
            before,
            "a failed transaction changed the root"
        );
        assert!(
            state.verify().is_ok(),
            "a failed transaction damaged the heap: {:?}",
            state.verify()
        );
    }

    let counter = state.root().map(|r| r.counter).ok();
    let source = match state.close() {
        Ok(source) => source,
        Err(e) => {
            one_line(&e.to_string());
            return;
        }
    };
    match State::<Root>::open(source, layout(flags)) {
        Ok(again) => {
            if healthy {
                assert_eq!(again.report().opened, Opened::Reopened);
                assert_eq!(again.root().map(|r| r.counter).ok(), counter);
                assert!(again.verify().is_ok(), "{:?}", again.verify());
            }
            read_all(&again);
        }
        Err(e) => assert!(!healthy, "a healthy state did not reopen after close: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let (flags, region) = state_region(data);
    // The data the transaction stores: the input's last bytes.
    let payload = &data[data.len().saturating_sub(24)..];
    match State::<Root>::open(Source::heap(region), layout(flags)) {
        Ok(state) => exercise(state, flags, payload),
        Err(e) => one_line(&e.to_string()),
    }
});
