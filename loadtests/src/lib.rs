//! `berth-load`: a load-testing harness for OCI registries, berth in particular.
//!
//! It acts like a fleet of nodes pulling images: N concurrent clients, each resolving a
//! tag, fetching the manifest (the index, then the platform's manifest) and every blob,
//! against any registry URL. Every run is bounded by a count **and** a duration,
//! whichever ends first (units still running `--grace` after the duration are
//! cancelled), and every body it downloads is verified against the digest it was
//! fetched by (a tag's body against the `Docker-Content-Digest` header, when the
//! registry sends one). A pull whose bytes do not match fails with `digest_mismatch`.
//!
//! It reports, as a table on stdout and as JSON (`--json FILE`): units (pulls, GETs) ok,
//! failed and cancelled; pulls per second; requests by kind; errors by kind; bytes and
//! bytes per second; latency percentiles (p50, p90, p99, max) per request kind
//! (`tag_manifest`, `manifest`, `blob`) and the time to first byte of blobs (`ttfb`);
//! and, given a test upstream's access log (`--upstream-log`) or berth's metrics
//! (`--metrics`), the upstream requests and bytes during the run and the amplification
//! (upstream requests per client request, upstream bytes per client byte). It exits 1
//! if anything failed (unless `--allow-errors`), 2 on a usage or setup error.
//!
//! # Modes
//!
//! Repositories are used as given, so for berth pass the namespace in the path
//! (`docker.io/library/app`) or `--ns docker.io` with the plain name (containerd's
//! form); for a plain registry pass `library/app`.
//!
//! ```text
//! # 8 nodes pulling an image through berth, at most 200 pulls or 30 s:
//! berth-load pull --registry http://127.0.0.1:5000 --image docker.io/library/app:1.0 \
//!     --concurrency 8 --pulls 200 --duration 30s --json pull.json
//!
//! # The same in containerd's mirror form, for arm64, counting what berth sent upstream
//! # (from the test registry's access log, and from berth's own counters):
//! berth-load pull --registry http://127.0.0.1:5000 --ns docker.io --image library/app:1.0 \
//!     --platform linux/arm64 --upstream-log /tmp/registry/access.log \
//!     --metrics http://127.0.0.1:5000/metrics
//!
//! # One large blob: a single stream, then 16 at once:
//! berth-load blob --registry http://127.0.0.1:5000 --repo docker.io/library/app \
//!     --digest sha256:… --concurrency 1 --requests 20
//! berth-load blob --registry http://127.0.0.1:5000 --repo docker.io/library/app \
//!     --digest sha256:… --concurrency 16 --requests 200
//!
//! # Manifests per second, by tag and by digest (keep-alive connections):
//! berth-load manifests --registry http://127.0.0.1:5000 --repo docker.io/library/app \
//!     --reference 1.0 --concurrency 32 --requests 100000 --duration 20s
//! berth-load manifests --registry http://127.0.0.1:5000 --repo docker.io/library/app \
//!     --reference sha256:… --concurrency 32 --requests 100000 --duration 20s
//!
//! # A cold start: berth with an empty store, 64 clients released at the same instant,
//! # each GETting the blob once; per-client completion times and the time for all:
//! berth-load cold --registry http://127.0.0.1:5000 --repo docker.io/library/app \
//!     --digest sha256:… --clients 64 --upstream-log /tmp/registry/access.log
//! ```
//!
//! # Layout
//!
//! - [`stats`]: counting requests, errors, bytes and latencies; nearest-rank
//!   percentiles.
//! - [`digest`]: digests and streaming verification.
//! - [`http`]: the HTTP client (HTTP/1.1, no proxy, a pool as large as the
//!   concurrency) and one verified GET.
//! - [`oci`]: telling an index from a manifest, picking a platform, listing blobs.
//! - [`run`]: the workers, their bounds, and each mode's unit of work.
//! - [`accesslog`], [`metrics`]: counting upstream requests and bytes.
//! - [`report`]: the JSON report and the table.
//! - [`cli`]: the command line.

pub mod accesslog;
pub mod cli;
pub mod digest;
pub mod h1;
pub mod http;
pub mod metrics;
pub mod oci;
pub mod report;
pub mod run;
pub mod stats;

pub use report::Report;
pub use run::{run, Config, Mode, Reference, Target};
