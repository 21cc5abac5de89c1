//! The request path as a fuzz target: shared by `fuzz/fuzz_targets/dns_request.rs` (cargo
//! fuzz, libFuzzer) and by a deterministic test that runs the corpus plus 100 000 generated
//! inputs on every `cargo test`, so the property holds even where no nightly toolchain is.
//!
//! [`exercise`] feeds one input through [`handle`] over UDP and TCP, with and without
//! forwarding, against [`sample_view`], and checks what must hold for any input: no panic;
//! a reply is a well-formed DNS response to the same id that fits the transport's limit.
//! [`view_of`] turns a list of services into such a catalog; `zone`'s tests build theirs
//! with it too.

use std::collections::HashMap;
use std::sync::OnceLock;

use hickory_proto::op::{Message, MessageType};

use super::wire::MAX_UDP_PAYLOAD;
use super::{Authority, Outcome, Transport, handle};
use crate::catalog::{EndpointView, ServiceView, View, VipTarget};
use crate::names::{PortSpec, Protocol};

/// A catalog with local and remote endpoints, IPv4 and IPv6, ready and not, two ports.
pub fn sample_view() -> View {
    let port = |name: &str, port: u16, protocol| PortSpec {
        name: name.into(),
        port,
        protocol,
    };
    let ep = |site: &str, host: &str, ip: &str, vip: &str, ready| EndpointView {
        site: site.into(),
        hostname: host.into(),
        ip: ip.parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        vip: vip.parse().ok(),
        ready,
    };
    let services = vec![
        ServiceView {
            service: "etcd".into(),
            namespace: "default".into(),
            ports: vec![port("client", 2379, Protocol::Tcp), port("gossip", 7946, Protocol::Udp)],
            endpoints: vec![
                ep("london", "etcd-0", "10.1.0.1", "127.77.1.10", true),
                ep("paris", "etcd-0", "10.1.0.1", "127.77.2.10", true),
                ep("paris", "etcd-1", "10.1.0.2", "127.77.2.11", false),
            ],
        },
        ServiceView {
            service: "v6".into(),
            namespace: "grid".into(),
            ports: vec![port("http", 80, Protocol::Tcp)],
            endpoints: vec![ep("paris", "v6-0", "fd00::1", "fd77::1", true)],
        },
        ServiceView {
            service: "big".into(),
            namespace: "default".into(),
            ports: vec![port("member", 7574, Protocol::Tcp)],
            endpoints: (0..80)
                .map(|i| {
                    ep(
                        "london",
                        &format!("big-{i}"),
                        "10.1.0.1",
                        &format!("127.77.3.{}", i + 1),
                        true,
                    )
                })
                .collect(),
        },
    ];
    view_of(services)
}

/// A [`View`] of `services` as given (no routes, no conflicts) with the VIP index derived from
/// their endpoints, as [`View::compute`] derives it: how the DNS fixtures are built, here and
/// in `zone`'s tests, without adverts.
pub fn view_of(services: Vec<ServiceView>) -> View {
    let mut vips = HashMap::new();
    for s in &services {
        for e in &s.endpoints {
            if let Some(v) = e.vip {
                vips.insert(
                    v,
                    VipTarget {
                        site: e.site.clone(),
                        service: s.service.clone(),
                        namespace: s.namespace.clone(),
                        hostname: e.hostname.clone(),
                        ip: e.ip,
                        ports: s.ports.clone(),
                        ready: e.ready,
                    },
                );
            }
        }
    }
    View {
        services,
        vips,
        ..View::default()
    }
}

struct Fixture {
    view: View,
    authorities: [Authority; 2],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let authority = |forward| match Authority::new("clusterset.local", "paris", 5, forward) {
            Ok(a) => a,
            Err(e) => panic!("fixture authority: {e}"),
        };
        Fixture {
            view: sample_view(),
            authorities: [authority(false), authority(true)],
        }
    })
}

/// Runs `data` through the request path and checks the invariants (panics if one fails).
pub fn exercise(data: &[u8]) {
    let f = fixture();
    for authority in &f.authorities {
        for (transport, may_forward) in [(Transport::Udp, true), (Transport::Tcp, true), (Transport::Udp, false)] {
            let asker = crate::dns::Asker {
                may_forward,
                server: Some(std::net::IpAddr::from([127, 0, 0, 1])),
                // Local askers on UDP, others on TCP: both ways of choosing addresses.
                local: transport == Transport::Udp,
            };
            let reply = match handle(data, transport, &f.view, authority, asker) {
                Outcome::Reply(bytes) => bytes,
                Outcome::Forward { servfail } => {
                    assert!(authority.forwards(), "forwarded without an upstream");
                    assert!(may_forward, "forwarded for a client that may not have it");
                    servfail
                }
                Outcome::Drop => continue,
            };
            let limit = match transport {
                Transport::Udp => usize::from(MAX_UDP_PAYLOAD),
                Transport::Tcp => usize::from(u16::MAX),
            };
            assert!(reply.len() <= limit, "{} bytes over {transport:?}", reply.len());
            assert_eq!(reply.get(..2), data.get(..2), "the reply keeps the query id");
            let message = match Message::from_vec(&reply) {
                Ok(m) => m,
                Err(e) => panic!("our own reply does not decode: {e}\n{reply:?}"),
            };
            assert_eq!(message.metadata.message_type, MessageType::Response);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::{Name, RecordType};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Well-formed queries the mutations start from.
    fn seeds() -> Vec<Vec<u8>> {
        let names = [
            "etcd.default.svc.clusterset.local.",
            "etcd-0.london.etcd.default.svc.clusterset.local.",
            "_client._tcp.etcd.default.svc.clusterset.local.",
            "big.default.svc.clusterset.local.",
            "dns-version.clusterset.local.",
            "10.0.1.10.in-addr.arpa.",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
            "example.org.",
            "clusterset.local.",
        ];
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SRV,
            RecordType::PTR,
            RecordType::ANY,
        ];
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            for (j, t) in types.iter().enumerate() {
                let mut m = Message::query();
                m.metadata.id = (i * 16 + j) as u16;
                m.add_query(Query::query(Name::from_ascii(name).unwrap(), *t));
                if (i + j) % 2 == 0 {
                    let mut e = Edns::new();
                    e.set_max_payload(if j % 3 == 0 { 4096 } else { 700 });
                    m.set_edns(e);
                }
                out.push(m.to_vec().unwrap());
            }
        }
        out
    }

    fn corpus_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dns_request")
    }

    #[test]
    fn corpus_and_a_hundred_thousand_mutations_hold_the_invariants() {
        let mut inputs = seeds();
        if let Ok(dir) = std::fs::read_dir(corpus_dir()) {
            for entry in dir.flatten() {
                if let Ok(bytes) = std::fs::read(entry.path()) {
                    inputs.push(bytes);
                }
            }
        }
        for input in &inputs {
            exercise(input);
        }
        let seeds = inputs;
        let mut rng = StdRng::seed_from_u64(0xca05e);
        for _ in 0..100_000 {
            let mut input = seeds[rng.random_range(0..seeds.len())].clone();
            if input.len() < 13 {
                input.resize(13, 0);
            }
            match rng.random_range(0..6) {
                // Flip a few bits.
                0 => {
                    for _ in 0..rng.random_range(1..8) {
                        let i = rng.random_range(0..input.len());
                        input[i] ^= 1 << rng.random_range(0..8);
                    }
                }
                // Overwrite bytes (counts, lengths, pointers).
                1 => {
                    for _ in 0..rng.random_range(1..4) {
                        let i = rng.random_range(0..input.len());
                        input[i] = rng.random();
                    }
                }
                // Cut short.
                2 => input.truncate(rng.random_range(0..input.len())),
                // Append garbage (extra records).
                3 => input.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
                // A compression pointer somewhere.
                4 => {
                    let i = rng.random_range(12..input.len());
                    input[i] = 0xc0 | rng.random_range(0..0x40);
                }
                // Pure noise.
                _ => input = (0..rng.random_range(0..600)).map(|_| rng.random()).collect(),
            }
            exercise(&input);
        }
    }
}

/// The cost of the request path without sockets, per query:
/// `cargo test --release --lib dns::fuzzing::micro -- --ignored --nocapture`.
#[cfg(test)]
mod micro {
    use super::*;
    use crate::dns::{Answer, Request};
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::{Name, RecordType};
    use std::time::Instant;

    #[test]
    #[ignore = "a measurement, not a test"]
    fn cost_per_query() {
        let f = fixture();
        let n = 200_000;
        for name in [
            "etcd-0.london.etcd.default.svc.clusterset.local.",
            "etcd.default.svc.clusterset.local.",
            "big.default.svc.clusterset.local.",
            "nope.default.svc.clusterset.local.",
        ] {
            let mut m = Message::query();
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            m.set_edns(Edns::new());
            let query = m.to_vec().unwrap();
            let request = Request::parse(&query).unwrap();
            let Answer::Respond(response) = f.authorities[0].answer(&request, &f.view) else {
                panic!("{name} was forwarded")
            };
            let time = |what: &str, op: &dyn Fn()| {
                let t = Instant::now();
                for _ in 0..n {
                    op();
                }
                eprintln!("{name} {what}: {:?}", t.elapsed() / n);
            };
            time("parse", &|| drop(std::hint::black_box(Request::parse(&query))));
            time("answer", &|| {
                drop(std::hint::black_box(f.authorities[0].answer(&request, &f.view)))
            });
            time("encode", &|| drop(std::hint::black_box(response.encode(1232))));
            time("all", &|| {
                drop(std::hint::black_box(handle(
                    &query,
                    Transport::Udp,
                    &f.view,
                    &f.authorities[0],
                    crate::dns::Asker {
                        may_forward: true,
                        server: None,
                        local: false,
                    },
                )))
            });
        }
    }
}
