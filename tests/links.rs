//! End-to-end tests of site identity, tokens and links: real agents as separate processes.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{Site, wait_for};

/// Two running sites, paris linked to london through a redeemed token.
fn linked_pair(dir: &std::path::Path) -> (Site, Site) {
    let london = Site::started(dir, "london");
    let paris = Site::started(dir, "paris");
    let token = london.issue(&[], &dir.join("paris.token"));
    let out = paris.ok(&["token", "redeem", token.to_str().unwrap()]);
    assert!(out.starts_with("linked to london (127.0.0.1:"), "{out}");
    (london, paris)
}

fn field(text: &str, key: &str) -> String {
    let prefix = format!("{key}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in token"))
        .to_string()
}

/// A certificate's PEM with one byte of its DER changed at `index`, re-encoded.
fn pem_with_der_byte_changed(pem: &str, index: usize) -> String {
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap();
    der[index] ^= 0x01;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// The token `text` with its mac recomputed from its secret, as someone holding the token
/// could: it passes the redeemer's own check, whatever was changed.
fn resigned(text: &str) -> String {
    let mut t: causeway::token::Token = serde_yaml::from_str(text).unwrap();
    t.mac = t.compute_mac().unwrap();
    t.to_yaml()
}

fn replace_field(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key}: ");
    text.lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{prefix}{value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn link_comes_up_on_both_sides_and_lists_per_spec() {
    let dir = tempfile::tempdir().unwrap();
    let (london, paris) = linked_pair(dir.path());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("paris.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "token files are secrets");
    let sock_mode = std::fs::metadata(london.state.join("admin.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(sock_mode & 0o777, 0o600, "admin socket is private");

    let links = paris.links();
    assert_eq!(links.len(), 1);
    let l = &links[0];
    assert_eq!(l["name"], "london");
    assert_eq!(l["peer_site"], "london");
    assert_eq!(l["state"], "up");
    assert_eq!(l["cost"], 1);
    assert!(l["rtt_ms"].as_f64().is_some(), "{l}");
    assert!(l["since"].as_str().unwrap().ends_with('Z'));
    assert!(wait_for(Duration::from_secs(5), || london.link_up("paris")));

    let table = paris.ok(&["link", "list"]);
    assert!(table.lines().nth(1).unwrap().starts_with("london"), "{table}");
    assert!(table.contains(" up "), "{table}");
    let yaml = paris.ok(&["link", "list", "-o", "yaml"]);
    assert!(yaml.contains("peer_site: london"), "{yaml}");
    let status: serde_json::Value = serde_json::from_str(&paris.ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["site"], "paris");
    assert_eq!(status["links"][0]["state"], "up");
    assert!(paris.ok(&["status"]).contains("site      paris"));
}

#[test]
fn redeem_with_name_and_cost_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let token = london.ok(&["token", "issue", "--uses", "1", "--expires", "5m"]);
    let mut child = std::process::Command::new(common::BIN)
        .arg("--state")
        .arg(&paris.state)
        .args(["token", "redeem", "-", "--name", "hub", "--cost", "7"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let links = paris.links();
    assert_eq!(links[0]["name"], "hub");
    assert_eq!(links[0]["peer_site"], "london");
    assert_eq!(links[0]["cost"], 7);
}

#[test]
fn link_returns_after_either_side_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut london, mut paris) = linked_pair(dir.path());

    // The issuer restarts: the dialer notices and reconnects.
    london.stop();
    assert!(wait_for(Duration::from_secs(6), || !paris.link_up("london")));
    london.start();
    assert!(
        wait_for(Duration::from_secs(10), || paris.link_up("london")),
        "paris did not re-link after london restarted:\n{}",
        paris.log_text()
    );
    assert!(wait_for(Duration::from_secs(5), || london.link_up("paris")));

    // The redeemer restarts: it dials again from its saved state.
    paris.stop();
    assert!(wait_for(Duration::from_secs(6), || !london.link_up("paris")));
    paris.start();
    assert!(
        wait_for(Duration::from_secs(10), || london.link_up("paris")),
        "london did not see paris again:\n{}",
        london.log_text()
    );
    assert!(wait_for(Duration::from_secs(5), || paris.link_up("london")));
}

#[test]
fn dead_peer_is_noticed_within_five_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut london, paris) = linked_pair(dir.path());
    london.kill();
    let start = Instant::now();
    assert!(wait_for(Duration::from_secs(6), || !paris.link_up("london")));
    eprintln!("dead peer noticed after {:?}", start.elapsed());
}

#[test]
fn expired_token_is_refused_with_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let token = london.issue(&["--expires", "1s"], &dir.path().join("t"));
    std::thread::sleep(Duration::from_millis(2100));
    let err = paris.fails(&["token", "redeem", token.to_str().unwrap()]);
    assert!(err.contains("token expired at 20"), "{err}");

    // Moving the expiry forward in the file does not help: the mac no longer matches, and
    // with the mac recomputed from the secret the issuer finds it is not what it issued (and
    // keeps its own expiry anyway).
    let text = std::fs::read_to_string(&token).unwrap();
    let forged = dir.path().join("forged");
    let later = replace_field(&text, "expires", "2099-01-01T00:00:00Z");
    std::fs::write(&forged, &later).unwrap();
    let err = paris.fails(&["token", "redeem", forged.to_str().unwrap()]);
    assert!(err.contains("token tampered with"), "{err}");
    std::fs::write(&forged, resigned(&later)).unwrap();
    let err = paris.fails(&["token", "redeem", forged.to_str().unwrap()]);
    assert!(err.contains("london refused the token: token tampered with"), "{err}");
    assert!(paris.links().is_empty());
}

#[test]
fn used_up_unknown_and_tampered_tokens_name_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let tokyo = Site::started(dir.path(), "tokyo");
    let token = london.issue(&[], &dir.path().join("t"));
    let text = std::fs::read_to_string(&token).unwrap();
    let issued = causeway::token::Token::parse(&text).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.to_str().unwrap().to_string()
    };
    // Re-signed by someone holding the secret: passes the redeemer's check, not the issuer's.
    let resigned = |change: &dyn Fn(&mut causeway::token::Token)| {
        let mut t = issued.clone();
        change(&mut t);
        t.mac = t.compute_mac().unwrap();
        t.to_yaml()
    };

    // Any field changed: the token's mac no longer matches, and the redeemer says so
    // before dialing.
    let secret = field(&text, "secret");
    let flipped = format!("{}{}", if secret.starts_with('0') { "1" } else { "0" }, &secret[1..]);
    let tampered = write("tampered", &replace_field(&text, "secret", &flipped));
    let err = tokyo.fails(&["token", "redeem", &tampered]);
    assert!(
        err.contains("token tampered with") && err.contains("ask london for a new token"),
        "{err}"
    );

    // The CA's bytes changed outside its key (the first byte of the serial number): TLS
    // would still pin the same key, so only the mac notices.
    let ca_changed = |t: &mut causeway::token::Token| t.ca = pem_with_der_byte_changed(&t.ca, 15);
    let mut changed_ca = issued.clone();
    ca_changed(&mut changed_ca);
    assert_ne!(changed_ca.ca, issued.ca);
    let path = write("ca", &changed_ca.to_yaml());
    let err = tokyo.fails(&["token", "redeem", &path]);
    assert!(err.contains("token tampered with"), "{err}");
    // ... and with the mac recomputed, the issuer refuses it: not what it issued.
    let path = write("ca-resigned", &resigned(&ca_changed));
    let err = tokyo.fails(&["token", "redeem", &path]);
    assert!(err.contains("london refused the token: token tampered with"), "{err}");

    let path = write("wrong-secret", &resigned(&|t| t.secret = flipped.clone()));
    let err = tokyo.fails(&["token", "redeem", &path]);
    assert!(err.contains("wrong secret"), "{err}");

    let path = write("unknown", &resigned(&|t| t.grant = "ab".repeat(16)));
    let err = tokyo.fails(&["token", "redeem", &path]);
    assert!(err.contains("unknown grant"), "{err}");

    // A version 1 token (no mac) is refused, saying what to do.
    let v1: String = text
        .replace("version: 2", "version: 1")
        .lines()
        .filter(|l| !l.starts_with("mac:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = write("v1", &v1);
    let err = tokyo.fails(&["token", "redeem", &path]);
    assert!(
        err.contains("token version 1") && err.contains("issue a new token"),
        "{err}"
    );

    // None of those spent the token.
    paris.ok(&["token", "redeem", token.to_str().unwrap()]);
    let err = tokyo.fails(&["token", "redeem", token.to_str().unwrap()]);
    assert!(err.contains("used up"), "{err}");
    assert!(tokyo.links().is_empty());

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "hello: world\n").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = tokyo.fails(&["token", "redeem", garbage.to_str().unwrap()]);
    assert!(err.contains("not a causeway token"), "{err}");

    // A site cannot redeem its own token.
    let own = london.issue(&[], &dir.path().join("own"));
    let err = london.fails(&["token", "redeem", own.to_str().unwrap()]);
    assert!(err.contains("issued by this site"), "{err}");
}

#[test]
fn revoked_token_is_refused_listed_and_stays_revoked_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let tokyo = Site::started(dir.path(), "tokyo");
    let token = london.issue(&["--uses", "2"], &dir.path().join("t"));
    let token = token.to_str().unwrap();
    let grant = field(&std::fs::read_to_string(token).unwrap(), "grant");

    let json = london.ok(&["token", "list", "-o", "json"]);
    assert!(
        !json.contains("secret"),
        "token list never shows the secret or its hash: {json}"
    );
    let list: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(list.len(), 1, "{json}");
    assert_eq!(list[0]["grant"], grant.as_str());
    assert_eq!(list[0]["state"], "open");
    assert_eq!(
        (list[0]["uses"].as_u64(), list[0]["redeemed"].as_u64()),
        (Some(2), Some(0))
    );

    paris.ok(&["token", "redeem", token]);
    // A unique prefix of the grant id is enough.
    let out = london.ok(&["token", "revoke", &grant[..8]]);
    assert!(
        out.contains(&format!("revoked grant {grant} at 20")) && out.contains("by paris"),
        "{out}"
    );

    let err = tokyo.fails(&["token", "redeem", token]);
    assert!(err.contains("london refused the token: token revoked at 20"), "{err}");
    assert!(tokyo.links().is_empty());
    // The link made with the token before it was revoked stays.
    assert!(wait_for(Duration::from_secs(5), || paris.link_up("london")));

    let err = london.fails(&["token", "revoke", "ffff"]);
    assert!(err.contains("no grant \"ffff\" on this site"), "{err}");

    // Revocation is on disk: a restarted issuer still refuses the token.
    london.stop();
    london.start();
    let table = london.ok(&["token", "list"]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&grant))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("revoked") && row.contains("1/2") && row.contains("paris"),
        "{table}"
    );
    let err = tokyo.fails(&["token", "redeem", token]);
    assert!(err.contains("token revoked at 20"), "{err}");
}

#[test]
fn token_pinned_to_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let mallory = Site::started(dir.path(), "mallory");
    let token = london.issue(&[], &dir.path().join("t"));
    let text = std::fs::read_to_string(&token).unwrap();

    // The token's addresses lead to another agent (an interceptor): its certificate is not
    // signed by the CA the token pins. (Changed by someone holding the secret, who recomputed
    // the mac: otherwise the redeemer would refuse it as tampered before dialing.)
    let redirected = dir.path().join("redirected");
    std::fs::write(
        &redirected,
        resigned(&text.replace(
            &format!("127.0.0.1:{}", london.port),
            &format!("127.0.0.1:{}", mallory.port),
        )),
    )
    .unwrap();
    let err = paris.fails(&["token", "redeem", redirected.to_str().unwrap()]);
    assert!(err.contains("issuer certificate does not match the token"), "{err}");

    // The token's CA was swapped for another site's: london no longer matches it.
    let mallory_ca = std::fs::read_to_string(mallory.state.join("ca.crt")).unwrap();
    let ca_start = text.find("ca: |").unwrap();
    let ca_end =
        text[ca_start..].find("-----END CERTIFICATE-----").unwrap() + ca_start + "-----END CERTIFICATE-----".len();
    let indented: String = mallory_ca.trim_end().lines().map(|l| format!("  {l}\n")).collect();
    let swapped = format!("{}ca: |\n{}{}", &text[..ca_start], indented.trim_end(), &text[ca_end..]);
    let swapped_path = dir.path().join("swapped");
    std::fs::write(&swapped_path, resigned(&swapped)).unwrap();
    let err = paris.fails(&["token", "redeem", swapped_path.to_str().unwrap()]);
    assert!(err.contains("issuer certificate does not match the token"), "{err}");
    assert!(paris.links().is_empty());

    // The genuine token still works afterwards: nothing was consumed.
    paris.ok(&["token", "redeem", token.to_str().unwrap()]);
}

#[test]
fn unreachable_issuer_names_the_addresses_tried() {
    let dir = tempfile::tempdir().unwrap();
    let mut london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let token = london.issue(&[], &dir.path().join("t"));
    london.stop();
    let started = Instant::now();
    let err = paris.fails(&["token", "redeem", token.to_str().unwrap()]);
    assert!(
        err.contains("not reachable") && err.contains(&format!("127.0.0.1:{}", london.port)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "gave up in {:?}",
        started.elapsed()
    );
}

#[test]
fn concurrent_redemptions_of_a_one_use_token_link_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let mut sites: Vec<Site> = (0..8).map(|i| Site::init(dir.path(), &format!("site-{i}"))).collect();
    for s in &mut sites {
        s.start();
    }
    let token = london.issue(&["--uses", "1"], &dir.path().join("t"));
    let results: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = sites
            .iter()
            .map(|s| {
                let token = token.clone();
                scope.spawn(move || s.cli(&["token", "redeem", token.to_str().unwrap()]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let out = h.join().unwrap();
                if !out.status.success() {
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(err.contains("used up"), "{err}");
                }
                out.status.success()
            })
            .collect()
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
    assert_eq!(london.links().len(), 1);
    let grants = std::fs::read_to_string(london.state.join("grants.yaml")).unwrap();
    assert_eq!(grants.matches("site: site-").count(), 1, "{grants}");
}

#[test]
fn removed_link_closes_at_once_and_peer_cannot_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (london, paris) = linked_pair(dir.path());
    assert!(wait_for(Duration::from_secs(5), || london.link_up("paris")));
    let out = london.ok(&["link", "remove", "paris"]);
    assert!(out.contains("removed link paris"), "{out}");
    let removed_at = Instant::now();
    assert!(wait_for(Duration::from_secs(1), || !paris.link_up("london")));
    eprintln!("peer saw the close after {:?}", removed_at.elapsed());
    assert!(london.links().is_empty());
    // The peer keeps trying and keeps failing the handshake.
    std::thread::sleep(Duration::from_secs(3));
    let l = &paris.links()[0];
    assert_ne!(l["state"], "up");
    let err = l["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("TLS handshake refused") || err.contains("removed"), "{l}");
    assert!(paris.log_text().contains("link attempt failed") || paris.log_text().contains("link down"));
    let err = london.fails(&["link", "remove", "paris"]);
    assert!(err.contains("no link named \"paris\""), "{err}");
}

#[test]
fn garbage_on_the_quic_port_and_admin_socket_does_not_hurt() {
    let dir = tempfile::tempdir().unwrap();
    let (mut london, paris) = linked_pair(dir.path());

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for i in 0..2000 {
        let len = [1, 20, 1200, 1500, 65000][i % 5];
        let buf: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = udp.send_to(&buf, ("127.0.0.1", london.port));
    }

    use std::os::unix::net::UnixStream;
    let sock = london.state.join("admin.sock");
    for junk in [
        &b"\x00\xff\xfe garbage\n"[..],
        b"{\"op\":\"nope\"}\n",
        b"{not json",
        b"\n\n\n",
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(junk);
    }
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(&vec![b'x'; 2 * 1024 * 1024]);
    }
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"op\":\"nope\"}\n").unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut answer).unwrap();
    assert!(
        answer.contains("\"ok\":false") && answer.contains("malformed request"),
        "{answer}"
    );

    assert!(london.alive(), "agent died:\n{}", london.log_text());
    london.ok(&["status"]);
    assert_eq!(paris.link_state("london").as_deref(), Some("up"));
}

#[test]
fn init_refuses_to_overwrite_and_config_errors_name_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::init(dir.path(), "london");
    let err = london.fails(&["init", "--site", "london"]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    // A bad site id is a usage error: exit 2.
    let out = london.cli(&["init", "--site", "Bad_Name"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a valid site id"), "{err}");

    let cfg = london.state.join("causeway.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\nlisn: 1\n")).unwrap();
    let err = london.fails(&["run"]);
    assert!(err.contains("lisn") && err.contains("line"), "{err}");

    std::fs::write(&cfg, text.replace("site: london", "site: paris")).unwrap();
    let err = london.fails(&["run"]);
    assert!(err.contains("holds site \"london\""), "{err}");

    let err = london.fails(&["link", "list"]);
    assert!(err.contains("no agent is running"), "{err}");
}

#[test]
fn demo_runs_on_a_fresh_machine() {
    let out = std::process::Command::new(common::BIN).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("paris redeemed it: linked to"), "{stdout}");
    assert!(stdout.contains("is up"), "{stdout}");
    // Issue 17 (3): the names users come for resolve through paris's DNS, and the echo is
    // reached by name.
    assert!(
        stdout.contains("echo-0.london.echo.default.svc.clusterset.local.\t5\tIN\tA\t127.77."),
        "{stdout}"
    );
    assert!(stdout.contains("IN\tSRV\t0 10 "), "{stdout}");
    assert!(
        stdout.contains("TCP  echo-0.london.echo.default.svc.clusterset.local:")
            && stdout.contains("got back \"hello from paris, through the causeway\""),
        "{stdout}"
    );
}

#[test]
fn sites_with_different_vip_ranges_cannot_link() {
    let dir = tempfile::tempdir().unwrap();
    let mut london = Site::init(dir.path(), "london");
    let mut paris = Site::init(dir.path(), "paris");
    let cfg = paris.state.join("causeway.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("cidr: 127.77.0.0/16", "cidr: 127.88.0.0/16")).unwrap();
    london.start();
    paris.start();
    let token = london.issue(&[], &dir.path().join("t"));
    let err = paris.fails(&["token", "redeem", token.to_str().unwrap()]);
    assert!(
        err.contains("vips.cidr differs") && err.contains("127.88.0.0/16"),
        "{err}"
    );
}

/// `token list -o json` of `site`: the grant with id `grant`.
fn grant_view(site: &Site, grant: &str) -> serde_json::Value {
    let list: Vec<serde_json::Value> = serde_json::from_str(&site.ok(&["token", "list", "-o", "json"])).unwrap();
    list.into_iter()
        .find(|g| g["grant"] == grant)
        .unwrap_or_else(|| panic!("no grant {grant} on {}", site.name))
}

/// Issue 15, item 2: a second link between the same two sites (another token of the same
/// issuer, or a token of the other direction) is refused with the existing link's name and
/// exit status 1, spends no token, and leaves the first link and its flows alone; the issuer
/// refuses too when the redeemer has no link of its own left.
#[test]
fn second_link_between_the_same_sites_is_refused_and_the_first_keeps_its_flows() {
    use std::io::Read;
    use std::net::{SocketAddr, TcpStream};

    let Some(net) = common::netns::Net::new(&["london", "paris"]) else {
        return;
    };
    if !common::netns::require(&["socat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    const POD: &str = "10.1.0.1";
    let s = common::sites_in(dir.path(), &net, &["london", "paris"], POD, |_| {});
    let (london, paris) = (&s[0], &s[1]);
    london.link_spoke(dir.path(), paris, 1);
    assert!(wait_for(Duration::from_secs(5), || london.link_up("paris")));

    // An echo service in london, and one TCP flow to it from paris, kept open throughout.
    let _echo = net.spawn(
        "london",
        &[
            "socat",
            &format!("TCP-LISTEN:7007,bind={POD},reuseaddr,fork"),
            "EXEC:cat",
        ],
    );
    london.set_exports(&format!(
        "exports:\n  - service: echo\n    ports: [{{name: tcp, port: 7007}}]\n    endpoints:\n      - {{hostname: echo-0, ip: {POD}}}\n"
    ));
    let mut vip = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            vip = paris
                .services()
                .into_iter()
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .find(|e| e["site"] == "london" && e["ready"] == true)
                .and_then(|e| e["vip"].as_str().map(String::from));
            vip.is_some()
        }),
        "paris never saw london's echo service"
    );
    let addr: SocketAddr = format!("{}:7007", vip.unwrap()).parse().unwrap();
    let mut flow = None;
    assert!(wait_for(Duration::from_secs(5), || {
        flow = net.run_in("paris", || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()
        });
        flow.is_some()
    }));
    let mut flow = flow.unwrap();
    flow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut echo_once = |msg: &[u8]| {
        flow.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        flow.read_exact(&mut back)
            .expect("the flow through the first link was broken");
        assert_eq!(back, msg);
    };
    echo_once(b"before");
    let since = |site: &Site, name: &str| {
        site.links()
            .into_iter()
            .find(|l| l["name"] == name)
            .map(|l| l["since"].clone())
    };
    let (paris_since, london_since) = (since(paris, "london"), since(london, "paris"));

    // Paris redeems a second london token under another name: refused before dialing.
    let again = london.issue(&[], &dir.path().join("again.token"));
    let grant = field(&std::fs::read_to_string(&again).unwrap(), "grant");
    let err = paris.fails(&["token", "redeem", again.to_str().unwrap(), "--name", "london-again"]);
    assert!(
        err.contains(
            "already linked to site london as link \"london\"; remove it first with: causeway link remove london"
        ),
        "{err}"
    );
    assert_eq!(grant_view(london, &grant)["redeemed"], 0, "the refused token was spent");

    // The other direction: london redeems a paris token while paris dials london.
    let reverse = paris.issue(&[], &dir.path().join("reverse.token"));
    let err = london.fails(&["token", "redeem", reverse.to_str().unwrap()]);
    assert!(
        err.contains(
            "already linked to site paris as link \"paris\"; remove it first with: causeway link remove paris"
        ),
        "{err}"
    );

    // Nothing moved: one link each side, up since before, and the flow still echoes.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(paris.links().len(), 1, "{:?}", paris.links());
    assert_eq!(london.links().len(), 1, "{:?}", london.links());
    assert!(paris.link_up("london") && london.link_up("paris"));
    assert_eq!(since(paris, "london"), paris_since, "paris's link reconnected");
    assert_eq!(since(london, "paris"), london_since, "london's link reconnected");
    echo_once(b"after the refused redemptions");
    assert!(!london.log_text().contains("replaced by a newer connection"));
    assert!(!paris.log_text().contains("replaced by a newer connection"));

    // The issuer's own guard: paris forgets its side, london still has its link with paris.
    paris.ok(&["link", "remove", "london"]);
    let err = paris.fails(&["token", "redeem", again.to_str().unwrap(), "--name", "london-again"]);
    assert!(
        err.contains("london refused the token")
            && err.contains("site london already has a link with site paris (named \"paris\" there)")
            && err.contains("causeway link remove paris"),
        "{err}"
    );
    assert_eq!(grant_view(london, &grant)["redeemed"], 0, "the refused token was spent");
    assert!(paris.links().is_empty(), "{:?}", paris.links());

    // With the old link gone on both sides, the same token links the sites again.
    london.ok(&["link", "remove", "paris"]);
    let out = paris.ok(&["token", "redeem", again.to_str().unwrap(), "--name", "london-again"]);
    assert!(out.starts_with("linked to london"), "{out}");
    assert_eq!(grant_view(london, &grant)["redeemed"], 1);
}

/// Two links to one site left in `links.yaml` by an older version: the newer one stays idle
/// (and says why), so the two never take turns replacing each other; removing the one in use
/// lets the idle one take over.
#[test]
fn duplicate_links_from_an_old_links_file_stay_idle_instead_of_fighting() {
    let dir = tempfile::tempdir().unwrap();
    let (london, mut paris) = linked_pair(dir.path());
    paris.stop();
    let path = paris.state.join("links.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let created = field(&text, "  created");
    // The same record again under another name, created a minute later.
    let later = {
        let t = std::time::SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                std::time::SystemTime::now()
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    + 60,
            );
        humantime::format_rfc3339_seconds(t).to_string()
    };
    let record = text.split_once("links:\n").unwrap().1;
    let again = record
        .replacen("- name: london", "- name: london-again", 1)
        .replacen(&created, &later, 1);
    std::fs::write(&path, format!("{text}{again}")).unwrap();
    paris.start();
    assert!(wait_for(Duration::from_secs(10), || paris.link_up("london")));
    assert!(wait_for(Duration::from_secs(5), || london.link_up("paris")));
    std::thread::sleep(Duration::from_secs(3));
    let links = paris.links();
    assert_eq!(links.len(), 2, "{links:?}");
    let idle = links.iter().find(|l| l["name"] == "london-again").unwrap();
    assert_ne!(idle["state"], "up", "{idle}");
    let why = idle["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("second link to site london") && why.contains("causeway link remove london-again"),
        "{idle}"
    );
    assert!(paris.link_up("london"));
    assert!(
        !london.log_text().contains("replaced by a newer connection"),
        "{}",
        london.log_text()
    );

    paris.ok(&["link", "remove", "london"]);
    assert!(
        wait_for(Duration::from_secs(10), || paris.link_up("london-again")),
        "{:?}",
        paris.links()
    );
}

/// Issue 16 (15): redemptions need no certificate, so anyone can repeat a refused one; the
/// issuer's warnings about them are rate-limited with counts instead of one line each.
#[test]
fn refused_redemptions_do_not_flood_the_issuers_log() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let token = london.issue(&[], &dir.path().join("t"));
    let text = std::fs::read_to_string(&token).unwrap();
    let secret = field(&text, "secret");
    let flipped = format!("{}{}", if secret.starts_with('0') { "1" } else { "0" }, &secret[1..]);
    // With its mac recomputed, so that it passes the redeemer's check and reaches london.
    let tampered = dir.path().join("tampered");
    std::fs::write(&tampered, resigned(&replace_field(&text, "secret", &flipped))).unwrap();
    for _ in 0..20 {
        let err = paris.fails(&["token", "redeem", tampered.to_str().unwrap()]);
        assert!(err.contains("wrong secret"), "{err}");
    }
    let logged = london.log_text().matches("redemption refused").count();
    assert!(
        (1..=3).contains(&logged),
        "{logged} warnings for 20 refusals:\n{}",
        london.log_text()
    );
    // The real token still works afterwards.
    paris.ok(&["token", "redeem", token.to_str().unwrap()]);
}

/// A second agent on a state directory whose agent is running is refused with the reason, and
/// garbage where a token should be is described as such.
#[test]
fn a_second_agent_on_one_state_and_garbage_tokens_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let err = london.fails(&["run"]);
    assert!(err.contains("an agent is already running for"), "{err}");
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "garbage\n").unwrap();
    let err = london.fails(&["token", "redeem", garbage.to_str().unwrap()]);
    assert!(
        err.contains("not a causeway token: expected the YAML file `causeway token issue` writes"),
        "{err}"
    );
}

/// Issue 18 (1): a rolling upgrade never cuts sites apart. paris runs as a newer causeway
/// would write (`CAUSEWAY_TEST_NEWER_PEER`: its hello offers the next protocol version,
/// every object it sends has a field this version does not know, its adverts carry a port of
/// an unknown protocol and are followed by a message of an unknown type); london, this
/// version, links with it, keeps the link up and takes paris's exports, skipping only what
/// it cannot use.
#[test]
fn a_newer_peer_with_unknown_fields_and_a_newer_version_links_and_stays_linked() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let mut paris = Site::init(dir.path(), "paris");
    paris.env.push(("CAUSEWAY_TEST_NEWER_PEER".into(), "1".into()));
    paris.start();
    let token = london.issue(&[], &dir.path().join("paris.token"));
    let out = paris.ok(&["token", "redeem", token.to_str().unwrap()]);
    assert!(out.starts_with("linked to london"), "{out}");
    assert!(
        wait_for(Duration::from_secs(5), || london.link_up("paris")),
        "{}",
        london.log_text()
    );
    paris.set_exports(
        "exports:\n  - service: etcd\n    ports: [{name: client, port: 2379}]\n    endpoints: [{hostname: etcd-0, ip: 10.1.0.1}]\n",
    );
    let seen = || -> Option<serde_json::Value> {
        let services: serde_json::Value = serde_json::from_str(&london.ok(&["service", "list", "-o", "json"])).ok()?;
        services.as_array()?.iter().find(|s| s["service"] == "etcd").cloned()
    };
    assert!(
        wait_for(Duration::from_secs(5), || seen().is_some()),
        "{}",
        london.log_text()
    );
    let etcd = seen().unwrap();
    assert_eq!(
        etcd["ports"],
        serde_json::json!([{"name": "client", "port": 2379, "protocol": "TCP"}]),
        "{etcd}"
    );
    assert_eq!(etcd["endpoints"][0]["hostname"], "etcd-0");
    assert!(etcd["endpoints"][0]["vip"].is_string(), "{etcd}");
    // The link stays up: no reconnection, no error.
    let since = london.links()[0]["since"].clone();
    std::thread::sleep(Duration::from_secs(2));
    let links = london.links();
    assert_eq!(links[0]["state"], "up", "{links:?}");
    assert_eq!(links[0]["since"], since, "the link was re-established");
    let log = london.log_text();
    assert!(!log.contains("control stream:"), "{log}");
    // The unknown message type arrived and was passed over.
    assert!(log.contains("unexpected control frame ignored"), "{log}");
    assert!(log.contains("Unknown"), "{log}");
}
