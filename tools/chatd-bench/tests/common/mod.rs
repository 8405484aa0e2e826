//! Test harness for chatd-bench: runs the real `chatd` binary on
//! 127.0.0.1:0, reads its log with a deadline, polls for conditions
//! instead of sleeping, and kills the child when a test ends.
//!
//! `chatd` is another package of the workspace, so Cargo gives this test
//! no `CARGO_BIN_EXE_chatd`: it is the `chatd` built beside chatd-bench in
//! the same target directory. A plain `cargo test` at the top builds both;
//! after `cargo test -p chatd-bench` alone, run `cargo build --bin chatd`.

#![allow(dead_code)] // each test file uses a different part of it

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single wait may take before the test fails. Generous: it is
/// only reached when something is broken.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The generator under test.
pub const BENCH: &str = env!("CARGO_BIN_EXE_chatd-bench");

/// The `chatd` binary of the same build (profile and target directory).
pub fn chatd_binary() -> PathBuf {
    let path = PathBuf::from(BENCH).with_file_name("chatd");
    assert!(
        path.exists(),
        "no {} (run `cargo build --bin chatd`, or plain `cargo test` at the top)",
        path.display()
    );
    path
}

/// A running `chatd` child process.
pub struct Server {
    child: Child,
    /// The address it logged as bound.
    pub addr: SocketAddr,
    /// Everything it wrote to stderr so far.
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `chatd --addr 127.0.0.1:0 ARGS` and waits for the bound address.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(chatd_binary())
            .env_remove("RUST_LOG")
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chatd");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let line = server.wait_log_count("listening on ", 1);
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("address after 'listening on'");
        server.addr = addr.parse().expect("a socket address");
        server
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_log(&mut self, needle: &str) -> String {
        self.wait_log_count(needle, 1)
    }

    /// Waits until `count` log lines contain `needle`; returns the last.
    pub fn wait_log_count(&mut self, needle: &str, count: usize) -> String {
        let found = poll_until(|| {
            let log = self.log.lock().unwrap();
            let hits: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            (hits.len() >= count).then(|| hits[count - 1].to_string())
        });
        match found {
            Some(line) => line,
            None => panic!(
                "no log line with {needle:?} (x{count}); log:\n{}",
                self.log.lock().unwrap()
            ),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/PID/status in kB (`VmRSS`, `VmHWM`).
    pub fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("status field")
    }

    /// Current connections, from a fresh stats line (logged on SIGUSR1).
    pub fn connections(&mut self) -> usize {
        let before = self.log.lock().unwrap().matches("stats: ").count();
        let status = Command::new("kill")
            .args(["-USR1", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let line = self.wait_log_count("stats: ", before + 1);
        line.split("connections=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("connections= in the stats line: {line}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Calls `check` until it returns `Some`, for up to [`TIMEOUT`].
pub fn poll_until<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if start.elapsed() > TIMEOUT {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}
