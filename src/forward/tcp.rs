//! TCP flows: one accepted connection is one QUIC bidirectional stream.
//!
//! The origin agent (where the client connected to a VIP) opens a stream on the next hop's
//! link and writes a [`FlowHeader`]; relays read the header and open the next stream; the
//! terminating agent connects to its own endpoint. Bytes then go both ways without user-space
//! copies: TCP reads (growing buffers, never zeroed) are handed to quinn as `Bytes`, and the
//! chunks quinn has received go to TCP with one `writev` per batch (`read_chunks`). Each
//! direction ends on its own: a FIN becomes a stream finish and a finish becomes a FIN
//! (`shutdown(Write)`), so half-closed connections work. A reset anywhere becomes a stream
//! reset (with a [`codes`] reason) and a reset becomes a TCP RST (`SO_LINGER` 0), so a refused
//! endpoint at the far side resets the client's connection at once instead of hanging it.
//!
//! Toward an agent that can, a flow is **resumable** (see `forward::session`): its header
//! carries a random token, the two end agents frame the stream ([`super::resume`]) and keep
//! what the other has not acknowledged, and the flow moves to another stream, over another
//! path, when its path fails; relays stay plain splices. An origin learns whether a site's
//! terminus resumes from the answer to its first flow there (an agent that cannot refuses
//! the header with `BAD_HEADER`, and flows to it stay plain).

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use super::header::{FlowHeader, MAX_HEADER, MAX_TTL, ResumeExt};
use super::session::{ANSWER_TIMEOUT, Attach, Mailbox, OpenError, Side, open_answered};
use super::{Forwarder, Hop, ListenerKey, codes, lock, resume};
use crate::link::lanes::{Arrived, LaneChoice, flow_key};
use crate::metrics::{self, Direction, FailReason, FlowMetrics};
use crate::names::Protocol;
use crate::role::Role;

/// Largest read per direction: large reads and writes matter more than anything else here.
pub(super) const BUF: usize = 256 * 1024;
/// Chunks taken from a QUIC stream at once (one `writev` to TCP, one write to a relay's stream).
pub(super) const CHUNKS: usize = 64;
/// First read of a flow; reads double up to [`BUF`] while they fill the buffer.
pub(super) const FIRST_BUF: usize = 16 * 1024;
/// How long an origin remembers whether a site's terminus resumes flows before asking again.
const RESUME_SUPPORT_TTL: Duration = Duration::from_secs(600);
/// How long the terminating agent waits for its endpoint to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds a VIP listener.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// How a flow ended badly.
#[derive(Debug, thiserror::Error)]
enum End {
    /// The TCP side reset or failed.
    #[error("tcp: {0}")]
    Tcp(std::io::Error),
    /// The QUIC side reset the stream, or the link failed.
    #[error("link: {0}")]
    Quic(String),
}

/// Sends a TCP RST instead of a FIN when the socket is dropped.
fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// What to do with an accepted connection.
enum Accepted {
    /// A flow to this VIP and port.
    Flow(ListenerKey),
    /// Close it quietly (the agent's own probe of its nftables rule).
    Close,
    /// Reset it (not made to a VIP).
    Reset,
}

impl Forwarder {
    /// A VIP listener: every connection is a flow to its `key`.
    pub(super) async fn tcp_listener(
        self: Arc<Self>,
        listener: TcpListener,
        key: ListenerKey,
        stop: CancellationToken,
    ) {
        self.accept_flows(listener, stop, "accept failed", |_, _, _| Accepted::Flow(key))
            .await
    }

    /// `vips.mode: intercept`: connections the nftables rule redirected to the intercept
    /// port, each taken as made to its original destination.
    pub(super) async fn intercepted_tcp(self: Arc<Self>, listener: TcpListener) {
        let stop = self.shutdown.clone();
        self.accept_flows(
            listener,
            stop,
            "accept failed on the intercept port",
            |me, client, peer| {
                match crate::intercept::original_dst(client) {
                    Ok(dst) if me.is_probe(&dst) => Accepted::Close, // the rule works
                    Ok(dst) if me.in_range(&dst) => Accepted::Flow((dst.ip(), dst.port(), Protocol::Tcp)),
                    other => {
                        debug!(client = %peer, dst = ?other, "connection on the intercept port not made to a VIP");
                        Accepted::Reset
                    }
                }
            },
        )
        .await
    }

    /// Accepts connections on `listener` until `stop`, and starts an origin flow for each
    /// one `key_of` names a VIP for; a failed accept is logged as `failed` and retried.
    async fn accept_flows(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        failed: &'static str,
        key_of: impl Fn(&Self, &TcpStream, std::net::SocketAddr) -> Accepted,
    ) {
        loop {
            let (client, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "{failed}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let key = match key_of(&self, &client, peer) {
                Accepted::Flow(key) => key,
                Accepted::Close => continue,
                Accepted::Reset => {
                    reset(client);
                    continue;
                }
            };
            let span = debug_span!("flow", proto = "tcp", vip = %key.0, port = key.1, client = %peer);
            self.tasks.spawn(self.clone().tcp_origin(client, key).instrument(span));
        }
    }

    /// A client connected to a VIP here.
    async fn tcp_origin(self: Arc<Self>, client: TcpStream, (vip, port, _): ListenerKey) {
        let view = self.mesh.view();
        let Some(target) = view
            .vips
            .get(&vip)
            .filter(|t| t.ready && t.exports(port, Protocol::Tcp))
        else {
            debug!("VIP no longer exported");
            return reset(client);
        };
        let (svc, ns) = (target.service.as_str(), target.namespace.as_str());
        let flow = self
            .metrics
            .flow(svc, ns, metrics::Protocol::Tcp, metrics::Role::Origin);
        let Ok(_permit) = self.flow_permits.clone().try_acquire_owned() else {
            flow.failed(FailReason::Limit);
            return reset(client);
        };
        let _ = client.set_nodelay(true);
        flow.opened();
        // A resumable flow starts on the link's interactive lane and moves to a bulk one if it
        // turns bulk; a plain one cannot move, so it is spread over every lane by its client's
        // address and port ([`crate::link::lanes`]).
        let support = self.resume_support(&target.site);
        let resumable = self.opts.resume && support != Some(false);
        let lane = flow_key(client.peer_addr().ok());
        let choice = if resumable {
            LaneChoice::Interactive
        } else {
            LaneChoice::Spread(lane)
        };
        let conn = match self.hop(&vip, target, choice) {
            Hop::Local => {
                let server = match connect(SocketAddr::new(target.ip, port)).await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(error = %e, "local endpoint refused");
                        flow.failed(FailReason::Refused);
                        return reset(client);
                    }
                };
                // Boxed, as every path of this task: inline, each path's state would size the
                // task of every flow, whichever path it takes (measured: a resumable flow's
                // task held the plain splice's 3 KiB of chunk and slice arrays).
                return Box::pin(self.splice_tcp_tcp(client, server, &flow)).await;
            }
            Hop::Conn(conn) => conn,
            Hop::Unreachable => {
                flow.failed(FailReason::NoRoute);
                return reset(client);
            }
        };
        let header = FlowHeader {
            ttl: MAX_TTL,
            site: target.site.clone(),
            vip,
            port,
            src: self.src_vip(target).map(|ip| SocketAddr::new(ip, 0)),
        };
        if resumable {
            let token = resume::new_token();
            let ext = ResumeExt {
                token,
                resuming: false,
                waits: support.is_none(),
                received: 0,
            };
            let attach = if support.is_none() {
                // Not known whether this site resumes: its answer (an ack, or BAD_HEADER
                // from an agent that predates resuming) comes before anything is sent.
                match tokio::time::timeout(ANSWER_TIMEOUT, open_answered(&conn, &header, &ext)).await {
                    Ok(Ok((send, recv, peer_received))) => {
                        self.set_resume_support(&target.site, true);
                        Some(Attach {
                            send,
                            recv,
                            peer_received,
                            answered: true,
                            answer_now: false,
                            via: Some(conn.clone()),
                        })
                    }
                    Ok(Err(OpenError::Refused(code))) if code == codes::BAD_HEADER.into() => {
                        debug!(site = %target.site, "the terminus cannot resume flows; plain flows to it");
                        self.set_resume_support(&target.site, false);
                        None
                    }
                    Ok(Err(e)) => {
                        debug!(error = %e, "opening the stream failed");
                        let refused = matches!(e, OpenError::Refused(c) if c == codes::REFUSED.into());
                        flow.failed(if refused {
                            FailReason::Refused
                        } else {
                            FailReason::Unreachable
                        });
                        return reset(client);
                    }
                    Err(_) => {
                        debug!("no answer to the flow's header");
                        flow.failed(FailReason::Unreachable);
                        return reset(client);
                    }
                }
            } else {
                match open(&conn, &header, Some(&ext)).await {
                    Ok((send, recv)) => Some(Attach {
                        send,
                        recv,
                        peer_received: 0,
                        answered: false,
                        answer_now: false,
                        via: Some(conn.clone()),
                    }),
                    Err(e) => {
                        debug!(error = %e, "opening the stream failed");
                        flow.failed(FailReason::Unreachable);
                        return reset(client);
                    }
                }
            };
            if let Some(attach) = attach {
                // Boxed: a resumable flow's state is large, and unboxed it would size every
                // plain flow's future too (about 5 KiB more per idle plain flow, measured).
                let refused = Box::pin(self.resumable(
                    client,
                    attach,
                    Side::Origin {
                        token,
                        header,
                        lane,
                        bulk: false,
                    },
                    &flow,
                ))
                .await;
                if refused {
                    // A terminus (or relay) on the path cannot resume: later flows go plain.
                    self.set_resume_support(&target.site, false);
                }
                return;
            }
        }
        let (send, recv) = match open(&conn, &header, None).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "opening the stream failed");
                flow.failed(FailReason::Unreachable);
                return reset(client);
            }
        };
        Box::pin(self.splice_tcp_quic(client, send, recv, &flow)).await;
    }

    /// Whether `site`'s terminus resumes flows, if known (and not too long ago).
    fn resume_support(&self, site: &str) -> Option<bool> {
        lock(&self.resume_peers)
            .get(site)
            .filter(|(_, at)| at.elapsed() < RESUME_SUPPORT_TTL)
            .map(|(yes, _)| *yes)
    }

    fn set_resume_support(&self, site: &str, yes: bool) {
        let mut peers = lock(&self.resume_peers);
        peers.retain(|_, (_, at)| at.elapsed() < RESUME_SUPPORT_TTL);
        peers.insert(site.to_string(), (yes, std::time::Instant::now()));
    }

    /// Hands a stream that resumes flow `ext.token` to that flow, if it ends here and was
    /// opened for the same VIP and port; gives the stream back otherwise.
    fn hand_over(
        &self,
        header: &FlowHeader,
        ext: &ResumeExt,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), (quinn::SendStream, quinn::RecvStream)> {
        let mailbox = lock(&self.resumes)
            .get(&ext.token)
            .filter(|(vip, port, _)| *vip == header.vip && *port == header.port)
            .map(|(_, _, m)| m.clone());
        let Some(mailbox) = mailbox else {
            return Err((send, recv));
        };
        let attach = Attach {
            send,
            recv,
            peer_received: ext.received,
            answered: true,
            answer_now: true,
            via: None,
        };
        if let Some(mut older) = mailbox.put(Box::new(attach)) {
            let _ = older.send.reset(codes::RESET.into());
            let _ = older.recv.stop(codes::RESET.into());
        }
        Ok(())
    }

    /// A stream arrived on a link: relay it, or deliver it to one of our endpoints.
    pub async fn serve_stream(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        arrived: Arrived,
    ) {
        let lane = arrived.onward(rand::random());
        let (header, ext) = match read_header(&mut recv).await {
            Ok(h) => h,
            Err(e) => {
                debug!(error = %e, "bad flow header");
                let _ = send.reset(codes::BAD_HEADER.into());
                let _ = recv.stop(codes::BAD_HEADER.into());
                return;
            }
        };
        let span = debug_span!("flow", proto = "tcp", vip = %header.vip, port = header.port, dst = %header.site);
        async move {
            // A stream that resumes a flow ending here goes to that flow (which holds its
            // permit), before anything else.
            if let Some(e) = ext.as_ref().filter(|e| e.resuming) {
                match self.hand_over(&header, e, send, recv) {
                    Ok(()) => return,
                    Err(streams) => (send, recv) = streams,
                }
            }
            let view = self.mesh.view();
            let labels = view
                .vips
                .get(&header.vip)
                .map(|t| (t.service.clone(), t.namespace.clone()))
                .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
            let (svc, ns) = (labels.0.as_str(), labels.1.as_str());
            let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: u32| {
                let _ = send.reset(code.into());
                let _ = recv.stop(code.into());
            };
            let relay = self.metrics.flow(svc, ns, metrics::Protocol::Tcp, metrics::Role::Relay);
            let Ok(_permit) = self.flow_permits.clone().try_acquire_owned() else {
                relay.failed(FailReason::Limit);
                return refuse(&mut send, &mut recv, codes::LIMIT);
            };
            if header.ttl == 0 {
                return refuse(&mut send, &mut recv, codes::BAD_HEADER);
            }
            // Towards another site (relay), or to the sidecar that delivers this VIP.
            let onward = match (self.mesh.role(), header.site == self.site) {
                // A sidecar delivers to its own pod only; it never relays.
                (Role::Sidecar, false) => return refuse(&mut send, &mut recv, codes::UNREACHABLE),
                (Role::Sidecar, true) => None,
                // Onward on a lane like the one it came on (a relay never reopens a stream).
                (Role::Gateway, false) => match self.mesh.next_hop(&header.site, lane) {
                    Some(conn) => Some(conn),
                    None => {
                        relay.failed(FailReason::NoRoute);
                        return refuse(&mut send, &mut recv, codes::UNREACHABLE);
                    }
                },
                (Role::Gateway, true) => self.mesh.member_for(&header.vip),
            };
            if let Some(conn) = onward {
                let next = FlowHeader {
                    ttl: header.ttl - 1,
                    ..header.clone()
                };
                let (send2, recv2) = match open(&conn, &next, ext.as_ref()).await {
                    Ok(s) => s,
                    Err(_) => {
                        relay.failed(FailReason::Unreachable);
                        return refuse(&mut send, &mut recv, codes::UNREACHABLE);
                    }
                };
                relay.opened();
                // Boxed: see `tcp_origin`.
                let (a, b) = Box::pin(async { tokio::join!(pipe_quic(recv, send2), pipe_quic(recv2, send)) }).await;
                relay.bytes(Direction::ToEndpoint, a);
                relay.bytes(Direction::FromEndpoint, b);
                relay.closed();
                return;
            }
            let target = view.vips.get(&header.vip).filter(|t| {
                t.site == self.site && t.ready && t.exports(header.port, Protocol::Tcp) && self.delivers(&header.vip)
            });
            let terminus = self
                .metrics
                .flow(svc, ns, metrics::Protocol::Tcp, metrics::Role::Terminus);
            let Some(target) = target else {
                terminus.failed(FailReason::NotExported);
                return refuse(&mut send, &mut recv, codes::REFUSED);
            };
            if ext.as_ref().is_some_and(|e| e.resuming || e.received != 0) {
                // A resume of a flow this agent does not hold (it ended, timed out, or the
                // agent restarted), or a new flow claiming to have received bytes.
                debug!("resume of an unknown flow refused");
                return refuse(&mut send, &mut recv, codes::GONE);
            }
            // A sidecar connects from the client's own VIP, so the member sees its peer at an
            // address that leads back to it from every site.
            let sidecar = self.mesh.role() == Role::Sidecar;
            let from = header.src.map(|s| s.ip()).filter(|_| sidecar);
            let mut result = connect_from(from, SocketAddr::new(target.ip, header.port)).await;
            if sidecar
                && result
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            {
                // The member may listen on its own VIP instead of its pod address.
                result = connect_from(from, SocketAddr::new(header.vip, header.port)).await;
            }
            let tcp = match result {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "endpoint refused");
                    let (code, reason) = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        (codes::REFUSED, FailReason::Refused)
                    } else {
                        (codes::UNREACHABLE, FailReason::Unreachable)
                    };
                    terminus.failed(reason);
                    return refuse(&mut send, &mut recv, code);
                }
            };
            terminus.opened();
            let Some(ext) = ext else {
                // Boxed: see `tcp_origin`.
                return Box::pin(self.splice_tcp_quic(tcp, send, recv, &terminus)).await;
            };
            let mailbox = Arc::new(Mailbox::default());
            let Some(_registered) = Registered::new(&self, ext.token, &header, mailbox.clone()) else {
                debug!("a new flow reused a live token; refused");
                terminus.failed(FailReason::Reset);
                refuse(&mut send, &mut recv, codes::GONE);
                return reset(tcp);
            };
            let first = Attach {
                send,
                recv,
                peer_received: 0,
                answered: true,
                answer_now: ext.waits,
                via: None,
            };
            Box::pin(self.resumable(tcp, first, Side::Terminus { resumes: mailbox }, &terminus)).await;
        }
        .instrument(span)
        .await
    }

    /// Copies between a TCP connection and a QUIC stream until both directions end.
    async fn splice_tcp_quic(
        &self,
        mut tcp: TcpStream,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        flow: &FlowMetrics,
    ) {
        // The TCP side's bytes go "to the endpoint" at the origin and "from" it at the terminus.
        let (tcp_dir, quic_dir) = if flow.role() == metrics::Role::Origin {
            (Direction::ToEndpoint, Direction::FromEndpoint)
        } else {
            (Direction::FromEndpoint, Direction::ToEndpoint)
        };
        let (mut tr, mut tw) = tcp.split();
        let mut up_bytes = 0u64;
        let mut down_bytes = 0u64;
        let up = async {
            // Read into spare capacity (never zeroed) and hand each chunk to quinn as it is
            // (no copy). Start small, so idle and chatty flows stay cheap, and grow to BUF
            // while reads keep filling the buffer.
            let mut want = FIRST_BUF;
            let mut buf = bytes::BytesMut::new();
            let mut pace = super::priority::SmallFirst::new(std::time::Instant::now());
            let _ = send.set_priority(pace.priority());
            loop {
                buf.reserve(want);
                match tr.read_buf(&mut buf).await {
                    Ok(0) => {
                        let _ = send.finish();
                        return Ok(());
                    }
                    Ok(n) => {
                        if n >= want {
                            want = (want * 2).min(BUF);
                        }
                        if let Some(p) = pace.on_send(n, std::time::Instant::now()) {
                            let _ = send.set_priority(p);
                        }
                        send.write_chunk(buf.split().freeze())
                            .await
                            .map_err(|e| End::Quic(e.to_string()))?;
                        up_bytes += n as u64;
                    }
                    Err(e) => return Err(End::Tcp(e)),
                }
            }
        };
        let down = async {
            // Every chunk quinn has in order, taken at once and written with one `writev`:
            // a chunk is one QUIC frame (~1.4 KB), and a system call per frame costs more
            // than everything else on this side.
            let mut chunks: [Bytes; CHUNKS] = std::array::from_fn(|_| Bytes::new());
            loop {
                match recv.read_chunks(&mut chunks).await {
                    Ok(Some(n)) => {
                        down_bytes += write_all_chunks(&mut tw, &mut chunks[..n]).await.map_err(End::Tcp)?;
                    }
                    Ok(None) => {
                        let _ = tw.shutdown().await;
                        return Ok(());
                    }
                    Err(e) => return Err(End::Quic(e.to_string())),
                }
            }
        };
        let result = tokio::try_join!(up, down);
        flow.bytes(tcp_dir, up_bytes);
        flow.bytes(quic_dir, down_bytes);
        match result {
            Ok(_) => flow.closed(),
            Err(end) => {
                debug!(%end, "flow reset");
                flow.failed(FailReason::Reset);
                let _ = send.reset(codes::RESET.into());
                let _ = recv.stop(codes::RESET.into());
                reset(tcp);
            }
        }
    }

    /// Copies between two TCP connections (an origin whose endpoint is in this site).
    async fn splice_tcp_tcp(&self, mut client: TcpStream, mut server: TcpStream, flow: &FlowMetrics) {
        match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, BUF, BUF).await {
            Ok((up, down)) => {
                flow.bytes(Direction::ToEndpoint, up);
                flow.bytes(Direction::FromEndpoint, down);
                flow.closed();
            }
            Err(_) => {
                flow.failed(FailReason::Reset);
                reset(client);
                reset(server);
            }
        }
    }
}

/// Writes every chunk to `w`, as few `writev` calls as the socket allows; returns the bytes
/// written. Chunks are consumed (left empty) as they go out.
pub(super) async fn write_all_chunks<W: AsyncWrite + Unpin>(w: &mut W, chunks: &mut [Bytes]) -> std::io::Result<u64> {
    let total = chunks.iter().map(|c| c.len() as u64).sum();
    let mut first = 0;
    loop {
        while chunks.get(first).is_some_and(|c| c.is_empty()) {
            first += 1;
        }
        let pending = &chunks[first..];
        if pending.is_empty() {
            return Ok(total);
        }
        let written = {
            let (slices, n) = io_slices(pending);
            w.write_vectored(&slices[..n]).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        consume(&mut chunks[first..], written);
    }
}

/// The first [`CHUNKS`] (at most) of `chunks` as the slices of one `writev`, and how many
/// of them there are.
pub(super) fn io_slices<'a>(chunks: impl IntoIterator<Item = &'a Bytes>) -> ([IoSlice<'a>; CHUNKS], usize) {
    let mut chunks = chunks.into_iter();
    let mut n = 0;
    let slices = std::array::from_fn(|_| match chunks.next() {
        Some(c) => {
            n += 1;
            IoSlice::new(c)
        }
        None => IoSlice::new(&[]),
    });
    (slices, n)
}

/// Takes the `written` bytes a `writev` took off the front of `chunks`: whole chunks are left
/// empty, a partly written one is advanced.
pub(super) fn consume<'a>(chunks: impl IntoIterator<Item = &'a mut Bytes>, mut written: usize) {
    for chunk in chunks {
        if written == 0 {
            break;
        }
        let n = written.min(chunk.len());
        chunk.advance(n);
        written -= n;
    }
}

/// Connects to an endpoint from `from` (port chosen by the kernel) when given and bindable,
/// else from the default address.
async fn connect_from(from: Option<std::net::IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(ip) = from else { return connect(addr).await };
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Err(e) = socket.bind(SocketAddr::new(ip, 0)) {
        debug!(%ip, error = %e, "cannot connect from the client's VIP; using the default address");
        return connect(addr).await;
    }
    let s = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Connects to an endpoint with a timeout and `TCP_NODELAY`.
async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A resumable flow ending here, listed in [`Forwarder`]'s `resumes` while it lives.
struct Registered<'a> {
    fwd: &'a Forwarder,
    token: resume::Token,
}

impl<'a> Registered<'a> {
    /// Lists the flow `token`; `None` if a live flow already has that token.
    fn new(
        fwd: &'a Forwarder,
        token: resume::Token,
        header: &FlowHeader,
        mailbox: Arc<Mailbox>,
    ) -> Option<Registered<'a>> {
        let mut flows = lock(&fwd.resumes);
        if flows.contains_key(&token) {
            return None;
        }
        flows.insert(token, (header.vip, header.port, mailbox));
        Some(Registered { fwd, token })
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.fwd.resumes).remove(&self.token);
    }
}

/// Opens a stream on `conn` and writes the flow header (with the resumable-flow extension
/// `ext`, if given).
pub(super) async fn open(
    conn: &quinn::Connection,
    header: &FlowHeader,
    ext: Option<&ResumeExt>,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(96);
    header.encode_with(ext, &mut buf);
    send.write_all(&buf).await.map_err(|e| e.to_string())?;
    Ok((send, recv))
}

/// Reads the flow header that starts a stream, with its resumable-flow extension if any.
async fn read_header(recv: &mut quinn::RecvStream) -> Result<(FlowHeader, Option<ResumeExt>), String> {
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err("header too long".into());
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    FlowHeader::decode_stream(&body).map_err(|e| e.to_string())
}

/// Relays one direction between two QUIC streams, carrying finish and reset across.
async fn pipe_quic(mut from: quinn::RecvStream, mut to: quinn::SendStream) -> u64 {
    let mut total = 0u64;
    let mut chunks: [Bytes; CHUNKS] = std::array::from_fn(|_| Bytes::new());
    let mut pace = super::priority::SmallFirst::new(std::time::Instant::now());
    let _ = to.set_priority(pace.priority());
    loop {
        match from.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                let bytes = chunks[..n].iter().map(|c| c.len()).sum::<usize>();
                total += bytes as u64;
                if let Some(p) = pace.on_send(bytes, std::time::Instant::now()) {
                    let _ = to.set_priority(p);
                }
                if let Err(e) = to.write_all_chunks(&mut chunks[..n]).await {
                    let code = match e {
                        quinn::WriteError::Stopped(code) => code,
                        _ => codes::RESET.into(),
                    };
                    let _ = from.stop(code);
                    return total;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return total;
            }
            Err(quinn::ReadError::Reset(code)) => {
                let _ = to.reset(code);
                return total;
            }
            Err(_) => {
                let _ = to.reset(codes::RESET.into());
                return total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A writer that takes at most `limit` bytes per call, across however many slices.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored_inner(&[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored_inner(bufs)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Trickle {
        fn poll_write_vectored_inner(&mut self, bufs: &[IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.limit - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }
    }

    #[tokio::test]
    async fn every_chunk_goes_out_in_order_across_partial_writes() {
        let parts: [&[u8]; 5] = [b"hello", b"", b" ", b"causeway", b"!"];
        let mut chunks: Vec<Bytes> = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let mut w = Trickle {
            out: Vec::new(),
            limit: 3,
            calls: 0,
        };
        let n = write_all_chunks(&mut w, &mut chunks).await.unwrap();
        assert_eq!(n, 15);
        assert_eq!(w.out, b"hello causeway!");
        assert_eq!(w.calls, 5, "each call fills its limit across slices");

        let mut w = Trickle {
            out: Vec::new(),
            limit: usize::MAX,
            calls: 0,
        };
        let mut chunks: Vec<Bytes> = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        write_all_chunks(&mut w, &mut chunks).await.unwrap();
        assert_eq!((w.out.as_slice(), w.calls), (&b"hello causeway!"[..], 1), "one writev");
        assert_eq!(write_all_chunks(&mut w, &mut []).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error_not_a_spin() {
        let mut w = Trickle {
            out: Vec::new(),
            limit: 0,
            calls: 0,
        };
        let err = write_all_chunks(&mut w, &mut [Bytes::from_static(b"x")])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero);
    }
}
