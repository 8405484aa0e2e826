//! `chatd-bench` against a real chatd, on small numbers.

// The daemon's test harness, shared: it finds the `chatd` built beside
// these tests.
#[path = "../../../tests/common/mod.rs"]
mod common;

use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Instant;

use common::{Server, chatd_binary, poll_until};

/// The generator under test.
const BENCH: &str = env!("CARGO_BIN_EXE_chatd-bench");

fn bench(server: &Server, args: &[&str]) -> Output {
    bench_command(&[server], args)
        .output()
        .expect("run chatd-bench")
}

/// `chatd-bench --json` against `servers` (`--addr` and `--server-pid`
/// lists in that order), with `args` after.
fn bench_command(servers: &[&Server], args: &[&str]) -> Command {
    let list = |item: fn(&Server) -> String| {
        servers
            .iter()
            .map(|s| item(s))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut cmd = Command::new(BENCH);
    cmd.args(["--addr", &list(|s| s.addr.to_string())])
        .args(["--json", "--settle-timeout", "5"])
        .args(["--server-pid", &list(|s| s.pid().to_string())])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// A number field of the bench's JSON result.
fn field(out: &Output, key: &str) -> f64 {
    let json = String::from_utf8_lossy(&out.stdout);
    let start = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
        + key.len()
        + 3;
    let end = json[start..].find([',', '}']).unwrap() + start;
    json[start..end]
        .parse()
        .unwrap_or_else(|_| panic!("{key} not a number in {json}"))
}

fn text_field<'a>(json: &'a str, key: &str) -> &'a str {
    let start = json.find(&format!("\"{key}\":\"")).expect(key) + key.len() + 4;
    &json[start..start + json[start..].find('"').unwrap()]
}

/// Closed loop: every login confirmed, every line delivered to each of its
/// recipients once, in order, and the counts add up.
#[test]
fn closed_loop_counts_every_delivery() {
    let server = Server::start(&[]);
    let out = bench(
        &server,
        &[
            "--clients",
            "20",
            "--senders",
            "5",
            "--fanout",
            "3",
            "--window",
            "4",
            "--duration",
            "0.5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(field(&out, "logged_in"), 20.0);
    let sent = field(&out, "lines_sent");
    assert!(sent > 100.0, "only {sent} lines in 0.5 s");
    assert_eq!(field(&out, "deliveries"), sent * 3.0);
    assert_eq!(field(&out, "lost"), 0.0);
    assert_eq!(field(&out, "unexpected"), 0.0);
    assert!(field(&out, "server_rss_after_kb") > 0.0);
    assert!(field(&out, "server_cpu_secs") >= 0.0);
    assert!(field(&out, "latency_us_p99") >= field(&out, "latency_us_p50"));
}

/// Open loop: the offered rate is what is sent, all of it arrives, and the
/// send lag is reported.
#[test]
fn open_loop_sends_at_the_rate() {
    let server = Server::start(&[]);
    let out = bench(
        &server,
        &[
            "--clients",
            "10",
            "--senders",
            "4",
            "--fanout",
            "2",
            "--rate",
            "2000",
            "--duration",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let sent = field(&out, "lines_sent");
    assert!(
        (1900.0..=2100.0).contains(&sent),
        "sent {sent} lines at 2000/s for 1 s"
    );
    assert_eq!(field(&out, "deliveries"), sent * 2.0);
    // How late lines left is reported, so a lagging generator shows.
    assert!(field(&out, "send_lag_us_max") >= field(&out, "send_lag_us_p99"));
}

/// Client sockets are spread over the given source addresses.
#[test]
fn spreads_over_source_addresses() {
    let mut server = Server::start(&["--log-level", "debug"]);
    let out = bench(
        &server,
        &["--clients", "8", "--source-ips", "127.0.0.1-127.0.0.4"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for ip in ["127.0.0.1:", "127.0.0.2:", "127.0.0.3:", "127.0.0.4:"] {
        server.wait_log(&format!("accepted {ip}"));
    }
}

/// A server that drops lines (recipients closed mid-traffic, here by a
/// short `--idle-timeout`: the recipients that never send fall silent) is
/// caught: losses and closes are reported, exit 1. (A tiny
/// `--max-outbound` no longer does it: chatd writes what a recipient's
/// socket takes before it calls the recipient slow.)
#[test]
fn detects_a_lossy_server() {
    lossy_server_is_caught("1");
}

/// Runs chatd-bench with `threads` against a chatd whose silent
/// recipients are closed by `--idle-timeout 0.3`: losses and closes must
/// be reported, and the run must fail (exit 1).
fn lossy_server_is_caught(threads: &str) {
    let server = Server::start(&["--idle-timeout", "0.3"]);
    let out = bench(
        &server,
        &[
            "--threads",
            threads,
            "--clients",
            "10",
            "--senders",
            "5",
            "--window",
            "16",
            "--payload",
            "150",
            "--duration",
            "1",
            "--settle-timeout",
            "1",
        ],
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(text_field(&json, "result"), "FAILED");
    assert!(field(&out, "lost") > 0.0, "{json}");
    assert!(field(&out, "closed_by_server") > 0.0, "{json}");
    assert!(
        !text_field(&json, "error_lines").contains("line-too-long"),
        "{json}"
    );
}

/// `--help` says how to raise the open-file limit; bad values exit 2.
#[test]
fn help_and_bad_values() {
    let out = Command::new(BENCH).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("open-file limit") && help.contains("--source-ips"),
        "{help}"
    );
    let out = Command::new(BENCH)
        .args(["--clients", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--clients"));
}

/// Values that would overflow a time or an allocation are usage errors,
/// checked before anything runs: one line naming the flag, exit 2. So is a
/// flag that does not exist, reported as unknown even when it comes last.
#[test]
fn out_of_range_values_are_usage_errors() {
    // A live server and traffic, so a value that slipped through would be
    // used (and abort) instead of failing on a refused connection.
    let server = Server::start(&[]);
    let traffic = ["--clients", "2", "--senders", "1", "--duration", "0.2"];
    for (flag, value) in [
        ("--rate", "1e-300"),
        ("--connect-rate", "1e-19"),
        ("--payload", "99999999999999999"),
    ] {
        let out = bench(&server, &[&traffic[..], &[flag, value]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flag} {value}: {stderr}");
        assert!(
            stderr.starts_with(&format!("chatd-bench: invalid value for {flag}: '{value}'")),
            "{stderr}"
        );
    }

    let out = Command::new(BENCH)
        .args(["--clients", "2", "--bogus"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "chatd-bench: unknown option '--bogus' (see --help)\n"
    );
}

/// The slowest rate allowed runs: the first line goes at once, the next
/// would be due 10^7 s later.
#[test]
fn slowest_rate_runs() {
    let server = Server::start(&[]);
    let out = bench(
        &server,
        &[
            "--clients",
            "2",
            "--senders",
            "1",
            "--rate",
            "1e-7",
            "--duration",
            "0.2",
        ],
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{json}");
    assert_eq!(field(&out, "lines_sent"), 1.0, "{json}");
    assert_eq!(field(&out, "deliveries"), 1.0, "{json}");
}

/// With several `--addr`, client i connects to the (i mod n)-th server:
/// ten clients over two servers hold five connections on each, and the
/// report lists both addresses. With several `--server-pid`, the RSS is
/// the sum over the servers.
#[test]
fn spreads_clients_round_robin_over_servers() {
    let mut a = Server::start(&[]);
    let mut b = Server::start(&[]);
    let rss_before = a.status_kb("VmRSS") + b.status_kb("VmRSS");
    let run = bench_command(&[&a, &b], &["--clients", "10", "--idle", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chatd-bench");
    let mut seen = (0, 0);
    let both = poll_until(|| {
        seen = (a.connections(), b.connections());
        (seen == (5, 5)).then_some(())
    });
    let out = run.wait_with_output().unwrap();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        both.is_some(),
        "not 5 + 5 connections, last seen {seen:?}; {json}"
    );
    assert!(out.status.success(), "{json}");
    assert_eq!(text_field(&json, "result"), "ok");
    assert_eq!(field(&out, "logged_in"), 10.0);
    assert_eq!(text_field(&json, "addr"), format!("{},{}", a.addr, b.addr));
    // Two idle servers of about the same size: one alone would be half.
    let summed = field(&out, "server_rss_before_kb");
    assert!(
        summed >= 0.9 * rss_before as f64,
        "server_rss_before_kb {summed} < 0.9 * {rss_before} (both servers)"
    );
}

/// Two generators share one server under different `--name-prefix`es:
/// their names (which would collide, `name-taken`, without the prefixes)
/// are apart, and each counts its own deliveries, none lost.
#[test]
fn two_generators_share_a_server_by_name_prefix() {
    let server = Server::start(&[]);
    let traffic = [
        "--clients",
        "12",
        "--senders",
        "4",
        "--fanout",
        "3",
        "--window",
        "4",
        "--idle",
        "0.5",
        "--duration",
        "0.5",
    ];
    let runs: Vec<_> = ["x", "y"]
        .map(|prefix| {
            let args = [&traffic[..], &["--name-prefix", prefix]].concat();
            let mut cmd = bench_command(&[&server], &args);
            thread::spawn(move || cmd.output().expect("run chatd-bench"))
        })
        .into_iter()
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{json}\n{stderr}");
        assert_eq!(field(&out, "logged_in"), 12.0, "{json}");
        let sent = field(&out, "lines_sent");
        assert!(sent > 0.0, "{json}");
        assert_eq!(field(&out, "deliveries"), sent * 3.0, "{json}");
        assert_eq!(field(&out, "lost"), 0.0, "{json}");
        assert_eq!(field(&out, "unexpected"), 0.0, "{json}");
        assert_eq!(text_field(&json, "error_lines"), "none", "{json}");
    }
}

/// A prefix that cannot start a chatd name (or is too long) is a usage
/// error: one line naming --name-prefix, exit 2.
#[test]
fn bad_name_prefix_is_a_usage_error() {
    let too_long = "p".repeat(33);
    for prefix in ["a:b", "a,b", "a b", "caf\u{e9}", "a.b", &too_long] {
        let out = Command::new(BENCH)
            .args(["--clients", "2", "--name-prefix", prefix])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{prefix:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{prefix:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "chatd-bench: invalid value for --name-prefix: '{prefix}'"
            )),
            "{stderr}"
        );
    }
}

/// `--threads 2` (and 3, over a row of recipients that wraps): every
/// delivery counted once, in order per (sender, recipient) pair though the
/// recipient's thread is not the sender's, and closed loop keeps going, so
/// the completions get back to the sender's thread.
#[test]
fn threads_count_every_delivery() {
    let server = Server::start(&[]);
    for (threads, clients, senders, fanout) in [("2", "21", "7", "5"), ("3", "10", "10", "9")] {
        let out = bench(
            &server,
            &[
                "--name-prefix",
                &format!("t{threads}"),
                "--threads",
                threads,
                "--clients",
                clients,
                "--senders",
                senders,
                "--fanout",
                fanout,
                "--window",
                "4",
                "--duration",
                "0.5",
            ],
        );
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{json}");
        assert_eq!(field(&out, "threads"), threads.parse::<f64>().unwrap());
        assert_eq!(field(&out, "logged_in"), clients.parse::<f64>().unwrap());
        let sent = field(&out, "lines_sent");
        assert!(sent > 100.0, "only {sent} lines in 0.5 s: {json}");
        let fanout: f64 = fanout.parse().unwrap();
        assert_eq!(field(&out, "deliveries"), sent * fanout, "{json}");
        assert_eq!(field(&out, "lost"), 0.0, "{json}");
        assert_eq!(field(&out, "unexpected"), 0.0, "{json}");
        assert!(field(&out, "latency_us_p99") >= field(&out, "latency_us_p50"));
    }

    // Open loop over two threads: about the rate, all of it delivered.
    let out = bench(
        &server,
        &[
            "--name-prefix",
            "open",
            "--threads",
            "2",
            "--clients",
            "11",
            "--senders",
            "5",
            "--fanout",
            "3",
            "--rate",
            "2000",
            "--duration",
            "1",
        ],
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{json}");
    let sent = field(&out, "lines_sent");
    assert!((1900.0..=2100.0).contains(&sent), "{json}");
    assert_eq!(field(&out, "deliveries"), sent * 3.0, "{json}");
    assert_eq!(field(&out, "unexpected"), 0.0, "{json}");
}

/// The loss check holds over two threads: the lossy server of
/// `detects_a_lossy_server` is caught the same way.
#[test]
fn detects_a_lossy_server_with_two_threads() {
    lossy_server_is_caught("2");
}

/// `--hgrm FILE` writes the latency histogram as HdrHistogram's percentile
/// distribution: the header, rows of increasing percentiles up to 1 (the
/// last without its 1/(1-Percentile)), counts up to the deliveries, and the
/// `#[Mean`, `#[Max` and `#[Buckets` footer.
#[test]
fn writes_the_latency_histogram_as_hgrm() {
    let server = Server::start(&[]);
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-{}.hgrm", std::process::id()));
    let out = bench(
        &server,
        &[
            "--clients",
            "10",
            "--senders",
            "3",
            "--fanout",
            "2",
            "--window",
            "2",
            "--duration",
            "0.3",
            "--hgrm",
            path.to_str().unwrap(),
        ],
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{json}");
    let text = std::fs::read_to_string(&path).expect("the .hgrm file");
    let _ = std::fs::remove_file(&path);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    );
    assert_eq!(lines.next(), Some(""));
    let (rows, footer): (Vec<&str>, Vec<&str>) = lines.partition(|l| !l.starts_with("#["));
    assert!(rows.len() > 10, "{text}");
    let mut last = (0.0, -1.0, 0.0);
    for (n, row) in rows.iter().enumerate() {
        let cols: Vec<f64> = row
            .split_whitespace()
            .map(|c| c.parse().unwrap_or_else(|_| panic!("{row:?}")))
            .collect();
        let final_row = n == rows.len() - 1;
        assert_eq!(cols.len(), if final_row { 3 } else { 4 }, "{row:?}");
        let (value, percentile, count) = (cols[0], cols[1], cols[2]);
        assert!(
            value >= last.0 && percentile > last.1 && count >= last.2,
            "{row:?}"
        );
        if !final_row {
            assert!(
                (cols[3] - 1.0 / (1.0 - percentile)).abs() < 0.01 * cols[3],
                "{row:?}"
            );
        }
        last = (value, percentile, count);
    }
    assert_eq!(last.1, 1.0, "the last row is the 100th percentile");
    assert_eq!(last.2, field(&out, "deliveries"));
    assert_eq!(last.0, field(&out, "latency_us_max"));
    assert!(footer[0].starts_with("#[Mean    = "), "{text}");
    assert!(footer[1].starts_with("#[Max     = "), "{text}");
    assert!(
        footer[1].contains(&format!("Total count    = {:12}]", last.2)),
        "{text}"
    );
    assert!(footer[2].starts_with("#[Buckets = "), "{text}");
    assert!(text.contains("microseconds"), "the unit is said: {text}");
}

/// `chatd-bench --json` logging `clients` in at `addr`, a server that is
/// not a [`Server`] (no `--server-pid`), and nothing else.
fn logins_only(addr: &str, clients: usize) -> Output {
    Command::new(BENCH)
        .args(["--addr", addr, "--json", "--settle-timeout", "5"])
        .args([
            "--clients",
            &clients.to_string(),
            "--idle",
            "0",
            "--duration",
            "0",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run chatd-bench")
}

/// A connect the server refuses counts as a failed connect (the first
/// write or read on the socket reports it), not as a socket error of a
/// logged-in client, and fails the run.
#[test]
fn refused_connects_count_as_failed() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }; // closed: nothing listens there now
    let out = logins_only(&format!("127.0.0.1:{port}"), 5);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(field(&out, "connect_failed"), 5.0);
    assert_eq!(field(&out, "logged_in"), 0.0);
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text_field(&json, "socket_errors"),
        "connect: connection refused=5"
    );
}

/// A server that sends urgent data (`MSG_OOB`) inside its answers: a read
/// stops at the urgent mark with the rest queued, and no new edge comes
/// for it, so the generator must read on, or logins go unconfirmed.
#[test]
fn urgent_data_strands_no_login() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                // The name, then the message to itself: answered as
                // `from <name>: ` + an urgent byte + `l\n`.
                let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
                let Some(Ok(name)) = lines.next() else { return };
                let _ = lines.next();
                let head = format!("from {name}: ");
                let _ = stream.write_all(head.as_bytes());
                let _ = socket2::SockRef::from(&stream).send_out_of_band(b"U");
                let _ = stream.write_all(b"l\n");
                for _ in lines {} // until the generator closes
            });
        }
    });
    let out = logins_only(&addr.to_string(), 200);
    assert_eq!(field(&out, "logged_in"), 200.0, "{out:?}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// A `--server-pid` that names no process is refused before the run: one
/// line saying so, exit 2, no result.
#[test]
fn server_pid_of_no_process_is_refused() {
    let server = Server::start(&[]);
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id().to_string();
    gone.wait().unwrap(); // reaped: the pid names nothing now
    let out = Command::new(BENCH)
        .args(["--addr", &server.addr.to_string(), "--clients", "2"])
        .args(["--server-pid", &pid])
        .output()
        .unwrap();
    let stderr = refused(&out);
    assert_eq!(
        stderr,
        format!("chatd-bench: --server-pid {pid}: no such process\n")
    );
}

/// The README's `chatd & chatd-bench --server-pid $!` when another server
/// already holds the port: the new chatd cannot bind and exits, and the
/// generator refuses (exit 2) instead of measuring the other server.
#[test]
fn server_pid_that_failed_to_bind_is_refused() {
    let other = Server::start(&[]);
    let addr = other.addr.to_string();
    // Not reaped until the end: a zombie, as under a shell that has not
    // noticed yet.
    let mut failed = Command::new(chatd_binary())
        .args(["--addr", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Command::new(BENCH)
        .args(["--addr", &addr, "--clients", "2"])
        .args(["--server-pid", &failed.id().to_string()])
        .output()
        .unwrap();
    let _ = failed.kill();
    failed.wait().unwrap();
    let stderr = refused(&out);
    assert!(
        stderr.contains("exited without listening on") && stderr.contains(&addr),
        "{stderr}"
    );
}

/// A live `--server-pid` that listens elsewhere (another server, or a
/// wrapper of the server) is refused once the wait for it to listen is
/// over: exit 2, no result.
#[test]
fn server_pid_listening_elsewhere_is_refused() {
    let measured = Server::start(&[]);
    let elsewhere = Server::start(&[]);
    let start = Instant::now();
    let out = Command::new(BENCH)
        .args(["--addr", &measured.addr.to_string(), "--clients", "2"])
        .args(["--server-pid", &elsewhere.pid().to_string()])
        .output()
        .unwrap();
    let stderr = refused(&out);
    assert!(
        stderr.contains(&format!(
            "--server-pid {} (chatd) does not listen on {}",
            elsewhere.pid(),
            measured.addr
        )),
        "{stderr}"
    );
    assert!(
        start.elapsed().as_secs_f64() >= 4.5,
        "it waits for a slow start"
    );
}

/// A run with nothing wrong says so in every field: `error_lines` and
/// `socket_errors` are `none`, not blank, in JSON as in the text result;
/// `generator_bound` says whether the generator set the pace.
#[test]
fn empty_error_lists_read_none() {
    let server = Server::start(&[]);
    let traffic = ["--clients", "4", "--senders", "2", "--duration", "0.2"];
    let out = bench(&server, &[&traffic[..], &["--name-prefix", "j"]].concat());
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{json}");
    assert_eq!(text_field(&json, "error_lines"), "none", "{json}");
    assert_eq!(text_field(&json, "socket_errors"), "none", "{json}");
    let bound = text_field(&json, "generator_bound");
    assert!(bound == "yes" || bound == "no", "{json}");

    let out = Command::new(BENCH)
        .args(["--addr", &server.addr.to_string(), "--name-prefix", "t"])
        .args(traffic)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    for key in ["error_lines", "socket_errors"] {
        let line = text.lines().find(|l| l.starts_with(key));
        let words: Vec<&str> = line.unwrap_or_default().split_whitespace().collect();
        assert_eq!(words, [key, "none"], "{text}");
    }
}

/// `--version` and `-V` print `chatd-bench 0.1.0`, as chatd's does.
#[test]
fn prints_its_version() {
    for flag in ["--version", "-V"] {
        let out = Command::new(BENCH).arg(flag).output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("chatd-bench {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// Checks that the generator refused to run (exit 2, no result printed);
/// returns what it said.
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The processes whose parent is `pid`, from the children lists of all its
/// threads.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(list.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    children
}

/// Whether process `pid` is gone: exited and reaped.
fn gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `chatd-bench --json` against `server` with `args`, without the
/// `--server-pid` check, which reads every TCP socket of the machine: slow
/// while another load runs on it, and these tests wait for the children.
fn procs_command(server: &Server, args: &[&str]) -> Command {
    let mut cmd = Command::new(BENCH);
    cmd.args(["--addr", &server.addr.to_string(), "--json"])
        .args(["--settle-timeout", "5"])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// A chatd-bench running in the background, killed and reaped if the test
/// ends before it does.
struct Running(std::process::Child);

impl Running {
    fn start(mut cmd: Command) -> Running {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run chatd-bench");
        Running(child)
    }

    /// Its `n` children, once it has them all.
    fn children(&self, n: usize) -> Vec<u32> {
        let mut seen = Vec::new();
        poll_until(|| {
            seen = children_of(self.0.id());
            (seen.len() == n).then(|| seen.clone())
        })
        .unwrap_or_else(|| panic!("not {n} children, last seen {seen:?}"))
    }

    /// Waits for it to exit (within the harness's timeout) and takes what
    /// it wrote.
    fn output(mut self) -> Output {
        let exited = poll_until(|| self.0.try_wait().unwrap());
        assert!(exited.is_some(), "chatd-bench did not exit");
        let mut out = Output {
            status: exited.unwrap(),
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        use std::io::Read;
        self.0
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut out.stdout)
            .unwrap();
        self.0
            .stderr
            .take()
            .unwrap()
            .read_to_end(&mut out.stderr)
            .unwrap();
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--procs 3`: three child processes, each over its share of the clients
/// and senders under a name prefix of its own (no `name-taken`), and one
/// report that adds them up: every client logged in, every line delivered,
/// the merged histogram counting every delivery. The children are reaped
/// when it exits.
#[test]
fn procs_split_the_run_and_merge_the_results() {
    let server = Server::start(&[]);
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-procs-{}.hgrm", std::process::id()));
    let traffic = "--procs 3 --clients 31 --senders 7 --fanout 3 --window 4 --duration 0.5";
    let mut args: Vec<&str> = traffic.split(' ').collect();
    args.extend(["--hgrm", path.to_str().unwrap()]);
    let run = Running::start(procs_command(&server, &args));
    let children = run.children(3);
    let out = run.output();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{json}\n{stderr}");
    for pid in children {
        assert!(gone(pid), "child {pid} outlived the run");
    }
    assert_eq!(field(&out, "procs"), 3.0, "{json}");
    assert_eq!(field(&out, "logged_in"), 31.0, "{json}");
    assert!(field(&out, "connect_secs") > 0.0, "{json}");
    let sent = field(&out, "lines_sent");
    assert!(sent > 100.0, "only {sent} lines in 0.5 s: {json}");
    let deliveries = field(&out, "deliveries");
    assert_eq!(deliveries, sent * 3.0, "{json}");
    assert_eq!(field(&out, "lost"), 0.0, "{json}");
    assert_eq!(field(&out, "unexpected"), 0.0, "{json}");
    assert_eq!(text_field(&json, "error_lines"), "none", "{json}");
    assert_eq!(text_field(&json, "socket_errors"), "none", "{json}");
    assert_eq!(text_field(&json, "result"), "ok", "{json}");
    assert!(field(&out, "bench_cpu_secs") > 0.0, "{json}");
    let text = std::fs::read_to_string(&path).expect("the .hgrm file");
    let _ = std::fs::remove_file(&path);
    let total = text
        .lines()
        .find_map(|l| l.split("Total count    =").nth(1))
        .and_then(|rest| rest.trim().trim_end_matches(']').trim().parse::<f64>().ok());
    assert_eq!(total, Some(deliveries), "{text}");
}

/// A child killed mid-run fails the run: exit 1, a message naming that
/// child, no result; and the other children are killed and reaped, none
/// left behind.
#[test]
fn a_killed_child_fails_the_run_and_leaves_none_behind() {
    let mut server = Server::start(&[]);
    let args = ["--procs", "3", "--clients", "9", "--idle", "30"];
    let run = Running::start(procs_command(&server, &args));
    let children = run.children(3);
    let all_in = poll_until(|| (server.connections() == 9).then_some(()));
    assert!(all_in.is_some(), "not every client connected");
    let killed = children[1];
    let kill = Command::new("kill")
        .args(["-KILL", &killed.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = run.output();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "a result after a failure");
    assert!(
        stderr.contains(&format!(
            "child 1 of 3 (pid {killed}) ended before the run did"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("SIGKILL"), "{stderr}");
    for pid in children {
        assert!(gone(pid), "child {pid} outlived the run: {stderr}");
    }
}

/// `--procs` that would leave a process fewer clients than a sender needs
/// recipients (or none at all) is a usage error, one line, exit 2.
#[test]
fn too_many_procs_is_a_usage_error() {
    for (args, says) in [
        (
            &["--clients", "2"][..],
            "--procs 3 needs at least 3 --clients",
        ),
        (
            &["--clients", "8", "--senders", "1", "--fanout", "2"][..],
            "--procs 3 leaves 2 clients in a process, fewer than --fanout + 1 = 3",
        ),
    ] {
        let out = Command::new(BENCH)
            .args(["--procs", "3"])
            .args(args)
            .output()
            .unwrap();
        let stderr = refused(&out);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("chatd-bench: {says}")),
            "{stderr}"
        );
    }
}

/// The WebSocket address a chatd started with `--ws-addr 127.0.0.1:0`
/// logged (`chatd websocket on ws://ADDR/ ...`).
fn ws_addr(server: &mut Server) -> String {
    let line = server.wait_log("websocket on ws://");
    line.split("websocket on ws://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("an address after 'websocket on ws://'")
        .to_string()
}

/// `chatd-bench --ws --json` against the WebSocket address `ws`, with
/// `args` after (no `--server-pid` unless they give it).
fn ws_command(ws: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BENCH);
    cmd.args(["--ws", "--addr", ws, "--json", "--settle-timeout", "5"])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// Asserts a run that went right over WebSocket: exit 0, `transport` ws,
/// every client logged in, every line delivered to each of its `fanout`
/// recipients once and in order. Returns the lines sent.
fn assert_ws_run_ok(out: &Output, clients: f64, fanout: f64) -> f64 {
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{json}\n{stderr}");
    assert_eq!(text_field(&json, "transport"), "ws", "{json}");
    assert_eq!(text_field(&json, "result"), "ok", "{json}");
    assert_eq!(field(out, "logged_in"), clients, "{json}");
    let sent = field(out, "lines_sent");
    assert_eq!(field(out, "deliveries"), sent * fanout, "{json}");
    assert_eq!(field(out, "lost"), 0.0, "{json}");
    assert_eq!(field(out, "unexpected"), 0.0, "{json}");
    assert_eq!(text_field(&json, "error_lines"), "none", "{json}");
    assert_eq!(text_field(&json, "socket_errors"), "none", "{json}");
    sent
}

/// `--ws` against chatd's `--ws-addr`: closed loop (with `--server-pid`,
/// which finds chatd listening on the WebSocket address), then open loop
/// over two threads, every line delivered; the login latency, which
/// includes the upgrade, is reported. Over TCP the same run says
/// `transport` tcp.
#[test]
fn ws_runs_closed_and_open_loop_over_websocket() {
    let mut server = Server::start(&["--ws-addr", "127.0.0.1:0"]);
    let ws = ws_addr(&mut server);
    let pid = server.pid().to_string();
    let closed = "--clients 20 --senders 5 --fanout 3 --window 4 --duration 0.5";
    let mut args: Vec<&str> = closed.split(' ').collect();
    args.extend(["--server-pid", &pid, "--name-prefix", "c"]);
    let out = ws_command(&ws, &args).output().expect("run chatd-bench");
    let sent = assert_ws_run_ok(&out, 20.0, 3.0);
    assert!(sent > 100.0, "only {sent} lines in 0.5 s");
    assert!(field(&out, "login_ms_p50") > 0.0);
    assert!(field(&out, "latency_us_p99") >= field(&out, "latency_us_p50"));
    assert!(field(&out, "server_rss_after_kb") > 0.0);

    let open = "--threads 2 --clients 11 --senders 5 --fanout 3 --rate 2000 --duration 1";
    let mut args: Vec<&str> = open.split(' ').collect();
    args.extend(["--name-prefix", "o"]);
    let out = ws_command(&ws, &args).output().expect("run chatd-bench");
    let sent = assert_ws_run_ok(&out, 11.0, 3.0);
    // Not past the rate; short of it by what a starved last turn leaves
    // unsent (under 1,900 once, the whole suite running on two busy cores).
    assert!((1500.0..=2100.0).contains(&sent), "sent {sent} at 2000/s");
    assert_eq!(field(&out, "threads"), 2.0);

    let out = bench(&server, &["--clients", "2", "--name-prefix", "t"]);
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{json}");
    assert_eq!(text_field(&json, "transport"), "tcp", "{json}");
}

/// `--ws --procs 3`: the children speak WebSocket too (they get `--ws`
/// with the rest of the arguments), and the report adds them up.
#[test]
fn ws_procs_split_the_run() {
    let mut server = Server::start(&["--ws-addr", "127.0.0.1:0"]);
    let ws = ws_addr(&mut server);
    let traffic = "--procs 3 --clients 31 --senders 7 --fanout 3 --window 4 --duration 0.5";
    let args: Vec<&str> = traffic.split(' ').collect();
    let run = Running::start(ws_command(&ws, &args));
    let children = run.children(3);
    let out = run.output();
    let sent = assert_ws_run_ok(&out, 31.0, 3.0);
    assert!(sent > 100.0, "only {sent} lines in 0.5 s");
    assert_eq!(field(&out, "procs"), 3.0);
    for pid in children {
        assert!(gone(pid), "child {pid} outlived the run");
    }
}

/// What goes wrong over WebSocket is told as over TCP: a server that
/// closes its silent recipients (`--idle-timeout`) sends each its error
/// line and a Close, counted as lines lost, `error_lines` and
/// `closed_by_server`; and `--ws` pointed at chatd's TCP port fails every
/// upgrade, saying why (exit 1).
#[test]
fn ws_failures_are_reported() {
    let mut server = Server::start(&["--idle-timeout", "0.3", "--ws-addr", "127.0.0.1:0"]);
    let ws = ws_addr(&mut server);
    let lossy = "--clients 10 --senders 5 --window 16 --payload 150 --duration 1";
    let mut args: Vec<&str> = lossy.split(' ').collect();
    args.extend(["--settle-timeout", "1"]);
    let out = ws_command(&ws, &args).output().expect("run chatd-bench");
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(text_field(&json, "result"), "FAILED", "{json}");
    assert!(field(&out, "lost") > 0.0, "{json}");
    assert!(field(&out, "closed_by_server") > 0.0, "{json}");
    assert!(
        text_field(&json, "error_lines").contains("idle-timeout"),
        "{json}"
    );
    // The Close frames were read as closes, not as frames gone wrong.
    assert!(
        !text_field(&json, "socket_errors").contains("ws-"),
        "{json}"
    );

    let tcp = server.addr.to_string();
    let out = ws_command(&tcp, &["--clients", "3", "--name-prefix", "w"])
        .output()
        .expect("run chatd-bench");
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(field(&out, "logged_in"), 0.0, "{json}");
    assert_eq!(field(&out, "connect_failed"), 3.0, "{json}");
    assert!(
        text_field(&json, "socket_errors")
            .starts_with("ws-handshake: not HTTP: error: invalid-name"),
        "{json}"
    );
}

/// `--login-window N`: at most N logins in flight. Against a listener that
/// accepts and never answers, N connections arrive and no more, over
/// two processes too (their shares add up to N); the next connect waits
/// for a login that never ends. Then, against chatd, every client of a
/// windowed run logs in.
#[test]
fn the_login_window_bounds_logins_in_flight() {
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    for procs in ["1", "2"] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(conn); // open, silent
            }
        });
        let mut child = Command::new(BENCH)
            .args(["--addr", &addr, "--clients", "60", "--login-window", "6"])
            .args(["--procs", procs, "--settle-timeout", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        poll_until(|| (accepted.load(Ordering::SeqCst) >= 6).then_some(()))
            .expect("the first connects arrive");
        // Long enough for the storm a missing window would start.
        thread::sleep(Duration::from_millis(500));
        let seen = accepted.load(Ordering::SeqCst);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, 6, "with --procs {procs}: connects beyond the window");
    }

    let server = Server::start(&[]);
    let out = bench(&server, &["--clients", "300", "--login-window", "7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(field(&out, "logged_in"), 300.0);
}
