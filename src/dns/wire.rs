//! The DNS wire format at the responder's edge: parsing one request, and encoding one response
//! within the size the client can take.
//!
//! Both are pure functions over bytes. Parsing uses hickory-proto's decoders but is stricter
//! than a generic message decoder: a query must hold exactly one question, so a 12-byte header
//! claiming 65 535 questions costs nothing; anything that does not decode is answered FORMERR
//! when its header is readable and dropped otherwise. Encoding is our own, for the handful of
//! record types the responder produces (others fall back to hickory-proto): it writes the
//! question once and points every owner name that is the question or one of its suffixes at
//! it, which is all the compression these answers need and several times cheaper than a
//! general compressor.
//!
//! Encoding follows RFC 1035 §4.2.1, RFC 2181 §9 and RFC 6891 §7: a UDP answer is limited to
//! 512 bytes without EDNS and to the client's advertised size (capped at [`MAX_UDP_PAYLOAD`])
//! with it. Records that do not fit are left out: if an answer or authority record was left
//! out the TC bit is set, so the client asks again over TCP; additional records are only
//! glue, so leaving them out does not set TC. The OPT record is always kept: room for it is
//! reserved before any record is written.

use hickory_proto::ProtoError;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder, NameEncoding};

/// The largest UDP payload we send or advertise: 1232 bytes fits an IPv6 minimum-MTU packet
/// without fragmentation (the DNS Flag Day 2020 value). Larger answers go over TCP.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Size of a DNS message without EDNS over UDP (RFC 1035 §4.2.1).
pub const MIN_UDP_PAYLOAD: u16 = 512;

/// Size of an OPT record without options: root name (1), type (2), class (2), TTL (4),
/// RDLENGTH (2).
const OPT_LEN: u16 = 11;

/// How a request arrived, which decides how large the response may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A parsed query: one question and the client's EDNS parameters.
#[derive(Debug, Clone)]
pub struct Request {
    /// The header, for the id, opcode and flags the response echoes.
    pub metadata: Metadata,
    /// The one question, exactly as asked (its case is echoed back, RFC 4343).
    pub query: Query,
    /// The client's OPT record, if any: its presence allows an OPT in the response and its
    /// payload size bounds UDP answers.
    pub edns: Option<Edns>,
    /// The responder's address the query was sent to, when known (set by the server, not
    /// parsed): the address the zone's NS name resolves to for this asker.
    pub server: Option<std::net::IpAddr>,
    /// Whether the asker is in the responder's own network namespace (set by the server, not
    /// parsed): such an asker gets this site's endpoints at their VIPs too.
    pub local: bool,
}

/// Why a request gets no regular answer.
#[derive(Debug)]
pub enum Rejected {
    /// Not worth a response: too short for a header, or itself a response (answering those
    /// would let two servers bounce packets at each other).
    Drop(&'static str),
    /// Answer with this (FORMERR or NOTIMP) instead.
    Respond(Box<Response>),
}

impl Request {
    /// Parses one DNS message received from a client.
    pub fn parse(bytes: &[u8]) -> Result<Request, Rejected> {
        let mut decoder = BinDecoder::new(bytes);
        let Ok(header) = Header::read(&mut decoder) else {
            return Err(Rejected::Drop("shorter than a DNS header"));
        };
        let metadata = header.metadata;
        if metadata.message_type == MessageType::Response {
            return Err(Rejected::Drop("a response, not a query"));
        }
        let error = |rcode| Rejected::Respond(Box::new(Response::error(&metadata, None, rcode)));
        if metadata.op_code != OpCode::Query {
            return Err(error(ResponseCode::NotImp));
        }
        if header.counts.queries != 1 {
            return Err(error(ResponseCode::FormErr));
        }
        let Ok(query) = Query::read(&mut decoder) else {
            return Err(error(ResponseCode::FormErr));
        };
        // Answer and authority sections are empty in a query; tolerate them, but they must
        // decode. The additional section may carry the OPT record.
        let formerr = |query: &Query| {
            Rejected::Respond(Box::new(Response::error(
                &metadata,
                Some(query.clone()),
                ResponseCode::FormErr,
            )))
        };
        let counts = header.counts;
        for (count, additional) in [
            (counts.answers, false),
            (counts.authorities, false),
            (counts.additionals, true),
        ] {
            match hickory_proto::op::Message::read_records(&mut decoder, count.into(), additional, metadata.op_code) {
                Ok((_, Some(edns), _)) => {
                    return Ok(Request {
                        metadata,
                        query,
                        edns: Some(edns),
                        server: None,
                        local: false,
                    });
                }
                Ok(_) => {}
                Err(_) => return Err(formerr(&query)),
            }
        }
        Ok(Request {
            metadata,
            query,
            edns: None,
            server: None,
            local: false,
        })
    }

    /// The largest response the client accepts over `transport`.
    pub fn max_response(&self, transport: Transport) -> u16 {
        match (transport, &self.edns) {
            (Transport::Tcp, _) => u16::MAX,
            (Transport::Udp, None) => MIN_UDP_PAYLOAD,
            (Transport::Udp, Some(edns)) => edns.max_payload().clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD),
        }
    }
}

/// A response before encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Id, opcode, flags and response code (the extended part goes into the OPT record).
    pub metadata: Metadata,
    /// The question, echoed (absent when the request's could not be read).
    pub query: Option<Query>,
    pub answers: Vec<Record>,
    /// The SOA of negative answers.
    pub authorities: Vec<Record>,
    /// Glue: addresses of SRV targets.
    pub additionals: Vec<Record>,
    /// Whether to include an OPT record: only when the request had one (RFC 6891 §7).
    pub edns: bool,
    /// The request's DO bit, copied into the response's OPT (RFC 3225 §3). The zone is not
    /// signed, so no DNSSEC records come with it.
    pub dnssec_ok: bool,
}

impl Response {
    /// An empty response to `request`: id, opcode, RD and CD echoed, NOERROR.
    pub fn to(request: &Request) -> Response {
        Response {
            metadata: Metadata::response_from_request(&request.metadata),
            query: Some(request.query.clone()),
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns: request.edns.is_some(),
            dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        }
    }

    /// A response carrying only an error code.
    pub fn error(request: &Metadata, query: Option<Query>, rcode: ResponseCode) -> Response {
        let mut metadata = Metadata::response_from_request(request);
        metadata.response_code = rcode;
        Response {
            metadata,
            query,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns: false,
            dnssec_ok: false,
        }
    }

    /// The response code.
    pub fn rcode(&self) -> ResponseCode {
        self.metadata.response_code
    }

    /// Encodes the response in at most `limit` bytes (at least 512), leaving out what does not
    /// fit as described in the module documentation. Never fails: should encoding go wrong
    /// anyway, the result is a bare SERVFAIL header.
    pub fn encode(&self, limit: u16) -> Vec<u8> {
        let limit = limit.max(MIN_UDP_PAYLOAD);
        match self.try_encode(limit) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(%error, "encoding a DNS response failed; answering SERVFAIL");
                let mut metadata = self.metadata;
                metadata.response_code = ResponseCode::ServFail;
                metadata.truncation = false;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                let mut bytes = Vec::with_capacity(12);
                let mut encoder = BinEncoder::new(&mut bytes);
                // A 12-byte header into an unbounded buffer cannot fail.
                let _ = header.emit(&mut encoder);
                bytes
            }
        }
    }

    fn try_encode(&self, limit: u16) -> Result<Vec<u8>, ProtoError> {
        let limit = usize::from(limit);
        // Room for records: the OPT record must always fit after them.
        let room = if self.edns { limit - usize::from(OPT_LEN) } else { limit };
        let mut out = Vec::with_capacity(limit.min(1500));
        out.extend_from_slice(&[0; 12]);
        let mut counts = HeaderCounts::default();
        let mut names = Compression::default();
        if let Some(query) = &self.query {
            names.question(&mut out, query.name())?;
            out.extend_from_slice(&u16::from(query.query_type()).to_be_bytes());
            out.extend_from_slice(&u16::from(query.query_class()).to_be_bytes());
            counts.queries = 1;
        }
        if out.len() > room {
            return Err(ProtoError::Message("the question alone exceeds the size limit"));
        }
        let (answers, mut truncated) = emit_section(&mut out, &self.answers, room, &names)?;
        counts.answers = answers;
        if !truncated {
            (counts.authorities, truncated) = emit_section(&mut out, &self.authorities, room, &names)?;
        }
        if !truncated {
            // Glue that does not fit is simply left out (RFC 2181 §9): no TC.
            (counts.additionals, _) = emit_section(&mut out, &self.additionals, room, &names)?;
        }
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        if self.edns {
            // OPT: root owner, type 41, our UDP size as class, extended rcode, version 0, the
            // request's DO bit copied (RFC 3225 §3; the top bit of the flags), no options.
            out.push(0);
            out.extend_from_slice(&41u16.to_be_bytes());
            out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
            let flags = flag(self.dnssec_ok, 0x80);
            out.extend_from_slice(&[self.metadata.response_code.high(), 0, flags, 0, 0, 0]);
            counts.additionals += 1;
        }
        let m = &self.metadata;
        out[..2].copy_from_slice(&m.id.to_be_bytes());
        out[2] = 0x80
            | (u8::from(m.op_code) & 0x0f) << 3
            | flag(m.authoritative, 0x04)
            | flag(m.truncation || truncated, 0x02)
            | flag(m.recursion_desired, 0x01);
        out[3] = flag(m.recursion_available, 0x80)
            | flag(m.authentic_data, 0x20)
            | flag(m.checking_disabled, 0x10)
            | m.response_code.low();
        for (i, count) in [counts.queries, counts.answers, counts.authorities, counts.additionals]
            .into_iter()
            .enumerate()
        {
            out[4 + 2 * i..6 + 2 * i].copy_from_slice(&count.to_be_bytes());
        }
        Ok(out)
    }
}

/// Name compression, the cheap way: the question's name is written once, uncompressed, and
/// any later name that is it or one of its suffixes (answer owners, the zone apex of the SOA)
/// becomes a pointer to it. Other names are written uncompressed, which also keeps SRV
/// targets uncompressed as RFC 2782 requires.
#[derive(Default)]
struct Compression {
    /// Where the question's name lies in the message (start, end including the root label),
    /// and where each of its labels starts.
    question: Option<(usize, usize, Vec<usize>)>,
}

impl Compression {
    fn question(&mut self, out: &mut Vec<u8>, name: &Name) -> Result<(), ProtoError> {
        let start = out.len();
        let mut labels = Vec::with_capacity(8);
        for label in name.iter() {
            labels.push(out.len());
            push_label(out, label)?;
        }
        out.push(0);
        self.question = Some((start, out.len(), labels));
        Ok(())
    }

    /// Writes `name`: a pointer if it is (a suffix of) the question, else its labels.
    fn name(&self, out: &mut Vec<u8>, name: &Name) -> Result<(), ProtoError> {
        let start = out.len();
        for label in name.iter() {
            push_label(out, label)?;
        }
        out.push(0);
        if let Some((q_start, q_end, labels)) = &self.question {
            // A suffix of the question in wire form, compared without regard to case (length
            // bytes are below 64 and unaffected).
            let written = out.len() - start;
            if let Some(at) = q_end
                .checked_sub(written)
                .filter(|at| *at >= *q_start && labels.contains(at))
            {
                // Pointers have 14 bits; the question starts at offset 12.
                if at < 0x4000 && out[at..*q_end].eq_ignore_ascii_case(&out[start..]) {
                    out.truncate(start);
                    out.extend_from_slice(&(0xc000 | at as u16).to_be_bytes());
                }
            }
        }
        Ok(())
    }
}

fn push_label(out: &mut Vec<u8>, label: &[u8]) -> Result<(), ProtoError> {
    let len = u8::try_from(label.len())
        .ok()
        .filter(|l| (1..=63).contains(l))
        .ok_or(ProtoError::Message("label length"))?;
    out.push(len);
    out.extend_from_slice(label);
    Ok(())
}

/// Writes as many of `records` as fit in `room` bytes; returns how many and whether some did
/// not fit.
fn emit_section(
    out: &mut Vec<u8>,
    records: &[Record],
    room: usize,
    names: &Compression,
) -> Result<(u16, bool), ProtoError> {
    let mut count: u16 = 0;
    for record in records {
        let start = out.len();
        emit_record(out, record, names)?;
        if out.len() > room {
            out.truncate(start);
            return Ok((count, true));
        }
        count = count
            .checked_add(1)
            .ok_or(ProtoError::Message("more than 65535 records in a section"))?;
    }
    Ok((count, false))
}

fn emit_record(out: &mut Vec<u8>, record: &Record, names: &Compression) -> Result<(), ProtoError> {
    names.name(out, &record.name)?;
    out.extend_from_slice(&u16::from(record.record_type()).to_be_bytes());
    out.extend_from_slice(&u16::from(record.dns_class).to_be_bytes());
    out.extend_from_slice(&record.ttl.to_be_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let plain = Compression::default();
    match &record.data {
        RData::A(a) => out.extend_from_slice(&a.0.octets()),
        RData::AAAA(a) => out.extend_from_slice(&a.0.octets()),
        RData::SRV(srv) => {
            for n in [srv.priority, srv.weight, srv.port] {
                out.extend_from_slice(&n.to_be_bytes());
            }
            plain.name(out, &srv.target)?;
        }
        RData::PTR(ptr) => plain.name(out, &ptr.0)?,
        RData::TXT(txt) => {
            for s in txt.txt_data.iter() {
                let len = u8::try_from(s.len()).map_err(|_| ProtoError::Message("TXT string over 255 bytes"))?;
                out.push(len);
                out.extend_from_slice(s);
            }
        }
        RData::SOA(soa) => {
            names.name(out, &soa.mname)?;
            names.name(out, &soa.rname)?;
            out.extend_from_slice(&soa.serial.to_be_bytes());
            for n in [soa.refresh, soa.retry, soa.expire] {
                out.extend_from_slice(&n.to_be_bytes());
            }
            out.extend_from_slice(&soa.minimum.to_be_bytes());
        }
        other => {
            // Not produced by the responder; encoded by hickory, without compression.
            let mut buf = Vec::new();
            let mut encoder = BinEncoder::new(&mut buf);
            encoder.set_name_encoding(NameEncoding::Uncompressed);
            other.emit(&mut encoder)?;
            out.extend_from_slice(&buf);
        }
    }
    let len = u16::try_from(out.len() - len_at - 2).map_err(|_| ProtoError::Message("RDATA over 65535 bytes"))?;
    out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
    use std::net::Ipv4Addr;

    fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn many_a(n: usize) -> Response {
        let req = Request::parse(&query_bytes("big.example.", RecordType::A, None)).unwrap();
        let mut r = Response::to(&req);
        for i in 0..n {
            r.answers.push(Record::from_rdata(
                Name::from_ascii("big.example.").unwrap(),
                5,
                RData::A(A(Ipv4Addr::new(10, 0, (i / 256) as u8, i as u8))),
            ));
        }
        r
    }

    #[test]
    fn parses_a_query_with_and_without_edns() {
        let r = Request::parse(&query_bytes("Etcd.Default.svc.clusterset.local.", RecordType::A, None)).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.query.name().to_ascii(), "Etcd.Default.svc.clusterset.local.");
        assert!(r.edns.is_none());
        assert_eq!(r.max_response(Transport::Udp), 512);
        assert_eq!(r.max_response(Transport::Tcp), u16::MAX);

        let r = Request::parse(&query_bytes("a.example.", RecordType::A, Some(4096))).unwrap();
        assert_eq!(r.edns.as_ref().unwrap().max_payload(), 4096);
        assert_eq!(
            r.max_response(Transport::Udp),
            MAX_UDP_PAYLOAD,
            "capped at what we send"
        );
        let r = Request::parse(&query_bytes("a.example.", RecordType::A, Some(800))).unwrap();
        assert_eq!(r.max_response(Transport::Udp), 800);
        // Below 512 counts as 512 (RFC 6891 §6.2.5); hickory clamps when decoding already.
        let mut bytes = query_bytes("a.example.", RecordType::A, Some(512));
        let n = bytes.len();
        bytes[n - 8..n - 6].copy_from_slice(&100u16.to_be_bytes()); // the OPT's CLASS
        let r = Request::parse(&bytes).unwrap();
        assert_eq!(r.max_response(Transport::Udp), 512);
    }

    #[test]
    fn garbage_is_dropped_or_formerr_never_a_panic() {
        assert!(matches!(Request::parse(b""), Err(Rejected::Drop(_))));
        assert!(matches!(Request::parse(&[0u8; 11]), Err(Rejected::Drop(_))));
        // A header with one question and nothing after it.
        let mut h = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let Err(Rejected::Respond(r)) = Request::parse(&h) else {
            panic!("expected FORMERR")
        };
        assert_eq!(r.rcode(), ResponseCode::FormErr);
        assert_eq!(r.metadata.id, 0xabcd);
        assert!(r.metadata.recursion_desired);
        // Two questions.
        h[5] = 2;
        let Err(Rejected::Respond(r)) = Request::parse(&h) else {
            panic!("expected FORMERR")
        };
        assert_eq!(r.rcode(), ResponseCode::FormErr);
        // 65535 questions claimed, none present: still cheap, still FORMERR.
        h[4] = 0xff;
        h[5] = 0xff;
        assert!(matches!(Request::parse(&h), Err(Rejected::Respond(_))));
        // A response is dropped.
        let mut resp = query_bytes("a.example.", RecordType::A, None);
        resp[2] |= 0x80;
        assert!(matches!(Request::parse(&resp), Err(Rejected::Drop(_))));
        // Another opcode: NOTIMP.
        let mut notify = query_bytes("a.example.", RecordType::SOA, None);
        notify[2] = (notify[2] & !0x78) | (4 << 3);
        let Err(Rejected::Respond(r)) = Request::parse(&notify) else {
            panic!("expected NOTIMP")
        };
        assert_eq!(r.rcode(), ResponseCode::NotImp);
        // A compression pointer loop in the question name.
        let mut looped = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(Request::parse(&looped), Err(Rejected::Respond(_))));
        // A truncated additional section after a good question: FORMERR echoing it.
        let mut cut = query_bytes("a.example.", RecordType::A, Some(1232));
        cut.truncate(cut.len() - 3);
        let Err(Rejected::Respond(r)) = Request::parse(&cut) else {
            panic!("expected FORMERR")
        };
        assert_eq!(r.rcode(), ResponseCode::FormErr);
        assert!(r.query.is_some());
    }

    #[test]
    fn over_long_names_are_formerr() {
        // 5 labels of 63 bytes: 320 bytes, over the 255 limit.
        let mut m = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            m.push(63);
            m.extend_from_slice(&[b'a'; 63]);
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        let Err(Rejected::Respond(r)) = Request::parse(&m) else {
            panic!("expected FORMERR")
        };
        assert_eq!(r.rcode(), ResponseCode::FormErr);
        // A label longer than 63 (length byte 64 is not a valid label type).
        let mut m = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64];
        m.extend_from_slice(&[b'a'; 64]);
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(matches!(Request::parse(&m), Err(Rejected::Respond(_))));
    }

    #[test]
    fn udp_answers_are_truncated_to_the_client_size_with_tc() {
        let r = many_a(200);
        for limit in [512u16, 1232, u16::MAX] {
            let bytes = r.encode(limit);
            assert!(bytes.len() <= usize::from(limit), "{} > {limit}", bytes.len());
            let m = Message::from_vec(&bytes).unwrap();
            if limit == u16::MAX {
                assert_eq!(m.answers.len(), 200);
                assert!(!m.metadata.truncation);
            } else {
                assert!(m.metadata.truncation, "TC at {limit}");
                assert!(!m.answers.is_empty() && m.answers.len() < 200);
            }
        }
        // Without truncation the size is what the records need.
        let small = many_a(3).encode(512);
        assert!(!Message::from_vec(&small).unwrap().metadata.truncation);
    }

    #[test]
    fn the_opt_record_survives_truncation() {
        let mut r = many_a(200);
        r.edns = true;
        let bytes = r.encode(1232);
        assert!(bytes.len() <= 1232);
        let m = Message::from_vec(&bytes).unwrap();
        assert!(m.metadata.truncation);
        let edns = m.edns.expect("OPT kept");
        assert_eq!(edns.max_payload(), MAX_UDP_PAYLOAD);
    }

    #[test]
    fn the_do_bit_is_echoed() {
        // RFC 3225 §3: the DO bit of the query is copied into the response; without EDNS
        // there is no OPT to carry it.
        for dnssec_ok in [false, true] {
            let mut m = Message::query();
            m.add_query(Query::query(Name::from_ascii("x.example.").unwrap(), RecordType::A));
            let mut e = Edns::new();
            e.set_max_payload(1232).set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
            let req = Request::parse(&m.to_vec().unwrap()).unwrap();
            let back = Message::from_vec(&Response::to(&req).encode(1232)).unwrap();
            assert_eq!(back.edns.expect("OPT").flags().dnssec_ok, dnssec_ok);
        }
        let req = Request::parse(&query_bytes("x.example.", RecordType::A, None)).unwrap();
        assert!(
            Message::from_vec(&Response::to(&req).encode(512))
                .unwrap()
                .edns
                .is_none()
        );
    }

    #[test]
    fn glue_that_does_not_fit_does_not_set_tc() {
        let mut r = many_a(20);
        r.additionals = many_a(200).answers;
        let m = Message::from_vec(&r.encode(512)).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 20);
        assert!(m.additionals.len() < 200);
    }

    #[test]
    fn extended_rcodes_go_into_the_opt_record() {
        let req = Request::parse(&query_bytes("a.example.", RecordType::A, Some(1232))).unwrap();
        let mut r = Response::to(&req);
        r.metadata.response_code = ResponseCode::BADVERS;
        let m = Message::from_vec(&r.encode(512)).unwrap();
        assert_eq!(
            u16::from(m.metadata.response_code),
            16,
            "BADVERS (hickory decodes 16 as BADSIG)"
        );
        assert_eq!(m.queries[0].query_class(), DNSClass::IN);
    }
}
