//! The wire protocol as docs/PROTOCOL.md states it, over real sockets to the binary.

mod common;

use common::{Server, poll_until};

/// A message reaches the named recipient as `from <sender>: <message>`.
#[test]
fn routes_a_message_to_its_recipient() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    alice.send("bob: hello\n");
    bob.expect("from alice: hello");
    bob.send("alice:hi back\n");
    alice.expect("from bob: hi back");
}

/// Names and message are trimmed, the line splits at the first `:`, empty
/// names are skipped, a name given twice gets one copy, and the sender
/// receives its own message when it names itself.
#[test]
fn trims_splits_collapses_and_self_delivers() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    alice.send("  bob ,, alice,bob ,  :   a: b  \t\r\n");
    bob.expect("from alice: a: b");
    alice.expect("from alice: a: b");
    // Only one copy each: the next line each receives is the next message.
    alice.send("bob: second\n");
    bob.expect("from alice: second");
    alice.sync("alice");
}

/// An empty message is delivered as such (as the tutorial chat server does).
#[test]
fn delivers_an_empty_message() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    alice.send("alice:\n");
    alice.expect("from alice: ");
}

/// Offline recipients are named once each, in order, in one error line,
/// while the online ones still get the message.
#[test]
fn names_offline_recipients_in_order() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    alice.send("carol, bob, dave, carol, erin: hey\n");
    bob.expect("from alice: hey");
    alice.expect("error: not-online: carol, dave, erin");
}

/// Many distinct offline names in one line are each reported once.
#[test]
fn names_many_offline_recipients_once_each() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    let names: Vec<String> = (0..200).map(|i| format!("n{}", i % 150)).collect();
    alice.send(&format!("{}: x\n", names.join(",")));
    let want: Vec<String> = (0..150).map(|i| format!("n{i}")).collect();
    alice.expect(&format!("error: not-online: {}", want.join(", ")));
}

/// A line without `:` or without names gets `no-recipients`, and the
/// connection stays usable.
#[test]
fn rejects_lines_without_recipients() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    for line in ["hello\n", ": hi\n", " , ,: hi\n"] {
        alice.send(line);
        alice.expect("error: no-recipients: expected \"name1, name2: message\"");
    }
    alice.sync("alice");
}

/// Blank lines are ignored before and after login; the name is trimmed;
/// `\r\n` works like `\n`.
#[test]
fn ignores_blank_lines_and_accepts_crlf() {
    let server = Server::start(&[]);
    let mut alice = server.connect();
    alice.send("\r\n   \n\t\r\n  alice  \r\n\r\n \n");
    alice.send("alice: hi\r\n");
    alice.expect("from alice: hi");
}

/// Each broken name rule gets its reason, then the connection closes.
#[test]
fn rejects_invalid_names_and_closes() {
    let server = Server::start(&[]);
    let long = "x".repeat(65);
    let cases = [
        ("a b", "contains whitespace"),
        ("a,b", "contains ','"),
        ("a:b", "contains ':'"),
        ("a\u{1b}[2Jb", "contains a control character"),
        (long.as_str(), "longer than 64 bytes"),
    ];
    for (name, why) in cases {
        let mut client = server.connect();
        client.send(&format!("{name}\n"));
        client.expect(&format!("error: invalid-name: {why}"));
        client.expect_eof();
    }
    // 64 bytes is allowed.
    server.login(&"y".repeat(64));
}

/// A second login with a held name is refused and closed; the holder keeps
/// working, and nothing the second connection sends is delivered as it.
#[test]
fn name_taken_cannot_impersonate() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    let mut mallory = server.connect();
    mallory.send("alice\nbob: I am alice\n");
    mallory.expect("error: name-taken: alice");
    mallory.expect_eof();
    alice.send("bob: the real alice\n");
    bob.expect("from alice: the real alice");
    alice.sync("alice");
}

/// A line that is not UTF-8 gets `invalid-utf8` and is dropped; the
/// connection stays, before and after login.
#[test]
fn reports_invalid_utf8_and_keeps_the_connection() {
    let server = Server::start(&[]);
    let mut alice = server.connect();
    alice.send_bytes(b"\xff\xfe\n");
    alice.expect("error: invalid-utf8");
    alice.send("alice\n");
    alice.send_bytes(b"alice: \xc3\x28\n");
    alice.expect("error: invalid-utf8");
    alice.send("alice: caf\u{e9}\n");
    alice.expect("from alice: caf\u{e9}");
}

/// At EOF a final line without `\n` is processed, everything queued is
/// delivered, then the server closes (the `printf ... | nc -N` case).
#[test]
fn half_close_gets_every_reply() {
    let server = Server::start(&[]);
    let mut client = server.connect();
    client.send("alice\nalice: hi\nalice: last");
    client.shutdown_write();
    client.expect("from alice: hi");
    client.expect("from alice: last");
    client.expect_eof();
}

/// A name is free again as soon as its connection ends, by EOF or reset.
#[test]
fn names_are_released_at_eof_and_reset() {
    let server = Server::start(&[]);
    let alice = server.login("alice");
    alice.shutdown_write();
    relogin(&server, "alice");
    let bob = server.login("bob");
    bob.reset();
    relogin(&server, "bob");
}

/// Logs in as `name`, retrying while the server has not yet seen the old
/// connection's end (it is processed asynchronously).
fn relogin(server: &Server, name: &str) {
    let done = poll_until(|| {
        let mut client = server.connect();
        client.send(&format!("{name}\n{name}: back\n"));
        let line = client.line();
        if line == format!("from {name}: back\n") {
            Some(())
        } else {
            assert_eq!(line, format!("error: name-taken: {name}\n"));
            None
        }
    });
    assert!(done.is_some(), "{name} was never released");
}

/// 10,000 numbered messages from one client to another arrive complete and
/// in order.
#[test]
fn keeps_order_over_ten_thousand_messages() {
    let server = Server::start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    let reader = std::thread::spawn(move || {
        for i in 0..10_000 {
            bob.expect(&format!("from alice: message {i}-{}", "x".repeat(i % 100)));
        }
        bob
    });
    let mut batch = String::new();
    for i in 0..10_000 {
        batch += &format!("bob: message {i}-{}\n", "x".repeat(i % 100));
        if i % 500 == 499 {
            alice.send(&batch);
            batch.clear();
        }
    }
    reader.join().unwrap();
}

/// Lines from many senders to one recipient are never interleaved or cut.
#[test]
fn never_interleaves_lines_from_many_senders() {
    let server = Server::start(&[]);
    let mut sink = server.login("sink");
    let senders: Vec<_> = (0..8)
        .map(|s| {
            let mut client = server.login(&format!("s{s}"));
            std::thread::spawn(move || {
                let body = format!("{s}").repeat(3000);
                for _ in 0..50 {
                    client.send(&format!("sink: {body}\n"));
                }
                client
            })
        })
        .collect();
    for _ in 0..8 * 50 {
        let line = sink.line();
        let (from, body) = line.trim_end().split_once(": ").unwrap();
        let s = from.strip_prefix("from s").unwrap();
        assert_eq!(body, s.repeat(3000), "a line was cut or mixed");
    }
    for sender in senders {
        sender.join().unwrap();
    }
}
