//! Running the daemon: flags, environment, logging, signals and shutdown.

mod common;

use std::process::{Command, Output};

use common::Server;

fn chatd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.args(args).env_remove("RUST_LOG");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().expect("run chatd")
}

/// `--help` lists every flag with its default and exits 0.
#[test]
fn help_lists_every_flag() {
    let out = chatd(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--addr",
        "--max-line",
        "--max-outbound",
        "--max-clients",
        "--login-timeout",
        "--idle-timeout",
        "--backlog",
        "--shutdown-timeout",
        "--stats-interval",
        "--log-level",
    ] {
        let line = help.lines().find(|l| l.trim_start().starts_with(flag));
        let line = line.unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        assert!(line.contains("[default: "), "{flag} has no default: {line}");
    }
    assert!(
        help.contains("CHATD_"),
        "--help does not mention the environment"
    );
}

/// Bad flags and values get one line naming the flag (or variable), and
/// exit status 2.
#[test]
fn bad_flags_exit_2_with_one_line() {
    /// Arguments, environment, and the name the error line must mention.
    type Case = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: &[Case] = &[
        (&["--bogus"], &[], "--bogus"),
        (&["--max-line", "abc"], &[], "--max-line"),
        (&["--max-line", "0"], &[], "--max-line"),
        (&["--login-timeout", "-1"], &[], "--login-timeout"),
        (&["--addr", "nowhere"], &[], "--addr"),
        (&["--log-level", "loud"], &[], "--log-level"),
        (&["--max-line"], &[], "--max-line"),
        (&["stray"], &[], "stray"),
        (&[], &[("CHATD_MAX_CLIENTS", "many")], "CHATD_MAX_CLIENTS"),
        // --max-outbound must hold the longest delivery --max-line allows.
        (&["--max-outbound", "1000"], &[], "--max-outbound"),
        (&["--max-line", "2000000"], &[], "--max-line"),
        (&["--max-buffer-memory", "1000"], &[], "--max-buffer-memory"),
    ];
    for (args, env, names) in cases {
        let out = chatd(args, env);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("chatd: "), "{stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }
}

/// A `CHATD_*` value that is not UTF-8 is refused like the same bytes as a
/// flag value (exit 2, one line naming the variable), not silently ignored.
#[test]
fn non_utf8_environment_value_exits_2() {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .env("CHATD_MAX_CLIENTS", std::ffi::OsStr::from_bytes(b"\xff"))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run chatd");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "chatd: invalid value for CHATD_MAX_CLIENTS: not valid UTF-8\n"
    );
}

/// Flags can come from `CHATD_*` variables; the command line wins.
#[test]
fn environment_sets_flags_and_command_line_wins() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.env("CHATD_MAX_LINE", "20");
    let server = Server::spawn(cmd, &[]);
    let mut alice = server.login("alice");
    alice.send(&format!("alice: {}\n", "x".repeat(20)));
    alice.expect("error: line-too-long: max 20 bytes");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.env("CHATD_MAX_LINE", "20");
    let server = Server::spawn(cmd, &["--max-line", "40"]);
    let mut alice = server.login("alice");
    alice.send(&format!("alice: {}\n", "x".repeat(40)));
    alice.expect("error: line-too-long: max 40 bytes");
}

/// Connections and logins are logged at debug level only.
#[test]
fn log_level_controls_connection_logs() {
    let mut server = Server::start(&[]);
    server.login("alice");
    server.signal("USR1");
    server.wait_log("stats: ");
    assert!(!server.log().contains("logged in as"), "{}", server.log());

    let mut server = Server::start(&["--log-level", "debug"]);
    server.login("alice");
    server.wait_log("logged in as alice");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.env("RUST_LOG", "debug");
    let mut server = Server::spawn(cmd, &[]);
    server.login("bob");
    server.wait_log("logged in as bob");
}

/// SIGUSR1 logs the counters at once; `--stats-interval` logs them
/// periodically.
#[test]
fn stats_on_signal_and_interval() {
    let mut server = Server::start(&[]);
    let mut alice = server.login("alice");
    alice.send("alice, nobody: hi\n");
    alice.expect("from alice: hi");
    alice.expect("error: not-online: nobody");
    server.signal("USR1");
    let line = server.wait_log("stats: ");
    for want in [
        "connections=1 ",
        "peak=1 ",
        "accepted=1 ",
        "logins=1 ",
        "messages_in=2 ", // the login sync and the line above
        "deliveries=2 ",
        "errors.not-online=1",
    ] {
        assert!(line.contains(want), "{want} missing in {line}");
    }

    let mut server = Server::start(&["--stats-interval", "0.1"]);
    server.wait_log_count("stats: ", 3);
}

/// SIGTERM: every message already routed to a client is delivered before
/// `error: shutting-down` and the close, and the server exits 0.
#[test]
fn sigterm_flushes_queued_messages_then_exits_0() {
    let mut server = Server::start(&[]);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob"); // does not read until after the signal
    let lines = 800;
    let body = "q".repeat(1000);
    let batch: String = (0..lines).map(|i| format!("bob: {i} {body}\n")).collect();
    alice.send(&batch);
    alice.sync("alice"); // everything above is routed
    server.signal("TERM");
    server.wait_log("shutdown requested");
    for i in 0..lines {
        bob.expect(&format!("from alice: {i} {body}"));
    }
    bob.expect("error: shutting-down");
    bob.expect_eof();
    alice.expect("error: shutting-down");
    alice.expect_eof();
    assert_eq!(server.wait_exit().code(), Some(0));
    let summary = server.wait_log("shutdown complete");
    // 800 lines and three syncs (the two logins' and alice's).
    assert!(summary.contains("deliveries=803 "), "{summary}");
}

/// With no clients, SIGINT ends the server at once with status 0.
#[test]
fn sigint_with_no_clients_exits_0() {
    let mut server = Server::start(&[]);
    server.signal("INT");
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// SIGHUP (the terminal that started the daemon closed) does not stop it:
/// it is logged and ignored, and chat goes on.
#[test]
fn sighup_is_logged_and_ignored() {
    let mut server = Server::start(&[]);
    let mut alice = server.login("alice");
    server.signal("HUP");
    server.wait_log("hang-up signal ignored");
    alice.sync("alice");
    server.signal("TERM");
    alice.expect("error: shutting-down");
    drop(alice);
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// A second signal during a slow shutdown exits at once, non-zero.
#[test]
fn second_signal_exits_at_once() {
    let mut server = Server::start(&["--shutdown-timeout", "60"]);
    let mut alice = server.login("alice");
    let _bob = server.login("bob"); // never reads: shutdown cannot finish
    let batch = format!("bob: {}\n", "w".repeat(10_000)).repeat(90);
    alice.send(&batch);
    alice.sync("alice");
    server.signal("TERM");
    server.wait_log("shutdown requested");
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(!status.success(), "{status:?}");
    server.wait_log("second shutdown request");
}

/// Two stop signals are two, even when both arrive while the loop is busy
/// with one long turn (they used to be merged into one, and the server
/// flushed for the whole `--shutdown-timeout`): it exits at once with 130.
#[test]
fn two_signals_during_a_busy_turn_exit_at_once() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = Server::start(&[
        "--shutdown-timeout",
        "60",
        "--max-line",
        "8000000",
        "--max-outbound",
        "16000000",
    ]);
    let mut alice = server.login("alice");
    let mut bob = common::Client::connect_small(server.addr);
    bob.send("bob\n"); // never reads: shutdown cannot finish
    alice.send(&format!("bob: {}\n", "w".repeat(10_000)).repeat(800));
    alice.sync("alice");
    // Lines naming a million strangers keep each turn busy for a while.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        let mut stream = server.connect().stream().try_clone().unwrap();
        let names: Vec<String> = (0..1_000_000).map(|i| format!("x{i}")).collect();
        let line = format!("{}: hi\n", names.join(","));
        std::thread::spawn(move || {
            stream.write_all(b"flooder\n").unwrap();
            let mut replies = stream.try_clone().unwrap();
            std::thread::spawn(move || std::io::copy(&mut replies, &mut std::io::sink()));
            while !stop.load(Ordering::Relaxed) && stream.write_all(line.as_bytes()).is_ok() {}
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300)); // the flood is under way
    server.signal("TERM");
    std::thread::sleep(std::time::Duration::from_millis(5));
    server.signal("TERM");
    let mut server = server;
    let status = server.wait_exit();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(status.code(), Some(130), "{}", server.log());
    drop(flood);
}

/// `--backlog` sets the listen backlog (`ss` shows it as a listening
/// socket's Send-Q).
#[test]
fn backlog_flag_sets_the_listen_backlog() {
    let server = Server::start(&["--backlog", "7"]);
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", server.addr.port())])
        .output()
        .expect("run ss");
    let table = String::from_utf8(out.stdout).unwrap();
    let send_q: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(send_q, ["7"], "ss said: {table}");
}
