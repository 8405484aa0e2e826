//! The WebSocket transport's side of the loop: the handshake, frames read
//! into lines for the broker, control frames, and closing with a code.
//!
//! A WebSocket client is a client like any other: after its handshake its
//! text messages become lines (`crate::ws::decode` moves them down in the
//! shared scratch buffer, each followed by `\n`), and those lines take the
//! TCP path's way through `handle_lines`. What it is sent takes the same
//! way too: `Conn::queue` frames each line as one text message. Only what
//! has no TCP counterpart lives here.
//!
//! The scratch buffer, for a WebSocket read:
//!
//! ```text
//! [ text room: max_line + 2 ][ raw room ][ READ_CHUNK ]
//!          ^ kept text tail ^  ^ kept raw ^ ^ new bytes
//! ```
//!
//! The kept input is the text of a message not ended yet (put right before
//! the text room's end, as TCP puts a line's tail) and the bytes of an
//! incomplete frame (right before the new bytes). Decoding writes the text
//! from the text room's end on, never overtaking the frames it reads.

use log::debug;

use super::Server;
use super::clients::{CLOSE_GRACE_MS, Clients};
use super::input::{Drain, Lines, READ_CHUNK, keep_input};
use crate::conn::Phase;
use crate::deadlines::{Deadline, Deadlines};
use crate::protocol::ErrorKind;
use crate::ws::{self, Request, Stop, code};

/// Bytes before a WebSocket read's new bytes for the kept incomplete
/// frame (or the handshake so far).
pub(super) fn raw_room(max_line: usize) -> usize {
    (max_line + ws::MAX_HEADER).max(ws::MAX_REQUEST)
}

/// The close code that follows an `error:` line that closes.
pub(super) fn close_code(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::LineTooLong => code::TOO_BIG,
        ErrorKind::InvalidUtf8 => code::INVALID_DATA,
        ErrorKind::ShuttingDown => code::GOING_AWAY,
        ErrorKind::ServerFull | ErrorKind::Unavailable => code::TRY_AGAIN,
        _ => code::POLICY,
    }
}

/// The HTTP status that answers a handshake the server ends with `kind`.
pub(super) fn http_status(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::LoginTimeout => "408 Request Timeout",
        ErrorKind::ServerFull | ErrorKind::ShuttingDown | ErrorKind::Unavailable => {
            "503 Service Unavailable"
        }
        _ => "400 Bad Request",
    }
}

impl Server {
    /// Reads a WebSocket connection: its handshake, then its frames, until
    /// the socket is drained (see [`Drain`]), EOF, an error, a close, or the
    /// per-turn budget.
    pub(super) fn read_ws(&mut self, key: usize, drain: Drain) {
        let text_room = self.clients.limits.max_line + 2;
        let head = text_room + raw_room(self.clients.limits.max_line);
        let kept_text = self
            .clients
            .conn(key)
            .partial
            .as_ref()
            .map_or(0, |p| p.len() - p.ws.raw as usize);
        if kept_text > text_room {
            return; // input held back while waiting: handled on resume
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_CHUNK;
        // Kept frame bytes may hold a whole frame (a Close kept while its
        // claim was answered): decode them before reading more.
        let mut decode_kept = self
            .clients
            .conn(key)
            .partial
            .as_ref()
            .is_some_and(|p| p.ws.raw > 0);
        loop {
            let n = if std::mem::take(&mut decode_kept) {
                0
            } else {
                let conn = self.clients.conn(key);
                match conn.read(&mut scratch[head..]) {
                    Ok(0) => {
                        self.on_ws_eof(key);
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!("#{} read error: {e}", conn.id);
                        self.clients.kill(key);
                        break;
                    }
                }
            };
            if n > 0 {
                let conn = self.clients.conn(key);
                conn.last_input_ms = self.deadlines.now_ms() as u32;
                self.clients.stats.bytes_in += n as u64;
            }
            if !self.handle_ws_bytes(key, &mut scratch, text_room, head, n) {
                break;
            }
            if n > 0 && !self.clients.read_on(key, n, &mut budget, drain) {
                break;
            }
        }
        self.scratch = scratch;
    }

    /// Handles `n` new bytes at `scratch[head..]` after what the connection
    /// kept. Returns whether to read on.
    fn handle_ws_bytes(
        &mut self,
        key: usize,
        scratch: &mut [u8],
        text_room: usize,
        head: usize,
        n: usize,
    ) -> bool {
        let (text_len, mut state) = {
            let conn = self.clients.conn(key);
            let (kept, state) = conn
                .partial
                .as_ref()
                .map_or((&[][..], ws::InState::default()), |p| {
                    (&p.data[p.pos..], p.ws)
                });
            let (text, raw) = kept.split_at(kept.len() - state.raw as usize);
            scratch[text_room - text.len()..text_room].copy_from_slice(text);
            scratch[head - raw.len()..head].copy_from_slice(raw);
            (text.len(), state)
        };
        let end = head + n;
        let mut start = head - state.raw as usize;
        if !self.clients.conn(key).is_ws_open() {
            match self.handshake(key, &scratch[start..end]) {
                Some(consumed) => start += consumed,
                None => return false,
            }
            if !self.clients.conn(key).is_ws_open() {
                // Not complete yet: the request so far is kept as raw bytes.
                let request = &scratch[start..end];
                let raw = ws::InState {
                    raw: request.len() as u32,
                    ..ws::InState::default()
                };
                self.clients
                    .with_buffers(key, |conn, pool| keep_input(conn, pool, &[], request, raw));
                return self.within_memory(key, scratch);
            }
            if self.clients.conn(key).phase() != Phase::Login {
                self.clients.discard_input(key, scratch);
                return false; // turned away after the handshake
            }
        }
        let echo = self.config.ws_echo;
        // A message may end in a `\r` after the longest line, as on TCP.
        let max = self.clients.limits.max_line + 1;
        // The text not handled yet: scratch[unhandled..out]. Decoding stops
        // at each ping, so that the lines before it are handled (and
        // answered) before its pong is queued. While a claim is answered
        // (`held`), lines wait and the rest is only decoded.
        let (mut unhandled, mut out, mut from) = (text_room - text_len, text_room, start);
        let mut held = false;
        let decoded = loop {
            let clients = &mut self.clients;
            let deadlines = &mut self.deadlines;
            let decoded = ws::decode(
                &mut scratch[..end],
                out,
                from,
                &mut state,
                max,
                !echo,
                |data| clients.enqueue_frame(key, data.opcode, data.fin, data.payload, deadlines),
            );
            (out, from) = (decoded.text_end, decoded.raw_start);
            if !held {
                match self.handle_lines(key, &scratch[unhandled..out]) {
                    Lines::Tail(tail) => unhandled = out - tail.len(),
                    Lines::Kept(rest) => {
                        unhandled = out - rest.len();
                        held = true;
                    }
                    Lines::Closed => {
                        if !self.clients.conn(key).is_dead() {
                            self.clients.discard_input(key, scratch);
                        }
                        return false;
                    }
                }
            }
            let Some(Stop::Ping(a, b)) = decoded.stop else {
                break decoded;
            };
            let pong = &scratch[a..b];
            self.clients
                .enqueue_frame(key, ws::PONG, true, pong, &mut self.deadlines);
            if self.closed_while_decoding(key, scratch) {
                return false;
            }
        };
        if self.closed_while_decoding(key, scratch) {
            return false;
        }
        let kept_text = &scratch[unhandled..out];
        // Input kept while a claim is answered waits whole: a Close after
        // the lines kept is kept too, as a frame to decode on resume.
        let mut close = [0x88, 0x82, 0, 0, 0, 0, 0, 0];
        let raw: &[u8] = match decoded.stop {
            None => &scratch[decoded.raw_start..end],
            Some(Stop::Close(code)) if held => {
                close[6..].copy_from_slice(&code.to_be_bytes());
                &close
            }
            Some(_) => &[],
        };
        state.raw = raw.len() as u32;
        self.clients.with_buffers(key, |conn, pool| {
            keep_input(conn, pool, kept_text, raw, state)
        });
        match decoded.stop {
            None | Some(Stop::Ping(..)) => {}
            Some(Stop::Close(_)) if held => return false,
            Some(Stop::Close(code)) => {
                self.ws_close_received(key, code);
                return false;
            }
            Some(Stop::Fail(code, why)) => {
                debug!("#{} WebSocket failed: {why}", self.clients.conn(key).id);
                self.clients
                    .fail_ws(key, code, why, echo, &mut self.deadlines);
                self.clients.discard_input(key, scratch);
                return false;
            }
        }
        if !self.within_memory(key, scratch) {
            return false;
        }
        !held
    }

    /// Whether its pongs or echoes closed `key` as a slow consumer (then its
    /// input is drained, as on any closing error).
    fn closed_while_decoding(&mut self, key: usize, scratch: &mut [u8]) -> bool {
        let conn = self.clients.conn(key);
        let closed = conn.is_dead() || conn.phase() == Phase::Closing;
        if closed && !conn.is_dead() {
            self.clients.discard_input(key, scratch);
        }
        closed
    }

    /// What a connection keeps counts against `--max-buffer-memory`: at
    /// the bound the largest holders are closed. Returns whether `key`
    /// still reads (else its input is drained, as on any closing error).
    fn within_memory(&mut self, key: usize, scratch: &mut [u8]) -> bool {
        if self.clients.is_over_memory() {
            self.clients.make_room(0, None, &mut self.deadlines);
            let conn = self.clients.conn(key);
            if conn.is_dead() || conn.phase() == Phase::Closing {
                if !conn.is_dead() {
                    self.clients.discard_input(key, scratch);
                }
                return false;
            }
        }
        true
    }

    /// Answers the opening handshake in `request` if it is complete.
    /// Returns the bytes it took (`None`: the connection closes, or it was
    /// turned away).
    fn handshake(&mut self, key: usize, request: &[u8]) -> Option<usize> {
        let (asked, consumed) = ws::parse_request(request);
        let clients = &mut self.clients;
        let deadlines = &mut self.deadlines;
        let page = ws::PAGE.as_bytes();
        let (status, extra, body): (&str, &str, &[u8]) = match asked {
            Request::Partial => return Some(0),
            Request::Upgrade { accept } => {
                clients.open_ws(key, &accept, deadlines);
                return Some(consumed);
            }
            Request::Page => ("200 OK", ws::PAGE_HEADERS, page),
            Request::NotFound => ("404 Not Found", "", b"not found\n"),
            Request::WrongVersion => (
                "426 Upgrade Required",
                "Sec-WebSocket-Version: 13\r\n",
                b"WebSocket version 13 only\n",
            ),
            Request::Bad(why) => {
                debug!("#{} bad WebSocket handshake: {why}", clients.conn(key).id);
                let body = format!("bad request: {why}\n");
                clients.close_http(key, "400 Bad Request", "", body.as_bytes(), deadlines);
                return None;
            }
        };
        clients.stats.ws_pages += u64::from(status.starts_with("200"));
        clients.close_http(key, status, extra, body, deadlines);
        None
    }

    /// The client sent its Close: its name is released and, once what is
    /// queued or owed to it is sent, the Close is answered.
    fn ws_close_received(&mut self, key: usize, code: u16) {
        let conn = self.clients.conn(key);
        if !conn.reads_lines() {
            return;
        }
        debug!("#{} sent a WebSocket Close ({code})", conn.id);
        conn.set_ws_close_received(code);
        self.clients.enter(key, Phase::Draining);
        self.close_if_drained(key);
    }

    /// EOF without a Close: as on TCP, what is queued is still written; an
    /// unfinished message does not count.
    fn on_ws_eof(&mut self, key: usize) {
        self.clients
            .with_buffers(key, |conn, pool| pool.give(&mut conn.partial));
        let conn = self.clients.conn(key);
        if !conn.reads_lines() {
            conn.set_input_done();
            if conn.phase() == Phase::Closing && conn.is_write_shut() {
                self.clients.kill(key);
            }
            return;
        }
        debug!("#{} sent EOF", conn.id);
        conn.set_input_done();
        if !conn.is_ws_open() {
            self.clients.kill(key);
            return;
        }
        self.clients.enter(key, Phase::Draining);
        self.close_if_drained(key);
    }
}

impl Clients {
    /// The handshake is valid: `101`, and from now on frames. A connection
    /// accepted over `--max-clients` is turned away now, with
    /// `error: server-full` and 1013.
    fn open_ws(&mut self, key: usize, accept: &[u8; 28], deadlines: &mut Deadlines) {
        let mut answer = Vec::with_capacity(160);
        ws::write_upgrade(&mut answer, accept);
        self.with_buffers(key, |conn, pool| {
            conn.queue_raw(&answer, true, pool);
            conn.set_ws_open();
        });
        self.mark_pending(key);
        self.stats.ws_handshakes += 1;
        debug!("#{} WebSocket open", self.conn(key).id);
        if self.conn(key).is_rejected() {
            self.error(key, ErrorKind::ServerFull, format_args!(""), deadlines);
        }
    }

    /// Answers an HTTP request that is not an upgrade, and closes.
    pub(super) fn close_http(
        &mut self,
        key: usize,
        status: &str,
        extra: &str,
        body: &[u8],
        deadlines: &mut Deadlines,
    ) {
        let mut response = Vec::with_capacity(body.len() + 256);
        ws::write_response(&mut response, status, extra, body);
        self.close_with(key, deadlines, |conn, pool| {
            conn.queue_raw(&response, true, pool);
        });
    }

    /// Fails the connection with a close code (a protocol error, or what
    /// the RFC says for invalid UTF-8); in chat mode, invalid UTF-8 is
    /// said in an `error:` line first.
    fn fail_ws(&mut self, key: usize, code: u16, why: &str, echo: bool, deadlines: &mut Deadlines) {
        let mut line = Vec::new();
        let max = self.limits.max_line;
        let said = match code {
            code::INVALID_DATA => Some((ErrorKind::InvalidUtf8, format_args!(""))),
            code::TOO_BIG => Some((ErrorKind::LineTooLong, format_args!("max {max} bytes"))),
            _ => None,
        };
        if let (Some((kind, detail)), false) = (said, echo) {
            crate::protocol::write_error(&mut line, kind, detail);
            self.stats.error_sent(kind);
        }
        // The reason is the error's kind where there is an `error:` line.
        let reason = match (said, echo) {
            (Some((kind, _)), false) => kind.as_str(),
            _ => why,
        };
        let (close, len) = ws::close_payload(code, reason);
        self.close_with(key, deadlines, |conn, pool| {
            conn.queue(&line, pool);
            conn.queue_frame(ws::CLOSE, true, &close[..len], pool);
        });
    }

    /// The client's Close is answered (after what is queued), and the
    /// connection closes the usual way: its sending side is shut down once
    /// written, then it lingers for the client's EOF.
    pub(super) fn answer_ws_close(&mut self, key: usize, deadlines: &mut Deadlines) {
        let code = self.conn(key).discarded as u16;
        self.conn(key).discarded = 0;
        let (close, len) = ws::close_payload(code, "");
        self.close_with(key, deadlines, |conn, pool| {
            conn.queue_frame(ws::CLOSE, true, &close[..len], pool);
        });
    }

    /// Queues one frame (a pong, an echo) within `--max-outbound`; over it
    /// the connection is closed as a slow consumer, so that a client cannot
    /// make the server queue pongs without reading them.
    fn enqueue_frame(
        &mut self,
        key: usize,
        opcode: u8,
        fin: bool,
        payload: &[u8],
        deadlines: &mut Deadlines,
    ) {
        if !self.conn(key).reads_lines() {
            return;
        }
        if opcode == ws::PONG {
            self.stats.ws_pings += 1;
        }
        if self.room_for(key, payload.len() + 10, Some(key), deadlines) {
            self.with_buffers(key, |conn, pool| {
                conn.queue_frame(opcode, fin, payload, pool)
            });
            self.mark_pending(key);
        }
    }

    /// Moves `key` to closing with what `queue` appends as its last output:
    /// it is flushed, the sending side shut down, and the connection
    /// lingers for EOF within the close grace.
    pub(super) fn close_with(
        &mut self,
        key: usize,
        deadlines: &mut Deadlines,
        queue: impl FnOnce(&mut crate::conn::Conn, &mut crate::pool::BufPool),
    ) {
        let conn = self.conn(key);
        if conn.is_dead() || conn.phase() == Phase::Closing {
            return;
        }
        self.enter(key, Phase::Closing);
        self.with_buffers(key, |conn, pool| {
            pool.give(&mut conn.partial);
            queue(conn, pool);
        });
        self.mark_pending(key);
        if !self.is_shutting_down() {
            self.set_deadline(key, deadlines, CLOSE_GRACE_MS, Deadline::Close);
        }
    }
}
