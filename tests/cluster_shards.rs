//! Past one Redis: `--cluster redis://a,redis://b,...` shards the names
//! over independent Redis primaries by the name's hash slot
//! (docs/CLUSTER.md, "Several Redis"). Each test starts its own Redis
//! servers and nodes, and stops them all, also when it fails.

#[macro_use]
mod common;

use chatd::cluster::shard_of;
use common::Server;
use common::redis::RedisServer as Redis;

/// `count` fresh Redis servers (or none: the test is skipped).
fn redises(count: usize) -> Option<Vec<Redis>> {
    (0..count).map(|_| Redis::start_or_skip()).collect()
}

/// The `--cluster` list of `redis`.
fn urls(redis: &[Redis]) -> String {
    let urls: Vec<String> = redis.iter().map(Redis::url).collect();
    urls.join(",")
}

/// A node of the cluster sharded over `redis`, ready on every shard.
fn sharded_node(redis: &[Redis], lease: &str) -> Server {
    let list = urls(redis);
    let mut server = Server::start(&["--cluster", &list, "--cluster-lease", lease]);
    server.wait_log_count(" ready (Redis at ", redis.len());
    server
}

/// The first `n` names `<stem><i>` that live on `shard` of `shards`.
fn names_on(stem: &str, shard: usize, shards: usize, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{stem}{i}"))
        .filter(|name| shard_of(name, shards) == shard)
        .take(n)
        .collect()
}

/// The names a Redis holds (the keys `chatd:name:*`).
fn names_in(redis: &Redis) -> Vec<String> {
    redis
        .keys()
        .into_iter()
        .filter_map(|k| k.strip_prefix("chatd:name:").map(str::to_string))
        .collect()
}

/// Two and three shards: names live on their shard's Redis only, are
/// unique across nodes, lines reach them across nodes in order, and a line
/// to names online nowhere on several shards gets one `not-online` naming
/// them in the order given, as on one node.
#[test]
fn names_shard_over_several_redis_as_one_name_space() {
    for shards in [2, 3] {
        let Some(redis) = redises(shards) else {
            return;
        };
        let (a, b) = (sharded_node(&redis, "10"), sharded_node(&redis, "10"));
        // One recipient and one stranger per shard.
        let here: Vec<String> = (0..shards)
            .map(|s| names_on("r", s, shards, 1).remove(0))
            .collect();
        let nobody: Vec<String> = (0..shards)
            .map(|s| names_on("x", s, shards, 1).remove(0))
            .collect();
        let mut recipients: Vec<_> = here.iter().map(|n| b.login(n)).collect();
        for (s, r) in redis.iter().enumerate() {
            assert_eq!(names_in(r), [here[s].clone()], "shard {s} of {shards}");
        }
        // Unique across nodes, whatever the shard.
        for name in &here {
            let mut again = a.connect();
            again.send(&format!("{name}\n"));
            again.expect(&format!("error: name-taken: {name}"));
        }
        let mut carol = a.login("carol");
        // Strangers and recipients of every shard, interleaved.
        let mut to: Vec<&str> = Vec::new();
        for s in (0..shards).rev() {
            to.push(&nobody[s]);
            to.push(&here[s]);
        }
        let lines = 300;
        let all: String = (0..lines)
            .map(|i| format!("{}: {i}\n", to.join(", ")))
            .collect();
        carol.send(&all);
        let strangers: Vec<&str> = (0..shards).rev().map(|s| nobody[s].as_str()).collect();
        let not_online = format!("error: not-online: {}", strangers.join(", "));
        for _ in 0..lines {
            carol.expect(&not_online);
        }
        for r in &mut recipients {
            for i in 0..lines {
                r.expect(&format!("from carol: {i}"));
            }
        }
        carol.sync("carol");
    }
}

/// One shard killed while the others live: only its names get
/// `unavailable` (logins, lines to them), only its clients are fenced; a
/// line to names on both shards reaches the live half and names the other
/// half `unavailable`. The shard back (empty), its names work again.
#[test]
fn one_shard_down_touches_only_its_names() {
    let Some(mut redis) = redises(2) else {
        return;
    };
    let (mut a, b) = (sharded_node(&redis, "2"), sharded_node(&redis, "2"));
    let zero = names_on("z", 0, 2, 3);
    let one = names_on("o", 1, 2, 3);
    let mut on_zero = a.login(&zero[0]);
    let mut on_one = a.login(&one[0]);
    let mut far_zero = b.login(&zero[1]);
    let _far_one = b.login(&one[1]);
    redis[1].kill();
    // Within the lease, a's client of shard 1 is closed; shard 0's stays.
    a.wait_log("lease not renewed in time on Redis at");
    assert_eq!(on_one.line(), "error: unavailable\n");
    on_one.expect_eof();
    // A line to both shards: shard 0's half delivered, shard 1's named.
    on_zero.send(&format!("{}, {}: half\n", one[1], zero[1]));
    far_zero.expect(&format!("from {}: half", zero[0]));
    on_zero.expect(&format!("error: unavailable: {}", one[1]));
    on_zero.sync(&zero[0]);
    // Logins: shard 0's names go on, shard 1's are unavailable.
    let _fresh = a.login(&zero[2]);
    let mut refused = a.connect();
    refused.send(&format!("{}\n", one[2]));
    refused.expect("error: unavailable");
    assert!(a.stat("fences") >= 1);
    // Shard 1 back, empty: its names are claimed and routed again.
    redis[1].restart();
    a.wait_log("reachable again");
    let back = common::poll_until(|| {
        let mut c = a.connect();
        c.send(&format!("{}\n{}: back\n", one[2], one[2]));
        (c.line() == format!("from {}: back\n", one[2])).then_some(c)
    });
    let mut back = back.expect("shard 1's names log in again");
    back.send(&format!("{}: over\n", zero[1]));
    far_zero.expect(&format!("from {}: over", one[2]));
    drop(b);
}

/// Each shard's `/metrics` gauge and the stats line's count of shards
/// ready follow the shards; `/healthz` stays 200 while one shard serves.
#[test]
fn the_metrics_show_each_shard() {
    let Some(mut redis) = redises(2) else {
        return;
    };
    let list = urls(&redis);
    let mut node = Server::start(&[
        "--cluster",
        &list,
        "--metrics-addr",
        "127.0.0.1:0",
        "--stats-interval",
        "1",
    ]);
    node.wait_log_count(" ready (Redis at ", 2);
    let metrics = node.metrics_addr();
    let scrape = common::http_get(&metrics, "/metrics");
    for r in &redis {
        let up = format!("chatd_cluster_shard_up{{redis=\"{}\"}} 1", r.addr());
        assert!(scrape.contains(&up), "{up} in:\n{scrape}");
    }
    node.wait_log("shards_ready=2/2");
    redis[1].kill();
    node.wait_log("shards_ready=1/2");
    let down = format!("chatd_cluster_shard_up{{redis=\"{}\"}} 0", redis[1].addr());
    common::poll_until(|| {
        common::http_get(&metrics, "/metrics")
            .contains(&down)
            .then_some(())
    })
    .expect("shard 1 down in /metrics");
    assert!(common::http_get(&metrics, "/healthz").starts_with("HTTP/1.1 200"));
    redis[0].kill();
    common::poll_until(|| {
        common::http_get(&metrics, "/healthz")
            .starts_with("HTTP/1.1 503")
            .then_some(())
    })
    .expect("503 once no shard serves");
}

/// A connection's answers keep the order of its lines when its shards
/// answer at different speeds: a line to the slow shard, one to the fast
/// one, one to both, an `error:` line and one more to the fast shard,
/// each answered in turn, although the fast shard answers first.
#[test]
fn answers_keep_the_lines_order_when_shards_answer_at_different_speeds() {
    let Some(redis) = redises(2) else {
        return;
    };
    let proxy = common::redis::Proxy::start(redis[1].addr());
    let list = format!("{},{}", redis[0].url(), proxy.url());
    let mut a = Server::start(&["--cluster", &list, "--cluster-lease", "10"]);
    a.wait_log_count(" ready (Redis at ", 2);
    let zero = names_on("z", 0, 2, 3);
    let one = names_on("o", 1, 2, 3);
    let mut carol = a.login("carol");
    proxy.freeze();
    let before = a.stat("messages_in");
    carol.send(&format!(
        "{one0}: 1\n{zero0}: 2\n{zero1}, {one1}: 3\nno colon\n{zero2}: 4\n",
        one0 = one[0],
        zero0 = zero[0],
        one1 = one[1],
        zero1 = zero[1],
        zero2 = zero[2],
    ));
    // Every line is read while shard 1 cannot answer.
    common::poll_until(|| (a.stat("messages_in") >= before + 5).then_some(()))
        .expect("the lines read");
    proxy.thaw();
    carol.expect(&format!("error: not-online: {}", one[0]));
    carol.expect(&format!("error: not-online: {}", zero[0]));
    carol.expect(&format!("error: not-online: {}, {}", zero[1], one[1]));
    carol.expect("error: no-recipients: expected \"name1, name2: message\"");
    carol.expect(&format!("error: not-online: {}", zero[2]));
    carol.sync("carol");
}

/// Nodes whose `--cluster` lists differ (another order, another count)
/// would hold one name on two Redis: the later node says so, serves none
/// of the names the lists disagree on (`unavailable`, `/healthz` 503), and
/// the first node goes on.
#[test]
fn nodes_with_other_lists_of_redis_are_refused() {
    let Some(redis) = redises(2) else {
        return;
    };
    let a = sharded_node(&redis, "10");
    let mut alice = a.login("alice");
    let swapped = format!("{},{}", redis[1].url(), redis[0].url());
    for list in [swapped, redis[0].url()] {
        let mut b = Server::start(&["--cluster", &list, "--metrics-addr", "127.0.0.1:0"]);
        let said = b.wait_log("every node must list the same Redis in the same order");
        assert!(said.contains("this node as \""), "{said}");
        let mut refused = b.connect();
        refused.send("bob\n");
        refused.expect("error: unavailable");
        let metrics = b.metrics_addr();
        let health = common::http_get(&metrics, "/healthz");
        assert!(health.starts_with("HTTP/1.1 503"), "{health}");
        assert!(health.contains("lists differ"), "{health}");
        alice.sync("alice");
    }
}

/// A live upgrade of a sharded node keeps its lease and names on every
/// shard: the same keys on each Redis, the names still taken on another
/// node, lines both ways for the clients of each shard, and a shard that
/// fences afterwards still closes only its own clients.
#[test]
fn a_sharded_node_upgraded_in_place_keeps_every_shard() {
    let Some(mut redis) = redises(2) else {
        return;
    };
    let (mut a, b) = (sharded_node(&redis, "3"), sharded_node(&redis, "3"));
    let zero = names_on("z", 0, 2, 2);
    let one = names_on("o", 1, 2, 2);
    let mut here = [a.login(&zero[0]), a.login(&one[0])];
    let mut far = [b.login(&zero[1]), b.login(&one[1])];
    let keys: Vec<Vec<String>> = redis.iter().map(Redis::keys).collect();
    a.upgrade(1);
    for (i, client) in here.iter_mut().enumerate() {
        let (me, to) = (if i == 0 { &zero[0] } else { &one[0] }, &zero[1]);
        let through = common::poll_until(|| {
            client.send(&format!("{to}: after {i}\n"));
            far[0]
                .stream()
                .set_read_timeout(Some(std::time::Duration::from_millis(300)))
                .ok()?;
            let line =
                std::io::BufRead::lines(std::io::BufReader::new(far[0].stream().try_clone().ok()?))
                    .next()?
                    .ok()?;
            (line == format!("from {me}: after {i}")).then_some(())
        });
        assert!(
            through.is_some(),
            "shard {i}'s client routes after the upgrade"
        );
    }
    far[0]
        .stream()
        .set_read_timeout(Some(common::TIMEOUT))
        .unwrap();
    for (i, name) in [&zero[0], &one[0]].into_iter().enumerate() {
        let mut taken = b.connect();
        taken.send(&format!("{name}\n"));
        taken.expect(&format!("error: name-taken: {name}"));
        far[1].send(&format!("{name}: to {i}\n"));
    }
    let got: Vec<Vec<String>> = redis.iter().map(Redis::keys).collect();
    assert_eq!(got, keys, "the same leases and names on each Redis");
    // Shard 1 killed: the upgraded node fences its client of shard 1 only.
    redis[1].kill();
    a.wait_log("lease not renewed in time on Redis at");
    let mut line = String::new();
    while !line.starts_with("error: unavailable") {
        line = here[1].line(); // after "from o1: to 1"
    }
    here[0].expect(&format!("from {}: to 0", one[1]));
    here[0].sync(&zero[0]);
}

/// A sender whose lines alternate between recipients on two shards waits
/// on both, so each line after the first is joined and puts a marker on
/// the other shard: the markers go among that shard's staged lines, not
/// one script call each. 3,000 such lines read in a few turns arrive in
/// order in a few dozen calls (one call a line before).
#[test]
fn lines_alternating_between_shards_go_in_few_script_calls() {
    let Some(redis) = redises(2) else {
        return;
    };
    let (a, b) = (sharded_node(&redis, "10"), sharded_node(&redis, "10"));
    let to: Vec<String> = (0..2).map(|s| names_on("r", s, 2, 1).remove(0)).collect();
    let mut readers: Vec<_> = to.iter().map(|n| b.login(n)).collect();
    let mut sender = a.login("sender");
    sender.sync("sender");
    let before: u64 = redis.iter().map(|r| r.calls("evalsha")).sum();
    let lines = 3000;
    let all: String = (0..lines)
        .map(|i| format!("{}: {i}\n", to[i % 2]))
        .collect();
    sender.send(&all);
    for i in 0..lines {
        readers[i % 2].expect(&format!("from sender: {i}"));
    }
    sender.sync("sender"); // and no error line before it
    let calls = redis.iter().map(|r| r.calls("evalsha")).sum::<u64>() - before;
    assert!(
        calls <= lines as u64 / 20,
        "{calls} script calls for {lines} lines"
    );
}

/// Each Redis of the list has its own credentials: one that refuses this
/// node's password makes only its names `unavailable`, says so once, and
/// the other Redis serves on.
#[test]
fn each_redis_has_its_own_password() {
    let Some(redis) = redises(2) else {
        return;
    };
    for r in &redis {
        r.cli(&["CONFIG", "SET", "requirepass", "pw-Right-1"]);
    }
    let port = |r: &Redis| r.addr().port();
    let list = format!(
        "redis://:pw-Right-1@127.0.0.1:{},redis://:pw-Wrong-2@127.0.0.1:{}",
        port(&redis[0]),
        port(&redis[1])
    );
    let mut a = Server::start(&["--cluster", &list, "--metrics-addr", "127.0.0.1:0"]);
    a.wait_log(" ready (Redis at ");
    let refused = a.wait_log("refused the credentials");
    assert!(refused.contains(&redis[1].addr().to_string()), "{refused}");
    assert!(
        !a.log().contains("pw-Right-1") && !a.log().contains("pw-Wrong-2"),
        "{}",
        a.log()
    );
    let zero = names_on("z", 0, 2, 1);
    let one = names_on("o", 1, 2, 1);
    let mut in_zero = a.login(&zero[0]);
    let mut in_one = a.connect();
    in_one.send(&format!("{}\n", one[0]));
    in_one.expect("error: unavailable");
    in_zero.send(&format!("{}: hi\n", one[0]));
    in_zero.expect(&format!("error: unavailable: {}", one[0]));
    let metrics = a.metrics_addr();
    assert!(common::http_get(&metrics, "/healthz").starts_with("HTTP/1.1 200"));
    in_zero.sync(&zero[0]);
}
