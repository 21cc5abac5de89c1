//! The QUIC layer's settings in one room: the endpoint's UDP socket, the transport every
//! link shares (keep-alives, idle timeout, per-stream flow control, BBR, the MTU bound), the
//! server's limits on waiting attempts, and the TLS 1.3 configurations of acceptor and dialer
//! built over the site's certificates and verifiers ([`crate::identity`], which owns trust).
//! The endpoint also gets a receive-queue probe (`CONGESTED_QUEUE`, `SO_MEMINFO`): while its
//! socket holds more than 1 MiB, the packets it reads count as ECN congestion experienced, so
//! senders shrink their windows before that queue delays every flow (vendored quinn patch 5,
//! quinn-proto patch 6).
//!
//! Every connection of an agent (links and redemptions, in and out) uses these; nothing else
//! in the agent sets a QUIC or TLS option.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::identity::{self, IdentityError, PeerTrust, SiteIdentity};

/// Kernel buffer for the QUIC socket, each way: bursts of a fast link must not overflow the
/// default (~200 KiB), which drops packets before quinn sees them.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Opens the one QUIC endpoint on `addr` with large socket buffers ([`UDP_BUFFER`]): with
/// `server`, accepting connections; without, only dialing. `reset_key` keys its stateless
/// resets ([`SiteIdentity::stateless_reset_key`]).
///
/// Errors: the socket cannot be made or bound (the buffers are best effort).
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key: ring::hmac::Key,
) -> std::io::Result<quinn::Endpoint> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max unless we may force them.
    for force in [true, false] {
        let r = if force {
            force_buffer(&socket, libc::SO_RCVBUFFORCE).and(force_buffer(&socket, libc::SO_SNDBUFFORCE))
        } else {
            socket
                .set_recv_buffer_size(UDP_BUFFER)
                .and(socket.set_send_buffer_size(UDP_BUFFER))
        };
        if r.is_ok() {
            break;
        }
    }
    socket.bind(&addr.into())?;
    let probe = socket.try_clone().ok().and_then(|s| queue_probe(s, congested_queue()));
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::new(Arc::new(reset_key)),
        server,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_receive_congestion_probe(probe);
    Ok(endpoint)
}

/// Bytes queued in the QUIC socket's receive buffer (as the kernel counts them, packet
/// overhead included) above which the agent marks what it reads congestion experienced: the
/// queue in front of a busy agent, which every flow of every link waits behind, is kept near
/// this instead of growing to the buffer's size (16 MiB as the kernel counts it). 1 MiB keeps
/// a single stream's throughput (256 KiB, below the window one stream needs here, cost it
/// about 15%) and the p99 of interactive flows under bulk load at or below socat's
/// (docs/BENCHMARKS.md). `CAUSEWAY_ECN_MARK_BYTES` overrides it (0 turns marking off). The
/// queue is read only after a full receive batch (8 messages of up to 64 KiB each), so a
/// threshold much below 512 KiB is seen late.
const CONGESTED_QUEUE: usize = 1024 * 1024;

fn congested_queue() -> usize {
    std::env::var("CAUSEWAY_ECN_MARK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CONGESTED_QUEUE)
}

/// A probe for [`quinn::Endpoint::set_receive_congestion_probe`]: whether `socket`'s receive
/// queue holds more than `limit` bytes (`SO_MEMINFO`'s `SK_MEMINFO_RMEM_ALLOC`, one
/// `getsockopt` per full batch read). `None` for a `limit` of 0: no probe, no marking.
fn queue_probe(socket: socket2::Socket, limit: usize) -> Option<quinn::CongestionProbe> {
    (limit > 0).then(|| -> quinn::CongestionProbe {
        Arc::new(move || receive_queue(&socket).is_some_and(|queued| queued > limit))
    })
}

/// The bytes in `socket`'s receive queue, from `SO_MEMINFO` (Linux 3.9+).
fn receive_queue(socket: &socket2::Socket) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SK_MEMINFO_VARS is 9 on current kernels; room for more.
    let mut info = [0u32; 16];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt(2) on a socket we own, into a live buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(info[0] as usize)
}

/// `setsockopt(SOL_SOCKET, opt, UDP_BUFFER)` for the privileged *FORCE options.
fn force_buffer(socket: &socket2::Socket, opt: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = UDP_BUFFER as libc::c_int;
    // SAFETY: setsockopt(2) on a socket we own, with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How a link's connections keep alive and when they give up, from `links:` in causeway.yaml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    /// Interval of QUIC keep-alive PINGs: well under `down_after`, so a healthy link is
    /// never silent that long.
    pub keep_alive: Duration,
    /// The QUIC idle timeout (RFC 9000 §10.1): silence after which the connection and its
    /// flows are given up. Both ends advertise one; the shorter applies.
    pub idle_timeout: Duration,
    /// Silence after which a link leaves routing and DNS (its connection stays).
    pub down_after: Duration,
}

impl Default for LinkTiming {
    fn default() -> Self {
        LinkTiming::from(&crate::config::LinksConfig::default())
    }
}

impl From<&crate::config::LinksConfig> for LinkTiming {
    fn from(c: &crate::config::LinksConfig) -> Self {
        LinkTiming {
            keep_alive: c.keep_alive(),
            idle_timeout: c.idle_timeout,
            down_after: c.down_after,
        }
    }
}

/// QUIC transport settings shared by every link: keep-alives and the idle timeout from
/// `timing` (`links:` in causeway.yaml), and per-stream flow control that keeps flows apart.
///
/// **Flow isolation.** There is no connection-level receive limit (`receive_window` unlimited,
/// as quinn's default): a connection-wide window is shared credit, and a few streams whose
/// consumers stopped reading (a client that never reads, a server that never drains an upload)
/// would fill it and stall every other flow on the link. Memory is bounded per stream instead:
/// each stream starts with a [`STREAM_WINDOW_INITIAL`] window that grows (doubling, vendored
/// quinn-proto patch) only as its data is read, up to [`STREAM_WINDOW_MAX`], the
/// bandwidth-delay product of a 100 ms, 1 Gbit/s path, and only while the connection's growth
/// budget ([`STREAM_WINDOW_GROWTH_BUDGET`]) lasts. So a flow nobody reads holds at most 64 KiB
/// at the receiving agent, a fast flow up to 16 MiB, and one link's unread data at most
/// `flows × 64 KiB + 64 MiB` (flows are bounded by `limits.max_flows`; streams past it are
/// refused at once).
pub fn transport_config(timing: &LinkTiming) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(timing.keep_alive));
    // A link that is silent for `down_after` leaves routing and DNS (the session watches for
    // it); its connection waits out `idle_timeout`, so a short outage costs no flow.
    let idle = quinn::IdleTimeout::try_from(timing.idle_timeout)
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::MAX));
    t.max_idle_timeout(Some(idle));
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW_INITIAL));
    t.stream_receive_window_growth(quinn::VarInt::from_u32(STREAM_WINDOW_MAX), STREAM_WINDOW_GROWTH_BUDGET);
    t.receive_window(quinn::VarInt::MAX);
    // Written but unacknowledged data across streams; each stream's share is already bounded
    // by the peer's stream window, so this only caps the total in flight.
    t.send_window(4 * STREAM_WINDOW_MAX as u64);
    // Few streams until the link is established (see HANDSHAKE_BIDI_STREAMS); the session
    // raises it to LINK_BIDI_STREAMS.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(HANDSHAKE_BIDI_STREAMS));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    t.datagram_receive_buffer_size(Some(4 * 1024 * 1024));
    t.datagram_send_buffer_size(4 * 1024 * 1024);
    // BBR, not loss-based Cubic: WAN links between regions drop packets for reasons other
    // than congestion, and Cubic then collapses (1% loss at 100 ms RTT: about 1.4 Mbit/s
    // measured; BBR keeps the pipe full).
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    // Path MTU discovery stops at 1,452-byte UDP payloads (quinn's default, pinned here):
    // the vendored quinn puts up to 40 packets in one GSO send (vendor/quinn/CAUSEWAY.md),
    // and 40 × 1,452 must stay under the 64 KiB a GSO super-packet can carry.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Bidirectional streams the peer may open at once on an established link: one per TCP flow,
/// so above `limits.max_flows` (4,096 by default) with room for relayed flows. Set by
/// `Links::session` once the hello exchange has succeeded.
pub const LINK_BIDI_STREAMS: u32 = 16_384;
/// Bidirectional streams the peer may open at once until then (the handshake, the hello, a
/// redemption; each needs one). quinn-proto creates the state of every stream the peer may
/// open when the connection is created (two hash-map entries each, about 1 MB for 16,384), so
/// this is what a half-open connection costs, and a flood of handshakes with it.
pub const HANDSHAKE_BIDI_STREAMS: u32 = 64;

/// A new stream's receive window (bytes): what a flow whose consumer never reads can hold at
/// the receiving agent. At a 0.1 ms LAN round trip it still carries 650 MB/s before growing.
pub const STREAM_WINDOW_INITIAL: u32 = 64 * 1024;
/// The largest a stream's receive window grows (bytes): above the 12.5 MB bandwidth-delay
/// product of 1 Gbit/s × 100 ms, so one flow can fill such a path.
pub const STREAM_WINDOW_MAX: u32 = 16 * 1024 * 1024;
/// Window growth past [`STREAM_WINDOW_INITIAL`] all streams of one connection may hold
/// together (bytes): four flows at full window.
pub const STREAM_WINDOW_GROWTH_BUDGET: u64 = 4 * STREAM_WINDOW_MAX as u64;

/// The largest QUIC packet (UDP payload) a link grows to; see [`transport_config`].
const MAX_UDP_PAYLOAD: u16 = 1452;
/// QUIC packets per GSO send in the vendored quinn (`MAX_TRANSMIT_SEGMENTS`).
const GSO_SEGMENTS: usize = 40;
const _: () = assert!(
    GSO_SEGMENTS * MAX_UDP_PAYLOAD as usize <= u16::MAX as usize - 28,
    "a GSO batch of full-size packets must fit one UDP datagram's 64 KiB"
);

/// Connection attempts quinn holds for the accept loop before refusing new ones itself
/// (quinn's default is 65,536, each holding its first datagram).
const MAX_INCOMING: usize = 1024;
/// Bytes quinn buffers for one waiting attempt beyond its first datagram (default 10 MiB):
/// no 0-RTT here, so a client sends little before it is accepted.
const INCOMING_BUFFER: u64 = 64 * 1024;
/// Bytes quinn buffers for all waiting attempts together (default 100 MiB).
const INCOMING_BUFFER_TOTAL: u64 = 4 * 1024 * 1024;

/// The acceptor's QUIC server configuration: our agent chain, client certificates required
/// and checked against `trust`, TLS 1.3 only, the given ALPNs.
pub fn server_config(
    id: &SiteIdentity,
    trust: Arc<PeerTrust>,
    alpns: &[&[u8]],
    timing: &LinkTiming,
) -> Result<quinn::ServerConfig, IdentityError> {
    let verifier = identity::link_client_verifier(trust);
    let mut tls = rustls::ServerConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(timing)));
    // The accept loop decides on every attempt at once (crate::handshake), so few wait in
    // quinn's queue; these only bound what a stalled loop could let pile up.
    cfg.max_incoming(MAX_INCOMING);
    cfg.incoming_buffer_size(INCOMING_BUFFER);
    cfg.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// A dialer's QUIC client configuration pinned to one peer CA: the server must present a
/// certificate signed by `peer_ca` for the peer's site id. With `present`, we present our
/// agent chain (links); without, none (redemption, which proves the key differently).
pub fn client_config(
    id: &SiteIdentity,
    peer_ca: &CertificateDer<'static>,
    alpn: &[u8],
    present: bool,
    timing: &LinkTiming,
) -> Result<quinn::ClientConfig, IdentityError> {
    let verifier = identity::pinned_server_verifier(peer_ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = if present {
        builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?
    } else {
        builder.with_no_client_auth()
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(timing)));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe reads the socket's real receive queue: nothing queued is not congested;
    /// datagrams nobody reads fill it past a small limit; a limit of 0 installs no probe.
    #[test]
    fn the_queue_probe_sees_unread_datagrams() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let probe = queue_probe(socket.try_clone().unwrap(), 16 * 1024).unwrap();
        assert!(
            queue_probe(socket.try_clone().unwrap(), 0).is_none(),
            "a limit of 0 marks nothing"
        );
        assert_eq!(receive_queue(&socket), Some(0));
        assert!(!probe());
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..32 {
            sender.send_to(&[7u8; 1200], addr).unwrap();
        }
        assert!(
            receive_queue(&socket).unwrap() > 32 * 1200,
            "{:?}",
            receive_queue(&socket)
        );
        assert!(probe());
    }
}
