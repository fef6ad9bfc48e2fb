//! The names both tiers and their clients agree on: headers and the JSON
//! `error` codes (`docs/http.md#errors`). A code is part of the contract:
//! clients and dashboards match on it, so each is spelled once, here.

use http::HeaderName;

/// Read from the client (when sane), forwarded to the archiver, echoed.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The full commit id the ref resolved to.
pub const X_GITBALL_COMMIT: HeaderName = HeaderName::from_static("x-gitball-commit");
/// `hit`, `miss` or `join`: how the archiver found the archive.
pub const X_GITBALL_CACHE: HeaderName = HeaderName::from_static("x-gitball-cache");
/// Sent by the proxy to the archiver for a client that cannot see a
/// truncated body (HTTP/1.0: no chunked encoding, so a growing archive
/// would end with a plain close): answer only once the archive is
/// complete, with its `Content-Length`.
pub const X_GITBALL_WANT_LENGTH: HeaderName = HeaderName::from_static("x-gitball-want-length");
/// Sent by the proxy to the archiver: the address of the client the
/// request is for, as the proxy saw it (its socket peer, or the
/// `X-Forwarded-For` entry of a `--trusted-proxies` peer). The archiver keys
/// its crawler budget on it, and believes it only from a peer it trusts:
/// one that passed the `--token-file` check, or a loopback peer
/// (`docs/security.md#client-identity`). Anyone else's is ignored.
pub const X_GITBALL_CLIENT: HeaderName = HeaderName::from_static("x-gitball-client");
/// On a connection refused at the accept, before any request on it was
/// read (`503 overloaded`, `429 too_many_connections`): the cap that
/// refused it, [`REFUSED_MAX_CONNECTIONS`] or
/// [`REFUSED_MAX_CONNECTIONS_PER_CLIENT`] (the `reason` of the tier's
/// `connections_rejected_total`). The answer is about the connection, not
/// the request: a proxy takes an archiver's `429` carrying it for that
/// archiver refusing the proxy's own connection, not for a limit of the
/// client the request is for (`docs/internal-api.md#response-headers`).
pub const X_GITBALL_REFUSED: HeaderName = HeaderName::from_static("x-gitball-refused");
/// [`X_GITBALL_REFUSED`]: the process holds `--max-connections`.
pub const REFUSED_MAX_CONNECTIONS: &str = "max_connections";
/// [`X_GITBALL_REFUSED`]: the peer holds `--max-connections-per-client`.
pub const REFUSED_MAX_CONNECTIONS_PER_CLIENT: &str = "max_connections_per_client";
/// `sha-256=:{base64}:` of a complete archive (RFC 9530).
pub const REPR_DIGEST: HeaderName = HeaderName::from_static("repr-digest");

/// What `Retry-After` says when a tier is over capacity or shutting down.
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// The JSON `error` codes, by the tier that answers them.
pub mod code {
    // Either tier: bad input, answered before anything is looked up.
    pub const NOT_FOUND: &str = "not_found";
    pub const BAD_NAME: &str = "bad_name";
    pub const BAD_FORMAT: &str = "bad_format";
    pub const BAD_REF: &str = "bad_ref";
    pub const BAD_PATH: &str = "bad_path";
    pub const BAD_URL: &str = "bad_url";
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    pub const URI_TOO_LONG: &str = "uri_too_long";
    pub const HEADERS_TOO_LARGE: &str = "headers_too_large";
    /// An unknown repository, and (on the proxy) a private one without a
    /// valid token: the two must be indistinguishable.
    pub const REPO_NOT_FOUND: &str = "repo_not_found";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// `503` + `Retry-After`: the process holds `--max-connections`
    /// connections already, or (proxy) it has no fd left to reach an
    /// upstream.
    pub const OVERLOADED: &str = "overloaded";
    /// `429` + `Retry-After`: the client holds `--max-connections-per-client`
    /// connections already.
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    pub const INTERNAL: &str = "internal";

    // Archiver.
    pub const REF_NOT_FOUND: &str = "ref_not_found";
    pub const PATH_NOT_FOUND: &str = "path_not_found";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const RANGE_NOT_SATISFIABLE: &str = "range_not_satisfiable";
    pub const BUSY: &str = "busy";
    /// The refs an `export-subst` archive is keyed by changed before its
    /// generation started (`503`, `Retry-After: 0`).
    pub const REFS_CHANGED: &str = "refs_changed";
    pub const GENERATION_FAILED: &str = "generation_failed";
    pub const GENERATION_TIMEOUT: &str = "generation_timeout";
    pub const ARCHIVE_TOO_LARGE: &str = "archive_too_large";
    /// The client's budget of cold generations is spent (`429`).
    pub const RATE_LIMITED: &str = "rate_limited";

    // Proxy.
    pub const BAD_GATEWAY: &str = "bad_gateway";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const GATEWAY_TIMEOUT: &str = "gateway_timeout";
}

/// The rows of `docs/http.md`'s status codes table: (status, `error` code,
/// tier), for the tiers' tests of their own errors.
#[doc(hidden)]
pub fn documented_statuses(http_md: &str) -> Vec<(u16, String, String)> {
    let section = http_md
        .split("\n## Status codes\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .unwrap_or_default();
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let status = cells.first()?.parse().ok()?;
            let code = cells.get(1)?.trim_matches('`').to_owned();
            Some((status, code, cells.get(2)?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `error` code of [`code`] has its row in `docs/http.md`'s status
    /// codes table, and every row's code is one of them. (Docs review:
    /// nothing held the table to the codes.)
    #[test]
    fn every_error_code_is_in_the_status_codes_table() {
        let rows = documented_statuses(include_str!("../../docs/http.md"));
        let source = include_str!("protocol.rs");
        let module = &source[source.find("pub mod code {").expect("the code module")..];
        let module = &module[..module.find("\n}\n").expect("its end")];
        let codes: Vec<&str> = module
            .lines()
            .filter_map(|line| line.trim().strip_prefix("pub const "))
            .filter_map(|line| line.split('"').nth(1))
            .collect();
        assert!(codes.contains(&code::GATEWAY_TIMEOUT), "{codes:?}");
        for code in &codes {
            assert!(
                rows.iter().any(|(_, documented, _)| documented == code),
                "{code} is not in docs/http.md's status codes"
            );
        }
        for (status, documented, _) in &rows {
            assert!(
                codes.contains(&documented.as_str()),
                "docs/http.md gives {status} {documented}, which is no code"
            );
        }
    }
}
