//! Helpers for the black-box tests in `tests/tests/`: locating the built
//! binaries and running them.
//!
//! The binaries are found in `$SHM_FD_BIN_DIR` when it is set (so the same
//! suite can check another build or implementation). Otherwise the first
//! call builds every workspace binary with the cargo that runs the tests
//! (`cargo build --workspace --bins`, same profile) and uses
//! `target/<profile>/`.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The directory holding the binaries under test.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("SHM_FD_BIN_DIR") {
            return PathBuf::from(dir);
        }
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary is in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the binaries");
        assert!(status.success(), "cargo build --workspace --bins failed");
        profile_dir
    })
}

/// The path of the binary `name` (e.g. `"shm-fd"`, `"primes"`).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// A [`Command`] for the binary `name` with the `LISTEN_*` and
/// `NOTIFY_SOCKET` variables of the test process removed, so tests start
/// from a clean hand-over.
pub fn cmd(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    for var in [
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd`, returning its output; panics only if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Stdout and stderr of `out` as text, for assertions and messages.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The first `n` primes, by a sieve independent of the examples' code.
pub fn first_primes(n: usize) -> Vec<u64> {
    let mut limit = 64usize;
    loop {
        let mut composite = vec![false; limit + 1];
        let mut primes = Vec::new();
        for i in 2..=limit {
            if !composite[i] {
                primes.push(i as u64);
                let mut j = i * i;
                while j <= limit {
                    composite[j] = true;
                    j += i;
                }
            }
        }
        if primes.len() >= n {
            primes.truncate(n);
            return primes;
        }
        limit *= 2;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sieve_is_right() {
        assert_eq!(
            super::first_primes(10),
            [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
        );
        assert_eq!(super::first_primes(125_000)[124_999], 1_655_131);
    }
}
