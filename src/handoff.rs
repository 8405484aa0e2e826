//! The handoff of a live upgrade: what one process hands the next when
//! it passes every established connection, with its state, to a new chatd
//! binary (SIGUSR2, `systemctl reload`).
//!
//! The running chatd (the old process) stops serving, writes its [`State`]
//! (the listeners, every connection's descriptor number, name, phase,
//! unterminated input, queued output and deadlines, the counters, the
//! cluster node id) to a memfd, clears close-on-exec on the descriptors it
//! hands over, and starts the binary now at its path with the same
//! arguments and two variables: `CHATD_UPGRADE_STATE` (the memfd) and
//! `CHATD_UPGRADE_READY` (the write end of a pipe). The new process checks
//! the state's version (an incompatible state is refused, not guessed),
//! registers everything with its own poller, writes `ready` to the pipe and
//! serves. The old process then exits without closing or shutting down any
//! socket: the new one holds them. If the new process fails (cannot start,
//! refuses the state, exits, or is not ready in time), the old one reads
//! EOF or times out, and goes on serving as if nothing happened.
//!
//! This module is the format, the descriptor plumbing and which binary
//! comes next ([`Successor`]); the reactor's side of both processes is
//! `server/upgrade.rs`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command};

use crate::cluster::ClusterStats;
use crate::conn::Phase;
use crate::stats::Stats;

/// The first line of every state, with its version: a new binary that
/// does not know the version refuses the state.
const MAGIC: &[u8] = b"chatd-state 4\n";
/// The version before shards (one lease): still read.
const MAGIC_3: &[u8] = b"chatd-state 3\n";
/// The version before WebSocket (no WebSocket listener or frame state):
/// still read, so that a server of that version can hand over to this one.
const MAGIC_2: &[u8] = b"chatd-state 2\n";
/// The variable naming the state's descriptor.
pub const STATE_VAR: &str = "CHATD_UPGRADE_STATE";
/// The variable naming the readiness pipe's descriptor.
pub const READY_VAR: &str = "CHATD_UPGRADE_READY";

/// A connection's flags, as a live upgrade hands them over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnFlags {
    /// Its sending side is shut down (a lingering close).
    pub write_shut: bool,
    /// EOF was read.
    pub input_done: bool,
    /// It was turned away with `server-full`.
    pub rejected: bool,
    /// It came through the WebSocket listener.
    pub websocket: bool,
    /// Its WebSocket handshake is done: it speaks frames.
    pub ws_open: bool,
    /// Its WebSocket Close came and waits to be answered.
    pub ws_close_received: bool,
}

impl ConnFlags {
    fn bits(&self) -> u8 {
        [
            self.write_shut,
            self.input_done,
            self.rejected,
            self.websocket,
            self.ws_open,
            self.ws_close_received,
        ]
        .iter()
        .enumerate()
        .fold(0, |bits, (i, &set)| bits | u8::from(set) << i)
    }

    fn of(bits: u8) -> ConnFlags {
        let has = |i: u8| bits & (1 << i) != 0;
        ConnFlags {
            write_shut: has(0),
            input_done: has(1),
            rejected: has(2),
            websocket: has(3),
            ws_open: has(4),
            ws_close_received: has(5),
        }
    }
}

/// One connection as the old process hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnState {
    /// Its descriptor number (inherited as is).
    pub fd: RawFd,
    /// `Conn::id`.
    pub id: u32,
    /// Its phase: never `Phase::Claiming` (such a connection is handed
    /// over logging in, its name line in front of its input).
    pub phase: Phase,
    /// Its name (empty before login).
    pub name: String,
    /// Time since its last input, in ms.
    pub silent_ms: u32,
    /// Time left of its login or close deadline, in ms, if it has one.
    pub deadline_ms: Option<u64>,
    /// Its flags.
    pub flags: ConnFlags,
    /// Bytes discarded while lingering (see `Conn::discarded`).
    pub discarded: u32,
    /// Its unterminated input (or, claiming in a cluster, all it sent
    /// after its name: then the name line is put back in front). For a
    /// WebSocket connection, the decoded text, then `ws.raw` bytes of an
    /// incomplete frame.
    pub input: Vec<u8>,
    /// A WebSocket connection: where it is in the client's frames.
    pub ws: crate::ws::InState,
    /// Output queued and not yet written.
    pub output: Vec<u8>,
    /// A WebSocket connection: how many bytes at the front of `output`
    /// finish a frame (or the handshake's answer) begun before.
    pub output_opaque: u32,
}

/// Everything the old process hands over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// The chat listener's descriptor.
    pub listener: RawFd,
    /// The metrics listener's descriptor, if any.
    pub metrics: Option<RawFd>,
    /// The WebSocket listener's descriptor, if any.
    pub websocket: Option<RawFd>,
    /// The counters, by name (see [`counters_of`]).
    pub counters: Vec<(String, u64)>,
    /// The id the next connection gets.
    pub next_id: u32,
    /// Descriptors the old process held that were not clients: the new one
    /// holds as many, and need not list `/proc/self/fd` (milliseconds at
    /// ten thousand connections) while nothing is served.
    pub base_fds: u64,
    /// The cluster node id, in cluster mode (the new process keeps the
    /// lease and the names).
    pub node: Option<String>,
    /// Cluster mode: the time left of the lease on each shard, in ms (the
    /// new process fences on time even if it cannot reach Redis).
    pub leases_left_ms: Vec<Option<u64>>,
    /// Cluster mode: names whose state in Redis is uncertain, settled by
    /// the new process once its link is ready; and whether they overflowed.
    pub uncertain: Vec<String>,
    /// See `uncertain`.
    pub uncertain_overflow: bool,
    /// Cluster mode: the old process's link was ready and everything it
    /// asked of Redis was answered; the new one then holds the clients'
    /// input a moment for its own link (see `server/handover.rs`).
    pub link_quiet: bool,
    /// Every connection.
    pub conns: Vec<ConnState>,
}

impl State {
    /// The state as bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        put_i64(&mut out, i64::from(self.listener));
        put_i64(&mut out, self.metrics.map_or(-1, i64::from));
        put_i64(&mut out, self.websocket.map_or(-1, i64::from));
        put_u64(&mut out, self.counters.len() as u64);
        for (name, value) in &self.counters {
            put_bytes(&mut out, name.as_bytes());
            put_u64(&mut out, *value);
        }
        put_u64(&mut out, u64::from(self.next_id));
        put_u64(&mut out, self.base_fds);
        put_bytes(&mut out, self.node.as_deref().unwrap_or("").as_bytes());
        put_u64(&mut out, self.leases_left_ms.len() as u64);
        for left in &self.leases_left_ms {
            put_i64(&mut out, left.map_or(-1, |ms| ms as i64));
        }
        put_u64(&mut out, self.uncertain.len() as u64);
        for name in &self.uncertain {
            put_bytes(&mut out, name.as_bytes());
        }
        out.push(u8::from(self.uncertain_overflow) | u8::from(self.link_quiet) << 1);
        put_u64(&mut out, self.conns.len() as u64);
        for c in &self.conns {
            put_i64(&mut out, i64::from(c.fd));
            put_u64(&mut out, u64::from(c.id));
            out.push(phase_code(c.phase));
            put_bytes(&mut out, c.name.as_bytes());
            put_u64(&mut out, u64::from(c.silent_ms));
            put_i64(&mut out, c.deadline_ms.map_or(-1, |ms| ms as i64));
            out.push(c.flags.bits());
            put_u64(&mut out, u64::from(c.discarded));
            put_bytes(&mut out, &c.input);
            let ws = &c.ws;
            put_u64(&mut out, u64::from(ws.raw));
            put_u64(&mut out, u64::from(ws.msg_len));
            out.push(ws.message);
            out.extend_from_slice(&ws.utf8.to_bytes());
            put_bytes(&mut out, &c.output);
            put_u64(&mut out, u64::from(c.output_opaque));
        }
        out
    }

    /// Reads a state; an unknown version or malformed bytes are refused.
    pub fn decode(bytes: &[u8]) -> Result<State, String> {
        let (rest, version) = [(MAGIC, 4), (MAGIC_3, 3), (MAGIC_2, 2)]
            .into_iter()
            .find_map(|(magic, version)| Some((bytes.strip_prefix(magic)?, version)))
            .map_or((None, 0), |(rest, version)| (Some(rest), version));
        let v3 = version >= 3;
        let rest = rest.ok_or_else(|| {
            let first = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
            format!(
                "unknown state format {:?} (this binary reads {:?})",
                String::from_utf8_lossy(first),
                String::from_utf8_lossy(&MAGIC[..MAGIC.len() - 1])
            )
        })?;
        let mut r = Reader(rest);
        let listener = r.fd()?.ok_or("no listener")?;
        let metrics = r.fd()?;
        let websocket = if v3 { r.fd()? } else { None };
        let mut counters = Vec::new();
        for _ in 0..r.count()? {
            let name = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "bad counter name")?;
            counters.push((name, r.u64()?));
        }
        let next_id = r.u32()?;
        let base_fds = r.u64()?;
        let node = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "bad node id")?;
        let node = (!node.is_empty()).then_some(node);
        let leases = if version >= 4 { r.count()? } else { 1 };
        let mut leases_left_ms = Vec::new();
        for _ in 0..leases {
            leases_left_ms.push(u64::try_from(r.i64()?).ok());
        }
        let mut uncertain = Vec::new();
        for _ in 0..r.count()? {
            uncertain.push(String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "bad name")?);
        }
        let cluster_flags = r.byte()?;
        let (uncertain_overflow, link_quiet) = (cluster_flags & 1 != 0, cluster_flags & 2 != 0);
        let mut conns = Vec::new();
        for _ in 0..r.count()? {
            let fd = r.fd()?.ok_or("no descriptor")?;
            let id = r.u32()?;
            let phase = phase_of(r.byte()?)?;
            let name = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "bad name")?;
            let silent_ms = r.u32()?;
            let deadline = r.i64()?;
            let flags = ConnFlags::of(r.byte()? & if v3 { 0xFF } else { 0b111 });
            let discarded = r.u32()?;
            let input = r.bytes()?.to_vec();
            let ws = if v3 {
                let (raw, msg_len, message) = (r.u32()?, r.u32()?, r.byte()?);
                let utf8 = crate::ws::Utf8::of_bytes(r.take(3)?).ok_or("bad UTF-8 state")?;
                crate::ws::InState {
                    raw,
                    msg_len,
                    message,
                    utf8,
                }
            } else {
                crate::ws::InState::default()
            };
            if ws.raw as usize > input.len() {
                return Err("bad WebSocket input state".into());
            }
            let output = r.bytes()?.to_vec();
            let output_opaque = if v3 { r.u32()? } else { 0 };
            if output_opaque as usize > output.len() {
                return Err("bad WebSocket output state".into());
            }
            conns.push(ConnState {
                fd,
                id,
                phase,
                name,
                silent_ms,
                deadline_ms: u64::try_from(deadline).ok(),
                flags,
                discarded,
                input,
                ws,
                output,
                output_opaque,
            });
        }
        if !r.0.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(State {
            listener,
            metrics,
            websocket,
            counters,
            next_id,
            base_fds,
            node,
            leases_left_ms,
            uncertain,
            uncertain_overflow,
            link_quiet,
            conns,
        })
        .and_then(State::check_descriptors)
    }

    /// Refuses a state that names one descriptor twice: each is taken
    /// (owned) once, and a second owner would close it under the first.
    fn check_descriptors(self) -> Result<State, String> {
        let mut seen = std::collections::HashSet::new();
        let fds = [Some(self.listener), self.metrics, self.websocket]
            .into_iter()
            .flatten()
            .chain(self.conns.iter().map(|c| c.fd));
        for fd in fds {
            if !seen.insert(fd) {
                return Err(format!("descriptor {fd} is named twice"));
            }
        }
        Ok(self)
    }
}

fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_i64(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u64(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A cursor over the state's bytes.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("truncated state".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap_or_default()))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(self.u64()? as i64)
    }

    fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.u64()?).map_err(|_| "number out of range".into())
    }

    fn count(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        // A count can never exceed the bytes left (each item takes some).
        if n > self.0.len() as u64 {
            return Err("count past the end".into());
        }
        Ok(n as usize)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn fd(&mut self) -> Result<Option<RawFd>, String> {
        match self.i64()? {
            -1 => Ok(None),
            n => RawFd::try_from(n)
                .map(Some)
                .map_err(|_| "bad descriptor".into()),
        }
    }

    fn bytes(&mut self) -> Result<&[u8], String> {
        let n = self.count()?;
        self.take(n)
    }
}

/// What a process needs to start its successor: the path this process was
/// started by (the file at that path when the upgrade begins is what runs
/// next, through any symlink as it points then) and the arguments.
#[derive(Debug, Clone)]
pub struct Successor {
    /// The binary's path.
    pub exe: PathBuf,
    /// The arguments, without the program name.
    pub args: Vec<OsString>,
}

impl Successor {
    /// This process's own binary and arguments. The binary is the path it
    /// was started by (`argv[0]`, made absolute against the working
    /// directory, or found in `PATH` when it has no `/`), not
    /// `/proc/self/exe`: started as `/opt/chatd/current/chatd`, a symlink,
    /// the upgrade runs what the link points to when it begins, not the
    /// file this process was loaded from. When `argv[0]` does not name this
    /// binary (a wrapper can set it to anything), it is `current_exe`.
    pub fn this_process() -> io::Result<Successor> {
        let mut args = std::env::args_os();
        let exe = match args.next().and_then(|argv0| started_as(&argv0)) {
            Some(exe) => exe,
            None => std::env::current_exe()?,
        };
        Ok(Successor {
            exe,
            args: args.collect(),
        })
    }
}

/// The absolute path `argv0` started this process by, if it names this
/// process's binary now (the same file as `/proc/self/exe`).
fn started_as(argv0: &OsStr) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let cwd = std::env::current_dir().ok()?;
    let path = if argv0.as_bytes().contains(&b'/') {
        cwd.join(argv0)
    } else {
        // As execvp searched: the first executable file of that name.
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| cwd.join(dir).join(argv0))
            .find(|path| {
                std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
            })?
    };
    let (found, this) = (
        std::fs::metadata(&path).ok()?,
        std::fs::metadata("/proc/self/exe").ok()?,
    );
    (found.dev() == this.dev() && found.ino() == this.ino()).then_some(path)
}

/// An upgrade under way, from the old process's side.
#[derive(Debug)]
pub struct Handoff {
    /// The new process.
    pub child: Child,
    /// The read end of the readiness pipe (non-blocking).
    pub ready: File,
}

/// Starts `successor` with `state` and the descriptors `fds` inherited.
pub fn hand_over(
    successor: &Successor,
    state: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<Handoff> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let memfd = memfd_create(c"chatd-state", MFdFlags::MFD_CLOEXEC)?;
    let mut file = File::from(memfd);
    file.write_all(state)?;
    file.rewind()?;
    let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let passed: Vec<BorrowedFd<'_>> = fds
        .iter()
        .copied()
        .chain([file.as_fd(), ready_write.as_fd()])
        .collect();
    set_inherited(&passed, true)?;
    let mut command = Command::new(&successor.exe);
    command
        .args(&successor.args)
        .env(STATE_VAR, file.as_raw_fd().to_string())
        .env(READY_VAR, ready_write.as_raw_fd().to_string());
    // A binary written a moment ago can be busy (ETXTBSY) while a process
    // that forked meanwhile still holds its write end: try a few times.
    let mut spawned = command.spawn();
    for _ in 0..5 {
        match &spawned {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(2));
                spawned = command.spawn();
            }
            _ => break,
        }
    }
    let Ok(child) = spawned else {
        set_inherited(&passed, false)?;
        return Err(spawned.unwrap_err());
    };
    // On success the old process keeps its descriptors inheritable: it
    // exits soon, and setting close-on-exec again would cost a system call
    // per connection while nothing is served. If the upgrade fails, the
    // caller sets it again (`keep_private`).
    drop(ready_write); // the child's copy is the only writer now
    let ready = File::from(ready_read);
    nix::fcntl::fcntl(
        ready.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok(Handoff { child, ready })
}

/// Sets close-on-exec again on descriptors handed to a new process that
/// failed, so that no later child inherits them.
pub fn keep_private(fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    set_inherited(fds, false)
}

/// Clears (or sets again) close-on-exec on `fds`.
fn set_inherited(fds: &[BorrowedFd<'_>], inherited: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = if inherited {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    for &fd in fds {
        fcntl(fd, FcntlArg::F_SETFD(flags))?;
    }
    Ok(())
}

/// What a new process inherited from the old one.
#[derive(Debug)]
pub struct Inherited {
    /// The state.
    pub state: State,
    /// Where to say `ready`.
    ready: File,
}

impl Inherited {
    /// The state and pipe this process inherited, if it was started by an
    /// upgrade (`Some(Err)`: it was, but the state cannot be used; the old
    /// process goes on serving when this one exits).
    /// Only the first call can find it: the descriptors it names are owned
    /// once. (The variables stay in the environment, unchanged; a later
    /// upgrade sets its own for the process it starts.)
    pub fn take() -> Option<Result<Inherited, String>> {
        use std::sync::atomic::{AtomicBool, Ordering};
        static TAKEN: AtomicBool = AtomicBool::new(false);
        let state_fd = std::env::var(STATE_VAR).ok()?;
        let ready_fd = std::env::var(READY_VAR).ok();
        if TAKEN.swap(true, Ordering::SeqCst) {
            return None;
        }
        Some((|| {
            let parse = |v: &str| {
                v.parse::<RawFd>()
                    .map_err(|_| format!("bad descriptor {v:?}"))
            };
            let mut state_file = File::from(take_fd(parse(&state_fd)?));
            let ready = File::from(take_fd(parse(ready_fd.as_deref().unwrap_or(""))?));
            let mut bytes = Vec::new();
            state_file
                .read_to_end(&mut bytes)
                .map_err(|e| format!("cannot read the state: {e}"))?;
            let state = State::decode(&bytes)?;
            Ok(Inherited { state, ready })
        })())
    }

    /// Tells the old process this one serves now.
    pub fn signal_ready(mut self) -> io::Result<()> {
        self.ready.write_all(b"ready\n")
    }

    /// The chat listener and the metrics listener (if one was served), as
    /// the old process handed them over. Their descriptors are owned from
    /// now on: a second call finds none.
    pub fn take_listeners(&mut self) -> Result<Listeners, String> {
        let listener = std::mem::replace(&mut self.state.listener, -1);
        if listener < 0 {
            return Err("the listeners were taken already".into());
        }
        let metrics = self.state.metrics.take();
        let websocket = self.state.websocket.take();
        let take = |fd| std::net::TcpListener::from(take_fd(fd));
        Ok((take(listener), metrics.map(take), websocket.map(take)))
    }
}

/// The chat listener, and the metrics and WebSocket listeners if any.
pub type Listeners = (
    std::net::TcpListener,
    Option<std::net::TcpListener>,
    Option<std::net::TcpListener>,
);

/// Takes ownership of a descriptor inherited from the old process. Only
/// for a descriptor of a decoded [`State`] (which names each once), taken
/// once: crate-private for that reason.
pub(crate) fn take_fd(fd: RawFd) -> OwnedFd {
    #[allow(unsafe_code)]
    // SAFETY: `fd` was listed in the state by the old process, which
    // cleared close-on-exec on it for this process to inherit; nothing in
    // this process opened or owns it, and each number is taken once.
    unsafe {
        OwnedFd::from_raw_fd(fd)
    }
}

/// A phase as the state writes it (see [`phase_of`]).
fn phase_code(phase: Phase) -> u8 {
    match phase {
        Phase::Login | Phase::Claiming => 0, // see ConnState::phase
        Phase::Chat => 1,
        Phase::Draining => 2,
        Phase::Closing => 3,
    }
}

/// The phase a state's byte stands for (see [`phase_code`]).
fn phase_of(code: u8) -> Result<Phase, String> {
    Ok(match code {
        0 => Phase::Login,
        1 => Phase::Chat,
        2 => Phase::Draining,
        3 => Phase::Closing,
        _ => return Err(format!("bad phase {code}")),
    })
}

/// The counters of [`Stats`] by name, what the state carries: a new
/// binary takes the counters it knows by their names, whatever their order
/// or number in the old one.
pub(crate) fn counters_of(stats: &Stats, cluster: Option<&ClusterStats>) -> Vec<(String, u64)> {
    let mut all = stats.each();
    if let Some(cluster) = cluster {
        let totals = cluster.each().into_iter();
        all.extend(totals.map(|(name, value)| (format!("cluster.{name}"), value)));
    }
    all
}

/// The cluster's totals from `counters` (see [`counters_of`]).
pub(crate) fn cluster_stats_of(counters: &[(String, u64)], stats: &mut ClusterStats) {
    for (name, value) in counters {
        if let Some(name) = name.strip_prefix("cluster.") {
            stats.set(name, *value);
        }
    }
}

/// See [`counters_of`]; a counter this binary does not know is dropped.
pub(crate) fn stats_of(counters: &[(String, u64)]) -> Stats {
    let mut stats = Stats::default();
    for (name, value) in counters {
        stats.set(name, *value);
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            listener: 3,
            metrics: Some(4),
            websocket: Some(11),
            counters: vec![
                ("connections".into(), 1),
                ("errors.not-online".into(), u64::MAX),
            ],
            next_id: 77,
            base_fds: 8,
            node: Some("abcdef0123456789".into()),
            leases_left_ms: vec![Some(7000)],
            uncertain: vec!["gone".into(), "maybe".into()],
            uncertain_overflow: true,
            link_quiet: true,
            conns: vec![
                ConnState {
                    fd: 9,
                    id: 5,
                    phase: Phase::Chat,
                    name: "alice".into(),
                    silent_ms: 1234,
                    deadline_ms: None,
                    flags: ConnFlags::default(),
                    discarded: 0,
                    input: b"bob: hal".to_vec(),
                    ws: crate::ws::InState::default(),
                    output: b"from carol: hi\n".to_vec(),
                    output_opaque: 0,
                },
                ConnState {
                    fd: 10,
                    id: 6,
                    phase: Phase::Closing,
                    name: String::new(),
                    silent_ms: 0,
                    deadline_ms: Some(800),
                    flags: ConnFlags {
                        write_shut: true,
                        input_done: true,
                        rejected: true,
                        websocket: true,
                        ws_open: true,
                        ws_close_received: true,
                    },
                    discarded: 12,
                    input: b"bob: h\x81\x85".to_vec(),
                    ws: crate::ws::InState {
                        raw: 2,
                        msg_len: 9,
                        message: 1,
                        utf8: crate::ws::Utf8::of_bytes(&[1, 0x80, 0xBF]).unwrap(),
                    },
                    output: b"\x81\x12error: server-full".to_vec(),
                    output_opaque: 3,
                },
            ],
        }
    }

    /// Counters go by name: a state from a binary with other counters, or
    /// in another order, restores those this one knows, each to itself.
    #[test]
    fn counters_go_by_name() {
        let counters = vec![
            ("from-a-later-binary".to_string(), 9),
            ("deliveries".to_string(), 7),
            ("errors.name-taken".to_string(), 3),
        ];
        let stats = stats_of(&counters);
        assert_eq!(stats.deliveries, 7);
        assert_eq!(
            stats.errors[crate::protocol::ErrorKind::NameTaken as usize],
            3
        );
        let cluster = ClusterStats {
            routed_out: 5,
            fences: 2,
            ..ClusterStats::default()
        };
        let carried = counters_of(&stats, Some(&cluster));
        assert_eq!(stats_of(&carried).to_string(), stats.to_string());
        let mut back = ClusterStats::default();
        cluster_stats_of(&carried, &mut back);
        assert_eq!(back.each(), cluster.each(), "the cluster's totals too");
    }

    /// A state with a descriptor named twice is refused: each is owned once.
    #[test]
    fn refuses_a_descriptor_named_twice() {
        let mut state = sample();
        state.conns[1].fd = state.conns[0].fd;
        let refused = State::decode(&state.encode()).unwrap_err();
        assert!(refused.contains("named twice"), "{refused}");
        let mut state = sample();
        state.metrics = Some(state.listener);
        assert!(State::decode(&state.encode()).is_err());
    }

    #[test]
    fn state_round_trips() {
        let state = sample();
        assert_eq!(State::decode(&state.encode()), Ok(state));
        let empty = State::default();
        assert_eq!(State::decode(&empty.encode()), Ok(empty));
    }

    /// A server of the version before WebSocket hands over to this one:
    /// its state (version 2) is read, with no WebSocket in it.
    #[test]
    fn reads_the_state_of_the_version_before() {
        let mut state = sample();
        state.websocket = None;
        state.conns[1].flags.websocket = false;
        state.conns[1].flags.ws_open = false;
        state.conns[1].flags.ws_close_received = false;
        state.conns[1].ws = crate::ws::InState::default();
        state.conns[1].output_opaque = 0;
        // Version 2's layout, as its encoder wrote it.
        let mut v2 = MAGIC_2.to_vec();
        put_i64(&mut v2, i64::from(state.listener));
        put_i64(&mut v2, state.metrics.map_or(-1, i64::from));
        put_u64(&mut v2, state.counters.len() as u64);
        for (name, value) in &state.counters {
            put_bytes(&mut v2, name.as_bytes());
            put_u64(&mut v2, *value);
        }
        put_u64(&mut v2, u64::from(state.next_id));
        put_u64(&mut v2, state.base_fds);
        put_bytes(&mut v2, state.node.as_deref().unwrap_or("").as_bytes());
        put_i64(&mut v2, state.leases_left_ms[0].map_or(-1, |ms| ms as i64));
        put_u64(&mut v2, state.uncertain.len() as u64);
        for name in &state.uncertain {
            put_bytes(&mut v2, name.as_bytes());
        }
        v2.push(u8::from(state.uncertain_overflow) | u8::from(state.link_quiet) << 1);
        put_u64(&mut v2, state.conns.len() as u64);
        for c in &state.conns {
            put_i64(&mut v2, i64::from(c.fd));
            put_u64(&mut v2, u64::from(c.id));
            v2.push(phase_code(c.phase));
            put_bytes(&mut v2, c.name.as_bytes());
            put_u64(&mut v2, u64::from(c.silent_ms));
            put_i64(&mut v2, c.deadline_ms.map_or(-1, |ms| ms as i64));
            v2.push(c.flags.bits());
            put_u64(&mut v2, u64::from(c.discarded));
            put_bytes(&mut v2, &c.input);
            put_bytes(&mut v2, &c.output);
        }
        assert_eq!(State::decode(&v2), Ok(state));
    }

    /// A server of the version before shards hands over to this one: its
    /// state (version 3) has one lease where this one has a count of them.
    #[test]
    fn reads_the_state_of_the_version_before_shards() {
        let state = sample();
        let v4 = state.encode();
        // Where the leases start: after the node id.
        let node = state.node.as_deref().unwrap_or("").as_bytes();
        let at = v4
            .windows(node.len())
            .position(|w| w == node)
            .expect("the node id")
            + node.len();
        assert_eq!(v4[at..at + 8], 1u64.to_le_bytes(), "one lease");
        let mut v3 = MAGIC_3.to_vec();
        v3.extend_from_slice(&v4[MAGIC.len()..at]);
        v3.extend_from_slice(&v4[at + 8..]);
        assert_eq!(State::decode(&v3), Ok(state));
        // And several leases go through this version.
        let mut shards = sample();
        shards.leases_left_ms = vec![Some(1), None, Some(3)];
        assert_eq!(State::decode(&shards.encode()), Ok(shards));
    }

    #[test]
    fn refuses_other_versions_and_damage() {
        let bytes = sample().encode();
        let mut other = bytes.clone();
        other[12] = b'1'; // "chatd-state 1", which carried counters by position
        assert!(
            State::decode(&other)
                .unwrap_err()
                .contains("unknown state format")
        );
        for cut in [0, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(State::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(State::decode(&longer).is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&3i64.to_le_bytes());
        huge.extend_from_slice(&(-1i64).to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes()); // a count past the end
        assert!(State::decode(&huge).is_err());
    }
}
