//! The library entry point: `chatd::run(listener, config, control)`
//! in-process, as benchmarks, fuzzers and embedding programs use it.

mod common;

use std::thread;

use common::{Client, TIMEOUT, poll_until};

/// Starts a server in a thread of the test process; returns its address,
/// its stop handle and the thread.
fn start() -> (
    std::net::SocketAddr,
    chatd::Control,
    thread::JoinHandle<std::io::Result<chatd::Exit>>,
) {
    let listener = chatd::bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let addr = listener.local_addr().unwrap();
    let control = chatd::Control::new();
    let handle = control.clone();
    let server = thread::spawn(move || chatd::run(listener, chatd::Config::default(), handle));
    (addr, control, server)
}

/// Waits for the server thread to return, failing the test after TIMEOUT.
fn join(server: thread::JoinHandle<std::io::Result<chatd::Exit>>) -> chatd::Exit {
    assert!(
        poll_until(|| server.is_finished().then_some(())).is_some(),
        "the server did not stop within {TIMEOUT:?}"
    );
    server.join().unwrap().unwrap()
}

/// A server run in a thread of the test process routes messages.
#[test]
fn run_serves_in_process() {
    let (addr, control, server) = start();
    let mut alice = Client::connect(addr);
    alice.send("alice\n");
    alice.sync("alice");
    let mut bob = Client::connect(addr);
    bob.send("bob\nalice: hi\n");
    alice.expect("from bob: hi");
    drop(bob);
    control.stop();
    alice.expect("error: shutting-down");
    drop(alice); // its EOF lets the shutdown complete without waiting
    assert_eq!(join(server), chatd::Exit::Graceful);
}

/// The signal dispositions of this process, as the kernel reports them:
/// the `SigCgt` mask of `/proc/self/status` (signals with a handler).
fn caught_signals() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|line| line.starts_with("SigCgt:"))
        .expect("SigCgt line")
        .to_string()
}

/// A server can be started and stopped with its handle, twice in one
/// process, and leaves no signal handler and no open-file limit change
/// behind: the library changes no process-wide state.
#[test]
fn stops_by_handle_twice_and_leaves_the_process_as_it_was() {
    let signals = caught_signals();
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    for round in 0..2 {
        let (addr, control, server) = start();
        let mut client = Client::connect(addr);
        let name = format!("round{round}");
        client.send(&format!("{name}\n"));
        client.sync(&name);
        control.stop();
        client.expect("error: shutting-down");
        client.expect_eof();
        drop(client);
        assert_eq!(join(server), chatd::Exit::Graceful);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the listener is closed once run returns"
        );
    }
    assert_eq!(
        caught_signals(),
        signals,
        "a signal handler was left behind"
    );
    assert_eq!(rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap(), limit);
}

/// Two stop requests end the run at once, even with a client that never
/// reads and the shutdown timeout far away; a handle steers one run only.
#[test]
fn a_second_stop_forces_the_exit_and_a_handle_serves_one_run() {
    let (addr, control, server) = start();
    let mut client = Client::connect(addr);
    client.send("stubborn\n");
    client.sync("stubborn");
    control.stop();
    control.stop();
    assert_eq!(join(server), chatd::Exit::Forced);
    let listener = chatd::bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let again = chatd::run(listener, chatd::Config::default(), control);
    assert_eq!(
        again.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput,
        "a used handle is refused"
    );
}

/// A stop request made before the loop runs is not lost.
#[test]
fn a_stop_before_the_loop_starts_is_honoured() {
    let listener = chatd::bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let control = chatd::Control::new();
    control.stop();
    let exit = chatd::run(listener, chatd::Config::default(), control).unwrap();
    assert_eq!(exit, chatd::Exit::Graceful);
}

/// The listener gets TCP_NODELAY, which accepted sockets inherit: the server
/// batches its own writes, and Nagle would delay small lines.
#[test]
fn listener_sets_nodelay_for_accepted_sockets() {
    let listener = chatd::bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let view = listener.try_clone().unwrap(); // the same socket
    let addr = listener.local_addr().unwrap();
    let control = chatd::Control::new();
    let handle = control.clone();
    let server = thread::spawn(move || chatd::run(listener, chatd::Config::default(), handle));
    let mut client = Client::connect(addr);
    client.send("nagle\n");
    client.sync("nagle"); // the server is running
    assert!(socket2::SockRef::from(&view).tcp_nodelay().unwrap());
    drop(client);
    control.stop();
    assert_eq!(join(server), chatd::Exit::Graceful);
}
