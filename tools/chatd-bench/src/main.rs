//! `chatd-bench`: a load generator for high-connection-count benchmarks of
//! chatd, or of any server speaking the same line protocol, over TCP or
//! (`--ws`) WebSocket.
//!
//! Phases: connect and log in every client (at a rate, or as fast as
//! possible), confirm each login with a message to itself, hold the
//! connections idle, then send traffic (closed loop with a window per
//! sender, or open loop at a fixed rate), then wait for the last deliveries.
//! Event-driven (mio), single-threaded unless `--threads` asks for more
//! (one mio loop per thread over its share of the clients), and it reports
//! its own CPU time so a reader can tell whether the generator was the
//! bottleneck.

mod load;
mod pool;
mod procs;
mod server;
mod ws;

use std::io::{self, IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use load::{Counts, Plan};
use pool::{Generator, Totals};
use procs::Children;
use server::{ServerProcesses, Usage, own_usage};

const USAGE: &str = "\
chatd-bench: load generator for chatd (or any server of the same protocol)

Usage: chatd-bench [OPTIONS]

Connection phase:
  --addr HOST:PORT,...   server, or a comma list of the nodes of a cluster:
                         client i connects to the (i mod n)-th, round-robin,
                         so a sender's recipients are on the other nodes
                         [default: 127.0.0.1:8080, or CHATD_ADDR]
  --clients N            connections to open and log in, up to 10,000,000
                         [default: 1000]
  --connect-rate R       new connections per second, 1e-7 to 1e9, or 0 = as
                         fast as possible (a connect storm) [default: 0]
  --login-window N       at most N logins in flight at once (connect
                         started, login not yet confirmed), over all
                         threads and processes (shared out, at least one
                         each, so rounded up): the next connect starts as
                         a login ends, so the wave goes at the pace the
                         server logs clients in, each client waiting only
                         for its own login. 0 = no bound: every connect
                         starts at once (at --connect-rate), and with a
                         slow server the last wait for all before them
                         [default: 0]
  --source-ips A-B       spread client sockets over these source addresses
                         (127.0.0.1-127.0.0.8, or a comma list) [default:
                         for 127.x servers only, one address from 127.0.0.1
                         up per 2,000 clients; else chosen by the kernel]
  --name-prefix P        client i logs in as <P>b<i> instead of b<i>, so that
                         several generators can share one server or cluster
                         (give each its own prefix); up to 32 ASCII letters,
                         digits, '-' or '_' [default: empty]
  --idle SECS            hold the connections idle after login [default: 0]
  --ws                   speak WebSocket instead of TCP lines (give the
                         server's WebSocket address, chatd's --ws-addr): each
                         client upgrades over HTTP/1.1 (GET /, checking the
                         101 and its Sec-WebSocket-Accept), then sends each
                         line as one masked text frame and takes each text
                         message as one line. The login time includes the
                         upgrade. The report says transport ws (else tcp)
Traffic phase:
  --senders S            clients that send [default: 0 = no traffic]
  --fanout F             recipients per line [default: 1]
  --payload B            bytes of padding per message, up to 16 MiB; a line
                         is about 45 bytes more plus 8 per recipient, and
                         must fit the server's --max-line (chatd's default
                         16384 fits a payload up to about 16,000) [default: 32]
  --window W             closed loop: lines in flight per sender, up to
                         1,000,000 [default: 1]
  --rate R               open loop: total lines per second, 1e-7 to 1e9,
                         latency measured from each line's intended send time
                         (overrides --window) [default: 0 = closed loop]
  --duration SECS        traffic time [default: 10]
                         (every time is below 1e7 seconds)
  --settle-timeout SECS  longest wait for logins and last deliveries
                         [default: 30]
Generator:
  --threads N            threads, each with its own event loop over every
                         N-th client, up to 1024 [default: 1]. More help when
                         the generator is the bottleneck: when bench_cpu_secs
                         (its CPU time during traffic) is near traffic_secs,
                         one core is busy generating and the figures are the
                         generator's; give it more threads (and cores) until
                         bench_cpu_secs per thread is well below traffic_secs.
                         On a machine with few cores they compete with the
                         server for them.
  --procs N              processes, up to 1024 [default: 1]: past about
                         20,000 clients (or whatever one process may open:
                         `ulimit -Hn`) spread the load over N child
                         processes of this program, each a full generator
                         (with its own --threads) over its share of
                         --clients and --senders, of the --source-ips (or of
                         the default list for all --clients; shared
                         round-robin when there are fewer addresses than
                         processes), with the name prefix <P>p<K> for the
                         K-th. The phases start together in all of them and
                         the report is the sum (histograms merged exactly).
                         Each process needs at least --fanout + 1 clients
                         when there is traffic: a sender's recipients are
                         in its own process. The children run as
                         `chatd-bench --procs-child K ...`, an internal flag.
Measuring:
  --server-pid PID,...   read the server's RSS and CPU time from /proc; with
                         several (the nodes of a cluster), their sum
  --json                 print the result as one JSON object
  --hgrm FILE            also write the delivery latency histogram to FILE in
                         HdrHistogram's percentile distribution text format
                         (.hgrm, values in microseconds), which HdrHistogram
                         plotters read
  -h, --help             print this help
  -V, --version          print the version

Each connection uses one file descriptor here and one in the server. At
start the generator raises its soft open-file limit to the hard limit; past
that, raise the hard limit first (`ulimit -Hn`, as root: `prlimit --nofile=`,
or LimitNOFILE= in systemd), or spread the clients over --procs.

The result goes to stdout (text, or JSON with --json); progress goes to
stderr once a second (redrawn in place on a terminal, else one line each). Exit status 1 if anything was lost or went wrong.
";

/// The flags that take a value.
const VALUE_FLAGS: &[&str] = &[
    "addr",
    "name-prefix",
    "clients",
    "connect-rate",
    "login-window",
    "source-ips",
    "idle",
    "senders",
    "fanout",
    "payload",
    "window",
    "rate",
    "duration",
    "settle-timeout",
    "server-pid",
    "threads",
    "procs",
    "procs-child",
    "hgrm",
];

/// The longest time a flag takes, and the longest time between two events
/// a rate gives (about 115 days).
const MAX_SECS: f64 = 1e7;
/// Rates are below this, per second (and at least `1 / MAX_SECS`).
const MAX_RATE: f64 = 1e9;
/// Clients are allocated up front, and each holds a descriptor here and one
/// in the server: more than this fits no machine.
const MAX_CLIENTS: usize = 10_000_000;
/// The longest padding: a line must fit the server's longest line, and
/// chatd's `--max-line` goes up to 16 MiB.
const MAX_PAYLOAD: usize = 16 << 20;
/// The most lines in flight per sender, all sent at once when traffic starts.
const MAX_WINDOW: usize = 1_000_000;
/// The most (sender, recipient) pairs, whose order is checked per pair.
const MAX_PAIRS: usize = 100_000_000;
/// The longest `--name-prefix`: with `b` and the client number it stays
/// well within chatd's 64-byte names.
const MAX_PREFIX: usize = 32;
/// The most `--threads`.
const MAX_THREADS: usize = 1024;
/// The most `--procs`.
const MAX_PROCS: usize = 1024;

/// What the command line asked for.
struct Args {
    plan: Plan,
    idle: Duration,
    /// The server processes to measure (several for a cluster's nodes).
    server_pids: Vec<u32>,
    json: bool,
    threads: usize,
    /// Generator processes (`--procs`); above 1 this one steers children.
    procs: usize,
    /// This process is the child `K` of a `--procs` run (`--procs-child`).
    child: Option<usize>,
    /// Where to write the latency histogram (`--hgrm`).
    hgrm: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut addr = std::env::var("CHATD_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let mut plan = Plan {
        addrs: Vec::new(),
        name_prefix: String::new(),
        clients: 1000,
        connect_rate: 0.0,
        login_window: 0,
        source_ips: Vec::new(),
        senders: 0,
        fanout: 1,
        payload: 32,
        window: 1,
        rate: 0.0,
        duration: Duration::from_secs(10),
        settle_timeout: Duration::from_secs(30),
        ws: false,
    };
    let mut idle = Duration::ZERO;
    let mut server_pids = Vec::new();
    let mut json = false;
    let mut threads = 1;
    let mut procs = 1;
    let mut child = None;
    let mut hgrm = None;
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let Long(flag) = arg else {
            match arg {
                Short('h') => print!("{USAGE}"),
                Short('V') => println!("chatd-bench {}", env!("CARGO_PKG_VERSION")),
                _ => return Err(format!("{} (see --help)", arg.unexpected())),
            }
            return Ok(None);
        };
        let flag = flag.to_string();
        if flag == "help" {
            print!("{USAGE}");
            return Ok(None);
        }
        if flag == "version" {
            println!("chatd-bench {}", env!("CARGO_PKG_VERSION"));
            return Ok(None);
        }
        if flag == "json" {
            json = true;
            continue;
        }
        if flag == "ws" {
            plan.ws = true;
            continue;
        }
        // Known before its value is taken, so a misspelt flag is reported
        // as unknown rather than as missing its value.
        if !VALUE_FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown option '--{flag}' (see --help)"));
        }
        let value = parser.value().map_err(|e| e.to_string())?;
        let value = value.to_string_lossy().into_owned();
        let bad = |what: &str| format!("invalid value for --{flag}: '{value}' (expected {what})");
        let count = |max: usize| {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| bad(&format!("a whole number up to {max}")))
        };
        let count_from_1 = |max: usize| match count(max)? {
            0 => Err(bad(&format!("a whole number from 1 to {max}"))),
            n => Ok(n),
        };
        let secs = || {
            value
                .parse::<f64>()
                .ok()
                .filter(|s| (0.0..MAX_SECS).contains(s))
                .map(Duration::from_secs_f64)
                .ok_or_else(|| bad("seconds"))
        };
        // The time between two events, 1 / rate, must be a time the other
        // flags could give, or computing when the next one is due overflows.
        let per_sec = || {
            value
                .parse::<f64>()
                .ok()
                .filter(|r| *r == 0.0 || (1.0 / MAX_SECS..MAX_RATE).contains(r))
                .ok_or_else(|| bad("0, or a rate per second from 1e-7 to 1e9"))
        };
        match flag.as_str() {
            "addr" => addr = value.clone(),
            "name-prefix" => {
                if !valid_prefix(&value) {
                    return Err(bad(&format!(
                        "up to {MAX_PREFIX} ASCII letters, digits, '-' or '_'"
                    )));
                }
                plan.name_prefix = value.clone();
            }
            "clients" => plan.clients = count(MAX_CLIENTS)?,
            "connect-rate" => plan.connect_rate = per_sec()?,
            "login-window" => plan.login_window = count(MAX_CLIENTS)?,
            "source-ips" => {
                plan.source_ips =
                    parse_ips(&value).ok_or_else(|| bad("A-B or a comma list of IPv4 addresses"))?
            }
            "idle" => idle = secs()?,
            "senders" => plan.senders = count(MAX_CLIENTS)?,
            "fanout" => plan.fanout = count(MAX_CLIENTS)?,
            "payload" => plan.payload = count(MAX_PAYLOAD)?,
            "window" => plan.window = count(MAX_WINDOW)?,
            "rate" => plan.rate = per_sec()?,
            "duration" => plan.duration = secs()?,
            "settle-timeout" => plan.settle_timeout = secs()?,
            "server-pid" => {
                server_pids = value
                    .split(',')
                    .map(|pid| pid.trim().parse().ok())
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("a process id, or a comma list of them"))?
            }
            "threads" => threads = count_from_1(MAX_THREADS)?,
            "procs" => procs = count_from_1(MAX_PROCS)?,
            "procs-child" => child = Some(count(MAX_PROCS - 1)?),
            "hgrm" => hgrm = Some(PathBuf::from(&value)),
            _ => unreachable!("every flag of VALUE_FLAGS has an arm"),
        }
    }
    plan.addrs = parse_addrs(&addr).ok_or_else(|| format!("invalid value for --addr: '{addr}'"))?;
    if plan.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if plan.connect_rate > 0.0 && plan.clients as f64 / plan.connect_rate > MAX_SECS {
        return Err(format!(
            "--connect-rate {} is too slow for --clients {}: connecting would take {:.0e} s \
             (the most is 1e7 s)",
            plan.connect_rate,
            plan.clients,
            plan.clients as f64 / plan.connect_rate
        ));
    }
    if plan.source_ips.is_empty() {
        plan.source_ips = default_source_ips(&plan.addrs, plan.clients);
    }
    if plan.senders > plan.clients {
        return Err("--senders cannot exceed --clients".into());
    }
    if plan.senders > 0 && (plan.fanout == 0 || plan.fanout >= plan.clients) {
        return Err("--fanout must be from 1 to --clients - 1".into());
    }
    if plan.senders > 0 && plan.senders.saturating_mul(plan.fanout) > MAX_PAIRS {
        return Err(format!(
            "--senders * --fanout must be at most {MAX_PAIRS} (the order check keeps 8 bytes \
             per sender and recipient)"
        ));
    }
    if plan.senders > 0 && plan.rate == 0.0 && plan.window == 0 {
        return Err("--window must be at least 1 in closed loop".into());
    }
    if plan.clients < procs {
        return Err(format!(
            "--procs {procs} needs at least {procs} --clients, one for each process"
        ));
    }
    // The process with the fewest clients has this many.
    let fewest = plan.clients / procs;
    if plan.senders > 0 && fewest < plan.fanout + 1 {
        return Err(format!(
            "--procs {procs} leaves {fewest} clients in a process, fewer than --fanout + 1 = {}: \
             each process sends to its own clients only; use fewer --procs or a smaller --fanout",
            plan.fanout + 1
        ));
    }
    if child.is_some_and(|k| k >= procs) {
        return Err("--procs-child must be below --procs".into());
    }
    Ok(Some(Args {
        plan,
        idle,
        server_pids,
        json,
        threads,
        procs,
        child,
        hgrm,
    }))
}

/// Source addresses for `clients` connections to `servers` when none are
/// given. One address gives about 28,000 ports, but Linux `connect` tries
/// the even half first and scans all of it for every connect once those are
/// taken: past about 14,000 connections to one server from one address,
/// connecting slows down to a few hundred a second and the generator, not
/// the server, sets the pace; and well before that, each connect costs more
/// as the range fills (measured: 300,000 clients over 16 processes logged
/// in at 9,000 a second from 9,400 per address, at 15,500 from 1,900). So
/// loopback servers (127.x, every one of them: a 127.x source cannot reach
/// another host) get one address per 2,000 clients, counted over all
/// servers as the ports are taken from one range; otherwise the kernel
/// chooses.
fn default_source_ips(servers: &[SocketAddr], clients: usize) -> Vec<IpAddr> {
    const CLIENTS_PER_ADDRESS: usize = 2_000;
    let loopback = |server: &SocketAddr| matches!(server.ip(), IpAddr::V4(ip) if ip.is_loopback());
    if servers.is_empty() || !servers.iter().all(loopback) || clients <= CLIENTS_PER_ADDRESS {
        return Vec::new();
    }
    let first = u32::from(Ipv4Addr::new(127, 0, 0, 1));
    let count = clients.div_ceil(CLIENTS_PER_ADDRESS) as u32;
    (first..first + count)
        .map(|ip| IpAddr::V4(ip.into()))
        .collect()
}

/// `HOST:PORT` or a comma list of them, each resolved to its first address,
/// in the order given.
fn parse_addrs(text: &str) -> Option<Vec<SocketAddr>> {
    text.split(',')
        .map(|one| one.trim().to_socket_addrs().ok()?.next())
        .collect()
}

/// Whether `prefix` can start a chatd name in every generator's hands: at
/// most [`MAX_PREFIX`] bytes of ASCII letters, digits, `-` or `_` (empty is
/// fine).
fn valid_prefix(prefix: &str) -> bool {
    prefix.len() <= MAX_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `127.0.0.1-127.0.0.8` or `127.0.0.1,127.0.0.2`.
fn parse_ips(text: &str) -> Option<Vec<IpAddr>> {
    if let Some((from, to)) = text.split_once('-') {
        let from = u32::from(from.trim().parse::<Ipv4Addr>().ok()?);
        let to = u32::from(to.trim().parse::<Ipv4Addr>().ok()?);
        if to < from || to - from > 1 << 20 {
            return None;
        }
        return Some((from..=to).map(|ip| IpAddr::V4(ip.into())).collect());
    }
    text.split(',').map(|ip| ip.trim().parse().ok()).collect()
}

/// The numbers of one run.
struct Report {
    fields: Vec<(&'static str, Value)>,
}

enum Value {
    Int(u64),
    Float(f64),
    Text(String),
}

impl Report {
    fn int(&mut self, key: &'static str, v: u64) {
        self.fields.push((key, Value::Int(v)));
    }
    fn float(&mut self, key: &'static str, v: f64) {
        self.fields.push((key, Value::Float(v)));
    }
    fn text(&mut self, key: &'static str, v: String) {
        self.fields.push((key, Value::Text(v)));
    }

    fn json(&self) -> String {
        let body: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Int(n) => n.to_string(),
                    Value::Float(x) if x.is_finite() => format!("{x:.6}"),
                    Value::Float(_) => "null".into(),
                    Value::Text(t) => {
                        format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\""))
                    }
                };
                format!("\"{k}\":{v}")
            })
            .collect();
        format!("{{{}}}", body.join(","))
    }

    fn text_block(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.fields {
            let v = match v {
                Value::Int(n) => n.to_string(),
                Value::Float(x) => format!("{x:.3}"),
                Value::Text(t) => t.clone(),
            };
            out += &format!("{k:<28} {v}\n");
        }
        out
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("chatd-bench: {message}");
            return ExitCode::from(2);
        }
    };
    if let Some(k) = args.child {
        // The parent checked the server and measures it.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        return match procs::child_main(&args, k) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chatd-bench: {e}");
                ExitCode::from(1)
            }
        };
    }
    // Figures of the wrong process would look like the server's.
    match server::check_listening(&args.server_pids, &args.plan.addrs, server::LISTEN_WAIT) {
        Ok(warnings) => {
            for warning in warnings {
                eprintln!("chatd-bench: warning: {warning}");
            }
        }
        Err(message) => {
            eprintln!("chatd-bench: {message}");
            return ExitCode::from(2);
        }
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let result = if args.procs > 1 {
        Children::spawn(&args).and_then(|children| run(&args, children))
    } else {
        Generator::new(args.plan.clone(), args.threads).and_then(|load| run(&args, load))
    };
    match result {
        Ok((report, ok)) => {
            if args.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text_block());
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chatd-bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// What the progress lines show of a generator: its own figures, or with
/// `--procs` the sum of its children's.
trait Figures {
    /// Clients connected and logged in.
    fn ready(&self) -> u64;
    fn connect_failed(&self) -> u64;
    /// Clients whose connection is still open.
    fn connected(&self) -> usize;
    fn deliveries(&self) -> u64;
    /// Deliveries the lines sent so far should produce.
    fn expected(&self) -> u64;
}

/// The phase a progress line is about.
#[derive(Clone, Copy)]
enum Phase {
    Connect,
    /// Holding the connections for this long.
    Idle(Duration),
    Traffic,
}

/// Where the phases report their progress: [`Progress`] on stderr, or a
/// child's figures to its parent ([`procs`]).
trait Watch {
    /// After each turn of `phase`, which started at `since`.
    fn tick(&mut self, phase: Phase, since: Instant, figures: &dyn Figures);
}

/// How the connect phase went.
struct Logins {
    logged_in: u64,
    connect_failed: u64,
    /// From the first connect started to the end of the phase (every
    /// client logged in or failed, or the settle timeout).
    secs: f64,
    /// Connect start to confirmed login, µs.
    latency: Histogram<u64>,
}

/// A generator the phases drive: this process's own ([`Generator`]), or
/// `--procs` child processes ([`Children`]).
trait Driver: Figures + Sized {
    /// Connects and logs in every client (until all are settled or the
    /// settle timeout, after the connect rate's own time).
    fn log_in(&mut self, plan: &Plan, watch: &mut dyn Watch) -> io::Result<Logins>;
    /// Holds the connections for up to `wait`, reading what arrives.
    fn hold(&mut self, wait: Duration) -> io::Result<()>;
    /// Sends for `--duration`, waits for the deliveries still in flight (up
    /// to `--settle-timeout`), and ends the run.
    fn traffic(self, plan: &Plan, watch: &mut dyn Watch) -> io::Result<(Totals, TrafficTimes)>;
    /// Ends a run without traffic.
    fn end(self) -> io::Result<Totals>;
}

impl Driver for Generator {
    fn log_in(&mut self, plan: &Plan, watch: &mut dyn Watch) -> io::Result<Logins> {
        let start = Instant::now();
        while !self.logins_settled() && start.elapsed() < plan.settle_timeout + connect_time(plan) {
            self.connect_step(start, Duration::from_millis(50))?;
            watch.tick(Phase::Connect, start, self);
        }
        let secs = start.elapsed().as_secs_f64();
        self.end_connect()?;
        Ok(Logins {
            logged_in: self.ready(),
            connect_failed: self.connect_failed(),
            secs,
            latency: self.login_latency(),
        })
    }

    fn hold(&mut self, wait: Duration) -> io::Result<()> {
        self.traffic_step(wait)
    }

    fn traffic(mut self, plan: &Plan, watch: &mut dyn Watch) -> io::Result<(Totals, TrafficTimes)> {
        let me_start = own_usage();
        let start = Instant::now();
        let sent_secs = traffic_phase(&mut self, plan, watch)?;
        drain_phase(&mut self, plan)?;
        let times = TrafficTimes {
            sent_secs,
            secs: start.elapsed().as_secs_f64(),
            bench_cpu: own_usage().cpu.saturating_sub(me_start.cpu),
        };
        Ok((self.finish()?, times))
    }

    fn end(self) -> io::Result<Totals> {
        self.finish()
    }
}

/// Runs the phases in order (connect and log in, idle hold, traffic, the
/// wait for the last deliveries) and reports each; true if nothing went
/// wrong.
fn run(args: &Args, mut load: impl Driver) -> io::Result<(Report, bool)> {
    let plan = &args.plan;
    let server = ServerProcesses::new(&args.server_pids);
    let mut progress = Progress::new();
    let mut report = Report { fields: Vec::new() };
    let addrs: Vec<String> = plan.addrs.iter().map(SocketAddr::to_string).collect();
    report.text("addr", addrs.join(","));
    let transport = if plan.ws { "ws" } else { "tcp" };
    report.text("transport", transport.into());
    report.int("clients", plan.clients as u64);
    report.int("procs", args.procs as u64);

    let server_before = server.usage();
    let logins = load.log_in(plan, &mut progress)?;
    report_logins(&mut report, &logins);
    idle_phase(&mut load, args.idle, &mut progress)?;
    report_memory(&mut report, server_before, server.usage(), load.ready());
    let (counts, expected) = if plan.senders > 0 {
        report_traffic_plan(&mut report, plan);
        let server_start = server.usage();
        let (totals, times) = load.traffic(plan, &mut progress)?;
        let server_cpu = match (server_start, server.usage()) {
            (Some(before), Some(after)) => Some(after.cpu.saturating_sub(before.cpu)),
            _ => None,
        };
        progress.end();
        report_traffic(&mut report, args, &totals, &times, server_cpu)?;
        // Summed over the threads after they ended.
        let expected = totals.counts.lines_sent * plan.fanout as u64;
        (totals.counts, expected)
    } else {
        progress.end();
        (load.end()?.counts, 0)
    };
    let ok = report_verdict(&mut report, plan, &counts, expected);
    Ok((report, ok))
}

/// How the connect phase went: logins, failures, time and latency.
fn report_logins(report: &mut Report, logins: &Logins) {
    report.int("logged_in", logins.logged_in);
    report.int("connect_failed", logins.connect_failed);
    report.float("connect_secs", logins.secs);
    report.float("logins_per_sec", logins.logged_in as f64 / logins.secs);
    for (key, q) in [
        ("login_ms_p50", 0.5),
        ("login_ms_p99", 0.99),
        ("login_ms_max", 1.0),
    ] {
        report.float(key, logins.latency.value_at_quantile(q) as f64 / 1000.0);
    }
}

/// Holds the connections idle for `idle`, still reading what arrives.
fn idle_phase(load: &mut impl Driver, idle: Duration, watch: &mut dyn Watch) -> io::Result<()> {
    let idle_start = Instant::now();
    while idle_start.elapsed() < idle {
        let left = idle.saturating_sub(idle_start.elapsed());
        load.hold(left.min(Duration::from_millis(100)))?;
        watch.tick(Phase::Idle(idle), idle_start, load);
    }
    Ok(())
}

/// The server's memory before the clients connected and after they logged
/// in (and idled), and the difference per logged-in connection.
fn report_memory(report: &mut Report, before: Option<Usage>, after: Option<Usage>, logged_in: u64) {
    if let (Some(before), Some(after)) = (before, after) {
        report.int("server_rss_before_kb", before.rss_bytes / 1024);
        report.int("server_rss_after_kb", after.rss_bytes / 1024);
        let per_conn =
            after.rss_bytes.saturating_sub(before.rss_bytes) as f64 / logged_in.max(1) as f64;
        report.float("server_bytes_per_conn", per_conn);
    }
}

/// The traffic the plan asks for.
fn report_traffic_plan(report: &mut Report, plan: &Plan) {
    report.int("senders", plan.senders as u64);
    report.int("fanout", plan.fanout as u64);
    report.int("payload", plan.payload as u64);
    if plan.rate > 0.0 {
        report.float("rate", plan.rate);
    } else {
        report.int("window", plan.window as u64);
    }
}

/// Sends for `--duration` (progress each second), then stops sending;
/// returns how long sending took, in seconds.
fn traffic_phase(load: &mut Generator, plan: &Plan, watch: &mut dyn Watch) -> io::Result<f64> {
    let start = Instant::now();
    load.start_traffic()?;
    while start.elapsed() < plan.duration {
        load.traffic_step(Duration::from_millis(10))?;
        watch.tick(Phase::Traffic, start, load);
    }
    load.stop_traffic()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Waits for the deliveries still in flight, up to `--settle-timeout`.
fn drain_phase(load: &mut Generator, plan: &Plan) -> io::Result<()> {
    let settle = Instant::now();
    while load.deliveries() < load.expected() && settle.elapsed() < plan.settle_timeout {
        load.traffic_step(Duration::from_millis(10))?;
    }
    Ok(())
}

/// How long the traffic took, and what it cost the generator.
struct TrafficTimes {
    /// Sending, in seconds (`traffic_secs`).
    sent_secs: f64,
    /// Sending and the wait for the last deliveries, in seconds.
    secs: f64,
    /// The generator's CPU time over both (`bench_cpu_secs`).
    bench_cpu: Duration,
}

/// What the traffic gave: counts, rates, latency percentiles, the server's
/// CPU per delivery, the generator's own CPU; and the `--hgrm` file.
fn report_traffic(
    report: &mut Report,
    args: &Args,
    totals: &Totals,
    times: &TrafficTimes,
    server_cpu: Option<Duration>,
) -> io::Result<()> {
    let plan = &args.plan;
    let c = &totals.counts;
    let expected = c.lines_sent * plan.fanout as u64;
    report.int("lines_sent", c.lines_sent);
    report.int("deliveries", c.deliveries);
    report.int("lost", expected.saturating_sub(c.deliveries));
    report.float("traffic_secs", times.sent_secs);
    report.float("deliveries_per_sec", c.deliveries as f64 / times.secs);
    for (key, q) in [
        ("latency_us_p50", 0.5),
        ("latency_us_p90", 0.9),
        ("latency_us_p99", 0.99),
        ("latency_us_p999", 0.999),
        ("latency_us_max", 1.0),
    ] {
        report.int(key, totals.latency.value_at_quantile(q));
    }
    if plan.rate > 0.0 {
        for (key, q) in [("send_lag_us_p99", 0.99), ("send_lag_us_max", 1.0)] {
            report.int(key, totals.send_lag.value_at_quantile(q));
        }
    }
    if let Some(cpu) = server_cpu {
        report.float("server_cpu_secs", cpu.as_secs_f64());
        report.float(
            "server_cpu_us_per_delivery",
            cpu.as_secs_f64() * 1e6 / c.deliveries.max(1) as f64,
        );
    }
    report.int("threads", args.threads as u64);
    report.float("bench_cpu_secs", times.bench_cpu.as_secs_f64());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // Every process's threads.
    let loops = args.threads * args.procs;
    let bound = is_generator_bound(times.bench_cpu, times.secs, loops, cores);
    report.text("generator_bound", if bound { "yes" } else { "no" }.into());
    if bound {
        report.text("note", GENERATOR_BOUND_NOTE.into());
        eprintln!("chatd-bench: warning: {GENERATOR_BOUND_NOTE}");
    }
    if let Some(path) = &args.hgrm {
        std::fs::write(path, percentile_distribution(&totals.latency))?;
    }
    Ok(())
}

/// The share of the CPU time its threads could have had past which the
/// generator, not the server, is taken to have set the pace.
const GENERATOR_BOUND: f64 = 0.8;

/// What the report says when the generator was the bottleneck.
const GENERATOR_BOUND_NOTE: &str = "the generator was CPU-bound (bench_cpu_secs near \
     traffic_secs): these figures are the generator's limit, not the server's; give it \
     more --threads (and cores), or a lighter load";

/// Whether the generator was the bottleneck: over `secs` of traffic its
/// CPU time came near all its threads could have had (one core each, and
/// no more cores than the machine's).
fn is_generator_bound(bench_cpu: Duration, secs: f64, threads: usize, cores: usize) -> bool {
    let most = secs * threads.min(cores).max(1) as f64;
    most > 0.0 && bench_cpu.as_secs_f64() >= GENERATOR_BOUND * most
}

/// What went wrong, if anything, and the `result` line; true if nothing
/// did: every client logged in, every line delivered, nothing unexpected.
fn report_verdict(report: &mut Report, plan: &Plan, c: &Counts, expected: u64) -> bool {
    report.int("unexpected", c.unexpected);
    report.int("closed_by_server", c.closed_by_server);
    // `none` rather than a blank, which reads as a value left out.
    let summary = |list: &[(String, u64)]| {
        if list.is_empty() {
            return "none".to_string();
        }
        list.iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    report.text("error_lines", summary(&c.error_lines));
    report.text("socket_errors", summary(&c.socket_errors));
    let ok = c.logged_in == plan.clients as u64
        && c.deliveries == expected
        && c.unexpected == 0
        && c.closed_by_server == 0
        && c.error_lines.is_empty()
        && c.socket_errors.is_empty();
    report.text("result", if ok { "ok".into() } else { "FAILED".into() });
    ok
}

/// Progress on stderr, one line a second: redrawn in place when stderr is
/// a terminal, else one line each (for logs).
struct Progress {
    tty: bool,
    last: Instant,
    /// A line is on the terminal without its newline.
    drawn: bool,
    /// Traffic: when the last line was shown, and the deliveries then.
    rate_from: Option<(Instant, u64)>,
}

impl Watch for Progress {
    fn tick(&mut self, phase: Phase, since: Instant, load: &dyn Figures) {
        match phase {
            Phase::Connect if self.due() => self.show(format_args!(
                "[connect] {:.0}s: {} logged in, {} failed",
                since.elapsed().as_secs_f64(),
                load.ready(),
                load.connect_failed()
            )),
            Phase::Idle(idle) if self.due() => self.show(format_args!(
                "[idle] {:.1}s of {:.1}s: {} connected",
                since.elapsed().as_secs_f64(),
                idle.as_secs_f64(),
                load.connected()
            )),
            Phase::Traffic => {
                let (last, before) = *self.rate_from.get_or_insert((since, 0));
                if last.elapsed() >= Duration::from_secs(1) {
                    let d = load.deliveries();
                    self.show(format_args!(
                        "[traffic] {:.0}s: {:.0} deliveries/s, {} in flight",
                        since.elapsed().as_secs_f64(),
                        d.saturating_sub(before) as f64 / last.elapsed().as_secs_f64(),
                        load.expected().saturating_sub(d),
                    ));
                    self.rate_from = Some((Instant::now(), d));
                }
            }
            _ => {}
        }
    }
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            drawn: false,
            rate_from: None,
        }
    }

    /// Whether a second has passed since the last line was due.
    fn due(&mut self) -> bool {
        let due = self.last.elapsed() >= Duration::from_secs(1);
        if due {
            self.last = Instant::now();
        }
        due
    }

    fn show(&mut self, line: std::fmt::Arguments) {
        if self.tty {
            // Back to the start of the line, and clear it.
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.drawn = true;
        } else {
            eprintln!("{line}");
        }
    }

    /// Ends a line drawn in place, so what follows starts on its own.
    fn end(&mut self) {
        if std::mem::take(&mut self.drawn) {
            eprintln!();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end();
    }
}

/// `histogram` (values in microseconds) in HdrHistogram's classic
/// percentile distribution text format, as Java's
/// `outputPercentileDistribution(out, 5, 1.0)` and C's `hdr_percentiles_print`
/// (CLASSIC) write it: a header, one row per percentile step (5 per halving
/// of the distance to 100%), the last without 1/(1-Percentile), and the
/// `#[Mean`, `#[Max` and `#[Buckets` footer lines; then one more `#[` line
/// saying the unit, which readers of the format skip like the footer.
fn percentile_distribution(histogram: &Histogram<u64>) -> String {
    use std::fmt::Write as _;
    let digits = usize::from(histogram.sigfig());
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0;
    for v in histogram.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let value = v.value_iterated_to() as f64;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value:12.digits$} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value:12.digits$} {q:2.12} {total:10}");
        }
    }
    let (mean, stdev) = if histogram.is_empty() {
        (0.0, 0.0)
    } else {
        (histogram.mean(), histogram.stdev())
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.digits$}, Total count    = {:12}]",
        histogram.max() as f64,
        histogram.len()
    );
    // The sub-buckets are the power of two that holds 2 * 10^sigfig values.
    let sub_buckets = (2 * 10u64.pow(u32::from(histogram.sigfig()))).next_power_of_two();
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {sub_buckets:12}]",
        histogram.buckets()
    );
    let _ = writeln!(
        out,
        "#[Unit    = microseconds: delivery latency from each line's intended send time]"
    );
    out
}

/// How long a rate-limited connect phase takes by design.
fn connect_time(plan: &Plan) -> Duration {
    if plan.connect_rate > 0.0 {
        Duration::from_secs_f64(plan.clients as f64 / plan.connect_rate)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_many_loopback_clients_over_source_addresses() {
        let local = SocketAddr::from(([127, 0, 0, 1], 8080));
        assert!(
            default_source_ips(&[local], 2_000).is_empty(),
            "one address is enough"
        );
        let ips = default_source_ips(&[local], 3_000);
        assert_eq!(ips, parse_ips("127.0.0.1-127.0.0.2").unwrap());
        assert_eq!(default_source_ips(&[local], 100_000).len(), 50);
        let remote = SocketAddr::from(([192, 0, 2, 1], 8080));
        assert!(
            default_source_ips(&[remote], 100_000).is_empty(),
            "the kernel picks"
        );
    }

    #[test]
    fn spreads_only_when_every_server_is_loopback() {
        let a = SocketAddr::from(([127, 0, 0, 1], 8080));
        let b = SocketAddr::from(([127, 0, 0, 2], 8081));
        let remote = SocketAddr::from(([192, 0, 2, 1], 8080));
        assert_eq!(default_source_ips(&[a, b], 100_000).len(), 50);
        assert!(default_source_ips(&[a, remote], 100_000).is_empty());
        assert!(default_source_ips(&[remote, a], 100_000).is_empty());
        let v6 = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 8080));
        assert!(default_source_ips(&[v6], 100_000).is_empty());
    }

    #[test]
    fn parses_address_lists() {
        let addrs = parse_addrs("127.0.0.1:1,127.0.0.2:2, 127.0.0.3:3").unwrap();
        assert_eq!(
            addrs,
            [
                SocketAddr::from(([127, 0, 0, 1], 1)),
                SocketAddr::from(([127, 0, 0, 2], 2)),
                SocketAddr::from(([127, 0, 0, 3], 3)),
            ]
        );
        assert_eq!(parse_addrs("127.0.0.1:9").unwrap().len(), 1);
        assert!(parse_addrs("127.0.0.1:1,").is_none());
        assert!(parse_addrs("127.0.0.1:1,nope").is_none());
    }

    #[test]
    fn checks_name_prefixes() {
        assert!(valid_prefix(""));
        assert!(valid_prefix("x"));
        assert!(valid_prefix("Gen-2_a"));
        assert!(valid_prefix(&"p".repeat(MAX_PREFIX)));
        assert!(!valid_prefix(&"p".repeat(MAX_PREFIX + 1)));
        for bad in ["a b", "a,b", "a:b", "é", "a\tb", "a.b"] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn knows_when_the_generator_set_the_pace() {
        let secs = |s: f64| Duration::from_secs_f64(s);
        // (bench CPU, traffic seconds, threads, cores, bound)
        for (cpu, traffic, threads, cores, bound) in [
            (9.5, 10.0, 1, 2, true),
            (8.0, 10.0, 1, 2, true),
            (5.0, 10.0, 1, 2, false),
            (9.5, 10.0, 2, 2, false), // two threads: half of what they could have
            (17.0, 10.0, 2, 2, true),
            (17.0, 10.0, 4, 2, true), // four threads share two cores
            (0.0, 0.0, 1, 1, false),
        ] {
            assert_eq!(
                is_generator_bound(secs(cpu), traffic, threads, cores),
                bound,
                "{cpu} s of CPU in {traffic} s, {threads} threads, {cores} cores"
            );
        }
    }

    #[test]
    fn parses_source_address_lists() {
        let ips = parse_ips("127.0.0.1,127.0.0.3").unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(parse_ips("127.0.0.1-127.0.0.4").unwrap().len(), 4);
        assert!(parse_ips("127.0.0.4-127.0.0.1").is_none());
        assert!(parse_ips("nope").is_none());
    }
}
