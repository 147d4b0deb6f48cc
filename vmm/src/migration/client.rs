//! `abide migrate`: asks a running abide to migrate its guest through the
//! API (`PUT /api/v1/vm.send-migration`), follows it on the event stream,
//! shows a line per pre-copy pass on stderr and prints the result as one
//! JSON object on stdout.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::api::client::{call, EventStream};
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

/// Starts the migration `request` describes on the abide at `socket` and
/// follows it to its result. Succeeds only when the guest moved.
pub fn migrate(socket: &Path, request: &Value, timeout: Duration) -> Result<(), Error> {
    // Subscribe first: no event of this migration can be missed.
    let mut events = EventStream::open(socket, timeout)?;
    call(socket, "PUT", "/api/v1/vm.send-migration", Some(request))?;
    loop {
        let Some(mut v) = events.next_event()? else {
            return Err(Error::Api(ApiError::Refused(
                "the abide being migrated closed the event stream before the result (did it crash?)"
                    .into(),
            )));
        };
        match v["event"].as_str() {
            Some("migration-progress") => eprintln!("{}", progress_line(&v)),
            Some("migration-result") => {
                if let Some(o) = v.as_object_mut() {
                    for k in ["event", "seq", "time_ms"] {
                        o.remove(k);
                    }
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
            _ => {}
        }
    }
}
