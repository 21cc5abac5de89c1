//! Multi-site network harness: one Linux network namespace per site, joined only by a WAN.
//!
//! [`Net::new`]`(&["london", "paris"])` builds, for one test:
//!
//! ```text
//!  cw4123a-london                 cw4123a-wan                 cw4123a-paris
//!  lo:   127.0.0.1, pods          ┌──── br0 ────┐             lo:   127.0.0.1, pods
//!  wan0: 10.200.0.10/24 ══veth══ s0             s1 ══veth══ wan0: 10.200.0.11/24
//! ```
//!
//! A site namespace has exactly two interfaces, `lo` (which also holds the site's pod
//! addresses, see [`Net::add_pod`]) and `wan0`, and no default route: the only thing one site
//! can reach of another is its WAN address, where the agent listens for QUIC on udp/7400.
//! Anything a test wants to cross sites must therefore go through the agents.
//!
//! Namespace names are `cw<pid><letters>-<site>`: unique across the parallel tests of one
//! process and across processes. Dropping a [`Net`] (also while a test panics) kills every
//! process inside its namespaces and deletes them; [`Net::new`] also removes namespaces left
//! behind by runs whose process no longer exists.
//!
//! Everything here needs root and iproute2. Without them [`Net::new`] and [`require`] print
//! `skipping: <reason>` and the test returns early, unless `CI=true`, where a missing
//! prerequisite is a failure that names what to install.

use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The UDP port agents listen on inside their site namespace (every site can use the same).
pub const AGENT_PORT: u16 = 7400;

/// Where iproute2 keeps named namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// Per-namespace files `ip netns exec` bind-mounts over `/etc` (e.g. `resolv.conf`).
const ETC_NETNS_DIR: &str = "/etc/netns";

/// The site agent's address on its site's pod LAN (see [`Net::add_pod_ns`]).
pub const LAN_GATEWAY: &str = "10.1.0.254";

/// Distinguishes the [`Net`]s of one process.
static COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Serialises namespace creation and stale cleanup within the process: the first
/// `ip netns add` on a machine sets up the shared mount of [`NETNS_DIR`], which races.
static SETUP: Mutex<()> = Mutex::new(());

/// The namespaces of one test: a WAN with a bridge and one namespace per site.
pub struct Net {
    prefix: String,
    sites: Vec<String>,
    /// Pods added with [`Net::add_pod_ns`], as `<site>-<pod>`; usable wherever a site name is.
    pods: Vec<String>,
    /// Every namespace created so far, the WAN first; what `Drop` removes.
    created: Vec<String>,
}

impl Net {
    /// Builds a WAN namespace and one namespace per site (site `i` gets WAN address
    /// `10.200.0.<10+i>`). Returns `None` after printing `skipping: <reason>` when not root or
    /// when iproute2, network namespaces, bridges or veth pairs are unavailable; with
    /// `CI=true` it panics instead, naming what is missing and how to fix it.
    pub fn new(sites: &[&str]) -> Option<Net> {
        assert!(
            !sites.is_empty() && sites.len() <= 200,
            "between 1 and 200 sites, got {}",
            sites.len()
        );
        for (i, s) in sites.iter().enumerate() {
            assert!(
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "site name {s:?}: use lowercase letters, digits and '-'"
            );
            assert!(!sites[..i].contains(s), "site {s} listed twice");
        }
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            missing(
                "not running as root: network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); \
                 run the tests as root, e.g. `sudo -E cargo test --test netns`",
            );
            return None;
        }
        if !require(&["ip"]) {
            return None;
        }
        let _setup = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        remove_stale();

        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut net = Net {
            prefix: format!("cw{}{}", std::process::id(), letters(n)),
            sites: sites.iter().map(|s| s.to_string()).collect(),
            pods: Vec::new(),
            created: Vec::new(),
        };
        let wan = net.wan_ns();
        if let Err(e) = net.add_ns(&wan) {
            missing(&format!(
                "`ip netns add` failed ({e}): the kernel needs network namespaces (CONFIG_NET_NS) and \
                 a container needs CAP_SYS_ADMIN (e.g. `docker run --privileged`)"
            ));
            return None;
        }
        if let Err(e) = ip(&["-n", &wan, "link", "add", "br0", "type", "bridge"]) {
            missing(&format!(
                "cannot create a bridge ({e}): the kernel needs CONFIG_BRIDGE (`modprobe bridge`)"
            ));
            return None;
        }
        must(ip(&["-n", &wan, "link", "set", "lo", "up"]));
        must(ip(&["-n", &wan, "link", "set", "br0", "up"]));

        for (i, site) in sites.iter().enumerate() {
            let ns = net.ns(site);
            must(net.add_ns(&ns));
            must(ip(&["-n", &ns, "link", "set", "lo", "up"]));
            // Created inside the site and its peer moved straight into the WAN: no name ever
            // exists in the root namespace, so parallel tests cannot clash.
            let peer = format!("s{i}");
            let veth = ip(&[
                "-n", &ns, "link", "add", "wan0", "type", "veth", "peer", "name", &peer, "netns", &wan,
            ]);
            if let Err(e) = veth {
                missing(&format!(
                    "cannot create a veth pair ({e}): the kernel needs CONFIG_VETH (`modprobe veth`)"
                ));
                return None;
            }
            let addr = format!("{}/24", net.wan_addr(site));
            must(ip(&["-n", &ns, "addr", "add", &addr, "dev", "wan0"]));
            must(ip(&["-n", &ns, "link", "set", "wan0", "up"]));
            must(ip(&["-n", &wan, "link", "set", &peer, "master", "br0", "up"]));
        }
        Some(net)
    }

    /// The sites, in the order given to [`Net::new`].
    pub fn sites(&self) -> &[String] {
        &self.sites
    }

    /// The namespace of `site` (e.g. `cw4123a-london`). Panics on an unknown site.
    pub fn ns(&self, site: &str) -> String {
        if !self.pods.iter().any(|p| p == site) {
            self.index(site);
        }
        format!("{}-{site}", self.prefix)
    }

    /// Adds a **pod** to `site`: a network namespace of its own on the site's LAN (a bridge
    /// `lan0` in the site's namespace, where the site's agent has [`LAN_GATEWAY`]), with
    /// address `ip`/24 on `eth0`. Sidecar tests run a grid member and its causeway sidecar
    /// there; the pod reaches its site's gateway and its site's other pods, nothing else.
    /// Returns the name to use with [`Net::exec`], [`Net::run_in`], [`Net::spawn`].
    pub fn add_pod_ns(&mut self, site: &str, pod: &str, addr: &str) -> String {
        let site_ns = self.ns(site);
        let name = format!("{site}-{pod}");
        if self::ip(&["-n", &site_ns, "link", "show", "lan0"]).is_err() {
            must(self::ip(&["-n", &site_ns, "link", "add", "lan0", "type", "bridge"]));
            must(self::ip(&[
                "-n",
                &site_ns,
                "addr",
                "add",
                &format!("{LAN_GATEWAY}/24"),
                "dev",
                "lan0",
            ]));
            must(self::ip(&["-n", &site_ns, "link", "set", "lan0", "up"]));
        }
        let ns = format!("{}-{name}", self.prefix);
        must(self.add_ns(&ns));
        self.pods.push(name.clone());
        must(self::ip(&["-n", &ns, "link", "set", "lo", "up"]));
        let peer = format!("p{}", self.pods.len());
        must(self::ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &site_ns,
        ]));
        must(self::ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]));
        must(self::ip(&["-n", &ns, "link", "set", "eth0", "up"]));
        must(self::ip(&[
            "-n", &site_ns, "link", "set", &peer, "master", "lan0", "up",
        ]));
        name
    }

    /// The WAN namespace, holding bridge `br0` and the peers `s<i>` of the sites' `wan0`.
    pub fn wan_ns(&self) -> String {
        format!("{}-wan", self.prefix)
    }

    /// Every namespace of this net: the WAN first, then the sites.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.wan_ns())
            .chain(self.sites.iter().map(|s| self.ns(s)))
            .collect()
    }

    /// The address of `site` on the WAN: `10.200.0.<10+i>` for the `i`-th site.
    pub fn wan_addr(&self, site: &str) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, 10 + self.index(site) as u8)
    }

    /// Adds pod address `ip` (as `/32`) on the `lo` of `site`.
    ///
    /// Every site uses the same pod range (tests use `10.1.0.0/16` everywhere): Kubernetes
    /// clusters commonly have overlapping pod CIDRs and causeway must work with them, so a
    /// test must never depend on one site routing to another's pod IPs. Identical ranges also
    /// make a leak visible: a pod IP of another site means a local one, or nothing.
    pub fn add_pod(&self, site: &str, ip: &str) {
        let ns = self.ns(site);
        must(self::ip(&["-n", &ns, "addr", "add", &format!("{ip}/32"), "dev", "lo"]));
    }

    /// `ip netns exec <ns>` as a command: add the program and its arguments, e.g.
    /// `net.exec("paris").args(["socat", "-", "TCP:10.200.0.10:9000"]).output()`.
    pub fn exec(&self, site: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(site)]);
        cmd
    }

    /// Starts `args` in `site` in the background, stdio to /dev/null; dropping the
    /// [`Background`] kills it.
    pub fn spawn(&self, site: &str, args: &[&str]) -> Background {
        let child = self
            .exec(site)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?} in {site}: {e}"));
        Background(child)
    }

    /// Runs `f` on a new thread that has entered the network namespace of `site`: sockets
    /// it opens live there (and stay there when returned). Lets tests probe with std sockets
    /// instead of external programs. The calling thread's namespace is untouched.
    pub fn run_in<T: Send>(&self, site: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new(NETNS_DIR).join(self.ns(site));
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                    // SAFETY: setns(2) on an fd we own; CLONE_NEWNET moves only this thread.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {}: {}", path.display(), io::Error::last_os_error());
                    f()
                })
                .join()
        });
        result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Takes the WAN link of `site` down (`up = false`) or brings it back: the site is cut
    /// off from every other site, as by a network outage.
    pub fn set_wan(&self, site: &str, up: bool) {
        let ns = self.ns(site);
        must(ip(&["-n", &ns, "link", "set", "wan0", if up { "up" } else { "down" }]));
    }

    /// Writes `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` (so [`Net::exec`] and
    /// agents started in the site) shows as `/etc/resolv.conf`.
    pub fn resolv_conf(&self, site: &str, nameserver: &str) {
        let dir = Path::new(ETC_NETNS_DIR).join(self.ns(site));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join("resolv.conf");
        std::fs::write(&path, format!("nameserver {nameserver}\n"))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        // The bind mount needs a file to cover.
        assert!(
            Path::new("/etc/resolv.conf").exists(),
            "/etc/resolv.conf is missing: `ip netns exec` would not show {}",
            path.display()
        );
    }

    fn index(&self, site: &str) -> usize {
        self.sites
            .iter()
            .position(|s| s == site)
            .unwrap_or_else(|| panic!("no site {site:?} in this net (sites: {:?})", self.sites))
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), String> {
        run(Command::new("ip").args(["netns", "add", ns]))?;
        self.created.push(ns.to_string());
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            remove_ns(ns);
        }
    }
}

/// A process started by [`Net::spawn`]; killed (SIGKILL) and reaped on drop.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether every tool in `tools` is on `PATH`. If not, prints `skipping: <what is missing>`
/// and returns false (the test should return), or with `CI=true` panics naming the Debian
/// packages to install.
pub fn require(tools: &[&str]) -> bool {
    let absent: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if absent.is_empty() {
        return true;
    }
    let mut packages: Vec<&str> = absent.iter().map(|t| debian_package(t)).collect();
    packages.dedup();
    missing(&format!(
        "{} not found on PATH; install with `apt-get install {}`",
        absent.join(", "),
        packages.join(" ")
    ));
    false
}

/// Whether `tool` is an executable on `PATH` (or an executable path), without complaint.
pub fn have(tool: &str) -> bool {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.contains('/') {
        return executable(Path::new(tool));
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(tool))))
}

/// Whether a missing prerequisite fails the test instead of skipping it.
fn strict() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
}

/// Reports a missing prerequisite: a panic under CI, a `skipping:` line otherwise.
fn missing(reason: &str) {
    if strict() {
        panic!("missing prerequisite for multi-site tests (CI=true): {reason}");
    }
    // Straight to fd 2, past libtest's capture of `eprintln!`: a skip must be visible.
    let _ = writeln!(io::stderr(), "skipping: {reason}");
}

fn debian_package(tool: &str) -> &str {
    match tool {
        "ip" | "bridge" | "ss" => "iproute2",
        "dig" | "nslookup" => "dnsutils",
        "ping" => "iputils-ping",
        "nc" => "netcat-openbsd",
        "nft" => "nftables",
        "etcd" => "etcd-server",
        "etcdctl" => "etcd-client",
        "redis-cli" => "redis-tools",
        "getent" => "libc-bin",
        "java" => "default-jre-headless",
        "/usr/share/zookeeper/bin/zkServer.sh" => "zookeeper",
        other => other,
    }
}

/// `0 → a, 25 → z, 26 → ba, …`: a suffix that cannot be mistaken for pid digits.
fn letters(mut n: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

/// The pid in a harness namespace name `cw<pid><letters>-…`, or None for other names.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("cw")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || !rest[digits..].starts_with(|c: char| c.is_ascii_lowercase()) {
        return None;
    }
    rest[..digits].parse().ok()
}

/// Removes namespaces (and `/etc/netns` dirs) of harness runs whose process is gone.
fn remove_stale() {
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let etc = std::fs::read_dir(ETC_NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok());
    let names: Vec<String> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .chain(etc)
        .collect();
    for name in names {
        if owner_pid(&name).is_some_and(|pid| !alive(pid)) {
            eprintln!("removing stale namespace {name}");
            remove_ns(&name);
        }
    }
}

/// Kills every process in `ns`, deletes it and its `/etc/netns` dir; never panics.
fn remove_ns(ns: &str) {
    let me = std::process::id();
    for _ in 0..100 {
        let pids: Vec<u32> = Command::new("ip")
            .args(["netns", "pids", ns])
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .filter(|p| *p != me)
                    .collect()
            })
            .unwrap_or_default();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from `ip netns pids`; errors (already gone) ignored.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", ns])
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(PathBuf::from(ETC_NETNS_DIR).join(ns));
}

/// `ip ARGS`, with stderr as the error.
fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Setup steps that cannot fail once the prerequisites are there: a failure is a bug.
fn must(result: Result<(), String>) {
    if let Err(e) = result {
        panic!("network setup failed: {e}");
    }
}
