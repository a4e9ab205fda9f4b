//! The README's shell blocks, run as a newcomer pastes them (issue 10), so
//! that they cannot rot: every line of every ```` ```sh ```` block runs with
//! `sh -c`, with the built binaries of this test profile in place of
//! `./target/release/`, a temporary directory in place of `/tmp/` (and as
//! the working directory), and no `target/` directory on `PATH`: a command
//! called by its bare name fails with 127. The build and test commands
//! themselves are not run again; the `watch` demo runs for 3 s.
//! docs/migrating.md's block runs the same way.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use shm_fd_tests::{bin_dir, text};

/// The lines of each ```` ```sh ```` block of `readme`.
fn shell_blocks(readme: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), l) if !l.trim().is_empty() => block.push(l.to_owned()),
            _ => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```sh block in the README");
    blocks
}

/// A shell running a pasted line: bash with `pipefail` where there is one
/// (so `cmd | tail -n 1` fails when `cmd` does, as a reader would notice),
/// else sh.
fn pasted(script: &str) -> Command {
    let bash = Path::new("/bin/bash").exists() || Path::new("/usr/bin/bash").exists();
    let mut c = Command::new(if bash { "bash" } else { "sh" });
    if bash {
        c.args(["-o", "pipefail"]);
    }
    c.args(["-c", script]);
    c
}

/// How a README line is run here: `None` for the build and test commands.
fn adapt(line: &str, bins: &Path, tmp: &Path) -> Option<String> {
    let line = line
        .strip_prefix("cargo build --release && ")
        .unwrap_or(line);
    if line.starts_with("cargo ") {
        return None;
    }
    // `/tmp/` first: the binaries' own path may be under /tmp (a clone
    // there), and must not be rewritten.
    let line = line
        .replace("/tmp/", &format!("{}/", tmp.display()))
        .replace("./target/release/", &format!("{}/", bins.display()));
    Some(line)
}

#[test]
fn every_shell_block_of_the_readme_runs_as_pasted() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md at the repository root");
    let blocks = shell_blocks(&readme);
    assert!(
        blocks.len() >= 5,
        "found only {} ```sh blocks",
        blocks.len()
    );
    let has_watch = Command::new("sh")
        .args(["-c", "command -v watch"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_watch,
        "the README's demo needs procps' `watch` (.ci/run installs it)"
    );
    let tmp = tempfile::tempdir().unwrap();
    // The PATH of a fresh shell: no target/ directory on it.
    let path: String = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.contains("target"))
        .collect::<Vec<_>>()
        .join(":");
    let mut ran = 0;
    for block in &blocks {
        for line in block {
            let Some(script) = adapt(line, bin_dir(), tmp.path()) else {
                continue;
            };
            let demo = script.contains(" watch ");
            let script = if demo {
                format!("timeout 3 {script}")
            } else {
                script
            };
            let start = Instant::now();
            let out = pasted(&script)
                .current_dir(tmp.path())
                .env("PATH", &path)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let (o, e) = text(&out);
            let code = out.status.code();
            eprintln!("{:>6.2?} {line}", start.elapsed());
            assert!(
                !e.contains("not found") && !e.contains("panicked"),
                "README line {line:?}: {e}"
            );
            if demo {
                // Stopped by `timeout` while the table kept growing.
                assert_eq!(code, Some(124), "README line {line:?}: {e}");
                assert!(o.contains("generated"), "README line {line:?}: {o}");
            } else {
                assert_eq!(code, Some(0), "README line {line:?}: {o}{e}");
            }
            ran += 1;
        }
    }
    // The demo, the primes snapshot pair, restore-v1 and --check, bank and
    // kv: a README with fewer runnable lines lost some.
    assert!(ran >= 8, "only {ran} README lines ran");
}

#[test]
fn the_shell_block_of_docs_migrating_md_runs_as_pasted() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/migrating.md"))
            .expect("docs/migrating.md");
    let blocks = shell_blocks(&doc);
    assert_eq!(blocks.len(), 1, "docs/migrating.md's ```sh blocks");
    let tmp = tempfile::tempdir().unwrap();
    let mut last = String::new();
    for line in &blocks[0] {
        let script = adapt(line, bin_dir(), tmp.path()).expect("no cargo line");
        let out = pasted(&script)
            .current_dir(tmp.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (o, e) = text(&out);
        assert_eq!(out.status.code(), Some(0), "line {line:?}: {o}{e}");
        last = o;
    }
    // The doc says what the block ends with: the imported counter, plus one.
    assert_eq!(last, "42\n");
}
