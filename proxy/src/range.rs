//! `Range` request headers (RFC 9110), one range per request.

/// Bytes `start..end` (end exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// The range lies outside the blob: answer 416.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against a blob of `size` bytes.
/// `Ok(None)`: a header berth does not understand (another unit, several ranges, bad
/// syntax) is ignored, as RFC 9110 allows: answer the whole blob with 200.
/// `Err(Unsatisfiable)`: the range lies outside the blob (answer 416).
pub fn parse_range(header: &str, size: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    // A spec that is not valid syntax is ignored (RFC 9110 §14.2): the whole blob.
    let num = |s: &str| s.trim().parse::<u64>().ok();
    let (a, b) = (a.trim(), b.trim());
    let (first, last) = (num(a), num(b));
    if (!a.is_empty() && first.is_none()) || (!b.is_empty() && last.is_none()) {
        return Ok(None);
    }
    let range = match (first, last) {
        (None, None) => return Ok(None),
        (None, Some(n)) => {
            if n == 0 {
                return Err(Unsatisfiable);
            }
            ByteRange {
                start: size.saturating_sub(n),
                end: size,
            }
        }
        (Some(s), None) => ByteRange {
            start: s,
            end: size,
        },
        (Some(s), Some(e)) => {
            if e < s {
                return Ok(None);
            }
            ByteRange {
                start: s,
                end: e.saturating_add(1).min(size),
            }
        }
    };
    if range.start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
        Ok(Some(ByteRange { start, end }))
    }

    const IGNORED: Result<Option<ByteRange>, Unsatisfiable> = Ok(None);

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), r(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), r(90, 100));
        assert_eq!(parse_range("bytes=-10", 100), r(90, 100));
        assert_eq!(parse_range("bytes=-1000", 100), r(0, 100));
        assert_eq!(parse_range("bytes=50-1000", 100), r(50, 100));
        assert_eq!(parse_range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=9-3", 100), IGNORED);
        assert_eq!(parse_range("bytes=-0", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=x-1", 100), IGNORED);
        assert_eq!(parse_range("bytes=-", 100), IGNORED);
        assert_eq!(parse_range("bytes=5-18446744073709551615", 100), r(5, 100));
        assert_eq!(parse_range("bytes=0-18446744073709551615", 100), r(0, 100));
        assert_eq!(parse_range("bytes=0-99999999999999999999999", 100), IGNORED);
        assert_eq!(parse_range("bytes=0-0", 0), Err(Unsatisfiable));
        assert_eq!(parse_range("items=0-1", 100), IGNORED);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), IGNORED);
    }

    #[test]
    fn the_edges_of_u64_never_overflow() {
        const MAX: u64 = u64::MAX;
        assert_eq!(
            parse_range(&format!("bytes={MAX}-{MAX}"), 100),
            Err(Unsatisfiable)
        );
        assert_eq!(
            parse_range(&format!("bytes={MAX}-"), 100),
            Err(Unsatisfiable)
        );
        assert_eq!(parse_range(&format!("bytes=-{MAX}"), 100), r(0, 100));
        assert_eq!(parse_range(&format!("bytes=0-{MAX}"), MAX), r(0, MAX));
        assert_eq!(
            parse_range(&format!("bytes={}-{MAX}", MAX - 1), MAX),
            r(MAX - 1, MAX)
        );
        assert_eq!(parse_range(&format!("bytes=-{MAX}"), MAX), r(0, MAX));
        assert_eq!(parse_range("bytes=-1", MAX), r(MAX - 1, MAX));
        assert_eq!(
            parse_range(&format!("bytes={MAX}-"), MAX),
            Err(Unsatisfiable)
        );
    }
}
