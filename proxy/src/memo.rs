//! Answers to repeated anonymous manifest requests, kept ready per thread.
//!
//! A node's pulls ask for the same few manifests over and over. Answering one from the
//! cache meant copying the request's headers, routing its path (with the allowlist's
//! globs), checking access, and two lookups in the cache's shared maps: most of the
//! 14,000 instructions berth spent per request beyond Pingora's own (see
//! `loadtests/RESULTS.md`). Here a worker thread remembers, for the exact
//! path, query and `Accept` of a request that the cache answered from memory, the
//! response head and manifest it was answered with; the front (`front.rs`) answers the
//! next identical request from that, with the same headers and body.
//!
//! Only requests that any client gets the same answer to are remembered: `GET` and
//! `HEAD` of a pull-through manifest, without credentials, answered as a fresh hit to an
//! anonymous client that the policies allowed. A request with an `Authorization`
//! header never reads this memo, so what a user may or may not see is decided as before.
//! An answer is used only while the cache says it still holds
//! ([`Cache::still_valid`]): nothing in the cache's memory has changed since, and a tag
//! is still within its TTL. Each answer given from here is recorded as a use of the
//! manifest, as a hit is, so eviction never takes an image a node keeps asking for.
//! Anything else goes the whole way.

use std::cell::RefCell;
use std::collections::HashMap;

use berth_cache::{Cache, HitValidity};
use bytes::Bytes;
use pingora::http::ResponseHeader;

/// Answers kept per thread; when full, the memo starts again.
const MAX_ENTRIES: usize = 256;

/// The largest manifest remembered: the memo holds the manifest alive, and the
/// manifests a node asks for again and again are small.
const MAX_BODY: usize = 64 << 10;

struct Entry {
    /// The manifest's bytes.
    body: Bytes,
    /// The upstream's namespace, for the metrics.
    upstream: &'static str,
    valid: HitValidity,
    /// The response head as Pingora writes it for this answer, from the status line to
    /// `Content-Length`: [`crate::front`] adds `Date` and `Connection`.
    head: Box<[u8]>,
}

/// What [`answer`] wrote.
pub(crate) struct Answered {
    /// The manifest's length, whether or not the body was written (a `HEAD`).
    pub length: u64,
    pub upstream: &'static str,
}

#[derive(Default)]
struct Memo {
    /// The key being looked up, built here so that a lookup allocates nothing.
    key: String,
    entries: HashMap<Box<str>, Entry, foldhash::quality::RandomState>,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

/// The key of a request: path, query and `Accept` values (joined as
/// [`crate::server::Request`] joins them), each part ended by a byte no part can hold.
fn key<'a>(
    out: &mut String,
    path: &str,
    query: Option<&str>,
    accepts: impl Iterator<Item = &'a str>,
) {
    out.clear();
    out.push_str(path);
    out.push('\n');
    if let Some(q) = query {
        out.push_str(q);
    }
    out.push('\n');
    for (i, a) in accepts.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(a);
    }
}

/// Writes the remembered answer to a `GET` (or, with `head_only`, a `HEAD`) of `path`
/// and `query` with these `Accept` values into `out`, if there is one and it still holds:
/// the head up to `Content-Length`, what `tail` adds (the rest of the head), and the body
/// unless `head_only`. The caller has checked that the request carries no credentials.
pub(crate) fn answer<'a>(
    cache: &Cache,
    path: &str,
    query: Option<&str>,
    accepts: impl Iterator<Item = &'a str>,
    head_only: bool,
    out: &mut Vec<u8>,
    tail: impl FnOnce(&mut Vec<u8>),
) -> Option<Answered> {
    MEMO.with(|memo| {
        let mut memo = memo.try_borrow_mut().ok()?;
        let Memo { key: k, entries } = &mut *memo;
        if entries.is_empty() {
            return None;
        }
        key(k, path, query, accepts);
        let e = entries.get(k.as_str())?;
        if cache.still_valid(&e.valid) {
            out.extend_from_slice(&e.head);
            tail(out);
            if !head_only {
                out.extend_from_slice(&e.body);
            }
            Some(Answered {
                length: e.body.len() as u64,
                upstream: e.upstream,
            })
        } else {
            entries.remove(k.as_str());
            None
        }
    })
}

/// Remembers the answer to a request that may be answered from the memo (see the
/// module documentation for which): `path`, `query` and `accept` as the request had them.
/// `resp` is the response head the answer was written with, `body` its manifest.
pub(crate) fn remember(
    path: &str,
    query: Option<&str>,
    accept: Option<&str>,
    (body, upstream): (&Bytes, &'static str),
    valid: HitValidity,
    resp: &ResponseHeader,
) {
    if body.len() > MAX_BODY || resp.status != http::StatusCode::OK {
        return;
    }
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    resp.header_to_h1_wire(&mut head);
    MEMO.with(|memo| {
        let Ok(mut memo) = memo.try_borrow_mut() else {
            return;
        };
        let Memo { key: k, entries } = &mut *memo;
        key(k, path, query, accept.into_iter());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(k.as_str()) {
            entries.clear();
        }
        let head = head.into_boxed_slice();
        let entry = Entry {
            body: body.clone(),
            upstream,
            valid,
            head,
        };
        entries.insert(k.as_str().into(), entry);
    })
}

/// The one `&'static str` for an upstream's namespace, so that an answer from the memo
/// names its upstream without touching a reference count shared with other threads.
/// Namespaces come from the configuration, so there are few, and each is kept once.
pub(crate) fn intern(namespace: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == namespace) {
        return n;
    }
    let n: &'static str = Box::leak(namespace.into());
    names.push(n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_path_query_and_accept_apart() {
        let (mut a, mut b) = (String::new(), String::new());
        key(
            &mut a,
            "/v2/x/manifests/1",
            Some("ns=docker.io"),
            [].into_iter(),
        );
        key(
            &mut b,
            "/v2/x/manifests/1",
            None,
            ["ns=docker.io"].into_iter(),
        );
        assert_ne!(a, b);
        // Two Accept headers make the same key as the one value Request joins them into.
        key(&mut a, "/p", None, ["a/b", "c/d"].into_iter());
        key(&mut b, "/p", None, Some("a/b, c/d").into_iter());
        assert_eq!(a, b);
        key(&mut b, "/p", None, Some("a/b").into_iter());
        assert_ne!(a, b);
    }
}
