//! A minimal stub resolver for `causeway resolve`: one question to one server, over UDP with
//! EDNS (retried over TCP when the answer comes back truncated), and the answer records
//! formatted like `dig +noall +answer`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use super::DnsError;
use super::wire::MAX_UDP_PAYLOAD;

/// How long each UDP attempt, and the TCP retry, may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP attempts before giving up.
const ATTEMPTS: usize = 2;

/// The address to ask for a responder listening on `listen`: a wildcard address means the
/// loopback address of its family.
pub fn server_for(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(a) if a.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// Asks `server` for `name`/`qtype` (recursion desired); returns the whole response.
pub async fn query(server: SocketAddr, name: &Name, qtype: RecordType) -> Result<Message, DnsError> {
    let id: u16 = rand::random();
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_PAYLOAD);
    message.set_edns(edns);
    let bytes = message.to_vec().map_err(|e| fail(server, e))?;

    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| fail(server, e))?;
    socket.connect(server).await.map_err(|e| fail(server, e))?;
    let mut buf = vec![0u8; 65535];
    for _ in 0..ATTEMPTS {
        socket.send(&bytes).await.map_err(|e| fail(server, e))?;
        let answer = timeout(ATTEMPT_TIMEOUT, async {
            loop {
                let n = socket.recv(&mut buf).await?;
                match Message::from_vec(&buf[..n]) {
                    Ok(m) if m.metadata.id == id => return Ok::<_, std::io::Error>(m),
                    _ => {}
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(m)) if m.metadata.truncation => return tcp_query(server, &bytes, id).await,
            Ok(Ok(m)) => return Ok(m),
            Ok(Err(e)) => return Err(fail(server, e)),
            Err(_) => continue,
        }
    }
    Err(fail(
        server,
        format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs() * ATTEMPTS as u64),
    ))
}

async fn tcp_query(server: SocketAddr, bytes: &[u8], id: u16) -> Result<Message, DnsError> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(bytes);
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await?;
        let mut answer = vec![0u8; usize::from(len)];
        stream.read_exact(&mut answer).await?;
        Message::from_vec(&answer).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    match timeout(ATTEMPT_TIMEOUT, exchange).await {
        Ok(Ok(m)) if m.metadata.id == id => Ok(m),
        Ok(Ok(_)) => Err(fail(server, "TCP answer with another id")),
        Ok(Err(e)) => Err(fail(server, format!("TCP retry after a truncated answer: {e}"))),
        Err(_) => Err(fail(server, "TCP retry after a truncated answer timed out")),
    }
}

fn fail(server: SocketAddr, message: impl std::fmt::Display) -> DnsError {
    DnsError::Exchange {
        server,
        message: message.to_string(),
    }
}

/// One record as `dig +noall +answer` prints it: name, TTL, class, type, data, tab-separated
/// (TXT strings quoted).
pub fn format_record(record: &Record) -> String {
    let data = match &record.data {
        RData::TXT(txt) => txt
            .txt_data
            .iter()
            .map(|s| {
                format!(
                    "\"{}\"",
                    String::from_utf8_lossy(s).replace('\\', "\\\\").replace('"', "\\\"")
                )
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    format!(
        "{}\t{}\t{}\t{}\t{}",
        record.name,
        record.ttl,
        record.dns_class,
        record.record_type(),
        data
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SRV, TXT};

    #[test]
    fn records_print_like_dig() {
        let name = Name::from_ascii("etcd.default.svc.clusterset.local.").unwrap();
        let a = Record::from_rdata(name.clone(), 5, RData::A(A(Ipv4Addr::new(10, 1, 0, 1))));
        assert_eq!(
            format_record(&a),
            "etcd.default.svc.clusterset.local.\t5\tIN\tA\t10.1.0.1"
        );
        let target = Name::from_ascii("etcd-0.london.etcd.default.svc.clusterset.local.").unwrap();
        let srv = Record::from_rdata(name.clone(), 5, RData::SRV(SRV::new(0, 10, 2379, target)));
        assert_eq!(
            format_record(&srv),
            "etcd.default.svc.clusterset.local.\t5\tIN\tSRV\t0 10 2379 etcd-0.london.etcd.default.svc.clusterset.local."
        );
        let txt = Record::from_rdata(name, 5, RData::TXT(TXT::new(vec!["1.0.0".into(), "a \"b\"".into()])));
        assert!(format_record(&txt).ends_with("\tTXT\t\"1.0.0\" \"a \\\"b\\\"\""));
    }

    #[test]
    fn wildcard_listen_addresses_are_asked_on_loopback() {
        assert_eq!(
            server_for("0.0.0.0:53".parse().unwrap()),
            "127.0.0.1:53".parse().unwrap()
        );
        assert_eq!(server_for("[::]:5353".parse().unwrap()), "[::1]:5353".parse().unwrap());
        assert_eq!(
            server_for("10.0.0.1:53".parse().unwrap()),
            "10.0.0.1:53".parse().unwrap()
        );
    }
}
