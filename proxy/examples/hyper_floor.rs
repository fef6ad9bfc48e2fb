//! The floor of a reverse proxy built on hyper: a benchmark peer, not a
//! product. `ops/bench` runs it in front of the same archiver as
//! `gitball-proxy` and nginx, so that a run shows how much of the proxy's
//! cost per small hit is hyper's own and how much is gitball's.
//!
//! It does what every hyper-based front must do and nothing more: one
//! single-threaded runtime per CPU accepting on a shared listener (as
//! `gitball-proxy` serves), hyper's HTTP/1 server, hyper-util's pooled
//! client (one pool per thread) and jemalloc. Every request is sent on to
//! `UPSTREAM` as its method, path and query alone (no request header, no
//! body), and the upstream's response, head and body, is passed through as
//! it is. No routing, failover, timeouts or log line: not something to
//! deploy. A serving thread that ends ends the process, so it never serves
//! on fewer threads than it says.
//!
//! ```sh
//! cargo run --release -p gitball-proxy --example hyper_floor -- 127.0.0.1:8080 http://127.0.0.1:3000
//! ```

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Upstream = Client<HttpConnector, Empty<Bytes>>;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: hyper_floor LISTEN_ADDRESS UPSTREAM_URL");
    };
    let listen: std::net::SocketAddr = listen.parse()?;
    let upstream: hyper::Uri = upstream.parse()?;
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    // The threads serve forever: the first one to end ends the process.
    let (ended, first_ended) = std::sync::mpsc::channel();
    for _ in 0..threads {
        let listener = listener.try_clone()?;
        let upstream = upstream.clone();
        let ended = ended.clone();
        std::thread::spawn(move || {
            let served = std::panic::catch_unwind(|| serve(listener, upstream))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a serving thread panicked")));
            let _ = ended.send(served);
        });
    }
    first_ended.recv()?
}

fn serve(listener: std::net::TcpListener, upstream: hyper::Uri) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of fds, say: the benchmark's report would show it.
                    eprintln!("hyper_floor: accept: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    forward(client.clone(), upstream.clone(), request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn forward(
    client: Upstream,
    upstream: hyper::Uri,
    request: hyper::Request<Incoming>,
) -> anyhow::Result<hyper::Response<Incoming>> {
    let mut parts = upstream.into_parts();
    parts.path_and_query = request.uri().path_and_query().cloned();
    let mut forwarded = hyper::Request::new(Empty::new());
    *forwarded.method_mut() = request.method().clone();
    *forwarded.uri_mut() = hyper::Uri::from_parts(parts)?;
    Ok(client.request(forwarded).await?)
}
