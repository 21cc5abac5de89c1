//! A grid pod's sidecar agent in a test: the pod's network namespace, its state and
//! configuration, and the process (tests/sidecar.rs, tests/grids.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::netns::{Background, LAN_GATEWAY, Net};
use super::{BIN, Site, wait_for};

/// A pod's sidecar agent.
pub struct Sidecar {
    /// The pod's namespace name (for `Net::exec`/`run_in`).
    pub pod: String,
    pub state: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The pod's environment (`POD_NAME`, `POD_IP`), which the configuration expands.
    pub env: Vec<(String, String)>,
    pub proc: Option<Background>,
}

impl Sidecar {
    /// A pod of `site` at `pod_ip` on its LAN (resolving through its own sidecar), with member
    /// credentials from `gateway` and a configuration in `dir` that exports `<service>-0` at the
    /// pod address with `ports` (a YAML flow list), VIPs in 127.77.0.0/16 in `vips.mode`
    /// `mode`. Not started.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        net: &mut Net,
        gateway: &Site,
        dir: &Path,
        site: &str,
        pod_ip: &str,
        service: &str,
        ports: &str,
        mode: &str,
    ) -> Sidecar {
        let pod = net.add_pod_ns(site, "pod0", pod_ip);
        net.resolv_conf(&pod, "127.0.0.1");
        let state = dir.join(format!("{site}-member"));
        gateway.ok(&[
            "sidecar",
            "credentials",
            "--format",
            "dir",
            "-o",
            state.to_str().unwrap(),
        ]);
        let config = dir.join(format!("{site}-sidecar.yaml"));
        std::fs::write(
            &config,
            format!(
                "site: {site}\ngateway: {LAN_GATEWAY}:7400\ndns:\n  listen: [\"127.0.0.1:53\"]\nvips:\n  cidr: 127.77.0.0/16\n  mode: {mode}\n\
                 exports:\n  - service: {service}\n    ports: {ports}\n    endpoints:\n      - {{hostname: \"${{POD_NAME}}\", ip: \"${{POD_IP}}\"}}\n"
            ),
        )
        .unwrap();
        Sidecar {
            pod,
            state,
            config,
            log: dir.join(format!("{site}-sidecar.log")),
            env: vec![
                ("POD_NAME".into(), format!("{service}-0")),
                ("POD_IP".into(), pod_ip.into()),
            ],
            proc: None,
        }
    }

    /// `causeway intercept install --config …` (as the pod's initContainer would run it) or
    /// `causeway intercept remove`, in the pod.
    pub fn intercept(&self, net: &Net, action: &str) -> Output {
        let mut cmd = net.exec(&self.pod);
        cmd.args([BIN, "--state", self.state.to_str().unwrap(), "intercept", action]);
        if action == "install" {
            cmd.args(["--config", self.config.to_str().unwrap()]);
        }
        cmd.env("RUST_LOG", "causeway=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap()
    }

    /// Starts the agent in the pod and waits until it answers `status`.
    pub fn start(&mut self, net: &Net) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = net.exec(&self.pod);
        cmd.args([
            BIN,
            "--state",
            self.state.to_str().unwrap(),
            "run",
            "--config",
            self.config.to_str().unwrap(),
        ])
        .env("RUST_LOG", "causeway=debug,info")
        .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        self.proc = Some(Background(cmd.spawn().unwrap()));
        let ok = wait_for(Duration::from_secs(10), || {
            Command::new(BIN)
                .args(["--state", self.state.to_str().unwrap(), "status"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        assert!(
            ok,
            "sidecar in {} did not start:\n{}",
            self.pod,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stops the agent (killed, as a pod's container would be).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// `service list -o json`.
    pub fn services(&self) -> Vec<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["--state", self.state.to_str().unwrap(), "service", "list", "-o", "json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// The VIP of `service`'s ready endpoint in `site`, as this sidecar lists it.
    pub fn vip(&self, service: &str, site: &str) -> Option<String> {
        self.services()
            .iter()
            .filter(|s| s["service"] == service)
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .find(|e| e["site"] == site && e["ready"] == true)
            .and_then(|e| e["vip"].as_str().map(String::from))
    }
}
