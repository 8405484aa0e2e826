//! Cluster mode: several chatd nodes on one real `redis-server` serve one
//! name space. Each test starts its own Redis (tests/common/redis.rs) and
//! its own nodes, and stops them all, also when it fails.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::redis::{Redis, node};

use common::{Client, Server, TIMEOUT, http_get, poll_until};

/// Messages go from a client on one node to a client on another, both
/// ways; self-delivery and local delivery work as on one node.
#[test]
fn routes_between_nodes_both_ways() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    let mut carol = a.login("carol");
    alice.send("bob, alice, carol: hi\n");
    bob.expect("from alice: hi");
    alice.expect("from alice: hi");
    carol.expect("from alice: hi");
    bob.send("alice: back\n");
    alice.expect("from bob: back");
}

/// One line fans out over three nodes; `not-online` names exactly the
/// recipients online nowhere, each once, in the order given.
#[test]
fn fan_out_over_three_nodes_and_exact_not_online() {
    let redis = redis_or_skip!();
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis.url(), "10", &[])).collect();
    let mut sender = nodes[0].login("sender");
    let mut readers: Vec<Client> = (0..6)
        .map(|i| nodes[i % 3].login(&format!("r{i}")))
        .collect();
    sender.send("r0, x1, r1, r2, x2, r3, x1, r4, r5, r0: wide\n");
    for reader in &mut readers {
        reader.expect("from sender: wide");
    }
    sender.expect("error: not-online: x1, x2");
    sender.sync("sender");
}

/// A name held on any node gets `name-taken` on every other node, and is
/// free everywhere once its holder disconnects.
#[test]
fn names_are_unique_across_nodes_and_freed_at_disconnect() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let alice = a.login("alice");
    let mut again = b.connect();
    again.send("alice\n");
    again.expect("error: name-taken: alice");
    assert!(again.is_closed_by_server());
    drop(alice);
    let free = poll_until(|| {
        let mut c = b.connect();
        c.send("alice\nalice: mine\n");
        let mut line = String::new();
        let mut reader = std::io::BufReader::new(c.stream().try_clone().unwrap());
        std::io::BufRead::read_line(&mut reader, &mut line).ok()?;
        (line == "from alice: mine\n").then_some(())
    });
    assert!(free.is_some(), "alice never became free on the other node");
}

/// 5,000 lines from a client on one node to a client on another arrive
/// all, in order.
#[test]
fn five_thousand_lines_in_order_across_nodes() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    let batch: String = (0..5000).map(|i| format!("bob: {i}\n")).collect();
    alice.send(&batch);
    for i in 0..5000 {
        bob.expect(&format!("from alice: {i}"));
    }
}

/// Lines pipelined right after the name wait for the claim and are then
/// handled in order; `error:` lines keep the order of the lines that
/// caused them (an immediate `no-recipients` does not overtake a
/// `not-online` that waits for Redis).
#[test]
fn pipelined_lines_wait_for_the_claim_in_order() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let mut bob = b.login("bob");
    let mut alice = a.connect();
    alice.send("alice\nbob: one\nnobody: two\nno colon\nbob: three\nalice: four\n");
    bob.expect("from alice: one");
    bob.expect("from alice: three");
    // Its own copy of line 6 too keeps its place behind line 2's answer.
    alice.expect("error: not-online: nobody");
    alice.expect("error: no-recipients: expected \"name1, name2: message\"");
    alice.expect("from alice: four");
}

/// SIGTERM releases every name of the node and its lease: no key stays in
/// Redis, and the names are free on the other node at once.
#[test]
fn sigterm_leaves_no_keys_behind() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "1", &[]);
    let mut b = node(&redis.url(), "10", &[]);
    let alice = a.login("alice");
    let carol = a.login("carol");
    a.signal("TERM");
    drop(alice);
    // carol closes late: the shutdown outlasts a third of the lease, and
    // no renewal may bring the lease back.
    std::thread::sleep(Duration::from_millis(700));
    drop(carol);
    assert_eq!(a.wait_exit().code(), Some(0));
    let mut alice = b.login("alice"); // free at once, no lease to wait for
    alice.sync("alice");
    b.signal("TERM");
    drop(alice);
    assert_eq!(b.wait_exit().code(), Some(0));
    // At once: a lease renewed during the shutdown would outlive it.
    assert_eq!(redis.keys(), Vec::<String>::new(), "keys left behind");
}

/// A node killed with SIGKILL leaves its names behind, bound to its lease:
/// they are free on another node within one lease, and the survivor's
/// sweep then forgets the dead node and its names.
#[test]
fn names_of_a_killed_node_free_within_a_lease() {
    let redis = redis_or_skip!();
    let a = node(&redis.url(), "2", &[]);
    let b = node(&redis.url(), "2", &[]);
    let _alice = a.login("alice");
    a.signal("KILL");
    let killed = Instant::now();
    let mut taken = b.connect();
    taken.send("alice\n");
    taken.expect("error: name-taken: alice"); // its lease still runs
    let free = poll_until(|| logs_in(&b, "alice"));
    assert!(free.is_some(), "alice never became free");
    assert!(
        killed.elapsed() < Duration::from_secs(4),
        "{:?}",
        killed.elapsed()
    );
    // Left (the probe released alice): b's lease and epoch, the set of
    // nodes, with b alone, and the layout; a's set of names, epoch and
    // entry in the nodes are gone.
    let swept = poll_until(|| {
        let keys = redis.keys();
        let nodes = redis.cli_all(&["SCARD", "chatd:nodes"]);
        let kinds: Vec<&str> = keys.iter().filter_map(|k| k.split(':').nth(1)).collect();
        let alone = nodes.iter().all(|n| n == "1");
        (kinds == ["epoch", "layout", "lease", "nodes"] && alone).then_some(())
    });
    assert!(swept.is_some(), "dead node not swept: {:?}", redis.keys());
}

/// A dead node's names are swept a bounded batch at a time (2,000 a
/// sweep), never in one long script that would keep Redis from every other
/// client (past 5 s Redis answers everyone `BUSY`): 5,000 names of a dead
/// node take three sweeps, and then it is forgotten; the live node's own
/// names are left alone. (With shards, each Redis holds all 5,000 and
/// sweeps them on its own.)
#[test]
fn a_dead_nodes_names_are_swept_in_bounded_batches() {
    let redis = redis_or_skip!();
    let create = "for i = 1, 5000 do \
        redis.call('SET', 'chatd:name:d' .. i, 'dead') \
        redis.call('SADD', 'chatd:names:dead', 'd' .. i) end \
        redis.call('SADD', 'chatd:nodes', 'dead') return 1";
    redis.cli_expect(&["EVAL", create, "0"], "1");
    let a = node(&redis.url(), "1", &[]);
    let _alice = a.login("alice");
    let swept = poll_until(|| {
        let left = redis.cli_all(&["SCARD", "chatd:names:dead"]);
        let nodes = redis.cli_all(&["SCARD", "chatd:nodes"]);
        (left.iter().all(|n| n == "0") && nodes.iter().all(|n| n == "1")).then_some(())
    });
    assert!(swept.is_some(), "not swept: {:?}", redis.keys().len());
    redis.cli_expect(&["EXISTS", "chatd:name:d1"], "0");
    assert_eq!(redis.on("alice").cli(&["EXISTS", "chatd:name:alice"]), "1");
    for (i, server) in redis.servers.iter().enumerate() {
        let spops = server.calls("spop");
        assert!(spops >= 3, "shard {i}: {spops} batches for 5,000 names");
    }
}

/// While Redis is down, chat on one node goes on, recipients elsewhere are
/// reported as `unavailable`, logins are refused with `error: unavailable`
/// and `/healthz` says 503. Redis restarted empty: the lease and the names
/// are taken again and routing comes back, without duplicate names.
#[test]
fn redis_down_then_back_empty() {
    let mut redis = redis_or_skip!();
    let mut a = node(&redis.url(), "2", &["--metrics-addr", "127.0.0.1:0"]);
    let b = node(&redis.url(), "2", &[]);
    let metrics = a.wait_log("metrics on http://");
    let metrics = metrics
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut alice = a.login("alice");
    let mut carol = a.login("carol");
    let _bob = b.login("bob");
    redis.kill();
    a.wait_log("cluster: lost Redis");
    alice.send("carol, bob: while down\n");
    carol.expect("from alice: while down");
    alice.expect("error: unavailable: bob");
    let mut late = a.connect();
    late.send("dave\n");
    late.expect("error: unavailable");
    assert!(late.is_closed_by_server());
    let health = http_get(&metrics, "/healthz");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    redis.restart();
    // The lease was 2 s: the nodes fence unless Redis is back in time.
    // Either way, after it is back, logins and routing work again.
    let back = poll_until(|| logs_in(&b, "erin"));
    assert!(back.is_some(), "logins never came back");
    let health = poll_until(|| {
        http_get(&metrics, "/healthz")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
    assert!(health.is_some(), "healthz never came back");
}

/// After a FLUSHALL, a user who stayed online on another node does not
/// look offline until that node's next renewal (a third of the lease):
/// the node that finds its lease gone tells the others, which claim their
/// names again at once. A line meanwhile may get `unavailable`, never
/// `not-online`.
#[test]
fn online_users_stay_online_after_redis_is_flushed() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "60", &[]), node(&redis.url(), "60", &[]));
    let mut carol = a.login("carol");
    let mut bob = b.login("bob");
    redis.cli_expect(&["FLUSHALL"], "OK");
    let mut errors = Vec::new();
    let delivered = (0..50).find(|round| {
        // The line to herself waits behind the answer for bob's line.
        carol.send(&format!("bob: probe {round}\ncarol: mark {round}\n"));
        let mut error = false;
        loop {
            let line = carol.line();
            if line == format!("from carol: mark {round}\n") {
                break;
            }
            error = true;
            errors.push(line);
        }
        std::thread::sleep(Duration::from_millis(100));
        !error
    });
    assert!(delivered.is_some(), "bob never reachable again: {errors:?}");
    assert!(
        errors.iter().all(|e| e.starts_with("error: unavailable")),
        "{errors:?}"
    );
    // The rounds that got `unavailable` were not delivered.
    bob.expect(&format!("from carol: probe {}", delivered.unwrap()));
}

/// A client that leaves one node and at once logs in on another keeps its
/// name, also when the first node's release reaches Redis after the
/// second node's claim: a claim found taken is tried once more.
#[test]
fn a_quick_move_between_nodes_keeps_the_name() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let alice = a.login("alice");
    a.signal("STOP");
    drop(alice);
    let mut moved = b.connect();
    moved.send("alice\nalice: moved\n");
    std::thread::sleep(Duration::from_millis(30)); // b's claim goes first
    a.signal("CONT");
    moved.expect("from alice: moved");
}

/// A node cut from Redis without its connection closing (a partition)
/// closes its clients with `error: unavailable` before its lease can
/// expire, so the other node can take the name only after: never two
/// holders at once.
#[test]
fn a_partitioned_node_fences_before_its_names_can_move() {
    let redis = redis_or_skip!();
    let proxy = redis.proxy();
    let a = node(&proxy.url(), "2", &[]);
    // b lists the same Redis (through the proxy), and is not cut.
    proxy.admit_as(1);
    let b = node(&proxy.url(), "2", &[]);
    proxy.admit_as(0);
    let alice = a.login("alice");
    proxy.freeze_group(0);
    let frozen = Instant::now();
    // Until alice is closed on a, b must not give the name away.
    let mut closed_at = None;
    let mut taken_at = None;
    while (closed_at.is_none() || taken_at.is_none()) && frozen.elapsed() < TIMEOUT {
        if closed_at.is_none() {
            alice
                .stream()
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut buf = [0; 64];
            if let Ok(n) = alice.stream().try_clone().unwrap().read(&mut buf) {
                assert_eq!(&buf[..n], b"error: unavailable\n");
                closed_at = Some(frozen.elapsed());
            }
        }
        if taken_at.is_none() {
            let mut c = b.connect();
            c.send("alice\nalice: mine\n");
            let mut buf = [0; 64];
            if let Ok(n) = c.stream().try_clone().unwrap().read(&mut buf) {
                if &buf[..n] == b"from alice: mine\n" {
                    taken_at = Some(frozen.elapsed());
                }
            }
        }
    }
    let (closed, taken) = (
        closed_at.expect("never fenced"),
        taken_at.expect("never freed"),
    );
    assert!(
        closed < taken,
        "fenced at {closed:?}, taken elsewhere at {taken:?}"
    );
}

/// A node paused (SIGSTOP) longer than its lease, while another node takes
/// its client's name, fences on waking before it routes anything as that
/// name: the client gets `error: unavailable` and nothing it sent is
/// delivered.
#[test]
fn a_node_woken_after_its_lease_routes_nothing() {
    let redis = redis_or_skip!();
    let a = node(&redis.url(), "1", &[]);
    let b = node(&redis.url(), "1", &[]);
    let mut alice = a.login("alice");
    let mut watcher = b.login("watcher");
    a.signal("STOP");
    // The pause outlives the lease: b may take the name.
    let mut thief = None;
    let taken = poll_until(|| {
        let mut c = b.connect();
        c.send("alice\nalice: mine\n");
        let mut buf = [0; 64];
        let n = c.stream().try_clone().unwrap().read(&mut buf).ok()?;
        let ok = &buf[..n] == b"from alice: mine\n";
        if ok {
            thief = Some(c);
        }
        ok.then_some(())
    });
    assert!(taken.is_some(), "the name never moved");
    // Input waiting for the paused node when it wakes.
    alice.send("watcher: as alice from a paused node\n");
    a.signal("CONT");
    alice.expect("error: unavailable");
    watcher.send("watcher: sync\n");
    watcher.expect("from watcher: sync"); // nothing from the woken node before
}

/// Redis cuts the node's link (`CLIENT KILL TYPE pubsub`): the node
/// reconnects, keeps its lease and names, and routing goes on.
#[test]
fn client_kill_of_the_link_is_survived() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "10", &[]);
    let b = node(&redis.url(), "10", &[]);
    let mut alice = a.login("alice");
    let bob = b.login("bob");
    redis.cli_all(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    a.wait_log("cluster: lost Redis");
    let back = poll_until(|| {
        alice.send("bob: after kill\n");
        bob.stream()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0; 64];
        let n = bob.stream().try_clone().unwrap().read(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .contains("from alice: after kill")
            .then_some(())
    });
    assert!(back.is_some(), "routing never came back");
    let mut again = b.connect();
    again.send("alice\n");
    again.expect("error: name-taken: alice");
}

/// A node that reads its channel too slowly is cut by Redis's pub/sub
/// output-buffer limit; it reconnects and routing comes back.
#[test]
fn output_buffer_limit_disconnect_is_survived() {
    let redis = redis_or_skip!();
    redis.cli_expect(
        &[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 64kb 0 0",
        ],
        "OK",
    );
    let a = node(&redis.url(), "10", &[]);
    let mut b = node(&redis.url(), "10", &[]);
    let mut alice = a.login("alice");
    let bob = b.login("bob");
    let big = format!("bob: {}\n", "x".repeat(8000));
    // b reads nothing while stopped: once the socket buffers are full,
    // Redis's output buffer for b passes 64 KiB and Redis cuts it.
    b.signal("STOP");
    // Once Redis has cut b, lines to bob get `unavailable: bob` (nobody
    // listens on b's channel): drain alice's replies.
    let mut replies = alice.stream().try_clone().unwrap();
    std::thread::spawn(move || std::io::copy(&mut replies, &mut std::io::sink()));
    for _ in 0..1500 {
        alice.send(&big);
    }
    b.signal("CONT");
    b.wait_log("cluster: lost Redis");
    let mut alice2 = a.login("alice2");
    let back = poll_until(|| {
        let mut bob2 = b.connect();
        bob2.send("bob2\nbob2: ready\n");
        let mut buf = [0; 64];
        let n = bob2.stream().try_clone().unwrap().read(&mut buf).ok()?;
        if &buf[..n] != b"from bob2: ready\n" {
            return None;
        }
        alice2.send("bob2: again\n");
        bob2.expect("from alice2: again");
        Some(())
    });
    assert!(back.is_some(), "routing never came back");
    drop(bob);
}

/// A message to a client whose node has lost its link to Redis (its lease
/// still running) is not dropped silently: nobody listens on that node's
/// channel, so the sender gets `error: unavailable: <name>`.
#[test]
fn a_recipient_whose_node_is_not_listening_is_reported() {
    let redis = redis_or_skip!();
    let proxy = redis.proxy();
    let a = node(&proxy.url(), "10", &[]);
    proxy.admit_as(1);
    let mut b = node(&proxy.url(), "10", &[]);
    let mut alice = a.login("alice");
    let _bob = b.login("bob");
    proxy.cut(1); // b's link to Redis breaks; its lease runs on
    b.wait_log_count("cluster: lost Redis", redis.servers.len());
    alice.send("bob, nobody: are you there\n");
    alice.expect("error: not-online: nobody");
    alice.expect("error: unavailable: bob");
}

/// Messages between clients of the same node cost Redis nothing: no
/// script runs for them.
#[test]
fn local_messages_cost_no_redis_command() {
    let redis = redis_or_skip!();
    let a = node(&redis.url(), "10", &[]);
    let mut alice = a.login("alice");
    let mut carol = a.login("carol");
    let scripts = || redis.calls("evalsha");
    let before = scripts();
    for i in 0..100 {
        alice.send(&format!("carol, alice: {i}\n"));
        carol.expect(&format!("from alice: {i}"));
        alice.expect(&format!("from alice: {i}"));
    }
    assert_eq!(scripts(), before, "local messages ran scripts in Redis");
}

/// With `--reuse-port`, two nodes listen on one port: the kernel spreads
/// the connections over both, and their clients talk as one server.
#[test]
fn two_nodes_share_one_port_with_reuse_port() {
    let redis = redis_or_skip!();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let args = ["--addr", addr.as_str(), "--reuse-port"];
    let mut a = node(&redis.url(), "10", &args);
    let mut b = node(&redis.url(), "10", &args);
    let mut clients: Vec<Client> = (0..24).map(|i| a.login(&format!("u{i}"))).collect();
    let (on_a, on_b) = (a.connections(), b.connections());
    assert_eq!(on_a + on_b, 24);
    assert!(on_a > 0 && on_b > 0, "all on one node: {on_a} and {on_b}");
    for i in 0..24 {
        let to = (i + 1) % 24;
        clients[i].send(&format!("u{to}: hi {i}\n"));
        clients[to].expect(&format!("from u{i}: hi {i}"));
    }
}

/// A client that half-closes right after its last line (`nc -N`, a
/// script) still gets the answers Redis gives for it, then the close.
#[test]
fn answers_reach_a_client_that_half_closed() {
    let redis = redis_or_skip!();
    let (a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let mut bob = b.login("bob");
    let mut alice = a.connect();
    alice.send("alice\nbob, nobody: last words\n");
    alice.shutdown_write();
    bob.expect("from alice: last words");
    alice.expect("error: not-online: nobody");
    alice.expect_eof();
    // Many lines, then the FIN at once: every answer, in order, then EOF.
    let mut carol = a.login("carol");
    let lines: String = (0..150)
        .map(|i| format!("bob: {i}\nnobody{i}: {i}\n"))
        .collect();
    carol.send(&lines);
    carol.shutdown_write();
    for i in 0..150 {
        bob.expect(&format!("from carol: {i}"));
        carol.expect(&format!("error: not-online: nobody{i}"));
    }
    carol.expect_eof();
}

/// A live upgrade of a node keeps its lease and its names: after it, the
/// names are still taken elsewhere and messages flow both ways.
#[test]
fn a_node_upgraded_in_place_keeps_its_names() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "10", &[]);
    let b = node(&redis.url(), "10", &[]);
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    let keys = redis.keys();
    a.upgrade(1);
    a.wait_log("cluster: node ");
    // With Redis answering, the quiesce ends on its answers, not at its cap.
    let log = a.log();
    assert!(!log.contains("did not answer everything"), "{log}");
    let ready = poll_until(|| {
        alice.send("bob: after upgrade\n");
        bob.stream()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0; 64];
        let n = bob.stream().try_clone().unwrap().read(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .contains("from alice: after upgrade")
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "routing from the upgraded node never worked"
    );
    bob.stream().set_read_timeout(Some(TIMEOUT)).unwrap();
    bob.send("alice: back\n");
    let mut line = String::new();
    while line != "from bob: back\n" {
        line = alice.line(); // skip the probes' own copies, if any
    }
    let mut taken = b.connect();
    taken.send("alice\n");
    taken.expect("error: name-taken: alice");
    assert_eq!(redis.keys(), keys, "the same lease and names");
}

/// The cluster's totals (lines routed out and in) are carried across a
/// live upgrade with the other counters, not started again from zero.
#[test]
fn an_upgrade_carries_the_cluster_counters() {
    let redis = redis_or_skip!();
    let (mut a, b) = (node(&redis.url(), "10", &[]), node(&redis.url(), "10", &[]));
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    alice.send("bob: out\n");
    bob.expect("from alice: out");
    bob.send("alice: in\n");
    alice.expect("from bob: in");
    let (out, into) = (a.stat("routed_out"), a.stat("deliveries_in"));
    assert_eq!((out, into), (1, 1));
    a.upgrade(1);
    assert_eq!((a.stat("routed_out"), a.stat("deliveries_in")), (out, into));
}

/// The quiesce before an upgrade is capped at a second: with Redis stopped
/// (nothing answers) the node hands over at the cap, long before its reply
/// timeout (a quarter of a 20 s lease), and the new process reads local
/// chat at once instead of holding it for a link that the old one could
/// not get answers from.
#[test]
fn the_quiesce_before_an_upgrade_is_capped() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "20", &[]);
    let mut alice = a.login("alice");
    let mut bob = a.login("bob");
    redis.signal("STOP");
    a.upgrade(1);
    alice.send("bob: after\n");
    bob.expect("from alice: after");
    let log = a.log();
    let handed = log.find("within 1000 ms; handing over");
    assert!(handed.is_some(), "no hand-over at the cap:\n{log}");
    let timed_out = "Redis did not answer in time";
    assert!(
        !log.contains(timed_out),
        "waited for the reply timeout:\n{log}"
    );
    redis.signal("CONT");
}

/// What Redis has not answered when the quiesce before an upgrade ends is
/// not lost silently: a claim in flight ends in `error: unavailable`, and
/// the sender of a line held for that claimant, or of a line whose route
/// is in flight, hears `error: unavailable: <name>`, from the new process:
/// in the order it sent them on one Redis; over several, the answer for a
/// line held for a claimant may come after a later line's (the one order
/// docs/CLUSTER.md says is not kept), so only all of them are checked.
#[test]
fn an_upgrade_reports_what_redis_did_not_answer() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "20", &[]);
    let mut sender = a.login("sender");
    redis.signal("STOP");
    let mut carol = a.connect();
    carol.send("carol\n");
    std::thread::sleep(Duration::from_millis(100)); // its claim goes first
    sender.send("carol: c0\ncarol: c1\nnobody: x\n");
    std::thread::sleep(Duration::from_millis(100));
    a.upgrade(1);
    carol.expect("error: unavailable");
    let mut heard: Vec<String> = (0..3).map(|_| sender.line()).collect();
    if redis.servers.len() > 1 {
        heard.sort();
    }
    let want = [
        "error: unavailable: carol\n",
        "error: unavailable: carol\n",
        "error: unavailable: nobody\n",
    ];
    assert_eq!(heard, want);
    redis.signal("CONT");
    sender.sync("sender");
}

/// An upgrade while the node is cut from Redis does not stop its fencing:
/// the new process takes the old one's lease as it was, and closes the
/// client with `error: unavailable` before the lease can expire.
#[test]
fn an_upgrade_while_cut_from_redis_still_fences() {
    let redis = redis_or_skip!();
    let proxy = redis.proxy();
    let mut a = node(&proxy.url(), "2", &[]);
    let mut alice = a.login("alice");
    proxy.freeze();
    a.upgrade(1);
    alice.expect("error: unavailable");
}

/// Names released while the link was down are settled by the new process
/// after an upgrade: they are free on the other node once its link is back.
#[test]
fn names_left_uncertain_survive_an_upgrade() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "10", &[]);
    let b = node(&redis.url(), "10", &[]);
    let leavers: Vec<Client> = (0..5).map(|i| a.login(&format!("gone{i}"))).collect();
    kill_first_link(&redis);
    drop(leavers);
    a.wait_log("cluster: lost Redis");
    a.upgrade(1);
    for i in 0..5 {
        let name = format!("gone{i}");
        let free = poll_until(|| logs_in(&b, &name));
        assert!(free.is_some(), "{name} stayed held after the upgrade");
    }
}

/// During an upgrade of the recipient's node, nothing sent to it is lost
/// silently: every line arrives, or its sender is told `unavailable`.
#[test]
fn an_upgrade_loses_no_cross_node_line_silently() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "10", &[]);
    let b = node(&redis.url(), "10", &[]);
    let alice = a.login("alice");
    let bob = b.login("bob");
    let sent = 3000;
    let sender = std::thread::spawn(move || {
        let mut bob = bob;
        for i in 0..sent {
            bob.send(&format!("alice: {i}\n"));
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        bob.send("bob: done\n");
        let mut unavailable = 0;
        loop {
            let line = bob.line();
            if line == "from bob: done\n" {
                return unavailable;
            }
            assert_eq!(line, "error: unavailable: alice\n");
            unavailable += 1;
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    a.upgrade(1);
    let unavailable = sender.join().unwrap();
    let mut received = 0;
    let mut last = None;
    alice
        .stream()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut reader = std::io::BufReader::new(alice.stream().try_clone().unwrap());
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
        let i: u32 = line
            .trim_end()
            .strip_prefix("from bob: ")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            last.is_none_or(|l| i > l),
            "out of order: {i} after {last:?}"
        );
        last = Some(i);
        received += 1;
        line.clear();
    }
    assert_eq!(
        received + unavailable,
        sent,
        "{received} received, {unavailable} unavailable"
    );
}

/// The stats line and the metrics carry the cluster's state, the lease's
/// age and the cross-node counters.
#[test]
fn stats_and_metrics_carry_the_cluster_state() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "10", &["--metrics-addr", "127.0.0.1:0"]);
    let mut b = node(&redis.url(), "10", &[]);
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    alice.send("bob: one\nbob: two\n");
    bob.expect("from alice: one");
    bob.expect("from alice: two");
    assert_eq!(a.stat("routed_out"), 2);
    assert_eq!(b.stat("deliveries_in"), 2);
    assert!(a.stat("lease_age_ms") < 10_000);
    let line = a.wait_log("cluster=");
    assert!(line.contains(" cluster=ready "), "{line}");
    let metrics = a.wait_log("metrics on http://");
    let addr = metrics
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let body = http_get(addr, "/metrics");
    for sample in [
        "\nchatd_cluster_up 1\n",
        "\nchatd_cluster_routed_out_total 2\n",
    ] {
        assert!(body.contains(sample), "{sample:?} missing:\n{body}");
    }
    assert!(
        body.contains("\nchatd_cluster_lease_age_milliseconds "),
        "{body}"
    );
    assert!(
        body.contains("\nchatd_cluster_redis_rtt_microseconds "),
        "{body}"
    );
}

/// A client that leaves while its node's link to Redis is down does not
/// leave its name behind: once the link is back (its lease intact), the
/// node settles the names it could not release, and the name is free on
/// the other node.
#[test]
fn a_name_released_while_the_link_is_down_is_freed_after() {
    let redis = redis_or_skip!();
    let mut a = node(&redis.url(), "10", &[]);
    let b = node(&redis.url(), "10", &[]);
    let alice = a.login("alice");
    kill_first_link(&redis);
    drop(alice); // released while the link is down
    a.wait_log("cluster: lost Redis");
    let free = poll_until(|| logs_in(&b, "alice"));
    assert!(
        free.is_some(),
        "alice stayed held by a node that has no alice"
    );
}

/// A claim answered with an error (the script cache flushed under the
/// node) fails at once with `unavailable` instead of hanging until the
/// login timeout; the node reloads its scripts and logins work again.
#[test]
fn an_error_reply_fails_the_claim_at_once() {
    let redis = redis_or_skip!();
    let a = node(&redis.url(), "10", &["--login-timeout", "30"]);
    redis.cli_expect(&["SCRIPT", "FLUSH"], "OK");
    let mut bob = a.connect();
    bob.send("bob\n");
    bob.expect("error: unavailable");
    let back = poll_until(|| logs_in(&a, "carol"));
    assert!(back.is_some(), "logins never worked again");
}

/// A client that keeps sending while its answers from Redis cannot come
/// (the link frozen, for less than the reply timeout) is not read further:
/// the node's memory stays small however much it sends, and once Redis
/// answers, every line is handled, in order.
#[test]
fn a_client_waiting_for_redis_is_not_read_without_bound() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let redis = redis_or_skip!();
    let proxy = redis.proxy();
    let a = node(&proxy.url(), "20", &[]);
    let mut alice = a.login("alice");
    proxy.freeze();
    alice.send("somebody: waits for Redis\n");
    // 300,000 lines to herself, whose copies wait behind that answer.
    const LINES: usize = 300_000;
    let flood: String = (0..LINES).map(|i| format!("alice: {i}\n")).collect();
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut stream = alice.stream().try_clone().unwrap();
        let written = Arc::clone(&written);
        std::thread::spawn(move || {
            for chunk in flood.as_bytes().chunks(64 * 1024) {
                if stream.write_all(chunk).is_err() {
                    break;
                }
                written.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        })
    };
    let started = poll_until(|| (written.load(Ordering::SeqCst) >= 1 << 20).then_some(()));
    assert!(started.is_some(), "the flood was never sent");
    let rss = a.status_kb("VmRSS");
    assert!(rss < 30 * 1024, "node RSS {rss} kB while a client waits");
    proxy.thaw();
    alice.expect("error: not-online: somebody");
    for i in 0..LINES {
        alice.expect(&format!("from alice: {i}"));
    }
    writer.join().unwrap();
}

/// Whether `name` can log in on `server` now: it logs in, sends itself a
/// line and gets it back (`Some`), or is refused (`None`). The connection
/// closes after.
fn logs_in(server: &Server, name: &str) -> Option<()> {
    let mut c = server.connect();
    c.send(&format!("{name}\n{name}: probe\n"));
    let mut buf = [0; 64];
    let n = c.stream().try_clone().unwrap().read(&mut buf).ok()?;
    (buf[..n] == *format!("from {name}: probe\n").as_bytes()).then_some(())
}

/// Cuts the data link of the node that connected first, on every Redis
/// (`CLIENT KILL ID` of the oldest subscriber).
fn kill_first_link(redis: &Redis) {
    for server in &redis.servers {
        let list = server.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]);
        let id = list
            .split_whitespace()
            .next()
            .unwrap()
            .trim_start_matches("id=")
            .to_string();
        server.cli(&["CLIENT", "KILL", "ID", &id]);
    }
}
