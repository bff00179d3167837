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
/// `Err(Unsatisfiable)` means the range cannot be satisfied (answer 416); a header berth does not
/// understand (another unit, several ranges) is ignored, as RFC 9110 allows, by
/// returning the whole blob.
pub fn parse_range(header: &str, size: u64) -> Result<ByteRange, Unsatisfiable> {
    let whole = ByteRange {
        start: 0,
        end: size,
    };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(whole);
    };
    if spec.contains(',') {
        return Ok(whole);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(whole);
    };
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| Unsatisfiable);
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => return Err(Unsatisfiable),
        (true, false) => {
            let n = num(b)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            ByteRange {
                start: size.saturating_sub(n),
                end: size,
            }
        }
        (false, true) => ByteRange {
            start: num(a)?,
            end: size,
        },
        (false, false) => {
            let (s, e) = (num(a)?, num(b)?);
            if e < s {
                return Err(Unsatisfiable);
            }
            ByteRange {
                start: s,
                end: (e + 1).min(size),
            }
        }
    };
    if range.start >= size {
        return Err(Unsatisfiable);
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> Result<ByteRange, Unsatisfiable> {
        Ok(ByteRange { start, end })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), r(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), r(90, 100));
        assert_eq!(parse_range("bytes=-10", 100), r(90, 100));
        assert_eq!(parse_range("bytes=-1000", 100), r(0, 100));
        assert_eq!(parse_range("bytes=50-1000", 100), r(50, 100));
        assert_eq!(parse_range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=9-3", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=-0", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=x-1", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("items=0-1", 100), r(0, 100));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), r(0, 100));
    }
}
