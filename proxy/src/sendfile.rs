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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pingora::protocols::http::ServerSession;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

/// The most one `sendfile` call is asked to send, so that one connection does not hold
/// its thread for long.
const MAX_PER_CALL: usize = 4 << 20;

/// The most the first `sendfile` of a response is asked to send. On loopback the client is
/// often woken on the sending core and runs only once the call returns: after a first call
/// of `MAX_PER_CALL` it would read its first byte as late as its four-millionth.
const FIRST_CALL: usize = 128 << 10;

/// A duplicate of a client's socket descriptor, registered for write readiness.
pub struct Socket {
    fd: AsyncFd<OwnedFd>,
    /// `TCP_CORK` is on: the end of the body turns it off.
    corked: AtomicBool,
}

impl Socket {
    /// The session's socket, if the session is plain HTTP/1 over a socket.
    pub fn of(session: &ServerSession) -> Option<Socket> {
        // `None` for HTTP/2 and subrequests.
        let stream = session.stream()?;
        if stream.get_ssl().is_some() || stream.get_ssl_digest().is_some() {
            return None;
        }
        register_duplicate(stream.id(), stream)
            .ok()
            .map(Socket::new)
    }

    fn new(fd: AsyncFd<OwnedFd>) -> Socket {
        Socket {
            fd,
            corked: AtomicBool::new(false),
        }
    }

    /// Sends only full segments from here to the end of the next [`Socket::send_file`],
    /// as nginx's `tcp_nopush` does. Written before a response header, it holds the header
    /// until it can leave in one segment with the body's first bytes; sent alone, the
    /// header reaches the client a round of wakeups before the body.
    ///
    /// Uncorked, the body leaves in many segments short of the MSS. On loopback a 200 MiB
    /// blob went in 12,466 segments rather than 9,625 (15,290 in another run), each with
    /// its receive processing and its ACK, and one stream was a fifth slower than nginx's
    /// (loadtests/RESULTS.md, sixth session).
    pub fn cork(&self) {
        let held = socket2::SockRef::from(self.fd.get_ref()).set_tcp_cork(true);
        self.corked.store(held.is_ok(), Ordering::Relaxed);
    }

    /// Sends whatever `TCP_CORK` holds back (the body's last partial segment), once.
    fn release(&self) {
        if self.corked.swap(false, Ordering::Relaxed) {
            let _ = socket2::SockRef::from(self.fd.get_ref()).set_tcp_cork(false);
        }
    }

    /// Sends bytes `start..end` of `file`, failing if the client takes nothing for
    /// `timeout` while the socket is full. Returns how many bytes were sent; an error
    /// leaves the response cut short and the connection must be closed.
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
        // One timer for the whole body. It is pushed back only when it fires, to the
        // last progress plus `timeout`; a timer per wait would be set and cancelled once
        // per socket buffer.
        let mut progress = Instant::now();
        let deadline = tokio::time::sleep_until(progress + timeout);
        tokio::pin!(deadline);
        // `sent` counts the whole response: a fill's later spans are not its start.
        let mut most = if *sent == 0 { FIRST_CALL } else { MAX_PER_CALL };
        while offset < end {
            let count = ((end - offset) as usize).min(most);
            most = MAX_PER_CALL;
            let mut ready = loop {
                tokio::select! {
                    biased;
                    ready = self.fd.writable() => break ready?,
                    () = &mut deadline => {
                        let due = progress + timeout;
                        if Instant::now() >= due {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("the client read nothing for {timeout:?}"),
                            ));
                        }
                        deadline.as_mut().reset(due);
                    }
                }
            };
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
                Ok(Ok(_)) => {
                    let n = offset - before;
                    *sent += n as u64;
                    progress = Instant::now();
                    // A short send means the socket buffer is full: wait for room
                    // rather than make a call that can only fail with EAGAIN.
                    if (n as usize) < count {
                        ready.clear_ready();
                    }
                }
                Ok(Err(e)) => return Err(e),
                // Not writable after all: readiness was cleared; wait again.
                Err(_) => {}
            }
        }
        self.release();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpSocket, TcpStream};

    const SIZE: usize = 1 << 20;

    /// A blob file, a connected pair whose buffers are small, and the server end wrapped
    /// as `send_file` sees it.
    async fn pair() -> (File, Vec<u8>, Socket, TcpStream, TcpStream) {
        let content: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&content).unwrap();
        let listener = TcpSocket::new_v4().unwrap();
        listener.set_send_buffer_size(16 << 10).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let client = TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(16 << 10).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let socket = Socket::new(register_duplicate(server.as_raw_fd(), &server).unwrap());
        (file, content, socket, server, client)
    }

    #[tokio::test]
    async fn a_slow_reader_gets_the_whole_body_though_it_outlasts_the_timeout() {
        let (file, content, socket, _server, mut client) = pair().await;
        let timeout = Duration::from_millis(1000);
        let reader = tokio::spawn(async move {
            // Small reads with pauses: each pause is well inside the timeout, the whole
            // read is longer than it.
            let mut got = Vec::new();
            let mut piece = vec![0; 32 << 10];
            while got.len() < SIZE {
                let n = client.read(&mut piece).await.unwrap();
                assert_ne!(n, 0, "the connection closed early");
                got.extend_from_slice(&piece[..n]);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            got
        });
        let started = Instant::now();
        let mut sent = 0;
        socket
            .send_file(&file, 0, SIZE as u64, timeout, &mut sent)
            .await
            .expect("a reader that keeps reading is not cut off");
        let got = reader.await.unwrap();
        assert!(
            started.elapsed() > timeout,
            "the read must outlast the timeout for this test to mean anything"
        );
        assert_eq!(sent, SIZE as u64);
        assert!(got == content, "the bytes arrived changed");
    }

    /// A corked header leaves with the body, the bytes arrive whole and in order, and the
    /// socket is not left corked for the next response on the connection.
    #[tokio::test]
    async fn a_held_header_goes_with_the_body_and_the_socket_is_released() {
        let (file, content, socket, server, mut client) = pair().await;
        socket.cork();
        assert!(socket2::SockRef::from(&server).tcp_cork().unwrap());
        let header = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n";
        let reader = tokio::spawn(async move {
            let mut got = vec![0; header.len() + SIZE];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        assert_eq!(server.try_write(header).unwrap(), header.len());
        let mut sent = 0;
        socket
            .send_file(&file, 0, SIZE as u64, Duration::from_secs(10), &mut sent)
            .await
            .unwrap();
        assert!(
            !socket2::SockRef::from(&server).tcp_cork().unwrap(),
            "the socket was left corked"
        );
        let got = reader.await.unwrap();
        assert_eq!(&got[..header.len()], header);
        assert!(
            got[header.len()..] == content[..],
            "the body arrived changed"
        );
    }

    /// The cork stays on while the body is being sent, not only for its first call:
    /// released early, the rest of the body goes in segments short of the MSS.
    #[tokio::test]
    async fn the_cork_is_held_until_the_whole_body_is_sent() {
        let (file, content, socket, server, mut client) = pair().await;
        socket.cork();
        let sender = tokio::spawn(async move {
            let mut sent = 0;
            socket
                .send_file(&file, 0, SIZE as u64, Duration::from_secs(10), &mut sent)
                .await
                .map(|()| sent)
        });
        // Part of the body, after which the sender waits for room with the socket full:
        // its first calls have returned by now.
        let mut got = vec![0; SIZE];
        client.read_exact(&mut got[..64 << 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !sender.is_finished(),
            "the buffers must not hold the whole body"
        );
        assert!(
            socket2::SockRef::from(&server).tcp_cork().unwrap(),
            "the cork was released before the end of the body"
        );
        client.read_exact(&mut got[64 << 10..]).await.unwrap();
        assert_eq!(sender.await.unwrap().unwrap(), SIZE as u64);
        assert!(!socket2::SockRef::from(&server).tcp_cork().unwrap());
        assert!(got == content, "the body arrived changed");
    }

    #[tokio::test]
    async fn a_reader_that_stops_is_cut_off() {
        let (file, _, socket, _server, _client) = pair().await;
        let mut sent = 0;
        let err = socket
            .send_file(&file, 0, SIZE as u64, Duration::from_millis(200), &mut sent)
            .await
            .expect_err("a client that reads nothing must not hold the send forever");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(sent > 0 && sent < SIZE as u64, "sent {sent}");
    }
}
