//! Passing descriptors over a Unix socket (`SCM_RIGHTS`).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Sends `bytes` on `stream` with `fds` attached (at most [`MAX_FDS`]);
/// returns the bytes sent.
pub fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let control = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &control };
    Ok(sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(bytes)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

/// Receives into `buffer` from `stream`, with the descriptors attached
/// (close-on-exec); returns the bytes received (0 at the end of the stream).
pub fn recv_with_fds(stream: &UnixStream, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buffer)];
    let message = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for received in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = received {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in this process for
                // this message; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((message.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_descriptor_sent_arrives_as_the_same_file() {
        let (left, right) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        assert_eq!(send_with_fds(&left, b"x", &[file.as_fd()]).unwrap(), 1);
        let mut buffer = [0u8; 4];
        let (read, fds) = recv_with_fds(&right, &mut buffer).unwrap();
        assert_eq!((read, buffer[0], fds.len()), (1, b'x', 1));
        let sent = nix::sys::stat::fstat(file.as_fd()).unwrap();
        let got = nix::sys::stat::fstat(fds[0].as_fd()).unwrap();
        assert_eq!((sent.st_dev, sent.st_ino), (got.st_dev, got.st_ino));
    }
}
