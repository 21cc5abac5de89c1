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
//! The flow tables themselves, and every decision about them, are [`UdpFlows`]'s, a state
//! machine without sockets or clock (`udpflows.rs`); this module is its shell: it owns the
//! sockets, reads them, looks up in the view what the tables cannot know (a VIP's service,
//! the next hop, how an endpoint is delivered), feeds each datagram in as an event and
//! carries out the actions that come back.
//!
//! Every flow this agent holds (as origin, relay or terminus) is admitted by one
//! [`flowbook::FlowBook`] of `limits.max_flows` slots: a local client may hold at most its share of them
//! ([`flowbook::share`]), and a full table evicts the least recently used flow of whoever holds
//! the most, so one client sending from thousands of source ports cannot keep any other from
//! its flows. Evictions are counted in `causeway_udp_flows_evicted_total` and logged at most
//! once per holder per [`flowbook::LOG_EVERY`].

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::flowbook;
use super::header::{Datagram, FlowHeader, MAX_TTL};
use super::udpflows::{Action, Event, FlowKey, Handles, Holder, Next, Reply, UdpFlows};
use super::{Forwarder, Hop, ListenerKey, lock};
use crate::intercept::{self, RawUdp};
use crate::link::lanes::{LaneChoice, flow_key};
use crate::metrics::{self, DropReason, Metrics, Role};
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

/// A terminus flow's own socket, connected to its endpoint, and what stops the task reading
/// the endpoint's answers from it.
#[derive(Clone)]
pub(super) struct EndpointSocket {
    /// Connected to the endpoint.
    socket: Arc<UdpSocket>,
    /// Cancelled when the flow is forgotten, which ends the reading task and so the socket.
    stop: CancellationToken,
}

/// The agent's handles in the flow tables: quinn connections, and tokio sockets.
pub(super) struct Quic;

/// A link connection as the UDP flow tables hold it: the lane's connection, which a flow's
/// datagrams go on, and the id of its link (the link's first connection,
/// [`Mesh::link_of`](crate::mesh::Mesh::link_of)), which the tables count a peer's flows by,
/// so a peer with many lanes gets one share, not one per lane.
#[derive(Clone)]
pub(super) struct LaneLink {
    conn: quinn::Connection,
    link: usize,
}

impl Handles for Quic {
    type Link = LaneLink;
    type Vip = VipSocket;
    type Endpoint = EndpointSocket;

    fn link_id(link: &LaneLink) -> usize {
        link.link
    }
}

/// The UDP flow tables of one agent, shared by the tasks reading its sockets and links.
pub(super) type Tables = Mutex<UdpFlows<Quic>>;

/// Empty tables for at most `max_flows` UDP flows (`limits.max_flows`), forgetting flows idle
/// for `idle` (`limits.udp_idle`).
pub(super) fn tables(max_flows: usize, idle: Duration, metrics: Arc<Metrics>) -> Tables {
    Mutex::new(UdpFlows::seeded(max_flows, idle, metrics))
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

    /// Feeds `event` to the flow tables, now; returns what they ask for.
    fn udp_event(&self, event: Event<'_, Quic>) -> Vec<Action<Quic>> {
        lock(&self.udp).handle(event, Instant::now())
    }

    /// Carries out what the flow tables asked for, outside their lock; `payload` is the
    /// datagram the event was about.
    fn udp_apply(self: &Arc<Self>, actions: Vec<Action<Quic>>, payload: &[u8]) {
        for action in actions {
            match action {
                Action::ToLink {
                    link,
                    dgram,
                    service,
                    log_streamed,
                } => {
                    let streamed = self.send(
                        &link.conn,
                        dgram,
                        &service.name,
                        &service.namespace,
                        log_streamed.is_none(),
                    );
                    if let Some(key) = log_streamed.filter(|_| streamed) {
                        self.udp_event(Event::Streamed(key));
                    }
                }
                Action::ToClient { socket, client } => {
                    let _ = socket.send_to(payload, client);
                }
                Action::ToEndpoint { flow, socket } => {
                    let sent = send_now(&socket.socket, payload);
                    debug!(flow, ?sent, "udp datagram to endpoint");
                }
                Action::OpenEndpoint { flow, header, reply } => self.open_endpoint(flow, &header, reply, payload),
                Action::CloseEndpoint { socket, .. } => socket.stop.cancel(),
                // Seen by the reading task ([`Forwarder::endpoint_replies`]).
                Action::StopReading { .. } => {}
                Action::Evicted {
                    flow,
                    holder,
                    reason,
                    held,
                    log,
                } => self.evicted(flow, holder, reason, held, log),
                Action::Dropped { service, reason } => match service {
                    Some(s) => self.metrics.datagram_dropped(&s.name, &s.namespace, reason),
                    None => self.metrics.datagram_dropped("unknown", "unknown", reason),
                },
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
        let header = FlowHeader {
            ttl: MAX_TTL,
            site: target.site.clone(),
            vip,
            port,
            // On a sidecar: the client's own VIP and its source port, which the far sidecar
            // sends from (peer protocols check both).
            src: self.src_vip(target).map(|ip| SocketAddr::new(ip, client.port())),
        };
        let next = match self.hop(&vip, target, LaneChoice::Spread(flow_key(client))) {
            Hop::Local => Next::Local,
            Hop::Conn(conn) => Next::Link(self.lane_link(conn)),
            Hop::Unreachable => Next::Unreachable,
        };
        let actions = self.udp_event(Event::FromClient {
            key,
            client,
            socket,
            service: &target.service,
            namespace: &target.namespace,
            header,
            next,
            payload,
        });
        self.udp_apply(actions, payload);
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

    /// `conn` as the flow tables hold it, with the id of its link.
    fn lane_link(&self, conn: quinn::Connection) -> LaneLink {
        LaneLink {
            link: self.mesh.link_of(&conn),
            conn,
        }
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
                let from = self.lane_link(from.clone());
                let event = if header.site == self.site {
                    Event::Deliver { flow, header, from }
                } else {
                    // The lane from the flow as this hop knows it, so all its datagrams
                    // keep one lane (and one relay entry) onward.
                    let lane = LaneChoice::Spread(flow_key((from.conn.stable_id(), flow)));
                    let next = self.mesh.next_hop(&header.site, lane).map(|c| self.lane_link(c));
                    Event::Relay {
                        flow,
                        header,
                        from,
                        next,
                        payload,
                    }
                };
                let actions = self.udp_event(event);
                self.udp_apply(actions, payload);
            }
            Datagram::Reply { flow, payload } => {
                let actions = self.udp_event(Event::Reply { flow, payload });
                self.udp_apply(actions, payload);
            }
        }
    }

    /// The first datagram of a terminus flow: finds how its VIP is delivered here, and
    /// opens the flow's socket to the endpoint (or passes it to the member's sidecar, or
    /// sends it from the client's VIP, which needs no flow).
    fn open_endpoint(self: &Arc<Self>, flow: u64, header: &FlowHeader, reply: Reply<Quic>, payload: &[u8]) {
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
            let actions = self.udp_event(Event::ViaMember {
                flow,
                header: header.clone(),
                reply,
                member: self.lane_link(member),
                service: &target.service,
                namespace: &target.namespace,
                payload,
            });
            self.udp_apply(actions, payload);
            return;
        }
        let from = header.src.filter(|_| self.mesh.role() == AgentRole::Sidecar);
        if let Some(listener) = from.and_then(|src| lock(&self.udp_sockets).get(&src).cloned()) {
            // We listen on the client's VIP and port already: send from that socket, and the
            // member's answers, sent back to that address, reach it as a flow of their own.
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
        let socket = EndpointSocket {
            socket,
            stop: self.shutdown.child_token(),
        };
        let actions = self.udp_event(Event::EndpointOpened {
            flow,
            reply,
            service: &target.service,
            namespace: &target.namespace,
            socket: socket.clone(),
        });
        self.udp_apply(actions, payload);
        debug!(flow, %endpoint, "udp flow delivered to endpoint");
        self.tasks.spawn(self.clone().endpoint_replies(flow, socket));
    }

    /// Carries an endpoint's answers back along the flow's reply path, until the flow is
    /// forgotten.
    async fn endpoint_replies(self: Arc<Self>, flow: u64, socket: EndpointSocket) {
        while recv_batch(&socket.socket, &socket.stop, |payload, _| {
            debug!(flow, bytes = payload.len(), "endpoint answered");
            let actions = self.udp_event(Event::EndpointReply { flow, payload });
            let gone = actions.iter().any(|a| matches!(a, Action::StopReading { .. }));
            self.udp_apply(actions, payload);
            if gone {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await
        .is_continue()
        {}
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
            let actions = self.udp_event(Event::Tick);
            self.udp_apply(actions, &[]);
        }
    }

    /// Counts a flow the tables evicted to admit another, and logs it when they say so (at
    /// most once per holder per [`flowbook::LOG_EVERY`]).
    fn evicted(&self, (role, flow): FlowKey, holder: Holder, reason: flowbook::Reason, held: usize, log: bool) {
        self.metrics.udp_flow_evicted(role, reason.label());
        if log {
            warn!(
                flow,
                role = role.as_str(),
                %holder,
                reason = reason.as_str(),
                still_held = held,
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
