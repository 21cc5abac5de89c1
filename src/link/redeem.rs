//! Token redemption, both sides of one short QUIC connection (ALPN `causeway-redeem/1`).
//!
//! The redeemer dials the token's addresses trusting only the token's CA for the issuer's
//! site id (so a token cannot be redirected to an impostor), presents no client certificate,
//! and sends its CA and agent certificate with a signature over the connection's TLS exporter:
//! proof that it holds the agent key, bound to this connection, without the key ever crossing
//! the wire. The issuer checks the certificate chain and the proof, then the grant
//! ([`GrantStore::redeem`]: secret in constant time, the token's mac against the one recorded
//! at issue, expiry, uses), records the redemption and
//! the new acceptor link durably, trusts the redeemer's CA, and answers with its site id.
//!
//! One link per pair of sites: the issuer refuses ([`Rejection::AlreadyLinked`]) a redeemer
//! whose site it already has a link with, in either direction, before the grant is touched,
//! so the token stays usable; the redeemer checks its own links before dialing (the agent's
//! `redeem`, through [`Links::reserve_peer`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use super::{LinkRecord, Links, PeerConflict, Role, describe_connection_error, resolve_all};
use crate::identity::{self, SiteIdentity};
use crate::protocol::{self, ALPN_REDEEM, REDEEM_EXPORTER_LABEL, RedeemRequest, RedeemResponse, Rejection, close};
use crate::state::rfc3339;
use crate::token::{GrantStore, Token};

/// How long one address may take to complete a handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the redeemer keeps trying an address that refuses the handshake for being busy.
const REFUSED_PATIENCE: Duration = Duration::from_secs(5);
/// How long the whole exchange may take once connected.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a redemption failed, as the redeemer reports it.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("token expired at {0}; ask {1} for a new one")]
    Expired(String, String),
    #[error("this token was issued by this site ({0}); redeem it on the other site")]
    OwnToken(String),
    #[error("issuer {site} not reachable (tried {tried})")]
    Unreachable { site: String, tried: String },
    #[error(
        "issuer certificate does not match the token: {addr} did not present a certificate \
         of site {site} signed by the token's CA ({detail}); the token may be for another \
         site, or something is intercepting the connection"
    )]
    IssuerMismatch { site: String, addr: String, detail: String },
    #[error("{site} refused the token: {rejection}")]
    Rejected { site: String, rejection: Rejection },
    #[error("redemption with {site} at {addr} failed: {detail}")]
    Protocol { site: String, addr: String, detail: String },
    #[error("{0}")]
    Local(String),
}

/// What a successful redemption learned.
#[derive(Debug, Clone)]
pub struct Redeemed {
    /// The issuer's site id, as it answered.
    pub site: String,
    /// The address that answered.
    pub addr: SocketAddr,
}

/// The redeemer's side: dials, proves, and returns the issuer's answer.
pub async fn redeem(
    endpoint: &quinn::Endpoint,
    id: &SiteIdentity,
    token: &Token,
    vips_cidr: &str,
) -> Result<Redeemed, RedeemError> {
    if token.issuer == id.site {
        return Err(RedeemError::OwnToken(id.site.clone()));
    }
    if SystemTime::now() >= token.expires {
        return Err(RedeemError::Expired(
            rfc3339::format(token.expires),
            token.issuer.clone(),
        ));
    }
    let ca = identity::parse_cert_pem(&token.ca, "token ca").map_err(|e| RedeemError::Local(e.to_string()))?;
    let cfg = crate::quic::client_config(id, &ca, ALPN_REDEEM, false, &crate::quic::LinkTiming::default())
        .map_err(|e| RedeemError::Local(e.to_string()))?;
    let mut tried = Vec::new();
    let mut mismatch = None;
    for addr in resolve_all(&token.addresses, &mut tried).await {
        let conn = match connect(endpoint, &cfg, addr, &token.issuer).await {
            Err(e) => {
                tried.push(format!("{addr}: {e}"));
                continue;
            }
            Ok(Ok(Ok(conn))) => conn,
            Ok(Ok(Err(quinn::ConnectionError::TransportError(t)))) if is_crypto(u64::from(t.code)) => {
                // Our own verifier refused the issuer's certificate.
                warn!(%addr, error = %t, "issuer certificate does not match the token");
                mismatch = Some((addr, t.to_string()));
                continue;
            }
            Ok(Ok(Err(e))) => {
                tried.push(format!("{addr}: {}", describe_connection_error(&e)));
                continue;
            }
            Ok(Err(_)) => {
                tried.push(format!("{addr}: no answer"));
                continue;
            }
        };
        let result = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&conn, id, token, vips_cidr)).await;
        conn.close(close::DONE.into(), b"done");
        let protocol_err = |detail: String| RedeemError::Protocol {
            site: token.issuer.clone(),
            addr: addr.to_string(),
            detail,
        };
        return match result {
            Err(_) => Err(protocol_err("the issuer did not answer in time".into())),
            Ok(Err(detail)) => Err(protocol_err(detail)),
            Ok(Ok(RedeemResponse::Accepted { site })) => Ok(Redeemed { site, addr }),
            Ok(Ok(RedeemResponse::Rejected(rejection))) => Err(RedeemError::Rejected {
                site: token.issuer.clone(),
                rejection,
            }),
        };
    }
    if let Some((addr, detail)) = mismatch {
        return Err(RedeemError::IssuerMismatch {
            site: token.issuer.clone(),
            addr: addr.to_string(),
            detail,
        });
    }
    Err(RedeemError::Unreachable {
        site: token.issuer.clone(),
        tried: tried.join("; "),
    })
}

/// One handshake with `addr`, tried again (with backoff, for up to [`REFUSED_PATIENCE`]) while
/// the issuer refuses it for having too many handshakes in flight ([`super::is_refused`]):
/// several sites behind one address redeeming at once take turns. The outer error is a local
/// one (no attempt made), the middle one a timeout of the last attempt.
async fn connect(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Result<Result<quinn::Connection, quinn::ConnectionError>, tokio::time::error::Elapsed>, quinn::ConnectError>
{
    let deadline = tokio::time::Instant::now() + REFUSED_PATIENCE;
    let mut backoff = super::Backoff::new(Duration::from_millis(50), Duration::from_millis(800));
    loop {
        let connecting = endpoint.connect_with(cfg.clone(), addr, server_name)?;
        let result = tokio::time::timeout(CONNECT_TIMEOUT, connecting).await;
        match &result {
            Ok(Err(e)) if super::is_refused(e) && tokio::time::Instant::now() < deadline => {
                debug!(%addr, "issuer busy with other handshakes; trying again");
                tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
            }
            _ => return Ok(result),
        }
    }
}

fn is_crypto(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

async fn exchange(
    conn: &quinn::Connection,
    id: &SiteIdentity,
    token: &Token,
    vips_cidr: &str,
) -> Result<RedeemResponse, String> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, REDEEM_EXPORTER_LABEL, token.grant.as_bytes())
        .map_err(|_| "TLS exporter unavailable".to_string())?;
    let proof = id.sign(&exporter).map_err(|e| e.to_string())?;
    let req = RedeemRequest {
        grant: token.grant.clone(),
        secret: token.secret.clone(),
        site: id.site.clone(),
        vips_cidr: vips_cidr.to_string(),
        ca: id.ca_pem.clone(),
        cert: id.cert_pem.clone(),
        proof: hex::encode(proof),
        mac: Some(token.mac.clone()),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| describe_connection_error(&e))?;
    protocol::write_frame(&mut send, &req)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    protocol::read_frame(&mut recv)
        .await
        .map_err(|e| match conn.close_reason() {
            Some(r) => describe_connection_error(&r),
            None => e.to_string(),
        })
}

/// What the issuer's side needs.
pub struct Issuer {
    /// Our identity: the answer names our site, and we refuse our own CA.
    pub identity: Arc<SiteIdentity>,
    /// Grants to redeem against.
    pub grants: Arc<GrantStore>,
    /// Where the new acceptor link is recorded.
    pub links: Arc<Links>,
    /// Our `vips.cidr`, which the redeemer's must equal.
    pub vips_cidr: String,
    /// Redeem connections need no certificate, so anyone can make their warnings repeat:
    /// logged at most once per 10 s, with the count of those left out.
    pub warnings: crate::handshake::Throttle,
}

impl Issuer {
    /// Serves one redeem connection.
    pub async fn serve(&self, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let work = async {
            let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| describe_connection_error(&e))?;
            let req: RedeemRequest = protocol::read_frame(&mut recv).await.map_err(|e| e.to_string())?;
            let mut exporter = [0u8; 32];
            conn.export_keying_material(&mut exporter, REDEEM_EXPORTER_LABEL, req.grant.as_bytes())
                .map_err(|_| "TLS exporter unavailable".to_string())?;
            let response = match self.decide(&req, &exporter).await {
                Ok(()) => {
                    info!(%remote, site = %req.site, "token redeemed; link accepted");
                    RedeemResponse::Accepted {
                        site: self.identity.site.clone(),
                    }
                }
                Err(rejection) => {
                    if let Some(suppressed) = self.warnings.allow(std::time::Instant::now()) {
                        warn!(%remote, site = %req.site, %rejection, suppressed, "redemption refused");
                    }
                    RedeemResponse::Rejected(rejection)
                }
            };
            protocol::write_frame(&mut send, &response)
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            // Let the redeemer read the answer and close.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            Ok::<(), String>(())
        };
        let failure = match tokio::time::timeout(EXCHANGE_TIMEOUT, work).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("timed out".to_string()),
        };
        if let Some(error) = failure
            && let Some(suppressed) = self.warnings.allow(std::time::Instant::now())
        {
            warn!(%remote, %error, suppressed, "redeem connection failed");
        }
        conn.close(close::DONE.into(), b"done");
    }

    async fn decide(&self, req: &RedeemRequest, exporter: &[u8]) -> Result<(), Rejection> {
        let ca = identity::parse_cert_pem(&req.ca, "ca").map_err(|_| Rejection::BadCertificate)?;
        let cert = identity::parse_cert_pem(&req.cert, "cert").map_err(|_| Rejection::BadCertificate)?;
        let verifier = self
            .links
            .trust
            .single_root_verifier(&ca)
            .map_err(|_| Rejection::BadCertificate)?;
        verifier
            .verify_client_cert(&cert, &[], rustls::pki_types::UnixTime::now())
            .map_err(|_| Rejection::BadCertificate)?;
        if identity::is_member_cert(&cert) {
            // A sidecar's certificate speaks for one pod, never for its site.
            return Err(Rejection::BadCertificate);
        }
        let cert_site = identity::cert_dns_name(&cert).unwrap_or_default();
        if cert_site != req.site {
            return Err(Rejection::SiteMismatch {
                cert: cert_site,
                claimed: req.site.clone(),
            });
        }
        let proof = hex::decode(&req.proof).map_err(|_| Rejection::BadProof)?;
        if !identity::verify_signature(&cert, exporter, &proof) {
            return Err(Rejection::BadProof);
        }
        if req.site == self.identity.site || ca == self.identity.ca_der {
            return Err(Rejection::SameSite { site: req.site.clone() });
        }
        if req.vips_cidr != self.vips_cidr {
            return Err(Rejection::VipsMismatch {
                issuer: self.vips_cidr.clone(),
                redeemer: req.vips_cidr.clone(),
            });
        }
        // Before the grant: a refused redemption leaves the token usable. Held until the
        // link is recorded, so a concurrent redemption from the same site cannot slip past.
        let _reservation = self.links.reserve_peer(&req.site).map_err(|c| match c {
            PeerConflict::Linked { name, .. } => Rejection::AlreadyLinked {
                issuer: self.identity.site.clone(),
                peer: req.site.clone(),
                link: name,
            },
            PeerConflict::InProgress { .. } => Rejection::LinkInProgress {
                issuer: self.identity.site.clone(),
                peer: req.site.clone(),
            },
        })?;
        self.grants
            .redeem(&req.grant, &req.secret, req.mac.as_deref(), &req.site)
            .await?;
        let record = LinkRecord {
            name: self.links.acceptor_name(&req.site, &req.ca),
            peer_site: req.site.clone(),
            role: Role::Acceptor,
            addresses: Vec::new(),
            peer_ca: req.ca.clone(),
            cost: 1,
            created: SystemTime::now(),
        };
        self.links
            .add(record)
            .map_err(|e| Rejection::Internal { message: e.to_string() })
    }
}
