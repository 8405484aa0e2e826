//! `--threads N`: the load spread over `N` threads, each running its own
//! [`Load`] (its own mio loop) over its share of the clients, steered by
//! the main thread through phases, with their counts published as they go
//! and merged at the end.
//!
//! With one thread there is no pool: the main thread runs the one [`Load`]
//! itself, as it always did ([`Generator::One`]).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::Waker;

use crate::Figures;
use crate::load::{Counts, Load, Plan, Shared};

/// The phases the main thread steps the workers through, in order.
const WAIT: u8 = 0;
const CONNECT: u8 = 1;
const IDLE: u8 = 2;
const TRAFFIC: u8 = 3;
const STOPPED: u8 = 4;
const DONE: u8 = 5;

/// How often the main thread looks at the workers' published counts.
const LOOK_EVERY: Duration = Duration::from_millis(1);

/// What one worker publishes while it runs.
#[derive(Default)]
struct Board {
    /// The last phase it has taken up (its actions for it done).
    seen: AtomicU8,
    logins_settled: AtomicBool,
    logged_in: AtomicU64,
    connect_failed: AtomicU64,
    connected: AtomicU64,
    lines_sent: AtomicU64,
    deliveries: AtomicU64,
    /// Its login latencies, when the connect phase is over.
    login_latency: Mutex<Option<Histogram<u64>>>,
    error: Mutex<Option<io::Error>>,
}

/// The generator the main thread drives: one [`Load`] of its own, or a
/// pool of threads.
pub enum Generator {
    One(Box<Load>),
    Many(Pool),
}

/// The numbers of a finished run, summed over the threads.
pub struct Totals {
    pub counts: Counts,
    pub latency: Histogram<u64>,
    pub send_lag: Histogram<u64>,
}

pub struct Pool {
    phase: Arc<AtomicU8>,
    /// When the traffic phase started, for every thread's schedule.
    traffic_start: Arc<Mutex<Instant>>,
    boards: Vec<Arc<Board>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<Load>>,
    fanout: u64,
}

impl Generator {
    pub fn new(plan: Plan, threads: usize) -> io::Result<Generator> {
        if threads <= 1 {
            return Ok(Generator::One(Box::new(Load::new(plan)?)));
        }
        let mut loads = (0..threads)
            .map(|t| Load::new_part(plan.clone(), t, threads))
            .collect::<io::Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            inboxes: (0..threads).map(|_| Mutex::new(Vec::new())).collect(),
            wakers: loads.iter().map(Load::waker).collect::<io::Result<_>>()?,
        });
        let phase = Arc::new(AtomicU8::new(WAIT));
        let epoch = Instant::now();
        let traffic_start = Arc::new(Mutex::new(epoch));
        let mut boards = Vec::new();
        let mut workers = Vec::new();
        for (t, mut load) in loads.drain(..).enumerate() {
            load.link(shared.clone(), epoch);
            let board = Arc::new(Board::default());
            boards.push(board.clone());
            let phase = phase.clone();
            let start = traffic_start.clone();
            let worker = std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || {
                    if let Err(e) = work(&mut load, &phase, &start, &board) {
                        *board.error.lock().unwrap() = Some(e);
                        board.seen.store(DONE, Ordering::Release);
                    }
                    load
                })?;
            workers.push(worker);
        }
        Ok(Generator::Many(Pool {
            phase,
            traffic_start,
            boards,
            shared,
            workers,
            fanout: plan.fanout as u64,
        }))
    }

    pub fn connect_step(&mut self, phase_start: Instant, wait: Duration) -> io::Result<()> {
        match self {
            Generator::One(load) => load.connect_step(phase_start, wait),
            Generator::Many(pool) => {
                pool.enter(CONNECT)?;
                pool.look(wait)
            }
        }
    }

    /// The connect phase is over: no more connects start.
    pub fn end_connect(&mut self) -> io::Result<()> {
        match self {
            Generator::One(_) => Ok(()),
            Generator::Many(pool) => pool.enter(IDLE),
        }
    }

    pub fn logins_settled(&self) -> bool {
        match self {
            Generator::One(load) => load.logins_settled(),
            Generator::Many(pool) => pool
                .boards
                .iter()
                .all(|b| b.logins_settled.load(Ordering::Acquire)),
        }
    }

    /// A waker of the loop of the main thread when it runs the one [`Load`]
    /// itself, so that another thread can cut its wait short; none for a
    /// pool, whose main thread only ever sleeps [`LOOK_EVERY`].
    pub fn waker(&self) -> io::Result<Option<Arc<Waker>>> {
        match self {
            Generator::One(load) => load.waker().map(Some),
            Generator::Many(_) => Ok(None),
        }
    }

    /// Login latencies so far (with several threads, as of the end of the
    /// connect phase, [`Generator::end_connect`]).
    pub fn login_latency(&self) -> Histogram<u64> {
        match self {
            Generator::One(load) => load.login_latency.clone(),
            Generator::Many(pool) => {
                let mut sum: Option<Histogram<u64>> = None;
                for board in &pool.boards {
                    if let Some(h) = &*board.login_latency.lock().unwrap() {
                        match &mut sum {
                            Some(s) => s.add(h).expect("same bounds"),
                            None => sum = Some(h.clone()),
                        }
                    }
                }
                sum.expect("at least one thread")
            }
        }
    }

    pub fn traffic_step(&mut self, wait: Duration) -> io::Result<()> {
        match self {
            Generator::One(load) => load.traffic_step(wait),
            Generator::Many(pool) => pool.look(wait),
        }
    }

    pub fn start_traffic(&mut self) -> io::Result<()> {
        match self {
            Generator::One(load) => {
                load.start_traffic();
                Ok(())
            }
            Generator::Many(pool) => {
                *pool.traffic_start.lock().unwrap() = Instant::now();
                pool.enter(TRAFFIC)
            }
        }
    }

    /// Stops generating lines; with several threads, returns when every
    /// thread has stopped, so no line is sent after.
    pub fn stop_traffic(&mut self) -> io::Result<()> {
        match self {
            Generator::One(load) => {
                load.stop_traffic();
                Ok(())
            }
            Generator::Many(pool) => pool.enter(STOPPED),
        }
    }

    /// Ends the run and sums what the threads counted.
    pub fn finish(self) -> io::Result<Totals> {
        let loads = match self {
            Generator::One(load) => vec![*load],
            Generator::Many(mut pool) => {
                pool.phase.store(DONE, Ordering::Release);
                pool.wake_all();
                let mut loads = Vec::new();
                for worker in pool.workers.drain(..) {
                    loads.push(worker.join().expect("a bench thread panicked"));
                }
                pool.check()?;
                loads
            }
        };
        let mut loads = loads.into_iter();
        let first = loads.next().expect("at least one thread");
        let mut totals = Totals {
            counts: first.counts,
            latency: first.latency,
            send_lag: first.send_lag,
        };
        for load in loads {
            totals.counts.add(&load.counts);
            totals.latency.add(&load.latency).expect("same bounds");
            totals.send_lag.add(&load.send_lag).expect("same bounds");
        }
        Ok(totals)
    }
}

impl Generator {
    /// A figure of the one [`Load`], or the sum of the workers' boards.
    fn figure(&self, one: fn(&Load) -> u64, many: fn(&Board) -> &AtomicU64) -> u64 {
        match self {
            Generator::One(load) => one(load),
            Generator::Many(pool) => pool.sum(many),
        }
    }
}

impl Figures for Generator {
    fn ready(&self) -> u64 {
        self.figure(Load::ready, |b| &b.logged_in)
    }

    fn connect_failed(&self) -> u64 {
        self.figure(|load| load.counts.connect_failed, |b| &b.connect_failed)
    }

    fn connected(&self) -> usize {
        self.figure(|load| load.connected() as u64, |b| &b.connected) as usize
    }

    fn deliveries(&self) -> u64 {
        self.figure(|load| load.counts.deliveries, |b| &b.deliveries)
    }

    /// With several threads exact once [`Generator::stop_traffic`] returned.
    fn expected(&self) -> u64 {
        match self {
            Generator::One(load) => load.expected(),
            Generator::Many(pool) => pool.sum(|b| &b.lines_sent) * pool.fanout,
        }
    }
}

impl Pool {
    fn sum(&self, field: impl Fn(&Board) -> &AtomicU64) -> u64 {
        self.boards
            .iter()
            .map(|b| field(b).load(Ordering::Acquire))
            .sum()
    }

    fn wake_all(&self) {
        for waker in &self.shared.wakers {
            let _ = waker.wake();
        }
    }

    /// A worker's error, if one failed.
    fn check(&self) -> io::Result<()> {
        for board in &self.boards {
            if let Some(e) = board.error.lock().unwrap().take() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Moves the workers on to `phase` (if not there yet) and waits until
    /// each has taken it up.
    fn enter(&mut self, phase: u8) -> io::Result<()> {
        if self.phase.load(Ordering::Acquire) >= phase {
            return Ok(());
        }
        self.phase.store(phase, Ordering::Release);
        self.wake_all();
        while self
            .boards
            .iter()
            .any(|b| b.seen.load(Ordering::Acquire) < phase)
        {
            self.check()?;
            std::thread::sleep(Duration::from_micros(100));
        }
        self.check()
    }

    /// The main thread's turn while the workers run: a short sleep.
    fn look(&mut self, wait: Duration) -> io::Result<()> {
        std::thread::sleep(wait.min(LOOK_EVERY));
        self.check()
    }
}

/// One worker: runs its [`Load`] through the phases the main thread sets.
fn work(
    load: &mut Load,
    phase: &AtomicU8,
    traffic_start: &Mutex<Instant>,
    board: &Board,
) -> io::Result<()> {
    let mut seen = WAIT;
    let mut connect_start = Instant::now();
    loop {
        let now = phase.load(Ordering::Acquire);
        // Take up each phase passed since the last turn, in order.
        while seen < now {
            seen += 1;
            match seen {
                CONNECT => connect_start = Instant::now(),
                IDLE => {
                    *board.login_latency.lock().unwrap() = Some(load.login_latency.clone());
                }
                TRAFFIC => load.start_traffic_at(*traffic_start.lock().unwrap()),
                STOPPED => load.stop_traffic(),
                _ => {}
            }
            publish(load, board);
            board.seen.store(seen, Ordering::Release);
        }
        match seen {
            DONE => return Ok(()),
            CONNECT if !load.logins_settled() => {
                load.connect_step(connect_start, Duration::from_millis(50))?
            }
            WAIT | CONNECT | IDLE => load.traffic_step(Duration::from_millis(100))?,
            _ => load.traffic_step(Duration::from_millis(10))?,
        }
        publish(load, board);
    }
}

fn publish(load: &Load, board: &Board) {
    let c = &load.counts;
    board.logged_in.store(c.logged_in, Ordering::Release);
    board
        .connect_failed
        .store(c.connect_failed, Ordering::Release);
    board.lines_sent.store(c.lines_sent, Ordering::Release);
    board.deliveries.store(c.deliveries, Ordering::Release);
    if board.seen.load(Ordering::Relaxed) <= IDLE {
        board
            .connected
            .store(load.connected() as u64, Ordering::Release);
        board
            .logins_settled
            .store(load.logins_settled(), Ordering::Release);
    }
}
