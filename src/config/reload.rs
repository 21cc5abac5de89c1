//! What a running agent can take from a changed `causeway.yaml` without a restart. The agent
//! watches the file (`agent.rs`) and applies `exports`, `namespace` and the DNS forwarding
//! settings at once; every other key keeps its running value, and [`Config::restart_needed`]
//! names those keys so the reload status and the log can say a restart is due.

use super::{Config, Limits, LinksConfig, VipsConfig};

impl Config {
    /// The keys whose change from `running` to `self` a running agent cannot apply, each by
    /// its full dotted name (`links.lanes`): it keeps their running values until restarted. Live: `exports`, `namespace`, `dns.upstream`,
    /// `dns.allow`, `dns.ttl`.
    pub fn restart_needed(&self, running: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut check = |changed: bool, key: &'static str| {
            if changed {
                keys.push(key);
            }
        };
        check(self.site != running.site, "site");
        check(self.listen != running.listen, "listen");
        check(self.advertise != running.advertise, "advertise");
        check(self.dns.listen != running.dns.listen, "dns.listen");
        check(self.dns.zone != running.dns.zone, "dns.zone");
        check(self.metrics != running.metrics, "metrics");
        check(self.gateway != running.gateway, "gateway");
        // Destructured, so that a key added to a section cannot be left out here.
        let VipsConfig {
            cidr,
            block,
            mode,
            intercept_port,
        } = &self.vips;
        let rv = &running.vips;
        check(*cidr != rv.cidr, "vips.cidr");
        check(*block != rv.block, "vips.block");
        check(*mode != rv.mode, "vips.mode");
        check(*intercept_port != rv.intercept_port, "vips.intercept_port");
        let LinksConfig {
            lanes,
            down_after,
            idle_timeout,
            resume,
        } = &self.links;
        let rl = &running.links;
        check(*lanes != rl.lanes, "links.lanes");
        check(*down_after != rl.down_after, "links.down_after");
        check(*idle_timeout != rl.idle_timeout, "links.idle_timeout");
        check(*resume != rl.resume, "links.resume");
        let Limits { max_flows, udp_idle } = &self.limits;
        check(*max_flows != running.limits.max_flows, "limits.max_flows");
        check(*udp_idle != running.limits.udp_idle, "limits.udp_idle");
        keys
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::parse;

    #[test]
    fn which_changes_need_a_restart() {
        let running = parse("site: a\n").unwrap();
        let live =
            parse("site: a\nnamespace: grid\ndns:\n  upstream: [\"10.0.0.1:53\"]\n  ttl: 9\n  allow: [10.0.0.0/8]\n")
                .unwrap();
        assert!(live.restart_needed(&running).is_empty());
        let not_live = parse(
            "site: a\nlisten: 0.0.0.0:7401\ndns:\n  listen: [\"127.0.0.1:5354\"]\nmetrics: 127.0.0.1:9401\nlinks:\n  down_after: 1s\nlimits:\n  max_flows: 10\n",
        )
        .unwrap();
        assert_eq!(
            not_live.restart_needed(&running),
            [
                "listen",
                "dns.listen",
                "metrics",
                "links.down_after",
                "limits.max_flows"
            ]
        );
        let lanes = parse("site: a\nlinks:\n  lanes: 3\n  resume: false\nvips:\n  mode: intercept\n").unwrap();
        assert_eq!(
            lanes.restart_needed(&running),
            ["vips.mode", "links.lanes", "links.resume"],
            "each key by its own name, not its section's"
        );
    }
}
