//! A lean HTTP/1.1 keep-alive client for the `manifests` mode over plain HTTP: one
//! connection per worker, the request's bytes made once, each response parsed with
//! `httparse` in a buffer the connection reuses.
//!
//! The `manifests` mode is a request-rate measurement, and the load generator shares the
//! machine's cores with the server. Through reqwest, a request cost berth-load about
//! 30 µs of CPU (URL parsing, a pooled connection, header maps, a timer per request),
//! three times what `wrk` spends; the harness then measured how much CPU it left the
//! server, not the server. This client spends about what `wrk` does, so both agree.

use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::Expect;
use crate::oci::MAX_MANIFEST_BYTES;
use crate::stats::{ErrorKind, Kind, Recorder, Sample};

/// Where requests go and what they ask for.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port`, to connect to.
    addr: String,
    /// The whole request, sent as is for every GET.
    request: Vec<u8>,
}

impl Endpoint {
    /// An endpoint for GETs of `url` (an `http://` URL) with `accept`, or `None` for a
    /// URL this client does not speak (HTTPS).
    pub fn new(url: &str, accept: &str) -> Option<Endpoint> {
        let url = reqwest::Url::parse(url).ok()?;
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        let addr = format!("{host}:{port}");
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nUser-Agent: berth-load/{}\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes();
        Some(Endpoint { addr, request })
    }
}

/// One worker's connection, opened when first needed and again after a failure.
pub struct Connection {
    endpoint: Endpoint,
    connect_timeout: Duration,
    stream: Option<TcpStream>,
    buf: BytesMut,
}

/// The parts of a response head this client needs.
struct Head {
    status: u16,
    len: usize,
    body_len: usize,
    digest: Option<String>,
    close: bool,
}

impl Connection {
    pub fn new(endpoint: Endpoint, connect_timeout: Duration) -> Connection {
        Connection {
            endpoint,
            connect_timeout,
            stream: None,
            buf: BytesMut::with_capacity(16 << 10),
        }
    }

    /// GETs the endpoint once, verifies the body as `expect` says, and records one
    /// sample of `kind` into `rec`. True if it succeeded.
    pub async fn fetch(&mut self, rec: &Recorder, kind: Kind, expect: &Expect) -> bool {
        let start = Instant::now();
        let mut sample = Sample::new(kind);
        let result = self.fetch_inner(expect, &mut sample).await;
        if result.is_err() {
            // Whatever is left on a failed connection is not the next response.
            self.stream = None;
            self.buf.clear();
        }
        sample.latency = start.elapsed();
        sample.result = result;
        rec.record(&sample);
        sample.result.is_ok()
    }

    async fn fetch_inner(&mut self, expect: &Expect, sample: &mut Sample) -> Result<(), ErrorKind> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let connect = TcpStream::connect(&self.endpoint.addr);
                let s = tokio::time::timeout(self.connect_timeout, connect)
                    .await
                    .map_err(|_| ErrorKind::Timeout)?
                    .map_err(|_| ErrorKind::Connect)?;
                s.set_nodelay(true).map_err(|_| ErrorKind::Connect)?;
                self.buf.clear();
                self.stream.insert(s)
            }
        };
        stream
            .write_all(&self.endpoint.request)
            .await
            .map_err(|_| ErrorKind::Connect)?;
        let head = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            read_more(stream, &mut self.buf, ErrorKind::Connect).await?;
        };
        if head.body_len > MAX_MANIFEST_BYTES {
            return Err(ErrorKind::ManifestInvalid);
        }
        while self.buf.len() < head.len + head.body_len {
            read_more(stream, &mut self.buf, ErrorKind::Body).await?;
        }
        self.buf.advance(head.len);
        let body = self.buf.split_to(head.body_len);
        sample.bytes = body.len() as u64;
        if head.close {
            self.stream = None;
        }
        if !(200..300).contains(&head.status) {
            return Err(ErrorKind::from_status(head.status));
        }
        if let Some(mut v) = expect.verifier(head.digest.as_deref())? {
            sample.verified = true;
            v.update(&body);
            v.finish().map_err(|_| ErrorKind::DigestMismatch)?;
        }
        Ok(())
    }
}

/// Reads what the socket has into `buf`; `eof` is the error for a connection that ended.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    eof: ErrorKind,
) -> Result<(), ErrorKind> {
    buf.reserve(8 << 10);
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => Err(eof),
        Ok(_) => Ok(()),
    }
}

/// The response head at the start of `buf`, if it is all there. Only responses with a
/// `Content-Length` are understood (registries send one with manifests).
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ErrorKind> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ErrorKind::Request),
    };
    let mut head = Head {
        status: resp.code.unwrap_or(0),
        len,
        body_len: 0,
        digest: None,
        close: resp.version == Some(0),
    };
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if h.name.eq_ignore_ascii_case("docker-content-digest") {
            // Bytes that are not text stay, and fail as a digest, as through reqwest.
            head.digest = Some(String::from_utf8_lossy(h.value).into_owned());
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked bodies are not understood: fail loudly rather than misread.
            return Err(ErrorKind::Request);
        }
    }
    head.body_len = length.ok_or(ErrorKind::Request)?;
    Ok(Some(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_once_it_is_complete() {
        let resp =
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nDocker-Content-Digest: sha256:ab\r\n\r\nabc";
        assert!(parse_head(&resp[..20]).unwrap().is_none());
        let head = parse_head(resp).unwrap().unwrap();
        assert_eq!((head.status, head.body_len, head.close), (200, 3, false));
        assert_eq!(head.len, resp.len() - 3);
        assert_eq!(head.digest.as_deref(), Some("sha256:ab"));
    }

    #[test]
    fn close_chunked_and_missing_lengths_are_seen() {
        let close = b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let head = parse_head(close).unwrap().unwrap();
        assert_eq!((head.status, head.close), (404, true));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked).err(), Some(ErrorKind::Request));
        let no_length = b"HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(parse_head(no_length).err(), Some(ErrorKind::Request));
    }

    #[test]
    fn only_plain_http_urls_get_an_endpoint() {
        let e = Endpoint::new(
            "http://127.0.0.1:5000/v2/a/manifests/v1?ns=docker.io",
            "*/*",
        )
        .unwrap();
        assert_eq!(e.addr, "127.0.0.1:5000");
        let text = String::from_utf8(e.request).unwrap();
        assert!(
            text.starts_with(
                "GET /v2/a/manifests/v1?ns=docker.io HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n"));
        assert!(Endpoint::new("https://127.0.0.1:5000/v2/", "*/*").is_none());
    }
}
