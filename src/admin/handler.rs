//! The agent's side of the admin API: answers each request ([`super::api`]) from the
//! running agent's parts (links, grants, mesh, data plane, DNS responder), so the agent
//! itself ([`crate::agent`]) only starts, wires and stops them.
//!
//! A sidecar refuses what belongs to its gateway (tokens, removing links); every refusal is a
//! [`Refusal`], whose text the CLI prints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{Instrument, info, info_span, warn};

use super::Handler;
use super::api::{
    AgentStatus, Counters, LinkRemove, LinkRemoved, Redeemed, ReloadStatus, TokenIssue, TokenIssued, TokenRedeem,
    TokenRevoke, VipsStatus,
};
use crate::catalog::ServiceView;
use crate::config::VipMode;
use crate::dns::Responder;
use crate::forward::Forwarder;
use crate::identity::SiteIdentity;
use crate::link::redeem;
use crate::link::{LinkRecord, LinkState, LinkStatus, Links, Role as LinkRole};
use crate::mesh::Mesh;
use crate::names::Label;
use crate::readiness::{LinkFacts, Readiness};
use crate::rlimit::OpenFiles;
use crate::role::Role;
use crate::state::rfc3339;
use crate::token::{GrantStore, GrantView, Token, TokenFor};

/// How long `token redeem` waits for the new link to come up before answering.
const REDEEM_WAIT_UP: Duration = Duration::from_secs(10);

/// What the agent answers admin requests from: shared handles on its running parts, and the
/// facts `status` reports that do not change while it runs.
pub struct AgentHandler {
    /// Our certificates (the site id; the CA a token carries; the redeemer's identity).
    pub identity: Arc<SiteIdentity>,
    /// The one QUIC endpoint, which a redemption dials from.
    pub endpoint: quinn::Endpoint,
    /// The address the endpoint is bound to.
    pub local_addr: SocketAddr,
    /// The addresses tokens carry (`host:port`; from `advertise`, else `listen`).
    pub advertise: Vec<String>,
    /// `vips.cidr` as text, which a redemption sends the issuer.
    pub vips_cidr: String,
    /// The state directory, as given.
    pub state_dir: PathBuf,
    /// When the agent started.
    pub started: SystemTime,
    /// The open-files limit after raising it (`None`: it could not be read).
    pub open_files: Option<OpenFiles>,
    /// Links to other sites.
    pub links: Arc<Links>,
    /// Grants issued by this site.
    pub grants: Arc<GrantStore>,
    /// The live catalog and routes.
    pub mesh: Arc<Mesh>,
    /// The data plane (served services, listeners, interception).
    pub forwarder: Arc<Forwarder>,
    /// The `clusterset.local` DNS responder.
    pub dns: Arc<Responder>,
    /// The last change to causeway.yaml picked up while running ([`AgentHandler::reloaded`]).
    pub reload: Mutex<Option<ReloadStatus>>,
}

/// Why the agent refused an admin request; the CLI prints its text.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A sidecar issues and redeems no tokens and removes no links (its site's gateway does).
    #[error(
        "this agent is a sidecar of site {0}: it links only to its gateway; issue and redeem tokens, \
         and remove links, on the gateway"
    )]
    Sidecar(String),
    /// The link's name is not a DNS-1123 label: the issuer's site id, taken when no `--name`
    /// was given (a `--name` itself is checked as the request is read, [`crate::names::Label`]).
    #[error("link name {0:?} must be a DNS-1123 label (lowercase letters, digits, '-')")]
    LinkName(String),
    /// `--cost 0`.
    #[error("--cost must be at least 1")]
    ZeroCost,
    /// The token text does not parse.
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
    /// Issuing or revoking a grant failed.
    #[error(transparent)]
    Grants(#[from] crate::token::GrantStoreError),
    /// A link to the token's issuer exists or is being made.
    #[error(transparent)]
    Peer(#[from] crate::link::PeerConflict),
    /// Recording or removing a link failed.
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    /// The redemption with the issuer failed.
    #[error(transparent)]
    Redeem(#[from] redeem::RedeemError),
}

#[async_trait::async_trait]
impl Handler for AgentHandler {
    type Error = Refusal;

    async fn token_issue(&self, req: TokenIssue) -> Result<TokenIssued, Refusal> {
        self.gateway_only()?;
        self.issue(req.uses, Duration::from_secs(req.expires_secs)).await
    }

    async fn token_redeem(&self, req: TokenRedeem) -> Result<Redeemed, Refusal> {
        self.gateway_only()?;
        self.redeem(&req.token, req.name, req.cost).await
    }

    async fn token_list(&self) -> Result<Vec<GrantView>, Refusal> {
        Ok(self.grants.list().await)
    }

    async fn token_revoke(&self, req: TokenRevoke) -> Result<GrantView, Refusal> {
        self.gateway_only()?;
        let view = self.grants.revoke(&req.grant).await?;
        info!(grant = %view.grant, redeemed = view.redeemed, uses = view.uses, "token revoked");
        Ok(view)
    }

    async fn link_list(&self) -> Result<Vec<LinkStatus>, Refusal> {
        Ok(self.links.list())
    }

    async fn link_remove(&self, req: LinkRemove) -> Result<LinkRemoved, Refusal> {
        self.gateway_only()?;
        let record = self.links.remove(&req.name)?;
        Ok(LinkRemoved {
            name: record.name,
            peer_site: record.peer_site,
        })
    }

    async fn status(&self) -> Result<AgentStatus, Refusal> {
        Ok(self.agent_status().await)
    }

    async fn service_list(&self) -> Result<Vec<ServiceView>, Refusal> {
        Ok(self.forwarder.served_view().services.clone())
    }
}

impl AgentHandler {
    /// Refuses what only a gateway does (tokens, removing links) on a sidecar.
    fn gateway_only(&self) -> Result<(), Refusal> {
        match self.mesh.role() {
            Role::Gateway => Ok(()),
            Role::Sidecar => Err(Refusal::Sidecar(self.identity.site.clone())),
        }
    }

    /// `token issue`: records a grant and returns its token.
    async fn issue(&self, uses: u32, ttl: Duration) -> Result<TokenIssued, Refusal> {
        let addresses = self.advertise.clone();
        if addresses
            .iter()
            .all(|a| a.starts_with("127.") || a.starts_with("[::1]") || a.starts_with("localhost"))
        {
            warn!(
                ?addresses,
                "the token advertises only loopback addresses; set `advertise:` in causeway.yaml so other machines can reach this site"
            );
        }
        let to = TokenFor {
            issuer: self.identity.site.clone(),
            addresses,
            ca: self.identity.ca_pem.clone(),
        };
        let (grant, token) = self.grants.issue(uses, ttl, to).await?;
        info!(grant = %grant.id, uses, expires = %rfc3339::format(grant.expires), "token issued");
        Ok(TokenIssued {
            token: token.to_yaml(),
            grant: grant.id,
            expires: grant.expires,
            uses,
        })
    }

    /// `token redeem`: checks the request, redeems the token with its issuer, records the
    /// link and waits (bounded) for it to come up.
    async fn redeem(&self, text: &str, name: Option<Label>, cost: u32) -> Result<Redeemed, Refusal> {
        let token = Token::parse(text)?;
        let name = match name {
            Some(name) => String::from(name),
            None => Label::new(token.issuer.clone())
                .map_err(|e| Refusal::LinkName(e.value))?
                .into(),
        };
        if cost == 0 {
            return Err(Refusal::ZeroCost);
        }
        // One link per pair of sites, checked before dialing so the token is not spent (and
        // before the name, whose clash is usually this one); held until the link is recorded.
        let _reservation = self.links.reserve_peer(&token.issuer)?;
        if self.links.contains(&name) {
            return Err(crate::link::LinkError::Exists(name).into());
        }
        let span = info_span!("redeem", issuer = %token.issuer, link = %name);
        let redeemed = redeem::redeem(&self.endpoint, &self.identity, &token, &self.vips_cidr)
            .instrument(span)
            .await?;
        self.links.add(LinkRecord {
            name: name.clone(),
            peer_site: redeemed.site.clone(),
            role: LinkRole::Dialer,
            addresses: token.addresses.clone(),
            peer_ca: token.ca.clone(),
            cost,
            created: SystemTime::now(),
        })?;
        info!(link = %name, peer = %redeemed.site, addr = %redeemed.addr, "token redeemed");
        let status = self.links.wait_up(&name, REDEEM_WAIT_UP).await;
        Ok(Redeemed {
            name,
            peer_site: redeemed.site,
            addr: redeemed.addr,
            state: status.as_ref().map(|s| s.state).unwrap_or(LinkState::Connecting),
            last_error: status.and_then(|s| s.last_error),
        })
    }

    /// Whether the agent has a catalogue to answer from ([`crate::readiness`]): `/readyz`
    /// and `causeway status`.
    pub fn readiness(&self) -> Readiness {
        let heard = self.mesh.links_heard();
        let facts: Vec<LinkFacts> = self
            .links
            .list()
            .into_iter()
            .map(|l| LinkFacts {
                heard: heard.contains(&l.name),
                name: l.name,
                state: l.state,
            })
            .collect();
        crate::readiness::assess(self.mesh.role(), &facts)
    }

    /// `causeway status`.
    async fn agent_status(&self) -> AgentStatus {
        let readiness = self.readiness();
        let links = self.links.list();
        let view = self.mesh.view();
        let intercept = self.forwarder.intercept_status().await;
        let counters = Counters {
            links_total: links.len(),
            links_up: links.iter().filter(|l| l.state == LinkState::Up).count(),
            grants_open: self.grants.open_count().await,
            services: view.services.len(),
            endpoints_ready: view
                .services
                .iter()
                .flat_map(|s| &s.endpoints)
                .filter(|e| e.ready)
                .count(),
            listeners: self.forwarder.listener_count(),
        };
        AgentStatus {
            site: self.identity.site.clone(),
            mode: self.mesh.role(),
            listen: self.local_addr,
            advertise: self.advertise.clone(),
            state_dir: self.state_dir.display().to_string(),
            started: self.started,
            uptime_secs: self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            ready: readiness.ready,
            ready_reason: readiness.reason,
            links,
            vips: VipsStatus {
                cidr: self.mesh.range().cidr(),
                block: self.mesh.block(),
                mode: if intercept.is_some() {
                    VipMode::Intercept
                } else {
                    VipMode::Listen
                },
                intercept,
            },
            routes: view.routes.clone(),
            services: view.services.clone(),
            conflicts: view.conflicts.clone(),
            listener_errors: self.forwarder.bind_errors(),
            open_files: self.open_files,
            config_reload: lock(&self.reload).clone(),
            sidecars: self.links.members(),
            dns: self.dns.status(),
            counters,
        }
    }

    /// Records the outcome of a change to causeway.yaml picked up while running, for `status`.
    pub fn reloaded(&self, status: ReloadStatus) {
        *lock(&self.reload) = Some(status);
    }
}

/// Locks `m`, whose value stays whole even if a holder panicked (every update is one step).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
