//! One verified GET: send, stream the body through a digest verifier, and record a
//! [`Sample`] whatever happens.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};

use crate::digest::{Digest, Verifier};
use crate::oci::MAX_MANIFEST_BYTES;
use crate::stats::{ErrorKind, Kind, Recorder, Sample};

/// Settings of the HTTP clients a run builds.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Idle connections kept per host (the run's concurrency, at least).
    pub pool: usize,
    pub connect_timeout: Duration,
    /// The longest wait for response headers or between two body chunks.
    pub read_timeout: Duration,
    /// Accept any TLS certificate.
    pub insecure: bool,
}

/// An HTTP/1.1 client that never uses a proxy, keeps `pool` idle connections per host
/// and applies the timeouts.
pub fn client(opts: &ClientOptions) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(opts.pool.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.read_timeout)
        .danger_accept_invalid_certs(opts.insecure)
        .user_agent(concat!("berth-load/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

/// What a response body must hash to.
#[derive(Clone, Debug)]
pub enum Expect {
    /// The digest the content was addressed by.
    Digest(Digest),
    /// The `Docker-Content-Digest` response header, when the registry sends one (a
    /// manifest fetched by tag).
    HeaderDigest,
    /// Nothing: the bytes are only counted (a throughput measurement of the server).
    Nothing,
}

impl Expect {
    /// The verifier a body needs; `header` is the response's `Docker-Content-Digest`, if
    /// it sent one. A header that is not a digest this harness can check is an error.
    pub fn verifier(&self, header: Option<&str>) -> Result<Option<Verifier>, ErrorKind> {
        match self {
            Expect::Digest(d) => Ok(Some(Verifier::new(d.clone()))),
            Expect::Nothing => Ok(None),
            Expect::HeaderDigest => header
                .map(|h| {
                    Digest::parse(h.trim())
                        .map(Verifier::new)
                        .map_err(|_| ErrorKind::DigestUnsupported)
                })
                .transpose(),
        }
    }
}

/// A successful fetch.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The body, if it was asked to be kept.
    pub body: Option<Bytes>,
    pub content_type: Option<String>,
    pub bytes: u64,
    /// Time to the first body byte (or to the end of an empty body).
    pub ttfb: Duration,
    pub latency: Duration,
}

/// How far error bodies are read (so that the connection can be reused).
const ERROR_BODY_LIMIT: u64 = 64 << 10;

/// GETs `url`, verifies the body as `expect` says, records one sample of `kind` into
/// `rec` and returns the result. `keep_body` keeps the body (up to the manifest size
/// limit); otherwise it is only hashed and counted.
pub async fn fetch(
    client: &reqwest::Client,
    rec: &Recorder,
    url: &str,
    kind: Kind,
    accept: Option<&'static str>,
    expect: &Expect,
    keep_body: bool,
) -> Result<Fetched, ErrorKind> {
    let start = Instant::now();
    let mut sample = Sample::new(kind);
    let result = fetch_inner(client, url, accept, expect, keep_body, start, &mut sample).await;
    sample.latency = start.elapsed();
    sample.result = result.as_ref().map(|_| ()).map_err(|e| *e);
    rec.record(&sample);
    result.map(|mut f| {
        f.latency = sample.latency;
        f
    })
}

async fn fetch_inner(
    client: &reqwest::Client,
    url: &str,
    accept: Option<&'static str>,
    expect: &Expect,
    keep_body: bool,
    start: Instant,
    sample: &mut Sample,
) -> Result<Fetched, ErrorKind> {
    let mut request = client.get(url);
    if let Some(accept) = accept {
        request = request.header(ACCEPT, HeaderValue::from_static(accept));
    }
    let mut resp = request.send().await.map_err(|e| classify(&e))?;
    let status = resp.status();
    if !status.is_success() {
        // Read (a bounded part of) the error body so the connection can be reused.
        while sample.bytes < ERROR_BODY_LIMIT {
            match resp.chunk().await {
                Ok(Some(chunk)) => sample.bytes += chunk.len() as u64,
                _ => break,
            }
        }
        return Err(ErrorKind::from_status(status.as_u16()));
    }
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // A header that is not text cannot be a digest either.
    let header = resp
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap_or(""));
    let mut verifier = expect.verifier(header)?;
    sample.verified = verifier.is_some();
    let mut body = keep_body.then(BytesMut::new);
    let mut ttfb = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                ttfb.get_or_insert_with(|| start.elapsed());
                sample.bytes += chunk.len() as u64;
                if let Some(v) = verifier.as_mut() {
                    v.update(&chunk);
                }
                if let Some(body) = body.as_mut() {
                    if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                        return Err(ErrorKind::ManifestInvalid);
                    }
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(None) => break,
            Err(e) => return Err(classify(&e)),
        }
    }
    let ttfb = ttfb.unwrap_or_else(|| start.elapsed());
    if kind_has_ttfb(sample.kind) {
        sample.ttfb = Some(ttfb);
    }
    if let Some(v) = verifier {
        v.finish().map_err(|_| ErrorKind::DigestMismatch)?;
    }
    Ok(Fetched {
        body: body.map(BytesMut::freeze),
        content_type,
        bytes: sample.bytes,
        ttfb,
        latency: Duration::ZERO,
    })
}

fn kind_has_ttfb(kind: Kind) -> bool {
    kind == Kind::Blob
}

/// The error kind of a failed request or body transfer.
pub fn classify(e: &reqwest::Error) -> ErrorKind {
    if e.is_connect() {
        ErrorKind::Connect
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_body() || e.is_decode() {
        ErrorKind::Body
    } else {
        ErrorKind::Request
    }
}
