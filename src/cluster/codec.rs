//! The Redis wire format, through the `redis-protocol` crate: commands are
//! encoded as RESP arrays of blob strings, and what Redis sends (replies,
//! and pub/sub pushes under RESP3) is decoded into the few shapes the
//! cluster link acts on. Pure: no I/O, table-tested below.

use redis_protocol::resp3::decode::complete::decode;
use redis_protocol::resp3::encode::complete::encode_borrowed;
use redis_protocol::resp3::types::{BorrowedFrame, OwnedFrame};

/// Appends the command `args` (name first) to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let frames: Vec<BorrowedFrame<'_>> = args
        .iter()
        .map(|arg| BorrowedFrame::BlobString {
            data: arg,
            attributes: None,
        })
        .collect();
    let frame = BorrowedFrame::Array {
        data: &frames,
        attributes: None,
    };
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    // Cannot fail: the buffer was sized by the crate for this frame.
    let written = encode_borrowed(&mut out[start..], &frame, false).unwrap_or(0);
    out.truncate(start + written);
}

/// What Redis said, reduced to what the link needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and other simple strings.
    Status(String),
    /// An error reply (`-ERR ...`): the command failed.
    Error(String),
    /// An integer.
    Int(i64),
    /// A blob string.
    Bulk(Vec<u8>),
    /// Null (a missing key, `SET ... XX` that did not set).
    Nil,
    /// An array, a set or a map (flattened) of replies.
    Array(Vec<Reply>),
    /// A message pushed on a subscribed channel (not a reply to a command).
    Message {
        /// The channel.
        channel: Vec<u8>,
        /// The payload, as published.
        payload: Vec<u8>,
    },
    /// The confirmation of an `UNSUBSCRIBE`: every message published on the
    /// channel before it has come.
    Unsubscribed,
    /// Another push (`subscribe` confirmations and the like).
    OtherPush,
}

/// Why the bytes from Redis could not be decoded: the link is reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// Decodes one frame from the front of `buf`. `Ok(None)`: more bytes are
/// needed; `Ok(Some((reply, n)))`: `n` bytes were consumed.
pub fn decode_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, Malformed> {
    match decode(buf) {
        Ok(Some((frame, used))) => Ok(Some((reply_of(frame), used))),
        Ok(None) => Ok(None),
        Err(e) => Err(Malformed(format!("{e:?}"))),
    }
}

/// Finds where each frame ends before the codec decodes it, so that
/// what is not Redis cannot hurt the node: a frame nested deeper than
/// `max_depth` (the codec recurses) or longer than `max_len` bytes (the
/// node would buffer it) is malformed. Incremental: the scan resumes where
/// the last one stopped, so a frame that arrives in many reads costs
/// linear time, not quadratic. Iterative, without recursion.
#[derive(Debug)]
pub struct Framer {
    /// Where the scan resumes, from the start of the unconsumed input.
    pos: usize,
    /// Elements still to come in each open aggregate, outermost first.
    open: Vec<u64>,
    /// Bytes after `pos` already searched for the header's newline, so a
    /// header arriving in many pieces is searched once.
    searched: usize,
    /// Deepest nesting accepted.
    max_depth: usize,
    /// Longest frame accepted, in bytes.
    max_len: usize,
}

impl Framer {
    /// A framer for frames nested at most `max_depth` deep and at most
    /// `max_len` bytes long.
    pub fn new(max_depth: usize, max_len: usize) -> Framer {
        Framer {
            pos: 0,
            open: Vec::new(),
            searched: 0,
            max_depth,
            max_len,
        }
    }

    /// Forgets the frame being scanned (the input was dropped).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
        self.searched = 0;
    }

    /// The length of the complete frame at the front of `buf`, which holds
    /// the bytes the last call saw and maybe more; `Ok(None)`: more bytes
    /// are needed. After `Some`, the caller consumes that many bytes and
    /// the next call starts a new frame.
    /// The next whole reply at the front of `buf` and its length: the
    /// framer finds a whole, sane frame first; only then does the codec
    /// decode it (and it must take exactly that much). `Ok(None)`: more
    /// bytes are needed. The error says why the link must be dropped.
    pub fn next_reply(&mut self, buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
        let len = match self.next_frame(buf) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("malformed reply from Redis: {}", e.0)),
        };
        match decode_reply(&buf[..len]) {
            Ok(Some((reply, used))) if used == len => Ok(Some((reply, len))),
            Ok(_) => Err("malformed reply from Redis: a frame cut short".into()),
            Err(e) => Err(format!("malformed reply from Redis: {}", e.0)),
        }
    }

    pub fn next_frame(&mut self, buf: &[u8]) -> Result<Option<usize>, Malformed> {
        loop {
            let Some(header) = self.header_at(buf)? else {
                return self.need_more(buf);
            };
            let (kind, value, header_end) = header;
            let end = match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => header_end,
                b'$' | b'!' | b'=' => {
                    let len = count(value)?;
                    if len as usize > self.max_len {
                        return Err(self.too_long());
                    }
                    let end = header_end + len as usize + 2;
                    if end > buf.len() {
                        return self.need_more(buf);
                    }
                    end
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = count(value)?;
                    let elements = match kind {
                        b'%' => n.saturating_mul(2),
                        b'|' => n.saturating_mul(2).saturating_add(1), // then the frame
                        _ => n,
                    };
                    self.pos = header_end;
                    if elements > 0 {
                        if self.open.len() >= self.max_depth {
                            return Err(Malformed(format!(
                                "a reply nested more than {} deep",
                                self.max_depth
                            )));
                        }
                        self.open.push(elements);
                        continue;
                    }
                    header_end
                }
                other => return Err(Malformed(format!("unknown frame type {other:#04x}"))),
            };
            self.pos = end;
            if self.element_done() {
                let len = std::mem::take(&mut self.pos);
                return Ok(Some(len));
            }
        }
    }

    /// The header at `pos`: its type byte, the text before CRLF, and where
    /// it ends; `None` while its CRLF has not come.
    /// A header line (a type byte and a length, or a simple string or
    /// error) is at most this long: Redis's are short.
    const MAX_HEADER: usize = 64 << 10;

    fn header_at<'a>(&mut self, buf: &'a [u8]) -> Result<Option<Header<'a>>, Malformed> {
        let Some(&kind) = buf.get(self.pos) else {
            return Ok(None);
        };
        let rest = &buf[self.pos + 1..];
        let Some(found) = memchr::memchr(b'\n', &rest[self.searched..]) else {
            self.searched = rest.len();
            if rest.len() > Self::MAX_HEADER {
                return Err(Malformed("a header line too long".into()));
            }
            return Ok(None);
        };
        let nl = self.searched + found;
        self.searched = 0;
        if nl == 0 || rest[nl - 1] != b'\r' {
            return Err(Malformed("a line without CRLF".into()));
        }
        Ok(Some((kind, &rest[..nl - 1], self.pos + 1 + nl + 1)))
    }

    /// One element ended: returns whether the whole frame did.
    fn element_done(&mut self) -> bool {
        while let Some(left) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return false;
            }
            self.open.pop(); // the aggregate is an element of its parent
        }
        true
    }

    fn need_more(&self, buf: &[u8]) -> Result<Option<usize>, Malformed> {
        if buf.len() > self.max_len {
            return Err(self.too_long());
        }
        Ok(None)
    }

    fn too_long(&self) -> Malformed {
        Malformed(format!("a reply longer than {} bytes", self.max_len))
    }
}

/// A frame's header: its type byte, the text before its CRLF, and where it
/// ends.
type Header<'a> = (u8, &'a [u8], usize);

/// A length or element count; a negative one (RESP2's nulls) counts as
/// none (the codec then refuses what RESP3 does not have).
fn count(value: &[u8]) -> Result<u64, Malformed> {
    let text = std::str::from_utf8(value).map_err(|_| Malformed("a bad length".into()))?;
    match text.parse::<i64>() {
        Ok(n) => Ok(u64::try_from(n).unwrap_or(0)),
        Err(_) => Err(Malformed(format!("a bad length {text:?}"))),
    }
}

fn reply_of(frame: OwnedFrame) -> Reply {
    match frame {
        OwnedFrame::SimpleString { data, .. } => Reply::Status(lossy(data)),
        OwnedFrame::SimpleError { data, .. } => Reply::Error(data),
        OwnedFrame::BlobError { data, .. } => Reply::Error(lossy(data)),
        OwnedFrame::Number { data, .. } => Reply::Int(data),
        OwnedFrame::Boolean { data, .. } => Reply::Int(i64::from(data)),
        OwnedFrame::BlobString { data, .. }
        | OwnedFrame::VerbatimString { data, .. }
        | OwnedFrame::BigNumber { data, .. } => Reply::Bulk(data),
        OwnedFrame::Double { data, .. } => Reply::Bulk(data.to_string().into_bytes()),
        OwnedFrame::Null => Reply::Nil,
        OwnedFrame::Array { data, .. } => Reply::Array(data.into_iter().map(reply_of).collect()),
        OwnedFrame::Set { data, .. } => Reply::Array(data.into_iter().map(reply_of).collect()),
        OwnedFrame::Map { data, .. } => Reply::Array(
            data.into_iter()
                .flat_map(|(k, v)| [reply_of(k), reply_of(v)])
                .collect(),
        ),
        OwnedFrame::Push { data, .. } => push_of(data),
        _ => Reply::OtherPush, // attributes, streamed pieces, hello
    }
}

/// `["message", channel, payload]` is a published message; other pushes
/// (`subscribe`, `unsubscribe`, invalidations) only confirm or inform.
fn push_of(data: Vec<OwnedFrame>) -> Reply {
    let mut parts = data.into_iter();
    let kind = parts.next();
    let is_message =
        matches!(&kind, Some(OwnedFrame::BlobString { data, .. }) if data == b"message");
    if matches!(&kind, Some(OwnedFrame::BlobString { data, .. }) if data == b"unsubscribe") {
        return Reply::Unsubscribed;
    }
    match (is_message, parts.next(), parts.next()) {
        (
            true,
            Some(OwnedFrame::BlobString { data: channel, .. }),
            Some(OwnedFrame::BlobString { data: payload, .. }),
        ) => Reply::Message { channel, payload },
        _ => Reply::OtherPush,
    }
}

fn lossy(data: Vec<u8>) -> String {
    String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_arrays_of_blob_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b"v\r\n"]);
        encode_command(&mut out, &[b"PING"]);
        assert_eq!(
            out,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n*1\r\n$4\r\nPING\r\n"
        );
    }

    #[test]
    fn decodes_each_kind_of_frame() {
        type Case = (&'static [u8], Option<(Reply, usize)>);
        let cases: &[Case] = &[
            (b"+OK\r\n", Some((Reply::Status("OK".into()), 5))),
            (b"-ERR no\r\n", Some((Reply::Error("ERR no".into()), 9))),
            (b":42\r\n", Some((Reply::Int(42), 5))),
            (b"$2\r\nab\r\n", Some((Reply::Bulk(b"ab".to_vec()), 8))),
            (b"_\r\n", Some((Reply::Nil, 3))),
            (
                b"*2\r\n$1\r\na\r\n:1\r\n",
                Some((
                    Reply::Array(vec![Reply::Bulk(b"a".to_vec()), Reply::Int(1)]),
                    15,
                )),
            ),
            (
                b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nx\ny\r\n",
                Some((
                    Reply::Message {
                        channel: b"ch".to_vec(),
                        payload: b"x\ny".to_vec(),
                    },
                    34,
                )),
            ),
            (
                b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
                Some((Reply::OtherPush, 31)),
            ),
            (
                b">3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n",
                Some((Reply::Unsubscribed, 34)),
            ),
            (b"$5\r\nab", None), // incomplete
            (b"", None),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                decode_reply(bytes).unwrap(),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert!(decode_reply(b"?what\r\n").is_err());
    }

    /// Feeds `bytes` to a framer one byte at a time and in one piece:
    /// both find the same frame ends.
    fn frames(bytes: &[u8], max_depth: usize, max_len: usize) -> Result<Vec<usize>, Malformed> {
        let mut whole = Framer::new(max_depth, max_len);
        let mut ends = Vec::new();
        let mut at = 0;
        while let Some(n) = whole.next_frame(&bytes[at..])? {
            at += n;
            ends.push(at);
        }
        let mut bytewise = Framer::new(max_depth, max_len);
        let (mut at, mut seen, mut got) = (0, 0, Vec::new());
        while seen < bytes.len() {
            seen += 1;
            while let Some(n) = bytewise.next_frame(&bytes[at..seen])? {
                at += n;
                got.push(at);
            }
        }
        assert_eq!(ends, got, "bytewise");
        Ok(ends)
    }

    #[test]
    fn the_framer_finds_frame_ends() {
        let ok: &[(&[u8], &[usize])] = &[
            (b"+OK\r\n:1\r\n", &[5, 9]),
            (b"$3\r\na\nb\r\n", &[9]),
            (b"*2\r\n$1\r\na\r\n:1\r\n*0\r\n", &[15, 19]),
            (b"%1\r\n+k\r\n*1\r\n+v\r\n_\r\n", &[16, 19]),
            (b"|1\r\n+a\r\n+b\r\n:7\r\n", &[16]),
            (b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nx\ny\r\n", &[34]),
            (b"*1\r\n*1\r\n:1\r\n", &[12]),
            (b"*2\r\n:1\r\n", &[]), // incomplete
        ];
        for (bytes, want) in ok {
            assert_eq!(frames(bytes, 4, 1024).unwrap(), *want, "{bytes:?}");
        }
        // Every complete frame the framer finds, the codec decodes whole.
        let bytes = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nx\ny\r\n";
        assert_eq!(decode_reply(bytes).unwrap().unwrap().1, 34);
    }

    #[test]
    fn the_framer_refuses_what_is_not_redis() {
        let deep = b"*1\r\n".repeat(100);
        assert!(frames(&deep, 8, 1 << 20).is_err(), "too deep");
        assert!(frames(b"*1\r\n*1\r\n:1\r\n", 1, 1024).is_err());
        assert!(
            frames(b"$99999\r\nab", 8, 1024).is_err(),
            "declared too long"
        );
        let endless = [&b"*99999999\r\n"[..], &b":1\r\n".repeat(300)].concat();
        assert!(frames(&endless, 8, 1024).is_err(), "endless array");
        assert!(frames(b"+no crlf\n", 8, 1024).is_err());
        let long = [&b"+"[..], &[b'a'; 70 << 10]].concat();
        assert!(frames(&long, 8, 1 << 20).is_err(), "a header without end");
        assert!(frames(b"?what\r\n", 8, 1024).is_err());
        assert!(frames(b"$x\r\n", 8, 1024).is_err());
        // RESP2's null is not RESP3: the link speaks RESP3 from HELLO on.
        assert!(decode_reply(b"$-1\r\n").is_err());
    }
}
