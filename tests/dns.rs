//! End-to-end tests of the `clusterset.local` DNS responder: real agents in separate network
//! namespaces (linked by tokens, the same pod address 10.1.0.1 in every site), asked by real
//! clients (`dig`, glibc's `getent`, `causeway resolve`), forwarding to a real upstream
//! (dnsmasq).
//!
//! Every agent answers DNS on 127.0.0.1:5353 inside its own namespace (the harness default),
//! except where a test moves it to port 53 for glibc.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::{LAN_GATEWAY, Net, require};
use common::{Site, wait_for};

const POD: &str = "10.1.0.1";
const ZONE: &str = "clusterset.local";

/// Inits the agents of `names` in `net` (pod address 10.1.0.1 in each), lets `configure`
/// adjust each causeway.yaml, then starts them.
fn sites(dir: &Path, net: &Net, names: &[&str], configure: impl Fn(&Site)) -> Vec<Site> {
    common::sites_in(dir, net, names, POD, configure)
}

/// Rewrites the `dns:` section of a site's causeway.yaml (before the agent starts: the DNS
/// settings are read at start).
fn set_dns(site: &Site, listen: &str, upstream: &[&str]) {
    let path = site.state.join("causeway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut section = String::new();
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with(|c: char| c.is_ascii_alphabetic()) {
            section = l.split(':').next().unwrap_or_default().to_string();
        }
        let key = l.trim_start();
        if section == "dns" && key.starts_with("listen:") {
            out.push(format!("  listen: [\"{listen}\"]"));
        } else if section == "dns" && key.starts_with("upstream:") {
            let list: Vec<String> = upstream.iter().map(|u| format!("\"{u}\"")).collect();
            out.push(format!("  upstream: [{}]", list.join(", ")));
        } else {
            out.push(l.to_string());
        }
    }
    common::write_atomic(&path, &(out.join("\n") + "\n"));
}

/// Exports `service` from `site` with the given ports and `(hostname, ip, ready)` endpoints.
fn export(site: &Site, service: &str, ports: &str, endpoints: &[(&str, &str, bool)]) {
    let mut yaml = format!("exports:\n  - service: {service}\n    ports: {ports}\n    endpoints:\n");
    for (host, ip, ready) in endpoints {
        yaml.push_str(&format!("      - {{hostname: {host}, ip: {ip}, ready: {ready}}}\n"));
    }
    site.set_exports(&yaml);
}

/// The endpoints of `service` as `site` sees them: (site, hostname) → (vip, ready).
fn endpoints(site: &Site, service: &str) -> Vec<(String, String, Option<String>, bool)> {
    site.services()
        .into_iter()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["site"].as_str().unwrap_or_default().to_string(),
                e["hostname"].as_str().unwrap_or_default().to_string(),
                e["vip"].as_str().map(String::from),
                e["ready"] == true,
            )
        })
        .collect()
}

/// Waits until `site` sees `count` ready endpoints of `service`; returns (site, host) → VIP.
fn wait_ready(site: &Site, service: &str, count: usize) -> Vec<(String, String, String)> {
    let mut seen = Vec::new();
    let ok = wait_for(Duration::from_secs(15), || {
        seen = endpoints(site, service)
            .into_iter()
            .filter(|e| e.3 && e.2.is_some())
            .map(|e| (e.0, e.1, e.2.unwrap_or_default()))
            .collect();
        seen.len() == count
    });
    assert!(
        ok,
        "{} saw {seen:?} of {service}, not {count}:\n{}",
        site.name,
        site.ok(&["status"])
    );
    seen
}

fn vip_of(eps: &[(String, String, String)], site: &str, host: &str) -> String {
    eps.iter()
        .find(|e| e.0 == site && e.1 == host)
        .map(|e| e.2.clone())
        .unwrap_or_else(|| panic!("no {host} of {site} in {eps:?}"))
}

/// `dig @127.0.0.1 -p <port> ARGS` inside `site`: its whole output.
fn dig_at(net: &Net, site: &str, port: u16, args: &[&str]) -> String {
    dig_server(net, site, "127.0.0.1", port, args)
}

/// `dig @SERVER -p PORT ARGS` run inside `site` (2 s per try, 2 tries): stdout and stderr.
fn dig_server(net: &Net, site: &str, server: &str, port: u16, args: &[&str]) -> String {
    let out = net
        .exec(site)
        .args([
            "dig",
            &format!("@{server}"),
            "-p",
            &port.to_string(),
            "+time=2",
            "+tries=2",
        ])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `causeway resolve ARGS` for `site`, run inside its namespace (where its responder is).
fn resolve(net: &Net, site: &Site, args: &[&str]) -> std::process::Output {
    site.cli_in(net, &[&["resolve"], args].concat())
}

/// `causeway resolve ARGS` that must succeed: its stdout.
fn resolve_ok(net: &Net, site: &Site, args: &[&str]) -> String {
    let out = resolve(net, site, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "causeway resolve {args:?} in {}: {stderr}",
        site.name
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `causeway resolve ARGS` that must fail with status 1: its stderr.
fn resolve_fails(net: &Net, site: &Site, args: &[&str]) -> String {
    let out = resolve(net, site, args);
    assert_eq!(out.status.code(), Some(1), "causeway resolve {args:?} in {}", site.name);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn dig(net: &Net, site: &str, args: &[&str]) -> String {
    dig_at(net, site, 5353, args)
}

/// The records of `dig +noall +answer` output: (name, type, data), data of multi-word
/// records joined by one space.
fn records(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5).then(|| (f[0].to_string(), f[3].to_string(), f[4..].join(" ")))
        })
        .collect()
}

/// The data of the answers to `name`/`qtype` asked in `site`.
fn answer(net: &Net, site: &str, name: &str, qtype: &str) -> Vec<String> {
    let out = dig(net, site, &[name, qtype, "+noall", "+answer"]);
    records(&out).into_iter().map(|r| r.2).collect()
}

/// The data of the PTR answers for `addr` asked in `site`.
fn ptr(net: &Net, site: &str, addr: &str) -> Vec<String> {
    let out = dig(net, site, &["-x", addr, "+noall", "+answer"]);
    records(&out).into_iter().map(|r| r.2).collect()
}

/// The header flags dig printed (`qr aa rd`).
fn flags(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|l| l.split(';').next())
        .unwrap_or_default()
        .to_string()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Asserts a negative answer: `status`, the aa flag, no answers, the zone's SOA.
fn assert_negative(out: &str, status: &str) {
    assert!(out.contains(&format!("status: {status},")), "expected {status}:\n{out}");
    assert!(flags(out).split(' ').any(|f| f == "aa"), "not authoritative:\n{out}");
    assert!(out.contains("ANSWER: 0,"), "{out}");
    assert!(out.contains("AUTHORITY: 1,"), "{out}");
    let soa = out.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 5 && f[0] == format!("{ZONE}.") && f[1] == "5" && f[3] == "SOA" && f[4] == format!("ns.dns.{ZONE}.")
    });
    assert!(soa, "no SOA in the authority section:\n{out}");
}

#[test]
fn every_record_type_across_three_sites_and_withdrawal() {
    let Some(mut net) = Net::new(&["london", "paris", "tokyo"]) else {
        return;
    };
    if !require(&["dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // paris also answers its LAN, where a pod asks as "another client of the site".
    let s = sites(dir.path(), &net, &["london", "paris", "tokyo"], |s| {
        if s.name == "paris" {
            set_dns(s, "0.0.0.0:5353", &[]);
        }
    });
    let pod = net.add_pod_ns("paris", "pod9", "10.1.0.9");
    let from_pod = |name: &str, qtype: &str| -> Vec<String> {
        let out = dig_server(&net, &pod, LAN_GATEWAY, 5353, &[name, qtype, "+noall", "+answer"]);
        records(&out).into_iter().map(|r| r.2).collect()
    };
    let (london, paris, tokyo) = (&s[0], &s[1], &s[2]);
    london.link_spoke(dir.path(), paris, 1);
    london.link_spoke(dir.path(), tokyo, 1);
    let ports = "[{name: client, port: 2379}, {name: gossip, port: 7946, protocol: UDP}]";
    export(
        london,
        "etcd",
        ports,
        &[
            ("etcd-0", POD, true),
            ("etcd-1", "10.1.0.2", true),
            ("etcd-2", "10.1.0.3", false),
        ],
    );
    export(paris, "etcd", ports, &[("etcd-0", POD, true)]);
    export(tokyo, "lonely", "[{name: http, port: 80}]", &[("lonely-0", POD, false)]);
    let eps = wait_ready(paris, "etcd", 3);
    let l0 = vip_of(&eps, "london", "etcd-0");
    let l1 = vip_of(&eps, "london", "etcd-1");
    let p0 = vip_of(&eps, "paris", "etcd-0");
    wait_ready(tokyo, "etcd", 3);
    let svc = format!("etcd.default.svc.{ZONE}");

    // A for the service (docs/REFERENCE.md "Names"): asked in paris's own namespace, every endpoint by its
    // VIP, paris's own included (valid in every site); asked by another client of paris's
    // site (a pod on its LAN), paris's own endpoint by its real address.
    assert_eq!(
        answer(&net, "paris", &svc, "A").into_iter().collect::<BTreeSet<_>>(),
        set(&[l0.as_str(), l1.as_str(), p0.as_str()])
    );
    assert_eq!(
        from_pod(&svc, "A").into_iter().collect::<BTreeSet<_>>(),
        set(&[l0.as_str(), l1.as_str(), POD])
    );
    assert_eq!(from_pod(&format!("etcd-0.paris.{svc}"), "A"), [POD]);
    assert_eq!(from_pod(&format!("etcd-1.london.{svc}"), "A"), [l1.as_str()]);
    // tokyo (two hops from paris) sees every endpoint by VIP, and so does london, locally.
    assert_eq!(
        answer(&net, "tokyo", &svc, "A").into_iter().collect::<BTreeSet<_>>(),
        set(&[l0.as_str(), l1.as_str(), p0.as_str()])
    );
    assert_eq!(
        answer(&net, "london", &svc, "A").into_iter().collect::<BTreeSet<_>>(),
        set(&[l0.as_str(), l1.as_str(), p0.as_str()])
    );
    let out = dig(&net, "paris", &[&svc, "A"]);
    assert_eq!(flags(&out), "qr aa rd", "{out}");
    let ttls: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with(';') && l.contains("\tA\t"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(ttls, ["5", "5", "5"], "TTL is dns.ttl: {out}");

    // A per endpoint; same hostname in two sites, two names.
    assert_eq!(
        answer(&net, "paris", &format!("etcd-0.london.{svc}"), "A"),
        [l0.as_str()]
    );
    assert_eq!(
        answer(&net, "paris", &format!("etcd-0.paris.{svc}"), "A"),
        [p0.as_str()]
    );
    assert_eq!(
        answer(&net, "tokyo", &format!("etcd-0.paris.{svc}"), "A"),
        [p0.as_str()]
    );

    // SRV: one per ready endpoint per named port, targets the per-endpoint names, with glue.
    let out = dig(
        &net,
        "paris",
        &[
            &format!("_client._tcp.{svc}"),
            "SRV",
            "+noall",
            "+answer",
            "+additional",
        ],
    );
    let rrs = records(&out);
    let srv: BTreeSet<String> = rrs.iter().filter(|r| r.1 == "SRV").map(|r| r.2.clone()).collect();
    assert_eq!(
        srv,
        [
            format!("0 10 2379 etcd-0.london.{svc}."),
            format!("0 10 2379 etcd-1.london.{svc}."),
            format!("0 10 2379 etcd-0.paris.{svc}."),
        ]
        .into_iter()
        .collect(),
        "{out}"
    );
    let glue: BTreeSet<(String, String)> = rrs
        .iter()
        .filter(|r| r.1 == "A")
        .map(|r| (r.0.clone(), r.2.clone()))
        .collect();
    assert!(glue.contains(&(format!("etcd-1.london.{svc}."), l1.clone())), "{out}");
    assert_eq!(answer(&net, "paris", &format!("_gossip._udp.{svc}"), "SRV").len(), 3);

    // TXT dns-version.
    assert_eq!(
        answer(&net, "paris", &format!("dns-version.{ZONE}"), "TXT"),
        ["\"1.0.0\""]
    );

    // PTR for every address handed out: VIPs of every site, this site's real addresses.
    assert_eq!(ptr(&net, "paris", &l1), [format!("etcd-1.london.{svc}.")]);
    assert_eq!(ptr(&net, "paris", &p0), [format!("etcd-0.paris.{svc}.")]);
    assert_eq!(ptr(&net, "paris", POD), [format!("etcd-0.paris.{svc}.")]);
    let out = dig(&net, "paris", &["-x", "10.1.0.2"]);
    assert!(
        out.contains("status: REFUSED"),
        "london's real address is not ours to name:\n{out}"
    );

    // Case does not matter; the question's case is echoed.
    let out = dig(
        &net,
        "paris",
        &["ETCD-0.London.Etcd.DEFAULT.svc.ClusterSet.local", "+noall", "+answer"],
    );
    assert_eq!(
        records(&out),
        [(
            "ETCD-0.London.Etcd.DEFAULT.svc.ClusterSet.local.".to_string(),
            "A".to_string(),
            l0.clone()
        )]
    );

    // Negative answers: NXDOMAIN for unknown names, a not-ready endpoint, a service with no
    // ready endpoint; NODATA for a type the name lacks.
    for name in [
        format!("nope.default.svc.{ZONE}"),
        format!("etcd-2.london.{svc}"),
        format!("lonely.default.svc.{ZONE}"),
        format!("www.{ZONE}"),
        format!("_peer._tcp.{svc}"),
    ] {
        assert_negative(&dig(&net, "paris", &[&name, "A"]), "NXDOMAIN");
    }
    assert_negative(&dig(&net, "paris", &[&svc, "AAAA"]), "NOERROR");
    assert_negative(&dig(&net, "paris", &[&format!("dns-version.{ZONE}"), "A"]), "NOERROR");
    // Outside the zone with no upstream: REFUSED.
    let out = dig(&net, "paris", &["example.org", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");

    // `causeway resolve` asks the same responder and prints dig's records.
    let cli = resolve_ok(&net, paris, &[&format!("etcd-1.london.{svc}")]);
    assert_eq!(cli, format!("etcd-1.london.{svc}.\t5\tIN\tA\t{l1}\n"));
    let cli = resolve_ok(&net, paris, &[&format!("_client._tcp.{svc}"), "--type", "SRV"]);
    assert_eq!(cli.lines().count(), 3, "{cli}");
    let cli = resolve_ok(&net, paris, &[&l0]);
    assert!(cli.trim_end().ends_with(&format!("PTR\tetcd-0.london.{svc}.")), "{cli}");
    let cli = resolve_ok(&net, paris, &[&format!("dns-version.{ZONE}"), "--type", "txt"]);
    assert!(cli.ends_with("\tTXT\t\"1.0.0\"\n"), "{cli}");
    let err = resolve_fails(&net, paris, &[&format!("nope.default.svc.{ZONE}")]);
    assert!(err.contains("NXDOMAIN"), "{err}");
    let err = resolve_fails(&net, paris, &["example.org"]);
    assert!(err.contains("REFUSED"), "{err}");

    // Withdrawal: once paris's view has etcd-1 not ready, the very next answer lacks it.
    export(
        london,
        "etcd",
        ports,
        &[
            ("etcd-0", POD, true),
            ("etcd-1", "10.1.0.2", false),
            ("etcd-2", "10.1.0.3", false),
        ],
    );
    let t = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || endpoints(paris, "etcd")
            .iter()
            .any(|e| e.1 == "etcd-1" && !e.3)),
        "etcd-1 not withdrawn"
    );
    let now = answer(&net, "paris", &svc, "A");
    assert_eq!(
        now.into_iter().collect::<BTreeSet<_>>(),
        set(&[l0.as_str(), p0.as_str()]),
        "stale after {:?}",
        t.elapsed()
    );
    assert_negative(&dig(&net, "paris", &[&format!("etcd-1.london.{svc}"), "A"]), "NXDOMAIN");
    assert_eq!(answer(&net, "paris", &format!("_client._tcp.{svc}"), "SRV").len(), 2);
    assert!(dig(&net, "paris", &["-x", &l1]).contains("status: REFUSED"));
    // And everything of london goes when its export does.
    london.set_exports("exports: []\n");
    assert!(wait_for(Duration::from_secs(5), || answer(&net, "paris", &svc, "A")
        == [p0.as_str()]));

    let status: serde_json::Value = serde_json::from_str(&paris.ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["dns"]["listen"][0], "0.0.0.0:5353", "{status}");
    assert!(status["dns"]["queries"]["nxdomain"].as_u64().unwrap() >= 5, "{status}");
}

#[test]
fn two_hundred_endpoints_truncate_over_udp_and_arrive_whole_over_tcp() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris"], |_| {});
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    let hosts: Vec<(String, String)> = (0..200)
        .map(|i| (format!("grid-{i}"), format!("10.1.{}.{}", i / 100, 1 + i % 100)))
        .collect();
    let eps: Vec<(&str, &str, bool)> = hosts.iter().map(|(h, ip)| (h.as_str(), ip.as_str(), true)).collect();
    export(london, "grid", "[{name: member, port: 7574}]", &eps);
    wait_ready(paris, "grid", 200);
    let name = format!("grid.default.svc.{ZONE}");

    // Without +tcp: the UDP answer is truncated (TC), dig retries over TCP and gets all 200.
    let out = dig(&net, "paris", &[&name, "A"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 200,"), "{out}");
    assert_eq!(records(&out).len(), 200);
    // What the UDP answer itself looks like: tc set, at most the advertised 1232 bytes.
    let udp = dig(&net, "paris", &[&name, "A", "+ignore", "+bufsize=1232"]);
    assert!(udp.contains(" tc"), "{udp}");
    let size: usize = udp
        .lines()
        .find_map(|l| l.split("MSG SIZE  rcvd: ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .expect("message size");
    assert!(size <= 1232, "{size} bytes over UDP");
    assert!(
        udp.contains("; EDNS: version: 0"),
        "OPT kept in a truncated answer: {udp}"
    );
    // Without EDNS: 512 bytes at most.
    let plain = dig(&net, "paris", &[&name, "A", "+ignore", "+noedns"]);
    assert!(plain.contains(" tc"), "{plain}");
    let size: usize = plain
        .lines()
        .find_map(|l| l.split("MSG SIZE  rcvd: ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .expect("message size");
    assert!(size <= 512, "{size} bytes over UDP without EDNS");
    // SRV for 200 endpoints, and from the owning site's own namespace (where they are
    // answered at their VIPs too), over TCP at once.
    let srv = dig(
        &net,
        "paris",
        &[&format!("_member._tcp.{name}"), "SRV", "+noall", "+answer"],
    );
    assert_eq!(records(&srv).len(), 200);
    let own = dig(&net, "london", &[&name, "A", "+tcp", "+noall", "+answer"]);
    let own: BTreeSet<String> = records(&own).into_iter().map(|r| r.2).collect();
    assert_eq!(own.len(), hosts.len(), "{own:?}");
    assert!(own.iter().all(|a| a.starts_with("127.77.")), "{own:?}");
    // `causeway resolve` retries over TCP too.
    assert_eq!(resolve_ok(&net, paris, &[&name]).lines().count(), 200);
}

/// dnsmasq in `site` on 127.0.0.1:`port`: example.org names → 192.0.2.7, a PTR for it, and
/// a TXT too large for one UDP answer.
fn dnsmasq(net: &Net, site: &str, port: u16) -> common::netns::Background {
    let long = "x".repeat(250);
    let mut args = vec![
        "dnsmasq".to_string(),
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--listen-address=127.0.0.1".into(),
        "--bind-interfaces".into(),
        format!("--port={port}"),
        "--address=/example.org/192.0.2.7".into(),
        "--ptr-record=7.2.0.192.in-addr.arpa,upstream.example.org".into(),
        "--pid-file=".into(),
        "--user=root".into(),
        "--edns-packet-max=1232".into(),
    ];
    for i in 0..8 {
        args.push(format!("--txt-record=big.example.org,\"{i}{long}\""));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let bg = net.spawn(site, &argv);
    assert!(
        wait_for(Duration::from_secs(5), || dig_at(
            net,
            site,
            port,
            &["www.example.org", "+short"]
        )
        .contains("192.0.2.7")),
        "dnsmasq did not start in {site}"
    );
    bg
}

#[test]
fn forwarding_to_a_real_upstream_and_refused_without_one() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["dig", "dnsmasq"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // paris forwards to a dead upstream first, then to dnsmasq; london has no upstream.
    let _upstream = dnsmasq(&net, "paris", 5300);
    let s = sites(dir.path(), &net, &["london", "paris"], |site| {
        if site.name == "paris" {
            set_dns(site, "127.0.0.1:5353", &["127.0.0.1:5399", "127.0.0.1:5300"]);
        }
    });
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    export(london, "etcd", "[{name: client, port: 2379}]", &[("etcd-0", POD, true)]);
    let l0 = vip_of(&wait_ready(paris, "etcd", 1), "london", "etcd-0");

    // Outside the zone: dnsmasq's answer, with recursion available.
    let out = dig(&net, "paris", &["www.example.org", "A"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("\tA\t192.0.2.7"), "{out}");
    assert!(flags(&out).split(' ').any(|f| f == "ra"), "{out}");
    // A PTR for an address the responder does not hand out is forwarded too.
    assert_eq!(ptr(&net, "paris", "192.0.2.7"), ["upstream.example.org."]);
    // A large forwarded answer: TC over UDP, then whole over TCP (forwarded over UDP, TC,
    // retried upstream over TCP).
    let big = dig(&net, "paris", &["big.example.org", "TXT"]);
    assert!(big.contains("Truncated, retrying in TCP mode"), "{big}");
    assert!(big.contains("ANSWER: 8,"), "{big}");
    // The zone is still answered here, never forwarded.
    assert_eq!(
        answer(&net, "paris", &format!("etcd.default.svc.{ZONE}"), "A"),
        [l0.as_str()]
    );
    assert_negative(&dig(&net, "paris", &[&format!("nope.default.svc.{ZONE}")]), "NXDOMAIN");
    // Through `causeway resolve` as well.
    assert!(resolve_ok(&net, paris, &["www.example.org"]).ends_with("\tA\t192.0.2.7\n"));

    // london has no upstream: REFUSED, no recursion offered, for names and unknown PTRs.
    let out = dig(&net, "london", &["www.example.org", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    assert_eq!(flags(&out), "qr rd", "{out}");
    assert!(dig(&net, "london", &["-x", "192.0.2.7"]).contains("status: REFUSED"));

    let status: serde_json::Value = serde_json::from_str(&paris.ok(&["status", "-o", "json"])).unwrap();
    assert!(status["dns"]["forwarded"].as_u64().unwrap() >= 4, "{status}");
    assert_eq!(status["dns"]["upstream"][1], "127.0.0.1:5300", "{status}");
}

#[test]
fn unreachable_upstream_is_servfail() {
    let Some(net) = Net::new(&["london"]) else {
        return;
    };
    if !require(&["dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _s = sites(dir.path(), &net, &["london"], |site| {
        set_dns(site, "127.0.0.1:5353", &["127.0.0.1:5399"]);
    });
    let out = dig(&net, "london", &["www.example.org", "A"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
}

#[test]
fn getent_resolves_through_the_responder_as_the_only_nameserver() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["getent", "dnsmasq", "dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _upstream = dnsmasq(&net, "paris", 5300);
    // paris answers on port 53, the only port resolv.conf can name.
    let s = sites(dir.path(), &net, &["london", "paris"], |site| {
        if site.name == "paris" {
            set_dns(site, "127.0.0.1:53", &["127.0.0.1:5300"]);
        }
    });
    let (london, paris) = (&s[0], &s[1]);
    net.resolv_conf("paris", "127.0.0.1");
    // glibc must ask DNS for `.local` names: pin nsswitch in the namespace (an mDNS module
    // on the host would otherwise claim them).
    let etc = Path::new("/etc/netns").join(net.ns("paris"));
    if Path::new("/etc/nsswitch.conf").exists() {
        std::fs::write(etc.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
    }
    london.link_spoke(dir.path(), paris, 1);
    export(
        london,
        "etcd",
        "[{name: client, port: 2379}]",
        &[("etcd-0", POD, true), ("etcd-1", "10.1.0.2", true)],
    );
    export(paris, "etcd", "[{name: client, port: 2379}]", &[("etcd-0", POD, true)]);
    let eps = wait_ready(paris, "etcd", 3);
    let l0 = vip_of(&eps, "london", "etcd-0");
    let l1 = vip_of(&eps, "london", "etcd-1");
    let p0 = vip_of(&eps, "paris", "etcd-0");
    let getent = |args: &[&str]| {
        let out = net.exec("paris").arg("getent").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let svc = format!("etcd.default.svc.{ZONE}");
    let (code, out) = getent(&["ahostsv4", &svc]);
    assert_eq!(code, Some(0), "{out}\n{}", paris.log_text());
    let addrs: BTreeSet<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    assert_eq!(addrs, set(&[l0.as_str(), l1.as_str(), p0.as_str()]));
    let (code, out) = getent(&["hosts", &format!("etcd-1.london.{svc}")]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with(&format!("{l1} ")), "{out}");
    // Reverse lookups through glibc: a VIP to its endpoint's name.
    let (code, out) = getent(&["hosts", &l0]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("etcd-0.london.{svc}")), "{out}");
    // A missing name: getent's "not found" (2), at once.
    let t = Instant::now();
    let (code, _) = getent(&["hosts", &format!("nope.default.svc.{ZONE}")]);
    assert_eq!(code, Some(2));
    assert!(t.elapsed() < Duration::from_secs(2), "NXDOMAIN took {:?}", t.elapsed());
    // The responder is the pod's only nameserver: other names resolve through the upstream.
    let (code, out) = getent(&["hosts", "www.example.org"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("192.0.2.7 "), "{out}");
}

/// Issue 16 (1): a responder reachable from other networks is no open resolver. With
/// `dns.listen` on 0.0.0.0 and an upstream, names outside the zone are forwarded for clients on
/// loopback and in `dns.allow` only; anyone else gets REFUSED for them, while names in the
/// zone are answered for everyone.
#[test]
fn names_outside_the_zone_are_forwarded_only_for_allowed_clients() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["dig", "dnsmasq"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _upstream = dnsmasq(&net, "paris", 5300);
    let s = sites(dir.path(), &net, &["london", "paris"], |site| {
        if site.name == "paris" {
            set_dns(site, "0.0.0.0:5353", &["127.0.0.1:5300"]);
            // Only a network london's WAN address is not in (without `allow`, paris's own
            // interface networks would include the WAN london shares).
            let path = site.state.join("causeway.yaml");
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replacen("dns:\n", "dns:\n  allow: [10.99.0.0/16]\n", 1);
            common::write_atomic(&path, &text);
        }
    });
    let paris_wan = net.wan_addr("paris").to_string();
    let from_london = |args: &[&str]| dig_server(&net, "london", &paris_wan, 5353, args);
    let out = from_london(&["www.example.org", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    assert!(!out.contains("192.0.2.7"), "{out}");
    // The zone is answered for anyone, with the DO bit of a +dnssec query echoed (issue 16
    // item 4, RFC 3225 §3).
    let out = from_london(&[&format!("dns-version.{ZONE}"), "TXT", "+dnssec"]);
    assert!(out.contains("status: NOERROR") && out.contains("1.0.0"), "{out}");
    assert!(out.contains("; EDNS: version: 0, flags: do;"), "{out}");
    // Loopback in paris is always allowed.
    let out = dig(&net, "paris", &["www.example.org", "A"]);
    assert!(out.contains("\tA\t192.0.2.7"), "{out}");
    drop(s);
}

/// Issue 16 (6): `dns.upstream` naming the responder itself (here by the host's WAN address
/// while listening on 0.0.0.0) is recognised and ignored with a warning, instead of each
/// query being forwarded to itself until the forwarding bound.
#[test]
fn an_upstream_pointing_at_the_responder_itself_is_refused() {
    let Some(net) = Net::new(&["london"]) else {
        return;
    };
    if !require(&["dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let own = format!("{}:5353", net.wan_addr("london"));
    let s = sites(dir.path(), &net, &["london"], |site| {
        set_dns(site, "0.0.0.0:5353", &[own.as_str()]);
    });
    let out = dig(&net, "london", &["www.example.org", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    let status: serde_json::Value = serde_json::from_str(&s[0].ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["dns"]["forwarded"], 0, "{status}");
    assert!(
        s[0].log_text().contains("is this responder itself"),
        "{}",
        s[0].log_text()
    );
}

/// Issue 16 (2): clients that hold TCP connections open (300 here, past the table's 256) do
/// not lock out a client that asks: a full table closes the idlest connection for the new one.
#[test]
fn idle_tcp_connections_cannot_lock_out_tcp_queries() {
    let Some(net) = Net::new(&["london"]) else {
        return;
    };
    if !require(&["dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _s = sites(dir.path(), &net, &["london"], |_| {});
    let held: Vec<std::net::TcpStream> = net.run_in("london", || {
        (0..300)
            .filter_map(|_| std::net::TcpStream::connect("127.0.0.1:5353").ok())
            .collect()
    });
    assert!(held.len() >= 256, "only {} connections opened", held.len());
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..3 {
        let out = dig(&net, "london", &["+tcp", &format!("dns-version.{ZONE}"), "TXT"]);
        assert!(out.contains("status: NOERROR") && out.contains("1.0.0"), "{out}");
    }
    drop(held);
}

/// Issue 16 (5): with `dns.listen` on 0.0.0.0, a query sent to another address of the host (a
/// second loopback address, the WAN address) is answered from that address, which dig
/// requires (it drops "reply from unexpected source").
#[test]
fn a_wildcard_listener_answers_from_the_address_queried() {
    let Some(net) = Net::new(&["london"]) else {
        return;
    };
    if !require(&["dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _s = sites(dir.path(), &net, &["london"], |site| set_dns(site, "0.0.0.0:5353", &[]));
    let wan = net.wan_addr("london").to_string();
    for server in ["127.0.0.5", "127.0.0.1", wan.as_str()] {
        let out = dig_server(&net, "london", server, 5353, &[&format!("dns-version.{ZONE}"), "TXT"]);
        assert!(
            out.contains("status: NOERROR") && out.contains("1.0.0"),
            "asking {server}:\n{out}"
        );
        assert!(out.contains(&format!("SERVER: {server}#5353")), "{out}");
    }
}

/// Issue 16 (3): unbound with a stub zone for clusterset.local and `stub-prime: yes` (it asks
/// the apex for NS, then the NS name's address, before anything else) resolves clusterset
/// names through the agent; without NS at the apex it SERVFAILs every name.
#[test]
fn unbound_with_a_primed_stub_zone_resolves_clusterset_names() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["dig", "unbound"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Port 53: a primed stub zone asks the NS name's address, on the standard port.
    let s = sites(dir.path(), &net, &["london", "paris"], |site| {
        if site.name == "paris" {
            set_dns(site, "127.0.0.1:53", &[]);
        }
    });
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    export(london, "etcd", "[{name: client, port: 2379}]", &[("etcd-0", POD, true)]);
    let l0 = vip_of(&wait_ready(paris, "etcd", 1), "london", "etcd-0");
    let ask = |name: &str| dig_server(&net, "paris", "127.0.0.2", 53, &[name, "A"]);
    let conf = dir.path().join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: 127.0.0.2\n  port: 53\n  do-daemonize: no\n  use-syslog: no\n  chroot: \"\"\n  \
             username: \"\"\n  pidfile: \"\"\n  directory: \"{dir}\"\n  do-not-query-localhost: no\n  \
             module-config: \"iterator\"\n  domain-insecure: \"{ZONE}\"\n  local-zone: \"local.\" nodefault\n  \
             access-control: 127.0.0.0/8 allow\nstub-zone:\n  name: \"{ZONE}\"\n  stub-addr: 127.0.0.1@53\n  \
             stub-prime: yes\nremote-control:\n  control-enable: no\n",
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let _unbound = net.spawn("paris", &["unbound", "-d", "-c", conf.to_str().unwrap()]);
    let name = format!("etcd-0.london.etcd.default.svc.{ZONE}");
    let mut out = String::new();
    let ok = wait_for(Duration::from_secs(10), || {
        out = ask(&name);
        out.contains("status: NOERROR")
    });
    assert!(ok, "{out}");
    assert!(out.contains(&format!("IN A\t{l0}")), "{out}");
    let out = ask(&format!("nope.default.svc.{ZONE}"));
    assert!(out.contains("status: NXDOMAIN"), "{out}");
}

/// Issue 16 (14): a changed `dns.upstream` is applied while running; a changed `dns.listen`
/// is reported as needing a restart; a rejected change shows in `status` and the previous
/// configuration stays in force.
#[test]
fn reloads_apply_dns_settings_and_report_what_needs_a_restart() {
    let Some(net) = Net::new(&["london"]) else {
        return;
    };
    if !require(&["dig", "dnsmasq"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _upstream = dnsmasq(&net, "london", 5300);
    let s = sites(dir.path(), &net, &["london"], |_| {});
    let london = &s[0];
    let reload = || -> serde_json::Value {
        let st: serde_json::Value = serde_json::from_str(&london.ok(&["status", "-o", "json"])).unwrap();
        st["config_reload"].clone()
    };
    assert!(dig(&net, "london", &["www.example.org", "A"]).contains("status: REFUSED"));

    set_dns(london, "127.0.0.1:5353", &["127.0.0.1:5300"]);
    let mut out = String::new();
    assert!(
        wait_for(Duration::from_secs(5), || {
            out = dig(&net, "london", &["www.example.org", "A"]);
            out.contains("\tA\t192.0.2.7")
        }),
        "dns.upstream not applied:\n{out}\n{}",
        london.log_text()
    );
    assert_eq!(reload()["applied"], true, "{}", reload());
    assert_eq!(reload()["restart_needed"], serde_json::json!([]), "{}", reload());

    set_dns(london, "127.0.0.1:5354", &["127.0.0.1:5300"]);
    assert!(
        wait_for(Duration::from_secs(5), || reload()["restart_needed"]
            == serde_json::json!(["dns.listen"])),
        "{}",
        reload()
    );
    assert!(london.log_text().contains("restart needed"), "{}", london.log_text());
    // Still answering where it was.
    assert!(dig(&net, "london", &["www.example.org", "A"]).contains("\tA\t192.0.2.7"));

    let path = london.state.join("causeway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    common::write_atomic(&path, &text.replace("ttl: 5", "ttl: soon"));
    assert!(
        wait_for(Duration::from_secs(5), || reload()["applied"] == false),
        "{}",
        reload()
    );
    let error = reload()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("dns.ttl"), "{error}");
    assert!(dig(&net, "london", &["www.example.org", "A"]).contains("\tA\t192.0.2.7"));
}
