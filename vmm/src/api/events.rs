//! The event log behind `GET /api/v1/events`: numbered JSON events, the
//! newest [`KEPT`] kept for clients that connect or read late.
//!
//! Anyone may publish (the VMM's control thread, device workers on
//! DEVICE_NEEDS_RESET); publishing takes a short lock and wakes the API
//! thread, which writes new events to the streaming clients. Nothing here
//! ever waits for a client.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::EventFd;

/// How many events are kept.
pub const KEPT: usize = 1024;

/// The log.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<Inner>,
    wake: Arc<EventFd>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sequence number of the next event.
    next: u64,
    /// (sequence number, JSON line without the newline).
    kept: VecDeque<(u64, Arc<str>)>,
}

/// What a reader gets from [`EventLog::since`].
#[derive(Debug, Default)]
pub struct Backlog {
    /// Events at or after the requested number, oldest first.
    pub lines: Vec<Arc<str>>,
    /// Events that were requested but are no longer kept.
    pub lost: u64,
    /// Where to continue reading.
    pub next: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// A log that signals `wake` on every event.
    pub fn new(wake: Arc<EventFd>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            wake,
        }
    }

    /// Publishes `{"seq":N,"time_ms":T,"event":KIND, ...fields}`.
    pub fn publish(&self, kind: &str, fields: Value) {
        let mut obj = Map::new();
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let seq = inner.next;
            inner.next += 1;
            obj.insert("seq".into(), json!(seq));
            obj.insert("time_ms".into(), json!(unix_ms()));
            obj.insert("event".into(), json!(kind));
            if let Value::Object(f) = fields {
                obj.extend(f);
            }
            let line: Arc<str> = Value::Object(obj).to_string().into();
            if inner.kept.len() == KEPT {
                inner.kept.pop_front();
            }
            inner.kept.push_back((seq, line));
        }
        // A full counter still wakes the reader.
        let _ = self.wake.write(1);
    }

    /// Sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).next
    }

    /// Events numbered `seq` and later that are still kept.
    pub fn since(&self, seq: u64) -> Backlog {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = inner.kept.front().map_or(inner.next, |(s, _)| *s);
        let from = seq.max(oldest);
        Backlog {
            lines: inner
                .kept
                .iter()
                .filter(|(s, _)| *s >= from)
                .map(|(_, l)| l.clone())
                .collect(),
            lost: oldest
                .saturating_sub(seq)
                .min(inner.next.saturating_sub(seq)),
            next: inner.next.max(seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (EventLog, Arc<EventFd>) {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        (EventLog::new(wake.clone()), wake)
    }

    #[test]
    fn numbered_in_order_and_wakes() {
        let (log, wake) = log();
        log.publish("state", json!({"state": "running"}));
        log.publish("guest-poweroff", json!({}));
        assert_eq!(wake.read().expect("woken"), 2);
        let b = log.since(0);
        assert_eq!(b.lines.len(), 2);
        assert_eq!(b.next, 2);
        assert_eq!(b.lost, 0);
        let first: Value = serde_json::from_str(&b.lines[0]).expect("json");
        assert_eq!(first["seq"], 0);
        assert_eq!(first["event"], "state");
        assert_eq!(first["state"], "running");
        assert!(first["time_ms"].as_u64().expect("time") > 0);
        let b = log.since(1);
        assert_eq!(b.lines.len(), 1);
        assert!(b.lines[0].contains("guest-poweroff"));
        let b = log.since(7);
        assert!(b.lines.is_empty());
        assert_eq!(b.next, 7, "a reader ahead waits for its number");
    }

    #[test]
    fn old_events_are_dropped_and_counted() {
        let (log, _) = log();
        for i in 0..KEPT + 10 {
            log.publish("tick", json!({"i": i}));
        }
        let b = log.since(0);
        assert_eq!(b.lines.len(), KEPT);
        assert_eq!(b.lost, 10);
        assert_eq!(b.next, (KEPT + 10) as u64);
        assert_eq!(log.since(12).lost, 0);
    }
}
