//! Processes: finding them through `/proc` ([`ProcStat`], always
//! available; shm-state judges its lock with it), tying a child to its
//! parent's life ([`die_with_parent`], always available), and, with the `cli`
//! feature, the pieces every supervisor here needs: starting a command
//! tied to the supervisor's life (`spawn_group`: it dies when the
//! supervisor dies, and so does its whole process group), waiting for
//! signals without spinning (`SignalSet`), turning a child's end into an
//! exit code (`exit_code`), and sharing the terminal with a child's
//! process group (`Terminal`).

#[cfg(feature = "cli")]
mod keeper;
#[cfg(feature = "cli")]
mod signals;
mod stat;
#[cfg(feature = "cli")]
mod terminal;
mod tie;

#[cfg(feature = "cli")]
pub use keeper::{GroupKeeper, SpawnError, on_main_thread, spawn_group};
#[cfg(feature = "cli")]
pub use signals::SignalSet;
pub use stat::{ProcStat, group_members, is_running, processes};
#[cfg(feature = "cli")]
pub use terminal::Terminal;
pub use tie::die_with_parent;

#[cfg(feature = "cli")]
/// The exit code a supervisor reports for a child that ended with `status`:
/// its own exit code, or `128 + N` when signal `N` killed it (as shells do).
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => 1,
    }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn exit_codes() {
        let st = Command::new("sh").args(["-c", "exit 7"]).status().unwrap();
        assert_eq!(exit_code(st), 7);
        let st = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(exit_code(st), 128 + 9);
    }
}
