//! Checks that span more than one value, and the helpers that put a line number on errors
//! found after serde_yaml is done. Checks among the entries of one list (duplicate port
//! names or numbers, duplicate endpoint hostnames, an export without ports) run as each entry
//! is read ([`UniqueSeq`]), so serde_yaml reports the entry's key path and line; the checks
//! that need the whole file ([`check`]) run after the parse and find the line in the text.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::env::code_len;
use super::{Config, ConfigError, EndpointSpec, Export, PortSpec, VipMode};

/// The checks that span several values, run once the whole file has parsed: exports that
/// are the same once the default namespace is applied, intercept mode's needs, and the
/// order of the two link timeouts. Each error names the key and, where it can be found, the
/// line.
pub(super) fn check(config: &Config, text: &str, origin: &str) -> Result<(), ConfigError> {
    config.check_exports(text, origin)?;
    if config.vips.mode == VipMode::Intercept {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        if !config.vips.cidr.addr().is_ipv4() {
            return Err(invalid(
                "vips.mode",
                format!(
                    "intercept needs an IPv4 vips.cidr, not {}: use an IPv4 range (the default 127.77.0.0/16) or mode: listen",
                    config.vips.cidr
                ),
            ));
        }
        if config.vips.intercept_port == 0 {
            return Err(invalid(
                "vips.intercept_port",
                "0 is not a port the nftables rule can redirect to; pick a free one, e.g. 15001".into(),
            ));
        }
    }
    if config.links.idle_timeout < config.links.down_after {
        return Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            key: "links.idle_timeout".to_owned(),
            message: format!(
                "{} is shorter than links.down_after ({}): a link must count as down before its flows are given up",
                humantime::format_duration(config.links.idle_timeout),
                humantime::format_duration(config.links.down_after)
            ),
        });
    }
    Ok(())
}

impl Config {
    /// Rejects two exports of the same service in the same namespace once
    /// defaults are applied (exact repeats are caught while parsing).
    fn check_exports(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (i, e) in self.exports.iter().enumerate() {
            let id = (e.service.as_str(), self.export_namespace(e));
            if let Some(first) = seen.iter().position(|s| *s == id) {
                let nth = self.exports[..=i].iter().filter(|x| x.service == e.service).count();
                let mut message = format!(
                    "duplicate export of service `{}` in namespace `{}` (also exports[{first}])",
                    id.0, id.1
                );
                if let Some(line) = find_key_value_line(text, "service", &e.service, nth) {
                    message.push_str(&format!(" at line {line}"));
                }
                return Err(ConfigError::Invalid {
                    origin: origin.to_owned(),
                    key: format!("exports[{i}]"),
                    message,
                });
            }
            seen.push(id);
        }
        Ok(())
    }
}

/// One-based line of the `nth` (one-based) `key: value` pair in `text`,
/// block or flow style, value plain or quoted, comments ignored. A
/// best-effort locator for errors found after parsing.
pub(super) fn find_key_value_line(text: &str, key: &str, value: &str, nth: usize) -> Option<usize> {
    let mut count = 0;
    for (index, line) in text.lines().enumerate() {
        let code = &line[..code_len(line)];
        let mut from = 0;
        while let Some(at) = code[from..].find(key).map(|a| a + from) {
            from = at + key.len();
            let before_ok = code[..at]
                .chars()
                .next_back()
                .is_none_or(|c| c.is_whitespace() || "{,-".contains(c));
            let after = code[from..].trim_start();
            let Some(after) = after.strip_prefix(':') else {
                continue;
            };
            let after = after.trim_start();
            let after = after.strip_prefix(['"', '\'']).unwrap_or(after);
            let Some(after) = after.strip_prefix(value) else {
                continue;
            };
            let end_ok = after
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || ",}\"'".contains(c));
            if before_ok && end_ok {
                count += 1;
                if count == nth {
                    return Some(index + 1);
                }
            }
        }
    }
    None
}

/// Turns a serde_yaml error into [`ConfigError::Parse`], making sure the
/// message carries the line (serde_yaml leaves it out for line 1 column 1).
pub(super) fn yaml_error(origin: &str, err: &serde_yaml::Error) -> ConfigError {
    let mut message = err.to_string();
    if let Some(loc) = err.location() {
        if !message.contains(" at line ") {
            message.push_str(&format!(" at line {} column {}", loc.line(), loc.column()));
        }
    }
    ConfigError::Parse {
        origin: origin.to_owned(),
        message,
    }
}

/// Visits a sequence of mappings, deserializing each element as `T` and
/// running `check(keys seen so far, element)` inside the element's own visit
/// so an error gets the element's key path and line. `check` refuses an element
/// whose unique keys are already in the set, and adds them: one hash lookup per
/// element, so a list of thousands of endpoints is checked in linear time.
struct UniqueSeq<T> {
    expecting: &'static str,
    check: fn(&mut HashSet<String>, &T) -> Result<(), String>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for UniqueSeq<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list, each {}", self.expecting)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out: Vec<T> = Vec::new();
        let mut seen = HashSet::new();
        loop {
            let seed = UniqueElem {
                seen: &mut seen,
                expecting: self.expecting,
                check: self.check,
                marker: PhantomData,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => return Ok(out),
            }
        }
    }
}

/// One element of a [`UniqueSeq`].
struct UniqueElem<'a, T> {
    seen: &'a mut HashSet<String>,
    expecting: &'static str,
    check: fn(&mut HashSet<String>, &T) -> Result<(), String>,
    marker: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for UniqueElem<'_, T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for UniqueElem<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<T, M::Error> {
        let value = T::deserialize(MapAccessDeserializer::new(map))?;
        (self.check)(self.seen, &value).map_err(de::Error::custom)?;
        Ok(value)
    }
}

fn check_port_entry(seen: &mut HashSet<String>, p: &PortSpec) -> Result<(), String> {
    let (name, number) = (format!("name {}", p.name), format!("port {}/{}", p.port, p.protocol));
    if seen.contains(&name) {
        return Err(format!("duplicate port name `{}`", p.name));
    }
    if seen.contains(&number) {
        return Err(format!("duplicate port {}/{}", p.port, p.protocol));
    }
    seen.extend([name, number]);
    Ok(())
}

fn check_endpoint_entry(seen: &mut HashSet<String>, e: &EndpointSpec) -> Result<(), String> {
    if !seen.insert(e.hostname.clone()) {
        return Err(format!("duplicate endpoint hostname `{}`", e.hostname));
    }
    Ok(())
}

fn check_export_entry(seen: &mut HashSet<String>, e: &Export) -> Result<(), String> {
    if e.ports.is_empty() {
        return Err(format!(
            "export `{}` has no ports: list at least one, e.g. ports: [{{name: client, port: 2379}}]",
            e.service
        ));
    }
    // An export without a namespace is keyed apart from every explicit one, as before:
    // which namespace it lands in is only known once the whole file is read.
    if !seen.insert(format!("{}/{:?}", e.service, e.namespace)) {
        return Err(match &e.namespace {
            Some(ns) => format!("duplicate export of service `{}` in namespace `{ns}`", e.service),
            None => format!("duplicate export of service `{}`", e.service),
        });
    }
    Ok(())
}

pub(super) fn de_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PortSpec>, D::Error> {
    d.deserialize_seq(UniqueSeq {
        expecting: "a port mapping like {name: client, port: 2379}",
        check: check_port_entry,
    })
}

pub(super) fn de_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EndpointSpec>, D::Error> {
    d.deserialize_seq(UniqueSeq {
        expecting: "an endpoint mapping like {hostname: etcd-0, ip: 10.1.0.1}",
        check: check_endpoint_entry,
    })
}

pub(super) fn de_exports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Export>, D::Error> {
    d.deserialize_seq(UniqueSeq {
        expecting: "an export mapping with service, ports and endpoints",
        check: check_export_entry,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{SPEC, err, parse};

    #[test]
    fn thousands_of_endpoints_parse_and_a_late_duplicate_is_found() {
        let mut text = SPEC.to_string();
        for i in 1..5000 {
            text.push_str(&format!(
                "      - {{hostname: etcd-{i}, ip: 10.1.{}.{}}}\n",
                i / 250,
                i % 250 + 1
            ));
        }
        assert_eq!(parse(&text).unwrap().exports[0].endpoints.len(), 5000);
        text.push_str("      - {hostname: etcd-2500, ip: 10.2.0.1}\n");
        let e = err(&text);
        assert!(e.contains("exports[0].endpoints[5000]"), "{e}");
        assert!(e.contains("duplicate endpoint hostname `etcd-2500`"), "{e}");
    }

    #[test]
    fn duplicate_hostname() {
        let text = format!("{SPEC}      - {{hostname: etcd-0, ip: 10.1.0.2}}\n");
        let e = err(&text);
        assert!(e.contains("exports[0].endpoints[1]"), "{e}");
        assert!(e.contains("duplicate endpoint hostname `etcd-0`"), "{e}");
        assert!(e.contains("line 26"), "{e}");
    }

    #[test]
    fn duplicate_ports() {
        let text = SPEC.replace("name: gossip", "name: peer");
        let e = err(&text);
        assert!(e.contains("exports[0].ports[2]: duplicate port name `peer`"), "{e}");
        assert!(e.contains("line 23"), "{e}");
        let text = SPEC.replace("port: 7946, protocol: UDP", "port: 2380");
        let e = err(&text);
        assert!(e.contains("duplicate port 2380/TCP") && e.contains("line 23"), "{e}");
        // Same number over another protocol is fine.
        parse(&SPEC.replace("port: 7946", "port: 2380")).unwrap();
    }

    #[test]
    fn duplicate_or_portless_exports() {
        let base = "site: a\nexports:\n  - service: x\n    ports: [{name: p, port: 1}]\n";
        let e = err(&format!("{base}  - service: x\n    ports: [{{name: p, port: 1}}]\n"));
        assert!(e.contains("exports[1]: duplicate export of service `x`"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        // Duplicate only once the default namespace is applied.
        let e = err(&format!(
            "{base}  - service: \"x\"\n    namespace: default\n    ports: [{{name: p, port: 1}}]\n"
        ));
        assert!(e.contains("exports[1]: duplicate export"), "{e}");
        assert!(e.contains("namespace `default`") && e.contains("line 5"), "{e}");
        // Another namespace is another export.
        parse(&format!(
            "{base}  - service: x\n    namespace: other\n    ports: [{{name: p, port: 1}}]\n"
        ))
        .unwrap();
        let e = err("site: a\nexports:\n  - service: x\n    endpoints: []\n");
        assert!(e.contains("exports[0]: export `x` has no ports"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }
}
