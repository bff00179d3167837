//! Reading counters from a Prometheus (or OpenMetrics) text exposition, such as berth's
//! `/metrics`.

use serde::Serialize;

/// berth's counter of requests it sent to upstream registries.
pub const UPSTREAM_REQUESTS: &str = "berth_upstream_requests_total";
/// berth's counter of body bytes it received from upstream registries.
pub const UPSTREAM_BYTES: &str = "berth_upstream_bytes_total";

/// The sum of every series of the metric `name` (all label sets), or `None` if the
/// exposition neither has a sample of it nor declares it. A counter that is declared
/// (`# TYPE`) but has no series yet, as a labelled family before its first increment,
/// is 0.
pub fn counter_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim_start();
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            // OpenMetrics declares `foo` for the samples `foo_total`; the Prometheus
            // text format declares `foo_total` itself.
            let declared = decl.split_whitespace().next().unwrap_or("");
            if declared == name || name.strip_suffix("_total") == Some(declared) {
                sum.get_or_insert(0.0);
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        if &line[..name_end] != name {
            continue;
        }
        let rest = &line[name_end..];
        let rest = if rest.starts_with('{') {
            match labels_end(rest) {
                Some(end) => &rest[end..],
                None => continue,
            }
        } else {
            rest
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        if let Ok(v) = value.parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The index just after the `}` closing a label set that starts at `s[0] == '{'`,
/// skipping braces inside quoted label values.
fn labels_end(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if in_quotes {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => in_quotes = false,
                _ => escaped = false,
            }
        } else if c == '"' {
            in_quotes = true;
        } else if c == '}' {
            return Some(i + 1);
        }
    }
    None
}

/// berth's upstream counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamCounters {
    pub requests: Option<f64>,
    pub bytes: Option<f64>,
}

impl UpstreamCounters {
    pub fn from_text(text: &str) -> UpstreamCounters {
        UpstreamCounters {
            requests: counter_sum(text, UPSTREAM_REQUESTS),
            bytes: counter_sum(text, UPSTREAM_BYTES),
        }
    }

    /// `after - before`, per counter; `None` where the later scrape lacks it. A counter
    /// that appears only in the later scrape started from 0.
    pub fn delta(before: &UpstreamCounters, after: &UpstreamCounters) -> UpstreamDelta {
        let d = |a: Option<f64>, b: Option<f64>| {
            b.map(|b| (b - a.unwrap_or(0.0)).max(0.0).round() as u64)
        };
        UpstreamDelta {
            requests: d(before.requests, after.requests),
            bytes: d(before.bytes, after.bytes),
        }
    }
}

/// The change of berth's upstream counters over a run; `None` (null) where berth does not
/// expose the counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UpstreamDelta {
    pub requests: Option<u64>,
    pub bytes: Option<u64>,
}

/// Fetches `url` and reads the upstream counters from it.
pub async fn scrape(client: &reqwest::Client, url: &str) -> Result<UpstreamCounters, String> {
    let resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "text/plain")
        .send()
        .await
        .map_err(|e| format!("scraping {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("scraping {url}: status {}", resp.status()));
    }
    let text = resp
        .text()
        .await
        .map_err(|e| format!("scraping {url}: {e}"))?;
    Ok(UpstreamCounters::from_text(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP berth_upstream_requests HTTP requests berth sent to upstream registries
# TYPE berth_upstream_requests counter
berth_upstream_requests_total{upstream="docker.io",kind="blob"} 12
berth_upstream_requests_total{upstream="ghcr.io",kind="token",note="a } b"} 3
berth_upstream_requests_created{upstream="docker.io"} 1700000000.0
# TYPE berth_upstream_bytes counter
berth_upstream_bytes_total{upstream="docker.io"} 1.5e6 1700000000000
berth_upstream_bytes_total_other 99
berth_requests_total{route="blob"} 40
# EOF
"#;

    #[test]
    fn sums_all_series_of_a_counter() {
        assert_eq!(counter_sum(TEXT, UPSTREAM_REQUESTS), Some(15.0));
        assert_eq!(counter_sum(TEXT, UPSTREAM_BYTES), Some(1_500_000.0));
        assert_eq!(counter_sum(TEXT, "berth_requests_total"), Some(40.0));
        assert_eq!(counter_sum(TEXT, "berth_missing_total"), None);
        assert_eq!(counter_sum("plain_total 7\n", "plain_total"), Some(7.0));
    }

    #[test]
    fn deltas() {
        let before = UpstreamCounters::from_text(TEXT);
        let after = UpstreamCounters::from_text(
            "berth_upstream_requests_total{a=\"b\"} 20\nberth_upstream_bytes_total 2000000\n",
        );
        assert_eq!(
            UpstreamCounters::delta(&before, &after),
            UpstreamDelta {
                requests: Some(5),
                bytes: Some(500_000)
            }
        );
        let absent = UpstreamCounters::from_text("berth_requests_total 1\n");
        assert_eq!(
            UpstreamCounters::delta(&absent, &absent),
            UpstreamDelta::default()
        );
        // A fresh berth declares the families but has no series yet: 0, not absent.
        let fresh = UpstreamCounters::from_text(
            "# HELP berth_upstream_requests_total x\n\
             # TYPE berth_upstream_requests_total counter\n\
             # TYPE berth_upstream_bytes counter\n",
        );
        assert_eq!(fresh.requests, Some(0.0));
        assert_eq!(fresh.bytes, Some(0.0));
        // A series that appears during the run started from 0.
        assert_eq!(
            UpstreamCounters::delta(&absent, &after),
            UpstreamDelta {
                requests: Some(20),
                bytes: Some(2_000_000)
            }
        );
    }
}
