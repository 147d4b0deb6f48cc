//! `abide receive`: wait for one incoming migration (serving the control
//! API meanwhile), then run the guest as `abide run` would.

use std::sync::{mpsc, Arc, Mutex};

use abide_devices::{ExitReason, ExitSignal};
use serde_json::json;

use super::endpoint::{Endpoint, Listener};
use super::{announce, receive, Incoming, MigrationError, ReceiveOptions};
use crate::api::{ApiServer, Request};
use crate::Error;

/// Binds `at` and says where it listens (with the real port for `:0`).
fn listen(at: &Endpoint) -> Result<Listener, MigrationError> {
    let l = Listener::bind(at).map_err(|source| MigrationError::Listen {
        at: at.to_string(),
        source,
    })?;
    let shown = match &l {
        Listener::Tcp(t) => t
            .local_addr()
            .map(|a| format!("tcp:{a}"))
            .unwrap_or_else(|_| at.to_string()),
        Listener::Unix(..) => at.to_string(),
    };
    eprintln!("abide: listening for an incoming migration on {shown}");
    Ok(l)
}

/// Starts the thread that takes the one connection and receives.
fn start(
    at: &Endpoint,
    o: ReceiveOptions,
    phase: Arc<Mutex<String>>,
    wake: ExitSignal,
    done: mpsc::Sender<Result<Incoming, MigrationError>>,
) -> Result<(), MigrationError> {
    let listener = listen(at)?;
    *phase.lock().unwrap_or_else(|e| e.into_inner()) = format!("waiting for the source on {at}");
    let spawned = std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let set = |s: &str| *phase.lock().unwrap_or_else(|e| e.into_inner()) = s.to_string();
            let r = listener
                .accept()
                .map_err(|source| MigrationError::Listen {
                    at: "the listening socket".into(),
                    source,
                })
                .and_then(|conn| {
                    drop(listener);
                    receive(conn, &o, &mut |s| set(s))
                });
            let _ = done.send(r);
            wake.request(ExitReason::Migrated);
        });
    spawned
        .map(|_| ())
        .map_err(|source| MigrationError::Listen {
            at: at.to_string(),
            source,
        })
}

/// Receives one migration (on `at`, or where a `receive` API request
/// says), then runs the guest. Nothing runs unless the source committed.
pub fn run(
    at: Option<Endpoint>,
    o: ReceiveOptions,
    mut api: Option<ApiServer>,
) -> Result<ExitReason, Error> {
    let wake = ExitSignal::new().map_err(Error::EventFd)?;
    let phase = Arc::new(Mutex::new(String::from(
        "waiting for a receive request on the API",
    )));
    let (done, result) = mpsc::channel();
    let mut started = false;
    if let Some(at) = &at {
        start(at, o.clone(), phase.clone(), wake.clone(), done.clone())?;
        started = true;
    }
    let quit = loop {
        match &mut api {
            Some(server) => {
                let handle = |req: Request, _: &std::os::unix::net::UnixStream| match req {
                    Request::Status {} => (
                        json!({
                            "ok": true,
                            "state": "incoming",
                            "phase": *phase.lock().unwrap_or_else(|e| e.into_inner()),
                            "abide_version": env!("CARGO_PKG_VERSION"),
                        }),
                        false,
                    ),
                    Request::Receive { listen } if !started => {
                        let r = listen
                            .parse::<Endpoint>()
                            .map_err(MigrationError::Refused)
                            .and_then(|at| {
                                start(&at, o.clone(), phase.clone(), wake.clone(), done.clone())
                            });
                        match r {
                            Ok(()) => {
                                started = true;
                                (json!({"ok": true, "state": "incoming"}), false)
                            }
                            Err(e) => {
                                (json!({"ok": false, "error": crate::error_chain(&e)}), false)
                            }
                        }
                    }
                    Request::Quit {} => (json!({"ok": true, "state": "stopping"}), true),
                    _ => (
                        json!({"ok": false, "error": "no guest runs here yet: this abide waits for an incoming migration"}),
                        false,
                    ),
                };
                if server.serve(&wake, handle) {
                    break true;
                }
            }
            None => crate::api::wait_readable(&wake),
        }
        if crate::api::exit_pending(&wake) {
            break false;
        }
    };
    if quit {
        // Nothing was committed: the guest stays with its source.
        return Ok(ExitReason::Poweroff);
    }
    let incoming = result
        .recv()
        .map_err(|_| MigrationError::Destination("the receiving thread ended".into()))??;
    let source_version = incoming.source_version.clone();
    let (bytes, pages) = (incoming.bytes, incoming.pages);
    let (mut vm, confirm) = incoming.into_parts();
    let ports = vm.take_net_ports();
    vm.on_start(Box::new(move || {
        let downtime_ms = confirm.send();
        announce::start(ports);
        eprintln!(
            "abide: migration received from Abide {source_version}: {bytes} bytes, {pages} pages; the guest runs here; downtime_ms={downtime_ms}"
        );
    }));
    if let Some(api) = api {
        vm.set_api(api);
    }
    vm.run()
}
