//! The admin API's messages: every request the CLI sends the agent and the reply each one
//! gets, as types both sides share (the agent serializes them, the CLI deserializes and
//! prints them), so no side reads fields out of untyped JSON.
//!
//! On the socket a request is one JSON object tagged by `op` (`{"op":"token_issue","uses":1,
//! "expires_secs":900}`); the reply's data is the reply type as JSON. Those replies are also
//! what `-o json|yaml` prints, so their shapes are a contract (docs/REFERENCE.md, "Machine-
//! readable output"): field names, nesting, and `null` versus absent must not change.
//! Each request type names its reply through [`Call`], which [`super::call`] returns.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::catalog::ServiceView;
use crate::config::VipMode;
use crate::dns::DnsStatus;
use crate::forward::InterceptStatus;
use crate::link::{LinkState, LinkStatus};
use crate::names::Label;
use crate::rlimit::OpenFiles;
use crate::role::Role;
use crate::routing::Route;
use crate::state::rfc3339;
use crate::token::GrantView;

/// How long the CLI waits for a connection and an answer to most requests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the CLI waits for `token redeem`: dialing the issuer (3 s), riding out its
/// refusals (5 s), the exchange (10 s) and waiting for the link to come up (10 s).
pub const REDEEM_TIMEOUT: Duration = Duration::from_secs(40);

/// One request from the CLI, as it travels: tagged by `op`, its fields beside the tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `token issue`.
    TokenIssue(TokenIssue),
    /// `token redeem`.
    TokenRedeem(TokenRedeem),
    /// `token list`.
    TokenList(TokenList),
    /// `token revoke`.
    TokenRevoke(TokenRevoke),
    /// `link list`.
    LinkList(LinkList),
    /// `link remove`.
    LinkRemove(LinkRemove),
    /// `status`.
    Status(Status),
    /// `service list`.
    ServiceList(ServiceList),
}

impl Request {
    /// How long the CLI waits for the answer: every request is quick except a redemption,
    /// which talks to another site.
    pub fn timeout(&self) -> Duration {
        match self {
            Request::TokenRedeem(_) => REDEEM_TIMEOUT,
            _ => CALL_TIMEOUT,
        }
    }
}

/// A request that knows its reply: what [`super::call`] sends and what it returns.
pub trait Call: Into<Request> {
    /// The data of a successful answer.
    type Reply: Serialize + DeserializeOwned;
}

/// Ties each request struct to its [`Request`] variant and its reply type.
macro_rules! calls {
    ($($request:ident => $reply:ty),* $(,)?) => {
        $(
            impl From<$request> for Request {
                fn from(r: $request) -> Request {
                    Request::$request(r)
                }
            }
            impl Call for $request {
                type Reply = $reply;
            }
        )*
    };
}

calls! {
    TokenIssue => TokenIssued,
    TokenRedeem => Redeemed,
    TokenList => Vec<GrantView>,
    TokenRevoke => GrantView,
    LinkList => Vec<LinkStatus>,
    LinkRemove => LinkRemoved,
    Status => AgentStatus,
    ServiceList => Vec<ServiceView>,
}

/// `token issue`: record a grant and return its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIssue {
    /// How many sites may redeem it (1 to [`crate::token::MAX_USES`]).
    pub uses: u32,
    /// How long it stays valid, in seconds (1 s to [`crate::token::MAX_TTL`]).
    pub expires_secs: u64,
}

/// `token redeem`: redeem a token of another site and record the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRedeem {
    /// The token file's text.
    pub token: String,
    /// The local link name (`None`: the issuer's site id). A DNS-1123 label: a request naming
    /// anything else is refused as malformed before it reaches the handler.
    pub name: Option<Label>,
    /// The link's routing cost (at least 1).
    pub cost: u32,
}

/// `token list`: the grants this site issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {}

/// `token revoke`: revoke a grant this site issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevoke {
    /// A grant id, or a unique prefix of one (hex).
    pub grant: String,
}

/// `link list`: every recorded link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkList {}

/// `link remove`: drop a link and its peer's trust.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRemove {
    /// The local link name (a DNS-1123 label: a request naming anything else is refused as
    /// malformed).
    pub name: Label,
}

/// `status`: the agent in one view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {}

/// `service list`: the services of the clusterset, as served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceList {}

/// The answer to [`TokenIssue`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenIssued {
    /// The token file's text (YAML; a secret).
    pub token: String,
    /// The grant id (32 hex digits), as `token list` shows it.
    pub grant: String,
    /// When the token stops being redeemable (RFC 3339 in JSON).
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    /// How many sites may redeem it.
    pub uses: u32,
}

/// The answer to [`TokenRedeem`]: the new link, as it stands once up or after waiting for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redeemed {
    /// The local link name.
    pub name: String,
    /// The issuer's site id (verified).
    pub peer_site: String,
    /// The issuer's address the redemption reached.
    pub addr: SocketAddr,
    /// The link's state when the answer was sent (`connecting` if it is not recorded yet).
    pub state: LinkState,
    /// Why the last attempt failed, while not up (`null` otherwise).
    pub last_error: Option<String>,
}

/// The answer to [`LinkRemove`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRemoved {
    /// The link removed.
    pub name: String,
    /// The site it led to, whose trust is revoked.
    pub peer_site: String,
}

/// The answer to [`Status`]: `causeway status -o json` (its fields are described in
/// docs/REFERENCE.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The site id.
    pub site: String,
    /// Whether this agent is its site's gateway or a sidecar.
    pub mode: Role,
    /// The bound QUIC address.
    pub listen: SocketAddr,
    /// The addresses tokens carry (`host:port`).
    pub advertise: Vec<String>,
    /// The state directory, as given.
    pub state_dir: String,
    /// When the agent started (RFC 3339 in JSON).
    #[serde(with = "rfc3339")]
    pub started: SystemTime,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Whether it has a catalogue to answer from (as `/readyz`).
    pub ready: bool,
    /// Why it is (or is not) ready, in words.
    pub ready_reason: String,
    /// Every recorded link, as `link list`.
    pub links: Vec<LinkStatus>,
    /// The VIP range and how VIP traffic arrives.
    pub vips: VipsStatus,
    /// The route to every reachable site but this one, by site id.
    pub routes: BTreeMap<String, Route>,
    /// The catalog's latest view, as `service list` (which may lag until its listeners are
    /// in place).
    pub services: Vec<ServiceView>,
    /// VIP block collisions, in words.
    pub conflicts: Vec<String>,
    /// VIP listeners that could not be bound: `"<vip>:<port>/<TCP|UDP>"` → the error.
    pub listener_errors: BTreeMap<String, String>,
    /// The open-files limit (`null`: it could not be read).
    pub open_files: Option<OpenFiles>,
    /// The last change to the configuration file picked up while running (`null`: none).
    pub config_reload: Option<ReloadStatus>,
    /// On a gateway, its connected sidecars: link name → address.
    pub sidecars: BTreeMap<String, SocketAddr>,
    /// The `clusterset.local` DNS responder.
    pub dns: DnsStatus,
    /// Counts at a glance.
    pub counters: Counters,
}

/// `vips` in [`AgentStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipsStatus {
    /// The VIP range (`vips.cidr`).
    pub cidr: ipnet::IpNet,
    /// This site's VIP block (0–255).
    pub block: u32,
    /// How VIP traffic reaches the agent.
    pub mode: VipMode,
    /// In intercept mode, the intercept port and whether the rule is in place (`null` in
    /// listen mode).
    pub intercept: Option<InterceptStatus>,
}

/// `counters` in [`AgentStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Links recorded.
    pub links_total: usize,
    /// Links up.
    pub links_up: usize,
    /// Grants that may still be redeemed.
    pub grants_open: usize,
    /// Services in the catalog.
    pub services: usize,
    /// Endpoints in the catalog marked ready.
    pub endpoints_ready: usize,
    /// VIP listeners running.
    pub listeners: usize,
}

impl Counters {
    /// The counters as `name=value` words in the order of their names, as the `status`
    /// table shows them.
    pub fn words(&self) -> String {
        [
            ("endpoints_ready", self.endpoints_ready),
            ("grants_open", self.grants_open),
            ("links_total", self.links_total),
            ("links_up", self.links_up),
            ("listeners", self.listeners),
            ("services", self.services),
        ]
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// The outcome of the last change to causeway.yaml picked up while running
/// (`config_reload` in [`AgentStatus`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// When it was read (RFC 3339 in JSON).
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// Whether it was applied (else the previous configuration stays in force).
    pub applied: bool,
    /// Why it was rejected (`null` when applied).
    pub error: Option<String>,
    /// Changed keys the running agent keeps until restarted.
    pub restart_needed: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_json() {
        let r = Request::from(TokenIssue {
            uses: 2,
            expires_secs: 900,
        });
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"token_issue","uses":2,"expires_secs":900}"#
        );
        let back: Request = serde_json::from_str(r#"{"op":"link_remove","name":"paris"}"#).unwrap();
        assert_eq!(
            back,
            Request::from(LinkRemove {
                name: Label::new("paris").unwrap()
            })
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        // Requests without fields are the tag alone.
        for (r, json) in [
            (Request::from(Status {}), r#"{"op":"status"}"#),
            (Request::from(TokenList {}), r#"{"op":"token_list"}"#),
            (Request::from(LinkList {}), r#"{"op":"link_list"}"#),
            (Request::from(ServiceList {}), r#"{"op":"service_list"}"#),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), r);
        }
        let redeem: Request =
            serde_json::from_str(r#"{"op":"token_redeem","token":"t","name":null,"cost":1}"#).unwrap();
        assert_eq!(
            redeem,
            Request::from(TokenRedeem {
                token: "t".into(),
                name: None,
                cost: 1
            })
        );
    }

    #[test]
    fn a_link_name_that_is_no_label_is_refused_as_the_request_is_read() {
        for json in [
            r#"{"op":"link_remove","name":"Paris"}"#,
            r#"{"op":"link_remove","name":"../etc"}"#,
            r#"{"op":"token_redeem","token":"t","name":"-x","cost":1}"#,
        ] {
            let err = serde_json::from_str::<Request>(json).unwrap_err().to_string();
            assert!(
                err.contains("is not a valid name") && err.contains("DNS-1123"),
                "{json}: {err}"
            );
        }
        // A valid name travels as the same plain string.
        let r = Request::from(TokenRedeem {
            token: "t".into(),
            name: Some(Label::new("paris-2").unwrap()),
            cost: 3,
        });
        let json = r#"{"op":"token_redeem","token":"t","name":"paris-2","cost":3}"#;
        assert_eq!(serde_json::to_string(&r).unwrap(), json);
        assert_eq!(serde_json::from_str::<Request>(json).unwrap(), r);
    }

    #[test]
    fn only_a_redemption_waits_long() {
        assert_eq!(Request::from(Status {}).timeout(), CALL_TIMEOUT);
        let redeem = Request::from(TokenRedeem {
            token: String::new(),
            name: None,
            cost: 1,
        });
        assert!(redeem.timeout() > Duration::from_secs(30));
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A status with every optional part present, and its JSON as docs/REFERENCE.md has it.
    fn full_status() -> (AgentStatus, serde_json::Value) {
        let status = AgentStatus {
            site: "london".into(),
            mode: Role::Gateway,
            listen: "127.0.0.1:7400".parse().unwrap(),
            advertise: vec!["127.0.0.1:7400".into()],
            state_dir: "/var/lib/causeway".into(),
            started: at(1_800_000_000),
            uptime_secs: 42,
            ready: true,
            ready_reason: "catalogue from link paris".into(),
            links: vec![LinkStatus {
                name: "paris".into(),
                peer_site: "paris".into(),
                state: LinkState::Up,
                rtt_ms: Some(1.25),
                cost: 3,
                since: "2027-01-15T08:00:00Z".into(),
                role: crate::link::Role::Dialer,
                remote: Some("127.0.0.1:7401".into()),
                last_error: None,
                lanes: Some(2),
            }],
            vips: VipsStatus {
                cidr: "127.77.0.0/16".parse().unwrap(),
                block: 95,
                mode: VipMode::Intercept,
                intercept: Some(InterceptStatus {
                    port: 15001,
                    redirected: true,
                    udp: crate::forward::UdpInterception::Listeners,
                }),
            },
            routes: BTreeMap::from([(
                "paris".to_string(),
                Route {
                    next_hop: "paris".into(),
                    cost: 3,
                    hops: 1,
                },
            )]),
            services: Vec::new(),
            conflicts: vec!["block 95 of london and paris".into()],
            listener_errors: BTreeMap::from([("127.77.95.1:2379/TCP".to_string(), "in use".to_string())]),
            open_files: Some(OpenFiles {
                soft: 20000,
                hard: 20000,
                raised_from: Some(1024),
            }),
            config_reload: Some(ReloadStatus {
                at: at(1_800_000_060),
                applied: true,
                error: None,
                restart_needed: vec!["listen".into()],
            }),
            sidecars: BTreeMap::from([("member-a".to_string(), "10.0.0.5:40000".parse().unwrap())]),
            dns: DnsStatus {
                zone: "clusterset.local".into(),
                listen: vec!["127.0.0.1:53".parse().unwrap()],
                errors: Vec::new(),
                upstream: vec!["10.96.0.10:53".parse().unwrap()],
                counters: crate::dns::DnsCounters {
                    queries: BTreeMap::from([("noerror".to_string(), 4), ("nxdomain".to_string(), 1)]),
                    truncated: 0,
                    forwarded: 2,
                    dropped: 0,
                },
            },
            counters: Counters {
                links_total: 1,
                links_up: 1,
                grants_open: 0,
                services: 0,
                endpoints_ready: 0,
                listeners: 4,
            },
        };
        let json = serde_json::json!({
            "site": "london",
            "mode": "gateway",
            "listen": "127.0.0.1:7400",
            "advertise": ["127.0.0.1:7400"],
            "state_dir": "/var/lib/causeway",
            "started": "2027-01-15T08:00:00Z",
            "uptime_secs": 42,
            "ready": true,
            "ready_reason": "catalogue from link paris",
            "links": [{
                "name": "paris", "peer_site": "paris", "state": "up", "rtt_ms": 1.25, "cost": 3,
                "since": "2027-01-15T08:00:00Z", "role": "dialer", "remote": "127.0.0.1:7401",
                "last_error": null, "lanes": 2,
            }],
            "vips": {
                "cidr": "127.77.0.0/16", "block": 95, "mode": "intercept",
                "intercept": {"port": 15001, "redirected": true, "udp": "listeners"},
            },
            "routes": {"paris": {"next_hop": "paris", "cost": 3, "hops": 1}},
            "services": [],
            "conflicts": ["block 95 of london and paris"],
            "listener_errors": {"127.77.95.1:2379/TCP": "in use"},
            "open_files": {"soft": 20000, "hard": 20000, "raised_from": 1024},
            "config_reload": {
                "at": "2027-01-15T08:01:00Z", "applied": true, "error": null,
                "restart_needed": ["listen"],
            },
            "sidecars": {"member-a": "10.0.0.5:40000"},
            "dns": {
                "zone": "clusterset.local", "listen": ["127.0.0.1:53"], "errors": [],
                "upstream": ["10.96.0.10:53"], "queries": {"noerror": 4, "nxdomain": 1},
                "truncated": 0, "forwarded": 2, "dropped": 0,
            },
            "counters": {
                "links_total": 1, "links_up": 1, "grants_open": 0, "services": 0,
                "endpoints_ready": 0, "listeners": 4,
            },
        });
        (status, json)
    }

    #[test]
    fn status_has_the_documented_shape_and_reads_back() {
        let (status, json) = full_status();
        assert_eq!(serde_json::to_value(&status).unwrap(), json);
        assert_eq!(serde_json::from_value::<AgentStatus>(json).unwrap(), status);
    }

    #[test]
    fn absent_parts_of_status_are_null() {
        let (mut status, _) = full_status();
        status.vips.mode = VipMode::Listen;
        status.vips.intercept = None;
        status.open_files = None;
        status.config_reload = None;
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["vips"]["intercept"], serde_json::Value::Null);
        assert_eq!(json["vips"]["mode"], "listen");
        for key in ["open_files", "config_reload"] {
            assert!(json.as_object().unwrap()[key].is_null(), "{key}: {json}");
        }
        assert_eq!(serde_json::from_value::<AgentStatus>(json).unwrap(), status);
    }

    #[test]
    fn counters_read_in_the_order_of_their_names() {
        let (status, _) = full_status();
        assert_eq!(
            status.counters.words(),
            "endpoints_ready=0 grants_open=0 links_total=1 links_up=1 listeners=4 services=0"
        );
    }

    #[test]
    fn replies_have_stable_json() {
        let issued = TokenIssued {
            token: "version: 1\n".into(),
            grant: "ab".repeat(16),
            expires: at(1_800_000_000),
            uses: 2,
        };
        let json = serde_json::json!({
            "token": "version: 1\n", "grant": "ab".repeat(16), "expires": "2027-01-15T08:00:00Z", "uses": 2,
        });
        assert_eq!(serde_json::to_value(&issued).unwrap(), json);
        assert_eq!(serde_json::from_value::<TokenIssued>(json).unwrap(), issued);

        let redeemed = Redeemed {
            name: "hub".into(),
            peer_site: "london".into(),
            addr: "[::1]:7400".parse().unwrap(),
            state: LinkState::Connecting,
            last_error: None,
        };
        let json = serde_json::json!({
            "name": "hub", "peer_site": "london", "addr": "[::1]:7400", "state": "connecting", "last_error": null,
        });
        assert_eq!(serde_json::to_value(&redeemed).unwrap(), json);
        assert_eq!(serde_json::from_value::<Redeemed>(json).unwrap(), redeemed);

        let removed = LinkRemoved {
            name: "hub".into(),
            peer_site: "london".into(),
        };
        assert_eq!(
            serde_json::to_value(&removed).unwrap(),
            serde_json::json!({"name": "hub", "peer_site": "london"})
        );
    }
}
