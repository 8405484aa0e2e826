//! The library entry point: `chatd::run(listener, config)` in-process, as
//! benchmarks and embedding programs use it.

mod common;

use common::Client;

/// A server run in a thread of the test process routes messages.
#[test]
fn run_serves_in_process() {
    let listener = chatd::bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let addr = listener.local_addr().unwrap();
    let config = chatd::Config {
        handle_signals: false, // the test process keeps its signals
        ..chatd::Config::default()
    };
    // The server thread runs until the test process exits.
    std::thread::spawn(move || chatd::run(listener, config));
    let mut alice = Client::connect(addr);
    alice.send("alice\n");
    alice.sync("alice");
    let mut bob = Client::connect(addr);
    bob.send("bob\nalice: hi\n");
    alice.expect("from bob: hi");
}

/// The listener gets TCP_NODELAY, which accepted sockets inherit: the server
/// batches its own writes, and Nagle would delay small lines.
#[test]
fn listener_sets_nodelay_for_accepted_sockets() {
    let listener = chatd::bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let view = listener.try_clone().unwrap(); // the same socket
    let addr = listener.local_addr().unwrap();
    let config = chatd::Config {
        handle_signals: false,
        ..chatd::Config::default()
    };
    std::thread::spawn(move || chatd::run(listener, config));
    let mut client = Client::connect(addr);
    client.send("nagle\n");
    client.sync("nagle"); // the server is running
    assert!(socket2::SockRef::from(&view).tcp_nodelay().unwrap());
}
