//! HTTP/1.1 framing for the API: parsing requests out of a connection's
//! input buffer (with `httparse`) and formatting responses. Pure functions
//! over byte buffers; the connection handling is in [`super::server`].
//!
//! Requests carry their body with `Content-Length` only (chunked request
//! bodies are refused with 411); `Expect: 100-continue` is honoured; a
//! request whose headers or body are over the limits is refused as soon
//! as that is known, without reading the rest.

/// Size limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line and headers.
    pub max_header: usize,
    /// Body.
    pub max_body: usize,
}

/// Headers parsed per request at most.
const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Query parameters, decoded, in order.
    pub query: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// The client wants the connection kept open.
    pub keep_alive: bool,
    /// HTTP/1.0 (no chunked responses).
    pub http10: bool,
}

/// What the input buffer holds so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete {
        /// The headers are complete (the body is missing).
        headers_done: bool,
        /// The client waits for `100 Continue` before sending the body.
        expect_continue: bool,
    },
    /// A request, and how many bytes of the buffer it used.
    Complete(Request, usize),
}

/// A request that cannot be served; the connection is closed after the
/// error response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    /// Status code.
    pub status: u16,
    /// What was wrong.
    pub message: String,
}

fn err(status: u16, message: impl Into<String>) -> HttpError {
    HttpError {
        status,
        message: message.into(),
    }
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Splits a request target into its path and decoded query parameters.
pub fn split_target(target: &str) -> Result<(String, Vec<(String, String)>), HttpError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (decode(k), decode(v)) {
            (Some(k), Some(v)) => params.push((k, v)),
            _ => {
                return Err(err(
                    400,
                    format!("malformed query parameter '{pair}': bad percent-encoding"),
                ))
            }
        }
    }
    Ok((path.to_string(), params))
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Parse, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_header => {
            return Err(err(431, "request headers too large"))
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header => {
            return Err(err(431, "request headers too large"))
        }
        Ok(httparse::Status::Partial) => {
            return Ok(Parse::Incomplete {
                headers_done: false,
                expect_continue: false,
            })
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(err(
                431,
                format!("too many request headers (at most {MAX_HEADERS})"),
            ))
        }
        Err(e) => return Err(err(400, format!("malformed HTTP request: {e}"))),
    };
    let http10 = req.version == Some(0);
    let method = req.method.unwrap_or_default().to_string();
    let (path, query) = split_target(req.path.unwrap_or_default())?;
    let mut length: Option<usize> = None;
    let mut keep_alive = !http10;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| err(400, format!("header {} is not valid UTF-8", h.name)))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| err(400, format!("invalid Content-Length '{value}'")))?;
            if length.is_some_and(|l| l != n) {
                return Err(err(400, "conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(err(
                411,
                "request bodies must be sent with Content-Length (Transfer-Encoding is not supported)",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(err(417, format!("unsupported expectation '{value}'")));
            }
            expect_continue = true;
        }
    }
    let length = length.unwrap_or(0);
    if length > limits.max_body {
        return Err(err(
            413,
            format!(
                "request body of {length} bytes is larger than the limit of {} bytes",
                limits.max_body
            ),
        ));
    }
    if buf.len() < head_len + length {
        return Ok(Parse::Incomplete {
            headers_done: true,
            expect_continue,
        });
    }
    Ok(Parse::Complete(
        Request {
            method,
            path,
            query,
            body: buf[head_len..head_len + length].to_vec(),
            keep_alive,
            http10,
        },
        head_len + length,
    ))
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete response with a body.
pub fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    extra: &[(&str, String)],
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nServer: abide/{}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        reason(status),
        env!("CARGO_PKG_VERSION"),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The head of a streamed response: chunked for HTTP/1.1, ended by closing
/// the connection for HTTP/1.0.
pub fn stream_head(content_type: &str, chunked: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nServer: abide/{}\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\n{}Connection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        if chunked { "Transfer-Encoding: chunked\r\n" } else { "" },
    )
    .into_bytes()
}

/// One piece of a streamed body.
pub fn chunk(data: &[u8], chunked: bool) -> Vec<u8> {
    if !chunked {
        return data.to_vec();
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_header: 1024,
        max_body: 64,
    };

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf, &L) {
            Ok(Parse::Complete(r, n)) => (r, n),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_with_and_without_bodies() {
        let (r, n) = complete(b"GET /api/v1/vm.info?x=1&y=a%20b HTTP/1.1\r\nHost: x\r\n\r\nextra");
        assert_eq!(n, 53);
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/api/v1/vm.info");
        assert_eq!(
            r.query,
            vec![("x".into(), "1".into()), ("y".into(), "a b".into())]
        );
        assert!(r.keep_alive && !r.http10 && r.body.is_empty());
        let (r, _) = complete(b"PUT /p HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(r.body, b"{}");
        assert!(!r.keep_alive && r.http10);
        let (r, _) = complete(b"PUT /p HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!r.keep_alive);
    }

    #[test]
    fn incomplete_until_the_body_arrives() {
        assert_eq!(
            parse(b"PUT /p HTTP/1.1\r\nContent-Le", &L),
            Ok(Parse::Incomplete {
                headers_done: false,
                expect_continue: false
            })
        );
        assert_eq!(
            parse(
                b"PUT /p HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab",
                &L
            ),
            Ok(Parse::Incomplete {
                headers_done: true,
                expect_continue: true
            })
        );
    }

    #[test]
    fn refusals() {
        let status = |b: &[u8]| parse(b, &L).map(|_| 0).unwrap_or_else(|e| e.status);
        assert_eq!(
            status(b"PUT /p HTTP/1.1\r\nContent-Length: 65\r\n\r\n"),
            413
        );
        assert_eq!(status(b"PUT /p HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT /p HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"PUT /p HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n"), 400);
        assert_eq!(status(b"GET /p?a=%zz HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(&[b'a'; 2000]), 431, "no end of the request line");
        let mut long = b"GET /p HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 2000));
        assert_eq!(status(&long), 431, "headers still coming past the limit");
        let mut many = b"GET /p HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
    }

    #[test]
    fn responses() {
        let r = response(
            409,
            "application/json",
            b"{}",
            true,
            &[("Allow", "GET".into())],
        );
        let text = String::from_utf8(r).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("Allow: GET\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
        assert_eq!(chunk(b"abc\n", true), b"4\r\nabc\n\r\n");
        assert_eq!(chunk(b"abc\n", false), b"abc\n");
    }
}
