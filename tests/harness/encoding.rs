//! The encodings tests compare response headers with: [`sha256_hex`] (the
//! `.sha256` files), [`base64()`] (`Repr-Digest`) and [`http_date`]
//! (`Last-Modified`), computed by the workspace's crates rather than by the
//! code under test.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Lower-case hex of the SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Standard base64 with padding (what `Repr-Digest` uses).
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An IMF-fixdate (`Tue, 02 Jan 2024 03:04:05 GMT`) for Unix seconds (not
/// before 1970).
pub fn http_date(unix_seconds: i64) -> String {
    let seconds = u64::try_from(unix_seconds).expect("a date not before 1970");
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        // RFC 4648, section 10.
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // The standard alphabet's last two characters, not the URL-safe ones.
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_704_164_645), "Tue, 02 Jan 2024 03:04:05 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        // The commit dates of the proxy tests' small repository.
        assert_eq!(http_date(1_700_086_400), "Wed, 15 Nov 2023 22:13:20 GMT");
    }

    #[test]
    fn sha256_hex_matches_a_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
