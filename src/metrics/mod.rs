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
//! atomics of [`crate::dns::Stats`], which a collector registered here reads at scrape time.

mod http;

pub use http::{OPENMETRICS_CONTENT_TYPE, ReadyFn, serve};

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tracing::warn;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
