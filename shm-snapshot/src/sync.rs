//! The atomics the protocol is written with: std's, or loom's under
//! `cfg(loom)` so the same code runs under the loom model checker.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};
