//! `causeway demo`: the product in one process, on loopback, with no root and no setup.
//!
//! Two sites (london and paris) are initialised in a temporary directory, each runs a real
//! agent on its own loopback port, london issues a token through its admin socket, paris
//! redeems it through its own, and the link is shown up. Every step goes through the same
//! code (and the same admin API) as the real commands, and is printed as it happens.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::admin::{self, Request};
use crate::agent::Agent;
use crate::config::{self, Config};
use crate::identity;
use crate::link::LinkStatus;
use crate::state::StateDir;

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("causeway-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    println!(
        "causeway demo: two sites on loopback, state in {}",
        dir.path().display()
    );

    let mut agents = Vec::new();
    for site in ["london", "paris"] {
        let state = StateDir::new(dir.path().join(site));
        identity::create(&state, site)?;
        let mut cfg = Config::parse(&config::default_yaml(site), "demo")?;
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.metrics = None;
        let agent = Agent::start(state, cfg).await?;
        println!(
            "[1] site {site}: CA + agent certificate created, agent listening on udp {}",
            agent.local_addr
        );
        agents.push(agent);
    }
    let (london, paris) = (&agents[0], &agents[1]);

    let ask = |agent: &Agent, req: Request| {
        let root = agent.state.root.clone();
        let sock = agent.state.admin_socket();
        async move { admin::call(&root, &sock, &req).await }
    };

    let issued = ask(
        london,
        Request::TokenIssue {
            uses: 1,
            expires_secs: 900,
        },
    )
    .await?;
    let token = issued["token"].as_str().context("no token in the answer")?.to_string();
    println!(
        "[2] london issued a one-use token (grant {}, expires {})",
        issued["grant"], issued["expires"]
    );

    let redeemed = ask(
        paris,
        Request::TokenRedeem {
            token: token.clone(),
            name: None,
            cost: 1,
        },
    )
    .await?;
    println!(
        "[3] paris redeemed it: linked to {} ({})",
        redeemed["peer_site"], redeemed["addr"]
    );

    let again = ask(
        paris,
        Request::TokenRedeem {
            token,
            name: Some("again".into()),
            cost: 1,
        },
    )
    .await;
    match again {
        Err(e) => println!("[4] redeeming the same token again is refused: {e}"),
        Ok(_) => bail!("a one-use token was redeemed twice"),
    }

    for (agent, site) in [(paris, "paris"), (london, "london")] {
        let mut links: Vec<LinkStatus> = Vec::new();
        for _ in 0..50 {
            links = serde_json::from_value(ask(agent, Request::LinkList).await?)?;
            if links.iter().all(|l| l.state == crate::link::LinkState::Up) && !links.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for l in &links {
            println!(
                "[5] {site}: link {} to {} is {} (rtt {}, cost {}, since {})",
                l.name,
                l.peer_site,
                l.state,
                l.rtt_ms.map(|r| format!("{r:.2}ms")).unwrap_or_else(|| "-".into()),
                l.cost,
                l.since
            );
        }
        if !links.iter().any(|l| l.state == crate::link::LinkState::Up) {
            bail!("the link did not come up at {site}");
        }
    }

    for agent in &agents {
        agent.shutdown().await;
    }
    println!("demo finished: both agents shut down cleanly");
    Ok(())
}
