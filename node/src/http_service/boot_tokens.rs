//! Per-boot tokens: the boot script hands a node a fresh random token on its kernel command line;
//! the node's agent trades it once for its secrets. The table is sans-IO: the current time and
//! the token's random bytes come in as arguments, so tests run it in made-up time.
//!
//! A token only narrows the window in which someone claiming a node's MAC can take its
//! secrets (docs/threat-model.md); it is not an identity.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Tokens kept at once; issuing one more drops the oldest. Far above the nodes of a fleet that
/// boot within one token lifetime, so only a flood of boot-script requests for made-up MACs
/// drops a real node's token (its agent then boots without secrets, as after a lost token).
pub const BOOT_TOKENS_MAX: usize = 65_536;

/// 128 random bits, drawn from the OS by the caller.
///
/// There is deliberately no `PartialEq`: tokens are compared only by [`BootTokens::redeem`],
/// in constant time.
#[derive(Clone, Copy)]
pub struct BootToken([u8; BootToken::BYTES]);

impl BootToken {
    /// Bytes in a token.
    pub const BYTES: usize = 16;

    /// Wraps random bytes.
    pub fn from_bytes(bytes: [u8; Self::BYTES]) -> Self {
        Self(bytes)
    }

    /// Lower-case hex, as on the kernel command line and in the secrets URL.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Parses exactly 32 hex digits; `None` for anything else.
    pub fn parse_hex(text: &str) -> Option<Self> {
        // `from_str_radix` would also take a sign; only hex digits are a token.
        if text.len() != Self::BYTES * 2 || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0u8; Self::BYTES];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(bytes))
    }

    fn matches(&self, other: &BootToken) -> bool {
        constant_time_eq::constant_time_eq_n(&self.0, &other.0)
    }
}

impl fmt::Debug for BootToken {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("BootToken(<redacted>)")
    }
}

/// Why a token was not accepted. The messages go back to the client and into the log; they
/// never contain the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// The node has no current token: none was issued, it was used, replaced by a newer boot
    /// script, or dropped from a full table.
    #[error("no current boot token for this node")]
    NoToken,
    /// The node's token is past its lifetime (and is now gone).
    #[error("boot token expired")]
    Expired,
    /// The presented token is not the node's current one.
    #[error("boot token does not match")]
    Mismatch,
}

/// The current token of each node (by MAC), with its expiry.
#[derive(Debug)]
pub struct BootTokens {
    time_to_live: Duration,
    capacity: usize,
    by_mac: BTreeMap<[u8; 6], IssuedToken>,
    /// MACs by issue sequence: oldest first. With one lifetime for all tokens, the oldest is
    /// also the first to expire.
    issue_order: BTreeMap<u64, [u8; 6]>,
    next_sequence: u64,
}

#[derive(Debug)]
struct IssuedToken {
    token: BootToken,
    expires_at: Instant,
    sequence: u64,
}

impl BootTokens {
    /// An empty table whose tokens live `time_to_live`, bounded by [`BOOT_TOKENS_MAX`].
    pub fn new(time_to_live: Duration) -> Self {
        Self::with_capacity(time_to_live, BOOT_TOKENS_MAX)
    }

    /// An empty table holding at most `capacity` tokens (at least one).
    pub fn with_capacity(time_to_live: Duration, capacity: usize) -> Self {
        Self {
            time_to_live,
            capacity: capacity.max(1),
            by_mac: BTreeMap::new(),
            issue_order: BTreeMap::new(),
            next_sequence: 0,
        }
    }

    /// Makes `token` the current token of `mac` from `now`, replacing any earlier one: only
    /// the newest boot script's token is good.
    pub fn issue(&mut self, now: Instant, mac: [u8; 6], token: BootToken) {
        self.remove(&mac);
        self.drop_expired(now);
        while self.by_mac.len() >= self.capacity {
            let Some((_, oldest)) = self.issue_order.pop_first() else {
                break;
            };
            self.by_mac.remove(&oldest);
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.issue_order.insert(sequence, mac);
        self.by_mac.insert(
            mac,
            IssuedToken {
                token,
                expires_at: now + self.time_to_live,
                sequence,
            },
        );
        assert_eq!(self.by_mac.len(), self.issue_order.len());
    }

    /// Spends the current token of `mac` if `presented` is it and it has not expired. A
    /// mismatch leaves the token in place: guessing 128 bits is hopeless, and anyone able to
    /// send a wrong token could as well fetch a new boot script, which also replaces it.
    pub fn redeem(
        &mut self,
        now: Instant,
        mac: &[u8; 6],
        presented: &BootToken,
    ) -> Result<(), TokenRefusal> {
        let issued = self.by_mac.get(mac).ok_or(TokenRefusal::NoToken)?;
        if now >= issued.expires_at {
            self.remove(mac);
            return Err(TokenRefusal::Expired);
        }
        if !issued.token.matches(presented) {
            return Err(TokenRefusal::Mismatch);
        }
        self.remove(mac);
        Ok(())
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    fn remove(&mut self, mac: &[u8; 6]) {
        if let Some(issued) = self.by_mac.remove(mac) {
            self.issue_order.remove(&issued.sequence);
        }
    }

    fn drop_expired(&mut self, now: Instant) {
        while let Some((_, mac)) = self.issue_order.first_key_value() {
            let expired = self
                .by_mac
                .get(mac)
                .is_none_or(|issued| now >= issued.expires_at);
            if !expired {
                break;
            }
            let mac = *mac;
            self.issue_order.pop_first();
            self.by_mac.remove(&mac);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIME_TO_LIVE: Duration = Duration::from_secs(300);

    fn token(seed: u8) -> BootToken {
        BootToken::from_bytes([seed; BootToken::BYTES])
    }

    fn mac(last: u8) -> [u8; 6] {
        [0x52, 0x54, 0, 0, 0, last]
    }

    #[test]
    fn a_token_is_good_once() {
        let start = crate::seams::monotonic_now();
        let mut tokens = BootTokens::new(TIME_TO_LIVE);
        tokens.issue(start, mac(1), token(7));
        assert_eq!(
            tokens.redeem(start, &mac(1), &token(8)),
            Err(TokenRefusal::Mismatch)
        );
        assert_eq!(
            tokens.redeem(start, &mac(2), &token(7)),
            Err(TokenRefusal::NoToken),
            "a token is good only for the MAC it was issued to"
        );
        assert_eq!(tokens.redeem(start, &mac(1), &token(7)), Ok(()));
        assert_eq!(
            tokens.redeem(start, &mac(1), &token(7)),
            Err(TokenRefusal::NoToken)
        );
        assert!(tokens.is_empty());
    }

    #[test]
    fn a_token_expires_after_its_lifetime() {
        let start = crate::seams::monotonic_now();
        let mut tokens = BootTokens::new(TIME_TO_LIVE);
        tokens.issue(start, mac(1), token(7));
        tokens.issue(start, mac(2), token(8));
        let almost = start + TIME_TO_LIVE - Duration::from_millis(1);
        assert_eq!(tokens.redeem(almost, &mac(1), &token(7)), Ok(()));
        assert_eq!(
            tokens.redeem(start + TIME_TO_LIVE, &mac(2), &token(8)),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(
            tokens.redeem(start + TIME_TO_LIVE, &mac(2), &token(8)),
            Err(TokenRefusal::NoToken),
            "an expired token is gone"
        );
    }

    #[test]
    fn only_the_newest_token_of_a_mac_is_good() {
        let start = crate::seams::monotonic_now();
        let mut tokens = BootTokens::new(TIME_TO_LIVE);
        tokens.issue(start, mac(1), token(7));
        tokens.issue(start, mac(1), token(8));
        assert_eq!(tokens.len(), 1);
        assert_eq!(
            tokens.redeem(start, &mac(1), &token(7)),
            Err(TokenRefusal::Mismatch)
        );
        assert_eq!(tokens.redeem(start, &mac(1), &token(8)), Ok(()));
    }

    #[test]
    fn a_full_table_drops_expired_tokens_then_the_oldest() {
        let start = crate::seams::monotonic_now();
        let mut tokens = BootTokens::with_capacity(TIME_TO_LIVE, 3);
        for last in 1..=3 {
            tokens.issue(
                start + Duration::from_secs(u64::from(last)),
                mac(last),
                token(last),
            );
        }
        tokens.issue(start + Duration::from_secs(4), mac(4), token(4));
        assert_eq!(tokens.len(), 3);
        let now = start + Duration::from_secs(5);
        assert_eq!(
            tokens.redeem(now, &mac(1), &token(1)),
            Err(TokenRefusal::NoToken),
            "the oldest went"
        );
        assert_eq!(tokens.redeem(now, &mac(2), &token(2)), Ok(()));
        // Once the rest have expired, a new token costs none of the live ones.
        let later = start + TIME_TO_LIVE + Duration::from_secs(10);
        tokens.issue(later, mac(5), token(5));
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens.redeem(later, &mac(5), &token(5)), Ok(()));
    }

    #[test]
    fn tokens_are_hex_and_never_printed() {
        let token = BootToken::from_bytes([0xab; BootToken::BYTES]);
        let hex = token.to_hex();
        assert_eq!(hex, "ab".repeat(16));
        assert!(BootToken::parse_hex(&hex).is_some_and(|parsed| parsed.matches(&token)));
        assert!(BootToken::parse_hex(&hex.to_uppercase()).is_some());
        for bad in [
            "",
            "ab",
            &"ab".repeat(17),
            &"zz".repeat(16),
            &"+a".repeat(16),
            &"é".repeat(16),
        ] {
            assert!(BootToken::parse_hex(bad).is_none(), "{bad:?}");
        }
        assert!(!format!("{token:?}").contains("ab"));
        assert!(!TokenRefusal::Mismatch.to_string().contains("ab"));
    }
}
