//! Raw HTTP over Abide's API socket, as a curl-like client would speak it,
//! and handles on `abide serve` / `abide run --api-socket` processes and on
//! the event stream. Tests that drive Abide through its API alone use these.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{abide_bin, progress_rounds};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A response as read off the socket.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// Body.
    pub body: String,
}

impl Reply {
    /// The body as JSON; panics with the response otherwise.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}):\n{}\n{}", self.head, self.body))
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The `error` of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {}", self.body))
            .to_string()
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n{}", self.head, self.body)
    }
}

/// Parses one response from `raw` (which may hold more after it); skips
/// `100 Continue`. Returns the response and the bytes it used, or None if
/// it is incomplete.
pub fn parse_reply(raw: &[u8]) -> Option<(Reply, usize)> {
    let text = String::from_utf8_lossy(raw);
    let mut start = 0;
    loop {
        let rest = &text[start..];
        let end = rest.find("\r\n\r\n")?;
        let head = &rest[..end];
        let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        if status == 100 {
            start += end + 4;
            continue;
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body_start = start + end + 4;
        if text.len() < body_start + len {
            return None;
        }
        return Some((
            Reply {
                status,
                head: head.to_string(),
                body: text[body_start..body_start + len].to_string(),
            },
            body_start + len,
        ));
    }
}

/// Connects to the socket.
pub fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).expect("timeout");
    s
}

/// Sends `request` verbatim and reads one response (until the connection
/// closes or a complete response arrived).
pub fn raw(socket: &Path, request: &[u8]) -> Reply {
    let mut s = connect(socket);
    // The server may answer and close before all of a refused request is
    // sent (a body over the limit): a write error is fine then.
    let written = s.write_all(request);
    read_reply_or_why(&mut s).unwrap_or_else(|why| {
        panic!(
            "no complete response to {:?} (writing it: {written:?}): {why}",
            String::from_utf8_lossy(&request[..request.len().min(200)])
        )
    })
}

/// Reads one response from `s`.
pub fn read_reply(s: &mut UnixStream) -> Option<Reply> {
    read_reply_or_why(s).ok()
}

/// Reads one response from `s`; without one, says what ended the reading
/// and what had arrived.
fn read_reply_or_why(s: &mut UnixStream) -> Result<Reply, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some((r, _)) = parse_reply(&buf) {
            return Ok(r);
        }
        let end = match s.read(&mut chunk) {
            Ok(0) => "the server closed the connection".to_string(),
            Err(e) => format!("reading failed: {e}"),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                continue;
            }
        };
        return parse_reply(&buf).map(|(r, _)| r).ok_or_else(|| {
            format!(
                "{end} after {} bytes: {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(300)])
            )
        });
    }
}

/// `METHOD path` with an optional JSON body, `Connection: close`.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Reply {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw(socket, req.as_bytes())
}

/// GET `path`.
pub fn get(socket: &Path, path: &str) -> Reply {
    call(socket, "GET", path, None)
}

/// PUT `path` with a JSON body (or none).
pub fn put(socket: &Path, path: &str, body: Option<&str>) -> Reply {
    call(socket, "PUT", path, body)
}

/// PUT that must succeed; returns its JSON.
pub fn put_ok(socket: &Path, path: &str, body: Option<&str>) -> Value {
    let r = put(socket, path, body);
    assert_eq!(r.status, 200, "PUT {path}: {r}");
    r.json()
}

/// GET that must succeed; returns its JSON.
pub fn get_ok(socket: &Path, path: &str) -> Value {
    let r = get(socket, path);
    assert_eq!(r.status, 200, "GET {path}: {r}");
    r.json()
}

/// An abide process with an API socket, killed when dropped.
pub struct Abide {
    child: Child,
    /// The API socket.
    pub socket: PathBuf,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Abide {
    /// `abide serve --api-socket DIR/TAG.sock`.
    pub fn serve(dir: &Path, tag: &str) -> Self {
        Self::spawn(dir, tag, &["serve"])
    }

    /// `abide ARGS --api-socket DIR/TAG.sock`, output in DIR/TAG.out;
    /// returns once the socket accepts connections.
    pub fn spawn(dir: &Path, tag: &str, args: &[&str]) -> Self {
        let socket = dir.join(format!("{tag}.sock"));
        let log = dir.join(format!("{tag}.out"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(abide_bin())
            .args(args)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start abide");
        let mut me = Self { child, socket, log };
        let start = Instant::now();
        while UnixStream::connect(&me.socket).is_err() {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("abide exited ({status}) before serving\n{}", me.output());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no API socket after 60 s\n{}",
                me.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        me
    }

    /// What abide printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to end; its exit code (None: killed, or still
    /// running after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Abide {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /api/v1/events` read on a thread: the events seen so far.
pub struct Events {
    seen: Arc<Mutex<Vec<Value>>>,
    head: Arc<Mutex<String>>,
}

impl Events {
    /// Subscribes from event number `since` (None: only new ones).
    pub fn open(socket: &Path, since: Option<u64>) -> Self {
        let mut s = connect(socket);
        s.set_read_timeout(None).expect("no timeout");
        let query = since.map(|n| format!("?since={n}")).unwrap_or_default();
        write!(
            s,
            "GET /api/v1/events{query} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .expect("send");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let head = Arc::new(Mutex::new(String::new()));
        let (seen2, head2) = (seen.clone(), head.clone());
        std::thread::spawn(move || {
            let mut buf: Vec<u8> = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut headers_done = false;
            loop {
                let n = match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                if !headers_done {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    *head2.lock().expect("lock") =
                        String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    headers_done = true;
                }
                // Chunked: SIZE\r\nDATA\r\n ...
                while let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
                    let size =
                        usize::from_str_radix(String::from_utf8_lossy(&buf[..eol]).trim(), 16)
                            .expect("chunk size");
                    if size == 0 {
                        return;
                    }
                    if buf.len() < eol + 2 + size + 2 {
                        break;
                    }
                    let data = buf[eol + 2..eol + 2 + size].to_vec();
                    buf.drain(..eol + 2 + size + 2);
                    for line in String::from_utf8_lossy(&data).lines() {
                        let v: Value = serde_json::from_str(line).expect("event is JSON");
                        seen2.lock().expect("lock").push(v);
                    }
                }
            }
        });
        Self { seen, head }
    }

    /// The events seen so far.
    pub fn all(&self) -> Vec<Value> {
        self.seen.lock().expect("lock").clone()
    }

    /// The response head of the stream.
    pub fn head(&self) -> String {
        self.head.lock().expect("lock").clone()
    }

    /// Waits until an event with `"event": kind` (and, for `state`
    /// events, the given state) has arrived; returns all seen.
    pub fn wait_for(&self, kind: &str, state: Option<&str>, timeout: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let all = self.all();
            if all
                .iter()
                .any(|e| e["event"] == kind && state.is_none_or(|s| e["state"] == s))
            {
                return all;
            }
            assert!(
                start.elapsed() < timeout,
                "no {kind} {state:?} event within {timeout:?}; seen: {all:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `(event, state)` pairs of events, for comparing sequences.
pub fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["state"].as_str() {
            Some(s) if e["event"] == "state" => format!("state:{s}"),
            _ => e["event"].as_str().unwrap_or("?").to_string(),
        })
        .collect()
}

/// Waits until the file at `path` contains `needle`; panics after
/// `timeout`, showing the file.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "no '{needle}' in {} after {timeout:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `abide run --api-socket` of the test guest on pc-1.0 (2 vCPUs, 256 MiB)
/// with COM1 in DIR/TAG.log, `extra` flags and `cmdline`; returns it and
/// the log's path.
pub fn workload_vm(dir: &Path, tag: &str, extra: &[&str], cmdline: &str) -> (Abide, PathBuf) {
    let log = dir.join(format!("{tag}.log"));
    let serial = format!("file:{}", log.display());
    let mut args = vec![
        "run",
        "--machine",
        "pc-1.0",
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--serial",
        &serial,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", cmdline]);
    (Abide::spawn(dir, tag, &args), log)
}

/// For a test guest started with `rounds=ROUNDS progress ... power-button`:
/// waits until it waits for the power button, presses it through the API,
/// and checks that abide exits 0 after every round ran once, in order.
/// Returns the guest's log.
pub fn finish_on_power_button(vm: &mut Abide, log: &Path, rounds: u64) -> String {
    let t = Duration::from_secs(180);
    wait_for_text(log, "guest: power-button waiting", t);
    put_ok(&vm.socket, "/api/v1/vm.power-button", None);
    assert_eq!(vm.wait(t), Some(0), "{}", vm.output());
    let text = std::fs::read_to_string(log).expect("guest log");
    assert_eq!(
        progress_rounds(&text),
        (0..rounds).collect::<Vec<_>>(),
        "{text}"
    );
    assert!(
        text.contains(&format!("guest: user cpl=3 rounds={rounds} checksum=")),
        "{text}"
    );
    assert!(text.contains("guest: power-button pressed"), "{text}");
    assert!(text.contains("guest: exit how=poweroff"), "{text}");
    text
}

/// The Python of the API test tools' venv (schemathesis,
/// openapi-spec-validator, jsonschema), which `resources/scripts/setup.sh`
/// makes; panics saying so when it is missing.
pub fn venv_python() -> PathBuf {
    let p = crate::repo_root().join(".cache/api-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run resources/scripts/setup.sh (./test.sh does), which installs \
         the pinned schemathesis and openapi-spec-validator into .cache/api-venv",
        p.display()
    );
    p
}

/// The API spec.
pub fn spec_path() -> PathBuf {
    crate::repo_root().join("docs/api/openapi.yaml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\nContent-Length: 2\r\nAllow: PUT\r\n\r\n{}next";
        let (r, used) = parse_reply(raw).expect("complete");
        assert_eq!(r.status, 409);
        assert_eq!(r.body, "{}");
        assert_eq!(r.header("allow"), Some("PUT"));
        assert_eq!(&raw[used..], b"next");
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab").is_none());
    }
}
