//! Signed URLs for private repositories (`docs/proxy.md#private-repositories`).
//!
//! A token is `{expiry}.{sig}`: `expiry` a Unix time in seconds, `sig` the
//! unpadded base64url HMAC-SHA256, under the key, of `"{owner}/{repo}:{expiry}"`.
//! It grants every archive of that one repository until `expiry`, provided
//! `expiry` is at most the proxy's `--max-token-ttl` ahead. The key is
//! the key file's content with surrounding whitespace trimmed, so a trailing
//! newline from `echo` or an editor does not change it.
//!
//! A token has exactly one spelling: the expiry is the canonical decimal of
//! the number (no sign, no leading zero) and the signature is unpadded
//! base64url with zero trailing bits. The signature covers the number, so a
//! second spelling such as `0{expiry}.{sig}` would otherwise grant the same
//! access under a different string, out of reach of anything keyed on the
//! token's text (a deny-list, a log search).
//!
//! The maximum lifetime is enforced where tokens are verified, not where
//! they are signed: `sign` runs elsewhere and cannot know the proxy's
//! setting, and an expiry up to 2^64-1 would otherwise grant access for
//! good. A token carries no issue time, so the bound is on what is left of
//! its life: one signed for longer is refused until its expiry comes within
//! `--max-token-ttl`.
//!
//! Verification compares the signature in constant time (`subtle`), and every
//! failure is the same [`TokenError`] variant as far as the client can tell:
//! the HTTP layer answers all of them with the `404` of an unknown
//! repository, so a private repository's existence is not revealed.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gitball_core::secret::{SecretError, read_secret};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted: 20 digits, a dot and 43 base64 characters, with
/// room to spare. Anything longer is rejected before any work is done.
pub(crate) const MAX_TOKEN_BYTES: usize = 128;

/// Why a token was refused (for the log; the client sees a plain `404`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token expires further ahead than --max-token-ttl")]
    TooFarAhead,
    #[error("bad signature")]
    BadSignature,
}

/// The HMAC key for signed URLs.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// The key is the text with surrounding whitespace trimmed; it must not
    /// be empty.
    pub fn new(text: &[u8]) -> Result<SigningKey, String> {
        let key = text.trim_ascii();
        if key.is_empty() {
            return Err("the signing key is empty".into());
        }
        Ok(SigningKey(key.to_vec()))
    }

    /// The key in `path` (`--signing-key-file`), trimmed, not empty.
    pub fn from_file(path: &Path) -> Result<SigningKey, SecretError> {
        read_secret(path, "--signing-key-file").map(SigningKey)
    }

    fn mac(&self, repository: &str, expiry: u64) -> [u8; 32] {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(repository.as_bytes());
        mac.update(b":");
        mac.update(expiry.to_string().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The token for `repository` (`owner/repo`) valid until `expiry` (Unix
    /// seconds).
    pub fn sign(&self, repository: &str, expiry: u64) -> String {
        format!(
            "{expiry}.{}",
            URL_SAFE_NO_PAD.encode(self.mac(repository, expiry))
        )
    }

    /// The token for `repository` valid for `ttl` from now.
    pub fn sign_for(&self, repository: &str, ttl: Duration) -> String {
        self.sign(repository, unix_now().saturating_add(ttl.as_secs()))
    }

    /// Checks `token` for `repository` at time `now` (Unix seconds): it must
    /// expire after `now` and no more than `max_ttl` after it.
    pub fn verify_at(
        &self,
        repository: &str,
        token: &str,
        now: u64,
        max_ttl: Duration,
    ) -> Result<(), TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let (expiry, signature) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let expiry = parse_expiry(expiry)?;
        // Rejects padding and non-zero trailing bits: one spelling here too.
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let expected = self.mac(repository, expiry);
        // Check the signature before the expiry so that timing says nothing
        // about which check failed for a forged token.
        if !bool::from(expected.as_slice().ct_eq(&signature)) {
            return Err(TokenError::BadSignature);
        }
        if expiry <= now {
            return Err(TokenError::Expired);
        }
        if expiry - now > max_ttl.as_secs() {
            return Err(TokenError::TooFarAhead);
        }
        Ok(())
    }

    /// Checks `token` for `repository` now, with `--max-token-ttl`.
    pub fn verify(
        &self,
        repository: &str,
        token: &str,
        max_ttl: Duration,
    ) -> Result<(), TokenError> {
        self.verify_at(repository, token, unix_now(), max_ttl)
    }
}

/// The expiry of a token: the canonical decimal of a `u64` and nothing else.
/// Digits only, because `u64::from_str` would also take a leading `+`; no
/// leading zero, because the signature covers the number, not the text.
fn parse_expiry(text: &str) -> Result<u64, TokenError> {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = text.len() > 1 && text.starts_with('0');
    if !digits_only || leading_zero {
        return Err(TokenError::Malformed);
    }
    // Still fails above `u64::MAX`.
    text.parse().map_err(|_| TokenError::Malformed)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a time-to-live such as `600`, `90s`, `10m`, `12h` or `7d` (a bare
/// number is seconds).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 600, 90s, 10m, 12h or 7d"))?;
    let unit_seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?}; use s, m, h or d")),
    };
    let seconds = number
        .checked_mul(unit_seconds)
        .ok_or_else(|| format!("{text:?} is too long"))?;
    if seconds == 0 {
        return Err("the ttl must be positive".into());
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const MAX_TTL: Duration = Duration::from_secs(7 * 86_400);

    fn key() -> SigningKey {
        SigningKey::new(b"  correct horse battery staple\n").unwrap()
    }

    #[test]
    fn valid_token_verifies() {
        let token = key().sign("acme/widget", NOW + 600);
        assert_eq!(key().verify_at("acme/widget", &token, NOW, MAX_TTL), Ok(()));
        assert!(token.starts_with("1800000600."));
        assert!(!token.contains('='), "base64url must be unpadded: {token}");
    }

    #[test]
    fn key_is_trimmed() {
        let token = SigningKey::new(b"correct horse battery staple")
            .unwrap()
            .sign("acme/widget", NOW + 1);
        assert_eq!(key().verify_at("acme/widget", &token, NOW, MAX_TTL), Ok(()));
        assert!(SigningKey::new(b" \n\t").is_err());
    }

    #[test]
    fn signature_matches_the_spec_formula() {
        // HMAC-SHA256(key, "acme/widget:1800000600"), base64url unpadded,
        // computed independently:
        //   printf 'acme/widget:1800000600' |
        //     openssl dgst -sha256 -hmac 'correct horse battery staple' -binary |
        //     basenc --base64url | tr -d '='
        let token = key().sign("acme/widget", NOW + 600);
        assert_eq!(
            token,
            "1800000600.6U4LQzbsBWM7WPks-LiIrLikPBxzhICZGCj25tGS16c"
        );
    }

    #[test]
    fn expired_token_is_refused() {
        let token = key().sign("acme/widget", NOW);
        assert_eq!(
            key().verify_at("acme/widget", &token, NOW, MAX_TTL),
            Err(TokenError::Expired)
        );
        let token = key().sign("acme/widget", NOW - 1);
        assert_eq!(
            key().verify_at("acme/widget", &token, NOW, MAX_TTL),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn token_for_another_repository_is_refused() {
        let token = key().sign("acme/other", NOW + 600);
        assert_eq!(
            key().verify_at("acme/widget", &token, NOW, MAX_TTL),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn token_under_another_key_is_refused() {
        let token = SigningKey::new(b"another key")
            .unwrap()
            .sign("acme/widget", NOW + 600);
        assert_eq!(
            key().verify_at("acme/widget", &token, NOW, MAX_TTL),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn changed_expiry_is_refused() {
        let token = key().sign("acme/widget", NOW + 600);
        let (_, signature) = token.split_once('.').unwrap();
        let forged = format!("{}.{signature}", NOW + 6000);
        assert_eq!(
            key().verify_at("acme/widget", &forged, NOW, MAX_TTL),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = key().sign("acme/widget", NOW + 600);
        let (expiry, signature) = good.split_once('.').unwrap();
        for bad in [
            "nodot".to_string(),
            format!(".{signature}"),
            format!("{expiry}."),
            format!("+{expiry}.{signature}"),
            format!("-1.{signature}"),
            format!("{expiry}.{signature}="),
            format!("{expiry}.{signature}!"),
            format!("{expiry}.{}", &signature[..10]),
            format!("{expiry}.{signature}.x"),
            format!("99999999999999999999999.{signature}"),
            "x".repeat(500),
        ] {
            let result = key().verify_at("acme/widget", &bad, NOW, MAX_TTL);
            assert!(
                matches!(
                    result,
                    Err(TokenError::Malformed | TokenError::BadSignature)
                ),
                "{bad:?}: {result:?}"
            );
        }
        assert_eq!(
            key().verify_at("acme/widget", "", NOW, MAX_TTL),
            Err(TokenError::Missing)
        );
    }

    /// docs/proxy.md: a token over 128 bytes is malformed, refused before
    /// any work (no MAC is computed); one of 128 bytes is judged by its
    /// signature. (Mutation review: no length bound passed every test,
    /// which took either refusal for an overlong token.)
    #[test]
    fn a_token_over_128_bytes_is_malformed_before_its_signature_is_checked() {
        // Zero bits of base64url: each decodes, to a signature that is wrong.
        // (118 and 119 characters: lengths base64 without padding allows.)
        let at_bound = format!("180000060.{}", "A".repeat(128 - 10));
        let over = format!("180000060.{}", "A".repeat(129 - 10));
        assert_eq!((at_bound.len(), over.len()), (128, 129));
        assert_eq!(
            key().verify_at("acme/widget", &at_bound, NOW, MAX_TTL),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key().verify_at("acme/widget", &over, NOW, MAX_TTL),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn expiry_has_one_spelling() {
        assert_eq!(parse_expiry("0"), Ok(0));
        assert_eq!(parse_expiry("1800000600"), Ok(1_800_000_600));
        assert_eq!(parse_expiry("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "",
            "00",
            "01800000600",
            "0001800000600",
            "+1800000600",
            "-1800000600",
            " 1800000600",
            "1800000600 ",
            "1_800_000_600",
            "1800000600.0",
            "0x6b49d218",
            "18446744073709551616",
            "１８",
        ] {
            assert_eq!(parse_expiry(bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn correctly_signed_expiry_with_leading_zeros_is_refused() {
        // The signature covers the number, so these carry a valid one.
        let token = key().sign("acme/widget", NOW + 600);
        for respelled in [format!("0{token}"), format!("000{token}")] {
            assert_eq!(
                key().verify_at("acme/widget", &respelled, NOW, MAX_TTL),
                Err(TokenError::Malformed),
                "{respelled}"
            );
        }
    }

    #[test]
    fn signature_with_non_zero_trailing_bits_is_refused() {
        // 32 bytes are 43 base64 characters: 258 bits, the last 2 unused.
        // Setting one of them keeps the decoded bytes but changes the text.
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let token = key().sign("acme/widget", NOW + 600);
        let last = *token.as_bytes().last().unwrap();
        let index = ALPHABET.iter().position(|&c| c == last).unwrap();
        assert_eq!(index & 0b11, 0, "unused bits are zero when signing");
        let respelled = format!(
            "{}{}",
            &token[..token.len() - 1],
            char::from(ALPHABET[index | 1])
        );
        assert_eq!(
            key().verify_at("acme/widget", &respelled, NOW, MAX_TTL),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn expiry_beyond_max_ttl_is_refused() {
        for expiry in [NOW + MAX_TTL.as_secs() + 1, NOW + 30 * 86_400, u64::MAX] {
            let token = key().sign("acme/widget", expiry);
            assert_eq!(
                key().verify_at("acme/widget", &token, NOW, MAX_TTL),
                Err(TokenError::TooFarAhead),
                "{token}"
            );
        }
        // A longer maximum admits it.
        let token = key().sign("acme/widget", NOW + 30 * 86_400);
        let sixty_days = Duration::from_secs(60 * 86_400);
        assert_eq!(
            key().verify_at("acme/widget", &token, NOW, sixty_days),
            Ok(())
        );
    }

    #[test]
    fn expiry_at_max_ttl_is_accepted() {
        let token = key().sign("acme/widget", NOW + MAX_TTL.as_secs());
        assert_eq!(key().verify_at("acme/widget", &token, NOW, MAX_TTL), Ok(()));
    }

    #[test]
    fn forged_token_far_ahead_is_a_bad_signature() {
        // The signature is checked first, whatever the expiry.
        let token = key().sign("acme/widget", NOW + 600);
        let (_, signature) = token.split_once('.').unwrap();
        let forged = format!("{}.{signature}", u64::MAX);
        assert_eq!(
            key().verify_at("acme/widget", &forged, NOW, MAX_TTL),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn ttl_parses_units() {
        assert_eq!(parse_ttl("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_ttl("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "m", "10x", "0", "-5m", "1.5h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
