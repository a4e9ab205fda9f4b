//! Helpers for the black-box tests in `tests/tests/`: locating the built
//! binaries and running them.
//!
//! The binaries are found in `$SHM_FD_BIN_DIR` when it is set (so the same
//! suite can check another build or implementation). Otherwise the first
//! call builds every workspace binary with the cargo that runs the tests
//! (`cargo build --workspace --bins`, same profile) and uses
//! `target/<profile>/`.
#![warn(missing_docs)]

pub mod bench;
pub mod procs;

use std::os::fd::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

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

/// Runs `cmd` as [`run`] does, but for at most `bound`: a command still
/// running then is killed (SIGKILL, by its pid) and reaped, and the test
/// fails naming it instead of hanging. Stdin is null.
pub fn run_within(cmd: &mut Command, bound: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Drained by threads, so that a command printing more than a pipe
    // holds is not blocked by the wait below.
    let drain = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break status;
        }
        if Instant::now() >= deadline {
            // Not reaped yet: the pid is still this child's.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still ran after {bound:?}; killed");
        }
        sleep(Duration::from_millis(2));
    };
    // A process the command left behind may hold the pipes open: waited
    // for within the same bound.
    let left = || deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let (stdout, stderr) = match (out.recv_timeout(left()), err.recv_timeout(left())) {
        (Ok(o), Ok(e)) => (o, e),
        _ => panic!("{cmd:?} exited ({status}), but its output did not end within {bound:?}"),
    };
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Stdout and stderr of `out` as text, for assertions and messages.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// CRC-32 (IEEE, as `crc32fast::hash`), bit by bit and independent of the
/// libraries: enough to forge headers the readers accept.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
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

/// Receives one datagram with an attached fd from `sock`.
pub fn recv_with_fd(sock: &std::os::unix::net::UnixDatagram) -> (String, std::os::fd::OwnedFd) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("recvmsg");
    let mut fd = None;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            assert_eq!(fds.len(), 1);
            // SAFETY: the kernel just installed this fd in our table for us.
            fd = Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) });
        }
    }
    let n = msg.bytes;
    (
        String::from_utf8_lossy(&buf[..n]).into_owned(),
        fd.expect("an SCM_RIGHTS fd"),
    )
}

/// A command running on a new pseudo-terminal, in the foreground of its
/// own session (as a job of a login shell is), with the terminal's output
/// collected by a thread.
#[derive(Debug)]
pub struct OnTerminal {
    /// The command.
    pub child: Child,
    master: std::fs::File,
    output: std::sync::Arc<std::sync::Mutex<String>>,
    /// Tells the reader thread to stop (and close its copy of the master).
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl OnTerminal {
    /// Starts `cmd` on a new pseudo-terminal.
    pub fn spawn(mut cmd: Command) -> OnTerminal {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // Close-on-exec from the start (not openpty): children that other
        // tests start meanwhile must not inherit the master, or closing it
        // here would not hang the terminal up.
        use nix::fcntl::OFlag;
        let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let pty_master = nix::pty::posix_openpt(flags).unwrap();
        nix::pty::grantpt(&pty_master).unwrap();
        nix::pty::unlockpt(&pty_master).unwrap();
        let slave_path = nix::pty::ptsname_r(&pty_master).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(slave_path)
            .unwrap();
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap());
        // A new session whose controlling terminal is the pty (on stdin).
        let hook = || {
            nix::unistd::setsid()?;
            // SAFETY: TIOCSCTTY takes an int argument, no pointer.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: between fork and exec the hook only makes two system
        // calls (setsid, ioctl) and allocates nothing.
        unsafe { cmd.pre_exec(hook) };
        let child = cmd.spawn().unwrap();
        drop(cmd); // its copies of the slave side
        drop(slave);
        let master = std::fs::File::from(std::os::fd::OwnedFd::from(pty_master));
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (mut reader, out) = (master.try_clone().unwrap(), output.clone());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::spawn(move || {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            use std::os::fd::AsFd;
            let mut buf = [0u8; 4096];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(50u8)).unwrap_or(0) == 0 {
                    continue;
                }
                // EIO once every process has closed the slave side.
                match reader.read(&mut buf) {
                    Ok(n @ 1..) => out
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                    _ => break,
                }
            }
        });
        OnTerminal {
            child,
            master,
            output,
            stop,
            reader: Some(reader),
        }
    }

    /// Closes the master side: the terminal hangs up. Returns the child.
    pub fn hang_up(mut self) -> Child {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        // `self.master` is the last master fd: dropping it hangs up.
        let OnTerminal { child, .. } = self;
        child
    }

    /// Waits until the terminal has shown `want`.
    pub fn expect(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.output.lock().unwrap().contains(want) {
            assert!(
                Instant::now() < deadline,
                "no {want:?} on the terminal: {:?}",
                self.output.lock().unwrap()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// Types `keys` at the terminal.
    pub fn type_keys(&self, keys: &str) {
        use std::io::Write;
        (&self.master).write_all(keys.as_bytes()).unwrap();
    }

    /// Everything the terminal has shown so far.
    pub fn text(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

/// A count from the environment variable `var` (a test's or bench's knob
/// for a longer run), `default` when unset or not a number.
pub fn env_count(var: &str, default: usize) -> usize {
    bench::env_or(var, default)
}

/// A small xorshift generator for the random choices of the kill tests.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the environment variable `var` if set, else from the
    /// clock; the seed is printed (`{label}: {var}=N`) so a failed run can
    /// be replayed.
    pub fn seeded(var: &str, label: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("{label}: {var}={seed}");
        Rng(seed)
    }

    /// An independent generator derived from this one and `salt` (one per
    /// thread of a test, each replayable from the printed seed).
    pub fn fork(&self, salt: u64) -> Rng {
        Rng(self.0 ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Makes the child `cmd` starts die with SIGKILL when the thread that
/// spawns it ends (spawn from the main thread, which lives as long as the
/// process), or at once if this process is already gone: shm-fd's.
pub use shm_fd::process::die_with_parent;

/// The longest a [`Kid`] waits unless told otherwise: for its end after
/// a SIGKILL ([`Kid::kill`]) or a successful end ([`Kid::success`]), to
/// stop ([`Kid::stop`]), for a line on its stderr
/// ([`Kid::wait_for_stderr`]). Far above what any step needs, even on two
/// cores shared with the rest of the suite.
pub const BOUND: Duration = Duration::from_secs(60);

/// Whether `status` is a death by SIGKILL.
pub fn killed(status: ExitStatus) -> bool {
    status.signal() == Some(libc::SIGKILL)
}

/// The state of process `pid` (field 3 of `/proc/PID/stat`: `R`, `S`,
/// `T`, `Z`, ...), if it exists.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// What a process is doing, for a failure message: each thread's state
/// and kernel wait channel (`pid N is gone` once it is reaped).
pub fn describe(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("pid {pid} is gone");
    };
    let mut threads = Vec::new();
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .unwrap_or('?');
        let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
        threads.push(format!("tid {tid} {state} in {wchan}"));
    }
    threads.join("; ")
}

/// CPU time (user + system, every thread) of process `pid` so far; panics
/// if it is gone.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|w| w.parse().unwrap())
        .collect();
    // SAFETY: sysconf reads a constant of the system.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / tick)
}

/// Puts `fd` on fd 3 of the child `cmd` starts (close-on-exec cleared),
/// as `shm-fd` passes its memfd.
fn on_fd_3(cmd: &mut Command, fd: RawFd) {
    let hook = move || {
        // SAFETY: fcntl and dup2 are async-signal-safe system calls on
        // integers; nothing is allocated between fork and exec.
        let failed = unsafe {
            if fd == 3 {
                // Already on 3: only close-on-exec to clear.
                libc::fcntl(3, libc::F_SETFD, 0) == -1
            } else {
                libc::dup2(fd, 3) == -1
            }
        };
        if failed {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: between fork and exec the hook makes only async-signal-safe
    // system calls (fcntl or dup2) and allocates nothing.
    unsafe { cmd.pre_exec(hook) };
}

/// A process a test started: its own child, with stdout and stderr in
/// files, SIGKILLed when the thread that started it ends
/// ([`die_with_parent`]). Signals go to its pid only while it is not
/// reaped (so the pid is still its); dropping it kills (SIGKILL) and reaps
/// it. Every wait is bounded and fails the test saying its label and pid,
/// what it was doing ([`describe`]), the test's own context for it
/// ([`Kid::with_context`]) and its stderr.
pub struct Kid {
    child: Child,
    label: String,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
    started: Instant,
    context: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

impl std::fmt::Debug for Kid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kid")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Kid {
    /// Starts `cmd` with stdin null, output in `dir/LABEL.out` and
    /// `dir/LABEL.err`, SIGKILL when the starting thread ends, and `memfd`
    /// (if any) on fd 3 as `shm-fd` passes it.
    pub fn start(cmd: Command, label: impl Into<String>, dir: &Path, memfd: Option<RawFd>) -> Kid {
        Kid::start_with_stdin(cmd, label, dir, Stdio::null(), memfd)
    }

    /// [`Kid::start`] with stdin `stdin`.
    pub fn start_with_stdin(
        mut cmd: Command,
        label: impl Into<String>,
        dir: &Path,
        stdin: Stdio,
        memfd: Option<RawFd>,
    ) -> Kid {
        let label = label.into();
        let out = dir.join(format!("{label}.out"));
        let err = dir.join(format!("{label}.err"));
        let file = |path: &Path| {
            std::fs::File::create(path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
        };
        cmd.stdin(stdin).stdout(file(&out)).stderr(file(&err));
        die_with_parent(&mut cmd);
        if let Some(fd) = memfd {
            on_fd_3(&mut cmd, fd);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        Kid {
            child,
            label,
            out,
            err,
            status: None,
            started: Instant::now(),
            context: None,
        }
    }

    /// Adds `context` to every failure message about it (called when the
    /// message is made: e.g. the lock words of the memory it works on).
    pub fn with_context(mut self, context: impl Fn() -> String + Send + Sync + 'static) -> Kid {
        self.context = Some(Box::new(context));
        self
    }

    /// Its label (the name of its output files).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Its exit status if it has ended (reaped on the way).
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status
    }

    /// A failure message: `LABEL (pid N) WHAT, T after its start:` what
    /// it is doing, the context, its stderr.
    fn failure(&self, what: &str) -> String {
        let context = self
            .context
            .as_ref()
            .map_or_else(String::new, |c| c() + "; ");
        format!(
            "{} (pid {}) {what}, {:?} after its start: {}; {context}stderr: {}",
            self.label,
            self.pid(),
            self.started.elapsed(),
            describe(self.pid()),
            self.stderr()
        )
    }

    /// Waits for it to end, at most `bound` (`Duration::ZERO`: fails at
    /// once if it still runs); else fails the test, saying what it was
    /// doing.
    pub fn wait(&mut self, bound: Duration) -> ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.poll() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("{}", self.failure(&format!("still runs after {bound:?}")));
            }
            sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL (by pid, unless it ended already) and reap (waiting at
    /// most [`BOUND`]); returns how it ended.
    pub fn kill(&mut self) -> ExitStatus {
        if self.poll().is_none() {
            // Not reaped: the pid is still this child's.
            let _ = self.child.kill();
        }
        self.wait(BOUND)
    }

    /// Sends SIGSTOP (by pid) and waits (at most [`BOUND`]) until it is
    /// stopped; false if it had ended or ends meanwhile (then it is a
    /// zombie, or reaped).
    pub fn stop(&mut self) -> bool {
        if self.poll().is_some() {
            return false;
        }
        // SAFETY: kill(2) on the pid of a child not reaped yet.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGSTOP) };
        let deadline = Instant::now() + BOUND;
        loop {
            match proc_state(self.pid()) {
                Some('T' | 't') => return true,
                Some('Z' | 'X') | None => return false,
                _ => {}
            }
            if Instant::now() >= deadline {
                panic!("{}", self.failure("did not stop"));
            }
            sleep(Duration::from_micros(100));
        }
    }

    /// Sends SIGCONT (by pid) unless it has ended; false if it had.
    pub fn resume(&mut self) -> bool {
        if self.poll().is_some() {
            return false;
        }
        // SAFETY: kill(2) on the pid of a child not reaped yet.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGCONT) };
        true
    }

    /// Waits (at most [`BOUND`]) until its stderr contains `want`; fails
    /// the test if it ends first or never prints it.
    pub fn wait_for_stderr(&mut self, want: &str) {
        let deadline = Instant::now() + BOUND;
        while !self.stderr().contains(want) {
            if let Some(status) = self.poll() {
                // It may have printed it just before it ended.
                assert!(
                    self.stderr().contains(want),
                    "{} ended ({status}) before it printed {want:?}: {}",
                    self.label,
                    self.stderr()
                );
                return;
            }
            if Instant::now() >= deadline {
                panic!("{}", self.failure(&format!("did not print {want:?}")));
            }
            sleep(Duration::from_millis(2));
        }
    }

    /// Waits (at most [`BOUND`]) for a whole line of its stderr that
    /// starts with `prefix`, ended by its newline, and returns the rest of
    /// it: a line written in pieces is never read half-way.
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let err = self.stderr();
            let whole = err.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            if let Some(rest) = whole.into_iter().find_map(|l| l.strip_prefix(prefix)) {
                return rest.trim_end_matches('\n').to_string();
            }
            if let Some(status) = self.poll() {
                panic!(
                    "{} ended ({status}) before it printed a line {prefix:?}...: {}",
                    self.label,
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}",
                    self.failure(&format!("did not print a line {prefix:?}..."))
                );
            }
            sleep(Duration::from_millis(2));
        }
    }

    /// The CPU time it uses in the next `d` ([`cpu_time`]); fails the
    /// test if it has ended by then.
    pub fn cpu_during(&mut self, d: Duration) -> Duration {
        let before = cpu_time(self.pid());
        sleep(d);
        let after = cpu_time(self.pid());
        assert!(
            self.poll().is_none(),
            "{} ended: {}",
            self.label,
            self.stderr()
        );
        after - before
    }

    /// Waits (at most [`BOUND`]) and checks that it exited 0 and did not
    /// panic (no `panicked` on stderr); returns its stdout and stderr.
    pub fn success(&mut self) -> (String, String) {
        self.success_with("no panic", |_, e| !e.contains("panicked"))
    }

    /// Waits (at most [`BOUND`]) and checks that it exited 0 and that
    /// `ok(stdout, stderr)` holds, else fails the test saying `expected`,
    /// its status, stdout and stderr; returns its stdout and stderr.
    pub fn success_with(
        &mut self,
        expected: &str,
        ok: impl FnOnce(&str, &str) -> bool,
    ) -> (String, String) {
        let status = self.wait(BOUND);
        let (o, e) = (self.stdout(), self.stderr());
        assert!(
            status.success() && ok(&o, &e),
            "{} (pid {}): {status}, expected {expected}\nstdout: {o}\nstderr: {e}",
            self.label,
            self.pid()
        );
        (o, e)
    }

    /// What it has written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// What it has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if self.poll().is_none() {
            // Not reaped: the pid is still this child's.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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

    /// A [`Kid`](super::Kid) that outlives its wait fails the test naming
    /// itself, its pid and the test's context; one killed dies by
    /// SIGKILL, is reaped, and is not signalled again.
    #[test]
    fn a_kid_is_bounded_killed_by_pid_and_reaped() {
        use super::{Kid, killed};
        use std::process::Command;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let mut c = Command::new("sh");
        c.args(["-c", "echo up >&2; exec sleep 600"]);
        let mut kid = Kid::start(c, "sleeper", dir.path(), None).with_context(|| "ctx".into());
        kid.wait_for_stderr("up\n");
        assert!(kid.stop() && kid.resume());
        let pid = kid.pid();
        let hung = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            kid.wait(Duration::ZERO);
        }))
        .unwrap_err();
        let msg = hung.downcast_ref::<String>().unwrap();
        assert!(
            msg.starts_with(&format!("sleeper (pid {pid}) still runs after 0ns, "))
                && msg.ends_with("; ctx; stderr: up\n"),
            "{msg}"
        );
        assert!(killed(kid.kill()));
        assert!(killed(kid.kill()) && !kid.stop() && !kid.resume());
    }
}
