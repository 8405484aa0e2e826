//! Live upgrade (SIGUSR2): the binary now at chatd's path takes over every
//! connection with its state; nothing a client sees changes. Each test runs
//! a copy of the binary from a directory of its own, so it can replace the
//! file with a broken one.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::{Client, Server, poll_until};

/// A private copy of the chatd binary, removed at the end.
struct Binary {
    dir: PathBuf,
}

impl Binary {
    fn new(test: &str) -> Binary {
        let dir = std::env::temp_dir().join(format!("chatd-upgrade-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let binary = Binary { dir };
        binary.install_chatd();
        binary
    }

    fn path(&self) -> PathBuf {
        self.dir.join("chatd")
    }

    /// Puts the real chatd at the path (a new file, as a package upgrade
    /// does: the running process keeps its own).
    fn install_chatd(&self) {
        let tmp = self.dir.join("chatd.new");
        std::fs::copy(env!("CARGO_BIN_EXE_chatd"), &tmp).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }

    /// Puts a script at the path that exits at once with status 3.
    fn install_broken(&self, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.dir.join("chatd.new");
        std::fs::write(&tmp, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }

    fn start(&self, args: &[&str]) -> Server {
        Server::spawn(Command::new(self.path()), args)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Clients logged in, one with half a line sent, one with output queued
/// that it does not read, and traffic flowing: after the upgrade every
/// connection is open, every name held, the half line completes and
/// routes, the queued output arrives, and no line is lost, duplicated or
/// reordered. The old process exits 0; the new one answers.
#[test]
fn every_connection_and_its_state_survive() {
    let binary = Binary::new("state");
    let mut server = binary.start(&["--max-outbound", "16000000"]);
    let old_pid = server.pid();
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    let mut carol = server.login("carol");
    carol.send("bob: hal"); // no newline yet
    let mut dave = Client::connect_small(server.addr);
    dave.send("dave\n");
    dave.sync("dave"); // logged in before the flood comes
    let payload = "d".repeat(10_000);
    alice.send(&format!("dave: {payload}\n").repeat(800)); // 8 MB for a reader that waits
    alice.sync("alice");
    // Traffic all through the upgrade: a numbered stream from one client to
    // another.
    let mut sender = server.login("sender");
    let mut receiver = server.login("receiver");
    let stop = Arc::new(AtomicBool::new(false));
    let flow = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                sender.send(&format!("receiver: {sent}\n"));
                sent += 1;
                thread::sleep(Duration::from_micros(200));
            }
            sender.send("receiver: end\n");
            sent
        })
    };
    thread::sleep(Duration::from_millis(100));
    let new_pid = server.upgrade(1);
    assert_ne!(new_pid, old_pid);
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let sent = flow.join().unwrap();
    for i in 0..sent {
        receiver.expect(&format!("from sender: {i}"));
    }
    receiver.expect("from sender: end");
    carol.send("f\n");
    bob.expect("from carol: half");
    let mut received = vec![0; 800 * (payload.len() + "from alice: \n".len())];
    dave.stream()
        .try_clone()
        .unwrap()
        .read_exact(&mut received)
        .unwrap();
    let want = format!("from alice: {payload}\n");
    assert!(
        received
            .chunks(want.len())
            .all(|line| line == want.as_bytes())
    );
    let mut again = server.connect();
    again.send("alice\n");
    again.expect("error: name-taken: alice");
    drop(again);
    alice.send("bob: after\n");
    bob.expect("from alice: after");
    assert!(server.log().contains("upgrade: took over 6 connection(s)"));
    // Six handed over; the sender has gone since (its thread ended).
    let five = poll_until(|| (server.connections() == 5).then_some(()));
    assert!(five.is_some(), "{}", server.log());
}

/// An upgrade to a binary that exits at once leaves the old process
/// serving every connection; the next upgrade, to a good binary, works.
#[test]
fn a_failing_binary_leaves_the_old_process_serving() {
    let binary = Binary::new("failing");
    let mut server = binary.start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    binary.install_broken("exit 3");
    server.signal("USR2");
    server.wait_log("upgrade failed: the new process exited before it was ready (exit status: 3)");
    alice.send("bob: still here\n");
    bob.expect("from alice: still here");
    binary.install_chatd();
    server.upgrade(1);
    alice.send("bob: upgraded\n");
    bob.expect("from alice: upgraded");
}

/// A new process that never says it is ready is stopped after the
/// timeout and the old one serves on; an upgrade asked for while one is
/// under way, or during shutdown, is refused with a log line.
#[test]
fn upgrades_are_refused_while_one_runs_and_during_shutdown() {
    let binary = Binary::new("refused");
    let mut server = binary.start(&["--shutdown-timeout", "30"]);
    let mut alice = server.login("alice");
    binary.install_broken("sleep 30");
    server.signal("USR2");
    server.wait_log("upgrade: handing ");
    server.signal("USR2");
    server.wait_log("upgrade refused: one is under way");
    server.wait_log("upgrade failed: the new process was not ready in time");
    alice.sync("alice");
    binary.install_chatd();
    server.signal("TERM");
    server.wait_log("shutdown requested");
    server.signal("USR2");
    server.wait_log("upgrade refused: shutting down");
}

/// A stop asked for while the new process starts wins: the old process
/// passes it on, the new one dies of it before it serves, and the old one
/// then shuts down as asked: clients get `error: shutting-down`.
#[test]
fn a_stop_while_the_new_process_starts_shuts_down() {
    let binary = Binary::new("stop-starting");
    let mut server = binary.start(&[]);
    let mut alice = server.login("alice");
    let real = binary.dir.join("chatd.real");
    std::fs::copy(env!("CARGO_BIN_EXE_chatd"), &real).unwrap();
    binary.install_broken(&format!("sleep 1\nexec {} \"$@\"", real.display()));
    server.signal("USR2");
    server.wait_log("upgrade: handing ");
    server.signal("TERM");
    alice.expect("error: shutting-down");
    alice.expect_eof();
    assert!(server.wait_exit().success());
    server.wait_log("this process shuts down, as asked");
}

/// SIGTERM right behind SIGUSR2 is never lost, whichever step of the upgrade it meets: the
/// clients get `error: shutting-down` and nothing serves on.
#[test]
fn a_stop_right_behind_an_upgrade_request_is_not_lost() {
    let binary = Binary::new("stop-behind");
    for round in 0..3 {
        let mut server = binary.start(&[]);
        let mut alice = server.login("alice");
        // Back to back from here: a shell between the two can be
        // descheduled past the whole upgrade on a busy machine, and a
        // signal to a process that has gone reaches nobody.
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(server.pid() as i32);
        kill(pid, Signal::SIGUSR2).unwrap();
        kill(pid, Signal::SIGTERM).unwrap();
        alice.expect("error: shutting-down");
        alice.expect_eof();
        assert!(server.wait_exit().success(), "round {round}");
        let closed = poll_until(|| {
            std::net::TcpStream::connect(server.addr)
                .is_err()
                .then_some(())
        });
        assert!(
            closed.is_some(),
            "round {round}: something still serves:\n{}",
            server.log()
        );
    }
}

/// Scrapes of the metrics endpoint go on through live upgrades: the old
/// process answers the scrapers it accepted, also while the new one
/// starts, and the new one answers the rest; none gets a reset or an
/// empty answer.
#[test]
fn scrapes_are_answered_through_upgrades() {
    let binary = Binary::new("scrapes");
    let mut server = binary.start(&["--metrics-addr", "127.0.0.1:0"]);
    let line = server.wait_log("metrics on http://");
    let metrics: std::net::SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("metrics address in the log");
    let stop = Arc::new(AtomicBool::new(false));
    let scrapers: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let (mut answered, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match scrape_healthz(metrics) {
                        Ok(()) => answered += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (answered, failed)
            })
        })
        .collect();
    for n in 1..=5 {
        server.upgrade(n);
    }
    stop.store(true, Ordering::Relaxed);
    for scraper in scrapers {
        let (answered, failed) = scraper.join().unwrap();
        assert!(answered > 0, "no scrape answered");
        assert!(
            failed.is_empty(),
            "{} of {answered} failed: {failed:?}",
            failed.len()
        );
    }
}

/// One `GET /healthz` on a fresh connection: a whole 200 response, or why not.
fn scrape_healthz(addr: std::net::SocketAddr) -> Result<(), String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: chatd\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    if response.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("answer: {response:?}"))
    }
}

/// Ten upgrades in a row: the connections stay, and the serving process
/// holds the same descriptors and about the same memory as before.
#[test]
fn ten_upgrades_leave_descriptors_and_memory_as_they_were() {
    let binary = Binary::new("ten");
    let mut server = binary.start(&[]);
    let mut clients: Vec<Client> = (0..20).map(|i| server.login(&format!("c{i}"))).collect();
    let fds = |server: &Server| {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count()
    };
    let fds_before = fds(&server);
    let rss_before = server.status_kb("VmRSS");
    for n in 1..=10 {
        server.upgrade(n);
        clients[0].send(&format!("c1: round {n}\n"));
        clients[1].expect(&format!("from c0: round {n}"));
    }
    let settled = poll_until(|| (fds(&server) == fds_before).then_some(()));
    assert!(
        settled.is_some(),
        "descriptors {} -> {}",
        fds_before,
        fds(&server)
    );
    let rss_after = server.status_kb("VmRSS");
    assert!(
        rss_after < rss_before + 2048,
        "RSS {rss_before} kB -> {rss_after} kB"
    );
    for (i, client) in clients.iter_mut().enumerate() {
        client.sync(&format!("c{i}"));
    }
}
