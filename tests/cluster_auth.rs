//! A cluster on a Redis that wants a password: `redis://USER:PASSWORD@HOST`
//! logs each connection in with `HELLO 3 AUTH` before anything else; a
//! password refused is one clear line and a 503, not a reconnect storm;
//! the password shows nowhere. Each test starts its own Redis and nodes,
//! and stops them all, also when it fails.

#[macro_use]
mod common;

use std::time::Duration;

use common::redis::{Redis, node};
use common::{Server, http_get, poll_until};

const PASSWORD: &str = "s3cret-Pw";

/// What chatd runs, and only that: the ACL the README gives.
const RULES: &[&str] = &[
    "~chatd:*",
    "&chatd:*",
    "+hello",
    "+client|setname",
    "+client|kill",
    "+config|get",
    "+script|load",
    "+evalsha",
    "+set",
    "+get",
    "+del",
    "+exists",
    "+incr",
    "+mget",
    "+sadd",
    "+srem",
    "+smembers",
    "+spop",
    "+publish",
    "+subscribe",
    "+unsubscribe",
];

/// An ACL user `chatd` with `PASSWORD` on every Redis, allowed what
/// chatd does.
fn with_user(redis: &Redis) {
    let password = format!(">{PASSWORD}");
    let mut args = vec!["ACL", "SETUSER", "chatd", "reset", "on", &password];
    args.extend_from_slice(RULES);
    redis.cli_expect(&args, "OK");
}

fn url_as(redis: &Redis, user: &str, password: &str) -> String {
    redis.url_as(&format!("{user}:{password}"))
}

/// How many connections the Redis servers have accepted since they
/// started, all together.
fn connections_received(redis: &Redis) -> u64 {
    let stats = redis.cli_all(&["INFO", "stats"]);
    let received = |info: &String| {
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    stats.iter().map(received).sum()
}

/// With an ACL user, both of a node's connections log in as that user and
/// the cluster works as without one; the password is in no log line and
/// not in the metrics.
#[test]
fn nodes_log_in_as_an_acl_user_and_never_show_the_password() {
    let redis = redis_or_skip!();
    with_user(&redis);
    let url = url_as(&redis, "chatd", PASSWORD);
    let mut a = node(&url, "10", &["--metrics-addr", "127.0.0.1:0"]);
    let b = node(&url, "10", &[]);
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    alice.send("bob: hi\n");
    bob.expect("from alice: hi");
    alice.send("bob, nobody: again\n");
    bob.expect("from alice: again");
    alice.expect("error: not-online: nobody");
    drop(bob);
    let released = poll_until(|| {
        redis
            .on("bob")
            .cli(&["EXISTS", "chatd:name:bob"])
            .eq("0")
            .then_some(())
    });
    assert!(released.is_some(), "bob never released");
    // Nothing refused on the way: every command chatd ran is in RULES.
    redis.cli_expect(&["ACL", "LOG"], "");
    for clients in redis.cli_all(&["CLIENT", "LIST"]) {
        let ours: Vec<&str> = clients
            .lines()
            .filter(|l| l.contains("name=chatd-"))
            .collect();
        assert_eq!(ours.len(), 4, "two connections a node: {clients}");
        assert!(ours.iter().all(|l| l.contains(" user=chatd ")), "{clients}");
    }
    let metrics = a.metrics_addr();
    let scraped = http_get(&metrics, "/metrics");
    assert!(scraped.contains("chatd_cluster_up 1"), "{scraped}");
    for text in [a.log(), b.log(), scraped] {
        assert!(!text.contains(PASSWORD), "the password shows: {text}");
    }
}

/// The `default` user's password (`redis://:PASSWORD@HOST`, Redis's
/// `requirepass`) works too.
#[test]
fn the_default_users_password_works() {
    let redis = redis_or_skip!();
    let url = redis.url_as(&format!(":{PASSWORD}"));
    redis.cli_expect(&["CONFIG", "SET", "requirepass", PASSWORD], "OK");
    let a = node(&url, "10", &[]);
    let mut alice = a.login("alice");
    alice.sync("alice");
    assert!(!a.log().contains(PASSWORD));
}

/// A wrong password: one warning saying so (for each Redis), `/healthz`
/// 503 with the reason, logins `unavailable`, and tries spaced at the
/// longest back-off (a few connections, not a storm).
#[test]
fn a_wrong_password_is_one_clear_line_and_a_503_not_a_storm() {
    let redis = redis_or_skip!();
    with_user(&redis);
    let before = connections_received(&redis);
    let url = url_as(&redis, "chatd", "wrong");
    let mut a = Server::start(&["--cluster", &url, "--metrics-addr", "127.0.0.1:0"]);
    a.wait_log("refused the credentials");
    let metrics = a.metrics_addr();
    let health = http_get(&metrics, "/healthz");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("Redis refused the credentials"), "{health}");
    let mut late = a.connect();
    late.send("dave\n");
    late.expect("error: unavailable");
    std::thread::sleep(Duration::from_secs(3));
    let log = a.log();
    let shards = redis.servers.len();
    let said = log.matches("refused the credentials").count();
    assert_eq!(said, shards, "{log}");
    assert!(!log.contains("wrong"), "the password shows: {log}");
    let tries = connections_received(&redis) - before;
    assert!(
        tries <= 6 * shards as u64,
        "{tries} connections in 3 s: a reconnect storm"
    );
}

/// The user's password changed while the node runs (`ACL SETUSER`, then
/// `CLIENT KILL`): the node cannot get back in and says so once (for
/// each Redis), its
/// clients are fenced within the lease; when the password it has is
/// accepted again, it serves again.
#[test]
fn credentials_changed_while_running() {
    let redis = redis_or_skip!();
    with_user(&redis);
    let url = url_as(&redis, "chatd", PASSWORD);
    let mut a = node(&url, "2", &[]);
    let mut alice = a.login("alice");
    redis.cli_expect(&["ACL", "SETUSER", "chatd", "resetpass", ">another"], "OK");
    redis.cli_all(&["CLIENT", "KILL", "USER", "chatd"]);
    a.wait_log("refused the credentials");
    alice.expect("error: unavailable");
    redis.cli_expect(&["ACL", "SETUSER", "chatd", &format!(">{PASSWORD}")], "OK");
    // Within the back-off (5 s) of the password being right again.
    let back = poll_until(|| {
        let mut c = a.connect();
        c.send("bob\nbob: probe\n");
        (c.line() == "from bob: probe\n").then_some(())
    });
    assert!(back.is_some(), "never got back in: {}", a.log());
    let said = a.log().matches("refused the credentials").count();
    assert_eq!(said, redis.servers.len(), "{}", a.log());
}
