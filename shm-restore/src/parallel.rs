//! Splitting large copies and checksum passes over a few threads: one
//! thread does not reach the memory bandwidth that reading, checking and
//! writing hundreds of MiB needs (measured in `benches/save_restore.rs`).

use std::ops::Range;

/// Below this many bytes a pass runs on the calling thread: starting
/// threads would cost more than it saves. (Small in unit tests, so that
/// they run the threaded passes on small data.)
pub(crate) const PARALLEL_MIN_BYTES: u64 = if cfg!(test) { 8 << 10 } else { 16 << 20 };

/// The most threads one pass uses.
const MAX_WORKERS: usize = 4;

/// How many threads a pass over `bytes` bytes should use.
pub(crate) fn workers(bytes: u64) -> usize {
    if bytes < PARALLEL_MIN_BYTES {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

/// Splits items of the given lengths (in order) into at most `parts`
/// contiguous, non-empty runs of about equal total length.
pub(crate) fn split_even(lens: &[u64], parts: usize) -> Vec<Range<usize>> {
    let total: u64 = lens.iter().sum();
    let parts = parts.clamp(1, lens.len().max(1)) as u64;
    let mut runs = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (i, len) in lens.iter().enumerate() {
        acc += len;
        // Cut when this run reached its share of the total.
        let share = total / parts * (runs.len() as u64 + 1);
        if acc >= share && (runs.len() as u64) < parts - 1 {
            runs.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < lens.len() {
        runs.push(start..lens.len());
    }
    runs
}

/// Runs `f` on each item on its own thread (the first on the calling
/// thread) and returns the results in order.
pub(crate) fn run_each<I: Send, T: Send>(items: Vec<I>, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    if items.len() <= 1 {
        return items.into_iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut items = items.into_iter();
        let first = items.next();
        let handles: Vec<_> = items.map(|i| s.spawn(move || f(i))).collect();
        let mut out = Vec::with_capacity(handles.len() + 1);
        out.extend(first.map(f));
        for h in handles {
            match h.join() {
                Ok(v) => out.push(v),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_everything_in_order() {
        for (lens, parts) in [
            (vec![1u64; 10], 3),
            (vec![100, 1, 1, 1], 2),
            (vec![5], 4),
            (vec![], 2),
            (vec![3, 3, 3, 3], 4),
        ] {
            let runs = split_even(&lens, parts);
            assert!(runs.len() <= parts.max(1), "{lens:?} {runs:?}");
            let mut next = 0;
            for r in &runs {
                assert_eq!(r.start, next, "{lens:?} {runs:?}");
                assert!(r.end > r.start, "{lens:?} {runs:?}");
                next = r.end;
            }
            assert_eq!(next, lens.len(), "{lens:?} {runs:?}");
        }
        assert_eq!(split_even(&[3, 3, 3, 3], 2), vec![0..2, 2..4]);
    }

    #[test]
    fn runs_in_order() {
        let out = run_each(vec![0..2, 2..5, 5..6], |r: Range<usize>| r.len());
        assert_eq!(out, vec![2, 3, 1]);
    }
}
