//! Cluster flow control: what a node holds for its clients while Redis
//! answers (a name being claimed, lines behind a client's answers) is
//! never lost and always bounded, and what the link reads is bounded too,
//! whatever answers on Redis's port. Each test starts its own Redis and
//! nodes (tests/common/redis.rs) and stops them all, also when it fails.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::redis::node;
use common::{Client, Server, TIMEOUT, poll_until};

/// Lets the node handle a line just sent before the next one is sent from
/// another connection (the order the test needs; nothing to poll for
/// while Redis is stopped). Too short a pause only makes the test pass
/// without testing the race.
fn settle() {
    std::thread::sleep(Duration::from_millis(150));
}

/// Clients `w<i>` for each `i` of `range` connect to `server` at once,
/// each sending its name and a line to itself; returns them once each has
/// its line (so logged in).
fn login_wave(server: &Server, range: std::ops::Range<usize>) -> Vec<Client> {
    let first = range.start;
    let mut wave: Vec<Client> = range
        .map(|i| {
            let mut c = Client::connect_small(server.addr);
            c.send(&format!("w{i}\nw{i}: in\n"));
            c
        })
        .collect();
    for (i, c) in wave.iter_mut().enumerate() {
        c.expect(&format!("from w{}: in", first + i));
    }
    wave
}

/// The names `w...` (of [`login_wave`]) that Redis holds, sorted.
fn held_names(redis: &common::redis::Redis) -> Vec<String> {
    let mut keys = redis.keys();
    keys.retain(|k| k.starts_with("chatd:name:w"));
    keys
}

/// A message to a name that a connection on the sender's node is only
/// claiming (the claim in flight) is not handed to the claimant: when the
/// claim is refused because another node holds the name, the line reaches
/// that holder, and the sender hears nothing.
#[test]
fn a_line_to_a_name_being_claimed_reaches_its_holder_on_another_node() {
    let redis = redis_or_skip!();
    let (mut a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let mut alice = b.login("alice");
    let mut carol = a.login("carol");
    let before = a.stat("deliveries");
    redis.signal("STOP");
    let mut claimant = a.connect();
    claimant.send("alice\n");
    settle();
    carol.send("alice: secret\n");
    settle();
    redis.signal("CONT");
    claimant.expect("error: name-taken: alice");
    alice.expect("from carol: secret");
    carol.sync("carol"); // and no error line before it
    let local = a.stat("deliveries") - before;
    assert_eq!(local, 1, "only carol's own copy was delivered here");
}

/// Messages sent to a connection while it claims its name are delivered
/// once the claim holds, in order and before anything sent after.
#[test]
fn lines_held_for_a_claimant_arrive_in_order_once_it_holds_the_name() {
    let redis = redis_or_skip!();
    let a = node(&redis.url(), "10", &[]);
    let mut carol = a.login("carol");
    redis.signal("STOP");
    let mut dave = a.connect();
    dave.send("dave\n");
    settle();
    carol.send("dave: one\ndave: two\n");
    settle();
    redis.signal("CONT");
    dave.expect("from carol: one");
    dave.expect("from carol: two");
    carol.send("dave: three\n");
    dave.expect("from carol: three");
    dave.sync("dave");
}

/// Lines held for a claimant count against its `--max-outbound` and the
/// memory bound: a client flooding a claimant while Redis is stopped gets
/// the claimant closed as a slow consumer, and the node's memory stays
/// small (it grew by the whole flood before).
#[test]
fn lines_held_for_a_claimant_are_bounded() {
    let redis = redis_or_skip!();
    let a = node(
        &redis.url(),
        "10",
        &["--max-buffer-memory", "1048576", "--max-outbound", "65536"],
    );
    let carol = a.login("carol");
    redis.signal("STOP");
    let mut m1 = a.connect();
    m1.send("m1\n");
    settle();
    // 40 MB of lines to m1.
    let line = format!("m1: {}\n", "f".repeat(16 * 1024 - 8));
    let writer = {
        let mut stream = carol.stream().try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..2500 {
                if stream.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        })
    };
    m1.expect("error: slow-consumer");
    let peak = poll_until(|| {
        let rss = a.status_kb("VmHWM");
        (writer.is_finished() || rss > 64 * 1024).then_some(rss)
    });
    let rss = a.status_kb("VmHWM");
    assert!(rss < 48 * 1024, "node peak RSS {rss} kB ({peak:?})");
    redis.signal("CONT");
    drop(carol);
}

/// What a claimant sends after its name, kept unread while the claim is
/// answered, counts against `--max-buffer-memory`: many claimants sending
/// 60 KB each while Redis is stopped are closed, the largest first, and
/// the node's buffers stay within the bound.
#[test]
fn a_claimants_kept_input_is_bounded() {
    let redis = redis_or_skip!();
    let mut a = node(
        &redis.url(),
        "10",
        &[
            "--max-buffer-memory",
            "1048576",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let metrics = metrics_addr(&mut a);
    redis.signal("STOP");
    let body = "nobody: x\n".repeat(6000);
    let claimants: Vec<Client> = (0..60)
        .map(|i| {
            let mut c = Client::connect_small(a.addr);
            c.send(&format!("c{i}\n{body}"));
            c
        })
        .collect();
    let evicted = poll_until(|| {
        let n = a.stat("memory_evictions");
        (n >= 10).then_some(n)
    });
    assert!(evicted.is_some(), "no claimant was closed:\n{}", a.log());
    let buffered = gauge(metrics, "chatd_buffered_bytes");
    assert!(buffered <= 1 << 20, "{buffered} bytes buffered");
    redis.signal("CONT");
    drop(claimants);
}

/// A login wave larger than Redis answers within the reply timeout does
/// not collapse: with Redis reached at 100 KB/s (2,000 claims take two
/// seconds to reach it; the reply timeout is half a second; with S shards
/// each is reached at 1/S of that), the node admits claims at the rate
/// they are answered, tells a slow Redis from a dead one, and keeps its
/// lease; every client logs in.
#[test]
fn a_login_wave_slower_than_the_reply_timeout_does_not_collapse() {
    let redis = redis_or_skip!();
    let shards = redis.servers.len();
    let proxy = redis.proxy();
    let mut a = node(&proxy.url(), "2", &[]);
    proxy.limit(100_000 / shards as u64);
    let _wave = login_wave(&a, 0..2000);
    let log = a.log();
    assert!(!log.contains("did not answer in time"), "{log}");
    assert!(!log.contains("lease not renewed"), "{log}");
    assert_eq!(a.stat("logins"), 2000);
    // The stats line shows the window (every shard's together) and that
    // nothing waits for it now.
    let window = a.stat("claim_window") / shards as u64;
    assert!(
        (16..=4096).contains(&window),
        "claim_window={window} a shard"
    );
    assert_eq!(a.stat("claims_queued"), 0);
}

/// A logout wave waits on the node, as a login wave does: a thousand
/// clients leave at once while Redis is reached at 20 KB/s a connection
/// (a group of 128 releases takes 70 ms to reach Redis, against a reply
/// timeout of one second that the proxy's pauses, up to 16 KB at a time,
/// stay inside; with S shards each gets 1/S of them), and the releases
/// past the window wait on the node (the stats line shows them) instead
/// of in Redis's queue, where, at a million clients on 53 nodes, they kept
/// every node's lease renewal waiting in the same pass of Redis's event
/// loop. A hundred of them log in again meanwhile, and in the end exactly
/// those hundred names are held.
#[test]
fn a_logout_wave_waits_on_the_node_and_frees_every_name() {
    let redis = redis_or_skip!();
    let proxy = redis.proxy();
    let mut a = node(&proxy.url(), "4", &[]);
    let names = |redis: &common::redis::Redis| held_names(redis).len();
    let clients = login_wave(&a, 0..1000);
    assert_eq!(names(&redis), 1000);
    proxy.limit(20_000);
    drop(clients);
    let waiting = poll_until(|| Some(a.stat("releases_queued")).filter(|&n| n > 0));
    assert!(waiting.is_some(), "no release waited for room");
    // The last hundred come back, most likely before their releases have
    // gone: a claim then takes its name's release out (which the unit tests
    // pin down), and does not wait behind the others'.
    let mut again = login_wave(&a, 900..1000);
    proxy.limit(0);
    assert!(poll_until(|| (a.stat("releases_queued") == 0).then_some(())).is_some());
    again[0].send("w999: still here\n");
    again[99].expect("from w900: still here");
    assert!(poll_until(|| (names(&redis) == 100).then_some(())).is_some());
    let held = held_names(&redis);
    assert!(
        held.iter().all(|k| k.as_str() >= "chatd:name:w900"),
        "{held:?}"
    );
    drop(again);
    assert!(poll_until(|| (names(&redis) == 0).then_some(())).is_some());
    let log = a.log();
    assert!(!log.contains("did not answer in time"), "{log}");
    assert!(!log.contains("lease not renewed"), "{log}");
    assert_eq!(a.stat("fences"), 0);
}

/// A link reset with claims in flight does not leave their names held.
/// What the node wrote before dropping a connection can still reach Redis
/// after the next connection has settled those names as free (a slow
/// network's buffers, a proxy), and Redis would then hold them for good
/// for clients long gone. Here the proxy holds the first connection's
/// claims (its group frozen) while the node times out, reconnects (into
/// another group) and settles the names; then it delivers them. The next
/// connection killed the dropped one first (`CLIENT KILL ID`), so they
/// never run. (Found by an attack through a throttling proxy: 638 names
/// held.)
#[test]
fn claims_of_a_dropped_connection_do_not_run_after_the_next_one() {
    let redis = redis_or_skip!();
    let proxy = redis.proxy();
    proxy.keep_in_transit();
    let mut a = node(&proxy.url(), "4", &[]);
    proxy.freeze_group(0);
    proxy.admit_as(1);
    let wave: Vec<Client> = (0..500)
        .map(|i| {
            let mut c = Client::connect_small(a.addr);
            c.send(&format!("w{i}\n"));
            c
        })
        .collect();
    a.wait_log("did not answer in time");
    drop(wave);
    a.wait_log("reachable again");
    let held = || held_names(&redis).len();
    assert_eq!(held(), 0);
    // The first connection's claims, delivered now.
    proxy.thaw();
    let clients = |redis: &common::redis::Redis| -> usize {
        let list = redis.cli_all(&["CLIENT", "LIST"]).join("\n");
        list.lines().filter(|l| l.contains("name=chatd-")).count()
    };
    let shards = redis.servers.len();
    assert!(poll_until(|| (clients(&redis) <= 2 * shards).then_some(())).is_some());
    assert_eq!(held(), 0, "names held for clients gone");
    assert!(a.log().contains("reachable again"));
}

/// The lease never waits behind data: with Redis reached at 100 KB/s per
/// connection, 400 KB of routed lines take about four seconds to reach it,
/// twice the lease. On the data link the renewals would wait behind them
/// and the node would fence, closing everyone; on their own connection
/// they go through, and every line arrives. Word that another node lost
/// its lease makes the node renew on the data link too, behind the
/// backlog: that late answer must not cut short what the lease's own
/// connection renewed since.
#[test]
fn the_lease_is_renewed_while_the_data_link_is_backed_up() {
    let redis = redis_or_skip!();
    let proxy = redis.proxy();
    let mut a = node(&proxy.url(), "2", &[]);
    // b lists the same Redis (through the proxy), at full speed.
    proxy.admit_as(1);
    let b = node(&proxy.url(), "2", &[]);
    proxy.admit_as(0);
    let mut bob = b.login("bob");
    let mut carol = a.login("carol");
    proxy.limit_group(0, 100_000);
    let body = "x".repeat(2000);
    let lines = 200;
    let all: String = (0..lines).map(|i| format!("bob: {i} {body}\n")).collect();
    carol.send(&all);
    settle();
    // What a node that took a new lease publishes.
    redis.cli_all(&["PUBLISH", "chatd:leases-lost", "0123456789abcdef"]);
    for i in 0..lines {
        bob.expect(&format!("from carol: {i} {body}"));
    }
    carol.sync("carol");
    let log = a.log();
    assert!(!log.contains("lease not renewed"), "{log}");
    assert_eq!(a.stat("fences"), 0);
    assert!(!log.contains("did not answer in time"), "{log}");
    assert_eq!(a.stat("logins"), 1);
}

/// Something that is not Redis on the link's port cannot crash, exhaust or
/// stall a node: replies nested two million deep, an endless bulk string
/// and an endless array each reset the link (logged); the node stays
/// small and alive, logins are answered (`unavailable`), local chat goes on.
#[test]
fn a_link_to_something_that_is_not_redis_cannot_hurt_the_node() {
    let deep = b"*1\r\n".repeat(1 << 16);
    let bulk = [&b"$1000000\r\n"[..], &[b'b'; 1 << 16]].concat();
    let array = [&b"*100000000\r\n"[..], &b":1\r\n".repeat(1 << 14)].concat();
    for (what, first, then) in [
        ("deep nesting", b"".to_vec(), deep),
        ("an endless bulk string", bulk, vec![b'b'; 1 << 16]),
        ("an endless array", array, b":1\r\n".repeat(1 << 14)),
    ] {
        // One such server for each shard the suite runs with.
        let fakes: Vec<NotRedis> = (0..common::redis::test_shards())
            .map(|_| NotRedis::start(first.clone(), then.clone()))
            .collect();
        let urls: Vec<String> = fakes
            .iter()
            .map(|f| format!("redis://{}", f.addr))
            .collect();
        let url = urls.join(",");
        let mut node = Server::start(&["--cluster", &url, "--cluster-lease", "10"]);
        // The data link reports the outage; the lease's own connection
        // may log its malformed reply first.
        let down = node.wait_log("cannot reach Redis");
        assert!(
            down.contains("malformed reply from Redis"),
            "{what}: {down}"
        );
        let mut c = node.connect();
        c.send("carol\n");
        c.expect("error: unavailable");
        let rss = node.status_kb("VmHWM");
        assert!(rss < 40 * 1024, "{what}: node peak RSS {rss} kB");
    }
}

/// A server on a free loopback port that answers every connection with
/// `first`, then `then` over and over (64 MB at most), reading nothing.
struct NotRedis {
    addr: SocketAddr,
}

impl NotRedis {
    fn start(first: Vec<u8>, then: Vec<u8>) -> NotRedis {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (first, then) = (first.clone(), then.clone());
                std::thread::spawn(move || {
                    let _ = stream.write_all(&first);
                    let mut sent = first.len();
                    while sent < 64 << 20 && stream.write_all(&then).is_ok() {
                        sent += then.len();
                    }
                });
            }
        });
        NotRedis { addr }
    }
}

/// The metrics endpoint's address, from the node's log.
fn metrics_addr(server: &mut Server) -> SocketAddr {
    let line = server.wait_log("metrics on http://");
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("metrics address in the log")
}

/// One gauge from a scrape of `/metrics`.
fn gauge(addr: SocketAddr, name: &str) -> u64 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: chatd\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in:\n{response}"))
}
