//! The control API: newline-delimited JSON over a Unix socket.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"state":"running","machine":"pc-1.0","vcpus":2}
//! -> {"cmd":"pause"}            {"cmd":"resume"}
//! -> {"cmd":"snapshot","path":"/var/lib/vm.snap"}
//! <- {"ok":true,"path":"/var/lib/vm.snap","bytes":1835008,"memory_bytes":1572864,"pause_ms":1.2,"save_ms":40.5}
//! -> {"cmd":"quit"}
//! -> {"cmd":"migrate","to":"tcp:10.0.0.2:4444","max_downtime_ms":300,"max_bandwidth":null,"timeout":120}
//! <- {"ok":true,"state":"migrating"}
//! <- {"event":"progress","iteration":0,"pages":...}   (one per pre-copy pass)
//! <- {"event":"result","ok":true,"status":"migrated","downtime_ms":...}
//! <- {"ok":false,"error":"..."}   on any failure
//! ```
//!
//! A snapshot of a running VM pauses it, writes the file and resumes it; a
//! paused VM stays paused. Requests are served on the VMM's main thread
//! between guest events, one at a time. A migration runs on its own thread
//! (`migration::Job`) and writes its progress and result lines to the
//! connection that asked for it, while other requests are served; `status`
//! shows its state. After a migration abide exits 0.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use abide_devices::ExitSignal;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::vcpu::Vcpus;
use crate::vm::Vm;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;

/// Errors setting up the API socket.
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

/// A request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Report the VM's state.
    Status {},
    /// Pause vCPUs and devices.
    Pause {},
    /// Resume a paused VM.
    Resume {},
    /// Write a snapshot.
    Snapshot {
        /// Where to write it.
        path: PathBuf,
        /// Write only what this Abide release reads, or refuse before
        /// pausing the guest.
        #[serde(default)]
        target_version: Option<String>,
        /// Leave the guest paused after the save.
        #[serde(default)]
        stay_paused: bool,
    },
    /// Stop the VM; abide exits with status 0.
    Quit {},
    /// Wait for an incoming migration on `listen` (`abide receive` only).
    Receive {
        /// `tcp:ADDR:PORT` or `unix:PATH`.
        listen: String,
    },
    /// Migrate the VM to another abide (`abide receive`).
    Migrate {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        to: String,
        /// Downtime limit (default 300).
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Pre-copy bandwidth limit in MiB/s.
        #[serde(default)]
        max_bandwidth: Option<u64>,
        /// Bound on the whole migration in seconds (default 120).
        #[serde(default)]
        timeout: Option<u64>,
    },
}

/// What a request handler works on.
pub struct Context<'scope, 'env> {
    /// The VM.
    pub vm: &'env Vm,
    /// Its vCPUs.
    pub vcpus: &'env Mutex<Vcpus>,
    /// Its outgoing migration.
    pub migration: &'env crate::migration::Job,
    /// Where a migration's thread runs.
    pub scope: &'scope std::thread::Scope<'scope, 'env>,
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The listening socket and its connections.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    clients: Vec<Client>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> usize {
    loop {
        // SAFETY: `fds` is a valid slice of pollfd for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return r as usize;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return 0;
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Blocks until the VM's exit event fires.
pub fn wait_readable(exit: &ExitSignal) {
    let mut fds = [pollfd(exit.eventfd().as_raw_fd())];
    while poll(&mut fds, -1) == 0 {}
}

/// Whether the VM's exit event has fired.
pub fn exit_pending(exit: &ExitSignal) -> bool {
    let mut fds = [pollfd(exit.eventfd().as_raw_fd())];
    poll(&mut fds, 0) > 0
}

impl ApiServer {
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
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ApiError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            clients: Vec::new(),
        })
    }

    /// Waits for the exit event or API traffic and serves complete
    /// requests with `handle`. Returns true when a client asked to quit.
    pub fn serve(
        &mut self,
        exit: &ExitSignal,
        mut handle: impl FnMut(Request, &UnixStream) -> (Value, bool),
    ) -> bool {
        let mut fds = vec![
            pollfd(exit.eventfd().as_raw_fd()),
            pollfd(self.listener.as_raw_fd()),
        ];
        fds.extend(self.clients.iter().map(|c| pollfd(c.stream.as_raw_fd())));
        poll(&mut fds, -1);
        if fds[0].revents != 0 {
            return false;
        }
        if fds[1].revents != 0 {
            while let Ok((stream, _)) = self.listener.accept() {
                if stream.set_nonblocking(true).is_ok() {
                    self.clients.push(Client {
                        stream,
                        buf: Vec::new(),
                    });
                }
            }
        }
        let mut quit = false;
        let ready: Vec<bool> = fds[2..].iter().map(|f| f.revents != 0).collect();
        let mut keep = Vec::new();
        for (mut c, ready) in std::mem::take(&mut self.clients)
            .into_iter()
            .zip(ready.into_iter().chain(std::iter::repeat(false)))
        {
            let mut open = true;
            if ready {
                let mut chunk = [0u8; 4096];
                loop {
                    match c.stream.read(&mut chunk) {
                        Ok(0) => {
                            open = false;
                            break;
                        }
                        Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    }
                }
            }
            while let Some(nl) = c.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = c.buf.drain(..=nl).collect();
                let (reply, q) = match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => handle(req, &c.stream),
                    Err(e) => (
                        json!({"ok": false, "error": format!("bad request: {e}")}),
                        false,
                    ),
                };
                quit |= q;
                let mut out = reply.to_string().into_bytes();
                out.push(b'\n');
                // Replies are small; a client that does not read is dropped.
                let _ = c.stream.set_nonblocking(false);
                if c.stream.write_all(&out).is_err() {
                    open = false;
                }
                let _ = c.stream.set_nonblocking(true);
            }
            if c.buf.len() > MAX_REQUEST {
                let _ = c
                    .stream
                    .write_all(b"{\"ok\":false,\"error\":\"request too long\"}\n");
                open = false;
            }
            if open {
                keep.push(c);
            }
        }
        self.clients = keep;
        quit
    }
}

fn failure(e: &dyn std::error::Error) -> Value {
    json!({"ok": false, "error": crate::error_chain(e)})
}

/// Serves one request against a running VM. Returns the reply and
/// whether abide should stop.
pub fn handle<'scope, 'env>(
    ctx: &Context<'scope, 'env>,
    req: Request,
    client: &UnixStream,
) -> (Value, bool) {
    let vm = ctx.vm;
    let state = |v: &Vcpus| if v.is_paused() { "paused" } else { "running" };
    let busy = || (failure(&crate::migration::MigrationError::Busy), false);
    let lock = || ctx.vcpus.lock().unwrap_or_else(|e| e.into_inner());
    match req {
        Request::Status {} => (
            json!({
                "ok": true,
                "state": if ctx.migration.is_active() { "migrating" } else { state(&lock()) },
                "machine": vm.machine.name,
                "vcpus": vm.cfg.cpus,
                "memory": vm.cfg.memory,
                "abide_version": env!("CARGO_PKG_VERSION"),
                "migration": ctx.migration.status(),
            }),
            false,
        ),
        _ if ctx.migration.is_active() && !matches!(req, Request::Quit {}) => busy(),
        Request::Pause {} => {
            let t = Instant::now();
            match vm.pause(&mut lock()) {
                Ok(()) => (
                    json!({"ok": true, "state": "paused", "pause_ms": ms(t)}),
                    false,
                ),
                Err(e) => (failure(&e), false),
            }
        }
        Request::Resume {} => match vm.resume(&mut lock()) {
            Ok(()) => (json!({"ok": true, "state": "running"}), false),
            Err(e) => (failure(&e), false),
        },
        Request::Snapshot {
            path,
            target_version,
            stay_paused,
        } => {
            let mut v = lock();
            let o = crate::snapshot::SaveOptions {
                target_version,
                stay_paused,
            };
            match crate::snapshot::save(vm, &mut v, &path, &o) {
                Ok(r) => (
                    json!({
                        "ok": true,
                        "path": path,
                        "bytes": r.bytes,
                        "memory_bytes": r.memory_bytes,
                        "pause_ms": r.pause_ms,
                        "save_ms": r.save_ms,
                        "notes": r.notes,
                        "state": state(&v),
                    }),
                    false,
                ),
                Err(e) => (failure(&e), false),
            }
        }
        Request::Migrate {
            to,
            max_downtime_ms,
            max_bandwidth,
            timeout,
        } => match start_migration(ctx, &to, max_downtime_ms, max_bandwidth, timeout, client) {
            Ok(()) => (json!({"ok": true, "state": "migrating"}), false),
            Err(e) => (json!({"ok": false, "error": e}), false),
        },
        Request::Receive { .. } => (
            json!({"ok": false, "error": "a guest already runs here; receive is for `abide receive`"}),
            false,
        ),
        Request::Quit {} => (json!({"ok": true, "state": "stopping"}), true),
    }
}

/// Starts a migration on its own thread; its progress and result go to
/// `client` as JSON lines.
fn start_migration<'scope, 'env>(
    ctx: &Context<'scope, 'env>,
    to: &str,
    max_downtime_ms: Option<u64>,
    max_bandwidth: Option<u64>,
    timeout: Option<u64>,
    client: &UnixStream,
) -> Result<(), String> {
    let to: crate::migration::Endpoint = to.parse()?;
    let mut opts = crate::migration::SendOptions::new(to);
    if let Some(d) = max_downtime_ms {
        opts.max_downtime = Duration::from_millis(d);
    }
    opts.max_bandwidth = max_bandwidth.map(|m| m.saturating_mul(1 << 20));
    if let Some(t) = timeout {
        opts.timeout = Duration::from_secs(t);
    }
    let mut out = client.try_clone().map_err(|e| e.to_string())?;
    ctx.migration
        .begin(&opts.to.to_string())
        .map_err(|e| e.to_string())?;
    let (vm, vcpus, job) = (ctx.vm, ctx.vcpus, ctx.migration);
    ctx.scope.spawn(move || {
        let mut event = |v: Value| write_line(&mut out, &v);
        if job.run(vm, vcpus, &opts, &mut event) {
            vm.exit.request(abide_devices::ExitReason::Migrated);
        }
    });
    Ok(())
}

/// Writes one JSON line to a client whose socket the server toggles
/// between blocking and non-blocking; gives up after a few seconds (a
/// client that does not read only loses its own lines).
fn write_line(out: &mut UnixStream, v: &Value) {
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    let mut done = 0;
    let start = Instant::now();
    while done < line.len() && start.elapsed() < Duration::from_secs(5) {
        match out.write(&line[done..]) {
            Ok(0) => return,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [libc::pollfd {
                    fd: out.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                poll(&mut fds, 100);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Milliseconds since `t`.
pub fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Sends one request to the abide listening on `socket` and returns its
/// reply; a refusal becomes an error.
pub fn call(socket: &Path, request: &Value) -> Result<Value, ApiError> {
    let err = |source| ApiError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(err)?;
    let mut line = request.to_string().into_bytes();
    line.push(b'\n');
    s.write_all(&line).map_err(err)?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte).map_err(err)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => reply.push(byte[0]),
        }
    }
    let v: Value = serde_json::from_slice(&reply).map_err(|e| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable reply: {e}"),
        ))
    })?;
    if v["ok"] != json!(true) {
        return Err(ApiError::Refused(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: Request = serde_json::from_str(r#"{"cmd":"snapshot","path":"/x"}"#).expect("ok");
        assert!(matches!(r, Request::Snapshot { path, .. } if path == Path::new("/x")));
        assert!(matches!(
            serde_json::from_str::<Request>(r#"{"cmd":"pause"}"#),
            Ok(Request::Pause {})
        ));
        for bad in [
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"snapshot"}"#,
            r#"{"cmd":"pause","now":true}"#,
            r#"{"path":"/x"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_path_taken_by_a_file_is_refused_and_stale_sockets_replaced() {
        let dir = std::env::temp_dir().join(format!("abide-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("file");
        std::fs::write(&file, b"data").expect("write");
        assert!(matches!(
            ApiServer::bind(&file),
            Err(ApiError::PathInUse(_))
        ));
        assert_eq!(std::fs::read(&file).expect("kept"), b"data");
        let sock = dir.join("api.sock");
        // A socket nobody listens on any more (a dead abide's) is replaced.
        drop(UnixListener::bind(&sock).expect("bind"));
        let server = ApiServer::bind(&sock).expect("replaces a stale socket");
        // A live one is not taken over.
        assert!(matches!(
            ApiServer::bind(&sock),
            Err(ApiError::PathInUse(_))
        ));
        drop(server);
        assert!(!sock.exists(), "the socket is removed with the server");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
