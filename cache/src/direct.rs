//! A blob streamed straight from the upstream to one client, without being stored: what
//! berth does when the disk has no room for it.
//!
//! The bytes are hashed as they pass; the last chunk is held back until the whole blob
//! has arrived and matched its digest and announced size, so a client never receives a
//! complete response with wrong bytes (the same rule as a fill's readers).

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use berth_store::oci::{Digest, Hasher};

use crate::CacheError;

/// An upstream blob body on its way to one client.
pub struct DirectBlob {
    stream: BoxStream<'static, reqwest::Result<Bytes>>,
    hasher: Option<Hasher>,
    expected: Digest,
    size: u64,
    received: u64,
    held: Option<Bytes>,
    read_timeout: Duration,
    registry: String,
    /// The upstream's `berth_upstream_bytes`.
    fetched: prometheus_client::metrics::counter::Counter,
}

impl DirectBlob {
    pub(crate) fn new(
        resp: reqwest::Response,
        expected: &Digest,
        size: u64,
        read_timeout: Duration,
        registry: &str,
        fetched: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        DirectBlob {
            stream: resp.bytes_stream().boxed(),
            hasher: Some(Hasher::new(expected.algorithm())),
            expected: expected.clone(),
            size,
            received: 0,
            held: None,
            read_timeout,
            registry: registry.to_owned(),
            fetched,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk to send; `None` once the whole, verified blob was sent.
    pub async fn next(&mut self) -> Result<Option<Bytes>, CacheError> {
        loop {
            let Some(hasher) = self.hasher.as_mut() else {
                // Verified: release what was held back, then end.
                return Ok(self.held.take());
            };
            let chunk = match tokio::time::timeout(self.read_timeout, self.stream.next()).await {
                Err(_) => return Err(self.unreachable("blob download stalled".into())),
                Ok(Some(Err(e))) => return Err(self.unreachable(crate::upstream::describe(&e))),
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) => {
                    let actual = self.hasher.take().expect("hashing until the end").finish();
                    if self.received != self.size {
                        return Err(CacheError::SizeMismatch {
                            expected: self.size,
                            actual: self.received,
                        });
                    }
                    if actual != self.expected {
                        return Err(CacheError::DigestMismatch {
                            expected: self.expected.clone(),
                            actual,
                        });
                    }
                    continue;
                }
            };
            if chunk.is_empty() {
                continue;
            }
            self.received += chunk.len() as u64;
            self.fetched.inc_by(chunk.len() as u64);
            if self.received > self.size {
                return Err(CacheError::SizeMismatch {
                    expected: self.size,
                    actual: self.received,
                });
            }
            hasher.update(&chunk);
            if let Some(previous) = self.held.replace(chunk) {
                return Ok(Some(previous));
            }
        }
    }

    fn unreachable(&self, reason: String) -> CacheError {
        CacheError::UpstreamUnreachable {
            registry: self.registry.clone(),
            reason,
        }
    }
}
