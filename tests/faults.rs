//! Fault injection against the real binary: resets, half-closes, vanishing
//! recipients, silent and slow clients, garbage. After each, the server
//! still logs in and routes, its connection count is back, and no socket is
//! left in CLOSE_WAIT (`Server::assert_recovered`).

mod common;

use std::io::Read;
use std::thread;
use std::time::Duration;

use common::{Rng, Server, poll_until};

/// A reset in the middle of a line: nothing of the line is delivered, the
/// name is freed, nobody else notices.
#[test]
fn reset_in_the_middle_of_a_line() {
    let mut server = Server::start(&[]);
    let mut bob = server.login("bob");
    let mut carol = server.login("carol");
    carol.send("bob: this line never ends");
    carol.reset();
    let mut carol = server.connect();
    poll_until(|| {
        carol = server.connect();
        carol.send("carol\ncarol: back\n");
        (carol.line() == "from carol: back\n").then_some(())
    })
    .expect("carol's name was never freed");
    bob.sync("bob"); // no partial line arrived before this
    drop(carol);
    server.assert_recovered(1);
}

/// A reset while a large write to the client is pending: the connection is
/// dropped with its queue, the sender goes on.
#[test]
fn reset_during_a_large_pending_write() {
    let mut server = Server::start(&[]);
    let mut alice = server.login("alice");
    let bob = server.login("bob"); // never reads
    let batch = format!("bob: {}\n", "p".repeat(2000)).repeat(300); // 600 KB
    alice.send(&batch);
    alice.sync("alice");
    bob.reset();
    // Once bob is gone, alice hears so; her own traffic still flows.
    poll_until(|| {
        alice.send("bob: are you there?\nalice: sync\n");
        match alice.line().as_str() {
            "error: not-online: bob\n" => {
                alice.expect("from alice: sync");
                Some(())
            }
            line => {
                assert_eq!(line, "from alice: sync\n"); // bob still there
                None
            }
        }
    })
    .expect("bob was never dropped");
    alice.sync("alice");
    server.assert_recovered(1);
}

/// A half-close with a partial last line: the line is delivered, then the
/// server closes.
#[test]
fn half_close_with_a_partial_last_line() {
    let mut server = Server::start(&[]);
    let mut bob = server.login("bob");
    let mut carol = server.connect();
    carol.send("carol\nbob: first\nbob: last, no newline");
    carol.shutdown_write();
    carol.expect_eof();
    bob.expect("from carol: first");
    bob.expect("from carol: last, no newline");
    server.assert_recovered(1);
}

/// Recipients that vanish while a fan-out to them is being written: the
/// others receive every line, in order.
#[test]
fn recipients_vanish_during_a_fan_out() {
    let mut server = Server::start(&[]);
    let mut alice = server.login("alice");
    let names: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    let readers: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut client = server.login(name);
            thread::spawn(move || {
                for k in 0..1500 {
                    if i % 3 == 1 && k == 200 {
                        client.reset(); // vanishes mid-stream
                        return;
                    }
                    client.expect(&format!("from alice: {k} {}", "f".repeat(500)));
                }
            })
        })
        .collect();
    let mut replies = alice.stream().try_clone().unwrap();
    let drain = thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = replies.read_to_end(&mut sink); // not-online errors
    });
    let body = "f".repeat(500);
    let batch: String = (0..1500)
        .map(|k| format!("{}: {k} {body}\n", names.join(",")))
        .collect();
    alice.send(&batch);
    for reader in readers {
        reader.join().expect("a remaining recipient missed a line");
    }
    alice.shutdown_write();
    drain.join().unwrap();
    server.assert_recovered(0);
}

/// Connections that never send: `--login-timeout` closes them all and the
/// count returns to zero.
#[test]
fn silent_connections_time_out() {
    let mut server = Server::start(&["--login-timeout", "0.3"]);
    let mut silent: Vec<_> = (0..20).map(|_| server.connect()).collect();
    for client in &mut silent {
        client.expect("error: login-timeout");
        client.expect_eof();
    }
    server.assert_recovered(0);
}

/// Silent connections filling `--max-clients`: newcomers are turned away
/// until the login timeout frees the slots, then they fit again.
#[test]
fn silent_connections_give_their_slots_back() {
    let mut server = Server::start(&["--max-clients", "5", "--login-timeout", "0.5"]);
    let mut silent: Vec<_> = (0..5).map(|_| server.connect()).collect();
    let mut turned_away = server.connect();
    turned_away.expect("error: server-full");
    for client in &mut silent {
        client.expect("error: login-timeout");
    }
    // Closed connections linger (1 s after the flush, 2 s at most) for
    // their client's EOF, holding their descriptor; then the slots are free.
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let name = format!("n{i}");
            poll_until(|| {
                let mut client = server.connect();
                client.send(&format!("{name}\n{name}: in\n"));
                (client.line() == format!("from {name}: in\n")).then_some(client)
            })
            .expect("the slots never came back")
        })
        .collect();
    server.assert_recovered(4);
    drop(clients);
}

/// A slowloris sending its name a byte at a time does not extend the login
/// deadline: it is closed on time.
#[test]
fn slowloris_login_is_closed_on_time() {
    let mut server = Server::start(&["--login-timeout", "1"]);
    let mut slow = server.connect();
    let mut writer = slow.stream().try_clone().unwrap();
    let dribble = thread::spawn(move || {
        use std::io::Write;
        for byte in b"slowlorisslowlorisslowloris".iter().cycle().take(200) {
            if writer.write_all(&[*byte]).is_err() {
                return true; // the server closed it
            }
            thread::sleep(Duration::from_millis(100));
        }
        false
    });
    slow.expect("error: login-timeout");
    assert!(dribble.join().unwrap(), "the dribbler was never cut off");
    server.assert_recovered(0);
}

/// 10,000 lines of random bytes from one client while two others chat:
/// their messages all arrive, in order.
#[test]
fn random_bytes_do_not_disturb_others() {
    let mut server = Server::start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    let noisy = server.login("noisy");
    let mut replies = noisy.stream().try_clone().unwrap();
    let drain = thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = replies.read_to_end(&mut sink);
    });
    let mut writer = noisy.stream().try_clone().unwrap();
    let noise = thread::spawn(move || {
        use std::io::Write;
        let mut rng = Rng(0x5eed);
        let mut batch = Vec::new();
        for line in 0..10_000 {
            let len = rng.next() % 200;
            batch.extend(
                (0..len)
                    .map(|_| match rng.next() % 8 {
                        0 => b':',
                        1 => b',',
                        2 => b'\r',
                        _ => (rng.next() % 256) as u8,
                    })
                    .filter(|&b| b != b'\n'),
            );
            batch.push(b'\n');
            if line % 100 == 99 {
                writer.write_all(&batch).unwrap();
                batch.clear();
            }
        }
    });
    for i in 0..500 {
        alice.send(&format!("bob: {i}\n"));
        bob.expect(&format!("from alice: {i}"));
    }
    noise.join().unwrap();
    noisy.shutdown_write();
    drain.join().unwrap();
    drop(noisy);
    server.assert_recovered(2);
}

/// A client that half-closes and then never reads what is queued for it
/// does not keep its slot: `--idle-timeout` closes it too.
#[test]
fn half_closed_client_that_never_reads_times_out() {
    let mut server = Server::start(&["--idle-timeout", "0.5", "--max-outbound", "67108864"]);
    let mut alice = server.login("alice");
    let bob = server.login("bob");
    // More than the kernel's socket buffers hold, so some stays queued in
    // the server; then bob half-closes without reading any of it.
    let batch = format!("bob: {}\n", "q".repeat(4000)).repeat(4000); // 16 MB
    let mut writer = alice.stream().try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        let _ = writer.write_all(batch.as_bytes());
    });
    sender.join().unwrap();
    alice.sync("alice"); // everything above is routed to bob
    bob.shutdown_write();
    // Both go quiet; alice is closed as idle, and so must bob be, though he
    // half-closed and has output pending (without a deadline he would hold
    // his slot, and this count would stay at 1).
    let gone = poll_until(|| (server.connections() == 0).then_some(()));
    assert!(gone.is_some(), "the half-closed reader kept its slot");
    drop(bob);
    server.assert_recovered(0);
}
