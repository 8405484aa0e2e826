//! Arbitrary bytes as a WebSocket client's stream, split into reads at
//! arbitrary points: decoding must not panic and must give the same text,
//! events and failure whatever the split, in chat mode and in echo mode;
//! and the handshake parser must not panic on any request.
#![no_main]

use chatd::ws::{self, Decodings, Reader};
use libfuzzer_sys::fuzz_target;

fn decode(input: &[u8], max: usize, lines: bool, cuts: &[usize]) -> Decodings {
    let mut reader = Reader::default();
    let mut out = Decodings::default();
    let mut start = 0;
    for &end in cuts {
        reader.push(&input[start..end], max, lines, &mut out);
        start = end;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [max, seed, input @ ..] = data else {
        return;
    };
    let _ = ws::parse_request(input);
    let max = 1 + usize::from(*max) * 4;
    let mut cuts = Vec::new();
    let (mut at, mut x) = (0usize, usize::from(*seed) + 1);
    while at < input.len() {
        at = (at + 1 + x % 23).min(input.len());
        x = x.wrapping_mul(31).wrapping_add(7);
        cuts.push(at);
    }
    cuts.push(input.len());
    for lines in [true, false] {
        let whole = decode(input, max, lines, &[input.len()]);
        assert_eq!(
            decode(input, max, lines, &cuts),
            whole,
            "decoding depends on read boundaries"
        );
    }
});
