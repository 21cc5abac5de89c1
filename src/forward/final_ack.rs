//! The final acks of resumable TCP flows, written together on a shared tick.
//!
//! A resumable flow ([`super::session`]) ends with one frame more than a plain one: the end
//! that closed first acknowledges the other's FIN, which the other waits for before it lets go
//! of its state. Sent at once, that ack and its stream's finish took a packet of their own per
//! flow, and the peer's acknowledgement of that packet another: about a quarter of what a
//! short connection costs the two agents (`bench/instructions.sh`). Nothing else is waiting
//! for it (the peer's application has everything), so a flow whose only remaining frame is
//! its final ack hands the stream here and ends; every [`TICK`] the queue is written out in one
//! go, and each connection carries the final acks of all its flows that ended meanwhile in
//! one packet.
//!
//! Bounded: the queue holds one entry per flow that ended within a tick, each about 70 bytes
//! (its stream keeps a QUIC stream slot meanwhile, so a connection's stream limit bounds it
//! too). A stream that cannot take its 9 bytes now (its connection's send buffer is full) is
//! retried on every tick until `links.idle_timeout`, as long as its peer waits for a resume,
//! then reset with `GONE`. After shutdown an ack is written at once or not at all, and what is
//! still blocked is reset with `GONE`, so the peer ends its flow instead of waiting for a
//! resume that cannot come.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{codes, lock};

/// How long a final ack may wait for others to share its packet. Short against what the peer
/// holds meanwhile (a finished flow's socket and state) and long against the gap between
/// short connections under load (about 150 µs on 2 vCPUs), so a batch carries tens.
pub(super) const TICK: Duration = Duration::from_millis(5);

/// One final ack waiting for the next tick.
struct Pending {
    send: quinn::SendStream,
    /// The ack frame (`resume::ack_bytes`), then nothing: the stream is finished after it.
    frame: Bytes,
    /// When it was queued: a stream still blocked `give_up` later is reset.
    since: Instant,
}

/// The queue of final acks and the tick that writes them (see the module doc).
pub(super) struct FinalAcks {
    queue: Mutex<Vec<Pending>>,
    /// Wakes [`FinalAcks::run`] when the queue goes from empty to not: an idle agent has no
    /// timer running.
    queued: Notify,
    /// How long a blocked ack is retried (`links.idle_timeout`: the peer waits as long).
    give_up: Duration,
    /// [`FinalAcks::run`] has returned: acks are written at once, or not at all.
    closed: AtomicBool,
}

impl FinalAcks {
    /// An empty queue whose blocked acks are retried for `give_up`.
    pub(super) fn new(give_up: Duration) -> FinalAcks {
        FinalAcks {
            queue: Mutex::new(Vec::new()),
            queued: Notify::new(),
            give_up,
            closed: AtomicBool::new(false),
        }
    }

    /// Queues `frame` (an ack frame) as the last thing `send` carries before it is finished.
    pub(super) fn put(&self, send: quinn::SendStream, frame: Bytes) {
        let mut p = Pending {
            send,
            frame,
            since: Instant::now(),
        };
        if self.closed.load(Ordering::Relaxed) {
            if !write(&mut p, &mut Context::from_waker(Waker::noop())) {
                let _ = p.send.reset(quinn::VarInt::from_u32(codes::GONE));
            }
            return;
        }
        let mut q = lock(&self.queue);
        q.push(p);
        if q.len() == 1 {
            self.queued.notify_one();
        }
    }

    /// Writes the queue out every [`TICK`] while it is not empty, until `shutdown`; then once
    /// more, resetting what is still blocked, and from then on [`FinalAcks::put`] writes at
    /// once.
    pub(super) async fn run(&self, shutdown: CancellationToken) {
        'run: loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.queued.notified() => {}
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'run,
                    _ = tokio::time::sleep(TICK) => {}
                }
                if self.flush(Instant::now()) == 0 {
                    break;
                }
            }
        }
        self.closed.store(true, Ordering::Relaxed);
        self.flush(Instant::now() + self.give_up);
    }

    /// Writes and finishes every queued stream that takes its frame now, and resets those
    /// blocked since `give_up` before `now`; returns how many are left for the next tick.
    fn flush(&self, now: Instant) -> usize {
        let batch = std::mem::take(&mut *lock(&self.queue));
        if batch.is_empty() {
            return 0;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut left = Vec::new();
        for mut p in batch {
            if write(&mut p, &mut cx) {
                continue;
            }
            if now.saturating_duration_since(p.since) >= self.give_up {
                let _ = p.send.reset(quinn::VarInt::from_u32(codes::GONE));
            } else {
                left.push(p);
            }
        }
        let n = left.len();
        if n > 0 {
            lock(&self.queue).append(&mut left);
        }
        n
    }
}

/// Writes `p`'s frame and finishes its stream; `false` when the stream has no room for it
/// now (it is retried on the next tick: a noop waker, since the tick polls again anyway). A
/// stream that failed (its connection lost, the peer stopped it) counts as done: there is
/// nobody left to tell.
fn write(p: &mut Pending, cx: &mut Context<'_>) -> bool {
    while !p.frame.is_empty() {
        match p.send.poll_write_chunks(cx, std::slice::from_mut(&mut p.frame)) {
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(_)) => return true,
            Poll::Pending => return false,
        }
    }
    let _ = p.send.finish();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A QUIC connection over loopback (a self-signed certificate, no client auth): the
    /// client's end and the server's.
    async fn pair() -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
        let provider = crate::identity::provider();
        let tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.into())
            .unwrap();
        let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client_cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_cfg);
        let addr = server.local_addr().unwrap();
        let (c, s) = tokio::join!(
            async { client.connect(addr, "localhost").unwrap().await.unwrap() },
            async { server.accept().await.unwrap().await.unwrap() }
        );
        (client, c, s)
    }

    /// Every queued ack arrives, followed by its stream's end, on the next tick; the acks of
    /// many flows queued together leave in a few packets, not one each. (On the test's
    /// single-threaded runtime the connection's driver cannot send between the writes of one
    /// flush; on the agent's, batching is best effort.)
    #[tokio::test]
    async fn queued_acks_arrive_together_and_finish_their_streams() {
        let (_ep, client, server) = pair().await;
        const FLOWS: u64 = 50;
        let mut sends = Vec::new();
        for i in 0..FLOWS {
            let (mut send, recv) = client.open_bi().await.unwrap();
            // A stream exists at the server once it carries something.
            send.write_all(&[i as u8]).await.unwrap();
            sends.push((send, recv));
        }
        let mut accepted = Vec::new();
        for _ in 0..FLOWS {
            let (send, mut recv) = server.accept_bi().await.unwrap();
            let mut b = [0u8; 1];
            recv.read_exact(&mut b).await.unwrap();
            accepted.push((b[0], send));
        }
        let finals = Arc::new(FinalAcks::new(Duration::from_secs(30)));
        let shutdown = CancellationToken::new();
        let runner = tokio::spawn({
            let (f, s) = (finals.clone(), shutdown.clone());
            async move { f.run(s).await }
        });
        let before = server.stats().path.sent_packets;
        for (i, send) in accepted {
            finals.put(send, Bytes::from(vec![i; 9]));
        }
        for (i, (_send, recv)) in sends.iter_mut().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64))
                .await
                .expect("the ack arrives")
                .unwrap();
            assert_eq!(got, vec![i as u8; 9], "flow {i}");
        }
        let packets = server.stats().path.sent_packets - before;
        // One each was 50 (and more ACKs back); the count includes ACKs for the setup.
        assert!(packets <= FLOWS / 5, "{FLOWS} final acks took {packets} packets");
        assert!(lock(&finals.queue).is_empty());
        shutdown.cancel();
        runner.await.unwrap();
    }

    /// A stopped runner still writes what was queued before it stopped, and from then on
    /// writes each ack at once; a stream whose connection is gone counts as done.
    #[tokio::test]
    async fn shutdown_flushes_and_later_acks_go_at_once() {
        let (_ep, client, server) = pair().await;
        let finals = FinalAcks::new(Duration::from_secs(30));
        let mut flows = Vec::new();
        for _ in 0..2 {
            let (mut send, recv) = client.open_bi().await.unwrap();
            send.write_all(b"x").await.unwrap();
            let (ssend, mut srecv) = server.accept_bi().await.unwrap();
            srecv.read_exact(&mut [0u8; 1]).await.unwrap();
            flows.push((send, recv, ssend));
        }
        let (_, mut recv2, ssend2) = flows.pop().unwrap();
        let (_, mut recv1, ssend1) = flows.pop().unwrap();
        finals.put(ssend1, Bytes::from_static(b"final-ack"));
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        finals.run(shutdown).await;
        assert_eq!(recv1.read_to_end(64).await.unwrap(), b"final-ack");
        finals.put(ssend2, Bytes::from_static(b"at-once"));
        assert!(lock(&finals.queue).is_empty(), "written, not queued");
        assert_eq!(recv2.read_to_end(64).await.unwrap(), b"at-once");

        let finals = FinalAcks::new(Duration::from_secs(30));
        let (mut ssend, _srecv) = server.open_bi().await.unwrap();
        ssend.write_all(b"y").await.unwrap();
        server.close(0u32.into(), b"gone");
        finals.put(ssend, Bytes::from_static(b"final-ack"));
        assert_eq!(
            finals.flush(Instant::now()),
            0,
            "a stream of a closed connection is not retried"
        );
    }

    /// An ack whose stream has no room (the peer does not read it, so its window is full) is
    /// kept for the next tick, and reset with GONE once blocked for `give_up`, so the peer
    /// ends the flow instead of waiting for it.
    #[tokio::test]
    async fn a_blocked_ack_is_retried_then_reset_with_gone() {
        let (_ep, client, server) = pair().await;
        let (mut csend, mut crecv) = client.open_bi().await.unwrap();
        csend.write_all(b"x").await.unwrap();
        let (mut send, mut recv) = server.accept_bi().await.unwrap();
        recv.read_exact(&mut [0u8; 1]).await.unwrap();
        // Fill the stream's window: the client never reads.
        let block = vec![0u8; 16 * 1024];
        while tokio::time::timeout(Duration::from_millis(100), send.write_all(&block))
            .await
            .is_ok()
        {}
        let give_up = Duration::from_secs(30);
        let finals = FinalAcks::new(give_up);
        finals.put(send, Bytes::from_static(b"final-ack"));
        let now = Instant::now();
        assert_eq!(finals.flush(now), 1, "blocked: kept for the next tick");
        assert_eq!(finals.flush(now + give_up), 0, "given up");
        let err = loop {
            match crecv.read_chunk(usize::MAX, true).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream finished: the ack went out"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, quinn::ReadError::Reset(c) if c == codes::GONE.into()),
            "{err:?}"
        );
    }
}
