//! The admin API: how the `causeway` CLI talks to the running agent.
//!
//! A unix socket in the state directory (`admin.sock`, mode 0600, inside a 0700 directory:
//! only the agent's user may use it) carrying one JSON request per line and one JSON response
//! per line. The server bounds concurrent clients with a semaphore, limits line length and
//! idle time, and answers garbage with an error response instead of failing, so a confused
//! client can never take the agent down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::agent::Agent;

/// Largest request line accepted (a token is a few KiB).
const MAX_LINE: u64 = 1024 * 1024;
/// Concurrent admin clients.
const MAX_CLIENTS: usize = 32;
/// How long a client may sit idle before the connection is dropped.
const IDLE: Duration = Duration::from_secs(60);

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
    #[error("the agent sent an unreadable answer: {0}")]
    Malformed(String),
    #[error("{0}")]
    Agent(String),
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

/// Serves the admin API until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    agent: Arc<Agent>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
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
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                r = client(stream, agent) => if let Err(e) = r { debug!(error = %e, "admin client ended") },
                _ = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn client(stream: UnixStream, agent: Arc<Agent>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = match tokio::time::timeout(IDLE, (&mut reader).take(MAX_LINE + 1).read_until(b'\n', &mut line)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let response = if line.len() as u64 > MAX_LINE {
            failure(format!("request longer than {MAX_LINE} bytes"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => match agent.handle(req).await {
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

/// Sends one request to the agent of `state_dir` and returns its data.
pub async fn call(state_dir: &Path, socket: &Path, req: &Request) -> Result<serde_json::Value, AdminError> {
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

    #[tokio::test]
    async fn missing_socket_says_how_to_start_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("admin.sock");
        let err = call(dir.path(), &sock, &Request::Status).await.unwrap_err();
        assert!(err.to_string().contains("causeway --state"), "{err}");
    }
}
