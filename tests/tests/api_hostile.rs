//! Hostile and broken API clients against a running guest: truncated
//! requests, giant bodies and headers, garbage, unknown fields and
//! parameters, requests in the wrong state, a slow client, a client that
//! never reads its responses, and more connections than allowed. Each gets
//! a clear 4xx/5xx JSON error (or is dropped after its timeout), the VMM
//! keeps answering others, and the guest keeps working and finishes.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

use abide_tests::api::{
    connect, finish_on_power_button, get, get_ok, parse_reply, put, raw, read_reply, wait_for_text,
    workload_vm, Reply,
};
use abide_tests::temp_dir;

const T: Duration = Duration::from_secs(120);
const ROUNDS: u64 = 3000;

fn exits(socket: &Path) -> u64 {
    get_ok(socket, "/api/v1/vm.metrics")["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|v| v["exits_total"].as_u64().expect("exits"))
        .sum()
}

/// The VMM answers and the guest runs.
fn alive(socket: &Path, what: &str) {
    let before = exits(socket);
    let t = Instant::now();
    let info = get_ok(socket, "/api/v1/vm.info");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "after {what}: vm.info took {:?}",
        t.elapsed()
    );
    assert_eq!(info["state"], "running", "after {what}: {info}");
    // The guest makes exits as it runs (its progress lines); on a loaded
    // machine its vCPU thread may wait a while for a core.
    let t = Instant::now();
    while exits(socket) == before {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "after {what}: the guest stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn refused(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{r}");
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{r}"
    );
    let e = r.error();
    assert!(e.contains(needle), "'{needle}' not in '{e}'");
}

/// Sends `bytes`, half-closes, reads the answer.
fn send_and_close(socket: &Path, bytes: &[u8]) -> Reply {
    let mut s = connect(socket);
    s.write_all(bytes).expect("send");
    s.shutdown(Shutdown::Write).expect("half-close");
    read_reply(&mut s).expect("an answer")
}

#[test]
fn hostile_clients_get_clear_errors_and_the_guest_carries_on() {
    let dir = temp_dir("api-hostile");
    let cmdline = format!("quiet rounds={ROUNDS} progress buf-kib=1024 power-button");
    let (mut vm, log) = workload_vm(&dir, "vm", &[], &cmdline);
    let sock = vm.socket.clone();
    let s = sock.as_path();
    wait_for_text(&log, "guest: progress round=5 ", T);

    // Truncated: the client stops mid-body or mid-headers and closes.
    let r = send_and_close(
        s,
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"pa",
    );
    refused(&r, 400, "truncated request");
    let r = send_and_close(s, b"GET /api/v1/vm.inf");
    refused(&r, 400, "truncated request");
    alive(s, "truncated requests");

    // Too big: said up front, or sent.
    let r = raw(
        s,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n",
    );
    refused(&r, 413, "larger than the limit");
    let mut big = b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 300000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b' ', 300_000));
    refused(&raw(s, &big), 413, "larger than the limit");
    let mut long = b"GET /api/v1/vm.info HTTP/1.1\r\nX-Junk: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 20_000));
    long.extend_from_slice(b"\r\n\r\n");
    refused(&raw(s, &long), 431, "too large");
    // Garbage (a TLS client hello) and framing we do not take.
    refused(
        &raw(s, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        400,
        "malformed",
    );
    refused(
        &raw(
            s,
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        411,
        "Content-Length",
    );
    alive(s, "oversized and garbage requests");

    // Unknown fields and parameters, malformed JSON, unknown paths and
    // methods: each refusal names what was wrong.
    refused(
        &put(s, "/api/v1/vm.create", Some(r#"{"cpus":1,"bogus":true}"#)),
        400,
        "bogus",
    );
    refused(
        &put(
            s,
            "/api/v1/vm.snapshot",
            Some(r#"{"path":"/tmp/x","compress":true}"#),
        ),
        400,
        "compress",
    );
    refused(
        &put(s, "/api/v1/vm.pause", Some(r#"{"force":1}"#)),
        400,
        "force",
    );
    refused(&get(s, "/api/v1/vm.info?verbose=1"), 400, "verbose");
    refused(
        &put(s, "/api/v1/vm.snapshot", Some("{\"path\":")),
        400,
        "invalid request body",
    );
    refused(&get(s, "/api/v1/vm.nothing"), 404, "no endpoint");
    let r = get(s, "/api/v1/vm.pause");
    refused(&r, 405, "use PUT");
    assert_eq!(r.header("allow"), Some("PUT"));

    // Wrong state: each says the VM is running.
    for (path, body) in [
        ("/api/v1/vm.boot", None),
        ("/api/v1/vm.resume", None),
        ("/api/v1/vm.create", Some("{}")),
        (
            "/api/v1/vm.restore",
            Some(r#"{"path":"/nonexistent.snap"}"#),
        ),
        ("/api/v1/vm.delete", None),
    ] {
        let r = put(s, path, body);
        refused(&r, 409, "the VM is running");
        assert_eq!(r.json()["state"], "running", "{path}: {r}");
    }
    // Expect: 100-continue is honoured.
    let r = raw(
        s,
        b"PUT /api/v1/vm.resume HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(r.status, 409, "{r}");
    // Two pipelined requests on one connection: two answers, in order.
    let mut c = connect(s);
    c.write_all(
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nGET /api/v1/vm.nothing HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let mut all = Vec::new();
    c.read_to_end(&mut all).expect("read");
    let (first, used) = parse_reply(&all).expect("first");
    let (second, _) = parse_reply(&all[used..]).expect("second");
    assert_eq!((first.status, second.status), (200, 404));
    alive(s, "refused requests");

    // A slow client (headers never finished) and one that never reads what
    // it asked for, at once: others are served meanwhile, both are dropped
    // after their timeouts.
    let slow = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut c = connect(&sock);
            c.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: lo")
                .expect("send");
            let t = Instant::now();
            let r = read_reply(&mut c).expect("a 408");
            (r, t.elapsed())
        })
    };
    let deaf = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut c = connect(&sock);
            c.set_write_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let one = b"GET /api/v1/vm.manifest HTTP/1.1\r\nHost: x\r\n\r\n";
            let mut sent = 0;
            // Keep asking without reading until the server stops taking
            // requests (its answers fill the socket buffers).
            while sent < 20_000 && c.write_all(one).is_ok() {
                sent += 1;
            }
            let t = Instant::now();
            // Then, still not reading, wait until the server gives up on us.
            std::thread::sleep(Duration::from_secs(13));
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            (sent, t.elapsed(), rest.len())
        })
    };
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let t = Instant::now();
        assert_eq!(get(s, "/api/v1/vmm.ping").status, 200);
        // Far below the 5 s the slow client holds its connection.
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "ping took {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (r, waited) = slow.join().expect("slow client");
    refused(&r, 408, "not received in time");
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(15),
        "408 after {waited:?}"
    );
    let (sent, _, read_later) = deaf.join().expect("deaf client");
    assert!(sent > 0, "the deaf client sent nothing");
    let m = get_ok(s, "/api/v1/vm.metrics");
    assert!(m["api"]["timeouts"].as_u64().expect("timeouts") >= 2, "{m}");
    eprintln!("deaf client: {sent} requests sent, {read_later} bytes readable after the drop");
    alive(s, "a slow and a deaf client");

    // More connections than allowed: the extra one gets 503, then the
    // slots free up.
    let idle: Vec<_> = (0..32).map(|_| connect(s)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = get(s, "/api/v1/vmm.ping");
    refused(&r, 503, "too many API connections");
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get(s, "/api/v1/vmm.ping").status, 200);
    let m = get_ok(s, "/api/v1/vm.metrics");
    assert!(
        m["api"]["refused_connections"].as_u64().expect("refused") >= 1,
        "{m}"
    );
    assert!(
        m["api"]["responses_4xx"].as_u64().expect("4xx") >= 20,
        "{m}"
    );
    alive(s, "a connection flood");

    // The guest finishes its work and shuts down on the power button.
    finish_on_power_button(&mut vm, &log, ROUNDS);
}
