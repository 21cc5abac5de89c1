//! The UDP flow tables as a plain state machine: events in, actions out, no sockets, no
//! clock of its own (as quinn-proto's `Connection` and [`crate::mesh::core`]).
//!
//! [`UdpFlows`] holds every UDP flow an agent carries (see [`super::udp`] for what a flow is):
//! its origin flows (a local client talking to a VIP), relay flows (passing through, with the
//! link their replies go back on), terminus flows (delivered to one of our endpoints, with the
//! way back), and the [`FlowBook`] that admits, evicts and expires all of them. The shell
//! (`udp.rs`) decides what only the view knows (the service behind a VIP, the next hop, how an
//! endpoint is delivered), feeds each datagram in as an [`Event`] with the current time, and
//! carries out the [`Action`]s returned: send this datagram on that link, the payload to that
//! client or endpoint, open or close an endpoint's socket, count an eviction or a drop. Links,
//! VIP sockets and endpoint sockets are opaque handles ([`Handles`]): quinn connections and
//! tokio sockets in the agent, plain integers in the unit tests below, which run origin, relay
//! and terminus agents against each other in one process, deterministically.
//!
//! Each event is about at most one datagram, which the shell holds while it carries out the
//! actions: [`Action::ToClient`] and [`Action::ToEndpoint`] send that datagram's payload, so it
//! is never copied into an action.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::debug;

use super::ListenerKey;
use super::flowbook::{FlowBook, Reason};
use super::header::{Datagram, FlowHeader};
use crate::metrics::{self, Direction, DropReason, FlowMetrics, Metrics, Role};

/// The shell's handle types: what a link, a VIP socket and an endpoint socket are.
pub trait Handles {
    /// A link (or a sidecar's connection) datagrams are sent on.
    type Link: Clone;
    /// The socket a local client is answered from (its VIP and port).
    type Vip: Clone;
    /// A flow's own socket connected to its endpoint, and how to stop reading it.
    type Endpoint: Clone;

    /// The link's stable id: a reconnected link gets a new one. Flows that arrived on a link
    /// are held by it in the book, and [`Event::LinkGone`] names it.
    fn link_id(link: &Self::Link) -> usize;
}

/// A service by name, shared by its flows and named in the actions that may count a drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The service's name (a metrics label).
    pub name: String,
    /// Its namespace (a metrics label).
    pub namespace: String,
}

impl Service {
    fn new(name: &str, namespace: &str) -> Arc<Service> {
        Arc::new(Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        })
    }
}

/// Who holds a flow, for the per-client share and the eviction order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A client of ours, by source address (not port: one client, many ports). Bound to its
    /// share.
    Client(IpAddr),
    /// The link the flow came in on ([`Handles::link_id`]): many clients of another site,
    /// bound only by the whole table.
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

/// A flow in the book: its table ([`Role`]) and id. One id may be in two tables (origin and
/// terminus, when a local client reaches a local endpoint).
pub type FlowKey = (Role, u64);
/// A holder in the book: per table, so a client's origin and local terminus flows each get
/// a share.
type HolderKey = (Role, Holder);

/// Where a flow's replies go from here.
pub enum Reply<H: Handles> {
    /// Back over this link (we are a relay or the terminus of a remote flow).
    Link(H::Link),
    /// Straight to the client (the endpoint is in our own site).
    Local {
        /// The VIP socket the client sent to.
        socket: H::Vip,
        /// The client's address and port.
        client: SocketAddr,
    },
}

impl<H: Handles> Clone for Reply<H> {
    fn clone(&self) -> Self {
        match self {
            Reply::Link(l) => Reply::Link(l.clone()),
            Reply::Local { socket, client } => Reply::Local {
                socket: socket.clone(),
                client: *client,
            },
        }
    }
}

impl<H: Handles> Reply<H> {
    /// Who holds a terminus flow answering this way, and whether it is bound to its share.
    fn holder(&self) -> (Holder, bool) {
        match self {
            Reply::Link(link) => (Holder::Link(H::link_id(link)), false),
            Reply::Local { client, .. } => (Holder::Client(client.ip()), true),
        }
    }
}

/// Where a local client's datagram goes next, as the shell found it in the view.
pub enum Next<L> {
    /// To the endpoint, from here.
    Local,
    /// Over this link: towards the owning site, or to the sidecar that delivers it.
    Link(L),
    /// Nowhere: the owning site is not reachable.
    Unreachable,
}

/// Something that happened, for [`UdpFlows::handle`].
pub enum Event<'a, H: Handles> {
    /// A datagram from a local client to a VIP the view exports for UDP.
    FromClient {
        /// The VIP, port and protocol it was sent to.
        key: ListenerKey,
        /// The client's address and port.
        client: SocketAddr,
        /// The socket to answer the client from.
        socket: &'a H::Vip,
        /// The service behind the VIP.
        service: &'a str,
        /// Its namespace.
        namespace: &'a str,
        /// The header the flow's datagrams carry (TTL [`super::header::MAX_TTL`]).
        header: FlowHeader,
        /// Where it goes from here.
        next: Next<H::Link>,
        /// The datagram.
        payload: &'a [u8],
    },
    /// A `Forward` datagram for our own site arrived on link `from`.
    Deliver {
        flow: u64,
        header: FlowHeader,
        from: H::Link,
    },
    /// A `Forward` datagram for another site arrived on link `from`; `next` is the link
    /// towards that site, if there is one.
    Relay {
        flow: u64,
        header: FlowHeader,
        from: H::Link,
        next: Option<H::Link>,
        payload: &'a [u8],
    },
    /// A `Reply` datagram arrived on a link.
    Reply { flow: u64, payload: &'a [u8] },
    /// The answer to [`Action::OpenEndpoint`] on a gateway whose member's sidecar delivers
    /// the VIP: the datagram goes on to `member`.
    ViaMember {
        flow: u64,
        header: FlowHeader,
        reply: Reply<H>,
        member: H::Link,
        service: &'a str,
        namespace: &'a str,
        payload: &'a [u8],
    },
    /// The answer to [`Action::OpenEndpoint`]: the shell opened `socket` to the endpoint of
    /// `service` for `flow` (and reads the endpoint's answers from it as
    /// [`Event::EndpointReply`]).
    EndpointOpened {
        flow: u64,
        reply: Reply<H>,
        service: &'a str,
        namespace: &'a str,
        socket: H::Endpoint,
    },
    /// The endpoint of terminus flow `flow` answered.
    EndpointReply { flow: u64, payload: &'a [u8] },
    /// A datagram of `flow` sent as [`Action::ToLink`] went on a stream (and was logged):
    /// later ones are not logged again.
    Streamed(FlowKey),
    /// The link with this id ([`Handles::link_id`]) is gone: flows whose replies went back
    /// on it are forgotten. The agent does not send it today: a UDP flow outlives its
    /// connection as TCP flows do (its next datagram moves the way back to the new one, and
    /// its endpoint keeps seeing the same source port); idle flows go on `Tick`.
    LinkGone(usize),
    /// Time passed: flows idle for longer than the idle timeout are forgotten.
    Tick,
}

/// What the shell must do, in order.
pub enum Action<H: Handles> {
    /// Send `dgram` (an encoded [`Datagram`]) on `link`; if it is too large for a QUIC
    /// datagram, on a stream. A failure counts as a drop of `service`.
    ToLink {
        link: H::Link,
        dgram: Vec<u8>,
        service: Arc<Service>,
        /// `Some`: log it if it goes on a stream, and report [`Event::Streamed`] for this flow.
        /// `None`: do not log (logged already, or a relay's).
        log_streamed: Option<FlowKey>,
    },
    /// Send the event's payload to `client` from `socket`.
    ToClient { socket: H::Vip, client: SocketAddr },
    /// Send the event's payload on terminus flow `flow`'s endpoint socket.
    ToEndpoint { flow: u64, socket: H::Endpoint },
    /// A new terminus flow: find how its VIP is delivered here, and answer with
    /// [`Event::EndpointOpened`] (a socket of its own to the endpoint) or
    /// [`Event::ViaMember`]; or deliver it some other way without
    /// a flow, or not at all (the VIP is not exported here).
    OpenEndpoint {
        flow: u64,
        header: FlowHeader,
        reply: Reply<H>,
    },
    /// Terminus flow `flow` is forgotten: stop reading its endpoint socket and close it.
    CloseEndpoint { flow: u64, socket: H::Endpoint },
    /// [`Event::EndpointReply`] for a flow no longer held: stop reading that socket.
    StopReading { flow: u64 },
    /// A flow was evicted to admit another: count it, and log it when `log`.
    Evicted {
        flow: FlowKey,
        holder: Holder,
        reason: Reason,
        /// Flows the holder still has.
        held: usize,
        /// At most once per holder per [`super::flowbook::LOG_EVERY`].
        log: bool,
    },
    /// A datagram was dropped: count it (`service` `None`: no flow to name, "unknown").
    Dropped {
        service: Option<Arc<Service>>,
        reason: DropReason,
    },
}

/// `header` for the next hop: one less TTL; `None` when it has run out.
fn spend(header: FlowHeader) -> Option<FlowHeader> {
    let ttl = header.ttl.checked_sub(1)?;
    Some(FlowHeader { ttl, ..header })
}

/// Sends a `Forward` datagram of `flow` on `link`, with `header` as given (the origin sends
/// the one it built; every later hop [`spend`]s one of its TTL first).
fn forward<H: Handles>(
    flow: u64,
    header: FlowHeader,
    link: H::Link,
    service: Arc<Service>,
    log_streamed: Option<FlowKey>,
    payload: &[u8],
) -> Action<H> {
    Action::ToLink {
        link,
        dgram: Datagram::Forward { flow, header, payload }.encode(),
        service,
        log_streamed,
    }
}

/// A flow whose client is here.
struct OriginFlow<H: Handles> {
    /// Where the client's answers are sent from.
    socket: H::Vip,
    /// The listener it arrived on, so a forgotten flow can be unhooked from `by_client`.
    key: ListenerKey,
    /// The client's address and port, where its answers go.
    client: SocketAddr,
    /// Named in drops and streamed datagrams.
    service: Arc<Service>,
    /// Counts its datagrams, bytes and close, with labels resolved once.
    metrics: FlowMetrics,
    /// Whether "too large for a datagram" was logged already.
    warned: bool,
}

/// A flow passing through.
struct RelayFlow<H: Handles> {
    /// The link its replies go back on (the one its latest datagram came from).
    back: H::Link,
}

/// A flow delivered to one of our endpoints.
struct TerminusFlow<H: Handles> {
    /// Its own socket, connected to the endpoint.
    socket: H::Endpoint,
    /// Where the endpoint's answers go (the way its latest datagram came).
    reply: Reply<H>,
    /// Named in drops and streamed datagrams.
    service: Arc<Service>,
    /// Counts its datagrams, bytes and close, with labels resolved once.
    metrics: FlowMetrics,
    /// Whether "too large for a datagram" was logged already.
    warned: bool,
}

/// The UDP flow tables of one agent (see the module doc).
pub struct UdpFlows<H: Handles> {
    origin: HashMap<u64, OriginFlow<H>>,
    /// Origin flows by listener and client: a client's datagrams to one VIP port are one flow.
    by_client: HashMap<(ListenerKey, SocketAddr), u64>,
    relay: HashMap<u64, RelayFlow<H>>,
    terminus: HashMap<u64, TerminusFlow<H>>,
    /// Every flow above, by holder and last use: admission, eviction and idle expiry.
    book: FlowBook<FlowKey, HolderKey>,
    /// Flows unused this long are forgotten at the next [`Event::Tick`] (`limits.udp_idle`).
    idle: Duration,
    /// Where flows count what they carry.
    metrics: Arc<Metrics>,
    /// Draws new flow ids: random 64-bit values, so ids from different origins do not meet.
    ids: StdRng,
    /// The service relayed datagrams are counted under when dropped.
    relay_service: Arc<Service>,
}

impl<H: Handles> UdpFlows<H> {
    /// Empty tables for at most `max_flows` flows (`limits.max_flows`), forgetting flows idle
    /// for `idle` (`limits.udp_idle`). New flow ids are drawn from `ids` (seeded from the
    /// operating system in the agent, fixed in tests).
    pub fn new(max_flows: usize, idle: Duration, metrics: Arc<Metrics>, ids: StdRng) -> UdpFlows<H> {
        UdpFlows {
            origin: HashMap::new(),
            by_client: HashMap::new(),
            relay: HashMap::new(),
            terminus: HashMap::new(),
            book: FlowBook::new(max_flows),
            idle,
            metrics,
            ids,
            relay_service: Service::new("relay", "relay"),
        }
    }

    /// [`UdpFlows::new`] with flow ids drawn from an operating-system seeded generator.
    pub fn seeded(max_flows: usize, idle: Duration, metrics: Arc<Metrics>) -> UdpFlows<H> {
        UdpFlows::new(max_flows, idle, metrics, StdRng::from_rng(&mut rand::rng()))
    }

    /// Flows held, over all tables (an id in two tables counts twice); at most `max_flows`.
    pub fn len(&self) -> usize {
        self.book.len()
    }

    /// Whether no flow is held.
    pub fn is_empty(&self) -> bool {
        self.book.is_empty()
    }

    /// Flows in `role`'s table.
    pub fn held(&self, role: Role) -> usize {
        match role {
            Role::Origin => self.origin.len(),
            Role::Relay => self.relay.len(),
            Role::Terminus => self.terminus.len(),
        }
    }

    /// Takes `event`, which happened at `now`; returns what to do, in order.
    pub fn handle(&mut self, event: Event<'_, H>, now: Instant) -> Vec<Action<H>> {
        let mut out = Vec::new();
        match event {
            Event::FromClient {
                key,
                client,
                socket,
                service,
                namespace,
                header,
                next,
                payload,
            } => self.client_datagram(
                key, client, socket, service, namespace, header, next, payload, now, &mut out,
            ),
            Event::Deliver { flow, header, from } => self.deliver(flow, header, Reply::Link(from), now, &mut out),
            Event::Relay {
                flow,
                header,
                from,
                next,
                payload,
            } => {
                let Some(header) = spend(header) else {
                    return out;
                };
                let Some(next) = next else {
                    out.push(Action::Dropped {
                        service: None,
                        reason: DropReason::NoRoute,
                    });
                    return out;
                };
                self.relay_flow(flow, &from, now, &mut out);
                out.push(forward(flow, header, next, self.relay_service.clone(), None, payload));
            }
            Event::Reply { flow, payload } => self.reply(flow, payload, now, &mut out),
            Event::ViaMember {
                flow,
                header,
                reply,
                member,
                service,
                namespace,
                payload,
            } => {
                // A sidecar delivers this endpoint: pass the datagram on, and remember the way
                // back.
                if let Reply::Link(back) = &reply {
                    self.relay_flow(flow, back, now, &mut out);
                }
                if let Some(header) = spend(header) {
                    let service = Service::new(service, namespace);
                    out.push(forward(flow, header, member, service, None, payload));
                }
            }
            Event::EndpointOpened {
                flow,
                reply,
                service,
                namespace,
                socket,
            } => self.endpoint_opened(flow, reply, service, namespace, socket, now, &mut out),
            Event::EndpointReply { flow, payload } => self.endpoint_reply(flow, payload, now, &mut out),
            Event::Streamed((role, flow)) => match role {
                Role::Origin => {
                    if let Some(f) = self.origin.get_mut(&flow) {
                        f.warned = true;
                    }
                }
                Role::Terminus => {
                    if let Some(f) = self.terminus.get_mut(&flow) {
                        f.warned = true;
                    }
                }
                Role::Relay => {}
            },
            Event::LinkGone(id) => {
                let on_link = |link: &H::Link| H::link_id(link) == id;
                let mut gone: Vec<FlowKey> = self
                    .relay
                    .iter()
                    .filter(|(_, f)| on_link(&f.back))
                    .map(|(flow, _)| (Role::Relay, *flow))
                    .collect();
                gone.extend(
                    self.terminus
                        .iter()
                        .filter(|(_, f)| matches!(&f.reply, Reply::Link(l) if on_link(l)))
                        .map(|(flow, _)| (Role::Terminus, *flow)),
                );
                for key in gone {
                    self.book.remove(&key);
                    self.forget(key, &mut out);
                }
            }
            Event::Tick => {
                for (key, _) in self.book.expire(now, self.idle) {
                    self.forget(key, &mut out);
                }
            }
        }
        out
    }

    /// A datagram from a local client: finds or opens its origin flow and sends it on.
    #[allow(clippy::too_many_arguments)]
    fn client_datagram(
        &mut self,
        key: ListenerKey,
        client: SocketAddr,
        socket: &H::Vip,
        service: &str,
        namespace: &str,
        header: FlowHeader,
        next: Next<H::Link>,
        payload: &[u8],
        now: Instant,
        out: &mut Vec<Action<H>>,
    ) {
        let flow = match self.by_client.get(&(key, client)).copied() {
            Some(flow) => {
                self.book.touch(&(Role::Origin, flow), now);
                flow
            }
            None => {
                let flow = self.ids.random::<u64>();
                let holder = (Role::Origin, Holder::Client(client.ip()));
                if let Some(ev) = self.book.admit((Role::Origin, flow), holder, true, now) {
                    self.evicted(ev, out);
                }
                let metrics = self
                    .metrics
                    .flow(service, namespace, metrics::Protocol::Udp, Role::Origin);
                metrics.opened();
                self.by_client.insert((key, client), flow);
                self.origin.insert(
                    flow,
                    OriginFlow {
                        socket: socket.clone(),
                        key,
                        client,
                        service: Service::new(service, namespace),
                        metrics,
                        warned: false,
                    },
                );
                debug!(flow, %client, vip = %key.0, port = key.1, "udp flow opened");
                flow
            }
        };
        let Some(f) = self.origin.get(&flow) else {
            return;
        };
        f.metrics.datagram(Direction::ToEndpoint, payload.len() as u64);
        let (service, log) = (f.service.clone(), (!f.warned).then_some((Role::Origin, flow)));
        match next {
            Next::Local => {
                let reply = Reply::Local {
                    socket: socket.clone(),
                    client,
                };
                self.deliver(flow, header, reply, now, out);
            }
            Next::Link(link) => out.push(forward(flow, header, link, service, log, payload)),
            Next::Unreachable => out.push(Action::Dropped {
                service: Some(service),
                reason: DropReason::NoRoute,
            }),
        }
    }

    /// A datagram of terminus flow `flow` (from a link or a local client): on to the
    /// endpoint if the flow is open, else ask the shell to open it.
    fn deliver(&mut self, flow: u64, header: FlowHeader, reply: Reply<H>, now: Instant, out: &mut Vec<Action<H>>) {
        if let Some(f) = self.terminus.get_mut(&flow) {
            f.reply = reply;
            out.push(Action::ToEndpoint {
                flow,
                socket: f.socket.clone(),
            });
            self.book.touch(&(Role::Terminus, flow), now);
            return;
        }
        out.push(Action::OpenEndpoint { flow, header, reply });
    }

    /// The shell opened an endpoint socket for `flow`: admits the terminus flow and sends
    /// the datagram.
    #[allow(clippy::too_many_arguments)]
    fn endpoint_opened(
        &mut self,
        flow: u64,
        reply: Reply<H>,
        service: &str,
        namespace: &str,
        socket: H::Endpoint,
        now: Instant,
        out: &mut Vec<Action<H>>,
    ) {
        if let Some(f) = self.terminus.get_mut(&flow) {
            // Opened twice (two datagrams of a new flow at once): keep the first socket.
            f.reply = reply;
            out.push(Action::ToEndpoint {
                flow,
                socket: f.socket.clone(),
            });
            out.push(Action::CloseEndpoint { flow, socket });
            self.book.touch(&(Role::Terminus, flow), now);
            return;
        }
        let (holder, limited) = reply.holder();
        if let Some(ev) = self
            .book
            .admit((Role::Terminus, flow), (Role::Terminus, holder), limited, now)
        {
            self.evicted(ev, out);
        }
        let metrics = self
            .metrics
            .flow(service, namespace, metrics::Protocol::Udp, Role::Terminus);
        metrics.opened();
        self.terminus.insert(
            flow,
            TerminusFlow {
                socket: socket.clone(),
                reply,
                service: Service::new(service, namespace),
                metrics,
                warned: false,
            },
        );
        out.push(Action::ToEndpoint { flow, socket });
    }

    /// An answer from terminus flow `flow`'s endpoint, back along its reply path.
    fn endpoint_reply(&mut self, flow: u64, payload: &[u8], now: Instant, out: &mut Vec<Action<H>>) {
        let Some(f) = self.terminus.get(&flow) else {
            out.push(Action::StopReading { flow });
            return;
        };
        match &f.reply {
            Reply::Local { socket, client } => {
                // The client is ours: no origin on a link counts the answer, so we do.
                f.metrics.datagram(Direction::FromEndpoint, payload.len() as u64);
                out.push(Action::ToClient {
                    socket: socket.clone(),
                    client: *client,
                });
            }
            Reply::Link(link) => out.push(Action::ToLink {
                link: link.clone(),
                dgram: Datagram::Reply { flow, payload }.encode(),
                service: f.service.clone(),
                log_streamed: (!f.warned).then_some((Role::Terminus, flow)),
            }),
        }
        self.book.touch(&(Role::Terminus, flow), now);
    }

    /// A `Reply` datagram from a link: to our client, or back along the relay path.
    fn reply(&mut self, flow: u64, payload: &[u8], now: Instant, out: &mut Vec<Action<H>>) {
        if let Some(f) = self.origin.get(&flow) {
            f.metrics.datagram(Direction::FromEndpoint, payload.len() as u64);
            out.push(Action::ToClient {
                socket: f.socket.clone(),
                client: f.client,
            });
            self.book.touch(&(Role::Origin, flow), now);
        } else if let Some(f) = self.relay.get(&flow) {
            out.push(Action::ToLink {
                link: f.back.clone(),
                dgram: Datagram::Reply { flow, payload }.encode(),
                service: self.relay_service.clone(),
                log_streamed: None,
            });
            self.book.touch(&(Role::Relay, flow), now);
        } else {
            out.push(Action::Dropped {
                service: None,
                reason: DropReason::NoFlow,
            });
        }
    }

    /// Records that a datagram of `flow` came over `from`, where its replies go back:
    /// admits the relay flow (held by that link) or refreshes it.
    fn relay_flow(&mut self, flow: u64, from: &H::Link, now: Instant, out: &mut Vec<Action<H>>) {
        if let Some(f) = self.relay.get_mut(&flow) {
            f.back = from.clone();
            self.book.touch(&(Role::Relay, flow), now);
            return;
        }
        let holder = (Role::Relay, Holder::Link(H::link_id(from)));
        if let Some(ev) = self.book.admit((Role::Relay, flow), holder, false, now) {
            self.evicted(ev, out);
        }
        self.relay.insert(flow, RelayFlow { back: from.clone() });
    }

    /// Drops a flow the book evicted to admit another, and reports it.
    fn evicted(&mut self, ev: super::flowbook::Eviction<FlowKey, HolderKey>, out: &mut Vec<Action<H>>) {
        self.forget(ev.flow, out);
        out.push(Action::Evicted {
            flow: ev.flow,
            holder: ev.holder.1,
            reason: ev.reason,
            held: ev.held,
            log: ev.log,
        });
    }

    /// Drops a flow the book gave up (evicted, expired, or its link gone) from its table:
    /// counts the close of an origin or terminus flow, and closes a terminus flow's socket.
    fn forget(&mut self, (role, flow): FlowKey, out: &mut Vec<Action<H>>) {
        match role {
            Role::Origin => {
                let Some(f) = self.origin.remove(&flow) else {
                    return;
                };
                if self.by_client.get(&(f.key, f.client)) == Some(&flow) {
                    self.by_client.remove(&(f.key, f.client));
                }
                f.metrics.closed();
            }
            Role::Relay => {
                self.relay.remove(&flow);
            }
            Role::Terminus => {
                let Some(f) = self.terminus.remove(&flow) else {
                    return;
                };
                f.metrics.closed();
                out.push(Action::CloseEndpoint { flow, socket: f.socket });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Three agents in one process (origin `a`, relay `b`, terminus `c`, linked in a line),
    //! driven as their shells would drive them, with a virtual clock.

    use std::collections::{HashMap, VecDeque};

    use super::*;
    use crate::forward::header::MAX_TTL;
    use crate::names::Protocol;

    /// Plain integers for every handle: links are connection ids, sockets numbers.
    struct T;

    impl Handles for T {
        type Link = usize;
        type Vip = u8;
        type Endpoint = u32;

        fn link_id(link: &usize) -> usize {
            *link
        }
    }

    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    /// The VIP socket clients of `a` send to.
    const VIP_SOCKET: u8 = 7;
    const IDLE: Duration = Duration::from_secs(60);

    fn vip() -> IpAddr {
        "127.77.3.1".parse().unwrap()
    }

    fn key() -> ListenerKey {
        (vip(), 53, Protocol::Udp)
    }

    fn client(ip: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, ip], port))
    }

    struct Agent {
        site: &'static str,
        flows: UdpFlows<T>,
        metrics: Arc<Metrics>,
    }

    /// The clusterset, and everything its shells did.
    struct Net {
        agents: Vec<Agent>,
        /// Connection id → (its agent, the agent at the other end, that end's id).
        conns: HashMap<usize, (usize, usize, usize)>,
        /// Connections that are gone: datagrams sent on them are lost.
        dead: Vec<usize>,
        /// Datagrams in flight: (to agent, arriving on its connection, bytes).
        wire: VecDeque<(usize, usize, Vec<u8>)>,
        now: Instant,
        next_socket: u32,
        /// (agent, endpoint socket, payload) for each datagram an endpoint received.
        at_endpoint: Vec<(usize, u32, Vec<u8>)>,
        /// (agent, client, payload) for each datagram a client received.
        at_client: Vec<(usize, SocketAddr, Vec<u8>)>,
        /// (agent, endpoint socket) closed.
        closed: Vec<(usize, u32)>,
        /// (agent, flow, holder, reason) evicted.
        evicted: Vec<(usize, FlowKey, Holder, Reason)>,
        /// (agent, reason) for each dropped datagram.
        dropped: Vec<(usize, DropReason)>,
        /// Endpoint sockets told to stop reading.
        stopped: Vec<(usize, u64)>,
    }

    impl Net {
        /// `a` — `b` — `c`, each with room for `max_flows`.
        fn new(max_flows: usize) -> Net {
            let agents = ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(i, site)| {
                    let metrics = Metrics::new();
                    let ids = StdRng::seed_from_u64(i as u64);
                    Agent {
                        site,
                        flows: UdpFlows::new(max_flows, IDLE, metrics.clone(), ids),
                        metrics,
                    }
                })
                .collect();
            let mut conns = HashMap::new();
            // a:1 ↔ b:2, b:3 ↔ c:4
            conns.insert(1, (A, B, 2));
            conns.insert(2, (B, A, 1));
            conns.insert(3, (B, C, 4));
            conns.insert(4, (C, B, 3));
            Net {
                agents,
                conns,
                dead: Vec::new(),
                wire: VecDeque::new(),
                now: Instant::now(),
                next_socket: 100,
                at_endpoint: Vec::new(),
                at_client: Vec::new(),
                closed: Vec::new(),
                evicted: Vec::new(),
                dropped: Vec::new(),
                stopped: Vec::new(),
            }
        }

        /// The link from agent `at` towards `site`, as the mesh would route it.
        fn next_hop(&self, at: usize, site: &str) -> Option<usize> {
            let conn = match (at, site) {
                (A, "b" | "c") => 1,
                (B, "a") => 2,
                (B, "c") => 3,
                (C, "a" | "b") => 4,
                _ => return None,
            };
            (!self.dead.contains(&conn)).then_some(conn)
        }

        fn handle(&mut self, at: usize, event: Event<'_, T>, payload: &[u8]) {
            let actions = self.agents[at].flows.handle(event, self.now);
            self.apply(at, actions, payload);
            let f = &self.agents[at].flows;
            let tables = f.held(Role::Origin) + f.held(Role::Relay) + f.held(Role::Terminus);
            assert_eq!(tables, f.len(), "the tables and the book agree");
        }

        fn apply(&mut self, at: usize, actions: Vec<Action<T>>, payload: &[u8]) {
            for action in actions {
                match action {
                    Action::ToLink { link, dgram, .. } => {
                        let (owner, peer, peer_conn) = self.conns[&link];
                        assert_eq!(owner, at, "sent on a connection of its own");
                        if !self.dead.contains(&link) {
                            self.wire.push_back((peer, peer_conn, dgram));
                        }
                    }
                    Action::ToClient { socket, client } => {
                        assert_eq!(socket, VIP_SOCKET);
                        self.at_client.push((at, client, payload.to_vec()));
                    }
                    Action::ToEndpoint { socket, .. } => self.at_endpoint.push((at, socket, payload.to_vec())),
                    Action::OpenEndpoint { flow, reply, .. } => {
                        self.next_socket += 1;
                        let socket = self.next_socket;
                        let event = Event::EndpointOpened {
                            flow,
                            reply,
                            service: "dns",
                            namespace: "kube-system",
                            socket,
                        };
                        self.handle(at, event, payload);
                    }
                    Action::CloseEndpoint { socket, .. } => self.closed.push((at, socket)),
                    Action::StopReading { flow } => self.stopped.push((at, flow)),
                    Action::Evicted {
                        flow, holder, reason, ..
                    } => self.evicted.push((at, flow, holder, reason)),
                    Action::Dropped { reason, .. } => self.dropped.push((at, reason)),
                }
            }
        }

        /// A client of `at` sends `payload` to the VIP, whose endpoint is in site `c`.
        fn send(&mut self, at: usize, from: SocketAddr, payload: &[u8]) {
            let site = self.agents[at].site;
            let next = if site == "c" {
                Next::Local
            } else {
                self.next_hop(at, "c").map_or(Next::Unreachable, Next::Link)
            };
            let header = FlowHeader {
                ttl: MAX_TTL,
                site: "c".into(),
                vip: vip(),
                port: 53,
                src: None,
            };
            let event = Event::FromClient {
                key: key(),
                client: from,
                socket: &VIP_SOCKET,
                service: "dns",
                namespace: "kube-system",
                header,
                next,
                payload,
            };
            self.handle(at, event, payload);
            self.run();
        }

        /// The endpoint behind terminus flow `flow` of `at` answers.
        fn answer(&mut self, at: usize, flow: u64, payload: &[u8]) {
            self.handle(at, Event::EndpointReply { flow, payload }, payload);
            self.run();
        }

        /// Delivers what is on the wire until nothing moves.
        fn run(&mut self) {
            while let Some((to, conn, data)) = self.wire.pop_front() {
                match Datagram::decode(&data).unwrap() {
                    Datagram::Forward { flow, header, payload } => {
                        let event = if header.site == self.agents[to].site {
                            Event::Deliver {
                                flow,
                                header,
                                from: conn,
                            }
                        } else {
                            let next = self.next_hop(to, &header.site);
                            Event::Relay {
                                flow,
                                header,
                                from: conn,
                                next,
                                payload,
                            }
                        };
                        self.handle(to, event, payload);
                    }
                    Datagram::Reply { flow, payload } => self.handle(to, Event::Reply { flow, payload }, payload),
                }
            }
        }

        fn tick(&mut self, at: usize) {
            self.handle(at, Event::Tick, &[]);
        }

        /// The terminus flows of `c`, by id.
        fn terminus_ids(&self) -> Vec<u64> {
            let mut ids: Vec<u64> = self.agents[C].flows.terminus.keys().copied().collect();
            ids.sort();
            ids
        }
    }

    #[test]
    fn a_datagram_crosses_origin_relay_and_terminus_and_its_answer_comes_back() {
        let mut net = Net::new(4096);
        let alice = client(1, 5000);
        net.send(A, alice, b"query");
        assert_eq!(net.at_endpoint, vec![(C, 101, b"query".to_vec())]);
        assert_eq!(net.agents[A].flows.held(Role::Origin), 1);
        assert_eq!(net.agents[B].flows.held(Role::Relay), 1);
        assert_eq!(net.agents[C].flows.held(Role::Terminus), 1);
        let flow = net.terminus_ids()[0];
        assert!(net.agents[A].flows.origin.contains_key(&flow), "one id end to end");

        net.answer(C, flow, b"answer");
        assert_eq!(net.at_client, vec![(A, alice, b"answer".to_vec())]);

        // The same client and port: the same flow and endpoint socket.
        net.send(A, alice, b"again");
        assert_eq!(net.at_endpoint.last(), Some(&(C, 101, b"again".to_vec())));
        assert_eq!(net.terminus_ids(), vec![flow]);
        // Another port is another flow, with a socket of its own, answered on its own.
        let other = client(1, 5001);
        net.send(A, other, b"other");
        assert_eq!(net.at_endpoint.last(), Some(&(C, 102, b"other".to_vec())));
        let second = *net.terminus_ids().iter().find(|id| **id != flow).unwrap();
        net.answer(C, second, b"for other");
        assert_eq!(net.at_client.last(), Some(&(A, other, b"for other".to_vec())));
        assert!(net.dropped.is_empty() && net.evicted.is_empty() && net.closed.is_empty());

        // Counted once per flow through its handle: the origin both ways, the terminus
        // (whose answers go back over a link) only its flow.
        let text = net.agents[A].metrics.encode();
        assert!(
            text.contains(
                r#"causeway_udp_datagrams_total{service="dns",namespace="kube-system",direction="to_endpoint"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"causeway_bytes_total{service="dns",namespace="kube-system",protocol="udp",direction="from_endpoint"} 15"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"causeway_flows_opened_total{service="dns",namespace="kube-system",protocol="udp",role="origin"} 2"#
            ),
            "{text}"
        );
        let text = net.agents[C].metrics.encode();
        assert!(!text.contains("causeway_udp_datagrams_total{"), "{text}");
        assert!(text.contains(r#"role="terminus"} 2"#), "{text}");
    }

    #[test]
    fn each_hop_spends_one_ttl_and_none_goes_past_zero() {
        let mut net = Net::new(64);
        let header = |ttl| FlowHeader {
            ttl,
            site: "c".into(),
            vip: vip(),
            port: 53,
            src: None,
        };
        let actions = net.agents[B].flows.handle(
            Event::Relay {
                flow: 9,
                header: header(1),
                from: 2,
                next: Some(3),
                payload: b"x",
            },
            net.now,
        );
        let [Action::ToLink { link: 3, dgram, .. }] = &actions[..] else {
            panic!("one datagram on to c");
        };
        let Ok(Datagram::Forward { header: sent, .. }) = Datagram::decode(dgram) else {
            panic!("a forward datagram");
        };
        assert_eq!(sent.ttl, 0);
        let actions = net.agents[B].flows.handle(
            Event::Relay {
                flow: 10,
                header: header(0),
                from: 2,
                next: Some(3),
                payload: b"x",
            },
            net.now,
        );
        assert!(actions.is_empty(), "a spent TTL is dropped quietly");
        assert_eq!(net.agents[B].flows.held(Role::Relay), 1);
        // No route on: dropped and counted, and no relay flow kept for it.
        let actions = net.agents[B].flows.handle(
            Event::Relay {
                flow: 11,
                header: header(5),
                from: 2,
                next: None,
                payload: b"x",
            },
            net.now,
        );
        assert!(matches!(
            &actions[..],
            [Action::Dropped {
                service: None,
                reason: DropReason::NoRoute
            }]
        ));
        assert_eq!(net.agents[B].flows.held(Role::Relay), 1);
    }

    #[test]
    fn a_local_client_reaches_a_local_endpoint_and_is_answered_from_its_vip() {
        let mut net = Net::new(4096);
        let bob = client(2, 6000);
        net.send(C, bob, b"ping");
        assert_eq!(net.at_endpoint, vec![(C, 101, b"ping".to_vec())]);
        let flows = &net.agents[C].flows;
        assert_eq!((flows.held(Role::Origin), flows.held(Role::Terminus)), (1, 1));
        let flow = net.terminus_ids()[0];
        net.answer(C, flow, b"pong");
        assert_eq!(net.at_client, vec![(C, bob, b"pong".to_vec())]);
        assert!(net.wire.is_empty());
        let text = net.agents[C].metrics.encode();
        assert!(
            text.contains(
                r#"causeway_udp_datagrams_total{service="dns",namespace="kube-system",direction="from_endpoint"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn idle_flows_are_forgotten_on_a_tick_everywhere_and_their_sockets_closed() {
        let mut net = Net::new(4096);
        let (quiet, busy) = (client(1, 5000), client(1, 5001));
        net.send(A, quiet, b"1");
        net.send(A, busy, b"2");
        let ids = net.terminus_ids();
        net.now += IDLE / 2;
        net.send(A, busy, b"3");
        net.now += IDLE / 2 + Duration::from_secs(1);
        for at in [A, B, C] {
            net.tick(at);
            assert_eq!(net.agents[at].flows.len(), 1, "only the busy flow is left at {at}");
        }
        assert_eq!(net.closed, vec![(C, 101)], "the quiet flow's endpoint socket");
        let quiet_flow = ids
            .iter()
            .copied()
            .find(|id| !net.agents[C].flows.terminus.contains_key(id));
        let quiet_flow = quiet_flow.unwrap();
        // Its endpoint answers late: the reader is told to stop; nothing goes anywhere.
        net.answer(C, quiet_flow, b"late");
        assert_eq!(net.stopped, vec![(C, quiet_flow)]);
        assert!(net.at_client.is_empty());
        // Closes are counted for origin and terminus flows.
        let text = net.agents[A].metrics.encode();
        assert!(
            text.contains(
                r#"causeway_flows_closed_total{service="dns",namespace="kube-system",protocol="udp",role="origin"} 1"#
            ),
            "{text}"
        );
        // The quiet client sends again: a new flow, a new endpoint socket.
        net.send(A, quiet, b"4");
        assert_eq!(net.at_endpoint.last(), Some(&(C, 103, b"4".to_vec())));
        // Later, everything idles out.
        net.now += IDLE * 2;
        for at in [A, B, C] {
            net.tick(at);
            assert!(net.agents[at].flows.is_empty());
        }
    }

    #[test]
    fn a_gone_link_takes_the_flows_answering_over_it() {
        let mut net = Net::new(4096);
        let alice = client(1, 5000);
        net.send(A, alice, b"q");
        let flow = net.terminus_ids()[0];
        // Another link's id forgets nothing.
        net.handle(B, Event::LinkGone(99), &[]);
        assert_eq!(net.agents[B].flows.len(), 1);
        // b loses its link to a: the relay flow goes (its answers had nowhere to go).
        net.dead.extend([1, 2]);
        net.handle(B, Event::LinkGone(2), &[]);
        assert_eq!(net.agents[B].flows.len(), 0);
        assert!(net.closed.is_empty());
        // An answer reaching b now has no flow.
        net.answer(C, flow, b"a");
        assert_eq!(net.dropped, vec![(B, DropReason::NoFlow)]);
        // c loses its link to b: the terminus flow goes, and its socket is closed.
        net.handle(C, Event::LinkGone(4), &[]);
        assert!(net.agents[C].flows.is_empty());
        assert_eq!(net.closed, vec![(C, 101)]);
        let text = net.agents[C].metrics.encode();
        assert!(
            text.contains(
                r#"causeway_flows_closed_total{service="dns",namespace="kube-system",protocol="udp",role="terminus"} 1"#
            ),
            "{text}"
        );
        // The origin's flow does not answer over a link of its own: it stays.
        net.handle(A, Event::LinkGone(1), &[]);
        assert_eq!(net.agents[A].flows.held(Role::Origin), 1);
    }

    #[test]
    fn a_flooding_client_loses_its_own_oldest_flows_and_never_another_clients() {
        // 256 flows: a client's share is 64.
        let mut net = Net::new(256);
        let quiet: Vec<SocketAddr> = (0..3).map(|p| client(2, 7000 + p)).collect();
        for &q in &quiet {
            net.send(A, q, b"hello");
        }
        for port in 0..1000 {
            net.send(A, client(1, 10_000 + port), b"flood");
            for at in [A, B, C] {
                assert!(net.agents[at].flows.len() <= 256);
            }
        }
        let flooder = Holder::Client("10.0.0.1".parse().unwrap());
        let at_a: Vec<_> = net.evicted.iter().filter(|e| e.0 == A).collect();
        assert_eq!(at_a.len(), 1000 - 64);
        assert!(at_a.iter().all(|e| e.2 == flooder && e.3 == Reason::ClientShare));
        assert_eq!(net.agents[A].flows.held(Role::Origin), 64 + 3);
        // Flows held by a link have no share: b and c evict the largest holder (the one link)
        // only when full.
        assert!(net.agents[B].flows.len() <= 256 && net.agents[C].flows.len() <= 256);
        // The quiet client's flows still work: a new datagram reuses its flow at a, and an
        // answer to a quiet flow still reaches it whatever b and c evicted.
        let before = net.agents[A].flows.held(Role::Origin);
        net.send(A, quiet[0], b"still here");
        assert_eq!(net.agents[A].flows.held(Role::Origin), before);
        assert_eq!(
            net.at_endpoint.last().map(|e| e.2.clone()),
            Some(b"still here".to_vec())
        );
        let flow = net.agents[A].flows.by_client[&(key(), quiet[0])];
        net.answer(C, flow, b"reply");
        assert_eq!(net.at_client.last(), Some(&(A, quiet[0], b"reply".to_vec())));
    }

    #[test]
    fn the_tables_never_hold_more_than_max_flows_whatever_comes() {
        let max = 64;
        let mut net = Net::new(max);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..5_000 {
            match rng.random_range(0..10) {
                0..6 => {
                    let at = [A, C][rng.random_range(0..2)];
                    let from = client(rng.random_range(1..5), rng.random_range(1..200));
                    net.send(at, from, b"d");
                }
                6..8 => {
                    let ids = net.terminus_ids();
                    if !ids.is_empty() {
                        let flow = ids[rng.random_range(0..ids.len())];
                        net.answer(C, flow, b"r");
                    }
                }
                8 => net.now += Duration::from_secs(rng.random_range(0..30)),
                _ => {
                    let at = rng.random_range(0..3);
                    net.tick(at);
                }
            }
            for agent in &net.agents {
                assert!(agent.flows.len() <= max);
                assert!(agent.flows.by_client.len() <= agent.flows.origin.len());
            }
        }
        assert!(!net.evicted.is_empty(), "the mix filled the tables");
    }

    #[test]
    fn a_flow_opened_twice_keeps_its_first_socket() {
        let mut net = Net::new(64);
        let reply = || Reply::<T>::Link(4);
        let open = |socket| Event::EndpointOpened {
            flow: 5,
            reply: reply(),
            service: "dns",
            namespace: "kube-system",
            socket,
        };
        net.handle(C, open(1), b"x");
        net.handle(C, open(2), b"y");
        assert_eq!(net.at_endpoint, vec![(C, 1, b"x".to_vec()), (C, 1, b"y".to_vec())]);
        assert_eq!(net.closed, vec![(C, 2)]);
        assert_eq!(net.agents[C].flows.len(), 1);
    }
}
