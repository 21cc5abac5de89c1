//! Wire formats of the data plane: the header that opens every TCP flow's QUIC stream, and
//! the framing of UDP datagrams. Pure encode/decode, fuzzable and tested without sockets.
//!
//! A flow names its destination by the owning site and the endpoint's VIP and port, never
//! by the endpoint's real address: the terminating agent maps the VIP to one of its *own*
//! exported endpoints, so a peer cannot make an agent connect anywhere else.
//!
//! ```text
//! flow header:  u16 length | u8 version | u8 ttl | u8 family (4|6) | vip (4|16) | u16 port | u8 len | site
//!               [ u8 family | src vip | u16 src port ]   (optional: the client's own VIP)
//!               [ u8 'R' | u8 flags | token (16) | u64 received ]   (optional, TCP only:
//!                 a resumable flow, see [`super::resume`]; flags bit 0: resuming,
//!                 bit 1: answer lazily, the origin does not wait for it)
//! datagram:     u8 kind=1 (forward) | u64 flow | flow header | payload
//!               u8 kind=2 (reply)   | u64 flow | payload
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Version of the flow header.
pub const VERSION: u8 = 1;
/// Hops a flow may take before it is dropped (loop guard while routes converge).
pub const MAX_TTL: u8 = 16;
/// Largest encoded header body (site ids are at most 63 bytes).
pub const MAX_HEADER: usize = 128;
/// Tag of the resumable-flow extension. Not an address family, so an agent that predates it
/// refuses such a header (`BAD_HEADER`) instead of misreading it: the origin learns the
/// terminus (or a relay) cannot resume and falls back to a plain flow.
const TAG_RESUME: u8 = b'R';

/// The resumable-flow extension of a TCP flow's header (see [`super::resume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeExt {
    /// The flow's secret name.
    pub token: super::resume::Token,
    /// `false`: a new flow; `true`: this stream takes over the flow named by `token`.
    pub resuming: bool,
    /// The origin waits for the terminus's answer (what it has received) before sending:
    /// always when resuming, and for a new flow toward a site not yet known to resume. When
    /// `false` the terminus sends its answer with its first frame, sparing a packet.
    pub waits: bool,
    /// Bytes (+1 for a FIN) the origin has received from the terminus: where it resends from.
    pub received: u64,
}

/// Errors decoding data-plane frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("truncated frame")]
    Truncated,
    #[error("unsupported header version {0}")]
    Version(u8),
    #[error("malformed frame: {0}")]
    Invalid(&'static str),
}

/// Where a flow goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowHeader {
    /// Hops left.
    pub ttl: u8,
    /// The site that owns the endpoint.
    pub site: String,
    /// The endpoint's VIP.
    pub vip: IpAddr,
    /// The exported port.
    pub port: u16,
    /// The client's own VIP and source port, when the client is a member with a sidecar:
    /// the sidecar that delivers the flow connects from this address, so the member sees
    /// its peer at an address that leads back to it from every site.
    pub src: Option<std::net::SocketAddr>,
}

fn put_addr(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn get_addr(r: &mut Reader<'_>) -> Result<IpAddr, HeaderError> {
    Ok(match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(r.take(4)?).map_err(|_| HeaderError::Truncated)?,
        )),
        6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(r.take(16)?).map_err(|_| HeaderError::Truncated)?,
        )),
        _ => return Err(HeaderError::Invalid("address family")),
    })
}

impl FlowHeader {
    /// Appends the header, length-prefixed.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_with(None, out)
    }

    /// Appends the header with the resumable-flow extension `ext` (TCP streams only),
    /// length-prefixed.
    pub fn encode_with(&self, ext: Option<&ResumeExt>, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, VERSION, self.ttl]);
        put_addr(out, self.vip);
        out.extend_from_slice(&self.port.to_be_bytes());
        let site = &self.site.as_bytes()[..self.site.len().min(63)];
        out.push(site.len() as u8);
        out.extend_from_slice(site);
        if let Some(src) = self.src {
            put_addr(out, src.ip());
            out.extend_from_slice(&src.port().to_be_bytes());
        }
        if let Some(ext) = ext {
            out.push(TAG_RESUME);
            out.push(u8::from(ext.resuming) | (u8::from(!ext.waits) << 1));
            out.extend_from_slice(&ext.token);
            out.extend_from_slice(&ext.received.to_be_bytes());
        }
        let len = (out.len() - start - 2) as u16;
        out[start..start + 2].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes a length-prefixed header from the start of `buf`; returns it and the bytes used.
    pub fn decode(buf: &[u8]) -> Result<(FlowHeader, usize), HeaderError> {
        let len = u16::from_be_bytes(
            buf.get(..2)
                .ok_or(HeaderError::Truncated)?
                .try_into()
                .map_err(|_| HeaderError::Truncated)?,
        ) as usize;
        if len > MAX_HEADER {
            return Err(HeaderError::Invalid("header too long"));
        }
        let body = buf.get(2..2 + len).ok_or(HeaderError::Truncated)?;
        Ok((Self::decode_body(body)?, 2 + len))
    }

    /// Decodes a header body (without its length prefix). A resumable-flow extension is an
    /// error here (datagrams never carry one); TCP streams use [`FlowHeader::decode_stream`].
    pub fn decode_body(body: &[u8]) -> Result<FlowHeader, HeaderError> {
        match Self::decode_stream(body)? {
            (h, None) => Ok(h),
            (_, Some(_)) => Err(HeaderError::Invalid("trailing bytes")),
        }
    }

    /// Decodes a TCP stream's header body (without its length prefix), with its
    /// resumable-flow extension if it has one.
    pub fn decode_stream(body: &[u8]) -> Result<(FlowHeader, Option<ResumeExt>), HeaderError> {
        let mut r = Reader(body);
        let version = r.u8()?;
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let ttl = r.u8()?;
        let vip = get_addr(&mut r)?;
        let port = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| HeaderError::Truncated)?);
        let site_len = r.u8()? as usize;
        let site = std::str::from_utf8(r.take(site_len)?).map_err(|_| HeaderError::Invalid("site is not UTF-8"))?;
        let src = if r.0.is_empty() || r.0[0] == TAG_RESUME {
            None
        } else {
            let ip = get_addr(&mut r)?;
            let port = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| HeaderError::Truncated)?);
            Some(std::net::SocketAddr::new(ip, port))
        };
        let ext = if r.0.first() == Some(&TAG_RESUME) {
            r.take(1)?;
            let flags = r.u8()?;
            if flags > 3 {
                return Err(HeaderError::Invalid("resume flags"));
            }
            // Bit 1 set means *not* waiting, so an origin that predates it (flags 0 or 1, and
            // waiting for the answer) is answered at once.
            let (resuming, waits) = (flags & 1 != 0, flags & 2 == 0);
            let token = r.take(16)?.try_into().map_err(|_| HeaderError::Truncated)?;
            let received = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| HeaderError::Truncated)?);
            Some(ResumeExt {
                token,
                resuming,
                waits,
                received,
            })
        } else {
            None
        };
        if !r.0.is_empty() {
            return Err(HeaderError::Invalid("trailing bytes"));
        }
        if !crate::names::is_dns_label(site) {
            return Err(HeaderError::Invalid("site is not a DNS label"));
        }
        Ok((
            FlowHeader {
                ttl,
                site: site.to_string(),
                vip,
                port,
                src,
            },
            ext,
        ))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, HeaderError> {
        Ok(self.take(1)?[0])
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeaderError> {
        if self.0.len() < n {
            return Err(HeaderError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
}

const KIND_FORWARD: u8 = 1;
const KIND_REPLY: u8 = 2;

/// A UDP datagram on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// Client → endpoint; relays route it by `header`.
    Forward {
        flow: u64,
        header: FlowHeader,
        payload: &'a [u8],
    },
    /// Endpoint → client, retracing the flow's path.
    Reply { flow: u64, payload: &'a [u8] },
}

impl Datagram<'_> {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Datagram::Forward { flow, header, payload } => {
                let mut out = Vec::with_capacity(1 + 8 + 32 + payload.len());
                out.push(KIND_FORWARD);
                out.extend_from_slice(&flow.to_be_bytes());
                header.encode(&mut out);
                out.extend_from_slice(payload);
                out
            }
            Datagram::Reply { flow, payload } => {
                let mut out = Vec::with_capacity(9 + payload.len());
                out.push(KIND_REPLY);
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(payload);
                out
            }
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Datagram<'_>, HeaderError> {
        let kind = *buf.first().ok_or(HeaderError::Truncated)?;
        let flow = u64::from_be_bytes(
            buf.get(1..9)
                .ok_or(HeaderError::Truncated)?
                .try_into()
                .map_err(|_| HeaderError::Truncated)?,
        );
        match kind {
            KIND_FORWARD => {
                let (header, used) = FlowHeader::decode(&buf[9..])?;
                Ok(Datagram::Forward {
                    flow,
                    header,
                    payload: &buf[9 + used..],
                })
            }
            KIND_REPLY => Ok(Datagram::Reply {
                flow,
                payload: &buf[9..],
            }),
            _ => Err(HeaderError::Invalid("datagram kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(vip: &str) -> FlowHeader {
        FlowHeader {
            ttl: 16,
            site: "london".into(),
            vip: vip.parse().unwrap(),
            port: 2379,
            src: None,
        }
    }

    #[test]
    fn headers_round_trip() {
        for vip in ["127.77.1.10", "fd00:77::1"] {
            let h = header(vip);
            let mut buf = Vec::new();
            h.encode(&mut buf);
            buf.extend_from_slice(b"rest");
            let (back, used) = FlowHeader::decode(&buf).unwrap();
            assert_eq!(back, h);
            assert_eq!(&buf[used..], b"rest");
        }
    }

    #[test]
    fn client_vip_and_port_ride_along() {
        for src in ["127.77.9.9:7575", "[fd00:77::9]:1"] {
            let h = FlowHeader {
                src: Some(src.parse().unwrap()),
                ..header("127.77.1.10")
            };
            let mut buf = Vec::new();
            h.encode(&mut buf);
            assert_eq!(FlowHeader::decode(&buf).unwrap().0, h);
            for n in 0..buf.len() {
                assert!(FlowHeader::decode(&buf[..n]).is_err());
            }
        }
    }

    #[test]
    fn the_lazy_answer_bit_is_set_only_for_origins_that_do_not_wait() {
        let h = header("127.77.1.10");
        for (resuming, waits, flags) in [(false, true, 0u8), (true, true, 1), (false, false, 2)] {
            let ext = ResumeExt {
                token: [7; 16],
                resuming,
                waits,
                received: 0,
            };
            let mut buf = Vec::new();
            h.encode_with(Some(&ext), &mut buf);
            // An origin that predates the bit sends 0 or 1 and waits: it is answered at once.
            assert_eq!(buf[buf.len() - 25], flags);
            assert_eq!(FlowHeader::decode_stream(&buf[2..]).unwrap().1, Some(ext));
        }
    }

    #[test]
    fn the_resume_extension_rides_along_and_old_decoders_would_refuse_it() {
        for src in [None, Some("127.77.9.9:7575".parse().unwrap())] {
            let h = FlowHeader {
                src,
                ..header("127.77.1.10")
            };
            let ext = ResumeExt {
                token: [0xab; 16],
                resuming: true,
                waits: true,
                received: 1 << 40,
            };
            let mut buf = Vec::new();
            h.encode_with(Some(&ext), &mut buf);
            assert!(buf.len() - 2 <= MAX_HEADER);
            assert_eq!(FlowHeader::decode_stream(&buf[2..]).unwrap(), (h.clone(), Some(ext)));
            // Datagrams (and agents that predate resuming) refuse it: a clean error.
            assert!(FlowHeader::decode(&buf).is_err());
            for n in 2..buf.len() {
                let _ = FlowHeader::decode_stream(&buf[2..n]);
            }
            let mut bad = buf.clone();
            let flags = bad.len() - 25;
            bad[flags] = 7;
            assert_eq!(
                FlowHeader::decode_stream(&bad[2..]),
                Err(HeaderError::Invalid("resume flags"))
            );
            let mut plain = Vec::new();
            h.encode(&mut plain);
            assert_eq!(FlowHeader::decode_stream(&plain[2..]).unwrap(), (h, None));
        }
    }

    #[test]
    fn datagrams_round_trip() {
        let fwd = Datagram::Forward {
            flow: 7,
            header: header("127.77.1.10"),
            payload: b"query",
        };
        assert_eq!(Datagram::decode(&fwd.encode()).unwrap(), fwd);
        let rep = Datagram::Reply {
            flow: u64::MAX,
            payload: b"",
        };
        assert_eq!(Datagram::decode(&rep.encode()).unwrap(), rep);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        header("fd00:77::1").encode(&mut buf);
        for n in 0..buf.len() {
            assert!(FlowHeader::decode(&buf[..n]).is_err(), "prefix {n}");
        }
        let d = Datagram::Forward {
            flow: 1,
            header: header("127.77.1.10"),
            payload: b"x",
        }
        .encode();
        for i in 0..d.len() {
            for b in [0u8, 1, 2, 4, 6, 0x7f, 0xff] {
                let mut c = d.clone();
                c[i] = b;
                let _ = Datagram::decode(&c);
            }
            let _ = Datagram::decode(&d[..i]);
        }
        let mut bad = Vec::new();
        FlowHeader {
            ttl: 1,
            site: "Not A Label".into(),
            vip: "127.0.0.1".parse().unwrap(),
            port: 1,
            src: None,
        }
        .encode(&mut bad);
        assert_eq!(
            FlowHeader::decode(&bad),
            Err(HeaderError::Invalid("site is not a DNS label"))
        );
        assert_eq!(Datagram::decode(&[9; 20]), Err(HeaderError::Invalid("datagram kind")));
    }
}
