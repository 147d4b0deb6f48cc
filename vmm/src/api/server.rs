//! The API thread: accepts connections on the Unix socket, reads requests
//! with bounds on size and time, answers reads from the shared state, hands
//! everything else to the control thread, and streams events.
//!
//! It is one thread with non-blocking sockets and `poll(2)`: a client that
//! is slow to send, never finishes, or does not read its responses holds
//! only its own connection, until a timeout closes it. Neither the vCPUs
//! nor the device workers ever wait for this thread, and this thread never
//! waits for the control thread (replies come back over a channel).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::http::{self, Limits, Parse, Request};
use super::routes::{self, Op, Reply};
use crate::control::status::{Shared, VmState};

/// Bounds on what a client may do.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Request size limits.
    pub http: Limits,
    /// From a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// From a request's first byte to the end of its body.
    pub request_timeout: Duration,
    /// An open connection with no request in progress.
    pub idle_timeout: Duration,
    /// A response (or event stream) the client does not read.
    pub write_timeout: Duration,
    /// Connections at once (more are answered 503 and closed).
    pub max_connections: usize,
    /// Bytes of events queued for a stream client that does not read.
    pub max_stream_backlog: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            http: Limits {
                max_header: 16 << 10,
                max_body: 256 << 10,
            },
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(10),
            max_connections: 32,
            max_stream_backlog: 1 << 20,
        }
    }
}

/// A request for the control thread, with where to send the answer.
#[derive(Debug)]
pub struct Command {
    /// The operation.
    pub op: Op,
    /// The answer goes here.
    pub reply: Responder,
}

/// Sends one reply back to the API thread.
#[derive(Debug)]
pub struct Responder {
    conn: u64,
    tx: mpsc::Sender<(u64, Reply)>,
    wake: Arc<EventFd>,
}

impl Responder {
    /// Answers the request (the client may be gone: then nothing happens).
    pub fn send(self, reply: Reply) {
        if self.tx.send((self.conn, reply)).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

enum Phase {
    /// Reading a request (or idle between requests).
    Reading,
    /// The control thread works on the request.
    Waiting { keep_alive: bool },
    /// Streaming events from `next`.
    Streaming { next: u64, chunked: bool },
}

struct Conn {
    id: u64,
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    phase: Phase,
    /// First byte of the request being read.
    request_started: Option<Instant>,
    headers_done: bool,
    continue_sent: bool,
    last_activity: Instant,
    stalled_since: Option<Instant>,
    close_when_flushed: bool,
    peer_closed: bool,
    dead: bool,
}

impl Conn {
    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    fn queue(&mut self, bytes: &[u8]) {
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        }
        self.output.extend_from_slice(bytes);
    }

    fn flush(&mut self) {
        let before = self.sent;
        while self.sent < self.output.len() {
            match self.stream.write(&self.output[self.sent..]) {
                Ok(0) => {
                    self.dead = true;
                    break;
                }
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
        }
        if self.sent > before || self.pending() == 0 {
            self.stalled_since = None;
            self.last_activity = Instant::now();
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
        }
        if self.pending() == 0 && self.close_when_flushed {
            self.dead = true;
        }
    }

    fn read(&mut self, cap: usize) {
        let mut buf = [0u8; 8192];
        loop {
            let room = cap.saturating_sub(self.input.len()).min(buf.len());
            if room == 0 {
                return;
            }
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    self.peer_closed = true;
                    return;
                }
                Ok(n) => {
                    if matches!(self.phase, Phase::Streaming { .. }) {
                        continue; // a stream client has nothing to say
                    }
                    if self.input.is_empty() && self.request_started.is_none() {
                        self.request_started = Some(Instant::now());
                    }
                    self.input.extend_from_slice(&buf[..n]);
                    self.last_activity = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.peer_closed = true;
                    return;
                }
            }
        }
    }
}

/// The API thread's state.
pub(super) struct Server {
    pub(super) listener: UnixListener,
    pub(super) shared: Arc<Shared>,
    pub(super) limits: ServerLimits,
    pub(super) to_control: mpsc::Sender<Command>,
    pub(super) control_wake: Arc<EventFd>,
    pub(super) stop: Arc<AtomicBool>,
    conns: Vec<Conn>,
    next_id: u64,
    replies_tx: mpsc::Sender<(u64, Reply)>,
    replies_rx: mpsc::Receiver<(u64, Reply)>,
    capabilities: Option<Value>,
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) {
    // SAFETY: `fds` is a valid slice of pollfd for the call's duration.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        // EINTR: the caller looks at everything again anyway.
        for f in fds.iter_mut() {
            f.revents = 0;
        }
    }
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// How long to give clients to read what they were sent when stopping.
const STOP_FLUSH: Duration = Duration::from_secs(2);

impl Server {
    pub(super) fn new(
        listener: UnixListener,
        shared: Arc<Shared>,
        limits: ServerLimits,
        to_control: mpsc::Sender<Command>,
        control_wake: Arc<EventFd>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let (replies_tx, replies_rx) = mpsc::channel();
        Self {
            listener,
            shared,
            limits,
            to_control,
            control_wake,
            stop,
            conns: Vec::new(),
            next_id: 0,
            replies_tx,
            replies_rx,
            capabilities: None,
        }
    }

    fn input_cap(&self) -> usize {
        self.limits.http.max_header + self.limits.http.max_body + 8192
    }

    /// Serves until told to stop; then gives clients a moment to read
    /// their last responses and events.
    pub(super) fn run(mut self) {
        let mut stop_deadline: Option<Instant> = None;
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            if stopping && stop_deadline.is_none() {
                stop_deadline = Some(Instant::now() + STOP_FLUSH);
            }
            let wake = self.shared.wake.clone();
            let mut fds = vec![pollfd(wake.as_raw_fd(), libc::POLLIN)];
            fds.push(pollfd(
                self.listener.as_raw_fd(),
                if stopping { 0 } else { libc::POLLIN },
            ));
            let cap = self.input_cap();
            for c in &self.conns {
                let mut ev = 0;
                if c.input.len() < cap {
                    ev |= libc::POLLIN;
                }
                if c.pending() > 0 {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.stream.as_raw_fd(), ev));
            }
            let timeout = match (self.next_deadline(), stop_deadline) {
                (_, Some(_)) => 50,
                (Some(d), None) => {
                    d.saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(60_000) as i32
                        + 1
                }
                (None, None) => -1,
            };
            poll(&mut fds, timeout);
            if fds[0].revents != 0 {
                let _ = wake.read();
            }
            self.deliver_replies();
            self.push_events(stopping);
            if fds[1].revents != 0 {
                self.accept();
            }
            let revents: Vec<i16> = fds[2..].iter().map(|f| f.revents).collect();
            for (i, r) in revents.into_iter().enumerate() {
                let Some(c) = self.conns.get_mut(i) else {
                    break;
                };
                if r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    c.read(cap);
                }
            }
            self.process(stopping);
            for c in &mut self.conns {
                if c.pending() > 0 {
                    c.flush();
                }
            }
            self.expire();
            self.conns.retain(|c| !c.dead);
            if let Some(d) = stop_deadline {
                let idle = self.conns.iter().all(|c| c.pending() == 0);
                if idle || Instant::now() >= d {
                    return;
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let l = &self.limits;
        self.conns
            .iter()
            .flat_map(|c| {
                let reading = matches!(c.phase, Phase::Reading);
                [
                    c.request_started.filter(|_| reading).map(|t| {
                        t + if c.headers_done {
                            l.request_timeout
                        } else {
                            l.header_timeout
                        }
                    }),
                    (reading && c.input.is_empty()).then(|| c.last_activity + l.idle_timeout),
                    c.stalled_since.map(|t| t + l.write_timeout),
                ]
            })
            .flatten()
            .min()
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.conns.len() >= self.limits.max_connections {
                self.shared.api.refused.fetch_add(1, Ordering::Relaxed);
                self.shared.api.answered(503);
                let body = json!({"error": format!(
                    "too many API connections (at most {}); close idle ones or retry",
                    self.limits.max_connections
                )});
                let mut s = stream;
                // Best effort: the client may not even read.
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(&http::response(
                    503,
                    "application/json",
                    body.to_string().as_bytes(),
                    false,
                    &[],
                ));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.shared.api.connections.fetch_add(1, Ordering::Relaxed);
            self.next_id += 1;
            self.conns.push(Conn {
                id: self.next_id,
                stream,
                input: Vec::new(),
                output: Vec::new(),
                sent: 0,
                phase: Phase::Reading,
                request_started: None,
                headers_done: false,
                continue_sent: false,
                last_activity: Instant::now(),
                stalled_since: None,
                close_when_flushed: false,
                peer_closed: false,
                dead: false,
            });
        }
    }

    fn respond(&self, c: &mut Conn, reply: &Reply, keep_alive: bool) {
        let mut extra = Vec::new();
        if let Some(a) = reply.allow {
            extra.push(("Allow", a.to_string()));
        }
        c.queue(&http::response(
            reply.status,
            reply.content_type,
            &reply.body,
            keep_alive,
            &extra,
        ));
        self.shared.api.answered(reply.status);
        c.phase = Phase::Reading;
        if !keep_alive {
            c.close_when_flushed = true;
        }
    }

    fn deliver_replies(&mut self) {
        let mut conns = std::mem::take(&mut self.conns);
        while let Ok((id, reply)) = self.replies_rx.try_recv() {
            // A client that left gets nothing.
            if let Some(c) = conns.iter_mut().find(|c| c.id == id) {
                let keep_alive = match c.phase {
                    Phase::Waiting { keep_alive } => keep_alive && !c.peer_closed,
                    _ => false,
                };
                self.respond(c, &reply, keep_alive);
            }
        }
        self.conns = conns;
    }

    fn push_events(&mut self, stopping: bool) {
        let limit = self.limits.max_stream_backlog;
        for c in &mut self.conns {
            let Phase::Streaming { next, chunked } = c.phase else {
                continue;
            };
            let backlog = self.shared.events.since(next);
            let mut out = Vec::new();
            if backlog.lost > 0 {
                out.extend(http::chunk(
                    format!(
                        "{}\n",
                        json!({"event": "events-lost", "count": backlog.lost})
                    )
                    .as_bytes(),
                    chunked,
                ));
            }
            for l in &backlog.lines {
                out.extend(http::chunk(format!("{l}\n").as_bytes(), chunked));
            }
            c.queue(&out);
            c.phase = Phase::Streaming {
                next: backlog.next,
                chunked,
            };
            if c.pending() > limit {
                // A reader this far behind is not reading: drop it rather
                // than hold events for it.
                self.shared.api.timeouts.fetch_add(1, Ordering::Relaxed);
                c.dead = true;
            }
            if stopping && !c.close_when_flushed {
                if chunked {
                    c.queue(b"0\r\n\r\n");
                }
                c.close_when_flushed = true;
            }
        }
    }

    fn process(&mut self, stopping: bool) {
        let mut conns = std::mem::take(&mut self.conns);
        for c in &mut conns {
            self.process_one(c, stopping);
        }
        self.conns = conns;
    }

    fn process_one(&mut self, c: &mut Conn, stopping: bool) {
        if c.dead || c.close_when_flushed {
            return;
        }
        match c.phase {
            Phase::Streaming { .. } => {
                if c.peer_closed {
                    c.dead = true;
                }
                return;
            }
            Phase::Waiting { .. } => return,
            Phase::Reading => {}
        }
        // One request at a time: the next is read once this response is out.
        if c.pending() > 0 {
            return;
        }
        if c.input.is_empty() {
            if c.peer_closed {
                c.dead = true;
            }
            return;
        }
        match http::parse(&c.input, &self.limits.http) {
            Ok(Parse::Incomplete {
                headers_done,
                expect_continue,
            }) => {
                c.headers_done = headers_done;
                if expect_continue && !c.continue_sent {
                    c.queue(b"HTTP/1.1 100 Continue\r\n\r\n");
                    c.continue_sent = true;
                }
                if c.peer_closed {
                    let reply = Reply::error(
                        400,
                        format!(
                            "truncated request: the connection was closed after {} bytes, before the request was complete",
                            c.input.len()
                        ),
                    );
                    self.respond(c, &reply, false);
                }
            }
            Ok(Parse::Complete(req, used)) => {
                c.input.drain(..used);
                c.request_started = (!c.input.is_empty()).then(Instant::now);
                c.headers_done = false;
                c.continue_sent = false;
                self.handle(c, req, stopping);
            }
            Err(e) => {
                let reply = Reply::error(e.status, e.message);
                self.respond(c, &reply, false);
            }
        }
    }

    fn handle(&mut self, c: &mut Conn, req: Request, stopping: bool) {
        let keep_alive = req.keep_alive && !c.peer_closed;
        let op = match routes::route(&req) {
            Ok(op) => op,
            Err(reply) => return self.respond(c, &reply, keep_alive),
        };
        if let Op::Events { since, follow } = op {
            return self.start_stream(c, since, follow, !req.http10, keep_alive);
        }
        if op.is_read() {
            let reply = self.read_op(&op);
            return self.respond(c, &reply, keep_alive);
        }
        if stopping {
            let reply = Reply::error(503, "abide is shutting down");
            return self.respond(c, &reply, false);
        }
        let command = Command {
            op,
            reply: Responder {
                conn: c.id,
                tx: self.replies_tx.clone(),
                wake: self.shared.wake.clone(),
            },
        };
        if self.to_control.send(command).is_err() {
            let reply = Reply::error(503, "abide is shutting down");
            return self.respond(c, &reply, false);
        }
        let _ = self.control_wake.write(1);
        c.phase = Phase::Waiting { keep_alive };
    }

    fn start_stream(
        &mut self,
        c: &mut Conn,
        since: Option<u64>,
        follow: bool,
        chunked: bool,
        keep_alive: bool,
    ) {
        let events = &self.shared.events;
        let from = since.unwrap_or_else(|| events.next_seq());
        if !follow {
            let backlog = events.since(from);
            let mut body = String::new();
            if backlog.lost > 0 {
                body.push_str(&format!(
                    "{}\n",
                    json!({"event": "events-lost", "count": backlog.lost})
                ));
            }
            for l in &backlog.lines {
                body.push_str(l);
                body.push('\n');
            }
            let reply = Reply::text(200, body, "application/x-ndjson");
            return self.respond(c, &reply, keep_alive);
        }
        c.queue(&http::stream_head("application/x-ndjson", chunked));
        self.shared.api.answered(200);
        c.phase = Phase::Streaming {
            next: from,
            chunked,
        };
        // The backlog goes out with the next push (right away: wake up).
        let _ = self.shared.wake.write(1);
    }

    fn read_op(&mut self, op: &Op) -> Reply {
        let shared = &self.shared;
        match op {
            Op::Ping => Reply::ok(&json!({
                "abide_version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "state": shared.state().name(),
            })),
            Op::Capabilities => {
                let report = self.capabilities.get_or_insert_with(|| {
                    crate::capabilities::report(&crate::capabilities::HostKvm::probe())
                });
                Reply::ok(report)
            }
            Op::Info => Reply::ok(&info(shared)),
            Op::Manifest => manifest(shared),
            Op::Metrics { prometheus } => match super::metrics::json(shared) {
                Some(v) if *prometheus => Reply::text(
                    200,
                    super::metrics::prometheus(&v),
                    "text/plain; version=0.0.4",
                ),
                Some(v) => Reply::ok(&v),
                None => Reply::wrong_state(shared.state(), "there is no VM to measure"),
            },
            Op::MigrationStatus => Reply::ok(&shared.migration_json()),
            _ => Reply::error(500, "internal error: not a read"),
        }
    }

    fn expire(&mut self) {
        let l = self.limits;
        let now = Instant::now();
        let mut conns = std::mem::take(&mut self.conns);
        for c in &mut conns {
            if c.dead {
                continue;
            }
            if c.stalled_since.is_some_and(|t| now >= t + l.write_timeout) {
                self.shared.api.timeouts.fetch_add(1, Ordering::Relaxed);
                c.dead = true;
                continue;
            }
            if !matches!(c.phase, Phase::Reading) || c.close_when_flushed {
                continue;
            }
            if let Some(t) = c.request_started {
                let limit = if c.headers_done {
                    l.request_timeout
                } else {
                    l.header_timeout
                };
                if now >= t + limit {
                    self.shared.api.timeouts.fetch_add(1, Ordering::Relaxed);
                    let reply = Reply::error(
                        408,
                        format!(
                            "request not received in time: {} within {} s",
                            if c.headers_done {
                                "the body"
                            } else {
                                "the headers"
                            },
                            limit.as_secs()
                        ),
                    );
                    self.respond(c, &reply, false);
                    c.flush();
                }
            } else if c.input.is_empty()
                && c.pending() == 0
                && now >= c.last_activity + l.idle_timeout
            {
                c.dead = true;
            }
        }
        self.conns = conns;
    }
}

/// `GET /api/v1/vm.manifest`: built from the VM's configuration the first
/// time it is asked for (as `abide manifest` would), then kept.
fn manifest(shared: &Shared) -> Reply {
    let (state, config) = {
        let s = shared.status();
        if let Some(m) = &s.manifest {
            return Reply::ok(m);
        }
        (s.state, s.config.clone())
    };
    let Some(config) = config else {
        return Reply::wrong_state(state, "there is no VM to describe");
    };
    match crate::manifest(&config)
        .and_then(|d| serde_json::to_value(&d).map_err(crate::Error::Json))
    {
        Ok(m) => {
            let m = Arc::new(m);
            let mut s = shared.status();
            // The VM may have been replaced meanwhile: keep it only for this one.
            if s.config.as_ref() == Some(&config) {
                s.manifest = Some(m.clone());
            }
            Reply::ok(&m)
        }
        Err(e) => Reply::error(500, crate::error_chain(&e)),
    }
}

/// `GET /api/v1/vm.info`.
pub fn info(shared: &Shared) -> Value {
    let migration = shared.migration_json();
    let s = shared.status();
    json!({
        "state": s.state.name(),
        "abide_version": env!("CARGO_PKG_VERSION"),
        "machine": s.machine,
        "cpu_model": s.cpu_model,
        "config": s.spec,
        "uptime_ms": s.uptime_ms(),
        "exit": s.exit,
        "migration": migration,
    })
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// Whether `state` is one of `allowed`; otherwise the 409 reply.
pub fn require(state: VmState, allowed: &[VmState], what: &str) -> Result<(), Reply> {
    if allowed.contains(&state) {
        return Ok(());
    }
    if state == VmState::Incoming {
        return Err(Reply::wrong_state(
            state,
            format!(
                "cannot {what}: no guest runs here yet, this abide waits for an incoming migration"
            ),
        ));
    }
    let names: Vec<&str> = allowed.iter().map(|s| s.name()).collect();
    Err(Reply::wrong_state(
        state,
        format!("cannot {what}: the VM must be {}", names.join(" or ")),
    ))
}
