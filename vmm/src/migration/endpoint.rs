//! Where a migration stream goes: `tcp:HOST:PORT` or `unix:PATH`, with
//! timeouts on connecting, reading and writing.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// A migration address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid migration address '{s}': use tcp:HOST:PORT or unix:PATH");
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            return Ok(Endpoint::Tcp(rest.to_string()));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        Err(bad())
    }
}

/// An open migration connection.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl Conn {
    /// Limits every read and write to `t`.
    pub fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    /// Closes both directions (the peer sees the stream end).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write_vectored(bufs),
            Conn::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bigger socket buffers keep the sender busy while the receiver hashes.
fn tune_tcp(s: &TcpStream) {
    let _ = s.set_nodelay(true);
}

/// Connects to `to` within `timeout`.
pub fn connect(to: &Endpoint, timeout: Duration) -> io::Result<Conn> {
    match to {
        Endpoint::Tcp(addr) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        tune_tcp(&s);
                        return Ok(Conn::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        Endpoint::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
    }
}

/// A listening socket that takes one incoming migration.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket (removed when dropped).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `at`. A Unix socket path must not exist yet, unless it is
    /// a stale socket nobody listens on.
    pub fn bind(at: &Endpoint) -> io::Result<Self> {
        match at {
            Endpoint::Tcp(addr) => TcpListener::bind(addr.as_str()).map(Listener::Tcp),
            Endpoint::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() || UnixStream::connect(p).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("'{}' exists and is not a stale socket", p.display()),
                        ));
                    }
                    let _ = std::fs::remove_file(p);
                }
                UnixListener::bind(p).map(|l| Listener::Unix(l, p.clone()))
            }
        }
    }

    /// Waits for the connection.
    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                tune_tcp(&s);
                Ok(Conn::Tcp(s))
            }
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
        }
    }

    /// The descriptor to poll for an incoming connection.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_strictly() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:4444".parse(),
            Ok(Endpoint::Tcp("[::1]:4444".into()))
        );
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(Endpoint::Unix("/run/m.sock".into()))
        );
        for bad in [
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "unix:",
            "udp:1.2.3.4:5",
            "x",
        ] {
            let e = bad.parse::<Endpoint>().expect_err(bad);
            assert!(e.contains("tcp:HOST:PORT or unix:PATH"), "{e}");
        }
    }

    #[test]
    fn unix_listener_refuses_a_file_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("abide-ep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("file");
        std::fs::write(&f, b"x").expect("write");
        assert!(Listener::bind(&Endpoint::Unix(f.clone())).is_err());
        assert_eq!(std::fs::read(&f).expect("kept"), b"x");
        let s = dir.join("m.sock");
        let l = Listener::bind(&Endpoint::Unix(s.clone())).expect("bind");
        let c = connect(&Endpoint::Unix(s.clone()), Duration::from_secs(1)).expect("connect");
        let _server = l.accept().expect("accept");
        drop(c);
        drop(l);
        assert!(!s.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
