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
//! implements (and a test may fake). The messages are typed in [`api`]: each request names
//! its reply ([`api::Call`]), the handler returns that type and [`call`] reads it back.

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

pub mod api;
pub mod handler;

use api::{AgentStatus, LinkRemove, LinkRemoved, Redeemed, TokenIssue, TokenIssued, TokenRedeem, TokenRevoke};
pub use api::{CALL_TIMEOUT, Call, REDEEM_TIMEOUT, Request};

/// Largest request line accepted (a token is a few KiB).
const MAX_LINE: u64 = 1024 * 1024;
/// Concurrent admin clients.
const MAX_CLIENTS: usize = 32;
/// How long a client may sit idle (no complete request line) before the connection is
/// dropped: the CLI sends its request as soon as it connects.
const IDLE: Duration = Duration::from_secs(5);
/// The agent's answer as it travels: `data` on success, `error` (one line, for the user) on
/// failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The request's reply ([`Call::Reply`]) as JSON; absent on failure.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    /// Why the request failed, in one line; absent on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors on the client side of the admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing listens on the socket: no agent runs for the state directory.
    #[error(
        "no agent is running for state dir {dir} ({socket} not found); start one with \
         `causeway --state {dir} run`"
    )]
    NotRunning { dir: String, socket: String },
    /// Connecting, sending or reading failed.
    #[error("admin socket {socket}: {source}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// No answer within the request's [`Request::timeout`].
    #[error(
        "the agent at {socket} did not answer within {}s; is it overloaded or stuck? (check its log)",
        .after.as_secs()
    )]
    Timeout { socket: String, after: Duration },
    /// The socket is served or owned by a user other than root or this one: nothing was sent.
    #[error(
        "refusing to use the admin socket {socket}: {why}; another user may have taken its \
         place. Nothing was sent. Stop whatever serves it (or remove it) and restart the agent"
    )]
    Untrusted { socket: String, why: String },
    /// No usable place for the socket (a read-only state directory without a private
    /// runtime directory).
    #[error("admin socket: {0}")]
    Place(#[from] crate::state::SocketDirError),
    /// The answer is not a response, or its data not the request's reply.
    #[error("the agent sent an unreadable answer: {0}")]
    Malformed(String),
    /// The agent refused the request; the text is its reason, for the user.
    #[error("{0}")]
    Agent(String),
}

/// What answers admin requests: the running agent, or a stand-in in tests. The server decodes
/// each request line, calls the method for its request, and encodes the reply, which is the
/// request's [`Call::Reply`].
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Why a request was refused; its text (one line, for the user) is what the CLI prints.
    type Error: std::fmt::Display + Send;
    /// `token issue`.
    async fn token_issue(&self, req: TokenIssue) -> Result<TokenIssued, Self::Error>;
    /// `token redeem`.
    async fn token_redeem(&self, req: TokenRedeem) -> Result<Redeemed, Self::Error>;
    /// `token list`.
    async fn token_list(&self) -> Result<Vec<crate::token::GrantView>, Self::Error>;
    /// `token revoke`.
    async fn token_revoke(&self, req: TokenRevoke) -> Result<crate::token::GrantView, Self::Error>;
    /// `link list`.
    async fn link_list(&self) -> Result<Vec<crate::link::LinkStatus>, Self::Error>;
    /// `link remove`.
    async fn link_remove(&self, req: LinkRemove) -> Result<LinkRemoved, Self::Error>;
    /// `status`.
    async fn status(&self) -> Result<AgentStatus, Self::Error>;
    /// `service list`.
    async fn service_list(&self) -> Result<Vec<crate::catalog::ServiceView>, Self::Error>;
}

/// Answers `req` through `handler`: the reply as JSON, or the refusal in words.
async fn answer<H: Handler>(handler: &H, req: Request) -> Result<serde_json::Value, String> {
    /// The reply of a `C` request as JSON (the type parameter checks the handler's reply is
    /// the one `C` promises).
    fn data<C: Call, E: std::fmt::Display>(r: Result<C::Reply, E>) -> Result<serde_json::Value, String> {
        let reply = r.map_err(|e| e.to_string())?;
        serde_json::to_value(reply).map_err(|e| format!("encoding the answer: {e}"))
    }
    match req {
        Request::TokenIssue(r) => data::<TokenIssue, _>(handler.token_issue(r).await),
        Request::TokenRedeem(r) => data::<TokenRedeem, _>(handler.token_redeem(r).await),
        Request::TokenList(_) => data::<api::TokenList, _>(handler.token_list().await),
        Request::TokenRevoke(r) => data::<TokenRevoke, _>(handler.token_revoke(r).await),
        Request::LinkList(_) => data::<api::LinkList, _>(handler.link_list().await),
        Request::LinkRemove(r) => data::<LinkRemove, _>(handler.link_remove(r).await),
        Request::Status(_) => data::<api::Status, _>(handler.status().await),
        Request::ServiceList(_) => data::<api::ServiceList, _>(handler.service_list().await),
    }
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
                Ok(req) => match answer(handler, req).await {
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

/// Sends one request to the agent of `state_dir` (whose socket is `socket`) and returns its
/// reply, within the request's [`Request::timeout`]. The socket must be served by root or by
/// this user, and be owned by one of them, or nothing is sent ([`AdminError::Untrusted`]).
///
/// Errors: no agent, the socket's I/O, the timeout, an untrusted socket, an answer that is not
/// the request's reply ([`AdminError::Malformed`]), and the agent's refusal
/// ([`AdminError::Agent`]).
pub async fn call<C: Call>(state_dir: &Path, socket: &Path, req: C) -> Result<C::Reply, AdminError> {
    let req: Request = req.into();
    let limit = req.timeout();
    let data = match tokio::time::timeout(limit, exchange(state_dir, socket, &req)).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(AdminError::Timeout {
                socket: socket.display().to_string(),
                after: limit,
            });
        }
    };
    serde_json::from_value(data).map_err(|e| AdminError::Malformed(e.to_string()))
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
    fn only_root_or_ourselves_may_serve_and_own_the_socket() {
        assert_eq!(untrusted(1000, 1000, 1000), None);
        assert_eq!(untrusted(0, 0, 1000), None);
        assert_eq!(untrusted(0, 0, 0), None);
        let why = untrusted(65534, 65534, 0).expect("nobody's agent");
        assert!(why.contains("uid 65534"), "{why}");
        assert!(untrusted(0, 65534, 1000).is_some(), "a file someone else owns");
        assert!(untrusted(1001, 1000, 1000).is_some(), "another user's process");
    }

    /// A handler that answers `link remove` and `link list` and refuses the rest.
    struct Fake;

    #[async_trait::async_trait]
    impl Handler for Fake {
        type Error = String;
        async fn token_issue(&self, _: TokenIssue) -> Result<TokenIssued, String> {
            Err("no grants here".into())
        }
        async fn token_redeem(&self, _: TokenRedeem) -> Result<Redeemed, String> {
            Err("no".into())
        }
        async fn token_list(&self) -> Result<Vec<crate::token::GrantView>, String> {
            Err("no".into())
        }
        async fn token_revoke(&self, _: TokenRevoke) -> Result<crate::token::GrantView, String> {
            Err("no".into())
        }
        async fn link_list(&self) -> Result<Vec<crate::link::LinkStatus>, String> {
            Ok(Vec::new())
        }
        async fn link_remove(&self, req: LinkRemove) -> Result<LinkRemoved, String> {
            Ok(LinkRemoved {
                peer_site: format!("site-of-{}", req.name),
                name: req.name.into(),
            })
        }
        async fn status(&self) -> Result<AgentStatus, String> {
            Err("no".into())
        }
        async fn service_list(&self) -> Result<Vec<crate::catalog::ServiceView>, String> {
            Err("no".into())
        }
    }

    #[tokio::test]
    async fn a_request_gets_its_typed_reply_or_the_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("admin.sock");
        let listener = bind(&sock).await.unwrap();
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let server = tokio::spawn(serve(
            listener,
            sock.clone(),
            Arc::new(Fake),
            shutdown.clone(),
            tasks.clone(),
        ));
        let removed = call(
            dir.path(),
            &sock,
            LinkRemove {
                name: crate::names::Label::new("paris").unwrap(),
            },
        )
        .await
        .unwrap();
        assert_eq!(
            removed,
            LinkRemoved {
                name: "paris".into(),
                peer_site: "site-of-paris".into()
            }
        );
        assert!(call(dir.path(), &sock, api::LinkList {}).await.unwrap().is_empty());
        let refused = call(
            dir.path(),
            &sock,
            TokenIssue {
                uses: 1,
                expires_secs: 60,
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&refused, AdminError::Agent(why) if why == "no grants here"),
            "{refused}"
        );
        shutdown.cancel();
        server.await.unwrap();
        assert!(!sock.exists(), "the socket is removed on shutdown");
    }

    #[tokio::test]
    async fn missing_socket_says_how_to_start_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("admin.sock");
        let err = call(dir.path(), &sock, api::Status {}).await.unwrap_err();
        assert!(err.to_string().contains("causeway --state"), "{err}");
    }
}
