//! `--max-buffer-memory`: all connections' buffers together stay bounded,
//! whatever a set of clients does; the largest holders are closed first
//! and the sender of the line being routed is never the one punished.

mod common;

use std::io::{Read, Write};
use std::thread;

use common::{Client, Server, poll_until};

/// A client that logs in, asks for about `bytes` of output to itself in
/// one go, half-closes and never reads: its queued output stays.
fn hoarder(server: &Server, name: &str, bytes: usize) -> Client {
    let mut client = Client::connect_small(server.addr);
    client.send(&format!("{name}\n"));
    let line = format!("{name}: {}\n", "h".repeat(1000));
    // It may be closed while it sends: that is the bound at work.
    let _ = client
        .stream()
        .write_all(line.repeat(bytes / line.len()).as_bytes());
    let _ = client.stream().shutdown(std::net::Shutdown::Write);
    client
}

/// 12 half-closed clients that never read, each under a generous
/// `--max-outbound`, would pin about 50 MiB of queued output; with
/// `--max-buffer-memory 8 MiB` the largest are closed as slow consumers and
/// the server's memory stays near the bound, while chat between others
/// goes on.
#[test]
fn half_closed_hoarders_are_bounded() {
    let mut server = Server::start(&[
        "--max-buffer-memory",
        "8388608",
        "--max-outbound",
        "67108864",
    ]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    // Each asks for 8 MiB: the kernel's socket buffers take about 4 MiB
    // of it, the rest waits in the server.
    let hoarders: Vec<Client> = (0..12)
        .map(|i| hoarder(&server, &format!("h{i}"), 8 << 20))
        .collect();
    let evicted = poll_until(|| {
        let n = server.stat("memory_evictions");
        (n >= 6).then_some(n)
    });
    assert!(evicted.is_some(), "no evictions:\n{}", server.log());
    let peak_kb = server.status_kb("VmHWM");
    assert!(
        peak_kb < 30 * 1024,
        "server peak RSS {peak_kb} kB: buffers not bounded"
    );
    alice.send("bob: still here\n");
    bob.expect("from alice: still here");
    drop(hoarders);
}

/// 1,500 connections that each send 16 KiB of an unterminated first line
/// would hold 24 MiB of kept input; with `--max-buffer-memory 4 MiB` the
/// holders are closed and the server's memory stays near the bound.
#[test]
fn unterminated_lines_before_login_are_bounded() {
    let mut server = Server::start(&["--max-buffer-memory", "4194304"]);
    let partial = "p".repeat(16 * 1024);
    let holders: Vec<Client> = (0..1500)
        .map(|_| {
            let mut client = server.connect();
            client.send(&partial);
            client
        })
        .collect();
    let evicted = poll_until(|| {
        let n = server.stat("memory_evictions");
        (n >= 1000).then_some(n)
    });
    assert!(evicted.is_some(), "too few evictions:\n{}", server.log());
    let peak_kb = server.status_kb("VmHWM");
    assert!(
        peak_kb < 20 * 1024,
        "server peak RSS {peak_kb} kB: kept input not bounded"
    );
    server.login("after").sync("after");
    drop(holders);
}

/// The sender of the line being routed is never closed for another's
/// queue: a sender of long lines (which holds input of its own) sends to
/// recipients that never read, and they, not the sender, are closed at
/// the bound.
#[test]
fn the_sender_is_not_punished_for_others_queues() {
    let mut server = Server::start(&[
        "--max-buffer-memory",
        "8388608",
        "--max-outbound",
        "67108864",
        "--max-line",
        "600000",
    ]);
    let mut sender = server.login("sender");
    let sleepers: Vec<Client> = (0..4)
        .map(|i| {
            let mut client = Client::connect_small(server.addr);
            client.send(&format!("z{i}\n"));
            client
        })
        .collect();
    let names: Vec<String> = (0..4).map(|i| format!("z{i}")).collect();
    let mut replies = sender.stream().try_clone().unwrap();
    let sink = thread::spawn(move || {
        let mut seen = Vec::new();
        let _ = replies.read_to_end(&mut seen);
        seen
    });
    let line = format!("{}: {}\n", names.join(","), "x".repeat(500_000));
    for _ in 0..40 {
        sender.send(&line);
    }
    let evicted = poll_until(|| (server.stat("memory_evictions") >= 1).then_some(()));
    assert!(evicted.is_some(), "no evictions:\n{}", server.log());
    sender.send("sender: alive\n");
    assert!(
        !server.log().contains("closing \"sender\""),
        "the sender was closed:\n{}",
        server.log()
    );
    sender.shutdown_write();
    let seen = String::from_utf8_lossy(&sink.join().unwrap()).into_owned();
    assert!(seen.contains("from sender: alive\n"), "{seen:?}");
    drop(sleepers);
}

/// When most of a burst of clients has left, the server frees the room it
/// left (pool, registry, timers) and hands memory back; the clients that
/// stay keep routing, and the names that left are free again.
#[test]
fn memory_is_handed_back_after_a_burst_and_the_rest_still_routes() {
    let mut server = Server::start(&["--log-level", "debug"]);
    let mut burst: Vec<_> = (0..300).map(|i| server.login(&format!("c{i}"))).collect();
    let mut stay = burst.split_off(250);
    drop(burst);
    server.wait_log("memory handed back");
    assert!(
        common::poll_until(|| (server.connections() == 50).then_some(())).is_some(),
        "the burst's connections did not close"
    );
    for (i, client) in stay.iter_mut().enumerate() {
        let to = 250 + (i + 1) % 50;
        client.send(&format!("c{to}: hi {i}\n"));
    }
    for (i, client) in stay.iter_mut().enumerate() {
        let before = (i + 49) % 50;
        client.expect(&format!("from c{}: hi {before}", 250 + before));
    }
    let mut back = server.login("c0");
    stay[0].send("c0: welcome back\n");
    back.expect("from c250: welcome back");
}

/// A client that connects and closes over and over, alone, does not make
/// each close a heap trim: that would let it spend the server's CPU.
#[test]
fn lone_reconnects_do_not_trim_the_heap() {
    let mut server = Server::start(&["--log-level", "debug"]);
    for i in 0..100 {
        let mut client = server.login(&format!("x{i}"));
        client.shutdown_write();
        client.expect_eof();
    }
    let gone = common::poll_until(|| (server.connections() == 0).then_some(()));
    assert!(gone.is_some(), "the connections did not close");
    assert!(
        !server.log().contains("memory handed back"),
        "{}",
        server.log()
    );
}
