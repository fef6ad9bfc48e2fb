//! The end-to-end harness: real binaries as child processes, real `git`,
//! real sockets on 127.0.0.1.
//!
//! Used by every test in `tests/` (`archiver.rs`, `proxy.rs`, `ops.rs`).
//! One module per tool; everything but [`proxy`] is re-exported here, so a
//! test imports `gitball_e2e::{Sandbox, Archiver, …}`:
//!
//! - [`git`]: [`Sandbox`] (a test's temp dir), [`RepoBuilder`] (repositories
//!   built with the real `git` in a clean environment, with fixed dates) and
//!   deterministic file contents.
//! - [`service`]: [`Service`] and [`Archiver`] (a binary as a child process
//!   on an ephemeral port, stopped on drop), [`wait_until`] and the
//!   timeouts.
//! - [`raw_http`]: [`RawConnection`] (HTTP/1.1 over a plain socket, for
//!   stalls, aborts and malformed requests) and a blocking client.
//! - [`metrics`]: [`Metrics`], a parsed `/metrics` scrape.
//! - [`procfs`]: `/proc` readers: resident memory, open fds, children.
//! - [`archives`]: tar and zip listings, decompression through the system's
//!   tools, streamed comparison with `git archive`.
//! - [`encoding`]: SHA-256 hex, base64 and HTTP dates, to check headers.
//! - [`packs`]: packs written by hand, as a push may send them (delta
//!   chains git's own packing never makes).
//! - [`fixtures`]: directories the tests of one binary share (built
//!   repositories, warm cache dirs); never services.
//! - [`netns`]: hosts in network namespaces, processes in them, tmpfs
//!   mounts and a throttling relay, for the fleet test.
//! - [`proxy`]: what `tests/proxy.rs` adds: the proxy, a cluster of
//!   archivers behind it, signed tokens.

pub mod archives;
pub mod encoding;
pub mod fixtures;
pub mod git;
pub mod metrics;
pub mod netns;
pub mod packs;
pub mod procfs;
pub mod proxy;
pub mod raw_http;
pub mod service;

pub use archives::*;
pub use encoding::*;
pub use fixtures::*;
pub use git::*;
pub use metrics::*;
pub use packs::*;
pub use procfs::*;
pub use raw_http::*;
pub use service::*;
