//! The optional metrics endpoint (`--metrics-addr`): `GET /metrics` in the
//! Prometheus text exposition format and `GET /healthz`, served from a
//! second listener on the reactor's poll loop.
//!
//! Scrapers are cheap and few, so this is deliberately small: one request
//! per connection (`Connection: close`), at most [`MAX_REQUEST`] bytes of
//! request, [`MAX_CONNS`] connections at once and [`DEADLINE_MS`] for the
//! whole exchange. Every read and write is non-blocking and bounded, so a
//! slow or hostile scraper costs the chat traffic nothing but a few system
//! calls.

use std::fmt::Write as _;
use std::io::{self, Read, Write};

use mio::net::TcpStream;

use crate::protocol::ErrorKind;
use crate::stats::{COUNTERS, Kind, Stats};

/// The largest request accepted (headers included).
pub const MAX_REQUEST: usize = 8 * 1024;
/// The most metrics connections at once; more are closed on accept.
pub const MAX_CONNS: usize = 16;
/// Time allowed for one exchange, from accept to the last byte written.
pub const DEADLINE_MS: u64 = 5000;

/// Figures the reactor knows besides the counters.
#[derive(Debug, Clone)]
pub struct Gauges {
    /// Logged-in clients.
    pub logged_in: usize,
    /// `--max-clients` in force.
    pub max_clients: usize,
    /// Bytes held by the buffer pool.
    pub pooled_bytes: usize,
    /// Bytes of buffer memory all clients hold together.
    pub buffered_bytes: usize,
    /// `--max-buffer-memory` in force.
    pub max_buffer_memory: usize,
    /// Descriptors the process holds, as the reactor counts them (listing
    /// `/proc/self/fd` costs milliseconds at ten thousand descriptors).
    pub open_fds: usize,
    /// Resident memory, read from `/proc` at most once a second.
    pub resident_bytes: Option<u64>,
    /// Whether the server takes new clients, and if not, why.
    pub health: Result<(), &'static str>,
    /// Cluster mode: the link's state and counters.
    pub cluster: Option<ClusterGauges>,
}

/// What the metrics say of one shard (one Redis of several).
#[derive(Debug, Clone)]
pub struct ShardGauge {
    /// Its Redis's address.
    pub redis: std::net::SocketAddr,
    /// Whether its names are claimed and routed now.
    pub ready: bool,
    /// Time since its last lease renewal that succeeded was sent.
    pub lease_age_ms: Option<u64>,
}

/// What the metrics say of the cluster link.
#[derive(Debug, Clone)]
pub struct ClusterGauges {
    /// Whether logins are claimed and messages routed through Redis now
    /// (on every shard).
    pub ready: bool,
    /// With several shards: each one's Redis, whether it is ready and the
    /// age of its lease.
    pub shards: Vec<ShardGauge>,
    /// Time since the last lease renewal that succeeded was sent.
    pub lease_age_ms: Option<u64>,
    /// The link's counters.
    pub stats: crate::cluster::ClusterStats,
}

impl Default for Gauges {
    fn default() -> Gauges {
        Gauges {
            logged_in: 0,
            max_clients: 0,
            pooled_bytes: 0,
            buffered_bytes: 0,
            max_buffer_memory: 0,
            open_fds: 0,
            resident_bytes: None,
            health: Ok(()),
            cluster: None,
        }
    }
}

/// One scraper connection.
#[derive(Debug)]
pub struct MetricsConn {
    /// The socket.
    pub stream: TcpStream,
    /// The request so far.
    request: Vec<u8>,
    /// The response, once the request is complete; `out[written..]` is
    /// still to be written.
    out: Vec<u8>,
    /// How much of `out` is written.
    written: usize,
}

/// What the reactor should do with a metrics connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait for more events.
    Wait,
    /// Wait for writable: the response did not fit in the socket.
    WaitWritable,
    /// Done (or failed): close it.
    Close,
}

impl MetricsConn {
    /// A new connection (the reactor closes it after [`DEADLINE_MS`]).
    pub fn new(stream: TcpStream) -> MetricsConn {
        MetricsConn {
            stream,
            request: Vec::new(),
            out: Vec::new(),
            written: 0,
        }
    }

    /// Reads what arrived, answers once the request is complete, and
    /// writes as much of the answer as the socket takes. `health` is what
    /// `/healthz` reports; `metrics` gives the `/metrics` body, called only
    /// when asked for.
    pub fn on_event(
        &mut self,
        health: Result<(), &'static str>,
        metrics: impl FnOnce() -> String,
    ) -> Next {
        if self.out.is_empty() {
            let mut buf = [0; 1024];
            let mut ended = false;
            loop {
                match self.stream.read(&mut buf) {
                    // A scraper may half-close right after its request
                    // (`nc -N`): a complete request is still answered.
                    Ok(0) => {
                        ended = true;
                        break;
                    }
                    Ok(n) => {
                        let room = MAX_REQUEST - self.request.len();
                        self.request.extend_from_slice(&buf[..n.min(room)]);
                        if n > room {
                            break; // over the limit: answered below
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Next::Close,
                }
            }
            match respond(&self.request, health, metrics) {
                Some(response) => self.out = response,
                None if ended => return Next::Close, // gave up before asking
                None => return Next::Wait,
            }
        }
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::WaitWritable,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Next::Close
    }
}

/// The response to `request`, or `None` while it is incomplete and under
/// [`MAX_REQUEST`]. Answers 400 to a malformed request, 431 to one too
/// large, 404 to an unknown path and 405 to a method other than GET or HEAD.
/// `/healthz` answers 200 `ok` while the server takes new clients, and 503
/// with the reason while it does not (out of descriptors, full, stopping).
pub fn respond(
    request: &[u8],
    health: Result<(), &'static str>,
    metrics: impl FnOnce() -> String,
) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let (method, path) = match req.parse(request) {
        Ok(httparse::Status::Complete(_)) => (req.method.unwrap_or(""), req.path.unwrap_or("")),
        Ok(httparse::Status::Partial) if request.len() < MAX_REQUEST => return None,
        Ok(httparse::Status::Partial) => {
            return Some(response(
                431,
                "Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
                true,
            ));
        }
        Err(_) => {
            return Some(response(
                400,
                "Bad Request",
                "text/plain",
                "bad request\n",
                true,
            ));
        }
    };
    let path = path.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    Some(match (method, path) {
        ("GET" | "HEAD", "/metrics") => response(
            200,
            "OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &metrics(),
            with_body,
        ),
        ("GET" | "HEAD", "/healthz") => match health {
            Ok(()) => response(200, "OK", "text/plain", "ok\n", with_body),
            Err(why) => {
                let body = format!("unavailable: {why}\n");
                response(503, "Service Unavailable", "text/plain", &body, with_body)
            }
        },
        (_, "/metrics" | "/healthz") => {
            response(405, "Method Not Allowed", "text/plain", "use GET\n", true)
        }
        _ => response(404, "Not Found", "text/plain", "not found\n", with_body),
    })
}

fn response(code: u16, reason: &str, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        out.push_str(body);
    }
    out.into_bytes()
}

/// The `/metrics` body: every counter of [`Stats`] and the gauges. Reads
/// nothing but the open-file limit (one system call): what costs more is
/// gathered by the caller, rarely.
pub fn render(stats: &Stats, gauges: &Gauges) -> String {
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    let mut counters = stats.clone();
    for c in COUNTERS {
        let kind = match c.kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        metric(c.metric, kind, c.help, *(c.field)(&mut counters));
    }
    metric(
        "chatd_logged_in",
        "gauge",
        "Logged-in clients.",
        gauges.logged_in as u64,
    );
    metric(
        "chatd_max_clients",
        "gauge",
        "The --max-clients limit in force.",
        gauges.max_clients as u64,
    );
    metric(
        "chatd_buffered_bytes",
        "gauge",
        "Buffer memory all clients' queued output and kept input hold together.",
        gauges.buffered_bytes as u64,
    );
    metric(
        "chatd_max_buffer_memory_bytes",
        "gauge",
        "The --max-buffer-memory limit in force.",
        gauges.max_buffer_memory as u64,
    );
    metric(
        "chatd_up",
        "gauge",
        "1 while the server takes new clients (as /healthz answers 200), else 0.",
        u64::from(gauges.health.is_ok()),
    );
    metric(
        "chatd_pooled_buffer_bytes",
        "gauge",
        "Bytes held by free pooled buffers.",
        gauges.pooled_bytes as u64,
    );
    if let Some(rss) = gauges.resident_bytes {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        );
    }
    metric(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        gauges.open_fds as u64,
    );
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            soft,
        );
    }
    if let Some(cluster) = &gauges.cluster {
        let stats = &cluster.stats;
        metric(
            "chatd_cluster_up",
            "gauge",
            "1 while logins are claimed and messages routed through Redis, else 0.",
            u64::from(cluster.ready),
        );
        if let Some(age) = cluster.lease_age_ms {
            metric(
                "chatd_cluster_lease_age_milliseconds",
                "gauge",
                "Time since the last lease renewal that succeeded was sent.",
                age,
            );
        }
        let counters = [
            (
                "routed_out",
                "Messages published to other nodes.",
                stats.routed_out,
            ),
            (
                "deliveries_in",
                "Deliveries of lines from other nodes.",
                stats.deliveries_in,
            ),
            (
                "deliveries_missed",
                "Lines from other nodes for names no longer here.",
                stats.deliveries_missed,
            ),
            (
                "reconnects",
                "Connections to Redis made again.",
                stats.reconnects,
            ),
            (
                "fences",
                "Times the node closed its clients for want of a lease.",
                stats.fences,
            ),
            (
                "leases_lost",
                "Times the lease was found gone and taken anew.",
                stats.leases_lost,
            ),
        ];
        for (name, help, value) in counters {
            metric(
                &format!("chatd_cluster_{name}_total"),
                "counter",
                help,
                value,
            );
        }
        metric(
            "chatd_cluster_redis_rtt_microseconds",
            "gauge",
            "Round trip of the last lease renewal.",
            stats.rtt_us,
        );
        if !cluster.shards.is_empty() {
            shard_gauges(&mut out, &cluster.shards);
        }
    }
    let _ = write!(
        out,
        "# HELP chatd_errors_sent_total error: lines sent to clients, by kind.\n\
         # TYPE chatd_errors_sent_total counter\n"
    );
    for kind in ErrorKind::ALL {
        let _ = writeln!(
            out,
            "chatd_errors_sent_total{{kind=\"{}\"}} {}",
            kind.label(),
            stats.errors[kind as usize]
        );
    }
    out
}

/// Resident memory, from `VmRSS` in `/proc/self/status` (in KiB there,
/// whatever the page size).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One gauge per shard, labelled by its Redis: whether it is ready, and
/// its lease's age.
fn shard_gauges(out: &mut String, shards: &[ShardGauge]) {
    let _ = write!(
        out,
        "# HELP chatd_cluster_shard_up 1 while the names of this Redis are claimed and \
         routed, else 0.\n# TYPE chatd_cluster_shard_up gauge\n"
    );
    for shard in shards {
        let _ = writeln!(
            out,
            "chatd_cluster_shard_up{{redis=\"{}\"}} {}",
            shard.redis,
            u8::from(shard.ready)
        );
    }
    let _ = write!(
        out,
        "# HELP chatd_cluster_shard_lease_age_milliseconds Time since the last lease \
         renewal on this Redis that succeeded was sent.\n\
         # TYPE chatd_cluster_shard_lease_age_milliseconds gauge\n"
    );
    for shard in shards {
        if let Some(age) = shard.lease_age_ms {
            let _ = writeln!(
                out,
                "chatd_cluster_shard_lease_age_milliseconds{{redis=\"{}\"}} {age}",
                shard.redis
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(request: &[u8]) -> Option<String> {
        respond(request, Ok(()), || "m 1\n".into()).map(|r| {
            let text = String::from_utf8(r).unwrap();
            text.lines().next().unwrap().to_string()
        })
    }

    #[test]
    fn answers_each_kind_of_request() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                Some("HTTP/1.1 200 OK"),
            ),
            (
                b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n",
                Some("HTTP/1.1 200 OK"),
            ),
            (b"HEAD /healthz HTTP/1.1\r\n\r\n", Some("HTTP/1.1 200 OK")),
            (b"GET /healthz HTTP/1.1\r\n\r\n", Some("HTTP/1.1 200 OK")),
            (
                b"GET /nope HTTP/1.1\r\n\r\n",
                Some("HTTP/1.1 404 Not Found"),
            ),
            (
                b"POST /metrics HTTP/1.1\r\n\r\n",
                Some("HTTP/1.1 405 Method Not Allowed"),
            ),
            (b"\x00\x01garbage\r\n\r\n", Some("HTTP/1.1 400 Bad Request")),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", None), // incomplete
            (b"", None),
        ];
        for (request, want) in cases {
            assert_eq!(
                status(request).as_deref(),
                *want,
                "{:?}",
                String::from_utf8_lossy(request)
            );
        }
        let huge = [
            b"GET /metrics HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; MAX_REQUEST],
        ]
        .concat();
        assert_eq!(
            status(&huge).as_deref(),
            Some("HTTP/1.1 431 Request Header Fields Too Large")
        );
    }

    #[test]
    fn healthz_body_and_head_without_body() {
        let get = respond(b"GET /healthz HTTP/1.1\r\n\r\n", Ok(()), String::new).unwrap();
        assert!(get.ends_with(b"\r\n\r\nok\n"));
        let head = respond(b"HEAD /healthz HTTP/1.1\r\n\r\n", Ok(()), String::new).unwrap();
        assert!(head.ends_with(b"Content-Length: 3\r\nConnection: close\r\n\r\n"));
    }

    /// `/healthz` says 503 and why while the server takes no new clients.
    #[test]
    fn healthz_reports_what_stops_new_clients() {
        let paused = || Gauges {
            health: Err("out of file descriptors: accepting paused"),
            ..Gauges::default()
        };
        let why = paused().health;
        let get = respond(b"GET /healthz HTTP/1.1\r\n\r\n", why, String::new).unwrap();
        let text = String::from_utf8(get).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nunavailable: out of file descriptors: accepting paused\n"));
        assert!(render(&Stats::default(), &paused()).contains("\nchatd_up 0\n"));
        assert!(render(&Stats::default(), &Gauges::default()).contains("\nchatd_up 1\n"));
    }

    #[test]
    fn renders_every_counter() {
        let mut stats = Stats {
            deliveries: 7,
            ..Stats::default()
        };
        stats.error_sent(ErrorKind::NotOnline);
        let text = render(&stats, &Gauges::default());
        assert!(text.contains("\nchatd_deliveries_total 7\n"));
        assert!(text.contains("chatd_errors_sent_total{kind=\"not-online\"} 1\n"));
        assert!(text.contains("# TYPE chatd_connections gauge\n"));
        assert!(text.contains("process_open_fds "));
    }
}
