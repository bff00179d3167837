//! A hand-written upstream for the fault paths a real registry cannot produce: wrong
//! bytes, throttled bodies, resets, 429s, stalls, outages and broken Range answers. Every behaviour a user sees is also
//! proven against the real registry in `e2e_real.rs`; this one exists for the faults.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::sha256_hex;

/// What the fake does for one path.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 with these bytes and content type, in chunks of `chunk` bytes with `pause`
    /// between them.
    Body {
        bytes: Arc<Vec<u8>>,
        content_type: &'static str,
        chunk: usize,
        pause: Duration,
    },
    /// Send the headers and the first `after` bytes of `bytes`, then close the connection.
    ResetAfter { bytes: Arc<Vec<u8>>, after: usize },
    /// Answer with this status (and `Retry-After: 0`) for the first `times` requests, then
    /// behave as `then`.
    StatusThen {
        status: u16,
        times: usize,
        then: Box<Behaviour>,
    },
    /// 200 with these bytes and no `Content-Length`: the body ends when the connection
    /// closes.
    Unsized(Arc<Vec<u8>>),
    /// Read the request and never answer.
    Hang,
    /// `307 Temporary Redirect` to this absolute URL.
    Redirect(String),
    /// `401` with this `WWW-Authenticate` challenge unless the request carries an
    /// `Authorization` header; with one, behave as `then`.
    RequireAuth {
        challenge: String,
        then: Box<Behaviour>,
    },
    /// A blob that advertises `Accept-Ranges: bytes`: a GET without `Range` gets 200 and
    /// the whole blob; one with `Range: bytes=N-` is answered as `range` says. The n-th
    /// GET (from 0) sends at most `cuts[n]` bytes of its body and then closes the
    /// connection (or, with `stall`, keeps it open and sends nothing more); GETs past the
    /// end of `cuts` send their whole body.
    Ranged {
        bytes: Arc<Vec<u8>>,
        cuts: Vec<usize>,
        range: RangeAnswer,
        stall: bool,
    },
    /// Answer with this status, no body.
    Status(u16),
}

/// How [`Behaviour::Ranged`] answers `Range: bytes=N-`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// `206`, `Content-Range: bytes N-<len-1>/<len>`, the bytes from N.
    Honour,
    /// `206` from `back` bytes before N, saying so in its `Content-Range`.
    StartEarlier { back: usize },
    /// `206` claiming to start at N, with the bytes from 0 (a lying upstream: only the
    /// digest can tell).
    Lie,
    /// `200` and the whole blob, as if `Range` were not there.
    Ignore,
}

impl Behaviour {
    pub fn blob(bytes: Vec<u8>) -> Self {
        Behaviour::Body {
            bytes: Arc::new(bytes),
            content_type: "application/octet-stream",
            chunk: 64 * 1024,
            pause: Duration::ZERO,
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Without the query.
    pub path: String,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Behaviour>,
    /// Every request, in order.
    requests: Vec<Recorded>,
    /// When a response body to each path was completely written.
    finished: HashMap<String, Instant>,
    served_statuses: HashMap<String, usize>,
    /// GETs answered per [`Behaviour::Ranged`] path.
    ranged_gets: HashMap<String, usize>,
    /// While set, every request is answered with this status.
    outage: Option<u16>,
}

/// The fake upstream, listening on 127.0.0.1 at a port chosen at run time.
pub struct FakeUpstream {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(handle(sock, st.clone()));
            }
        });
        FakeUpstream { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves `behaviour` at `path` (for GET and HEAD).
    pub fn route(&self, path: &str, behaviour: Behaviour) {
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(path.to_owned(), behaviour);
    }

    /// While `Some(status)`, every request (recorded as usual) gets `status` and no
    /// body, whatever its path; `None` ends the outage.
    pub fn outage(&self, status: Option<u16>) {
        self.state.lock().unwrap().outage = status;
    }

    /// How many requests with `method` reached `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Every request received so far, with its headers.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn total_requests(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// When the fake finished writing a body for `path`, if it did.
    pub fn finished_at(&self, path: &str) -> Option<Instant> {
        self.state.lock().unwrap().finished.get(path).copied()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_owned();
    let target = words.next().unwrap_or("").to_owned();
    let path = target.split('?').next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = head
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let authorized = headers.iter().any(|(k, _)| k == "authorization");
    let range_from: Option<usize> = headers
        .iter()
        .find(|(k, _)| k == "range")
        .and_then(|(_, v)| v.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok());
    let mut nth_get = 0;
    let behaviour = {
        let mut st = state.lock().unwrap();
        st.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            headers,
        });
        if let Some(status) = st.outage {
            Some(Behaviour::Status(status))
        } else {
            if method == "GET" && matches!(st.routes.get(&path), Some(Behaviour::Ranged { .. })) {
                let n = st.ranged_gets.entry(path.clone()).or_default();
                nth_get = *n;
                *n += 1;
            }
            let b = match st.routes.get(&path).cloned() {
                Some(Behaviour::RequireAuth { then, .. }) if authorized => Some(*then),
                other => other,
            };
            match b {
                Some(Behaviour::StatusThen {
                    status,
                    times,
                    then,
                }) => {
                    let n = st.served_statuses.entry(path.clone()).or_default();
                    *n += 1;
                    if *n <= times {
                        Some(Behaviour::StatusThen {
                            status,
                            times,
                            then,
                        })
                    } else {
                        Some(*then)
                    }
                }
                other => other,
            }
        }
    };
    let head_only = method == "HEAD";
    match behaviour {
        None => {
            let body = br#"{"errors":[{"code":"NOT_FOUND","message":"no such path in the fake"}]}"#;
            let _ = respond(&mut sock, 404, "application/json", body.len(), &[]).await;
            if !head_only {
                let _ = sock.write_all(body).await;
            }
        }
        Some(Behaviour::Hang) => {
            // Keep the connection open, answer nothing.
            let _ = sock.read(&mut tmp).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Some(Behaviour::Redirect(location)) => {
            let _ = respond(
                &mut sock,
                307,
                "text/plain",
                0,
                &[("Location", location.as_str())],
            )
            .await;
        }
        Some(Behaviour::RequireAuth { challenge, .. }) => {
            let body =
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            let _ = respond(
                &mut sock,
                401,
                "application/json",
                body.len(),
                &[("WWW-Authenticate", challenge.as_str())],
            )
            .await;
            if !head_only {
                let _ = sock.write_all(body).await;
            }
        }
        Some(Behaviour::Status(status)) => {
            let _ = respond(&mut sock, status, "application/json", 0, &[]).await;
        }
        Some(Behaviour::Ranged {
            bytes,
            cuts,
            range,
            stall,
        }) => {
            let len = bytes.len();
            let digest = format!("sha256:{}", sha256_hex(&bytes));
            let mut extra = vec![
                ("Docker-Content-Digest", digest.clone()),
                ("Accept-Ranges", "bytes".to_owned()),
            ];
            let (status, body): (u16, &[u8]) = match (range_from, range) {
                (Some(from), RangeAnswer::Honour) if from < len => {
                    extra.push(("Content-Range", format!("bytes {from}-{}/{len}", len - 1)));
                    (206, &bytes[from..])
                }
                (Some(from), RangeAnswer::StartEarlier { back }) if from < len => {
                    let start = from.saturating_sub(back);
                    extra.push(("Content-Range", format!("bytes {start}-{}/{len}", len - 1)));
                    (206, &bytes[start..])
                }
                (Some(from), RangeAnswer::Lie) if from < len => {
                    extra.push(("Content-Range", format!("bytes {from}-{}/{len}", len - 1)));
                    (206, &bytes[..len - from])
                }
                _ => (200, &bytes[..]),
            };
            let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if respond(
                &mut sock,
                status,
                "application/octet-stream",
                body.len(),
                &extra,
            )
            .await
            .is_err()
                || head_only
            {
                return;
            }
            let cut = cuts.get(nth_get).copied();
            let send = &body[..cut.unwrap_or(body.len()).min(body.len())];
            for piece in send.chunks(64 * 1024) {
                if sock.write_all(piece).await.is_err() {
                    return;
                }
            }
            let _ = sock.flush().await;
            if cut.is_none() {
                state.lock().unwrap().finished.insert(path, Instant::now());
            } else if stall {
                let _ = sock.read(&mut tmp).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            // Dropped here: with a cut, before the announced length.
        }
        Some(Behaviour::StatusThen { status, .. }) => {
            let _ = respond(
                &mut sock,
                status,
                "application/json",
                0,
                &[("Retry-After", "0")],
            )
            .await;
        }
        Some(Behaviour::Unsized(bytes)) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() || head_only {
                return;
            }
            for piece in bytes.chunks(64 * 1024) {
                if sock.write_all(piece).await.is_err() {
                    return;
                }
            }
            let _ = sock.flush().await;
            drop(sock);
        }
        Some(Behaviour::ResetAfter { bytes, after }) => {
            let _ = respond(&mut sock, 200, "application/octet-stream", bytes.len(), &[]).await;
            if !head_only {
                let _ = sock.write_all(&bytes[..after]).await;
                let _ = sock.flush().await;
                // Close before the announced length: the client sees a truncated body.
                drop(sock);
            }
        }
        Some(Behaviour::Body {
            bytes,
            content_type,
            chunk,
            pause,
        }) => {
            let digest = format!("sha256:{}", sha256_hex(&bytes));
            let extra = [("Docker-Content-Digest", digest.as_str())];
            if respond(&mut sock, 200, content_type, bytes.len(), &extra)
                .await
                .is_err()
            {
                return;
            }
            if head_only {
                return;
            }
            for (i, piece) in bytes.chunks(chunk.max(1)).enumerate() {
                if i > 0 && !pause.is_zero() {
                    let _ = sock.flush().await;
                    tokio::time::sleep(pause).await;
                }
                if sock.write_all(piece).await.is_err() {
                    return;
                }
            }
            let _ = sock.flush().await;
            state.lock().unwrap().finished.insert(path, Instant::now());
        }
    }
}

async fn respond(
    sock: &mut TcpStream,
    status: u16,
    content_type: &str,
    len: usize,
    extra: &[(&str, &str)],
) -> std::io::Result<()> {
    let mut h = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: close\r\n"
    );
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    sock.write_all(h.as_bytes()).await
}
