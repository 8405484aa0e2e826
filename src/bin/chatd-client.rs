//! `chatd-client`: the tutorial's chat client, done properly.
//!
//! Sends every stdin line to the server and prints every server line as it
//! arrives. At stdin EOF it half-closes and keeps printing until the server
//! closes, so no reply is cut off. Exit status: 0 when the server closed
//! normally, 1 when it closed after an `error:` line that ends the
//! connection, or the connection failed, 2 for bad usage.

use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use chatd::protocol::ErrorKind;

const USAGE: &str = "\
chatd-client: talk to a chatd server

Usage: chatd-client [--addr HOST:PORT] [--name NAME]

  --addr HOST:PORT   server address [default: 127.0.0.1:8080, or CHATD_ADDR]
  --name NAME        send NAME as the first line (else the first line you type
                     is your name)
  -h, --help         print this help
  -V, --version      print the version

Type messages as `name1, name2: message`. At the end of input the client
waits for the server to close, printing everything it still sends.
Exit status: 0 on a normal close, 1 if the server closed after an error or
the connection failed, 2 for bad usage.
";

/// What the command line asked for.
struct Args {
    addr: SocketAddr,
    name: Option<String>,
}

fn parse_args() -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut addr: Option<(String, String)> = None;
    let mut name = None;
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!("chatd-client {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            Long("addr") => addr = Some(("--addr".into(), string_value(&mut parser, "--addr")?)),
            Long("name") => name = Some(string_value(&mut parser, "--name")?),
            _ => return Err(format!("{} (see --help)", arg.unexpected())),
        }
    }
    let (source, value) = match addr {
        Some(given) => given,
        None => match std::env::var("CHATD_ADDR") {
            Ok(value) => ("CHATD_ADDR".into(), value),
            Err(_) => ("--addr".into(), "127.0.0.1:8080".into()),
        },
    };
    let addr = value
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut addrs| addrs.next().ok_or_else(|| "no address found".to_string()))
        .map_err(|why| format!("invalid value for {source}: '{value}' ({why})"))?;
    Ok(Some(Args { addr, name }))
}

fn string_value(parser: &mut lexopt::Parser, flag: &str) -> Result<String, String> {
    let value = parser.value().map_err(|e| e.to_string())?;
    value
        .into_string()
        .map_err(|_| format!("invalid value for {flag}: not valid UTF-8"))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("chatd-client: {message}");
            return ExitCode::from(2);
        }
    };
    let stream = match TcpStream::connect(args.addr) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("chatd-client: cannot connect to {}: {e}", args.addr);
            return ExitCode::from(1);
        }
    };
    let _ = stream.set_nodelay(true);
    let interactive = io::stdin().is_terminal() && io::stdout().is_terminal();
    if interactive {
        let first = match &args.name {
            Some(name) => format!("Connected to {} as {name}.", args.addr),
            None => format!("Connected to {}. Type your name first.", args.addr),
        };
        eprintln!("{first} Send messages as `name1, name2: message`; Ctrl-D quits.");
    }
    let reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(e) => {
            eprintln!("chatd-client: {e}");
            return ExitCode::from(1);
        }
    };
    // The printer decides the exit status: it ends the process when the
    // server closes, even while stdin is still open. It learns from the
    // sender whether the sending side failed.
    let sending = Arc::new(Sending::default());
    let outcome = Arc::clone(&sending);
    thread::spawn(move || std::process::exit(print_server_lines(reader, &outcome)));
    send_stdin_lines(stream, args.name.as_deref(), &sending);
    // Stdin ended and the sending side is shut down: wait for the server.
    loop {
        thread::park();
    }
}

/// How long the printer, at the end of the connection, waits for a write
/// still under way to end. A reset wakes both threads and only the first
/// to ask the socket sees the error: when that is the sender, the printer
/// sees a plain EOF and must wait for the sender's word. The wait is
/// bounded for a server that half-closes and then stops reading.
const SEND_SETTLE: Duration = Duration::from_secs(1);

/// What the sending side tells the printer: whether a write is under way,
/// and the socket error that ended sending, if one did.
#[derive(Default)]
struct Sending {
    /// The state, changed by the sender only.
    state: Mutex<SendState>,
    /// Signalled when a write ends.
    ended: Condvar,
}

#[derive(Default)]
struct SendState {
    /// A write (or the half-close) is under way.
    writing: bool,
    /// The socket error that ended sending: the connection failed.
    failed: Option<io::Error>,
}

impl Sending {
    /// Runs `write` on the socket as the sender's one write in progress,
    /// and keeps its error for the printer; false if it failed.
    fn write(&self, write: impl FnOnce() -> io::Result<()>) -> bool {
        self.state.lock().unwrap().writing = true;
        let result = write();
        let mut state = self.state.lock().unwrap();
        state.writing = false;
        let ok = result.is_ok();
        if let Err(e) = result {
            state.failed.get_or_insert(e);
        }
        self.ended.notify_all();
        ok
    }

    /// The error that ended sending, once any write under way has ended
    /// (waiting at most [`SEND_SETTLE`] for it).
    fn failure(&self) -> Option<io::Error> {
        let state = self.state.lock().unwrap();
        let (mut state, _) = self
            .ended
            .wait_timeout_while(state, SEND_SETTLE, |state| state.writing)
            .unwrap();
        state.failed.take()
    }
}

/// Sends the name (if given) and every stdin line, then half-closes. A
/// socket error ends sending; it is left in `sending` for the printer,
/// which reports it and exits 1.
fn send_stdin_lines(stream: TcpStream, name: Option<&str>, sending: &Sending) {
    let mut stream = &stream;
    if let Some(name) = name {
        if !sending.write(|| stream.write_all(format!("{name}\n").as_bytes())) {
            return;
        }
    }
    let mut stdin = io::stdin().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                if !sending.write(|| stream.write_all(&line)) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("chatd-client: reading stdin: {e}");
                break;
            }
        }
    }
    sending.write(|| stream.shutdown(Shutdown::Write));
}

/// The most bytes of one line held before printing them: a longer line is
/// printed in pieces, so a server that never ends a line cannot make the
/// client's memory grow without bound.
const PIECE: usize = 64 * 1024;

/// Prints server lines until the server closes; returns the exit status:
/// 1 if the connection ended in a socket error, on this side or on the
/// sender's, or after an `error:` line that closes it; else 0.
fn print_server_lines(stream: TcpStream, sending: &Sending) -> i32 {
    let mut reader = BufReader::new(stream);
    let stdout = io::stdout();
    // Whatever goes to a terminal is escaped, on stdout and on stderr alike:
    // either may be the screen while the other is redirected.
    let escape_out = stdout.is_terminal();
    let escape_err = io::stderr().is_terminal();
    // On a terminal, stdout and stderr are usually the same screen: show
    // error lines once there.
    let errors_to_stderr = !(escape_out && escape_err);
    let mut out = stdout.lock();
    // The unprinted part of the current line: all of it, or its next piece
    // (after up to 3 bytes of a character the previous piece cut in two).
    let mut piece = Vec::with_capacity(PIECE);
    let mut line_start = true;
    let mut copy_to_stderr = false;
    let mut closing_error = false;
    loop {
        let room = (PIECE - piece.len()) as u64;
        let (ended, lost) = match reader.by_ref().take(room).read_until(b'\n', &mut piece) {
            Ok(0) => (true, None),
            Ok(_) => (false, None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => (true, Some(e)),
        };
        if line_start && !piece.is_empty() {
            closing_error = ends_connection(&piece);
            copy_to_stderr = errors_to_stderr && piece.starts_with(b"error: ");
        }
        line_start = piece.ends_with(b"\n");
        // A piece of a longer line stops before a character cut in two, so
        // escaping it shows the same as escaping the whole line would.
        let shown = if line_start || ended {
            piece.len()
        } else {
            piece.len() - cut_character(&piece)
        };
        let text = &piece[..shown];
        let written = if escape_out {
            out.write_all(escape_line(text).as_bytes())
        } else {
            out.write_all(text)
        };
        if written.is_err() {
            return 1; // stdout is gone: nobody to show anything to
        }
        if copy_to_stderr {
            let _ = if escape_err {
                io::stderr().write_all(escape_line(text).as_bytes())
            } else {
                io::stderr().write_all(text)
            };
        }
        piece.drain(..shown);
        if ended {
            let _ = out.flush();
            return match lost.or_else(|| sending.failure()) {
                Some(e) => {
                    eprintln!("chatd-client: connection lost: {e}");
                    1
                }
                None => i32::from(closing_error),
            };
        }
        if reader.buffer().is_empty() {
            let _ = out.flush(); // show lines as they arrive, in batches
        }
    }
}

/// How many bytes at the end of `bytes` are the start of a UTF-8 character
/// that more bytes could complete (0 to 3).
fn cut_character(bytes: &[u8]) -> usize {
    // The last character starts at the last byte that is not a
    // continuation byte (`10xxxxxx`); only 4 bytes back can matter.
    let Some(back) = bytes.iter().rev().take(4).position(|&b| b & 0xc0 != 0x80) else {
        return 0;
    };
    let start = bytes.len() - 1 - back;
    match std::str::from_utf8(&bytes[start..]) {
        Err(e) if e.error_len().is_none() => bytes.len() - start,
        _ => 0, // complete, or invalid whatever follows
    }
}

/// Whether `line` is an `error:` line after which the server closes.
fn ends_connection(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"error: ") else {
        return false;
    };
    ErrorKind::of_line(rest).is_some_and(ErrorKind::closes)
}

/// A received line made safe for a terminal: control characters, escape
/// sequences and bidirectional overrides are shown as visible escapes
/// (`\x1b`, `\u{202e}`) instead of acting on the screen. The final `\n` stays.
fn escape_line(line: &[u8]) -> String {
    let (body, newline) = match line.strip_suffix(b"\n") {
        Some(body) => (body, "\n"),
        None => (line, ""),
    };
    let mut shown = String::with_capacity(body.len());
    for c in String::from_utf8_lossy(body).chars() {
        match c {
            '\\' => shown.push_str("\\\\"),
            c if (c as u32) < 0x80 && c.is_control() => {
                shown.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() || is_bidi_control(c) => {
                shown.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => shown.push(c),
        }
    }
    shown.push_str(newline);
    shown
}

/// Unicode's invisible direction controls, which can reorder what a line
/// appears to say.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_act_on_a_terminal() {
        let cases: &[(&[u8], &str)] = &[
            (b"from a: hi\n", "from a: hi\n"),
            (b"from a: \x1b[2J\x07bell\n", "from a: \\x1b[2J\\x07bell\n"),
            (b"from a: tab\there\r\n", "from a: tab\\x09here\\x0d\n"),
            ("from a: \u{9b}31m".as_bytes(), "from a: \\u{9b}31m"),
            ("from a: \u{202e}olleh".as_bytes(), "from a: \\u{202e}olleh"),
            (b"from a: back\\slash\n", "from a: back\\\\slash\n"),
            (
                "from a: caf\u{e9} \u{1f600}\n".as_bytes(),
                "from a: caf\u{e9} \u{1f600}\n",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(escape_line(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn pieces_of_a_line_escape_like_the_whole_line() {
        let mut line = "a\u{e9}\u{1f600}\u{202e}\x1b[1m\\\u{9b}z\r"
            .as_bytes()
            .to_vec();
        line.extend_from_slice(&[0xf0, 0x9f, b'x', 0x80, 0xe2, 0x82]);
        let whole = escape_line(&line);
        for cut in 0..=line.len() {
            let kept = cut - cut_character(&line[..cut]);
            let pieces = escape_line(&line[..kept]) + &escape_line(&line[kept..]);
            assert_eq!(pieces, whole, "cut after {cut} bytes");
        }
    }

    #[test]
    fn knows_which_errors_end_the_connection() {
        assert!(ends_connection(b"error: name-taken: alice\n"));
        assert!(ends_connection(b"error: shutting-down\n"));
        assert!(ends_connection(b"error: server-full\n"));
        assert!(ends_connection(b"error: slow-consumer\n"));
        assert!(!ends_connection(b"error: not-online: bob\n"));
        assert!(!ends_connection(b"error: invalid-utf8\n"));
        assert!(!ends_connection(b"from error: name-taken: x\n"));
        assert!(!ends_connection(b"error: name-takenx\n"));
        assert!(ends_connection(b"error: unavailable\n"));
        assert!(ends_connection(b"error: unavailable\r\n"));
        assert!(!ends_connection(b"error: unavailable: bob, carol\n"));
    }
}
