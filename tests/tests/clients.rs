//! Black-box tests of the `clients` example: many processes share one
//! shm-state map, inserting under the writer lock and getting without a
//! lock, and the run ends consistent; damage that a client does on
//! purpose (hidden `--corrupt`) is caught, by the clients' gets or by the
//! final check; bad command lines exit 2; the clients die with `run`.

use std::process::Stdio;
use std::time::Duration;

use shm_fd_tests::procs::{Proc, Sweep, children, poll_for};
use shm_fd_tests::{cmd, run, text};

/// Runs `clients run ARGS`: exit code, stdout, stderr.
fn clients_run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = run(cmd("clients").arg("run").args(args));
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

/// The numbers of `N clients, S s: T operations (G gets, I inserts), R ops/s`.
fn ops_line(line: &str) -> Option<(u64, f64, u64, u64, u64, f64)> {
    let (n, rest) = line.split_once(" clients, ")?;
    let (s, rest) = rest.split_once(" s: ")?;
    let (t, rest) = rest.split_once(" operations (")?;
    let (g, rest) = rest.split_once(" gets, ")?;
    let (i, rest) = rest.split_once(" inserts), ")?;
    let r = rest.strip_suffix(" ops/s")?;
    Some((
        n.parse().ok()?,
        s.parse().ok()?,
        t.parse().ok()?,
        g.parse().ok()?,
        i.parse().ok()?,
        r.parse().ok()?,
    ))
}

#[test]
fn sixteen_clients_for_a_second_end_consistent() {
    let (code, o, e) = clients_run(&["--clients", "16", "--seconds", "1", "--keys", "500"]);
    assert_eq!(code, Some(0), "stdout: {o}\nstderr: {e}");
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines.len(), 3, "{o}");
    let (n, s, total, gets, inserts, rate) =
        ops_line(lines[0]).unwrap_or_else(|| panic!("not an ops/s line: {:?}", lines[0]));
    assert_eq!(n, 16, "{o}");
    assert!((1.0..30.0).contains(&s), "{o}");
    assert_eq!(total, gets + inserts, "{o}");
    assert!(gets > 0 && inserts > 0, "{o}");
    // About 90 % gets (the default --get-ratio), on any machine.
    let share = gets as f64 / total as f64;
    assert!((0.8..0.97).contains(&share), "get share {share}: {o}");
    let expected = total as f64 / s;
    assert!((rate - expected).abs() <= expected * 0.01 + 1.0, "{o}");
    assert!(lines[1].starts_with("gets found a value "), "{o}");
    let keys: u64 = lines[2]
        .strip_prefix("consistent: heap and map verify; the map's ")
        .and_then(|r| r.split(' ').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("not a consistency line: {:?}", lines[2]));
    assert!(keys > 0 && keys <= 16 * 500 && keys <= inserts, "{o}");
    assert!(e.is_empty(), "{e}");
}

#[test]
fn a_run_in_a_file_is_consistent_and_a_used_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let path = path.to_str().unwrap();
    let (code, o, e) = clients_run(&["--clients", "4", "--seconds", "0.3", "--file", path]);
    assert_eq!(code, Some(0), "stdout: {o}\nstderr: {e}");
    assert!(o.lines().last().unwrap().starts_with("consistent: "), "{o}");
    // The file holds that run's state now: the next run needs a new one.
    let (code, o, e) = clients_run(&["--clients", "2", "--seconds", "0.1", "--file", path]);
    assert_eq!(code, Some(3), "stdout: {o}\nstderr: {e}");
    assert!(o.is_empty(), "{o}");
    assert!(e.contains("already holds") && e.lines().count() == 1, "{e}");
}

/// Client 0 damages its own keys after its last operation, so that no
/// get can see it: only the final check's counts and digests can.
#[test]
fn the_final_check_catches_a_stale_value_and_a_lost_key() {
    for (how, want) in [
        (
            "stale",
            "do not all hold the values of its last inserts (digest ",
        ),
        ("lose", "of its keys are in the map, but it inserted"),
    ] {
        let (code, o, e) = clients_run(&["--clients", "4", "--seconds", "0.3", "--corrupt", how]);
        assert_eq!(code, Some(1), "--corrupt {how}\nstdout: {o}\nstderr: {e}");
        // The run itself went through: its ops/s line, and no verdict of
        // consistency.
        assert!(ops_line(o.lines().next().unwrap_or("")).is_some(), "{o}");
        assert!(!o.contains("consistent: "), "{o}");
        assert_eq!(e.lines().count(), 1, "--corrupt {how}: {e}");
        assert!(
            e.starts_with("clients: inconsistent: client 0: ") && e.contains(want),
            "--corrupt {how}: {e}"
        );
    }
}

/// A value with a wrong checksum (what a torn read returns) is reported
/// by the get that reads it, and the run exits 1.
#[test]
fn the_clients_gets_catch_a_torn_value() {
    let (code, o, e) = clients_run(&[
        "--clients",
        "4",
        "--seconds",
        "0.5",
        "--keys",
        "5",
        "--corrupt",
        "torn",
    ]);
    assert_eq!(code, Some(1), "stdout: {o}\nstderr: {e}");
    assert!(
        e.contains("key #0 returned a torn value or one of another key"),
        "{e}"
    );
    assert!(
        e.lines()
            .last()
            .unwrap()
            .contains("exited with 1 before it reported its operations"),
        "{e}"
    );
}

#[test]
fn bad_command_lines_exit_2_with_one_line() {
    // One more than the peer table holds (the parent leaves it while the
    // clients run).
    let too_many = (shm_state::MAX_PEERS + 1).to_string();
    for args in [
        &["--clients", "0"][..],
        &["--clients", &too_many],
        &["--seconds", "0"],
        &["--seconds", "-1"],
        &["--seconds", "inf"],
        &["--get-ratio", "1.5"],
        &["--get-ratio", "-0.1"],
        &["--keys", "0"],
    ] {
        let (code, o, e) = clients_run(args);
        assert_eq!(code, Some(2), "{args:?}\nstdout: {o}\nstderr: {e}");
        assert!(o.is_empty(), "{args:?}: {o}");
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(
            e.starts_with(&format!("clients: {}", args[0])),
            "{args:?}: {e}"
        );
    }
    // Clap's own errors: exit 2 too.
    let (code, _, e) = clients_run(&["--clients", "many"]);
    assert_eq!(code, Some(2), "{e}");
}

#[test]
fn help_documents_the_exit_codes_and_hides_the_internals() {
    let out = run(cmd("clients").arg("--help"));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    for code in [
        "0  the run",
        "1  inconsistent",
        "2  bad command line",
        "3  the state",
    ] {
        assert!(o.contains(code), "no exit code {code:?} in:\n{o}");
    }
    assert!(!o.contains("worker"), "{o}");
    let out = run(cmd("clients").args(["run", "--help"]));
    let (o, _) = text(&out);
    assert!(
        o.contains("--clients <N>") && !o.contains("--corrupt"),
        "{o}"
    );
}

/// SIGKILL to `run` while its clients work: every client dies too
/// (PR_SET_PDEATHSIG), none is left running.
#[test]
fn the_clients_die_with_run() {
    let mut sweep = Sweep::default();
    let mut child = cmd("clients")
        .args(["run", "--clients", "4", "--seconds", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    sweep.add_tree(child.id());
    let pid = child.id() as i32;
    let clients: Vec<Proc> = poll_for("four clients", Duration::from_secs(20), || {
        let c = children(pid);
        (c.len() == 4).then(|| c.iter().map(Proc::from).collect())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    for c in clients {
        assert!(
            c.ended_within(Duration::from_secs(5)),
            "client {} outlived run",
            c.pid
        );
    }
}
