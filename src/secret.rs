//! `Secret`: a token that cannot be logged by accident.
//!
//! Every credential value in tokenfs lives in this type. Its `Debug` and
//! `Display` print a fingerprint (`dapi…3f2a91c0`: a short, non-secret prefix
//! and a hash), never the value, and its memory is zeroed when dropped. The only
//! ways to reach the bytes are [`Secret::expose`] and [`Secret::expose_str`],
//! whose names make every use easy to audit.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// A secret string (API token, OAuth access or refresh token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value. Surrounding whitespace (a trailing newline from `echo`,
    /// a file, or a helper command) is never part of a token, so it is trimmed.
    pub fn new(value: impl Into<String>) -> Secret {
        let mut value: String = value.into();
        let trimmed = value.trim();
        if trimmed.len() != value.len() {
            let kept = trimmed.to_owned();
            value.zeroize();
            value = kept;
        }
        Secret(value)
    }

    /// Builds a secret from raw bytes, rejecting anything that is not UTF-8.
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Secret> {
        match String::from_utf8(bytes) {
            Ok(s) => Some(Secret::new(s)),
            Err(e) => {
                e.into_bytes().zeroize();
                None
            }
        }
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn expose_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// A stable, non-reversible name for this value, safe for logs and status.
    ///
    /// The prefix (up to 4 characters, only for tokens of 20 characters or
    /// more, where it is a type marker such as `dapi` or `sk-a` rather than key
    /// material) tells a human which kind of token it is; the 8 hex digits of
    /// SHA-256 tell two tokens apart without revealing either.
    pub fn fingerprint(&self) -> String {
        let hash = Sha256::digest(self.0.as_bytes());
        let hex: String = hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
        if self.0.chars().count() >= 20 {
            let prefix: String = self.0.chars().take(4).collect();
            format!("{prefix}…{hex}")
        } else {
            format!("…{hex}")
        }
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// Bytes that contain secrets (a rendered config file): zeroed on drop, and
/// `Debug` shows only the length.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes(bytes)
    }
}

impl std::ops::Deref for SecretBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("dapi0123456789abcdef0123456789abcdef");
        let shown = format!("{s} {s:?} {:?}", vec![s.clone()]);
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("dapi…"), "{shown}");
    }

    #[test]
    fn short_values_show_no_prefix() {
        let s = Secret::new("hunter2");
        assert!(!s.fingerprint().contains("hunt"));
        assert!(s.fingerprint().starts_with('…'));
    }

    #[test]
    fn fingerprints_tell_values_apart_and_are_stable() {
        let a = Secret::new("dapiAAAAAAAAAAAAAAAAAAAAAAAA");
        let b = Secret::new("dapiBBBBBBBBBBBBBBBBBBBBBBBB");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }

    #[test]
    fn whitespace_is_trimmed() {
        assert_eq!(Secret::new("  tok\n").expose_str(), "tok");
        assert_eq!(
            Secret::from_bytes(b"tok\r\n".to_vec()).map(|s| s.len()),
            Some(3)
        );
        assert!(Secret::from_bytes(vec![0xff, 0xfe]).is_none());
    }
}
