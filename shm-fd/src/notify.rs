//! Uploading the memfd to systemd's file descriptor store (`sd_notify`
//! with `FDSTORE=1`), so the state outlives the service's processes.

use std::ffi::OsStr;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket,
};

use crate::env::check_name;
use crate::error::{Error, Result};

/// Sends `FDSTORE=1` and `FDNAME=<name>` with `fd` attached (SCM_RIGHTS) to
/// the notification socket named by `notify_socket` (the value of
/// `NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract socket).
pub fn notify_fd_store(notify_socket: &OsStr, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
    check_name(name).map_err(|reason| Error::InvalidName {
        name: name.to_owned(),
        reason,
    })?;
    let bytes = notify_socket.as_encoded_bytes();
    let addr = match bytes.first() {
        Some(b'/') => UnixAddr::new(notify_socket),
        Some(b'@') => UnixAddr::new_abstract(&bytes[1..]),
        _ => {
            return Err(Error::InvalidVariable {
                var: "NOTIFY_SOCKET",
                value: notify_socket.to_string_lossy().into_owned(),
                reason: "is neither an absolute path nor an @abstract name".into(),
            });
        }
    }
    .map_err(|e| Error::io("NOTIFY_SOCKET address", e))?;
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("socket(AF_UNIX)", e))?;
    let message = format!("FDSTORE=1\nFDNAME={name}\n");
    let fds = [fd.as_raw_fd()];
    sendmsg(
        sock.as_raw_fd(),
        &[IoSlice::new(message.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )
    .map_err(|e| Error::io("sendmsg to NOTIFY_SOCKET", e))?;
    Ok(())
}
