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
//! Bounded: a stream that cannot take its 9 bytes (its connection's send buffer is full) is
//! retried on the next ticks, at most [`RETRIES`] times, then reset (the peer's flow then ends
//! with a reset instead of a clean close, as when the connection is lost). At shutdown what
//! is queued is written once more and dropped.

use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{codes, lock};

/// How long a final ack may wait for others to share its packet. Short against what the peer
/// holds meanwhile (a finished flow's socket and state) and long against the gap between
/// short connections under load (about 150 µs on 2 vCPUs), so a batch carries tens.
pub(super) const TICK: Duration = Duration::from_millis(5);
/// Ticks a stream whose connection cannot take its final ack is retried before it is reset.
const RETRIES: u8 = 200;

/// One final ack waiting for the next tick.
struct Pending {
    send: quinn::SendStream,
    /// The ack frame (`resume::ack_bytes`), then nothing: the stream is finished after it.
    frame: Bytes,
    /// Ticks it has waited for room (see [`RETRIES`]).
    tries: u8,
}

/// The queue of final acks and the tick that writes them (see the module doc).
#[derive(Default)]
pub(super) struct FinalAcks {
    queue: Mutex<Vec<Pending>>,
    /// The last batch's vector, empty, swapped in for the next: a busy agent does not
    /// allocate the queue anew on every tick.
    spare: Mutex<Vec<Pending>>,
    /// Wakes [`FinalAcks::run`] when the queue goes from empty to not: an idle agent has no
    /// timer running.
    queued: Notify,
}

impl FinalAcks {
    /// Queues `frame` (an ack frame) as the last thing `send` carries before it is finished.
    pub(super) fn put(&self, send: quinn::SendStream, frame: Bytes) {
        let mut q = lock(&self.queue);
        q.push(Pending { send, frame, tries: 0 });
        if q.len() == 1 {
            self.queued.notify_one();
        }
    }

    /// Writes the queue out every [`TICK`] while it is not empty, until `shutdown`; then once
    /// more.
    pub(super) async fn run(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.queued.notified() => {}
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(TICK) => {}
                }
                if self.flush() == 0 {
                    break;
                }
            }
        }
        self.flush();
    }

    /// Writes and finishes every queued stream that takes its frame now; returns how many
    /// are left for the next tick.
    fn flush(&self) -> usize {
        let mut batch = std::mem::take(&mut *lock(&self.spare));
        std::mem::swap(&mut batch, &mut *lock(&self.queue));
        if batch.is_empty() {
            return 0;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut left = Vec::new();
        for mut p in batch.drain(..) {
            if write(&mut p, &mut cx) {
                continue;
            }
            p.tries += 1;
            if p.tries >= RETRIES {
                let _ = p.send.reset(quinn::VarInt::from_u32(codes::RESET));
            } else {
                left.push(p);
            }
        }
        *lock(&self.spare) = batch;
        let n = left.len();
        if n > 0 {
            lock(&self.queue).append(&mut left);
        }
        n
    }
}

/// Writes `p`'s frame and finishes its stream; `false` when the stream has no room for it
/// now. A stream that failed (its connection lost, the peer stopped it) counts as done: there
/// is nobody left to tell.
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
    /// many flows queued together leave in a few packets, not one each.
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
        let finals = Arc::new(FinalAcks::default());
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
                .expect("the ack arrives within the tick")
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

    /// A stream whose connection is gone counts as done (nobody is left to tell), and a
    /// stopped runner still writes what was queued before it stopped.
    #[tokio::test]
    async fn a_lost_connection_empties_the_queue_and_shutdown_flushes() {
        let (_ep, client, server) = pair().await;
        let (mut send, mut recv) = client.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        let (ssend, mut srecv) = server.accept_bi().await.unwrap();
        srecv.read_exact(&mut [0u8; 1]).await.unwrap();
        let finals = FinalAcks::default();
        finals.put(ssend, Bytes::from_static(b"final-ack"));
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        finals.run(shutdown).await;
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"final-ack");

        let (mut ssend, _srecv) = server.open_bi().await.unwrap();
        ssend.write_all(b"y").await.unwrap();
        server.close(0u32.into(), b"gone");
        finals.put(ssend, Bytes::from_static(b"final-ack"));
        assert_eq!(finals.flush(), 0, "a stream of a closed connection is not retried");
    }
}
