//! A real `redis-server` per test, on a free loopback port, with nothing
//! saved to disk, so a test can kill, pause and restart it. The process is
//! killed when the value is dropped, also when the test fails. Also a TCP
//! forwarder that a test can freeze, to cut a node from Redis without
//! closing its connection.
//!
//! The cluster suite runs on [`Redis`]: one server, or with
//! `CHATD_TEST_SHARDS=N` N of them, which the nodes shard the names over
//! (`--cluster` gets the list). What a test does to "Redis" (kill, pause,
//! flush) it does to every shard; what it reads of one name's keys it
//! reads on that name's shard ([`Redis::on`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use super::{Server, poll_until};

/// How many Redis servers a cluster test's [`Redis`] has:
/// `CHATD_TEST_SHARDS`, 1 when unset.
pub fn test_shards() -> usize {
    match std::env::var("CHATD_TEST_SHARDS") {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .expect("CHATD_TEST_SHARDS: a number of shards, 1 to 64"),
        Err(_) => 1,
    }
}

/// The Redis of a cluster test: [`test_shards`] servers, names sharded
/// over them in the order of [`Redis::url`].
pub struct Redis {
    /// The servers, in the order the nodes list them.
    pub servers: Vec<RedisServer>,
}

impl Redis {
    /// Fresh, empty servers, or `None` where `redis-server` is not
    /// installed and this is not CI (see [`RedisServer::start_or_skip`]).
    pub fn start_or_skip() -> Option<Redis> {
        let servers: Option<Vec<RedisServer>> = (0..test_shards())
            .map(|_| RedisServer::start_or_skip())
            .collect();
        servers.map(|servers| Redis { servers })
    }

    /// The `--cluster` list: `redis://127.0.0.1:PORT,...`.
    pub fn url(&self) -> String {
        self.url_as("")
    }

    /// The `--cluster` list with `userinfo` (`user:password`, or
    /// `:password`) in every URL; `""` for none.
    pub fn url_as(&self, userinfo: &str) -> String {
        let at = if userinfo.is_empty() { "" } else { "@" };
        let urls: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("redis://{userinfo}{at}127.0.0.1:{}", s.port))
            .collect();
        urls.join(",")
    }

    /// The server that holds `name`'s keys.
    pub fn on(&self, name: &str) -> &RedisServer {
        &self.servers[chatd::cluster::shard_of(name, self.servers.len())]
    }

    /// Runs one command on every server; their answers, in order.
    pub fn cli_all(&self, args: &[&str]) -> Vec<String> {
        self.servers.iter().map(|s| s.cli(args)).collect()
    }

    /// Runs one command on every server and checks that each answers
    /// `want`.
    pub fn cli_expect(&self, args: &[&str], want: &str) {
        for (i, got) in self.cli_all(args).iter().enumerate() {
            assert_eq!(got, want, "{args:?} on shard {i}");
        }
    }

    /// The keys under the default prefix on any server, sorted, each once
    /// (every server holds the lease and the set of nodes).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.servers.iter().flat_map(RedisServer::keys).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// How many times the servers together ran `command`
    /// (`INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        self.servers.iter().map(|s| s.calls(command)).sum()
    }

    /// Kills every server (SIGKILL) and waits for them.
    pub fn kill(&mut self) {
        self.servers.iter_mut().for_each(RedisServer::kill);
    }

    /// Starts every server again, empty, on its port.
    pub fn restart(&mut self) {
        self.servers.iter_mut().for_each(RedisServer::restart);
    }

    /// Sends a signal (`STOP`, `CONT`) to every server.
    pub fn signal(&self, signal: &str) {
        self.servers.iter().for_each(|s| s.signal(signal));
    }

    /// A forwarder to every server ([`Proxy`]), one listener each.
    pub fn proxy(&self) -> Proxy {
        Proxy::start_all(self.servers.iter().map(RedisServer::addr))
    }
}

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    /// The port it listens on (kept across restarts).
    pub port: u16,
}

impl RedisServer {
    /// Starts a fresh, empty Redis on a free loopback port; `None` when
    /// `redis-server` is not installed and this is not CI (a developer
    /// without Redis still runs the rest of the suite: the test says it is
    /// skipped). Under CI (`CI` set, as `.ci/run` runs, which installs
    /// Redis) a missing `redis-server` fails the test.
    pub fn start_or_skip() -> Option<RedisServer> {
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
        Some(RedisServer::start())
    }

    /// Starts a fresh, empty Redis on a free loopback port.
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = RedisServer { child: None, port };
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

    /// How many times it ran `command` (lower case, as
    /// `INFO commandstats` names it: `evalsha`).
    pub fn calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a chatd node of the cluster on `redis_urls` (a `--cluster`
/// list; the lease in seconds), with `args` more, and waits until it is
/// ready on every Redis of the list.
pub fn node(redis_urls: &str, lease: &str, args: &[&str]) -> Server {
    let mut all = vec!["--cluster", redis_urls, "--cluster-lease", lease];
    all.extend_from_slice(args);
    let mut server = Server::start(&all);
    server.wait_log("cluster: node ");
    server.wait_log_count(" ready (Redis at ", redis_urls.split(',').count());
    server
}

/// A TCP forwarder on a free loopback port to each of its targets, one
/// thread pair per connection. Frozen, it stops moving bytes but keeps
/// every connection open: a network partition as the node sees it;
/// thawed, it moves them again.
///
/// Every node of a cluster must list the same Redis, so a test that cuts
/// one node and not another sends both through the proxy, in two groups:
/// the connections accepted after [`Proxy::admit_as`]`(g)` belong to
/// group `g` (0 at the start), and the `_group` calls act on one group.
pub struct Proxy {
    /// Where it listens, one address per target.
    pub addrs: Vec<SocketAddr>,
    state: Arc<ProxyState>,
}

/// How many groups of connections a [`Proxy`] tells apart.
const GROUPS: usize = 2;

/// What the forwarding threads of a [`Proxy`] read.
#[derive(Default)]
struct ProxyState {
    /// The proxy is gone: every connection closes.
    stop: AtomicBool,
    /// The group of the connections accepted from now on.
    joining: AtomicUsize,
    /// Per group: bytes held, connections kept open.
    frozen: [AtomicBool; GROUPS],
    /// Per group: connections closed, new ones closed at once.
    cut: [AtomicBool; GROUPS],
    /// Per group: bytes per second moved at most in each direction (0: no
    /// limit).
    rate: [AtomicU64; GROUPS],
    /// Bytes a node sends are taken off its socket at once and delivered
    /// at the rate, also after the node has closed it (see
    /// [`Proxy::keep_in_transit`]).
    in_transit: AtomicBool,
}

impl Proxy {
    /// Starts forwarding to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        Proxy::start_all([target])
    }

    /// Starts forwarding to each of `targets`, one listener each.
    pub fn start_all(targets: impl IntoIterator<Item = SocketAddr>) -> Proxy {
        let state = Arc::new(ProxyState::default());
        let mut addrs = Vec::new();
        for target in targets {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            addrs.push(listener.local_addr().unwrap());
            listener.set_nonblocking(true).unwrap();
            let state = Arc::clone(&state);
            thread::spawn(move || forward(&listener, target, &state));
        }
        Proxy { addrs, state }
    }

    /// The `--cluster` list of the proxy's `redis://` URLs.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.addrs.iter().map(|a| format!("redis://{a}")).collect();
        urls.join(",")
    }

    /// The connections accepted from now on belong to `group`.
    pub fn admit_as(&self, group: usize) {
        assert!(group < GROUPS);
        self.state.joining.store(group, Ordering::SeqCst);
    }

    /// Stops moving bytes, keeping the connections open.
    pub fn freeze(&self) {
        (0..GROUPS).for_each(|g| self.freeze_group(g));
    }

    /// Stops moving the bytes of `group`'s connections, keeping them open.
    pub fn freeze_group(&self, group: usize) {
        self.state.frozen[group].store(true, Ordering::SeqCst);
    }

    /// Moves at most `bytes_per_sec` each way from now on: a Redis that
    /// answers, but slowly.
    pub fn limit(&self, bytes_per_sec: u64) {
        (0..GROUPS).for_each(|g| self.limit_group(g, bytes_per_sec));
    }

    /// [`Proxy::limit`] for `group`'s connections only.
    pub fn limit_group(&self, group: usize, bytes_per_sec: u64) {
        self.state.rate[group].store(bytes_per_sec, Ordering::SeqCst);
    }

    /// From now on what a node sends is in transit as soon as it is sent:
    /// taken off its socket at once, and delivered (at the rate, or when
    /// thawed) even after the node has closed the connection, as a slow
    /// network's buffers do. Without it a node's close can discard what
    /// the proxy had not read yet.
    pub fn keep_in_transit(&self) {
        self.state.in_transit.store(true, Ordering::SeqCst);
    }

    /// Closes `group`'s connections, and from now on every new one of it
    /// at once: a Redis that went away, for those nodes only.
    pub fn cut(&self, group: usize) {
        self.state.cut[group].store(true, Ordering::SeqCst);
    }

    /// Moves bytes again, those held while frozen first.
    pub fn thaw(&self) {
        for frozen in &self.state.frozen {
            frozen.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

/// Accepts connections on `listener` and forwards each to `target` until
/// the proxy stops.
fn forward(listener: &TcpListener, target: SocketAddr, state: &Arc<ProxyState>) {
    while !state.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let group = state.joining.load(Ordering::SeqCst);
                if state.cut[group].load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let in_transit = state.in_transit.load(Ordering::SeqCst);
                for (from, to, eager) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        in_transit,
                    ),
                    (server, client, false),
                ] {
                    let state = Arc::clone(state);
                    let source = if eager {
                        Source::Queue(take_off(from))
                    } else {
                        Source::Socket(from)
                    };
                    thread::spawn(move || pump(source, to, &state, group));
                }
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Where a pump reads: the socket, or what a thread took off it as it
/// came ([`Proxy::keep_in_transit`]).
enum Source {
    Socket(TcpStream),
    Queue(std::sync::mpsc::Receiver<Vec<u8>>),
}

impl Source {
    /// The next bytes (`Ok(0)`: the end), waiting 20 ms at most.
    fn read(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Source::Socket(from) => {
                buf.resize(16 * 1024, 0);
                let n = from.read(buf)?;
                buf.truncate(n);
                Ok(n)
            }
            Source::Queue(queue) => match queue.recv_timeout(Duration::from_millis(20)) {
                Ok(bytes) => {
                    let n = bytes.len();
                    *buf = bytes;
                    Ok(n)
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    Err(std::io::ErrorKind::TimedOut.into())
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Ok(0),
            },
        }
    }
}

/// Reads `from` as fast as it sends, into a queue, until it closes.
fn take_off(mut from: TcpStream) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (queue, taken) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if queue.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    taken
}

/// Copies `from` to `to` until either closes, the proxy stops or cuts
/// `group`, or (while `group` is frozen) not at all.
fn pump(mut from: Source, mut to: TcpStream, state: &ProxyState, group: usize) {
    if let Source::Socket(socket) = &from {
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
    }
    let gone = || state.stop.load(Ordering::Relaxed) || state.cut[group].load(Ordering::SeqCst);
    let frozen = || state.frozen[group].load(Ordering::SeqCst);
    let mut buf = Vec::new();
    while !gone() {
        if frozen() {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Bytes read just as the freeze began are held until the
                // thaw, not sent.
                while frozen() && !gone() {
                    thread::sleep(Duration::from_millis(20));
                }
                if gone() || to.write_all(&buf[..n]).is_err() {
                    break;
                }
                // No limit (0): no pause.
                let rate = state.rate[group].load(Ordering::SeqCst);
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
    let _ = to.shutdown(if gone() {
        Shutdown::Both
    } else {
        Shutdown::Write
    });
}
