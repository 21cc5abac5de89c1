//! Typed configuration for `causeway.yaml`, the one file that tells an agent
//! which site it is, where it listens, how it answers clusterset DNS, which
//! virtual IPs it may hand out and which local services it exports to the
//! other sites. The whole file is read, `${VAR}`-expanded, parsed and
//! validated up front by [`Config::load`], so a bad value stops the agent at
//! start with an error naming the file, the key and the line instead of
//! surfacing later as a broken link or a wrong DNS answer. Checks that concern
//! a single value run while deserializing, so serde_yaml attaches the key path
//! and line to them; checks that span several entries (duplicates, missing
//! ports) run in the same pass and report the entry's key path and line.
//!
//! One file per concern: `schema.rs` the types and their defaults, `env.rs` the `${VAR}`
//! expansion, `values.rs` the checks of single values, `validate.rs` the checks across
//! values and the line locators, `template.rs` the file `causeway init` writes, `reload.rs`
//! which changes a running agent applies. Everything the rest of the crate uses is
//! re-exported here, so callers write `crate::config::Config` whichever file it lives in.
//! The names and port types the configuration shares with the wire formats live in
//! [`crate::names`].

mod env;
mod reload;
mod schema;
mod template;
mod validate;
mod values;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub use env::expand_env;
pub use schema::{
    Config, DEFAULT_INTERCEPT_PORT, DnsConfig, EndpointSpec, Export, Lanes, Limits, LinksConfig, MAX_LANES, VipMode,
    VipsConfig,
};
pub use template::default_yaml;

use crate::names::LABEL_RULE;
pub use crate::names::{PortSpec, Protocol, is_dns_label};

/// Everything that can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration file", path.display())]
    Io {
        /// Path that was read.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The YAML is malformed or a value is invalid; `message` already names
    /// the key path and the line.
    #[error("{origin}: {message}")]
    Parse {
        /// File (or other source) the text came from.
        origin: String,
        /// What is wrong, with key path and line.
        message: String,
    },
    /// A `${VAR}` names an environment variable that is not set.
    #[error("{origin}: line {line}: environment variable `{var}` is not set (write `$${{` for a literal `${{`)")]
    UnsetVar {
        /// File (or other source) the text came from.
        origin: String,
        /// Name of the unset variable.
        var: String,
        /// One-based line of the reference.
        line: usize,
    },
    /// A check spanning several values failed; `message` ends with the line
    /// when it could be found.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// File (or other source) the text came from.
        origin: String,
        /// Key path of the offending value, e.g. `exports[1].ports`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads `path`, expands `${VAR}` from the process environment (see
    /// [`expand_env`]), parses and validates it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let lookup = |name: &str| std::env::var(name).ok();
        let expanded = env::expand_env_in(&text, &origin, &lookup)?;
        Config::parse(&expanded, &origin)
    }

    /// Parses and validates already-expanded YAML text; `origin` (usually the
    /// file path) prefixes every error.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let missing_site = |why: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: "site".to_owned(),
            message: format!("{why}; `site` is required: the id of this cluster ({LABEL_RULE})"),
        };
        let config = match serde_yaml::from_str::<Config>(text) {
            Ok(config) => config,
            Err(e) => {
                // An empty file or one without `site` gets its own error
                // rather than serde's "EOF" or "missing field".
                return Err(match serde_yaml::from_str::<serde_yaml::Value>(text) {
                    Ok(serde_yaml::Value::Null) => missing_site("the file is empty"),
                    Ok(serde_yaml::Value::Mapping(m))
                        if !m.contains_key("site") && e.to_string().starts_with("missing field `site`") =>
                    {
                        missing_site("missing key")
                    }
                    _ => validate::yaml_error(origin, &e),
                });
            }
        };
        validate::check(&config, text, origin)?;
        Ok(config)
    }

    /// Serializes the configuration back to YAML that [`Config::parse`]
    /// reads into an equal `Config` (comments are not kept).
    pub fn to_yaml(&self) -> String {
        // Every key is a string and every value a scalar, sequence or
        // mapping of those, which serde_yaml always serializes.
        serde_yaml::to_string(self).expect("Config always serializes to YAML")
    }

    /// Addresses to write into tokens: `advertise`, or `listen` when
    /// `advertise` is empty. An unspecified `listen` IP (`0.0.0.0` or `::`)
    /// can't be dialed, so it is replaced by loopback (`127.0.0.1` or `::1`):
    /// such a token only works from the same host, and real deployments set
    /// `advertise`. `bound` is the address the agent actually bound for
    /// `listen` (its port differs when `listen` asked for port 0).
    pub fn advertise_addrs(&self, bound: SocketAddr) -> Vec<String> {
        if !self.advertise.is_empty() {
            return self.advertise.clone();
        }
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        vec![addr.to_string()]
    }

    /// Namespace of an export: its own, or the top-level `namespace`.
    pub fn export_namespace<'a>(&'a self, e: &'a Export) -> &'a str {
        e.namespace.as_deref().unwrap_or(&self.namespace)
    }
}

/// What the tests of every file of the module share: the reference example and parsing
/// helpers.
#[cfg(test)]
mod test_support {
    use super::{Config, ConfigError};

    pub const SPEC: &str = r#"site: london                    # cluster id, DNS-1123 label
namespace: default              # default namespace for exports
listen: 0.0.0.0:7400            # QUIC links (UDP)
advertise: ["gw.london.example:7400"]   # addresses written into tokens; default: listen
dns:
  listen: ["127.0.0.1:53"]      # UDP and TCP
  zone: clusterset.local
  upstream: []                  # e.g. ["10.96.0.10:53"]; empty: REFUSED outside the zone
  ttl: 5
vips:
  cidr: 127.77.0.0/16           # virtual IPs for remote endpoints (inside 127/8 needs no privilege)
metrics: 127.0.0.1:9400         # Prometheus text format at /metrics; omit to disable
gateway: causeway.grid.svc:7400 # sidecars only: the site's gateway, the one agent a sidecar links to
limits:                         # (our extension) concurrency bounds
  max_flows: 4096               # concurrent forwarded TCP flows per agent
  udp_idle: 60s                 # humantime duration, idle UDP flows expire
exports:
  - service: etcd
    namespace: default          # optional, defaults to top-level namespace
    ports:
      - {name: peer, port: 2380, protocol: TCP}
      - {name: client, port: 2379}              # protocol defaults to TCP
      - {name: gossip, port: 7946, protocol: UDP}
    endpoints:
      - {hostname: etcd-0, ip: 10.1.0.1}        # ready unless `ready: false`
"#;

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "causeway.yaml")
    }

    /// The error text for `text`, which must fail to parse.
    pub fn err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected an error, parsed {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    pub fn no_env(_: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use ipnet::IpNet;

    use super::test_support::{SPEC, err, parse};
    use super::*;

    #[test]
    fn spec_example_parses() {
        let c = parse(SPEC).expect("spec example parses");
        assert_eq!(c.site, "london");
        assert_eq!(c.namespace, "default");
        assert_eq!(c.listen, "0.0.0.0:7400".parse::<SocketAddr>().unwrap());
        assert_eq!(c.advertise, vec!["gw.london.example:7400".to_owned()]);
        assert_eq!(c.advertise_addrs(c.listen), vec!["gw.london.example:7400".to_owned()]);
        assert_eq!(c.dns.listen, vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()]);
        assert_eq!(c.dns.zone, "clusterset.local");
        assert!(c.dns.upstream.is_empty());
        assert_eq!(c.dns.ttl, 5);
        assert_eq!(c.vips.cidr, "127.77.0.0/16".parse::<IpNet>().unwrap());
        assert_eq!(c.metrics, Some("127.0.0.1:9400".parse().unwrap()));
        assert_eq!(c.gateway.as_deref(), Some("causeway.grid.svc:7400"));
        assert_eq!(c.limits.max_flows, 4096);
        assert_eq!(c.limits.udp_idle, Duration::from_secs(60));
        assert_eq!(
            c.exports,
            vec![Export {
                service: "etcd".into(),
                namespace: Some("default".into()),
                ports: vec![
                    PortSpec {
                        name: "peer".into(),
                        port: 2380,
                        protocol: Protocol::Tcp
                    },
                    PortSpec {
                        name: "client".into(),
                        port: 2379,
                        protocol: Protocol::Tcp
                    },
                    PortSpec {
                        name: "gossip".into(),
                        port: 7946,
                        protocol: Protocol::Udp
                    },
                ],
                endpoints: vec![EndpointSpec {
                    hostname: "etcd-0".into(),
                    ip: "10.1.0.1".parse().unwrap(),
                    ready: true,
                }],
            }]
        );
        assert_eq!(c.export_namespace(&c.exports[0]), "default");
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
        assert_eq!(Protocol::Udp.to_string(), "UDP");
        assert_eq!(Protocol::Tcp.to_string(), "TCP");
    }
    #[test]
    fn unknown_top_level_key() {
        let e = err("site: london\nlisten: 0.0.0.0:7400\nlisten_addr: 1.2.3.4:5\n");
        assert!(e.starts_with("causeway.yaml: "), "{e}");
        assert!(e.contains("unknown field `listen_addr`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        // Even on the very first line, where serde_yaml omits the position.
        let e = err("sitee: london\n");
        assert!(e.contains("`sitee`") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn unknown_nested_key() {
        let text = SPEC.replace("  listen: [\"127.0.0.1:53\"]", "  listn: [\"127.0.0.1:53\"]");
        let e = err(&text);
        assert!(
            e.starts_with("causeway.yaml: dns: unknown field `listn`, expected one of"),
            "{e}"
        );
        assert!(e.ends_with("at line 6 column 3"), "{e}");
        let e = err("site: a\nexports:\n  - service: x\n    ports: [{name: p, port: 1, proto: TCP}]\n");
        assert!(e.contains("exports[0].ports[0]: unknown field `proto`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }
    #[test]
    fn missing_or_empty_site() {
        for text in ["", "# nothing yet\n", "namespace: default\n"] {
            let e = err(text);
            assert!(e.contains("site"), "{e}");
            assert!(matches!(parse(text), Err(ConfigError::Invalid { ref key, .. }) if key == "site"));
        }
    }
    #[test]
    fn protocol_and_ready_defaults() {
        let c = parse(
            "site: a\nexports:\n  - service: x\n    namespace: b\n    ports: [{name: p, port: 80}]\n    endpoints:\n      - {hostname: h, ip: \"fd00::1\"}\n      - {hostname: i, ip: 10.0.0.2, ready: false}\n",
        )
        .unwrap();
        let e = &c.exports[0];
        assert_eq!(e.ports[0].protocol, Protocol::Tcp);
        assert!(e.endpoints[0].ready);
        assert!(!e.endpoints[1].ready);
        assert_eq!(c.export_namespace(e), "b");
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
    }
    #[test]
    fn advertise_defaults_from_listen() {
        let c = parse("site: a\n").unwrap();
        assert_eq!(c.advertise_addrs(c.listen), vec!["127.0.0.1:7400".to_owned()]);
        let c = parse("site: a\nlisten: \"[::]:7401\"\n").unwrap();
        assert_eq!(c.advertise_addrs(c.listen), vec!["[::1]:7401".to_owned()]);
        let c = parse("site: a\nlisten: 10.0.0.5:7400\n").unwrap();
        assert_eq!(c.advertise_addrs(c.listen), vec!["10.0.0.5:7400".to_owned()]);
    }

    #[test]
    fn load_reads_expands_and_reports_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("causeway.yaml");
        std::fs::write(&path, default_yaml(&"berlin".parse().unwrap())).unwrap();
        assert_eq!(Config::load(&path).unwrap().site, "berlin");

        std::fs::write(&path, "site: a\nbogus: 1\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains("bogus") && e.contains("line 2"), "{e}");

        std::fs::write(&path, "site: ${CAUSEWAY_TEST_SURELY_UNSET_VAR}\n").unwrap();
        match Config::load(&path) {
            Err(ConfigError::UnsetVar { origin, var, line }) => {
                assert_eq!(origin, path.display().to_string());
                assert_eq!(var, "CAUSEWAY_TEST_SURELY_UNSET_VAR");
                assert_eq!(line, 1);
            }
            other => panic!("unexpected {other:?}"),
        }

        let missing = dir.path().join("missing.yaml");
        assert!(matches!(Config::load(&missing), Err(ConfigError::Io { .. })));
    }
}
