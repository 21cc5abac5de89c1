//! What an agent is in its site, and what the other end of one of its connections is.
//!
//! SPEC "What it is": each site runs one **gateway** agent; grid pods may run the same binary
//! as a **sidecar** that links only to its own site's gateway. The difference runs through
//! the mesh (who originates the site's advertisement and assigns VIPs), routing (a sidecar
//! sends everything it does not deliver itself to its gateway), the data plane (a sidecar
//! delivers its own pod's flows from the client's VIP), readiness, and the admin API (a
//! sidecar issues and redeems no tokens). Those decisions ask a [`Role`] or a [`Peer`]
//! rather than a flag, so each `match` says what each kind of agent does.

use serde::{Deserialize, Serialize};

/// What this agent is, from its configuration (`gateway:` set: a sidecar) and its
/// credentials (a member certificate: a sidecar), which must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The site's agent: links to other sites, originates the site's advertisement,
    /// assigns the site's VIPs, and delivers flows to its site's endpoints (through the
    /// sidecar of a member that has one).
    Gateway,
    /// An agent in one grid pod: links only to its gateway, originates nothing, sends its
    /// pod's exports to the gateway, and delivers only its own pod's flows.
    Sidecar,
}

impl Role {
    /// The role a configuration asks for: a sidecar names its gateway.
    pub fn of_config(config: &crate::config::Config) -> Role {
        if config.gateway.is_some() {
            Role::Sidecar
        } else {
            Role::Gateway
        }
    }

    /// `gateway` or `sidecar`, as `causeway status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Sidecar => "sidecar",
        }
    }

    /// The kind of connection this agent makes when it dials one of its link records: a
    /// sidecar's one record is its gateway, a gateway's are other sites.
    pub fn dialed_peer(self) -> Peer {
        match self {
            Role::Gateway => Peer::Site,
            Role::Sidecar => Peer::Gateway,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the other end of an established connection is, as this agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Another site's gateway: a link between sites (both ends are gateways).
    Site,
    /// Our own site's gateway (we are its sidecar): the mesh treats it as our one link.
    Gateway,
    /// One of our own site's sidecars (we are its gateway): not a link; it sends its pod's
    /// exports and is sent every advertisement.
    Sidecar,
}

impl Peer {
    /// Whether the connection is a link in the mesh's sense (adverts flow both ways, it
    /// counts for routing and readiness), rather than a sidecar's session on its gateway.
    pub fn is_link(self) -> bool {
        !matches!(self, Peer::Sidecar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_follows_the_configuration_and_names_what_it_dials() {
        let gw = crate::config::Config::parse("site: london\n", "t").unwrap();
        assert_eq!(Role::of_config(&gw), Role::Gateway);
        let sc = crate::config::Config::parse("site: london\ngateway: gw.example:7400\n", "t").unwrap();
        assert_eq!(Role::of_config(&sc), Role::Sidecar);
        assert_eq!(Role::Gateway.dialed_peer(), Peer::Site);
        assert_eq!(Role::Sidecar.dialed_peer(), Peer::Gateway);
        assert!(Peer::Site.is_link() && Peer::Gateway.is_link() && !Peer::Sidecar.is_link());
        assert_eq!(Role::Sidecar.to_string(), "sidecar");
        assert_eq!(serde_json::to_string(&Role::Gateway).unwrap(), "\"gateway\"");
    }
}
