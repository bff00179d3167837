//! Repository allowlist patterns.
//!
//! A pattern is a `/`-separated path whose segments are matched against a repository
//! name's segments: `**` (a whole segment) matches any number of segments, including none
//! when other segments follow (`a/**/b` matches `a/b`); `*` inside a segment matches any
//! run of characters within that segment; other characters match themselves.
//! `library/**` therefore allows `library/nginx` and `library/a/b` but not `library`.

/// A validated allowlist pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// `**`: zero or more whole segments (at least one if it is the last segment).
    Any,
    /// A segment pattern that may contain `*`.
    Pattern(String),
}

impl Glob {
    pub fn new(text: &str) -> Result<Glob, String> {
        if text.is_empty() {
            return Err("an empty pattern matches nothing; remove it".into());
        }
        let mut segments = Vec::new();
        for seg in text.split('/') {
            if seg.is_empty() {
                return Err(format!("{text:?} has an empty path segment"));
            }
            if seg == "**" {
                segments.push(Segment::Any);
                continue;
            }
            if seg.contains("**") {
                return Err(format!("{text:?}: `**` must be a whole path segment"));
            }
            let ok = seg.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-' | b'*')
            });
            if !ok {
                return Err(format!(
                    "{text:?}: segment {seg:?} may hold only lowercase letters, digits, '.', '_', '-' and '*'"
                ));
            }
            segments.push(Segment::Pattern(seg.to_owned()));
        }
        Ok(Glob {
            text: text.to_owned(),
            segments,
        })
    }

    /// How specific the pattern is, for choosing among several that match: more literal
    /// characters first, then fewer wildcards.
    pub fn specificity(&self) -> (usize, std::cmp::Reverse<usize>) {
        let stars = self.text.matches('*').count();
        let literal = self.text.chars().filter(|&c| c != '*' && c != '/').count();
        (literal, std::cmp::Reverse(stars))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the repository name `repo` is matched.
    pub fn matches(&self, repo: &str) -> bool {
        let parts: Vec<&str> = repo.split('/').collect();
        match_segments(&self.segments, &parts)
    }
}

fn match_segments(pat: &[Segment], parts: &[&str]) -> bool {
    match pat.split_first() {
        None => parts.is_empty(),
        Some((Segment::Any, [])) => !parts.is_empty(),
        Some((Segment::Any, rest)) => (0..=parts.len()).any(|i| match_segments(rest, &parts[i..])),
        Some((Segment::Pattern(p), rest)) => match parts.split_first() {
            Some((first, more)) => {
                match_star(p.as_bytes(), first.as_bytes()) && match_segments(rest, more)
            }
            None => false,
        },
    }
}

/// `*` matches any run of bytes; everything else matches itself.
fn match_star(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| match_star(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && match_star(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            ("library/**", "library/nginx", true),
            ("library/**", "library/a/b/c", true),
            ("library/**", "library", false),
            ("library/**", "libraryx/nginx", false),
            ("library/**", "bitnami/nginx", false),
            ("**", "a", true),
            ("**", "a/b", true),
            ("org/*", "org/app", true),
            ("org/*", "org/app/x", false),
            ("org/app-*", "org/app-web", true),
            ("org/app-*", "org/other", false),
            ("a/**/z", "a/z", true),
            ("a/**/z", "a/b/c/z", true),
            ("a/**/z", "a/b/c", false),
            ("exact/name", "exact/name", true),
            ("exact/name", "exact/name2", false),
        ];
        for (pat, repo, want) in cases {
            assert_eq!(
                Glob::new(pat).unwrap().matches(repo),
                want,
                "{pat} vs {repo}"
            );
        }
    }

    #[test]
    fn invalid_patterns_say_why() {
        for bad in [
            "",
            "a//b",
            "/a",
            "a/",
            "a/***",
            "a**/b",
            "Library/**",
            "a b",
        ] {
            assert!(Glob::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
