//! The load driver: one mio poll loop over every client connection.
//!
//! Client `i` logs in as `<prefix>b<i>` (`b<i>` with the default empty
//! `--name-prefix`; another prefix lets several generators share one name
//! space), and connects to server `i mod n` of the `n` given (the nodes of
//! a cluster, round-robin). Senders are clients `0..senders`; sender `s`
//! addresses the `fanout` clients after it (`s+1 .. s+fanout`, wrapping),
//! which with several servers are on the other nodes, so a recipient can
//! tell from a delivery which (sender, recipient) pair it belongs to. Each
//! message body is `<seq> <ts_ns> <padding>`: `seq` counts the sender's
//! lines, `ts_ns` is when the line was meant to be sent (ns since the run
//! started), so latency includes any queueing in the generator itself and
//! coordinated omission cannot hide it.
//!
//! With `--threads N`, `N` of these run side by side, one per thread: the
//! one of thread `t` owns the clients `i` with `i mod N == t` (its local
//! client `i / N`), so also the senders among them. A recipient's thread
//! checks the order of what it receives (the sequence number is in the
//! body); in closed loop it tells the sender's thread, through that
//! thread's inbox ([`Shared`]), when one of its lines was delivered.
//!
//! With `--ws` ([`Plan::ws`]) the same lines go over WebSocket ([`ws`]):
//! a client's connect is followed by the HTTP upgrade, its login waits
//! for the `101` (so the login latency includes the handshake), each line
//! it sends is one masked text frame and each text message it receives
//! one line, parsed in place from the read buffer like the lines of TCP.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;

use crate::ws;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::os::fd::{AsFd, AsRawFd};

/// Open loop: the next line is sent by polling without sleeping when it is
/// due sooner than this, and by a timer wake-up otherwise.
const SPIN_BELOW: Duration = Duration::from_micros(200);

/// The poll token of the pacing timer; client tokens are their indices.
const PACER: Token = Token(usize::MAX);

/// The poll token of the waker other threads use: a phase change, or
/// deliveries of this thread's senders' lines in its inbox.
const WAKER: Token = Token(usize::MAX - 1);

/// What the threads of one run share: one inbox and one waker per thread.
/// An inbox holds `(sender, seq)` for each delivery another thread saw of
/// a line of one of this thread's senders (closed loop only).
pub struct Shared {
    pub inboxes: Vec<Mutex<Vec<(usize, u64)>>>,
    pub wakers: Vec<Arc<Waker>>,
}

/// What the run is told to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The servers; client `i` connects to `addrs[i % addrs.len()]`.
    pub addrs: Vec<SocketAddr>,
    /// What every client name starts with, before `b<i>`.
    pub name_prefix: String,
    pub clients: usize,
    /// New connections per second; 0 = as fast as possible.
    pub connect_rate: f64,
    /// Logins in flight at most (connect started, login not yet
    /// confirmed), over all threads; 0 = no bound.
    pub login_window: usize,
    pub source_ips: Vec<IpAddr>,
    pub senders: usize,
    pub fanout: usize,
    pub payload: usize,
    /// Closed loop: lines in flight per sender.
    pub window: usize,
    /// Open loop: total lines per second (0 = closed loop).
    pub rate: f64,
    pub duration: Duration,
    /// Longest wait for the last logins, and for the last deliveries.
    pub settle_timeout: Duration,
    /// Speak WebSocket (`--ws`): an upgrade first, then each line a text
    /// frame.
    pub ws: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    Connecting,
    /// WebSocket: the upgrade request is sent, its answer awaited.
    Upgrading,
    LoggingIn,
    Ready,
    Closed,
}

/// One client connection of the generator.
struct Client {
    stream: Option<TcpStream>,
    state: State,
    /// Bytes to send; `out[out_pos..]` is unsent.
    out: Vec<u8>,
    out_pos: usize,
    /// Unterminated input: a line's start, or with WebSocket the
    /// handshake's answer so far, then a frame cut by the end of a read.
    partial: Vec<u8>,
    /// WebSocket: a fragmented message so far, and its opcode while one
    /// is open (0 when none is).
    message: Vec<u8>,
    message_op: u8,
    /// When the connect started, for the login latency.
    started: Instant,
    /// Whether it is on the generator's list of clients to write.
    dirty: bool,
    /// Connecting, or connected as far as epoll tells (writable), but
    /// nothing written or read yet: an error now is the connect's.
    connecting: bool,
}

/// One sending client's bookkeeping.
struct Sender {
    next_seq: u64,
    /// Closed loop: lines not yet delivered to every recipient, oldest
    /// first, with how many deliveries each still waits for.
    in_flight: VecDeque<(u64, u32)>,
}

/// Counts kept while running, reported at the end (summed over threads).
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub connect_failed: u64,
    pub logged_in: u64,
    pub lines_sent: u64,
    pub deliveries: u64,
    /// Deliveries that broke the order of their (sender, recipient) pair, or
    /// repeated one, or did not parse.
    pub unexpected: u64,
    /// `error:` lines received, by their first word.
    pub error_lines: Vec<(String, u64)>,
    /// Connections the server closed (EOF or reset) while the run needed them.
    pub closed_by_server: u64,
    /// Socket errors other than closes, by kind.
    pub socket_errors: Vec<(String, u64)>,
}

impl Counts {
    /// Adds another thread's counts to these.
    pub fn add(&mut self, other: &Counts) {
        self.connect_failed += other.connect_failed;
        self.logged_in += other.logged_in;
        self.lines_sent += other.lines_sent;
        self.deliveries += other.deliveries;
        self.unexpected += other.unexpected;
        self.closed_by_server += other.closed_by_server;
        for (list, more) in [
            (&mut self.error_lines, &other.error_lines),
            (&mut self.socket_errors, &other.socket_errors),
        ] {
            for (key, n) in more {
                match list.iter_mut().find(|(k, _)| k == key) {
                    Some((_, m)) => *m += n,
                    None => list.push((key.clone(), *n)),
                }
            }
        }
    }
}

/// The generator's state.
pub struct Load {
    plan: Plan,
    poll: Poll,
    /// This thread's clients: local client `j` is client `j * threads +
    /// thread`, and its poll token is `j`.
    clients: Vec<Client>,
    /// This thread's senders, local sender `j` being local client `j`.
    senders: Vec<Sender>,
    /// This thread's number and the number of threads (0 and 1 alone).
    thread: usize,
    threads: usize,
    /// Several threads: the inboxes and wakers, and what goes to other
    /// threads' inboxes at the end of this turn.
    link: Option<Arc<Shared>>,
    outbox: Vec<Vec<(usize, u64)>>,
    /// Last sequence number seen per (sender, k-th recipient) whose
    /// recipient is on this thread, at [`Load::slot`]; `u64::MAX` before
    /// the first.
    last_seq: Vec<u64>,
    /// Slots per sender in `last_seq`.
    stride: usize,
    pub counts: Counts,
    /// Login latency (connect start to confirmation), µs.
    pub login_latency: Histogram<u64>,
    /// Delivery latency from intended send time, µs.
    pub latency: Histogram<u64>,
    /// Open loop: how late each line was handed to the socket, µs. When
    /// this tail is close to the latency tail, the generator, not the
    /// server, was behind.
    pub send_lag: Histogram<u64>,
    epoch: Instant,
    /// Connects started so far.
    started: usize,
    /// Clients connecting or logging in (started, not yet logged in or
    /// closed): what `Plan::login_window` bounds.
    logging_in: usize,
    /// Whether new lines are still being generated.
    generating: bool,
    /// Open loop: lines generated so far.
    scheduled: u64,
    traffic_start: Instant,
    /// Wakes the poller when the next open-loop line is due, to the
    /// microsecond (the poller's own timeout has millisecond steps).
    pacer: TimerFd,
    /// Clients with lines queued this turn, written once at its end.
    dirty: Vec<usize>,
    scratch: Vec<u8>,
    padding: Vec<u8>,
    /// What a client name is before its number: the prefix and `b`.
    name_head: Vec<u8>,
    /// `from <name_head>`, what a delivery starts with.
    from_head: Vec<u8>,
    /// WebSocket: a line's text before it is framed, the `Host` of each
    /// server, the seed the clients' keys derive from, and the masks'
    /// generator.
    line: Vec<u8>,
    hosts: Vec<String>,
    key_seed: u64,
    rng: ws::Rng,
}

impl Load {
    /// The generator of a single-threaded run.
    pub fn new(plan: Plan) -> io::Result<Load> {
        Load::new_part(plan, 0, 1)
    }

    /// The part of thread `thread` of `threads` (give it the others' inboxes
    /// with [`Load::link`] when there are several).
    pub fn new_part(plan: Plan, thread: usize, threads: usize) -> io::Result<Load> {
        let local = |n: usize| (n + threads - 1 - thread) / threads;
        let clients = (0..local(plan.clients))
            .map(|_| Client {
                stream: None,
                state: State::NotStarted,
                out: Vec::new(),
                out_pos: 0,
                partial: Vec::new(),
                message: Vec::new(),
                message_op: 0,
                started: Instant::now(),
                dirty: false,
                connecting: false,
            })
            .collect();
        let senders = (0..local(plan.senders))
            .map(|_| Sender {
                next_seq: 0,
                in_flight: VecDeque::new(),
            })
            .collect();
        // A sender's recipients on one thread, in a row of clients that
        // may wrap once: at most one more than an even share.
        let stride = if threads == 1 {
            plan.fanout
        } else {
            plan.fanout.div_ceil(threads) + 1
        };
        let histogram = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        let poll = Poll::new()?;
        let pacer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK)?;
        poll.registry().register(
            &mut SourceFd(&pacer.as_fd().as_raw_fd()),
            PACER,
            Interest::READABLE,
        )?;
        Ok(Load {
            poll,
            pacer,
            clients,
            senders,
            thread,
            threads,
            link: None,
            outbox: vec![Vec::new(); threads],
            last_seq: vec![u64::MAX; plan.senders * stride],
            stride,
            counts: Counts::default(),
            login_latency: histogram(),
            latency: histogram(),
            send_lag: histogram(),
            epoch: Instant::now(),
            started: 0,
            logging_in: 0,
            generating: false,
            scheduled: 0,
            traffic_start: Instant::now(),
            dirty: Vec::new(),
            scratch: vec![0; 1 << 16],
            padding: vec![b'p'; plan.payload],
            name_head: format!("{}b", plan.name_prefix).into_bytes(),
            from_head: format!("from {}b", plan.name_prefix).into_bytes(),
            line: Vec::new(),
            hosts: plan.addrs.iter().map(SocketAddr::to_string).collect(),
            key_seed: ws::Rng::new(!(thread as u64)).next_u64(),
            rng: ws::Rng::new(thread as u64),
            plan,
        })
    }

    /// A waker of this thread's poll loop, for [`Shared::wakers`].
    pub fn waker(&self) -> io::Result<Arc<Waker>> {
        Ok(Arc::new(Waker::new(self.poll.registry(), WAKER)?))
    }

    /// Gives it the inboxes and wakers of all threads, and the run's epoch:
    /// a line's time is stamped by its sender's thread and read by its
    /// recipients', so all count from the same instant.
    pub fn link(&mut self, shared: Arc<Shared>, epoch: Instant) {
        self.link = Some(shared);
        self.epoch = epoch;
    }

    /// The global number of local client `j`.
    fn global(&self, j: usize) -> usize {
        j * self.threads + self.thread
    }

    /// Where in `last_seq` the order of sender `s` to its recipient `i` (a
    /// client of this thread) is kept: the recipients of `s` on this
    /// thread, in the order of `k`, start at `s * stride`. With one thread,
    /// `s * fanout + k`.
    fn slot(&self, s: usize, i: usize) -> usize {
        let (n, t) = (self.plan.clients, self.thread);
        // This thread's clients below `x`.
        let below = |x: usize| (x + self.threads - 1 - t) / self.threads;
        let pos = if i > s {
            below(i) - below(s + 1)
        } else {
            below(n) - below(s + 1) + below(i) // the row wrapped
        };
        s * self.stride + pos
    }

    /// Clients connected and logged in.
    pub fn ready(&self) -> u64 {
        self.counts.logged_in
    }

    /// Clients whose connection is still open.
    pub fn connected(&self) -> usize {
        self.clients.iter().filter(|c| c.stream.is_some()).count()
    }

    /// Whether every client has either logged in or failed.
    pub fn logins_settled(&self) -> bool {
        self.started == self.clients.len()
            && self
                .clients
                .iter()
                .all(|c| matches!(c.state, State::Ready | State::Closed))
    }

    /// Deliveries the lines sent so far should produce.
    pub fn expected(&self) -> u64 {
        self.counts.lines_sent * self.plan.fanout as u64
    }

    /// One turn of the connect phase: starts the connects the rate allows,
    /// then handles events for up to `wait`.
    pub fn connect_step(&mut self, phase_start: Instant, wait: Duration) -> io::Result<()> {
        // With several threads, this one's share of the rate, so all finish
        // together.
        let rate = if self.threads == 1 {
            self.plan.connect_rate
        } else {
            self.plan.connect_rate * self.clients.len() as f64 / self.plan.clients as f64
        };
        let due = if rate > 0.0 {
            let allowed = phase_start.elapsed().as_secs_f64() * rate;
            (allowed as usize + 1).min(self.clients.len())
        } else {
            self.clients.len()
        };
        // Bound the burst per turn so events are served while connecting.
        let mut until = due.min(self.started + 512);
        // With a login window, new connects wait for logins to finish.
        let window = self.plan.login_window.div_ceil(self.threads);
        if window > 0 {
            until = until.min(self.started + window.saturating_sub(self.logging_in));
        }
        while self.started < until {
            let i = self.started;
            self.started += 1;
            if let Err(e) = self.start_connect(i) {
                self.clients[i].state = State::Closed;
                self.counts.connect_failed += 1;
                bump(
                    &mut self.counts.socket_errors,
                    &format!("connect: {}", e.kind()),
                );
            }
        }
        let window_full = window > 0 && self.logging_in >= window;
        let wait = if window_full {
            wait // until a login ends
        } else if self.started < due {
            Duration::ZERO
        } else if self.started < self.clients.len() {
            let next = Duration::from_secs_f64(self.started as f64 / rate);
            wait.min(next.saturating_sub(phase_start.elapsed()))
        } else {
            wait
        };
        self.turn(wait)
    }

    fn start_connect(&mut self, j: usize) -> io::Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        let i = self.global(j);
        let servers = self.plan.addrs.len();
        let addr = self.plan.addrs[i % servers];
        // Non-blocking from the start: one system call, not three (a
        // million of them in a login wave).
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        if !self.plan.source_ips.is_empty() {
            // Counted per server, so each server sees every source address
            // (and the clients of an address are spread over the servers).
            let ip = self.plan.source_ips[(i / servers) % self.plan.source_ips.len()];
            if ip.is_ipv4() {
                bind_address_no_port(&socket)?;
            }
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        self.poll.registry().register(
            &mut stream,
            Token(j),
            // Urgent data too: its mark cuts a read short (see `read`).
            Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY,
        )?;
        let client = &mut self.clients[j];
        client.stream = Some(stream);
        client.state = State::Connecting;
        client.connecting = true;
        client.started = Instant::now();
        self.logging_in += 1;
        client.out = if self.plan.ws {
            // The login waits for the upgrade's answer (RFC 6455 4.1).
            ws::request(&self.hosts[i % servers], &ws::key(self.key_seed, i))
        } else {
            let mut name = self.name_head.clone();
            name.extend_from_slice(itoa(i as u64, &mut [0; 20]));
            [&name[..], b"\n", &name, b": l\n"].concat()
        };
        Ok(())
    }

    /// Starts the traffic phase.
    pub fn start_traffic(&mut self) {
        self.start_traffic_at(Instant::now());
    }

    /// Starts the traffic phase, its open-loop schedule counted from `at`
    /// (with several threads, the same for all).
    pub fn start_traffic_at(&mut self, at: Instant) {
        self.generating = true;
        self.traffic_start = at;
        if self.plan.rate == 0.0 {
            for s in 0..self.senders.len() {
                for _ in 0..self.plan.window {
                    self.send_line(s, self.epoch.elapsed());
                }
            }
            self.flush_dirty();
        }
    }

    /// Stops generating lines; deliveries still count.
    pub fn stop_traffic(&mut self) {
        self.generating = false;
    }

    /// One turn of the traffic phase: generates open-loop lines that are
    /// due, then handles events for up to `wait`.
    pub fn traffic_step(&mut self, wait: Duration) -> io::Result<()> {
        let mut wait = wait;
        if self.generating && self.plan.rate > 0.0 && !self.senders.is_empty() {
            let rate = self.plan.rate;
            let elapsed = self.traffic_start.elapsed().as_secs_f64();
            // Line k is due at k / rate: lines 0 ..= elapsed * rate are due.
            let due = (elapsed * rate) as u64 + 1;
            let base = self.traffic_start.duration_since(self.epoch).as_secs_f64();
            let now = self.epoch.elapsed();
            let senders = self.plan.senders as u64;
            while self.scheduled < due {
                let k = self.scheduled;
                self.scheduled += 1;
                // Line k is sender k mod senders's; with several threads,
                // this thread sends those of its own senders, on the same
                // schedule as the others.
                let s = (k % senders) as usize;
                if s % self.threads != self.thread {
                    continue;
                }
                let intended = Duration::from_secs_f64(base + k as f64 / rate);
                self.send_line(s / self.threads, intended);
                let lag = now.saturating_sub(intended).as_micros() as u64;
                let _ = self.send_lag.record(lag.max(1));
            }
            // The next line of this thread's (within a turn of the senders,
            // as it has one).
            while (self.scheduled % senders) as usize % self.threads != self.thread {
                self.scheduled += 1;
            }
            // Out at once, before this turn's events are handled.
            self.flush_dirty();
            let next = base + (self.scheduled as f64) / rate;
            let until = Duration::from_secs_f64(next).saturating_sub(self.epoch.elapsed());
            if until < SPIN_BELOW {
                // Too close to sleep and wake on time: poll without sleeping
                // (at such rates the generator is busy anyway; its CPU time
                // shows the cost).
                wait = Duration::ZERO;
            } else if until < wait {
                // The poller's own timeout is in whole milliseconds; the
                // timerfd wakes it on time without spinning a core.
                let at = Expiration::OneShot(TimeSpec::from_duration(until));
                self.pacer.set(at, TimerSetTimeFlags::empty())?;
            }
        }
        self.turn(wait)
    }

    /// Queues local sender `j`'s next line, stamped with `intended`.
    fn send_line(&mut self, j: usize, intended: Duration) {
        if self.clients[j].state != State::Ready {
            return;
        }
        let s = self.global(j);
        let sender = &mut self.senders[j];
        let seq = sender.next_seq;
        sender.next_seq += 1;
        if self.plan.rate == 0.0 {
            sender.in_flight.push_back((seq, self.plan.fanout as u32));
        }
        let n = self.plan.clients;
        let client = &mut self.clients[j];
        if client.out_pos == client.out.len() {
            client.out.clear();
            client.out_pos = 0;
        }
        // With WebSocket the text goes to `line` first, then framed (its
        // length leads the frame): one more copy of a short line.
        let out = if self.plan.ws {
            self.line.clear();
            &mut self.line
        } else {
            &mut client.out
        };
        for k in 0..self.plan.fanout {
            if k > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.name_head);
            out.extend_from_slice(itoa(((s + 1 + k) % n) as u64, &mut [0; 20]));
        }
        out.extend_from_slice(b": ");
        out.extend_from_slice(itoa(seq, &mut [0; 20]));
        out.push(b' ');
        out.extend_from_slice(itoa(intended.as_nanos() as u64, &mut [0; 20]));
        out.push(b' ');
        out.extend_from_slice(&self.padding);
        if self.plan.ws {
            ws::push_frame(&mut client.out, ws::TEXT, &self.line, self.rng.mask());
        } else {
            client.out.push(b'\n');
        }
        self.counts.lines_sent += 1;
        if !client.dirty {
            client.dirty = true;
            self.dirty.push(j);
        }
    }

    /// Writes every client that had lines queued since the last call.
    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.clients[i].dirty = false;
            self.flush(i);
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Waits for events for up to `wait` and handles them.
    fn turn(&mut self, wait: Duration) -> io::Result<()> {
        self.flush_dirty(); // lines generated before this turn go out now
        let mut events = Events::with_capacity(1024);
        match self.poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            if event.token() == PACER {
                let _ = self.pacer.wait(); // clears it; non-blocking
                continue;
            }
            if event.token() == WAKER {
                self.take_inbox();
                continue;
            }
            let i = event.token().0;
            if self.clients[i].state == State::Closed {
                continue;
            }
            if event.is_writable() {
                if self.clients[i].state == State::Connecting {
                    // Writable: connected, or failed, which the first write
                    // (or read) reports as the connect's error.
                    self.clients[i].state = if self.plan.ws {
                        State::Upgrading
                    } else {
                        State::LoggingIn
                    };
                }
                self.flush(i);
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                // A FIN or error this event reports raises no new edge,
                // and urgent data cuts a read short with more queued: then
                // read to the end instead of trusting a short read.
                let to_the_end = event.is_read_closed() || event.is_error() || event.is_priority();
                self.read(i, to_the_end);
            }
        }
        self.post_outbox();
        self.flush_dirty();
        Ok(())
    }

    /// Several threads: completes the lines of this thread's senders that
    /// other threads saw delivered.
    fn take_inbox(&mut self) {
        let Some(shared) = self.link.clone() else {
            return;
        };
        let done = std::mem::take(&mut *shared.inboxes[self.thread].lock().unwrap());
        for (s, seq) in done {
            self.complete(s / self.threads, seq);
        }
    }

    /// Several threads: hands what this turn saw of other threads' lines to
    /// their inboxes, and wakes those that were empty (the others have a
    /// wake-up pending).
    fn post_outbox(&mut self) {
        let Some(shared) = &self.link else {
            return;
        };
        for (t, out) in self.outbox.iter_mut().enumerate() {
            if out.is_empty() {
                continue;
            }
            let mut inbox = shared.inboxes[t].lock().unwrap();
            let wake = inbox.is_empty();
            inbox.append(out);
            drop(inbox);
            if wake {
                let _ = shared.wakers[t].wake();
            }
        }
    }

    fn flush(&mut self, i: usize) {
        let client = &mut self.clients[i];
        let Some(stream) = &mut client.stream else {
            return;
        };
        if client.state == State::Connecting {
            return;
        }
        while client.out_pos < client.out.len() {
            match stream.write(&client.out[client.out_pos..]) {
                Ok(n) => {
                    client.out_pos += n;
                    client.connecting = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.socket_error(i, &e);
                    return;
                }
            }
        }
    }

    /// Reads what client `i` has, stopping at a short read (on Linux it
    /// emptied the receive queue, and what arrives later raises a new
    /// edge) unless `to_the_end`: this event's edge was a FIN's or an
    /// error's and no other will come, or urgent data is pending, whose
    /// mark ends a read short with more queued.
    fn read(&mut self, i: usize, to_the_end: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(stream) = &mut self.clients[i].stream {
            match stream.read(&mut scratch) {
                Ok(0) if self.clients[i].state == State::Upgrading => {
                    // Not a WebSocket server, most likely (chatd's TCP port
                    // says `error: invalid-name` to `GET / HTTP/1.1`).
                    let answer = &self.clients[i].partial;
                    let key = ws::key(self.key_seed, self.global(i));
                    let why = match ws::check_response(answer, &key) {
                        _ if answer.is_empty() => "closed before answering".to_string(),
                        Err(why) => why,
                        Ok(()) => "closed mid-answer".to_string(),
                    };
                    self.handshake_failed(i, &why);
                    break;
                }
                Ok(0) => {
                    self.counts.closed_by_server += 1;
                    self.close(i);
                    break;
                }
                Ok(n) => {
                    self.clients[i].connecting = false;
                    self.on_input(i, &scratch[..n]);
                    if n < scratch.len() && !to_the_end {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.socket_error(i, &e);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    fn on_input(&mut self, i: usize, mut data: &[u8]) {
        if self.plan.ws {
            if self.clients[i].state == State::Upgrading {
                self.on_handshake(i, data);
            } else {
                self.on_frames(i, data);
            }
            return;
        }
        let mut partial = std::mem::take(&mut self.clients[i].partial);
        while let Some(end) = memchr::memchr(b'\n', data) {
            if partial.is_empty() {
                self.on_line(i, &data[..end]);
            } else {
                partial.extend_from_slice(&data[..end]);
                self.on_line(i, &partial);
                partial.clear();
            }
            data = &data[end + 1..];
        }
        partial.extend_from_slice(data);
        self.clients[i].partial = partial;
    }

    fn on_line(&mut self, i: usize, line: &[u8]) {
        let now = self.epoch.elapsed();
        if let Some(rest) = line.strip_prefix(b"error: ") {
            let kind = rest.split(|&b| b == b':').next().unwrap_or_default();
            bump(&mut self.counts.error_lines, &String::from_utf8_lossy(kind));
            return;
        }
        let Some(rest) = line.strip_prefix(&self.from_head[..]) else {
            self.counts.unexpected += 1;
            return;
        };
        let Some(colon) = memchr::memchr(b':', rest) else {
            self.counts.unexpected += 1;
            return;
        };
        let Some(from) = parse_u64(&rest[..colon]) else {
            self.counts.unexpected += 1;
            return;
        };
        let body = &rest[colon + 1..];
        let j = i;
        let i = self.global(j);
        if self.clients[j].state == State::LoggingIn && from as usize == i && body == b" l" {
            let client = &mut self.clients[j];
            client.state = State::Ready;
            self.counts.logged_in += 1;
            self.logging_in -= 1;
            let us = client.started.elapsed().as_micros() as u64;
            let _ = self.login_latency.record(us.max(1));
            return;
        }
        let mut fields = body.trim_ascii_start().splitn(3, |&b| b == b' ');
        let (Some(seq), Some(ts)) = (
            fields.next().and_then(parse_u64),
            fields.next().and_then(parse_u64),
        ) else {
            self.counts.unexpected += 1;
            return;
        };
        let s = from as usize;
        let n = self.plan.clients;
        if s >= self.plan.senders || (i + n - s - 1) % n >= self.plan.fanout {
            self.counts.unexpected += 1;
            return;
        }
        let slot = self.slot(s, i);
        let last = &mut self.last_seq[slot];
        if (*last == u64::MAX && seq != 0) || (*last != u64::MAX && seq != *last + 1) {
            self.counts.unexpected += 1; // a gap, repeat or reordering
        }
        *last = seq;
        self.counts.deliveries += 1;
        let latency = now.saturating_sub(Duration::from_nanos(ts));
        let _ = self.latency.record((latency.as_micros() as u64).max(1));
        if self.plan.rate == 0.0 {
            if s % self.threads == self.thread {
                self.complete(s / self.threads, seq);
            } else {
                self.outbox[s % self.threads].push((s, seq));
            }
        }
    }

    /// Closed loop: one delivery of local sender `j`'s line `seq` arrived;
    /// when all of its deliveries have, the sender sends its next line.
    fn complete(&mut self, j: usize, seq: u64) {
        let in_flight = &mut self.senders[j].in_flight;
        if let Some(entry) = in_flight.iter_mut().find(|(q, _)| *q == seq) {
            entry.1 -= 1;
        }
        let mut done = 0;
        while in_flight.front().is_some_and(|&(_, left)| left == 0) {
            in_flight.pop_front();
            done += 1;
        }
        if self.generating {
            for _ in 0..done {
                self.send_line(j, self.epoch.elapsed());
            }
        }
    }

    fn socket_error(&mut self, i: usize, e: &io::Error) {
        if self.clients[i].connecting {
            // Nothing went through yet: the connect itself failed.
            self.counts.connect_failed += 1;
            bump(
                &mut self.counts.socket_errors,
                &format!("connect: {}", e.kind()),
            );
        } else if matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ) {
            self.counts.closed_by_server += 1;
        } else {
            bump(&mut self.counts.socket_errors, &e.kind().to_string());
        }
        self.close(i);
    }

    fn close(&mut self, i: usize) {
        let client = &mut self.clients[i];
        if matches!(
            client.state,
            State::Connecting | State::Upgrading | State::LoggingIn
        ) {
            self.logging_in -= 1;
        }
        if let Some(mut stream) = client.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        client.state = State::Closed;
        client.out = Vec::new();
        client.partial = Vec::new();
        client.message = Vec::new();
    }

    /// WebSocket: more of the answer to local client `i`'s upgrade; once
    /// it is all in and right, the client logs in (and what followed it is
    /// frames).
    fn on_handshake(&mut self, i: usize, data: &[u8]) {
        let client = &mut self.clients[i];
        client.partial.extend_from_slice(data);
        let Some(end) = ws::response_end(&client.partial) else {
            if client.partial.len() > ws::MAX_RESPONSE {
                self.handshake_failed(i, "an answer over 8 KiB");
            }
            return;
        };
        let answer = std::mem::take(&mut client.partial);
        let key = ws::key(self.key_seed, self.global(i));
        if let Err(why) = ws::check_response(&answer[..end], &key) {
            self.handshake_failed(i, &why);
            return;
        }
        self.clients[i].state = State::LoggingIn;
        // The name, then a message to itself confirming the login.
        let mut name = std::mem::take(&mut self.line);
        name.clear();
        name.extend_from_slice(&self.name_head);
        name.extend_from_slice(itoa(self.global(i) as u64, &mut [0; 20]));
        self.queue_frame(i, ws::TEXT, &name);
        name.extend_from_slice(b": l");
        self.queue_frame(i, ws::TEXT, &name);
        self.line = name;
        self.on_frames(i, &answer[end..]);
    }

    fn handshake_failed(&mut self, i: usize, why: &str) {
        self.counts.connect_failed += 1;
        bump(
            &mut self.counts.socket_errors,
            &format!("ws-handshake: {why}"),
        );
        self.close(i);
    }

    /// WebSocket: frames from the server to local client `i`, parsed in
    /// place; only a frame that `data` cuts short is kept, in `partial`.
    fn on_frames(&mut self, i: usize, mut data: &[u8]) {
        let mut partial = std::mem::take(&mut self.clients[i].partial);
        if !partial.is_empty() {
            // Complete the frame cut by the last read, taking no byte of
            // the next.
            loop {
                let need = ws::Header::need(&partial);
                if partial.len() as u64 >= need {
                    break;
                }
                if need > ws::MAX_MESSAGE + 14 || data.is_empty() {
                    self.clients[i].partial = partial;
                    if need > ws::MAX_MESSAGE + 14 {
                        self.ws_fail(i, "a frame over 16 MiB");
                    }
                    return;
                }
                let take = ((need - partial.len() as u64) as usize).min(data.len());
                partial.extend_from_slice(&data[..take]);
                data = &data[take..];
            }
            if !self.on_frame(i, &partial) {
                return;
            }
            partial.clear();
        }
        while !data.is_empty() {
            let need = ws::Header::need(data);
            if need > ws::MAX_MESSAGE + 14 {
                self.ws_fail(i, "a frame over 16 MiB");
                return;
            }
            if (data.len() as u64) < need {
                break;
            }
            let (frame, rest) = data.split_at(need as usize);
            if !self.on_frame(i, frame) {
                return;
            }
            data = rest;
        }
        partial.extend_from_slice(data);
        self.clients[i].partial = partial;
    }

    /// One whole frame from the server; false if it closed the client.
    fn on_frame(&mut self, i: usize, frame: &[u8]) -> bool {
        let h = ws::Header::parse(frame).expect("a whole frame");
        let payload = &frame[h.len..];
        if h.mask.is_some() {
            return self.ws_fail(i, "a masked frame");
        }
        if h.rsv != 0 {
            return self.ws_fail(i, "reserved bits set");
        }
        let client = &mut self.clients[i];
        match h.opcode {
            ws::TEXT | ws::BINARY if client.message_op != 0 => {
                self.ws_fail(i, "a new message inside a fragmented one")
            }
            ws::TEXT if h.fin => {
                self.on_line(i, payload);
                true
            }
            ws::BINARY if h.fin => {
                self.counts.unexpected += 1;
                true
            }
            ws::TEXT | ws::BINARY => {
                client.message_op = h.opcode;
                client.message.clear();
                client.message.extend_from_slice(payload);
                true
            }
            ws::CONTINUATION if client.message_op == 0 => {
                self.ws_fail(i, "a continuation outside a message")
            }
            ws::CONTINUATION => {
                if client.message.len() as u64 + h.payload > ws::MAX_MESSAGE {
                    return self.ws_fail(i, "a message over 16 MiB");
                }
                client.message.extend_from_slice(payload);
                if h.fin {
                    let op = std::mem::take(&mut client.message_op);
                    let message = std::mem::take(&mut client.message);
                    if op == ws::TEXT {
                        self.on_line(i, &message);
                    } else {
                        self.counts.unexpected += 1;
                    }
                    self.clients[i].message = message; // its room, for the next
                }
                true
            }
            ws::CLOSE | ws::PING | ws::PONG if !h.fin || h.payload > 125 => {
                self.ws_fail(i, "a fragmented or long control frame")
            }
            ws::PING => {
                self.queue_frame(i, ws::PONG, payload);
                true
            }
            ws::PONG => true,
            ws::CLOSE => {
                // What a closed TCP connection is; the error line before it
                // says why, except after a protocol error (the generator's
                // own, or a frame it sent that the server refused).
                let code = match payload {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => 1005,
                };
                if matches!(code, 1002 | 1003) {
                    let reason = String::from_utf8_lossy(&payload[2..]);
                    bump(
                        &mut self.counts.socket_errors,
                        &format!("ws-close: {code} {reason}"),
                    );
                }
                self.counts.closed_by_server += 1;
                self.close_with(i, payload.get(..2).unwrap_or_default());
                false
            }
            _ => self.ws_fail(i, "an unknown opcode"),
        }
    }

    /// Queues one frame of `opcode` to local client `i` (written at the end
    /// of the turn).
    fn queue_frame(&mut self, i: usize, opcode: u8, payload: &[u8]) {
        let client = &mut self.clients[i];
        if client.out_pos == client.out.len() {
            client.out.clear();
            client.out_pos = 0;
        }
        ws::push_frame(&mut client.out, opcode, payload, self.rng.mask());
        if !client.dirty {
            client.dirty = true;
            self.dirty.push(i);
        }
    }

    /// The server broke RFC 6455: the client closes with 1002 (protocol
    /// error), counted by `why`. Returns false, for [`Load::on_frame`].
    fn ws_fail(&mut self, i: usize, why: &str) -> bool {
        bump(
            &mut self.counts.socket_errors,
            &format!("ws-protocol: {why}"),
        );
        self.close_with(i, &1002u16.to_be_bytes());
        false
    }

    /// Sends local client `i` a Close frame carrying `code` (what it has
    /// queued first), as far as its socket takes it at once, and closes
    /// it. A failed write is not counted: the close is, by the caller.
    fn close_with(&mut self, i: usize, code: &[u8]) {
        let mask = self.rng.mask();
        let client = &mut self.clients[i];
        ws::push_frame(&mut client.out, ws::CLOSE, code, mask);
        // Connected: frames come after the upgrade.
        if let Some(stream) = &mut client.stream {
            while client.out_pos < client.out.len() {
                match stream.write(&client.out[client.out_pos..]) {
                    Ok(n) => client.out_pos += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        self.close(i);
    }
}

/// Adds one to the counter named `key`.
fn bump(counters: &mut Vec<(String, u64)>, key: &str) {
    match counters.iter_mut().find(|(k, _)| k == key) {
        Some((_, n)) => *n += 1,
        None => counters.push((key.to_string(), 1)),
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Formats `n` in decimal into `buf`, without allocating.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Leaves the choice of the source port to `connect`, which picks one that
/// is unique for the whole 4-tuple. Without it `bind(ip, 0)` needs a port
/// free for every destination, so ports held by TIME_WAIT sockets of earlier
/// runs fail the bind with `EADDRINUSE`.
fn bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor, and a pointer to an int of the given size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (sender, recipient) pair whose recipient is on a thread gets a
    /// slot of its own on that thread, within the sender's stride; with one
    /// thread, `s * fanout + k` as before threads.
    #[test]
    fn order_slots_are_distinct_per_thread() {
        for clients in 2..12 {
            for threads in 1..5 {
                for fanout in 1..clients {
                    let plan = Plan {
                        addrs: vec![SocketAddr::from(([127, 0, 0, 1], 1))],
                        name_prefix: String::new(),
                        clients,
                        connect_rate: 0.0,
                        login_window: 0,
                        source_ips: Vec::new(),
                        senders: clients,
                        fanout,
                        payload: 0,
                        window: 1,
                        rate: 0.0,
                        duration: Duration::ZERO,
                        settle_timeout: Duration::ZERO,
                        ws: false,
                    };
                    for t in 0..threads {
                        let load = Load::new_part(plan.clone(), t, threads).unwrap();
                        let mut seen = std::collections::HashSet::new();
                        for s in 0..clients {
                            for k in 0..fanout {
                                let i = (s + 1 + k) % clients;
                                if i % threads != t {
                                    continue;
                                }
                                let slot = load.slot(s, i);
                                assert!(slot >= s * load.stride && slot < (s + 1) * load.stride);
                                assert!(seen.insert(slot), "{clients} {threads} {fanout} {t}");
                                if threads == 1 {
                                    assert_eq!(slot, s * fanout + k);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
