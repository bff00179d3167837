//! The command line of `berth-load`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::digest::Digest;
use crate::http::ClientOptions;
use crate::oci::Platform;
use crate::run::{split_image, Config, Mode, Reference, Target};

#[derive(Debug, Parser)]
#[command(
    name = "berth-load",
    version,
    about = "Load an OCI registry like a fleet of nodes pulling images, and report on it.",
    long_about = "Load an OCI registry like a fleet of nodes pulling images, and report on it.\n\n\
        Every run is bounded by a count (--pulls/--requests) and by --duration, whichever \
        ends first. Every body is verified against its digest (except with blob \
        --no-verify). The table goes to stdout, \
        the JSON report to --json FILE. The exit status is 1 if anything failed (unless \
        --allow-errors), 2 on a usage or setup error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Whole image pulls: tag → (index → platform manifest) → config and every layer.
    Pull {
        #[command(flatten)]
        common: Common,
        /// REPO:TAG or REPO@DIGEST, with the repository as the registry's paths want it
        /// (`docker.io/library/app:1` for berth, `library/app:1` for a plain registry).
        #[arg(long)]
        image: String,
        /// The platform to pick from an index: os/architecture[/variant].
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// At most this many pulls are started.
        #[arg(long, default_value_t = 100)]
        pulls: u64,
        /// Blobs of one pull fetched at the same time (containerd's default is 3).
        #[arg(long, default_value_t = 3)]
        layer_concurrency: usize,
    },
    /// One blob, GET over and over: throughput, time to first byte and latency.
    Blob {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        repo: String,
        /// The blob's digest, sha256:….
        #[arg(long)]
        digest: String,
        /// At most this many GETs are started.
        #[arg(long, default_value_t = 100)]
        requests: u64,
        /// Count the bytes without hashing them. Hashing costs the client about as much
        /// CPU per byte as serving costs the server; on one machine that caps every
        /// registry at the client's hashing speed. Use it to measure the serving path.
        #[arg(long)]
        no_verify: bool,
    },
    /// One manifest, GET over and over by tag or by digest: requests per second.
    Manifests {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        repo: String,
        /// A tag, or a digest (sha256:…).
        #[arg(long)]
        reference: String,
        /// At most this many GETs are started.
        #[arg(long, default_value_t = 1000)]
        requests: u64,
        /// Do not hash the bodies (as `wrk` does not).
        #[arg(long)]
        no_verify: bool,
    },
    /// A cold start: N clients released at the same instant, each GETs the blob once.
    /// Point it at a registry with an empty cache. --concurrency is ignored.
    Cold {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        repo: String,
        #[arg(long)]
        digest: String,
        /// The number of clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
    },
}

#[derive(Debug, Args)]
pub struct Common {
    /// The registry's base URL, e.g. http://127.0.0.1:5000.
    #[arg(long)]
    pub registry: String,
    /// Append ?ns=NAME to every request (containerd's mirror form).
    #[arg(long, value_name = "NAME")]
    pub ns: Option<String>,
    /// Concurrent clients.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub concurrency: usize,
    /// No new unit starts after this long ("500ms", "30s", "2m").
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Units still running this long after --duration are cancelled.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// The longest wait for response headers or between two body chunks.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Accept any TLS certificate.
    #[arg(long)]
    pub insecure: bool,
    /// A test upstream's access log (Combined Log Format): count the requests and bytes
    /// appended to it during the run.
    #[arg(long, value_name = "FILE")]
    pub upstream_log: Option<PathBuf>,
    /// berth's metrics URL (http://…/metrics): report the change of its upstream
    /// counters during the run.
    #[arg(long, value_name = "URL")]
    pub metrics: Option<String>,
    /// How long to wait after the run before reading --upstream-log and --metrics.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub settle: Duration,
    /// Write the JSON report to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Do not print the table.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Exit 0 even if requests failed.
    #[arg(long)]
    pub allow_errors: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Parses "500ms", "30s", "2m", "1h" (or combinations such as "1m30s").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: expected a duration like 500ms, 30s, 2m: {e}"))
}

/// What the binary does besides running: where the report goes and how it exits.
#[derive(Clone, Debug)]
pub struct Output {
    pub json: Option<PathBuf>,
    pub quiet: bool,
    pub allow_errors: bool,
    pub threads: Option<usize>,
}

impl Cli {
    /// Validates the command line into a run's config.
    pub fn into_config(self) -> Result<(Config, Output), String> {
        let (common, mode, count) = match self.command {
            Command::Pull {
                common,
                image,
                platform,
                pulls,
                layer_concurrency,
            } => {
                let (repo, reference) = split_image(&image)?;
                let platform: Platform = platform.parse()?;
                let mode = Mode::Pull {
                    repo,
                    reference,
                    platform,
                    layer_concurrency: layer_concurrency.max(1),
                };
                (common, mode, pulls)
            }
            Command::Blob {
                common,
                repo,
                digest,
                requests,
                no_verify,
            } => {
                let digest = parse_digest(&digest)?;
                let mode = Mode::Blob {
                    repo,
                    digest,
                    verify: !no_verify,
                };
                (common, mode, requests)
            }
            Command::Manifests {
                common,
                repo,
                reference,
                requests,
                no_verify,
            } => {
                let reference =
                    Reference::parse(&reference).map_err(|e| format!("--reference: {e}"))?;
                let mode = Mode::Manifests {
                    repo,
                    reference,
                    verify: !no_verify,
                };
                (common, mode, requests)
            }
            Command::Cold {
                common,
                repo,
                digest,
                clients,
            } => {
                if clients == 0 {
                    return Err("--clients must be at least 1".into());
                }
                let digest = parse_digest(&digest)?;
                let mode = Mode::Cold {
                    repo,
                    digest,
                    clients,
                };
                (common, mode, clients as u64)
            }
        };
        if common.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if let Some(url) = &common.metrics {
            Target::new(url, None).map_err(|e| e.replace("--registry", "--metrics"))?;
        }
        let target = Target::new(&common.registry, common.ns)?;
        let mut config = Config::new(target, mode);
        config.concurrency = common.concurrency;
        config.count = count;
        config.duration = common.duration;
        config.grace = common.grace;
        config.client = ClientOptions {
            pool: common.concurrency,
            connect_timeout: common.connect_timeout,
            read_timeout: common.timeout,
            insecure: common.insecure,
        };
        config.upstream_log = common.upstream_log;
        config.metrics_url = common.metrics;
        config.settle = common.settle;
        let output = Output {
            json: common.json,
            quiet: common.quiet,
            allow_errors: common.allow_errors,
            threads: common.threads,
        };
        Ok((config, output))
    }
}

fn parse_digest(s: &str) -> Result<Digest, String> {
    Digest::parse(s).map_err(|e| format!("--digest: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("1.5").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn command_lines() {
        let cli = Cli::try_parse_from([
            "berth-load",
            "pull",
            "--registry",
            "http://127.0.0.1:5000",
            "--image",
            "library/app:1",
            "--ns",
            "docker.io",
            "-c",
            "4",
            "--pulls",
            "20",
            "--duration",
            "5s",
        ])
        .unwrap();
        let (config, output) = cli.into_config().unwrap();
        assert_eq!(config.concurrency, 4);
        assert_eq!(config.count, 20);
        assert_eq!(config.duration, Duration::from_secs(5));
        assert_eq!(
            config.target_url(),
            "http://127.0.0.1:5000/v2/library/app/manifests/1?ns=docker.io"
        );
        assert!(!output.allow_errors);

        let cold = Cli::try_parse_from([
            "berth-load",
            "cold",
            "--registry",
            "http://127.0.0.1:5000",
            "--repo",
            "docker.io/library/app",
            "--digest",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "--clients",
            "50",
        ])
        .unwrap();
        let (config, _) = cold.into_config().unwrap();
        assert!(matches!(config.mode, Mode::Cold { clients: 50, .. }));

        let bad = Cli::try_parse_from([
            "berth-load",
            "blob",
            "--registry",
            "http://127.0.0.1:5000",
            "--repo",
            "r",
            "--digest",
            "sha256:nothex",
        ])
        .unwrap();
        assert!(bad.into_config().is_err());
    }
}
