//! Prometheus metrics for the site agent, and the small HTTP endpoint that serves them.
//!
//! An operator running causeway across several clusters needs to see, per service, how many
//! flows each site originates, relays and terminates, how many fail and why, how many bytes and
//! datagrams cross the tunnel, and, per link, whether it is up and how it performs. All of that
//! lives in one [`Metrics`] value (one registry, one family per metric) that the data path
//! updates with cheap counter operations and that [`serve`] exposes at `GET /metrics` in the
//! OpenMetrics text format (what prometheus-client's text encoder writes, `# EOF` included,
//! hence the `application/openmetrics-text; version=1.0.0` content type). The same listener
//! answers `GET /healthz` (the process is alive) and `GET /readyz` (a closure supplied by the
//! agent decides, see [`crate::readiness`]; 503 with the reason in the body while not ready),
//! so Kubernetes probes need no second port.
//!
//! The DNS responder's counters (`causeway_dns_*`) are the exception to one family per metric:
//! at ~90k queries/s a label lookup per answer would cost too much, so they stay the plain
//! atomics of [`crate::dns::Stats`], which a collector registered here reads at scrape time.
//!
//! The HTTP server is hand-written on tokio rather than pulled in from hyper: it speaks just
//! enough HTTP/1.x for scrapers and probes (one request per connection, `Connection: close`) and
//! is hardened for whatever else reaches the port: at most 64 connections at once, the request
//! head must arrive within 3 s and fit in 8 KiB, writes are bounded in time, and malformed input
//! gets a 4xx answer, never a panic. Every connection is accepted at once: when the table is
//! full the connection idle the longest is dropped to make room ([`crate::conntable`]), so
//! idle or slow clients can never keep a liveness probe (1 s timeout) waiting in the kernel's
//! queue until the kubelet restarts a healthy agent.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conntable::{ConnTable, Slot};
use tracing::{debug, warn};

/// Content type of `/metrics`: prometheus-client's text encoder writes OpenMetrics 1.0 (with the
/// trailing `# EOF`), not the older Prometheus 0.0.4 text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Decides `/readyz`: asked on every request, so it must be cheap.
pub type ReadyFn = Arc<dyn Fn() -> crate::readiness::Readiness + Send + Sync>;

/// Content type of the probe answers and error bodies.
const PLAIN_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Labels of the flow counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    service: String,
    namespace: String,
    /// `tcp` or `udp`.
    protocol: String,
    /// `origin`, `relay` or `terminus`: which part of the path this site played.
    role: String,
}

/// Labels of the failed-flow counter: a flow's labels plus why it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowFailureLabels {
    service: String,
    namespace: String,
    protocol: String,
    role: String,
    /// A short fixed word chosen by the caller (`refused`, `no_route`, ...), never free text,
    /// so the number of series stays bounded.
    reason: String,
}

/// Labels of the UDP flow eviction counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvictionLabels {
    /// `origin`, `relay` or `terminus`: which of this site's tables gave up the flow.
    role: String,
    /// `client_share` (its client was at its share) or `table_full` (its holder held the
    /// most flows of a full table).
    reason: String,
}

/// Labels of the byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    service: String,
    namespace: String,
    protocol: String,
    /// `to_endpoint` or `from_endpoint`.
    direction: String,
}

/// Labels of the forwarded-datagram counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatagramLabels {
    service: String,
    namespace: String,
    direction: String,
}

/// Labels of the dropped-datagram counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    service: String,
    namespace: String,
    reason: String,
}

/// Labels of per-service counters that need nothing else.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    namespace: String,
}

/// Labels of the link families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    /// The link's name in `links.yaml`.
    link: String,
    /// The peer's site id.
    peer: String,
}

/// Labels of `causeway_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// `applied` or `rejected` (see [`Metrics::config_reload`]).
    result: String,
}

/// Labels of `causeway_handshakes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    /// What became of the attempt (see [`Metrics::handshake`]).
    outcome: String,
}

/// A gauge holding an unsigned value read from elsewhere (quinn's byte totals, counts).
type U64Gauge = Gauge<u64, AtomicU64>;

/// A gauge holding a float (round-trip times in seconds).
type F64Gauge = Gauge<f64, AtomicU64>;

/// The agent's metrics: one registry and a handle on every family in it.
///
/// Families are reference-counted inside prometheus-client, so the handles here and the ones
/// the registry holds are the same series; updating through a handle is what the next scrape
/// sees.
#[derive(Debug)]
pub struct Metrics {
    /// What [`Metrics::encode`] walks; owns a clone of every family below.
    registry: Registry,
    /// Flows set up, by the site's role in them.
    flows_opened: Family<FlowLabels, Counter>,
    /// Flows that ended after being set up (opened minus closed is what is open now).
    flows_closed: Family<FlowLabels, Counter>,
    /// Flows that could not be set up or broke, by reason.
    flows_failed: Family<FlowFailureLabels, Counter>,
    /// Payload bytes carried for services, counted where they enter or leave an endpoint.
    bytes: Family<ByteLabels, Counter>,
    /// UDP datagrams forwarded.
    udp_datagrams: Family<DatagramLabels, Counter>,
    /// UDP datagrams dropped, by reason.
    udp_dropped: Family<DropLabels, Counter>,
    /// Datagrams too large for the link's datagram limit, carried on a stream instead: a high
    /// rate means the path MTU is smaller than what the service sends.
    udp_via_stream: Family<ServiceLabels, Counter>,
    /// UDP flows evicted to admit newer ones (`limits.max_flows`): a steady rate means one
    /// client opens flows faster than they go idle.
    udp_evicted: Family<EvictionLabels, Counter>,
    /// Incoming QUIC connection attempts by what became of them: a high `retry` rate with few
    /// `admitted` is a flood of Initials from addresses that never answer (forged or silent);
    /// `refused_*` means validated sources hit the handshake limits.
    handshakes: Family<HandshakeLabels, Counter>,
    /// Changes to causeway.yaml picked up while running, by result: a rejected one leaves
    /// the previous configuration in force, which an operator must notice.
    config_reloads: Family<ReloadLabels, Counter>,
    /// 1 while the last change to causeway.yaml was rejected, else 0.
    config_reload_failed: U64Gauge,
    /// 1 while the link is up, 0 otherwise.
    link_up: Family<LinkLabels, Gauge>,
    /// quinn's smoothed RTT estimate; absent while unknown (link down).
    link_rtt: Family<LinkLabels, F64Gauge>,
    /// Bytes sent on the link's current connection, as quinn reports it. A gauge because it is
    /// an absolute value that is set, and it starts again from 0 when the link reconnects.
    link_sent: Family<LinkLabels, U64Gauge>,
    /// Bytes received on the link's current connection, as quinn reports it.
    link_received: Family<LinkLabels, U64Gauge>,
    /// Services this agent knows about (exported locally or imported from peers).
    services: U64Gauge,
    /// Local endpoints that are ready to receive flows.
    ready_endpoints: U64Gauge,
    /// The soft open-files limit in force: each VIP listener and flow holds descriptors, so an
    /// operator can alert before a large clusterset runs into it.
    open_files_limit: U64Gauge,
    /// VIP listeners the view asks for that could not be bound (their names and errors are in
    /// `causeway status`): nonzero means some VIPs do not answer here.
    listener_errors: U64Gauge,
    /// The DNS responder's counters; the registry reads them through their collector at scrape
    /// time, so the responder's hot path stays a relaxed atomic add.
    dns: Arc<crate::dns::Stats>,
}

impl Metrics {
    /// Creates the registry with every family registered, all empty.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("causeway");
        let flows_opened = Family::<FlowLabels, Counter>::default();
        let flows_closed = Family::<FlowLabels, Counter>::default();
        let flows_failed = Family::<FlowFailureLabels, Counter>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let udp_datagrams = Family::<DatagramLabels, Counter>::default();
        let udp_dropped = Family::<DropLabels, Counter>::default();
        let udp_via_stream = Family::<ServiceLabels, Counter>::default();
        let udp_evicted = Family::<EvictionLabels, Counter>::default();
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let config_reload_failed = U64Gauge::default();
        let link_up = Family::<LinkLabels, Gauge>::default();
        let link_rtt = Family::<LinkLabels, F64Gauge>::default();
        let link_sent = Family::<LinkLabels, U64Gauge>::default();
        let link_received = Family::<LinkLabels, U64Gauge>::default();
        let services = U64Gauge::default();
        let ready_endpoints = U64Gauge::default();
        let open_files_limit = U64Gauge::default();
        let listener_errors = U64Gauge::default();
        let dns = Arc::new(crate::dns::Stats::default());

        // The registry appends `_total` to counters and the unit to names registered with one.
        registry.register(
            "flows_opened",
            "Flows set up, by the site's role in them",
            flows_opened.clone(),
        );
        registry.register(
            "flows_closed",
            "Flows that ended after being set up",
            flows_closed.clone(),
        );
        registry.register("flows_failed", "Flows that failed, by reason", flows_failed.clone());
        registry.register("bytes", "Payload bytes carried for services", bytes.clone());
        registry.register("udp_datagrams", "UDP datagrams forwarded", udp_datagrams.clone());
        registry.register(
            "udp_datagrams_dropped",
            "UDP datagrams dropped, by reason",
            udp_dropped.clone(),
        );
        registry.register(
            "udp_datagrams_via_stream",
            "UDP datagrams larger than the link's datagram limit, carried on a stream",
            udp_via_stream.clone(),
        );
        registry.register(
            "udp_flows_evicted",
            "UDP flows evicted to admit newer ones, by table and reason",
            udp_evicted.clone(),
        );
        registry.register(
            "config_reloads",
            "Changes to causeway.yaml picked up while running, by result (applied or rejected)",
            config_reloads.clone(),
        );
        registry.register(
            "config_reload_failed",
            "1 while the last change to causeway.yaml was rejected (the previous one stays in force)",
            config_reload_failed.clone(),
        );
        registry.register(
            "handshakes",
            "Incoming QUIC connection attempts, by outcome",
            handshakes.clone(),
        );
        registry.register("link_up", "Whether the link is up (1) or not (0)", link_up.clone());
        registry.register_with_unit(
            "link_rtt",
            "Smoothed round-trip time of the link",
            Unit::Seconds,
            link_rtt.clone(),
        );
        registry.register_with_unit(
            "link_sent",
            "Bytes sent on the link's current connection",
            Unit::Bytes,
            link_sent.clone(),
        );
        registry.register_with_unit(
            "link_received",
            "Bytes received on the link's current connection",
            Unit::Bytes,
            link_received.clone(),
        );
        registry.register("services", "Services known to this agent", services.clone());
        registry.register(
            "ready_endpoints",
            "Local endpoints ready to receive flows",
            ready_endpoints.clone(),
        );
        registry.register(
            "open_files_limit",
            "The agent's soft open-files limit (RLIMIT_NOFILE) after raising it to the hard limit",
            open_files_limit.clone(),
        );
        registry.register(
            "vip_listener_errors",
            "VIP listeners that could not be bound (see `causeway status`)",
            listener_errors.clone(),
        );
        // causeway_dns_responses_total{rcode}, causeway_dns_{truncated,forwarded,dropped}_total.
        registry.register_collector(Box::new(dns.clone()));

        Arc::new(Metrics {
            registry,
            flows_opened,
            flows_closed,
            flows_failed,
            bytes,
            udp_datagrams,
            udp_dropped,
            udp_via_stream,
            udp_evicted,
            handshakes,
            config_reloads,
            config_reload_failed,
            link_up,
            link_rtt,
            link_sent,
            link_received,
            services,
            ready_endpoints,
            open_files_limit,
            listener_errors,
            dns,
        })
    }

    /// The counters the DNS responder updates ([`crate::dns::Responder::start`] takes them).
    pub fn dns(&self) -> Arc<crate::dns::Stats> {
        self.dns.clone()
    }

    /// A flow was set up. `protocol` is `tcp` or `udp`; `role` is `origin` (accepted on a VIP
    /// listener here), `relay` (passed through this site) or `terminus` (delivered to a local
    /// endpoint here).
    pub fn flow_opened(&self, service: &str, namespace: &str, protocol: &str, role: &str) {
        self.flows_opened
            .get_or_create(&flow_labels(service, namespace, protocol, role))
            .inc();
    }

    /// A flow that was opened has ended.
    pub fn flow_closed(&self, service: &str, namespace: &str, protocol: &str, role: &str) {
        self.flows_closed
            .get_or_create(&flow_labels(service, namespace, protocol, role))
            .inc();
    }

    /// A flow failed; `reason` is a short fixed word such as `refused`, `unreachable`,
    /// `no_route`, `limit` or `reset`.
    pub fn flow_failed(&self, service: &str, namespace: &str, protocol: &str, role: &str, reason: &str) {
        let labels = FlowFailureLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            protocol: protocol.to_owned(),
            role: role.to_owned(),
            reason: reason.to_owned(),
        };
        self.flows_failed.get_or_create(&labels).inc();
    }

    /// `n` payload bytes were carried; `direction` is `to_endpoint` or `from_endpoint`.
    /// Each call costs a few small allocations and a lock lookup, so callers on the data path
    /// should add once per buffer, not per byte.
    pub fn add_bytes(&self, service: &str, namespace: &str, protocol: &str, direction: &str, n: u64) {
        let labels = ByteLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            protocol: protocol.to_owned(),
            direction: direction.to_owned(),
        };
        self.bytes.get_or_create(&labels).inc_by(n);
    }

    /// One UDP datagram was forwarded in `direction` (`to_endpoint` or `from_endpoint`).
    pub fn datagram(&self, service: &str, namespace: &str, direction: &str) {
        let labels = DatagramLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            direction: direction.to_owned(),
        };
        self.udp_datagrams.get_or_create(&labels).inc();
    }

    /// One UDP datagram was dropped; `reason` is a short fixed word such as `too_large`,
    /// `no_route`, `no_flow` or `queue_full`.
    pub fn datagram_dropped(&self, service: &str, namespace: &str, reason: &str) {
        let labels = DropLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            reason: reason.to_owned(),
        };
        self.udp_dropped.get_or_create(&labels).inc();
    }

    /// One UDP datagram was larger than the link's datagram limit and went on a stream instead.
    pub fn datagram_via_stream(&self, service: &str, namespace: &str) {
        let labels = ServiceLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
        };
        self.udp_via_stream.get_or_create(&labels).inc();
    }

    /// One UDP flow was evicted from this agent's table to admit a newer one. `role` is
    /// `origin`, `relay` or `terminus`; `reason` is `client_share` or `table_full`.
    pub fn udp_flow_evicted(&self, role: &str, reason: &str) {
        let labels = EvictionLabels {
            role: role.to_owned(),
            reason: reason.to_owned(),
        };
        self.udp_evicted.get_or_create(&labels).inc();
    }

    /// A change to causeway.yaml was applied (`ok`) or rejected.
    pub fn config_reload(&self, ok: bool) {
        let labels = ReloadLabels {
            result: if ok { "applied" } else { "rejected" }.to_owned(),
        };
        self.config_reloads.get_or_create(&labels).inc();
        self.config_reload_failed.set(u64::from(!ok));
    }

    /// One incoming QUIC connection attempt reached `outcome`: `retry` (asked to validate
    /// its address), `admitted`, `refused_source` or `refused_busy` (over the per-source or
    /// total handshake limit), `ignored` (no answer possible); then, for admitted ones,
    /// `completed`, `failed` or `timed_out`. See [`crate::handshake`].
    pub fn handshake(&self, outcome: &str) {
        let labels = HandshakeLabels {
            outcome: outcome.to_owned(),
        };
        self.handshakes.get_or_create(&labels).inc();
    }

    /// Sets a link's gauges from quinn's statistics. The agent refreshes them periodically; an
    /// unknown `rtt` (the link is down) removes the RTT series rather than reporting a stale or
    /// made-up value.
    pub fn set_link(&self, link: &str, peer: &str, up: bool, rtt: Option<Duration>, tx_bytes: u64, rx_bytes: u64) {
        let labels = link_labels(link, peer);
        self.link_up.get_or_create(&labels).set(i64::from(up));
        match rtt {
            Some(rtt) => {
                self.link_rtt.get_or_create(&labels).set(rtt.as_secs_f64());
            }
            None => {
                self.link_rtt.remove(&labels);
            }
        }
        self.link_sent.get_or_create(&labels).set(tx_bytes);
        self.link_received.get_or_create(&labels).set(rx_bytes);
    }

    /// Forgets a link: its series disappear from every link family, so a removed link does not
    /// linger in dashboards as "down".
    pub fn remove_link(&self, link: &str, peer: &str) {
        let labels = link_labels(link, peer);
        self.link_up.remove(&labels);
        self.link_rtt.remove(&labels);
        self.link_sent.remove(&labels);
        self.link_received.remove(&labels);
    }

    /// Sets the number of services this agent knows about.
    pub fn set_services(&self, count: usize) {
        self.services.set(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// Sets the number of local endpoints that are ready.
    pub fn set_endpoints(&self, ready: usize) {
        self.ready_endpoints.set(u64::try_from(ready).unwrap_or(u64::MAX));
    }

    /// Sets the open-files limit in force (descriptors).
    pub fn set_open_files_limit(&self, limit: u64) {
        self.open_files_limit.set(limit);
    }

    /// Sets the number of VIP listeners that could not be bound.
    pub fn set_listener_errors(&self, count: usize) {
        self.listener_errors.set(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// The whole registry in the OpenMetrics text format, ending with `# EOF`.
    ///
    /// Writing into a `String` cannot fail on its own; should an encoder ever report an error,
    /// it is logged and the partial text (without `# EOF`) is returned, which a scraper rejects
    /// as incomplete rather than ingesting wrong numbers.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %err, "encoding metrics failed");
        }
        out
    }
}

fn flow_labels(service: &str, namespace: &str, protocol: &str, role: &str) -> FlowLabels {
    FlowLabels {
        service: service.to_owned(),
        namespace: namespace.to_owned(),
        protocol: protocol.to_owned(),
        role: role.to_owned(),
    }
}

fn link_labels(link: &str, peer: &str) -> LinkLabels {
    LinkLabels {
        link: link.to_owned(),
        peer: peer.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP endpoint
// ---------------------------------------------------------------------------------------------

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

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn counters_appear_with_labels_and_values() {
        let m = Metrics::new();
        m.flow_opened("web", "shop", "tcp", "origin");
        m.flow_opened("web", "shop", "tcp", "origin");
        m.flow_opened("web", "shop", "tcp", "relay");
        m.flow_closed("web", "shop", "tcp", "origin");
        m.flow_failed("web", "shop", "tcp", "terminus", "refused");
        m.add_bytes("web", "shop", "tcp", "to_endpoint", 1000);
        m.add_bytes("web", "shop", "tcp", "to_endpoint", 24);
        m.add_bytes("web", "shop", "tcp", "from_endpoint", 7);
        m.datagram("dns", "kube-system", "to_endpoint");
        m.datagram_dropped("dns", "kube-system", "too_large");
        m.datagram_via_stream("dns", "kube-system");
        m.udp_flow_evicted("origin", "client_share");
        m.udp_flow_evicted("origin", "client_share");
        m.handshake("retry");
        m.handshake("retry");
        m.handshake("refused_source");
        m.set_services(3);
        m.set_endpoints(2);
        let text = m.encode();

        for line in [
            r#"causeway_flows_opened_total{service="web",namespace="shop",protocol="tcp",role="origin"} 2"#,
            r#"causeway_flows_opened_total{service="web",namespace="shop",protocol="tcp",role="relay"} 1"#,
            r#"causeway_flows_closed_total{service="web",namespace="shop",protocol="tcp",role="origin"} 1"#,
            r#"causeway_flows_failed_total{service="web",namespace="shop",protocol="tcp",role="terminus",reason="refused"} 1"#,
            r#"causeway_bytes_total{service="web",namespace="shop",protocol="tcp",direction="to_endpoint"} 1024"#,
            r#"causeway_bytes_total{service="web",namespace="shop",protocol="tcp",direction="from_endpoint"} 7"#,
            r#"causeway_udp_datagrams_total{service="dns",namespace="kube-system",direction="to_endpoint"} 1"#,
            r#"causeway_udp_datagrams_dropped_total{service="dns",namespace="kube-system",reason="too_large"} 1"#,
            r#"causeway_udp_datagrams_via_stream_total{service="dns",namespace="kube-system"} 1"#,
            r#"causeway_udp_flows_evicted_total{role="origin",reason="client_share"} 2"#,
            r#"causeway_handshakes_total{outcome="retry"} 2"#,
            r#"causeway_handshakes_total{outcome="refused_source"} 1"#,
            "causeway_services 3",
            "causeway_ready_endpoints 2",
            "# TYPE causeway_flows_opened counter",
            "# TYPE causeway_services gauge",
            "# EOF",
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn link_gauges_are_set_not_added() {
        let m = Metrics::new();
        m.set_link("to-b", "site-b", true, Some(Duration::from_millis(25)), 100, 200);
        m.set_link("to-b", "site-b", true, Some(Duration::from_millis(25)), 150, 260);
        let text = m.encode();
        for line in [
            r#"causeway_link_up{link="to-b",peer="site-b"} 1"#,
            r#"causeway_link_rtt_seconds{link="to-b",peer="site-b"} 0.025"#,
            r#"causeway_link_sent_bytes{link="to-b",peer="site-b"} 150"#,
            r#"causeway_link_received_bytes{link="to-b",peer="site-b"} 260"#,
            "# UNIT causeway_link_rtt_seconds seconds",
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }

        // Down: up is 0 and the unknown RTT disappears rather than going stale.
        m.set_link("to-b", "site-b", false, None, 0, 0);
        let text = m.encode();
        assert!(
            has_line(&text, r#"causeway_link_up{link="to-b",peer="site-b"} 0"#),
            "{text}"
        );
        assert!(!text.contains("causeway_link_rtt_seconds{"), "{text}");
    }

    #[test]
    fn remove_link_removes_every_series_of_that_link() {
        let m = Metrics::new();
        m.set_link("to-b", "site-b", true, Some(Duration::from_millis(5)), 1, 2);
        m.set_link("to-c", "site-c", true, Some(Duration::from_millis(7)), 3, 4);
        m.remove_link("to-b", "site-b");
        let text = m.encode();
        assert!(!text.contains(r#"link="to-b""#), "{text}");
        assert!(
            has_line(&text, r#"causeway_link_up{link="to-c",peer="site-c"} 1"#),
            "{text}"
        );
        assert!(
            has_line(&text, r#"causeway_link_sent_bytes{link="to-c",peer="site-c"} 3"#),
            "{text}"
        );
        // Removing an unknown link is harmless.
        m.remove_link("nope", "nobody");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.flow_opened("we\"b\\x\ny", "shop", "tcp", "origin");
        let text = m.encode();
        assert!(text.contains(r#"service="we\"b\\x\ny""#), "{text}");
    }

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
        server.metrics.flow_opened("web", "shop", "tcp", "origin");

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
