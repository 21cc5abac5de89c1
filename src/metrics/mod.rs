//! Prometheus metrics for the site agent: one registry and the families the data path updates.
//!
//! An operator running causeway across several clusters needs to see, per service, how many
//! flows each site originates, relays and terminates, how many fail and why, how many bytes and
//! datagrams cross the tunnel, and, per link, whether it is up and how it performs. All of that
//! lives in one [`Metrics`] value (one registry, one family per metric) that the data path
//! updates with cheap counter operations and that [`serve`] (in `http.rs`, the small endpoint
//! that also answers `/healthz` and `/readyz`) exposes at `GET /metrics` in the OpenMetrics
//! text format.
//!
//! The DNS responder's counters (`causeway_dns_*`) are the exception to one family per metric:
//! at ~90k queries/s a label lookup per answer would cost too much, so they stay the plain
//! atomics of [`crate::dns::Stats`], which the agent registers here as a collector
//! ([`Metrics::with_collectors`]) that the registry reads at scrape time.

mod http;

pub use http::{OPENMETRICS_CONTENT_TYPE, ReadyFn, serve};

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tracing::warn;

/// Defines a label value: a closed enum whose variants encode as fixed words, so every label
/// set built from it is bounded by its type and the exposition spells each value exactly as
/// `as_str` does. (prometheus-client's derive writes the variant's Rust name, `Tcp`, which
/// would change the exposition; hence this.)
macro_rules! label_value {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word the exposition carries for this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

label_value! {
    /// The `protocol` label: the transport of the service's flow.
    pub enum Protocol {
        /// A TCP connection.
        Tcp => "tcp",
        /// A UDP flow (datagrams between one client and one endpoint).
        Udp => "udp",
    }
}

label_value! {
    /// The `role` label: which part of a flow's path this site played (also which of the UDP
    /// forwarder's tables holds a flow).
    pub enum Role {
        /// Accepted on a VIP listener here.
        Origin => "origin",
        /// Passed through this site towards another.
        Relay => "relay",
        /// Delivered to a local endpoint here.
        Terminus => "terminus",
    }
}

label_value! {
    /// The `direction` label of the byte and datagram counters.
    pub enum Direction {
        /// From the client towards the service's endpoint.
        ToEndpoint => "to_endpoint",
        /// From the endpoint back to the client.
        FromEndpoint => "from_endpoint",
    }
}

label_value! {
    /// The `reason` label of `causeway_flows_failed_total`.
    pub enum FailReason {
        /// The endpoint refused the connection.
        Refused => "refused",
        /// The endpoint or the next site could not be reached.
        Unreachable => "unreachable",
        /// No link leads towards the flow's destination site.
        NoRoute => "no_route",
        /// The agent's flow limit was reached.
        Limit => "limit",
        /// The VIP is not (or no longer) exported here.
        NotExported => "not_exported",
        /// The flow broke after it was set up.
        Reset => "reset",
    }
}

label_value! {
    /// The `reason` label of `causeway_udp_datagrams_dropped_total`.
    pub enum DropReason {
        /// Larger than anything the path can carry.
        TooLarge => "too_large",
        /// No link leads towards the flow's destination site.
        NoRoute => "no_route",
        /// A reply for a flow this agent no longer holds.
        NoFlow => "no_flow",
        /// A queue on the way was full.
        QueueFull => "queue_full",
        /// The link refused the datagram (closed, or datagrams unsupported).
        Link => "link",
        /// The datagram's header could not be parsed.
        Malformed => "malformed",
    }
}

label_value! {
    /// The `reason` label of `causeway_udp_flows_evicted_total`.
    pub enum EvictReason {
        /// Its client was at its share and opened another flow.
        ClientShare => "client_share",
        /// The table was full and its holder held the most flows.
        TableFull => "table_full",
    }
}

label_value! {
    /// The `outcome` label of `causeway_handshakes_total` (see [`crate::handshake`]).
    pub enum HandshakeOutcome {
        /// Asked to validate its address first.
        Retry => "retry",
        /// Admitted to the handshake.
        Admitted => "admitted",
        /// Refused: its source had too many handshakes in flight.
        RefusedSource => "refused_source",
        /// Refused: too many handshakes in flight in all.
        RefusedBusy => "refused_busy",
        /// No answer was possible.
        Ignored => "ignored",
        /// An admitted handshake completed.
        Completed => "completed",
        /// An admitted handshake failed.
        Failed => "failed",
        /// An admitted handshake did not complete in time.
        TimedOut => "timed_out",
    }
}

label_value! {
    /// The `result` label of `causeway_config_reloads_total`.
    pub enum ReloadResult {
        /// The change was applied.
        Applied => "applied",
        /// The change was rejected; the previous configuration stays in force.
        Rejected => "rejected",
    }
}

/// Labels of the flow counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    service: String,
    namespace: String,
    protocol: Protocol,
    role: Role,
}

/// Labels of the failed-flow counter: a flow's labels plus why it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowFailureLabels {
    service: String,
    namespace: String,
    protocol: Protocol,
    role: Role,
    reason: FailReason,
}

/// Labels of the UDP flow eviction counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvictionLabels {
    /// Which of this site's tables gave up the flow.
    role: Role,
    reason: EvictReason,
}

/// Labels of the byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    service: String,
    namespace: String,
    protocol: Protocol,
    direction: Direction,
}

/// Labels of the forwarded-datagram counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatagramLabels {
    service: String,
    namespace: String,
    direction: Direction,
}

/// Labels of the dropped-datagram counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    service: String,
    namespace: String,
    reason: DropReason,
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
    result: ReloadResult,
}

/// Labels of `causeway_handshakes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    outcome: HandshakeOutcome,
}

/// A gauge holding an unsigned value read from elsewhere (quinn's byte totals, counts).
type U64Gauge = Gauge<u64, AtomicU64>;

/// A gauge holding a float (round-trip times in seconds).
type F64Gauge = Gauge<f64, AtomicU64>;

/// One link's numbers as the agent samples them each second ([`Metrics::set_link`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkSample {
    /// Whether the link is up.
    pub up: bool,
    /// The first connection's smoothed RTT; `None` while unknown (down).
    pub rtt: Option<Duration>,
    /// Bytes sent on every lane that is up, as quinn reports them.
    pub tx_bytes: u64,
    /// Bytes received on every lane that is up.
    pub rx_bytes: u64,
    /// Lanes that are up, the first connection included; 0 while down.
    pub lanes: usize,
}

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
    /// Resumable TCP flows moved to a new stream (a new path, or the same after a failure).
    flows_resumed: Family<FlowLabels, Counter>,
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
    /// Bytes sent on the link's current connection and its lanes, as quinn reports them. A
    /// gauge because it is an absolute value that is set, and it starts again from 0 when the
    /// link reconnects (and falls by a lane's bytes when that lane ends).
    link_sent: Family<LinkLabels, U64Gauge>,
    /// Bytes received on the link's current connection and its lanes.
    link_received: Family<LinkLabels, U64Gauge>,
    /// Lanes (parallel QUIC connections, `links.lanes`) of the link that are up, its first
    /// connection included; 0 while down. Fewer than configured means the peer agreed to
    /// fewer, or a lane keeps failing (its log says why).
    link_lanes: Family<LinkLabels, U64Gauge>,
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
}

impl Metrics {
    /// Creates the registry with every family registered, all empty.
    pub fn new() -> Arc<Metrics> {
        Metrics::with_collectors(Vec::new())
    }

    /// [`Metrics::new`] plus `collectors`: counters other modules keep themselves and the
    /// registry reads at scrape time, such as the DNS responder's ([`crate::dns::Stats`],
    /// whose hot path stays a relaxed atomic add). Taking them here keeps this module from
    /// depending on theirs.
    pub fn with_collectors(collectors: Vec<Box<dyn prometheus_client::collector::Collector>>) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("causeway");
        let flows_opened = Family::<FlowLabels, Counter>::default();
        let flows_closed = Family::<FlowLabels, Counter>::default();
        let flows_failed = Family::<FlowFailureLabels, Counter>::default();
        let flows_resumed = Family::<FlowLabels, Counter>::default();
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
        let link_lanes = Family::<LinkLabels, U64Gauge>::default();
        let services = U64Gauge::default();
        let ready_endpoints = U64Gauge::default();
        let open_files_limit = U64Gauge::default();
        let listener_errors = U64Gauge::default();

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
        registry.register(
            "flows_resumed",
            "TCP flows moved to a new stream after their path failed or moved",
            flows_resumed.clone(),
        );
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
            "Bytes sent on the link's current connection and its lanes",
            Unit::Bytes,
            link_sent.clone(),
        );
        registry.register_with_unit(
            "link_received",
            "Bytes received on the link's current connection and its lanes",
            Unit::Bytes,
            link_received.clone(),
        );
        registry.register(
            "link_lanes",
            "Lanes (parallel QUIC connections) of the link that are up",
            link_lanes.clone(),
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
        // E.g. causeway_dns_responses_total{rcode}, causeway_dns_{truncated,forwarded,dropped}_total.
        for c in collectors {
            registry.register_collector(c);
        }

        Arc::new(Metrics {
            registry,
            flows_opened,
            flows_closed,
            flows_failed,
            flows_resumed,
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
            link_lanes,
            services,
            ready_endpoints,
            open_files_limit,
            listener_errors,
        })
    }

    /// The counters of one flow of `service` in `namespace`, in which this site plays `role`.
    ///
    /// Made once when the flow starts: its label values are copied once, and each counter is
    /// resolved on its first use and kept, so counting bytes or the close is a plain atomic add.
    /// A series still appears only when first counted, as it would without the handle.
    pub fn flow(&self, service: &str, namespace: &str, protocol: Protocol, role: Role) -> FlowMetrics {
        FlowMetrics {
            labels: FlowLabels {
                service: service.to_owned(),
                namespace: namespace.to_owned(),
                protocol,
                role,
            },
            opened_family: self.flows_opened.clone(),
            closed_family: self.flows_closed.clone(),
            failed_family: self.flows_failed.clone(),
            resumed_family: self.flows_resumed.clone(),
            bytes_family: self.bytes.clone(),
            datagrams_family: self.udp_datagrams.clone(),
            closed: OnceLock::new(),
            to_endpoint: OnceLock::new(),
            from_endpoint: OnceLock::new(),
            to_endpoint_datagrams: OnceLock::new(),
            from_endpoint_datagrams: OnceLock::new(),
        }
    }

    /// `n` payload bytes were carried in `direction` outside any [`FlowMetrics`]. Each call
    /// costs a few small allocations and a lock lookup; the data path counts through
    /// [`FlowMetrics::bytes`] and [`FlowMetrics::datagram`] instead.
    pub fn add_bytes(&self, service: &str, namespace: &str, protocol: Protocol, direction: Direction, n: u64) {
        let labels = ByteLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            protocol,
            direction,
        };
        self.bytes.get_or_create(&labels).inc_by(n);
    }

    /// One UDP datagram was forwarded in `direction`, outside any [`FlowMetrics`] (which the
    /// data path counts through: [`FlowMetrics::datagram`]).
    pub fn datagram(&self, service: &str, namespace: &str, direction: Direction) {
        let labels = DatagramLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            direction,
        };
        self.udp_datagrams.get_or_create(&labels).inc();
    }

    /// One UDP datagram was dropped, for `reason`.
    pub fn datagram_dropped(&self, service: &str, namespace: &str, reason: DropReason) {
        let labels = DropLabels {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            reason,
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

    /// One UDP flow was evicted from this agent's `role` table to admit a newer one.
    pub fn udp_flow_evicted(&self, role: Role, reason: EvictReason) {
        let labels = EvictionLabels { role, reason };
        self.udp_evicted.get_or_create(&labels).inc();
    }

    /// A change to causeway.yaml was applied (`ok`) or rejected.
    pub fn config_reload(&self, ok: bool) {
        let labels = ReloadLabels {
            result: if ok {
                ReloadResult::Applied
            } else {
                ReloadResult::Rejected
            },
        };
        self.config_reloads.get_or_create(&labels).inc();
        self.config_reload_failed.set(u64::from(!ok));
    }

    /// One incoming QUIC connection attempt reached `outcome`: first `retry`, `admitted`,
    /// `refused_*` or `ignored`; then, for admitted ones, `completed`, `failed` or
    /// `timed_out`. See [`crate::handshake`].
    pub fn handshake(&self, outcome: HandshakeOutcome) {
        let labels = HandshakeLabels { outcome };
        self.handshakes.get_or_create(&labels).inc();
    }

    /// Sets a link's gauges from quinn's statistics. The agent refreshes them periodically; an
    /// unknown `rtt` (the link is down) removes the RTT series rather than reporting a stale or
    /// made-up value.
    pub fn set_link(&self, link: &str, peer: &str, sample: &LinkSample) {
        let LinkSample {
            up,
            rtt,
            tx_bytes,
            rx_bytes,
            lanes,
        } = *sample;
        let labels = link_labels(link, peer);
        self.link_up.get_or_create(&labels).set(i64::from(up));
        self.link_lanes
            .get_or_create(&labels)
            .set(u64::try_from(lanes).unwrap_or(u64::MAX));
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
        self.link_lanes.remove(&labels);
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

/// The counters of one flow, from [`Metrics::flow`]: what the data path counts through instead
/// of rebuilding label sets per call.
#[derive(Debug)]
pub struct FlowMetrics {
    /// The flow's labels, copied once.
    labels: FlowLabels,
    /// `causeway_flows_opened_total`, counted at most once per flow so not cached.
    opened_family: Family<FlowLabels, Counter>,
    /// `causeway_flows_closed_total`, resolved into `closed` on first use.
    closed_family: Family<FlowLabels, Counter>,
    /// `causeway_flows_failed_total`: the reason is known only at failure, so looked up then.
    failed_family: Family<FlowFailureLabels, Counter>,
    /// `causeway_flows_resumed_total`: rare, so looked up when it happens.
    resumed_family: Family<FlowLabels, Counter>,
    /// `causeway_bytes_total`, resolved into `to_endpoint` / `from_endpoint` on first use.
    bytes_family: Family<ByteLabels, Counter>,
    /// `causeway_udp_datagrams_total`, resolved into `to_endpoint_datagrams` /
    /// `from_endpoint_datagrams` on first use (UDP flows only).
    datagrams_family: Family<DatagramLabels, Counter>,
    /// This flow's series of `causeway_flows_closed_total`, once resolved.
    closed: OnceLock<Counter>,
    /// This flow's `direction="to_endpoint"` series of `causeway_bytes_total`, once resolved.
    to_endpoint: OnceLock<Counter>,
    /// This flow's `direction="from_endpoint"` series of `causeway_bytes_total`, once resolved.
    from_endpoint: OnceLock<Counter>,
    /// This flow's `direction="to_endpoint"` series of `causeway_udp_datagrams_total`, once
    /// resolved.
    to_endpoint_datagrams: OnceLock<Counter>,
    /// This flow's `direction="from_endpoint"` series of `causeway_udp_datagrams_total`, once
    /// resolved.
    from_endpoint_datagrams: OnceLock<Counter>,
}

impl FlowMetrics {
    /// The part of the flow's path this site plays.
    pub fn role(&self) -> Role {
        self.labels.role
    }

    /// The flow was set up.
    pub fn opened(&self) {
        self.opened_family.get_or_create(&self.labels).inc();
    }

    /// The flow, once opened, has ended.
    pub fn closed(&self) {
        self.closed
            .get_or_init(|| self.closed_family.get_or_create(&self.labels).clone())
            .inc();
    }

    /// The flow failed (before or after it was set up) for `reason`.
    pub fn failed(&self, reason: FailReason) {
        let labels = FlowFailureLabels {
            service: self.labels.service.clone(),
            namespace: self.labels.namespace.clone(),
            protocol: self.labels.protocol,
            role: self.labels.role,
            reason,
        };
        self.failed_family.get_or_create(&labels).inc();
    }

    /// The flow moved to a new stream (resumable TCP flows).
    pub fn resumed(&self) {
        self.resumed_family.get_or_create(&self.labels).inc();
    }

    /// `n` payload bytes were carried in `direction`. Cheap after the first call per direction,
    /// but still best counted once per buffer, not per byte.
    pub fn bytes(&self, direction: Direction, n: u64) {
        let cell = match direction {
            Direction::ToEndpoint => &self.to_endpoint,
            Direction::FromEndpoint => &self.from_endpoint,
        };
        cell.get_or_init(|| {
            let labels = ByteLabels {
                service: self.labels.service.clone(),
                namespace: self.labels.namespace.clone(),
                protocol: self.labels.protocol,
                direction,
            };
            self.bytes_family.get_or_create(&labels).clone()
        })
        .inc_by(n);
    }

    /// One UDP datagram of `n` payload bytes was carried in `direction`: counts it in
    /// `causeway_udp_datagrams_total` and its bytes in `causeway_bytes_total` (as
    /// [`FlowMetrics::bytes`]). A plain atomic add per counter after the first datagram each
    /// way, where building the label sets per datagram cost four small allocations.
    pub fn datagram(&self, direction: Direction, n: u64) {
        let cell = match direction {
            Direction::ToEndpoint => &self.to_endpoint_datagrams,
            Direction::FromEndpoint => &self.from_endpoint_datagrams,
        };
        cell.get_or_init(|| {
            let labels = DatagramLabels {
                service: self.labels.service.clone(),
                namespace: self.labels.namespace.clone(),
                direction,
            };
            self.datagrams_family.get_or_create(&labels).clone()
        })
        .inc();
        self.bytes(direction, n);
    }
}

fn link_labels(link: &str, peer: &str) -> LinkLabels {
    LinkLabels {
        link: link.to_owned(),
        peer: peer.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn counters_appear_with_labels_and_values() {
        let m = Metrics::new();
        let origin = m.flow("web", "shop", Protocol::Tcp, Role::Origin);
        origin.opened();
        m.flow("web", "shop", Protocol::Tcp, Role::Origin).opened();
        m.flow("web", "shop", Protocol::Tcp, Role::Relay).opened();
        origin.closed();
        m.flow("web", "shop", Protocol::Tcp, Role::Terminus)
            .failed(FailReason::Refused);
        origin.bytes(Direction::ToEndpoint, 1000);
        origin.bytes(Direction::ToEndpoint, 24);
        origin.bytes(Direction::FromEndpoint, 7);
        m.datagram("dns", "kube-system", Direction::ToEndpoint);
        m.datagram_dropped("dns", "kube-system", DropReason::TooLarge);
        m.datagram_via_stream("dns", "kube-system");
        m.udp_flow_evicted(Role::Origin, EvictReason::ClientShare);
        m.udp_flow_evicted(Role::Origin, EvictReason::ClientShare);
        m.handshake(HandshakeOutcome::Retry);
        m.handshake(HandshakeOutcome::Retry);
        m.handshake(HandshakeOutcome::RefusedSource);
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

    /// A link sample: up, RTT in ms, bytes sent and received, lanes.
    fn sample(up: bool, rtt_ms: Option<u64>, tx_bytes: u64, rx_bytes: u64, lanes: usize) -> LinkSample {
        LinkSample {
            up,
            rtt: rtt_ms.map(Duration::from_millis),
            tx_bytes,
            rx_bytes,
            lanes,
        }
    }

    #[test]
    fn link_gauges_are_set_not_added() {
        let m = Metrics::new();
        m.set_link("to-b", "site-b", &sample(true, Some(25), 100, 200, 2));
        m.set_link("to-b", "site-b", &sample(true, Some(25), 150, 260, 1));
        let text = m.encode();
        for line in [
            r#"causeway_link_up{link="to-b",peer="site-b"} 1"#,
            r#"causeway_link_rtt_seconds{link="to-b",peer="site-b"} 0.025"#,
            r#"causeway_link_sent_bytes{link="to-b",peer="site-b"} 150"#,
            r#"causeway_link_received_bytes{link="to-b",peer="site-b"} 260"#,
            r#"causeway_link_lanes{link="to-b",peer="site-b"} 1"#,
            "# UNIT causeway_link_rtt_seconds seconds",
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }

        // Down: up is 0 and the unknown RTT disappears rather than going stale.
        m.set_link("to-b", "site-b", &sample(false, None, 0, 0, 0));
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
        m.set_link("to-b", "site-b", &sample(true, Some(5), 1, 2, 1));
        m.set_link("to-c", "site-c", &sample(true, Some(7), 3, 4, 1));
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
        m.flow("we\"b\\x\ny", "shop", Protocol::Tcp, Role::Origin).opened();
        let text = m.encode();
        assert!(text.contains(r#"service="we\"b\\x\ny""#), "{text}");
    }

    /// The exposition of a fixed pattern touching every label value, as the string-labelled
    /// code before typed label values wrote it (`exposition.golden.txt`, dumped from that code).
    /// Series within a family come out in hash-map order, which differs between processes, so
    /// the lines are compared as sorted sets, and the `#` lines (family order) in sequence.
    #[test]
    fn exposition_matches_the_string_labelled_original() {
        // The agent's registry: with the DNS responder's counters, as the original had them.
        let m = Metrics::with_collectors(vec![Box::new(Arc::new(crate::dns::Stats::default()))]);
        for (p, r) in [
            (Protocol::Tcp, Role::Origin),
            (Protocol::Tcp, Role::Relay),
            (Protocol::Tcp, Role::Terminus),
            (Protocol::Udp, Role::Origin),
            (Protocol::Udp, Role::Terminus),
        ] {
            let flow = m.flow("web", "shop", p, r);
            flow.opened();
            flow.closed();
            for &reason in FailReason::ALL {
                flow.failed(reason);
            }
        }
        m.flow("we\"b\\x\ny", "shop", Protocol::Tcp, Role::Origin).opened();
        let tcp = m.flow("web", "shop", Protocol::Tcp, Role::Origin);
        tcp.bytes(Direction::ToEndpoint, 1000);
        tcp.bytes(Direction::FromEndpoint, 7);
        m.add_bytes("dns", "kube-system", Protocol::Udp, Direction::ToEndpoint, 0);
        m.add_bytes("dns", "kube-system", Protocol::Udp, Direction::FromEndpoint, 512);
        for &direction in Direction::ALL {
            m.datagram("dns", "kube-system", direction);
        }
        for &reason in DropReason::ALL {
            m.datagram_dropped("unknown", "unknown", reason);
        }
        m.datagram_via_stream("dns", "kube-system");
        for &role in Role::ALL {
            for &reason in EvictReason::ALL {
                m.udp_flow_evicted(role, reason);
            }
        }
        for &outcome in HandshakeOutcome::ALL {
            m.handshake(outcome);
        }
        m.config_reload(true);
        m.config_reload(false);
        m.set_link("to-b", "site-b", &sample(true, Some(25), 100, 200, 1));
        m.set_services(3);
        m.set_endpoints(2);
        m.set_open_files_limit(1024);
        m.set_listener_errors(1);

        let text = m.encode();
        let golden = include_str!("exposition.golden.txt");
        let sorted = |t: &str| {
            let mut lines: Vec<String> = t.lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        let comments = |t: &str| {
            t.lines()
                .filter(|l| l.starts_with('#'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(sorted(&text), sorted(golden), "{text}");
        assert_eq!(comments(&text), comments(golden));
        assert_eq!(text.len(), golden.len());
    }

    #[test]
    fn label_values_spell_their_words() {
        let words = |all: &[&'static str]| all.join(",");
        assert_eq!(
            words(&Protocol::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()),
            "tcp,udp"
        );
        assert_eq!(
            words(&Role::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()),
            "origin,relay,terminus"
        );
        assert_eq!(
            words(&Direction::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()),
            "to_endpoint,from_endpoint"
        );
        assert_eq!(
            words(&ReloadResult::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()),
            "applied,rejected"
        );
    }

    #[test]
    fn a_flow_handle_creates_its_series_only_when_counted() {
        let m = Metrics::new();
        let flow = m.flow("web", "shop", Protocol::Tcp, Role::Origin);
        flow.failed(FailReason::Limit);
        let text = m.encode();
        assert!(!text.contains("causeway_flows_opened_total{"), "{text}");
        assert!(!text.contains("causeway_flows_closed_total{"), "{text}");
        assert!(!text.contains("causeway_bytes_total{"), "{text}");
        flow.bytes(Direction::FromEndpoint, 5);
        flow.bytes(Direction::FromEndpoint, 5);
        // Another handle on the same labels counts into the same series.
        m.flow("web", "shop", Protocol::Tcp, Role::Origin)
            .bytes(Direction::FromEndpoint, 1);
        let text = m.encode();
        assert!(
            has_line(
                &text,
                r#"causeway_bytes_total{service="web",namespace="shop",protocol="tcp",direction="from_endpoint"} 11"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"direction="to_endpoint""#), "{text}");
    }

    #[test]
    fn a_udp_flow_handle_counts_what_per_datagram_labels_counted() {
        // Through handles (as the UDP forwarder counts now): an origin and a terminus flow.
        let handles = Metrics::new();
        let origin = handles.flow("dns", "kube-system", Protocol::Udp, Role::Origin);
        origin.datagram(Direction::ToEndpoint, 40);
        origin.datagram(Direction::ToEndpoint, 2);
        origin.datagram(Direction::FromEndpoint, 512);
        let terminus = handles.flow("dns", "kube-system", Protocol::Udp, Role::Terminus);
        terminus.datagram(Direction::FromEndpoint, 100);
        // Per datagram, with label sets built each time (as it counted before).
        let labels = Metrics::new();
        for (direction, n) in [
            (Direction::ToEndpoint, 40),
            (Direction::ToEndpoint, 2),
            (Direction::FromEndpoint, 512),
            (Direction::FromEndpoint, 100),
        ] {
            labels.datagram("dns", "kube-system", direction);
            labels.add_bytes("dns", "kube-system", Protocol::Udp, direction, n);
        }
        let sorted = |t: String| {
            let mut lines: Vec<String> = t.lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        assert_eq!(sorted(handles.encode()), sorted(labels.encode()));
        assert!(has_line(
            &handles.encode(),
            r#"causeway_udp_datagrams_total{service="dns",namespace="kube-system",direction="from_endpoint"} 2"#
        ));
    }
}
