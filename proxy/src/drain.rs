//! Draining on SIGTERM: requests in flight may finish for up to the drain time, and berth
//! exits as soon as none is left.
//!
//! Pingora, on SIGTERM, stops accepting and then waits a fixed grace period before it
//! stops its runtimes, which drops whatever is still running. berth sets that grace
//! period to its drain time and counts requests in flight; this service ends the process
//! the moment the count reaches zero, so an idle berth exits at once and a busy one lets
//! its pulls finish.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// Requests being served.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

/// Held while a request is served.
pub struct Serving<'a>(&'a AtomicUsize);

impl InFlight {
    pub fn enter(&self) -> Serving<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Serving(&self.0)
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Ends the process once shutdown has begun and nothing is in flight.
pub struct Drain {
    pub in_flight: InFlight,
    pub drain: Duration,
}

#[async_trait::async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let began = Instant::now();
        loop {
            let left = self.in_flight.count();
            if left == 0 {
                tracing::info!(
                    after_ms = began.elapsed().as_millis() as u64,
                    "drained; exiting"
                );
                std::process::exit(0);
            }
            if began.elapsed() >= self.drain {
                tracing::warn!(
                    requests = left,
                    "drain time over; requests still in flight are cut"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
