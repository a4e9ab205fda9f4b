//! Reading `/proc/<pid>/stat`: which processes exist, their parents and
//! process groups. The one place in this crate that parses that file.

use std::fs;

/// The fields of a `/proc/<pid>/stat` line that supervisors use (see
/// proc(5); field numbers are 1-based, as there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 1: the process id.
    pub pid: i32,
    /// Field 3: the state (`R`, `S`, `D`, `T`, `Z`, ...).
    pub state: char,
    /// Field 4: the parent's pid.
    pub ppid: i32,
    /// Field 5: the process group id.
    pub pgrp: i32,
    /// Field 22: when the process started, in clock ticks after boot. With
    /// the pid it names one process: a reused pid has a later start time.
    pub start_time: u64,
}

impl ProcStat {
    /// Parses one `/proc/<pid>/stat` line. The command name (field 2) may
    /// hold spaces and parentheses, so the fields after it are counted
    /// from the last `)`. `None` if the line is not of that form.
    pub fn parse(line: &str) -> Option<ProcStat> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        if close < open {
            return None;
        }
        let pid = line[..open].trim().parse().ok()?;
        let mut fields = line[close + 1..].split_ascii_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        let pgrp = fields.next()?.parse().ok()?;
        // Fields 6..=21 lie between the group and the start time.
        let start_time = fields.nth(16)?.parse().ok()?;
        Some(ProcStat {
            pid,
            state,
            ppid,
            pgrp,
            start_time,
        })
    }

    /// The process `pid` as `/proc` shows it now; `None` when there is no
    /// such process (or `/proc` is not mounted).
    pub fn read(pid: i32) -> Option<ProcStat> {
        ProcStat::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// True for a process that has ended and only waits to be reaped
    /// (zombie, `Z`) or is being torn down (`X`).
    pub fn has_ended(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Every process `/proc` lists now (empty without `/proc`). Processes
/// that end during the scan are left out.
pub fn processes() -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(ProcStat::read)
        .collect()
}

/// The live members (not ended) of the process group `pgid` (empty
/// without `/proc`).
pub fn group_members(pgid: i32) -> Vec<ProcStat> {
    processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid && !p.has_ended())
        .collect()
}

/// Whether the process `pid` that started at `start_time` (see
/// [`ProcStat::start_time`]) is still running: it exists, has not ended,
/// and its pid was not reused.
pub fn is_running(pid: i32, start_time: u64) -> bool {
    ProcStat::read(pid).is_some_and(|s| s.start_time == start_time && !s.has_ended())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_line_with_a_hostile_name() {
        let line = "4242 (a) b (c) R) S 17 4242 4242 34816 4242 4194560 \
                    103 0 0 0 1 2 0 0 20 0 1 0 987654 8192 100 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n";
        let s = ProcStat::parse(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                start_time: 987654
            }
        );
        assert!(!s.has_ended());
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "",
            "12",
            "x (a) S 1 1",
            "12 (a) S 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
            ") 12 (a S 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
        ] {
            assert_eq!(ProcStat::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_this_process() {
        let me = ProcStat::read(std::process::id() as i32).unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(me.pgrp, nix::unistd::getpgrp().as_raw());
        assert!(is_running(me.pid, me.start_time));
        assert!(!is_running(me.pid, me.start_time + 1));
        assert!(processes().iter().any(|p| p.pid == me.pid));
        assert!(group_members(me.pgrp).iter().any(|p| p.pid == me.pid));
    }
}
