//! The access log: one line per request on standard error, in the form of berth's other
//! log lines (`<time>  INFO berth::access: request method=GET user=… path=… …`).
//!
//! The line used to be a `tracing` event. tracing's formatter visits every field through
//! `dyn Display` and cost about 14,000 instructions per request, a fifth of what a cached
//! manifest costs in all. This writes the same fields into a per-thread buffer and hands
//! the line to the kernel in one `write`, as nginx's `access_log` does. `BERTH_LOG` still
//! decides whether it is written: the `berth::access` target at level `info`.

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One request, as the access log records it.
pub(crate) struct Entry<'a> {
    pub method: &'a str,
    pub user: &'a str,
    pub path: &'a str,
    /// containerd's `ns` query parameter, or empty.
    pub ns: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub outcome: &'a str,
    pub complete: bool,
    pub ms: u64,
}

/// Writes [`Entry`] lines to standard error when the log filter enables them.
#[derive(Clone, Copy, Debug)]
pub struct AccessLog {
    enabled: bool,
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
    /// The second last formatted on this thread and its text up to the seconds
    /// (`2026-12-01T19:20:30`): most lines share it with the one before.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl AccessLog {
    /// Enabled as the installed `tracing` subscriber's filter says for `berth::access`
    /// at `info`. The filter is set once at start-up, so it is asked once.
    pub fn from_filter() -> Self {
        AccessLog {
            enabled: tracing::enabled!(target: "berth::access", tracing::Level::INFO),
        }
    }

    pub(crate) fn write(&self, e: &Entry<'_>) {
        if !self.enabled {
            return;
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            format_line(&mut line, SystemTime::now(), e);
            // One write of the whole line, so that lines from other threads never
            // interleave with it. A failed write to stderr has nowhere to be reported.
            let _ = write_stderr(&line);
        });
    }
}

/// Writes `line` to standard error without `std::io::Stderr`'s lock, which every thread
/// took for every line: under load the threads queued on it, one futex call for every
/// tenth request. A line is one `write(2)` of a whole buffer, so it needs no lock of ours
/// to stay whole. If the descriptor cannot be duplicated, the locked handle is used.
fn write_stderr(line: &[u8]) -> std::io::Result<()> {
    static FILE: OnceLock<Option<std::fs::File>> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
        Some(std::fs::File::from(fd))
    });
    match file {
        Some(file) => (&*file).write_all(line),
        None => std::io::stderr().write_all(line),
    }
}

fn format_line(out: &mut Vec<u8>, now: SystemTime, e: &Entry<'_>) {
    let mut num = itoa::Buffer::new();
    // The same time format as the rest of the log (RFC 3339, microseconds, UTC).
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != since.as_secs() {
            let whole = UNIX_EPOCH + Duration::from_secs(since.as_secs());
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            *second = (since.as_secs(), text.trim_end_matches('Z').to_owned());
        }
        out.extend_from_slice(second.1.as_bytes());
    });
    let micros = num.format(since.subsec_micros() + 1_000_000);
    // 1xxxxxx: the leading 1 keeps the six digits' zeros; it becomes the dot.
    out.push(b'.');
    out.extend_from_slice(&micros.as_bytes()[1..]);
    out.push(b'Z');
    out.extend_from_slice(b"  INFO berth::access: request method=");
    out.extend_from_slice(e.method.as_bytes());
    out.extend_from_slice(b" user=");
    out.extend_from_slice(e.user.as_bytes());
    out.extend_from_slice(b" path=");
    out.extend_from_slice(e.path.as_bytes());
    out.extend_from_slice(b" ns=");
    out.extend_from_slice(e.ns.as_bytes());
    out.extend_from_slice(b" status=");
    out.extend_from_slice(num.format(e.status).as_bytes());
    out.extend_from_slice(b" bytes=");
    out.extend_from_slice(num.format(e.bytes).as_bytes());
    out.extend_from_slice(b" outcome=");
    out.extend_from_slice(e.outcome.as_bytes());
    out.extend_from_slice(if e.complete {
        b" complete=true ms="
    } else {
        b" complete=false ms="
    });
    out.extend_from_slice(num.format(e.ms).as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_every_field_in_the_log_format() {
        let mut out = Vec::new();
        let at = UNIX_EPOCH + Duration::from_micros(1_764_616_830_123_456);
        format_line(
            &mut out,
            at,
            &Entry {
                method: "GET",
                user: "ci",
                path: "/v2/library/nginx/manifests/1.27",
                ns: "docker.io",
                status: 200,
                bytes: 1234,
                outcome: "hit",
                complete: true,
                ms: 3,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2025-12-01T19:20:30.123456Z  INFO berth::access: request method=GET user=ci \
             path=/v2/library/nginx/manifests/1.27 ns=docker.io status=200 bytes=1234 \
             outcome=hit complete=true ms=3\n"
        );
    }

    #[test]
    fn times_keep_their_zeros_and_follow_the_second_they_are_in() {
        let entry = Entry {
            method: "GET",
            user: "-",
            path: "/v2/",
            ns: "",
            status: 200,
            bytes: 2,
            outcome: "-",
            complete: true,
            ms: 0,
        };
        let time = |micros: u64| {
            let mut out = Vec::new();
            format_line(&mut out, UNIX_EPOCH + Duration::from_micros(micros), &entry);
            String::from_utf8(out).unwrap()[..27].to_owned()
        };
        let second = 1_764_616_830_000_000;
        assert_eq!(time(second + 5), "2025-12-01T19:20:30.000005Z");
        assert_eq!(time(second + 999_999), "2025-12-01T19:20:30.999999Z");
        assert_eq!(time(second + 1_000_000), "2025-12-01T19:20:31.000000Z");
        assert_eq!(time(second - 1), "2025-12-01T19:20:29.999999Z");
        assert_eq!(time(second + 42), "2025-12-01T19:20:30.000042Z");
    }

    #[test]
    fn an_empty_ns_and_an_incomplete_response_are_written_as_such() {
        let mut out = Vec::new();
        format_line(
            &mut out,
            UNIX_EPOCH,
            &Entry {
                method: "HEAD",
                user: "-",
                path: "/v2/",
                ns: "",
                status: 401,
                bytes: 0,
                outcome: "-",
                complete: false,
                ms: 0,
            },
        );
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.ends_with(
                "request method=HEAD user=- path=/v2/ ns= status=401 bytes=0 outcome=- \
                 complete=false ms=0\n"
            ),
            "{line}"
        );
    }
}
