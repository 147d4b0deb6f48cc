//! The orchestration API: HTTP/1.1 with JSON on a Unix socket, described by
//! `docs/api/openapi.yaml`.
//!
//! ```text
//! GET  /api/v1/vmm.ping            GET  /api/v1/vm.info
//! GET  /api/v1/vmm.capabilities    GET  /api/v1/vm.manifest
//! PUT  /api/v1/vmm.shutdown        GET  /api/v1/vm.metrics[?format=prometheus]
//! GET  /api/v1/events[?since=N&follow=false]   (one JSON event per line)
//! PUT  /api/v1/vm.create {VmConfig}   vm.boot  vm.pause  vm.resume
//! PUT  /api/v1/vm.snapshot {"path"}   vm.restore {"path", overrides...}
//! PUT  /api/v1/vm.power-button        vm.power-off       vm.delete
//! PUT  /api/v1/vm.send-migration      vm.receive-migration   GET vm.migration
//! ```
//!
//! The socket is served by its own thread ([`server`]); reads are answered
//! there from the shared state, changes go to the control thread
//! ([`crate::control`]) and come back as replies. Errors are 4xx/5xx with
//! `{"error": "..."}`; a request the VM's state does not allow is a 409 that
//! also names the state.
//!
//! HTTP is parsed with `httparse` (a small, dependency-free parser, the one
//! hyper uses) under our own bounded connection handling: no async runtime
//! runs in the VMM.

pub mod client;
pub mod events;
pub mod http;
pub mod metrics;
pub mod routes;
pub mod server;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::control::status::Shared;
pub use server::{Command, Responder, ServerLimits};

/// Errors of the API socket and its clients.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("cannot listen on the API socket '{}'", path.display())]
    Listen {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket path is taken by something else.
    #[error("the API socket path '{}' exists and is not a stale socket; remove it or choose another", .0.display())]
    PathInUse(PathBuf),
    /// The API thread could not start.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
    /// Talking to a running abide.
    #[error("cannot talk to abide at '{}'", path.display())]
    Connect {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The running abide refused the request.
    #[error("abide refused: {0}")]
    Refused(String),
}

/// A bound API socket, not yet served (bound early so that a bad path
/// fails before a VM is built).
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the socket with mode 0600: only abide's user may connect.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask only changes this process's file-creation mask; the
    // previous mask is put back right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl Listener {
    /// Listens on `path`. A stale socket left by a dead abide is replaced;
    /// any other file there is an error.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            let live = UnixStream::connect(path).is_ok();
            if !meta.file_type().is_socket() || live {
                return Err(ApiError::PathInUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let err = |source| ApiError::Listen {
            path: path.to_path_buf(),
            source,
        };
        let listener = bind_private(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Starts the API thread. Requests for the control thread arrive on the
    /// returned [`Commands`].
    pub fn serve(
        self,
        shared: Arc<Shared>,
        limits: ServerLimits,
    ) -> Result<(ApiServer, Commands), ApiError> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Thread)?);
        let stop = Arc::new(AtomicBool::new(false));
        let listener = self
            .listener
            .try_clone()
            .map_err(|source| ApiError::Listen {
                path: self.path.clone(),
                source,
            })?;
        let server = server::Server::new(
            listener,
            shared.clone(),
            limits,
            tx,
            wake.clone(),
            stop.clone(),
        );
        let thread = abide_devices::thread("abide-api")
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Api);
                server.run()
            })
            .map_err(ApiError::Thread)?;
        Ok((
            ApiServer {
                _listener: self,
                thread: Some(thread),
                stop,
                shared,
            },
            Commands { rx, wake },
        ))
    }
}

/// What the control thread receives from the API thread.
#[derive(Debug)]
pub struct Commands {
    /// Requests.
    pub rx: mpsc::Receiver<Command>,
    /// Signalled with each request.
    pub wake: Arc<EventFd>,
}

/// A running API thread. Dropping it lets clients read what they were
/// sent (at most 2 s), stops the thread and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    _listener: Listener,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Milliseconds since `t`, to the microsecond.
pub fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_private_path_taken_by_a_file_is_refused_and_stale_sockets_replaced() {
        let dir = std::env::temp_dir().join(format!("abide-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("file");
        std::fs::write(&file, b"data").expect("write");
        assert!(matches!(Listener::bind(&file), Err(ApiError::PathInUse(_))));
        assert_eq!(std::fs::read(&file).expect("kept"), b"data");
        let sock = dir.join("api.sock");
        // A socket nobody listens on any more (a dead abide's) is replaced.
        drop(UnixListener::bind(&sock).expect("bind"));
        let server = Listener::bind(&sock).expect("replaces a stale socket");
        let mode = std::fs::metadata(&sock)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may connect");
        // A live one is not taken over.
        assert!(matches!(Listener::bind(&sock), Err(ApiError::PathInUse(_))));
        drop(server);
        assert!(!sock.exists(), "the socket is removed with the server");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
