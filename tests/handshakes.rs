//! End to end: a flood of QUIC handshakes that never complete (issue 15 item 5) must not
//! lock sites out of an agent.
//!
//! A flooder in the test process builds real QUIC Initial datagrams with quinn-proto (in
//! memory, no sockets of its own) and sends about 300 a second, each from a fresh source
//! port, at one agent for 20 s, on two source addresses. Most never answer anything; a few
//! (from a third address) answer the agent's Retry once and then go silent, so they hold real
//! handshake slots. Meanwhile the agent must keep its memory bounded, complete a legitimate
//! redemption, let a cut link recover quickly, and send the silent flooders no more bytes
//! than they sent it (no reflection or amplification).

mod common;

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Site, wait_for};

/// Initials per second the flooder sends.
const RATE: u32 = 300;
/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(20);
/// How long each flood socket stays open to collect what the agent sends back.
const LINGER: Duration = Duration::from_millis(2500);
/// Every `ANSWER_EVERY`-th Initial comes from a flooder that answers the Retry once.
const ANSWER_EVERY: u64 = 10;

/// What the flooder sent and got back, per kind of flooder.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    datagrams_sent: u64,
    bytes_sent: u64,
    datagrams_received: u64,
    bytes_received: u64,
}

/// One flood socket waiting for the agent's answers.
struct Pending {
    socket: UdpSocket,
    opened: Instant,
    /// For a flooder that answers the Retry: its client state until it has answered.
    answer: Option<(quinn_proto::Endpoint, quinn_proto::Connection)>,
}

/// A client configuration for the flooder's Initials (the server is never verified: the
/// handshake never gets that far).
fn flood_client_config() -> quinn_proto::ClientConfig {
    let tls = rustls::ClientConfig::builder_with_provider(causeway::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut tls = tls;
    tls.alpn_protocols = vec![b"causeway-link/1".to_vec()];
    quinn_proto::ClientConfig::new(Arc::new(
        quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client config"),
    ))
}

/// A fresh client endpoint and connection to `target`, and the first datagram it would send
/// (the client's Initial, padded to 1,200 bytes or more).
fn initial(
    config: &quinn_proto::ClientConfig,
    target: SocketAddr,
) -> (quinn_proto::Endpoint, quinn_proto::Connection, Vec<u8>) {
    let mut ep = quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, None);
    let now = Instant::now();
    let (_, mut conn) = ep.connect(now, config.clone(), target, "london").expect("connect");
    let mut buf = Vec::new();
    let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial to send");
    buf.truncate(t.size);
    (ep, conn, buf)
}

/// Reads everything waiting on `p`'s socket into `tally`; a flooder that answers feeds the
/// first thing it gets (the Retry) to its client and sends the resulting Initial, once.
fn drain(p: &mut Pending, target: SocketAddr, tally: &mut Tally) {
    let mut buf = [0u8; 65536];
    while let Ok((n, from)) = p.socket.recv_from(&mut buf) {
        tally.datagrams_received += 1;
        tally.bytes_received += n as u64;
        let Some((mut ep, mut conn)) = p.answer.take() else {
            continue;
        };
        let now = Instant::now();
        let mut out = Vec::new();
        if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, ev)) =
            ep.handle(now, from, None, None, bytes::BytesMut::from(&buf[..n]), &mut out)
        {
            conn.handle_event(ev);
            let mut tx = Vec::new();
            if let Some(t) = conn.poll_transmit(now, 1, &mut tx)
                && p.socket.send_to(&tx[..t.size], target).is_ok()
            {
                tally.datagrams_sent += 1;
                tally.bytes_sent += t.size as u64;
            }
        }
    }
}

/// Floods `target` until `stop` is set or [`FLOOD`] passes; returns what the silent flooders
/// and the answering flooders each sent and received.
fn flood(target: SocketAddr, stop: Arc<AtomicBool>) -> (Tally, Tally) {
    let config = flood_client_config();
    let (mut silent, mut answering) = (Tally::default(), Tally::default());
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let start = Instant::now();
    let interval = Duration::from_secs(1) / RATE;
    let mut next = start;
    let mut n: u64 = 0;
    while start.elapsed() < FLOOD && !stop.load(Ordering::Relaxed) {
        n += 1;
        let answers = n % ANSWER_EVERY == 0;
        let source = if answers {
            "127.0.0.3:0"
        } else if n % 2 == 0 {
            "127.0.0.2:0"
        } else {
            "127.0.0.1:0"
        };
        let socket = UdpSocket::bind(source).expect("bind a flood socket");
        socket.set_nonblocking(true).expect("nonblocking");
        let (ep, conn, datagram) = initial(&config, target);
        if socket.send_to(&datagram, target).is_ok() {
            let t = if answers { &mut answering } else { &mut silent };
            t.datagrams_sent += 1;
            t.bytes_sent += datagram.len() as u64;
        }
        pending.push_back(Pending {
            socket,
            opened: Instant::now(),
            answer: answers.then_some((ep, conn)),
        });
        for p in pending.iter_mut().filter(|p| p.answer.is_some()) {
            drain(p, target, &mut answering);
        }
        while pending.front().is_some_and(|p| p.opened.elapsed() > LINGER) {
            let mut p = pending.pop_front().expect("front");
            let t = if p.answer.is_some() || p.socket.local_addr().is_ok_and(|a| a.ip().to_string() == "127.0.0.3") {
                &mut answering
            } else {
                &mut silent
            };
            drain(&mut p, target, t);
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // Late retransmissions: give every open socket its full linger time.
    std::thread::sleep(LINGER);
    for mut p in pending {
        let answers = p.socket.local_addr().is_ok_and(|a| a.ip().to_string() == "127.0.0.3");
        drain(&mut p, target, if answers { &mut answering } else { &mut silent });
    }
    (silent, answering)
}

/// The agent's resident memory (kB), from /proc.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Raises the test process's open-files limit: the flood keeps ~750 sockets open.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn half_open_handshake_flood_does_not_lock_sites_out() {
    raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let mut paris = Site::started(dir.path(), "paris");
    let rome = Site::started(dir.path(), "rome");
    let token = london.issue(&[], &dir.path().join("paris.token"));
    paris.ok(&["token", "redeem", token.to_str().unwrap()]);
    assert!(wait_for(Duration::from_secs(5), || london.link_up("paris")));
    let pid = london.pid().expect("london runs");
    let rss_before = rss_kb(pid).expect("london's RSS");

    let target: SocketAddr = format!("127.0.0.1:{}", london.port).parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || flood(target, stop))
    };
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < FLOOD + LINGER && !stop.load(Ordering::Relaxed) {
                if let Some(kb) = rss_kb(pid) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // The flood builds up; then paris restarts and must find london again.
    std::thread::sleep(Duration::from_secs(5));
    paris.kill();
    let cut = Instant::now();
    paris.start();
    let started = cut.elapsed();
    let up = wait_for(Duration::from_secs(15), || paris.link_up("london"));
    let recovery = cut.elapsed();
    let acceptor_up = wait_for(Duration::from_secs(5), || london.link_up("paris"));

    // A legitimate redemption during the flood.
    let token = london.issue(&[], &dir.path().join("rome.token"));
    let t = Instant::now();
    let redeem = rome.cli(&["token", "redeem", token.to_str().unwrap()]);
    let redeem_took = t.elapsed();

    let (silent, answering) = flooder.join().expect("flooder");
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak_kb = peak.load(Ordering::Relaxed);
    let rss_after = rss_kb(pid).unwrap_or(0);
    let log = london.log_text();
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    eprintln!(
        "london RSS: {rss_before} kB before, peak {peak_kb} kB during, {rss_after} kB after the flood\n\
         paris restart: agent up after {started:?}, link up after {recovery:?} (up: {up}, acceptor: {acceptor_up})\n\
         rome redeem: {:?} in {redeem_took:?}\n\
         silent flooders: {silent:?} (ratio {:.3})\n\
         answering flooders: {answering:?} (ratio {:.3})\n\
         WARN lines in london's log: {warns}",
        redeem.status,
        silent.bytes_received as f64 / silent.bytes_sent.max(1) as f64,
        answering.bytes_received as f64 / answering.bytes_sent.max(1) as f64,
    );

    assert!(
        silent.datagrams_sent >= u64::from(RATE) * FLOOD.as_secs() * 8 / 10 * (ANSWER_EVERY - 1) / ANSWER_EVERY,
        "the flooder fell behind: {silent:?}"
    );
    assert!(
        redeem.status.success(),
        "redeem during the flood failed: {}\n{}",
        String::from_utf8_lossy(&redeem.stderr),
        common::tail(&log, 40)
    );
    assert!(
        up && acceptor_up,
        "the link did not recover:\n{}",
        common::tail(&paris.log_text(), 40)
    );
    assert!(
        recovery < Duration::from_secs(2),
        "the link took {recovery:?} to recover during the flood"
    );
    assert!(peak_kb < 100 * 1024, "london's RSS peaked at {peak_kb} kB");
    assert!(
        silent.bytes_received <= silent.bytes_sent,
        "the agent reflected more than it got: {silent:?}"
    );
    // The flooders that answer the Retry hit the per-source limit: refused, and said so once
    // per 10 s.
    assert!(
        log.contains("handshake refused: too many in flight"),
        "no handshake was refused:\n{}",
        common::tail(&log, 40)
    );
    assert!(
        warns < 20,
        "the flood filled the log with warnings:\n{}",
        common::tail(&log, 40)
    );
    assert!(rome.link_up("london") || wait_for(Duration::from_secs(5), || rome.link_up("london")));
}
