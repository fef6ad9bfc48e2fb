//! The `X-Request-Id` rule, the same on both tiers: a client's id is kept
//! when it is 1 to 128 characters of `A-Z a-z 0-9 . _ -` (safe in a header
//! and a log line), else a random 32-hex-digit id is made. The proxy
//! forwards the id it chose, so the archiver keeps it and the two tiers'
//! log lines join on it.

use http::HeaderMap;

use crate::protocol::REQUEST_ID;

/// Longest client-supplied request id kept; a longer one is replaced.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The client's request id if it is sane, else a new random one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| is_sane(id))
        .map_or_else(new_request_id, str::to_owned)
}

pub fn is_sane(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn new_request_id() -> String {
    // 32 lower-case hex digits, as `{:032x}` writes them, without the
    // formatting machinery (a small part of a proxied hit's CPU).
    let random = rand::random::<u128>();
    let mut hex = [0; 32];
    for (digit, text) in hex.iter_mut().rev().enumerate() {
        *text = b"0123456789abcdef"[(random >> (digit * 4)) as usize & 0xf];
    }
    // Hex digits: ASCII.
    String::from(std::str::from_utf8(&hex).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn sane_request_ids_are_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123_X.y"));
        assert_eq!(request_id(&headers), "abc-123_X.y");
        let id = "a".repeat(128);
        headers.insert(REQUEST_ID, HeaderValue::from_str(&id).unwrap());
        assert_eq!(request_id(&headers), id);
    }

    #[test]
    fn insane_request_ids_are_replaced() {
        for bad in [
            "",
            "has space",
            "semi;colon",
            "quote\"",
            "tab\there",
            "é",
            &"a".repeat(129),
        ] {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(bad) {
                headers.insert(REQUEST_ID, value);
            }
            let id = request_id(&headers);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        assert_eq!(request_id(&headers).len(), 32);
    }

    #[test]
    fn generated_request_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
    }
}
