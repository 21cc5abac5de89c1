//! Sidecar mode end to end: every grid pod is a network namespace of its own on its site's
//! LAN, runs a causeway sidecar linked only to its site's gateway, and talks to members in
//! other sites through VIPs on its own loopback. The sidecar that delivers a flow connects
//! from the client's own VIP (and, for UDP, its source port), so members see each other at
//! addresses that work from every site. All sites use the same pod address, 10.1.0.1.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::netns::{Background, Net, require};
use common::sidecar::Sidecar;
use common::{BIN, Site, stdout, tail, wait_for};

const POD: &str = "10.1.0.1";
const SITES: [&str; 3] = ["london", "paris", "tokyo"];

/// Three linked sites, each with one pod running a sidecar that exports `exports`.
struct World {
    net: Net,
    gateways: Vec<Site>,
    sidecars: Vec<Sidecar>,
    dir: tempfile::TempDir,
}

impl World {
    fn new(service: &str, ports: &str) -> Option<World> {
        World::with_mode(service, ports, "listen")
    }

    /// Like [`World::new`] with `vips.mode: <mode>`; for `intercept`, each pod's nftables
    /// rule is installed first, as a Kubernetes initContainer would.
    fn with_mode(service: &str, ports: &str, mode: &str) -> Option<World> {
        if mode == "intercept" && !require(&["nft"]) {
            return None;
        }
        let mut net = Net::new(&SITES)?;
        let dir = tempfile::tempdir().unwrap();
        let mut gateways = Vec::new();
        for name in SITES {
            let mut gw = Site::init_in(dir.path(), name, &net);
            gw.start();
            gateways.push(gw);
        }
        for spoke in [1, 2] {
            let file = dir.path().join(format!("{}.token", SITES[spoke]));
            gateways[0].issue(&[], &file);
            gateways[spoke].ok(&["token", "redeem", file.to_str().unwrap()]);
        }
        let mut sidecars = Vec::new();
        for (i, site) in SITES.iter().enumerate() {
            let mut sc = Sidecar::create(&mut net, &gateways[i], dir.path(), site, POD, service, ports, mode);
            if mode == "intercept" {
                // Twice: installing is idempotent.
                for _ in 0..2 {
                    let out = sc.intercept(&net, "install");
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                }
            }
            sc.start(&net);
            sidecars.push(sc);
        }
        let world = World {
            net,
            gateways,
            sidecars,
            dir,
        };
        for sc in &world.sidecars {
            let ok = wait_for(Duration::from_secs(15), || {
                SITES.iter().all(|s| sc.vip(service, s).is_some())
            });
            assert!(ok, "{} does not see every member:\n{}", sc.pod, world.logs());
        }
        Some(world)
    }

    fn vip(&self, service: &str, site: &str) -> String {
        self.sidecars[0].vip(service, site).expect("vip")
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for g in &self.gateways {
            out += &format!("--- gateway {}\n{}\n", g.name, tail(&g.log_text(), 30));
        }
        for s in &self.sidecars {
            out += &format!(
                "--- sidecar {}\n{}\n",
                s.pod,
                tail(&std::fs::read_to_string(&s.log).unwrap_or_default(), 30)
            );
        }
        out
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn sidecar_credentials_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Site::init(dir.path(), "london");
    let secret = dir.path().join("member.yaml");
    gw.ok(&["sidecar", "credentials", "-o", secret.to_str().unwrap()]);
    let text = std::fs::read_to_string(&secret).unwrap();
    for key in [
        "kind: Secret",
        "name: causeway-member",
        "ca.crt:",
        "agent.crt:",
        "agent.key:",
    ] {
        assert!(text.contains(key), "{key} missing:\n{text}");
    }
    let member = dir.path().join("member");
    gw.ok(&[
        "sidecar",
        "credentials",
        "--format",
        "dir",
        "-o",
        member.to_str().unwrap(),
    ]);
    // Member credentials cannot mint more, and are not a gateway.
    let out = std::process::Command::new(BIN)
        .args(["--state", member.to_str().unwrap(), "sidecar", "credentials", "-o"])
        .arg(dir.path().join("x.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let cfg = gw.state.join("causeway.yaml");
    let out = std::process::Command::new(BIN)
        .args([
            "--state",
            member.to_str().unwrap(),
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need `gateway:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Path::new("");
}

#[test]
fn redis_cluster_without_announce_ip_learns_vips_from_source_addresses() {
    if !require(&["redis-server", "redis-cli"]) {
        return;
    }
    let Some(w) = World::new("redis", "[{name: client, port: 6379}, {name: bus, port: 16379}]") else {
        return;
    };
    let mut servers = Vec::new();
    for (i, site) in SITES.iter().enumerate() {
        let data = w.path(&format!("redis-{site}"));
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::File::create(w.path(&format!("redis-{site}.log"))).unwrap();
        let child = w
            .net
            .exec(&w.sidecars[i].pod)
            .args(common::redis_cluster_node(POD, &data))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        servers.push(Background(child));
    }
    let vips: Vec<String> = SITES.iter().map(|s| w.vip("redis", s)).collect();
    // Every VIP is served in london's gateway namespace.
    for vip in &vips {
        assert!(
            wait_for(Duration::from_secs(10), || {
                stdout(
                    &w.net
                        .exec("london")
                        .args(["redis-cli", "-h", vip, "ping"])
                        .output()
                        .unwrap(),
                ) == "PONG"
            }),
            "{vip} not reachable:\n{}",
            w.logs()
        );
    }
    // Created from inside london's pod (issue 17, 1), with the addresses its resolver gives
    // for the three members, london's own included: all VIPs, valid in every site.
    let london_pod = &w.sidecars[0].pod;
    let addrs: Vec<String> = SITES
        .iter()
        .map(|site| {
            let out = w
                .net
                .exec(london_pod)
                .args([
                    "getent",
                    "hosts",
                    &format!("redis-0.{site}.redis.default.svc.clusterset.local"),
                ])
                .output()
                .unwrap();
            let ip = stdout(&out).split_whitespace().next().unwrap_or_default().to_string();
            format!("{ip}:6379")
        })
        .collect();
    let expected: Vec<String> = vips.iter().map(|v| format!("{v}:6379")).collect();
    assert_eq!(addrs, expected, "getent in london's pod");
    let mut create = vec!["redis-cli", "--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.push("--cluster-yes");
    let out = w.net.exec(london_pod).args(&create).output().unwrap();
    assert!(out.status.success(), "create: {}\n{}", stdout(&out), w.logs());
    for (i, site) in SITES.iter().enumerate() {
        let pod = &w.sidecars[i].pod;
        let ok = wait_for(Duration::from_secs(30), || {
            let info = stdout(
                &w.net
                    .exec(pod)
                    .args(["redis-cli", "-h", POD, "cluster", "info"])
                    .output()
                    .unwrap(),
            );
            info.contains("cluster_state:ok") && info.contains("cluster_slots_assigned:16384")
        });
        assert!(ok, "cluster not ok in {site}:\n{}", w.logs());
        // Each node knows the others by their VIPs, learned from the source of their
        // connections (no cluster-announce-ip anywhere).
        let nodes = stdout(
            &w.net
                .exec(pod)
                .args(["redis-cli", "-h", POD, "cluster", "nodes"])
                .output()
                .unwrap(),
        );
        for (j, vip) in vips.iter().enumerate() {
            if i != j {
                assert!(nodes.contains(&format!("{vip}:6379@16379")), "{site} sees:\n{nodes}");
            }
        }
    }
    // A client in paris's pod, following MOVED redirections to VIPs.
    for k in 0..10 {
        let set = w
            .net
            .exec(&w.sidecars[0].pod)
            .args(["redis-cli", "-c", "-h", POD, "set", &format!("k{k}"), "v"])
            .output()
            .unwrap();
        assert_eq!(stdout(&set), "OK");
        let get = w
            .net
            .exec(&w.sidecars[1].pod)
            .args(["redis-cli", "-c", "-h", POD, "get", &format!("k{k}")])
            .output()
            .unwrap();
        assert_eq!(stdout(&get), "v");
    }
}

/// Sends `msg` from `from_pod`'s member socket (bound to POD:9999) to `to` and waits for an
/// answer; returns the answer and where it came from.
fn udp_exchange(net: &Net, pod: &str, sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<(Vec<u8>, SocketAddr)> {
    net.run_in(pod, || {
        let mut buf = [0u8; 1500];
        for _ in 0..20 {
            sock.send_to(msg, to).ok()?;
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    })
}

#[test]
fn udp_peers_see_each_others_vip_and_source_port_and_survive_restarts() {
    let Some(mut w) = World::new(
        "peer",
        "[{name: gossip, port: 9999, protocol: UDP}, {name: http, port: 8080}]",
    ) else {
        return;
    };
    let (london_pod, paris_pod) = (w.sidecars[0].pod.clone(), w.sidecars[1].pod.clone());
    let vip_l: std::net::IpAddr = w.vip("peer", "london").parse().unwrap();
    let vip_p: std::net::IpAddr = w.vip("peer", "paris").parse().unwrap();
    // paris's member answers every datagram to the address and port it came from, saying
    // what it saw.
    let responder = w.net.run_in(&paris_pod, || UdpSocket::bind((POD, 9999)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = responder.recv_from(&mut buf) {
            let _ = responder.send_to(format!("saw {from}").as_bytes(), from);
        }
    });
    let sock = w.net.run_in(&london_pod, || {
        let s = UdpSocket::bind((POD, 9999)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s
    });
    let exchange = |w: &World| udp_exchange(&w.net, &london_pod, &sock, SocketAddr::new(vip_p, 9999), b"hello");
    let (answer, from) = exchange(&w).unwrap_or_else(|| panic!("no UDP answer:\n{}", w.logs()));
    assert_eq!(
        String::from_utf8_lossy(&answer),
        format!("saw {vip_l}:9999"),
        "paris saw london's VIP and port"
    );
    assert_eq!(
        from,
        SocketAddr::new(vip_p, 9999),
        "the answer came from where it was sent"
    );

    // Listen mode: a member bound to its pod address is reached at its VIP from both other
    // sites and from its own pod (whose sidecar serves its own VIP too, docs/REFERENCE.md "Names"), and
    // sees every client at that client's VIP.
    let listener = w.net.run_in(&london_pod, || TcpListener::bind((POD, 8080)).unwrap());
    std::thread::spawn(move || {
        while let Ok((mut c, peer)) = listener.accept() {
            let _ = std::io::Write::write_all(&mut c, format!("london member; you are {}", peer.ip()).as_bytes());
        }
    });
    for (k, site) in [(1usize, "paris"), (2, "tokyo"), (0, "london")] {
        let pod = w.sidecars[k].pod.clone();
        let vip_k: std::net::IpAddr = w.vip("peer", site).parse().unwrap();
        let got = w.net.run_in(&pod, || {
            let mut s = TcpStream::connect_timeout(&SocketAddr::new(vip_l, 8080), Duration::from_secs(3)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).ok()?;
            Some(out)
        });
        let got = got.unwrap_or_else(|| panic!("no answer from {site}:\n{}", w.logs()));
        if k == 0 {
            // The member's own pod: its sidecar connects from the pod's default address.
            assert!(got.starts_with("london member; you are "), "{got}");
        } else {
            assert_eq!(
                got,
                format!("london member; you are {vip_k}"),
                "from {site}:\n{}",
                w.logs()
            );
        }
    }
    // In london's pod, london's own member resolves to its VIP, valid in every site.
    let own = stdout(
        &w.net
            .exec(&london_pod)
            .args(["getent", "hosts", "peer-0.london.peer.default.svc.clusterset.local"])
            .output()
            .unwrap(),
    );
    assert!(own.starts_with(&format!("{vip_l} ")), "{own}");

    // The sidecar restarts: the pod's flows come back without anyone doing anything.
    w.sidecars[0].stop();
    w.sidecars[0].start(&w.net);
    let back = wait_for(Duration::from_secs(15), || exchange(&w).is_some());
    assert!(back, "no UDP after the sidecar restarted:\n{}", w.logs());
    // So does the gateway.
    w.gateways[0].stop();
    w.gateways[0].start();
    let back = wait_for(Duration::from_secs(20), || {
        exchange(&w).is_some_and(|(a, _)| a.starts_with(b"saw "))
    });
    assert!(back, "no UDP after the gateway restarted:\n{}", w.logs());
}

/// Issue 16 (7): a sidecar started while its gateway is unreachable is not ready (its pod's
/// startupProbe keeps the grid member from starting with an empty catalogue), says why, and
/// becomes ready once the gateway's catalogue arrives.
#[test]
fn a_sidecar_is_ready_only_with_its_gateways_catalogue() {
    let Some(mut w) = World::new("ready", "[{name: http, port: 8080}]") else {
        return;
    };
    let status = |sc: &Sidecar| -> serde_json::Value {
        let out = std::process::Command::new(BIN)
            .args(["--state", sc.state.to_str().unwrap(), "status", "-o", "json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    assert_eq!(status(&w.sidecars[0])["ready"], true, "{}", status(&w.sidecars[0]));

    // The gateway is down when the pod (and so its sidecar) starts.
    w.gateways[0].stop();
    w.sidecars[0].stop();
    w.sidecars[0].start(&w.net);
    let st = status(&w.sidecars[0]);
    assert_eq!(st["ready"], false, "{st}");
    let reason = st["ready_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("gateway link is not up"), "{reason}");

    w.gateways[0].start();
    let sc = &w.sidecars[0];
    assert!(
        wait_for(Duration::from_secs(15), || status(sc)["ready"] == true),
        "{}\n{}",
        status(sc),
        w.logs()
    );
}

/// Issue 17 (2): `vips.mode: intercept`. Members bind wildcard addresses on the very ports
/// their peers' VIPs use, which listen mode cannot share; the nftables rule sends VIP traffic
/// to the agent's one port, and each flow still reaches the member its original destination
/// names, from the client's VIP (TCP) and VIP and port (UDP).
#[test]
fn intercept_mode_lets_members_bind_wildcards_and_keeps_source_addresses() {
    let Some(mut w) = World::with_mode(
        "peer",
        "[{name: gossip, port: 9999, protocol: UDP}, {name: http, port: 8080}]",
        "intercept",
    ) else {
        return;
    };
    let vips: Vec<std::net::IpAddr> = SITES.iter().map(|s| w.vip("peer", s).parse().unwrap()).collect();
    let mut sockets = Vec::new();
    for (i, site) in SITES.iter().enumerate() {
        let pod = w.sidecars[i].pod.clone();
        // Every member on 0.0.0.0: a TCP server saying who it sees, a UDP socket answering
        // each datagram to where it came from.
        let (tcp, udp) = w.net.run_in(&pod, || {
            (
                TcpListener::bind(("0.0.0.0", 8080)).unwrap(),
                UdpSocket::bind(("0.0.0.0", 9999)).unwrap(),
            )
        });
        let name = site.to_string();
        std::thread::spawn(move || {
            while let Ok((mut c, peer)) = tcp.accept() {
                let _ = std::io::Write::write_all(&mut c, format!("{name}; you are {}", peer.ip()).as_bytes());
            }
        });
        udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        sockets.push(udp);
    }
    let status: serde_json::Value = serde_json::from_str(&stdout(
        &std::process::Command::new(BIN)
            .args(["--state", w.sidecars[0].state.to_str().unwrap(), "status", "-o", "json"])
            .output()
            .unwrap(),
    ))
    .unwrap();
    assert_eq!(status["vips"]["mode"], "intercept", "{status}");
    assert_eq!(status["vips"]["intercept"]["redirected"], true, "{status}");
    assert_eq!(status["vips"]["intercept"]["udp"], "tproxy", "{status}");
    assert_eq!(status["counters"]["listeners"], 0, "{status}");

    // TCP from london's pod to every member, its own included.
    let london = w.sidecars[0].pod.clone();
    for (j, site) in SITES.iter().enumerate() {
        let got = w.net.run_in(&london, || {
            let mut s = TcpStream::connect_timeout(&SocketAddr::new(vips[j], 8080), Duration::from_secs(3)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).ok()?;
            Some(out)
        });
        let got = got.unwrap_or_else(|| panic!("no TCP answer from {site}:\n{}", w.logs()));
        assert!(got.starts_with(&format!("{site}; you are ")), "{got}");
        if j != 0 {
            assert_eq!(got, format!("{site}; you are {}", vips[0]), "{}", w.logs());
        }
    }

    // UDP: paris's member answers from its wildcard socket; london's member, also on
    // 0.0.0.0:9999, sends to paris's VIP and gets the answer from paris's VIP and port.
    let paris = sockets.remove(1);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = paris.recv_from(&mut buf) {
            let _ = paris.send_to(format!("saw {from}").as_bytes(), from);
        }
    });
    let exchange = udp_exchange(&w.net, &london, &sockets[0], SocketAddr::new(vips[1], 9999), b"hello");
    let (answer, from) = exchange.unwrap_or_else(|| panic!("no UDP answer:\n{}", w.logs()));
    assert_eq!(String::from_utf8_lossy(&answer), format!("saw {}:9999", vips[0]));
    assert_eq!(from, SocketAddr::new(vips[1], 9999));
    // A datagram to one's own VIP is delivered to one's own member.
    let tokyo = w.sidecars[2].pod.clone();
    let own = w.net.run_in(&tokyo, || {
        let s = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
        s.send_to(b"me", SocketAddr::new(vips[2], 9999)).unwrap();
        let mut buf = [0u8; 16];
        sockets[1].recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
    });
    assert_eq!(own.as_deref(), Some(&b"me"[..]), "{}", w.logs());

    // Someone removes the rule under the running sidecar: it says so and, running as root
    // here, puts it back within a few seconds.
    let out = w.sidecars[0].intercept(&w.net, "remove");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let repaired = wait_for(Duration::from_secs(12), || {
        std::fs::read_to_string(&w.sidecars[0].log).is_ok_and(|l| {
            l.contains("the nftables rule redirecting VIP traffic is gone")
                && l.matches("installed the nftables rule redirecting VIP traffic").count() >= 1
        })
    });
    assert!(repaired, "{}", w.logs());
    let got = w.net.run_in(&london, || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(vips[1], 8080), Duration::from_secs(2)).ok()?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).ok()?;
        Some(out)
    });
    assert!(got.as_deref().is_some_and(|g| g.starts_with("paris;")), "{got:?}");

    // With the sidecar stopped, the rule comes out cleanly, twice.
    w.sidecars[0].stop();
    for _ in 0..2 {
        let out = w.net.exec(&london).args([BIN, "intercept", "remove"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Without it, paris's VIP is just a local address that london's wildcard member takes.
    let got = w.net.run_in(&london, || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(vips[1], 8080), Duration::from_secs(2)).ok()?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).ok()?;
        Some(out)
    });
    assert!(got.as_deref().is_some_and(|g| g.starts_with("london;")), "{got:?}");
    // A listen-mode agent started where the table was left behind removes it (it would send
    // every VIP connection to a port nobody listens on).
    let out = w.sidecars[0].intercept(&w.net, "install");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(&w.sidecars[0].config).unwrap();
    std::fs::write(&w.sidecars[0].config, config.replace("mode: intercept", "mode: listen")).unwrap();
    w.sidecars[0].start(&w.net);
    let gone = wait_for(Duration::from_secs(5), || {
        let tables = stdout(&w.net.exec(&london).args(["nft", "list", "tables"]).output().unwrap());
        !tables.contains("causeway")
    });
    assert!(gone, "{}", w.logs());
    assert!(
        std::fs::read_to_string(&w.sidecars[0].log)
            .unwrap()
            .contains("removed a leftover nftables table"),
        "{}",
        w.logs()
    );
}
