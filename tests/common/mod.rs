//! Test harness: runs the real `chatd` binary on 127.0.0.1:0 and speaks bytes
//! to it over real sockets, with read timeouts, polling for conditions
//! instead of sleeping, and killing the child when a test ends.

#![allow(dead_code)] // each test file uses a different part of it

/// A fresh Redis for the test, or a return (the test is skipped, saying
/// so) where `redis-server` is not installed outside CI.
#[allow(unused_macros)]
macro_rules! redis_or_skip {
    () => {
        match $crate::common::redis::Redis::start_or_skip() {
            Some(redis) => redis,
            None => return,
        }
    };
}

pub mod redis;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single wait may take before the test fails. Generous: it is
/// only reached when something is broken.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The `chatd` binary under test: the daemon package's own, for its tests;
/// for the tests of another package of the workspace (chatd-bench), the
/// one built beside them (same profile, same target directory).
pub fn chatd_binary() -> std::path::PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_chatd") {
        return path.into();
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/chatd
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile.join("chatd");
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
    /// Everything it wrote to stderr so far (a process that took over by
    /// a live upgrade writes to the same pipe).
    log: Arc<Mutex<String>>,
    /// The process serving now, after live upgrades (not our child: it is
    /// killed by pid when the test ends).
    upgraded: Option<u32>,
}

impl Server {
    /// Starts `chatd --addr 127.0.0.1:0 ARGS`.
    pub fn start(args: &[&str]) -> Server {
        Server::spawn(Command::new(chatd_binary()), args)
    }

    /// Starts `cmd` (which runs chatd, maybe through a wrapper like prlimit)
    /// with `--addr 127.0.0.1:0 ARGS`, and waits for the bound address.
    pub fn spawn(mut cmd: Command, args: &[&str]) -> Server {
        if !cmd.get_envs().any(|(key, _)| key == "RUST_LOG") {
            cmd.env_remove("RUST_LOG"); // the test's own, unless set on purpose
        }
        cmd.args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A binary just copied by another test thread can be "busy" for a
        // moment (a fork elsewhere briefly holds the copy's write end).
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(10));
                }
                other => break other.expect("spawn chatd"),
            }
        };
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
            upgraded: None,
        };
        let line = server.wait_log("listening on ");
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
                self.log()
            ),
        }
    }

    /// Everything logged so far.
    /// The metrics endpoint's `HOST:PORT`, from its start line (the
    /// server runs with `--metrics-addr`).
    pub fn metrics_addr(&mut self) -> String {
        let line = self.wait_log("metrics on http://");
        let rest = line.split("http://").nth(1).unwrap_or_default();
        rest.split('/').next().unwrap_or_default().to_string()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// A new connection with a read timeout.
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A connection logged in as `name`, confirmed by a message to itself.
    pub fn login(&self, name: &str) -> Client {
        let mut client = self.connect();
        client.send(&format!("{name}\n"));
        client.sync(name);
        client
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.upgraded.unwrap_or_else(|| self.child.id())
    }

    /// Sends SIGUSR2 and waits for the `n`-th `upgrade complete` line
    /// (counting from the start); from then on the new process is the one
    /// this value speaks for. Returns its pid.
    pub fn upgrade(&mut self, n: usize) -> u32 {
        self.signal("USR2");
        let line = self.wait_log_count("upgrade complete: pid ", n);
        let pid: u32 = line
            .split("upgrade complete: pid ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
            .expect("a pid after 'upgrade complete: pid'");
        let old = self.pid();
        // The old process exits: wait until it is gone (or reaped).
        let gone = poll_until(|| {
            if old == self.child.id() {
                self.child.try_wait().ok().flatten().map(|_| ())
            } else {
                // Gone, or a zombie waiting for init to reap it.
                let stat = std::fs::read_to_string(format!("/proc/{old}/stat")).unwrap_or_default();
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                matches!(state, None | Some("Z")).then_some(())
            }
        });
        assert!(gone.is_some(), "the old process {old} did not exit");
        self.upgraded = Some(pid);
        pid
    }

    /// Sends a signal (`TERM`, `INT`, `USR1`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the server to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        poll_until(|| child.try_wait().expect("try_wait"))
            .unwrap_or_else(|| panic!("chatd did not exit; log:\n{}", self.log()))
    }

    /// Sets the server's soft open-file limit (the hard one stays 20,000).
    pub fn set_nofile_soft(&self, soft: usize) {
        let status = Command::new("prlimit")
            .args([
                "--pid",
                &self.pid().to_string(),
                &format!("--nofile={soft}:20000"),
            ])
            .status()
            .expect("run prlimit");
        assert!(status.success());
    }

    /// Descriptors the server holds now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// A field of /proc/PID/status in kB, like `VmRSS`.
    pub fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("status field")
    }

    /// The server's CPU time so far (user + system), from /proc/PID/stat.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
    }

    /// How many sockets the server process holds open (its listener and
    /// internal ones included: compare with a count taken earlier).
    pub fn open_sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }
}

impl Server {
    /// The server's current connection count, from a stats line it logs
    /// on SIGUSR1.
    pub fn connections(&mut self) -> usize {
        self.stat("connections") as usize
    }

    /// A counter (`deliveries`, `errors.not-online`, ...) from a fresh
    /// stats line, which the server logs on SIGUSR1.
    pub fn stat(&mut self, key: &str) -> u64 {
        let before = self.log().matches("stats: ").count();
        self.signal("USR1");
        let line = self.wait_log_count("stats: ", before + 1);
        line.split(&format!(" {key}="))
            .nth(1)
            .or_else(|| line.split(&format!("stats: {key}=")).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key}= in the stats line: {line}"))
    }

    /// Sockets of the server's port in CLOSE_WAIT: the client closed and
    /// the server never did.
    pub fn close_wait_sockets(&self) -> usize {
        let out = Command::new("ss")
            .args([
                "-tanH",
                "state",
                "close-wait",
                &format!("sport = :{}", self.addr.port()),
            ])
            .output()
            .expect("run ss");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// After a fault: the server still logs in and routes a new client, its
    /// connection count comes back to `expected`, and no socket is left in
    /// CLOSE_WAIT.
    pub fn assert_recovered(&mut self, expected: usize) {
        {
            let mut probe = self.login("probe");
            probe.send("probe: still there\n");
            probe.expect("from probe: still there");
            probe.shutdown_write();
            probe.expect_eof();
        }
        let settled = poll_until(|| (self.connections() == expected).then_some(()));
        assert!(
            settled.is_some(),
            "connections did not come back to {expected}"
        );
        let none = poll_until(|| (self.close_wait_sockets() == 0).then_some(()));
        assert!(none.is_some(), "sockets left in CLOSE_WAIT");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Every process an upgrade started, also one the test never saw
        // take over (it failed before).
        let log = self.log();
        let started = log
            .split(" to pid ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u32>().ok());
        for pid in self.upgraded.into_iter().chain(started) {
            // Only a chatd: a pid that ended long ago may name another
            // process now.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !String::from_utf8_lossy(&cmdline).contains("chatd") {
                continue;
            }
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Calls `check` until it returns `Some`, for up to [`TIMEOUT`].
/// One GET to the metrics endpoint at `addr` (`HOST:PORT`): the whole
/// response, empty when nothing answers.
pub fn http_get(addr: &str, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return String::new();
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let _ = stream.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
    let mut response = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut response);
    response
}

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

/// One client connection speaking the line protocol.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects with a read timeout of [`TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to chatd");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// Connects with a small receive buffer (4 KiB asked for, so the kernel
    /// does not autotune it to megabytes): a client that does not read
    /// makes the server queue what it sends in user space at once.
    pub fn connect_small(addr: SocketAddr) -> Client {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket.connect(&addr.into()).expect("connect to chatd");
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// The socket, for options and shutdowns.
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// Sends `text` as is.
    pub fn send(&mut self, text: &str) {
        self.send_bytes(text.as_bytes());
    }

    /// Sends `bytes` as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("send");
    }

    /// Reads one line, `\n` included; panics on timeout or EOF.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("EOF while expecting a line"),
            Ok(_) => line,
            Err(e) => panic!("no line ({e}); got so far {line:?}"),
        }
    }

    /// Reads one line and checks it is exactly `want` plus `\n`.
    pub fn expect(&mut self, want: &str) {
        assert_eq!(self.line(), format!("{want}\n"));
    }

    /// Sends a message to itself and waits for it: everything sent before
    /// has been processed by the server.
    pub fn sync(&mut self, name: &str) {
        self.send(&format!("{name}: sync\n"));
        self.expect(&format!("from {name}: sync"));
    }

    /// Checks that the server closes the connection cleanly (EOF, not a
    /// reset) with nothing more to read.
    pub fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(
                rest.is_empty(),
                "unexpected bytes before EOF: {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Err(e) => panic!(
                "expected EOF, got {e} after {:?}",
                String::from_utf8_lossy(&rest)
            ),
        }
    }

    /// Whether the server has closed the connection: reads (and drops)
    /// whatever arrives until EOF, a reset, or the timeout.
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut buf = [0; 65536];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }

    /// Shuts down the sending side (half-close).
    pub fn shutdown_write(&self) {
        self.stream().shutdown(Shutdown::Write).unwrap();
    }

    /// Closes with a reset (SO_LINGER 0) instead of a FIN.
    pub fn reset(self) {
        let socket = socket2::SockRef::from(self.stream());
        socket.set_linger(Some(Duration::ZERO)).unwrap();
    }
}

/// A small deterministic generator (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
