//! Lines with a descriptor attached (SCM_RIGHTS) on the control stream: `ready-fd` carries
//! the detached mount from sifuse to the launcher, `serve-fd` a /dev/fuse descriptor from
//! the launcher to sifuse.
//!
//! Lines are read one byte per recvmsg: the kernel attaches a descriptor to the first byte
//! of the message it was sent with, and reading no further than the newline leaves
//! whatever follows (with its own descriptors) for the next read. Lines are short.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

/// The longest line accepted, newline included.
const MAX_LINE: usize = 4096;

/// A line, without its newline, and the descriptors that came with it.
#[derive(Debug)]
pub struct Received {
    pub line: String,
    pub fds: Vec<OwnedFd>,
}

/// Send `line` (a newline is added) with `fd` attached, as one message.
pub fn send_line_with_fd(socket: BorrowedFd<'_>, line: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
    let data = format!("{line}\n");
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let mut sent = 0;
    while sent < data.len() {
        let iov = [IoSlice::new(&data.as_bytes()[sent..])];
        // The descriptor goes with the first part only.
        let cmsgs: &[ControlMessage] = if sent == 0 { &cmsg } else { &[] };
        match sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Read one line and the descriptors sent with it (close-on-exec). None at end of file
/// before any byte.
pub fn recv_line(socket: BorrowedFd<'_>) -> io::Result<Option<Received>> {
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let msg = match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => other?,
        };
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process;
                // nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more descriptors than expected came with a message",
            ));
        }
        if n == 0 {
            if bytes.is_empty() && fds.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "end of file inside a line",
            ));
        }
        if byte[0] == b'\n' {
            let line = String::from_utf8(bytes)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a line not in UTF-8"))?;
            let line = line.strip_suffix('\r').map(str::to_string).unwrap_or(line);
            return Ok(Some(Received { line, fds }));
        }
        bytes.push(byte[0]);
        if bytes.len() >= MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a line longer than 4096 bytes",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_travels_with_its_line_and_the_next_line_stays() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        send_line_with_fd(a.as_fd(), "ready-fd", pipe_w.as_fd()).unwrap();
        drop(pipe_w);
        (&a).write_all(b"plain\r\n").unwrap();
        drop(a);
        let got = recv_line(b.as_fd()).unwrap().unwrap();
        assert_eq!(got.line, "ready-fd");
        assert_eq!(got.fds.len(), 1);
        // The received descriptor is the pipe's write end: what goes in comes out.
        std::fs::File::from(got.fds.into_iter().next().unwrap())
            .write_all(b"x")
            .unwrap();
        let mut buf = [0u8; 1];
        std::fs::File::from(pipe_r).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");
        let next = recv_line(b.as_fd()).unwrap().unwrap();
        assert_eq!((next.line.as_str(), next.fds.len()), ("plain", 0));
        assert!(recv_line(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn a_line_cut_short_or_too_long_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"half").unwrap();
        drop(a);
        let err = recv_line(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[b'x'; MAX_LINE + 1]).unwrap();
        let err = recv_line(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
