//! Real clustered software forms one cluster across isolated sites.
//!
//! Three sites (london, paris, tokyo), each a network namespace with the **same** pod address
//! 10.1.0.1, reachable from each other only through the causeway agents' QUIC port on a WAN
//! bridge. paris and tokyo redeem tokens issued by london (hub and spoke). Every site's
//! `/etc/netns/<ns>/resolv.conf` points at its own causeway DNS, so real programs resolve
//! `clusterset.local` names through it. The programs are Debian's: etcd, redis, dnsmasq, dig.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use common::netns::{Background, Net, require};
use common::relay::Relay;
use common::{Site, stdout, tail, wait_for, write_atomic};

const POD: &str = "10.1.0.1";
const SITES: [&str; 3] = ["london", "paris", "tokyo"];
const ZONE: &str = "svc.clusterset.local";

/// The three sites, linked hub-and-spoke, each answering DNS on its own 127.0.0.1:53.
struct Clusterset {
    net: Net,
    sites: Vec<Site>,
    dir: tempfile::TempDir,
    /// The WAN emulator in front of the hub, when asked for.
    _relay: Option<Relay>,
}

impl Clusterset {
    fn new(wan: Option<(Duration, f64)>) -> Option<Clusterset> {
        let net = Net::new(&SITES)?;
        let dir = tempfile::tempdir().unwrap();
        let mut relay = None;
        let mut sites = Vec::new();
        for name in SITES {
            net.add_pod(name, POD);
            let site = Site::init_in(dir.path(), name, &net);
            let cfg = site.state.join("causeway.yaml");
            let mut text = std::fs::read_to_string(&cfg)
                .unwrap()
                .replace("127.0.0.1:5353", "127.0.0.1:53");
            if let (Some((delay, loss)), "london") = (wan, name) {
                // The hub advertises the relay, so the spokes' links cross it.
                let wan_addr = net.wan_addr("london");
                text = text.replace(&format!("{wan_addr}:7400"), &format!("{wan_addr}:7401"));
                relay = Some(Relay::start(
                    &net.ns("london"),
                    format!("{wan_addr}:7401").parse().unwrap(),
                    format!("{wan_addr}:7400").parse().unwrap(),
                    delay,
                    loss,
                ));
            }
            write_atomic(&cfg, &text);
            net.resolv_conf(name, "127.0.0.1");
            sites.push(site);
        }
        for s in &mut sites {
            s.start();
        }
        for spoke in [1, 2] {
            let file = dir.path().join(format!("{}.token", SITES[spoke]));
            sites[0].issue(&[], &file);
            sites[spoke].ok(&["token", "redeem", file.to_str().unwrap()]);
        }
        Some(Clusterset {
            net,
            sites,
            dir,
            _relay: relay,
        })
    }

    fn site(&self, name: &str) -> &Site {
        self.sites.iter().find(|s| s.name == name).expect("site")
    }

    /// Runs a program in a site; returns its output.
    fn run(&self, site: &str, args: &[&str]) -> Output {
        self.net
            .exec(site)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn spawn(&self, site: &str, args: &[&str]) -> Background {
        let log = self
            .dir
            .path()
            .join(format!("{site}-{}.log", args[0].rsplit('/').next().unwrap_or("x")));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .net
            .exec(site)
            .args(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        Background(child)
    }

    /// Exports `service` with one endpoint `<service>-0` at the pod address in every site.
    fn export_everywhere(&self, service: &str, ports: &str) {
        for s in &self.sites {
            s.set_exports(&format!(
                "exports:\n  - service: {service}\n    ports: {ports}\n    endpoints:\n      - {{hostname: {service}-0, ip: {POD}}}\n"
            ));
        }
    }

    /// Waits until every site sees `count` ready endpoints of `service`.
    fn wait_endpoints(&self, service: &str, count: usize) {
        for s in &self.sites {
            let ok = wait_for(Duration::from_secs(15), || {
                let list: Vec<serde_json::Value> =
                    serde_json::from_str(&s.ok(&["service", "list", "-o", "json"])).unwrap_or_default();
                list.iter()
                    .find(|x| x["service"] == service)
                    .and_then(|x| x["endpoints"].as_array())
                    .is_some_and(|e| e.iter().filter(|e| e["ready"] == true && e["vip"].is_string()).count() == count)
            });
            assert!(
                ok,
                "{} does not see {count} endpoints of {service}:\n{}",
                s.name,
                s.ok(&["service", "list"])
            );
        }
    }

    /// The VIP of `<service>-0` in `owner`.
    fn vip(&self, service: &str, owner: &str) -> String {
        self.try_vip(service, owner)
            .unwrap_or_else(|| panic!("no VIP for {service} in {owner}"))
    }

    fn try_vip(&self, service: &str, owner: &str) -> Option<String> {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&self.site(owner).ok(&["service", "list", "-o", "json"])).unwrap_or_default();
        list.iter()
            .find(|x| x["service"] == service)
            .and_then(|x| x["endpoints"].as_array())
            .and_then(|e| e.iter().find(|e| e["site"] == owner))
            .and_then(|e| e["vip"].as_str())
            .map(String::from)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for s in &self.sites {
            out += &format!("--- {} agent\n{}\n", s.name, tail(&s.log_text(), 40));
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") && !SITES.iter().any(|s| p.ends_with(format!("{s}.log"))) {
                    out += &format!(
                        "--- {}\n{}\n",
                        p.display(),
                        tail(&std::fs::read_to_string(&p).unwrap_or_default(), 30)
                    );
                }
            }
        }
        out
    }
}

fn endpoint_name(service: &str, site: &str) -> String {
    format!("{service}-0.{site}.{service}.default.{ZONE}")
}

// ---------------------------------------------------------------------------------------
// etcd

fn start_etcd(c: &Clusterset, site: &str) -> Background {
    let cluster: Vec<String> = SITES
        .iter()
        .map(|s| format!("{s}=http://{}:2380", endpoint_name("etcd", s)))
        .collect();
    let data = c.dir.path().join(format!("etcd-{site}"));
    c.spawn(
        site,
        &[
            "etcd",
            "--name",
            site,
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-peer-urls",
            &format!("http://{POD}:2380"),
            "--listen-client-urls",
            &format!("http://{POD}:2379"),
            "--initial-advertise-peer-urls",
            &format!("http://{}:2380", endpoint_name("etcd", site)),
            "--advertise-client-urls",
            &format!("http://{}:2379", endpoint_name("etcd", site)),
            "--initial-cluster",
            &cluster.join(","),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "causeway-test",
        ],
    )
}

fn etcdctl(c: &Clusterset, site: &str, endpoints: &[&str], args: &[&str]) -> Output {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|s| format!("http://{}:2379", endpoint_name("etcd", s)))
        .collect();
    let mut cmd = c.net.exec(site);
    cmd.env("ETCDCTL_API", "3")
        .args([
            "etcdctl",
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "5s",
            "--endpoints",
            &eps.join(","),
        ])
        .args(args);
    cmd.output().unwrap()
}

fn etcd_get(c: &Clusterset, site: &str, key: &str) -> String {
    stdout(&etcdctl(c, site, &[site], &["get", key, "--print-value-only"]))
}

/// Forms an etcd cluster of one member per site; returns the members.
fn etcd_cluster(c: &Clusterset) -> Vec<Background> {
    c.export_everywhere("etcd", "[{name: peer, port: 2380}, {name: client, port: 2379}]");
    c.wait_endpoints("etcd", 3);
    let members: Vec<Background> = SITES.iter().map(|s| start_etcd(c, s)).collect();
    let healthy = wait_for(Duration::from_secs(60), || {
        etcdctl(c, "london", &SITES, &["endpoint", "health"]).status.success()
    });
    assert!(healthy, "etcd did not become healthy:\n{}", c.logs());
    members
}

#[test]
fn etcd_forms_one_cluster_and_survives_a_site_outage() {
    if !require(&["etcd", "etcdctl"]) {
        return;
    }
    let Some(c) = Clusterset::new(None) else { return };
    let _members = etcd_cluster(&c);

    let list = etcdctl(&c, "paris", &["paris"], &["member", "list", "-w", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let members = list["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{list}");
    assert!(
        members
            .iter()
            .all(|m| m["name"].as_str().is_some_and(|n| !n.is_empty())),
        "all started: {list}"
    );
    for site in SITES {
        let h = etcdctl(&c, site, &SITES, &["endpoint", "health"]);
        assert!(
            h.status.success(),
            "health from {site}: {}{}",
            stdout(&h),
            String::from_utf8_lossy(&h.stderr)
        );
    }

    assert!(
        etcdctl(&c, "london", &["london"], &["put", "greeting", "hello from london"])
            .status
            .success()
    );
    assert!(wait_for(Duration::from_secs(10), || etcd_get(&c, "tokyo", "greeting")
        == "hello from london"));

    // tokyo is cut off: london and paris keep quorum and accept writes.
    c.net.set_wan("tokyo", false);
    let t = Instant::now();
    let ok = wait_for(Duration::from_secs(30), || {
        etcdctl(&c, "london", &["london"], &["put", "during", "the outage"])
            .status
            .success()
    });
    assert!(ok, "no quorum without tokyo:\n{}", c.logs());
    eprintln!("write without tokyo accepted after {:?}", t.elapsed());
    assert_eq!(etcd_get(&c, "paris", "during"), "the outage");

    // tokyo comes back and catches up.
    c.net.set_wan("tokyo", true);
    assert!(
        wait_for(Duration::from_secs(60), || etcd_get(&c, "tokyo", "during")
            == "the outage"),
        "tokyo did not catch up:\n{}",
        c.logs()
    );
}

// ---------------------------------------------------------------------------------------
// Redis Cluster

#[test]
fn redis_cluster_spans_three_sites() {
    if !require(&["redis-server", "redis-cli"]) {
        return;
    }
    let Some(c) = Clusterset::new(None) else { return };
    c.export_everywhere("redis", "[{name: client, port: 6379}, {name: bus, port: 16379}]");
    c.wait_endpoints("redis", 3);
    let mut servers = Vec::new();
    let mut vips = Vec::new();
    for site in SITES {
        // A member learns its own VIP from causeway: pod addresses overlap across sites.
        let vip = c.vip("redis", site);
        let dir = c.dir.path().join(format!("redis-{site}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = common::redis_cluster_node(POD, &dir);
        args.extend(
            [
                "--cluster-announce-ip",
                &vip,
                "--cluster-announce-port",
                "6379",
                "--cluster-announce-bus-port",
                "16379",
                "--cluster-announce-hostname",
                &endpoint_name("redis", site),
                "--cluster-preferred-endpoint-type",
                "hostname",
            ]
            .map(String::from),
        );
        servers.push(c.spawn(site, &args.iter().map(String::as_str).collect::<Vec<_>>()));
        vips.push(vip);
    }
    let ping =
        |site: &str, host: &str| stdout(&c.run(site, &["redis-cli", "-h", host, "-p", "6379", "ping"])) == "PONG";
    for (site, vip) in SITES.iter().zip(&vips) {
        assert!(
            wait_for(Duration::from_secs(10), || ping("london", vip)),
            "redis in {site} not reachable:\n{}",
            c.logs()
        );
    }
    let mut create = vec!["redis-cli", "--cluster", "create"];
    let addrs: Vec<String> = vips.iter().map(|v| format!("{v}:6379")).collect();
    create.extend(addrs.iter().map(String::as_str));
    create.push("--cluster-yes");
    let out = c.run("london", &create);
    assert!(out.status.success(), "cluster create: {}\n{}", stdout(&out), c.logs());

    for (site, vip) in SITES.iter().zip(&vips) {
        let ok = wait_for(Duration::from_secs(30), || {
            let info = stdout(&c.run(site, &["redis-cli", "-h", vip, "cluster", "info"]));
            info.contains("cluster_state:ok") && info.contains("cluster_slots_assigned:16384")
        });
        assert!(ok, "cluster not ok in {site}:\n{}", c.logs());
    }
    // Keys written through london's member, read through paris's, following MOVED by name.
    for i in 0..20 {
        let key = format!("key-{i}");
        let out = c.run(
            "london",
            &["redis-cli", "-c", "-h", &vips[0], "set", &key, &format!("value-{i}")],
        );
        assert_eq!(
            stdout(&out),
            "OK",
            "set {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..20 {
        let key = format!("key-{i}");
        let out = c.run(
            "paris",
            &["redis-cli", "-c", "-h", &endpoint_name("redis", "paris"), "get", &key],
        );
        assert_eq!(stdout(&out), format!("value-{i}"), "get {key} through paris");
    }
    let nodes = stdout(&c.run("tokyo", &["redis-cli", "-h", &vips[2], "cluster", "nodes"]));
    for vip in &vips {
        assert!(nodes.contains(&format!("{vip}:6379")), "{nodes}");
    }
}

// ---------------------------------------------------------------------------------------
// UDP and churn

#[test]
fn dns_server_in_paris_answers_dig_in_tokyo_and_churn_shows_in_dns() {
    if !require(&["dnsmasq", "dig"]) {
        return;
    }
    let Some(c) = Clusterset::new(None) else { return };
    let _dns = c.spawn(
        "paris",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            &format!("--listen-address={POD}"),
            "--bind-interfaces",
            "--port=53",
            "--address=/grid.example/10.9.9.9",
            "--pid-file=",
            "--user=root",
        ],
    );
    c.site("paris").set_exports(&format!(
        "exports:\n  - service: names\n    ports: [{{name: dns, port: 53, protocol: UDP}}]\n    endpoints:\n      - {{hostname: names-0, ip: {POD}}}\n"
    ));
    // tokyo reaches paris's DNS server through london, by name.
    let server = endpoint_name("names", "paris");
    let mut answer = String::new();
    let ok = wait_for(Duration::from_secs(15), || {
        let ip = stdout(&c.run("tokyo", &["dig", "+short", &server]));
        if ip.is_empty() {
            return false;
        }
        answer = stdout(&c.run(
            "tokyo",
            &[
                "dig",
                &format!("@{ip}"),
                "+short",
                "+tries=2",
                "+time=2",
                "grid.example",
            ],
        ));
        answer == "10.9.9.9"
    });
    assert!(ok, "dig in tokyo through the tunnel answered {answer:?}:\n{}", c.logs());

    // Churn: london exports a member; removing it from causeway.yaml removes it from tokyo's
    // DNS answers within 1 s, and re-adding brings it back.
    let london = c.site("london");
    let export = format!(
        "exports:\n  - service: cache\n    ports: [{{name: tcp, port: 7000}}]\n    endpoints:\n      - {{hostname: cache-0, ip: {POD}}}\n"
    );
    london.set_exports(&export);
    let name = format!("cache.default.{ZONE}");
    let dig_a = || stdout(&c.run("tokyo", &["dig", "+short", &name]));
    assert!(
        wait_for(Duration::from_secs(10), || !dig_a().is_empty()),
        "{}",
        c.logs()
    );
    london.set_exports("exports: []\n");
    let t = Instant::now();
    assert!(
        wait_for(Duration::from_secs(1), || dig_a().is_empty()),
        "still answered after 1 s"
    );
    eprintln!("withdrawn from tokyo's DNS after {:?}", t.elapsed());
    let nx = c.run("tokyo", &["dig", &name]);
    assert!(stdout(&nx).contains("NXDOMAIN"), "{}", stdout(&nx));
    london.set_exports(&export);
    assert!(
        wait_for(Duration::from_secs(5), || !dig_a().is_empty()),
        "did not come back"
    );
}

// ---------------------------------------------------------------------------------------
// Latency and loss

#[test]
fn etcd_and_bulk_transfer_over_a_slow_lossy_wan() {
    if !require(&["etcd", "etcdctl"]) {
        return;
    }
    let Some(c) = Clusterset::new(Some((Duration::from_millis(50), 0.01))) else {
        return;
    };
    let rtt = c.site("paris").links()[0]["rtt_ms"].as_f64().unwrap_or(0.0);
    eprintln!("paris–london RTT through the relay: {rtt} ms");
    let _members = etcd_cluster(&c);
    assert!(
        etcdctl(&c, "tokyo", &["tokyo"], &["put", "slow", "but steady"])
            .status
            .success()
    );
    assert!(wait_for(Duration::from_secs(10), || etcd_get(&c, "paris", "slow")
        == "but steady"));
    for site in SITES {
        assert!(
            etcdctl(&c, site, &SITES, &["endpoint", "health"]).status.success(),
            "{site}:\n{}",
            c.logs()
        );
    }

    // 100 MiB from paris to a sink in london, byte-exact.
    c.site("london").set_exports(&format!(
        "exports:\n  - service: etcd\n    ports: [{{name: peer, port: 2380}}, {{name: client, port: 2379}}]\n    endpoints:\n      - {{hostname: etcd-0, ip: {POD}}}\n  - service: bulk\n    ports: [{{name: sink, port: 9000}}]\n    endpoints:\n      - {{hostname: bulk-0, ip: {POD}}}\n"
    ));
    let mut vip = None;
    assert!(wait_for(Duration::from_secs(10), || {
        vip = c
            .try_vip("bulk", "london")
            .filter(|v| c.site("paris").ok(&["service", "list", "-o", "json"]).contains(v));
        vip.is_some()
    }));
    let vip: std::net::IpAddr = vip.unwrap().parse().unwrap();
    const TOTAL: usize = 100 << 20;
    let sink = c.net.run_in("london", || TcpListener::bind((POD, 9000)).unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        hex::encode(ctx.finish())
    });
    let started = Instant::now();
    let sent = c.net.run_in("paris", || {
        let mut s = TcpStream::connect(SocketAddr::new(vip, 9000)).unwrap();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..TOTAL / chunk.len() {
            chunk
                .iter_mut()
                .enumerate()
                .step_by(512)
                .for_each(|(j, b)| *b = (i + j) as u8);
            ctx.update(&chunk);
            s.write_all(&chunk).unwrap();
        }
        drop(s);
        hex::encode(ctx.finish())
    });
    let received = server.join().unwrap();
    let took = started.elapsed();
    assert_eq!(sent, received, "100 MiB arrived altered");
    eprintln!(
        "100 MiB over 50 ms delay (each way) and 1% loss in {took:?}: {:.1} Mbit/s",
        (TOTAL * 8) as f64 / took.as_secs_f64() / 1e6
    );
}
