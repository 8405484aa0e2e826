//! Microbenchmarks of the per-line hot paths: framing, message parsing and
//! routing one line to F recipients' buffers. Routing here uses the real
//! registry and writers with plain `Vec` buffers instead of connections, so
//! it measures the server's per-line work without sockets or system calls
//! (those are what `chatd-bench` and `benches/compare.sh` measure).

use std::hint::black_box;

use chatd::names::NameIndex;
use chatd::protocol::{self, Frame};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// 64 KiB of typical message lines.
fn input() -> Vec<u8> {
    let mut buf = Vec::new();
    let mut i = 0;
    while buf.len() < 64 * 1024 {
        buf.extend_from_slice(
            format!("bob, carol: message number {i} with some text\r\n").as_bytes(),
        );
        i += 1;
    }
    buf
}

fn framing(c: &mut Criterion) {
    let buf = input();
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Bytes(buf.len() as u64));
    group.bench_function("next_line+decode 64KiB", |b| {
        b.iter(|| {
            let mut data = &buf[..];
            let mut lines = 0;
            while let Frame::Line { line, consumed } = protocol::next_line(data, 16 * 1024) {
                black_box(protocol::decode(line).unwrap());
                data = &data[consumed..];
                lines += 1;
            }
            lines
        })
    });
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let line = "alice, bob, carol, dave, erin, frank, grace, heidi, ivan, judy: hello there";
    c.bench_function("parse_message+recipients (10 names)", |b| {
        b.iter(|| {
            let msg = protocol::parse_message(black_box(line)).unwrap();
            protocol::recipients(msg.names).count() + msg.body.len()
        })
    });
}

fn routing(c: &mut Criterion) {
    // The names as the connections hold them; the index keeps slab keys.
    let held: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
    let name_of = |k: usize| held[k].as_str();
    let mut registry = NameIndex::default();
    for (i, name) in held.iter().enumerate() {
        registry.claim(name, i, name_of);
    }
    let mut outboxes: Vec<Vec<u8>> = (0..1000).map(|_| Vec::with_capacity(1 << 16)).collect();
    let mut group = c.benchmark_group("route one line");
    for fanout in [1usize, 10] {
        let names: Vec<String> = (0..fanout)
            .map(|k| format!("user{}", k * 97 % 1000))
            .collect();
        let text = format!(
            "{}: a message of about forty bytes, give or take",
            names.join(", ")
        );
        let mut delivery = Vec::new();
        group.throughput(Throughput::Elements(fanout as u64));
        group.bench_function(format!("fan-out {fanout}"), |b| {
            b.iter(|| {
                let msg = protocol::parse_message(black_box(&text)).unwrap();
                delivery.clear();
                protocol::write_delivery(&mut delivery, "sender", msg.body);
                for name in protocol::recipients(msg.names) {
                    if let Some(to) = registry.lookup(name, name_of) {
                        let out = &mut outboxes[to];
                        if out.len() > 60 * 1024 {
                            out.clear(); // as a flush would
                        }
                        out.extend_from_slice(&delivery);
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, framing, parsing, routing);
criterion_main!(benches);
