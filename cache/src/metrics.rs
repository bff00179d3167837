//! The cache's own metrics: what berth asks of its upstreams and how fills end.
//! Registered by the caller into its registry ([`CacheMetrics::register`]); labels are
//! bounded (configured upstream namespaces, methods, status classes, outcomes).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamRequestLabels {
    pub upstream: String,
    pub method: &'static str,
    /// `2xx`…`5xx`, or `error` when no response arrived.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FillLabels {
    pub upstream: String,
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `cached` (pulled through) or `private` (pushed) for bytes; `blob`, `manifest` or
    /// `tag` for evictions.
    pub kind: &'static str,
}

/// Counters the cache updates; cheap to clone (they share their values).
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    pub upstream_requests: Family<UpstreamRequestLabels, Counter>,
    pub upstream_bytes: Family<UpstreamLabels, Counter>,
    pub blob_fills: Family<FillLabels, Counter>,
    pub store_bytes: Family<KindLabels, Gauge>,
    pub filesystem_free_bytes: Gauge,
    pub evictions: Family<KindLabels, Counter>,
    pub evicted_bytes: Counter,
    /// Range requests sent to resume a blob download that broke off.
    pub upstream_resumes: Family<UpstreamLabels, Counter>,
    /// 1 while an upstream's circuit breaker is open (requests to it fail fast), else 0.
    pub upstream_circuit_open: Family<UpstreamLabels, Gauge>,
}

impl CacheMetrics {
    /// Creates the counters and registers them into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = CacheMetrics::default();
        registry.register(
            "upstream_requests",
            "HTTP requests berth sent to upstream registries and their token services",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_bytes",
            "Manifest, tag list and blob body bytes received from upstream registries",
            m.upstream_bytes.clone(),
        );
        registry.register(
            "blob_fills",
            "Blob fills from upstream registries that ended, by outcome",
            m.blob_fills.clone(),
        );
        registry.register(
            "store_bytes",
            "Bytes of blob files in the store, pulled through (cached) or pushed (private), as last measured",
            m.store_bytes.clone(),
        );
        registry.register(
            "store_filesystem_free_bytes",
            "Bytes available on the store's filesystem",
            m.filesystem_free_bytes.clone(),
        );
        registry.register(
            "evictions",
            "Cached blobs, manifests and tags evicted, by kind",
            m.evictions.clone(),
        );
        registry.register(
            "evicted_bytes",
            "Bytes of cached blobs evicted",
            m.evicted_bytes.clone(),
        );
        registry.register(
            "upstream_resumes",
            "Range requests sent to resume blob downloads whose upstream connection broke off",
            m.upstream_resumes.clone(),
        );
        registry.register(
            "upstream_circuit_open",
            "1 while the circuit breaker of an upstream is open and requests to it fail fast, else 0",
            m.upstream_circuit_open.clone(),
        );
        m
    }

    pub fn resumed(&self, upstream: &str) {
        self.upstream_resumes
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    /// Records what an eviction pass removed and the usage after it.
    pub fn evicted(&self, report: &crate::evict::Report, after: &crate::evict::Usage) {
        for (kind, n) in [
            ("blob", report.blobs),
            ("manifest", report.manifests),
            ("tag", report.tags),
        ] {
            self.evictions.get_or_create(&KindLabels { kind }).inc_by(n);
        }
        self.evicted_bytes.inc_by(report.bytes);
        self.measured(after);
    }

    pub fn measured(&self, usage: &crate::evict::Usage) {
        for (kind, n) in [
            ("cached", usage.cached_bytes),
            ("private", usage.private_bytes),
        ] {
            self.store_bytes
                .get_or_create(&KindLabels { kind })
                .set(n.try_into().unwrap_or(i64::MAX));
        }
    }

    pub fn request(&self, upstream: &str, method: &'static str, status: Option<u16>) {
        let status = match status {
            None => "error",
            Some(100..=199) => "1xx",
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(_) => "5xx",
        };
        self.upstream_requests
            .get_or_create(&UpstreamRequestLabels {
                upstream: upstream.to_owned(),
                method,
                status,
            })
            .inc();
    }

    pub fn fill(&self, upstream: &str, ok: bool) {
        self.blob_fills
            .get_or_create(&FillLabels {
                upstream: upstream.to_owned(),
                outcome: if ok { "ok" } else { "failed" },
            })
            .inc();
    }
}
