//! `clients worker`: one client of `clients run`. It opens the state,
//! says `ready`, waits for the end of its stdin (the start signal), then
//! gets and inserts until its time is up, checking every value it reads,
//! and prints its [`Report`].

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use shm_state::{Layout, SharedState, Source};

use crate::{Corrupt, Fail, MEMFD_NAME, Report, Root, Value, key_of, mix, with_damage_code};

/// The options `run` gives a client.
#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// This client's number: it owns the keys `(slot << 32) | n`.
    #[arg(long)]
    pub(crate) slot: u32,
    /// How long to run after the start signal, in seconds.
    #[arg(long)]
    seconds: f64,
    /// The fraction of operations that are gets.
    #[arg(long)]
    get_ratio: f64,
    /// The state's file (otherwise the memfd passed on LISTEN_FDS).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Damage this client's keys after the last operation (tests the
    /// final check).
    #[arg(long)]
    corrupt: Option<Corrupt>,
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A client at work.
struct Client {
    state: SharedState<Root>,
    root: Root,
    slot: u64,
    /// Key number -> the number of this client's last insert of it.
    last: HashMap<u64, u64>,
    report: Report,
    rng: Rng,
}

impl Client {
    /// Gets a random key of a random client and checks the value: well
    /// formed for the key, and for one of this client's own keys, its last
    /// insert of it.
    fn get(&mut self) -> Result<(), Fail> {
        let owner = self.rng.below(self.root.clients);
        let n = self.rng.below(self.root.keys);
        let key = key_of(owner, n);
        let map = self.root.map;
        let got = self
            .state
            .read(|v| v.map(map)?.get(&key))
            .map_err(with_damage_code(1))?;
        self.report.gets += 1;
        let mine = (owner == self.slot).then(|| self.last.get(&n).copied().unwrap_or(0));
        match got {
            Some(v) => {
                self.report.hits += 1;
                if !v.well_formed_for(key) {
                    let whose = match mine {
                        Some(_) => "its own".to_owned(),
                        None => format!("client {owner}'s"),
                    };
                    return Err(Fail(
                        1,
                        format!(
                            "a get of {whose} key #{n} returned a torn value or one of another key: {v:?}"
                        ),
                    ));
                }
                if let Some(last) = mine
                    && v.seq != last
                {
                    return Err(Fail(
                        1,
                        format!(
                            "a get of its own key #{n} returned insert #{}, and its last insert of it was #{last}",
                            v.seq
                        ),
                    ));
                }
            }
            None => {
                if let Some(last @ 1..) = mine {
                    return Err(Fail(
                        1,
                        format!("its own key #{n} is missing after its insert #{last} of it"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Inserts key `n` of this client's, one transaction; returns the
    /// insert's number.
    fn put(&mut self, n: u64) -> Result<u64, Fail> {
        let seq = self.report.inserts + 1;
        let key = key_of(self.slot, n);
        let map = self.root.map;
        self.state
            .transaction(|tx| tx.map(map)?.insert(&key, &Value::new(key, seq)))
            .map_err(with_damage_code(1))?;
        self.report.inserts = seq;
        self.last.insert(n, seq);
        Ok(seq)
    }

    /// Damages key #0 as `how` says, without recording it.
    fn corrupt(&mut self, how: Corrupt) -> Result<(), Fail> {
        let key = key_of(self.slot, 0);
        let map = self.root.map;
        let older = self.put(0)?;
        let last = self.put(0)?;
        self.state
            .transaction(|tx| {
                let mut m = tx.map(map)?;
                match how {
                    Corrupt::Stale => m.insert(&key, &Value::new(key, older)),
                    Corrupt::Lose => m.remove(&key),
                    Corrupt::Torn => {
                        let torn = Value {
                            check: !Value::new(key, last).check,
                            ..Value::new(key, last)
                        };
                        m.insert(&key, &torn)
                    }
                }
            })
            .map_err(with_damage_code(1))?;
        Ok(())
    }

    /// The report: counts, and the keys written with the digest of their
    /// last values.
    fn finish(mut self) -> Report {
        let stats = self.state.stats();
        self.report.keys = self.last.len() as u64;
        self.report.digest = self.last.iter().fold(0u64, |d, (&n, &seq)| {
            d.wrapping_add(mix(key_of(self.slot, n), seq))
        });
        self.report.retries = stats.read_retries;
        self.report.locked = stats.locked_reads;
        self.report.recoveries = stats.recoveries;
        self.report
    }
}

/// The state's source: the file, or the memfd `run` passed on fd 3.
fn source(args: &WorkerArgs) -> Result<Source, Fail> {
    Ok(match &args.file {
        Some(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Fail(3, format!("{}: {e}", path.display())))?;
            // SAFETY: the file is the one `run` created for this run; only
            // its clients use it, all through shm-state (whose writer lock
            // orders their writes), and nothing truncates it.
            unsafe { Source::file(file) }
        }
        None => {
            // SAFETY: called first thing, before the client opens any file
            // of its own: the fd LISTEN_FDS names was inherited and has no
            // owner.
            let fd = unsafe { shm_fd::SharedFd::from_env(MEMFD_NAME) }?;
            // SAFETY: `run` created the memfd sealed against shrinking and
            // passed it to its clients only, which write it through
            // shm-state only.
            unsafe { Source::shared(fd) }
        }
    })
}

/// Blocks until stdin ends: `run` closes the pipe's write end to start
/// every client at once.
fn wait_for_start() -> Result<(), Fail> {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Fail(3, format!("waiting for the start: {e}"))),
        }
    }
}

/// `clients worker`.
pub(crate) fn main(args: &WorkerArgs) -> Result<(), Fail> {
    let source = source(args)?;
    let seconds = Duration::try_from_secs_f64(args.seconds)
        .map_err(|e| Fail(2, format!("--seconds {}: {e}", args.seconds)))?;
    if !(0.0..=1.0).contains(&args.get_ratio) {
        return Err(Fail(
            2,
            format!("--get-ratio {}: not a fraction", args.get_ratio),
        ));
    }
    let mut state =
        SharedState::<Root>::open(source, Layout::new(1)).map_err(with_damage_code(1))?;
    let root = state.read(|v| v.root()).map_err(with_damage_code(1))?;
    let slot = u64::from(args.slot);
    if root.map.is_null() || root.keys == 0 || slot >= root.clients {
        return Err(Fail(
            3,
            format!(
                "the state is not set up for client {slot} ({} clients, {} keys each)",
                root.clients, root.keys
            ),
        ));
    }
    // A parent gone (the pipe closed) ends the client too.
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    wait_for_start()?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ slot.rotate_left(40);
    let mut client = Client {
        state,
        root,
        slot,
        last: HashMap::new(),
        report: Report::default(),
        rng: Rng(seed | 1),
    };
    if args.corrupt == Some(Corrupt::Torn) {
        client.corrupt(Corrupt::Torn)?;
    }
    let deadline = Instant::now() + seconds;
    while Instant::now() < deadline {
        if client.rng.unit() < args.get_ratio {
            client.get()?;
        } else {
            let n = client.rng.below(client.root.keys);
            // The torn value stays for the gets to find.
            if n == 0 && args.corrupt == Some(Corrupt::Torn) {
                continue;
            }
            client.put(n)?;
        }
    }
    if let Some(how @ (Corrupt::Stale | Corrupt::Lose)) = args.corrupt {
        client.corrupt(how)?;
    }
    writeln!(out, "{}", client.finish().line())?;
    Ok(())
}
