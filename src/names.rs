//! Names and small value types that sit below every other module: the DNS-1123 label that
//! names sites, namespaces, services, ports and endpoints ([`Label`]), the transport of an
//! exported port ([`Protocol`]), an exported port itself ([`PortSpec`]), and the stable hash
//! ([`fnv1a`]) that turns a name into a VIP block or a socket file name. The configuration
//! parser, the wire decoders (catalog adverts, flow headers), the token parser and the state
//! directory all take these from here, so none of them reaches into another's module for a
//! name rule, and the rule and its error message exist once.
//!
//! The serde impls here check a value while serde_yaml is still visiting it, so a bad value in
//! `causeway.yaml` is reported with its key path and line (see [`Label`]'s `Deserialize`).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// What a DNS-1123 label is, for error messages (RFC 1123 §2.1 host name labels, as
/// Kubernetes restricts them: lowercase only, at most 63 characters as in RFC 1035 §2.3.4).
pub const LABEL_RULE: &str = "a DNS-1123 label is 1-63 characters of lowercase letters, digits and '-', \
     starting and ending with a letter or digit (e.g. `london`, `etcd-0`)";

/// Whether `s` is a DNS-1123 label: 1 to 63 characters of `a-z`, `0-9` and `-`, starting
/// and ending with a letter or digit ([`LABEL_RULE`]).
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

/// A string that is not a DNS-1123 label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid name: {rule}", rule = LABEL_RULE)]
pub struct LabelError {
    /// The refused text, as given.
    pub value: String,
}

/// A DNS-1123 label ([`LABEL_RULE`]): a site id, a namespace, a service, port or endpoint
/// name. Holding one means the check has passed, so it can go into a DNS name, a TLS server
/// name or a file name as is. It reads as a `&str` (`Deref`, `AsRef`, comparisons with
/// strings) and serializes as a plain string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    /// Checks `s` and wraps it.
    pub fn new(s: impl Into<String>) -> Result<Label, LabelError> {
        let s = s.into();
        if is_dns_label(&s) {
            Ok(Label(s))
        } else {
            Err(LabelError { value: s })
        }
    }

    /// The label's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The label's text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for Label {
    type Error = LabelError;

    fn try_from(s: String) -> Result<Label, LabelError> {
        Label::new(s)
    }
}

impl TryFrom<&str> for Label {
    type Error = LabelError;

    fn try_from(s: &str) -> Result<Label, LabelError> {
        Label::new(s)
    }
}

impl FromStr for Label {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Label, LabelError> {
        Label::new(s)
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl Deref for Label {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Label {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Label {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl PartialEq<str> for Label {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Label {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Label {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<Label> for str {
    fn eq(&self, other: &Label) -> bool {
        self == other.0
    }
}

impl PartialEq<Label> for &str {
    fn eq(&self, other: &Label) -> bool {
        *self == other.0
    }
}

impl PartialEq<Label> for String {
    fn eq(&self, other: &Label) -> bool {
        *self == other.0
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Checks the text inside the deserializer's visit of the scalar rather than after it, which
/// is what `#[serde(try_from = "String")]` would do: serde_yaml attaches the key path and line
/// only to errors raised while it visits a value, and an error from a `try_from` conversion
/// comes back after that visit, so it is reported against the enclosing mapping (its path
/// and first line, and no line at all at the top level) instead of the key.
impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Label, D::Error> {
        struct LabelVisitor;

        impl Visitor<'_> for LabelVisitor {
            type Value = Label;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a DNS-1123 label")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Label, E> {
                Label::new(v).map_err(E::custom)
            }
        }

        d.deserialize_str(LabelVisitor)
    }
}

/// `deserialize_with` for a `String` field that must hold a DNS-1123 label: the same check
/// and error position as [`Label`]'s own `Deserialize`, for fields that stay `String`s
/// because they flow on into types that are not held to the rule (peers' adverts).
pub fn de_label_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Label::deserialize(d).map(String::from)
}

/// A protocol name this agent does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a protocol: expected TCP or UDP")]
pub struct UnknownProtocol(pub String);

/// Transport of an exported port, written `TCP` or `UDP` (as in Kubernetes' `ServicePort`)
/// in the configuration, adverts and output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Protocol {
    /// Streams, forwarded flow by flow over QUIC streams.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// Datagrams, forwarded over QUIC datagrams.
    #[serde(rename = "UDP")]
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Exactly `TCP` or `UDP`, the spelling [`Protocol`]'s `Display` and serde use.
impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Protocol, UnknownProtocol> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(UnknownProtocol(other.to_owned())),
        }
    }
}

/// One exported port: as the configuration lists it (`exports[].ports[]`, strictly: unknown
/// keys are errors) and as the catalog holds it once a peer's advert was read (through
/// [`crate::catalog::PortAd`], the lenient wire form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Port name, unique within the export, so SRV records (`_<name>._tcp…`) and logs can
    /// name the port; a DNS-1123 label when read from the configuration. A `String`, not a
    /// [`Label`], because ports in peers' adverts are taken as they come.
    #[serde(deserialize_with = "de_label_string")]
    pub name: String,
    /// Port number (1-65535), the same on the endpoints and on the VIPs.
    #[serde(deserialize_with = "de_port")]
    pub port: u16,
    /// Transport forwarded on this port; TCP unless said otherwise.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Checks a port number: 1-65535 (0 asks the OS for any port, which no export can mean).
fn check_port(n: i128) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{n} is not a port: must be 1-65535"))
}

/// `deserialize_with` for a port number, checked inside the visit of the integer so the error
/// keeps its key path and line (as for [`Label`]).
fn de_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    struct PortVisitor;

    impl Visitor<'_> for PortVisitor {
        type Value = u16;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port number 1-65535")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
            check_port(i128::from(v)).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
            check_port(i128::from(v)).map_err(E::custom)
        }
    }

    d.deserialize_u64(PortVisitor)
}

/// FNV-1a, 64 bit (Fowler–Noll–Vo; offset basis 0xcbf29ce484222325, prime 0x100000001b3): a
/// hash whose value never changes between builds, versions or machines, unlike std's
/// `DefaultHasher`. It picks a site's default VIP block and an endpoint's first VIP candidate
/// (so they must agree across sites and releases) and names the admin socket outside the
/// state directory. Not for anything an adversary chooses to collide.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "london", "etcd-0", "0", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "London", "a_b", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn label_type_checks_and_reads_as_a_string() {
        let l: Label = "etcd-0".parse().unwrap();
        assert_eq!(l, "etcd-0");
        assert_eq!("etcd-0", l);
        assert_eq!(l.to_string(), "etcd-0");
        assert_eq!(format!("{l:?}"), "\"etcd-0\"");
        assert_eq!(l.len(), 6);
        assert_eq!(String::from(l.clone()), "etcd-0".to_owned());
        assert_eq!(Label::try_from("London").unwrap_err().value, "London");
        let e = Label::new("a_b").unwrap_err().to_string();
        assert_eq!(e, format!("`a_b` is not a valid name: {LABEL_RULE}"));
        assert_eq!(serde_json::to_string(&l).unwrap(), "\"etcd-0\"");
        assert_eq!(serde_json::from_str::<Label>("\"etcd-0\"").unwrap(), l);
        let e = serde_json::from_str::<Label>("\"Etcd\"").unwrap_err().to_string();
        assert!(e.contains("`Etcd` is not a valid name"), "{e}");
    }

    #[test]
    fn label_errors_keep_key_and_line() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Doc {
            a: Label,
            b: Option<Label>,
        }
        let e = serde_yaml::from_str::<Doc>("a: x\nb: Bad_1\n").unwrap_err().to_string();
        assert!(
            e.starts_with("b: `Bad_1` is not a valid name") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn protocol_spellings() {
        assert_eq!("TCP".parse::<Protocol>(), Ok(Protocol::Tcp));
        assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
        assert_eq!("udp".parse::<Protocol>(), Err(UnknownProtocol("udp".into())));
        assert_eq!(Protocol::Udp.to_string(), "UDP");
        assert_eq!(Protocol::Tcp.to_string(), "TCP");
    }

    #[test]
    fn fnv1a_is_the_reference_function() {
        // Test vectors of the FNV reference (draft-eastlake-fnv, FNV-1a 64).
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
    }
}
