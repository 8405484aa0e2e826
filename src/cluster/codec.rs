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
        // RESP2's null is not RESP3: the link speaks RESP3 from HELLO on.
        assert!(decode_reply(b"$-1\r\n").is_err());
    }
}
