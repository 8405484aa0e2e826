//! The reactor stops reading at a short read instead of waiting for
//! `WouldBlock` (one system call less per message). These tests attack that:
//! input split at every kind of boundary, pauses, and an unterminated last
//! line arriving together with the FIN. Input left stranded in a socket
//! would show up as a missing reply; a stranded EOF as a connection that is
//! never closed. Both fail within the read timeout.

mod common;

use std::thread;
use std::time::Duration;

use common::{Rng, Server};

/// One client: logs in, sends `lines` messages to itself in randomly split
/// writes with random pauses, the last one without `\n`, shuts down its
/// sending side at once, and expects every reply and then the close.
fn chatter(server_addr: std::net::SocketAddr, id: usize, lines: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    let name = format!("c{id}");
    let mut input = format!("{name}\n");
    for i in 0..lines {
        input += &format!("{name}: {i} {}\n", "y".repeat(rng.below(40) as usize));
    }
    input.pop(); // the last line ends with EOF, not \n
    let mut client = common::Client::connect(server_addr);
    let bytes = input.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let size = match rng.below(4) {
            0 => 1,
            1 => 1 + rng.below(16) as usize,
            2 => 1 + rng.below(1500) as usize,
            _ => bytes.len() - at,
        };
        let end = (at + size).min(bytes.len());
        client.send_bytes(&bytes[at..end]);
        at = end;
        match rng.below(8) {
            0 => thread::sleep(Duration::from_micros(rng.below(500))),
            1 => thread::yield_now(),
            _ => {}
        }
    }
    client.shutdown_write();
    let mut rng = Rng(seed | 1);
    for i in 0..lines {
        let pad = "y".repeat(rng.below(40) as usize);
        client.expect(format!("from {name}: {i} {pad}").trim_end());
    }
    client.expect_eof();
}

/// Many clients at once, several rounds: every line is answered and every
/// EOF closes the connection.
#[test]
fn no_input_or_eof_is_stranded() {
    let server = Server::start(&[]);
    let addr = server.addr;
    for round in 0..4u64 {
        let workers: Vec<_> = (0..24)
            .map(|id| {
                let seed = round * 1000 + id as u64 + 7;
                thread::spawn(move || chatter(addr, id, 200, seed))
            })
            .collect();
        for worker in workers {
            worker.join().expect("a client lost input or EOF");
        }
    }
}

/// Input and FIN together in one segment, with nothing else to wake the
/// server: the last line still counts and the connection closes.
#[test]
fn data_and_fin_together() {
    let server = Server::start(&[]);
    for i in 0..50 {
        let mut client = server.connect();
        let name = format!("f{i}");
        client.send(&format!("{name}\n{name}: one\n{name}: two"));
        client.shutdown_write();
        client.expect(&format!("from {name}: one"));
        client.expect(&format!("from {name}: two"));
        client.expect_eof();
    }
}

/// Urgent data (`MSG_OOB`) ends a read at its mark with more input queued,
/// and that input raises no new edge. With the server stopped while the
/// client sends, everything is queued before the one event: the lines
/// after the mark are answered all the same.
#[test]
fn urgent_data_strands_no_input() {
    let server = Server::start(&[]);
    let mut receiver = server.login("r");
    let mut sender = server.login("s");
    sender.sync("s");
    for i in 0..5 {
        server.signal("STOP");
        let head = format!("r: {i} urgen");
        let sent = socket2::SockRef::from(sender.stream()).send_out_of_band(head.as_bytes());
        assert_eq!(sent.expect("send urgent data"), head.len());
        sender.send(&format!("t\nr: {i} after\n"));
        server.signal("CONT");
        // The urgent byte (the last of `head`) is out of band, not a line's.
        receiver.expect(&format!("from s: {i} urget"));
        receiver.expect(&format!("from s: {i} after"));
    }
}
