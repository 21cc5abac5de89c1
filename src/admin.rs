//! The admin API: how the `causeway` CLI talks to the running agent.
//!
//! A unix socket in the state directory (`admin.sock`, mode 0600, inside a 0700 directory:
//! only the agent's user may use it; with a read-only state directory, in a private runtime
//! directory, see [`crate::state::StateDir::bind_admin_socket`]) carrying one JSON request
//! per line and one JSON response per line.
//!
//! The server never lets clients starve each other: it holds at most 32 connections, drops
//! one that sends nothing for 5 s, and when the table is full evicts the one idle the longest
//! ([`crate::conntable`]), so idle clients cannot make `causeway status` hang. It limits line
//! length and answers garbage with an error response instead of failing, so a confused client
//! can never take the agent down.
//!
//! The client never waits for ever either (a connect and request timeout, then an error that
//! says so), and before sending anything it checks who serves the socket (`SO_PEERCRED`: root
//! or the CLI's own user) and who owns the socket file, so a socket bound by another user is
//! refused before a request, token text included, reaches it.
//!
//! The server knows nothing of the agent: it answers through a [`Handler`], which the agent
//! implements (and a test may fake).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::conntable::ConnTable;

/// Largest request line accepted (a token is a few KiB).
const MAX_LINE: u64 = 1024 * 1024;
/// Concurrent admin clients.
const MAX_CLIENTS: usize = 32;
/// How long a client may sit idle (no complete request line) before the connection is
/// dropped: the CLI sends its request as soon as it connects.
const IDLE: Duration = Duration::from_secs(5);
/// How long the CLI waits for a connection and an answer to most requests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the CLI waits for `token redeem`: dialing the issuer (3 s), riding out its
/// refusals (5 s), the exchange (10 s) and waiting for the link to come up (10 s).
pub const REDEEM_TIMEOUT: Duration = Duration::from_secs(40);

/// One request from the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `token issue`.
    TokenIssue { uses: u32, expires_secs: u64 },
    /// `token redeem`: the token file's text.
    TokenRedeem {
        token: String,
        name: Option<String>,
        cost: u32,
    },
    /// `token list`: the grants this site issued.
    TokenList,
    /// `token revoke`: a grant id or a unique prefix of one.
    TokenRevoke { grant: String },
    /// `link list`.
    LinkList,
    /// `link remove`.
    LinkRemove { name: String },
    /// `status`.
    Status,
    /// `service list`.
    ServiceList,
}

impl Request {
    /// How long the CLI waits for the answer: every request is quick except a redemption,
    /// which talks to another site.
    pub fn timeout(&self) -> Duration {
        match self {
            Request::TokenRedeem { .. } => REDEEM_TIMEOUT,
            _ => CALL_TIMEOUT,
        }
    }
}

/// The agent's answer: `data` on success, `error` (one line, for the user) on failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors on the client side of the admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "no agent is running for state dir {dir} ({socket} not found); start one with \
         `causeway --state {dir} run`"
    )]
    NotRunning { dir: String, socket: String },
    #[error("admin socket {socket}: {source}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the agent at {socket} did not answer within {}s; is it overloaded or stuck? (check its log)",
        .after.as_secs()
    )]
    Timeout { socket: String, after: Duration },
    #[error(
        "refusing to use the admin socket {socket}: {why}; another user may have taken its \
         place. Nothing was sent. Stop whatever serves it (or remove it) and restart the agent"
    )]
    Untrusted { socket: String, why: String },
    #[error("admin socket: {0}")]
    Place(#[from] crate::state::SocketDirError),
    #[error("the agent sent an unreadable answer: {0}")]
    Malformed(String),
    #[error("{0}")]
    Agent(String),
}

/// What answers admin requests: the running agent, or a stand-in in tests. The server decodes
/// each request line, hands the request here, and encodes the answer.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answers one request: the reply's data, or an error in one line for the user.
    async fn handle(&self, req: Request) -> Result<serde_json::Value, String>;
}

/// Binds the admin socket, replacing a stale one but refusing to steal a live agent's.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agent is already running on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the admin API until `shutdown`, answering through `handler`.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    path: PathBuf,
    handler: Arc<H>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let table = ConnTable::new(MAX_CLIENTS);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // A full table evicts its idlest client for this one; only when every client is
        // being answered is the new one turned away (it sees the close at once).
        let Some(slot) = table.admit() else {
            debug!("admin socket: every client is being answered; refused one");
            continue;
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                r = client(stream, &*handler, &slot) => if let Err(e) = r { debug!(error = %e, "admin client ended") },
                _ = slot.evicted().cancelled() => debug!("idle admin client dropped to make room"),
                _ = shutdown.cancelled() => {}
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn client<H: Handler>(stream: UnixStream, handler: &H, slot: &crate::conntable::Slot) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        slot.idle();
        let mut line = Vec::new();
        let n = match tokio::time::timeout(IDLE, (&mut reader).take(MAX_LINE + 1).read_until(b'\n', &mut line)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        slot.busy();
        let response = if line.len() as u64 > MAX_LINE {
            failure(format!("request longer than {MAX_LINE} bytes"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => match handler.handle(req).await {
                    Ok(data) => Response {
                        ok: true,
                        data,
                        error: None,
                    },
                    Err(e) => failure(e),
                },
                Err(e) => failure(format!("malformed request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        write.write_all(&out).await?;
        if line.len() as u64 > MAX_LINE {
            return Ok(());
        }
    }
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        data: serde_json::Value::Null,
        error: Some(error),
    }
}

/// Sends one request to the agent of `state_dir` and returns its data, within the request's
/// [`Request::timeout`]. The socket must be served by root or by this user, and be owned by
/// one of them, or nothing is sent ([`AdminError::Untrusted`]).
pub async fn call(state_dir: &Path, socket: &Path, req: &Request) -> Result<serde_json::Value, AdminError> {
    let limit = req.timeout();
    match tokio::time::timeout(limit, exchange(state_dir, socket, req)).await {
        Ok(result) => result,
        Err(_) => Err(AdminError::Timeout {
            socket: socket.display().to_string(),
            after: limit,
        }),
    }
}

async fn exchange(state_dir: &Path, socket: &Path, req: &Request) -> Result<serde_json::Value, AdminError> {
    let io = |source| AdminError::Io {
        socket: socket.display().to_string(),
        source,
    };
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AdminError::NotRunning {
                dir: state_dir.display().to_string(),
                socket: socket.display().to_string(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let me = rustix::process::geteuid().as_raw();
    let peer = stream.peer_cred().map_err(io)?.uid();
    let owner = {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(socket).map_err(io)?.uid()
    };
    if let Some(why) = untrusted(peer, owner, me) {
        return Err(AdminError::Untrusted {
            socket: socket.display().to_string(),
            why,
        });
    }
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| AdminError::Malformed(e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    reader.read_line(&mut answer).await.map_err(io)?;
    if answer.is_empty() {
        return Err(AdminError::Malformed(
            "the agent closed the connection without answering".into(),
        ));
    }
    let response: Response = serde_json::from_str(&answer).map_err(|e| AdminError::Malformed(e.to_string()))?;
    if response.ok {
        Ok(response.data)
    } else {
        Err(AdminError::Agent(
            response.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

/// Why a socket served by process uid `peer`, whose file `owner` owns, must not get requests
/// from user `me`: only root or `me` may be on the other end, and own the file.
pub fn untrusted(peer: u32, owner: u32, me: u32) -> Option<String> {
    if peer != 0 && peer != me {
        return Some(format!(
            "it is served by a process of uid {peer}, not by root or you (uid {me})"
        ));
    }
    if owner != 0 && owner != me {
        return Some(format!(
            "the socket file is owned by uid {owner}, not by root or you (uid {me})"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_json() {
        let r = Request::TokenIssue {
            uses: 2,
            expires_secs: 900,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"token_issue","uses":2,"expires_secs":900}"#
        );
        let back: Request = serde_json::from_str(r#"{"op":"link_remove","name":"paris"}"#).unwrap();
        assert_eq!(back, Request::LinkRemove { name: "paris".into() });
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn only_root_or_ourselves_may_serve_and_own_the_socket() {
        assert_eq!(untrusted(1000, 1000, 1000), None);
        assert_eq!(untrusted(0, 0, 1000), None);
        assert_eq!(untrusted(0, 0, 0), None);
        let why = untrusted(65534, 65534, 0).expect("nobody's agent");
        assert!(why.contains("uid 65534"), "{why}");
        assert!(untrusted(0, 65534, 1000).is_some(), "a file someone else owns");
        assert!(untrusted(1001, 1000, 1000).is_some(), "another user's process");
    }

    #[test]
    fn only_a_redemption_waits_long() {
        assert_eq!(Request::Status.timeout(), CALL_TIMEOUT);
        let redeem = Request::TokenRedeem {
            token: String::new(),
            name: None,
            cost: 1,
        };
        assert!(redeem.timeout() > Duration::from_secs(30));
    }

    #[tokio::test]
    async fn missing_socket_says_how_to_start_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("admin.sock");
        let err = call(dir.path(), &sock, &Request::Status).await.unwrap_err();
        assert!(err.to_string().contains("causeway --state"), "{err}");
    }
}
