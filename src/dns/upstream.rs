//! Forwarding names outside the zone to the configured upstream resolvers.
//!
//! The client's query is relayed byte for byte under a fresh random id, from a fresh socket
//! (random source port), so an off-path attacker cannot guess either; the upstream's answer
//! is accepted only if it comes from that upstream, carries our id and echoes our question,
//! and goes back to the client byte for byte with the client's id restored. Upstreams are
//! tried in order, each over UDP within [`UDP_TIMEOUT`]. An answer with TC set is retried over
//! TCP when the client asked over TCP (a UDP client gets the TC answer and retries over TCP
//! itself, since the full answer would not fit its UDP size either).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Header, MessageType, Query};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use tracing::debug;

use super::DnsError;

/// How long one upstream has to answer over UDP before the next is tried.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP retry (connect, ask, answer) may take.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(4);

/// The upstream resolvers, in the order they are tried.
#[derive(Debug, Clone)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
}

impl Upstreams {
    /// The resolvers, in the order they are tried.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Tries `servers` in this order.
    pub fn new(servers: Vec<SocketAddr>) -> Upstreams {
        Upstreams { servers }
    }

    /// Asks the upstreams `query` (a client's message, at least a header and a question);
    /// returns the first valid answer, with the client's id.
    pub async fn forward(&self, query: &[u8], client_tcp: bool) -> Result<Vec<u8>, DnsError> {
        let Some(question) = question(query) else {
            return Err(DnsError::NoUpstream("the query has no readable question".into()));
        };
        let mut failures = Vec::new();
        for &server in &self.servers {
            let id: u16 = rand::random();
            let mut ours = query.to_vec();
            ours[..2].copy_from_slice(&id.to_be_bytes());
            let answer = match timeout(UDP_TIMEOUT, udp_exchange(server, &ours, id, &question)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    failures.push(e.to_string());
                    continue;
                }
                Err(_) => {
                    failures.push(format!("{server}: no answer within {UDP_TIMEOUT:?}"));
                    continue;
                }
            };
            let truncated = answer.get(2).is_some_and(|f| f & 0x02 != 0);
            let mut answer = if truncated && client_tcp {
                match timeout(TCP_TIMEOUT, tcp_exchange(server, &ours, id, &question)).await {
                    Ok(Ok(full)) => full,
                    Ok(Err(e)) => {
                        debug!(error = %e, "TCP retry failed; passing on the truncated answer");
                        answer
                    }
                    Err(_) => {
                        debug!(%server, "TCP retry timed out; passing on the truncated answer");
                        answer
                    }
                }
            } else {
                answer
            };
            answer[..2].copy_from_slice(&query[..2]);
            return Ok(answer);
        }
        Err(DnsError::NoUpstream(failures.join("; ")))
    }
}

/// The question of a message, if it has one.
fn question(message: &[u8]) -> Option<Query> {
    let mut decoder = BinDecoder::new(message);
    let header = Header::read(&mut decoder).ok()?;
    if header.counts.queries == 0 {
        return None;
    }
    Query::read(&mut decoder).ok()
}

/// Whether `answer` answers our query `id` for `question`.
fn matches(answer: &[u8], id: u16, question: &Query) -> bool {
    let mut decoder = BinDecoder::new(answer);
    let Ok(header) = Header::read(&mut decoder) else {
        return false;
    };
    if header.metadata.id != id || header.metadata.message_type != MessageType::Response {
        return false;
    }
    if header.counts.queries == 0 {
        // Some error answers (FORMERR) carry no question.
        return true;
    }
    // Name comparison ignores case: an upstream may echo 0x20-randomised case differently.
    Query::read(&mut decoder).is_ok_and(|q| {
        q.name() == question.name()
            && q.query_type() == question.query_type()
            && q.query_class() == question.query_class()
    })
}

fn err(server: SocketAddr, message: impl std::fmt::Display) -> DnsError {
    DnsError::Exchange {
        server,
        message: message.to_string(),
    }
}

async fn udp_exchange(server: SocketAddr, query: &[u8], id: u16, question: &Query) -> Result<Vec<u8>, DnsError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| err(server, e))?;
    // Connected: the kernel drops datagrams from anyone but the upstream.
    socket.connect(server).await.map_err(|e| err(server, e))?;
    socket.send(query).await.map_err(|e| err(server, e))?;
    loop {
        // Room for the largest datagram, left uninitialised (no 64 KiB memset per query).
        let mut buf = Vec::with_capacity(65535);
        socket.recv_buf(&mut buf).await.map_err(|e| err(server, e))?;
        if matches(&buf, id, question) {
            return Ok(buf);
        }
        debug!(%server, "ignoring a datagram that does not answer our query");
    }
}

async fn tcp_exchange(server: SocketAddr, query: &[u8], id: u16, question: &Query) -> Result<Vec<u8>, DnsError> {
    let mut stream = TcpStream::connect(server).await.map_err(|e| err(server, e))?;
    let len = u16::try_from(query.len()).map_err(|_| err(server, "query longer than 65535 bytes"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(|e| err(server, e))?;
    loop {
        let len = stream.read_u16().await.map_err(|e| err(server, e))?;
        let mut answer = vec![0u8; usize::from(len)];
        stream.read_exact(&mut answer).await.map_err(|e| err(server, e))?;
        if matches(&answer, id, question) {
            return Ok(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn answer_to(q: &[u8], tc: bool, pad: usize) -> Vec<u8> {
        let mut m = Message::from_vec(q).unwrap().into_response();
        m.metadata.truncation = tc;
        m.metadata.response_code = ResponseCode::NoError;
        let mut bytes = m.to_vec().unwrap();
        bytes.extend(std::iter::repeat_n(0, pad)); // trailing bytes tell answers apart
        bytes
    }

    #[tokio::test]
    async fn relays_with_fresh_ids_skips_dead_upstreams_and_retries_tc_over_tcp() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        // A dead upstream first: nothing listens there (ICMP refusal, or a timeout).
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let q = &buf[..n];
                assert_ne!(&q[..2], &[0x12, 0x34], "the client's id is not sent upstream");
                // First an unrelated datagram, then the truncated answer.
                udp.send_to(&answer_to(&query("other.example.", 1), false, 0), from)
                    .await
                    .unwrap();
                udp.send_to(&answer_to(q, true, 0), from).await.unwrap();
            }
            let (mut s, _) = tcp.accept().await.unwrap();
            let len = s.read_u16().await.unwrap();
            let mut q = vec![0; len as usize];
            s.read_exact(&mut q).await.unwrap();
            let a = answer_to(&q, false, 3);
            s.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&a).await.unwrap();
        });
        let up = Upstreams::new(vec![dead, addr]);
        let q = query("www.Example.org.", 0x1234);
        // A UDP client gets the TC answer as it is.
        let a = up.forward(&q, false).await.unwrap();
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert!(a[2] & 0x02 != 0);
        // A TCP client gets the full answer, fetched over TCP.
        let a = up.forward(&q, true).await.unwrap();
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert!(a[2] & 0x02 == 0);
        assert!(a.ends_with(&[0, 0, 0]));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn no_answer_is_an_error_naming_each_upstream() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up = Upstreams::new(vec![silent.local_addr().unwrap()]);
        let e = up.forward(&query("a.example.", 1), false).await.unwrap_err();
        assert!(e.to_string().contains("no answer within"), "{e}");
    }

    #[test]
    fn answers_must_echo_id_and_question() {
        let q = query("a.example.", 9);
        let question = question(&q).unwrap();
        assert!(matches(&answer_to(&q, false, 0), 9, &question));
        assert!(!matches(&answer_to(&q, false, 0), 10, &question));
        assert!(!matches(&q, 9, &question), "a query is not an answer");
        assert!(!matches(&answer_to(&query("b.example.", 9), false, 0), 9, &question));
        assert!(matches(&answer_to(&query("A.EXAMPLE.", 9), false, 0), 9, &question));
        assert!(!matches(b"short", 9, &question));
    }
}
