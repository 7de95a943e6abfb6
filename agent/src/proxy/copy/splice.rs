//! A bulk transfer between two TCP sockets moved by the kernel: `splice(2)` from the sending
//! socket into a pipe, then from the pipe into the receiving socket. The pipe holds references
//! to the received packets' pages, and the sending side attaches them to its own packets, so the
//! bytes are not copied into this process and out again (HAProxy splices TCP the same way). Used
//! where both ends of a relay are TCP sockets: the same-node handoff (client pod to server pod),
//! plaintext inbound to the app and outbound to destinations outside the mesh.
//!
//! Not with the sk_msg fast path: bytes it redirects into a socket sit in the socket's BPF
//! queue, which only `recvmsg` reads (`tcp_splice_read` reads the receive queue itself), so the
//! proxy turns splicing off when the fast path is on.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// What the pipe holds at most: a transfer moves up to this much per pair of system calls. Its
/// slots are allocated when the pipe is made (one per page: 64 here, about 2.5 KB of kernel
/// memory), its pages are the packets' own.
const PIPE_SIZE: usize = 256 * 1024;

/// Which end of a spliced direction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failed {
    From,
    To,
}

/// How a spliced direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spliced {
    /// The sender's end of stream: finish the other side.
    End,
    /// Splicing is not possible here (no pipe, or the sockets refuse it before any byte moved):
    /// the caller keeps copying.
    Unavailable,
}

/// A pipe's two ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // Below `/proc/sys/fs/pipe-max-size` (1 MiB by default); if refused, the default 64 KiB.
        let _ = nix::fcntl::fcntl(
            write.as_raw_fd(),
            FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int),
        );
        Ok(Pipe { read, write })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves what `from` receives to `to` until `from`'s end of stream or an error, adding each byte
/// sent to `total` and `counter`.
pub(super) async fn rest(
    from: &OwnedReadHalf,
    to: &OwnedWriteHalf,
    counter: &AtomicU64,
    total: &mut u64,
) -> Result<Spliced, Failed> {
    let Ok(pipe) = Pipe::new() else {
        return Ok(Spliced::Unavailable);
    };
    let (src, dst): (&TcpStream, &TcpStream) = (from.as_ref(), to.as_ref());
    let mut moved_any = false;
    loop {
        // The pipe is empty here: EAGAIN can only mean the socket has nothing to read.
        let n = loop {
            from.readable().await.map_err(|_| Failed::From)?;
            let filled = src.try_io(Interest::READABLE, || {
                nix::fcntl::splice(src.as_fd(), None, &pipe.write, None, PIPE_SIZE, flags())
                    .map_err(io::Error::from)
            });
            match filled {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if !moved_any && e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(Spliced::Unavailable)
                }
                Err(_) => return Err(Failed::From),
            }
        };
        if n == 0 {
            return Ok(Spliced::End);
        }
        moved_any = true;
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(|_| Failed::To)?;
            let drained = dst.try_io(Interest::WRITABLE, || {
                nix::fcntl::splice(&pipe.read, None, dst.as_fd(), None, left, flags())
                    .map_err(io::Error::from)
            });
            match drained {
                // The pipe held `left` bytes: nothing sent means the socket cannot take more.
                Ok(0) => return Err(Failed::To),
                Ok(m) => {
                    left -= m;
                    *total += m as u64;
                    counter.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(Failed::To),
            }
        }
    }
}
