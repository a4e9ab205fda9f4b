//! A wrapper killed while its run's process group is stopped (a stop-mode
//! save's SIGSTOP) must not leave the group stopped for good.
//!
//! The kernel continues an orphaned group with stopped members, which hid
//! the bug: a wrapper killed between its SIGSTOP and the members' stopping
//! orphans the group before anyone stopped, and nobody continued the
//! keeper, which waited for a death signal it could not take while
//! stopped. Here this test process is a child subreaper in the wrapper's
//! session, so the orphans it adopts keep the group from being orphaned:
//! the kernel continues nobody, deterministically, and only the keeper's
//! own death signal (SIGCONT) can save the group.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use shm_fd_tests::cmd;

/// The first field of `/proc/PID/stat` after the command name.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn a_wrapper_killed_while_its_group_is_stopped_leaves_nothing_stopped() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets an attribute of this
    // process (this test binary holds this one test).
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    assert_eq!(rc, 0, "cannot become a subreaper");
    let dir = tempfile::tempdir().unwrap();
    let mut wrapper = cmd("shm-restore")
        .arg("--quiet")
        .arg(dir.path().join("s.snap"))
        .args(["sleep", "300"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    let (keeper, sleeper) = loop {
        let kids = children(wrapper.id());
        let keeper = kids.iter().copied().find(|&k| comm(k) == "shm-fd-keeper");
        let sleeper = kids.iter().copied().find(|&k| comm(k) == "sleep");
        if let (Some(k), Some(s)) = (keeper, sleeper) {
            break (k, s);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no keeper and sleep"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // A stop-mode save: the whole group stopped, then the wrapper killed.
    killpg(Pid::from_raw(keeper), Signal::SIGSTOP).unwrap();
    while state(keeper) != Some('T') || state(sleeper) != Some('T') {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the group did not stop"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    kill(Pid::from_raw(wrapper.id() as i32), Signal::SIGKILL).unwrap();
    wrapper.wait().unwrap();
    // The keeper and the command are now this process's children: both
    // must end (the keeper kills the group, then itself), and are reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = vec![keeper, sleeper];
    while !left.is_empty() {
        left.retain(|&p| {
            let mut status = 0;
            // SAFETY: reaps a child of this process (adopted), by pid.
            let rc = unsafe { libc::waitpid(p, &mut status, libc::WNOHANG) };
            rc == 0
        });
        if Instant::now() > deadline {
            let states: Vec<_> = left.iter().map(|&p| (p, state(p))).collect();
            for &p in &left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                // SAFETY: as above.
                unsafe { libc::waitpid(p, std::ptr::null_mut(), 0) };
            }
            panic!("still there 10 s after the wrapper died: {states:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
