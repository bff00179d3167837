//! Request metrics, registered into a registry the server owns (never a global one).
//! Labels are bounded: route kind, upstream namespace, outcome and status class; never a
//! repository, tag or digest.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use berth_cache::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub upstream: String,
    pub outcome: &'static str,
    pub status: &'static str,
}

impl RequestLabels {
    /// `upstream` must be a configured namespace (bounded) or `None`.
    pub fn new(
        route: &'static str,
        upstream: Option<&str>,
        outcome: Option<Outcome>,
        status: u16,
    ) -> Self {
        RequestLabels {
            route,
            upstream: upstream.unwrap_or("none").to_owned(),
            outcome: outcome.map(Outcome::as_str).unwrap_or("none"),
            status: match status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    bytes: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    fills: Gauge<i64, AtomicI64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let requests = Family::<RequestLabels, Counter>::default();
        let bytes = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 4.0, 10))
        });
        let fills = Gauge::<i64, AtomicI64>::default();
        registry.register("requests", "HTTP requests served", requests.clone());
        registry.register(
            "response_body_bytes",
            "Response body bytes sent",
            bytes.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request read to response written",
            duration.clone(),
        );
        registry.register(
            "blob_fills_in_progress",
            "Blob fills from upstreams in progress",
            fills.clone(),
        );
        Metrics {
            registry,
            requests,
            bytes,
            duration,
            fills,
        }
    }

    pub fn observe(&self, labels: &RequestLabels, bytes: u64, elapsed: Duration) {
        self.requests.get_or_create(labels).inc();
        self.bytes.get_or_create(labels).inc_by(bytes);
        self.duration
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self, fills_in_progress: usize) -> String {
        self.fills.set(fills_in_progress as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
