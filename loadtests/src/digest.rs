//! Digests come from berth's shared OCI vocabulary (`berth-oci`); this module adds the
//! streaming verification a download needs.

pub use berth_oci::{Algorithm, Digest, Hasher};

/// Whether `s` looks like a digest reference (`algo:hex`) rather than a tag. Tags cannot
/// contain `:`.
pub fn is_digest_reference(s: &str) -> bool {
    s.contains(':')
}

/// Hashes a body as it streams in and compares it with the expected digest at the end.
pub struct Verifier {
    expected: Digest,
    hasher: Hasher,
}

impl Verifier {
    pub fn new(expected: Digest) -> Verifier {
        let hasher = Hasher::new(expected.algorithm());
        Verifier { expected, hasher }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
    }

    /// Ok if the bytes seen hash to the expected digest; otherwise the actual digest.
    pub fn finish(self) -> Result<(), Digest> {
        let actual = self.hasher.finish();
        if actual == self.expected {
            Ok(())
        } else {
            Err(actual)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_in_chunks() {
        let body = b"hello, fleet of nodes".repeat(1000);
        let d = Digest::sha256_of(&body);
        let mut v = Verifier::new(d.clone());
        for chunk in body.chunks(777) {
            v.update(chunk);
        }
        assert_eq!(v.finish(), Ok(()));

        let mut bad = body.clone();
        bad[5000] ^= 1;
        let mut v = Verifier::new(d);
        v.update(&bad);
        assert_eq!(v.finish(), Err(Digest::sha256_of(&bad)));
    }

    #[test]
    fn references_are_told_from_tags() {
        assert!(is_digest_reference("sha256:abc"));
        assert!(!is_digest_reference("latest"));
    }
}
