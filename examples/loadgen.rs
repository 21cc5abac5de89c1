//! Load generator for `bench/run.sh`: a TCP echo server and the clients that measure
//! request/response latency, connections per second and idle flows through a tunnel.
//!
//! ```text
//! loadgen echo-server --listen 0.0.0.0:7007 --oneshot 0.0.0.0:7008
//! loadgen pingpong --addr 127.0.0.1:7007 --count 20000
//! loadgen connrate --addr 127.0.0.1:7008 --seconds 5 --concurrency 32
//! loadgen idle --addr 127.0.0.1:7007 --flows 1000 --hold 10 --ready-file /tmp/ready
//! ```
//!
//! Every client prints one JSON object on stdout. A `--listen` address echoes everything
//! until the client closes; a `--oneshot` address answers the first read and then closes the
//! connection itself, so the server side of every hop is the one left in TIME_WAIT and a
//! client opening thousands of connections per second does not run out of ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long one connect or one read may take before it counts as a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "TCP load generator for the causeway benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server: `--listen` echoes until EOF, `--oneshot` answers once and closes.
    EchoServer {
        #[arg(long)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        oneshot: Vec<SocketAddr>,
    },
    /// One connection, `count` 1-byte round trips after `warmup`; median and p99 in µs.
    Pingpong {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 1_000)]
        warmup: usize,
        /// Stop measuring after this many seconds even if fewer than `count` round trips were
        /// made (the output's `count` says how many): bench/latency.sh measures while a bulk
        /// transfer of fixed length runs, and slow round trips must not outlast it.
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// New connections as fast as possible, each with a 1-byte round trip, closed by the server.
    Connrate {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Opens `flows` connections, one round trip on each, holds them `hold` seconds, closes.
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1_000)]
        flows: usize,
        #[arg(long, default_value_t = 10)]
        hold: u64,
        /// Written (with the number of open flows) once every flow is open.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Connections opened at the same time while setting up.
        #[arg(long, default_value_t = 50)]
        parallel: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Latency is measured on one thread, so no cross-thread wake-up sits in every round trip.
    let rt = match cli.cmd {
        Cmd::Pingpong { .. } => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
    };
    rt.block_on(async move {
        match cli.cmd {
            Cmd::EchoServer { listen, oneshot } => echo_server(listen, oneshot).await,
            Cmd::Pingpong {
                addr,
                count,
                warmup,
                seconds,
            } => pingpong(addr, count, warmup, seconds.map(Duration::from_secs_f64)).await,
            Cmd::Connrate {
                addr,
                seconds,
                concurrency,
            } => connrate(addr, seconds, concurrency).await,
            Cmd::Idle {
                addr,
                flows,
                hold,
                ready_file,
                parallel,
            } => idle(addr, flows, hold, ready_file, parallel).await,
        }
    })
}

async fn echo_server(listen: Vec<SocketAddr>, oneshot: Vec<SocketAddr>) -> anyhow::Result<()> {
    if listen.is_empty() && oneshot.is_empty() {
        bail!("give at least one --listen or --oneshot address");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (addr, once) in listen
        .into_iter()
        .map(|a| (a, false))
        .chain(oneshot.into_iter().map(|a| (a, true)))
    {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tasks.spawn(async move {
            loop {
                let (s, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("accept on {addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                tokio::spawn(echo(s, once));
            }
        });
    }
    eprintln!("echo-server ready");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn echo(mut s: TcpStream, once: bool) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() || once {
                    return;
                }
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends one byte and waits for it to come back.
async fn round_trip(s: &mut TcpStream, byte: u8) -> anyhow::Result<()> {
    s.write_all(&[byte]).await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut b))
        .await
        .context("no answer")??;
    if b[0] != byte {
        bail!("echo answered {} to {byte}", b[0]);
    }
    Ok(())
}

/// (median, p99) of the samples in µs.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e6
    };
    (at(0.5), at(0.99))
}

async fn pingpong(addr: SocketAddr, count: usize, warmup: usize, limit: Option<Duration>) -> anyhow::Result<()> {
    let mut s = connect(addr).await?;
    for i in 0..warmup {
        round_trip(&mut s, i as u8).await.context("warm-up")?;
    }
    let mut samples = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        if limit.is_some_and(|l| start.elapsed() >= l) {
            break;
        }
        let t = Instant::now();
        round_trip(&mut s, i as u8).await?;
        samples.push(t.elapsed());
    }
    let count = samples.len();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1e6 / count.max(1) as f64;
    let (median, p99) = percentiles(&mut samples);
    println!(
        "{}",
        json!({"addr": addr, "count": count, "median_us": median, "p99_us": p99, "mean_us": mean})
    );
    Ok(())
}

async fn connrate(addr: SocketAddr, seconds: u64, concurrency: usize) -> anyhow::Result<()> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (ok, failed) = (ok.clone(), failed.clone());
        workers.spawn(async move {
            let mut samples = Vec::new();
            let mut last_error = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match one_connection(addr).await {
                    Ok(()) => {
                        samples.push(t.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(format!("{e:#}"));
                    }
                }
            }
            (samples, last_error)
        });
    }
    let mut samples = Vec::new();
    let mut last_error = None;
    while let Some(r) = workers.join_next().await {
        let (s, e) = r?;
        samples.extend(s);
        last_error = e.or(last_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    let (median, p99) = percentiles(&mut samples);
    println!(
        "{}",
        json!({
            "addr": addr,
            "concurrency": concurrency,
            "seconds": elapsed,
            "connections": ok,
            "failed": failed.load(Ordering::Relaxed),
            "per_sec": ok as f64 / elapsed,
            "conn_median_us": median,
            "conn_p99_us": p99,
            "last_error": last_error,
        })
    );
    Ok(())
}

/// Connect, one round trip, then wait for the server to close first.
async fn one_connection(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = connect(addr).await?;
    round_trip(&mut s, b'c').await?;
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut rest))
        .await
        .context("server did not close")??;
    if n != 0 {
        bail!("unexpected {n} bytes after the answer");
    }
    Ok(())
}

async fn idle(
    addr: SocketAddr,
    flows: usize,
    hold: u64,
    ready_file: Option<PathBuf>,
    parallel: usize,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..flows {
        let limit = limit.clone();
        opening.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let mut s = connect(addr).await?;
            round_trip(&mut s, i as u8).await?;
            anyhow::Ok(s)
        });
    }
    let mut open = Vec::with_capacity(flows);
    let mut last_error = None;
    while let Some(r) = opening.join_next().await {
        match r? {
            Ok(s) => open.push(s),
            Err(e) => last_error = Some(format!("{e:#}")),
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    if let Some(path) = &ready_file {
        std::fs::write(path, format!("{}\n", open.len())).with_context(|| format!("writing {}", path.display()))?;
    }
    tokio::time::sleep(Duration::from_secs(hold)).await;
    // Every flow must still work after the hold, or it was not really held open.
    let check = Instant::now();
    let mut alive = 0usize;
    for (i, s) in open.iter_mut().enumerate() {
        if round_trip(s, i as u8).await.is_ok() {
            alive += 1;
        }
    }
    let check_secs = check.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "addr": addr,
            "flows": flows,
            "opened": open.len(),
            "alive_after_hold": alive,
            "open_secs": open_secs,
            "hold_secs": hold,
            "check_secs": check_secs,
            "last_error": last_error,
        })
    );
    drop(open);
    if alive < flows {
        bail!("only {alive} of {flows} flows survived the hold");
    }
    Ok(())
}
