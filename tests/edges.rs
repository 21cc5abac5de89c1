//! The agent's edges towards Kubernetes and the operator: `/readyz` means "has a catalogue",
//! idle clients of the metrics port or the admin socket cannot starve probes or the CLI, and
//! the admin socket cannot be squatted by another user (issue 16 items 7 to 10).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Site, wait_for};

/// A free TCP port on loopback.
fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Turns on the site's metrics listener (the harness leaves it off) on a free port.
fn with_metrics(site: &Site) -> SocketAddr {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let path = site.state.join("causeway.yaml");
    let mut cfg = std::fs::read_to_string(&path).expect("config");
    cfg.push_str(&format!("\nmetrics: {addr}\n"));
    std::fs::write(&path, cfg).expect("write config");
    addr
}

/// `GET path` with the kubelet's patience (`timeout` for everything); the status and body.
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {out:?}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn status_json(site: &Site) -> serde_json::Value {
    serde_json::from_str(&site.ok(&["status", "-o", "json"])).expect("status json")
}

#[test]
fn readyz_is_503_with_a_reason_until_a_link_brings_a_catalogue() {
    let dir = tempfile::tempdir().unwrap();
    let mut london = Site::started(dir.path(), "london");
    let mut paris = Site::init(dir.path(), "paris");
    let metrics = with_metrics(&paris);
    paris.start();

    // No links recorded: a site on its own is ready.
    let (code, _) = get(metrics, "/readyz", Duration::from_secs(1)).expect("readyz");
    assert_eq!(code, 200);

    london.link_spoke(dir.path(), &paris, 1);
    assert!(wait_for(Duration::from_secs(5), || get(
        metrics,
        "/readyz",
        Duration::from_secs(1)
    )
    .is_ok_and(|(c, _)| c == 200)));

    // Paris restarts while london is away: it has a link recorded and no catalogue.
    london.stop();
    paris.stop();
    paris.start();
    let (code, body) = get(metrics, "/readyz", Duration::from_secs(1)).expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready: no link up (1 recorded: london "), "{body}");
    let status = status_json(&paris);
    assert_eq!(status["ready"], false, "{status}");
    assert!(
        status["ready_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no link up"),
        "{status}"
    );
    let table = paris.ok(&["status"]);
    assert!(table.contains("ready     no (no link up"), "{table}");
    // Liveness is not readiness.
    assert_eq!(
        get(metrics, "/healthz", Duration::from_secs(1)).expect("healthz").0,
        200
    );

    london.start();
    assert!(
        wait_for(Duration::from_secs(15), || get(
            metrics,
            "/readyz",
            Duration::from_secs(1)
        )
        .is_ok_and(|(c, _)| c == 200)),
        "paris never became ready:\n{}",
        paris.log_text()
    );
    let status = status_json(&paris);
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["ready_reason"], "catalogue from link london", "{status}");
}

#[test]
fn idle_connections_to_the_metrics_port_never_fail_a_liveness_probe() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::init(dir.path(), "london");
    let metrics = with_metrics(&site);
    site.start();

    // 100 clients that connect and send nothing, and 30 that stop mid-request.
    let mut idle = Vec::new();
    for i in 0..130 {
        let mut s = TcpStream::connect(metrics).expect("connect");
        if i >= 100 {
            s.write_all(b"GET /metr").expect("write");
        }
        idle.push(s);
    }
    for _ in 0..5 {
        let started = Instant::now();
        let (code, body) = get(metrics, "/healthz", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("/healthz within 1 s: {e}\n{}", site.log_text()));
        assert_eq!((code, body.as_str()), (200, "ok"));
        assert!(started.elapsed() < Duration::from_secs(1));
        // More idle clients keep arriving between probes.
        for _ in 0..20 {
            idle.push(TcpStream::connect(metrics).expect("connect"));
        }
    }
    assert_eq!(get(metrics, "/readyz", Duration::from_secs(1)).expect("readyz").0, 200);
    assert!(site.alive());
}

#[test]
fn idle_admin_clients_never_make_the_cli_hang() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::started(dir.path(), "london");
    let socket = site.state.join("admin.sock");
    let mut idle = Vec::new();
    for _ in 0..48 {
        idle.push(UnixStream::connect(&socket).expect("connect admin socket"));
    }
    let started = Instant::now();
    let status = status_json(&site);
    assert_eq!(status["site"], "london");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    // An agent that does not answer at all (stopped): the CLI gives up with a clear error.
    let pid = site.pid().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = Instant::now();
    let out = site.cli(&["status"]);
    let took = started.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("did not answer within 5s; is it overloaded or stuck? (check its log)"),
        "{err}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    drop(idle);
    site.ok(&["status"]);
}

/// A read-only bind mount of a directory over itself, undone on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> Option<ReadOnly> {
        let run = |args: &[&str]| {
            Command::new("mount")
                .args(args)
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !run(&["--bind", dir.to_str()?]) {
            eprintln!("skipped: cannot bind-mount (needs root)");
            return None;
        }
        let ro = ReadOnly(dir.to_path_buf());
        run(&["-o", "remount,ro,bind"]).then_some(ro)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `socat` as `nobody`, listening on `path` and appending whatever it receives to `log`.
fn squatter(path: &Path, log: &Path) -> Child {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "socat", "-u"])
        .arg(format!("UNIX-LISTEN:{},fork", path.display()))
        .arg(format!("OPEN:{},creat,append", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn socat as nobody")
}

fn chown_nobody(path: &Path) {
    let ok = Command::new("chown")
        .arg("65534:65534")
        .arg(path)
        .status()
        .expect("chown");
    assert!(ok.success());
}

#[test]
fn a_squatted_admin_socket_is_refused_and_the_agent_starts_on_a_private_path() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("socat").arg("-V").output().is_err() {
        eprintln!("skipped: needs root and socat");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Shared temporary directory (1777) and an XDG_RUNTIME_DIR that belongs to nobody, as
    // when root runs with another user's environment.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    chown_nobody(&xdg);
    let theirs = xdg.join("causeway");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    chown_nobody(&theirs);

    let site = Site::init(dir.path(), "london");
    let Some(_ro) = ReadOnly::mount(&site.state) else {
        return;
    };
    let name = format!(
        "causeway-{:016x}.sock",
        causeway::names::fnv1a(site.state.to_string_lossy().as_bytes())
    );
    // Nobody binds both the old predictable path and the name in "their" runtime directory.
    let log = tmp.join("stolen.log");
    let mut squatters = [squatter(&tmp.join(&name), &log), squatter(&theirs.join(&name), &log)];
    assert!(wait_for(Duration::from_secs(5), || theirs.join(&name).exists()
        && tmp.join(&name).exists()));

    let env = |cmd: &mut Command| {
        cmd.env("TMPDIR", &tmp).env("XDG_RUNTIME_DIR", &xdg);
    };
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--state").arg(&site.state).args(args);
        env(&mut cmd);
        cmd.output().expect("run causeway")
    };
    let agent_log = dir.path().join("agent.log");
    let mut cmd = Command::new(BIN);
    cmd.arg("--state").arg(&site.state).arg("run");
    env(&mut cmd);
    let mut agent = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .expect("spawn agent");
    let log_text = || std::fs::read_to_string(&agent_log).unwrap_or_default();

    let started = wait_for(Duration::from_secs(10), || {
        cli(&["status", "-o", "json"]).status.success()
    });
    assert!(started, "the agent did not start on a private path:\n{}", log_text());
    let status: serde_json::Value = serde_json::from_slice(&cli(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(status["site"], "london");
    let private = Path::new("/run/causeway").join(&name);
    assert!(private.exists(), "{}", log_text());
    assert!(log_text().contains("admin socket directory skipped"), "{}", log_text());

    // The agent stops: the CLI finds only nobody's sockets, and refuses to talk to them.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    let _ = agent.wait();
    let out = cli(&["token", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("owned by uid 65534"), "{err}");

    // A socket served by nobody in our own private directory (say, renamed into it): the peer
    // check refuses it before sending anything.
    let _ = std::fs::remove_file(&private);
    std::fs::create_dir_all(private.parent().unwrap()).unwrap();
    std::fs::rename(theirs.join(&name), &private).unwrap();
    Command::new("chown").arg("0:0").arg(&private).status().unwrap();
    let out = cli(&["token", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("served by a process of uid 65534"), "{err}");
    let _ = std::fs::remove_file(&private);

    for s in &mut squatters {
        let _ = s.kill();
        let _ = s.wait();
    }
    let stolen = std::fs::read(&log).unwrap_or_default();
    assert!(
        stolen.is_empty(),
        "the squatter received {:?}",
        String::from_utf8_lossy(&stolen)
    );
}
