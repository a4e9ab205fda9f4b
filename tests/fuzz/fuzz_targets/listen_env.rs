//! `LISTEN_FDS` / `LISTEN_FDNAMES` / `LISTEN_PID` parsing, fd name rules,
//! and the size and duration parsers of the command lines: any input gives
//! `Ok` or a one-line error, and what is accepted obeys the documented
//! rules and parses back to itself.
#![no_main]

use std::ffi::OsStr;

use libfuzzer_sys::fuzz_target;
use shm_fd::{ListenEnv, MAX_LISTEN_FDS, MAX_NAME_LEN};
use shm_fd_fuzz::split_listen_env;

fn one_line(message: &str) {
    assert!(
        !message.contains('\n'),
        "a message of several lines: {message}"
    );
}

fn check_parse(fds: Option<&OsStr>, names: Option<&OsStr>, pid: Option<&OsStr>) {
    let env = match ListenEnv::parse(fds, names, pid) {
        Ok(env) => env,
        Err(e) => return one_line(&e.to_string()),
    };
    let Some(env) = env else {
        assert!(fds.is_none(), "LISTEN_FDS={fds:?} ignored");
        return;
    };
    let count: usize = fds
        .and_then(OsStr::to_str)
        .and_then(|s| s.parse().ok())
        .expect("an accepted LISTEN_FDS is a number");
    assert_eq!(env.len(), count);
    assert!(count <= MAX_LISTEN_FDS);
    assert_eq!(env.is_empty(), count == 0);
    for (i, name) in env.names().iter().enumerate() {
        assert!(name.len() <= MAX_NAME_LEN, "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii() && !b.is_ascii_control() && b != b':'),
            "{name:?}"
        );
        let first = env.position(name).expect("a name is found");
        assert!(first <= i);
        assert_eq!(env.fd_of(name), Some(3 + first as i32));
    }
    if let Some(p) = env.pid() {
        assert!((1..=i32::MAX as u32).contains(&p));
        assert!(env.is_for(p));
        assert!(!env.is_for(p.wrapping_add(1)));
    } else {
        assert!(pid.is_none());
        assert!(env.is_for(1));
    }
    // What was accepted, written back as a producer would, is read again
    // as the same hand-over.
    let fds_again = env.len().to_string();
    let names_again = env.names().join(":");
    let pid_again = env.pid().map(|p| p.to_string());
    let again = ListenEnv::parse(
        Some(OsStr::new(&fds_again)),
        Some(OsStr::new(&names_again)),
        pid_again.as_deref().map(OsStr::new),
    )
    .unwrap_or_else(|e| panic!("{fds_again} / {names_again:?} / {pid_again:?}: {e}"));
    assert_eq!(again.as_ref(), Some(&env));
}

fn check_name(name: &str) {
    match shm_fd::check_name(name) {
        Ok(()) => {
            assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN, "{name:?}");
            assert!(
                name.bytes().all(|b| b.is_ascii_graphic() && b != b':'),
                "{name:?}"
            );
        }
        Err(reason) => one_line(reason),
    }
}

fn check_units(text: &str) {
    match shm_fd::units::parse_size(text) {
        Ok(n) => assert!(n <= i64::MAX as u64, "{text:?} -> {n}"),
        Err(e) => one_line(&e),
    }
    if let Err(e) = shm_fd::units::parse_duration(text) {
        one_line(&e);
    }
}

fuzz_target!(|data: &[u8]| {
    let [fds, names, pid] = split_listen_env(data);
    check_parse(fds, names, pid);
    for value in [fds, names, pid].into_iter().flatten() {
        let text = value.to_string_lossy();
        check_name(&text);
        for part in text.split(':') {
            check_name(part);
        }
        check_units(&text);
    }
});
