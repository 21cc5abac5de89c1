//! End-to-end tests of VIP stability: real agents as separate processes on loopback.
//!
//! A VIP names one endpoint for as long as anyone may hold it: it survives the owning agent's
//! restart whatever was exported meanwhile (issue 15, item 3), and a returning endpoint gets
//! its own back.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Site, wait_for};

/// `web` with one endpoint.
const WEB: &str = "  - service: web\n    ports: [{name: http, port: 8080}]\n    endpoints:\n      - {hostname: web-0, ip: 10.1.0.1}\n";

/// `cache` with `n` endpoints. Its names sort before `web`'s and, placed all at once by hash,
/// one of them lands on web-0's address: the order a restart used to place them in.
fn cache(n: usize) -> String {
    let mut yaml = "  - service: cache\n    ports: [{name: redis, port: 6379}]\n    endpoints:\n".to_string();
    for i in 0..n {
        yaml.push_str(&format!(
            "      - {{hostname: cache-{i}, ip: 10.2.{}.{}}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    yaml
}

/// London's endpoints as `site` lists them: (service, hostname) → VIP, endpoints without a
/// VIP left out.
fn london_vips(site: &Site) -> BTreeMap<(String, String), String> {
    let mut vips = BTreeMap::new();
    for s in site.services() {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["site"] != "london" {
                continue;
            }
            if let (Some(svc), Some(host), Some(vip)) =
                (s["service"].as_str(), e["hostname"].as_str(), e["vip"].as_str())
            {
                vips.insert((svc.to_string(), host.to_string()), vip.to_string());
            }
        }
    }
    vips
}

/// Waits until `site` lists `count` endpoints of london's, each with a VIP.
fn wait_count(site: &Site, count: usize) -> BTreeMap<(String, String), String> {
    let mut last = BTreeMap::new();
    let ok = wait_for(Duration::from_secs(20), || {
        last = london_vips(site);
        last.len() == count
    });
    assert!(
        ok,
        "{} lists {} of london's endpoints, not {count}:\n{}",
        site.name,
        last.len(),
        site.log_text()
    );
    last
}

fn web0() -> (String, String) {
    ("web".to_string(), "web-0".to_string())
}

#[test]
fn vips_survive_a_restart_after_a_hot_added_export() {
    let dir = tempfile::tempdir().unwrap();
    let mut london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    london.link_spoke(dir.path(), &paris, 1);

    london.set_exports(&format!("exports:\n{WEB}"));
    let vip = wait_count(&paris, 1)[&web0()].clone();
    // The hot-added export leaves web-0 where it was.
    london.set_exports(&format!("exports:\n{WEB}{}", cache(200)));
    let before = wait_count(&paris, 201);
    assert_eq!(before[&web0()], vip);

    // The allocation is in the state directory, private like the rest of it.
    use std::os::unix::fs::PermissionsExt;
    let file = london.state.join("vips.yaml");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&format!("vip: {vip}")), "{text}");

    // London restarts; paris forgets london's endpoints while it is away (so what it lists
    // afterwards comes from the new agent), then learns them again.
    london.stop();
    wait_count(&paris, 0);
    london.start();
    assert!(
        wait_for(Duration::from_secs(20), || paris.link_up("london")),
        "paris did not re-link:\n{}",
        paris.log_text()
    );
    let after = wait_count(&paris, 201);
    assert_eq!(after[&web0()], vip, "web-0 moved after london restarted");
    assert_eq!(after, before, "some endpoint moved after london restarted");
    let holders: Vec<_> = after.iter().filter(|(_, v)| **v == vip).map(|(k, _)| k).collect();
    assert_eq!(holders, vec![&web0()], "{vip} is held by another endpoint too");
    let distinct: std::collections::BTreeSet<_> = after.values().collect();
    assert_eq!(distinct.len(), 201, "two endpoints share a VIP");
    // London itself agrees.
    assert_eq!(wait_count(&london, 201), after);

    // Withdrawn, web-0's VIP stays reserved for it (freed_at is recorded); back, it gets it.
    london.set_exports(&format!("exports:\n{}", cache(200)));
    wait_count(&paris, 200);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("freed_at:"), "{text}");
    london.set_exports(&format!("exports:\n{WEB}{}", cache(200)));
    assert_eq!(wait_count(&paris, 201)[&web0()], vip);
}

#[test]
fn a_corrupt_allocation_is_set_aside_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let mut london = Site::init(dir.path(), "london");
    let file = london.state.join("vips.yaml");
    std::fs::write(&file, "vips: [{{{ not yaml").unwrap();
    london.set_exports(&format!("exports:\n{WEB}"));
    london.start();
    let vips = wait_count(&london, 1);
    let log = london.log_text();
    assert!(
        log.contains("the VIP allocation cannot be read") && log.contains("vips.yaml"),
        "{log}"
    );
    // The bad file is kept for inspection and a good one written in its place.
    assert!(london.state.join("vips.yaml.corrupt").exists());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&format!("vip: {}", vips[&web0()])), "{text}");
    london.stop();
}
