//! The command line: argument parsing (clap derive) and the output of every command.
//!
//! `token`, `link`, `service` and `status` talk to the running agent through its admin socket;
//! `init`, `run`, `demo`, `resolve` (which asks the DNS responder), `sidecar credentials` and
//! `intercept` do not. Every command exits 0 on success, 2 on a usage error (the
//! command line itself: clap's errors, and values checked by the value parsers here or
//! raised as [`UsageError`]) and 1 on any other error, printing one line on stderr that names
//! what was wrong and what to do; `-o json|yaml` gives machine readable output where a
//! command lists things. `--help` and `--version` exit 0.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::admin::{self, api};
use crate::agent::Agent;
use crate::catalog::ServiceView;
use crate::config::{self, Config};
use crate::identity;
use crate::link::{LinkState, LinkStatus};
use crate::names::{LABEL_RULE, Label, is_dns_label};
use crate::state::StateDir;
use crate::token::GrantView;

/// Stretch clustered software across sites: one binary, one token.
#[derive(Debug, Parser)]
#[command(name = "causeway", version, about, long_about = None)]
pub struct Cli {
    /// The site's state directory (keys, certificates, links, grants).
    #[arg(long, global = true, env = "CAUSEWAY_STATE", default_value = "/var/lib/causeway")]
    pub state: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Output format of listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the state dir: site CA, agent certificate, and causeway.yaml if absent.
    Init {
        /// The site's cluster id (a DNS-1123 label).
        #[arg(long, value_parser = parse_site)]
        site: Label,
        /// Where to write causeway.yaml (default: <state>/causeway.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the agent in the foreground until SIGINT/SIGTERM.
    Run {
        /// The configuration file (default: <state>/causeway.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Issue and redeem link tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List and remove links to other sites.
    #[command(subcommand)]
    Link(LinkCommand),
    /// Services of the clusterset.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Sidecar credentials (run on a site's gateway).
    #[command(subcommand)]
    Sidecar(SidecarCommand),
    /// Set up or remove the nftables rule of `vips.mode: intercept` in this network
    /// namespace (needs CAP_NET_ADMIN; in Kubernetes, an initContainer's job).
    #[command(subcommand)]
    Intercept(InterceptCommand),
    /// Site, links and counters in one view.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Two sites in one process on loopback, linked by a token; prints each step.
    Demo,
    /// Ask this site's DNS responder (the first dns.listen address), for debugging; prints the
    /// answer records like `dig +noall +answer`. Any rcode but NOERROR (e.g. NXDOMAIN) is
    /// printed on stderr and exits 1.
    Resolve {
        /// A name (etcd.default.svc.clusterset.local), or an address to look up its PTR.
        name: String,
        /// Record type (default: A, or PTR when NAME is an address).
        #[arg(long = "type", value_enum, ignore_case = true)]
        qtype: Option<QueryType>,
        /// The configuration file naming dns.listen (default: <state>/causeway.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Record types `causeway resolve` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryType {
    A,
    Aaaa,
    Srv,
    Txt,
    Ptr,
    Soa,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Ask the running agent for a grant and write the token.
    Issue {
        /// How many sites may redeem this token (1 to 1000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=crate::token::MAX_USES as i64))]
        uses: u32,
        /// How long the token stays valid (e.g. 15m, 2h, 1d; 1s to 30 days).
        #[arg(long, default_value = "15m", value_parser = parse_token_ttl)]
        expires: Duration,
        /// Write the token to this file (mode 0600) instead of standard output.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Redeem a token (a file, or - for standard input): link this site to the issuer.
    Redeem {
        /// The token file, or - to read standard input.
        file: String,
        /// Local name of the link (default: the issuer's site id).
        #[arg(long, value_parser = parse_label)]
        name: Option<Label>,
        /// Routing cost of the link (at least 1); lower is preferred.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        cost: u32,
    },
    /// The tokens this site issued: state (open/used/expired/revoked), uses, who redeemed them.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke a token this site issued, so it redeems no more (links already made with it
    /// stay; remove those with `link remove`).
    Revoke {
        /// The grant id (`token list`, or the token's `grant` field), or a unique prefix of it.
        #[arg(value_parser = parse_grant_prefix)]
        grant: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Every service in the clusterset: site, endpoints, ports, ready, virtual IPs.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum SidecarCommand {
    /// Write member credentials for sidecars: the site CA certificate and a member
    /// certificate and key it signs (needs the gateway's state, which holds the CA key).
    Credentials {
        /// A Kubernetes Secret manifest, or a directory usable as a sidecar's `--state`.
        #[arg(long, value_enum, default_value_t = CredentialsFormat::Secret)]
        format: CredentialsFormat,
        /// Where to write: the manifest file, or the directory.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// The Secret's name (with `--format secret`; a DNS-1123 subdomain).
        #[arg(long, default_value = "causeway-member", value_parser = parse_subdomain)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum InterceptCommand {
    /// Install (or replace) the nftables table `causeway` that redirects TCP and UDP for
    /// vips.cidr to the agent's intercept port. Idempotent.
    Install {
        /// The configuration file naming vips.cidr and vips.intercept_port (default:
        /// <state>/causeway.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Remove the nftables table `causeway`. Removing one that is not there succeeds.
    Remove {
        /// Accepted for symmetry with `install` (so one argument list serves both); the
        /// table's name does not depend on it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Forms of sidecar credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CredentialsFormat {
    Secret,
    Dir,
}

#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// List links with peer site, state, RTT, cost and since.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Drop a link and revoke the peer's trust on this side at once.
    Remove {
        #[arg(value_parser = parse_label)]
        name: Label,
    },
}

/// A token's lifetime: a duration the issuer accepts, so a bad one is a usage error here
/// rather than a refusal from the agent.
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 15m, 2h, 7d)"))?;
    if d < Duration::from_secs(1) || d > crate::token::MAX_TTL {
        return Err("must be between 1s and 30 days (examples: 90s, 15m, 2h, 7d)".into());
    }
    Ok(d)
}

/// A link name or other DNS-1123 label; clap's message already quotes the value, so the
/// error is the rule alone.
fn parse_label(s: &str) -> Result<Label, String> {
    Label::new(s).map_err(|_| LABEL_RULE.to_owned())
}

fn parse_site(s: &str) -> Result<Label, String> {
    parse_label(s).map_err(|rule| format!("not a valid site id: {rule}"))
}

/// A Kubernetes object name: dot-separated DNS-1123 labels, at most 253 characters.
fn parse_subdomain(s: &str) -> Result<String, String> {
    if s.len() <= 253 && s.split('.').all(is_dns_label) {
        Ok(s.to_string())
    } else {
        Err("use a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', e.g. causeway-member".into())
    }
}

fn parse_grant_prefix(s: &str) -> Result<String, String> {
    let t = s.trim();
    if !t.is_empty() && t.len() <= 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(t.to_string())
    } else {
        Err("a grant id is up to 32 hex digits; `causeway token list` shows them".into())
    }
}

/// A bad command line found after parsing: exits 2, like clap's own errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit status of a usage error.
const USAGE: u8 = 2;

/// Makes a command with subcommands answer a missing one with an error (exit 2) rather than
/// its help text, so that every usage error is one line.
fn no_help_instead_of_errors(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd.get_subcommands().map(|c| c.get_name().to_string()).collect();
    let mut cmd = cmd.arg_required_else_help(false);
    for name in names {
        cmd = cmd.mut_subcommand(name, no_help_instead_of_errors);
    }
    cmd
}

/// Parses `args` (the first being the program name): the command line, or the exit to take
/// with what to print (help and version on stdout, exit 0; errors as one line, exit 2).
pub fn parse_args<I, T>(args: I) -> Result<Cli, (ExitCode, String)>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let cmd = no_help_instead_of_errors(Cli::command());
    match cmd
        .clone()
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => Ok(cli),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                Err((ExitCode::SUCCESS, e.render().to_string()))
            }
            _ => Err((
                ExitCode::from(USAGE),
                format!("error: {}; see `{} --help`\n", one_line(&e), command_path(&cmd, &args)),
            )),
        },
    }
}

/// The subcommand a command line names, as far as it goes (`causeway token issue`): the
/// words that name subcommands, in order, skipping everything else.
fn command_path(cmd: &clap::Command, args: &[std::ffi::OsString]) -> String {
    let mut path = vec![cmd.get_name().to_string()];
    let mut current = cmd;
    for arg in args.iter().skip(1).filter_map(|a| a.to_str()) {
        if let Some(sub) = current.find_subcommand(arg) {
            path.push(sub.get_name().to_string());
            current = sub;
        }
    }
    path.join(" ")
}

/// Clap's error as one line: the message and its tips, without the usage and the pointer to
/// `--help` that clap renders on lines of their own.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let mut parts = Vec::new();
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("Usage:") {
            // The usage may continue on indented lines; nothing after it is the message.
            break;
        }
        if !line.starts_with("For more information") {
            parts.push(line.strip_prefix("error:").unwrap_or(line).trim().to_string());
        }
    }
    parts.join(" ")
}

/// Parses the command line, runs the command and maps errors to exit status 2 (usage) or 1.
pub fn main() -> ExitCode {
    let cli = match parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err((code, text)) => {
            if code == ExitCode::SUCCESS {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
            return code;
        }
    };
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            if e.is::<UsageError>() {
                ExitCode::from(USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = match cli.command {
        Command::Run { .. } => "info",
        Command::Demo => "error",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only for a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let state = StateDir::new(&cli.state);
    match cli.command {
        Command::Init { site, config } => init(&state, &site, config.as_deref()),
        Command::Run { config } => run_agent(state, config).await,
        Command::Token(TokenCommand::Issue { uses, expires, output }) => {
            token_issue(&state, uses, expires, output).await
        }
        Command::Token(TokenCommand::Redeem { file, name, cost }) => token_redeem(&state, &file, name, cost).await,
        Command::Token(TokenCommand::List { output }) => token_list(&state, output).await,
        Command::Token(TokenCommand::Revoke { grant }) => token_revoke(&state, &grant).await,
        Command::Link(LinkCommand::List { output }) => {
            let links = call(&state, api::LinkList {}).await?;
            print_output(output, &links, || links_table(&links))
        }
        Command::Link(LinkCommand::Remove { name }) => {
            let removed = call(&state, api::LinkRemove { name }).await?;
            println!(
                "removed link {} to {}; its trust is revoked",
                removed.name, removed.peer_site
            );
            Ok(())
        }
        Command::Service(ServiceCommand::List { output }) => {
            let services = call(&state, api::ServiceList {}).await?;
            print_output(output, &services, || services_table(&services))
        }
        Command::Sidecar(SidecarCommand::Credentials { format, output, name }) => {
            sidecar_credentials(&state, format, &output, &name)
        }
        Command::Intercept(InterceptCommand::Install { config }) => intercept_install(&state, config),
        Command::Intercept(InterceptCommand::Remove { config: _ }) => {
            crate::intercept::remove().context("removing the nftables table causeway")?;
            println!(
                "removed the nftables table {} (if it was there)",
                crate::intercept::TABLE
            );
            Ok(())
        }
        Command::Status { output } => {
            let status = call(&state, api::Status {}).await?;
            print_output(output, &status, || status_table(&status))
        }
        Command::Demo => crate::demo::run().await,
        Command::Resolve { name, qtype, config } => resolve(&state, &name, qtype, config).await,
    }
}

/// Loads the configuration a command needs; a file that cannot be read is named with the
/// reason and what to give instead.
fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| match &e {
        crate::config::ConfigError::Io { source, .. } => anyhow::anyhow!(
            "{e}: {source} (give --config FILE, or --state DIR for a state directory holding causeway.yaml)"
        ),
        _ => anyhow::anyhow!("{e}"),
    })
}

/// `causeway intercept install`: the nftables rule for the configuration's VIP range and
/// intercept port.
fn intercept_install(state: &StateDir, config: Option<PathBuf>) -> anyhow::Result<()> {
    let path = config.unwrap_or_else(|| state.config());
    let cfg = load_config(&path)?;
    if cfg.vips.mode != crate::config::VipMode::Intercept {
        // The rule would send every connection to a VIP to a port the agent does not
        // listen on in this mode: all TCP to VIPs would fail.
        bail!(
            "{} sets vips.mode: {}; an agent in that mode does not take redirected traffic, so the rule \
             would break every connection to a VIP: set `vips: {{mode: intercept}}` there first",
            path.display(),
            cfg.vips.mode
        );
    }
    crate::intercept::install(cfg.vips.cidr, cfg.vips.intercept_port).context("installing the nftables rule")?;
    println!(
        "installed nftables table {}: TCP and UDP to {} go to the agent's port {}",
        crate::intercept::TABLE,
        cfg.vips.cidr,
        cfg.vips.intercept_port
    );
    Ok(())
}

/// `causeway resolve`: one question to the site's own responder.
async fn resolve(
    state: &StateDir,
    name: &str,
    qtype: Option<QueryType>,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    use crate::dns::client;
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::{Name, RecordType};

    // The name first: a bad one is a usage error whatever the configuration.
    let (qname, default) = match name.parse::<std::net::IpAddr>() {
        Ok(addr) => (crate::dns::zone::reverse_name(addr), RecordType::PTR),
        Err(_) => {
            let fqdn = if name.ends_with('.') {
                name.to_string()
            } else {
                format!("{name}.")
            };
            let qname = Name::from_ascii(&fqdn).map_err(|e| {
                UsageError(format!(
                    "{name:?} is not a DNS name ({e}): give a name or an IP address"
                ))
            })?;
            (qname, RecordType::A)
        }
    };
    let path = config.unwrap_or_else(|| state.config());
    let cfg = load_config(&path)?;
    let Some(listen) = cfg.dns.listen.first() else {
        bail!(
            "dns.listen in {} is empty: this site runs no DNS responder",
            path.display()
        );
    };
    let server = client::server_for(*listen);
    let qtype = match qtype {
        None => default,
        Some(QueryType::A) => RecordType::A,
        Some(QueryType::Aaaa) => RecordType::AAAA,
        Some(QueryType::Srv) => RecordType::SRV,
        Some(QueryType::Txt) => RecordType::TXT,
        Some(QueryType::Ptr) => RecordType::PTR,
        Some(QueryType::Soa) => RecordType::SOA,
    };
    let answer = client::query(server, &qname, qtype).await.with_context(|| {
        format!(
            "asking the DNS responder at {server} (dns.listen in {}; is the agent running?)",
            path.display()
        )
    })?;
    match answer.metadata.response_code {
        ResponseCode::NoError if answer.answers.is_empty() => {
            eprintln!("NOERROR: {qname} exists but has no {qtype} records");
        }
        ResponseCode::NoError => {
            let mut out = std::io::stdout().lock();
            for record in &answer.answers {
                writeln!(out, "{}", client::format_record(record))?;
            }
        }
        ResponseCode::NXDomain => bail!("NXDOMAIN: {qname} does not exist"),
        ResponseCode::Refused => bail!(
            "REFUSED: {qname} is outside {} and no dns.upstream is configured to forward it to",
            cfg.dns.zone
        ),
        ResponseCode::ServFail => bail!("SERVFAIL: no upstream resolver answered for {qname}"),
        other => bail!(
            "{}: the responder did not answer {qname}",
            format!("{other:?}").to_uppercase()
        ),
    }
    Ok(())
}

/// Sends `req` to the agent of `state` and returns its reply.
async fn call<C: api::Call>(state: &StateDir, req: C) -> anyhow::Result<C::Reply> {
    Ok(admin::call(
        &state.root,
        &state.admin_socket().map_err(admin::AdminError::from)?,
        req,
    )
    .await?)
}

fn init(state: &StateDir, site: &Label, config_path: Option<&Path>) -> anyhow::Result<()> {
    identity::create(state, site)?;
    let config_path = config_path.map(Path::to_path_buf).unwrap_or_else(|| state.config());
    let wrote_config = if config_path.exists() {
        false
    } else {
        crate::state::write_new(&config_path, config::default_yaml(site).as_bytes(), 0o600)?;
        true
    };
    println!("initialised site {site} in {}", state.root.display());
    println!("  site CA        {}", state.ca_cert().display());
    println!("  agent cert     {}", state.agent_cert().display());
    if wrote_config {
        println!("  configuration  {}", config_path.display());
    } else {
        println!("  configuration  {} (kept: it already existed)", config_path.display());
    }
    println!("next: causeway --state {} run", state.root.display());
    Ok(())
}

async fn run_agent(state: StateDir, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let path = config_path.unwrap_or_else(|| state.config());
    let config = load_config(&path)?;
    let opts = crate::agent::StartOptions {
        config_path: Some(path),
        skip_own_vips: false,
    };
    let agent = Agent::start(state, config, opts).await?;
    wait_for_signal().await?;
    agent.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

fn sidecar_credentials(state: &StateDir, format: CredentialsFormat, output: &Path, name: &str) -> anyhow::Result<()> {
    let creds = identity::issue_member(state).with_context(|| {
        format!(
            "issuing member credentials from the gateway state {}",
            state.root.display()
        )
    })?;
    match format {
        CredentialsFormat::Dir => {
            let dir = StateDir::new(output);
            dir.create()?;
            crate::state::write_atomic(&dir.ca_cert(), creds.ca_pem.as_bytes(), 0o600)?;
            crate::state::write_atomic(&dir.agent_cert(), creds.cert_pem.as_bytes(), 0o600)?;
            crate::state::write_atomic(&dir.agent_key(), creds.key_pem.as_bytes(), 0o600)?;
            eprintln!(
                "wrote member credentials for site {} to {}; run the sidecar with --state {} and `gateway:` in its causeway.yaml",
                creds.site,
                output.display(),
                output.display()
            );
        }
        CredentialsFormat::Secret => {
            use base64::Engine;
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
            let manifest = format!(
                "# causeway member credentials for site {site}: a secret (it holds a private key).\n\
                 # Mount it as the sidecar's state directory (read-only is fine).\n\
                 apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/name: causeway\n    causeway.dev/site: {site}\ntype: Opaque\ndata:\n  ca.crt: {ca}\n  agent.crt: {cert}\n  agent.key: {key}\n",
                site = creds.site,
                ca = b64(&creds.ca_pem),
                cert = b64(&creds.cert_pem),
                key = b64(&creds.key_pem),
            );
            crate::state::write_atomic(output, manifest.as_bytes(), 0o600)?;
            eprintln!(
                "wrote Secret {name} with member credentials for site {} to {}; apply it with kubectl apply -f {}",
                creds.site,
                output.display(),
                output.display()
            );
        }
    }
    Ok(())
}

/// Where `token issue -o` may write, checked before a grant is spent on a token that could
/// not be written.
fn check_output_path(path: &Path) -> Result<(), UsageError> {
    if path.is_dir() {
        return Err(UsageError(format!(
            "-o {}: is a directory; give a file name, e.g. -o {}",
            path.display(),
            path.join("peer.token").display()
        )));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(UsageError(format!(
            "-o {}: directory {} does not exist; create it or write elsewhere",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

async fn token_issue(state: &StateDir, uses: u32, expires: Duration, output: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(path) = &output {
        check_output_path(path)?;
    }
    let issued = call(
        state,
        api::TokenIssue {
            uses,
            expires_secs: expires.as_secs().max(1),
        },
    )
    .await?;
    match output {
        Some(path) => {
            crate::state::write_atomic(&path, issued.token.as_bytes(), 0o600)?;
            eprintln!(
                "wrote token to {} ({} use(s), expires {}); redeem it on the other site with: causeway token redeem {}",
                path.display(),
                uses,
                crate::state::rfc3339::format(issued.expires),
                path.display()
            );
        }
        None => {
            std::io::stdout().write_all(issued.token.as_bytes())?;
        }
    }
    Ok(())
}

async fn token_list(state: &StateDir, output: Output) -> anyhow::Result<()> {
    let grants = call(state, api::TokenList {}).await?;
    print_output(output, &grants, || grants_table(&grants))
}

fn grants_table(grants: &[GrantView]) -> String {
    if grants.is_empty() {
        return "no tokens issued here (or none in the last week); issue one with `causeway token issue`\n".into();
    }
    let rows: Vec<Vec<String>> = grants
        .iter()
        .map(|g| {
            vec![
                g.grant.clone(),
                g.state.to_string(),
                format!("{}/{}", g.redeemed, g.uses),
                g.expires.clone(),
                if g.redeemed_by.is_empty() {
                    "-".into()
                } else {
                    g.redeemed_by.join(",")
                },
            ]
        })
        .collect();
    table(&["GRANT", "STATE", "REDEEMED", "EXPIRES", "REDEEMED BY"], &rows)
}

async fn token_revoke(state: &StateDir, grant: &str) -> anyhow::Result<()> {
    let view = call(
        state,
        api::TokenRevoke {
            grant: grant.to_string(),
        },
    )
    .await?;
    println!(
        "revoked grant {} at {} ({} of {} use(s) were redeemed{})",
        view.grant,
        view.revoked.as_deref().unwrap_or("?"),
        view.redeemed,
        view.uses,
        if view.redeemed_by.is_empty() {
            String::new()
        } else {
            format!(
                ", by {}; those links stay until `causeway link remove`",
                view.redeemed_by.join(", ")
            )
        }
    );
    Ok(())
}

async fn token_redeem(state: &StateDir, file: &str, name: Option<Label>, cost: u32) -> anyhow::Result<()> {
    let (token, warning) = crate::token::file::read(file)?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let link = call(state, api::TokenRedeem { token, name, cost }).await?;
    let (peer, addr) = (&link.peer_site, link.addr);
    if link.state == LinkState::Up {
        println!("linked to {peer} ({addr})");
    } else {
        println!("redeemed; link to {peer} ({addr}) is still {}", link.state);
        if let Some(e) = &link.last_error {
            eprintln!("warning: last attempt: {e}");
        }
    }
    Ok(())
}

/// Prints a reply as `-o` asks: pretty JSON, YAML, or the table `table` renders.
///
/// JSON and YAML go through [`serde_json::Value`], whose objects keep their keys sorted: the
/// output lists every object's fields in the order of their names (as it always has), not
/// in the order the reply types declare them.
fn print_output<T: serde::Serialize>(output: Output, reply: &T, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match output {
        Output::Table => print!("{}", table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&serde_json::to_value(reply)?)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&serde_json::to_value(reply)?)?),
    }
    Ok(())
}

/// Renders rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn links_table(links: &[LinkStatus]) -> String {
    if links.is_empty() {
        return "no links; link a site with `causeway token issue` here and `causeway token redeem` there\n".into();
    }
    let rows: Vec<Vec<String>> = links
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                l.peer_site.clone(),
                l.state.to_string(),
                l.rtt_ms.map(|r| format!("{r:.1}ms")).unwrap_or_else(|| "-".into()),
                l.cost.to_string(),
                l.lanes.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                l.since.clone(),
                format!("{:?}", l.role).to_lowercase(),
                l.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "PEER",
            "STATE",
            "RTT",
            "COST",
            "LANES",
            "SINCE",
            "ROLE",
            "LAST ERROR",
        ],
        &rows,
    )
}

fn services_table(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services; export one under `exports:` in causeway.yaml\n".into();
    }
    let mut rows = Vec::new();
    for s in services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}/{}:{}", p.name, p.protocol, p.port))
            .collect();
        for e in &s.endpoints {
            rows.push(vec![
                format!("{}.{}", s.service, s.namespace),
                e.site.clone(),
                e.hostname.clone(),
                e.ip.to_string(),
                e.vip.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                if e.ready { "yes".into() } else { "no".into() },
                ports.join(","),
            ]);
        }
    }
    table(&["SERVICE", "SITE", "HOSTNAME", "IP", "VIP", "READY", "PORTS"], &rows)
}

fn status_table(status: &api::AgentStatus) -> String {
    let mut out = format!(
        "site      {}\nlisten    {}\nadvertise {}\nstarted   {}\n",
        status.site,
        status.listen,
        status.advertise.join(", "),
        crate::state::rfc3339::format(status.started),
    );
    out.push_str(&format!(
        "ready     {} ({})\n",
        if status.ready { "yes" } else { "no" },
        status.ready_reason,
    ));
    let vips = &status.vips;
    let mode = match &vips.intercept {
        None => "listen: a listener per VIP and port".to_string(),
        Some(i) => format!(
            "intercept on port {}: {}, UDP by {}",
            i.port,
            if i.redirected {
                "VIP traffic redirected here"
            } else {
                "VIP traffic NOT redirected here (run `causeway intercept install`)"
            },
            match i.udp {
                crate::forward::UdpInterception::Tproxy => "tproxy",
                crate::forward::UdpInterception::Listeners => "listeners",
            }
        ),
    };
    out.push_str(&format!("vips      {} block {}, {mode}\n", vips.cidr, vips.block));
    if !status.listener_errors.is_empty() {
        out.push_str(&format!(
            "listener errors: {} VIP listener(s) could not be bound (`status -o json`: listener_errors), e.g. {}\n",
            status.listener_errors.len(),
            status
                .listener_errors
                .iter()
                .next()
                .map(|(k, v)| format!("{k}: {v}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&format!("counters  {}\n\n", status.counters.words()));
    out.push_str(&links_table(&status.links));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn spec_command_lines_parse() {
        for line in [
            "causeway --state ./london init --site london",
            "causeway --state ./london run",
            "causeway --state ./london token issue --uses 1 --expires 15m -o paris.token",
            "causeway --state ./paris token redeem paris.token --name hub --cost 5",
            "causeway token redeem -",
            "causeway token list -o json",
            "causeway token revoke 3f2a9c",
            "causeway link list -o json",
            "causeway link remove paris",
            "causeway status -o yaml",
            "causeway service list -o json",
            "causeway sidecar credentials -o member.yaml",
            "causeway sidecar credentials --format dir -o /etc/causeway",
            "causeway --log-format json demo",
            "causeway resolve etcd.default.svc.clusterset.local",
            "causeway resolve _client._tcp.etcd.default.svc.clusterset.local --type SRV",
            "causeway resolve 127.77.0.10 --type ptr --config ./london.yaml",
        ] {
            let args: Vec<&str> = line.split_whitespace().collect();
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        assert!(Cli::try_parse_from(["causeway", "token", "issue", "--expires", "soon"]).is_err());
    }

    #[test]
    fn grants_table_shows_state_uses_and_redeemers() {
        assert!(grants_table(&[]).starts_with("no tokens issued here"));
        let g = GrantView {
            grant: "ab".repeat(16),
            state: crate::token::GrantState::Revoked,
            uses: 2,
            redeemed: 1,
            redeemed_by: vec!["paris".into()],
            created: "2026-11-21T12:00:00Z".into(),
            expires: "2026-11-21T12:15:00Z".into(),
            revoked: Some("2026-11-21T12:05:00Z".into()),
        };
        let t = grants_table(&[g]);
        let row = t.lines().nth(1).unwrap();
        assert!(t.starts_with("GRANT"), "{t}");
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [&"ab".repeat(16), "revoked", "1/2", "2026-11-21T12:15:00Z", "paris"]
        );
    }

    #[test]
    fn usage_errors_are_one_line_naming_the_subcommands_help() {
        let usage = |line: &str| match parse_args(line.split_whitespace()) {
            Err((code, text)) => {
                assert_eq!(code, ExitCode::from(USAGE), "{line}");
                assert_eq!(text.lines().count(), 1, "{line}: {text:?}");
                text
            }
            Ok(_) => panic!("{line} parsed"),
        };
        let text = usage("causeway --state x token issue --uses 0");
        assert!(
            text.starts_with("error: invalid value '0' for '--uses <USES>'"),
            "{text}"
        );
        assert!(text.ends_with("; see `causeway token issue --help`\n"), "{text}");
        assert!(usage("causeway token issue --expires 31d").contains("between 1s and 30 days"));
        assert!(usage("causeway token").contains("requires a subcommand"));
        assert!(usage("causeway link remove Paris").contains("DNS-1123 label"));
        assert!(usage("causeway init --site Bad").contains("not a valid site id"));
        assert!(matches!(
            parse_args(["causeway", "--version"]),
            Err((ExitCode::SUCCESS, _))
        ));
        assert!(parse_args(["causeway", "token", "issue", "--uses", "1000", "--expires", "30d"]).is_ok());
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
