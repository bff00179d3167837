//! Resuming a blob download that broke off: which answer to `Range: bytes=<offset>-`
//! lets a fill go on writing into the same file (and the same running digest).
//!
//! The rules a fill follows ([`crate::Cache`]'s `fill_blob`):
//! - only a blob whose size the upstream announced is resumed, and not when its first
//!   answer said `Accept-Ranges: none`;
//! - a body that errors, stalls past the read timeout, or ends before the announced size
//!   is resumed from the bytes written so far, at most [`MAX_RESUMES`] times per fill and
//!   only if the broken answer added bytes (no progress, no new attempt);
//! - the answer must be a `206` whose `Content-Range` is exactly `bytes <offset>-<size -
//!   1>/<size>`, or a `200` of the whole blob (`Content-Length` = size), whose first
//!   `offset` bytes are then skipped. Anything else fails the fill: no byte from an
//!   answer berth cannot place is ever written;
//! - the digest, checked when the fill commits, stays the final guard.

use reqwest::header::{HeaderMap, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE};
use reqwest::StatusCode;

/// Range requests one fill sends at most.
pub const MAX_RESUMES: u32 = 3;

/// How an answer to a Range request continues a fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// A `206` starting at the offset asked for: append its body.
    Tail,
    /// A `200` with the whole blob: skip its first `offset` bytes, append the rest.
    Whole,
}

/// Whether the first answer for a blob forbids ranges (`Accept-Ranges: none`).
pub fn refuses_ranges(headers: &HeaderMap) -> bool {
    headers
        .get(ACCEPT_RANGES)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
}

/// Checks the answer to `Range: bytes=<offset>-` for a blob of `size` bytes; `Err` says
/// why it cannot continue the fill.
pub fn check(
    status: StatusCode,
    headers: &HeaderMap,
    offset: u64,
    size: u64,
) -> Result<Resumed, String> {
    let length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let range = headers
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .ok_or("a 206 without a Content-Range")?;
            let (start, end, total) = parse_content_range(range)
                .ok_or_else(|| format!("an unreadable Content-Range {range:?}"))?;
            if start != offset || total != size || end + 1 != size {
                return Err(format!(
                    "Content-Range {range:?} where bytes {offset}-{}/{size} were asked for",
                    size.saturating_sub(1)
                ));
            }
            if length.is_some_and(|n| n != size - offset) {
                return Err(format!(
                    "a 206 of {} bytes for Content-Range {range:?}",
                    length.unwrap_or(0)
                ));
            }
            Ok(Resumed::Tail)
        }
        StatusCode::OK if length == Some(size) => Ok(Resumed::Whole),
        StatusCode::OK => Err(format!(
            "a 200 of {} bytes where the blob has {size}",
            length.map_or("an unknown number of".to_owned(), |n| n.to_string())
        )),
        s => Err(format!("HTTP {} to a Range request", s.as_u16())),
    }
}

/// `bytes <start>-<end>/<total>` as numbers (an unknown total, `*`, is refused).
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes")?;
    if !rest.starts_with(' ') {
        return None;
    }
    let (span, total) = rest.trim_start().split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (start, end, total) = (number(start)?, number(end)?, number(total)?);
    (start <= end && end < total).then_some((start, end, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_206_must_continue_exactly_where_the_fill_stopped() {
        let ok = headers(&[
            ("content-range", "bytes 300-999/1000"),
            ("content-length", "700"),
        ]);
        assert_eq!(
            check(StatusCode::PARTIAL_CONTENT, &ok, 300, 1000),
            Ok(Resumed::Tail)
        );
        let no_length = headers(&[("content-range", "bytes 300-999/1000")]);
        assert_eq!(
            check(StatusCode::PARTIAL_CONTENT, &no_length, 300, 1000),
            Ok(Resumed::Tail)
        );
        for bad in [
            "bytes 299-999/1000", // starts elsewhere
            "bytes 301-999/1000",
            "bytes 300-998/1000", // stops short
            "bytes 300-999/1001", // another total
            "bytes 300-999/*",
            "bytes */1000",
            "bytes=300-999/1000",
            "items 300-999/1000",
            "bytes 300-1000/1000",
            "bytes +300-999/1000",
            "",
        ] {
            let h = headers(&[("content-range", bad)]);
            assert!(
                check(StatusCode::PARTIAL_CONTENT, &h, 300, 1000).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(check(StatusCode::PARTIAL_CONTENT, &HeaderMap::new(), 300, 1000).is_err());
        let wrong_length = headers(&[
            ("content-range", "bytes 300-999/1000"),
            ("content-length", "1000"),
        ]);
        assert!(check(StatusCode::PARTIAL_CONTENT, &wrong_length, 300, 1000).is_err());
    }

    #[test]
    fn a_200_is_taken_only_as_the_whole_blob() {
        let whole = headers(&[("content-length", "1000")]);
        assert_eq!(check(StatusCode::OK, &whole, 300, 1000), Ok(Resumed::Whole));
        let tail_sized = headers(&[("content-length", "700")]);
        assert!(check(StatusCode::OK, &tail_sized, 300, 1000).is_err());
        assert!(check(StatusCode::OK, &HeaderMap::new(), 300, 1000).is_err());
        assert!(check(StatusCode::NO_CONTENT, &whole, 300, 1000).is_err());
    }

    #[test]
    fn accept_ranges_none_forbids_resuming() {
        assert!(refuses_ranges(&headers(&[("accept-ranges", "None")])));
        assert!(!refuses_ranges(&headers(&[("accept-ranges", "bytes")])));
        assert!(!refuses_ranges(&HeaderMap::new()));
    }
}
