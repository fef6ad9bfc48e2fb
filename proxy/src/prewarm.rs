//! `POST /{owner}/{repo}/prewarm/{ref}` on the proxy: start a ref's
//! archives on the archivers that will serve them (`docs/http.md#prewarm`).
//!
//! The steps mirror the archiver's (`gitball_archiver`'s `prewarm`): off
//! without `--prewarm-token-file` (`404`), `POST` only (`405`), the bearer
//! token (`401`), the URL grammar (`400`/`404`), the route (`404` for an
//! unknown repository). A private route needs no signed URL here: the
//! prewarm token is the operator's and outranks it.
//!
//! Then, for each configured format (`--prewarm-formats`), one
//! `POST /{owner}/{repo}/prewarm/{ref}?format={ext}` goes through `forward`
//! to the route's candidates in the order downloads of that archive use
//! (rendezvous, ejected last, with failover), so the generation runs on the
//! archiver whose cache the downloads will hit. The proxy sends its
//! `--upstream-token-file` token; without one, it passes on the prewarm
//! token it checked (archivers without `--token-file` know only that one).
//! The requests run concurrently and the answer is `202` with the commit
//! and each key once every archiver accepted; otherwise the first refusal
//! is passed on as the archiver gave it (`404` for an unknown ref, `503`
//! when shutting down), or the proxy's own `502`/`504`.

use std::sync::PoisonError;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use futures_util::future::join_all;
use gitball_core::log::RequestLog;
use gitball_core::protocol::REQUEST_ID;
use gitball_core::secret::bearer_is;
use gitball_core::url::{self, Format};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use crate::error::Error;
use crate::forward::{Forwarded, UpstreamRequest};
use crate::http::{AppState, client_of, forwarded_headers};

/// An archiver's prewarm answer is a few hundred bytes of JSON.
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Time to read that answer once its head arrived.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Prewarm settings, from `--prewarm-token-file` and `--prewarm-formats`.
#[derive(Clone)]
pub struct Prewarm {
    pub token: Vec<u8>,
    pub formats: Vec<Format>,
    /// Send the client's (checked) prewarm token upstream: there is no
    /// `--upstream-token-file`.
    pub pass_token: bool,
}

/// One archiver's answer for one format.
struct KeyAnswer {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

pub async fn serve(
    state: &AppState,
    request: &Parts,
    request_id: &str,
    log: &mut RequestLog,
) -> Result<Response, Error> {
    let Some(prewarm) = &state.prewarm else {
        return Err(url::UrlError::NotAnArchiveUrl.into());
    };
    if request.method != Method::POST {
        return Err(Error::PostOnly);
    }
    if !bearer_is(&request.headers, &prewarm.token) {
        return Err(Error::Unauthorized);
    }
    let target = url::parse_prewarm_path(request.uri.path())?;
    let repository = format!("{}/{}", target.owner, target.repo);
    let mut candidates = {
        let table = state.routes.current();
        let route = table.lookup(&repository).ok_or(Error::RepositoryNotFound)?;
        route.candidates(&repository)
    };
    let ejected = state.forwarder.health().order(&mut candidates);
    let all_ejected = ejected == candidates.len();

    let mut headers = forwarded_headers(
        &HeaderMap::new(),
        request_id,
        http::Version::HTTP_11,
        client_of(state, request),
    );
    if prewarm.pass_token
        && let Some(authorization) = request.headers.get(header::AUTHORIZATION)
    {
        let mut authorization = authorization.clone();
        authorization.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, authorization);
    }
    // Each attempt goes into the log as it begins (the formats' attempts
    // run at once), so a client that leaves mid-attempt is logged with the
    // attempts the archivers may be serving, as an archive request is
    // (`Forwarder::forward_telling`). A mutex, not a `RefCell`: the
    // handler's future must be `Send`.
    let told = std::sync::Mutex::new(&mut *log);
    let attempts = prewarm.formats.iter().map(|format| {
        let upstream_request = UpstreamRequest {
            method: Method::POST,
            path_and_query: format!("{}?format={}", target.canonical_path(), format.ext()),
            parsed: None,
            headers: headers.clone(),
        };
        let candidates = &candidates;
        let told = &told;
        async move {
            let forwarded = state
                .forwarder
                .forward_telling(candidates, all_ejected, &upstream_request, |upstream, _| {
                    let mut log = told.lock().unwrap_or_else(PoisonError::into_inner);
                    log.upstream = Some(upstream.clone());
                    log.attempts = Some(log.attempts.unwrap_or(0) + 1);
                })
                .await;
            match forwarded {
                Ok(forwarded) => read_answer(forwarded).await,
                Err(failed) => Err(failed.error),
            }
        }
    });
    let answers = join_all(attempts).await;

    // Every format's attempts, and the last upstream tried, are in the log
    // by now.
    let mut commit = None;
    let mut keys = Vec::new();
    for answer in answers {
        let answer = answer?;
        if answer.status != StatusCode::ACCEPTED {
            return Ok(passed_on(answer));
        }
        let json: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|error| Error::internal(format!("archiver's prewarm answer: {error}")))?;
        if commit.is_none() {
            commit = json.get("commit").cloned();
        }
        if let Some(found) = json.get("keys").and_then(|keys| keys.as_array()) {
            keys.extend(found.iter().cloned());
        }
    }
    log.commit = commit
        .as_ref()
        .and_then(|commit| commit.as_str())
        .map(str::to_owned);
    let body = serde_json::json!({
        "repository": repository,
        "ref": target.reference,
        "commit": commit,
        "keys": keys,
    });
    Ok(gitball_core::response::json_accepted(&body))
}

/// Reads an archiver's (small) answer whole.
async fn read_answer(forwarded: Forwarded) -> Result<KeyAnswer, Error> {
    let Forwarded {
        response, upstream, ..
    } = forwarded;
    let (parts, body) = response.into_parts();
    let collected = tokio::time::timeout(
        ANSWER_TIMEOUT,
        Limited::new(body, MAX_ANSWER_BYTES).collect(),
    )
    .await;
    match collected {
        Ok(Ok(collected)) => Ok(KeyAnswer {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
        }),
        Ok(Err(error)) => {
            tracing::warn!(%upstream, %error, "cannot read an archiver's prewarm answer");
            Err(Error::BadGateway)
        }
        Err(_elapsed) => Err(Error::GatewayTimeout),
    }
}

/// An archiver's refusal, as it gave it (a JSON error with its status).
fn passed_on(answer: KeyAnswer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
        header::ALLOW,
    ] {
        if let Some(value) = answer.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response.headers_mut().remove(REQUEST_ID);
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}
