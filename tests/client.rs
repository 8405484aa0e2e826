//! `chatd-client` against a real chatd, as a user or a script runs it.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Server, poll_until};

fn client(addr: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd-client"));
    cmd.args(["--addr", addr])
        .args(args)
        .env_remove("CHATD_ADDR");
    cmd
}

/// Starts the client with its stdin, stdout and stderr piped to the test.
fn spawn_piped(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatd-client")
}

/// Runs the client with `input` on its stdin (then EOF) and waits for it.
fn run_piped(cmd: Command, input: &str) -> Output {
    let mut child = spawn_piped(cmd);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    wait_output(child)
}

/// Waits for `child` to exit, failing the test if it takes too long.
fn wait_output(mut child: Child) -> Output {
    let exited = poll_until(|| child.try_wait().unwrap());
    if exited.is_none() {
        let _ = child.kill();
        panic!("chatd-client did not exit");
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

/// `printf 'alice\nalice: hi\n' | chatd-client` prints `from alice: hi` and
/// exits 0.
#[test]
fn piped_session_prints_replies_and_exits_0() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    let out = run_piped(client(&addr, &[]), "alice\nalice: hi\n");
    assert_eq!(text(&out.stdout), "from alice: hi\n");
    assert_eq!(text(&out.stderr), "", "nothing extra when piped");
    assert_eq!(out.status.code(), Some(0));
}

/// `--name` sends the name first; a last line without `\n` is sent too.
#[test]
fn name_flag_logs_in() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    let out = run_piped(client(&addr, &["--name", "bob"]), "bob: one\nbob: two");
    assert_eq!(text(&out.stdout), "from bob: one\nfrom bob: two\n");
    assert_eq!(out.status.code(), Some(0));
}

/// The address can come from `CHATD_ADDR`.
#[test]
fn address_from_environment() {
    let server = Server::start(&[]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd-client"));
    cmd.env("CHATD_ADDR", server.addr.to_string());
    let out = run_piped(cmd, "carol\ncarol: env\n");
    assert_eq!(text(&out.stdout), "from carol: env\n");
}

/// Every reply to input sent just before EOF is printed: the client
/// half-closes and reads until the server closes.
#[test]
fn half_close_loses_no_reply() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    let input: String = std::iter::once("alice\n".to_string())
        .chain((0..2000).map(|i| format!("alice: line {i}\n")))
        .collect();
    let out = run_piped(client(&addr, &[]), &input);
    let want: String = (0..2000)
        .map(|i| format!("from alice: line {i}\n"))
        .collect();
    assert_eq!(text(&out.stdout), want);
    assert_eq!(out.status.code(), Some(0));
}

/// A taken name: the error line is shown on stdout and stderr, and the
/// client exits non-zero even though its stdin is still open.
#[test]
fn name_taken_exits_non_zero() {
    let server = Server::start(&[]);
    let _alice = server.login("alice");
    let addr = server.addr.to_string();
    // Its stdin stays open: the server's close must end it.
    let child = spawn_piped(client(&addr, &["--name", "alice"]));
    let out = wait_output(child);
    assert_eq!(text(&out.stdout), "error: name-taken: alice\n");
    assert_eq!(text(&out.stderr), "error: name-taken: alice\n");
    assert_eq!(out.status.code(), Some(1));
}

/// A server shutdown while connected: the client prints the messages routed
/// to it, then `error: shutting-down`, and exits non-zero.
#[test]
fn server_shutdown_while_connected() {
    let mut server = Server::start(&[]);
    let addr = server.addr.to_string();
    let mut child = spawn_piped(client(&addr, &["--name", "dora"]));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"dora: before\n").unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "from dora: before\n");
    server.signal("TERM");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "error: shutting-down\n");
    let status = wait_output(child).status;
    assert_eq!(status.code(), Some(1));
    assert_eq!(server.wait_exit().code(), Some(0));
    drop(stdin);
}

/// Connection refused and bad addresses get one clear line each.
#[test]
fn connection_errors_are_one_line() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }; // closed again: nothing listens there now
    let out = run_piped(client(&format!("127.0.0.1:{port}"), &[]), "");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot connect to") && stderr.contains("refused"),
        "{stderr}"
    );

    let out = run_piped(client("no-such-host-really.invalid:80", &[]), "");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("chatd-client: invalid value for --addr"));
}

/// A connection reset by the server side is reported as lost.
#[test]
fn lost_connection_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let child = spawn_piped(client(&addr, &["--name", "erin"]));
    let (conn, _) = listener.accept().unwrap();
    let mut name = [0; 5];
    (&conn).read_exact(&mut name).unwrap();
    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(conn); // a reset
    let out = wait_output(child);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("connection lost"),
        "{}",
        text(&out.stderr)
    );
}

/// A reset while the client sends a 20 MB line exits 1 also when the
/// sending thread, not the printing one, is the first to see the reset
/// (the printer then reads a plain EOF). Each round makes the sender see
/// it: the printer is held on a full stdout pipe until the reset is in.
#[test]
fn reset_while_sending_a_long_line_exits_1() {
    for round in 0..3 {
        let (addr, server) = fake_server(|mut conn| {
            // The name and the start of the long line: the client is
            // sending it, and blocks once the buffers are full.
            let mut head = vec![0; 64 << 10];
            conn.read_exact(&mut head).unwrap();
            // Fill the client's stdout, which the test does not read yet,
            // until the client stops taking lines: its printer is stuck.
            conn.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let lines = "from srv: filler\n".repeat(4096);
            while conn.write_all(lines.as_bytes()).is_ok() {}
            socket2::SockRef::from(&conn)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(conn); // a reset, seen first by the blocked sender
        });
        let mut child = spawn_piped(client(&addr, &["--name", "rita"]));
        let mut stdin = child.stdin.take().unwrap();
        let feeder = thread::spawn(move || {
            let mut line = vec![b'x'; 20 << 20];
            line.push(b'\n');
            let _ = stdin.write_all(&line); // the client may be gone
        });
        server.join().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let drain = thread::spawn(move || io::copy(&mut stdout, &mut io::sink()));
        let out = wait_output(child);
        feeder.join().unwrap();
        drain.join().unwrap().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "round {round}: {stderr}");
        assert!(
            stderr.contains("connection lost"),
            "round {round}: {stderr}"
        );
    }
}

/// On a terminal, escape sequences in received lines are shown, not obeyed;
/// piped output stays byte-exact.
#[test]
fn escapes_control_characters_only_on_a_terminal() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    let mut mallory = server.login("mallory");

    // Piped: byte-exact.
    let child = spawn_piped(client(&addr, &["--name", "vic"]));
    // Retry until vic is logged in: a miss gets `not-online` before the sync.
    poll_until(|| {
        mallory.send("vic: \u{1b}[2Jgotcha\nmallory: sync\n");
        match mallory.line().as_str() {
            "from mallory: sync\n" => Some(()),
            line => {
                assert_eq!(line, "error: not-online: vic\n");
                mallory.expect("from mallory: sync");
                None
            }
        }
    })
    .expect("vic logged in");
    mallory.send("vic: \u{1b}]0;title\u{7}\n");
    mallory.sync("mallory");
    let mut child = child;
    drop(child.stdin.take()); // EOF: the client half-closes and exits
    let out = wait_output(child);
    assert_eq!(
        text(&out.stdout),
        "from mallory: \u{1b}[2Jgotcha\nfrom mallory: \u{1b}]0;title\u{7}\n"
    );

    // On a terminal (a pseudo-terminal from `script`): escaped.
    let client_cmd = format!(
        "printf 'tess\\ntess: \\033[31mred\\n' | {} --addr {addr}",
        env!("CARGO_BIN_EXE_chatd-client")
    );
    let (_, screen) = on_a_terminal(&client_cmd);
    assert!(screen.contains("from tess: \\x1b[31mred"), "{screen:?}");
    assert!(
        !screen.contains('\u{1b}'),
        "a raw escape reached the terminal: {screen:?}"
    );
}

/// A one-connection server in the test: `serve` gets the client's socket.
fn fake_server(serve: impl FnOnce(TcpStream) + Send + 'static) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || serve(listener.accept().unwrap().0));
    (addr, server)
}

/// Sends `reply` and closes cleanly: half-closes, then waits for the client
/// to go, so what the client sent cannot turn the close into a reset.
fn reply_and_close(mut conn: TcpStream, reply: &[u8]) {
    conn.write_all(reply).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let _ = io::copy(&mut conn, &mut io::sink());
}

/// `error: slow-consumer` ends the connection: the client exits 1 even
/// though its stdin is still open.
#[test]
fn slow_consumer_error_exits_1() {
    let (addr, server) = fake_server(|conn| reply_and_close(conn, b"error: slow-consumer\n"));
    let child = spawn_piped(client(&addr, &["--name", "slow"]));
    let out = wait_output(child);
    assert_eq!(text(&out.stdout), "error: slow-consumer\n");
    assert_eq!(text(&out.stderr), "error: slow-consumer\n");
    assert_eq!(out.status.code(), Some(1));
    server.join().unwrap();
}

/// With stdout redirected and stderr on a terminal, the copy of an error
/// line on stderr is escaped as stdout's would be on a terminal.
#[test]
fn escapes_error_lines_on_a_terminal_stderr() {
    let (addr, server) = fake_server(|conn| {
        reply_and_close(conn, b"error: name-taken: \x1b]0;pwned\x07\x1b[31mred\n")
    });
    // A pseudo-terminal from `script` for stderr; stdout goes to /dev/null.
    let client_cmd = format!(
        "{} --addr {addr} >/dev/null",
        env!("CARGO_BIN_EXE_chatd-client")
    );
    let (status, screen) = on_a_terminal(&client_cmd);
    assert!(
        screen.contains("error: name-taken: \\x1b]0;pwned\\x07\\x1b[31mred"),
        "{screen:?}"
    );
    assert!(
        !screen.contains(['\u{1b}', '\u{7}']),
        "a raw control character reached the terminal: {screen:?}"
    );
    assert_eq!(status.code(), Some(1), "{screen:?}");
    server.join().unwrap();
}

/// A line that never ends is printed in pieces as it arrives: the client's
/// memory stays small and every byte reaches stdout.
#[test]
fn endless_line_keeps_memory_bounded() {
    const TOTAL: usize = 64 << 20;
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let (addr, server) = fake_server(move |conn| {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..TOTAL / chunk.len() {
            (&conn).write_all(&chunk).unwrap();
        }
        // Open until the test has measured the client, so the client cannot
        // print the line at the close instead of while it arrives.
        let _ = close_rx.recv();
        reply_and_close(conn, b"");
    });
    let mut child = spawn_piped(client(&addr, &[]));
    let mut stdout = child.stdout.take().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&received);
    let reader = thread::spawn(move || {
        let mut buf = vec![0; 1 << 16];
        let mut only_x = true;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return only_x,
                Ok(n) => {
                    only_x &= buf[..n].iter().all(|&b| b == b'x');
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    });
    // Without pieces nothing arrives before the close: this times out then.
    let _ = poll_until(|| (received.load(Ordering::Relaxed) >= TOTAL).then_some(()));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    close_tx.send(()).unwrap();
    let out = wait_output(child);
    server.join().unwrap();
    assert!(
        reader.join().unwrap(),
        "stdout has bytes the server never sent"
    );
    assert_eq!(received.load(Ordering::Relaxed), TOTAL);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        peak_kb < 20 * 1024,
        "peak RSS {peak_kb} kB for a {TOTAL}-byte line"
    );
}

/// Runs the shell command `cmd` on a pseudo-terminal (from `script`) and
/// returns its exit status and what it wrote there.
fn on_a_terminal(cmd: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
