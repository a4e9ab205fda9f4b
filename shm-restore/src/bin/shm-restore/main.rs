//! `shm-restore`: load a snapshot into the shared memfd, run a command with
//! it, and save the memfd back on exit, on SIGUSR1 and periodically.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use shm_restore::{Error, LoadOutcome, SaveOptions, format_time};

mod import;
mod progress;
mod supervise;

/// Setup failed: bad `LISTEN_*` variables, an inherited fd that is not a
/// memfd, memfd creation, signal handlers.
pub(crate) const EXIT_SETUP: u8 = 1;
/// `--check`: the snapshot is not valid.
pub(crate) const EXIT_INVALID: u8 = 1;
/// Bad command line.
pub(crate) const EXIT_USAGE: u8 = 2;
/// No valid snapshot to load (damaged, truncated, wrong version, and no
/// valid `.prev`; or more data than `--max-size`): nothing started, every
/// file as it was.
pub(crate) const EXIT_DATA: u8 = 65;
/// The snapshot cannot be read (permissions, I/O error) or the memfd
/// cannot take it: nothing started.
pub(crate) const EXIT_NO_INPUT: u8 = 66;
/// The snapshot's directory does not exist, is not a directory, or this
/// process cannot create files in it: nothing started, no file created.
pub(crate) const EXIT_CANNOT_CREATE: u8 = 73;
/// The command exited 0 but the final save failed.
pub(crate) const EXIT_SAVE_FAILED: u8 = 74;
/// The command cannot be executed.
pub(crate) const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub(crate) const EXIT_NOT_FOUND: u8 = 127;

const AFTER_HELP: &str = "\
Before the start: if the memfd holds no data (a fresh watcher, or none passed)
and SNAPSHOT exists, it is verified and loaded; a damaged SNAPSHOT with a
valid SNAPSHOT.prev loads the .prev and keeps the damaged file as
SNAPSHOT.corrupt-<time>. A memfd that already holds data (a restart under
the same watcher) is kept as it is. The memfd is saved when the command
exits (for any reason), on SIGUSR1, and every --interval if it changed;
the command's process group is paused (SIGSTOP) only for the copy into
memory. SIGTERM, SIGINT, SIGHUP and SIGQUIT are forwarded to the command's
process group. In the foreground of a terminal, the command's group gets
the terminal while it runs (Ctrl-C, Ctrl-Z reach it; a stopped command
stops shm-restore too, as a shell job); a terminal hang-up stops it
(SIGHUP, then SIGTERM after 5 s, SIGKILL after 10 s). If shm-restore itself
dies (even by SIGKILL), the command's whole process group is killed with it
(PR_SET_PDEATHSIG and a group keeper; see docs/supervision.md), so no run
outlives its wrapper. A memfd without data never
overwrites a snapshot. A memfd created here (none passed) is uploaded to systemd's fd
store when NOTIFY_SOCKET is set (a failure is only a warning).

--snapshot protocol (also restore-v1): a command that commits through
shm-snapshot is copied while it runs, the copy kept when its header proves
a committed state; nothing is copied when it committed nothing since the
last save; after 4 failed tries the group is stopped as in `stop`. A
command without the header is saved as in `stop`, said once on stderr.

Exit status:
  the command's    its exit code, or 128+N if signal N killed it
  1                setup failed (bad LISTEN_* variables, memfd, ...);
                   with --check: the snapshot is not valid
  2                usage error (one line; an option out of its range names
                   the range)
  65               no valid snapshot to load (damaged, and no valid .prev;
                   or larger than --max-size): nothing was started and every
                   file is left as it was; with --import-raw: RAW is larger
                   than --max-size, holds no data or is a snapshot already,
                   nothing written
  66               the snapshot cannot be read, or the memfd cannot take it;
                   with --import-raw: RAW cannot be read (missing, not a
                   regular file), nothing written
  73               SNAPSHOT's directory is missing, cannot be read, or files
                   cannot be created in it: checked before the start,
                   nothing started;
                   with --import-raw: SNAPSHOT exists (and no --force), left
                   as it was
  74               the command exited 0 but the final save failed (e.g. the
                   memfd grew past --max-size); every file is as it was;
                   with --import-raw: the save failed
  126              the command cannot be executed
  127              the command was not found";

/// Keep a program's shared memfd across reboots in a snapshot file.
#[derive(Debug, Parser)]
#[command(name = "shm-restore", version, after_help = AFTER_HELP)]
pub(crate) struct Args {
    /// Name of the memfd in LISTEN_FDNAMES.
    #[arg(long, value_name = "NAME", default_value = shm_fd::DEFAULT_NAME)]
    pub name: String,

    /// Also save every DURATION while the command runs, when the memfd
    /// changed (e.g. 100ms, 5s, 1m; 1ms to 168h).
    #[arg(long, value_name = "DURATION", value_parser = interval)]
    pub interval: Option<Duration>,

    /// How a save copies the memfd while the command runs: `stop` pauses
    /// its process group for the copy; `protocol` (also `restore-v1`)
    /// copies while it runs and keeps the copy when the command's
    /// shm-snapshot header proves it is a committed state, pausing only
    /// when a few tries fail (a command without the header is saved as
    /// with `stop`, said once on stderr).
    #[arg(
        long = "snapshot",
        value_name = "MODE",
        value_enum,
        default_value = "stop"
    )]
    pub snapshot_mode: SnapshotMode,

    /// Refuse to load snapshots holding more than SIZE bytes, and to save
    /// a memfd larger than that (K/M/G/T suffixes, powers of 1024; 1 byte
    /// to 8388607T).
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = max_size)]
    pub max_size: u64,

    /// Save deltas: after a full snapshot, each save writes only the 256 KiB
    /// chunks that changed since the last one, up to N deltas in a chain
    /// (and at most half the full snapshot's bytes), then a full snapshot
    /// again. 0 writes every save in full (0 to 1024).
    #[arg(long, value_name = "N", default_value_t = SaveOptions::DEFAULT_MAX_CHAIN,
          value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub max_chain: u32,

    /// How long to wait for the command's process group to stop before a
    /// save made while it runs gives up (10ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = stop_timeout)]
    pub stop_timeout: Duration,

    /// Do not seal a memfd created here against shrinking.
    #[arg(long)]
    pub no_seal: bool,

    /// Print only warnings and errors.
    #[arg(short, long)]
    pub quiet: bool,

    /// Verify SNAPSHOT and print what it holds; exit 0 if it is valid, 1
    /// if not.
    #[arg(long, conflicts_with = "command")]
    pub check: bool,

    /// Turn RAW, a raw image of a memfd (what the original shm-restore
    /// wrote: the memfd's bytes as a plain file), into the checksummed
    /// SNAPSHOT, saved as at a command's exit (atomically, holes kept
    /// out); an existing SNAPSHOT is refused unless --force.
    #[arg(long, value_name = "RAW", conflicts_with_all = ["command", "check"])]
    pub import_raw: Option<PathBuf>,

    /// With --import-raw: replace an existing SNAPSHOT (a valid one is
    /// kept as SNAPSHOT.prev, as a save does).
    #[arg(long)]
    pub force: bool,

    /// The snapshot file.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: PathBuf,

    /// `NOTIFY_SOCKET` from the environment (not an option).
    #[arg(skip)]
    pub notify_socket: Option<OsString>,

    /// How saves are made, built from the options above (not an option).
    #[arg(skip)]
    pub save_options: SaveOptions,

    /// The command to run, and its arguments.
    #[arg(
        value_name = "COMMAND",
        required_unless_present_any = ["check", "import_raw"],
        trailing_var_arg = true,
        num_args = 1..
    )]
    pub command: Vec<OsString>,
}

/// How a save copies the memfd while the command runs (`--snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SnapshotMode {
    /// Stop the command's process group for the copy.
    Stop,
    /// Copy while it runs, kept when its shm-snapshot header proves a
    /// committed state; stop only when that fails.
    #[value(alias = "restore-v1")]
    Protocol,
}

/// A failure that ends `shm-restore` before or instead of the command.
#[derive(Debug)]
pub(crate) struct Failure(pub u8, pub String);

/// The accepted range of a duration option: least, most, and how the
/// range is written in messages and `--help`.
type DurationRange = (Duration, Duration, &'static str);

/// `--interval`: 0 would save in a busy loop (each tick probes the
/// memfd); 1ms is the shortest a timer is meant for (tests stress saves
/// with 5ms), a week the longest (and far from the clock's limit).
const INTERVAL_RANGE: DurationRange = (
    Duration::from_millis(1),
    Duration::from_secs(168 * 3600),
    "1ms to 168h (7 days)",
);

/// `--stop-timeout`: a group normally stops within milliseconds; an hour
/// of a paused save is already a hang.
const STOP_TIMEOUT_RANGE: DurationRange = (
    Duration::from_millis(10),
    Duration::from_secs(3600),
    "10ms to 1h",
);

/// `--max-size`: the accepted range, in messages and `--help`.
const MAX_SIZE_RANGE: &str = "1 byte to 8388607T (2^63-1 bytes, the largest file)";

fn duration_in(text: &str, (least, most, accepted): DurationRange) -> Result<Duration, String> {
    match shm_fd::units::parse_duration(text) {
        Ok(d) if (least..=most).contains(&d) => Ok(d),
        Ok(_) => Err(format!("out of range: accepted {accepted}")),
        Err(e) => Err(format!("{e}: accepted {accepted}")),
    }
}

fn interval(text: &str) -> Result<Duration, String> {
    duration_in(text, INTERVAL_RANGE)
}

fn stop_timeout(text: &str) -> Result<Duration, String> {
    duration_in(text, STOP_TIMEOUT_RANGE)
}

fn max_size(text: &str) -> Result<u64, String> {
    match shm_fd::units::parse_size(text) {
        Ok(n) if (1..=SaveOptions::MAX_DATA_LEN).contains(&n) => Ok(n),
        Ok(_) => Err(format!("out of range: accepted {MAX_SIZE_RANGE}")),
        Err(e) => Err(format!("{e}: accepted {MAX_SIZE_RANGE}")),
    }
}

/// Parses the command line; a usage error is printed and becomes the exit
/// code. An option value out of its range is one line naming the option,
/// the value and the range.
fn parse_args() -> Result<Args, ExitCode> {
    let mut args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or_default();
            warn(format_args!(
                "{} (see --help)",
                line.strip_prefix("error: ").unwrap_or(line)
            ));
            return Err(ExitCode::from(EXIT_USAGE));
        }
        Err(e) => {
            let _ = e.print();
            return Err(ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 }));
        }
    };
    // Checked here: clap's `requires` lets it through with a COMMAND.
    if args.force && args.import_raw.is_none() {
        warn(format_args!(
            "--force replaces a snapshot with --import-raw only (see --help)"
        ));
        return Err(ExitCode::from(EXIT_USAGE));
    }
    args.save_options = SaveOptions::builder()
        .max_data_len(args.max_size)
        .max_chain(args.max_chain)
        .build()
        .map_err(|e| {
            warn(format_args!("--max-size/--max-chain: {e}"));
            ExitCode::from(EXIT_USAGE)
        })?;
    Ok(args)
}

fn main() -> ExitCode {
    let mut args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    if args.check {
        return ExitCode::from(check(&args.snapshot, args.max_size));
    }
    if let Some(raw) = &args.import_raw {
        return match import::run(&args, raw) {
            Ok(code) => ExitCode::from(code),
            Err(Failure(code, message)) => {
                warn(format_args!("{message}"));
                ExitCode::from(code)
            }
        };
    }
    args.notify_socket = std::env::var_os("NOTIFY_SOCKET");
    match supervise::run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, message)) => {
            warn(format_args!("{message}"));
            ExitCode::from(code)
        }
    }
}

/// `--check`: prints the snapshot's header and whether it is valid.
fn check(path: &Path, max_size: u64) -> u8 {
    let inspection = shm_restore::inspect(path, max_size);
    let mut report = String::new();
    match &inspection.header {
        Some(h) => {
            report += &format!("{}: shm-restore snapshot\n", path.display());
            report += &format!(
                "  format version: {}\n",
                if h.is_delta() {
                    "2 (a delta)"
                } else {
                    "1 (a full snapshot)"
                }
            );
            report += &format!(
                "  data size:      {} bytes ({} stored in {} chunks of up to {} bytes)\n",
                h.data_len, h.stored_len, h.chunk_count, h.chunk_size
            );
            report += &format!("  generation:     {}\n", h.generation);
            report += &format!("  saved at:       {}\n", format_time(h.saved_at_ns));
            if let Some(base) = h.base {
                let (_, name) = shm_restore::DirStorage::for_snapshot(path)
                    .unwrap_or_else(|_| (shm_restore::DirStorage::new("."), path.into()));
                let series = shm_restore::series_of(&name);
                report += &format!(
                    "  applies to:     generation {} ({}), header CRC {:#010x}; the chain \
                     holds {} delta(s) above a full snapshot\n",
                    base.generation,
                    path.with_file_name(shm_restore::base_name(&series, base.generation))
                        .display(),
                    base.header_crc,
                    base.depth
                );
                for b in &inspection.bases {
                    report += &format!(
                        "  chain:          generation {} {}, {} bytes stored, saved at {}: ok\n",
                        b.generation,
                        if b.is_delta() { "delta" } else { "full" },
                        b.stored_len,
                        format_time(b.saved_at_ns)
                    );
                }
            }
        }
        None => report += &format!("{}: not readable as a snapshot\n", path.display()),
    }
    report += match &inspection.verdict {
        Ok(()) => "  checksums:      ok\n".to_owned(),
        // Refused for its size only: every checksum was checked.
        Err(Error::TooLarge { max, .. }) => format!(
            "  checksums:      ok\n  size:           BAD, more than the maximum {max} (--max-size)\n"
        ),
        // Not read (missing, no permission): nothing is known of them.
        Err(Error::Io { .. }) => "  checksums:      not checked\n".to_owned(),
        Err(_) => "  checksums:      BAD\n".to_owned(),
    }
    .as_str();
    if let Err(e) = &inspection.verdict {
        // What was found against what was expected (the error says both),
        // then what a start would do with it and what the user can do.
        report += &format!("  problem:        {e}\n");
        report += &format!(
            "  at start:       {}\n",
            what_a_start_does(path, e, max_size)
        );
    }
    // A closed stdout (`| head -1`) is not worth a panic.
    let _ = std::io::stdout().lock().write_all(report.as_bytes());
    match inspection.verdict {
        Ok(()) => 0,
        Err(e) => {
            warn(format_args!("{e}"));
            EXIT_INVALID
        }
    }
}

/// For `--check` of a snapshot `path` that failed with `e`: what
/// `shm-restore` would do with it at a start, and what to do about it.
fn what_a_start_does(path: &Path, e: &Error, max_size: u64) -> String {
    let shown = path.display();
    if let Error::TooLarge { data_len, .. } = e {
        return format!(
            "refused (exit 65), every file kept; to load it, raise --max-size to at least \
             {data_len} bytes"
        );
    }
    let missing =
        matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
    if !missing && !e.is_unloadable() {
        return "refused (exit 66), every file kept: fix the access to the file (permissions, \
                the disk) and check again"
            .to_owned();
    }
    let prev = shm_restore::prev_path(path);
    let prev_shown = prev.display();
    let prev_check = shm_restore::inspect(&prev, max_size);
    let prev_missing = matches!(&prev_check.verdict,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound);
    match (&prev_check.verdict, &prev_check.header) {
        // The load falls back on .prev for a missing snapshot too.
        (Ok(()), Some(h)) if missing => format!(
            "{prev_shown} is valid (generation {}, saved at {}): a start loads it",
            h.generation,
            format_time(h.saved_at_ns)
        ),
        (Ok(()), Some(h)) => format!(
            "{prev_shown} is valid (generation {}, saved at {}): a start loads it and keeps \
             {shown} as {shown}.corrupt-<time>",
            h.generation,
            format_time(h.saved_at_ns)
        ),
        _ if missing && prev_missing => "nothing to load: the command starts with an empty \
                                          memfd, and the first save creates the file"
            .to_owned(),
        _ if prev_missing => {
            format!(
                "refused (exit 65), every file kept, as there is no {prev_shown} to fall back \
                 to; put a good copy in its place, or move {shown} away to start from an empty \
                 memfd"
            )
        }
        (verdict, _) => format!(
            "refused (exit 65), every file kept: {prev_shown} cannot be loaded either ({}); \
             put a good copy in its place, or move both away to start from an empty memfd",
            match verdict {
                Err(e) => e.to_string(),
                Ok(()) => "no header".to_owned(),
            }
        ),
    }
}

/// Writes `shm-restore: <msg>` to stderr. Errors are ignored: after a
/// terminal hang-up stderr fails, and the save must still happen.
pub(crate) fn warn(msg: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "shm-restore: {msg}");
}

/// The exit code for a load that failed.
pub(crate) fn load_failure(e: Error) -> Failure {
    let code = if e.is_unloadable() {
        EXIT_DATA
    } else {
        EXIT_NO_INPUT
    };
    Failure(code, e.to_string())
}

/// The one line describing what was loaded (or why not).
pub(crate) fn describe_load(snapshot: &Path, outcome: &LoadOutcome) -> (bool, String) {
    let s = snapshot.display();
    match outcome {
        LoadOutcome::NoSnapshot => (
            false,
            format!("no snapshot {s} yet: starting with an empty memfd"),
        ),
        LoadOutcome::LiveKept { len } => (
            false,
            format!(
                "the memfd already holds {len} bytes (a restart under the same watcher): \
                 keeping the live memory, {s} not loaded"
            ),
        ),
        LoadOutcome::Loaded {
            path,
            header,
            fallback: None,
            ..
        } => (
            false,
            format!(
                "loaded {} (generation {}, {} bytes, saved {})",
                path.display(),
                header.generation,
                header.data_len,
                format_time(header.saved_at_ns)
            ),
        ),
        LoadOutcome::Loaded {
            path,
            header,
            fallback: Some(f),
            ..
        } => {
            let kept = match (&f.moved_to, &f.move_error) {
                (Some(to), _) => format!("; the damaged file is kept as {}", to.display()),
                (None, Some(e)) => format!("; could not move the damaged file aside: {e}"),
                (None, None) => String::new(),
            };
            let problem = if f.problem.is_not_found() {
                format!("{s} is missing")
            } else {
                f.problem.to_string()
            };
            (
                true,
                format!(
                    "WARNING: {problem}; loaded the previous snapshot {} instead \
                     (generation {}, saved {}){kept}",
                    path.display(),
                    header.generation,
                    format_time(header.saved_at_ns)
                ),
            )
        }
        _ => (false, format!("{outcome:?}")),
    }
}
