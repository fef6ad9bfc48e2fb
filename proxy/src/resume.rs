//! Resuming a parked download: the rest of an archive from any archiver of
//! the route, by `Range`, under the same ETag.
//!
//! A download whose client has taken no bytes for `--park-after` releases
//! its upstream response (`pipe`): the upstream connection, the chunk its
//! connection read ahead, the archiver's reader and the socket buffers on
//! the way all go. When the client takes bytes again the pipe asks for the
//! rest here. Archive bytes are fixed by the ETag (the byte series, the
//! commit and the options), so any replica's copy, or a new generation of
//! an archive evicted in the meantime, continues the same bytes:
//!
//! - the request is the original one (same canonical URL, request id,
//!   client address) with `Range: bytes={next}-{last}` (or, for a
//!   download whose end is unknown, `bytes={next-1}-`: `asked_from`) and
//!   `If-Range: {etag}`, sent to the upstream that served the download
//!   first, then to the route's other candidates (`forward`, with its
//!   failover);
//! - a `206` must carry the same ETag and a `Content-Range` that starts at
//!   the byte asked for, ends where the download ends (the archive's end, for a
//!   download begun while the archive grew) and gives the archive's length
//!   when the download knew it, and a `Content-Length` (if any) that is the
//!   range's; its body continues the download, and must bring the whole
//!   range;
//! - a `200` under the same ETag (an archive still or again being
//!   generated, where ranges are ignored) continues the download after its
//!   first `{next}` bytes are skipped, each chunk, skipped or not, within
//!   the silence bound (`--header-timeout`), not the whole skip;
//! - anything else (another ETag, another status, no candidate answering)
//!   aborts the client connection: a download never continues with other
//!   bytes, and never ends cleanly short of its end.

use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;

use crate::forward::{
    Forwarder, UPSTREAM_READ_BUFFER_BYTES, UpstreamRequest, UpstreamResponse, body_length,
};
use crate::pipe::{UpstreamBody, UpstreamError};
use crate::routes::Candidate;

/// `value` in an allocation of its own (see `Resume::for_response`).
fn owned_value(value: &HeaderValue) -> HeaderValue {
    // `from_bytes` copies; the value was valid already.
    let mut owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    owned.set_sensitive(value.is_sensitive());
    owned
}

/// `headers`, each value in an allocation of its own.
fn owned(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut copy = http::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        copy.append(name.clone(), owned_value(value));
    }
    copy
}

/// What a download needs to get its upstream back.
#[derive(Debug)]
pub struct Resume {
    forwarder: Forwarder,
    candidates: Vec<Candidate>,
    /// The original request, without the client's own validators.
    request: UpstreamRequest,
    etag: HeaderValue,
    /// Offset in the archive of the response body's first byte.
    first: u64,
    /// Offset of its last byte, when the response said (a length, or a
    /// `Content-Range`); `None` while the archive was still growing.
    last: Option<u64>,
    /// The whole archive's length, when the response said.
    length: Option<u64>,
    /// The range requests' attempts so far (resumes, a splice's), for the
    /// request's log line.
    tried: std::sync::Mutex<Tried>,
}

/// A download's range requests after its first answer (its resumes, and
/// the one that prepares a splice): how many began, and the upstream of the
/// last. The request's log line adds them to the first answer's attempts
/// (`docs/observability.md`: `upstream`, `attempts`), one still in flight
/// when the client left included.
#[derive(Clone, Debug, Default)]
pub struct Tried {
    pub upstream: Option<Arc<str>>,
    pub attempts: u32,
}

/// The rest of a download, from its next byte.
pub struct Resumed {
    pub body: UpstreamBody,
    pub upstream: Arc<str>,
}

/// Why a download could not be resumed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("no upstream answered the resume: {0}")]
    NoAnswer(String),
    #[error("the resume got {0} from {1}, not the rest of the same archive")]
    Mismatch(StatusCode, Arc<str>),
}

impl Resume {
    /// How to resume `response`, the answer from `upstream` to `request`;
    /// `None` if it cannot be resumed (not a `GET`, not a `200` or `206`, no
    /// strong ETag).
    pub fn for_response(
        response: &UpstreamResponse,
        upstream: &Arc<str>,
        forwarder: &Forwarder,
        candidates: &[Candidate],
        request: &UpstreamRequest,
    ) -> Option<Resume> {
        if request.method != Method::GET {
            return None;
        }
        // A body that fits in one chunk is handed over whole at once: it
        // never waits for an upstream it could release.
        if body_length(response).is_some_and(|len| len <= UPSTREAM_READ_BUFFER_BYTES as u64) {
            return None;
        }
        let etag = response.headers().get(header::ETAG)?;
        if !etag.as_bytes().starts_with(b"\"") {
            return None;
        }
        let (first, last, length) = match response.status() {
            StatusCode::OK => {
                let length = body_length(response);
                (0, length.and_then(|len| len.checked_sub(1)), length)
            }
            StatusCode::PARTIAL_CONTENT => {
                let (first, last, length) = content_range(response.headers())?;
                (first, Some(last), Some(length))
            }
            _ => return None,
        };
        // The one that served the download first has the archive: ask it
        // first.
        let mut ordered = Vec::with_capacity(candidates.len());
        ordered.extend(
            candidates
                .iter()
                .filter(|c| c.upstream == *upstream)
                .cloned(),
        );
        ordered.extend(
            candidates
                .iter()
                .filter(|c| c.upstream != *upstream)
                .cloned(),
        );
        // Owned copies: parsed header values are slices of the connection's
        // read buffer, and would keep it (64 KiB for the upstream's) for as
        // long as the download lasts, parked or not.
        let mut request = UpstreamRequest {
            method: request.method.clone(),
            path_and_query: request.path_and_query.clone(),
            parsed: None,
            headers: owned(&request.headers),
        };
        for name in [
            header::RANGE,
            header::IF_RANGE,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
        ] {
            request.headers.remove(name);
        }
        Some(Resume {
            tried: std::sync::Mutex::default(),
            forwarder: forwarder.clone(),
            candidates: ordered,
            request,
            etag: owned_value(etag),
            first,
            last,
            length,
        })
    }

    /// Asks for the download's bytes from `sent` (bytes already handed to
    /// the client) on.
    pub async fn resume(&self, sent: u64) -> Result<Resumed, ResumeError> {
        let (request, next) = self.range_request(sent);
        let candidates = self.candidates();
        let forwarded = self
            .forwarder
            .forward_telling(&candidates, false, &request, |upstream, _| {
                self.attempting(upstream);
            })
            .await
            .map_err(|failed| ResumeError::NoAnswer(failed.error.to_string()))?;
        let response = forwarded.response;
        let upstream = forwarded.upstream;
        let status = response.status();
        let skip = self
            .skip(status, response.headers(), body_length(&response), next)
            .ok_or_else(|| ResumeError::Mismatch(status, upstream.clone()))?;
        // How many bytes the download has left: known from the start, or
        // from this answer (a `206`'s range, a complete archive's length).
        let limit = self.limit(next).or_else(|| match status {
            // What follows the skipped bytes: `skip` checked the range.
            StatusCode::PARTIAL_CONTENT => {
                content_range(response.headers()).map(|(_, last, _)| last + 1 - next)
            }
            _ => body_length(&response).and_then(|length| length.checked_sub(next)),
        });
        let body = response
            .into_body()
            .into_data_stream()
            .map(|chunk| chunk.map_err(UpstreamError::from));
        // Silence is bounded per chunk the upstream sends, skipped ones
        // included: an archive generated again up to the download's next
        // byte may take longer than one silence to get there.
        let silence = self.forwarder.header_timeout();
        let body = crate::pipe::fail_when_silent(Box::pin(body), silence);
        Ok(Resumed {
            body: skip_and_limit(body, skip, limit),
            upstream,
        })
    }

    /// Notes a resume attempt on `upstream` as it begins.
    pub fn attempting(&self, upstream: &Arc<str>) {
        let mut tried = self.tried.lock().unwrap_or_else(PoisonError::into_inner);
        tried.upstream = Some(upstream.clone());
        tried.attempts += 1;
    }

    /// The resume attempts begun so far.
    pub fn tried(&self) -> Tried {
        self.tried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The request for the download's bytes from `sent` on, and the offset
    /// in the archive of the next byte.
    pub fn range_request(&self, sent: u64) -> (UpstreamRequest, u64) {
        let next = self.first + sent;
        let mut request = self.request.clone();
        let from = self.asked_from(next);
        let range = match self.last {
            Some(last) => format!("bytes={from}-{last}"),
            None => format!("bytes={from}-"),
        };
        // Digits and punctuation: a valid header value.
        if let Ok(range) = HeaderValue::try_from(range) {
            request.headers.insert(header::RANGE, range);
        }
        request.headers.insert(header::IF_RANGE, self.etag.clone());
        (request, next)
    }

    /// The first byte a range request for `next` asks for. When the
    /// download's end is unknown (a chunked download of a growing
    /// archive), one byte early: the archive may have ended at `next` (the
    /// download was parked with its last bytes sent, its end not yet read),
    /// and a range from past the end is answered `416`, which cannot tell
    /// a complete archive from a shorter one. From the byte before, a
    /// complete archive answers that one byte, which is skipped, and the
    /// download ends cleanly.
    fn asked_from(&self, next: u64) -> u64 {
        match self.last {
            Some(_) => next,
            None => next.saturating_sub(1),
        }
    }

    /// The candidates to ask, the one that served the download first, and
    /// ejected ones last (a stable partition), as for any request.
    /// The upstream the download began from.
    pub fn first_upstream(&self) -> Option<&Arc<str>> {
        self.candidates.first().map(|candidate| &candidate.upstream)
    }

    pub fn candidates(&self) -> Vec<Candidate> {
        let mut candidates = self.candidates.clone();
        self.forwarder.health().order(&mut candidates);
        candidates
    }

    /// A resume for the archive `etag` from byte `first` (to `last`) of
    /// `request`, asking `candidates` in order.
    #[cfg(test)]
    pub(crate) fn for_test(
        forwarder: Forwarder,
        candidates: Vec<Candidate>,
        request: UpstreamRequest,
        etag: HeaderValue,
        first: u64,
        last: Option<u64>,
    ) -> Resume {
        Resume {
            forwarder,
            candidates,
            request,
            etag,
            first,
            last,
            length: last.filter(|_| first == 0).map(|last| last + 1),
            tried: std::sync::Mutex::default(),
        }
    }

    /// The candidate that served the download first.
    pub fn served_by(&self) -> Option<&Candidate> {
        self.candidates.first()
    }

    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }

    /// How many bytes of the answer (`status`, `headers`, and its body's
    /// length as the exchange framed it: `Content-Length`, `None` when
    /// chunked) to a [`Resume::range_request`] for `next` come before the
    /// download's next byte; `None` if the answer is not the rest of the
    /// same archive.
    ///
    /// A `206` must start at the byte asked for (`asked_from`: `next`, or
    /// the byte before, which is skipped), end where the download ends (its last
    /// byte when known, else the archive's), be of the archive's length
    /// when that is known, and carry as many bytes as its range says; a
    /// `200` must be of the archive's length when that is known. An
    /// upstream answering otherwise would have the download end short, or
    /// continue with other bytes.
    ///
    /// The length is the exchange's reading (`exchange::parse`), not a
    /// second parse of `Content-Length` here: that one took a list of one
    /// length repeated (`900, 900`), which the exchange reads as `900`, for
    /// no length, and declined a sound range answer (review).
    pub fn skip(
        &self,
        status: StatusCode,
        headers: &http::HeaderMap,
        body_length: Option<u64>,
        next: u64,
    ) -> Option<u64> {
        if headers.get(header::ETAG) != Some(&self.etag) {
            return None;
        }
        let same_length = |length: u64| self.length.is_none_or(|ours| ours == length);
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let (first, last, length) = content_range(headers)?;
                let to_the_end = match self.last {
                    Some(ours) => last == ours,
                    None => last + 1 == length,
                };
                let framed = body_length.is_none_or(|sent| sent == last + 1 - first);
                (first == self.asked_from(next) && to_the_end && same_length(length) && framed)
                    .then(|| next - first)
            }
            // The whole archive again: its first `next` bytes were sent.
            StatusCode::OK => match body_length {
                None => Some(next),
                Some(length) if same_length(length) && length >= next => Some(next),
                Some(_) => None,
            },
            _ => None,
        }
    }

    /// How many bytes are left from `next` on, when the download's end is
    /// known.
    pub fn limit(&self, next: u64) -> Option<u64> {
        self.last.map(|last| last + 1 - next)
    }
}

/// `bytes {first}-{last}/{length}` of a `206`, each number digits only,
/// as the exchange reads a `Content-Length` (`exchange::decimal`: `str`'s
/// parse took a sign, `bytes +100-999/1000`).
fn content_range(headers: &http::HeaderMap) -> Option<(u64, u64, u64)> {
    let value = headers.get(header::CONTENT_RANGE)?.as_bytes();
    let value = value.strip_prefix(b"bytes ")?;
    let slash = value.iter().position(|&byte| byte == b'/')?;
    let (range, length) = (&value[..slash], &value[slash + 1..]);
    let dash = range.iter().position(|&byte| byte == b'-')?;
    let (first, last, length) = (
        crate::exchange::decimal(&range[..dash])?,
        crate::exchange::decimal(&range[dash + 1..])?,
        crate::exchange::decimal(length)?,
    );
    (first <= last && last < length).then_some((first, last, length))
}

/// `body` without its first `skip` bytes, and ending after `limit` more
/// (when given). A body that ends before `skip`, or before `limit` more, is
/// an error: the download cannot continue from it, and must not end short.
fn skip_and_limit(body: UpstreamBody, skip: u64, limit: Option<u64>) -> UpstreamBody {
    if skip == 0 && limit.is_none() {
        return body;
    }
    Box::pin(futures_util::stream::unfold(
        (body, skip, limit),
        |(mut body, mut skip, mut limit)| async move {
            loop {
                if limit == Some(0) {
                    return None;
                }
                let mut chunk: Bytes = match body.next().await {
                    Some(Ok(chunk)) => chunk,
                    Some(Err(error)) => return Some((Err(error), (body, 0, Some(0)))),
                    None if skip > 0 => {
                        let error = UpstreamError::from(
                            "the resumed body ended before the download's next byte",
                        );
                        return Some((Err(error), (body, 0, Some(0))));
                    }
                    None if limit.is_some_and(|left| left > 0) => {
                        let error =
                            UpstreamError::from("the resumed body ended before the download's end");
                        return Some((Err(error), (body, 0, Some(0))));
                    }
                    None => return None,
                };
                let skipped = skip.min(chunk.len() as u64);
                skip -= skipped;
                // `skipped` is at most the chunk's length.
                let _ = chunk.split_to(skipped as usize);
                if chunk.is_empty() {
                    continue;
                }
                if let Some(left) = limit.as_mut() {
                    if (chunk.len() as u64) > *left {
                        chunk.truncate(*left as usize);
                    }
                    *left -= chunk.len() as u64;
                }
                return Some((Ok(chunk), (body, skip, limit)));
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: &[&'static [u8]]) -> UpstreamBody {
        let chunks: Vec<Result<Bytes, UpstreamError>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        Box::pin(futures_util::stream::iter(chunks))
    }

    async fn collect(body: UpstreamBody) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut body = body;
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    /// hyper parses header values as slices of the connection's read
    /// buffer; what a download keeps of them must not keep that buffer.
    #[test]
    fn kept_header_values_do_not_share_the_read_buffer() {
        let buffer = Bytes::from(b"ETag: \"v3-abc\"\r\nX-Request-Id: r1\r\n".repeat(100));
        let within =
            |value: &HeaderValue| buffer.as_ptr_range().contains(&value.as_bytes().as_ptr());
        let etag = HeaderValue::from_maybe_shared(buffer.slice(6..14)).unwrap();
        let id = HeaderValue::from_maybe_shared(buffer.slice(30..32)).unwrap();
        assert!(within(&etag) && within(&etag.clone()), "the test's premise");

        let kept = owned_value(&etag);
        assert_eq!(kept, etag);
        assert!(!within(&kept));

        let mut headers = http::HeaderMap::new();
        headers.insert(header::ETAG, etag);
        headers.append("x-request-id", id.clone());
        headers.append("x-request-id", id);
        let kept = owned(&headers);
        assert_eq!(kept, headers);
        assert!(kept.values().all(|value| !within(value)));
    }

    #[tokio::test]
    async fn skipping_and_limiting_cut_across_chunks() {
        let whole: &[&[u8]] = &[b"abc", b"defg", b"hij"];
        assert_eq!(
            collect(skip_and_limit(body(whole), 0, None)).await.unwrap(),
            b"abcdefghij"
        );
        assert_eq!(
            collect(skip_and_limit(body(whole), 4, None)).await.unwrap(),
            b"efghij"
        );
        assert_eq!(
            collect(skip_and_limit(body(whole), 3, Some(5)))
                .await
                .unwrap(),
            b"defgh"
        );
        assert_eq!(
            collect(skip_and_limit(body(whole), 0, Some(2)))
                .await
                .unwrap(),
            b"ab"
        );
        assert_eq!(
            collect(skip_and_limit(body(whole), 10, None))
                .await
                .unwrap(),
            b""
        );
        // Shorter than what was already sent: not a clean end.
        assert!(
            collect(skip_and_limit(body(whole), 11, None))
                .await
                .is_err()
        );
        // Shorter than the download's end: not a clean end either.
        assert!(
            collect(skip_and_limit(body(whole), 2, Some(9)))
                .await
                .is_err()
        );
    }

    const ETAG: &str = "\"c0ffee-tar\"";

    fn resume_of(first: u64, last: Option<u64>) -> Resume {
        let forwarder = Forwarder::new(
            Arc::new(crate::upstream::Health::new(
                std::time::Duration::from_secs(1),
            )),
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
            None,
        )
        .unwrap();
        Resume::for_test(
            forwarder,
            Vec::new(),
            UpstreamRequest {
                method: Method::GET,
                path_and_query: "/acme/widget/archive/main.tar".into(),
                parsed: None,
                headers: http::HeaderMap::new(),
            },
            HeaderValue::from_static(ETAG),
            first,
            last,
        )
    }

    fn answer(pairs: &[(header::HeaderName, &'static str)]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::ETAG, HeaderValue::from_static(ETAG));
        for (name, value) in pairs {
            headers.insert(name.clone(), HeaderValue::from_static(value));
        }
        headers
    }

    /// What a resume may continue a download with: the rest of the same
    /// archive, to its end, framed as its range says; an upstream that
    /// answers otherwise would have the download end short.
    #[test]
    fn a_resume_continues_only_with_the_rest_of_the_same_archive() {
        let partial = StatusCode::PARTIAL_CONTENT;
        let range = header::CONTENT_RANGE;
        let length = header::CONTENT_LENGTH;
        // A download that began while the archive grew: its end unknown,
        // so the range asked for starts a byte early (which is skipped).
        let growing = resume_of(0, None);
        let asked = answer(&[(range.clone(), "bytes 99-999/1000")]);
        assert_eq!(growing.skip(partial, &asked, None, 100), Some(1));
        let framed = answer(&[
            (range.clone(), "bytes 99-999/1000"),
            (length.clone(), "901"),
        ]);
        assert_eq!(growing.skip(partial, &framed, Some(901), 100), Some(1));
        let short_of_the_end = answer(&[(range.clone(), "bytes 99-899/1000")]);
        assert_eq!(growing.skip(partial, &short_of_the_end, None, 100), None);
        let shorter_body = answer(&[
            (range.clone(), "bytes 99-999/1000"),
            (length.clone(), "800"),
        ]);
        assert_eq!(growing.skip(partial, &shorter_body, Some(800), 100), None);
        let to_the_end = answer(&[(range.clone(), "bytes 100-999/1000")]);
        assert_eq!(
            growing.skip(partial, &to_the_end, None, 100),
            None,
            "not asked"
        );
        let elsewhere = answer(&[(range.clone(), "bytes 101-999/1000")]);
        assert_eq!(growing.skip(partial, &elsewhere, None, 100), None);
        // Parked with every byte sent but the end unread (review): the
        // archive, complete since, gives the byte before, and nothing is
        // left.
        let ended = answer(&[(range.clone(), "bytes 999-999/1000"), (length.clone(), "1")]);
        assert_eq!(growing.skip(partial, &ended, Some(1), 1000), Some(1));
        // The whole archive again, still growing or complete.
        assert_eq!(
            growing.skip(StatusCode::OK, &answer(&[]), None, 100),
            Some(100)
        );
        let complete = answer(&[(length.clone(), "1000")]);
        assert_eq!(
            growing.skip(StatusCode::OK, &complete, Some(1000), 100),
            Some(100)
        );
        let too_short = answer(&[(length.clone(), "50")]);
        assert_eq!(
            growing.skip(StatusCode::OK, &too_short, Some(50), 100),
            None
        );

        // A download of a complete archive: its length known.
        let known = resume_of(0, Some(999));
        assert_eq!(known.skip(partial, &to_the_end, None, 100), Some(0));
        let another_length = answer(&[(range.clone(), "bytes 100-999/2000")]);
        assert_eq!(known.skip(partial, &another_length, None, 100), None);
        assert_eq!(
            known.skip(StatusCode::OK, &complete, Some(1000), 100),
            Some(100)
        );
        let longer = answer(&[(length.clone(), "1200")]);
        assert_eq!(known.skip(StatusCode::OK, &longer, Some(1200), 100), None);
        // Positions are digits only, as the exchange reads a length.
        let signed = answer(&[(range.clone(), "bytes +100-999/1000")]);
        assert_eq!(known.skip(partial, &signed, None, 100), None, "a sign");
        // Another archive.
        let mut other = to_the_end.clone();
        other.insert(header::ETAG, HeaderValue::from_static("\"other-tar\""));
        assert_eq!(known.skip(partial, &other, None, 100), None);
    }

    /// The range a resume asks for: from the next byte to the download's
    /// end when that is known; a byte early when it is not (an archive that
    /// ended at the next byte must not answer `416`).
    #[test]
    fn a_resume_of_a_download_whose_end_is_unknown_asks_from_the_byte_before() {
        let asked = |resume: Resume, sent| {
            let (request, next) = resume.range_request(sent);
            let range = request.headers[header::RANGE].to_str().unwrap().to_owned();
            assert_eq!(request.headers[header::IF_RANGE], ETAG);
            (range, next)
        };
        assert_eq!(asked(resume_of(0, None), 100), ("bytes=99-".into(), 100));
        assert_eq!(asked(resume_of(0, None), 0), ("bytes=0-".into(), 0));
        assert_eq!(asked(resume_of(50, None), 10), ("bytes=59-".into(), 60));
        assert_eq!(
            asked(resume_of(0, Some(999)), 100),
            ("bytes=100-999".into(), 100)
        );
        assert_eq!(
            asked(resume_of(50, Some(99)), 10),
            ("bytes=60-99".into(), 60)
        );
    }
}
