//! The sockets: UDP and TCP on one address, each message through [`handle`].
//!
//! UDP is served by a few plain threads (one per core, at most four) blocked on the same
//! socket, each answering in place, queries taken and answers sent in batches (`batch`): a
//! zone answer costs no task, wakeup or channel and a fraction of two system calls, which is
//! what lets the responder keep up with unbound (see docs/BENCHMARKS.md, `## DNS`). A read timeout lets them notice shutdown. Only forwarded
//! queries go to the tokio runtime as tasks, at most [`MAX_FORWARDS`] at once (beyond that
//! they are dropped, and the client retries); their answers are sent on the same blocking
//! socket, where a UDP send does not wait.
//!
//! TCP (RFC 7766) runs on tokio: at most [`MAX_TCP_CONNECTIONS`] connections, closed after
//! [`TCP_IDLE`] without a query; pipelined queries are read while earlier ones are being
//! forwarded, and answers are written as they are ready, so one slow upstream does not hold
//! up zone answers on the same connection.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span};

use super::batch::{self, Batch};
use super::{Asker, DnsError, Outcome, Settings, Stats, Transport, handle};
use crate::catalog::View;
use crate::conntable::{ConnTable, Slot};

/// Forwarded queries in flight at once, over all sockets.
pub const MAX_FORWARDS: usize = 1024;
/// Open TCP connections per address; a new one past this closes the idlest.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection with no query for this long is closed (RFC 7766 §6.2.3 suggests seconds).
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Time allowed to read the rest of a TCP message, or to write an answer.
const TCP_IO: Duration = Duration::from_secs(5);
/// Forwarded queries in flight on one TCP connection.
const TCP_PIPELINE: usize = 16;
/// Socket receive buffer asked for (the kernel caps it at net.core.rmem_max): absorbs bursts.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// How often a UDP thread blocked in `recv_from` looks up to see whether to stop.
const UDP_POLL: Duration = Duration::from_millis(100);

/// What every socket task shares.
pub(crate) struct Shared {
    /// Zone, upstreams and forwarding policy; each query reads the newest.
    pub settings: watch::Receiver<Arc<Settings>>,
    /// The mesh's views; each query reads the newest.
    pub views: watch::Receiver<Arc<View>>,
    pub stats: Arc<Stats>,
    /// Bounds forwarded queries in flight.
    pub forwards: Arc<Semaphore>,
}

impl Shared {
    /// Runs one message through [`handle`] against the newest view and settings, counting
    /// the outcome.
    fn handle(&self, packet: &[u8], transport: Transport, client: IpAddr, server: Option<IpAddr>) -> Outcome {
        let view = self.views.borrow().clone();
        let settings = self.settings.borrow().clone();
        let asker = Asker {
            may_forward: settings.policy.admits(client),
            server,
            local: super::is_local(client, &settings.own),
        };
        let outcome = handle(packet, transport, &view, &settings.authority, asker);
        if let Outcome::Reply(bytes) = &outcome {
            self.stats.reply(bytes);
        }
        outcome
    }

    /// Forwards `query`; the answer, or `servfail` if no upstream gives one.
    async fn forward(&self, query: &[u8], client_tcp: bool, servfail: Vec<u8>) -> Vec<u8> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let settings = self.settings.borrow().clone();
        match settings.upstream.forward(query, client_tcp).await {
            Ok(answer) => answer,
            Err(e) => {
                debug!(error = %e, "forwarding failed; answering SERVFAIL");
                self.stats.reply(&servfail);
                servfail
            }
        }
    }
}

/// Binds UDP and TCP on `addr`; with port 0, on one port the OS chose for both.
pub(crate) fn bind(addr: SocketAddr) -> Result<(std::net::UdpSocket, TcpListener, SocketAddr), DnsError> {
    let mut attempts = 0;
    loop {
        let udp = udp_socket(addr).map_err(|source| DnsError::Bind {
            addr,
            proto: "udp",
            source,
        })?;
        let local = udp.local_addr().map_err(|source| DnsError::Bind {
            addr,
            proto: "udp",
            source,
        })?;
        match tcp_listener(local) {
            Ok(tcp) => return Ok((udp, tcp, local)),
            // The port the OS gave UDP may be taken for TCP: try another.
            Err(e) if addr.port() == 0 && attempts < 10 => {
                attempts += 1;
                debug!(error = %e, port = local.port(), "TCP port taken; choosing another");
            }
            Err(source) => {
                return Err(DnsError::Bind {
                    addr,
                    proto: "tcp",
                    source,
                });
            }
        }
    }
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` and `0.0.0.0` may both be listed; each binds its own family.
        socket.set_only_v6(true)?;
    }
    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    socket.set_read_timeout(Some(UDP_POLL))?;
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    if addr.ip().is_unspecified() {
        // Replies must leave from the address each query was sent to (batch.rs).
        batch::enable_pktinfo(&socket, addr.is_ipv6())?;
    }
    Ok(socket)
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A restarted agent can bind again while old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Receives and answers datagrams until `cancel` (a blocking loop: run it on its own thread).
pub(crate) fn serve_udp(
    socket: Arc<std::net::UdpSocket>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    runtime: tokio::runtime::Handle,
    tasks: TaskTracker,
) {
    let bound = socket.local_addr().ok().map(|a| a.ip());
    let wildcard = bound.is_some_and(|a| a.is_unspecified());
    let mut batch = Batch::new(wildcard);
    let mut answers = Vec::with_capacity(batch::BATCH);
    while !cancel.is_cancelled() {
        let n = match batch.recv(&socket) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                // Transient (e.g. ENOBUFS); do not spin on a persistent one.
                debug!(error = %e, "receive failed");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        answers.clear();
        for i in 0..n {
            let Some((query, client, local)) = batch.get(i) else {
                // Longer than any query, or from an address family we do not answer.
                shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if client.port() == 0 {
                continue;
            }
            match shared.handle(query, Transport::Udp, client.ip(), local.or(bound)) {
                Outcome::Reply(bytes) => answers.push((bytes, client, local)),
                Outcome::Forward { servfail } => {
                    let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let query = query.to_vec();
                    let (socket, shared) = (socket.clone(), shared.clone());
                    tasks.spawn_on(
                        async move {
                            let answer = shared.forward(&query, false, servfail).await;
                            drop(permit);
                            if let Err(e) = batch::send_from(&socket, &answer, client, local) {
                                debug!(error = %e, %client, "sending a forwarded answer failed");
                            }
                        },
                        &runtime,
                    );
                }
                Outcome::Drop => {}
            }
        }
        batch::send(&socket, &answers);
    }
}

/// Accepts TCP connections until `cancel`.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    // A full table closes its idlest connection for the new one (RFC 7766 §6.2.2: servers may
    // close idle connections to make room): clients that hold connections open with rare
    // queries cannot lock out the ones that ask.
    let table = ConnTable::new(MAX_TCP_CONNECTIONS);
    loop {
        let (stream, client) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        if table.len() >= MAX_TCP_CONNECTIONS {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(%client, "TCP connection table full: closing the idlest connection");
        }
        // Connections are only ever idle here (answers are bounded by TCP_IO), so one is
        // always admitted.
        let Some(slot) = table.admit() else {
            continue;
        };
        let (shared, cancel, inner) = (shared.clone(), cancel.clone(), tasks.clone());
        tasks.spawn(
            async move {
                connection(stream, shared, cancel, inner, slot).await;
            }
            .instrument(debug_span!("dns_tcp", %client)),
        );
    }
}

/// One TCP connection: length-prefixed queries in, length-prefixed answers out.
async fn connection(stream: TcpStream, shared: Arc<Shared>, cancel: CancellationToken, tasks: TaskTracker, slot: Slot) {
    // Closed at shutdown, or when evicted to make room for a new connection.
    let (stop, evicted) = (cancel.clone(), slot.evicted().clone());
    let closed = async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = evicted.cancelled() => {}
        }
    };
    let _ = stream.set_nodelay(true);
    let Ok(client) = stream.peer_addr().map(|a| a.ip()) else {
        return;
    };
    let server = stream.local_addr().ok().map(|a| a.ip());
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_PIPELINE);
    let writer = async move {
        while let Some(answer) = rx.recv().await {
            let Ok(len) = u16::try_from(answer.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&answer);
            if !matches!(timeout(TCP_IO, wr.write_all(&framed)).await, Ok(Ok(()))) {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    let reader = async move {
        let pipeline = Arc::new(Semaphore::new(TCP_PIPELINE));
        loop {
            let len = tokio::select! {
                r = timeout(TCP_IDLE, rd.read_u16()) => match r {
                    Ok(Ok(len)) => len,
                    _ => break,
                },
                _ = cancel.cancelled() => break,
                _ = slot.evicted().cancelled() => break,
            };
            let mut message = vec![0u8; usize::from(len)];
            if !matches!(timeout(TCP_IO, rd.read_exact(&mut message)).await, Ok(Ok(_))) {
                break;
            }
            // Idle again from now: the connection that asked least recently is evicted first.
            slot.idle();
            match shared.handle(&message, Transport::Tcp, client, server) {
                Outcome::Reply(bytes) => {
                    if tx.send(bytes).await.is_err() {
                        break;
                    }
                }
                Outcome::Forward { servfail } => {
                    let Ok(slot) = pipeline.clone().acquire_owned().await else {
                        break;
                    };
                    let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                        // Over the global bound: a TCP client would wait in vain for nothing.
                        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        if tx.send(servfail).await.is_err() {
                            break;
                        }
                        continue;
                    };
                    let (shared, tx) = (shared.clone(), tx.clone());
                    tasks.spawn(async move {
                        let answer = shared.forward(&message, true, servfail).await;
                        drop(permit);
                        let _ = tx.send(answer).await;
                        drop(slot);
                    });
                }
                // Not a DNS query: this is not a DNS client.
                Outcome::Drop => break,
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(reader, writer) } => {}
        // Evicted or shutting down: a writer stuck on a client that does not read goes too.
        _ = closed => {}
    }
}
