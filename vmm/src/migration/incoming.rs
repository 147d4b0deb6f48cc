//! Waiting for one incoming migration: `abide receive --listen`, or the
//! API's `vm.receive-migration` on an `abide serve` or `abide receive`.
//! The control thread ([`crate::control`]) starts it here and turns the
//! received guest into its VM; nothing runs unless the source committed.

use std::sync::{mpsc, Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::endpoint::{Endpoint, Listener};
use super::{receive, Incoming, MigrationError, ReceiveOptions};

/// What the receiving thread hands to the control thread.
pub type Received = Result<Incoming, MigrationError>;

/// Binds `at` and says where it listens (with the real port for `:0`).
fn listen(at: &Endpoint) -> Result<(Listener, String), MigrationError> {
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
    Ok((l, shown))
}

/// Listens on `at` and starts the thread that takes the one connection
/// and receives the guest; `phase` follows its progress, and the result
/// goes to `done` with `wake` signalled. Returns the address it listens on.
pub fn start(
    at: &Endpoint,
    o: ReceiveOptions,
    phase: Arc<Mutex<String>>,
    wake: Arc<EventFd>,
    done: mpsc::Sender<Received>,
) -> Result<String, MigrationError> {
    let (listener, shown) = listen(at)?;
    let set = move |s: &str| *phase.lock().unwrap_or_else(|e| e.into_inner()) = s.to_string();
    set(&format!("waiting for the source on {shown}"));
    abide_devices::thread("incoming")
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Incoming);
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
            // A full counter still wakes the control thread.
            let _ = wake.write(1);
        })
        .map_err(|source| MigrationError::Listen {
            at: at.to_string(),
            source,
        })?;
    Ok(shown)
}
