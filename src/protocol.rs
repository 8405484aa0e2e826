//! The wire protocol (v1) as pure functions over byte slices.
//!
//! Nothing here does I/O or allocates per line: framing borrows lines from the
//! caller's buffer, parsing borrows names and messages from the line, and the
//! only writer appends to a caller-owned `Vec`. The reactor decides what to do
//! with each outcome.

use std::fmt;

/// The longest login name, in bytes.
pub const NAME_MAX: usize = 64;

/// What [`next_line`] found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line, without its `\n` or the `\r` before it.
    /// `consumed` counts the bytes to drop from the buffer, terminator included.
    Line { line: &'a [u8], consumed: usize },
    /// No `\n` yet and the bytes so far could still become a valid line.
    Partial,
    /// The line is longer than the limit: the connection must be closed.
    TooLong,
}

/// Finds the first line in `buf`, looking at no more than `max_line + 2` bytes
/// (the longest allowed line plus `\r\n`), so a flood without newlines is
/// rejected as soon as the limit is passed instead of being buffered.
pub fn next_line(buf: &[u8], max_line: usize) -> Frame<'_> {
    let window = &buf[..buf.len().min(max_line.saturating_add(2))];
    match memchr::memchr(b'\n', window) {
        Some(end) => {
            let line = strip_cr(&buf[..end]);
            if line.len() > max_line {
                Frame::TooLong
            } else {
                Frame::Line {
                    line,
                    consumed: end + 1,
                }
            }
        }
        None if is_too_long_partial(buf, max_line) => Frame::TooLong,
        None => Frame::Partial,
    }
}

/// How [`split_lines`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split<'a> {
    /// Every complete line was handled; this unterminated tail remains (to
    /// be kept and put in front of the next read).
    Tail(&'a [u8]),
    /// The callback asked to stop; these bytes after the last line handled
    /// were not looked at.
    Stopped(&'a [u8]),
    /// A line passed the limit; the lines before it were handled.
    TooLong,
}

/// Calls `on_line` with each complete line at the front of `data`, in
/// order, while it returns true. This is the reactor's whole framing step
/// for one read, so the fuzzers and property tests drive the same code.
pub fn split_lines<'a>(
    mut data: &'a [u8],
    max_line: usize,
    mut on_line: impl FnMut(&'a [u8]) -> bool,
) -> Split<'a> {
    loop {
        match next_line(data, max_line) {
            Frame::Line { line, consumed } => {
                data = &data[consumed..];
                if !on_line(line) {
                    return Split::Stopped(data);
                }
            }
            Frame::Partial => return Split::Tail(data),
            Frame::TooLong => return Split::TooLong,
        }
    }
}

/// Splits a byte stream into lines the way the reactor does across reads:
/// each chunk is appended to the tail the previous one left. For tests and
/// fuzzing: `push` returns false once a line was too long (the reactor
/// closes the connection then), and `finish` hands over the last,
/// unterminated line as EOF does.
#[derive(Debug, Default)]
pub struct Framer {
    /// The unterminated tail (at most `max_line + 1` bytes).
    tail: Vec<u8>,
    /// Whether a too-long line ended the stream.
    failed: bool,
}

impl Framer {
    /// Feeds one read's worth of bytes; `on_line` gets each complete line.
    pub fn push(&mut self, chunk: &[u8], max_line: usize, mut on_line: impl FnMut(&[u8])) -> bool {
        if self.failed {
            return false;
        }
        let mut data = std::mem::take(&mut self.tail);
        data.extend_from_slice(chunk);
        match split_lines(&data, max_line, |line| {
            on_line(line);
            true
        }) {
            Split::Tail(tail) => self.tail = tail.to_vec(),
            Split::Stopped(_) | Split::TooLong => self.failed = true,
        }
        !self.failed
    }

    /// Ends the stream: the unterminated last line, if any and if the stream
    /// did not fail.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.failed && !self.tail.is_empty()).then_some(self.tail)
    }
}

/// Whether an unterminated tail already proves its line too long: more than
/// `max_line` bytes that are not just a line of `max_line` waiting for `\r\n`.
pub fn is_too_long_partial(tail: &[u8], max_line: usize) -> bool {
    tail.len() > max_line.saturating_add(1)
        || (tail.len() == max_line.saturating_add(1) && tail.last() != Some(&b'\r'))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    match line {
        [rest @ .., b'\r'] => rest,
        _ => line,
    }
}

/// Decodes one line: `Ok(None)` for an empty or whitespace-only line (ignored
/// by the protocol), `Ok(Some(text))` with surrounding whitespace kept.
pub fn decode(line: &[u8]) -> Result<Option<&str>, InvalidUtf8> {
    let text = std::str::from_utf8(line).map_err(|_| InvalidUtf8)?;
    Ok(if text.trim().is_empty() {
        None
    } else {
        Some(text)
    })
}

/// The line was not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Why a login name was refused; [`fmt::Display`] gives the text after
/// `error: invalid-name: `.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    TooLong,
    Whitespace,
    Comma,
    Colon,
    Control,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameError::TooLong => "longer than 64 bytes",
            NameError::Whitespace => "contains whitespace",
            NameError::Comma => "contains ','",
            NameError::Colon => "contains ':'",
            NameError::Control => "contains a control character",
        })
    }
}

/// Validates a login line (already decoded and not blank) and returns the
/// name, trimmed of surrounding whitespace.
pub fn parse_name(text: &str) -> Result<&str, NameError> {
    let name = text.trim();
    if name.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    for c in name.chars() {
        let why = match c {
            ',' => NameError::Comma,
            ':' => NameError::Colon,
            c if c.is_whitespace() => NameError::Whitespace,
            c if c.is_control() => NameError::Control,
            _ => continue,
        };
        return Err(why);
    }
    Ok(name)
}

/// A message line split into its parts, both borrowed from the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Everything before the first `:`; iterate with [`recipients`].
    pub names: &'a str,
    /// Everything after the first `:`, trimmed.
    pub body: &'a str,
}

/// The line had no `:` or named nobody before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRecipients;

/// Splits `name1, name2: message` at the first `:`.
pub fn parse_message(text: &str) -> Result<Message<'_>, NoRecipients> {
    let (names, body) = text.split_once(':').ok_or(NoRecipients)?;
    if recipients(names).next().is_none() {
        return Err(NoRecipients);
    }
    Ok(Message {
        names,
        body: body.trim(),
    })
}

/// The recipient names of a message, trimmed, empty ones skipped, in the
/// order given (duplicates included: the router collapses them).
pub fn recipients(names: &str) -> impl Iterator<Item = &str> {
    names.split(',').map(str::trim).filter(|n| !n.is_empty())
}

/// Appends the line every recipient receives: `from <sender>: <body>\n`.
pub fn write_delivery(out: &mut Vec<u8>, sender: &str, body: &str) {
    out.extend_from_slice(b"from ");
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
}

/// The longest delivery line (`from <sender>: <body>\n`) that a line of
/// `max_line` bytes can produce: `--max-outbound` must hold at least one.
pub fn longest_delivery(max_line: usize) -> usize {
    "from ".len() + NAME_MAX + ": ".len() + max_line + 1
}

/// Bytes of names a `not-online` line lists at the most (fewer when
/// `--max-line` is smaller); the rest are counted as `: and N more`, so the
/// line always fits in `--max-outbound` (which holds [`longest_delivery`]).
pub fn not_online_budget(max_line: usize) -> usize {
    (max_line + 20).min(1024)
}

/// Every kind of `error:` line the server sends; the discriminant indexes the
/// per-kind counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidName,
    NameTaken,
    LineTooLong,
    InvalidUtf8,
    NotOnline,
    NoRecipients,
    LoginTimeout,
    IdleTimeout,
    ServerFull,
    ShuttingDown,
    SlowConsumer,
    /// Cluster mode: Redis cannot be reached, or the node's lease could not
    /// be renewed: the connection is closed (`error: unavailable`).
    Unavailable,
    /// Cluster mode: these recipients could not be reached through Redis
    /// (`error: unavailable: <names>`); the connection stays.
    UnavailableTo,
}

impl ErrorKind {
    /// Every kind, in discriminant order.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::InvalidName,
        ErrorKind::NameTaken,
        ErrorKind::LineTooLong,
        ErrorKind::InvalidUtf8,
        ErrorKind::NotOnline,
        ErrorKind::NoRecipients,
        ErrorKind::LoginTimeout,
        ErrorKind::IdleTimeout,
        ErrorKind::ServerFull,
        ErrorKind::ShuttingDown,
        ErrorKind::SlowConsumer,
        ErrorKind::Unavailable,
        ErrorKind::UnavailableTo,
    ];

    /// The word after `error: ` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidName => "invalid-name",
            ErrorKind::NameTaken => "name-taken",
            ErrorKind::LineTooLong => "line-too-long",
            ErrorKind::InvalidUtf8 => "invalid-utf8",
            ErrorKind::NotOnline => "not-online",
            ErrorKind::NoRecipients => "no-recipients",
            ErrorKind::LoginTimeout => "login-timeout",
            ErrorKind::IdleTimeout => "idle-timeout",
            ErrorKind::ServerFull => "server-full",
            ErrorKind::ShuttingDown => "shutting-down",
            ErrorKind::SlowConsumer => "slow-consumer",
            ErrorKind::Unavailable | ErrorKind::UnavailableTo => "unavailable",
        }
    }

    /// A name for counting, unique per kind (the two `unavailable` lines
    /// share their word on the wire).
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::UnavailableTo => "unavailable-recipients",
            other => other.as_str(),
        }
    }

    /// The kind of a received `error:` line, given what follows `error: `.
    /// The two `unavailable` lines differ by their detail: the one that
    /// closes has none.
    pub fn of_line(rest: &[u8]) -> Option<ErrorKind> {
        let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
        let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
        ErrorKind::ALL.into_iter().find(|kind| {
            let word = kind.as_str().as_bytes();
            let detail = rest
                .strip_prefix(word)
                .map(|after| after.starts_with(b": "));
            match (kind, detail) {
                (ErrorKind::Unavailable, Some(has)) => !has && rest == word,
                (ErrorKind::UnavailableTo, Some(has)) => has,
                (_, Some(has)) => has || rest == word,
                (_, None) => false,
            }
        })
    }

    /// Whether the server closes the connection after sending this error.
    pub fn closes(self) -> bool {
        !matches!(
            self,
            ErrorKind::InvalidUtf8
                | ErrorKind::NotOnline
                | ErrorKind::NoRecipients
                | ErrorKind::UnavailableTo
        )
    }
}

/// Appends `error: <kind>[: <detail>]\n`.
pub fn write_error(out: &mut Vec<u8>, kind: ErrorKind, detail: fmt::Arguments<'_>) {
    use std::io::Write;
    out.extend_from_slice(b"error: ");
    out.extend_from_slice(kind.as_str().as_bytes());
    let start = out.len();
    // Writing to a Vec cannot fail.
    let _ = out.write_fmt(format_args!(": {detail}"));
    if out.len() == start + 2 {
        out.truncate(start);
    }
    out.push(b'\n');
}

/// The detail of every `no-recipients` error.
pub const NO_RECIPIENTS_DETAIL: &str = "expected \"name1, name2: message\"";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, any};

    fn frames(mut buf: &[u8], max: usize) -> (Vec<&[u8]>, Frame<'_>) {
        let mut lines = Vec::new();
        loop {
            match next_line(buf, max) {
                Frame::Line { line, consumed } => {
                    lines.push(line);
                    buf = &buf[consumed..];
                }
                other => return (lines, other),
            }
        }
    }

    #[test]
    fn framing_table() {
        type Case = (
            &'static [u8],
            usize,
            &'static [&'static [u8]],
            Frame<'static>,
        );
        let cases: &[Case] = &[
            (b"", 8, &[], Frame::Partial),
            (b"abc", 8, &[], Frame::Partial),
            (b"abc\n", 8, &[b"abc"], Frame::Partial),
            (b"abc\r\n", 8, &[b"abc"], Frame::Partial),
            (b"a\r\rb\n", 8, &[b"a\r\rb"], Frame::Partial),
            (b"\n\r\n", 8, &[b"", b""], Frame::Partial),
            (b"a\nb", 8, &[b"a"], Frame::Partial),
            // Exactly the limit, with either terminator, is fine.
            (b"12345678\n", 8, &[b"12345678"], Frame::Partial),
            (b"12345678\r\n", 8, &[b"12345678"], Frame::Partial),
            // A line of the limit waiting for its \n after \r is still partial.
            (b"12345678\r", 8, &[], Frame::Partial),
            (b"12345678", 8, &[], Frame::Partial),
            // One past the limit.
            (b"123456789\n", 8, &[], Frame::TooLong),
            (b"123456789", 8, &[], Frame::TooLong),
            (b"123456789\r\n", 8, &[], Frame::TooLong),
            (b"ok\n123456789xyz", 8, &[b"ok"], Frame::TooLong),
        ];
        for (input, max, want_lines, want_end) in cases {
            let (lines, end) = frames(input, *max);
            assert_eq!(&lines, want_lines, "input {input:?}");
            assert_eq!(end, *want_end, "input {input:?}");
        }
    }

    #[test]
    fn decode_table() {
        assert_eq!(decode(b""), Ok(None));
        assert_eq!(decode(b" \t "), Ok(None));
        assert_eq!(decode("\u{3000}".as_bytes()), Ok(None));
        assert_eq!(decode(b" hi "), Ok(Some(" hi ")));
        assert_eq!(decode(b"\xff"), Err(InvalidUtf8));
        assert_eq!(decode(b"ok \xc3"), Err(InvalidUtf8));
    }

    #[test]
    fn name_table() {
        let long = "x".repeat(65);
        let cases: &[(&str, Result<&str, NameError>)] = &[
            ("alice", Ok("alice")),
            ("  alice \t", Ok("alice")),
            ("élodie", Ok("élodie")),
            (&long[..64], Ok(&long[..64])),
            (&long, Err(NameError::TooLong)),
            ("a b", Err(NameError::Whitespace)),
            ("a\u{a0}b", Err(NameError::Whitespace)),
            ("a,b", Err(NameError::Comma)),
            ("a:b", Err(NameError::Colon)),
            ("a\x1bb", Err(NameError::Control)),
            ("a\u{7f}", Err(NameError::Control)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_name(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn message_table() {
        type Case = (
            &'static str,
            Result<(&'static str, &'static str), NoRecipients>,
        );
        let cases: &[Case] = &[
            ("bob: hi", Ok(("bob", "hi"))),
            ("bob:hi", Ok(("bob", "hi"))),
            ("  bob , carol :  a: b  ", Ok(("  bob , carol ", "a: b"))),
            ("bob:", Ok(("bob", ""))),
            ("hello", Err(NoRecipients)),
            (": hi", Err(NoRecipients)),
            (" , ,: hi", Err(NoRecipients)),
        ];
        for (input, want) in cases {
            let got = parse_message(input).map(|m| (m.names, m.body));
            assert_eq!(got, *want, "input {input:?}");
        }
    }

    #[test]
    fn recipients_trim_skip_and_keep_order() {
        let got: Vec<&str> = recipients(" bob,, carol ,bob , ").collect();
        assert_eq!(got, ["bob", "carol", "bob"]);
    }

    /// What framing must produce for a whole stream: its lines (without
    /// `\n` and one `\r` before it) up to the first too-long one, whether
    /// one was too long, and the unterminated last line.
    fn model(input: &[u8], max: usize) -> (Vec<Vec<u8>>, bool, Option<Vec<u8>>) {
        let mut lines = Vec::new();
        let mut rest = input;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
            if line.len() > max {
                return (lines, true, None);
            }
            lines.push(line.to_vec());
            rest = &rest[end + 1..];
        }
        if is_too_long_partial(rest, max) {
            return (lines, true, None);
        }
        (lines, false, (!rest.is_empty()).then(|| rest.to_vec()))
    }

    proptest::proptest! {
        /// Framing gives the same lines however the stream is split into
        /// reads, and they are the model's lines.
        #[test]
        fn framing_is_independent_of_read_boundaries(
            input in proptest::collection::vec(
                proptest::prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()],
                0..200,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..12),
            max in 1usize..24,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= input.len()).collect();
            cuts.sort_unstable();
            let mut framer = Framer::default();
            let mut lines = Vec::new();
            let mut ok = true;
            let mut start = 0;
            for end in cuts.into_iter().chain([input.len()]) {
                ok = framer.push(&input[start..end], max, |l| lines.push(l.to_vec())) && ok;
                start = end;
            }
            let last = framer.finish();
            let (want_lines, want_failed, want_last) = model(&input, max);
            proptest::prop_assert_eq!(lines, want_lines);
            proptest::prop_assert_eq!(!ok, want_failed);
            proptest::prop_assert_eq!(last, want_last);
        }
    }

    #[test]
    fn writers_produce_exact_lines() {
        let mut out = Vec::new();
        write_delivery(&mut out, "carol", "hello");
        write_error(&mut out, ErrorKind::ServerFull, format_args!(""));
        write_error(
            &mut out,
            ErrorKind::LineTooLong,
            format_args!("max {} bytes", 16),
        );
        assert_eq!(
            out,
            b"from carol: hello\nerror: server-full\nerror: line-too-long: max 16 bytes\n"
        );
    }
}
