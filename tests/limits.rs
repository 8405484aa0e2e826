//! Limits, timeouts and the reactor's duties: each offender is closed alone,
//! with a clear `error:` line, and nobody else notices.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use common::{Server, poll_until};

/// Lines before a too-long line are processed; the too-long line gets
/// `line-too-long` and the connection is closed. A line of exactly the
/// limit is fine, with either terminator.
#[test]
fn too_long_line_closes_after_earlier_lines() {
    let server = Server::start(&["--max-line", "16"]);
    let mut alice = server.connect();
    // "alice: 123456789" is exactly 16 bytes.
    alice.send("alice\nalice: 123456789\nalice: 123456789\r\nalice: 1234567890\nalice: never\n");
    alice.expect("from alice: 123456789");
    alice.expect("from alice: 123456789");
    alice.expect("error: line-too-long: max 16 bytes");
    alice.expect_eof();
}

/// A too-long line arriving with more input and the client's EOF all at
/// once still gets its error line and a clean close, not a reset: the
/// server drains the rest of the input (within its lingering bound of
/// 64 KiB, which this stays under wherever the server notices the line)
/// before closing.
#[test]
fn too_long_line_with_more_input_closes_cleanly() {
    let server = Server::start(&["--max-line", "1000"]);
    for _ in 0..20 {
        let mut client = server.connect();
        let mut input = b"alice\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 60_000));
        client.send_bytes(&input);
        client.shutdown_write();
        client.expect("error: line-too-long: max 1000 bytes");
        client.expect_eof();
    }
}

/// A line that never ends is refused once it passes the limit, without the
/// server waiting for (or buffering) more.
#[test]
fn endless_line_is_refused_without_a_newline() {
    let server = Server::start(&["--max-line", "1000"]);
    let mut alice = server.login("alice");
    alice.send("alice: ");
    alice.send(&"x".repeat(1100));
    alice.expect("error: line-too-long: max 1000 bytes");
    assert!(alice.is_closed_by_server());
}

/// A recipient that never reads is closed as a slow consumer once its queue
/// passes `--max-outbound`; the sender and others are unaffected and the
/// server's memory stays bounded.
#[test]
fn slow_consumer_is_closed_alone() {
    let mut server = Server::start(&["--max-outbound", "65536"]);
    let mut alice = server.login("alice");
    let mut carol = server.login("carol");
    let mut bob = server.login("bob"); // never reads until the end

    // Drain alice's replies (not-online errors once bob is gone).
    let mut replies = alice.stream().try_clone().unwrap();
    let drain = thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = replies.read_to_end(&mut sink);
        sink
    });
    let line = format!("bob: {}\n", "z".repeat(1024));
    let chunk = line.repeat(256); // 256 KiB per write
    for _ in 0..64 {
        alice.send(&chunk); // 16 MiB in all
    }
    server.wait_log("closing slow consumer \"bob\"");
    alice.send("carol: still here\n");
    carol.expect("from alice: still here");
    assert!(bob.is_closed_by_server(), "bob was not closed");

    let peak_kb = server.status_kb("VmHWM");
    assert!(
        peak_kb < 12 * 1024,
        "server peak RSS {peak_kb} kB: output not bounded"
    );
    server.signal("USR1");
    server.wait_log("slow_consumers=1 ");
    alice.shutdown_write();
    drop(alice);
    drop(drain);
}

/// While one client floods another with large lines, a third client's
/// messages to a fourth still arrive: each connection gets a bounded
/// amount of reading per loop turn.
#[test]
fn a_flooding_sender_does_not_starve_others() {
    // The target shares two cores with everything else here and may fall
    // behind; should it be closed as a slow consumer, the flood goes on all
    // the same (to an offline name), which is what matters here.
    let server = Server::start(&["--max-outbound", "67108864"]);
    let flooder = server.login("flooder");
    let target = server.login("target");
    let mut c = server.login("c");
    let mut d = server.login("d");

    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let mut reader = target.stream().try_clone().unwrap();
    let target_reader = thread::spawn(move || {
        let mut buf = vec![0; 1 << 16];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let mut replies = flooder.stream().try_clone().unwrap();
    let reply_drain = thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = replies.read_to_end(&mut sink);
    });
    let flood = {
        let stop = Arc::clone(&stop);
        let flooded = Arc::clone(&flooded);
        let mut writer = flooder.stream().try_clone().unwrap();
        let line = format!("target: {}\n", "f".repeat(16_000));
        let chunk = line.repeat(16);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = writer.write_all(chunk.as_bytes()) {
                    panic!("flood write failed: {e}");
                }
                flooded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    // Let the flood get going before measuring anything.
    assert!(poll_until(|| (flooded.load(Ordering::Relaxed) > 4 << 20).then_some(())).is_some());
    for i in 0..50 {
        c.send(&format!("d: {i}\n"));
        d.expect(&format!("from c: {i}"));
    }
    assert!(
        !flood.is_finished(),
        "the flood must still be running; log:\n{}",
        server.log()
    );
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    flooder.shutdown_write();
    target.shutdown_write();
    reply_drain.join().unwrap();
    target_reader.join().unwrap();
}

/// Over `--max-clients` a connection gets `server-full`; closing everyone
/// frees every slot, and the server fills up again exactly as before.
#[test]
fn max_clients_rejects_and_frees_every_slot() {
    let server = Server::start(&["--max-clients", "3"]);
    let sockets_idle = server.open_sockets();
    for round in 0..2 {
        let clients: Vec<_> = (0..3)
            .map(|i| {
                let name = format!("c{round}{i}");
                let joined = poll_until(|| {
                    let mut client = server.connect();
                    client.send(&format!("{name}\n{name}: in\n"));
                    match client.line().as_str() {
                        "error: server-full\n" => None, // an old slot not freed yet
                        line => {
                            assert_eq!(line, format!("from {name}: in\n"));
                            Some(client)
                        }
                    }
                });
                joined.expect("a slot should free up")
            })
            .collect();
        let mut extra = server.connect();
        extra.send("extra\n");
        extra.expect("error: server-full");
        extra.expect_eof();
        for client in clients {
            client.shutdown_write();
        }
    }
    let back = poll_until(|| (server.open_sockets() == sockets_idle).then_some(()));
    assert!(back.is_some(), "sockets left open (CLOSE_WAIT?)");
}

/// A client that does not log in within `--login-timeout` is closed with
/// `login-timeout`; logged-in clients are unaffected.
#[test]
fn login_timeout_closes_silent_connections() {
    let server = Server::start(&["--login-timeout", "0.3"]);
    let mut alice = server.login("alice");
    let mut silent = server.connect();
    silent.expect("error: login-timeout");
    silent.expect_eof();
    alice.sync("alice");
}

/// A logged-in client silent for `--idle-timeout` is closed with
/// `idle-timeout`; one that keeps talking stays.
#[test]
fn idle_timeout_closes_only_the_silent() {
    let server = Server::start(&["--idle-timeout", "0.4"]);
    let mut talker = server.login("talker");
    let mut quiet = server.login("quiet");
    let done = Arc::new(AtomicBool::new(false));
    let keepalive = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                talker.sync("talker");
                thread::sleep(Duration::from_millis(50));
            }
            talker
        })
    };
    quiet.expect("error: idle-timeout");
    quiet.expect_eof();
    done.store(true, Ordering::Relaxed);
    let mut talker = keepalive.join().unwrap();
    talker.sync("talker");
}

/// A timer set for a connection that closed does not fire on the new
/// connection that reuses its slab key.
#[test]
fn timers_do_not_hit_a_reused_slot() {
    let mut server = Server::start(&["--login-timeout", "1", "--log-level", "debug"]);
    let first = server.connect(); // gets slab key 0 and a login timer
    server.wait_log("as #0");
    drop(first);
    server.wait_log("#0 closed");
    let mut reuser = server.login("reuser"); // reuses key 0
    let mut later = server.connect(); // times out after the first one's timer
    later.expect("error: login-timeout");
    reuser.sync("reuser");
    assert!(
        !server.log().contains("#1 closed"),
        "the reusing connection was closed"
    );
}

/// Under a low open-file limit, `--max-clients` is lowered with a warning,
/// and that many clients really fit; the next one is turned away.
#[test]
fn max_clients_is_fitted_to_the_open_file_limit() {
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=64:64", env!("CARGO_BIN_EXE_chatd")]);
    let mut server = Server::spawn(cmd, &["--max-clients", "1000"]);
    let warning = server.wait_log("does not fit the open-file limit");
    assert!(warning.contains("lowered to"), "{warning}");
    let started = server.wait_log("listening on");
    let max: usize = started
        .split("max-clients ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .expect("max-clients in the start line");
    assert!((20..64).contains(&max), "max-clients {max}");
    let clients: Vec<_> = (0..max).map(|i| server.login(&format!("c{i}"))).collect();
    let mut extra = server.connect();
    extra.send("extra\n");
    extra.expect("error: server-full");
    drop(clients);
}

/// When the process runs out of descriptors, accepting pauses (with one
/// warning) instead of spinning, and resumes when descriptors free up.
#[test]
fn descriptor_exhaustion_pauses_accepting_without_spinning() {
    let mut server = Server::start(&[]);
    let mut alice = server.login("alice");
    let open = server.open_fds();
    server.set_nofile_soft(open);
    let waiting: Vec<_> = (0..5).map(|_| server.connect()).collect();
    server.wait_log("pausing accepts");
    // Half a second of chat while the backlog waits: the server serves the
    // clients it has, and spends a fraction of that time's CPU (a loop
    // spinning on the listener would spend all of it).
    let cpu_before = server.cpu_time();
    let started = std::time::Instant::now();
    let mut round_trips = 0;
    while started.elapsed() < Duration::from_millis(500) {
        alice.sync("alice"); // still serving the connections it has
        round_trips += 1;
        thread::sleep(Duration::from_millis(10));
    }
    let (cpu, wall) = (server.cpu_time() - cpu_before, started.elapsed());
    assert!(
        cpu < wall / 3,
        "server used {cpu:?} of CPU in {wall:?} ({round_trips} round trips): spinning"
    );
    server.set_nofile_soft(20000);
    for (i, mut client) in waiting.into_iter().enumerate() {
        let name = format!("w{i}");
        client.send(&format!("{name}\n"));
        client.sync(&name);
    }
    let warnings = server.log().matches("pausing accepts").count();
    assert_eq!(warnings, 1, "exhaustion is logged once, not per retry");
}

/// A recipient closed as a slow consumer is told: after what was queued for
/// it within `--max-outbound`, its last line is `error: slow-consumer`.
#[test]
fn slow_consumer_gets_error_line_last() {
    let mut server = Server::start(&["--max-outbound", "65536"]);
    let mut alice = server.login("alice");
    let bob = server.login("bob"); // reads only once it is closed
    let mut replies = alice.stream().try_clone().unwrap();
    let drain = thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = replies.read_to_end(&mut sink);
    });
    let chunk = format!("bob: {}\n", "z".repeat(1024)).repeat(256);
    let mut chunks = 0;
    while !server.log().contains("closing slow consumer \"bob\"") {
        assert!(chunks < 400, "bob was never closed");
        alice.send(&chunk);
        chunks += 1;
    }
    let mut received = Vec::new();
    let mut stream = bob.stream().try_clone().unwrap();
    stream.read_to_end(&mut received).expect("bob reads to EOF");
    let text = String::from_utf8(received).unwrap();
    assert!(
        text.ends_with(&format!(
            "from alice: {}\nerror: slow-consumer\n",
            "z".repeat(1024)
        )),
        "bob's last lines: {:?}",
        &text[text.len().saturating_sub(80)..]
    );
    assert_eq!(server.stat("errors.slow-consumer"), 1);
    assert_eq!(server.stat("slow_consumers"), 1);
    alice.shutdown_write();
    drop(alice);
    drop(drain);
}

/// `not-online` names the first offline recipients and counts the others,
/// so a line naming a multitude of strangers gets a short error line (a
/// long one could pass `--max-outbound` and close the sender).
#[test]
fn not_online_names_the_first_and_counts_the_rest() {
    let server = Server::start(&["--max-line", "1000000", "--max-outbound", "2000000"]);
    let mut alice = server.login("alice");
    let names: Vec<String> = (0..100_000).map(|i| format!("s{i}")).collect();
    alice.send(&format!("{},alice,s0: hi\n", names.join(",")));
    alice.expect("from alice: hi");
    let line = alice.line();
    let list = line
        .strip_prefix("error: not-online: ")
        .and_then(|rest| rest.strip_suffix(" more\n"))
        .unwrap_or_else(|| panic!("unexpected line {:?}", &line[..line.len().min(200)]));
    let (listed, more) = list.split_once(": and ").expect("a count of the rest");
    let listed: Vec<&str> = listed.split(", ").collect();
    assert!(line.len() < 1100, "{} bytes", line.len());
    assert_eq!(listed[..3], ["s0", "s1", "s2"], "the first, in order");
    assert_eq!(listed.len() + more.parse::<usize>().unwrap(), 100_000);
    alice.sync("alice"); // the sender stays connected
}

/// A recipient that reads promptly is not a slow consumer because one
/// turn's input grew into more than `--max-outbound` of deliveries: 64 KiB
/// of `b:` lines from a 64-byte name become 1.5 MiB for b in one turn.
#[test]
fn a_burst_of_short_lines_does_not_close_a_prompt_reader() {
    let server = Server::start(&[]);
    let long = "s".repeat(64);
    let mut sender = server.login(&long);
    let mut b = server.login("b");
    let lines = 65536 / 3;
    sender.send(&"b:\n".repeat(lines));
    let want = format!("from {long}: \n");
    let mut received = vec![0; want.len() * lines];
    b.stream()
        .try_clone()
        .unwrap()
        .read_exact(&mut received)
        .unwrap();
    assert!(received.chunks(want.len()).all(|l| l == want.as_bytes()));
    b.sync("b"); // still connected
}
