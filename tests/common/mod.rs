//! Test harness: real `causeway` agents as separate processes, each with its own state dir.
//!
//! A [`Site`] is initialised with the real `causeway init`, its causeway.yaml adjusted to a
//! free loopback port, and run as a child process (`causeway run`) whose log goes to a file
//! that is printed when a test fails. Dropping a site kills its agent, so a failing test
//! leaves no process behind.
//!
//! [`netns`] puts sites in separate network namespaces joined by a WAN ([`Site::init_in`]).
#![allow(dead_code)]

pub mod netns;
pub mod relay;
pub mod sidecar;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_causeway");

/// A free UDP port on loopback (bound and released; good enough for tests).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Site {
    pub name: String,
    pub state: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    /// The network namespace the agent runs in ([`Site::init_in`]); None: the host's.
    pub netns: Option<String>,
    /// Start the agent with this soft open-files limit (`prlimit --nofile=N:`), as containers
    /// start processes with 1,024; None: the test's own.
    pub soft_nofile: Option<u64>,
    /// Extra environment for the agent (e.g. a test hook).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Site {
    /// [`Site::init`] and [`Site::start`]: a running site.
    #[allow(dead_code)] // not every suite uses it
    pub fn started(dir: &Path, name: &str) -> Site {
        let mut site = Site::init(dir, name);
        site.start();
        site
    }

    /// `causeway init` in `dir/<name>`, then listen on a free loopback port.
    pub fn init(dir: &Path, name: &str) -> Site {
        let state = dir.join(name);
        let out = Command::new(BIN)
            .arg("--state")
            .arg(&state)
            .args(["init", "--site", name])
            .output()
            .expect("run init");
        assert!(
            out.status.success(),
            "init {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_udp_port();
        let cfg_path = state.join("causeway.yaml");
        let cfg = std::fs::read_to_string(&cfg_path).expect("read config");
        let cfg = cfg
            .lines()
            .map(|l| {
                if l.starts_with("listen:") {
                    format!("listen: 127.0.0.1:{port}")
                } else if l.trim_start().starts_with("listen: [\"127.0.0.1:53\"]") {
                    // Sites on the host share one loopback: give each its own DNS port.
                    format!("  listen: [\"127.0.0.1:{}\"]", free_udp_port())
                } else if l.starts_with("metrics:") {
                    String::new()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&cfg_path, cfg).expect("write config");
        Site {
            name: name.to_string(),
            log: dir.join(format!("{name}.log")),
            state,
            port,
            netns: None,
            soft_nofile: None,
            env: Vec::new(),
            child: None,
        }
    }

    /// `causeway init` in `dir/<name>` for site `name` of `net`: the agent will run in the
    /// site's namespace, listen on `0.0.0.0:7400`, advertise its WAN address
    /// (`10.200.0.<10+i>:7400`) and answer DNS on `127.0.0.1:5353`; no metrics listener.
    pub fn init_in(dir: &Path, name: &str, net: &netns::Net) -> Site {
        let mut site = Site::init(dir, name);
        let port = netns::AGENT_PORT;
        let advertise = format!("{}:{port}", net.wan_addr(name));
        let cfg_path = site.state.join("causeway.yaml");
        let cfg = std::fs::read_to_string(&cfg_path).expect("read config");
        let mut section = String::new();
        let mut lines = Vec::new();
        for l in cfg.lines() {
            if l.starts_with(|c: char| c.is_ascii_alphabetic()) {
                section = l.split(':').next().unwrap_or_default().to_string();
            }
            let indent = &l[..l.len() - l.trim_start().len()];
            if l.starts_with("listen:") {
                lines.push(format!("listen: 0.0.0.0:{port}"));
            } else if l.starts_with("advertise:") {
                lines.push(format!("advertise: [\"{advertise}\"]"));
            } else if l.starts_with("metrics:") {
                continue;
            } else if section == "dns" && !indent.is_empty() && l.trim_start().starts_with("listen:") {
                lines.push(format!("{indent}listen: [\"127.0.0.1:5353\"]"));
            } else {
                lines.push(l.to_string());
            }
        }
        write_atomic(&cfg_path, &(lines.join("\n") + "\n"));
        site.port = port;
        site.netns = Some(net.ns(name));
        site
    }

    /// Replaces the `exports: []` line of causeway.yaml (or the block a previous call wrote)
    /// with `yaml`, a block starting with `exports:` (common indentation is removed). The
    /// file is replaced atomically, so a hot-reloading agent never reads half of it.
    pub fn set_exports(&self, yaml: &str) {
        const BEGIN: &str = "# exports set by test";
        const END: &str = "# end of exports set by test";
        let block = dedent(yaml);
        assert!(
            block.starts_with("exports:"),
            "set_exports wants a YAML block starting with `exports:`, got:\n{yaml}"
        );
        let path = self.state.join("causeway.yaml");
        let text = std::fs::read_to_string(&path).expect("read config");
        let lines: Vec<&str> = text.lines().collect();
        let (start, end) = match lines.iter().position(|l| *l == BEGIN) {
            Some(b) => {
                let e = lines[b..]
                    .iter()
                    .position(|l| *l == END)
                    .expect("end of the exports block");
                (b, b + e + 1)
            }
            None => {
                let i = lines
                    .iter()
                    .position(|l| l.starts_with("exports:"))
                    .unwrap_or_else(|| panic!("no `exports:` line in {}", path.display()));
                let value = lines[i]["exports:".len()..].split('#').next().unwrap_or_default();
                assert!(
                    !value.trim().is_empty(),
                    "{}: `exports:` is a block not written by set_exports; cannot replace it",
                    path.display()
                );
                (i, i + 1)
            }
        };
        let mut out: Vec<&str> = lines[..start].to_vec();
        out.push(BEGIN);
        out.extend(block.lines());
        out.push(END);
        out.extend_from_slice(&lines[end..]);
        write_atomic(&path, &(out.join("\n") + "\n"));
    }

    /// Starts `causeway run` and waits for its admin socket.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = self
            .agent_command()
            .arg("--state")
            .arg(&self.state)
            .arg("run")
            .env("RUST_LOG", "causeway=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        let ok = wait_for(Duration::from_secs(10), || {
            self.cli(&["status", "-o", "json"]).status.success()
        });
        assert!(ok, "agent {} did not start:\n{}", self.name, self.log_text());
    }

    /// `causeway`, inside the site's network namespace if it has one (`ip netns exec`
    /// execs the agent, so the child's pid is the agent's).
    fn agent_command(&self) -> Command {
        // Each wrapper execs the next, so the child's pid stays the agent's.
        let mut argv: Vec<String> = Vec::new();
        if let Some(n) = self.soft_nofile {
            argv.extend(["prlimit".into(), format!("--nofile={n}:")]);
        }
        if let Some(ns) = &self.netns {
            argv.extend(["ip".into(), "netns".into(), "exec".into(), ns.clone()]);
        }
        argv.push(BIN.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.success(),
                        "agent {} exited with {status}:\n{}",
                        self.name,
                        self.log_text()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("agent {} did not stop within 10 s:\n{}", self.name, self.log_text());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL: the agent vanishes without a word.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent's process id while it runs (the child's pid is the agent's: every wrapper
    /// execs the next), e.g. to read its memory from `/proc/<pid>/status`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the agent process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs a `causeway` command against this site's state.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--state")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("run causeway")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`causeway {}` on {} failed: {}\nagent log:\n{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "`causeway {}` on {} unexpectedly succeeded",
            args.join(" "),
            self.name
        );
        assert_eq!(out.status.code(), Some(1), "exit status must be 1");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Issues a token into `dir/<file>` and returns its path.
    pub fn issue(&self, extra: &[&str], file: &Path) -> PathBuf {
        let mut args = vec!["token", "issue", "-o", file.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.ok(&args);
        file.to_path_buf()
    }

    /// `link list -o json`, parsed.
    pub fn links(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["link", "list", "-o", "json"]);
        serde_json::from_str(&out).expect("link list json")
    }

    /// The state of the named link, if it exists.
    pub fn link_state(&self, name: &str) -> Option<String> {
        self.links()
            .into_iter()
            .find(|l| l["name"] == name)
            .and_then(|l| l["state"].as_str().map(String::from))
    }

    /// Whether the named link exists and is `up`.
    pub fn link_up(&self, name: &str) -> bool {
        self.link_state(name).as_deref() == Some("up")
    }

    /// `causeway --state <this site> ARGS` run inside the site's namespace of `net` (where
    /// its DNS responder and VIPs are).
    pub fn cli_in(&self, net: &netns::Net, args: &[&str]) -> Output {
        net.exec(&self.name)
            .arg(BIN)
            .arg("--state")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("run causeway")
    }

    /// `service list -o json`, parsed.
    pub fn services(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["service", "list", "-o", "json"])).expect("service list json")
    }

    /// Issues a token here and has `spoke` redeem it (token file in `dir`), with link cost
    /// `cost`; asserts that the link was made.
    pub fn link_spoke(&self, dir: &Path, spoke: &Site, cost: u32) {
        let file = dir.join(format!("{}-{}.token", self.name, spoke.name));
        self.issue(&[], &file);
        let out = spoke.ok(&["token", "redeem", file.to_str().unwrap(), "--cost", &cost.to_string()]);
        assert!(out.starts_with(&format!("linked to {}", self.name)), "{out}");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `text` to a temporary file next to `path`, then renames it over `path`.
/// Inits a site for each of `names` in `net`, each with a pod at `pod` on its LAN, lets
/// `configure` adjust each one's state (causeway.yaml) before any agent runs, then starts
/// every agent.
pub fn sites_in(dir: &Path, net: &netns::Net, names: &[&str], pod: &str, configure: impl Fn(&Site)) -> Vec<Site> {
    let mut sites: Vec<Site> = names
        .iter()
        .map(|n| {
            net.add_pod(n, pod);
            let site = Site::init_in(dir, n, net);
            configure(&site);
            site
        })
        .collect();
    for s in &mut sites {
        s.start();
    }
    sites
}

/// `redis-server` and its arguments for a Redis Cluster node on `bind:6379` that keeps its
/// node table in `dir` and persists nothing (tests add their announce options).
pub fn redis_cluster_node(bind: &str, dir: &Path) -> Vec<String> {
    let mut args = redis_cluster_node_default_bind(dir);
    args.splice(1..1, ["--bind".to_string(), bind.to_string()]);
    args
}

/// The same node on Redis's default `bind * -::*`. Protected mode is off: with no password,
/// Redis 7.0 accepts only clients from exactly 127.0.0.1 or ::1 (not the rest of 127/8, so
/// not the peers' VIPs), which is why every Redis Cluster deployment either sets a password
/// or turns it off.
pub fn redis_cluster_node_default_bind(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().expect("utf-8 path");
    [
        "redis-server",
        "--port",
        "6379",
        "--protected-mode",
        "no",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &format!("{dir}/nodes.conf"),
        "--dir",
        dir,
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(String::from)
    .to_vec()
}

pub fn write_atomic(path: &Path, text: &str) {
    let name = path.file_name().expect("file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Removes the indentation common to all non-blank lines, and leading blank lines.
fn dedent(text: &str) -> String {
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .skip_while(|l| l.trim().is_empty())
        .map(|l| l.get(indent..).unwrap_or_default().trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last `n` lines of `text` (for failure messages).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A command's standard output, trimmed.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
