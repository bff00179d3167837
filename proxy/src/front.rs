//! The front of every HTTP/1.1 connection: answers from the memo without Pingora's
//! request machinery, and hands everything else to Pingora.
//!
//! Pingora turns each request into an `http` request header (every header name and value
//! copied into a map, with a second map of their original case), serializes the response
//! through another map, and arms a timer per read. That is as much work as nginx does for
//! a whole request (see `loadtests/RESULTS.md`). A node asks for the same few manifests
//! over and over, and the memo already holds those answers whole, so this front parses
//! the request head itself (with `httparse`, as Pingora does) and, when the memo has the
//! answer, writes the remembered head and body in one write.
//!
//! This is the only place the memo answers, and only a request whose meaning is plain:
//! an HTTP/1.1 `GET` or `HEAD` under `/v2/`, with no `Authorization`, no body (no
//! `Content-Length` or `Transfer-Encoding`), no `Expect` or `Upgrade`, no `Connection`
//! other than `keep-alive`, at most one `Host` (without user information), and not while
//! berth is draining.
//! Anything else, a head this cannot parse, and every answer the memo does not have go to
//! Pingora's HTTP session with the bytes already read, exactly as Pingora would have read
//! them. The connection comes back here after Pingora's answer if it is kept. HTTP/2
//! connections go to Pingora whole.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_cache::Outcome;
use bytes::{Buf, BytesMut};
use pingora::apps::ServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::{App, Served, CLIENT_WRITE_TIMEOUT};

/// How long a kept connection waits for its next request, as Pingora's sessions do.
const KEEPALIVE: Duration = Duration::from_secs(60);

/// A request head longer than this is left to Pingora, whose own limits then apply.
const HEAD_MAX: usize = 8 << 10;

/// Headers parsed here; a request with more is left to Pingora.
const HEADERS_MAX: usize = 32;

/// Room asked for before each read, and what an idle connection holds: most request heads
/// are read whole in one read (one with a long bearer token may take two).
const READ_ROOM: usize = 2 << 10;

/// The berth application behind its HTTP/1.1 front.
pub(crate) struct Front {
    pub(crate) app: Arc<App>,
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.app.process_new(stream, shutdown).await;
        }
        let mut conn = Conn {
            stream,
            buf: BytesMut::new(),
            out: Vec::new(),
        };
        loop {
            let started = Instant::now();
            let draining = *shutdown.borrow();
            match parse(&self.app, &conn.buf, &mut conn.out, draining) {
                Parsed::Answer(fast) => {
                    if !self.answer(&mut conn, fast, started).await {
                        return None;
                    }
                }
                Parsed::Incomplete if conn.buf.len() < HEAD_MAX => {
                    if conn.buf.is_empty() {
                        // Between requests an idle connection holds no answer's buffer.
                        conn.out = Vec::new();
                    }
                    if conn.buf.capacity() - conn.buf.len() < READ_ROOM / 4 {
                        conn.buf.reserve(READ_ROOM);
                    }
                    let read = conn.stream.read_buf(&mut conn.buf);
                    match pingora::time::timeout(KEEPALIVE, read).await {
                        Ok(Ok(n)) if n > 0 => {}
                        // Closed, failed, or idle past the keep-alive time.
                        _ => return None,
                    }
                }
                parsed => {
                    let prefix = match parsed {
                        // Only this request goes to Pingora: what follows it stays here.
                        Parsed::Other {
                            bodyless: Some(len),
                        } => conn.buf.split_to(len),
                        _ => conn.buf.split(),
                    };
                    // Boxed: Pingora's session and berth's handlers are a large future,
                    // which a connection waiting here for its next request should not hold.
                    conn = Box::pin(self.to_pingora(conn, prefix, shutdown)).await?;
                }
            }
        }
    }
}

/// A connection between requests.
struct Conn {
    stream: Stream,
    /// Bytes read and not yet answered: the start of the next request, or more.
    buf: BytesMut,
    /// The response being written, kept for the next one.
    out: Vec<u8>,
}

/// A request the memo answered, with its response in [`Conn::out`].
struct Fast {
    /// The request head's length in [`Conn::buf`].
    len: usize,
    head_only: bool,
    path: Range<usize>,
    query: Option<Range<usize>>,
    length: u64,
    upstream: &'static str,
}

enum Parsed {
    /// The memo's answer is in `out`.
    Answer(Fast),
    /// The head is not all here yet.
    Incomplete,
    /// For Pingora. `bodyless`: the head's length, when the request has no body.
    Other { bodyless: Option<usize> },
}

impl Front {
    /// Writes the answer, then counts and logs it. False when the connection is done.
    async fn answer(&self, conn: &mut Conn, fast: Fast, started: Instant) -> bool {
        let _serving = self.app.in_flight.enter();
        let out = &conn.out;
        let stream = &mut conn.stream;
        let written = pingora::time::timeout(CLIENT_WRITE_TIMEOUT, async move {
            stream.write_all(out).await?;
            stream.flush().await
        })
        .await;
        let complete = matches!(written, Ok(Ok(())));
        conn.out.clear();
        let served = Served {
            status: 200,
            bytes: if complete && !fast.head_only {
                fast.length
            } else {
                0
            },
            outcome: Some(Outcome::Hit),
            complete,
        };
        let text = |r: Range<usize>| std::str::from_utf8(&conn.buf[r]).unwrap_or("");
        self.app.record(
            started,
            "manifest",
            Some(fast.upstream),
            "-",
            served,
            (
                if fast.head_only { "HEAD" } else { "GET" },
                text(fast.path.clone()),
                fast.query.clone().map(text),
            ),
        );
        conn.buf.advance(fast.len);
        complete
    }

    /// One request on Pingora's HTTP session, starting with `prefix`; the connection
    /// back if Pingora keeps it.
    async fn to_pingora(
        &self,
        conn: Conn,
        prefix: BytesMut,
        shutdown: &ShutdownWatch,
    ) -> Option<Conn> {
        let Conn {
            stream,
            mut buf,
            out,
        } = conn;
        let mut session = ServerSession::new_http1(stream);
        let draining = *shutdown.borrow();
        session.set_keepalive(if draining { None } else { Some(60) });
        if !prefix.is_empty() {
            session.set_pipelined_prefix(prefix);
        }
        let (reusable, _) = self.app.serve_session(session, shutdown).await?;
        let (stream, overread) = reusable.into_parts();
        if let Some(overread) = overread {
            // Bytes Pingora read past its request (it only keeps them with pipelining
            // on): it read them from the connection after the front read `buf`.
            buf.extend_from_slice(&overread);
        }
        Some(Conn { stream, buf, out })
    }
}

/// What to do with the bytes at the start of `buf`: if they are a whole request that
/// the memo answers, its answer is written into `out`.
fn parse(app: &App, buf: &[u8], out: &mut Vec<u8>, draining: bool) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        // Too many headers, or not HTTP: Pingora answers as it always has.
        Err(_) => return Parsed::Other { bodyless: None },
    };
    let mut bodyless = true;
    let mut plain = true;
    let mut accepts: [&str; 4] = [""; 4];
    let mut n_accepts = 0;
    let mut hosts = 0;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            bodyless = false;
        } else if name.eq_ignore_ascii_case("accept") {
            match header_text(h.value) {
                Some(v) if n_accepts < accepts.len() => {
                    accepts[n_accepts] = v;
                    n_accepts += 1;
                }
                _ => plain = false,
            }
        } else if name.eq_ignore_ascii_case("host") {
            // Pingora refuses a second Host, and user information in one.
            hosts += 1;
            plain &= hosts == 1 && !h.value.contains(&b'@');
        } else if name.eq_ignore_ascii_case("connection") {
            plain &= h.value.eq_ignore_ascii_case(b"keep-alive");
        } else if name.eq_ignore_ascii_case("authorization")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            plain = false;
        }
    }
    let other = Parsed::Other {
        bodyless: bodyless.then_some(len),
    };
    let head_only = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return other,
    };
    let Some(target) = req.path else {
        return other;
    };
    if !plain || !bodyless || draining || req.version != Some(1) || !plain_target(target) {
        return other;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let answered = crate::memo::answer(
        &app.cache,
        path,
        query,
        accepts[..n_accepts].iter().copied(),
        head_only,
        out,
        |out| {
            out.extend_from_slice(b"Date: ");
            out.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
            out.extend_from_slice(b"\r\nConnection: keep-alive\r\n\r\n");
        },
    );
    let Some(answered) = answered else {
        return other;
    };
    let at = |s: &str| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    Parsed::Answer(Fast {
        len,
        head_only,
        path: at(path),
        query: query.map(at),
        length: answered.length,
        upstream: answered.upstream,
    })
}

/// A request target that Pingora would take as it is: an absolute path under `/v2/`
/// of visible ASCII, with no fragment.
fn plain_target(t: &str) -> bool {
    t.starts_with("/v2/") && t.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
}

/// A header value as `http::HeaderValue::to_str` reads it: visible ASCII, spaces and tabs.
fn header_text(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_taken_as_they_are() {
        assert!(plain_target("/v2/docker.io/library/nginx/manifests/1.27"));
        assert!(plain_target(
            "/v2/library/nginx/manifests/latest?ns=docker.io"
        ));
        assert!(!plain_target("/v2/x/manifests/a b"));
        assert!(!plain_target("/v2/x/manifests/a#b"));
        assert!(!plain_target("http://host/v2/x/manifests/a"));
        assert!(!plain_target("/v3/x"));
        assert!(!plain_target("/v2/x/manifests/\u{e9}"));
    }

    #[test]
    fn header_text_is_what_http_reads() {
        assert_eq!(header_text(b"a/b, c/d;q=0.5"), Some("a/b, c/d;q=0.5"));
        assert_eq!(header_text(b"a\tb"), Some("a\tb"));
        assert_eq!(header_text(b"a\x7fb"), None);
        assert_eq!(header_text("\u{e9}".as_bytes()), None);
        for v in ["a/b, c/d;q=0.5", "a\tb"] {
            let h = http::HeaderValue::from_str(v).unwrap();
            assert_eq!(h.to_str().ok(), header_text(v.as_bytes()));
        }
    }
}
