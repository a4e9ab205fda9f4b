//! A progress line on stderr for a load or save the user waits on: only
//! when stderr is a terminal, and only once the operation has run for a
//! second; redrawn in place a few times a second and cleared at the end.
//! Logs and pipes get nothing.

use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use shm_restore::Progress;

/// How long an operation runs before its progress is shown.
const SHOW_AFTER: Duration = Duration::from_secs(1);
/// How often the line is redrawn.
const REDRAW: Duration = Duration::from_millis(250);

/// What the line says about the bytes counted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation {
    /// A load: every byte is counted twice, checked and then copied.
    Load,
    /// A save: the bytes written.
    Save,
}

/// A count for one operation when its progress should be shown: stderr
/// is a terminal and `-q` was not given. `None` otherwise, and then
/// nothing is counted.
pub(crate) fn meter(quiet: bool) -> Option<Progress> {
    (!quiet && std::io::stderr().is_terminal()).then(Progress::new)
}

/// Runs `f`, which counts into `progress`, showing `shm-restore: <what>:
/// <progress>` on stderr from a second in until it returns.
pub(crate) fn showing<T>(
    progress: Option<&Progress>,
    operation: Operation,
    what: &str,
    f: impl FnOnce() -> T,
) -> T {
    let Some(progress) = progress else {
        return f();
    };
    let (finished, wait) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || draw(progress, operation, what, &wait));
        let out = f();
        drop(finished);
        out
    })
}

/// Draws the line until `finished` is dropped, then clears it.
fn draw(progress: &Progress, operation: Operation, what: &str, finished: &mpsc::Receiver<()>) {
    let mut shown = false;
    let mut next = SHOW_AFTER;
    while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(next) {
        next = REDRAW;
        let (done, total) = progress.get();
        if total == 0 {
            continue; // not counting yet (a save still copying the memfd)
        }
        // Errors are ignored: a hung-up terminal must not stop the save.
        let _ = write!(
            std::io::stderr().lock(),
            "\rshm-restore: {what}: {}\x1b[K",
            line(operation, done, total)
        );
        shown = true;
    }
    if shown {
        let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
    }
}

/// `812 MiB of 4.0 GiB (20%)`, or for a load `checking, 1.2 GiB of
/// 4.0 GiB (15%)` and then `copying, ...`.
fn line(operation: Operation, done: u64, total: u64) -> String {
    let percent = done.saturating_mul(100) / total.max(1);
    match operation {
        Operation::Save => format!("{} of {} ({percent}%)", size(done), size(total)),
        Operation::Load => {
            let stored = total / 2;
            let (step, at) = if done < stored {
                ("checking", done)
            } else {
                ("copying", done - stored)
            };
            format!("{step}, {} of {} ({percent}%)", size(at), size(stored))
        }
    }
}

/// Bytes as `512 KiB`, `812 MiB`, `4.0 GiB`.
fn size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.0} MiB", b / (KIB * KIB))
    } else {
        format!("{:.0} KiB", b / KIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let gib = 1u64 << 30;
        assert_eq!(
            line(Operation::Save, 812 << 20, 4 * gib),
            "812 MiB of 4.0 GiB (19%)"
        );
        assert_eq!(
            line(Operation::Load, gib, 8 * gib),
            "checking, 1.0 GiB of 4.0 GiB (12%)"
        );
        assert_eq!(
            line(Operation::Load, 6 * gib, 8 * gib),
            "copying, 2.0 GiB of 4.0 GiB (75%)"
        );
        assert_eq!(size(1536), "2 KiB");
    }
}
