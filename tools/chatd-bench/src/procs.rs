//! `--procs N`: the load spread over `N` child processes of this program,
//! so that one run holds more connections than one process may open. Each
//! child is a full generator (with its own `--threads`) over its share of
//! the clients and senders, with its own name prefix and source addresses
//! ([`child_plan`]); the parent ([`Children`]) starts the phases in all of
//! them at once, shows their summed progress and merges their results.
//!
//! The parent runs each child as `chatd-bench --procs-child K ARGS`, ARGS
//! being its own arguments, and they talk over the child's stdin and
//! stdout, a line at a time:
//!
//! | from   | line | meaning |
//! |--------|------|---------|
//! | child  | `ready` | set up; waits for `connect` |
//! | parent | `connect` | connect and log in every client |
//! | child  | `p LOGGED_IN FAILED CONNECTED DELIVERIES EXPECTED` | its figures, five times a second from then on |
//! | child  | `logins START SECS LOGGED_IN FAILED HISTOGRAM` | the connect phase is over; it holds the connections until told more |
//! | parent | `traffic` or `finish` | send traffic and wait for the last deliveries, or end without |
//! | child  | `traffic START SENT_SECS SECS CPU_SECS` | how the traffic went (after `traffic` only) |
//! | child  | `count NAME N`, `error_line N KIND`, `socket_error N KIND`, `latency HISTOGRAM`, `send_lag HISTOGRAM` | its totals |
//! | child  | `done` | the last line; it exits 0 next |
//!
//! A `START` is in seconds of the system's monotonic clock, the same in
//! every process of the machine, so the parent takes the first start and
//! the last end as one process would; a histogram is HdrHistogram's V2
//! serialization in hex, so merging them is exact.
//!
//! A child exits as soon as its stdin ends: its parent is gone (even killed
//! by SIGKILL), and no child outlives it. The parent kills and reaps every
//! child when anything fails, and when one ends early it says which and
//! what it last wrote on stderr.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use mio::Waker;

use crate::load::{Counts, Plan};
use crate::pool::{Generator, Totals};
use crate::{Args, Driver, Figures, Logins, Phase, TrafficTimes, Watch, connect_time};

/// How much longer than a phase's own bound the parent waits for every
/// child to finish it (and, alone, for them to set up and to exit).
const GRACE: Duration = Duration::from_secs(30);

/// How often a child tells its figures.
const TELL_EVERY: Duration = Duration::from_millis(200);

/// How much of a child's stderr the parent keeps for its report.
const STDERR_TAIL: usize = 4096;

/// Process `k`'s part of `plan` over `procs` processes: an even share of
/// the clients and of the senders (the first processes take one more when
/// they do not divide), of the rates, and of the source addresses, and the
/// name prefix `<prefix>p<k>`. Its senders send to its own clients.
fn child_plan(plan: &Plan, procs: usize, k: usize) -> Plan {
    let part = |n: usize| n / procs + usize::from(k < n % procs);
    let (clients, senders) = (part(plan.clients), part(plan.senders));
    let share = |rate: f64, part: usize, all: usize| {
        if all == 0 {
            rate
        } else {
            rate * part as f64 / all as f64
        }
    };
    Plan {
        name_prefix: format!("{}p{k}", plan.name_prefix),
        clients,
        connect_rate: share(plan.connect_rate, clients, plan.clients),
        // Its share of the window, at least 1 when there is one.
        login_window: (plan.login_window * clients).div_ceil(plan.clients.max(1)),
        source_ips: source_share(&plan.source_ips, procs, k),
        senders,
        rate: share(plan.rate, senders, plan.senders),
        ..plan.clone()
    }
}

/// Process `k`'s source addresses: a slice of `ips` of its own, as even as
/// they divide, or with fewer addresses than processes one of them,
/// round-robin (shared with other processes).
fn source_share(ips: &[IpAddr], procs: usize, k: usize) -> Vec<IpAddr> {
    if ips.len() < procs {
        return ips.get(k % ips.len().max(1)).into_iter().copied().collect();
    }
    let at = |k: usize| k * ips.len() / procs;
    ips[at(k)..at(k + 1)].to_vec()
}

/// A child of a `--procs` run: its share of the run, each phase started
/// by the parent, its figures and results told on stdout.
pub fn child_main(args: &Args, k: usize) -> io::Result<()> {
    let plan = child_plan(&args.plan, args.procs, k);
    let mut load = Generator::new(plan.clone(), args.threads)?;
    let commands = listen(load.waker()?)?;
    let mut tell = Tell {
        last: Instant::now(),
    };
    say(format_args!("ready"))?;
    expect(&mut load, &commands, &mut tell, &["connect"])?;
    let start = clock();
    let logins = load.log_in(&plan, &mut tell)?;
    let latency = encode(&logins.latency)?;
    say(format_args!(
        "logins {start} {} {} {} {latency}",
        logins.secs, logins.logged_in, logins.connect_failed
    ))?;
    let totals = if expect(&mut load, &commands, &mut tell, &["traffic", "finish"])? == "traffic" {
        let start = clock();
        let (totals, times) = load.traffic(&plan, &mut tell)?;
        say(format_args!(
            "traffic {start} {} {} {}",
            times.sent_secs,
            times.secs,
            times.bench_cpu.as_secs_f64()
        ))?;
        totals
    } else {
        load.end()?
    };
    for line in result_lines(&totals)? {
        say(format_args!("{line}"))?;
    }
    say(format_args!("done"))
}

/// The parent's commands, a line each from stdin, read by a thread of their
/// own that wakes the generator's loop for each one; it ends this process
/// when stdin ends, as the parent is gone.
fn listen(waker: Option<Arc<Waker>>) -> io::Result<Receiver<String>> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("commands".into())
        .spawn(move || {
            for line in io::stdin().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    return; // the run is over
                }
                if let Some(waker) = &waker {
                    let _ = waker.wake();
                }
            }
            std::process::exit(1);
        })?;
    Ok(rx)
}

/// Holds the connections until the parent's next command, which must be
/// one of `allowed`.
fn expect(
    load: &mut Generator,
    commands: &Receiver<String>,
    tell: &mut Tell,
    allowed: &[&str],
) -> io::Result<String> {
    let since = Instant::now();
    loop {
        match commands.try_recv() {
            Ok(command) if allowed.contains(&command.as_str()) => return Ok(command),
            Ok(command) => {
                return Err(io::Error::other(format!(
                    "the parent said {command:?}, not one of {allowed:?}"
                )));
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                return Err(io::Error::other("the parent's commands ended"));
            }
        }
        load.hold(Duration::from_millis(100))?;
        tell.tick(Phase::Idle(Duration::ZERO), since, load);
    }
}

/// Writes one line to the parent.
fn say(line: std::fmt::Arguments) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Now, in seconds of the system's monotonic clock (the one of `Instant`).
fn clock() -> f64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

/// A child's progress: its figures for the parent, every [`TELL_EVERY`].
struct Tell {
    last: Instant,
}

impl Watch for Tell {
    fn tick(&mut self, _: Phase, _: Instant, load: &dyn Figures) {
        if self.last.elapsed() >= TELL_EVERY {
            self.last = Instant::now();
            // Unread only when the parent is gone, and then stdin ends too.
            let _ = say(format_args!(
                "p {} {} {} {} {}",
                load.ready(),
                load.connect_failed(),
                load.connected(),
                load.deliveries(),
                load.expected()
            ));
        }
    }
}

/// The counters of `Counts` by the names a child's `count` lines give them.
fn count_fields(c: &mut Counts) -> [(&'static str, &mut u64); 6] {
    [
        ("connect_failed", &mut c.connect_failed),
        ("logged_in", &mut c.logged_in),
        ("lines_sent", &mut c.lines_sent),
        ("deliveries", &mut c.deliveries),
        ("unexpected", &mut c.unexpected),
        ("closed_by_server", &mut c.closed_by_server),
    ]
}

/// The lists by kind of `Counts`, by the first word of their lines.
fn list_fields(c: &mut Counts) -> [(&'static str, &mut Vec<(String, u64)>); 2] {
    [
        ("error_line", &mut c.error_lines),
        ("socket_error", &mut c.socket_errors),
    ]
}

/// A child's totals as the lines it tells them in.
fn result_lines(totals: &Totals) -> io::Result<Vec<String>> {
    let mut counts = totals.counts.clone();
    let mut lines: Vec<String> = count_fields(&mut counts)
        .into_iter()
        .map(|(name, n)| format!("count {name} {n}"))
        .collect();
    for (word, list) in list_fields(&mut counts) {
        lines.extend(list.iter().map(|(kind, n)| format!("{word} {n} {kind}")));
    }
    lines.push(format!("latency {}", encode(&totals.latency)?));
    lines.push(format!("send_lag {}", encode(&totals.send_lag)?));
    Ok(lines)
}

/// `histogram` in HdrHistogram's V2 serialization, in hex.
fn encode(histogram: &Histogram<u64>) -> io::Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .map_err(|e| io::Error::other(format!("cannot serialize a histogram: {e:?}")))?;
    Ok(bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}

/// The histogram [`encode`] gave `hex` for.
fn decode(hex: &str) -> Result<Histogram<u64>, String> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<_>>()
        .ok_or("a histogram not in hex")?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("a histogram that does not deserialize ({e:?})"))
}

/// One field of a child's line.
fn field<T: FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a number"))
}

/// What a child's `p` lines tell.
#[derive(Default, Clone, Copy)]
struct Told {
    logged_in: u64,
    connect_failed: u64,
    connected: u64,
    deliveries: u64,
    expected: u64,
}

/// What the parent has heard from one child.
#[derive(Default)]
struct Seen {
    ready: bool,
    told: Told,
    /// When its connect phase started (monotonic clock), and how it went.
    logins: Option<(f64, Logins)>,
    /// Its `traffic` line: start, sent_secs, secs, cpu_secs.
    traffic: Option<[f64; 4]>,
    counts: Counts,
    latency: Option<Histogram<u64>>,
    send_lag: Option<Histogram<u64>>,
    done: bool,
}

impl Seen {
    /// Takes one line of the child's.
    fn take(&mut self, line: &str) -> Result<(), String> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let fields: Vec<&str> = rest.split(' ').collect();
        let wrong = || "a line it should not have sent".to_string();
        match (word, &fields[..]) {
            ("ready", _) => self.ready = true,
            ("p", [logged_in, connect_failed, connected, deliveries, expected]) => {
                self.told = Told {
                    logged_in: field(logged_in)?,
                    connect_failed: field(connect_failed)?,
                    connected: field(connected)?,
                    deliveries: field(deliveries)?,
                    expected: field(expected)?,
                }
            }
            ("logins", [start, secs, logged_in, connect_failed, latency]) => {
                let logins = Logins {
                    logged_in: field(logged_in)?,
                    connect_failed: field(connect_failed)?,
                    secs: field(secs)?,
                    latency: decode(latency)?,
                };
                // Newer than its last `p` line.
                self.told.logged_in = logins.logged_in;
                self.told.connect_failed = logins.connect_failed;
                self.logins = Some((field(start)?, logins));
            }
            ("traffic", [start, sent_secs, secs, cpu]) => {
                self.traffic = Some([field(start)?, field(sent_secs)?, field(secs)?, field(cpu)?]);
            }
            ("count", [name, n]) => {
                let (_, slot) = count_fields(&mut self.counts)
                    .into_iter()
                    .find(|(k, _)| k == name)
                    .ok_or_else(wrong)?;
                *slot = field(n)?;
            }
            ("error_line" | "socket_error", [n, ..]) => {
                let (_, list) = list_fields(&mut self.counts)
                    .into_iter()
                    .find(|(k, _)| *k == word)
                    .ok_or_else(wrong)?;
                let kind = rest.split_once(' ').map_or("", |(_, kind)| kind);
                list.push((kind.to_string(), field(n)?));
            }
            ("latency", [hex]) => self.latency = Some(decode(hex)?),
            ("send_lag", [hex]) => self.send_lag = Some(decode(hex)?),
            ("done", _) if self.logins.is_none() || self.latency.is_none() => {
                return Err("done before its results".into());
            }
            ("done", _) => self.done = true,
            _ => return Err(wrong()),
        }
        Ok(())
    }
}

/// One child process of a `--procs` run.
struct Kid {
    process: Child,
    /// Its commands. Kept open until it is reaped: its end tells the child
    /// to exit.
    stdin: ChildStdin,
    /// The last [`STDERR_TAIL`] bytes it wrote on stderr, kept by a thread.
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    seen: Seen,
    reaped: bool,
}

/// What the threads that read the children's stdout pass on.
enum Event {
    Line(usize, String),
    /// The child's stdout ended.
    Closed(usize),
}

/// The children of a `--procs` run, steered through the phases together.
/// Dropped before they are done, it kills and reaps them all.
pub struct Children {
    kids: Vec<Kid>,
    events: Receiver<Event>,
}

impl Children {
    /// Starts the children and waits until each is set up.
    pub fn spawn(args: &Args) -> io::Result<Children> {
        let exe = std::env::current_exe()?;
        let own: Vec<OsString> = std::env::args_os().skip(1).collect();
        let (tx, events) = mpsc::channel();
        let mut children = Children {
            kids: Vec::new(),
            events,
        };
        for k in 0..args.procs {
            let mut process = Command::new(&exe)
                .arg("--procs-child")
                .arg(k.to_string())
                .args(&own)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let stdout = process.stdout.take().expect("piped");
            let stderr = process.stderr.take().expect("piped");
            let stdin = process.stdin.take().expect("piped");
            let tail = Arc::new(Mutex::new(Vec::new()));
            children.kids.push(Kid {
                process,
                stdin,
                stderr: tail.clone(),
                stderr_reader: None,
                seen: Seen::default(),
                reaped: false,
            });
            let lines = tx.clone();
            reader(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if lines.send(Event::Line(k, line)).is_err() {
                        return;
                    }
                }
                let _ = lines.send(Event::Closed(k));
            })?;
            children.kids[k].stderr_reader = Some(reader(move || keep_tail(stderr, &tail))?);
        }
        children.wait_for("set up", |seen| seen.ready, GRACE, &mut |_| {})?;
        Ok(children)
    }

    /// `child K of N (pid P)`.
    fn name(&self, k: usize) -> String {
        let pid = self.kids[k].process.id();
        format!("child {k} of {} (pid {pid})", self.kids.len())
    }

    /// Tells every child `command`.
    fn send(&mut self, command: &str) -> io::Result<()> {
        let line = format!("{command}\n");
        for k in 0..self.kids.len() {
            if self.kids[k].stdin.write_all(line.as_bytes()).is_err() {
                return Err(self.ended_early(k));
            }
        }
        Ok(())
    }

    /// Waits until every child has `what` (which `has` tells from what it
    /// said), for up to `within`, calling `tick` after each turn.
    fn wait_for(
        &mut self,
        what: &str,
        has: fn(&Seen) -> bool,
        within: Duration,
        tick: &mut dyn FnMut(&Children),
    ) -> io::Result<()> {
        let start = Instant::now();
        while let Some(k) = self.kids.iter().position(|kid| !has(&kid.seen)) {
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(io::Error::other(format!(
                    "{} has not {what} after {:.0} s",
                    self.name(k),
                    within.as_secs_f64()
                )));
            }
            self.pump(left.min(Duration::from_millis(100)))?;
            tick(self);
        }
        Ok(())
    }

    /// Takes what the children say for up to `wait`. The end of a child's
    /// output before its `done` fails the run.
    fn pump(&mut self, wait: Duration) -> io::Result<()> {
        match self.events.recv_timeout(wait) {
            Ok(event) => self.take(event)?,
            Err(RecvTimeoutError::Timeout) => return Ok(()),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other("the output of every child has ended"));
            }
        }
        while let Ok(event) = self.events.try_recv() {
            self.take(event)?;
        }
        Ok(())
    }

    fn take(&mut self, event: Event) -> io::Result<()> {
        match event {
            Event::Line(k, line) => self.kids[k]
                .seen
                .take(&line)
                .map_err(|e| io::Error::other(format!("{}: {e}: {line:?}", self.name(k)))),
            Event::Closed(k) if self.kids[k].seen.done => Ok(()),
            Event::Closed(k) => Err(self.ended_early(k)),
        }
    }

    /// Why the run cannot go on when child `k` ended (or stopped reading)
    /// before its `done`: how it ended, and the end of its stderr.
    fn ended_early(&mut self, k: usize) -> io::Error {
        let how = match self.reap(k, Duration::from_secs(1)) {
            Ok((status, true)) => status.to_string(),
            Ok((_, false)) => "it stopped talking, and was killed".into(),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        let kid = &mut self.kids[k];
        if let Some(reader) = kid.stderr_reader.take() {
            let _ = reader.join(); // its end closed with the child
        }
        let tail = String::from_utf8_lossy(&kid.stderr.lock().unwrap())
            .trim_end()
            .to_string();
        let said = if tail.is_empty() {
            "it wrote nothing on stderr".into()
        } else {
            format!("its stderr ended with:\n{tail}")
        };
        io::Error::other(format!(
            "{} ended before the run did ({how}); {said}",
            self.name(k)
        ))
    }

    /// Waits up to `within` for child `k` to exit, then kills it: its exit
    /// status, and whether it exited by itself.
    fn reap(&mut self, k: usize, within: Duration) -> io::Result<(ExitStatus, bool)> {
        let kid = &mut self.kids[k];
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(status) = kid.process.try_wait()? {
                kid.reaped = true;
                return Ok((status, true));
            }
            thread::sleep(Duration::from_millis(1));
        }
        let _ = kid.process.kill();
        let status = kid.process.wait()?;
        kid.reaped = true;
        Ok((status, false))
    }

    /// After every child's `done`: waits for each to exit, which it must
    /// with status 0.
    fn reap_all(&mut self) -> io::Result<()> {
        for k in 0..self.kids.len() {
            let (status, exited) = self.reap(k, GRACE)?;
            if !exited || !status.success() {
                return Err(io::Error::other(format!(
                    "{} did not exit cleanly after its results ({status})",
                    self.name(k)
                )));
            }
        }
        Ok(())
    }

    /// The children's totals, summed and merged.
    fn totals(&self) -> io::Result<Totals> {
        let mut counts = Counts::default();
        for kid in &self.kids {
            counts.add(&kid.seen.counts);
        }
        Ok(Totals {
            counts,
            latency: merge(self.kids.iter().filter_map(|kid| kid.seen.latency.as_ref()))?,
            send_lag: merge(
                self.kids
                    .iter()
                    .filter_map(|kid| kid.seen.send_lag.as_ref()),
            )?,
        })
    }

    fn sum(&self, figure: fn(&Told) -> u64) -> u64 {
        self.kids.iter().map(|kid| figure(&kid.seen.told)).sum()
    }
}

/// The sum of `histograms` (at least one, all of the same bounds).
fn merge<'a>(
    mut histograms: impl Iterator<Item = &'a Histogram<u64>>,
) -> io::Result<Histogram<u64>> {
    let mut sum = histograms
        .next()
        .ok_or_else(|| io::Error::other("no histogram to merge"))?
        .clone();
    for histogram in histograms {
        sum.add(histogram)
            .map_err(|e| io::Error::other(format!("cannot merge histograms: {e:?}")))?;
    }
    Ok(sum)
}

/// Starts a thread that reads a child's pipe.
fn reader(read: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().stack_size(128 << 10).spawn(read)
}

/// Reads `from` to its end, keeping the last [`STDERR_TAIL`] bytes in `tail`.
fn keep_tail(mut from: impl Read, tail: &Mutex<Vec<u8>>) {
    let mut buf = [0; 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        let mut tail = tail.lock().unwrap();
        tail.extend_from_slice(&buf[..n]);
        let over = tail.len().saturating_sub(STDERR_TAIL);
        tail.drain(..over);
    }
}

impl Figures for Children {
    fn ready(&self) -> u64 {
        self.sum(|t| t.logged_in)
    }
    fn connect_failed(&self) -> u64 {
        self.sum(|t| t.connect_failed)
    }
    fn connected(&self) -> usize {
        self.sum(|t| t.connected) as usize
    }
    fn deliveries(&self) -> u64 {
        self.sum(|t| t.deliveries)
    }
    fn expected(&self) -> u64 {
        self.sum(|t| t.expected)
    }
}

impl Driver for Children {
    /// Starts every child's connect phase at once and waits for all; the
    /// time is from the first child's start to the last one's end.
    fn log_in(&mut self, plan: &Plan, watch: &mut dyn Watch) -> io::Result<Logins> {
        self.send("connect")?;
        let start = Instant::now();
        let within = connect_time(plan) + plan.settle_timeout + GRACE;
        self.wait_for(
            "logged in",
            |seen| seen.logins.is_some(),
            within,
            &mut |children| watch.tick(Phase::Connect, start, children),
        )?;
        let all: Vec<&(f64, Logins)> = self
            .kids
            .iter()
            .filter_map(|kid| kid.seen.logins.as_ref())
            .collect();
        let first = all.iter().map(|(start, _)| *start).fold(f64::MAX, f64::min);
        let last = all
            .iter()
            .map(|(start, l)| start + l.secs)
            .fold(f64::MIN, f64::max);
        Ok(Logins {
            logged_in: all.iter().map(|(_, l)| l.logged_in).sum(),
            connect_failed: all.iter().map(|(_, l)| l.connect_failed).sum(),
            secs: last - first,
            latency: merge(all.iter().map(|(_, l)| &l.latency))?,
        })
    }

    fn hold(&mut self, wait: Duration) -> io::Result<()> {
        self.pump(wait)
    }

    /// Starts every child's traffic at once and waits for all of them to
    /// finish and exit; the times are from the first child's start to the
    /// last one's end, the CPU time their sum.
    fn traffic(mut self, plan: &Plan, watch: &mut dyn Watch) -> io::Result<(Totals, TrafficTimes)> {
        self.send("traffic")?;
        let start = Instant::now();
        self.wait_for(
            "sent its traffic and results",
            |seen| seen.done,
            plan.duration + plan.settle_timeout + GRACE,
            &mut |children| {
                if start.elapsed() < plan.duration {
                    watch.tick(Phase::Traffic, start, children);
                }
            },
        )?;
        self.reap_all()?;
        let mut times = Vec::new();
        for k in 0..self.kids.len() {
            let told = self.kids[k].seen.traffic;
            times.push(told.ok_or_else(|| {
                io::Error::other(format!("{} told no traffic times", self.name(k)))
            })?);
        }
        let first = times.iter().map(|t| t[0]).fold(f64::MAX, f64::min);
        let end = |secs: usize| {
            times
                .iter()
                .map(|t| t[0] + t[secs] - first)
                .fold(0.0, f64::max)
        };
        let times = TrafficTimes {
            sent_secs: end(1),
            secs: end(2),
            bench_cpu: Duration::from_secs_f64(times.iter().map(|t| t[3]).sum()),
        };
        Ok((self.totals()?, times))
    }

    fn end(mut self) -> io::Result<Totals> {
        self.send("finish")?;
        self.wait_for("sent its results", |seen| seen.done, GRACE, &mut |_| {})?;
        self.reap_all()?;
        self.totals()
    }
}

impl Drop for Children {
    /// No child outlives the run: those not reaped yet (the run failed) are
    /// killed and reaped.
    fn drop(&mut self) {
        for kid in self.kids.iter_mut().filter(|kid| !kid.reaped) {
            let _ = kid.process.kill();
        }
        for kid in self.kids.iter_mut().filter(|kid| !kid.reaped) {
            let _ = kid.process.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn plan(clients: usize, senders: usize, ips: usize) -> Plan {
        Plan {
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 1))],
            name_prefix: "x".into(),
            clients,
            connect_rate: 1000.0,
            login_window: 100,
            source_ips: (1..=ips as u32)
                .map(|n| IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0000 + n)))
                .collect(),
            senders,
            fanout: 2,
            payload: 0,
            window: 1,
            rate: 500.0,
            duration: Duration::ZERO,
            settle_timeout: Duration::ZERO,
            ws: true,
        }
    }

    /// The children's shares add up to the whole run, as evenly as they
    /// divide, each with a name prefix and source addresses of its own.
    #[test]
    fn shares_add_up_to_the_run() {
        for (clients, senders, ips, procs) in [(10, 4, 0, 3), (30, 30, 3, 3), (1000, 7, 10, 4)] {
            let whole = plan(clients, senders, ips);
            let parts: Vec<Plan> = (0..procs).map(|k| child_plan(&whole, procs, k)).collect();
            let sum = |f: fn(&Plan) -> f64| parts.iter().map(f).sum::<f64>();
            assert_eq!(sum(|p| p.clients as f64), clients as f64);
            assert_eq!(sum(|p| p.senders as f64), senders as f64);
            assert!((sum(|p| p.connect_rate) - 1000.0).abs() < 1e-6);
            assert!((sum(|p| p.rate) - 500.0).abs() < 1e-6);
            for p in &parts {
                assert!(p.ws, "every child speaks the run's transport");
                assert!(p.clients.abs_diff(clients / procs) <= 1);
                assert!(p.senders.abs_diff(senders / procs) <= 1);
                let fair = (100 * p.clients).div_ceil(clients);
                assert_eq!(p.login_window, fair, "its share of the login window");
                assert!(p.login_window >= 1);
            }
            let prefixes: std::collections::HashSet<_> =
                parts.iter().map(|p| p.name_prefix.clone()).collect();
            assert_eq!(prefixes.len(), procs);
            let ips_given: Vec<IpAddr> = parts.iter().flat_map(|p| p.source_ips.clone()).collect();
            assert_eq!(
                ips_given, whole.source_ips,
                "disjoint, in order, all of them"
            );
        }
        assert_eq!(child_plan(&plan(10, 4, 0,), 3, 2).name_prefix, "xp2");
    }

    /// With fewer source addresses than processes, they share them
    /// round-robin; with none, the kernel chooses for each.
    #[test]
    fn fewer_addresses_than_processes_are_shared() {
        let whole = plan(100, 0, 2);
        let firsts: Vec<IpAddr> = (0..5)
            .map(|k| {
                let ips = child_plan(&whole, 5, k).source_ips;
                assert_eq!(ips.len(), 1);
                ips[0]
            })
            .collect();
        let [a, b] = whole.source_ips[..] else {
            unreachable!()
        };
        assert_eq!(firsts, [a, b, a, b, a]);
        assert!(child_plan(&plan(100, 0, 0), 5, 3).source_ips.is_empty());
    }

    /// A histogram crosses the pipe unchanged: every count, so every
    /// percentile, the maximum and the total.
    #[test]
    fn histograms_cross_exactly() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for v in [1, 2, 999, 1001, 123_456, 599_999_999] {
            h.record_n(v, v % 7 + 1).unwrap();
        }
        let back = decode(&encode(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.len(), h.len());
        assert_eq!(back.max(), h.max());
        assert_eq!(back.min(), h.min());
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q));
        }
        let mut two = back.clone();
        two.add(&h).unwrap();
        assert_eq!(two.len(), 2 * h.len());
        assert!(decode("0g").is_err());
        assert!(decode("abc").is_err());
    }

    /// A child's result lines give the parent back its totals.
    #[test]
    fn result_lines_give_back_the_totals() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        h.record(42).unwrap();
        let totals = Totals {
            counts: Counts {
                connect_failed: 1,
                logged_in: 2,
                lines_sent: 3,
                deliveries: 4,
                unexpected: 5,
                closed_by_server: 6,
                error_lines: vec![("name-taken".into(), 7)],
                socket_errors: vec![("connect: connection refused".into(), 8)],
            },
            latency: h.clone(),
            send_lag: h.clone(),
        };
        let mut seen = Seen::default();
        let logins = format!("logins 12.5 0.25 2 1 {}", encode(&h).unwrap());
        seen.take(&logins).unwrap();
        assert!(seen.take("done").is_err(), "not before the totals");
        for line in result_lines(&totals).unwrap() {
            seen.take(&line).unwrap();
        }
        seen.take("done").unwrap();
        assert!(seen.done);
        assert_eq!(format!("{:?}", seen.counts), format!("{:?}", totals.counts));
        assert_eq!(seen.latency.as_ref().unwrap(), &h);
        let (start, logins) = seen.logins.as_ref().unwrap();
        assert_eq!((*start, logins.secs, logins.logged_in), (12.5, 0.25, 2));
        seen.take("p 1 2 3 4 5").unwrap();
        assert_eq!(seen.told.expected, 5);
        assert!(seen.take("p 1 2 3").is_err());
        assert!(seen.take("bogus").is_err());
    }
}
