//! A real `redis-server` per test, on a free loopback port, with nothing
//! saved to disk, so a test can kill, pause and restart it. The process is
//! killed when the value is dropped, also when the test fails. Also a TCP
//! forwarder that a test can freeze, to cut a node from Redis without
//! closing its connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use super::{Server, poll_until};

/// A `redis-server` child process.
pub struct Redis {
    child: Option<Child>,
    /// The port it listens on (kept across restarts).
    pub port: u16,
}

impl Redis {
    /// Starts a fresh, empty Redis on a free loopback port; `None` when
    /// `redis-server` is not installed and this is not CI (a developer
    /// without Redis still runs the rest of the suite: the test says it is
    /// skipped). Under CI (`CI` set, as `.ci/run` runs, which installs
    /// Redis) a missing `redis-server` fails the test.
    pub fn start_or_skip() -> Option<Redis> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed && std::env::var_os("CI").is_none() {
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        Some(Redis::start())
    }

    /// Starts a fresh, empty Redis on a free loopback port.
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis { child: None, port };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let up = poll_until(|| (self.cli(&["PING"]) == "PONG").then_some(()));
        assert!(up.is_some(), "redis-server did not start on {}", self.port);
    }

    /// `redis://127.0.0.1:PORT`, for `--cluster`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs one command with `redis-cli` and returns its output, trimmed
    /// (empty when Redis is not there).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The keys under the default prefix, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .cli(&["--scan", "--pattern", "chatd:*"])
            .lines()
            .map(str::to_string)
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort();
        keys
    }

    /// Kills it (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends a signal (`STOP`, `CONT`) to it.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a chatd node of the cluster on `redis` (the lease in seconds),
/// with `args` more, and waits until it is ready.
pub fn node(redis_url: &str, lease: &str, args: &[&str]) -> Server {
    let mut all = vec!["--cluster", redis_url, "--cluster-lease", lease];
    all.extend_from_slice(args);
    let mut server = Server::start(&all);
    server.wait_log("cluster: node ");
    server.wait_log(" ready (Redis at ");
    server
}

/// A TCP forwarder on a free loopback port to `target`, one thread pair
/// per connection. Frozen, it stops moving bytes but keeps every
/// connection open: a network partition as the node sees it; thawed, it
/// moves them again.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Bytes per second it moves at most in each direction (0: no limit).
    rate: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts forwarding to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let rate = Arc::new(AtomicU64::new(0));
        let (f, s, r) = (Arc::clone(&frozen), Arc::clone(&stop), Arc::clone(&rate));
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        for (from, to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            let (f, s, r) = (Arc::clone(&f), Arc::clone(&s), Arc::clone(&r));
                            thread::spawn(move || pump(from, to, &f, &s, &r));
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            addr,
            frozen,
            stop,
            rate,
        }
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stops moving bytes, keeping the connections open.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Moves at most `bytes_per_sec` each way from now on: a Redis that
    /// answers, but slowly.
    pub fn limit(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Moves bytes again, those held while frozen first.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either closes, the proxy stops, or (while
/// frozen) not at all.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    frozen: &AtomicBool,
    stop: &AtomicBool,
    rate: &AtomicU64,
) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if frozen.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Bytes read just as the freeze began are held until the
                // thaw, not sent.
                while frozen.load(Ordering::SeqCst) && !stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(20));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                // No limit (0): no pause.
                let rate = rate.load(Ordering::SeqCst);
                if let Some(pause) = (n as u64 * 1_000_000).checked_div(rate) {
                    thread::sleep(Duration::from_micros(pause));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
