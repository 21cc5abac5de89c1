//! End-to-end tests of the multi-site network harness: sites in separate network namespaces
//! that reach each other only over the WAN, and real agents linking across it.
//!
//! They need root and iproute2; elsewhere they print `skipping: …` and pass (fail with
//! `CI=true`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{self, Net};
use common::{Site, wait_for};

/// Echo server for 10.1.0.1:9000 when socat is missing.
const PY_ECHO: &str = "import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('10.1.0.1', 9000))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(c.recv(64))
    c.close()
";

/// Sends a line to `addr` from inside `site` and returns what comes back.
fn echo(net: &Net, site: &str, addr: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    net.run_in(site, || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"hello\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

#[test]
fn harness_isolates_sites() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    net.add_pod("london", "10.1.0.1");
    net.add_pod("paris", "10.1.0.2");

    // A site sees only its loopback and its WAN link.
    let out = net.exec("london").args(["ip", "-br", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = links.lines().filter_map(|l| l.split(['@', ' ']).next()).collect();
    assert_eq!(names, ["lo", "wan0"], "{links}");

    let _server = if netns::have("socat") {
        net.spawn(
            "london",
            &["socat", "TCP-LISTEN:9000,bind=10.1.0.1,reuseaddr,fork", "EXEC:cat"],
        )
    } else if netns::require(&["python3"]) {
        net.spawn("london", &["python3", "-c", PY_ECHO])
    } else {
        return;
    };

    // London reaches its own pod…
    let mut last = None;
    let served = wait_for(Duration::from_secs(5), || {
        last = Some(echo(&net, "london", "10.1.0.1:9000"));
        matches!(&last, Some(Ok(s)) if s == "hello\n")
    });
    assert!(served, "london cannot reach its own pod: {last:?}");

    // …paris does not: it has no route there, and 10.1.0.x is its own pod range.
    let err = echo(&net, "paris", "10.1.0.1:9000").expect_err("paris reached london's pod");
    eprintln!("paris -> 10.1.0.1:9000: {err}");

    // The WAN carries TCP and UDP between the sites' WAN addresses.
    let (london_wan, paris_wan) = (net.wan_addr("london"), net.wan_addr("paris"));
    assert_eq!(london_wan.to_string(), "10.200.0.10");
    assert_eq!(paris_wan.to_string(), "10.200.0.11");
    let listener = net.run_in("paris", || TcpListener::bind((paris_wan, 0))).unwrap();
    let to = listener.local_addr().unwrap();
    net.run_in("london", || TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("london cannot reach {to} over the WAN: {e}"));
    let (_, from) = listener.accept().unwrap();
    assert_eq!(from.ip(), london_wan);

    let udp = net.run_in("paris", || UdpSocket::bind((paris_wan, 0))).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let to = udp.local_addr().unwrap();
    net.run_in("london", || UdpSocket::bind("0.0.0.0:0")?.send_to(b"quic?", to))
        .unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = udp.recv_from(&mut buf).expect("udp over the WAN");
    assert_eq!((&buf[..n], from.ip()), (&b"quic?"[..], london_wan.into()));
}

#[test]
fn agents_link_over_the_wan() {
    let Some(net) = Net::new(&["london", "paris"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut london = Site::init_in(dir.path(), "london", &net);
    let mut paris = Site::init_in(dir.path(), "paris", &net);
    london.start();
    paris.start();

    let token = london.issue(&[], &dir.path().join("paris.token"));
    let out = paris.ok(&["token", "redeem", token.to_str().unwrap()]);
    assert!(out.starts_with("linked to london (10.200.0.10:7400)"), "{out}");
    let both_up = || paris.link_up("london") && london.link_up("paris");
    assert!(
        wait_for(Duration::from_secs(5), both_up),
        "link not up:\nlondon:\n{}\nparis:\n{}",
        london.log_text(),
        paris.log_text()
    );
    // The link really crosses the WAN.
    let remote = london.links()[0]["remote"].as_str().unwrap_or_default().to_string();
    assert!(remote.starts_with("10.200.0.11:"), "london sees paris at {remote:?}");

    // Paris loses its WAN: both sides notice.
    net.set_wan("paris", false);
    let cut = Instant::now();
    assert!(
        wait_for(Duration::from_secs(6), || !paris.link_up("london")
            && !london.link_up("paris")),
        "link still up 6 s after the WAN went down:\n{}",
        paris.log_text()
    );
    eprintln!("outage noticed after {:?}", cut.elapsed());

    net.set_wan("paris", true);
    let restored = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), both_up),
        "link not back 10 s after the WAN returned:\nlondon:\n{}\nparis:\n{}",
        london.log_text(),
        paris.log_text()
    );
    eprintln!("link back after {:?}", restored.elapsed());

    // `ip netns exec` execs the agent, so a graceful stop reaches it.
    paris.stop();
    london.stop();
}

#[test]
fn cleanup_leaves_nothing() {
    let Some(net) = Net::new(&["a", "b"]) else {
        return;
    };
    let names = net.namespaces();
    assert_eq!(names.len(), 3);

    // A process started in a site without a handle to kill it, and per-namespace /etc.
    let mut orphan = net.exec("a").args(["sleep", "600"]).spawn().unwrap();
    net.resolv_conf("b", "10.200.0.10");
    let out = net.exec("b").args(["cat", "/etc/resolv.conf"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nameserver 10.200.0.10\n");

    // A leftover of a crashed run: its pid part names a process that is gone.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = format!("cw{dead}zz-stale");
    assert!(
        Command::new("ip")
            .args(["netns", "add", &stale])
            .status()
            .unwrap()
            .success()
    );

    drop(net);
    let listed =
        || String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    let after = listed();
    for ns in &names {
        assert!(
            !after.lines().any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} left behind:\n{after}"
        );
        assert!(
            !std::path::Path::new("/etc/netns").join(ns).exists(),
            "/etc/netns/{ns} left behind"
        );
    }
    assert!(
        wait_for(Duration::from_secs(2), || orphan.try_wait().unwrap().is_some()),
        "process in a dropped namespace still runs"
    );

    // The next net removes the stale namespace (unless a concurrent test's net already did).
    let next = Net::new(&["c"]).expect("prerequisites held a moment ago");
    let after = listed();
    assert!(!after.contains(&stale), "stale {stale} not removed:\n{after}");
    drop(next);
}
