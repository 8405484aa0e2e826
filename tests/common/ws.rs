//! A small WebSocket client for the tests, written from RFC 6455 on its
//! own (it shares no code with the daemon's `ws` module): the handshake,
//! masked client frames, and the server's frames read one at a time.
//! Included by tests/websocket.rs and tests/websocket_attack.rs
//! (chatd-bench's tests share tests/common, but not this).

#![allow(dead_code)] // each test file uses a different part of it

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::common::{Server, TIMEOUT};

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// A WebSocket connection to chatd.
pub struct Ws {
    pub stream: TcpStream,
    buf: Vec<u8>,
    mask: u32,
}

impl Server {
    /// The WebSocket listener's address, from its log line.
    pub fn ws_addr(&mut self) -> SocketAddr {
        let line = self.wait_log("websocket on ws://");
        let addr = line
            .split("websocket on ws://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("an address after 'websocket on ws://'");
        addr.parse().expect("a socket address")
    }

    /// A WebSocket connection logged in as `name`, confirmed by a message
    /// to itself.
    pub fn ws_login(&mut self, name: &str) -> Ws {
        let mut ws = Ws::connect(self.ws_addr());
        ws.text(name);
        ws.text(&format!("{name}: sync"));
        ws.expect_text(&format!("from {name}: sync"));
        ws
    }
}

/// A request for `key` that the server must accept.
pub fn upgrade_request(key: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

impl Ws {
    /// Connects and completes the handshake (checking the accept key).
    pub fn connect(addr: SocketAddr) -> Ws {
        let mut ws = Ws::raw(addr);
        ws.handshake();
        ws
    }

    fn handshake(&mut self) {
        let ws = self;
        let key = "x3JJHMbDL1EzLkh9GBhXDw==";
        ws.stream
            .write_all(upgrade_request(key).as_bytes())
            .unwrap();
        let head = ws.http_head();
        assert!(head.starts_with("HTTP/1.1 101 "), "not switched: {head}");
        let mut sha = Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
        assert!(
            head.contains(&format!("Sec-WebSocket-Accept: {accept}\r\n")),
            "wrong accept key: {head}"
        );
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("sec-websocket-extensions")
        );
    }

    /// [`Ws::connect`] with a small receive buffer (4 KiB asked for before
    /// connecting): a client that does not read makes the server queue
    /// what it sends in user space at once.
    pub fn connect_small(addr: SocketAddr) -> Ws {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket.connect(&addr.into()).expect("connect");
        let mut ws = Ws::from_stream(TcpStream::from(socket));
        ws.handshake();
        ws
    }

    fn from_stream(stream: TcpStream) -> Ws {
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Ws {
            stream,
            buf: Vec::new(),
            mask: 0x9e37_79b9,
        }
    }

    /// A TCP connection to the WebSocket listener, no handshake yet.
    pub fn raw(addr: SocketAddr) -> Ws {
        Ws::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    /// Reads an HTTP response head (through the blank line).
    pub fn http_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8(head).expect("an ASCII head");
            }
            self.fill();
        }
    }

    /// Reads everything until EOF (an HTTP body, say).
    pub fn rest(&mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut rest).expect("read to EOF");
        rest
    }

    fn fill(&mut self) {
        let mut chunk = [0; 65536];
        let n = self.stream.read(&mut chunk).expect("read (timed out?)");
        assert!(n > 0, "EOF; have {:?}", String::from_utf8_lossy(&self.buf));
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// One client frame's bytes: masked unless `masked` is false.
    pub fn frame_bytes(&mut self, first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = vec![first];
        let bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(bit | n as u8),
            n if n <= 0xFFFF => {
                f.push(bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if !masked {
            f.extend_from_slice(payload);
            return f;
        }
        self.mask = self.mask.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let mask = self.mask.to_be_bytes();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Sends one frame.
    pub fn send_frame(&mut self, first: u8, payload: &[u8]) {
        let f = self.frame_bytes(first, payload, true);
        self.stream.write_all(&f).expect("send");
    }

    /// Sends bytes as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends one text message.
    pub fn text(&mut self, text: &str) {
        self.send_frame(0x81, text.as_bytes());
    }

    /// Reads the next frame.
    pub fn frame(&mut self) -> Frame {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            self.fill();
        }
    }

    /// Reads the next frame and checks it is the text message `want`.
    pub fn expect_text(&mut self, want: &str) {
        let frame = self.frame();
        assert_eq!(
            (
                frame.fin,
                frame.opcode,
                String::from_utf8_lossy(&frame.payload)
            ),
            (true, 1, want.into()),
            "expected the text message {want:?}"
        );
    }

    /// Reads the next frame and checks it is a Close with `code`; returns
    /// its reason.
    pub fn expect_close(&mut self, code: u16) -> String {
        let frame = self.frame();
        assert_eq!(frame.opcode, 8, "expected a Close, got {frame:?}");
        let got = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
        assert_eq!(got, code, "close code; reason {:?}", &frame.payload[2..]);
        String::from_utf8(frame.payload[2..].to_vec()).expect("a UTF-8 reason")
    }

    /// The server's TCP close: EOF with nothing more to read.
    pub fn expect_eof(&mut self) {
        let rest = self.rest();
        assert!(rest.is_empty(), "bytes before EOF: {rest:?}");
    }
}

/// A server frame at the front of `buf`, and the bytes it takes.
fn parse(buf: &[u8]) -> Option<(Frame, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    assert_eq!(b1 & 0x80, 0, "a server frame must not be masked");
    let (len, at) = match b1 & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        payload,
    };
    Some((frame, at + len))
}
