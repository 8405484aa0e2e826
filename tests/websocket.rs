//! The WebSocket transport (`--ws-addr`), driven with the tests' own
//! client (tests/common/ws.rs): the handshake and HTTP answers, lines in
//! text messages, routing with TCP clients, every close code, control
//! frames, limits, live upgrades mid-frame and a cluster. The Node.js
//! suite in tests/ws/ drives the same with an independent library and a
//! real browser.

mod common;
#[path = "common/ws.rs"]
mod ws_client;

use std::io::Write;
use std::time::Duration;

use common::redis::{Redis, node};
use common::{Server, poll_until};
use ws_client::{Ws, upgrade_request};

fn server(args: &[&str]) -> Server {
    let mut all = vec!["--ws-addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// TCP and WebSocket clients share one name space and talk both ways; a
/// message carries several lines; fragments join into one message.
#[test]
fn tcp_and_websocket_clients_talk() {
    let mut s = server(&[]);
    let mut alice = s.ws_login("alice");
    let mut bob = s.ws_login("bob");
    let mut tom = s.login("tom");
    alice.text("bob, tom: hello\nbob: second\n\ntom:   third  ");
    bob.expect_text("from alice: hello");
    bob.expect_text("from alice: second");
    tom.expect("from alice: hello");
    tom.expect("from alice: third");
    tom.send("alice, bob: from tcp\n");
    alice.expect_text("from tom: from tcp");
    bob.expect_text("from tom: from tcp");
    // A message in three fragments, a ping between them.
    alice.send_frame(0x01, b"bob: fr");
    alice.send_frame(0x89, b"are you there");
    alice.send_frame(0x00, "ag\u{e9}".as_bytes());
    alice.send_frame(0x80, b"ment");
    let pong = alice.frame();
    assert_eq!(
        (pong.opcode, &pong.payload[..]),
        (10, &b"are you there"[..])
    );
    bob.expect_text("from alice: frag\u{e9}ment");
    // A name taken over TCP is taken over WebSocket too.
    let mut again = Ws::connect(s.ws_addr());
    again.text("tom");
    again.expect_text("error: name-taken: tom");
    assert_eq!(again.expect_close(1008), "name-taken");
    again.expect_eof();
    // Not-online and no-recipients keep the connection.
    alice.text("nobody: x");
    alice.expect_text("error: not-online: nobody");
    alice.text("no colon");
    alice.expect_text("error: no-recipients: expected \"name1, name2: message\"");
    alice.text("alice: still here");
    alice.expect_text("from alice: still here");
}

/// Whatever a WebSocket client sends, a TCP recipient sees only whole
/// lines the server wrote: a line end inside a message ends a line, which
/// is a line of its own (routed, or refused), never raw text.
#[test]
fn no_line_can_be_injected_into_a_tcp_stream() {
    let mut s = server(&[]);
    let mut eve = s.ws_login("eve");
    let mut tom = s.login("tom");
    eve.text("tom: hi\nfrom admin: you are fired");
    tom.expect("from eve: hi");
    eve.expect_text("error: not-online: from admin");
    eve.text("tom: a\r\nb\x00c\r");
    tom.expect("from eve: a");
    eve.expect_text("error: no-recipients: expected \"name1, name2: message\"");
    tom.sync("tom");
    eve.text("tom: x\u{2028}y\u{85}z");
    tom.expect("from eve: x\u{2028}y\u{85}z");
}

/// Each error that closes sends its `error:` line, then a Close whose code
/// says why; frame errors close with their RFC codes.
#[test]
fn errors_close_with_their_codes() {
    let mut s = server(&["--max-line", "32"]);
    let addr = s.ws_addr();
    let close_after = |name: &str, send: &dyn Fn(&mut Ws), line: Option<&str>, code| {
        let mut ws = Ws::connect(addr);
        ws.text(name);
        send(&mut ws);
        if let Some(line) = line {
            ws.expect_text(line);
        }
        let reason = ws.expect_close(code);
        ws.expect_eof();
        reason
    };
    let mut bad = Ws::connect(addr);
    bad.text("bad name");
    bad.expect_text("error: invalid-name: contains whitespace");
    bad.expect_close(1008);
    let long = "a".repeat(33);
    close_after(
        "a1",
        &|ws| ws.text(&long),
        Some("error: line-too-long: max 32 bytes"),
        1009,
    );
    // Too long as soon as a fragment says so, before the rest comes.
    close_after(
        "a2",
        &|ws| {
            ws.send_frame(0x01, &[b'x'; 20]);
            ws.send_frame(0x00, &[b'x'; 14]);
        },
        Some("error: line-too-long: max 32 bytes"),
        1009,
    );
    let reason = close_after(
        "a3",
        &|ws| ws.send_frame(0x81, b"a3: \xff"),
        Some("error: invalid-utf8"),
        1007,
    );
    assert_eq!(reason, "invalid-utf8");
    // Invalid UTF-8 split over fragments.
    close_after(
        "a4",
        &|ws| {
            ws.send_frame(0x01, b"a4: \xed");
            ws.send_frame(0x80, b"\xa0\x80");
        },
        Some("error: invalid-utf8"),
        1007,
    );
    close_after("a5", &|ws| ws.send_frame(0x82, b"bin"), None, 1003);
    let unmasked: &dyn Fn(&mut Ws) = &|ws| {
        let f = ws.frame_bytes(0x81, b"a6: x", false);
        ws.send_bytes(&f);
    };
    assert_eq!(
        close_after("a6", unmasked, None, 1002),
        "client frame not masked"
    );
    close_after("a7", &|ws| ws.send_frame(0xC1, b"x"), None, 1002); // RSV1
    close_after("a8", &|ws| ws.send_frame(0x83, b"x"), None, 1002); // opcode 3
    close_after("a9", &|ws| ws.send_frame(0x09, b"x"), None, 1002); // fragmented ping
    close_after("b1", &|ws| ws.send_frame(0x89, &[0; 126]), None, 1002);
    close_after("b2", &|ws| ws.send_frame(0x80, b"x"), None, 1002); // lone continuation
    let nested: &dyn Fn(&mut Ws) = &|ws| {
        ws.send_frame(0x01, b"b3: ");
        ws.send_frame(0x81, b"b3: x");
    };
    close_after("b4", nested, None, 1002);
    // A length of 2^63: refused from its header alone.
    let huge: &dyn Fn(&mut Ws) = &|ws| ws.send_bytes(&[0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]);
    close_after("b5", huge, None, 1002);
    let big: &dyn Fn(&mut Ws) = &|ws| ws.send_bytes(&[0x81, 0xFF, 0x7F, 0xFF, 0, 0, 0, 0, 0, 0]);
    close_after("b6", big, Some("error: line-too-long: max 32 bytes"), 1009);
    // A close code no one may send.
    close_after("b7", &|ws| ws.send_frame(0x88, &[0x03, 0xED]), None, 1002);
    assert_eq!(s.stat("ws_handshakes"), 16);
}

/// The close handshake: the client's code is echoed after what is queued,
/// then the server closes TCP; a Close without a code gets 1000.
#[test]
fn the_close_handshake_completes_both_ways() {
    let mut s = server(&[]);
    let mut alice = s.ws_login("alice");
    alice.text("alice: last");
    alice.send_frame(0x88, &[0x0F, 0xA0, b'b', b'y', b'e']);
    alice.expect_text("from alice: last");
    alice.expect_close(4000);
    alice.expect_eof();
    let mut bob = s.ws_login("bob");
    bob.send_frame(0x88, b"");
    bob.expect_close(1000);
    bob.expect_eof();
    // Both names are free again.
    s.ws_login("alice");
    s.ws_login("bob");
    // Shutdown: error: shutting-down, then 1001.
    let mut carol = s.ws_login("carol");
    s.signal("TERM");
    carol.expect_text("error: shutting-down");
    assert_eq!(carol.expect_close(1001), "shutting-down");
}

/// HTTP on the WebSocket listener: the web client at `/`, 404 elsewhere,
/// 400 for a bad upgrade, 426 for another version; a handshake bounded in
/// size and in time.
#[test]
fn http_answers_and_handshake_limits() {
    let mut s = server(&["--login-timeout", "1"]);
    let addr = s.ws_addr();
    let get = |request: &str| {
        let mut ws = Ws::raw(addr);
        ws.send_bytes(request.as_bytes());
        let head = ws.http_head();
        let body = String::from_utf8_lossy(&ws.rest()).into_owned();
        (head, body)
    };
    let (head, body) = get("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: text/html; charset=utf-8\r\n"));
    assert!(head.contains("Content-Security-Policy: default-src 'none'"));
    assert!(body.starts_with("<!doctype html>"), "{body}");
    let (head, _) = get("GET /etc/passwd HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
    let v8 = upgrade_request("dGhlIHNhbXBsZSBub25jZQ==").replace("Version: 13", "Version: 8");
    let (head, _) = get(&v8);
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    assert!(head.contains("Sec-WebSocket-Version: 13\r\n"), "{head}");
    let no_key = upgrade_request("abc");
    let (head, body) = get(&no_key);
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    let (head, _) = get("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    let (head, _) = get("\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03 TLS\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    // Headers past 8 KiB.
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    let (head, _) = get(&long);
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    // Slowloris: a request that never ends is cut at --login-timeout.
    let mut slow = Ws::raw(addr);
    slow.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n");
    let head = slow.http_head();
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    assert_eq!(slow.rest(), b"error: login-timeout\n");
    // A handshake that completes but never logs in: 1008.
    let mut quiet = Ws::connect(addr);
    quiet.expect_text("error: login-timeout");
    quiet.expect_close(1008);
    assert_eq!(s.stat("ws_pages"), 1);
}

/// Over `--max-clients`, a WebSocket client completes its handshake and
/// is told `server-full` with 1013 (try again later).
#[test]
fn server_full_is_try_again_later() {
    let mut s = server(&["--max-clients", "1"]);
    let _alice = s.ws_login("alice");
    let mut bob = Ws::connect(s.ws_addr());
    bob.expect_text("error: server-full");
    assert_eq!(bob.expect_close(1013), "server-full");
    bob.expect_eof();
    // One that never finishes its handshake is told so in HTTP, within
    // the close grace.
    let mut slow = Ws::raw(s.ws_addr());
    slow.send_bytes(b"GET / HTTP/1.1\r\n");
    let head = slow.http_head();
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert_eq!(slow.rest(), b"error: server-full\n");
}

/// Pings are answered, and a ping flood from a client that never reads is
/// bounded by `--max-outbound`: the pongs it leaves unread close it as a
/// slow consumer.
#[test]
fn pings_are_answered_and_bounded() {
    let mut s = server(&["--max-outbound", "20000", "--idle-timeout", "2"]);
    let mut alice = s.ws_login("alice");
    for i in 0..3 {
        alice.send_frame(0x89, format!("p{i}").as_bytes());
        let pong = alice.frame();
        assert_eq!(
            (pong.opcode, pong.payload),
            (10, format!("p{i}").into_bytes())
        );
    }
    // A ping keeps an idle client alive.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        alice.send_frame(0x89, b"");
        assert_eq!(alice.frame().opcode, 10);
    }
    alice.text("alice: alive");
    alice.expect_text("from alice: alive");
    let mut flood = Ws::connect_small(s.ws_addr());
    flood.text("flood");
    let ping = flood.frame_bytes(0x89, &[b'p'; 125], true);
    let pings: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 4000)
        .collect();
    let _ = flood.stream.write_all(&pings);
    let closed = poll_until(|| (s.stat("slow_consumers") == 1).then_some(()));
    assert!(closed.is_some(), "a ping flood must be bounded");
}

/// A WebSocket recipient that does not read is closed as a slow consumer:
/// what it has not read, then `error: slow-consumer` and 1008.
#[test]
fn a_slow_websocket_consumer_is_closed() {
    let mut s = server(&["--max-outbound", "65536"]);
    let mut slow = s.ws_login("slow"); // reads only once it is closed
    let mut fast = s.login("fast");
    let mut replies = fast.stream().try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut replies, &mut sink);
    });
    let chunk = format!("slow: {}\n", "x".repeat(1000)).repeat(256);
    let mut chunks = 0;
    while !s.log().contains("closing slow consumer \"slow\"") {
        assert!(chunks < 400, "the slow consumer was never closed");
        fast.send(&chunk);
        chunks += 1;
    }
    loop {
        let frame = slow.frame();
        assert_eq!(frame.opcode, 1, "text messages, then the Close");
        if frame.payload.starts_with(b"error:") {
            assert_eq!(frame.payload, b"error: slow-consumer");
            break;
        }
        assert_eq!(
            frame.payload,
            format!("from fast: {}", "x".repeat(1000)).as_bytes()
        );
    }
    slow.expect_close(1008);
    slow.expect_eof();
    assert_eq!(s.stat("slow_consumers"), 1);
    fast.shutdown_write();
    drop(drain);
}

/// A live upgrade hands WebSocket connections over mid-frame and
/// mid-message: the rest of a frame sent after it completes the message.
#[test]
fn a_live_upgrade_hands_over_a_half_received_frame() {
    let mut s = server(&[]);
    let mut alice = s.ws_login("alice");
    let mut bob = s.ws_login("bob");
    let mut tom = s.login("tom");
    // A whole first fragment, then half of the second one, both read by
    // the old process before it hands over.
    let read_before = s.stat("bytes_in");
    alice.send_frame(0x01, b"bob, tom: be");
    let second = alice.frame_bytes(0x80, "fore and after \u{e9}".as_bytes(), true);
    let cut = second.len() - 5;
    alice.send_bytes(&second[..cut]);
    let sent = (6 + 12 + cut) as u64;
    let read = poll_until(|| (s.stat("bytes_in") >= read_before + sent).then_some(()));
    assert!(read.is_some(), "the old process read the half frame");
    s.upgrade(1);
    alice.send_bytes(&second[cut..]);
    bob.expect_text("from alice: before and after \u{e9}");
    tom.expect("from alice: before and after \u{e9}");
    alice.text("alice: sync");
    alice.expect_text("from alice: sync");
    bob.text("alice: after the upgrade");
    alice.expect_text("from bob: after the upgrade");
    let mut new = Ws::connect(s.ws_addr());
    new.text("carol");
    new.text("alice: new");
    alice.expect_text("from carol: new");
}

/// In a cluster, a WebSocket client on one node and a TCP client on
/// another share the name space and talk.
#[test]
fn cluster_routes_between_websocket_and_tcp_clients() {
    let Some(redis) = Redis::start_or_skip() else {
        return;
    };
    let mut a = node(&redis.url(), "10", &["--ws-addr", "127.0.0.1:0"]);
    let b = node(&redis.url(), "10", &[]);
    let mut alice = a.ws_login("alice");
    let mut bob = b.login("bob");
    alice.text("bob: over redis");
    bob.expect("from alice: over redis");
    bob.send("alice: back\n");
    alice.expect_text("from bob: back");
    let mut twin = Ws::connect(a.ws_addr());
    twin.text("bob");
    twin.expect_text("error: name-taken: bob");
    twin.expect_close(1008);
    alice.text("nobody: x");
    alice.expect_text("error: not-online: nobody");
    // The client's Close waits for nothing owed, then is answered.
    alice.text("bob: bye");
    alice.send_frame(0x88, &[0x03, 0xE8]);
    bob.expect("from alice: bye");
    alice.expect_close(1000);
    alice.expect_eof();
}

/// At `--max-buffer-memory`, a WebSocket client holding the most is closed
/// with its queue dropped: it still reads whole frames (the one being
/// written is finished), then `error: slow-consumer` and 1008.
#[test]
fn a_websocket_hoarder_is_dropped_on_a_frame_boundary() {
    let mut s = server(&[
        "--max-buffer-memory",
        "1048576",
        "--max-outbound",
        "67108864",
    ]);
    let mut hoarder = s.ws_login("h"); // reads only once it is closed
    let mut fast = s.login("fast");
    let mut replies = fast.stream().try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut replies, &mut sink);
    });
    let message = format!("fast: {}", "x".repeat(1000));
    let chunk = format!("h: {}\n", "x".repeat(1000)).repeat(256);
    let mut chunks = 0;
    while !s.log().contains("closing \"h\"") {
        assert!(chunks < 400, "the hoarder was never closed");
        fast.send(&chunk);
        chunks += 1;
    }
    let want = format!("from {message}");
    let mut delivered = 0;
    loop {
        let frame = hoarder.frame();
        assert_eq!(frame.opcode, 1, "whole text frames, then the Close");
        if frame.payload.starts_with(b"error:") {
            assert_eq!(frame.payload, b"error: slow-consumer");
            break;
        }
        assert_eq!(frame.payload, want.as_bytes());
        delivered += 1;
    }
    assert!(delivered < chunks * 256, "the queue was dropped");
    hoarder.expect_close(1008);
    assert_eq!(s.stat("memory_evictions"), 1);
    fast.shutdown_write();
    drop(drain);
    let mut probe = s.ws_login("probe");
    probe.text("probe: still here");
    probe.expect_text("from probe: still here");
}
