//! `kv`: a persistent key-value tool over a shm-state map of byte strings.
//! Any number of `kv` processes may use one state at once (a
//! [`SharedState`]): `set` and `del` take turns under the writer lock,
//! `get` and `list` read without any lock.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use bytemuck::{Pod, Zeroable};
use clap::{Parser, Subcommand};
use shm_state::{Bytes, Layout, SharedState, Source, StateMap};

const AFTER_HELP: &str = "\
The state lives in the shared memfd passed by a watcher, e.g.
  shm-fd shm-restore kv.snap kv set greeting hello
  shm-fd shm-restore kv.snap kv get greeting
or, with --file, in a regular file.

Exit codes:
  0  success
  1  `get` / `del`: no such key
  2  bad command line
  3  the state cannot be used: no memfd passed, not a kv state, damaged,
     held by a live process that does not share it, shared by 64
     processes already, or a system error

Many kv processes may use one state at once.";

#[derive(Parser, Debug)]
#[command(version, about = "A persistent key-value store in shared memory", after_help = AFTER_HELP)]
struct Cli {
    /// Keep the state in this file instead of the passed memfd.
    #[arg(long, value_name = "PATH", global = true)]
    file: Option<PathBuf>,
    /// Name of the memfd in LISTEN_FDNAMES.
    #[arg(long, value_name = "NAME", default_value = shm_fd::DEFAULT_NAME, global = true)]
    name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Set KEY to VALUE.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Print the value of KEY.
    Get {
        /// The key.
        key: String,
    },
    /// Delete KEY.
    Del {
        /// The key.
        key: String,
    },
    /// Print every `KEY<TAB>VALUE`, sorted by key.
    List,
}

/// The root, version 1.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Root {
    entries: StateMap<Bytes, Bytes>,
}

struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(3, e.to_string())
    }
}

fn open(cli: &Cli) -> Result<(SharedState<Root>, StateMap<Bytes, Bytes>), Fail> {
    let source = match &cli.file {
        Some(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Fail(3, format!("{}: {e}", path.display())))?;
            // SAFETY: the file is kv's own, shared only with other kv
            // processes (the writer lock orders their writes), and nothing
            // truncates it.
            unsafe { Source::file(file) }
        }
        None => {
            // SAFETY: opened once, before the program opens any file of its
            // own: the fd LISTEN_FDS names was inherited and has no owner.
            let fd = unsafe { shm_fd::SharedFd::from_env(&cli.name) }?;
            // SAFETY: the watcher passed the memfd to kv processes and
            // sealed it against shrinking; the writer lock orders their
            // writes.
            unsafe { Source::shared(fd) }
        }
    };
    let mut state = SharedState::<Root>::open(source, Layout::new(1).with_snapshot_protocol())?;
    let mut entries = state.read(|v| v.root())?.entries;
    if entries.is_null() {
        // Another kv may be creating it too: decided under the lock.
        entries = state.transaction(|tx| {
            if tx.root()?.entries.is_null() {
                let entries = tx.new_map()?;
                tx.set_root(Root { entries })?;
            }
            Ok::<_, shm_state::Error>(tx.root()?.entries)
        })?;
    }
    Ok((state, entries))
}

fn run(cli: &Cli) -> Result<u8, Fail> {
    let (mut state, entries) = open(cli)?;
    let mut out = std::io::stdout().lock();
    match &cli.command {
        Command::Set { key, value } => {
            state.transaction(|tx| tx.map(entries)?.insert(key.as_bytes(), value.as_bytes()))?;
        }
        Command::Get { key } => match state.read(|v| v.map(entries)?.get(key.as_bytes()))? {
            Some(v) => {
                out.write_all(&v)?;
                out.write_all(b"\n")?;
            }
            None => return Err(Fail(1, format!("no such key: {key}"))),
        },
        Command::Del { key } => {
            if !state.transaction(|tx| tx.map(entries)?.remove(key.as_bytes()))? {
                return Err(Fail(1, format!("no such key: {key}")));
            }
        }
        Command::List => {
            let mut all = state.read(|v| v.map(entries)?.entries())?;
            all.sort();
            for (k, v) in all {
                out.write_all(&k)?;
                out.write_all(b"\t")?;
                out.write_all(&v)?;
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(Fail(code, msg)) => {
            eprintln!("kv: {msg}");
            ExitCode::from(code)
        }
    }
}
