//! Snapshots of a state that several processes write at once (issue 11):
//! `shm-restore` saves every few milliseconds while four `bank run`s share
//! the memfd, then everything dies by SIGKILL ("power loss"); the last
//! snapshot must restore to a committed state: the total is unchanged and
//! every structure checks.

use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shm_fd_tests::{bin, cmd, run, text};

fn b(name: &str) -> String {
    bin(name).to_str().unwrap().to_owned()
}

/// The pids of the `bank run` processes running now under `root`'s
/// process tree (by their command line, under our own children only).
fn banks_under(root: u32) -> usize {
    let mut todo = vec![root as i32];
    let mut banks = 0;
    while let Some(pid) = todo.pop() {
        let kids: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        for k in kids {
            if std::fs::read(format!("/proc/{k}/cmdline"))
                .is_ok_and(|c| c.windows(4).any(|w| w == b"run\0"))
            {
                banks += 1;
            }
            todo.push(k);
        }
    }
    banks
}

#[test]
fn snapshots_taken_while_four_banks_share_the_memfd_restore_to_a_committed_state() {
    let rounds: usize = std::env::var("SHARED_SNAPSHOT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("bank.snap");
    let out = run(cmd("shm-restore").arg(&snap).args([
        &b("bank"),
        "init",
        "--accounts",
        "32",
        "--balance",
        "500",
    ]));
    assert!(out.status.success(), "{:?}", text(&out));
    let script = format!(
        "for i in 1 2 3 4; do {} run --seconds 10 & done; wait",
        b("bank")
    );
    let mut last_transfers = 0u64;
    for round in 0..rounds {
        let mut child = cmd("shm-restore")
            .args(["--quiet", "--interval", "5ms"])
            .arg(&snap)
            .args(["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while banks_under(child.id()) < 4 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "round {round}: the four banks never started"
            );
            sleep(Duration::from_millis(5));
        }
        sleep(Duration::from_millis(300 + 50 * round as u64));
        // Power loss: shm-restore dies, and its group keeper takes the
        // banks with it (docs/supervision.md); only the last periodic
        // snapshot remains.
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        let _ = child.wait();
        // The check restores the snapshot into a new memfd: the banks
        // still dying on the old one cannot touch it.
        let out = run(cmd("shm-restore").arg(&snap).args([&b("bank"), "check"]));
        let (o, e) = text(&out);
        assert!(
            out.status.success(),
            "round {round}: bank check after restore failed: {o}\n{e}"
        );
        assert!(o.starts_with("total 16000 "), "round {round}: {o}");
        let transfers: u64 = o
            .split(", ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("round {round}: no transfer count in {o}"));
        assert!(
            transfers > last_transfers,
            "round {round}: the snapshot holds {transfers} transfers, no more than the {last_transfers} before: nothing was saved while the banks ran"
        );
        last_transfers = transfers;
    }
    eprintln!("{rounds} power losses, {last_transfers} transfers kept in the end");
}
