//! `causeway demo`: the product in one process, on loopback, with no root and no setup.
//!
//! Two sites (london and paris) are initialised in a temporary directory, each runs a real
//! agent on its own loopback port, london issues a token through its admin socket, paris
//! redeems it through its own, and the link is shown up. London exports a small echo
//! service (TCP and UDP); paris learns it through the link and listens on its virtual IP; the
//! demo resolves the service's `clusterset.local` names through paris's DNS responder, connects
//! to the per-endpoint name's address and prints what came back through the tunnel. Every step
//! goes through the same code (and the same admin API) as the real commands.
//!
//! Both sites share this host's loopback, so london does not listen on its own endpoint's
//! VIP here (it would in production): the VIP on this host is paris's listener, and a
//! connection to it really crosses the link.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::admin::{self, AdminError, Call, api};
use crate::agent::{Agent, StartOptions};
use crate::config::{self, Config, EndpointSpec, Export};
use crate::identity;
use crate::names::{Label, PortSpec, Protocol};
use crate::state::StateDir;

/// Asks `agent` through its admin socket, as the CLI does.
async fn ask<C: Call>(agent: &Agent, req: C) -> Result<C::Reply, AdminError> {
    admin::call(&agent.state.root, &agent.admin_socket, req).await
}

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

    let echo_port = start_echo_servers().await?;
    let mut agents = Vec::new();
    for site in ["london", "paris"] {
        let state = StateDir::new(dir.path().join(site));
        identity::create(&state, site)?;
        let mut cfg = Config::parse(&config::default_yaml(&Label::new(site)?), "demo")?;
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.metrics = None;
        // Both sites share this host: each answers DNS on a port of its own.
        cfg.dns.listen = vec!["127.0.0.1:0".parse()?];
        if site == "london" {
            cfg.exports = vec![echo_export(echo_port)];
        }
        let opts = StartOptions {
            config_path: None,
            skip_own_vips: site == "london",
        };
        let agent = Agent::start(state, cfg, opts).await?;
        println!(
            "[1] site {site}: CA + agent certificate created, agent listening on udp {}",
            agent.local_addr
        );
        agents.push(agent);
    }
    println!("    london exports service echo.default (an echo server on 127.0.0.1:{echo_port}, TCP and UDP)");
    let (london, paris) = (&agents[0], &agents[1]);

    let issued = ask(
        london,
        api::TokenIssue {
            uses: 1,
            expires_secs: 900,
        },
    )
    .await?;
    println!(
        "[2] london issued a one-use token (grant {}, expires {})",
        issued.grant,
        crate::state::rfc3339::format(issued.expires)
    );

    let redeemed = ask(
        paris,
        api::TokenRedeem {
            token: issued.token.clone(),
            name: None,
            cost: 1,
        },
    )
    .await?;
    println!(
        "[3] paris redeemed it: linked to {} ({})",
        redeemed.peer_site, redeemed.addr
    );

    let again = ask(
        paris,
        api::TokenRedeem {
            token: issued.token,
            name: Some(Label::new("again")?),
            cost: 1,
        },
    )
    .await;
    match again {
        Err(e) => println!("[4] redeeming the same token again is refused: {e}"),
        Ok(_) => bail!("a one-use token was redeemed twice"),
    }

    for (agent, site) in [(paris, "paris"), (london, "london")] {
        let links = poll(50, Duration::from_millis(100), || async {
            let links = ask(agent, api::LinkList {}).await?;
            let up = !links.is_empty() && links.iter().all(|l| l.state == crate::link::LinkState::Up);
            Ok((links, up))
        })
        .await?;
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

    // paris learns london's export through the link and listens on its VIP.
    let vip = poll(100, Duration::from_millis(50), || async {
        let services = ask(paris, api::ServiceList {}).await?;
        let vip = services
            .iter()
            .find(|s| s.service == "echo")
            .and_then(|s| s.endpoints.first())
            .and_then(|e| e.vip);
        Ok((vip, vip.is_some()))
    })
    .await?
    .context("paris never learned london's echo service")?;
    println!("[6] paris sees echo.default: endpoint echo-0 in london (real address 127.0.0.1), VIP {vip}");

    // The names grid members use: asked of paris's own DNS responder, as a pod in paris would.
    let dns = crate::dns::client::server_for(
        *paris
            .dns_addrs()
            .first()
            .context("paris's DNS responder is not listening")?,
    );
    let zone = "clusterset.local";
    let mut by_name = None;
    for (name, qtype) in [
        (format!("echo.default.svc.{zone}"), hickory_proto::rr::RecordType::A),
        (
            format!("echo-0.london.echo.default.svc.{zone}"),
            hickory_proto::rr::RecordType::A,
        ),
        (
            format!("_tcp-echo._tcp.echo.default.svc.{zone}"),
            hickory_proto::rr::RecordType::SRV,
        ),
    ] {
        let fqdn = hickory_proto::rr::Name::from_ascii(format!("{name}."))?;
        let answer = crate::dns::client::query(dns, &fqdn, qtype).await?;
        println!("[7] DNS  {name} {qtype} (asked of paris's responder at {dns}):");
        for record in &answer.answers {
            println!("       {}", crate::dns::client::format_record(record));
            if name.starts_with("echo-0.")
                && let hickory_proto::rr::RData::A(a) = &record.data
            {
                by_name = Some(std::net::IpAddr::V4(a.0));
            }
        }
    }
    let reached = by_name.context("the per-endpoint name did not resolve")?;
    if reached != vip {
        bail!("echo-0's name resolved to {reached}, not its VIP {vip}");
    }

    let addr = std::net::SocketAddr::new(reached, echo_port);
    let message = b"hello from paris, through the causeway";
    // The listener may still be starting: a refused connection is retried, not fatal.
    let reply = poll(50, Duration::from_millis(50), || async {
        let reply = tcp_round_trip(addr, message).await.unwrap_or_default();
        let done = !reply.is_empty();
        Ok((reply, done))
    })
    .await?;
    if reply != message {
        bail!(
            "the echo over TCP through the tunnel came back wrong: {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    println!(
        "[8] TCP  echo-0.london.echo.default.svc.{zone}:{echo_port} ({addr}): sent {:?}, got back {:?}",
        String::from_utf8_lossy(message),
        String::from_utf8_lossy(&reply)
    );
    let reply = udp_round_trip(addr, b"a datagram from paris").await?;
    println!(
        "[9] UDP  echo-0.london.echo.default.svc.{zone}:{echo_port} ({addr}): sent \"a datagram from paris\", got back {:?}",
        String::from_utf8_lossy(&reply)
    );

    for agent in &agents {
        agent.shutdown().await;
    }
    println!("demo finished: both agents shut down cleanly");
    Ok(())
}

/// Runs `probe` up to `tries` times, `every` apart, until it says it is done; returns the
/// last value it produced either way (the caller decides whether that is a failure). An
/// error from `probe` ends the wait at once.
async fn poll<T, F, Fut>(tries: u32, every: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, bool)>>,
{
    let mut attempt = 1;
    loop {
        let (value, done) = probe().await?;
        if done || attempt >= tries {
            return Ok(value);
        }
        attempt += 1;
        tokio::time::sleep(every).await;
    }
}

fn echo_export(port: u16) -> Export {
    Export {
        service: "echo".into(),
        namespace: None,
        ports: vec![
            PortSpec {
                name: "tcp-echo".into(),
                port,
                protocol: Protocol::Tcp,
            },
            PortSpec {
                name: "udp-echo".into(),
                port,
                protocol: Protocol::Udp,
            },
        ],
        endpoints: vec![EndpointSpec {
            hostname: "echo-0".into(),
            ip: [127, 0, 0, 1].into(),
            ready: true,
        }],
    }
}

/// Starts TCP and UDP echo servers on the same free port of 127.0.0.1.
async fn start_echo_servers() -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..20 {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = tcp.local_addr()?.port();
        let Ok(udp) = tokio::net::UdpSocket::bind(("127.0.0.1", port)).await else {
            continue;
        };
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], from).await;
            }
        });
        return Ok(port);
    }
    bail!("no free port for the echo servers")
}

async fn tcp_round_trip(addr: std::net::SocketAddr, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(message).await?;
    s.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await??;
    Ok(reply)
}

async fn udp_round_trip(addr: std::net::SocketAddr, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut buf = vec![0u8; 65536];
    for _ in 0..10 {
        s.send_to(message, addr).await?;
        if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await {
            return Ok(buf[..n].to_vec());
        }
    }
    bail!("no UDP answer from {addr} through the tunnel")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn poll_stops_when_done_gives_up_after_tries_and_stops_on_error() {
        let mut calls = 0;
        let v = poll(10, Duration::ZERO, || {
            calls += 1;
            let n = calls;
            async move { Ok((n, n == 3)) }
        })
        .await
        .unwrap();
        assert_eq!((v, calls), (3, 3), "stops at the first done");

        let mut calls = 0;
        let v = poll(4, Duration::ZERO, || {
            calls += 1;
            let n = calls;
            async move { Ok((n, false)) }
        })
        .await
        .unwrap();
        assert_eq!((v, calls), (4, 4), "the last value after `tries` attempts");

        let mut calls = 0;
        let r: anyhow::Result<u32> = poll(4, Duration::ZERO, || {
            calls += 1;
            async { anyhow::bail!("admin socket gone") }
        })
        .await;
        assert!(r.is_err() && calls == 1, "an error ends the wait at once");
    }
}
