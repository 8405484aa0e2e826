//! WebSocket (RFC 6455) as pure functions over byte slices: the opening
//! handshake, the client frames decoded and unmasked in place, the server's
//! frames. No I/O, no allocation per frame; the reactor's side is
//! `server/websocket.rs`.
//!
//! A WebSocket connection keeps no frame state while it is idle: between
//! messages, with nothing unread, it is a TCP connection with two flag bits
//! set. Mid-message, its [`InState`] rides in the pooled buffer that keeps
//! its unread input, beside the bytes.
//!
//! What a text message means is the line protocol's: [`decode`] turns each
//! one into its lines, with a line end after the message, so the framing,
//! the limits and the broker are those of TCP.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The longest opening handshake accepted, headers included.
pub const MAX_REQUEST: usize = 8 * 1024;
/// The most bytes a frame header takes: two, eight of length, four of mask.
pub const MAX_HEADER: usize = 14;
/// The most bytes of a control frame's payload (RFC 6455, 5.5).
pub const MAX_CONTROL: usize = 125;

/// Close codes the server sends (RFC 6455, 7.4.1; 1013 from IANA's registry).
pub mod code {
    /// The purpose of the connection was fulfilled.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutting down).
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the framing rules.
    pub const PROTOCOL: u16 = 1002;
    /// A binary message: chatd takes text.
    pub const UNSUPPORTED: u16 = 1003;
    /// A text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// The client broke the chat protocol's rules.
    pub const POLICY: u16 = 1008;
    /// A message longer than `--max-line`.
    pub const TOO_BIG: u16 = 1009;
    /// The server is full or cannot reach its cluster: try again later.
    pub const TRY_AGAIN: u16 = 1013;
}

/// Frame opcodes.
pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The GUID every `Sec-WebSocket-Accept` is computed with (RFC 6455, 1.3).
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

// ---------------------------------------------------------------------
// The opening handshake

/// What an HTTP request on the WebSocket listener asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Not complete yet (and still within [`MAX_REQUEST`]).
    Partial,
    /// A valid upgrade: answer `101` with this `Sec-WebSocket-Accept`.
    Upgrade { accept: [u8; 28] },
    /// `GET /` without an upgrade: the built-in web client.
    Page,
    /// Another path without an upgrade.
    NotFound,
    /// An upgrade for a version other than 13 (answer 426).
    WrongVersion,
    /// Anything else: answer 400 with this reason.
    Bad(&'static str),
}

/// Parses the request at the front of `buf`. Returns what it asks for and
/// the bytes it took (what follows is already the client's first frames).
pub fn parse_request(buf: &[u8]) -> (Request, usize) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => return (Request::Partial, 0),
        Ok(httparse::Status::Partial) => return (Request::Bad("request too large"), buf.len()),
        Err(httparse::Error::TooManyHeaders) => return (Request::Bad("too many headers"), 0),
        Err(_) => return (Request::Bad("malformed request"), 0),
    };
    if consumed > MAX_REQUEST {
        return (Request::Bad("request too large"), consumed);
    }
    (what_it_asks(&req), consumed)
}

fn what_it_asks(req: &httparse::Request<'_, '_>) -> Request {
    if req.method != Some("GET") {
        return Request::Bad("only GET is served");
    }
    if req.version != Some(1) {
        return Request::Bad("HTTP/1.1 required");
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|value| {
            value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    if header("upgrade").is_none() {
        let path = req.path.unwrap_or("");
        let path = path.split('?').next().unwrap_or("");
        return match path {
            "/" | "/index.html" => Request::Page,
            _ => Request::NotFound,
        };
    }
    if !has_token("upgrade", "websocket") {
        return Request::Bad("Upgrade is not websocket");
    }
    if !has_token("connection", "upgrade") {
        return Request::Bad("Connection does not say Upgrade");
    }
    if header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Request::WrongVersion;
    }
    let Some(key) = header("sec-websocket-key").map(<[u8]>::trim_ascii) else {
        return Request::Bad("no Sec-WebSocket-Key");
    };
    let keys = req.headers.iter();
    if keys
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .count()
        > 1
    {
        return Request::Bad("Sec-WebSocket-Key given twice");
    }
    let engine = base64::engine::general_purpose::STANDARD;
    match engine.decode(key) {
        Ok(nonce) if nonce.len() == 16 => Request::Upgrade {
            accept: accept_key(key),
        },
        _ => Request::Bad("Sec-WebSocket-Key is not 16 bytes in base64"),
    }
}

/// `Sec-WebSocket-Accept` for a client's key: base64 of the SHA-1 of the key
/// and the GUID.
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    let digest = sha.finalize();
    let mut out = [0; 28];
    let engine = base64::engine::general_purpose::STANDARD;
    let n = engine
        .encode_slice(digest, &mut out)
        .expect("20 bytes are 28 in base64");
    debug_assert_eq!(n, 28);
    out
}

/// Appends the `101 Switching Protocols` answer. No extension and no
/// subprotocol is accepted: permessage-deflate would cost a zlib context
/// per connection.
pub fn write_upgrade(out: &mut Vec<u8>, accept: &[u8; 28]) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a whole HTTP response that ends the connection.
pub fn write_response(out: &mut Vec<u8>, status: &str, extra: &str, body: &[u8]) {
    let content_type = if status.starts_with("200") {
        "text/html; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Connection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
             {extra}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
}

/// The web client's page headers: it may run only its own inline script
/// and style, and talk only to this server.
pub const PAGE_HEADERS: &str = "Content-Security-Policy: default-src 'none'; \
    script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; \
    img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n";

/// The built-in web client, served at `GET /`.
pub const PAGE: &str = include_str!("ws/page.html");

// ---------------------------------------------------------------------
// Client frames

/// Where a connection is in the client's frames between reads: kept with
/// its unread input (`pool::Buf::ws`), default while it is between
/// messages with nothing unread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InState {
    /// Undecoded bytes at the end of the kept input: an incomplete frame.
    pub raw: u32,
    /// Payload bytes of the message being received, so far.
    pub msg_len: u32,
    /// The message being received: 0 none, else its opcode (text or binary).
    pub message: u8,
    /// UTF-8 validation of the text message being received.
    pub utf8: Utf8,
}

/// Echo mode: a data frame's payload, unmasked, with its opcode (0 for a
/// continuation) and whether it ends its message.
#[derive(Debug, PartialEq, Eq)]
pub struct Data<'a> {
    pub payload: &'a [u8],
    pub opcode: u8,
    pub fin: bool,
}

/// Why [`decode`] stopped before the end of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A ping, whose payload is `buf[.0...1]`: answer it once the text
    /// before it is handled (so that the pong comes after the answers to
    /// the lines sent before the ping), then decode on from `raw_start`.
    Ping(usize, usize),
    /// The client's Close frame, with the code to answer with.
    Close(u16),
    /// The client broke the rules: fail the connection with this code.
    Fail(u16, &'static str),
}

/// What [`decode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The decoded text ends here (it starts at the `out` passed in).
    pub text_end: usize,
    /// The first byte not decoded: an incomplete frame runs from here to the
    /// end of the input (after a ping: the frames after it; after a Close
    /// or a failure, the rest is ignored).
    pub raw_start: usize,
    /// Why it stopped early, if it did.
    pub stop: Option<Stop>,
}

/// Decodes the client frames in `buf[start..]`, unmasking in place.
///
/// With `lines` (chat mode), text messages are moved down to
/// `buf[out..]`, each followed by `\n`, so that the caller frames lines
/// from one slice exactly as it does for TCP; binary messages fail with
/// 1003. Without (echo mode), each data frame is handed to `on_data`.
/// `out <= start`: every frame header is at least six bytes, so the text
/// never overtakes the frames it comes from. It stops at each ping. Messages longer than `max_message` fail with
/// 1009 as soon as a frame header says so; invalid UTF-8 fails with 1007
/// once its frame is complete, fragments included.
pub fn decode(
    buf: &mut [u8],
    out: usize,
    start: usize,
    state: &mut InState,
    max_message: usize,
    lines: bool,
    mut on_data: impl FnMut(Data<'_>),
) -> Decoded {
    debug_assert!(out <= start);
    let (mut w, mut r) = (out, start);
    let stop = loop {
        let frame = match frame_at(&buf[r..], state, max_message, lines) {
            Ok(Some(frame)) => frame,
            Ok(None) => break None,
            Err(stop) => break Some(stop),
        };
        let p = r + frame.header;
        let payload = &mut buf[p..p + frame.len];
        unmask(payload, frame.mask);
        r = p + frame.len;
        match frame.opcode {
            PING => break Some(Stop::Ping(p, r)),
            PONG => {}
            CLOSE => break Some(close_code(&buf[p..r])),
            opcode => {
                if opcode != CONTINUATION {
                    state.message = opcode;
                    state.msg_len = 0;
                    state.utf8 = Utf8::default();
                }
                let text = state.message == TEXT;
                if text && !state.utf8.feed(&buf[p..r]) {
                    break Some(Stop::Fail(code::INVALID_DATA, "invalid UTF-8"));
                }
                if frame.fin && text && !state.utf8.is_complete() {
                    break Some(Stop::Fail(code::INVALID_DATA, "invalid UTF-8"));
                }
                state.msg_len += frame.len as u32;
                if lines {
                    buf.copy_within(p..r, w);
                    w += frame.len;
                    if frame.fin {
                        buf[w] = b'\n';
                        w += 1;
                    }
                } else {
                    on_data(Data {
                        payload: &buf[p..r],
                        opcode,
                        fin: frame.fin,
                    });
                }
                if frame.fin {
                    state.message = 0;
                    state.msg_len = 0;
                }
            }
        }
    };
    Decoded {
        text_end: w,
        raw_start: r,
        stop,
    }
}

/// Decodes a client's byte stream the way the reactor does across reads:
/// each chunk goes after the text of the message not ended yet and the
/// bytes of the incomplete frame that the last one left. For tests and
/// fuzzing (the reactor keeps the same two parts in a connection's pooled
/// buffer, see `server/websocket.rs`).
#[derive(Debug, Default)]
pub struct Reader {
    /// The text not ended yet, then `state.raw` bytes of an incomplete frame.
    kept: Vec<u8>,
    state: InState,
    stopped: Option<Stop>,
}

/// What a [`Reader`] made of the stream so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decodings {
    /// Chat mode: the text of every message, each followed by `\n` (a
    /// message not ended yet is not in it).
    pub text: Vec<u8>,
    /// Pings and (echo mode) data frames, in order, as `(opcode, fin,
    /// payload)`: 9 for a ping.
    pub events: Vec<(u8, bool, Vec<u8>)>,
    /// Why decoding stopped, if it did.
    pub stop: Option<Stop>,
}

impl Reader {
    /// Feeds one read's worth of bytes.
    pub fn push(&mut self, chunk: &[u8], max_message: usize, lines: bool, out: &mut Decodings) {
        if self.stopped.is_some() {
            return;
        }
        let text_len = self.kept.len() - self.state.raw as usize;
        let mut buf = std::mem::take(&mut self.kept);
        buf.extend_from_slice(chunk);
        let (mut text_end, mut start) = (text_len, text_len);
        let decoded = loop {
            let events = &mut out.events;
            let decoded = decode(
                &mut buf,
                text_end,
                start,
                &mut self.state,
                max_message,
                lines,
                |d| events.push((d.opcode, d.fin, d.payload.to_vec())),
            );
            text_end = decoded.text_end;
            start = decoded.raw_start;
            match decoded.stop {
                Some(Stop::Ping(a, b)) => out.events.push((PING, true, buf[a..b].to_vec())),
                _ => break decoded,
            }
        };
        // Whole messages go out; the text of one not ended stays.
        let text = &buf[..decoded.text_end];
        let ended = memchr::memrchr(b'\n', text).map_or(0, |i| i + 1);
        out.text.extend_from_slice(&text[..ended]);
        if let Some(stop) = decoded.stop {
            self.stopped = Some(stop);
            out.stop = Some(stop);
            return;
        }
        let mut kept = text[ended..].to_vec();
        kept.extend_from_slice(&buf[decoded.raw_start..]);
        self.state.raw = (buf.len() - decoded.raw_start) as u32;
        self.kept = kept;
    }
}

/// A frame header, checked.
struct Frame {
    opcode: u8,
    fin: bool,
    /// Header bytes, mask included.
    header: usize,
    /// Payload bytes.
    len: usize,
    mask: [u8; 4],
}

/// The frame at the front of `buf` if it is all there (`None`: wait for
/// more), or why the connection fails. Each rule is checked as soon as the
/// bytes it needs are in.
fn frame_at(
    buf: &[u8],
    state: &InState,
    max_message: usize,
    lines: bool,
) -> Result<Option<Frame>, Stop> {
    let fail = |code, why| Err(Stop::Fail(code, why));
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if b0 & 0x70 != 0 {
        return fail(code::PROTOCOL, "reserved bits set");
    }
    if b1 & 0x80 == 0 {
        return fail(code::PROTOCOL, "client frame not masked");
    }
    let len7 = usize::from(b1 & 0x7F);
    match opcode {
        CLOSE | PING | PONG if !fin => return fail(code::PROTOCOL, "fragmented control frame"),
        CLOSE | PING | PONG if len7 > MAX_CONTROL => {
            return fail(code::PROTOCOL, "control frame too long");
        }
        CLOSE | PING | PONG => {}
        CONTINUATION if state.message == 0 => {
            return fail(code::PROTOCOL, "continuation outside a message");
        }
        TEXT | BINARY if state.message != 0 => {
            return fail(code::PROTOCOL, "new message inside a fragmented one");
        }
        BINARY if lines => return fail(code::UNSUPPORTED, "binary messages are not supported"),
        CONTINUATION | TEXT | BINARY => {}
        _ => return fail(code::PROTOCOL, "unknown opcode"),
    }
    let (len, at) = match len7 {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    if len >> 63 != 0 {
        return fail(code::PROTOCOL, "length with its top bit set");
    }
    if opcode & 0x8 == 0 && state.msg_len as u64 + len > max_message as u64 {
        return fail(code::TOO_BIG, "message longer than --max-line");
    }
    let header = at + 4;
    let len = len as usize; // at most max_message or 125: fits
    if buf.len() < header + len {
        return Ok(None);
    }
    let mask = buf[at..header].try_into().expect("4 bytes");
    Ok(Some(Frame {
        opcode,
        fin,
        header,
        len,
        mask,
    }))
}

/// XORs `payload` with the frame's mask, in place.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// What a Close frame's payload asks to answer with: its code echoed (1000
/// if it has none), or a failure for a malformed one.
fn close_code(payload: &[u8]) -> Stop {
    match payload {
        [] => Stop::Close(code::NORMAL),
        [_] => Stop::Fail(code::PROTOCOL, "close frame of one byte"),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !valid_close_code(code) {
                Stop::Fail(code::PROTOCOL, "invalid close code")
            } else if std::str::from_utf8(reason).is_err() {
                Stop::Fail(code::INVALID_DATA, "close reason not UTF-8")
            } else {
                Stop::Close(code)
            }
        }
    }
}

/// Whether a peer may send `code` in a Close frame: the codes RFC 6455
/// defines for sending and those IANA registered since (1012-1014), and
/// the ranges for libraries and applications.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Validates UTF-8 across fragment boundaries: the state of a code point
/// cut at the end of the bytes seen so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Utf8 {
    /// Continuation bytes still owed.
    need: u8,
    /// The range the next byte must be in (narrower after E0, ED, F0, F4).
    lo: u8,
    hi: u8,
}

impl Utf8 {
    /// Feeds the next bytes; false once the text cannot be UTF-8.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut i = 0;
        while self.need > 0 {
            let Some(&b) = bytes.get(i) else {
                return true;
            };
            if b < self.lo || b > self.hi {
                return false;
            }
            self.need -= 1;
            (self.lo, self.hi) = (0x80, 0xBF);
            i += 1;
        }
        let rest = &bytes[i..];
        let Err(e) = std::str::from_utf8(rest) else {
            return true;
        };
        if e.error_len().is_some() {
            return false;
        }
        // A valid prefix of one code point is cut at the end.
        let tail = &rest[e.valid_up_to()..];
        let (total, lo, hi) = match tail[0] {
            0xC2..=0xDF => (2, 0x80, 0xBF),
            0xE0 => (3, 0xA0, 0xBF),
            0xED => (3, 0x80, 0x9F),
            0xE1..=0xEF => (3, 0x80, 0xBF),
            0xF0 => (4, 0x90, 0xBF),
            0xF4 => (4, 0x80, 0x8F),
            _ => (4, 0x80, 0xBF), // F1..=F3: from_utf8 allowed nothing else
        };
        self.need = total - tail.len() as u8;
        (self.lo, self.hi) = if tail.len() >= 2 {
            (0x80, 0xBF)
        } else {
            (lo, hi)
        };
        true
    }

    /// The state as three bytes (a live upgrade hands it over).
    pub fn to_bytes(self) -> [u8; 3] {
        [self.need, self.lo, self.hi]
    }

    /// A state from [`Utf8::to_bytes`], if it is one.
    pub fn of_bytes(bytes: &[u8]) -> Option<Utf8> {
        match *bytes {
            [0, 0, 0] => Some(Utf8::default()),
            [need @ 1..=3, lo, hi] if 0x80 <= lo && lo <= hi && hi <= 0xBF => {
                Some(Utf8 { need, lo, hi })
            }
            _ => None,
        }
    }

    /// Whether the text so far ends at a code point's end.
    pub fn is_complete(&self) -> bool {
        self.need == 0
    }
}

// ---------------------------------------------------------------------
// Server frames (never masked)

/// A frame header for `len` bytes of payload: its bytes and length.
fn header(first: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0; 10];
    h[0] = first;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= 0xFFFF {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// Appends one frame: `opcode` with FIN when `fin`.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, fin: bool, payload: &[u8]) {
    let (h, n) = header(u8::from(fin) << 7 | opcode, payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

/// Appends each line of `lines` (`\n`-terminated; a last piece without one
/// counts too) as one text message without its terminator.
pub fn write_lines(out: &mut Vec<u8>, mut lines: &[u8]) {
    while !lines.is_empty() {
        let (line, rest) = match memchr::memchr(b'\n', lines) {
            Some(end) => (&lines[..end], &lines[end + 1..]),
            None => (lines, &[][..]),
        };
        write_frame(out, TEXT, true, line);
        lines = rest;
    }
}

/// A Close frame's payload: `code` and a short ASCII reason. Returns the
/// buffer and how much of it is used.
pub fn close_payload(code: u16, reason: &str) -> ([u8; MAX_CONTROL], usize) {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_CONTROL - 2)];
    let mut payload = [0; MAX_CONTROL];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    (payload, 2 + reason.len())
}

/// The length of the server frame at `data[at..]`, if its header is there.
/// The server's output is a sequence of its own frames, so walking it with
/// this finds frame boundaries.
pub fn server_frame_len(data: &[u8], at: usize) -> Option<usize> {
    let h = data.get(at..)?;
    let len7 = *h.get(1)? & 0x7F;
    let (len, n) = match len7 {
        126 => (
            usize::from(u16::from_be_bytes(h.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            u64::from_be_bytes(h.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (usize::from(n), 2),
    };
    Some(n + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame, masked with `mask`.
    pub(crate) fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let (h, n) = header(first, payload.len());
        let mut f = h[..n].to_vec();
        f[1] |= 0x80;
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    }

    fn decode_all(frames: &[u8], max: usize) -> (Vec<u8>, Vec<Vec<u8>>, Decoded) {
        let mut buf = frames.to_vec();
        let mut pings = Vec::new();
        let mut state = InState::default();
        let (mut out, mut start) = (0, 0);
        loop {
            let d = decode(&mut buf, out, start, &mut state, max, true, |_| {});
            (out, start) = (d.text_end, d.raw_start);
            match d.stop {
                Some(Stop::Ping(a, b)) => pings.push(buf[a..b].to_vec()),
                _ => return (buf[..d.text_end].to_vec(), pings, d),
            }
        }
    }

    /// Valid or not, a byte stream decodes the same whatever the read
    /// boundaries; frames built from arbitrary messages decode to them.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn decode_in(input: &[u8], cuts: &[usize], max: usize, lines: bool) -> Decodings {
            let mut reader = Reader::default();
            let mut out = Decodings::default();
            let mut start = 0;
            for &cut in cuts.iter().chain([&input.len()]) {
                let cut = cut.clamp(start, input.len());
                reader.push(&input[start..cut], max, lines, &mut out);
                start = cut;
            }
            out
        }

        proptest! {
            #[test]
            fn any_bytes_any_boundaries(
                input in proptest::collection::vec(any::<u8>(), 0..400),
                mut cuts in proptest::collection::vec(0usize..400, 0..12),
                max in 1usize..300,
                lines: bool,
            ) {
                cuts.sort_unstable();
                let whole = decode_in(&input, &[], max, lines);
                prop_assert_eq!(decode_in(&input, &cuts, max, lines), whole);
            }

            #[test]
            fn messages_in_frames_come_back(
                messages in proptest::collection::vec(
                    (proptest::collection::vec("[a-z: ,\\n\u{e9}\u{1F600}]{0,40}", 1..4), any::<[u8; 4]>()),
                    1..6,
                ),
                mut cuts in proptest::collection::vec(0usize..2000, 0..12),
            ) {
                let mut input = Vec::new();
                let mut want = Vec::new();
                for (fragments, mask) in &messages {
                    for (i, fragment) in fragments.iter().enumerate() {
                        let first = if i == 0 { TEXT } else { CONTINUATION };
                        let fin = if i + 1 == fragments.len() { 0x80 } else { 0 };
                        input.extend(client_frame(first | fin, fragment.as_bytes(), *mask));
                        input.extend(client_frame(0x89, b"p", *mask));
                        want.extend_from_slice(fragment.as_bytes());
                    }
                    want.push(b'\n');
                }
                cuts.sort_unstable();
                let got = decode_in(&input, &cuts, 1000, true);
                prop_assert_eq!(got.stop, None);
                prop_assert_eq!(got.text, want);
                prop_assert!(got.events.iter().all(|e| e.0 == PING && e.2 == b"p"));
            }
        }
    }

    #[test]
    fn the_rfc_example_key() {
        assert_eq!(
            &accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn requests() {
        let up = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                   Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nrest";
        let (req, n) = parse_request(up);
        assert_eq!(n, up.len() - 4);
        assert!(matches!(req, Request::Upgrade { .. }));
        assert_eq!(parse_request(&up[..20]).0, Request::Partial);
        let page = b"GET /?x=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(parse_request(page).0, Request::Page);
        let other = b"GET /other HTTP/1.1\r\n\r\n";
        assert_eq!(parse_request(other).0, Request::NotFound);
        let v8 = String::from_utf8_lossy(up).replace("Version: 13", "Version: 8");
        assert_eq!(parse_request(v8.as_bytes()).0, Request::WrongVersion);
        let short = String::from_utf8_lossy(up).replace("dGhlIHNhbXBsZSBub25jZQ==", "abcd");
        assert!(matches!(parse_request(short.as_bytes()).0, Request::Bad(_)));
        assert!(matches!(
            parse_request(b"\x16\x03\x01 tls").0,
            Request::Bad(_)
        ));
        let post = b"POST / HTTP/1.1\r\n\r\n";
        assert!(matches!(parse_request(post).0, Request::Bad(_)));
        let huge = vec![b'a'; MAX_REQUEST + 1];
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend_from_slice(&huge);
        assert!(matches!(parse_request(&long).0, Request::Bad(_)));
    }

    #[test]
    fn text_messages_become_lines_and_fragments_join() {
        let mut frames = client_frame(0x81, b"alice", [1, 2, 3, 4]);
        frames.extend(client_frame(0x01, b"bob: h", [9, 9, 9, 9]));
        frames.extend(client_frame(0x89, b"hey", [5, 6, 7, 8]));
        frames.extend(client_frame(0x80, b"i\ncarol: x", [0, 0, 0, 1]));
        let (text, pings, d) = decode_all(&frames, 100);
        assert_eq!(text, b"alice\nbob: hi\ncarol: x\n");
        assert_eq!(pings, vec![b"hey".to_vec()]);
        assert_eq!(d.stop, None);
        assert_eq!(d.raw_start, frames.len());
    }

    #[test]
    fn an_incomplete_frame_waits_whole() {
        let frames = client_frame(0x81, b"hello", [1, 2, 3, 4]);
        for cut in 0..frames.len() {
            let (text, _, d) = decode_all(&frames[..cut], 100);
            assert!(text.is_empty());
            assert_eq!((d.raw_start, d.stop), (0, None));
        }
    }

    #[test]
    fn rule_breakers_fail_with_their_codes() {
        let fail = |frames: Vec<u8>| decode_all(&frames, 10).2.stop;
        let m = [1, 2, 3, 4];
        let unmasked = vec![0x81, 0x01, b'a'];
        assert_eq!(
            fail(unmasked),
            Some(Stop::Fail(1002, "client frame not masked"))
        );
        assert!(matches!(
            fail(client_frame(0xC1, b"a", m)),
            Some(Stop::Fail(1002, _))
        ));
        assert!(matches!(
            fail(client_frame(0x83, b"a", m)),
            Some(Stop::Fail(1002, _))
        ));
        assert!(matches!(
            fail(client_frame(0x09, b"a", m)),
            Some(Stop::Fail(1002, _))
        ));
        assert!(matches!(
            fail(client_frame(0x80, b"a", m)),
            Some(Stop::Fail(1002, _))
        ));
        assert!(matches!(
            fail(client_frame(0x82, b"a", m)),
            Some(Stop::Fail(1003, _))
        ));
        assert!(matches!(
            fail(client_frame(0x81, b"0123456789a", m)),
            Some(Stop::Fail(1009, _))
        ));
        let mut two = client_frame(0x01, b"01234", m);
        two.extend(client_frame(0x80, b"567890", m));
        assert!(matches!(fail(two), Some(Stop::Fail(1009, _))));
        let mut nested = client_frame(0x01, b"a", m);
        nested.extend(client_frame(0x81, b"b", m));
        assert!(matches!(fail(nested), Some(Stop::Fail(1002, _))));
        assert!(matches!(
            fail(client_frame(0x81, b"\xff", m)),
            Some(Stop::Fail(1007, _))
        ));
        // 2^63 and beyond, before any payload or mask arrives.
        let huge = vec![0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(fail(huge), Some(Stop::Fail(1002, _))));
        let big = vec![0x81, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(matches!(fail(big), Some(Stop::Fail(1009, _))));
        let long_ping = client_frame(0x89, &[0; 126], m);
        assert!(matches!(fail(long_ping), Some(Stop::Fail(1002, _))));
    }

    #[test]
    fn close_frames() {
        let m = [1, 2, 3, 4];
        let close = |payload: &[u8]| decode_all(&client_frame(0x88, payload, m), 10).2.stop;
        assert_eq!(close(b""), Some(Stop::Close(1000)));
        assert_eq!(close(&[0x03, 0xE9]), Some(Stop::Close(1001)));
        assert_eq!(close(&[0x0F, 0xA0, b'o', b'k']), Some(Stop::Close(4000)));
        assert!(matches!(close(&[0x03]), Some(Stop::Fail(1002, _))));
        assert!(matches!(close(&[0x03, 0xED]), Some(Stop::Fail(1002, _))));
        assert!(matches!(
            close(&[0x03, 0xE8, 0xff]),
            Some(Stop::Fail(1007, _))
        ));
    }

    #[test]
    fn utf8_across_any_cut() {
        let text = "aé€😀z".as_bytes();
        for cut in 0..=text.len() {
            let mut u = Utf8::default();
            assert!(u.feed(&text[..cut]) && u.feed(&text[cut..]) && u.is_complete());
        }
        for bad in [
            &b"\xed\xa0\x80"[..],
            b"\xc0\xaf",
            b"\xf4\x90\x80\x80",
            b"\xe0\x80\x80",
        ] {
            for cut in 0..=bad.len() {
                let mut u = Utf8::default();
                assert!(
                    !(u.feed(&bad[..cut]) && u.feed(&bad[cut..]) && u.is_complete()),
                    "{bad:?} cut at {cut}"
                );
            }
        }
        let mut u = Utf8::default();
        assert!(u.feed(b"\xe2\x82") && !u.is_complete());
    }

    #[test]
    fn server_frames_walk() {
        let mut out = Vec::new();
        write_lines(&mut out, b"from a: hi\nerror: x\n");
        write_lines(&mut out, &vec![b'x'; 300]);
        let (close, n) = close_payload(1008, "bye");
        write_frame(&mut out, CLOSE, true, &close[..n]);
        assert_eq!(&out[..12], b"\x81\x0afrom a: hi");
        let mut at = 0;
        let mut frames = 0;
        while at < out.len() {
            at += server_frame_len(&out, at).unwrap();
            frames += 1;
        }
        assert_eq!((at, frames), (out.len(), 4));
        assert_eq!(&out[out.len() - 7..], b"\x88\x05\x03\xf0bye");
    }
}
