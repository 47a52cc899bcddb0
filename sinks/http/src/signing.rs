//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), so an endpoint can
//! check that a request comes from ferry and was not altered or replayed: HMAC-SHA256 over
//! `"{webhook-id}.{webhook-timestamp}.{body}"`, sent as `webhook-signature: v1,<base64>`.
//!
//! Verification lives here too, so that the example endpoint and the tests check the same
//! construction ferry signs with.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a Standard Webhooks secret.
const PREFIX: &str = "whsec_";

/// Why a secret was refused (the secret itself is never part of the message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// Not `whsec_` followed by base64.
    #[error("is not \"whsec_\" followed by a base64 key")]
    NotBase64,
    /// Shorter than the spec's 24 bytes.
    #[error("key is {0} bytes; Standard Webhooks asks for 24 to 64")]
    Length(usize),
}

/// How far a request's `webhook-timestamp` may be from the receiver's clock (the spec's
/// five minutes): an older signed request replayed later is refused.
pub const TOLERANCE_SECS: u64 = 300;

/// Why a receiver refuses a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// `webhook-timestamp` is not whole seconds since the epoch.
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    /// Too far from now: a replay, or a clock that is off.
    #[error("webhook-timestamp is more than 5 minutes from now")]
    OutsideTolerance,
    /// No signature matches the id, timestamp and body.
    #[error("no webhook-signature matches")]
    Mismatch,
}

/// A signing key; its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// Reads `whsec_<base64>` (the prefix may be left out, as the reference libraries allow).
    pub fn from_secret(secret: &str) -> Result<Self, SecretError> {
        let encoded = secret.trim();
        let encoded = encoded.strip_prefix(PREFIX).unwrap_or(encoded);
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if !(24..=64).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value for one request.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// Checks a received request as the spec asks a receiver to: the timestamp within
    /// [`TOLERANCE_SECS`] of `now` (seconds since the epoch), and any `v1` signature of the
    /// space-separated `webhook-signature` header (several during a key rotation) matching,
    /// compared in constant time.
    pub fn verify(
        &self,
        id: &str,
        timestamp: &str,
        body: &[u8],
        header: &str,
        now: u64,
    ) -> Result<(), VerifyError> {
        let sent: u64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
        if sent.abs_diff(now) > TOLERANCE_SECS {
            return Err(VerifyError::OutsideTolerance);
        }
        let matches = header.split(' ').any(|signature| {
            let Some(encoded) = signature.strip_prefix("v1,") else {
                return false;
            };
            let Ok(tag) = STANDARD.decode(encoded) else {
                return false;
            };
            self.mac(id, timestamp, body).verify_slice(&tag).is_ok()
        });
        if matches {
            Ok(())
        } else {
            Err(VerifyError::Mismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification and its reference libraries.
    #[test]
    fn matches_the_specifications_example() {
        let key = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        let body = br#"{"test": 2432232314}"#;
        let signature = key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let now = 1614265330 + 60;
        let rotated = format!("v1,bm90IHRoaXMgb25l {signature}");
        assert_eq!(key.verify(id, "1614265330", body, &rotated, now), Ok(()));
        let refused = |id, ts, body: &[u8], now| key.verify(id, ts, body, &signature, now);
        assert_eq!(
            refused(id, "1614265331", body, now),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            refused("other", "1614265330", body, now),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            refused(id, "1614265330", b"{}", now),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            refused(id, "1614265330", body, now + 600),
            Err(VerifyError::OutsideTolerance)
        );
        assert_eq!(
            refused(id, "soon", body, now),
            Err(VerifyError::BadTimestamp)
        );
    }

    #[test]
    fn refuses_bad_secrets_without_echoing_them() {
        assert_eq!(
            SigningKey::from_secret("whsec_not base64!").map(|_| ()),
            Err(SecretError::NotBase64)
        );
        assert_eq!(
            SigningKey::from_secret("whsec_c2hvcnQ=").map(|_| ()),
            Err(SecretError::Length(5))
        );
        let key = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        assert!(!format!("{key:?}").contains("MfKQ"));
    }
}
