//! `--ws`: the client side of WebSocket (RFC 6455), as small as the
//! generator needs. A client sends an HTTP/1.1 upgrade with a random
//! `Sec-WebSocket-Key`, checks the `101` and its `Sec-WebSocket-Accept`,
//! and from then on sends each line as one masked text frame (FIN set, a
//! fresh mask per frame) without its `\n`, as the server adds a line end
//! after each message. Each server text message is one line. Frames are
//! parsed in place from the read buffer ([`Header::parse`]); only a frame
//! cut by the end of a read is copied aside.
//!
//! Nothing here allocates per message: [`push_frame`] appends to the
//! client's output buffer, and the handshake's key is not even kept, being
//! derived again from the run's seed and the client's number when the
//! answer comes ([`key`]).

/// The GUID of RFC 6455 section 1.3, appended to the key for the accept.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The longest handshake response taken (the server bounds its request
/// to 8 KiB; its answer is far shorter).
pub const MAX_RESPONSE: usize = 8 << 10;

/// The longest message taken from the server: chatd's longest delivery is
/// `--max-line` (up to 16 MiB) plus 72 bytes; past this, the peer is not
/// a chat server.
pub const MAX_MESSAGE: u64 = (16 << 20) + 4096;

pub const CONTINUATION: u8 = 0;
pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;

/// A cheap pseudo-random generator (xorshift64*), for masks and keys: RFC
/// 6455's masks only need to be unpredictable to a cache in between, not
/// secret.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock, the process and `salt` (a thread's number).
    pub fn new(salt: u64) -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = mix(nanos ^ (u64::from(std::process::id()) << 32) ^ mix(salt));
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A frame's masking key.
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

/// splitmix64's finalizer: spreads the bits of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Client `i`'s `Sec-WebSocket-Key` in a run seeded `seed`: 16 bytes
/// derived from both, in base64 (24 characters).
pub fn key(seed: u64, i: usize) -> [u8; 24] {
    let a = mix(seed ^ mix(i as u64));
    let b = mix(a ^ seed);
    let mut raw = [0; 16];
    raw[..8].copy_from_slice(&a.to_le_bytes());
    raw[8..].copy_from_slice(&b.to_le_bytes());
    let mut out = [0; 24];
    base64(&raw, &mut out);
    out
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with.
pub fn accept(key: &[u8]) -> [u8; 28] {
    let digest = sha1(&[key, GUID].concat());
    let mut out = [0; 28];
    base64(&digest, &mut out);
    out
}

/// The upgrade request for `host` (the server's address) with `key`.
pub fn request(host: &str, key: &[u8; 24]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(b"GET / HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: ",
    );
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// Where the handshake response in `buf` ends (past its blank line), once
/// it is complete.
pub fn response_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|at| at + 4)
}

/// Checks a complete handshake response (`head`, up to its blank line)
/// against the accept `key` asks for; `Err` says what is wrong, in a few
/// words fit for a counter's name.
pub fn check_response(head: &[u8], key: &[u8; 24]) -> Result<(), String> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.trim_ascii_end());
    let status = lines.next().unwrap_or_default();
    let Some(rest) = status.strip_prefix(b"HTTP/1.1 ") else {
        return Err(format!("not HTTP: {}", shown(status)));
    };
    let code = rest.split(|&b| b == b' ').next().unwrap_or_default();
    if code != b"101" {
        return Err(format!("status {}", shown(code)));
    }
    let (mut upgrade, mut connection, mut accepted) = (false, false, None);
    for line in lines {
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = value.eq_ignore_ascii_case(b"websocket");
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection = value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        } else if name.eq_ignore_ascii_case(b"sec-websocket-accept") {
            accepted = Some(value);
        } else if name.eq_ignore_ascii_case(b"sec-websocket-extensions") {
            return Err("an extension not asked for".into());
        }
    }
    if !upgrade || !connection {
        return Err("no Upgrade: websocket".into());
    }
    match accepted {
        None => Err("no Sec-WebSocket-Accept".into()),
        Some(value) if value != accept(key) => Err("wrong Sec-WebSocket-Accept".into()),
        Some(_) => Ok(()),
    }
}

/// At most 40 bytes of `bytes`, for a message.
fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned()
}

/// Appends one client frame (FIN set, masked with `mask`) of `opcode`
/// carrying `payload` to `out`.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let at = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[at..], mask);
}

/// Masks (or unmasks) `data` with `mask`, from its first byte.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (k, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[k & 3];
    }
}

/// A frame's header, parsed where it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// The reserved bits RSV1-3 (none was agreed: any set is an error).
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// The header's length, mask included.
    pub len: usize,
    pub payload: u64,
}

impl Header {
    /// How many bytes of `buf` must be in to go on: two to read the
    /// header's length, then the whole header, then the whole frame. The
    /// frame at the start of `buf` is complete when `buf` holds at least
    /// this many (and an impossible length is told by [`Header::parse`]).
    pub fn need(buf: &[u8]) -> u64 {
        if buf.len() < 2 {
            return 2;
        }
        let len = header_len(buf[1]);
        if buf.len() < len {
            return len as u64;
        }
        match Header::parse(buf) {
            Some(h) => h.len as u64 + h.payload,
            None => len as u64,
        }
    }

    /// The header at the start of `buf`, if all of it is there.
    pub fn parse(buf: &[u8]) -> Option<Header> {
        let (b0, b1) = (*buf.first()?, *buf.get(1)?);
        let len = header_len(b1);
        if buf.len() < len {
            return None;
        }
        let (payload, at) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 => (u64::from_be_bytes(buf[2..10].try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let mask = (b1 & 0x80 != 0).then(|| [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        Some(Header {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 7,
            opcode: b0 & 0x0f,
            mask,
            len,
            payload,
        })
    }
}

/// A header's length from its second byte: 2, 4 or 10 bytes, and 4 more
/// for a mask.
fn header_len(b1: u8) -> usize {
    let base = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    base + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// RFC 4648 base64 of `data` into `out` (4 characters per 3 bytes,
/// padded); `out` must be exactly that long.
fn base64(data: &[u8], out: &mut [u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    debug_assert_eq!(out.len(), data.len().div_ceil(3) * 4);
    for (chunk, dst) in data.chunks(3).zip(out.chunks_mut(4)) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, d) in dst.iter_mut().enumerate() {
            *d = if k <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * k)) as usize & 63]
            } else {
                b'='
            };
        }
    }
}

/// SHA-1 (FIPS 180-4) of `data`: only for the handshake's accept, which
/// RFC 6455 defines with it.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (t, word) in block.chunks_exact(4).enumerate() {
            w[t] = u32::from_be_bytes(word.try_into().expect("4 bytes"));
        }
        for t in 16..80 {
            w[t] = (w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (t, &word) in w.iter().enumerate() {
            let (f, k) = match t {
                0..20 => ((b & c) | (!b & d), 0x5a82_7999),
                20..40 => (b ^ c ^ d, 0x6ed9_eba1),
                40..60 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let temp = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = temp;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0; 20];
    for (dst, word) in out.chunks_exact_mut(4).zip(h) {
        dst.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha1_matches_the_standard_vectors() {
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        // Two blocks (56 bytes: the padding needs a second one).
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
    }

    #[test]
    fn base64_pads() {
        let mut four = [0; 4];
        base64(b"M", &mut four);
        assert_eq!(&four, b"TQ==");
        base64(b"Ma", &mut four);
        assert_eq!(&four, b"TWE=");
        base64(b"Man", &mut four);
        assert_eq!(&four, b"TWFu");
    }

    /// RFC 6455 section 1.3's example.
    #[test]
    fn accept_of_the_rfc_example() {
        assert_eq!(
            &accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn keys_are_sixteen_bytes_and_differ_per_client() {
        let (a, b) = (key(7, 0), key(7, 1));
        assert_ne!(a, b);
        assert_eq!(key(7, 0), a, "derived again, the same");
        assert!(a.ends_with(b"=="), "16 bytes: two of padding");
    }

    #[test]
    fn checks_the_handshake_response() {
        let k = key(1, 2);
        let good = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            std::str::from_utf8(&accept(&k)).unwrap()
        );
        assert_eq!(response_end(good.as_bytes()), Some(good.len()));
        assert_eq!(check_response(good.as_bytes(), &k), Ok(()));
        let wrong = good.replace("Accept: ", "Accept: x");
        assert_eq!(
            check_response(wrong.as_bytes(), &k),
            Err("wrong Sec-WebSocket-Accept".into())
        );
        assert_eq!(
            check_response(b"HTTP/1.1 400 Bad Request\r\n\r\n", &k),
            Err("status 400".into())
        );
        assert_eq!(
            check_response(b"error: invalid-name: contains whitespace\n", &k),
            Err("not HTTP: error: invalid-name: contains whitespace".into())
        );
        assert!(response_end(b"HTTP/1.1 101 Switching\r\n").is_none());
    }

    #[test]
    fn frames_round_trip_at_every_length_form() {
        for n in [0, 1, 125, 126, 0xffff, 0x10000] {
            let payload: Vec<u8> = (0..n).map(|k| k as u8).collect();
            let mut out = Vec::new();
            push_frame(&mut out, TEXT, &payload, [1, 2, 3, 4]);
            let h = Header::parse(&out).unwrap();
            assert!(h.fin);
            assert_eq!((h.opcode, h.rsv, h.payload), (TEXT, 0, n as u64));
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            assert_eq!(Header::need(&out), out.len() as u64);
            let mut body = out[h.len..].to_vec();
            apply_mask(&mut body, h.mask.unwrap());
            assert_eq!(body, payload, "{n}");
            // Short of the whole frame: what is needed next.
            assert_eq!(Header::need(&out[..1]), 2);
            assert_eq!(Header::need(&out[..2]), h.len as u64);
        }
    }

    #[test]
    fn parses_server_frames() {
        let frame = [0x81, 3, b'a', b'b', b'c'];
        let h = Header::parse(&frame).unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.len, h.payload),
            (true, 1, None, 2, 3)
        );
        assert_eq!(Header::need(&frame), 5);
        let cont = [0x00, 126, 0x01, 0x00];
        let h = Header::parse(&cont).unwrap();
        assert_eq!((h.fin, h.opcode, h.len, h.payload), (false, 0, 4, 256));
        assert!(Header::parse(&cont[..3]).is_none());
        assert_eq!(Header::need(&cont[..3]), 4);
    }
}
