//! The cross-node data plane: a node sends the lines of one loop turn to
//! Redis as one script call, grouped by where it last found each name
//! (docs/CLUSTER.md, "The path of a message"). Each test starts its own
//! Redis and nodes, and stops them all, also when it fails.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::redis::{Redis, node};

/// How many times Redis ran a script (`EVALSHA`), every shard together.
fn scripts_run(redis: &Redis) -> u64 {
    redis.calls("evalsha")
}

/// Thousands of lines read in one turn go to Redis as a few batches (each
/// at most 16 KiB), arrive in order, and each line to a name online
/// nowhere gets its own `not-online`, in its place among the answers.
#[test]
fn a_turn_of_thousands_of_lines_arrives_in_order_in_a_few_script_calls() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let mut bob = b.login("bob");
    let mut carol = a.login("carol");
    carol.send("bob: first\n");
    bob.expect("from carol: first");
    let before = scripts_run(&redis);
    let lines = 3000;
    let all: String = (0..lines)
        .map(|i| {
            if i % 500 == 499 {
                format!("bob, nobody{i}: {i}\n")
            } else {
                format!("bob: {i}\n")
            }
        })
        .collect();
    carol.send(&all);
    for i in 0..lines {
        bob.expect(&format!("from carol: {i}"));
    }
    for i in (499..lines).step_by(500) {
        carol.expect(&format!("error: not-online: nobody{i}"));
    }
    carol.sync("carol");
    let calls = scripts_run(&redis) - before;
    assert!(
        calls <= lines / 50,
        "{calls} script calls for {lines} lines: not batched"
    );
}

/// A name found on one node and then gone from it is looked up again, not
/// sent where it was: delivered on the node it is on now, `not-online`
/// when it is nowhere (never from the node's memory of where it was).
#[test]
fn a_name_that_moved_is_found_where_it_is_now() {
    let redis = redis_or_skip!();
    let nodes: Vec<_> = (0..3).map(|_| node(&redis.url(), "10", &[])).collect();
    let mut alice = nodes[0].login("alice");
    let mut bob = nodes[1].login("bob");
    alice.send("bob: 1\n");
    bob.expect("from alice: 1");
    drop(bob);
    let mut bob = logged_in_when_free(&nodes[2], "bob");
    alice.send("bob: 2\n");
    bob.expect("from alice: 2");
    drop(bob);
    // Once its node has released it in Redis (before that, a line to bob
    // still goes to that node, which no longer has him: counted as missed).
    let released = common::poll_until(|| {
        redis
            .on("bob")
            .cli(&["GET", "chatd:name:bob"])
            .is_empty()
            .then_some(())
    });
    assert!(released.is_some(), "bob never released");
    alice.send("bob: 3\n");
    alice.expect("error: not-online: bob");
    let mut bob = logged_in_when_free(&nodes[1], "bob");
    alice.send("bob: 4\n");
    bob.expect("from alice: 4");
    alice.sync("alice");
}

/// Logs `name` in on `node` once the cluster has freed it.
fn logged_in_when_free(node: &common::Server, name: &str) -> common::Client {
    common::poll_until(|| {
        let mut c = node.connect();
        c.send(&format!("{name}\n{name}: probe\n"));
        (c.line() == format!("from {name}: probe\n")).then_some(c)
    })
    .expect("name never free")
}

/// A node of an earlier version (a lease, no epoch, listening on
/// `P:node:<id>` only) is sent one message per line in the format it
/// reads, `<names>\n<line>`. (It knows one Redis: with shards, the one
/// that holds its user's name.)
#[test]
fn a_node_of_an_earlier_version_is_sent_the_format_it_reads() {
    let redis = redis_or_skip!();
    let a = node(&redis.url(), "10", &[]);
    let old = "00000000000000ab";
    let its = redis.on("olduser");
    its.cli(&["SET", &format!("chatd:lease:{old}"), "1", "PX", "60000"]);
    its.cli(&["SET", "chatd:name:olduser", old]);
    let mut listener = TcpStream::connect(its.addr()).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let channel = format!("chatd:node:{old}");
    write!(
        listener,
        "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
        channel.len()
    )
    .unwrap();
    // Subscribed before the lines go (else nobody listens: unavailable).
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !contains(&got, b":1\r\n") && Instant::now() < deadline {
        let mut buf = [0; 4096];
        let n = listener.read(&mut buf).unwrap_or(0);
        got.extend_from_slice(&buf[..n]);
    }
    let mut carol = a.login("carol");
    carol.send("olduser, nobody: hi\nolduser: again\n");
    carol.expect("error: not-online: nobody");
    let want = ["olduser\nfrom carol: hi\n", "olduser\nfrom carol: again\n"];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !want.iter().all(|w| contains(&got, w.as_bytes())) && Instant::now() < deadline {
        let mut buf = [0; 4096];
        let n = listener.read(&mut buf).unwrap_or(0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    for w in want {
        assert!(text.contains(w), "{w:?} not in {text:?}");
    }
    carol.sync("carol");
}

/// An epoch that is not a number (written by hand) does not wedge the
/// node that bumps it: its releases go on, lines to it are still
/// delivered, its link is not reset.
#[test]
fn an_epoch_that_is_not_a_number_does_not_wedge_its_node() {
    let redis = redis_or_skip!();
    let a = node(&redis.url(), "10", &[]);
    let mut b = node(&redis.url(), "10", &[]);
    let id = b.wait_log("cluster: node ");
    let id = id.split("cluster: node ").nth(1).unwrap()[..16].to_string();
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    alice.send("bob: 1\n");
    bob.expect("from alice: 1");
    redis.cli_expect(&["SET", &format!("chatd:epoch:{id}"), "abc"], "OK");
    let carol = b.login("carol");
    drop(carol);
    let released = common::poll_until(|| {
        redis
            .on("carol")
            .cli(&["EXISTS", "chatd:name:carol"])
            .eq("0")
            .then_some(())
    });
    assert!(released.is_some(), "carol never released");
    for i in 2..5 {
        alice.send(&format!("bob: {i}\n"));
        bob.expect(&format!("from alice: {i}"));
    }
    assert_eq!(b.stat("reconnects"), 0, "{}", b.log());
    assert!(!b.log().contains("refused a command"), "{}", b.log());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
