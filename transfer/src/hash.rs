//! The blake3 digest that names chunks and manifests.

use std::fmt;
use std::str::FromStr;

/// Bytes in a [`ContentHash`].
pub const HASH_BYTES: usize = 32;

/// A blake3 digest: the name of a chunk (its bytes) or of an image (its manifest's bytes).
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
    serde::Deserialize,
)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[serde(into = "String", try_from = "String")]
pub struct ContentHash(pub [u8; HASH_BYTES]);

impl ContentHash {
    /// The blake3 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut hex = String::with_capacity(HASH_BYTES * 2);
        for byte in self.0 {
            hex.push(hex_digit(byte >> 4));
            hex.push(hex_digit(byte & 0x0f));
        }
        hex
    }
}

impl ArchivedContentHash {
    /// The owned hash.
    pub fn to_hash(&self) -> ContentHash {
        ContentHash(self.0)
    }
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a blake3 hash (64 hex digits): {text:?}")]
pub struct HashParseError {
    /// What was given, cut to a sane length for messages.
    pub text: String,
}

impl FromStr for ContentHash {
    type Err = HashParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || HashParseError {
            text: text.chars().take(80).collect(),
        };
        let digits = text.as_bytes();
        if digits.len() != HASH_BYTES * 2 {
            return Err(error());
        }
        let mut hash = [0u8; HASH_BYTES];
        for (byte, pair) in hash.iter_mut().zip(digits.chunks_exact(2)) {
            let high = hex_value(pair[0]).ok_or_else(error)?;
            let low = hex_value(pair[1]).ok_or_else(error)?;
            *byte = (high << 4) | low;
        }
        Ok(Self(hash))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "ContentHash({})", self.to_hex())
    }
}

impl From<ContentHash> for String {
    fn from(hash: ContentHash) -> Self {
        hash.to_hex()
    }
}

impl TryFrom<String> for ContentHash {
    type Error = HashParseError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let hash = ContentHash::of(b"bootmesh");
        let hex = hash.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.parse::<ContentHash>(), Ok(hash));
        assert_eq!(hex.to_uppercase().parse::<ContentHash>(), Ok(hash));
        assert!("abc".parse::<ContentHash>().is_err());
        assert!(format!("{}g", &hex[..63]).parse::<ContentHash>().is_err());
        assert!("é".repeat(32).parse::<ContentHash>().is_err());
    }
}
