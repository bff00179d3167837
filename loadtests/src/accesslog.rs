//! Counting an upstream's requests and bytes from its access log.
//!
//! The log is in Combined (or Common) Log Format, as `docker-registry` writes it:
//!
//! ```text
//! 127.0.0.1 - - [23/Nov/2026:02:09:35 +0000] "GET /v2/library/hello/blobs/sha256:… HTTP/1.1" 200 126 "" "ua"
//! ```
//!
//! Every line that parses is one request, and its size field (`-` is 0) is the bytes of
//! the response body. Lines that do not parse (the registry's own `level=info` lines,
//! when they go to the same file) are counted separately and otherwise ignored.
//!
//! [`LogTail`] records the file's length before a run and reads only what was appended
//! after it.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One parsed access-log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub method: String,
    /// The request target as logged, query string included.
    pub target: String,
    pub status: u16,
    pub bytes: u64,
}

/// Parses one Combined/Common Log Format line.
pub fn parse_line(line: &str) -> Option<Entry> {
    // host ident user [date] "request" status size ["referer" "user-agent"]
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let rest = line[close + 1..].trim_start();
    let rest = rest.strip_prefix('"')?;
    let (request, rest) = split_quoted(rest)?;
    let mut fields = rest.split_whitespace();
    let status: u16 = fields.next()?.parse().ok()?;
    let bytes = match fields.next()? {
        "-" => 0,
        n => n.parse().ok()?,
    };
    let mut parts = request.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    if !(100..=599).contains(&status) || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Some(Entry {
        method,
        target,
        status,
        bytes,
    })
}

/// Splits `s` (just after an opening quote) at the closing quote, honouring `\"`.
/// Returns (the content, the rest after the closing quote).
fn split_quoted(s: &str) -> Option<(&str, &str)> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some((&s[..i], &s[i + 1..])),
            _ => escaped = false,
        }
    }
    None
}

/// What a stretch of access log adds up to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogTotals {
    /// Lines that parsed: one request each.
    pub requests: u64,
    /// The sum of their size fields.
    pub bytes: u64,
    /// Requests by method (`GET`, `HEAD`, …).
    pub by_method: BTreeMap<String, u64>,
    /// Requests by status class (`2xx`, `4xx`, …).
    pub by_status: BTreeMap<String, u64>,
    /// Non-empty lines that did not parse.
    pub unparsed_lines: u64,
}

impl LogTotals {
    pub fn add(&mut self, entry: &Entry) {
        self.requests += 1;
        self.bytes += entry.bytes;
        *self.by_method.entry(entry.method.clone()).or_default() += 1;
        *self
            .by_status
            .entry(format!("{}xx", entry.status / 100))
            .or_default() += 1;
    }
}

/// Totals of every line in `text`.
pub fn totals(text: &str) -> LogTotals {
    let mut t = LogTotals::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Some(entry) => t.add(&entry),
            None => t.unparsed_lines += 1,
        }
    }
    t
}

/// The part of a log file written after [`LogTail::begin`].
#[derive(Clone, Debug)]
pub struct LogTail {
    path: PathBuf,
    start: u64,
}

impl LogTail {
    /// Remembers the file's current length (0 if it does not exist yet).
    pub fn begin(path: &Path) -> io::Result<LogTail> {
        let start = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(LogTail {
            path: path.to_owned(),
            start,
        })
    }

    /// Totals of what was appended since `begin`. If the file shrank (it was rotated or
    /// truncated), all of it is read.
    pub fn read(&self) -> io::Result<LogTotals> {
        let mut file = std::fs::File::open(&self.path)?;
        let len = file.metadata()?.len();
        let from = if len < self.start { 0 } else { self.start };
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(totals(&String::from_utf8_lossy(&bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SAMPLE: &str = r#"127.0.0.1 - - [23/Nov/2026:02:09:35 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "berth/0.1"
127.0.0.1 - - [23/Nov/2026:02:09:35 +0000] "HEAD /v2/library/hello/manifests/latest HTTP/1.1" 200 0 "" "berth/0.1"
127.0.0.1 - - [23/Nov/2026:02:09:35 +0000] "GET /v2/library/hello/manifests/latest HTTP/1.1" 200 1611 "" "berth/0.1"
time="2026-11-23T02:09:35Z" level=info msg="response completed" http.request.method=GET
127.0.0.1 - - [23/Nov/2026:02:09:36 +0000] "GET /v2/library/hello/blobs/sha256:1b44b5a3e06a9aae883e7bf25e45c100be0bb81a0e01b32de604f3ac44711634 HTTP/1.1" 200 126 "" "berth/0.1"
127.0.0.1 - - [23/Nov/2026:02:09:36 +0000] "GET /v2/library/hello/blobs/sha256:abc?ns=docker.io&x=1 HTTP/1.1" 200 2500000 "http://ref/\"q\"" "Mozilla \"quoted\" agent"
127.0.0.1 - - [23/Nov/2026:02:09:36 +0000] "HEAD /v2/library/hello/blobs/sha256:abc?ns=docker.io HTTP/1.1" 200 - "" ""
::1 - alice [23/Nov/2026:02:09:37 +0000] "GET /v2/library/missing/manifests/x HTTP/1.1" 404 98
"#;

    #[test]
    fn parses_lines() {
        let e = parse_line(
            r#"127.0.0.1 - - [23/Nov/2026:02:09:35 +0000] "GET /v2/library/hello/blobs/sha256:ab?ns=docker.io HTTP/1.1" 200 126 "" "ua""#,
        )
        .unwrap();
        assert_eq!(
            e,
            Entry {
                method: "GET".into(),
                target: "/v2/library/hello/blobs/sha256:ab?ns=docker.io".into(),
                status: 200,
                bytes: 126
            }
        );
        let head = parse_line(
            r#"127.0.0.2 - - [01/Jan/2026:00:00:00 +0000] "HEAD /v2/a/manifests/b HTTP/1.1" 200 - "-" "-""#,
        )
        .unwrap();
        assert_eq!((head.method.as_str(), head.bytes), ("HEAD", 0));
        assert_eq!(parse_line("time=\"x\" level=info msg=\"y\""), None);
        assert_eq!(parse_line(""), None);
        assert_eq!(
            parse_line(r#"h - - [d] "GET / HTTP/1.1" abc 12 "" """#),
            None,
            "status must be a number"
        );
    }

    #[test]
    fn totals_count_lines_and_bytes() {
        let t = totals(SAMPLE);
        assert_eq!(t.requests, 7);
        assert_eq!(t.bytes, 2 + 1611 + 126 + 2_500_000 + 98);
        assert_eq!(t.by_method.get("GET"), Some(&5));
        assert_eq!(t.by_method.get("HEAD"), Some(&2));
        assert_eq!(t.by_status.get("2xx"), Some(&6));
        assert_eq!(t.by_status.get("4xx"), Some(&1));
        assert_eq!(t.unparsed_lines, 1);
    }

    #[test]
    fn tail_reads_only_appended_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let missing = LogTail::begin(&path).unwrap();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(SAMPLE.as_bytes()).unwrap();
        assert_eq!(missing.read().unwrap().requests, 7);

        let tail = LogTail::begin(&path).unwrap();
        assert_eq!(tail.read().unwrap(), LogTotals::default());
        writeln!(
            f,
            r#"127.0.0.1 - - [23/Nov/2026:02:10:00 +0000] "GET /v2/x/blobs/sha256:1 HTTP/1.1" 200 1000 "" "ua""#
        )
        .unwrap();
        writeln!(
            f,
            r#"127.0.0.1 - - [23/Nov/2026:02:10:00 +0000] "HEAD /v2/x/manifests/y?ns=a HTTP/1.1" 200 0 "" "ua""#
        )
        .unwrap();
        let t = tail.read().unwrap();
        assert_eq!((t.requests, t.bytes), (2, 1000));

        // Truncated (rotated) after begin: everything now in the file counts.
        let tail = LogTail::begin(&path).unwrap();
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(
            f,
            r#"127.0.0.1 - - [23/Nov/2026:02:11:00 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "ua""#
        )
        .unwrap();
        let t = tail.read().unwrap();
        assert_eq!((t.requests, t.bytes), (1, 2));
    }
}
