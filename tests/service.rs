//! Running chatd as a service: the metrics endpoint and systemd readiness.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{Server, poll_until};

fn with_metrics() -> (Server, SocketAddr) {
    with_metrics_and(&[])
}

fn with_metrics_and(args: &[&str]) -> (Server, SocketAddr) {
    let mut server = Server::start(&[&["--metrics-addr", "127.0.0.1:0"], args].concat());
    let line = server.wait_log("metrics on http://");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("metrics address in the log");
    (server, addr)
}

/// One HTTP exchange with a plain client: (status line, body).
fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The samples of a scrape, parsed by a real Prometheus parser.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: chatd\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("unexpected sample type {other:?}"),
            };
            let labels = s
                .labels
                .get("kind")
                .map(|k| format!("{{kind={k}}}"))
                .unwrap_or_default();
            (format!("{}{labels}", s.metric), value)
        })
        .collect()
}

/// A scrape during traffic parses, and the counters move as they should.
#[test]
fn metrics_follow_the_traffic() {
    let (server, addr) = with_metrics();
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    let before = scrape(addr);
    assert_eq!(before["chatd_connections"], 2.0);
    assert_eq!(before["chatd_logged_in"], 2.0);
    assert_eq!(before["chatd_logins_total"], 2.0);
    for i in 0..100 {
        alice.send(&format!("bob, nobody: {i}\n"));
        bob.expect(&format!("from alice: {i}"));
        alice.expect("error: not-online: nobody");
    }
    let after = scrape(addr);
    assert_eq!(
        after["chatd_deliveries_total"] - before["chatd_deliveries_total"],
        100.0
    );
    assert_eq!(
        after["chatd_messages_received_total"] - before["chatd_messages_received_total"],
        100.0
    );
    assert_eq!(after["chatd_errors_sent_total{kind=not-online}"], 100.0);
    assert!(after["chatd_sent_bytes_total"] > before["chatd_sent_bytes_total"]);
    assert!(after["process_resident_memory_bytes"] > 0.0);
    assert!(after["process_open_fds"] >= 4.0);
    drop(alice);
    let gone = poll_until(|| (scrape(addr)["chatd_logged_in"] == 1.0).then_some(()));
    assert!(gone.is_some(), "chatd_logged_in did not drop");
}

/// `/healthz`, unknown paths, other methods and garbage get their answers.
#[test]
fn metrics_status_codes() {
    let (_server, addr) = with_metrics();
    assert_eq!(
        http(addr, "GET /healthz HTTP/1.1\r\n\r\n"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    assert_eq!(
        http(addr, "GET /other HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http(addr, "DELETE /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        http(addr, "\u{1}\u{2} nonsense\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
}

/// A scraper that half-closes right after its request (`nc -N`) still
/// gets its response; one that half-closes before a complete request is
/// closed without one.
#[test]
fn half_closed_scraper_gets_its_response() {
    let (_server, addr) = with_metrics();
    let exchange = |request: &[u8]| {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
        stream.write_all(request).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let response = exchange(b"GET /healthz HTTP/1.0\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    assert!(response.ends_with("\r\n\r\nok\n"), "{response:?}");
    assert_eq!(exchange(b"GET /healthz HTTP/1.0\r\n"), "");
}

/// Scrapers that connect while the process has no descriptor left are
/// answered once descriptors free up, without another scraper having to
/// connect to wake the (edge-triggered) listener.
#[test]
fn scrapers_waiting_out_descriptor_exhaustion_are_answered() {
    let (mut server, addr) = with_metrics_and(&["--log-level", "debug"]);
    let open = server.open_fds();
    server.set_nofile_soft(open);
    let waiting: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
            stream.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
            stream
        })
        .collect();
    server.wait_log("metrics accept: ");
    server.set_nofile_soft(20000);
    for mut stream in waiting {
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.ends_with("\r\n\r\nok\n"), "{response:?}");
    }
}

/// Hostile scrapers (silent, dribbling, too many) do not delay chat
/// traffic, and scraping works again once they are gone.
#[test]
fn hostile_scrapers_do_not_delay_chat() {
    let (server, addr) = with_metrics();
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    let silent: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut dribbler = TcpStream::connect(addr).unwrap();
    for i in 0..300 {
        if i % 10 == 0 {
            let _ = dribbler.write_all(b"G"); // a request that never ends
        }
        alice.send(&format!("bob: {i}\n"));
        bob.expect(&format!("from alice: {i}"));
    }
    drop(silent);
    drop(dribbler);
    let back = poll_until(|| {
        let mut stream = TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.ends_with("\r\n\r\nok\n").then_some(())
    });
    assert!(back.is_some(), "the metrics endpoint never recovered");
}

/// Under systemd (`NOTIFY_SOCKET`), chatd reports READY=1 with a status
/// once listening, and STOPPING=1 on SIGTERM.
#[test]
fn notifies_systemd() {
    let dir = std::env::temp_dir().join(format!("chatd-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.env("NOTIFY_SOCKET", &path);
    let mut server = Server::spawn(cmd, &[]);
    let mut buf = [0; 4096];
    let n = socket.recv(&mut buf).expect("a readiness message");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.contains("READY=1\n"), "{message:?}");
    assert!(message.contains("STATUS="), "{message:?}");
    server.signal("TERM");
    let stopping = poll_until(|| {
        let n = socket.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .contains("STOPPING=1")
            .then_some(())
    });
    assert!(stopping.is_some(), "no STOPPING=1");
    assert_eq!(server.wait_exit().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without `NOTIFY_SOCKET` nothing is sent and nothing is logged about it.
#[test]
fn no_systemd_no_notifications() {
    let mut server = Server::start(&[]);
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(!server.log().contains("notify"), "{}", server.log());
}

/// A line to 400 recipients has 400 outbound buffers out at once: the pool
/// keeps them all for the next busy turn (no allocation per delivery), then
/// frees all but 256 within seconds once they go unused. Watched through
/// the pool gauge.
#[test]
fn pool_keeps_a_busy_turns_buffers_then_lets_them_go() {
    const KEEP_BYTES: f64 = 256.0 * 512.0;
    let (server, addr) = with_metrics();
    let mut clients: Vec<_> = (0..400).map(|i| server.login(&format!("r{i}"))).collect();
    let names: Vec<String> = (0..400).map(|i| format!("r{i}")).collect();
    clients[0].send(&format!("{}: hi\n", names.join(",")));
    for client in &mut clients {
        client.expect("from r0: hi");
    }
    let peak = scrape(addr)["chatd_pooled_buffer_bytes"];
    assert!(peak >= 400.0 * 512.0, "the pool kept {peak} bytes");
    let decayed = poll_until(|| {
        let now = scrape(addr)["chatd_pooled_buffer_bytes"];
        (now <= KEEP_BYTES + 16384.0).then_some(now)
    });
    assert!(
        decayed.is_some(),
        "the pool did not let its spare buffers go"
    );
}

/// Scrapes cost the loop little however many descriptors it holds: the
/// render counts descriptors instead of listing `/proc/self/fd`, reads
/// `/proc` at most once a second and renders at most ten times a second.
/// (Listing 5,000 descriptors took milliseconds per scrape.)
#[test]
fn scrapes_cost_little_at_many_descriptors() {
    let (mut server, addr) = with_metrics();
    let idle: Vec<TcpStream> = (0..5000)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let all_in = poll_until(|| (server.connections() == 5000).then_some(()));
    assert!(all_in.is_some(), "the idle clients were not all accepted");
    let cpu_before = server.cpu_time();
    for _ in 0..300 {
        let (status, _) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
    let cpu = server.cpu_time() - cpu_before;
    assert!(
        cpu < Duration::from_millis(300),
        "300 scrapes cost the server {cpu:?} of CPU"
    );
    let fds = scrape(addr)["process_open_fds"];
    let listed = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .unwrap()
        .count() as f64;
    assert!(
        (fds - listed).abs() <= 2.0,
        "counted {fds}, listed {listed}"
    );
    drop(idle);
}

/// While a graceful shutdown drains its clients, the metrics endpoint
/// stays and `/healthz` answers 503 `shutting down`, so a load balancer
/// stops sending new clients.
#[test]
fn healthz_says_shutting_down_while_clients_drain() {
    let (mut server, addr) = with_metrics_and(&["--shutdown-timeout", "30"]);
    let _stays = server.login("stays"); // never reads nor closes
    server.signal("TERM");
    server.wait_log("shutdown requested");
    let (status, body) = http(addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(body, "unavailable: shutting down\n");
}

/// With `--metrics-addr`, descriptors for its listener and its 16 scrapers
/// are kept out of `--max-clients`, so scrapers cannot starve accepts.
#[test]
fn metrics_scrapers_have_their_own_descriptors() {
    let max_clients = |args: &[&str]| {
        let mut cmd = Command::new("prlimit");
        cmd.args(["--nofile=200:200", env!("CARGO_BIN_EXE_chatd")]);
        let mut server = Server::spawn(cmd, args);
        let started = server.wait_log("listening on");
        started
            .split("max-clients ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.parse::<usize>().ok())
            .expect("max-clients in the start line")
    };
    let without = max_clients(&[]);
    let with = max_clients(&["--metrics-addr", "127.0.0.1:0"]);
    assert_eq!(without - with, 17, "16 scrapers and the metrics listener");
}
