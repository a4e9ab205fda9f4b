//! Black-box tests of the example programs' command lines: each answers
//! `--help` and `--version` with exit 0 (without needing a memfd), and
//! `primes`, which takes no arguments, refuses an unknown one as a usage
//! error.

use shm_fd_tests::{cmd, run, text};

const EXAMPLES: [&str; 8] = [
    "primes",
    "counter",
    "bank",
    "kv",
    "primes-snapshot",
    "clients",
    "queue",
    "rpc",
];

/// The workspace's version: every crate takes `workspace.package.version`,
/// this one included.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs every example with `arg` and collects what `check` finds wrong
/// (given the name, exit code, stdout, stderr), so one run of the test
/// names every example that fails, not just the first.
fn check_all(arg: &str, check: impl Fn(&str, Option<i32>, &str, &str) -> Option<String>) {
    let problems: Vec<String> = EXAMPLES
        .into_iter()
        .filter_map(|name| {
            let out = run(cmd(name).arg(arg));
            let (o, e) = text(&out);
            check(name, out.status.code(), &o, &e).map(|p| {
                format!(
                    "{name} {arg}: {p}\n  exit {:?}\n  stdout: {o:?}\n  stderr: {e:?}",
                    out.status.code()
                )
            })
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_example_prints_its_help_and_exits_0() {
    check_all("--help", |name, code, o, e| {
        if code != Some(0) {
            Some("exit code is not 0".into())
        } else if !o.lines().any(|l| l.starts_with(&format!("Usage: {name}"))) {
            Some("no usage line naming the program".into())
        } else if !e.is_empty() {
            Some("wrote to stderr".into())
        } else {
            None
        }
    });
}

#[test]
fn every_example_prints_its_version_and_exits_0() {
    check_all("--version", |name, code, o, e| {
        if code != Some(0) {
            Some("exit code is not 0".into())
        } else if o != format!("{name} {VERSION}\n") {
            Some(format!("stdout is not \"{name} {VERSION}\""))
        } else if !e.is_empty() {
            Some("wrote to stderr".into())
        } else {
            None
        }
    });
}

#[test]
fn primes_refuses_an_unknown_option_as_a_usage_error() {
    let out = run(cmd("primes").arg("--no-such-option"));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(o.is_empty(), "{o}");
    assert!(
        e.starts_with("error: unexpected argument '--no-such-option'"),
        "{e}"
    );
    assert!(e.contains("Usage: primes"), "{e}");
    // The error, a usage line and a hint: not a page of help.
    assert!(e.lines().count() <= 8, "{e}");
}
