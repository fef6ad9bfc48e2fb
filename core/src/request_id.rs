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
    // The name's first value, as `get` gives it, found by one pass over
    // the few headers a request has rather than by hashing the custom
    // name (a third of this function's cost on a proxied hit:
    // `BENCHMARKS.md`).
    headers
        .iter()
        .find_map(|(name, value)| (*name == REQUEST_ID).then_some(value))
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
    hex_id(rand::random::<u128>())
}

/// `"00"` to `"ff"`: an id is written a byte (two digits) at a time.
const HEX_PAIRS: [u8; 512] = {
    let digits = b"0123456789abcdef";
    let mut pairs = [0; 512];
    let mut byte = 0;
    while byte < 256 {
        pairs[2 * byte] = digits[byte >> 4];
        pairs[2 * byte + 1] = digits[byte & 0xf];
        byte += 1;
    }
    pairs
};

/// 32 lower-case hex digits, as `{:032x}` writes them, without the
/// formatting machinery (a small part of a proxied hit's CPU), a byte at a
/// time rather than a shift of the `u128` per digit (`BENCHMARKS.md`).
fn hex_id(random: u128) -> String {
    let mut hex = [0; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(random.to_be_bytes()) {
        let at = usize::from(byte) * 2;
        pair.copy_from_slice(&HEX_PAIRS[at..at + 2]);
    }
    // Hex digits: ASCII.
    String::from(std::str::from_utf8(&hex).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_first_request_id_among_other_headers_is_the_one_judged() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("h"));
        headers.insert("x-other", HeaderValue::from_static("other"));
        headers.append(REQUEST_ID, HeaderValue::from_static("first"));
        headers.append(REQUEST_ID, HeaderValue::from_static("second"));
        headers.insert(http::header::RANGE, HeaderValue::from_static("bytes=0-1"));
        assert_eq!(request_id(&headers), "first");
        let mut headers = HeaderMap::new();
        headers.append(REQUEST_ID, HeaderValue::from_static("not sane"));
        headers.append(REQUEST_ID, HeaderValue::from_static("sane"));
        let id = request_id(&headers);
        assert!(id.len() == 32 && id != "sane", "{id}");
        assert_eq!(request_id(&HeaderMap::new()).len(), 32);
    }

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
    fn generated_request_ids_are_032x() {
        let mut values = vec![0, 1, 0xf, 0x10, 0xab, u128::MAX, u128::MAX - 1];
        values.extend((0..128).map(|shift| 1u128 << shift));
        values.extend((0..1_000).map(|_| rand::random::<u128>()));
        for value in values {
            assert_eq!(hex_id(value), format!("{value:032x}"));
        }
    }

    #[test]
    fn generated_request_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
    }
}
