//! gitball-core: what both gitball tiers share, written once.
//!
//! The archiver and the proxy answer the same URLs with the same rules, so
//! everything about that surface lives here rather than in either tier:
//!
//! - [`url`]: the archive URL grammar, formats and archive naming
//!   (`docs/urls.md`);
//! - [`client`]: who a client is (an address, an IPv6 `/64`) for the
//!   rules kept per client, and address ranges for flags;
//! - [`server`]: the hardened HTTP/1 accept loop (head timeout and size
//!   limits, TCP keepalive, write-stall guard, bounded graceful drain);
//! - [`limits`]: the fd limit (raised to the hard one at start) and the
//!   connection cap derived from it;
//! - [`protocol`]: header names and JSON error codes (`docs/http.md`);
//! - [`response`]: the JSON error body, `405`, `/healthz` and `/metrics`;
//! - [`request_id`]: the `X-Request-Id` rule;
//! - [`log`]: the one request-log record both tiers write, and the tracing
//!   set-up (`docs/observability.md#request-log`);
//! - [`metrics`]: the process-global Prometheus recorder;
//! - [`signals`]: SIGTERM/SIGINT as a cancellation token;
//! - [`units`]: size and seconds parsing for flags;
//! - [`secret`]: reading a token or key file;
//! - [`slots`]: a fixed number of places, taken without a lock;
//! - [`docs`]: what unit tests use to hold `docs/`'s figures to the code.

pub mod client;
pub mod docs;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod protocol;
pub mod request_id;
pub mod response;
pub mod secret;
pub mod server;
pub mod signals;
pub mod slots;
pub mod units;
pub mod url;
