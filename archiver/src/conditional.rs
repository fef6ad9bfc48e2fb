//! Conditional and range requests (`docs/http.md#conditional-and-range-requests`):
//! pure functions of the request headers and what is known of the archive,
//! so each rule is unit-tested here without a server.
//!
//! - `If-None-Match` (a list of entity tags, or `*`; weak comparison) wins
//!   over `If-Modified-Since`, as RFC 9110 §13.2.2 orders them.
//! - `If-Modified-Since` is honoured only for a URL that names a commit id:
//!   there the bytes never change, so "not modified since" is provable. A
//!   branch or tag may move to a commit with an *older* committer date
//!   (a reset, a re-tag), so for those the date proves nothing and only the
//!   ETag is trusted.
//! - One `Range: bytes=…` on a complete archive; several ranges, other
//!   units and malformed values are ignored (the whole archive is sent), as
//!   RFC 9110 allows. An `If-Range` that is not the current ETag means
//!   "send it all".

use std::time::SystemTime;

use http::{HeaderMap, header};

/// An inclusive byte range of a complete archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    pub fn len(self) -> u64 {
        self.last - self.first + 1
    }
}

/// A `Range` that asks for nothing the archive has (`416`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// What the request's validators say about the archive a `200` would send.
pub struct Validators<'a> {
    pub etag: &'a str,
    /// What `If-Modified-Since` is compared with: the `Last-Modified`
    /// sent, or the epoch for a commit dated after now
    /// (`Resolution::modified_for_conditions`).
    pub last_modified: SystemTime,
    /// The URL named a commit id: the bytes behind it can never change.
    pub immutable_url: bool,
}

/// Whether to answer `304 Not Modified`.
pub fn not_modified(headers: &HeaderMap, validators: &Validators<'_>) -> bool {
    if headers.contains_key(header::IF_NONE_MATCH) {
        return if_none_match(headers, validators.etag);
    }
    if !validators.immutable_url {
        return false;
    }
    // One date (RFC 9110, 13.1.3): a repeated line is ignored, as a value
    // that is no date is.
    single(headers, header::IF_MODIFIED_SINCE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| httpdate::parse_http_date(value).ok())
        .is_some_and(|since| validators.last_modified <= since)
}

/// `If-None-Match`: a list of entity tags or `*` (weak comparison).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|value| {
            value
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
        })
}

/// The range to send of a complete archive of `len` bytes: `Ok(None)` for
/// the whole archive.
pub fn requested_range(
    headers: &HeaderMap,
    etag: &str,
    len: u64,
) -> Result<Option<ByteRange>, Unsatisfiable> {
    // Neither field is a list (RFC 9110, 14.2 and 13.1.5): a repeated one
    // is invalid, and the range is ignored as a malformed one is.
    let Some(range) = single(headers, header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    // Compared as bytes: a value that is not visible ASCII is no match (as
    // text it was no header at all, and the range was honoured).
    match (
        single(headers, header::IF_RANGE),
        headers.contains_key(header::IF_RANGE),
    ) {
        (Some(if_range), _) if if_range.as_bytes().trim_ascii() == etag.as_bytes() => {}
        (None, false) => {}
        _ => return Ok(None),
    }
    parse_range(range, len)
}

/// The one line of `name`, or `None` when it is absent or repeated.
fn single(headers: &HeaderMap, name: header::HeaderName) -> Option<&http::HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    values.next().is_none().then_some(value)
}

/// A position in a range: ASCII digits only (RFC 9110 `1*DIGIT`), not what
/// `str::parse` also takes (a leading `+`). A number past `u64` is
/// `u64::MAX`, which is past every archive's end: a `last` that large is
/// clamped to the end and a `first` unsatisfiable, as for any other
/// position past the end.
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Whether the decimal `a` is below `b` (both ASCII digits, however long:
/// two positions past `u64` both read as `u64::MAX`).
fn is_below(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    (a.len(), a) < (b.len(), b)
}

/// Parses a single byte range. `Ok(None)`: ignore the header (not bytes,
/// several ranges, or malformed).
pub fn parse_range(value: &str, len: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let range = |first, last| Ok(Some(ByteRange { first, last }));
    match (first.trim(), last.trim()) {
        ("", "") => Ok(None),
        ("", suffix) => {
            let Some(suffix) = digits(suffix) else {
                return Ok(None);
            };
            if suffix == 0 || len == 0 {
                return Err(Unsatisfiable);
            }
            range(len.saturating_sub(suffix), len - 1)
        }
        (first_text, last) => {
            let Some(first) = digits(first_text) else {
                return Ok(None);
            };
            let last = if last.is_empty() {
                len.saturating_sub(1)
            } else {
                let Some(last_position) = digits(last) else {
                    return Ok(None);
                };
                if last_position < first || (last_position == first && is_below(last, first_text)) {
                    return Ok(None);
                }
                let last = last_position;
                last.min(len.saturating_sub(1))
            };
            if first >= len {
                return Err(Unsatisfiable);
            }
            range(first, last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::Duration;

    fn range(first: u64, last: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
        Ok(Some(ByteRange { first, last }))
    }

    #[test]
    fn single_ranges_parse() {
        assert_eq!(parse_range("bytes=0-99", 1000), range(0, 99));
        assert_eq!(parse_range("bytes=900-", 1000), range(900, 999));
        assert_eq!(parse_range("bytes=-100", 1000), range(900, 999));
        assert_eq!(parse_range("bytes=-5000", 1000), range(0, 999));
        assert_eq!(parse_range("bytes=990-5000", 1000), range(990, 999));
        assert_eq!(parse_range(" bytes= 5 - 9 ", 1000), range(5, 9));
        assert_eq!(ByteRange { first: 5, last: 9 }.len(), 5);
    }

    #[test]
    fn odd_ranges_are_ignored_or_unsatisfiable() {
        assert_eq!(parse_range("items=0-1", 1000), Ok(None));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ok(None));
        assert_eq!(parse_range("bytes=5-1", 1000), Ok(None));
        assert_eq!(parse_range("bytes=x-1", 1000), Ok(None));
        // Digits only, as RFC 9110 says (`str::parse` takes a sign too).
        assert_eq!(parse_range("bytes=+5-+10", 1000), Ok(None));
        assert_eq!(parse_range("bytes=-+5", 1000), Ok(None));
        assert_eq!(parse_range("bytes=5-+10", 1000), Ok(None));
        assert_eq!(parse_range("bytes=-", 1000), Ok(None));
        assert_eq!(parse_range("bytes=1000-", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=-0", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=0-", 0), Err(Unsatisfiable));
    }

    #[test]
    fn positions_past_u64_are_past_the_end() {
        // Attack: these were ignored (a 200 of the whole archive).
        let huge = "99999999999999999999999";
        assert_eq!(parse_range(&format!("bytes=0-{huge}"), 1000), range(0, 999));
        assert_eq!(
            parse_range(&format!("bytes={huge}-"), 1000),
            Err(Unsatisfiable)
        );
        assert_eq!(
            parse_range(&format!("bytes={huge}-{huge}"), 1000),
            Err(Unsatisfiable)
        );
        assert_eq!(parse_range(&format!("bytes=-{huge}"), 1000), range(0, 999));
        // `last < first`, both past u64: ignored, as any such range.
        let smaller = "99999999999999999999998";
        assert_eq!(
            parse_range(&format!("bytes={huge}-{smaller}"), 1000),
            Ok(None)
        );
    }

    #[test]
    fn a_repeated_range_or_if_range_line_ignores_the_range() {
        let mut headers = HeaderMap::new();
        headers.append(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        headers.append(header::RANGE, HeaderValue::from_static("bytes=20-29"));
        assert_eq!(requested_range(&headers, "\"e\"", 100), Ok(None));
        let mut headers = HeaderMap::new();
        headers.append(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        headers.append(header::IF_RANGE, HeaderValue::from_static("\"e\""));
        headers.append(header::IF_RANGE, HeaderValue::from_static("\"nope\""));
        assert_eq!(requested_range(&headers, "\"e\"", 100), Ok(None));
        headers.remove(header::IF_RANGE);
        headers.append(header::IF_RANGE, HeaderValue::from_static("\"e\""));
        assert_eq!(requested_range(&headers, "\"e\"", 100), range(0, 9));
    }

    #[test]
    fn if_range_with_another_etag_sends_everything() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        assert_eq!(requested_range(&headers, "\"e\"", 100), range(0, 9));
        headers.insert(header::IF_RANGE, HeaderValue::from_static("\"e\""));
        assert_eq!(requested_range(&headers, "\"e\"", 100), range(0, 9));
        headers.insert(header::IF_RANGE, HeaderValue::from_static("\"old\""));
        assert_eq!(requested_range(&headers, "\"e\"", 100), Ok(None));
        // Not text: no match, not no header (review: attack).
        headers.insert(
            header::IF_RANGE,
            HeaderValue::from_bytes(b"\"\xff\"").unwrap(),
        );
        assert_eq!(requested_range(&headers, "\"e\"", 100), Ok(None));
        assert_eq!(requested_range(&HeaderMap::new(), "\"e\"", 100), Ok(None));
    }

    fn validators(immutable_url: bool) -> Validators<'static> {
        Validators {
            etag: "\"abc-tar\"",
            last_modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            immutable_url,
        }
    }

    #[test]
    fn if_none_match_accepts_lists_star_and_weak_tags() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"abc-tar\""),
        );
        assert!(not_modified(&headers, &validators(false)));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(not_modified(&headers, &validators(false)));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(&headers, &validators(false)));
    }

    #[test]
    fn if_modified_since_counts_only_for_commit_urls_and_without_if_none_match() {
        let later = HeaderValue::from_static("Wed, 15 Nov 2023 00:00:00 GMT");
        let earlier = HeaderValue::from_static("Mon, 13 Nov 2023 00:00:00 GMT");
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_MODIFIED_SINCE, later.clone());
        assert!(not_modified(&headers, &validators(true)));
        // A branch URL may move to an older commit: the date proves nothing.
        assert!(!not_modified(&headers, &validators(false)));
        headers.insert(header::IF_MODIFIED_SINCE, earlier);
        assert!(!not_modified(&headers, &validators(true)));
        headers.insert(header::IF_MODIFIED_SINCE, HeaderValue::from_static("soon"));
        assert!(!not_modified(&headers, &validators(true)));
        // If-None-Match wins, even when it does not match.
        headers.insert(header::IF_MODIFIED_SINCE, later);
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(&headers, &validators(true)));
    }

    /// `If-Modified-Since` is one date (RFC 9110, 13.1.3: a recipient
    /// ignores a value of more than one member): a repeated line is
    /// ignored, not read for its first date. A future date followed by a
    /// line that is no date got `304` (attack).
    #[test]
    fn a_repeated_if_modified_since_is_ignored() {
        let later = HeaderValue::from_static("Wed, 15 Nov 2023 00:00:00 GMT");
        for second in [HeaderValue::from_static("soon"), later.clone()] {
            let mut headers = HeaderMap::new();
            headers.append(header::IF_MODIFIED_SINCE, later.clone());
            headers.append(header::IF_MODIFIED_SINCE, second.clone());
            assert!(
                !not_modified(&headers, &validators(true)),
                "If-Modified-Since: {later:?} and {second:?}"
            );
        }
    }

    /// An empty archive satisfies no range, a suffix range included
    /// (`docs/http.md`, "Range requests"). (Mutation review: without the
    /// check for an empty archive, a suffix range passed every test, its
    /// last byte computed as `0 - 1`.)
    #[test]
    fn an_empty_archive_satisfies_no_range() {
        for range in ["bytes=0-", "bytes=0-0", "bytes=-1", "bytes=-500"] {
            assert_eq!(parse_range(range, 0), Err(Unsatisfiable), "{range}");
        }
    }

    /// `If-Range` must equal the ETag exactly (`docs/http.md`, "Range
    /// requests"; RFC 9110's strong comparison): the weak form of the very
    /// tag that `If-None-Match` accepts is no match, and the range is
    /// ignored. (Mutation review: a weak `If-Range` taken as a match passed
    /// every test.)
    #[test]
    fn a_weak_if_range_is_no_match() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        headers.insert(header::IF_RANGE, HeaderValue::from_static("W/\"e\""));
        assert_eq!(requested_range(&headers, "\"e\"", 100), Ok(None));
        headers.insert(header::IF_RANGE, HeaderValue::from_static("\"e\""));
        assert_eq!(requested_range(&headers, "\"e\"", 100), range(0, 9));
    }
}
