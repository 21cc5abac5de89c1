//! In-memory QUIC bulk transfer between two `quinn-proto` state machines, for counting the
//! instructions the link layer spends per byte (`valgrind --tool=callgrind`), which this
//! project's VM cannot measure in CPU time to better than ±15%.
//!
//! ```text
//! cargo build --release --example quicpair
//! valgrind --tool=callgrind target/release/examples/quicpair --mib 64
//! ```
//!
//! Both ends use the links' own transport settings and cipher suites
//! (`quic::transport_config`, `identity::provider`). There are no sockets and no clock:
//! every round moves all packets one way and then the other and advances a simulated clock by
//! `--tick-us`, so the packet and ACK pattern resembles a fast LAN and the instruction count
//! repeats from run to run. Like the agents, the sender hands quinn whole 256 KiB chunks
//! (`write_chunks`) and sends up to 40 packets per transmit (GSO); the receiver takes chunks
//! without copying (`read`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig,
    StreamId,
};

const CHUNK: usize = 256 * 1024;
const SEGMENTS: usize = 40;

struct Side {
    addr: SocketAddr,
    ep: Endpoint,
    conn: Option<(ConnectionHandle, Connection)>,
    /// Whether this side reads the stream (the server) rather than writes it.
    reads: bool,
    /// Datagrams sent to this side, not yet handled.
    inbox: VecDeque<(SocketAddr, BytesMut)>,
}

fn main() -> anyhow::Result<()> {
    let mut mib = 64u64;
    let mut tick_us = 20u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().unwrap_or_default().parse()?,
            "--tick-us" => tick_us = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let total = mib * 1024 * 1024;
    // As in the agent: a subscriber is set, so quinn's per-packet trace spans stay disabled.
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let tick = Duration::from_micros(tick_us);

    let provider = causeway::identity::provider();
    let cert = rcgen::generate_simple_self_signed(vec!["server".into()])?;
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)?;
    tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut server_config = ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    server_config.transport_config(Arc::new(causeway::quic::transport_config(
        &causeway::quic::LinkTiming::default(),
    )));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut client_config = ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    client_config.transport_config(Arc::new(causeway::quic::transport_config(
        &causeway::quic::LinkTiming::default(),
    )));

    let ep_config = Arc::new(EndpointConfig::default());
    let mut client = Side {
        addr: "10.0.0.1:4433".parse()?,
        ep: Endpoint::new(ep_config.clone(), None, true, Some([1; 32])),
        conn: None,
        reads: false,
        inbox: VecDeque::new(),
    };
    let mut server = Side {
        addr: "10.0.0.2:4433".parse()?,
        ep: Endpoint::new(ep_config, Some(Arc::new(server_config)), true, Some([2; 32])),
        conn: None,
        reads: true,
        inbox: VecDeque::new(),
    };
    let mut now = Instant::now();
    let started = now;
    client.conn = Some(client.ep.connect(now, client_config, server.addr, "server")?);

    let chunk = Bytes::from(vec![0x5au8; CHUNK]);
    let mut stream: Option<StreamId> = None;
    let mut queued = 0u64; // bytes handed to quinn
    let mut received = 0u64;
    let mut rounds = 0u64;
    let mut datagrams = 0u64;
    let mut transmits = 0u64;
    let mut buf = Vec::with_capacity(SEGMENTS * 1500);
    while received < total {
        rounds += 1;
        anyhow::ensure!(rounds < 50_000_000, "no progress: {received} of {total} bytes");
        // The sender keeps its stream full, as an agent reading a fast TCP socket does.
        if let Some((_, conn)) = client.conn.as_mut() {
            if stream.is_none() && !conn.is_handshaking() {
                stream = conn.streams().open(Dir::Uni);
            }
            if let Some(id) = stream {
                while queued < total {
                    let mut chunks = [chunk.clone()];
                    match conn.send_stream(id).write_chunks(&mut chunks) {
                        Ok(w) if w.bytes > 0 => queued += w.bytes as u64,
                        _ => break,
                    }
                }
            }
        }
        for side in [&mut client, &mut server] {
            if let Some((_, conn)) = side.conn.as_mut()
                && conn.poll_timeout().is_some_and(|t| t <= now)
            {
                conn.handle_timeout(now);
            }
        }
        let (sent_c, tx_c) = transmit(&mut client, &mut server.inbox, now, &mut buf);
        deliver(&mut server, now, &mut buf, &mut received)?;
        let (sent_s, tx_s) = transmit(&mut server, &mut client.inbox, now, &mut buf);
        deliver(&mut client, now, &mut buf, &mut received)?;
        datagrams += (sent_c + sent_s) as u64;
        transmits += (tx_c + tx_s) as u64;
        now += tick;
    }
    let stats = client.conn.as_ref().map(|(_, c)| c.stats());
    println!(
        "{{\"bytes\":{received},\"rounds\":{rounds},\"datagrams\":{datagrams},\"transmits\":{transmits},\
         \"simulated_ms\":{},\"client_stats\":\"{:?}\"}}",
        (now - started).as_millis(),
        stats.map(|s| (s.path.sent_packets, s.frame_rx.acks, s.path.cwnd)),
    );
    Ok(())
}

/// Everything `side` wants to send now, as GSO-sized transmits split into datagrams.
fn transmit(
    side: &mut Side,
    to: &mut VecDeque<(SocketAddr, BytesMut)>,
    now: Instant,
    buf: &mut Vec<u8>,
) -> (usize, usize) {
    let (mut datagrams, mut transmits) = (0, 0);
    let Some((_, conn)) = side.conn.as_mut() else {
        return (0, 0);
    };
    loop {
        buf.clear();
        let Some(t) = conn.poll_transmit(now, SEGMENTS, buf) else {
            break;
        };
        transmits += 1;
        // As quinn's endpoint does with a GRO batch: one copy out of the socket buffer, then
        // one datagram after another split off it.
        let seg = t.segment_size.unwrap_or(t.size);
        let mut batch = BytesMut::from(&buf[..t.size]);
        while !batch.is_empty() {
            to.push_back((side.addr, batch.split_to(seg.min(batch.len()))));
            datagrams += 1;
        }
    }
    drain_endpoint_events(side);
    (datagrams, transmits)
}

/// Lets the endpoint see what the connection tells it (new connection ids and the like).
fn drain_endpoint_events(side: &mut Side) {
    let Side { ep, conn, .. } = side;
    let Some((ch, conn)) = conn.as_mut() else { return };
    while let Some(ev) = conn.poll_endpoint_events() {
        if let Some(back) = ep.handle_event(*ch, ev) {
            conn.handle_event(back);
        }
    }
}

/// Hands every queued datagram to `side` and reads whatever its streams now hold.
fn deliver(side: &mut Side, now: Instant, buf: &mut Vec<u8>, received: &mut u64) -> anyhow::Result<()> {
    while let Some((from, data)) = side.inbox.pop_front() {
        buf.clear();
        match side.ep.handle(now, from, None, None, data, buf) {
            Some(DatagramEvent::NewConnection(incoming)) => {
                let accepted = side.ep.accept(incoming, now, buf, None);
                side.conn = Some(accepted.map_err(|e| anyhow::anyhow!("accept: {:?}", e.cause))?);
            }
            Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                if let Some((_, conn)) = side.conn.as_mut() {
                    conn.handle_event(ev);
                }
            }
            Some(DatagramEvent::Response(_)) | None => {}
        }
    }
    drain_endpoint_events(side);
    let Some((_, conn)) = side.conn.as_mut() else {
        return Ok(());
    };
    while let Some(ev) = conn.poll() {
        if let Event::ConnectionLost { reason } = ev {
            anyhow::bail!("connection lost: {reason}");
        }
    }
    while conn.streams().accept(Dir::Uni).is_some() {}
    // The server reads stream 0 (the only one) in whole chunks, as read_chunks does.
    let id = StreamId::new(quinn_proto::Side::Client, Dir::Uni, 0);
    if side.reads
        && let Ok(mut chunks) = conn.recv_stream(id).read(true)
    {
        while let Ok(Some(c)) = chunks.next(usize::MAX) {
            *received += c.bytes.len() as u64;
        }
        let _ = chunks.finalize();
    }
    Ok(())
}
