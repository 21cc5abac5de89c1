//! A grid pod's sidecar agent in a test: the pod's network namespace, its state and
//! configuration, and the process (tests/sidecar.rs, tests/grids.rs).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use super::netns::{Background, Net};
use super::{BIN, wait_for};

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
