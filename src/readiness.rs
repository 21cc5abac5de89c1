//! When the agent is ready: the rule behind `/readyz` and `causeway status`'s `ready`.
//!
//! An agent that knows no peer answers NXDOMAIN for every remote name, and a grid member that
//! starts then forms a cluster of its own. So readiness means *has a catalogue*: a sidecar
//! once its gateway link is up and the gateway's first advert arrived on it; a site with
//! links recorded once at least one of them is up and has delivered an advert (both ends send
//! everything they know when a link comes up, so the first advert means the exchange
//! happened). A site with no links at all is ready: it is the whole clusterset it knows of,
//! and waiting would only keep a lone gateway out of its Service for ever.
//!
//! The rule is a pure function of the links' states ([`assess`]); the agent gathers them from
//! [`crate::link::Links::list`] and [`crate::mesh::Mesh::links_heard`].

use crate::link::LinkState;
use crate::role::Role;

/// One recorded link, as readiness sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    /// The link's name (`link list`).
    pub name: String,
    pub state: LinkState,
    /// An advert arrived on the link's current connection.
    pub heard: bool,
}

/// Whether the agent is ready, and why (or why not) in words for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// For `/readyz`'s body and `causeway status`, e.g. `no link up (2 recorded: london
    /// connecting, tokyo down)`.
    pub reason: String,
}

/// Applies the readiness rule (see the module doc) for an agent of `role`: a sidecar's one
/// link is to its gateway, so for it no link is never enough.
pub fn assess(role: Role, links: &[LinkFacts]) -> Readiness {
    let sidecar = role == Role::Sidecar;
    if let Some(link) = links.iter().find(|l| l.state == LinkState::Up && l.heard) {
        let reason = if sidecar {
            format!("catalogue from the gateway (link {})", link.name)
        } else {
            format!("catalogue from link {}", link.name)
        };
        return Readiness { ready: true, reason };
    }
    if links.is_empty() {
        return if sidecar {
            Readiness {
                ready: false,
                reason: "no gateway link (check `gateway:` in the configuration)".into(),
            }
        } else {
            Readiness {
                ready: true,
                reason: "no links recorded (a site on its own)".into(),
            }
        };
    }
    let any_up = links.iter().any(|l| l.state == LinkState::Up);
    let what = match (sidecar, any_up) {
        (true, true) => "the gateway has sent no advert yet",
        (true, false) => "the gateway link is not up",
        (false, true) => "no advert received yet",
        (false, false) => "no link up",
    };
    let each: Vec<String> = links
        .iter()
        .map(|l| match l.state {
            LinkState::Up => format!("{} up (no advert yet)", l.name),
            state => format!("{} {state}", l.name),
        })
        .collect();
    Readiness {
        ready: false,
        reason: format!("{what} ({} recorded: {})", links.len(), each.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, state: LinkState, heard: bool) -> LinkFacts {
        LinkFacts {
            name: name.into(),
            state,
            heard,
        }
    }

    #[test]
    fn a_site_without_links_is_ready_a_sidecar_without_one_is_not() {
        assert!(assess(Role::Gateway, &[]).ready);
        let r = assess(Role::Sidecar, &[]);
        assert!(!r.ready);
        assert!(r.reason.contains("gateway"), "{}", r.reason);
    }

    #[test]
    fn no_link_up_names_every_link_and_its_state() {
        let r = assess(
            Role::Gateway,
            &[
                link("london", LinkState::Connecting, false),
                link("tokyo", LinkState::Down, false),
            ],
        );
        assert!(!r.ready);
        assert_eq!(r.reason, "no link up (2 recorded: london connecting, tokyo down)");
    }

    #[test]
    fn an_up_link_counts_only_once_its_first_advert_arrived() {
        let waiting = [
            link("london", LinkState::Up, false),
            link("tokyo", LinkState::Down, false),
        ];
        let r = assess(Role::Gateway, &waiting);
        assert!(!r.ready);
        assert_eq!(
            r.reason,
            "no advert received yet (2 recorded: london up (no advert yet), tokyo down)"
        );
        let heard = [
            link("london", LinkState::Up, true),
            link("tokyo", LinkState::Down, false),
        ];
        let r = assess(Role::Gateway, &heard);
        assert!(r.ready, "{}", r.reason);
        assert_eq!(r.reason, "catalogue from link london");
    }

    #[test]
    fn a_heard_link_that_went_down_no_longer_counts() {
        // `heard` belongs to a connection; a link that is not up has none that counts.
        let r = assess(Role::Gateway, &[link("london", LinkState::Down, true)]);
        assert!(!r.ready);
    }

    #[test]
    fn a_sidecar_is_ready_once_its_gateway_has_sent_an_advert() {
        let r = assess(Role::Sidecar, &[link("gateway", LinkState::Connecting, false)]);
        assert!(!r.ready);
        assert_eq!(r.reason, "the gateway link is not up (1 recorded: gateway connecting)");
        let r = assess(Role::Sidecar, &[link("gateway", LinkState::Up, false)]);
        assert!(!r.ready);
        assert!(
            r.reason.starts_with("the gateway has sent no advert yet"),
            "{}",
            r.reason
        );
        assert!(assess(Role::Sidecar, &[link("gateway", LinkState::Up, true)]).ready);
    }
}
