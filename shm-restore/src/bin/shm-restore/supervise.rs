//! Running the command as a child: load before, forward signals, save on
//! SIGUSR1 / interval / exit.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::Instant;

use nix::sys::signal::{Signal, killpg, raise};
use nix::unistd::Pid;
use shm_fd::process::{SignalSet, exit_code};
use shm_fd::{CreateOptions, Handover, ListenEnv};
use shm_restore::{
    Capture, DirStorage, LoadOutcome, SaveOptions, SaveOutcome, Saver, StopGroup, now_ns,
    probe_table, reopen_memfd,
};

use crate::{
    Args, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SAVE_FAILED, EXIT_SETUP, EXIT_USAGE, Failure,
    describe_load, load_failure,
};

const FORWARDED: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Loads, runs the command, saves; returns the exit code.
pub(crate) fn run(args: &Args) -> Result<u8, Failure> {
    let setup = |e: &dyn std::fmt::Display| Failure(EXIT_SETUP, e.to_string());
    let env = ListenEnv::from_process_env().map_err(|e| setup(&e))?;
    let handover = Handover::adopt_or_create(
        env.as_ref(),
        &args.name,
        CreateOptions {
            size: 0,
            seal_shrink: !args.no_seal,
        },
    )
    .map_err(|e| setup(&e))?;
    // SAFETY: nothing else has been opened yet in this process: the numbers
    // 3, 4, ... hold only the inherited fds the hand-over now owns.
    let passed = unsafe { handover.install() }.map_err(|e| setup(&e))?;
    // A private file description: our SEEK_DATA must not move the offset
    // the command's own read/write calls use.
    let memfd = reopen_memfd(&passed.shared())
        .map_err(|e| Failure(EXIT_SETUP, format!("reopening the memfd: {e}")))?;

    let (storage, name) = DirStorage::for_snapshot(&args.snapshot)
        .map_err(|e| Failure(EXIT_USAGE, format!("{}: {e}", args.snapshot.display())))?;
    for stale in shm_restore::remove_stale_temps(storage.dir(), &name) {
        say(
            args,
            &format!("removed {}, left by an interrupted save", stale.display()),
        );
    }
    let outcome = shm_restore::restore(&args.snapshot, &memfd, args.max_size, now_ns())
        .map_err(load_failure)?;
    let (warning, line) = describe_load(&args.snapshot, &outcome);
    if warning {
        eprintln!("shm-restore: {line}");
    } else {
        say(args, &line);
    }
    let mut saver = Saver::new(
        storage,
        &name,
        SaveOptions {
            max_data_len: args.max_size,
            ..SaveOptions::default()
        },
    );
    if let LoadOutcome::Loaded {
        header,
        chunks,
        fallback,
        ..
    } = &outcome
    {
        saver.note_loaded(header, chunks, fallback.is_none());
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

    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).process_group(0);
    passed.configure(&mut cmd, None);
    let mut child = cmd.spawn().map_err(|e| {
        let program = args.command[0].to_string_lossy();
        match e.kind() {
            ErrorKind::NotFound => Failure(EXIT_NOT_FOUND, format!("{program}: command not found")),
            ErrorKind::PermissionDenied => Failure(
                EXIT_CANNOT_EXECUTE,
                format!("{program}: cannot execute: {e}"),
            ),
            _ => Failure(EXIT_CANNOT_EXECUTE, format!("{program}: {e}")),
        }
    })?;
    drop(passed); // the child has its copies; ours must not keep it alive
    let pgid = child.id() as i32;
    let mut capture = StopGroup::new(pgid, args.stop_timeout);

    let status = supervise(
        args,
        &mut child,
        pgid,
        &signals,
        &mut saver,
        &mut capture,
        &memfd,
    );

    // Final save: the command has exited; members of its group that are
    // still alive are paused for the copy.
    let saved = save(args, &mut saver, &mut capture, &memfd, "on exit");
    let code = exit_code(status);
    Ok(if !saved && code == 0 {
        EXIT_SAVE_FAILED
    } else {
        code
    })
}

fn supervise(
    args: &Args,
    child: &mut Child,
    pgid: i32,
    signals: &SignalSet,
    saver: &mut Saver<DirStorage>,
    capture: &mut StopGroup,
    memfd: &File,
) -> ExitStatus {
    let group = Pid::from_raw(pgid);
    let mut next_tick = args.interval.map(|i| Instant::now() + i);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => {
                eprintln!("shm-restore: waiting for the command: {e}");
                return child.wait().expect("waitpid on our own child");
            }
        }
        let timeout = next_tick.map(|t| t.saturating_duration_since(Instant::now()));
        let arrived = match signals.wait(timeout) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("shm-restore: waiting for signals: {e}; waiting for the command");
                return child.wait().expect("waitpid on our own child");
            }
        };
        for sig in arrived {
            match sig {
                s if FORWARDED.contains(&s) => {
                    if let Ok(signal) = Signal::try_from(s) {
                        let _ = killpg(group, signal);
                    }
                }
                libc::SIGUSR1 => {
                    save(args, saver, capture, memfd, "on SIGUSR1");
                }
                libc::SIGTSTP => {
                    // Ctrl-Z: the command is not in the terminal's group, so
                    // stop it too, then ourselves.
                    let _ = killpg(group, Signal::SIGTSTP);
                    let _ = raise(Signal::SIGSTOP);
                }
                libc::SIGCONT => {
                    let _ = killpg(group, Signal::SIGCONT);
                }
                _ => {} // SIGCHLD: checked at the top; SIGXFSZ: writes fail instead
            }
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
/// costs one read and no pause or write.
fn save_if_changed(
    args: &Args,
    saver: &mut Saver<DirStorage>,
    capture: &mut StopGroup,
    memfd: &File,
) {
    match probe_table(memfd, saver.options().chunk_size) {
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
    capture: &mut impl Capture,
    memfd: &File,
    why: &str,
) -> bool {
    let path = args.snapshot.display();
    let captured = match capture.capture(memfd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shm-restore: save {why} failed: {e}; {path} left as it was");
            return false;
        }
    };
    match saver.save_captured(&captured, memfd, now_ns()) {
        Ok(SaveOutcome::Saved(r)) => {
            if let Some((moved, damage)) = &r.moved_corrupt {
                eprintln!(
                    "shm-restore: WARNING: {path} {damage}; kept as {} (not as {path}.prev)",
                    moved.display()
                );
            }
            if why != "periodic" {
                let pause = captured
                    .pause()
                    .map(|p| format!(", paused {:.1} ms", p.as_secs_f64() * 1e3))
                    .unwrap_or_default();
                say(
                    args,
                    &format!(
                        "saved {path} {why} (generation {}, {} bytes, {} stored{pause})",
                        r.generation, r.data_len, r.stored_len
                    ),
                );
            }
            true
        }
        Ok(SaveOutcome::SkippedEmpty) => {
            say(args, &format!("the memfd is empty: {path} left as it was"));
            true
        }
        Err(e) => {
            eprintln!("shm-restore: save {why} failed: {e}; the previous snapshot is intact");
            false
        }
    }
}

fn say(args: &Args, line: &str) {
    if !args.quiet {
        eprintln!("shm-restore: {line}");
    }
}
