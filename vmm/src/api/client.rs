//! A minimal blocking client of the API, for `abide ctl`, `abide snapshot`
//! and tests: one request per connection, JSON in and out.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use super::ApiError;

/// A response.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (JSON when the server sent JSON; otherwise a string).
    pub body: Value,
}

fn io_err(socket: &Path) -> impl Fn(std::io::Error) -> ApiError + '_ {
    move |source| ApiError::Connect {
        path: socket.to_path_buf(),
        source,
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Sends `method path` with an optional JSON body and reads the response,
/// whatever its status.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response, ApiError> {
    let err = io_err(socket);
    let mut s = UnixStream::connect(socket).map_err(&err)?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n{}Content-Length: {}\r\n\r\n",
        if body.is_empty() { "" } else { "Content-Type: application/json\r\n" },
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(&err)?;
    s.write_all(body.as_bytes()).map_err(&err)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(&err)?;
    parse_response(&raw).map_err(|e| err(invalid(e)))
}

/// Parses a complete response (skipping any `100 Continue`).
pub fn parse_response(mut raw: &[u8]) -> Result<Response, String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(raw) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err("truncated response".into()),
            Err(e) => return Err(format!("malformed response: {e}")),
        };
        let status = resp.code.unwrap_or(0);
        if status == 100 {
            raw = &raw[head..];
            continue;
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::trim)
        };
        let rest = &raw[head..];
        let body = match header("content-length").map(str::parse::<usize>) {
            Some(Ok(n)) if n <= rest.len() => &rest[..n],
            Some(_) => return Err("truncated response body".into()),
            None => rest,
        };
        let json = header("content-type").is_some_and(|t| t.starts_with("application/json"));
        let body = if json {
            serde_json::from_slice(body).map_err(|e| format!("unreadable JSON body: {e}"))?
        } else {
            Value::String(String::from_utf8_lossy(body).into_owned())
        };
        return Ok(Response { status, body });
    }
}

/// Like [`request`], with any status other than 2xx turned into
/// [`ApiError::Refused`] carrying the server's message.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ApiError> {
    let r = request(socket, method, path, body)?;
    if (200..300).contains(&r.status) {
        return Ok(r.body);
    }
    let msg = r.body["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| r.body.to_string());
    Err(ApiError::Refused(format!("{} ({})", msg, r.status)))
}

/// A subscription to `GET /api/v1/events` (new events only): one JSON
/// event per [`EventStream::next_event`].
#[derive(Debug)]
pub struct EventStream {
    reader: std::io::BufReader<UnixStream>,
    chunked: bool,
    lines: std::collections::VecDeque<String>,
}

impl EventStream {
    /// Subscribes; returns once abide has answered, so every event
    /// published afterwards arrives. `timeout` bounds each read.
    pub fn open(socket: &Path, timeout: std::time::Duration) -> Result<Self, ApiError> {
        use std::io::BufRead;
        let err = io_err(socket);
        let mut s = UnixStream::connect(socket).map_err(&err)?;
        s.set_read_timeout(Some(timeout)).map_err(&err)?;
        s.write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .map_err(&err)?;
        let mut reader = std::io::BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(&err)? == 0 {
                return Err(err(invalid(
                    "the event stream closed before its headers".into(),
                )));
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        if !head.starts_with("HTTP/1.1 200") {
            return Err(ApiError::Refused(format!(
                "the event stream was refused: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok(Self {
            reader,
            chunked,
            lines: Default::default(),
        })
    }

    /// The next event; None when the stream ended (abide stopped).
    pub fn next_event(&mut self) -> Result<Option<Value>, ApiError> {
        use std::io::BufRead;
        let closed = |e: std::io::Error| ApiError::Refused(format!("the event stream failed: {e}"));
        while self.lines.is_empty() {
            let mut data = Vec::new();
            if self.chunked {
                let mut size = String::new();
                if self.reader.read_line(&mut size).map_err(closed)? == 0 {
                    return Ok(None);
                }
                let n = usize::from_str_radix(size.trim(), 16)
                    .map_err(|_| closed(invalid(format!("bad chunk size {size:?}"))))?;
                if n == 0 {
                    return Ok(None);
                }
                data.resize(n + 2, 0);
                self.reader.read_exact(&mut data).map_err(closed)?;
                data.truncate(n);
            } else if self.reader.read_until(b'\n', &mut data).map_err(closed)? == 0 {
                return Ok(None);
            }
            self.lines.extend(
                String::from_utf8_lossy(&data)
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
        let line = self.lines.pop_front().unwrap_or_default();
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| ApiError::Refused(format!("unreadable event ({e}): {line}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() {
        let r = parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"error\":\"x y z\"}",
        )
        .expect("parses");
        assert_eq!(r.status, 409);
        assert_eq!(r.body["error"], "x y z");
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")
            .expect("text");
        assert_eq!(r.body, Value::String("abc".into()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
