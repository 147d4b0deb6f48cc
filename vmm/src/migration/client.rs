//! `abide migrate`: asks a running abide to migrate its guest, shows a
//! line per pre-copy pass on stderr and prints the result as one JSON
//! object on stdout.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::api::ApiError;
use crate::Error;

/// One progress line for a pass.
pub fn progress_line(v: &Value) -> String {
    format!(
        "abide: migration pass {}: {} pages sent, {} dirty before it, dirty rate {:.1} MiB/s, bandwidth {:.1} MiB/s, {:.1} MiB sent in {:.0} ms",
        v["iteration"],
        v["pages"],
        v["dirty_pages"],
        v["dirty_rate_mib_s"].as_f64().unwrap_or(0.0),
        v["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
        v["bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
        v["elapsed_ms"].as_f64().unwrap_or(0.0),
    )
}

/// Sends the `migrate` request to the abide at `socket` and follows it to
/// its result. Succeeds only when the guest moved.
pub fn migrate(socket: &Path, request: &Value, timeout: Duration) -> Result<(), Error> {
    let err = |source| {
        Error::Api(ApiError::Connect {
            path: socket.to_path_buf(),
            source,
        })
    };
    let mut s = UnixStream::connect(socket).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    let mut line = request.to_string().into_bytes();
    line.push(b'\n');
    s.write_all(&line).map_err(err)?;
    let mut lines = BufReader::new(s).lines();
    loop {
        let l = match lines.next() {
            Some(Ok(l)) => l,
            Some(Err(e)) => return Err(err(e)),
            None => return Err(Error::Api(ApiError::Refused(
                "the abide being migrated closed the connection before the result (did it crash?)"
                    .into(),
            ))),
        };
        let Ok(mut v) = serde_json::from_str::<Value>(&l) else {
            return Err(Error::Api(ApiError::Refused(format!(
                "unreadable reply: {l}"
            ))));
        };
        match v["event"].as_str() {
            Some("progress") => eprintln!("{}", progress_line(&v)),
            Some("result") => {
                if let Some(o) = v.as_object_mut() {
                    o.remove("event");
                    o.remove("ok");
                }
                println!("{v}");
                return match v["status"].as_str() {
                    Some("migrated") => Ok(()),
                    _ => Err(Error::Migration(super::MigrationError::Failed {
                        status: v["status"].as_str().unwrap_or("failed").to_string(),
                        error: v["error"].as_str().unwrap_or("unknown error").to_string(),
                    })),
                };
            }
            _ if v["ok"] == Value::Bool(false) => {
                return Err(Error::Api(ApiError::Refused(
                    v["error"].as_str().unwrap_or("unknown error").to_string(),
                )))
            }
            _ => {}
        }
    }
}
