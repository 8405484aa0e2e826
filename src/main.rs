//! The `chatd` binary: turns flags and `CHATD_*` variables into a
//! [`chatd::Config`], binds the listener and runs the server. Everything
//! process-wide is done here, not in the library: the open-file limit is
//! raised, signals are turned into [`chatd::Control`] requests, and systemd
//! is told the server's state.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use log::LevelFilter;

/// One flag: its name (also its `CHATD_*` variable), value word, default and help.
struct Flag {
    name: &'static str,
    value: &'static str,
    /// The default as `--help` shows it, read from where it is kept:
    /// `chatd::Config::default()` for the server's tunables, the `DEFAULT_`
    /// constants below for the binary's own.
    default: fn() -> String,
    help: &'static str,
}

/// Where chatd listens without `--addr` (the tutorial server's address).
const DEFAULT_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 8080);
/// The listen backlog without `--backlog`.
const DEFAULT_BACKLOG: i32 = 1024;
/// The log level without `--log-level` or `RUST_LOG`.
const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::Info;

/// The server's default tunables (see [`Flag::default`]).
fn defaults() -> chatd::Config {
    chatd::Config::default()
}

/// A duration as `--help` shows it: whole seconds, or with a fraction.
fn secs(d: Duration) -> String {
    d.as_secs_f64().to_string()
}

const FLAGS: &[Flag] = &[
    Flag {
        name: "addr",
        value: "HOST:PORT",
        default: || SocketAddr::from(DEFAULT_ADDR).to_string(),
        help: "address to listen on (port 0 picks a free one; the bound address is logged)",
    },
    Flag {
        name: "max-line",
        value: "BYTES",
        default: || defaults().max_line.to_string(),
        help: "longest line accepted, terminator excluded",
    },
    Flag {
        name: "max-outbound",
        value: "BYTES",
        default: || defaults().max_outbound.to_string(),
        help: "most bytes queued for one client before it is closed as a slow consumer",
    },
    Flag {
        name: "max-buffer-memory",
        value: "BYTES",
        default: || "a quarter of the machine's memory".into(),
        help: "most bytes all clients' queued output and kept input may hold together; past it, \
               the largest holders are closed as slow consumers",
    },
    Flag {
        name: "max-clients",
        value: "N",
        default: || "open-file limit less a reserve".into(),
        help: "most clients at once; more get `error: server-full`",
    },
    Flag {
        name: "login-timeout",
        value: "SECS",
        default: || secs(defaults().login_timeout),
        help: "time allowed to send a name (0 = never times out)",
    },
    Flag {
        name: "idle-timeout",
        value: "SECS",
        default: || secs(defaults().idle_timeout),
        help: "time a logged-in client may stay silent (0 = off)",
    },
    Flag {
        name: "backlog",
        value: "N",
        default: || DEFAULT_BACKLOG.to_string(),
        help: "listen backlog (capped by net.core.somaxconn)",
    },
    Flag {
        name: "shutdown-timeout",
        value: "SECS",
        default: || secs(defaults().shutdown_timeout),
        help: "on SIGINT/SIGTERM, how long to flush queued output before closing",
    },
    Flag {
        name: "stats-interval",
        value: "SECS",
        default: || secs(defaults().stats_interval),
        help: "log the counters every SECS (0 = off; SIGUSR1 logs them at once)",
    },
    Flag {
        name: "log-level",
        value: "LEVEL",
        default: || DEFAULT_LOG_LEVEL.to_string().to_lowercase(),
        help: "off, error, warn, info, debug or trace (else RUST_LOG, if a single level)",
    },
    Flag {
        name: "cluster",
        value: "redis://[[USER]:PASSWORD@]HOST:PORT",
        default: || "off".into(),
        help: "join the cluster of nodes sharing this Redis: one name space across nodes \
               (a password is better passed in CHATD_CLUSTER, which ps does not show)",
    },
    Flag {
        name: "cluster-prefix",
        value: "PREFIX",
        default: || chatd::cluster::DEFAULT_PREFIX.into(),
        help: "prefix of the cluster's keys and channels in Redis",
    },
    Flag {
        name: "cluster-lease",
        value: "SECS",
        default: || secs(chatd::cluster::DEFAULT_LEASE),
        help: "a node that cannot renew its lease in Redis for this long closes its clients; \
               a dead node's names are free after it",
    },
    Flag {
        name: "reuse-port",
        value: "",
        default: || "off".into(),
        help: "set SO_REUSEPORT, so several nodes on one host share one port \
               (CHATD_REUSE_PORT=true)",
    },
    Flag {
        name: "pid-file",
        value: "PATH",
        default: || "off".into(),
        help: "write the process id here once listening, and again after a live upgrade \
               (which changes it); removed at exit",
    },
    Flag {
        name: "metrics-addr",
        value: "HOST:PORT",
        default: || "off".into(),
        help: "serve GET /metrics (Prometheus text format) and GET /healthz here",
    },
    Flag {
        name: "ws-addr",
        value: "HOST:PORT",
        default: || "off".into(),
        help: "also take WebSocket clients here (RFC 6455; GET / serves a web client)",
    },
    Flag {
        name: "ws-echo",
        value: "",
        default: || "off".into(),
        help: "testing aid for conformance suites: WebSocket messages are echoed back, \
               not routed (CHATD_WS_ECHO=true)",
    },
];

fn usage() -> String {
    let mut text = String::from(
        "chatd: a lean chat broker daemon\n\n\
         Usage: chatd [OPTIONS]\n\n\
         Clients send their name as the first line, then `name1, name2: message`.\n\
         Every option can also be set by the variable CHATD_<OPTION> (for example\n\
         CHATD_MAX_CLIENTS=1000); the command line wins.\n\nOptions:\n",
    );
    for flag in FLAGS {
        let left = format!("--{} {}", flag.name, flag.value);
        let default = (flag.default)();
        text += &format!("  {left:<28} {} [default: {default}]\n", flag.help);
    }
    text += "  -h, --help                   print this help\n";
    text += "  -V, --version                print the version\n";
    text
}

/// Why the command line was refused: printed as one line, exit status 2.
struct UsageError(String);

impl<T: std::fmt::Display> From<T> for UsageError {
    fn from(e: T) -> UsageError {
        UsageError(e.to_string())
    }
}

/// What the command line asked for.
enum Command {
    Run(Box<Settings>),
    Help,
    Version,
}

/// Everything the binary needs to start.
struct Settings {
    addr: SocketAddr,
    reuse_port: bool,
    metrics_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    pid_file: Option<PathBuf>,
    backlog: i32,
    log_level: LevelFilter,
    config: chatd::Config,
}

/// A flag's raw value and where it came from (`--flag` or `CHATD_FLAG`), for
/// error messages.
type RawValue = Option<(String, String)>;

/// Fills `values` (one per flag in [`FLAGS`]) from the command line or else
/// the environment. Returns `Some` when the command line asked for help or
/// the version instead.
fn raw_values(values: &mut [RawValue]) -> Result<Option<Command>, UsageError> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Some(Command::Help)),
            Short('V') | Long("version") => return Ok(Some(Command::Version)),
            Long(name) => {
                let Some(i) = FLAGS.iter().position(|f| f.name == name) else {
                    return Err(UsageError(format!(
                        "unknown option '--{name}' (see --help)"
                    )));
                };
                let name = format!("--{name}");
                // A flag without a value word is a switch: present = on.
                let value = if FLAGS[i].value.is_empty() {
                    "true".to_string()
                } else {
                    parser.value()?.into_string().map_err(|_| {
                        UsageError(format!("invalid value for {name}: not valid UTF-8"))
                    })?
                };
                values[i] = Some((name, value));
            }
            _ => return Err(UsageError(format!("{} (see --help)", arg.unexpected()))),
        }
    }
    for (flag, slot) in FLAGS.iter().zip(values.iter_mut()) {
        if slot.is_none() {
            let var = format!("CHATD_{}", flag.name.replace('-', "_").to_uppercase());
            match std::env::var(&var) {
                Ok(value) => *slot = Some((var, value)),
                Err(std::env::VarError::NotPresent) => {}
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(UsageError(format!(
                        "invalid value for {var}: not valid UTF-8"
                    )));
                }
            }
        }
    }
    Ok(None)
}

fn parse_args() -> Result<Command, UsageError> {
    let mut values: Vec<RawValue> = vec![None; FLAGS.len()];
    if let Some(command) = raw_values(&mut values)? {
        return Ok(command);
    }
    let get = |name: &str| {
        let i = FLAGS
            .iter()
            .position(|f| f.name == name)
            .expect("known flag");
        values[i]
            .as_ref()
            .map(|(source, value)| (source.as_str(), value.trim()))
    };
    let mut config = chatd::Config::default();
    if let Some(v) = get("max-line") {
        config.max_line = number(v, 1, 16 << 20)?;
    }
    if let Some(v) = get("max-outbound") {
        config.max_outbound = number(v, 1, 1 << 40)?;
    }
    if let Some(v) = get("max-buffer-memory") {
        config.max_buffer_memory = Some(number(v, 1 << 20, usize::MAX)?);
    }
    let longest = chatd::protocol::longest_delivery(config.max_line);
    if config.max_outbound < longest {
        let (source, value) = get("max-outbound").or(get("max-line")).unwrap_or_default();
        return Err(UsageError(format!(
            "invalid value for {source}: '{value}' (--max-outbound {} cannot hold one delivery \
             line of the longest message --max-line {} allows: {longest} bytes)",
            config.max_outbound, config.max_line
        )));
    }
    if let Some(v) = get("max-clients") {
        config.max_clients = Some(number(v, 1, 1 << 40)?);
    }
    if let Some(v) = get("login-timeout") {
        config.login_timeout = seconds(v)?;
    }
    if let Some(v) = get("idle-timeout") {
        config.idle_timeout = seconds(v)?;
    }
    if let Some(v) = get("shutdown-timeout") {
        config.shutdown_timeout = seconds(v)?;
    }
    if let Some(v) = get("stats-interval") {
        config.stats_interval = seconds(v)?;
    }
    let backlog = match get("backlog") {
        Some(v) => number(v, 1, i32::MAX as usize)? as i32,
        None => DEFAULT_BACKLOG,
    };
    let addr = match get("addr") {
        Some((source, value)) => resolve(source, value)?,
        None => SocketAddr::from(DEFAULT_ADDR),
    };
    let log_level = match get("log-level") {
        Some((source, value)) => value.parse().map_err(|_| {
            UsageError(format!(
                "invalid value for {source}: '{value}' (expected off, error, warn, info, debug or trace)"
            ))
        })?,
        None => std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_LOG_LEVEL),
    };
    let prefix = match get("cluster-prefix") {
        Some((source, value)) => {
            let ok = !value.is_empty()
                && value.len() <= 64
                && value.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            if !ok {
                return Err(UsageError(format!(
                    "invalid value for {source}: '{value}' (1 to 64 printable characters, no ':')"
                )));
            }
            value.to_string()
        }
        None => chatd::cluster::DEFAULT_PREFIX.to_string(),
    };
    let lease = match get("cluster-lease") {
        Some((source, value)) => seconds((source, value)).map_err(|_| {
            UsageError(format!(
                "invalid value for {source}: '{value}' (seconds, at least 1)"
            ))
        })?,
        None => chatd::cluster::DEFAULT_LEASE,
    };
    if let Some((source, value)) = get("cluster") {
        let shards = chatd::cluster::ClusterConfig::parse_urls(value).map_err(|why| {
            let shown = chatd::cluster::ClusterConfig::redacted(value);
            UsageError(format!("invalid value for {source}: '{shown}' ({why})"))
        })?;
        let lease_ms = lease.as_millis() as u64;
        if lease_ms < 1000 {
            return Err(UsageError(format!(
                "invalid value for --cluster-lease: '{}' (at least 1 second)",
                lease.as_secs_f64()
            )));
        }
        config.cluster = Some(chatd::cluster::ClusterConfig {
            shards,
            prefix,
            lease_ms,
        });
    }
    let reuse_port = switch(get("reuse-port"))?;
    config.ws_echo = switch(get("ws-echo"))?;
    let ws_addr = match get("ws-addr") {
        Some((source, value)) => Some(resolve(source, value)?),
        None => None,
    };
    if config.ws_echo && ws_addr.is_none() {
        return Err(UsageError(
            "--ws-echo needs --ws-addr (it echoes WebSocket messages)".into(),
        ));
    }
    let metrics_addr = match get("metrics-addr") {
        Some((source, value)) => Some(resolve(source, value)?),
        None => None,
    };
    let pid_file = match get("pid-file") {
        Some((source, "")) => {
            return Err(UsageError(format!(
                "invalid value for {source}: '' (expected a path)"
            )));
        }
        Some((_, value)) => Some(PathBuf::from(value)),
        None => None,
    };
    Ok(Command::Run(Box::new(Settings {
        addr,
        reuse_port,
        metrics_addr,
        ws_addr,
        pid_file,
        backlog,
        log_level,
        config,
    })))
}

/// An on/off flag: given alone (`--reuse-port`) or as true, false, yes,
/// no, 1 or 0.
fn switch(value: Option<(&str, &str)>) -> Result<bool, UsageError> {
    match value {
        Some((_, "true" | "1" | "yes")) => Ok(true),
        Some((_, "false" | "0" | "no")) | None => Ok(false),
        Some((source, value)) => Err(UsageError(format!(
            "invalid value for {source}: '{value}' (expected true, false, yes, no, 1 or 0)"
        ))),
    }
}

/// A whole number in `min..=max`.
fn number((source, value): (&str, &str), min: usize, max: usize) -> Result<usize, UsageError> {
    match value.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(UsageError(format!(
            "invalid value for {source}: '{value}' (expected a whole number from {min} to {max})"
        ))),
    }
}

/// The longest time a flag takes: connections keep times as wrapping `u32`
/// milliseconds, exact for spans below 2^31 ms (24.8 days).
const MAX_SECONDS: f64 = 2_000_000.0;

/// Seconds, fractions allowed (`0.5`), at most [`MAX_SECONDS`] (23 days).
/// The server counts whole milliseconds, where 0 means off: a value that
/// is not 0 but less than a millisecond is refused, not silently off.
fn seconds((source, value): (&str, &str)) -> Result<Duration, UsageError> {
    match value.parse::<f64>() {
        Ok(s) if (0.0..=MAX_SECONDS).contains(&s) => {
            let time = Duration::from_secs_f64(s);
            if !time.is_zero() && time.as_millis() == 0 {
                return Err(UsageError(format!(
                    "invalid value for {source}: '{value}' (less than a millisecond, which \
                     would mean 0: expected 0 or at least 0.001 seconds)"
                )));
            }
            Ok(time)
        }
        _ => Err(UsageError(format!(
            "invalid value for {source}: '{value}' (expected seconds from 0 to {MAX_SECONDS})"
        ))),
    }
}

fn resolve(source: &str, value: &str) -> Result<SocketAddr, UsageError> {
    let invalid =
        |why: String| UsageError(format!("invalid value for {source}: '{value}' ({why})"));
    value
        .to_socket_addrs()
        .map_err(|e| invalid(e.to_string()))?
        .next()
        .ok_or_else(|| invalid("no address found".into()))
}

/// Installs the process's logger: one line per record on stderr,
/// `LEVEL [target] message`, after an RFC 3339 UTC timestamp
/// (`2025-01-31T12:00:00.123Z`) unless stderr is the systemd journal,
/// which stamps every line itself.
fn install_logger(level: LevelFilter) {
    let logger = simple_logger::SimpleLogger::new().with_level(level);
    let logger = if stderr_is_journal() {
        logger.without_timestamps()
    } else {
        logger.with_utc_timestamps()
    };
    // Cannot fail: this is the only logger the process installs.
    let _ = logger.init();
}

/// Whether stderr is the systemd journal: systemd puts the device and
/// inode of the stream it connects a service's output to in
/// `JOURNAL_STREAM` (`DEV:INODE`); the variable is inherited by children
/// that write elsewhere, so it counts only if it names fd 2.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    // fstat through a duplicate: std's metadata of fd 2, whatever it is.
    let stderr = std::io::stderr().as_fd().try_clone_to_owned();
    stderr
        .and_then(|fd| std::fs::File::from(fd).metadata())
        .is_ok_and(|st| dev.parse() == Ok(st.dev()) && ino.parse() == Ok(st.ino()))
}

/// Binds the chat listener and, when asked for, the metrics listener;
/// `None` (logged) when either cannot listen.
fn bind_listeners(settings: &Settings) -> Option<chatd::handoff::Listeners> {
    let listener = match chatd::bind_with(settings.addr, settings.backlog, settings.reuse_port) {
        Ok(listener) => listener,
        Err(e) => {
            log::error!("cannot listen on {}: {e}", settings.addr);
            return None;
        }
    };
    let metrics = match settings.metrics_addr {
        None => None,
        Some(addr) => match chatd::bind(addr, 128) {
            Ok(listener) => Some(listener),
            Err(e) => {
                log::error!("cannot serve metrics on {addr}: {e}");
                return None;
            }
        },
    };
    let websocket = match settings.ws_addr {
        None => None,
        Some(addr) => match chatd::bind_with(addr, settings.backlog, settings.reuse_port) {
            Ok(listener) => Some(listener),
            Err(e) => {
                log::error!("cannot take WebSocket clients on {addr}: {e}");
                return None;
            }
        },
    };
    Some((listener, metrics, websocket))
}

/// Raises the soft open-file limit to the hard limit, so that
/// `--max-clients` can be as large as the administrator allows.
fn raise_open_file_limit() {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        log::warn!("cannot raise the open-file limit: {e}");
    }
}

/// Turns signals into requests on `control`: SIGINT and SIGTERM stop (a
/// second one at once), SIGUSR1 logs the counters, SIGUSR2 upgrades in
/// place (the binary now at this one's path takes over every connection),
/// SIGHUP is logged and ignored, so a daemon started from a terminal
/// survives its closing.
fn handle_signals(control: &chatd::Control) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
    type Action = fn(&chatd::Control);
    let actions: [(i32, Action); 5] = [
        (SIGINT, chatd::Control::stop),
        (SIGTERM, chatd::Control::stop),
        (SIGUSR1, chatd::Control::log_stats),
        (SIGUSR2, chatd::Control::upgrade),
        (SIGHUP, chatd::Control::hang_up),
    ];
    for (signal, action) in actions {
        let control = control.clone();
        // SAFETY: the handler only calls a `Control` method, which adds to
        // an atomic counter and writes to an eventfd: async-signal-safe, no
        // allocation, no lock.
        #[allow(unsafe_code)]
        unsafe {
            signal_hook::low_level::register(signal, move || action(&control))?;
        }
    }
    Ok(())
}

/// After a live upgrade, the pid file names `pid`, the process serving
/// now; if it cannot be written, it is removed: better no pid file than
/// one naming a process that is gone.
fn write_or_remove_pid_file(path: &Path, pid: u32) {
    if let Err(e) = write_pid_file(path, pid) {
        let _ = std::fs::remove_file(path);
        log::error!(
            "cannot write the pid file {}: {e}; removed it",
            path.display()
        );
    }
}

/// `--pid-file`: writes `pid` and a newline, whole (through a temporary
/// file renamed over it), so a reader never sees half of it.
fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes the pid file at exit if it names this process: one that was
/// never written, or was since written by another process, is not ours.
fn remove_pid_file(path: &Path) {
    let ours =
        std::fs::read_to_string(path).is_ok_and(|pid| pid.trim() == std::process::id().to_string());
    if ours {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("cannot remove the pid file {}: {e}", path.display());
        }
    }
}

/// Tells the outside world the server's state: systemd when it started
/// chatd as `Type=notify` (`NOTIFY_SOCKET` set): READY, a STATUS line
/// every few seconds, STOPPING. In a live upgrade the old process, as it
/// lets go, says the new one is the service's main process now
/// (`MAINPID=`, which needs `NotifyAccess=all` in the unit) and writes the
/// new pid to the `--pid-file`; the new one says it again when ready.
struct Announcer {
    /// Whether systemd listens (`NOTIFY_SOCKET`).
    systemd: bool,
    /// Whether this process took over from another by a live upgrade.
    upgraded: bool,
    /// `--pid-file`, if given.
    pid_file: Option<PathBuf>,
}

impl Announcer {
    fn notify(&self, states: &[sd_notify::NotifyState]) {
        if !self.systemd {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            log::warn!("cannot notify systemd: {e}");
        }
    }
}

impl chatd::Notifier for Announcer {
    fn ready(&mut self, status: &str) {
        let pid = sd_notify::NotifyState::MainPid(std::process::id());
        let mut states = vec![
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ];
        if self.upgraded {
            // The old process switched the pid file to this one as it let
            // go (see `handed_over`).
            states.insert(0, pid);
        }
        self.notify(&states);
    }

    fn handed_over(&mut self, new_pid: u32) {
        if let Some(path) = &self.pid_file {
            write_or_remove_pid_file(path, new_pid);
        }
        self.notify(&[sd_notify::NotifyState::MainPid(new_pid)]);
    }

    fn status_interval_ms(&self) -> Option<u64> {
        self.systemd.then_some(5000)
    }

    fn status(&mut self, line: &str) {
        self.notify(&[sd_notify::NotifyState::Status(line)]);
    }

    fn stopping(&mut self) {
        self.notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("shutting down"),
        ]);
    }
}

fn main() -> ExitCode {
    let settings = match parse_args() {
        Ok(Command::Run(settings)) => settings,
        Ok(Command::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("chatd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(UsageError(message)) => {
            eprintln!("chatd: {message}");
            return ExitCode::from(2);
        }
    };
    install_logger(settings.log_level);
    raise_open_file_limit();
    if settings.reuse_port && settings.config.cluster.is_none() {
        log::warn!(
            "--reuse-port without --cluster: each chatd process on this port has its own name \
             space (a client reaches only the clients of the process the kernel gave it); \
             add --cluster to share one"
        );
    }
    let control = chatd::Control::new();
    if let Err(e) = handle_signals(&control) {
        log::error!("cannot handle signals: {e}");
        return ExitCode::FAILURE;
    }
    // Started by a live upgrade: the listeners and connections come from
    // the old process, which goes on serving if this one gives up here.
    let mut inherited = match chatd::handoff::Inherited::take() {
        None => None,
        Some(Ok(inherited)) => Some(inherited),
        Some(Err(why)) => {
            log::error!("upgrade refused: {why}; the old process serves on");
            return ExitCode::FAILURE;
        }
    };
    let (listener, metrics, websocket) = match &mut inherited {
        Some(inherited) => match inherited.take_listeners() {
            Ok(listeners) => listeners,
            Err(why) => {
                log::error!("upgrade refused: {why}; the old process serves on");
                return ExitCode::FAILURE;
            }
        },
        None => match bind_listeners(&settings) {
            Some(listeners) => listeners,
            None => return ExitCode::FAILURE,
        },
    };
    let upgraded = inherited.is_some();
    // After an upgrade, the notifier writes it once this process serves.
    if let (Some(path), false) = (&settings.pid_file, upgraded) {
        if let Err(e) = write_pid_file(path, std::process::id()) {
            log::error!("cannot write the pid file {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let notifier: Option<Box<dyn chatd::Notifier>> = Some(Box::new(Announcer {
        systemd: std::env::var_os("NOTIFY_SOCKET").is_some(),
        upgraded,
        pid_file: settings.pid_file.clone(),
    }));
    let successor = match chatd::handoff::Successor::this_process() {
        Ok(successor) => Some(successor),
        Err(e) => {
            log::warn!("live upgrades are off: cannot find this binary's path: {e}");
            None
        }
    };
    let extras = chatd::Extras {
        metrics,
        websocket,
        notifier,
        successor,
        inherited,
    };
    let exit = chatd::run_with(listener, settings.config, control, extras);
    // Upgraded, this process leaves the pid file to the new one.
    if let Some(path) = &settings.pid_file {
        if !matches!(exit, Ok(chatd::Exit::Upgraded)) {
            remove_pid_file(path);
        }
    }
    match exit {
        Ok(chatd::Exit::Graceful) => ExitCode::SUCCESS,
        Ok(chatd::Exit::Forced) => ExitCode::from(130),
        Ok(chatd::Exit::Upgraded) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("fatal: {e}");
            ExitCode::FAILURE
        }
    }
}
