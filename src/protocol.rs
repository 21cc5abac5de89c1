//! The wire protocol between agents, above QUIC.
//!
//! One UDP port carries two purposes, told apart by ALPN: `causeway-redeem/1` connections
//! redeem a token once, and `causeway-link/1` connections are the long-lived links. On both,
//! the dialer opens one bidirectional *control stream* and the parties exchange frames on it:
//! a 4-byte big-endian length followed by that many bytes of JSON. JSON keeps the control
//! plane debuggable; the data plane (flows) never goes through this framing. A frame larger
//! than [`MAX_FRAME`] is a protocol error, so a peer cannot make us buffer without bound.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN of a token redemption connection.
pub const ALPN_REDEEM: &[u8] = b"causeway-redeem/1";
/// ALPN of a link connection.
pub const ALPN_LINK: &[u8] = b"causeway-link/1";
/// ALPN of a link's extra lane (`links.lanes`): its own, so that an agent that predates lanes
/// refuses one in the handshake instead of taking it for the link's connection.
pub const ALPN_LANE: &[u8] = b"causeway-lane/1";
/// Newest link protocol version this agent speaks (`Hello.version`); bumped on an
/// incompatible change. Additive changes (a new field, a new message type) need no bump:
/// every decoder here ignores fields and message types it does not know.
pub const PROTOCOL_VERSION: u32 = 1;
/// Oldest link protocol version this agent still speaks (`Hello.min_version`).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The version two agents use: the newest both speak. `theirs` is the peer's newest and
/// `their_min` its oldest (absent from agents older than version ranges: then the same as
/// `theirs`). Errors say which side must be upgraded, for the `Reject` message.
pub fn negotiate(theirs: u32, their_min: Option<u32>) -> Result<u32, String> {
    let their_min = their_min.unwrap_or(theirs).min(theirs);
    if theirs < MIN_PROTOCOL_VERSION {
        Err(format!(
            "the peer speaks link protocol versions {their_min}-{theirs}, this agent {MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}: \
             upgrade the peer's causeway"
        ))
    } else if their_min > PROTOCOL_VERSION {
        Err(format!(
            "the peer speaks link protocol versions {their_min}-{theirs}, this agent {MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}: \
             upgrade this agent's causeway"
        ))
    } else {
        Ok(theirs.min(PROTOCOL_VERSION))
    }
}
/// Largest control frame accepted.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// QUIC application close codes, so the other side can log why a connection ended.
pub mod close {
    /// Normal end (a finished redemption).
    pub const DONE: u32 = 0;
    /// The agent is shutting down; the dialer should reconnect with backoff.
    pub const SHUTDOWN: u32 = 1;
    /// The link was removed by `link remove` on the closing side.
    pub const REMOVED: u32 = 2;
    /// The hello was refused (untrusted, wrong site, incompatible settings).
    pub const REJECTED: u32 = 3;
    /// A newer connection of the same link replaced this one.
    pub const REPLACED: u32 = 4;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 5;

    /// Human words for a close code.
    pub fn describe(code: u64) -> &'static str {
        match code as u32 {
            DONE => "done",
            SHUTDOWN => "peer is shutting down",
            REMOVED => "peer removed this link",
            REJECTED => "peer rejected the link",
            REPLACED => "replaced by a newer connection",
            PROTOCOL => "protocol error",
            _ => "unknown reason",
        }
    }
}

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The redeemer's request on a redeem connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedeemRequest {
    /// The grant id from the token.
    pub grant: String,
    /// The token's one-time secret, proving possession of the token.
    pub secret: String,
    /// The redeemer's site id (must match its certificate).
    pub site: String,
    /// The redeemer's `vips.cidr`; the clusterset shares one range.
    pub vips_cidr: String,
    /// The redeemer's site CA (PEM): what the issuer will trust for this link.
    pub ca: String,
    /// The redeemer's agent certificate (PEM), signed by `ca`, naming `site`.
    pub cert: String,
    /// Hex ECDSA signature by `cert`'s key over this connection's TLS exporter
    /// ([`REDEEM_EXPORTER_LABEL`]): proves the key without sending it, bound to this
    /// connection so it cannot be replayed elsewhere.
    pub proof: String,
    /// The token's `mac`, which the issuer compares with the one it recorded at issue: a
    /// token whose fields were changed is refused even if its mac was recomputed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// TLS exporter label for the redeemer's proof of possession.
pub const REDEEM_EXPORTER_LABEL: &[u8] = b"EXPORTER-causeway-redeem-v1";

/// Why an issuer refused a redemption. Each says exactly what was wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    #[error("unknown grant: the issuer has no record of this token (issued by another agent, or its state was reset)")]
    UnknownGrant,
    #[error("wrong secret: the token's secret does not match the grant (the token was altered)")]
    WrongSecret,
    #[error(
        "token tampered with: it differs from the token this site issued for that grant; ask the issuer for a new token"
    )]
    Tampered,
    #[error("token expired at {at}")]
    Expired { at: String },
    #[error("token used up: all {uses} use(s) were already redeemed")]
    UsedUp { uses: u32 },
    #[error("token revoked at {at} by the issuing site (`causeway token revoke`)")]
    Revoked { at: String },
    #[error("the redeemer's certificate is for site {cert:?} but it claimed {claimed:?}")]
    SiteMismatch { cert: String, claimed: String },
    #[error("the redeemer's certificate is not signed by the CA it presented")]
    BadCertificate,
    #[error("the redeemer could not prove it holds its certificate's key")]
    BadProof,
    #[error("a site cannot link to itself ({site})")]
    SameSite { site: String },
    #[error(
        "vips.cidr differs: issuer uses {issuer}, redeemer uses {redeemer}; every site of a clusterset must use the same range"
    )]
    VipsMismatch { issuer: String, redeemer: String },
    /// One link per pair of sites: the issuer already has a link with the redeemer's site
    /// (in either direction), so a second one would only compete with it.
    #[error(
        "site {issuer} already has a link with site {peer} (named {link:?} there); one link per pair of \
         sites: to re-link, remove it on {issuer} first with: causeway link remove {link}"
    )]
    AlreadyLinked {
        /// The issuer's site id.
        issuer: String,
        /// The redeemer's site id.
        peer: String,
        /// The issuer's name for its existing link.
        link: String,
    },
    /// The issuer is itself redeeming a token of the redeemer's site right now; linking both
    /// ways at once would make two links.
    #[error(
        "site {issuer} is redeeming a token of site {peer} at this moment; one link per pair of sites: \
         let that redemption finish (the link it makes carries traffic both ways)"
    )]
    LinkInProgress { issuer: String, peer: String },
    #[error("issuer failed: {message}")]
    Internal { message: String },
    /// A reason this agent does not know (a newer issuer's).
    #[error(
        "the issuer refused the token for a reason this version of causeway does not know; its log says \
         why (or upgrade this agent to see it here)"
    )]
    #[serde(other)]
    Unrecognised,
}

/// The issuer's answer on a redeem connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RedeemResponse {
    Accepted { site: String },
    Rejected(Rejection),
}

/// Messages on a link's control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// First frame from the dialer.
    Hello {
        /// The newest protocol version the dialer speaks.
        version: u32,
        /// The oldest it speaks; absent from agents that speak one version only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_version: Option<u32>,
        site: String,
        vips_cidr: String,
        /// The link's cost (`token redeem --cost`), which both ends advertise.
        #[serde(default = "default_cost")]
        cost: u32,
        /// Which of the dialer's links this is (its name and creation time): the same for
        /// every reconnection of one link, different for another link of the same site. The
        /// acceptor lets a reconnection replace a live connection (the dialer restarted) but
        /// refuses a *different* link while one is live, so two links can never take turns
        /// replacing each other. Absent from older dialers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        link: Option<String>,
        /// On a link's first connection: how many lanes (parallel QUIC connections,
        /// `links.lanes`) the dialer would open. Absent from dialers without lanes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lanes: Option<u8>,
        /// On an extra lane's connection: its index, from 1 ([`agree_lanes`] minus one at
        /// most). Absent on a link's first connection, which is lane 0 and carries the
        /// control stream.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lane: Option<u8>,
    },
    /// The acceptor's yes: the link is up from here on.
    Welcome {
        site: String,
        /// The protocol version both use ([`negotiate`]); absent from older acceptors,
        /// which speak version 1 only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        /// On a link's first connection: how many lanes both ends use ([`agree_lanes`]).
        /// Absent from acceptors without lanes, and for sidecars: then the link keeps one
        /// connection, so a dialer never opens a lane an acceptor would take for a
        /// reconnection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lanes: Option<u8>,
    },
    /// The acceptor's no, with the reason; the connection is then closed.
    Reject { message: String },
    /// A site's advertisement (exports, VIP block, links), flooded over every link.
    Advert(Box<crate::catalog::Advert>),
    /// A sidecar's pod exports, sent to its gateway, which assigns their VIPs.
    MemberExports { services: Vec<crate::catalog::ServiceAd> },
    /// A message type this agent does not know (a newer peer's): ignored, so an additive
    /// change never ends a link.
    #[serde(other)]
    Unknown,
}

fn default_cost() -> u32 {
    1
}

/// The lanes a link uses: the fewer of what the dialer offered (`Hello.lanes`; one when
/// absent) and what the acceptor is configured for (`ours`), at least one.
pub fn agree_lanes(offered: Option<u8>, ours: u8) -> u8 {
    offered.unwrap_or(1).min(ours).max(1)
}

/// Encodes one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let malformed = |e: serde_json::Error| ProtocolError::Malformed(e.to_string());
    let mut out = Vec::new();
    if newer_peer::enabled() {
        let value = serde_json::to_value(msg).map_err(malformed)?;
        for frame in newer_peer::frames(value) {
            append_frame(&mut out, &serde_json::to_vec(&frame).map_err(malformed)?)?;
        }
        return Ok(out);
    }
    append_frame(&mut out, &serde_json::to_vec(msg).map_err(malformed)?)?;
    Ok(out)
}

fn append_frame(out: &mut Vec<u8>, body: &[u8]) -> Result<(), ProtocolError> {
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    out.reserve(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// A test hook: with `CAUSEWAY_TEST_NEWER_PEER=1` in its environment an agent writes its
/// control frames as a *newer* version of causeway would, so an end-to-end test can check
/// that this version links with it (tests/links.rs). Its hello offers the next protocol
/// version (still speaking this one); every object in its frames carries a field this
/// version does not know; its adverts add a port of an unknown protocol and are followed by
/// a message of an unknown type. Off unless the variable is set; never set in production.
#[doc(hidden)]
pub mod newer_peer {
    use serde_json::{Value, json};

    /// Whether the hook is on (read once).
    pub fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("CAUSEWAY_TEST_NEWER_PEER").is_some_and(|v| v == "1"))
    }

    /// The frames a newer agent would send for `msg`.
    pub fn frames(mut msg: Value) -> Vec<Value> {
        let kind = msg.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
        if kind == "hello" {
            msg["version"] = json!(super::PROTOCOL_VERSION + 1);
            msg["min_version"] = json!(super::PROTOCOL_VERSION);
        }
        if let Some(services) = msg.get_mut("services").and_then(Value::as_array_mut) {
            for s in services {
                if let Some(ports) = s.get_mut("ports").and_then(Value::as_array_mut) {
                    ports.push(json!({"name": "future", "port": 9, "protocol": "SCTP"}));
                }
            }
        }
        add_fields(&mut msg);
        let mut out = vec![msg];
        if kind == "advert" || kind == "member_exports" {
            out.push(json!({"type": "future_message", "detail": {"lanes": 8}}));
        }
        out
    }

    /// Adds an unknown field to every object in `v`.
    fn add_fields(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    // `links` is a map of site to cost, not a record: nothing to add there.
                    if key != "links" {
                        add_fields(child);
                    }
                }
                map.insert("future_field".into(), json!({"from": "a newer causeway"}));
            }
            Value::Array(items) => items.iter_mut().for_each(add_fields),
            _ => {}
        }
    }
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame; `Closed` on a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let hello = Control::Hello {
            version: 1,
            min_version: Some(1),
            site: "paris".into(),
            vips_cidr: "127.77.0.0/16".into(),
            cost: 3,
            link: Some("london@2024-01-01T00:00:00Z".into()),
            lanes: Some(4),
            lane: None,
        };
        write_frame(&mut a, &hello).await.unwrap();
        write_frame(&mut a, &RedeemResponse::Rejected(Rejection::UsedUp { uses: 1 }))
            .await
            .unwrap();
        drop(a);
        let got: Control = read_frame(&mut b).await.unwrap();
        assert_eq!(got, hello);
        let got: RedeemResponse = read_frame(&mut b).await.unwrap();
        assert_eq!(got, RedeemResponse::Rejected(Rejection::UsedUp { uses: 1 }));
        assert!(matches!(
            read_frame::<_, Control>(&mut b).await,
            Err(ProtocolError::Closed)
        ));
    }

    /// Issue 18 (1): a newer peer's additions never fail a frame. Extra fields anywhere,
    /// an unknown message type, an unknown rejection reason and a port of an unknown
    /// protocol are all read; the advert keeps everything this version understands.
    #[test]
    fn frames_from_a_newer_peer_decode() {
        let hello = br#"{"type":"hello","version":7,"min_version":1,"site":"paris","vips_cidr":"127.77.0.0/16",
            "cost":2,"link":"paris@x","lanes":4,"future":{"a":1}}"#;
        let Control::Hello {
            version, min_version, ..
        } = serde_json::from_slice(hello).unwrap()
        else {
            panic!("not a hello")
        };
        assert_eq!(negotiate(version, min_version), Ok(1));
        let advert = br#"{"type":"advert","origin":"paris","seq":5,"block":3,"links":{"london":1},"signature":"x",
            "services":[{"service":"etcd","namespace":"default","app":"grid",
              "ports":[{"name":"client","port":2379,"protocol":"TCP","app_protocol":"h2"},
                       {"name":"sig","port":9,"protocol":"SCTP"}],
              "endpoints":[{"hostname":"etcd-0","ip":"10.1.0.1","ready":true,"vip":"127.77.3.9","zone":"a"}]}]}"#;
        let Control::Advert(ad) = serde_json::from_slice(advert).unwrap() else {
            panic!("not an advert")
        };
        let ports: Vec<_> = ad.services[0]
            .ports
            .iter()
            .filter_map(crate::catalog::PortAd::spec)
            .collect();
        assert_eq!(ports.len(), 1, "the SCTP port is skipped, the TCP one kept");
        assert_eq!(ports[0].port, 2379);
        assert_eq!(ad.services[0].endpoints[0].hostname, "etcd-0");
        let unknown: Control = serde_json::from_slice(br#"{"type":"lane_offer","lanes":8}"#).unwrap();
        assert_eq!(unknown, Control::Unknown);
        let welcome: Control =
            serde_json::from_slice(br#"{"type":"welcome","site":"london","version":1,"x":2}"#).unwrap();
        assert_eq!(
            welcome,
            Control::Welcome {
                site: "london".into(),
                version: Some(1),
                lanes: None,
            }
        );
        let r: RedeemResponse =
            serde_json::from_slice(br#"{"type":"rejected","reason":"quota_exceeded","limit":3}"#).unwrap();
        assert_eq!(r, RedeemResponse::Rejected(Rejection::Unrecognised));
    }

    #[test]
    fn lanes_are_agreed_to_the_fewer_and_absent_fields_mean_one_connection() {
        assert_eq!(agree_lanes(None, 8), 1, "a dialer without lanes");
        assert_eq!(agree_lanes(Some(8), 2), 2);
        assert_eq!(agree_lanes(Some(2), 8), 2);
        assert_eq!(agree_lanes(Some(0), 4), 1, "never fewer than one");
        // An older acceptor's welcome has no `lanes`: the dialer keeps one connection.
        let old: Control = serde_json::from_slice(br#"{"type":"welcome","site":"london","version":1}"#).unwrap();
        assert!(matches!(old, Control::Welcome { lanes: None, .. }));
        // A first connection's hello names no lane; a lane's hello names its index.
        let hello = |lane| Control::Hello {
            version: 1,
            min_version: Some(1),
            site: "paris".into(),
            vips_cidr: "127.77.0.0/16".into(),
            cost: 1,
            link: Some("london@x".into()),
            lanes: Some(4),
            lane,
        };
        let first = serde_json::to_string(&hello(None)).unwrap();
        assert!(
            first.contains(r#""lanes":4"#) && !first.contains(r#""lane":"#),
            "{first}"
        );
        let third = serde_json::to_string(&hello(Some(2))).unwrap();
        assert!(third.contains(r#""lane":2"#), "{third}");
    }

    #[test]
    fn versions_are_negotiated_to_the_newest_both_speak() {
        assert_eq!(negotiate(1, None), Ok(1), "an agent from before version ranges");
        assert_eq!(negotiate(1, Some(1)), Ok(1));
        assert_eq!(
            negotiate(9, Some(1)),
            Ok(PROTOCOL_VERSION),
            "a newer peer that still speaks ours"
        );
        let newer_only = negotiate(9, Some(PROTOCOL_VERSION + 1)).unwrap_err();
        assert!(newer_only.contains("upgrade this agent"), "{newer_only}");
        let older = negotiate(0, None).unwrap_err();
        assert!(older.contains("upgrade the peer"), "{older}");
        // A confused range (min above max) is read as the max alone.
        assert_eq!(negotiate(1, Some(5)), Ok(1));
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame::<_, Control>(&mut b).await,
            Err(ProtocolError::TooLarge(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{x}").await.unwrap();
        assert!(matches!(
            read_frame::<_, Control>(&mut b).await,
            Err(ProtocolError::Malformed(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{").await.unwrap();
        drop(a);
        assert!(read_frame::<_, Control>(&mut b).await.is_err());
    }

    #[test]
    fn rejections_say_what_was_wrong() {
        let r = Rejection::Expired {
            at: "2026-01-01T00:00:00Z".into(),
        };
        assert_eq!(r.to_string(), "token expired at 2026-01-01T00:00:00Z");
        let json = serde_json::to_string(&RedeemResponse::Rejected(Rejection::WrongSecret)).unwrap();
        assert!(json.contains("wrong_secret"), "{json}");
    }
}
