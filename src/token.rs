//! Tokens and the grants behind them.
//!
//! `token issue` creates a **grant** in the issuer's state (id, a hash of a fresh secret,
//! allowed uses, expiry) and hands out a **token** file: the issuer's site id, the addresses
//! to dial, the issuer's CA certificate (which pins the issuer), the grant id, the secret and
//! the expiry. The token never holds a private key. Redemption is decided by
//! [`GrantBook::redeem`], a plain state machine over the grant records with the clock passed
//! in, so every rule (unknown grant, wrong secret, expired, used up) is tested without
//! sockets. The issuer keeps only the SHA-256 of each secret and compares in constant time.

use std::time::{Duration, SystemTime};

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::protocol::Rejection;
use crate::state::rfc3339;

/// Version of the token file format.
pub const TOKEN_VERSION: u32 = 1;
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
}

impl Token {
    /// Parses and checks a token file's text.
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let t: Token = serde_yaml::from_str(text).map_err(|e| TokenError::Parse(e.to_string()))?;
        if t.version != TOKEN_VERSION {
            return Err(TokenError::Invalid(format!(
                "version {} is not supported (this causeway reads version {TOKEN_VERSION})",
                t.version
            )));
        }
        if !crate::config::is_dns_label(&t.issuer) {
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
        crate::identity::parse_cert_pem(&t.ca, "ca")
            .map_err(|_| TokenError::Invalid("ca is not a PEM certificate".into()))?;
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
        };
        self.prune(now);
        self.grants.push(grant.clone());
        Ok((grant, secret))
    }

    /// Decides one redemption and, on success, records it. The secret is checked before
    /// anything about the grant's state is revealed.
    pub fn redeem(&mut self, id: &str, secret: &str, site: &str, now: SystemTime) -> Result<(), Rejection> {
        let grant = self
            .grants
            .iter_mut()
            .find(|g| g.id == id)
            .ok_or(Rejection::UnknownGrant)?;
        let presented = sha256_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(grant.secret_sha256.as_bytes())) {
            return Err(Rejection::WrongSecret);
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

    #[test]
    fn one_use_grant_redeems_once() {
        let mut book = GrantBook::default();
        let (g, secret) = book.issue(t0(), 1, Duration::from_secs(900)).unwrap();
        assert_ne!(g.secret_sha256, secret, "the secret itself is not stored");
        assert_eq!(book.redeem(&g.id, &secret, "paris", t0()), Ok(()));
        assert_eq!(
            book.redeem(&g.id, &secret, "tokyo", t0()),
            Err(Rejection::UsedUp { uses: 1 })
        );
        assert_eq!(book.grants[0].redemptions[0].site, "paris");
    }

    #[test]
    fn multi_use_grant_counts_down() {
        let mut book = GrantBook::default();
        let (g, s) = book.issue(t0(), 3, Duration::from_secs(60)).unwrap();
        for site in ["a", "b", "c"] {
            book.redeem(&g.id, &s, site, t0()).unwrap();
        }
        assert_eq!(book.redeem(&g.id, &s, "d", t0()), Err(Rejection::UsedUp { uses: 3 }));
    }

    #[test]
    fn each_failure_names_its_cause() {
        let mut book = GrantBook::default();
        let (g, s) = book.issue(t0(), 1, Duration::from_secs(60)).unwrap();
        assert_eq!(book.redeem("00", &s, "p", t0()), Err(Rejection::UnknownGrant));
        let mut wrong = s.clone();
        wrong.replace_range(0..1, if s.starts_with('0') { "1" } else { "0" });
        assert_eq!(book.redeem(&g.id, &wrong, "p", t0()), Err(Rejection::WrongSecret));
        let late = t0() + Duration::from_secs(61);
        assert_eq!(
            book.redeem(&g.id, &s, "p", late),
            Err(Rejection::Expired {
                at: "2026-11-21T12:01:00Z".into()
            })
        );
        // A wrong secret on an expired grant reveals nothing about its state.
        assert_eq!(book.redeem(&g.id, &wrong, "p", late), Err(Rejection::WrongSecret));
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
        book.redeem(&g.id, &s, "paris", t0()).unwrap();
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
        book.redeem(&g.id, &secret, "paris", t0()).unwrap();
        assert_eq!(book.grants[0].state(t0()), GrantState::Open);

        let later = t0() + Duration::from_secs(60);
        let revoked = book.revoke(&g.id, later).unwrap();
        assert_eq!(revoked.state(later), GrantState::Revoked);
        assert_eq!(
            book.redeem(&g.id, &secret, "tokyo", later),
            Err(Rejection::Revoked {
                at: "2026-11-21T12:01:00Z".into()
            })
        );
        // The secret is still checked first: a wrong one learns nothing about the grant.
        assert_eq!(
            book.redeem(&g.id, &"00".repeat(32), "tokyo", later),
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
        book.redeem(&used.id, &s, "paris", t0()).unwrap();
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

    /// Creates a grant and records it durably before returning its secret.
    pub async fn issue(&self, uses: u32, ttl: Duration) -> Result<(Grant, String), GrantStoreError> {
        let mut book = self.book.lock().await;
        let mut next = book.clone();
        let issued = next.issue(SystemTime::now(), uses, ttl)?;
        crate::state::write_yaml(&self.path, &next)?;
        *book = next;
        Ok(issued)
    }

    /// Decides a redemption and records it durably.
    pub async fn redeem(&self, id: &str, secret: &str, site: &str) -> Result<(), Rejection> {
        let mut book = self.book.lock().await;
        let mut next = book.clone();
        next.redeem(id, secret, site, SystemTime::now())?;
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
