//! The `clusterset.local` DNS responder: answers the zone from the live catalog, forwards
//! everything else to the configured upstream resolvers.
//!
//! Structured like quinn-proto: the answering logic is pure and tested without sockets, the
//! async layer around it is thin.
//!
//! - [`wire`]: one request parsed from bytes, one response encoded within the client's size
//!   limit (TC bit, EDNS, FORMERR).
//! - [`zone`]: [`Authority::answer`], the records of docs/REFERENCE.md's "Names" table computed from a
//!   [`View`], or the decision to forward.
//! - [`handle`] composes them: bytes in, an [`Outcome`] out. The fuzz target drives exactly
//!   this function.
//! - `server`: UDP and TCP on every `dns.listen` address (`batch`: UDP datagrams taken and
//!   sent in batches); `upstream`: the forwarding client; [`client`]: the stub behind
//!   `causeway resolve`; `fuzzing`: the fuzz target's body and its deterministic stand-in.
//!
//! **Transport.** UDP and TCP are served directly, with hickory-proto for parsing and our own
//! encoder, rather than through hickory-server's `Server`. Its 0.26 `ResponseHandler` only
//! accepts a typed `MessageResponse`, so (1) a forwarded answer could not be relayed as the
//! upstream sent it, only decoded and re-encoded (EDNS options reordered, anything the decoder
//! does not model lost), and (2) truncation is out of our hands: its encoder sets TC when only
//! glue in the additional section overflows (RFC 2181 §9 says not to) and drops the OPT record
//! of a truncated answer (RFC 6891 §7 wants it kept). (3) Its UDP path spawns a task and
//! crosses a channel per query and logs two lines per query at INFO. Serving ourselves, a
//! UDP query is answered on the thread that received it (`server`), which is what lets zone
//! answers keep pace with unbound (docs/BENCHMARKS.md, `## DNS`). TCP runs on tokio.
//!
//! **Freshness.** Every query is answered from the newest [`View`] of the mesh's watch channel;
//! nothing is cached, so a withdrawn endpoint is gone from the next answer.
//!
//! **Not an open resolver.** Names outside the zone are forwarded only when `dns.upstream` is
//! set, and only for clients on loopback or in `dns.allow` (default: the networks of this
//! host's interfaces, read at start); everyone else gets REFUSED for them, whatever address
//! the responder listens on. Answers inside the zone go to every client.
//!
//! **Binding.** An address that cannot be bound (port 53 without privilege, or taken) does not
//! stop the agent, whose links and data plane work without DNS: it is logged as an error and
//! listed under `dns.errors` in `causeway status`.

mod batch;
pub mod client;
#[doc(hidden)]
pub mod fuzzing;
mod server;
mod upstream;
pub mod wire;
pub mod zone;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::catalog::View;
use crate::config::DnsConfig;
pub use wire::{Request, Response, Transport};
pub use zone::{Answer, Authority};

/// Errors at the edges of the DNS module.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns.zone `{zone}` is not a usable zone: {reason}")]
    Zone { zone: String, reason: String },
    #[error("binding {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        source: std::io::Error,
    },
    #[error("{server}: {message}")]
    Exchange { server: SocketAddr, message: String },
    #[error("no upstream resolver answered: {0}")]
    NoUpstream(String),
}

/// What the server does with one received message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Ask the upstream resolvers; if none answers, send `servfail`.
    Forward { servfail: Vec<u8> },
    /// Send nothing (not a query, or too short to answer).
    Drop,
}

/// The request path, bytes to bytes: parse, answer from `view`, encode within what the client
/// accepts over `transport`. Pure, total, and never panics on any input.
pub fn handle(packet: &[u8], transport: Transport, view: &View, authority: &Authority, asker: Asker) -> Outcome {
    let small = match transport {
        Transport::Udp => wire::MIN_UDP_PAYLOAD,
        Transport::Tcp => u16::MAX,
    };
    let mut request = match Request::parse(packet) {
        Ok(r) => r,
        Err(wire::Rejected::Drop(_)) => return Outcome::Drop,
        Err(wire::Rejected::Respond(r)) => return Outcome::Reply(r.encode(small)),
    };
    request.server = asker.server;
    request.local = asker.local;
    match authority.answer(&request, view) {
        Answer::Respond(r) => Outcome::Reply(r.encode(request.max_response(transport))),
        Answer::Forward if !asker.may_forward => {
            // Not a client we resolve other names for: no open resolver.
            let mut r = Response::to(&request);
            r.metadata.response_code = ResponseCode::Refused;
            Outcome::Reply(r.encode(request.max_response(transport)))
        }
        Answer::Forward => {
            let mut r = Response::to(&request);
            r.metadata.recursion_available = true;
            r.metadata.response_code = ResponseCode::ServFail;
            Outcome::Forward {
                servfail: r.encode(request.max_response(transport)),
            }
        }
    }
}

/// What answering a query needs from `dns:` besides the sockets; swapped as a whole when the
/// configuration changes ([`Responder::reconfigure`]).
pub(crate) struct Settings {
    /// The zone and how it is answered.
    pub authority: Authority,
    /// Where names outside the zone go (after dropping any that are ourselves).
    pub upstream: upstream::Upstreams,
    /// Who may have them forwarded.
    pub policy: ForwardPolicy,
    /// This network namespace's addresses (read at start): an asker from one of them, or
    /// from loopback, is local and gets this site's endpoints at their VIPs.
    pub own: Vec<std::net::IpAddr>,
    /// `dns.ttl`, to tell whether a reload changed it.
    ttl: u32,
    /// `dns.listen` as configured at start, to tell whether a reload changed it.
    listen: Vec<SocketAddr>,
}

impl Settings {
    /// The settings for `config`, with the responder bound to `bound`.
    fn new(config: &DnsConfig, site: &str, bound: &[SocketAddr]) -> Result<Settings, DnsError> {
        let own = ForwardPolicy::own_addresses();
        let upstream: Vec<SocketAddr> = config
            .upstream
            .iter()
            .copied()
            .filter(|u| {
                let ours = is_self(u, bound, &own);
                if ours {
                    warn!(upstream = %u, "dns.upstream {u} is this responder itself; ignoring it (it would loop)");
                }
                !ours
            })
            .collect();
        let authority = Authority::new(&config.zone, site, config.ttl, !upstream.is_empty())?
            .with_ns_addrs(bound.iter().map(|b| b.ip()));
        let policy = ForwardPolicy::new(config.allow.clone().unwrap_or_else(ForwardPolicy::own_networks));
        Ok(Settings {
            authority,
            upstream: upstream::Upstreams::new(upstream),
            policy,
            own,
            ttl: config.ttl,
            listen: config.listen.clone(),
        })
    }
}

/// Who asked, as far as answering depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asker {
    /// Whether names outside the zone may be forwarded for it ([`ForwardPolicy::admits`]).
    pub may_forward: bool,
    /// The responder's address the query was sent to, if known: what the zone's NS name
    /// resolves to for this asker.
    pub server: Option<std::net::IpAddr>,
    /// Whether the asker is in this agent's network namespace ([`is_local`]).
    pub local: bool,
}

/// Whether `client` is in this agent's network namespace: loopback, or one of `own`, the
/// namespace's interface addresses (docs/REFERENCE.md "Names": such askers get VIPs for this site's
/// endpoints too).
pub fn is_local(client: std::net::IpAddr, own: &[std::net::IpAddr]) -> bool {
    // An IPv4 client of a dual-stack socket arrives as ::ffff:a.b.c.d.
    let client = client.to_canonical();
    client.is_loopback() || own.contains(&client)
}

/// Whether upstream `u` is this responder itself: one of the addresses it is bound to, or,
/// for a wildcard binding on `u`'s port, any address of this host (`own`) or loopback.
/// Forwarding there would send every query back to ourselves until the forwarding bound.
fn is_self(u: &SocketAddr, bound: &[SocketAddr], own: &[std::net::IpAddr]) -> bool {
    bound.iter().any(|b| {
        b == u
            || (b.port() == u.port()
                && b.ip().is_unspecified()
                && (u.ip().is_loopback() || u.ip().is_unspecified() || own.contains(&u.ip())))
    })
}

/// Who may have names outside the zone forwarded: loopback always, plus `allow`.
#[derive(Debug, Clone, Default)]
pub struct ForwardPolicy {
    /// Client networks besides loopback (`dns.allow`, or this host's interface networks).
    allow: Vec<ipnet::IpNet>,
}

impl ForwardPolicy {
    /// A policy admitting loopback and `allow`.
    pub fn new(allow: Vec<ipnet::IpNet>) -> Self {
        ForwardPolicy { allow }
    }

    /// The networks of this host's (or pod's) interfaces, as `getifaddrs(3)` lists them: the
    /// default for `dns.allow`. Empty if they cannot be read.
    pub fn own_networks() -> Vec<ipnet::IpNet> {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return Vec::new();
        };
        let mut nets = Vec::new();
        for a in addrs {
            let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
                continue;
            };
            let net = match (
                addr.as_sockaddr_in(),
                mask.as_sockaddr_in(),
                addr.as_sockaddr_in6(),
                mask.as_sockaddr_in6(),
            ) {
                (Some(ip), Some(m), _, _) => {
                    let prefix = u32::from(m.ip()).leading_ones() as u8;
                    ipnet::IpNet::new(std::net::IpAddr::V4(ip.ip()), prefix).ok()
                }
                (_, _, Some(ip), Some(m)) => {
                    let prefix = u128::from(m.ip()).leading_ones() as u8;
                    ipnet::IpNet::new(std::net::IpAddr::V6(ip.ip()), prefix).ok()
                }
                _ => None,
            };
            if let Some(net) = net.map(|n| n.trunc())
                && !nets.contains(&net)
            {
                nets.push(net);
            }
        }
        nets
    }

    /// The addresses of this host's (or pod's) interfaces.
    pub fn own_addresses() -> Vec<std::net::IpAddr> {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return Vec::new();
        };
        addrs
            .filter_map(|a| a.address)
            .filter_map(|a| {
                a.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
            })
            .collect()
    }

    /// The networks admitted besides loopback.
    pub fn allowed(&self) -> &[ipnet::IpNet] {
        &self.allow
    }

    /// Whether `client`'s names outside the zone may be forwarded.
    pub fn admits(&self, client: std::net::IpAddr) -> bool {
        let client = client.to_canonical();
        client.is_loopback() || self.allow.iter().any(|n| n.contains(&client))
    }
}

/// Counters of what the responder did, for `causeway status` and, through its [`Collector`]
/// (which [`crate::metrics::Metrics`] registers), `/metrics`.
///
/// The answering threads only add to atomics; the Prometheus series are built from them at
/// scrape time, so counting costs no label lookup per query.
#[derive(Debug, Default)]
pub struct Stats {
    noerror: AtomicU64,
    nxdomain: AtomicU64,
    refused: AtomicU64,
    servfail: AtomicU64,
    formerr: AtomicU64,
    notimp: AtomicU64,
    other: AtomicU64,
    /// Answers that did not fit the client's UDP size (TC set).
    truncated: AtomicU64,
    /// Queries sent on to an upstream resolver (answered or not).
    forwarded: AtomicU64,
    /// Queries not answered: forwards beyond the in-flight bound, TCP connections beyond theirs.
    dropped: AtomicU64,
}

impl Stats {
    /// Counts a reply by its response code (read back from the encoded header).
    fn reply(&self, bytes: &[u8]) {
        let Some(&[flags, rcode]) = bytes.get(2..4) else {
            return;
        };
        if flags & 0x02 != 0 {
            self.truncated.fetch_add(1, Ordering::Relaxed);
        }
        let counter = match ResponseCode::from_low(rcode & 0x0f) {
            ResponseCode::NoError => &self.noerror,
            ResponseCode::NXDomain => &self.nxdomain,
            ResponseCode::Refused => &self.refused,
            ResponseCode::ServFail => &self.servfail,
            ResponseCode::FormErr => &self.formerr,
            ResponseCode::NotImp => &self.notimp,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The per-response-code counters, named as `status` and the `rcode` label name them.
    fn by_rcode(&self) -> [(&'static str, &AtomicU64); 7] {
        [
            ("noerror", &self.noerror),
            ("nxdomain", &self.nxdomain),
            ("refused", &self.refused),
            ("servfail", &self.servfail),
            ("formerr", &self.formerr),
            ("notimp", &self.notimp),
            ("other", &self.other),
        ]
    }

    /// The counters now, for `status`.
    fn counters(&self) -> DnsCounters {
        DnsCounters {
            queries: self
                .by_rcode()
                .into_iter()
                .map(|(rcode, c)| (rcode.to_owned(), load(c)))
                .collect(),
            truncated: load(&self.truncated),
            forwarded: load(&self.forwarded),
            dropped: load(&self.dropped),
        }
    }
}

/// `dns` in `causeway status -o json`: the responder's zone, addresses and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// The zone answered (`dns.zone`).
    pub zone: String,
    /// The addresses bound (UDP and TCP each; port 0 resolved).
    pub listen: Vec<SocketAddr>,
    /// The `dns.listen` addresses that could not be bound, each with why, in words.
    pub errors: Vec<String>,
    /// The upstream resolvers names outside the zone are forwarded to (`dns.upstream`).
    pub upstream: Vec<SocketAddr>,
    /// The counters, at the same level as the fields above.
    #[serde(flatten)]
    pub counters: DnsCounters,
}

/// The responder's counters since start, as `status` shows them (the same counters as the
/// `causeway_dns_*` series).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCounters {
    /// Answers composed, by response code: `noerror`, `nxdomain`, `refused`, `servfail`,
    /// `formerr`, `notimp`, `other`.
    pub queries: BTreeMap<String, u64>,
    /// Answers that did not fit the client's UDP size (TC set).
    pub truncated: u64,
    /// Queries sent on to an upstream resolver (answered or not).
    pub forwarded: u64,
    /// Queries not answered (over the in-flight bounds).
    pub dropped: u64,
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

const RESPONSES_HELP: &str = "DNS responses composed by the responder, by response code \
    (answers relayed from an upstream resolver count only in causeway_dns_forwarded_total).";

/// The counters as `causeway_dns_*` series (the registry adds the prefix, the text encoder the
/// `_total` suffix), read at scrape time.
impl Collector for Stats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut responses =
                encoder.encode_descriptor("dns_responses", RESPONSES_HELP, None, MetricType::Counter)?;
            for (rcode, c) in self.by_rcode() {
                ConstCounter::new(load(c)).encode(responses.encode_family(&[("rcode", rcode)])?)?;
            }
        }
        for (name, help, c) in [
            (
                "dns_truncated",
                "DNS responses truncated to the client's UDP size (TC set).",
                &self.truncated,
            ),
            (
                "dns_forwarded",
                "DNS queries sent on to an upstream resolver, answered or not.",
                &self.forwarded,
            ),
            (
                "dns_dropped",
                "DNS queries left unanswered: over the forwarding or TCP connection bounds, or unreadable.",
                &self.dropped,
            ),
        ] {
            let counter = ConstCounter::new(load(c));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

/// The running responder.
pub struct Responder {
    /// The zone served.
    zone: String,
    /// Addresses served, UDP and TCP each (port 0 in the configuration resolved).
    bound: Vec<SocketAddr>,
    /// Addresses that could not be bound, with the reason, for `status`.
    errors: Vec<String>,
    /// What the answering threads use: zone, upstreams, forwarding policy; replaced by
    /// [`Responder::reconfigure`].
    settings: watch::Sender<Arc<Settings>>,
    /// This site (for rebuilding the settings).
    site: String,
    stats: Arc<Stats>,
    /// Cancelled to stop every socket task and thread.
    cancel: CancellationToken,
    /// TCP and forwarding tasks.
    tasks: TaskTracker,
    /// The UDP threads, joined on shutdown.
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Responder {
    /// Binds every `config.listen` address (UDP and TCP) and starts answering from the views
    /// `views` delivers, counting into `stats` (the agent's [`crate::metrics::Metrics::dns`]).
    /// Addresses that cannot be bound are logged and reported, not fatal.
    pub async fn start(
        config: &DnsConfig,
        site: &str,
        views: watch::Receiver<Arc<View>>,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> Result<Responder, DnsError> {
        let mut bound = Vec::new();
        let mut errors = Vec::new();
        let mut sockets = Vec::new();
        for addr in &config.listen {
            match server::bind(*addr) {
                Ok((udp, tcp, local)) => {
                    bound.push(local);
                    sockets.push((udp, tcp, local));
                }
                Err(e) => {
                    let kind = match &e {
                        DnsError::Bind { source, .. } => Some(source.kind()),
                        _ => None,
                    };
                    let hint = match kind {
                        Some(std::io::ErrorKind::PermissionDenied) => {
                            "; ports below 1024 need root or CAP_NET_BIND_SERVICE, or choose another port in dns.listen"
                        }
                        Some(std::io::ErrorKind::AddrInUse) => {
                            "; another program (or another agent on this host) has it: choose another port in dns.listen"
                        }
                        _ => "",
                    };
                    error!("DNS responder not answering on {addr}: {e}{hint}");
                    errors.push(format!("{e}{hint}"));
                }
            }
        }
        let settings = Settings::new(config, site, &bound)?;
        let upstream = settings.upstream.servers().to_vec();
        if !upstream.is_empty() {
            info!(allow = ?settings.policy.allowed(), "names outside the zone are forwarded for loopback and these networks only (dns.allow)");
        }
        let (settings_tx, settings_rx) = watch::channel(Arc::new(settings));
        let shared = Arc::new(server::Shared {
            settings: settings_rx,
            views,
            stats: stats.clone(),
            forwards: Arc::new(tokio::sync::Semaphore::new(server::MAX_FORWARDS)),
        });
        let tasks = TaskTracker::new();
        let runtime = tokio::runtime::Handle::current();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
        let mut threads = Vec::new();
        for (udp, tcp, local) in sockets {
            let udp = Arc::new(udp);
            for i in 0..workers {
                let (udp, shared, cancel, runtime, tasks) = (
                    udp.clone(),
                    shared.clone(),
                    cancel.clone(),
                    runtime.clone(),
                    tasks.clone(),
                );
                let thread = std::thread::Builder::new()
                    .name(format!("dns-udp-{}-{i}", local.port()))
                    .spawn(move || server::serve_udp(udp, shared, cancel, runtime, tasks))
                    .map_err(|source| DnsError::Bind {
                        addr: local,
                        proto: "udp",
                        source,
                    })?;
                threads.push(thread);
            }
            tasks.spawn(
                server::serve_tcp(tcp, shared.clone(), cancel.clone(), tasks.clone())
                    .instrument(info_span!("dns", tcp = %local)),
            );
        }
        if !bound.is_empty() {
            info!(
                listen = ?bound,
                zone = %config.zone,
                upstream = ?upstream,
                "DNS responder answering {} (outside it: {})",
                config.zone,
                if upstream.is_empty() { "REFUSED" } else { "forwarded" }
            );
        }
        Ok(Responder {
            zone: config.zone.clone(),
            bound,
            errors,
            settings: settings_tx,
            site: site.to_string(),
            stats,
            cancel,
            tasks,
            threads: std::sync::Mutex::new(threads),
        })
    }

    /// Applies a changed `dns:` section while running: `upstream`, `allow` and `ttl` take
    /// effect for the next query. `listen` and `zone` need a restart (sockets and the zone's
    /// identity); their names are returned, and the running values stay.
    ///
    /// # Errors
    /// [`DnsError`] when the new settings cannot be built (then nothing changes).
    pub fn reconfigure(&self, config: &DnsConfig) -> Result<Vec<&'static str>, DnsError> {
        let mut restart = Vec::new();
        if config.zone != self.zone {
            restart.push("dns.zone");
        }
        let listen_now: Vec<SocketAddr> = config.listen.clone();
        let configured_before = self.settings.borrow().listen.clone();
        if listen_now != configured_before {
            restart.push("dns.listen");
        }
        let mut applied = config.clone();
        applied.zone = self.zone.clone();
        let mut settings = Settings::new(&applied, &self.site, &self.bound)?;
        settings.listen = configured_before;
        let settings = Arc::new(settings);
        let changed = {
            let now = self.settings.borrow();
            now.upstream.servers() != settings.upstream.servers()
                || now.policy.allowed() != settings.policy.allowed()
                || now.ttl != settings.ttl
        };
        if changed {
            info!(
                upstream = ?settings.upstream.servers(),
                allow = ?settings.policy.allowed(),
                ttl = settings.ttl,
                "DNS settings applied"
            );
            self.settings.send_replace(settings);
        }
        Ok(restart)
    }

    /// The addresses answering, UDP and TCP each.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.bound
    }

    /// Zone, addresses, bind errors and counters, for `causeway status`.
    pub fn status(&self) -> DnsStatus {
        DnsStatus {
            zone: self.zone.clone(),
            listen: self.bound.clone(),
            errors: self.errors.clone(),
            upstream: self.settings.borrow().upstream.servers().to_vec(),
            counters: self.stats.counters(),
        }
    }

    /// Stops answering and waits (at most 2 s) for the socket tasks and threads.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let join = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = join.await;
            self.tasks.wait().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response header (no sections) with `rcode`, TC set if `truncated`.
    fn header(rcode: u8, truncated: bool) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[2] = 0x80 | if truncated { 0x02 } else { 0 };
        h[3] = rcode;
        h
    }

    #[test]
    fn forwarding_only_for_loopback_and_allowed_networks() {
        let policy = ForwardPolicy::new(vec!["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()]);
        for ok in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "10.1.2.3",
            "::ffff:10.1.0.9",
            "fd00::5",
        ] {
            assert!(policy.admits(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.2.0.1", "192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"] {
            assert!(!policy.admits(no.parse().unwrap()), "{no}");
        }
        assert!(!ForwardPolicy::default().admits("10.1.2.3".parse().unwrap()));

        // The same out-of-zone query: forwarded for an admitted client, REFUSED otherwise;
        // in-zone names are answered for both.
        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::{Name, RecordType};
        let authority = Authority::new("clusterset.local", "paris", 5, true).unwrap();
        let view = View::default();
        let ask = |name: &str, may_forward| {
            let mut m = Message::query();
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            let asker = Asker {
                may_forward,
                server: None,
                local: false,
            };
            handle(&m.to_vec().unwrap(), Transport::Udp, &view, &authority, asker)
        };
        assert!(matches!(ask("example.com.", true), Outcome::Forward { .. }));
        let Outcome::Reply(refused) = ask("example.com.", false) else {
            panic!("not answered");
        };
        assert_eq!(
            Message::from_vec(&refused).unwrap().metadata.response_code,
            ResponseCode::Refused
        );
        for may_forward in [true, false] {
            let Outcome::Reply(r) = ask("dns-version.clusterset.local.", may_forward) else {
                panic!("in-zone not answered");
            };
            assert_eq!(
                Message::from_vec(&r).unwrap().metadata.response_code,
                ResponseCode::NoError
            );
        }
    }

    #[test]
    fn an_upstream_that_is_this_responder_is_recognised() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own: Vec<std::net::IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let wildcard = [a("0.0.0.0:5353")];
        assert!(is_self(&a("127.0.0.1:5353"), &wildcard, &own));
        assert!(is_self(&a("10.0.0.5:5353"), &wildcard, &own));
        assert!(!is_self(&a("10.0.0.5:53"), &wildcard, &own));
        assert!(!is_self(&a("10.0.0.6:5353"), &wildcard, &own));
        let specific = [a("10.0.0.5:5353")];
        assert!(is_self(&a("10.0.0.5:5353"), &specific, &own));
        assert!(!is_self(&a("127.0.0.1:5353"), &specific, &own));
        assert!(is_self(&a("[fd00::5]:5353"), &[a("[::]:5353")], &own));
    }

    #[test]
    fn own_networks_include_loopback() {
        let nets = ForwardPolicy::own_networks();
        assert!(
            nets.iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap())),
            "{nets:?}"
        );
    }

    #[test]
    fn counters_are_scraped_from_the_agents_registry() {
        let stats = Arc::new(Stats::default());
        let metrics = crate::metrics::Metrics::with_collectors(vec![Box::new(stats.clone())]);
        let text = metrics.encode();
        // Present, at zero, before the first query.
        for line in [
            r#"causeway_dns_responses_total{rcode="noerror"} 0"#,
            "causeway_dns_dropped_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }

        for _ in 0..3 {
            stats.reply(&header(0, false));
        }
        stats.reply(&header(0, true));
        stats.reply(&header(3, false));
        stats.reply(&header(5, false));
        stats.reply(&header(2, false));
        stats.reply(&header(1, false));
        stats.reply(&header(4, false));
        stats.reply(&header(9, false));
        stats.reply(&[0x12]); // too short to count
        stats.forwarded.fetch_add(2, Ordering::Relaxed);
        stats.dropped.fetch_add(1, Ordering::Relaxed);

        let text = metrics.encode();
        for line in [
            "# TYPE causeway_dns_responses counter",
            r#"causeway_dns_responses_total{rcode="noerror"} 4"#,
            r#"causeway_dns_responses_total{rcode="nxdomain"} 1"#,
            r#"causeway_dns_responses_total{rcode="refused"} 1"#,
            r#"causeway_dns_responses_total{rcode="servfail"} 1"#,
            r#"causeway_dns_responses_total{rcode="formerr"} 1"#,
            r#"causeway_dns_responses_total{rcode="notimp"} 1"#,
            r#"causeway_dns_responses_total{rcode="other"} 1"#,
            "# TYPE causeway_dns_truncated counter",
            "causeway_dns_truncated_total 1",
            "causeway_dns_forwarded_total 2",
            "causeway_dns_dropped_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");

        // `causeway status` reads the same counters.
        let counters = stats.counters();
        assert_eq!(counters.queries.get("noerror"), Some(&4), "{counters:?}");
        assert_eq!(counters.queries.get("other"), Some(&1), "{counters:?}");
        assert_eq!(counters.queries.len(), 7, "{counters:?}");
        assert_eq!(
            (counters.truncated, counters.forwarded, counters.dropped),
            (1, 2, 1),
            "{counters:?}"
        );
        let json = serde_json::to_value(&counters).unwrap();
        assert_eq!(json["queries"]["noerror"], 4, "{json}");
        assert_eq!(json["truncated"], 1, "{json}");
    }
}
