//! The small HTTP endpoint that serves `/metrics`, `/healthz` and `/readyz`.
//!
//! [`serve`] answers `GET /metrics` with [`Metrics::encode`] in the OpenMetrics text format
//! (what prometheus-client's text encoder writes, `# EOF` included, hence the
//! `application/openmetrics-text; version=1.0.0` content type), `GET /healthz` (the process is
//! alive) and `GET /readyz` (a closure supplied by the agent decides, see
//! [`crate::readiness`]; 503 with the reason in the body while not ready), so Kubernetes
//! probes need no second port.
//!
//! The server is hand-written on tokio rather than pulled in from hyper: it speaks just enough
//! HTTP/1.x for scrapers and probes (one request per connection, `Connection: close`) and is
//! hardened for whatever else reaches the port: at most 64 connections at once, the request
//! head must arrive within 3 s and fit in 8 KiB, writes are bounded in time, and malformed
//! input gets a 4xx answer, never a panic. Every connection is accepted at once: when the table
//! is full the connection idle the longest is dropped to make room ([`crate::conntable`]), so
//! idle or slow clients can never keep a liveness probe (1 s timeout) waiting in the kernel's
//! queue until the kubelet restarts a healthy agent.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::Metrics;
use crate::conntable::{ConnTable, Slot};

/// Content type of `/metrics`: prometheus-client's text encoder writes OpenMetrics 1.0 (with the
/// trailing `# EOF`), not the older Prometheus 0.0.4 text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Decides `/readyz`: asked on every request, so it must be cheap.
pub type ReadyFn = Arc<dyn Fn() -> crate::readiness::Readiness + Send + Sync>;

/// Content type of the probe answers and error bodies.
const PLAIN_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Bounds of the HTTP endpoint. Constants in production; tests shorten the timeouts.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Connections held at once; past it the idlest is dropped for the new one.
    max_connections: usize,
    /// Largest request head accepted (request line and headers).
    max_head: usize,
    /// Time allowed for the whole request head to arrive, so idle connections do not linger
    /// (scrapers and probes send theirs at once).
    head_timeout: Duration,
    /// Time allowed to write the response, so a client that never reads cannot hold a slot.
    write_timeout: Duration,
    /// After answering, how long unread request bytes are drained before closing. Closing with
    /// unread data makes the kernel send a reset, which can destroy the answer in flight (the
    /// 431 to an oversized request, for instance).
    linger: Duration,
    /// How much is drained at most during `linger`.
    linger_bytes: usize,
    /// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
    accept_backoff: Duration,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        max_connections: 64,
        max_head: 8 * 1024,
        head_timeout: Duration::from_secs(3),
        write_timeout: Duration::from_secs(5),
        linger: Duration::from_secs(1),
        linger_bytes: 64 * 1024,
        accept_backoff: Duration::from_millis(100),
    };
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` is cancelled.
///
/// `ready` is asked on every `/readyz`; it should be cheap (read a flag, not do I/O). When
/// `shutdown` is cancelled the server stops accepting, abandons connections still in progress,
/// and returns once their tasks have ended.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: ReadyFn, shutdown: CancellationToken) {
    serve_with(listener, metrics, ready, shutdown, Limits::DEFAULT).await;
}

async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: ReadyFn,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let table = ConnTable::new(limits.max_connections);
    let tasks = TaskTracker::new();
    loop {
        // Accept at once, always: a slot is made by evicting the idlest connection, so a probe
        // never waits in the kernel's queue behind idle clients.
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "metrics endpoint: accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(limits.accept_backoff) => continue,
                }
            }
        };
        let Some(slot) = table.admit() else {
            // Every slot is busy answering (bounded by the write timeout): refuse this one.
            debug!(%peer, "metrics endpoint: every connection is being answered; refused");
            drop(stream);
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let ready = Arc::clone(&ready);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = slot.evicted().cancelled() => {
                    debug!(%peer, "metrics endpoint: idle connection dropped to make room");
                }
                result = handle(stream, &metrics, ready.as_ref(), &limits, &slot) => {
                    if let Err(err) = result {
                        debug!(%peer, error = %err, "metrics endpoint: connection failed");
                    }
                }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// Why no complete request head could be read.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    /// The client closed its side first; `0` bytes means it sent nothing at all.
    #[error("client closed the connection after {0} bytes, before the request head ended")]
    Closed(usize),
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("no complete request head within {0:?}")]
    Timeout(Duration),
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
}

/// One connection: read the head, answer, close.
async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    ready: &(dyn Fn() -> crate::readiness::Readiness + Send + Sync),
    limits: &Limits,
    slot: &Slot,
) -> std::io::Result<()> {
    let head = read_head(&mut stream, limits).await;
    slot.busy();
    let response = match head {
        Ok(head) => route(&head, metrics, ready),
        Err(HeadError::Closed(0)) => return Ok(()),
        Err(err @ HeadError::Closed(_)) => {
            debug!(error = %err, "metrics endpoint: truncated request");
            Response::text(400, "Bad Request", "bad request\n")
        }
        Err(err @ HeadError::TooLarge(_)) => {
            debug!(error = %err, "metrics endpoint: oversized request");
            Response::text(431, "Request Header Fields Too Large", "request head too large\n")
        }
        Err(err @ HeadError::Timeout(_)) => {
            debug!(error = %err, "metrics endpoint: slow request");
            Response::text(408, "Request Timeout", "request timeout\n")
        }
        Err(HeadError::Io(err)) => return Err(err),
    };
    let bytes = response.render();
    let written = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Ok(result) => result?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "writing the response timed out",
            ));
        }
    }
    // Drain what the client may still send so the close is a FIN, not a reset that could
    // discard the answer before the client read it. Bounded in time and bytes, and evictable.
    slot.idle();
    let _ = tokio::time::timeout(limits.linger, drain(&mut stream, limits.linger_bytes)).await;
    Ok(())
}

/// Reads and discards up to `max` bytes, until end of stream or an error.
async fn drain(stream: &mut TcpStream, max: usize) {
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    while total < max {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

/// Reads until the blank line that ends the request head, within the size and time limits.
/// Returns the head including its terminating blank line; anything after it is ignored.
async fn read_head(stream: &mut TcpStream, limits: &Limits) -> Result<Vec<u8>, HeadError> {
    let mut buf = vec![0u8; limits.max_head];
    let mut len = 0usize;
    let read = async {
        loop {
            if len == buf.len() {
                return Err(HeadError::TooLarge(limits.max_head));
            }
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                return Err(HeadError::Closed(len));
            }
            // Only the new bytes and the three before them can complete a terminator.
            let from = len.saturating_sub(3);
            len += n;
            if let Some(end) = head_end(&buf[from..len]) {
                return Ok(from + end);
            }
        }
    };
    match tokio::time::timeout(limits.head_timeout, read).await {
        Ok(Ok(end)) => {
            buf.truncate(end);
            Ok(buf)
        }
        Ok(Err(err)) => Err(err),
        Err(_) => Err(HeadError::Timeout(limits.head_timeout)),
    }
}

/// Position just past the blank line ending a request head (`\r\n\r\n`, or a bare `\n\n` from
/// lenient clients), if `buf` contains one.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        let rest = buf.get(i + 1..)?;
        if rest.starts_with(b"\n") {
            Some(i + 2)
        } else if rest.starts_with(b"\r\n") {
            Some(i + 3)
        } else {
            None
        }
    })
}

/// An HTTP/1.1 answer, always closing the connection.
#[derive(Debug)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// A `HEAD` request: headers as for `GET`, no body.
    head_only: bool,
    /// Send `Allow: GET, HEAD` (with 405).
    allow: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Response {
        Response {
            status,
            reason,
            content_type: PLAIN_CONTENT_TYPE,
            body: body.as_bytes().to_vec(),
            head_only: false,
            allow: false,
        }
    }

    fn render(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("Connection: close\r\n\r\n");
        let mut out = out.into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The parts of a request line this server cares about.
#[derive(Debug, PartialEq, Eq)]
struct RequestLine<'a> {
    method: &'a str,
    /// The path, without query string.
    path: &'a str,
}

/// Parses and checks a request head: a well-formed `METHOD target HTTP/1.x` line followed by
/// `name: value` header lines. Returns `None` for anything else.
fn parse_head(head: &[u8]) -> Option<RequestLine<'_>> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = std::str::from_utf8(lines.next()?).ok()?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method.is_empty() || !method.bytes().all(is_token_byte) {
        return None;
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return None;
    }
    let path = request_path(target)?;
    for line in lines {
        if line.is_empty() {
            break; // the blank line ending the head
        }
        let colon = line.iter().position(|&b| b == b':')?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().copied().all(is_token_byte) {
            return None;
        }
        if line.iter().any(|&b| b != b'\t' && b.is_ascii_control()) {
            return None;
        }
    }
    Some(RequestLine { method, path })
}

/// The path of a request target in origin form (`/metrics?x`) or absolute form
/// (`http://host:9400/metrics`), without its query.
fn request_path(target: &str) -> Option<&str> {
    let target = if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        match rest.find('/') {
            Some(slash) => &rest[slash..],
            None => "/",
        }
    } else {
        target
    };
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return None;
    }
    let end = target.find(['?', '#']).unwrap_or(target.len());
    Some(&target[..end])
}

/// RFC 9110 `tchar`: what method and header names may consist of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Decides the answer to a complete request head.
fn route(head: &[u8], metrics: &Metrics, ready: &(dyn Fn() -> crate::readiness::Readiness + Send + Sync)) -> Response {
    let Some(request) = parse_head(head) else {
        return Response::text(400, "Bad Request", "bad request\n");
    };
    let head_only = match request.method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut response = Response::text(405, "Method Not Allowed", "method not allowed\n");
            response.allow = true;
            return response;
        }
    };
    let mut response = match request.path {
        "/metrics" => Response {
            status: 200,
            reason: "OK",
            content_type: OPENMETRICS_CONTENT_TYPE,
            body: metrics.encode().into_bytes(),
            head_only: false,
            allow: false,
        },
        "/healthz" => Response::text(200, "OK", "ok"),
        "/readyz" => {
            let readiness = ready();
            if readiness.ready {
                Response::text(200, "OK", "ok")
            } else {
                Response::text(
                    503,
                    "Service Unavailable",
                    &format!("not ready: {}\n", readiness.reason),
                )
            }
        }
        _ => Response::text(404, "Not Found", "not found\n"),
    };
    response.head_only = head_only;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn parse_head_accepts_requests_and_rejects_garbage() {
        let ok = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n");
        assert_eq!(
            ok,
            Some(RequestLine {
                method: "GET",
                path: "/metrics"
            })
        );
        let absolute = parse_head(b"GET http://h:9400/healthz HTTP/1.0\n\n");
        assert_eq!(
            absolute,
            Some(RequestLine {
                method: "GET",
                path: "/healthz"
            })
        );
        for garbage in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"G\xffT /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
        ] {
            assert_eq!(parse_head(garbage), None, "{:?}", String::from_utf8_lossy(garbage));
        }
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    struct Server {
        addr: SocketAddr,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = Metrics::new();
        let ready = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ready);
        let ready_fn: ReadyFn = Arc::new(move || crate::readiness::Readiness {
            ready: flag.load(Ordering::SeqCst),
            reason: "no link up (1 recorded: london connecting)".into(),
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_with(
            listener,
            Arc::clone(&metrics),
            ready_fn,
            shutdown.clone(),
            limits,
        ));
        Server {
            addr,
            ready,
            metrics,
            shutdown,
            task,
        }
    }

    /// Sends `request` raw, reads to end of stream, splits the answer.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The server may answer and close before everything is written (oversized requests).
        let _ = stream.write_all(request).await;
        let _ = stream.shutdown().await;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("answer within 10 s")
            .expect("read answer");
        split_answer(&answer)
    }

    fn split_answer(answer: &[u8]) -> (u16, String, Vec<u8>) {
        let end = head_end(answer).expect("complete response head");
        let head = String::from_utf8(answer[..end].to_vec()).expect("ascii head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        assert!(head.starts_with("HTTP/1.1 "), "{head}");
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
        let body = answer[end..].to_vec();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("content length");
        if !head.starts_with("HTTP/1.1 200") || !body.is_empty() {
            assert_eq!(length, body.len(), "{head}");
        }
        (status, head, body)
    }

    #[tokio::test]
    async fn serves_metrics_and_probes() {
        let server = start(Limits::DEFAULT).await;
        server
            .metrics
            .flow(
                "web",
                "shop",
                crate::metrics::Protocol::Tcp,
                crate::metrics::Role::Origin,
            )
            .opened();

        let (status, head, body) = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, 200);
        assert!(
            head.contains(&format!("Content-Type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
            "{head}"
        );
        let body = String::from_utf8(body).expect("utf-8");
        assert!(
            body.contains(
                r#"causeway_flows_opened_total{service="web",namespace="shop",protocol="tcp",role="origin"} 1"#
            )
        );
        assert!(body.ends_with("# EOF\n"));

        let (status, head, body) = exchange(server.addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);
        assert!(body.is_empty());
        assert!(!head.contains("Content-Length: 0\r\n"), "{head}");

        let (status, _, body) = exchange(server.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));

        let (status, _, body) = exchange(server.addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            (status, body.as_slice()),
            (503, &b"not ready: no link up (1 recorded: london connecting)\n"[..])
        );
        server.ready.store(true, Ordering::SeqCst);
        let (status, _, body) = exchange(server.addr, b"GET /readyz HTTP/1.0\r\n\r\n").await;
        assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));

        let (status, _, _) = exchange(server.addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 404);

        let (status, head, _) = exchange(server.addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").await;
        assert_eq!(status, 405);
        assert!(head.contains("\r\nAllow: GET, HEAD\r\n"), "{head}");

        server.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve did not panic");
    }

    #[tokio::test]
    async fn survives_garbage_and_oversized_requests() {
        let server = start(Limits::DEFAULT).await;

        let (status, _, _) = exchange(server.addr, b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n").await;
        assert_eq!(status, 400);
        let (status, _, _) = exchange(server.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        assert_eq!(status, 400);
        let (status, _, _) = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost").await;
        assert_eq!(status, 400, "truncated head, then half-close");

        // 16 KiB of headers: over the 8 KiB limit.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while big.len() < 16 * 1024 {
            big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        big.extend_from_slice(b"\r\n");
        let (status, _, _) = exchange(server.addr, &big).await;
        assert_eq!(status, 431);

        // One long line without any newline.
        let (status, _, _) = exchange(server.addr, &vec![b'A'; 20 * 1024]).await;
        assert_eq!(status, 431);

        // Connect and leave at once.
        drop(TcpStream::connect(server.addr).await.expect("connect"));

        // Still serving.
        let (status, _, _) = exchange(server.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);
        server.shutdown.cancel();
        let _ = server.task.await;
    }

    #[tokio::test]
    async fn slow_clients_time_out() {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::DEFAULT
        };
        let server = start(limits).await;
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(b"GET /metr").await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        assert_eq!(split_answer(&answer).0, 408);
        server.shutdown.cancel();
        let _ = server.task.await;
    }

    #[tokio::test]
    async fn a_full_table_of_idle_clients_never_delays_a_probe() {
        // Long head timeout: only eviction can make room in time.
        let limits = Limits {
            max_connections: 4,
            head_timeout: Duration::from_secs(60),
            ..Limits::DEFAULT
        };
        let server = start(limits).await;
        let mut idle = Vec::new();
        for _ in 0..8 {
            let mut stream = TcpStream::connect(server.addr).await.expect("connect");
            stream.write_all(b"GET /metr").await.expect("write");
            idle.push(stream);
        }
        for _ in 0..3 {
            let (status, _, _) = tokio::time::timeout(
                Duration::from_secs(1),
                exchange(server.addr, b"GET /healthz HTTP/1.1\r\n\r\n"),
            )
            .await
            .expect("a probe is answered within its 1 s timeout");
            assert_eq!(status, 200);
        }
        // The oldest idle clients were dropped (no answer, just the close) to make room.
        let mut answer = Vec::new();
        let first = &mut idle[0];
        tokio::time::timeout(Duration::from_secs(1), first.read_to_end(&mut answer))
            .await
            .expect("the idlest was dropped")
            .ok();
        assert!(answer.is_empty());
        server.shutdown.cancel();
        let _ = server.task.await;
    }

    #[tokio::test]
    async fn shutdown_abandons_connections_in_progress_and_stops_accepting() {
        let server = start(Limits::DEFAULT).await;
        // A client mid-request holds a connection task; shutdown must not wait 5 s for it.
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(b"GET /").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), server.task)
            .await
            .expect("serve returns promptly")
            .expect("serve did not panic");
        // The listener is gone with serve: new connections are refused.
        assert!(TcpStream::connect(server.addr).await.is_err());
    }
}
