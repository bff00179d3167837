//! Zero-copy sending of a stored blob: `sendfile(2)` from the blob's file straight into
//! the client's socket.
//!
//! Writing a mapped blob through the session copies every byte from the page cache into
//! the socket; `sendfile` hands the kernel the page-cache pages instead. On a loopback
//! pull that copy was half of berth's CPU time per byte.
//!
//! Only a plain HTTP/1 connection qualifies: there the bytes on the socket after the
//! response header are the body itself. Over TLS or HTTP/2 they are not, and the body
//! goes through the session.

use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use pingora::protocols::http::ServerSession;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The most one `sendfile` call is asked to send, so that one connection does not hold
/// its thread for long.
const MAX_PER_CALL: usize = 4 << 20;

/// A duplicate of a client's socket descriptor, registered for write readiness.
pub struct Socket(AsyncFd<OwnedFd>);

impl Socket {
    /// The session's socket, if the session is plain HTTP/1 over a socket.
    pub fn of(session: &ServerSession) -> Option<Socket> {
        // `None` for HTTP/2 and subrequests.
        let stream = session.stream()?;
        if stream.get_ssl().is_some() || stream.get_ssl_digest().is_some() {
            return None;
        }
        register_duplicate(stream.id(), stream).ok().map(Socket)
    }

    /// Sends bytes `start..end` of `file`, waiting at most `timeout` each time the socket
    /// is full. Returns how many bytes were sent; an error leaves the response cut short
    /// and the connection must be closed.
    pub async fn send_file(
        &self,
        file: &File,
        start: u64,
        end: u64,
        timeout: Duration,
        sent: &mut u64,
    ) -> io::Result<()> {
        let mut offset = i64::try_from(start).map_err(io::Error::other)?;
        let end = i64::try_from(end).map_err(io::Error::other)?;
        while offset < end {
            let count = ((end - offset) as usize).min(MAX_PER_CALL);
            let mut ready = tokio::time::timeout(timeout, self.0.writable())
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read nothing for {timeout:?}"),
                    )
                })??;
            let before = offset;
            match ready.try_io(|fd| {
                nix::sys::sendfile::sendfile(fd.get_ref(), file, Some(&mut offset), count)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the blob file is shorter than its recorded size",
                    ))
                }
                Ok(Ok(_)) => *sent += (offset - before) as u64,
                Ok(Err(e)) => return Err(e),
                // Not writable after all: readiness was cleared; wait again.
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Duplicates the descriptor `fd` of `owner` and registers the duplicate with the
/// reactor, so that the registration of `owner`'s own descriptor is not disturbed.
#[allow(unsafe_code)]
fn register_duplicate<T: ?Sized>(fd: i32, owner: &T) -> io::Result<AsyncFd<OwnedFd>> {
    let _ = owner;
    // SAFETY: `fd` is the open descriptor of the stream `owner`, which is borrowed for
    // the whole of this call, so the descriptor stays open while it is duplicated.
    let duplicate = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // SAFETY: `duplicate` owns a valid descriptor, and it is neither replaced nor closed
    // while the `AsyncFd` owns it.
    Ok(unsafe { AsyncFd::register_with_interest(duplicate, Interest::WRITABLE) }?)
}
