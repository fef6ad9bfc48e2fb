//! `POST /{owner}/{repo}/prewarm/{ref}`: start generating a ref's archives
//! before anyone asks (`docs/http.md#prewarm`).
//!
//! When a tag is pushed the hosting application knows before any user
//! does; a prewarm turns the first thousand downloads of a release from a
//! queue behind one cold generation into hits. The steps, in order:
//!
//! 1. Off (no `--prewarm-token-file`): the path does not exist, `404` as
//!    for any unknown URL.
//! 2. Method: only `POST` (`405` with `Allow: POST`).
//! 3. Token: `Authorization: Bearer` with the prewarm token, or with the
//!    archiver's `--token-file` token (a proxy forwarding a prewarm it has
//!    checked sends its upstream token); anything else is `401`.
//! 4. URL and `?format=` (one format, or a comma-separated list; default
//!    `--prewarm-formats`), by the shared grammar: `400`/`404` as for
//!    downloads. Then repository, ref and reachability: `404` as for
//!    downloads.
//! 5. One cache lookup per format, exactly as a download's: a generation is
//!    started where there is none, joined where there is one, and the
//!    answer is `202` at once with the commit and what each format found
//!    (`hit`, `join` or `miss`). The generations run in the cache's own
//!    tasks and take queue slots like any other, but are kept: one no
//!    request waits for still runs (`Lookup::keep`). A prewarm takes no
//!    token of the crawler budget (it is authenticated operator work).
//!
//! Nothing is looked up before step 4 passes, and nothing is generated for
//! a request that fails any step.

use axum::response::Response;
use gitball_core::log::RequestLog;
use gitball_core::url::{self, Format};
use http::Method;
use http::request::Parts;

use crate::error::Error;
use gitball_core::secret::bearer_is;

use crate::http::{App, client_identity, resolve};

pub async fn serve(app: &App, request: &Parts, log: &mut RequestLog) -> Result<Response, Error> {
    let Some(prewarm_token) = &app.prewarm_token else {
        return Err(url::UrlError::NotAnArchiveUrl.into());
    };
    if request.method != Method::POST {
        return Err(Error::PostOnly);
    }
    let upstream_token = app.token.as_deref();
    let from_a_proxy = upstream_token.is_some_and(|token| bearer_is(&request.headers, token));
    if !from_a_proxy && !bearer_is(&request.headers, prewarm_token) {
        return Err(Error::Unauthorized);
    }
    let prewarm = url::parse_prewarm_path(request.uri.path())?;
    let formats = match url::query_param(request.uri.query(), "format")? {
        Some(list) => url::parse_formats(&list)?,
        None => app.prewarm_formats.clone(),
    };

    // Every format resolves (and is checked) before any generation starts.
    let mut resolutions = Vec::with_capacity(formats.len());
    for format in &formats {
        let resolution = resolve(app, prewarm.archive(*format), None, None).await?;
        resolutions.push((*format, resolution));
    }
    let commit = resolutions
        .first()
        .map(|(_, resolution)| resolution.resolved.commit.clone())
        .unwrap_or_default();
    log.commit = Some(commit.clone());

    // The prewarm's generations queue as its sender's (the hook's host):
    // one turn among the clients waiting, not a place before them all. Its
    // X-Gitball-Client is believed from a proxy (the upstream token), or
    // from loopback without --token-file: the prewarm token alone does not
    // let a hook queue its generations as other clients (review: attack).
    let client = client_identity(app.token.as_ref().map(|_| from_a_proxy), request);
    let mut keys = Vec::with_capacity(resolutions.len());
    for (format, resolution) in resolutions {
        // The generation (if this starts one) belongs to the cache; the
        // handle is let go at once, and the generation kept: no client
        // waits for a prewarm's, yet it must run (a queued generation
        // every request has left leaves the queue).
        let lookup = app
            .cache
            .lookup(resolution.spec.clone(), client, &log.request_id)?;
        keys.push(key_json(&prewarm, format, lookup.label()));
        lookup.keep();
    }
    log.cache = Some("prewarm");
    let body = serde_json::json!({
        "repository": format!("{}/{}", prewarm.owner, prewarm.repo),
        "ref": prewarm.reference,
        "commit": commit,
        "keys": keys,
    });
    Ok(gitball_core::response::json_accepted(&body))
}

/// One archive a prewarm names: its format, its canonical URL, and what the
/// cache found for it.
fn key_json(prewarm: &url::PrewarmRequest, format: Format, cache: &str) -> serde_json::Value {
    serde_json::json!({
        "format": format.ext(),
        "url": prewarm.archive(format).canonical_path(None),
        "cache": cache,
    })
}
