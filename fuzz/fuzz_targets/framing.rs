//! Arbitrary bytes, split into reads at arbitrary points: framing must not
//! panic and must give the same lines whatever the split, and no parser may
//! panic on any line.
#![no_main]

use chatd::protocol::{self, Framer};
use libfuzzer_sys::fuzz_target;

/// Frames `input` in chunks ending at `cuts`, parsing every line as the
/// server would. Returns the lines, whether a line was too long, and the
/// last unterminated line.
fn frame(input: &[u8], max: usize, cuts: &[usize]) -> (Vec<Vec<u8>>, bool, Option<Vec<u8>>) {
    let mut framer = Framer::default();
    let mut lines = Vec::new();
    let mut ok = true;
    let mut start = 0;
    for &end in cuts {
        ok &= framer.push(&input[start..end], max, |line| {
            parse_like_the_server(line);
            lines.push(line.to_vec());
        });
        start = end;
    }
    let last = framer.finish();
    if let Some(line) = &last {
        parse_like_the_server(line);
    }
    (lines, !ok, last)
}

fn parse_like_the_server(line: &[u8]) {
    let Ok(Some(text)) = protocol::decode(line) else {
        return;
    };
    let _ = protocol::parse_name(text);
    if let Ok(msg) = protocol::parse_message(text) {
        let mut out = Vec::new();
        for name in protocol::recipients(msg.names) {
            protocol::write_delivery(&mut out, name, msg.body);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [max, seed, input @ ..] = data else {
        return;
    };
    let max = 1 + usize::from(*max % 64);
    let whole = frame(input, max, &[input.len()]);
    let mut cuts = Vec::new();
    let (mut at, mut x) = (0usize, usize::from(*seed) + 1);
    while at < input.len() {
        at = (at + 1 + x % 17).min(input.len());
        x = x.wrapping_mul(31).wrapping_add(7);
        cuts.push(at);
    }
    cuts.push(input.len());
    assert_eq!(frame(input, max, &cuts), whole, "framing depends on read boundaries");
});
