//! UDP flows: datagrams carried as QUIC datagrams, tagged with a flow id.
//!
//! A flow is one client (address, port) talking to one VIP port. The origin agent gives it a
//! random 64-bit id and sends each datagram as a [`Datagram::Forward`] (id, destination,
//! payload) to the next hop. Relays pass it on and remember which link it came from; the
//! terminating agent sends the payload to its endpoint from a socket of the flow's own, and
//! every answer from the endpoint travels back as a [`Datagram::Reply`] along the same hops
//! to the origin, which hands it to the client from the VIP socket, so replies reach the
//! right client. Flows idle for `limits.udp_idle` are forgotten everywhere.
//!
//! A datagram larger than the link's current QUIC datagram limit (about 1.2 KB on a fresh
//! path) is **not dropped**: it is carried on a short-lived unidirectional stream instead,
//! counted in `causeway_udp_datagrams_via_stream_total` and logged once per flow. So large
//! DNS answers, for instance, still arrive whole.
//!
//! Every flow this agent holds (as origin, relay or terminus) is admitted by one
//! [`FlowBook`] of `limits.max_flows` slots: a local client may hold at most its share of them
//! ([`flowbook::share`]), and a full table evicts the least recently used flow of whoever holds
//! the most, so one client sending from thousands of source ports cannot keep any other from
//! its flows. Evictions are counted in `causeway_udp_flows_evicted_total` and logged at most
//! once per holder per [`flowbook::LOG_EVERY`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::flowbook::{self, Eviction, FlowBook};
use super::header::{Datagram, FlowHeader, MAX_TTL};
use super::{Forwarder, Hop, ListenerKey, lock};
use crate::intercept::{self, RawUdp};
use crate::metrics::{self, Direction, DropReason, Role};
use crate::names::Protocol;
use crate::role::Role as AgentRole;

/// Largest datagram accepted from a stream (a UDP payload is at most 65,507 bytes).
pub const MAX_STREAMED: usize = 70_000;

/// Binds a VIP's UDP socket.
pub fn bind(addr: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(Arc::new(UdpSocket::from_std(s.into())?))
}

/// Largest UDP payload, and so the size of the receive buffer.
const RECV_BUF: usize = 65_536;
/// Datagrams taken from one socket per wake-up before other tasks get a turn.
const RECV_BATCH: usize = 64;

thread_local! {
    /// One receive buffer per runtime thread, shared by every UDP socket the thread reads.
    /// A VIP socket or an endpoint flow waiting for datagrams then holds no 64 KiB buffer of
    /// its own: an agent can have tens of thousands of them (each exported port of each
    /// endpoint has a VIP socket, each client of a UDP service a flow).
    static SCRATCH: std::cell::Cell<Option<Box<[u8]>>> = const { std::cell::Cell::new(None) };
}

/// Waits until `socket` is readable, then hands each waiting datagram (at most
/// [`RECV_BATCH`]) and its sender to `each`, from the thread's shared buffer. Receive errors
/// (on a connected socket, an ICMP "port unreachable" from the endpoint) are logged and
/// skipped. Returns `Break` when `each` does, or when `stop` fires.
async fn recv_batch(
    socket: &UdpSocket,
    stop: &CancellationToken,
    mut each: impl FnMut(&[u8], SocketAddr) -> ControlFlow<()>,
) -> ControlFlow<()> {
    tokio::select! {
        r = socket.readable() => {
            if let Err(e) = r {
                debug!(error = %e, "udp socket not readable");
                return ControlFlow::Break(());
            }
        }
        _ = stop.cancelled() => return ControlFlow::Break(()),
    }
    // Taken, not borrowed: should `each` ever receive on another socket, it allocates a
    // buffer of its own instead of finding this one borrowed.
    let mut buf = SCRATCH.take().unwrap_or_else(|| vec![0u8; RECV_BUF].into_boxed_slice());
    let mut flow = ControlFlow::Continue(());
    for _ in 0..RECV_BATCH {
        match socket.try_recv_from(&mut buf) {
            Ok((n, from)) => {
                flow = each(&buf[..n], from);
                if flow.is_break() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => debug!(error = %e, "udp receive failed"),
        }
    }
    SCRATCH.set(Some(buf));
    flow
}

/// Where a flow's replies go from here.
#[derive(Clone)]
enum ReplyPath {
    /// Back over this link (we are a relay or the terminus of a remote flow).
    Link(quinn::Connection),
    /// Straight to the client (the endpoint is in our own site).
    Local { socket: VipSocket, client: SocketAddr },
}

/// How datagrams reach a local client from the VIP and port it sent to.
#[derive(Clone)]
pub(super) enum VipSocket {
    /// `listen` mode: the socket bound there.
    Bound(Arc<UdpSocket>),
    /// `intercept` mode: the raw socket, writing this source address (a local program may
    /// hold the port on a wildcard address, so nothing of ours can be bound there).
    Raw(Arc<RawUdp>, SocketAddrV4),
}

impl VipSocket {
    /// Sends `payload` to `to` now, without waiting.
    fn send_to(&self, payload: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        match (self, to) {
            (VipSocket::Bound(socket), _) => send_to_now(socket, payload, to),
            (VipSocket::Raw(raw, from), SocketAddr::V4(to)) => raw.send(*from, to, payload),
            (VipSocket::Raw(..), SocketAddr::V6(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "intercept mode answers IPv4 clients only",
            )),
        }
    }
}

/// A flow whose client is here.
struct OriginFlow {
    socket: VipSocket,
    /// The listener it arrived on, so an evicted flow can be unhooked from `by_client`.
    key: ListenerKey,
    client: SocketAddr,
    service: String,
    namespace: String,
    /// Whether "too large for a datagram" was logged already.
    warned: bool,
}

/// A flow passing through.
struct RelayFlow {
    back: quinn::Connection,
}

/// A flow delivered to one of our endpoints.
struct TerminusFlow {
    /// Connected to the endpoint.
    socket: Arc<UdpSocket>,
    reply: ReplyPath,
    service: String,
    namespace: String,
    /// Stops the task reading the endpoint's answers.
    stop: CancellationToken,
    warned: bool,
}

// Which of an agent's tables a flow is in is its metrics role ([`Role`]): a flow id can be in
// two (origin and terminus, when a local client reaches a local endpoint).

/// Who holds a flow, for the per-client share and the eviction order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    /// A client of ours, by source address (not port: one client, many ports). Bound to its
    /// share.
    Client(IpAddr),
    /// The link the flow came in on (its connection's stable id): many clients of another
    /// site, bound only by the whole table.
    Link(usize),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Client(ip) => write!(f, "client {ip}"),
            Holder::Link(id) => write!(f, "link connection {id}"),
        }
    }
}

/// A flow in the book: its table and id.
type FlowKey = (Role, u64);
/// A holder in the book: per table, so a client's origin and local terminus flows each get
/// a share.
type HolderKey = (Role, Holder);

/// The UDP flow tables of one agent.
pub struct Tables {
    inner: std::sync::Mutex<State>,
}

impl Tables {
    /// Empty tables for at most `max_flows` UDP flows (`limits.max_flows`).
    pub fn new(max_flows: usize) -> Tables {
        Tables {
            inner: std::sync::Mutex::new(State {
                origin: HashMap::new(),
                by_client: HashMap::new(),
                relay: HashMap::new(),
                terminus: HashMap::new(),
                book: FlowBook::new(max_flows),
            }),
        }
    }
}

struct State {
    origin: HashMap<u64, OriginFlow>,
    by_client: HashMap<(ListenerKey, SocketAddr), u64>,
    relay: HashMap<u64, RelayFlow>,
    terminus: HashMap<u64, TerminusFlow>,
    /// Every flow above, by holder and last use: admission, eviction and idle expiry.
    book: FlowBook<FlowKey, HolderKey>,
}

impl State {
    /// Drops a flow the book gave up (evicted or expired) from its table; returns its
    /// service and namespace when it was counted as opened (origin and terminus flows).
    fn forget(&mut self, (role, id): FlowKey) -> Option<(String, String)> {
        match role {
            Role::Origin => {
                let f = self.origin.remove(&id)?;
                if self.by_client.get(&(f.key, f.client)) == Some(&id) {
                    self.by_client.remove(&(f.key, f.client));
                }
                Some((f.service, f.namespace))
            }
            Role::Relay => {
                self.relay.remove(&id);
                None
            }
            Role::Terminus => {
                let f = self.terminus.remove(&id)?;
                f.stop.cancel();
                Some((f.service, f.namespace))
            }
        }
    }
}

impl Forwarder {
    pub(super) async fn udp_listener(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        key: ListenerKey,
        stop: CancellationToken,
    ) {
        let vip_socket = VipSocket::Bound(socket.clone());
        while recv_batch(&socket, &stop, |payload, client| {
            self.udp_from_client(&vip_socket, key, client, payload);
            ControlFlow::Continue(())
        })
        .await
        .is_continue()
        {}
    }

    /// `vips.mode: intercept`: datagrams the nftables rule hands to the intercept port,
    /// each taken as sent to its original destination.
    pub(super) async fn intercepted_udp(self: Arc<Self>, socket: Arc<UdpSocket>, raw: Arc<RawUdp>) {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            tokio::select! {
                r = socket.readable() => if let Err(e) = r {
                    warn!(error = %e, "intercept UDP socket failed");
                    return;
                },
                _ = self.shutdown.cancelled() => return,
            }
            for _ in 0..RECV_BATCH {
                match intercept::recv_original(&socket, &mut buf) {
                    Ok((n, client, Some(SocketAddr::V4(dst)))) if self.in_range(&SocketAddr::V4(dst)) => {
                        let key = (IpAddr::V4(*dst.ip()), dst.port(), Protocol::Udp);
                        let from = VipSocket::Raw(raw.clone(), dst);
                        self.udp_from_client(&from, key, client, &buf[..n]);
                    }
                    Ok((_, client, dst)) => debug!(%client, ?dst, "datagram on the intercept port not sent to a VIP"),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => debug!(error = %e, "intercept UDP receive failed"),
                }
            }
        }
    }

    /// A datagram from a client to a VIP here.
    fn udp_from_client(self: &Arc<Self>, socket: &VipSocket, key: ListenerKey, client: SocketAddr, payload: &[u8]) {
        let (vip, port, _) = key;
        let view = self.mesh.view();
        let Some(target) = view
            .vips
            .get(&vip)
            .filter(|t| t.ready && t.exports(port, Protocol::Udp))
        else {
            return;
        };
        let (flow, warned) = {
            let mut st = lock(&self.udp.inner);
            let now = Instant::now();
            match st.by_client.get(&(key, client)).copied() {
                Some(id) => {
                    st.book.touch(&(Role::Origin, id), now);
                    (id, st.origin.get(&id).is_some_and(|f| f.warned))
                }
                None => {
                    let id = rand::random::<u64>();
                    let holder = (Role::Origin, Holder::Client(client.ip()));
                    if let Some(ev) = st.book.admit((Role::Origin, id), holder, true, now) {
                        self.evicted(&mut st, ev);
                    }
                    st.by_client.insert((key, client), id);
                    st.origin.insert(
                        id,
                        OriginFlow {
                            socket: socket.clone(),
                            key,
                            client,
                            service: target.service.clone(),
                            namespace: target.namespace.clone(),
                            warned: false,
                        },
                    );
                    debug!(flow = id, %client, %vip, port, "udp flow opened");
                    self.metrics
                        .flow(&target.service, &target.namespace, metrics::Protocol::Udp, Role::Origin)
                        .opened();
                    (id, false)
                }
            }
        };
        self.metrics.udp_datagram(
            &target.service,
            &target.namespace,
            Direction::ToEndpoint,
            payload.len() as u64,
        );
        let header = FlowHeader {
            ttl: MAX_TTL,
            site: target.site.clone(),
            vip,
            port,
            // On a sidecar: the client's own VIP and its source port, which the far sidecar
            // sends from (peer protocols check both).
            src: self.src_vip(target).map(|ip| SocketAddr::new(ip, client.port())),
        };
        let conn = match self.hop(&vip, target) {
            Hop::Local => {
                self.deliver(
                    flow,
                    &header,
                    payload,
                    ReplyPath::Local {
                        socket: socket.clone(),
                        client,
                    },
                );
                return;
            }
            Hop::Conn(conn) => conn,
            Hop::Unreachable => {
                self.metrics
                    .datagram_dropped(&target.service, &target.namespace, DropReason::NoRoute);
                return;
            }
        };
        let dgram = Datagram::Forward { flow, header, payload }.encode();
        if self.send(&conn, dgram, &target.service, &target.namespace, warned) {
            if let Some(f) = lock(&self.udp.inner).origin.get_mut(&flow) {
                f.warned = true;
            }
        }
    }

    /// Sends a datagram on a link, or on a stream when it is too large; returns whether it
    /// went by stream.
    fn send(&self, conn: &quinn::Connection, dgram: Vec<u8>, svc: &str, ns: &str, warned: bool) -> bool {
        let fits = conn.max_datagram_size().is_some_and(|max| dgram.len() <= max);
        if fits {
            if let Err(e) = conn.send_datagram(Bytes::from(dgram)) {
                debug!(error = %e, "datagram not sent");
                self.metrics.datagram_dropped(svc, ns, DropReason::Link);
            }
            return false;
        }
        if !warned {
            info!(
                size = dgram.len(),
                limit = ?conn.max_datagram_size(),
                "datagram larger than the link's datagram limit; carrying it on a stream (logged once per flow)"
            );
        }
        self.metrics.datagram_via_stream(svc, ns);
        let conn = conn.clone();
        self.tasks.spawn(async move {
            if let Ok(mut s) = conn.open_uni().await {
                let _ = s.write_all(&dgram).await;
                let _ = s.finish();
            }
        });
        true
    }

    /// A datagram arrived on a link (as a datagram or on a uni stream).
    pub fn on_link_datagram(self: &Arc<Self>, from: &quinn::Connection, data: &[u8]) {
        let dgram = match Datagram::decode(data) {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, "malformed datagram dropped");
                self.metrics
                    .datagram_dropped("unknown", "unknown", DropReason::Malformed);
                return;
            }
        };
        match dgram {
            Datagram::Forward { flow, header, payload } => {
                debug!(flow, len = payload.len(), "forward datagram from link");
                if header.site == self.site {
                    self.deliver(flow, &header, payload, ReplyPath::Link(from.clone()));
                    return;
                }
                if header.ttl == 0 {
                    return;
                }
                let Some(next) = self.mesh.next_hop(&header.site) else {
                    self.metrics.datagram_dropped("unknown", "unknown", DropReason::NoRoute);
                    return;
                };
                self.relay_flow(&mut lock(&self.udp.inner), flow, from);
                let header = FlowHeader {
                    ttl: header.ttl - 1,
                    ..header
                };
                let out = Datagram::Forward { flow, header, payload }.encode();
                self.send(&next, out, "relay", "relay", true);
            }
            Datagram::Reply { flow, payload } => {
                let mut st = lock(&self.udp.inner);
                let now = Instant::now();
                if let Some(f) = st.origin.get(&flow) {
                    let (socket, client) = (f.socket.clone(), f.client);
                    self.metrics
                        .udp_datagram(&f.service, &f.namespace, Direction::FromEndpoint, payload.len() as u64);
                    st.book.touch(&(Role::Origin, flow), now);
                    drop(st);
                    let _ = socket.send_to(payload, client);
                } else if let Some(f) = st.relay.get(&flow) {
                    let back = f.back.clone();
                    st.book.touch(&(Role::Relay, flow), now);
                    drop(st);
                    self.send(&back, data.to_vec(), "relay", "relay", true);
                } else {
                    self.metrics.datagram_dropped("unknown", "unknown", DropReason::NoFlow);
                }
            }
        }
    }

    /// Delivers a datagram to one of our endpoints, opening the flow's socket on first use.
    fn deliver(self: &Arc<Self>, flow: u64, header: &FlowHeader, payload: &[u8], reply: ReplyPath) {
        let mut st = lock(&self.udp.inner);
        if let Some(f) = st.terminus.get_mut(&flow) {
            f.reply = reply;
            let socket = f.socket.clone();
            st.book.touch(&(Role::Terminus, flow), Instant::now());
            drop(st);
            let sent = send_now(&socket, payload);
            debug!(flow, ?sent, "udp datagram to endpoint (existing flow)");
            return;
        }
        let view = self.mesh.view();
        let Some(target) = view.vips.get(&header.vip).filter(|t| {
            t.site == self.site && t.ready && t.exports(header.port, Protocol::Udp) && self.delivers(&header.vip)
        }) else {
            debug!(vip = %header.vip, port = header.port, "datagram for a VIP we do not export");
            return;
        };
        if let Some(member) = self
            .mesh
            .member_for(&header.vip)
            .filter(|_| self.mesh.role() == AgentRole::Gateway)
        {
            // A sidecar delivers this endpoint: pass the datagram on, and remember the way back.
            if let ReplyPath::Link(back) = &reply {
                self.relay_flow(&mut st, flow, back);
            }
            drop(st);
            if header.ttl == 0 {
                return;
            }
            let next = FlowHeader {
                ttl: header.ttl - 1,
                ..header.clone()
            };
            let out = Datagram::Forward {
                flow,
                header: next,
                payload,
            }
            .encode();
            self.send(&member, out, &target.service, &target.namespace, true);
            return;
        }
        let from = header.src.filter(|_| self.mesh.role() == AgentRole::Sidecar);
        if let Some(listener) = from.and_then(|src| lock(&self.udp_sockets).get(&src).cloned()) {
            // We listen on the client's VIP and port already: send from that socket, and the
            // member's answers, sent back to that address, reach it as a flow of their own.
            drop(st);
            let endpoint = SocketAddr::new(target.ip, header.port);
            let _ = send_to_now(&listener, payload, endpoint);
            return;
        }
        if let (Some(SocketAddr::V4(src)), SocketAddr::V4(endpoint), Some((_, raw))) = (
            from,
            SocketAddr::new(target.ip, header.port),
            self.intercept.as_ref().and_then(|i| i.udp.as_ref()),
        ) {
            // Intercept mode: the member may hold this port on a wildcard address, so send
            // from the client's VIP and port by the raw socket; the member's answers to that
            // address are intercepted and travel back as a flow of their own.
            drop(st);
            if let Err(e) = raw.send(src, endpoint, payload) {
                debug!(%src, %endpoint, error = %e, "cannot send from the client's VIP");
            }
            return;
        }
        let endpoint = SocketAddr::new(target.ip, header.port);
        let socket = match connected_socket(from, endpoint) {
            Ok(s) => s,
            Err(e) => {
                warn!(%endpoint, error = %e, "cannot open a socket to the endpoint");
                self.metrics
                    .flow(
                        &target.service,
                        &target.namespace,
                        metrics::Protocol::Udp,
                        Role::Terminus,
                    )
                    .failed(metrics::FailReason::Unreachable);
                return;
            }
        };
        let stop = self.shutdown.child_token();
        let holder = match &reply {
            ReplyPath::Link(conn) => (Role::Terminus, Holder::Link(conn.stable_id())),
            ReplyPath::Local { client, .. } => (Role::Terminus, Holder::Client(client.ip())),
        };
        let limited = matches!(holder.1, Holder::Client(_));
        if let Some(ev) = st.book.admit((Role::Terminus, flow), holder, limited, Instant::now()) {
            self.evicted(&mut st, ev);
        }
        st.terminus.insert(
            flow,
            TerminusFlow {
                socket: socket.clone(),
                reply,
                service: target.service.clone(),
                namespace: target.namespace.clone(),
                stop: stop.clone(),
                warned: false,
            },
        );
        drop(st);
        self.metrics
            .flow(
                &target.service,
                &target.namespace,
                metrics::Protocol::Udp,
                Role::Terminus,
            )
            .opened();
        let sent = send_now(&socket, payload);
        debug!(flow, %endpoint, ?sent, "udp flow delivered to endpoint");
        self.tasks.spawn(self.clone().endpoint_replies(flow, socket, stop));
    }

    /// Carries an endpoint's answers back along the flow's reply path.
    async fn endpoint_replies(self: Arc<Self>, flow: u64, socket: Arc<UdpSocket>, stop: CancellationToken) {
        while recv_batch(&socket, &stop, |payload, _| self.endpoint_reply(flow, payload))
            .await
            .is_continue()
        {}
    }

    /// One answer from an endpoint, sent back along its flow's reply path; `Break` when the
    /// flow is gone.
    fn endpoint_reply(&self, flow: u64, payload: &[u8]) -> ControlFlow<()> {
        let n = payload.len();
        let (reply, svc, ns, warned) = {
            let mut st = lock(&self.udp.inner);
            let Some(f) = st.terminus.get(&flow) else {
                return ControlFlow::Break(());
            };
            let out = (f.reply.clone(), f.service.clone(), f.namespace.clone(), f.warned);
            st.book.touch(&(Role::Terminus, flow), Instant::now());
            out
        };
        debug!(flow, bytes = n, "endpoint answered");
        match reply {
            ReplyPath::Local {
                socket: vip_socket,
                client,
            } => {
                self.metrics.udp_datagram(&svc, &ns, Direction::FromEndpoint, n as u64);
                let _ = vip_socket.send_to(payload, client);
            }
            ReplyPath::Link(conn) => {
                let out = Datagram::Reply { flow, payload }.encode();
                if self.send(&conn, out, &svc, &ns, warned) {
                    if let Some(f) = lock(&self.udp.inner).terminus.get_mut(&flow) {
                        f.warned = true;
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// Forgets idle flows, periodically.
    pub(super) async fn sweep_udp(self: Arc<Self>) {
        let idle = self.opts.udp_idle;
        let period = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.shutdown.cancelled() => return,
            }
            let mut st = lock(&self.udp.inner);
            for (key, _) in st.book.expire(Instant::now(), idle) {
                if let Some((svc, ns)) = st.forget(key) {
                    self.metrics.flow(&svc, &ns, metrics::Protocol::Udp, key.0).closed();
                }
            }
        }
    }

    /// Records that a datagram of `flow` came over `from`, where its replies go back:
    /// admits the relay flow (held by that link) or refreshes it.
    fn relay_flow(&self, st: &mut State, flow: u64, from: &quinn::Connection) {
        let now = Instant::now();
        if let Some(f) = st.relay.get_mut(&flow) {
            f.back = from.clone();
            st.book.touch(&(Role::Relay, flow), now);
            return;
        }
        let holder = (Role::Relay, Holder::Link(from.stable_id()));
        if let Some(ev) = st.book.admit((Role::Relay, flow), holder, false, now) {
            self.evicted(st, ev);
        }
        st.relay.insert(flow, RelayFlow { back: from.clone() });
    }

    /// Drops a flow the book evicted to admit another; counts it, and logs it at most once
    /// per holder per [`flowbook::LOG_EVERY`].
    fn evicted(&self, st: &mut State, ev: Eviction<FlowKey, HolderKey>) {
        let (role, id) = ev.flow;
        if let Some((svc, ns)) = st.forget(ev.flow) {
            self.metrics.flow(&svc, &ns, metrics::Protocol::Udp, role).closed();
        }
        self.metrics.udp_flow_evicted(role, ev.reason.label());
        if ev.log {
            let (_, holder) = ev.holder;
            warn!(
                flow = id,
                role = role.as_str(),
                %holder,
                reason = ev.reason.as_str(),
                still_held = ev.held,
                share = flowbook::share(self.opts.max_flows),
                max_flows = self.opts.max_flows,
                "udp flow evicted to admit a newer one (logged once per {}s per holder; see causeway_udp_flows_evicted_total)",
                flowbook::LOG_EVERY.as_secs()
            );
        }
    }
}

/// Sends on a connected socket now, with one non-blocking system call. (tokio's `try_send`
/// refuses until it has seen the socket writable, which a fresh socket never has been.)
fn send_now(socket: &UdpSocket, payload: &[u8]) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send(payload)
}

/// Sends to `to` now, with one non-blocking system call.
fn send_to_now(socket: &UdpSocket, payload: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send_to(payload, &to.into())
}

/// A UDP socket connected to `endpoint`: bound to `from` (a client's VIP and port) when
/// given and bindable, else to an ephemeral port.
fn connected_socket(from: Option<SocketAddr>, endpoint: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let any: SocketAddr = if endpoint.is_ipv4() {
        "0.0.0.0:0".parse()
    } else {
        "[::]:0".parse()
    }
    .map_err(|_| std::io::Error::other("address"))?;
    let s = match from.map(std::net::UdpSocket::bind) {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            debug!(error = %e, "cannot send from the client's VIP; using an ephemeral port");
            std::net::UdpSocket::bind(any)?
        }
        None => std::net::UdpSocket::bind(any)?,
    };
    s.connect(endpoint)?;
    s.set_nonblocking(true)?;
    Ok(Arc::new(UdpSocket::from_std(s)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (Arc<UdpSocket>, UdpSocket) {
        let rx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tx.connect(rx.local_addr().unwrap()).await.unwrap();
        (rx, tx)
    }

    #[tokio::test]
    async fn recv_batch_hands_over_every_waiting_datagram_with_its_sender() {
        let (rx, tx) = pair().await;
        let stop = CancellationToken::new();
        for msg in [&b"one"[..], b"two", &[7u8; 60_000]] {
            tx.send(msg).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 3 {
            let flow = recv_batch(&rx, &stop, |d, from| {
                assert_eq!(from, tx.local_addr().unwrap());
                got.push(d.to_vec());
                ControlFlow::Continue(())
            })
            .await;
            assert!(flow.is_continue());
        }
        assert_eq!(got[0], b"one");
        assert_eq!(got[1], b"two");
        assert_eq!(got[2], vec![7u8; 60_000]);
    }

    #[tokio::test]
    async fn recv_batch_stops_where_asked_and_leaves_the_rest_queued() {
        let (rx, tx) = pair().await;
        let stop = CancellationToken::new();
        tx.send(b"a").await.unwrap();
        tx.send(b"b").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut seen = 0;
        let flow = recv_batch(&rx, &stop, |_, _| {
            seen += 1;
            ControlFlow::Break(())
        })
        .await;
        assert!(flow.is_break());
        assert_eq!(seen, 1);
        // The second datagram is still there for the next call.
        let mut rest = Vec::new();
        let _ = recv_batch(&rx, &stop, |d, _| {
            rest.push(d.to_vec());
            ControlFlow::Continue(())
        })
        .await;
        assert_eq!(rest, vec![b"b".to_vec()]);
        // Cancelled: returns at once without waiting for a datagram.
        stop.cancel();
        assert!(
            recv_batch(&rx, &stop, |_, _| ControlFlow::Continue(()))
                .await
                .is_break()
        );
    }
}
