//! Running the command as a child: load before, forward signals, save on
//! SIGUSR1 / interval / exit.
//!
//! The command runs in a process group of its own (so a save can pause
//! all of it). When `shm-restore` owns the terminal, it hands the terminal
//! to that group while the command runs, as a shell does with a job: the
//! command can read from it, and Ctrl-C / Ctrl-\\ / Ctrl-Z reach it
//! directly. When the command is stopped from the terminal, `shm-restore`
//! stops too, so the shell that started it sees its job stopped.

use std::fs::File;
use std::io::{ErrorKind, IsTerminal};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, raise, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use shm_fd::process::{SignalSet, SpawnError, Terminal, exit_code, group_members, spawn_group};
use shm_fd::{CreateOptions, Handover, ListenEnv, SharedFd};
use shm_restore::{
    CaptureMethod, Captured, DirStorage, LoadOutcome, SaveOutcome, Saver, SnapshotProtocol,
    StopGroup, Unpaused, now_ns, probe_table,
};

use crate::progress::{self, Operation};
use crate::{
    Args, EXIT_CANNOT_CREATE, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SAVE_FAILED, EXIT_SETUP,
    EXIT_USAGE, Failure, SnapshotMode, describe_load, load_failure, warn,
};

const FORWARDED: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// After a terminal hang-up, how long the command gets to end on its own
/// (after the forwarded SIGHUP) before SIGTERM, and after SIGTERM before
/// SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// Loads, runs the command, saves; returns the exit code.
pub(crate) fn run(args: &Args) -> Result<u8, Failure> {
    let setup = |e: &dyn std::fmt::Display| Failure(EXIT_SETUP, e.to_string());
    let env = ListenEnv::from_process_env().map_err(|e| setup(&e))?;
    // SAFETY: this runs first in shm-restore (after parsing the command
    // line, which opens nothing): every fd above 2, those LISTEN_FDS names
    // included, was inherited and has no owner in this process.
    let handover = unsafe {
        Handover::adopt_or_create(
            env.as_ref(),
            &args.name,
            CreateOptions {
                size: 0,
                seal_shrink: !args.no_seal,
            },
        )
    }
    .map_err(|e| setup(&e))?;
    let created = handover.created();
    // SAFETY: nothing else has been opened yet in this process: the numbers
    // 3, 4, ... hold only the inherited fds the hand-over now owns.
    let passed = unsafe { handover.install() }.map_err(|e| setup(&e))?;
    // A private file description: our SEEK_DATA must not move the offset
    // the command's own read/write calls use.
    let dup = passed
        .shared()
        .try_clone_to_owned()
        .map_err(|e| Failure(EXIT_SETUP, format!("dup of the memfd: {e}")))?;
    let memfd = SharedFd::adopt(dup, &args.name)
        .and_then(|shared| shared.reopen())
        .map_err(|e| setup(&e))?
        .into_file();

    let (storage, name) = DirStorage::for_snapshot(&args.snapshot)
        .map_err(|e| Failure(EXIT_USAGE, format!("{}: {e}", args.snapshot.display())))?;
    // Before anything runs: a command whose state could never be saved
    // must not start (it would find out only at the first save).
    check_writable_dir(storage.dir()).map_err(|why| {
        Failure(
            EXIT_CANNOT_CREATE,
            format!("{}: {why}", args.snapshot.display()),
        )
    })?;
    for stale in shm_restore::remove_stale_temps(storage.dir(), &name) {
        say(
            args,
            &format!("removed {}, left by an interrupted save", stale.display()),
        );
    }
    let meter = progress::meter(args.quiet);
    let outcome = progress::showing(
        meter.as_ref(),
        Operation::Load,
        &format!("loading {}", args.snapshot.display()),
        || {
            shm_restore::restore(
                &args.snapshot,
                &memfd,
                args.max_size,
                now_ns(),
                meter.as_ref(),
            )
        },
    )
    .map_err(load_failure)?;
    let (warning, line) = describe_load(&args.snapshot, &outcome);
    if warning {
        warn(format_args!("{line}"));
    } else {
        say(args, &line);
    }
    let mut saver = Saver::new(storage, &name, args.save_options);
    if let LoadOutcome::Loaded {
        chain,
        chunks,
        fallback,
        ..
    } = &outcome
    {
        saver.note_loaded(chain, chunks, fallback.is_none());
    }

    // A memfd created here (none was passed) goes to systemd's fd store, as
    // shm-fd does, so that it outlives this process; after the load, so a
    // refused start uploads nothing.
    if created
        && let Some(socket) = &args.notify_socket
        && let Err(e) = shm_fd::notify_fd_store(socket, &args.name, passed.shared())
    {
        warn(format_args!(
            "warning: cannot upload the memfd to systemd's fd store: {e}"
        ));
    }

    // Handlers before the child exists, so no SIGCHLD is missed.
    let mut handled = vec![
        libc::SIGCHLD,
        libc::SIGUSR1,
        libc::SIGTSTP,
        libc::SIGCONT,
        libc::SIGXFSZ,
    ];
    handled.extend(FORWARDED);
    let signals = SignalSet::new(&handled)
        .map_err(|e| Failure(EXIT_SETUP, format!("installing signal handlers: {e}")))?;

    let mut terminal = Terminal::if_foreground();

    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    passed.configure(&mut cmd, None);
    // In a process group of its own, tied to our life: if shm-restore dies
    // (kill -9 included), the command gets SIGKILL and the keeper leading its
    // group kills the rest of the group. Started from the main thread, the
    // one that lives as long as shm-restore: PR_SET_PDEATHSIG fires when
    // the thread that started the child ends.
    let (child, mut keeper) = spawn_group(&mut cmd).map_err(|e| {
        let program = args.command[0].to_string_lossy();
        match e {
            SpawnError::Keeper(_) => Failure(EXIT_SETUP, e.to_string()),
            SpawnError::Command(e) => match e.kind() {
                ErrorKind::NotFound => {
                    Failure(EXIT_NOT_FOUND, format!("{program}: command not found"))
                }
                ErrorKind::PermissionDenied => Failure(
                    EXIT_CANNOT_EXECUTE,
                    format!("{program}: cannot execute: {e}"),
                ),
                _ => Failure(EXIT_CANNOT_EXECUTE, format!("{program}: {e}")),
            },
        }
    })?;
    drop(passed); // the child has its copies; ours must not keep it alive
    // Our own status lines must not stop us while the command's group owns
    // the terminal (`stty tostop`). Blocked only now: a child inherits the
    // signal mask, and the command has been started (exec'd) already.
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&ttou), None);
    let pid = Pid::from_raw(child.id() as i32);
    // The command runs in its keeper's group, whose id is the keeper's pid
    // (the keeper is stopped only after the command has ended).
    let pgid = keeper.pgid().unwrap_or(pid);
    if let Some(t) = &terminal {
        t.give_to(pgid);
    }
    let mut capture: Box<dyn CaptureMethod> = match args.snapshot_mode {
        SnapshotMode::Stop => Box::new(StopGroup::new(pgid.as_raw(), args.stop_timeout)),
        SnapshotMode::Protocol => Box::new(SnapshotProtocol::new(pgid.as_raw(), args.stop_timeout)),
    };

    let mut job = Job {
        pid,
        pgid,
        terminal: &mut terminal,
        on_a_terminal: std::io::stdin().is_terminal(),
    };
    let status = supervise(
        args,
        &mut job,
        &signals,
        &mut saver,
        capture.as_mut(),
        &memfd,
    );
    if let Some(t) = &terminal {
        t.take_back();
    }

    // Final save: the command has exited; members of its group that are
    // still alive are paused for the copy, and the keeper stays with them
    // until it is done (a kill -9 meanwhile still takes them along). With
    // no one else left the keeper goes first, and the save reads the memfd
    // directly: it never signals the group id once its keeper is reaped
    // (that id could be someone else's by then).
    let keeper_pid = keeper.pid().map(Pid::as_raw);
    // Without /proc the group cannot be listed: others may be left, and
    // the group capture pauses them (the keeper with them).
    let proc_readable = shm_fd::process::ProcStat::read(std::process::id() as i32).is_some();
    let saved = if proc_readable
        && group_members(pgid.as_raw())
            .iter()
            .all(|p| Some(p.pid) == keeper_pid)
    {
        keeper.stop();
        save(args, &mut saver, &mut Unpaused, &memfd, "on exit")
    } else {
        save(args, &mut saver, capture.as_mut(), &memfd, "on exit")
    };
    keeper.stop();
    let code = exit_code(status);
    Ok(if !saved && code == 0 {
        EXIT_SAVE_FAILED
    } else {
        code
    })
}

/// Checks that snapshot files can be created in `dir`: it exists, is a
/// directory, and an unnamed file can be made in it (`O_TMPFILE`, which
/// leaves nothing behind and also catches a read-only file system and
/// root's missing rights, e.g. on NFS). Where the file system has no
/// `O_TMPFILE`, `access(W_OK | X_OK)` decides. Returns why not.
pub(crate) fn check_writable_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("cannot save there: {shown} is not a directory")),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "cannot save there: the directory {shown} does not exist"
            ));
        }
        Err(e) => return Err(format!("cannot save there: {shown}: {e}")),
    }
    // A save fsyncs the directory after its rename, through a descriptor
    // opened for reading: a directory that can be written but not read
    // (d-wx) would fail every save at that step.
    if let Err(e) = std::fs::File::open(dir) {
        return Err(format!(
            "cannot save there: cannot open the directory {shown} (a save syncs it): {e}"
        ));
    }
    let probe = std::fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match probe {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            nix::unistd::access(
                dir,
                nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            )
            .map_err(|e| format!("cannot save there: {shown} is not writable: {}", e.desc()))
        }
        Err(e) => Err(format!(
            "cannot save there: cannot create files in {shown}: {e}"
        )),
    }
}

/// The running command and the terminal we may have handed to it.
struct Job<'a> {
    pid: Pid,
    pgid: Pid,
    /// The terminal, while `shm-restore` is (or was, before handing it to
    /// the command) in its foreground.
    terminal: &'a mut Option<Terminal>,
    /// Whether stdin was a terminal at the start.
    on_a_terminal: bool,
}

impl Job<'_> {
    /// True when stdin was a terminal and has hung up (closed, or the
    /// session is gone).
    fn terminal_hung_up(&self) -> bool {
        self.on_a_terminal && nix::unistd::tcgetpgrp(std::io::stdin()).is_err()
    }

    /// How the command ended, if it did. Reports a stop from the terminal
    /// (Ctrl-Z, or touching the terminal while in the background) by
    /// stopping `shm-restore` too.
    fn poll(&mut self) -> Result<Option<ExitStatus>, Errno> {
        self.check(WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED)
    }

    /// Waits for the command to end, blocking (without signal handling:
    /// only when waiting for signals failed).
    fn wait(&mut self) -> ExitStatus {
        loop {
            match self.check(WaitPidFlag::WUNTRACED) {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                // ECHILD cannot happen for our own child; if it does there
                // is no status to pass on.
                Err(_) => return ExitStatus::from_raw(1 << 8),
            }
        }
    }

    fn check(&mut self, flags: WaitPidFlag) -> Result<Option<ExitStatus>, Errno> {
        loop {
            return match waitpid(self.pid, Some(flags)) {
                Ok(WaitStatus::Exited(_, code)) => {
                    Ok(Some(ExitStatus::from_raw((code & 0xff) << 8)))
                }
                Ok(WaitStatus::Signaled(_, sig, core)) => Ok(Some(ExitStatus::from_raw(
                    sig as i32 | if core { 0x80 } else { 0 },
                ))),
                // SIGSTOP is a save's pause (or someone else's); only the
                // terminal's stop signals are job control.
                Ok(WaitStatus::Stopped(_, Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU))
                    if std::io::stdin().is_terminal() =>
                {
                    self.stop_with_the_command();
                    continue;
                }
                Ok(_) => Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// The command was stopped from the terminal: take the terminal back
    /// and stop this process, so the shell that started us sees its job
    /// stopped. When continued (`fg` / `bg`), continue the command, in
    /// the foreground if we are.
    fn stop_with_the_command(&mut self) {
        if let Some(t) = self.terminal.take() {
            t.take_back();
        }
        let _ = raise(Signal::SIGSTOP);
        self.resume();
    }

    /// Continues the command, handing it the terminal if we are in the
    /// terminal's foreground now.
    fn resume(&mut self) {
        if self.terminal.is_none() {
            *self.terminal = Terminal::if_foreground();
        }
        match self.terminal.as_ref() {
            Some(t) => t.give_to(self.pgid),
            None => {
                let _ = killpg(self.pgid, Signal::SIGCONT);
            }
        }
    }
}

fn supervise(
    args: &Args,
    job: &mut Job<'_>,
    signals: &SignalSet,
    saver: &mut Saver<DirStorage>,
    capture: &mut dyn CaptureMethod,
    memfd: &File,
) -> ExitStatus {
    let group = job.pgid;
    let mut next_tick = args.interval.map(|i| Instant::now() + i);
    // After a terminal hang-up: when to send what, if the command is still
    // running (a hang-up means stop).
    let mut escalation: Option<(Instant, Signal)> = None;
    loop {
        match job.poll() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => {
                warn(format_args!("waiting for the command: {e}"));
                return job.wait();
            }
        }
        let wake = [next_tick, escalation.map(|(at, _)| at)]
            .into_iter()
            .flatten()
            .min();
        let timeout = wake.map(|t| t.saturating_duration_since(Instant::now()));
        let arrived = match signals.wait(timeout) {
            Ok(s) => s,
            Err(e) => {
                warn(format_args!(
                    "waiting for signals: {e}; waiting for the command"
                ));
                return job.wait();
            }
        };
        for sig in arrived {
            match sig {
                libc::SIGHUP => {
                    let _ = killpg(group, Signal::SIGHUP);
                    if job.terminal_hung_up() {
                        // Nothing to take back; and no one is left to use
                        // the command: it stops, by force if it must.
                        *job.terminal = None;
                        escalation.get_or_insert((Instant::now() + HANGUP_GRACE, Signal::SIGTERM));
                    }
                }
                s if FORWARDED.contains(&s) => {
                    if let Ok(signal) = Signal::try_from(s) {
                        let _ = killpg(group, signal);
                    }
                }
                libc::SIGUSR1 => {
                    save(args, saver, capture, memfd, "on SIGUSR1");
                }
                libc::SIGTSTP => {
                    // Sent to us rather than from the terminal (which sends
                    // it to the command's group): stop the command, then us.
                    let _ = killpg(group, Signal::SIGTSTP);
                    job.stop_with_the_command();
                }
                libc::SIGCONT => job.resume(),
                _ => {} // SIGCHLD: checked at the top; SIGXFSZ: writes fail instead
            }
        }
        if let Some((at, signal)) = escalation
            && Instant::now() >= at
        {
            warn(format_args!(
                "the terminal hung up and the command is still running: sending {signal}"
            ));
            let _ = killpg(group, signal);
            escalation = (signal == Signal::SIGTERM)
                .then(|| (Instant::now() + HANGUP_GRACE, Signal::SIGKILL));
        }
        if let (Some(t), Some(interval)) = (next_tick, args.interval)
            && Instant::now() >= t
        {
            save_if_changed(args, saver, capture, memfd);
            next_tick = Some(Instant::now() + interval);
        }
    }
}

/// The periodic save: a cheap unpaused probe first, so an unchanged memfd
/// costs one read and no pause or write; a capture that tells an unchanged
/// memfd itself (the program commits through shm-snapshot) needs none.
fn save_if_changed(
    args: &Args,
    saver: &mut Saver<DirStorage>,
    capture: &mut dyn CaptureMethod,
    memfd: &File,
) {
    if capture.detects_unchanged() {
        save(args, saver, capture, memfd, "periodic");
        return;
    }
    match probe_table(memfd, saver.options().chunk_size()) {
        Ok((0, _)) => {}
        Ok((len, table)) if saver.is_unchanged(len, &table) => {}
        _ => {
            save(args, saver, capture, memfd, "periodic");
        }
    }
}

/// Captures and saves; reports the outcome. Returns false on failure.
fn save(
    args: &Args,
    saver: &mut Saver<DirStorage>,
    capture: &mut dyn CaptureMethod,
    memfd: &File,
    why: &str,
) -> bool {
    let path = args.snapshot.display();
    // After a snapshot this saver wrote or loaded, copy only what changed
    // since (where the capture method can tell).
    let captured = match saver.delta_basis() {
        Some(basis) => capture.capture_changes(memfd, &basis),
        None => capture.capture(memfd),
    };
    let captured = match captured {
        Ok(c) => c,
        Err(e) => {
            // What the capture took from the program's dirty map counts
            // again at the next one.
            capture.save_failed();
            warn(format_args!(
                "save {why} failed: {e}; {path} left as it was"
            ));
            return false;
        }
    };
    if let Captured::Copied {
        protocol:
            Some(shm_snapshot::CaptureOutcome::Plain {
                reason,
                first: true,
            }),
        ..
    } = &captured
    {
        warn(format_args!(
            "restore-v1: {reason}: the command does not use shm-snapshot; \
             saving as in the plain mode"
        ));
    }
    // Progress only for the save the user waits on: while the command
    // runs it owns the terminal, and a line redrawn in place would
    // overwrite what it shows.
    let meter = progress::meter(args.quiet || why != "on exit");
    saver.set_progress(meter.clone());
    let outcome = progress::showing(
        meter.as_ref(),
        Operation::Save,
        &format!("saving {path}"),
        || saver.save_captured(&captured, memfd, now_ns()),
    );
    saver.set_progress(None);
    if outcome.is_err() {
        capture.save_failed();
    }
    match outcome {
        Ok(SaveOutcome::Saved(r)) => {
            if let Some(e) = &r.compaction_failed {
                warn(format_args!(
                    "save {why}: the delta is in place, but compacting its chain into a full \
                     snapshot failed: {e}; the next save tries again"
                ));
            }
            if let Some((moved, damage)) = &r.moved_corrupt {
                warn(format_args!(
                    "WARNING: {path} {damage}; kept as {} (not as {path}.prev)",
                    moved.display()
                ));
            }
            if why != "periodic" {
                say(
                    args,
                    &format!(
                        "saved {path} {why} (generation {}, {} bytes, {} stored{}{})",
                        r.generation,
                        r.data_len,
                        r.stored_len,
                        r.base
                            .map(|b| format!(
                                ", a delta on generation {} ({} in the chain){}",
                                b.generation,
                                b.depth,
                                r.compacted
                                    .map(|g| format!(", compacted into full generation {g}"))
                                    .unwrap_or_default()
                            ))
                            .unwrap_or_default(),
                        how_copied(&captured)
                    ),
                );
            }
            true
        }
        Ok(SaveOutcome::SkippedEmpty) => {
            say(
                args,
                &format!("the memfd holds no data: {path} left as it was"),
            );
            true
        }
        Ok(SaveOutcome::SkippedUnchanged) => {
            if why != "periodic" {
                say(
                    args,
                    &format!(
                        "nothing {} since the last save: {path} left as it was",
                        if matches!(captured, Captured::Unchanged { .. }) {
                            "committed"
                        } else {
                            "changed"
                        }
                    ),
                );
            }
            true
        }
        Err(e @ shm_restore::Error::AfterCommit(_)) => {
            warn(format_args!("save {why}: {e}"));
            false
        }
        Err(e) => {
            warn(format_args!(
                "save {why} failed: {e}; the previous snapshot is intact"
            ));
            false
        }
    }
}

/// How the saved copy was made, for the status line: `, paused 3.1 ms`,
/// `, committed state 42 copied while the command ran`, ...
fn how_copied(captured: &Captured) -> String {
    let pause = captured
        .pause()
        .map(|p| format!(", paused {:.1} ms", p.as_secs_f64() * 1e3))
        .unwrap_or_default();
    match captured {
        Captured::Copied {
            protocol: Some(shm_snapshot::CaptureOutcome::Consistent { generation, tries }),
            ..
        } => format!(
            ", committed state {generation} copied while the command ran, {tries} {}",
            if *tries == 1 { "try" } else { "tries" }
        ),
        Captured::Copied {
            protocol:
                Some(shm_snapshot::CaptureOutcome::Stopped {
                    generation,
                    in_update,
                    tries,
                }),
            ..
        } => format!(
            "{pause} after {tries} optimistic tries (committed state {generation}{})",
            if *in_update {
                ", stopped inside an update: restores as an interrupted one"
            } else {
                ""
            }
        ),
        Captured::Changes { changes, .. } => format!(
            "{pause}, {} changed chunk(s) copied{}",
            changes.cells().len(),
            match changes.marked() {
                Some(n) => format!(", {n} marked in the dirty map"),
                None => String::new(),
            }
        ),
        _ => pause,
    }
}

fn say(args: &Args, line: &str) {
    if !args.quiet {
        warn(format_args!("{line}"));
    }
}
