use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};

/// Most fds one control message carries.
pub const MAX_FDS: usize = 4;

/// Send `data` and `fds` (SCM_RIGHTS) in one message on a Unix stream socket.
///
/// # Errors
/// The socket's error (EAGAIN on a non-blocking socket whose buffer is full).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

/// Receive into `buf`, collecting up to [`MAX_FDS`] passed fds (close-on-exec).
/// Returns the byte count (0 at EOF) and the fds now owned by the caller.
///
/// # Errors
/// The socket's error; a truncated control message is an error (its fds are closed).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    // A signal to this process (the app's runtime may use them) interrupts
    // the wait for the proxy's answer: wait again.
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.map_err(io::Error::from)?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(rs) = c {
            for r in rs {
                fds.push(adopt(r));
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many fds passed",
        ));
    }
    Ok((msg.bytes, fds))
}

#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel just installed `fd` in this process for the
    // SCM_RIGHTS message we received; nothing else owns or will close it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Credentials of the process at the other end of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// process id
    pub pid: i32,
    /// user id
    pub uid: u32,
    /// group id
    pub gid: u32,
}

/// SO_PEERCRED of a connected Unix socket.
///
/// # Errors
/// The getsockopt error.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let c = getsockopt(&sock, sockopt::PeerCredentials).map_err(io::Error::from)?;
    Ok(PeerCred {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}
