//! ztunnel's side of the hook: a Unix socket in the node's filesystem (mode 0600, so only
//! root, i.e. the container runtime's plugin, can ask), one request per connection. The
//! answer comes from the main loop, which owns the enroller, so a hold and a reconcile
//! never interleave.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::proto::{self, Request, Response};

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests waiting for the main loop; more are refused (the plugin's ADD then fails and the
/// kubelet retries), never queued without bound.
const QUEUE: usize = 64;

/// A request and where its answer goes.
pub type Pending = (Request, oneshot::Sender<Response>);

/// Errors setting the socket up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path could not be prepared or bound.
    #[error("CNI socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process answers on the socket.
    #[error("CNI socket {0} is served by another live process (another ztunnel on this node?)")]
    InUse(PathBuf),
}

/// Binds `path` (replacing a stale socket left by a dead ztunnel, never a live one).
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the socket, handing each request to `tx`. Returns the receiving end for the main loop.
pub fn spawn(listener: UnixListener) -> mpsc::Receiver<Pending> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, tx.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accepting on the CNI socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    rx
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<Pending>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(proto::MAX_LINE as u64));
    let answer = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Response::refuse("no request within the read timeout"),
        Ok(Err(e)) => Response::refuse(format!("reading the request: {e}")),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::refuse(format!("invalid request: {e}")),
            Ok(request) => {
                debug!(?request, "CNI request");
                let (reply, answer) = oneshot::channel();
                match tx.try_send((request, reply)) {
                    Err(_) => Response::refuse("ztunnel is busy; try again"),
                    Ok(()) => answer
                        .await
                        .unwrap_or_else(|_| Response::refuse("ztunnel is shutting down")),
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        debug!(error = %e, "CNI client went away before the answer");
    }
}
