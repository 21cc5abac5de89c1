//! End-to-end tests of the catalog, routing and data path: real agents in separate network
//! namespaces joined only by a WAN bridge, with the **same** pod address (10.1.0.1) in every
//! site, and real programs (socat, dnsmasq, dig) on both ends.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::netns::{Net, require};
use common::{Site, tail, wait_for};

const POD: &str = "10.1.0.1";

/// Starts the agents of `names` in `net` (each with pod address 10.1.0.1).
fn sites(dir: &std::path::Path, net: &Net, names: &[&str]) -> Vec<Site> {
    sites_with(dir, net, names, |cfg| cfg)
}

/// Like [`sites`], with each causeway.yaml passed through `edit` before the agent starts.
fn sites_with(dir: &std::path::Path, net: &Net, names: &[&str], edit: impl Fn(String) -> String) -> Vec<Site> {
    common::sites_in(dir, net, names, POD, |site| {
        let cfg = site.state.join("causeway.yaml");
        std::fs::write(&cfg, edit(std::fs::read_to_string(&cfg).unwrap())).unwrap();
    })
}

/// The VIP of `hostname` in `owner`'s export of `service`, as `site` sees it.
fn vip(site: &Site, service: &str, owner: &str, hostname: &str) -> Option<String> {
    site.services()
        .into_iter()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["site"] == owner && e["hostname"] == hostname && e["ready"] == true)
        .and_then(|e| e["vip"].as_str().map(String::from))
}

fn wait_vip(site: &Site, service: &str, owner: &str, hostname: &str) -> String {
    let mut found = None;
    let ok = wait_for(Duration::from_secs(10), || {
        found = vip(site, service, owner, hostname);
        found.is_some()
    });
    assert!(
        ok,
        "{} never saw {service}/{owner}/{hostname}:\n{}",
        site.name,
        site.ok(&["status"])
    );
    found.unwrap()
}

fn export(site: &Site, service: &str, ports: &str, ready: bool) {
    site.set_exports(&format!(
        "exports:\n  - service: {service}\n    ports: {ports}\n    endpoints:\n      - {{hostname: {service}-0, ip: {POD}, ready: {ready}}}\n"
    ));
}

/// `cfg` (a causeway.yaml) with `links.down_after` and `links.idle_timeout` set.
fn link_timing(cfg: &str, down_after: &str, idle_timeout: &str) -> String {
    cfg.lines()
        .map(|l| match l.trim_start() {
            t if t.starts_with("down_after:") => format!("  down_after: {down_after}"),
            t if t.starts_with("idle_timeout:") => format!("  idle_timeout: {idle_timeout}"),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Accepts one connection on `listener` in a thread: writes `first`, then echoes everything
/// it reads (in reads of up to `buf` bytes, waiting up to `timeout` for each) until the
/// client half-closes or fails, then half-closes too.
fn echo_once(listener: TcpListener, timeout: Duration, buf: usize, first: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(timeout)).unwrap();
        c.write_all(&first).unwrap();
        let mut buf = vec![0u8; buf];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = c.shutdown(Shutdown::Write);
    })
}

/// A TCP round trip from inside `site`: send `msg`, half-close, read everything back.
fn round_trip(net: &Net, site: &str, addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    net.run_in(site, || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(msg)?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    })
}

/// An echo server (socat) on the pod address of `site`.
fn echo(net: &Net, site: &str, port: u16) -> common::netns::Background {
    let listen = format!("TCP-LISTEN:{port},bind={POD},reuseaddr,fork");
    let bg = net.spawn(site, &["socat", &listen, "EXEC:cat"]);
    assert!(
        wait_for(Duration::from_secs(5), || net
            .run_in(site, || TcpStream::connect((POD, port)).is_ok())),
        "echo server did not start in {site}"
    );
    bg
}

#[test]
fn gigabyte_half_close_and_reset_across_sites() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["socat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris"]);
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    export(
        london,
        "bulk",
        "[{name: sink, port: 9000}, {name: wc, port: 9001}, {name: closed, port: 9002}]",
        true,
    );
    let vip: std::net::IpAddr = wait_vip(paris, "bulk", "london", "bulk-0").parse().unwrap();

    // The pod address is london's own: paris cannot reach it except through the VIP.
    assert!(net.run_in("paris", || {
        TcpStream::connect_timeout(&format!("{POD}:9000").parse().unwrap(), Duration::from_millis(300)).is_err()
    }));

    // 1 GiB: a sink in london hashes what it receives and answers with the digest after
    // the client's FIN (half-close carried through the tunnel).
    const TOTAL: usize = 1 << 30;
    let sink = net.run_in("london", || TcpListener::bind((POD, 9000)).unwrap());
    let server = std::thread::spawn(move || {
        let (mut c, _) = sink.accept().unwrap();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0usize;
        loop {
            let k = c.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            ctx.update(&buf[..k]);
            n += k;
        }
        c.write_all(format!("{n} {}", hex::encode(ctx.finish())).as_bytes())
            .unwrap();
    });
    let started = Instant::now();
    let sent = net.run_in("paris", || -> std::io::Result<(String, String)> {
        let mut s = TcpStream::connect((vip, 9000))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..TOTAL / chunk.len() {
            for (j, b) in chunk.iter_mut().enumerate().step_by(4096) {
                *b = (i ^ j) as u8;
            }
            ctx.update(&chunk);
            s.write_all(&chunk)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok((hex::encode(ctx.finish()), answer))
    });
    // On failure, the agents' logs say which side ended the flow and why.
    let (sent_digest, answer) = sent.unwrap_or_else(|e| {
        panic!(
            "1 GiB transfer failed after {:?}: {e}\nparis log:\n{}\nlondon log:\n{}",
            started.elapsed(),
            tail(&paris.log_text(), 40),
            tail(&london.log_text(), 40)
        )
    });
    server.join().unwrap();
    eprintln!("1 GiB through the tunnel in {:?}", started.elapsed());
    assert_eq!(answer, format!("{TOTAL} {sent_digest}"));

    // Half-close with a real program: `wc -c` answers only after it sees EOF.
    let _wc = net.spawn(
        "london",
        &[
            "socat",
            &format!("TCP-LISTEN:9001,bind={POD},reuseaddr,fork"),
            "SYSTEM:wc -c",
        ],
    );
    assert!(wait_for(Duration::from_secs(5), || net
        .run_in("london", || TcpStream::connect((POD, 9001)).is_ok())));
    let out = net
        .exec("paris")
        .args([
            "sh",
            "-c",
            &format!("printf 'hello causeway' | socat -t 5 - TCP:{vip}:9001"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "14",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing listens on london's 9002: the client's connection is reset promptly.
    let (kind, took) = net.run_in("paris", || {
        let started = Instant::now();
        let mut s = TcpStream::connect((vip, 9002)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        (r.map_err(|e| e.kind()), started.elapsed())
    });
    assert_eq!(kind, Err(std::io::ErrorKind::ConnectionReset));
    assert!(took < Duration::from_secs(1), "reset took {took:?}");

    let metrics = paris.ok(&["status", "-o", "json"]);
    assert!(metrics.contains("\"listeners\""), "{metrics}");
}

#[test]
fn dns_over_udp_through_the_tunnel_with_dig() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["dnsmasq", "dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris"]);
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    let long = "x".repeat(250);
    let mut args = vec![
        "dnsmasq".to_string(),
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        format!("--listen-address={POD}"),
        "--bind-interfaces".into(),
        "--port=53".into(),
        "--address=/grid.example/10.9.9.9".into(),
        "--pid-file=".into(),
        "--user=root".into(),
        "--edns-packet-max=4096".into(),
    ];
    for i in 0..8 {
        args.push(format!("--txt-record=big.example,\"{i}{long}\""));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let _dns = net.spawn("london", &argv);
    export(london, "dns", "[{name: dns, port: 53, protocol: UDP}]", true);
    let vip = wait_vip(paris, "dns", "london", "dns-0");

    let dig = |extra: &[&str]| {
        let mut cmd = net.exec("paris");
        cmd.args(["dig", &format!("@{vip}"), "+tries=3", "+time=2"]).args(extra);
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut answer = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            answer = dig(&["grid.example", "+short"]);
            answer.trim() == "10.9.9.9"
        }),
        "dig through the tunnel answered {answer:?}\npARIS:\n{}\nLONDON:\n{}",
        paris.log_text(),
        london.log_text()
    );
    // Several clients at once: each gets its own flow and its own answers back.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = net.exec("paris");
            cmd.args([
                "dig",
                &format!("@{vip}"),
                "+tries=3",
                "+time=2",
                "grid.example",
                "+short",
            ]);
            std::thread::spawn(move || String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned())
        })
        .collect();
    for h in handles {
        let got = h.join().unwrap();
        assert_eq!(
            got.trim(),
            "10.9.9.9",
            "paris:\n{}\nlondon:\n{}",
            paris.log_text(),
            london.log_text()
        );
    }
    // An answer of ~2 KB is larger than a QUIC datagram: it travels on a stream, whole.
    let big = dig(&["big.example", "TXT", "+bufsize=4096", "+ignore"]);
    assert!(big.contains("ANSWER: 8"), "{big}");
    assert!(!big.contains("flags: qr tc"), "the answer was truncated: {big}");
}

/// How a blocked read on one end of a flow ended: with the peer's FIN or a reset (the flow
/// was closed), or still waiting when the test gave up (the flow hung).
fn how_it_ended(r: std::io::Result<usize>) -> &'static str {
    match r {
        Ok(0) => "closed",
        Ok(_) => "data",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => "hung",
        Err(_) => "error",
    }
}

/// A pod in london on `port` that echoes one 5-byte message, then waits for more with no
/// deadline of its own but the test's: it must learn that the flow is gone. Returns how
/// that wait ended and after how long.
fn held_echo(net: &Net, port: u16) -> std::thread::JoinHandle<(&'static str, Duration)> {
    let listener = net.run_in("london", || TcpListener::bind((POD, port)).unwrap());
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut msg = [0u8; 5];
        c.read_exact(&mut msg).unwrap();
        c.write_all(&msg).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let waited = Instant::now();
        (how_it_ended(c.read(&mut [0u8; 64])), waited.elapsed())
    })
}

#[test]
fn a_site_that_vanishes_mid_flow_ends_the_flow_on_both_sides() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Links give up on a silent peer after links.idle_timeout, here 3 s (default 30 s).
    let mut s = sites_with(dir.path(), &net, &["london", "paris"], |cfg| {
        link_timing(&cfg, "1s", "3s")
    });
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    export(london, "hold", "[{name: hold, port: 9100}]", true);
    let hold: std::net::IpAddr = wait_vip(paris, "hold", "london", "hold-0").parse().unwrap();

    let server = held_echo(&net, 9100);
    let mut client = net.run_in("paris", || TcpStream::connect((hold, 9100)).unwrap());
    client.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello", "every byte before the outage arrives");

    // London drops off the network without a word: no QUIC close, no TCP FIN or RST.
    net.set_wan("london", false);
    let cut = Instant::now();
    client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let client_end = how_it_ended(client.read(&mut [0u8; 64]));
    let client_after = cut.elapsed();
    let (server_end, server_after) = server.join().unwrap();
    eprintln!("client saw {client_end} after {client_after:?}, pod saw {server_end} after {server_after:?}");
    let logs = |s: &[Site]| {
        format!(
            "paris:\n{}\nlondon:\n{}",
            tail(&s[1].log_text(), 20),
            tail(&s[0].log_text(), 20)
        )
    };
    // The link's idle timeout is 3 s here; each side ends its half of the flow then. The client
    // learns it from a reset, not an orderly FIN: the far end did not finish.
    assert!(
        client_end == "reset" && client_after < Duration::from_secs(10),
        "client: {client_end} after {client_after:?}\n{}",
        logs(&s)
    );
    assert!(
        matches!(server_end, "closed" | "reset") && server_after < Duration::from_secs(10),
        "pod: {server_end} after {server_after:?}\n{}",
        logs(&s)
    );

    // The other way round: the network is back, and then paris's agent dies (SIGKILL, as
    // when a sidecar's pod is evicted). The pod in london must not keep a dead flow.
    net.set_wan("london", true);
    let listed = || vip(&s[1], "hold", "london", "hold-0").is_some();
    assert!(wait_for(Duration::from_secs(10), listed), "{}", logs(&s));
    let server = held_echo(&net, 9101);
    export(
        &s[0],
        "hold",
        "[{name: hold, port: 9100}, {name: again, port: 9101}]",
        true,
    );
    // Held open (no FIN from the client) while paris's agent dies.
    let mut held = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            held = net.run_in("paris", || TcpStream::connect((hold, 9101))).ok();
            held.is_some()
        }),
        "{}",
        logs(&s)
    );
    let mut client = held.unwrap();
    client.write_all(b"again").unwrap();
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"again");
    s[1].kill();
    let (server_end, server_after) = server.join().unwrap();
    eprintln!("after paris's agent died the pod saw {server_end} after {server_after:?}");
    assert!(
        matches!(server_end, "closed" | "reset") && server_after < Duration::from_secs(10),
        "pod: {server_end} after {server_after:?}\n{}",
        logs(&s)
    );
}

#[test]
fn spokes_reach_each_other_through_the_hub() {
    let Some(net) = Net::new(&["london", "paris", "tokyo"]) else {
        return;
    };
    if !require(&["socat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris", "tokyo"]);
    let (london, paris, tokyo) = (&s[0], &s[1], &s[2]);
    london.link_spoke(dir.path(), paris, 1);
    london.link_spoke(dir.path(), tokyo, 1);
    let _echo = echo(&net, "tokyo", 7007);
    // Same service name and same pod hostname in two sites: one service, two endpoints.
    export(tokyo, "echo", "[{name: tcp, port: 7007}]", true);
    export(paris, "echo", "[{name: tcp, port: 7007}]", true);
    let vip = wait_vip(paris, "echo", "tokyo", "echo-0");
    let own = wait_vip(paris, "echo", "paris", "echo-0");
    assert_ne!(vip, own, "same-named pods in two sites have distinct VIPs");
    let list = paris.services();
    let echo_svc = list.iter().find(|s| s["service"] == "echo").unwrap();
    assert_eq!(echo_svc["namespace"], "default");
    assert_eq!(echo_svc["endpoints"].as_array().unwrap().len(), 2, "{echo_svc}");
    assert_eq!(echo_svc["ports"][0]["protocol"], "TCP");
    // The VIP is the same from every site, including the owner's.
    assert_eq!(wait_vip(london, "echo", "tokyo", "echo-0"), vip);
    assert_eq!(wait_vip(tokyo, "echo", "tokyo", "echo-0"), vip);

    let addr: SocketAddr = format!("{vip}:7007").parse().unwrap();
    let msg = b"spoke to spoke through the hub".repeat(1000);
    let back = round_trip(&net, "paris", addr, &msg).unwrap();
    assert_eq!(back, msg);
    // From the owning site, the VIP leads to the local endpoint.
    assert_eq!(round_trip(&net, "tokyo", addr, b"local").unwrap(), b"local");
    let status: serde_json::Value = serde_json::from_str(&paris.ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["routes"]["tokyo"]["next_hop"], "london", "{status}");
    assert_eq!(status["routes"]["tokyo"]["hops"], 2);
}

#[test]
fn withdrawal_and_return_timing() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris"]);
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    export(london, "etcd", "[{name: client, port: 2379}]", true);
    let vip = wait_vip(paris, "etcd", "london", "etcd-0");

    // Marked not ready: gone from paris within 1 s, and its listener with it.
    export(london, "etcd", "[{name: client, port: 2379}]", false);
    let t = Instant::now();
    assert!(
        wait_for(Duration::from_secs(1), || vip_of_ready(paris).is_none()),
        "not withdrawn within 1 s"
    );
    eprintln!("not-ready withdrawn after {:?}", t.elapsed());
    let addr: SocketAddr = format!("{vip}:2379").parse().unwrap();
    assert!(wait_for(Duration::from_secs(1), || net
        .run_in("paris", || TcpStream::connect(addr).is_err())));

    // Ready again, then the export removed entirely.
    export(london, "etcd", "[{name: client, port: 2379}]", true);
    assert_eq!(
        wait_vip(paris, "etcd", "london", "etcd-0"),
        vip,
        "a VIP is stable while its endpoint exists"
    );
    london.set_exports("exports: []\n");
    let t = Instant::now();
    assert!(
        wait_for(Duration::from_secs(1), || paris.services().is_empty()),
        "export not withdrawn within 1 s"
    );
    eprintln!("removed export withdrawn after {:?}", t.elapsed());

    // The site becomes unreachable: its endpoints are withdrawn within 5 s, and return.
    export(london, "etcd", "[{name: client, port: 2379}]", true);
    wait_vip(paris, "etcd", "london", "etcd-0");
    net.set_wan("london", false);
    let t = Instant::now();
    assert!(
        wait_for(Duration::from_secs(6), || vip_of_ready(paris).is_none()),
        "unreachable site not withdrawn"
    );
    eprintln!("unreachable site withdrawn after {:?}", t.elapsed());
    net.set_wan("london", true);
    assert_eq!(wait_vip(paris, "etcd", "london", "etcd-0"), vip);
}

fn vip_of_ready(site: &Site) -> Option<String> {
    vip(site, "etcd", "london", "etcd-0")
}

#[test]
fn cheapest_path_and_failover() {
    let Some(net) = Net::new(&["london", "paris", "tokyo"]) else {
        return;
    };
    if !require(&["socat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris", "tokyo"]);
    let (london, paris, tokyo) = (&s[0], &s[1], &s[2]);
    london.link_spoke(dir.path(), paris, 10); // direct but expensive
    tokyo.link_spoke(dir.path(), paris, 1);
    london.link_spoke(dir.path(), tokyo, 1);
    let _echo = echo(&net, "london", 7007);
    export(london, "echo", "[{name: tcp, port: 7007}]", true);
    let vip = wait_vip(paris, "echo", "london", "echo-0");
    let addr: SocketAddr = format!("{vip}:7007").parse().unwrap();
    let route = |site: &Site| -> serde_json::Value {
        let st: serde_json::Value = serde_json::from_str(&site.ok(&["status", "-o", "json"])).unwrap();
        st["routes"]["london"].clone()
    };
    assert!(
        wait_for(Duration::from_secs(5), || route(paris)["next_hop"] == "tokyo"),
        "{}",
        route(paris)
    );
    assert_eq!(route(paris)["cost"], 2);
    assert_eq!(round_trip(&net, "paris", addr, b"via tokyo").unwrap(), b"via tokyo");

    // tokyo is cut off: new flows take the direct link within 5 s.
    net.set_wan("tokyo", false);
    let t = Instant::now();
    let mut ok = false;
    while t.elapsed() < Duration::from_secs(8) {
        if route(paris)["next_hop"] == "london"
            && round_trip(&net, "paris", addr, b"direct").is_ok_and(|b| b == b"direct")
        {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "no failover: {}", route(paris));
    eprintln!("failover after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(6), "failover took {:?}", t.elapsed());
}

/// GET /metrics from inside `site` (the agents' metrics listen on the site's loopback).
fn scrape(net: &Net, site: &str) -> String {
    net.run_in(site, || {
        let mut s = TcpStream::connect("127.0.0.1:9400").expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

#[test]
fn metrics_count_flows_bytes_and_links() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["socat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sites_with(dir.path(), &net, &["london", "paris"], |text| {
        format!("{text}metrics: 127.0.0.1:9400\n")
    });
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    let _echo = echo(&net, "london", 7007);
    export(london, "echo", "[{name: tcp, port: 7007}]", true);
    let vip = wait_vip(paris, "echo", "london", "echo-0");
    let addr: SocketAddr = format!("{vip}:7007").parse().unwrap();
    assert_eq!(round_trip(&net, "paris", addr, &[7u8; 5000]).unwrap(), vec![7u8; 5000]);

    let mut text = String::new();
    let ok = wait_for(Duration::from_secs(5), || {
        text = scrape(&net, "paris");
        text.contains("causeway_flows_closed_total{") && text.contains("causeway_link_up{")
    });
    assert!(ok, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let line = |name: &str, must: &[&str]| {
        text.lines()
            .find(|l| l.starts_with(name) && must.iter().all(|m| l.contains(m)))
            .unwrap_or_else(|| panic!("no {name} with {must:?} in:\n{text}"))
            .to_string()
    };
    assert!(line("causeway_flows_opened_total", &["service=\"echo\"", "role=\"origin\""]).ends_with(" 1"));
    assert!(
        line(
            "causeway_bytes_total",
            &["service=\"echo\"", "direction=\"to_endpoint\""]
        )
        .ends_with(" 5000")
    );
    assert!(
        line(
            "causeway_bytes_total",
            &["service=\"echo\"", "direction=\"from_endpoint\""]
        )
        .ends_with(" 5000")
    );
    assert!(line("causeway_link_up", &["link=\"london\"", "peer=\"london\""]).ends_with(" 1"));
    line("causeway_link_rtt_seconds", &["link=\"london\""]);
    let london_metrics = scrape(&net, "london");
    assert!(london_metrics.contains("role=\"terminus\""), "{london_metrics}");

    // The DNS responder's counters (every agent here answers on 127.0.0.1:5353).
    let resolve = |name: &str| paris.cli_in(&net, &["resolve", name]);
    assert!(resolve("echo.default.svc.clusterset.local").status.success());
    assert_eq!(resolve("nope.default.svc.clusterset.local").status.code(), Some(1));
    let text = scrape(&net, "paris");
    let value = |series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    // At least: `causeway resolve` asks again over UDP when an attempt times out.
    assert!(value(r#"causeway_dns_responses_total{rcode="noerror"}"#) >= 1, "{text}");
    assert!(
        value(r#"causeway_dns_responses_total{rcode="nxdomain"}"#) >= 1,
        "{text}"
    );
    assert_eq!(value(r#"causeway_dns_responses_total{rcode="refused"}"#), 0, "{text}");
    assert_eq!(value("causeway_dns_forwarded_total"), 0, "{text}");
}

#[test]
fn vip_range_outside_loopback_gets_a_local_route() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["socat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sites_with(dir.path(), &net, &["london", "paris"], |text| {
        text.replace("cidr: 127.77.0.0/16", "cidr: 10.77.0.0/16")
    });
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    let _echo = echo(&net, "london", 7007);
    export(london, "echo", "[{name: tcp, port: 7007}]", true);
    let vip = wait_vip(paris, "echo", "london", "echo-0");
    assert!(vip.starts_with("10.77."), "{vip}");
    let addr: SocketAddr = format!("{vip}:7007").parse().unwrap();
    assert_eq!(
        round_trip(&net, "paris", addr, b"outside 127/8").unwrap(),
        b"outside 127/8"
    );
}

/// Issue 15 (1): flows on one link are isolated. Four downloads whose clients never read
/// (4 KiB receive buffers) and four uploads to a server that never reads hold only their own
/// stream windows: a fifth flow still moves 100 MiB each way at once, and the link stays up.
#[test]
fn stalled_flows_do_not_stall_the_link() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris"]);
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    export(
        london,
        "grid",
        "[{name: talker, port: 9100}, {name: sink, port: 9101}, {name: bulk, port: 9102}, {name: drain, port: 9103}]",
        true,
    );
    let vip: std::net::IpAddr = wait_vip(paris, "grid", "london", "grid-0").parse().unwrap();
    const BULK: usize = 100 << 20;

    // london's pod: a talker that writes until its client's window closes, a sink that
    // accepts uploads and never reads, a bulk sender and a drain that counts what it gets.
    let bind = |port: u16| net.run_in("london", || TcpListener::bind((POD, port)).unwrap());
    let talker = bind(9100);
    std::thread::spawn(move || {
        for c in talker.incoming().flatten() {
            std::thread::spawn(move || {
                let chunk = vec![7u8; 1 << 20];
                let mut c = c;
                while c.write_all(&chunk).is_ok() {}
            });
        }
    });
    let sink = bind(9101);
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held_by_sink = held.clone();
    std::thread::spawn(move || {
        for c in sink.incoming().flatten() {
            held_by_sink.lock().unwrap().push(c);
        }
    });
    let bulk = bind(9102);
    std::thread::spawn(move || {
        for mut c in bulk.incoming().flatten() {
            let chunk = vec![1u8; 1 << 20];
            for _ in 0..BULK / chunk.len() {
                if c.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    let drain = bind(9103);
    std::thread::spawn(move || {
        for mut c in drain.incoming().flatten() {
            let n = std::io::copy(&mut c, &mut std::io::sink()).unwrap_or(0);
            let _ = c.write_all(n.to_string().as_bytes());
        }
    });

    // Four readers that never read, with 4 KiB receive buffers.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(net.run_in("paris", || {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            sock.connect(&SocketAddr::new(vip, 9100).into()).unwrap();
            TcpStream::from(sock)
        }));
    }
    // Four uploads that nobody reads: each writes until its window is full.
    let uploads: Vec<_> = (0..4)
        .map(|_| {
            let mut c = net.run_in("paris", || TcpStream::connect((vip, 9101)).unwrap());
            std::thread::spawn(move || {
                c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                let chunk = vec![3u8; 1 << 20];
                let mut sent = 0usize;
                while sent < 256 << 20 && c.write_all(&chunk).is_ok() {
                    sent += chunk.len();
                }
                (c, sent)
            })
        })
        .collect();
    let uploads: Vec<_> = uploads.into_iter().map(|t| t.join().unwrap()).collect();
    for (_, sent) in &uploads {
        assert!(*sent < 256 << 20, "an upload nobody reads was not held back");
    }

    let logs = || {
        format!(
            "paris:\n{}\nlondon:\n{}",
            tail(&paris.log_text(), 20),
            tail(&london.log_text(), 20)
        )
    };
    // A fifth flow downloads 100 MiB, then uploads 100 MiB, while the eight are stalled.
    let started = Instant::now();
    let got = net.run_in("paris", || -> std::io::Result<usize> {
        let mut c = TcpStream::connect((vip, 9102))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        std::io::copy(&mut c, &mut std::io::sink()).map(|n| n as usize)
    });
    assert!(
        matches!(got, Ok(n) if n == BULK),
        "download beside stalled flows: {got:?} after {:?}\n{}",
        started.elapsed(),
        logs()
    );
    let counted = net.run_in("paris", || -> std::io::Result<String> {
        let mut c = TcpStream::connect((vip, 9103))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.set_write_timeout(Some(Duration::from_secs(10)))?;
        let chunk = vec![5u8; 1 << 20];
        for _ in 0..BULK / chunk.len() {
            c.write_all(&chunk)?;
        }
        c.shutdown(Shutdown::Write)?;
        let mut back = String::new();
        c.read_to_string(&mut back)?;
        Ok(back)
    });
    assert_eq!(
        counted.as_ref().ok().map(String::as_str),
        Some(BULK.to_string().as_str()),
        "upload beside stalled flows: {counted:?}\n{}",
        logs()
    );
    eprintln!("200 MiB beside 8 stalled flows in {:?}", started.elapsed());
    assert_eq!(paris.link_state("london").as_deref(), Some("up"));
    drop((stalled, uploads, held));
}

/// Issue 15 (8): agents started with the 1,024 open-files soft limit containers give raise it
/// to the hard limit, report it (`status`, `/metrics`), and carry 1,500 concurrent flows.
#[test]
fn agents_raise_the_open_files_limit_and_carry_many_flows() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["prlimit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s: Vec<Site> = ["london", "paris"]
        .iter()
        .map(|n| {
            net.add_pod(n, POD);
            let mut site = Site::init_in(dir.path(), n, &net);
            site.soft_nofile = Some(1024);
            site
        })
        .collect();
    for site in &mut s {
        site.start();
    }
    let (london, paris) = (&s[0], &s[1]);
    let status: serde_json::Value = serde_json::from_str(&paris.ok(&["status", "-o", "json"])).unwrap();
    let limit = &status["open_files"];
    assert_eq!(limit["raised_from"], 1024, "{status}");
    assert!(limit["soft"].as_u64().unwrap() > 4096, "{status}");
    assert_eq!(limit["soft"], limit["hard"]);

    london.link_spoke(dir.path(), paris, 1);
    export(london, "many", "[{name: echo, port: 9200}]", true);
    let vip: std::net::IpAddr = wait_vip(paris, "many", "london", "many-0").parse().unwrap();
    const FLOWS: usize = 1500;
    let listener = net.run_in("london", || TcpListener::bind((POD, 9200)).unwrap());
    let server = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..FLOWS {
            let (c, _) = listener.accept().unwrap();
            held.push(c);
        }
        // Every flow open at once; then each echoes one byte.
        let mut echoed = 0;
        for c in &mut held {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {
                echoed += 1;
            }
        }
        echoed
    });
    let mut clients = net.run_in("paris", || {
        (0..FLOWS)
            .map(|_| TcpStream::connect_timeout(&SocketAddr::new(vip, 9200), Duration::from_secs(10)).unwrap())
            .collect::<Vec<_>>()
    });
    let mut answered = 0;
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"x").unwrap();
    }
    for c in &mut clients {
        let mut b = [0u8; 1];
        if c.read_exact(&mut b).is_ok() {
            answered += 1;
        }
    }
    assert_eq!(
        (answered, server.join().unwrap()),
        (FLOWS, FLOWS),
        "paris:\n{}\nlondon:\n{}",
        tail(&paris.log_text(), 20),
        tail(&london.log_text(), 20)
    );
}

/// Issue 15 (4): an outage longer than `links.down_after` (3 s) but shorter than
/// `links.idle_timeout` (30 s) takes the peer out of routing and DNS while it lasts, and costs
/// no flow: an open TCP flow carries on, byte for byte, when the network is back. Even a
/// plain (not resumable) flow: here `links.resume: false`, so both kinds stay covered (the
/// resumable ones by the tests of moving flows below).
#[test]
fn a_short_outage_costs_no_flow() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = sites_with(dir.path(), &net, &["london", "paris"], |cfg| {
        let plain = cfg.replace("  resume: true", "  resume: false");
        assert_ne!(plain, cfg, "the configuration template has links.resume");
        plain
    });
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    export(london, "hold", "[{name: hold, port: 9100}]", true);
    let vip: std::net::IpAddr = wait_vip(paris, "hold", "london", "hold-0").parse().unwrap();
    let listener = net.run_in("london", || TcpListener::bind((POD, 9100)).unwrap());
    // Echo until the client finishes.
    let server = echo_once(listener, Duration::from_secs(30), 4096, Vec::new());
    let mut client = net.run_in("paris", || TcpStream::connect((vip, 9100)).unwrap());
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut back = [0u8; 6];
    client.write_all(b"before").unwrap();
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"before");

    net.set_wan("london", false);
    let cut = Instant::now();
    // Written during the outage: QUIC holds it and delivers it afterwards.
    client.write_all(b"during").unwrap();
    // After down_after the link is down for routing and DNS, while the flow waits.
    assert!(
        wait_for(Duration::from_secs(6), || paris.link_state("london").as_deref()
            == Some("down")
            && vip_of(paris, "hold").is_none()),
        "link not down or london still listed after {:?}: {:?}\n{}",
        cut.elapsed(),
        paris.link_state("london"),
        tail(&paris.log_text(), 20)
    );
    let down = cut.elapsed();
    std::thread::sleep(Duration::from_millis(4500).saturating_sub(down));
    net.set_wan("london", true);
    eprintln!("down for routing after {down:?}; outage {:?}", cut.elapsed());

    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"during", "bytes written during the outage arrive");
    client.write_all(b"after!").unwrap();
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"after!");
    assert!(
        wait_for(Duration::from_secs(5), || paris.link_state("london").as_deref()
            == Some("up")
            && vip_of(paris, "hold").is_some()),
        "link not back: {:?}",
        paris.link_state("london")
    );
    client.shutdown(Shutdown::Write).unwrap();
    server.join().unwrap();
}

/// Any ready VIP of `service` that `site` lists.
fn vip_of(site: &Site, service: &str) -> Option<String> {
    site.services()
        .into_iter()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["ready"] == true)
        .and_then(|e| e["vip"].as_str().map(String::from))
}

/// Sends `msg` from `socket` to `to` and waits up to `wait` for the same bytes back (other
/// datagrams, such as late echoes of a flood, are skipped).
fn udp_echo(socket: &std::net::UdpSocket, to: SocketAddr, msg: &[u8], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut next_send = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_send {
            let _ = socket.send_to(msg, to);
            next_send = Instant::now() + Duration::from_millis(300);
        }
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && &buf[..n] == msg
        {
            return true;
        }
    }
    false
}

/// Issue 15, item 6: one client sending from thousands of source ports must not fill the UDP
/// flow tables (at its own site's origin or at the far terminus) for everybody else: another
/// client of the same site gets its echoes through at once, and the flooder's newest flows
/// work too; evictions are counted.
#[test]
fn one_client_flooding_udp_source_ports_does_not_deny_another() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = sites_with(dir.path(), &net, &["london", "paris"], |text| {
        format!("{text}metrics: 127.0.0.1:9400\n")
    });
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    const QUIET: &str = "10.1.0.2";
    net.add_pod("paris", QUIET);

    // A UDP echo server on london's pod address, as a thread of this test.
    let echo = net.run_in("london", || std::net::UdpSocket::bind((POD, 7009)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    export(london, "uecho", "[{name: echo, port: 7009, protocol: UDP}]", true);
    let vip = wait_vip(paris, "uecho", "london", "uecho-0");
    let to: SocketAddr = format!("{vip}:7009").parse().unwrap();
    let first = net.run_in("paris", || std::net::UdpSocket::bind((POD, 0)).unwrap());
    assert!(
        udp_echo(&first, to, b"warm-up", Duration::from_secs(10)),
        "no UDP echo through the link"
    );

    // The flood: 6,000 source ports of one address (limits.max_flows is 4,096), paced so the
    // agent's socket buffer does not drop it. The last few sockets stay open.
    const FLOOD: usize = 6000;
    let newest: Vec<std::net::UdpSocket> = net.run_in("paris", || {
        let mut keep = Vec::new();
        for i in 0..FLOOD {
            let s = std::net::UdpSocket::bind((POD, 0)).unwrap();
            s.send_to(format!("flood {i}").as_bytes(), to).unwrap();
            if i >= FLOOD - 8 {
                keep.push(s);
            }
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        keep
    });

    // Another client of paris: answered at once.
    let quiet = net.run_in("paris", || std::net::UdpSocket::bind((QUIET, 0)).unwrap());
    let started = Instant::now();
    assert!(
        udp_echo(&quiet, to, b"quiet client", Duration::from_secs(3)),
        "the second client got no echo after the flood\nparis:\n{}\nlondon:\n{}",
        tail(&paris.log_text(), 40),
        tail(&london.log_text(), 40)
    );
    eprintln!("second client answered after {:?}", started.elapsed());
    // The flooder's newest flows work too.
    for (i, s) in newest.iter().enumerate() {
        let msg = format!("newest {i}");
        assert!(
            udp_echo(s, to, msg.as_bytes(), Duration::from_secs(3)),
            "the flooder's newest flow {i} got no echo"
        );
    }
    // And a fresh client port of the flooder.
    let fresh = net.run_in("paris", || std::net::UdpSocket::bind((POD, 0)).unwrap());
    assert!(udp_echo(&fresh, to, b"fresh port", Duration::from_secs(3)));

    // Counted: paris evicted the flooder's oldest flows at its share; london's terminus
    // table filled and gave up the least recently used flows of the link.
    let counter = |text: &str, series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    };
    let p = scrape(&net, "paris");
    let evicted = counter(
        &p,
        r#"causeway_udp_flows_evicted_total{role="origin",reason="client_share"}"#,
    );
    assert!(evicted >= 4096, "paris evicted {evicted} origin flows\n{p}");
    let l = scrape(&net, "london");
    let evicted = counter(
        &l,
        r#"causeway_udp_flows_evicted_total{role="terminus",reason="table_full"}"#,
    );
    assert!(evicted > 0, "london never filled its terminus table: {evicted}\n{l}");
    // Logged, but not once per flow.
    let logged = paris.log_text().matches("udp flow evicted").count();
    assert!((1..=5).contains(&logged), "paris logged {logged} evictions");
}

/// A deterministic byte sequence (xorshift64), so both ends of a flow can check every byte.
struct Sequence(u64);

impl Sequence {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

/// Issue 15 (4): an open TCP flow whose path fails moves to the other path, byte-exact in
/// both directions. paris reaches london via tokyo (cheap) or directly (expensive); a client
/// in paris streams a known sequence to an echo server in london and checks every byte that
/// comes back, while `break_path` takes tokyo away mid-flow. The same TCP connection goes
/// on over the direct link.
fn a_flow_moves_when(break_path: impl FnOnce(&Net, &mut Site)) {
    let Some(net) = Net::new(&["london", "paris", "tokyo"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = sites(dir.path(), &net, &["london", "paris", "tokyo"]);
    s[0].link_spoke(dir.path(), &s[1], 10); // direct but expensive
    s[2].link_spoke(dir.path(), &s[1], 1);
    s[0].link_spoke(dir.path(), &s[2], 1);
    export(&s[0], "stream", "[{name: stream, port: 9200}]", true);
    let vip: std::net::IpAddr = wait_vip(&s[1], "stream", "london", "stream-0").parse().unwrap();
    let next_hop = |site: &Site| -> serde_json::Value {
        let st: serde_json::Value = serde_json::from_str(&site.ok(&["status", "-o", "json"])).unwrap();
        st["routes"]["london"]["next_hop"].clone()
    };
    assert!(wait_for(Duration::from_secs(5), || next_hop(&s[1]) == "tokyo"));

    let listener = net.run_in("london", || TcpListener::bind((POD, 9200)).unwrap());
    let server = echo_once(listener, Duration::from_secs(60), 64 * 1024, Vec::new());
    let client = net.run_in("paris", || {
        TcpStream::connect_timeout(&SocketAddr::new(vip, 9200), Duration::from_secs(3)).unwrap()
    });
    client.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    // The writer streams about 2 MB/s until told to stop, then half-closes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tx = client.try_clone().unwrap();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seq = Sequence(0x9e37_79b9_7f4a_7c15);
            let mut buf = vec![0u8; 8 * 1024];
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq.fill(&mut buf);
                tx.write_all(&buf).unwrap();
                sent += buf.len() as u64;
                std::thread::sleep(Duration::from_millis(4));
            }
            tx.shutdown(Shutdown::Write).unwrap();
            sent
        })
    };
    let mut rx = client;
    let mut seq = Sequence(0x9e37_79b9_7f4a_7c15);
    let (mut buf, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut got = 0u64;
    let mut longest_gap = Duration::ZERO;
    let mut last = Instant::now();
    let start = Instant::now();
    let mut cut: Option<Instant> = None;
    let mut break_path = Some(break_path);
    loop {
        if cut.is_none() && start.elapsed() > Duration::from_secs(2) {
            (break_path.take().unwrap())(&net, &mut s[2]);
            cut = Some(Instant::now());
        }
        if cut.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let n = rx.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "flow broke after {got} bytes ({:?} after the cut): {e}\n{}",
                cut.map(|t| t.elapsed()),
                tail(&s[1].log_text(), 30)
            )
        });
        if n == 0 {
            break;
        }
        seq.fill(&mut want[..n]);
        assert!(buf[..n] == want[..n], "byte {got}..{} differs", got + n as u64);
        got += n as u64;
        longest_gap = longest_gap.max(last.elapsed());
        last = Instant::now();
    }
    let sent = writer.join().unwrap();
    server.join().unwrap();
    eprintln!("{got} bytes echoed byte-exact; longest stall {longest_gap:?}");
    assert_eq!(got, sent, "every byte came back once");
    assert!(got > 10_000_000, "too little went through: {got}");
    assert_eq!(next_hop(&s[1]), "london");
    let log = s[1].log_text();
    assert!(log.contains("flow moved to another path"), "{}", tail(&log, 30));
    assert!(
        longest_gap < Duration::from_secs(8),
        "the flow stalled {longest_gap:?} (down_after is 3 s)"
    );
}

#[test]
fn an_open_flow_moves_when_its_relay_goes_silent() {
    a_flow_moves_when(|net, _tokyo| net.set_wan("tokyo", false));
}

#[test]
fn an_open_flow_moves_when_its_relay_stops() {
    a_flow_moves_when(|_net, tokyo| tokyo.stop());
}

/// A resumable flow under full load both ways: the server writes 48 MiB before it reads
/// anything (then echoes), while the client writes as fast as it can and reads. Plain TCP
/// carries this; a resumable flow must too, so each end's acknowledgements must get through
/// while its own data waits on the other's flow control, or the ends wait on each other.
#[test]
fn a_resumable_flow_carries_full_load_both_ways() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = sites(dir.path(), &net, &["london", "paris"]);
    s[0].link_spoke(dir.path(), &s[1], 1);
    export(&s[0], "echo", "[{name: echo, port: 9300}]", true);
    let vip: std::net::IpAddr = wait_vip(&s[1], "echo", "london", "echo-0").parse().unwrap();
    const FIRST: usize = 48 * 1024 * 1024;
    const TOTAL: u64 = 256 * 1024 * 1024;
    let listener = net.run_in("london", || TcpListener::bind((POD, 9300)).unwrap());
    let mut first = vec![0u8; FIRST];
    Sequence(11).fill(&mut first);
    let server = echo_once(listener, Duration::from_secs(30), 256 * 1024, first);
    let client = net.run_in("paris", || {
        TcpStream::connect_timeout(&SocketAddr::new(vip, 9300), Duration::from_secs(3)).unwrap()
    });
    client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tx = client.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut seq = Sequence(7);
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < TOTAL {
            seq.fill(&mut buf);
            tx.write_all(&buf).unwrap();
            sent += buf.len() as u64;
        }
        tx.shutdown(Shutdown::Write).unwrap();
    });
    let mut rx = client;
    let mut read_exactly = |seq: &mut Sequence, mut left: u64| {
        let (mut buf, mut want) = (vec![0u8; 256 * 1024], vec![0u8; 256 * 1024]);
        while left > 0 {
            let take = left.min(buf.len() as u64) as usize;
            let n = rx
                .read(&mut buf[..take])
                .unwrap_or_else(|e| panic!("stuck with {left} bytes to go: {e}\n{}", tail(&s[1].log_text(), 20)));
            assert!(n > 0, "early end with {left} bytes to go");
            seq.fill(&mut want[..n]);
            assert!(buf[..n] == want[..n], "bytes differ with {left} to go");
            left -= n as u64;
        }
    };
    let t = Instant::now();
    read_exactly(&mut Sequence(11), FIRST as u64);
    read_exactly(&mut Sequence(7), TOTAL);
    assert_eq!(rx.read(&mut [0u8; 1]).unwrap(), 0, "then the end");
    eprintln!("{} MiB both ways in {:?}", TOTAL / (1 << 20), t.elapsed());
    writer.join().unwrap();
    server.join().unwrap();
}

/// `cfg` (a causeway.yaml) with `links.lanes` set.
fn with_lanes(cfg: &str, lanes: u8) -> String {
    cfg.lines()
        .map(|l| match l.trim_start() {
            t if t.starts_with("lanes:") => format!("  lanes: {lanes}"),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The lanes up on `site`'s only link, as `link list -o json` shows them (absent while down).
fn lanes_up(site: &Site) -> Option<u64> {
    site.links().first().and_then(|l| l["lanes"].as_u64())
}

/// Waits until both ends of the link show `want` lanes up.
fn wait_lanes(a: &Site, b: &Site, want: u64) {
    assert!(
        wait_for(Duration::from_secs(15), || lanes_up(a) == Some(want)
            && lanes_up(b) == Some(want)),
        "lanes up: {} {:?}, {} {:?}, want {want}\n{}\n{}",
        a.name,
        lanes_up(a),
        b.name,
        lanes_up(b),
        tail(&a.log_text(), 10),
        tail(&b.log_text(), 10)
    );
}

/// Many flows at once through `vip`: each TCP flow sends its own 1 MiB pattern through the
/// echo server and must get exactly it back; each UDP client must get its echo.
fn many_flows_at_once(net: &Net, vip: std::net::IpAddr, sites: &[Site]) {
    // Threads spawned in the namespace's thread are in the namespace too.
    let logs = || {
        format!(
            "\n{}\n{}",
            tail(&sites[0].log_text(), 30),
            tail(&sites[1].log_text(), 30)
        )
    };
    net.run_in("paris", || {
        let tcp: Vec<_> = (0..24u64)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect_timeout(&SocketAddr::new(vip, 9400), Duration::from_secs(3))?;
                    s.set_read_timeout(Some(Duration::from_secs(20)))?;
                    let mut msg = vec![0u8; 1 << 20];
                    Sequence(i + 100).fill(&mut msg);
                    let mut tx = s.try_clone()?;
                    let sent = msg.clone();
                    let writer = std::thread::spawn(move || {
                        tx.write_all(&sent)?;
                        tx.shutdown(Shutdown::Write)
                    });
                    let mut back = Vec::new();
                    s.read_to_end(&mut back)?;
                    writer.join().expect("writer")?;
                    Ok::<bool, std::io::Error>(back == msg)
                })
            })
            .collect();
        for i in 0..16 {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let msg = format!("lane probe {i}");
            assert!(
                udp_echo(
                    &socket,
                    SocketAddr::new(vip, 9401),
                    msg.as_bytes(),
                    Duration::from_secs(5)
                ),
                "UDP client {i} got no echo{}",
                logs()
            );
        }
        for (i, h) in tcp.into_iter().enumerate() {
            match h.join().unwrap() {
                Ok(true) => {}
                Ok(false) => panic!("flow {i}: other bytes came back{}", logs()),
                Err(e) => panic!("flow {i}: {e}{}", logs()),
            }
        }
    });
}

/// `links.lanes`: the ends agree on the fewer lanes (4 at the acceptor, 3 at the dialer),
/// the dialer opens the extra ones, both list and export them, and many TCP and UDP flows at
/// once cross them byte-exact. Lanes come back after the acceptor restarts, and one end
/// configured for a single lane makes the link a single connection.
#[test]
fn a_link_opens_its_lanes_and_carries_many_flows_on_them() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    if !require(&["socat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = common::sites_in(dir.path(), &net, &["london", "paris"], POD, |site| {
        let cfg = site.state.join("causeway.yaml");
        let lanes = if site.name == "london" { 4 } else { 3 };
        let text = with_lanes(&std::fs::read_to_string(&cfg).unwrap(), lanes);
        std::fs::write(&cfg, format!("{text}metrics: 127.0.0.1:9400\n")).unwrap();
    });
    s[0].link_spoke(dir.path(), &s[1], 1);
    wait_lanes(&s[0], &s[1], 3);
    // An echo server that holds every connection until its client half-closes and it has
    // echoed everything (socat gives up 0.5 s after its client's FIN).
    let listener = net.run_in("london", || TcpListener::bind((POD, 9400)).unwrap());
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let (mut rx, mut tx) = (&c, &c);
                let _ = std::io::copy(&mut rx, &mut tx);
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    let _udp = net.spawn(
        "london",
        &["socat", &format!("UDP-RECVFROM:9401,bind={POD},fork"), "EXEC:cat"],
    );
    s[0].set_exports(&format!(
        "exports:\n  - service: echo\n    ports: [{{name: tcp, port: 9400}}, {{name: udp, port: 9401, protocol: UDP}}]\n    endpoints:\n      - {{hostname: echo-0, ip: {POD}}}\n"
    ));
    let vip: std::net::IpAddr = wait_vip(&s[1], "echo", "london", "echo-0").parse().unwrap();
    many_flows_at_once(&net, vip, &s);
    let status = s[1].ok(&["status", "-o", "json"]);
    assert!(status.contains("\"lanes\": 3"), "{status}");
    // Each flow carried 2 MiB, so it moved once from the interactive lane to a bulk one: the
    // terminus counts that as a resume, the origin (which logs real path changes) does not.
    let mut metrics = String::new();
    assert!(
        wait_for(Duration::from_secs(5), || {
            metrics = scrape(&net, "paris");
            metrics.contains(r#"causeway_link_lanes{link="london",peer="london"} 3"#)
        }),
        "{metrics}"
    );
    assert!(!metrics.contains("causeway_flows_resumed_total{"), "{metrics}");
    let london_metrics = scrape(&net, "london");
    let moved: u64 = london_metrics
        .lines()
        .filter(|l| l.starts_with("causeway_flows_resumed_total{") && l.contains(r#"role="terminus""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(moved > 0, "no flow moved to a bulk lane:\n{london_metrics}");

    // The acceptor restarts: the dialer links again, lanes and all.
    s[0].stop();
    s[0].start();
    wait_lanes(&s[0], &s[1], 3);
    wait_vip(&s[1], "echo", "london", "echo-0");
    many_flows_at_once(&net, vip, &s);

    // One lane at one end: the link is one connection, as before lanes.
    s[0].stop();
    let cfg = s[0].state.join("causeway.yaml");
    std::fs::write(&cfg, with_lanes(&std::fs::read_to_string(&cfg).unwrap(), 1)).unwrap();
    s[0].start();
    wait_lanes(&s[0], &s[1], 1);
    wait_vip(&s[1], "echo", "london", "echo-0");
    many_flows_at_once(&net, vip, &s);
}
