//! Tokens and the grants behind them.
//!
//! `token issue` creates a **grant** in the issuer's state (id, a hash of a fresh secret,
//! allowed uses, expiry) and hands out a **token** file: the issuer's site id, the addresses
//! to dial, the issuer's CA certificate (which pins the issuer), the grant id, the secret and
//! the expiry. The token never holds a private key. Redemption is decided by
//! [`GrantBook::redeem`], a plain state machine over the grant records with the clock passed
//! in, so every rule (unknown grant, wrong secret, expired, used up) is tested without
//! sockets. The issuer keeps only the SHA-256 of each secret and compares in constant time.
//!
//! **Tampering.** A token carries a `mac`: HMAC-SHA256, keyed by its secret, over every other
//! field (the CA as DER, so a re-wrapped PEM is still the same token). The redeemer checks it
//! before dialing, which catches a token changed by someone who does not hold the secret, or
//! damaged in transit. The issuer also records the mac in the grant and refuses a redemption
//! that presents another one ([`Rejection::Tampered`]), which catches a token whose fields
//! were changed by someone who does hold the secret and recomputed the mac. The CA needs this:
//! TLS uses only its name and key, so bytes changed elsewhere in it would go unnoticed.
//! Version 1 tokens had no mac and are refused with a message saying to issue a new one
//! (tokens live minutes, at most 30 days). [`file`] reads a token file on the redeemer's side:
//! bounded in size, refused when others could have written it.

pub mod file;

use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::protocol::Rejection;
use crate::state::rfc3339;

/// Version of the token file format: 2 added `mac`.
pub const TOKEN_VERSION: u32 = 2;
/// The largest token file read or parsed. A real one is about 1 KiB (most of it the CA); a
/// bound keeps `token redeem -` on an endless input from growing without limit.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Domain separation for the token's mac, so it can never be mistaken for another HMAC.
const MAC_CONTEXT: &[u8] = b"causeway-token-mac-v2";
/// Most uses one grant may allow.
pub const MAX_USES: u32 = 1000;
/// Longest a grant may stay open.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long spent or expired grants are kept, so late redeemers learn "expired"/"used up"
/// rather than "unknown grant".
const KEEP_DEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// Errors reading a token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a causeway token: {0}")]
    Parse(String),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("could not generate randomness")]
    Random,
    #[error("token larger than 64 KiB ({0} bytes): not a causeway token")]
    TooLarge(usize),
    #[error(
        "token version 1 (issued by causeway before tokens carried a mac) cannot be checked for \
         tampering and is no longer accepted: upgrade causeway on the issuing site and issue a new token"
    )]
    Unprotected,
    #[error(
        "token tampered with: its fields do not match its mac (changed or damaged after {issuer} \
         issued it); ask {issuer} for a new token"
    )]
    Tampered { issuer: String },
}

/// The token file, as handed from issuer to redeemer. A secret: whoever holds it can link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Format version ([`TOKEN_VERSION`]).
    pub version: u32,
    /// The issuer's site id; also the TLS server name the redeemer verifies.
    pub issuer: String,
    /// Addresses (`host:port`) where the issuer's agent listens, tried in order.
    pub addresses: Vec<String>,
    /// The issuer's site CA certificate (PEM): the redeemer accepts only an issuer whose
    /// certificate this CA signed, so a token cannot be redirected to an impostor.
    pub ca: String,
    /// The grant this token redeems.
    pub grant: String,
    /// The one-time secret proving possession (64 hex digits).
    pub secret: String,
    /// When the grant stops accepting redemptions (RFC 3339, UTC).
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    /// HMAC-SHA256 (64 hex digits) keyed by the secret over every other field: see
    /// [`Token::compute_mac`]. Defaults to empty only so that a version 1 token, which lacks
    /// it, is refused for its version rather than for a missing field.
    #[serde(default)]
    pub mac: String,
}

/// What the issuer puts in a token besides the grant (see [`GrantBook::issue_token`]).
#[derive(Debug, Clone)]
pub struct TokenFor {
    /// The issuer's site id.
    pub issuer: String,
    /// The addresses to dial.
    pub addresses: Vec<String>,
    /// The issuer's site CA certificate (PEM).
    pub ca: String,
}

impl Token {
    /// The token's mac over its current fields (the `mac` field itself aside). Fields are
    /// length-prefixed, so no shifting of bytes between them gives the same input; the CA
    /// enters as DER, so re-wrapping its PEM is not tampering but changing any byte of the
    /// certificate is.
    pub fn compute_mac(&self) -> Result<String, TokenError> {
        let key = hex::decode(&self.secret)
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| TokenError::Invalid("secret must be 64 hex digits".into()))?;
        let ca = crate::identity::parse_cert_pem(&self.ca, "ca")
            .map_err(|_| TokenError::Invalid("ca is not a PEM certificate".into()))?;
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &key));
        let mut field = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        field(MAC_CONTEXT);
        field(&self.version.to_be_bytes());
        field(self.issuer.as_bytes());
        field(&(self.addresses.len() as u64).to_be_bytes());
        for a in &self.addresses {
            field(a.as_bytes());
        }
        field(ca.as_ref());
        field(self.grant.as_bytes());
        field(rfc3339::format(self.expires).as_bytes());
        Ok(hex::encode(ctx.sign().as_ref()))
    }

    /// Parses and checks a token file's text, its mac included.
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        if text.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(text.len()));
        }
        let t: Token = serde_yaml::from_str(text).map_err(|e| {
            // Text that is not even a YAML mapping (garbage, an empty file, a PEM) gets a
            // description of what a token looks like rather than serde's internals.
            match serde_yaml::from_str::<serde_yaml::Value>(text) {
                Ok(serde_yaml::Value::Mapping(_)) => TokenError::Parse(e.to_string()),
                _ => TokenError::Parse(
                    "expected the YAML file `causeway token issue` writes (version, issuer, addresses, ca, \
                     grant, secret, expires, mac)"
                        .into(),
                ),
            }
        })?;
        if t.version == 1 {
            return Err(TokenError::Unprotected);
        }
        if t.version != TOKEN_VERSION {
            return Err(TokenError::Invalid(format!(
                "version {} is not supported (this causeway reads version {TOKEN_VERSION})",
                t.version
            )));
        }
        if !crate::names::is_dns_label(&t.issuer) {
            return Err(TokenError::Invalid(format!("issuer {:?} is not a site id", t.issuer)));
        }
        if t.addresses.is_empty() {
            return Err(TokenError::Invalid("addresses is empty: nothing to dial".into()));
        }
        if !is_hex(&t.grant, 32) {
            return Err(TokenError::Invalid("grant must be 32 hex digits".into()));
        }
        if !is_hex(&t.secret, 64) {
            return Err(TokenError::Invalid("secret must be 64 hex digits".into()));
        }
        if !is_hex(&t.mac, 64) {
            return Err(TokenError::Invalid("mac must be 64 hex digits".into()));
        }
        let expected = t.compute_mac()?;
        if !bool::from(expected.as_bytes().ct_eq(t.mac.to_ascii_lowercase().as_bytes())) {
            return Err(TokenError::Tampered {
                issuer: t.issuer.clone(),
            });
        }
        Ok(t)
    }

    /// The token file's text: a warning comment, then YAML.
    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).unwrap_or_default();
        format!(
            "# causeway link token for site {} (expires {}).\n\
             # This is a secret: whoever holds it can link a site to {}. Deliver it over a\n\
             # trusted channel, never commit it, and delete it once redeemed.\n{body}",
            self.issuer,
            rfc3339::format(self.expires),
            self.issuer
        )
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One redemption of a grant, recorded durably by the issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redemption {
    /// The redeeming site.
    pub site: String,
    /// When it redeemed.
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
}

/// The issuer's record of a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// Random id, the token's `grant` field.
    pub id: String,
    /// SHA-256 of the secret (hex): the issuer never stores the secret itself.
    pub secret_sha256: String,
    /// Redemptions allowed in all.
    pub uses: u32,
    /// Redemptions so far.
    #[serde(default)]
    pub redemptions: Vec<Redemption>,
    #[serde(with = "rfc3339")]
    pub created: SystemTime,
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
    /// When the issuer revoked it (`token revoke`): a token that leaked or is no longer
    /// wanted redeems no more, whatever its uses and expiry say.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339::option")]
    pub revoked: Option<SystemTime>,
    /// The mac of the token issued for this grant: a redemption must present the same one,
    /// so a token whose fields were changed (even with the mac recomputed from its secret)
    /// is refused. Absent from grants recorded before tokens carried a mac.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_mac: Option<String>,
}

/// Where a grant stands, as `token list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    /// Can still be redeemed.
    Open,
    /// Every use was redeemed.
    Used,
    /// Past its expiry with uses left.
    Expired,
    /// Revoked by the issuer.
    Revoked,
}

impl std::fmt::Display for GrantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GrantState::Open => "open",
            GrantState::Used => "used",
            GrantState::Expired => "expired",
            GrantState::Revoked => "revoked",
        })
    }
}

/// One grant as `token list -o json` shows it: never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantView {
    pub grant: String,
    pub state: GrantState,
    pub uses: u32,
    pub redeemed: u32,
    /// The sites that redeemed it, in order.
    pub redeemed_by: Vec<String>,
    pub created: String,
    pub expires: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

impl Grant {
    fn remaining(&self) -> u32 {
        self.uses.saturating_sub(self.redemptions.len() as u32)
    }

    /// Where the grant stands at `now`; revocation wins over everything else.
    pub fn state(&self, now: SystemTime) -> GrantState {
        if self.revoked.is_some() {
            GrantState::Revoked
        } else if self.remaining() == 0 {
            GrantState::Used
        } else if now >= self.expires {
            GrantState::Expired
        } else {
            GrantState::Open
        }
    }

    pub fn view(&self, now: SystemTime) -> GrantView {
        GrantView {
            grant: self.id.clone(),
            state: self.state(now),
            uses: self.uses,
            redeemed: self.redemptions.len() as u32,
            redeemed_by: self.redemptions.iter().map(|r| r.site.clone()).collect(),
            created: rfc3339::format(self.created),
            expires: rfc3339::format(self.expires),
            revoked: self.revoked.map(rfc3339::format),
        }
    }
}

/// Why `token revoke` found nothing to revoke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevokeError {
    #[error("no grant {0:?} on this site; `causeway token list` shows the grants it issued")]
    Unknown(String),
    #[error("{prefix:?} matches {count} grants; give more of the grant id")]
    Ambiguous { prefix: String, count: usize },
}

/// Every grant this site has issued: the content of `grants.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrantBook {
    #[serde(default)]
    pub grants: Vec<Grant>,
}

fn random_hex(rng: &SystemRandom, bytes: usize) -> Result<String, TokenError> {
    let mut buf = vec![0u8; bytes];
    rng.fill(&mut buf).map_err(|_| TokenError::Random)?;
    Ok(hex::encode(buf))
}

fn sha256_hex(s: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, s.as_bytes()))
}

impl GrantBook {
    /// Creates a grant; returns it and the secret (which exists only in the token).
    pub fn issue(&mut self, now: SystemTime, uses: u32, ttl: Duration) -> Result<(Grant, String), TokenError> {
        if uses == 0 || uses > MAX_USES {
            return Err(TokenError::Invalid(format!("--uses must be between 1 and {MAX_USES}")));
        }
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(TokenError::Invalid("--expires must be between 1s and 30 days".into()));
        }
        let rng = SystemRandom::new();
        let secret = random_hex(&rng, 32)?;
        let grant = Grant {
            id: random_hex(&rng, 16)?,
            secret_sha256: sha256_hex(&secret),
            uses,
            redemptions: Vec::new(),
            created: now,
            // Whole seconds, as the token shows it.
            expires: rfc3339::parse(&rfc3339::format(now + ttl)).unwrap_or(now + ttl),
            revoked: None,
            token_mac: None,
        };
        self.prune(now);
        self.grants.push(grant.clone());
        Ok((grant, secret))
    }

    /// Creates a grant and the token for it, and records the token's mac in the grant.
    pub fn issue_token(
        &mut self,
        now: SystemTime,
        uses: u32,
        ttl: Duration,
        to: TokenFor,
    ) -> Result<(Grant, Token), TokenError> {
        let (grant, secret) = self.issue(now, uses, ttl)?;
        let mut token = Token {
            version: TOKEN_VERSION,
            issuer: to.issuer,
            addresses: to.addresses,
            ca: to.ca,
            grant: grant.id.clone(),
            secret,
            expires: grant.expires,
            mac: String::new(),
        };
        let mac = match token.compute_mac() {
            Ok(mac) => mac,
            Err(e) => {
                // Nothing handed out: forget the grant.
                self.grants.retain(|g| g.id != grant.id);
                return Err(e);
            }
        };
        token.mac = mac.clone();
        let recorded = self
            .grants
            .iter_mut()
            .find(|g| g.id == grant.id)
            .ok_or_else(|| TokenError::Invalid("the new grant vanished".into()))?;
        recorded.token_mac = Some(mac);
        Ok((recorded.clone(), token))
    }

    /// Decides one redemption and, on success, records it. The secret is checked before
    /// anything about the grant's state is revealed; then the token's `mac`, against the one
    /// recorded at issue (a grant recorded before macs has none, and checks none).
    pub fn redeem(
        &mut self,
        id: &str,
        secret: &str,
        mac: Option<&str>,
        site: &str,
        now: SystemTime,
    ) -> Result<(), Rejection> {
        let grant = self
            .grants
            .iter_mut()
            .find(|g| g.id == id)
            .ok_or(Rejection::UnknownGrant)?;
        let presented = sha256_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(grant.secret_sha256.as_bytes())) {
            return Err(Rejection::WrongSecret);
        }
        if let Some(expected) = &grant.token_mac {
            let presented = mac.unwrap_or_default().to_ascii_lowercase();
            if !bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
                return Err(Rejection::Tampered);
            }
        }
        if let Some(at) = grant.revoked {
            return Err(Rejection::Revoked {
                at: rfc3339::format(at),
            });
        }
        if now >= grant.expires {
            return Err(Rejection::Expired {
                at: rfc3339::format(grant.expires),
            });
        }
        if grant.remaining() == 0 {
            return Err(Rejection::UsedUp { uses: grant.uses });
        }
        grant.redemptions.push(Redemption {
            site: site.to_string(),
            at: now,
        });
        Ok(())
    }

    /// Revokes the grant whose id is `id` or starts with it (ids are long; a unique prefix
    /// will do, as with git). Revoking again keeps the first time. Returns the grant.
    pub fn revoke(&mut self, id: &str, now: SystemTime) -> Result<Grant, RevokeError> {
        let id = id.trim().to_ascii_lowercase();
        if id.is_empty() {
            return Err(RevokeError::Unknown(id));
        }
        // Every id has the same length, so a whole id matches only its own grant.
        let matches: Vec<usize> = (0..self.grants.len())
            .filter(|&i| self.grants[i].id.starts_with(&id))
            .collect();
        let index = match matches[..] {
            [i] => i,
            [] => return Err(RevokeError::Unknown(id)),
            _ => {
                return Err(RevokeError::Ambiguous {
                    prefix: id,
                    count: matches.len(),
                });
            }
        };
        let grant = &mut self.grants[index];
        grant.revoked.get_or_insert(now);
        Ok(grant.clone())
    }

    /// Forgets grants dead (expired, used up or revoked) for longer than a week.
    pub fn prune(&mut self, now: SystemTime) {
        self.grants.retain(|g| {
            let dead_since = if let Some(at) = g.revoked {
                at
            } else if g.remaining() == 0 {
                g.redemptions.last().map(|r| r.at).unwrap_or(g.created).min(g.expires)
            } else {
                g.expires
            };
            now.duration_since(dead_since).map(|d| d < KEEP_DEAD).unwrap_or(true)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        rfc3339::parse("2026-11-21T12:00:00Z").unwrap()
    }

    /// A CA certificate made for these tests (the token's mac covers its DER).
    fn test_ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn issued() -> (GrantBook, Token) {
        let mut book = GrantBook::default();
        let to = TokenFor {
            issuer: "london".into(),
            addresses: vec!["gw.london.example:7400".into()],
            ca: test_ca(),
        };
        let (_, token) = book.issue_token(t0(), 1, Duration::from_secs(900), to).unwrap();
        (book, token)
    }

    /// The PEM of `der` with one byte changed at `index`.
    fn pem_with_byte_changed(pem: &str, index: usize) -> String {
        use base64::Engine;
        let mut der = crate::identity::parse_cert_pem(pem, "ca").unwrap().to_vec();
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

    #[test]
    fn an_issued_token_round_trips_and_its_grant_records_the_mac() {
        let (book, token) = issued();
        let text = token.to_yaml();
        assert!(text.contains("version: 2") && text.contains("mac: "), "{text}");
        assert_eq!(Token::parse(&text).unwrap(), token);
        assert_eq!(book.grants[0].token_mac.as_deref(), Some(token.mac.as_str()));
        // A re-wrapped PEM is the same certificate, so the same token.
        let mut rewrapped = token.clone();
        rewrapped.ca = token.ca.replace('\n', "\r\n");
        assert!(Token::parse(&rewrapped.to_yaml()).is_ok());
    }

    type Change = Box<dyn Fn(&mut Token)>;

    #[test]
    fn a_change_to_any_field_is_tampering() {
        let (_, token) = issued();
        let serial = 15; // inside the serial number, well before the key
        let changes: Vec<(&str, Change)> = vec![
            ("issuer", Box::new(|t| t.issuer = "paris".into())),
            ("address", Box::new(|t| t.addresses[0] = "evil.example:7400".into())),
            (
                "extra address",
                Box::new(|t| t.addresses.push("evil.example:7400".into())),
            ),
            ("grant", Box::new(|t| t.grant = "ab".repeat(16))),
            ("secret", Box::new(|t| t.secret = "cd".repeat(32))),
            ("expires", Box::new(|t| t.expires += Duration::from_secs(3600))),
            (
                "ca serial",
                Box::new(move |t| t.ca = pem_with_byte_changed(&t.ca, serial)),
            ),
            ("mac", Box::new(|t| t.mac = "00".repeat(32))),
        ];
        for (what, change) in changes {
            let mut t = token.clone();
            change(&mut t);
            let err = Token::parse(&t.to_yaml()).unwrap_err();
            assert!(
                matches!(&err, TokenError::Tampered { issuer } if issuer == &t.issuer),
                "{what}: {err}"
            );
            assert!(err.to_string().starts_with("token tampered with"), "{err}");
        }
    }

    #[test]
    fn the_issuer_refuses_a_token_whose_mac_was_recomputed() {
        let (mut book, token) = issued();
        let mut forged = token.clone();
        forged.ca = pem_with_byte_changed(&token.ca, 15);
        forged.mac = forged.compute_mac().unwrap();
        // It passes the redeemer's own check ...
        assert!(Token::parse(&forged.to_yaml()).is_ok());
        // ... but not the issuer's, before any state is revealed or a use spent.
        assert_eq!(
            book.redeem(&forged.grant, &forged.secret, Some(&forged.mac), "paris", t0()),
            Err(Rejection::Tampered)
        );
        assert_eq!(
            book.redeem(&token.grant, &token.secret, None, "paris", t0()),
            Err(Rejection::Tampered),
            "a redeemer that leaves the mac out is refused too"
        );
        assert_eq!(
            book.redeem(
                &token.grant,
                &token.secret,
                Some(&token.mac.to_uppercase()),
                "paris",
                t0()
            ),
            Ok(())
        );
    }

    #[test]
    fn version_1_tokens_and_oversized_text_are_refused_with_their_cause() {
        let (_, token) = issued();
        let v1 = token.to_yaml().replace("version: 2", "version: 1");
        let v1: String = v1
            .lines()
            .filter(|l| !l.starts_with("mac:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = Token::parse(&v1).unwrap_err().to_string();
        assert!(err.contains("version 1") && err.contains("issue a new token"), "{err}");

        let err = Token::parse(&token.to_yaml().replace("version: 2", "version: 3")).unwrap_err();
        assert!(err.to_string().contains("version 3 is not supported"), "{err}");

        let huge = format!("{}#{}\n", token.to_yaml(), "x".repeat(MAX_TOKEN_BYTES));
        let err = Token::parse(&huge).unwrap_err().to_string();
        assert!(err.starts_with("token larger than 64 KiB"), "{err}");

        let no_mac: String = token
            .to_yaml()
            .lines()
            .filter(|l| !l.starts_with("mac:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = Token::parse(&no_mac).unwrap_err().to_string();
        assert!(err.contains("mac must be 64 hex digits"), "{err}");
    }

    #[test]
    fn one_use_grant_redeems_once() {
        let mut book = GrantBook::default();
        let (g, secret) = book.issue(t0(), 1, Duration::from_secs(900)).unwrap();
        assert_ne!(g.secret_sha256, secret, "the secret itself is not stored");
        assert_eq!(book.redeem(&g.id, &secret, None, "paris", t0()), Ok(()));
        assert_eq!(
            book.redeem(&g.id, &secret, None, "tokyo", t0()),
            Err(Rejection::UsedUp { uses: 1 })
        );
        assert_eq!(book.grants[0].redemptions[0].site, "paris");
    }

    #[test]
    fn multi_use_grant_counts_down() {
        let mut book = GrantBook::default();
        let (g, s) = book.issue(t0(), 3, Duration::from_secs(60)).unwrap();
        for site in ["a", "b", "c"] {
            book.redeem(&g.id, &s, None, site, t0()).unwrap();
        }
        assert_eq!(
            book.redeem(&g.id, &s, None, "d", t0()),
            Err(Rejection::UsedUp { uses: 3 })
        );
    }

    #[test]
    fn each_failure_names_its_cause() {
        let mut book = GrantBook::default();
        let (g, s) = book.issue(t0(), 1, Duration::from_secs(60)).unwrap();
        assert_eq!(book.redeem("00", &s, None, "p", t0()), Err(Rejection::UnknownGrant));
        let mut wrong = s.clone();
        wrong.replace_range(0..1, if s.starts_with('0') { "1" } else { "0" });
        assert_eq!(book.redeem(&g.id, &wrong, None, "p", t0()), Err(Rejection::WrongSecret));
        let late = t0() + Duration::from_secs(61);
        assert_eq!(
            book.redeem(&g.id, &s, None, "p", late),
            Err(Rejection::Expired {
                at: "2026-11-21T12:01:00Z".into()
            })
        );
        // A wrong secret on an expired grant reveals nothing about its state.
        assert_eq!(book.redeem(&g.id, &wrong, None, "p", late), Err(Rejection::WrongSecret));
    }

    #[test]
    fn issue_validates_bounds_and_prunes_old_grants() {
        let mut book = GrantBook::default();
        assert!(book.issue(t0(), 0, Duration::from_secs(60)).is_err());
        assert!(book.issue(t0(), 1, Duration::from_secs(0)).is_err());
        assert!(book.issue(t0(), 1, MAX_TTL + Duration::from_secs(1)).is_err());
        book.issue(t0(), 1, Duration::from_secs(60)).unwrap();
        let much_later = t0() + Duration::from_secs(8 * 24 * 3600);
        book.issue(much_later, 1, Duration::from_secs(60)).unwrap();
        assert_eq!(book.grants.len(), 1);
    }

    #[test]
    fn grant_book_round_trips_through_yaml() {
        let mut book = GrantBook::default();
        let (g, s) = book.issue(t0(), 2, Duration::from_secs(60)).unwrap();
        book.redeem(&g.id, &s, None, "paris", t0()).unwrap();
        let text = serde_yaml::to_string(&book).unwrap();
        let back: GrantBook = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, book);
        assert!(!text.contains("revoked"), "no revoked key until a revocation:\n{text}");

        book.revoke(&g.id, t0()).unwrap();
        let text = serde_yaml::to_string(&book).unwrap();
        assert!(text.contains("revoked: 2026-11-21T12:00:00Z"), "{text}");
        let back: GrantBook = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, book);
    }

    #[test]
    fn revoked_grant_redeems_no_more_and_says_when() {
        let mut book = GrantBook::default();
        let (g, secret) = book.issue(t0(), 3, Duration::from_secs(900)).unwrap();
        book.redeem(&g.id, &secret, None, "paris", t0()).unwrap();
        assert_eq!(book.grants[0].state(t0()), GrantState::Open);

        let later = t0() + Duration::from_secs(60);
        let revoked = book.revoke(&g.id, later).unwrap();
        assert_eq!(revoked.state(later), GrantState::Revoked);
        assert_eq!(
            book.redeem(&g.id, &secret, None, "tokyo", later),
            Err(Rejection::Revoked {
                at: "2026-11-21T12:01:00Z".into()
            })
        );
        // The secret is still checked first: a wrong one learns nothing about the grant.
        assert_eq!(
            book.redeem(&g.id, &"00".repeat(32), None, "tokyo", later),
            Err(Rejection::WrongSecret)
        );
        // Revoking again keeps the first time.
        book.revoke(&g.id, later + Duration::from_secs(60)).unwrap();
        assert_eq!(book.grants[0].revoked, Some(later));

        let view = book.grants[0].view(later);
        assert_eq!(view.redeemed_by, vec!["paris".to_string()]);
        assert_eq!((view.uses, view.redeemed), (3, 1));
        assert_eq!(view.revoked.as_deref(), Some("2026-11-21T12:01:00Z"));
    }

    #[test]
    fn revoke_takes_a_unique_prefix_and_names_unknown_and_ambiguous_ids() {
        let mut book = GrantBook::default();
        for _ in 0..2 {
            book.issue(t0(), 1, Duration::from_secs(900)).unwrap();
        }
        book.grants[0].id = format!("aa11{}", "0".repeat(28));
        book.grants[1].id = format!("aa22{}", "0".repeat(28));
        assert_eq!(
            book.revoke("aa", t0()).unwrap_err(),
            RevokeError::Ambiguous {
                prefix: "aa".into(),
                count: 2
            }
        );
        assert_eq!(book.revoke("bb", t0()).unwrap_err(), RevokeError::Unknown("bb".into()));
        assert_eq!(book.revoke("", t0()).unwrap_err(), RevokeError::Unknown("".into()));
        assert_eq!(book.revoke(" AA22 ", t0()).unwrap().id, book.grants[1].id);
        assert_eq!(book.grants[0].state(t0()), GrantState::Open);
        assert_eq!(book.grants[1].state(t0()), GrantState::Revoked);
    }

    #[test]
    fn states_and_pruning_of_revoked_grants() {
        let mut book = GrantBook::default();
        let (used, s) = book.issue(t0(), 1, Duration::from_secs(60)).unwrap();
        book.redeem(&used.id, &s, None, "paris", t0()).unwrap();
        book.issue(t0(), 1, Duration::from_secs(60)).unwrap();
        let (revoked, _) = book.issue(t0(), 1, Duration::from_secs(30 * 24 * 3600)).unwrap();
        book.revoke(&revoked.id, t0()).unwrap();
        let later = t0() + Duration::from_secs(120);
        let states: Vec<GrantState> = book.grants.iter().map(|g| g.state(later)).collect();
        assert_eq!(states, [GrantState::Used, GrantState::Expired, GrantState::Revoked]);

        // A week after its revocation a grant is forgotten, even if it would not have
        // expired yet.
        book.prune(t0() + Duration::from_secs(8 * 24 * 3600));
        assert!(book.grants.is_empty(), "{:?}", book.grants);
    }
}

/// The grant book of a running agent, persisted in `grants.yaml`. Redemptions are decided
/// and recorded under one lock, so N concurrent redemptions of a one-use token yield exactly
/// one success, and a redemption is on disk before the redeemer hears "accepted".
pub struct GrantStore {
    /// The grants; a tokio mutex because persisting happens while it is held.
    book: tokio::sync::Mutex<GrantBook>,
    /// `grants.yaml`.
    path: std::path::PathBuf,
}

/// Errors of the grant store.
#[derive(Debug, thiserror::Error)]
pub enum GrantStoreError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Revoke(#[from] RevokeError),
}

impl GrantStore {
    pub fn load(path: std::path::PathBuf) -> Result<Self, GrantStoreError> {
        let book: GrantBook = crate::state::read_yaml_or_default(&path)?;
        Ok(GrantStore {
            book: tokio::sync::Mutex::new(book),
            path,
        })
    }

    /// Creates a grant and its token, and records the grant durably before returning it.
    pub async fn issue(&self, uses: u32, ttl: Duration, to: TokenFor) -> Result<(Grant, Token), GrantStoreError> {
        let mut book = self.book.lock().await;
        let mut next = book.clone();
        let issued = next.issue_token(SystemTime::now(), uses, ttl, to)?;
        crate::state::write_yaml(&self.path, &next)?;
        *book = next;
        Ok(issued)
    }

    /// Decides a redemption and records it durably.
    pub async fn redeem(&self, id: &str, secret: &str, mac: Option<&str>, site: &str) -> Result<(), Rejection> {
        let mut book = self.book.lock().await;
        let mut next = book.clone();
        next.redeem(id, secret, mac, site, SystemTime::now())?;
        crate::state::write_yaml(&self.path, &next).map_err(|e| Rejection::Internal { message: e.to_string() })?;
        *book = next;
        Ok(())
    }

    /// Every grant on record, oldest first.
    pub async fn list(&self) -> Vec<GrantView> {
        let now = SystemTime::now();
        self.book.lock().await.grants.iter().map(|g| g.view(now)).collect()
    }

    /// Revokes a grant (see [`GrantBook::revoke`]) and records it durably.
    pub async fn revoke(&self, id: &str) -> Result<GrantView, GrantStoreError> {
        let mut book = self.book.lock().await;
        let mut next = book.clone();
        let now = SystemTime::now();
        let grant = next.revoke(id, now)?;
        crate::state::write_yaml(&self.path, &next)?;
        *book = next;
        Ok(grant.view(now))
    }

    /// The number of grants that can still be redeemed.
    pub async fn open_count(&self) -> usize {
        let now = SystemTime::now();
        self.book
            .lock()
            .await
            .grants
            .iter()
            .filter(|g| g.state(now) == GrantState::Open)
            .count()
    }
}
