//! Tests of the cluster link: the URL, node ids, and the link's logic
//! without a socket (replies fed to `on_reply`, the commands read back
//! from its output, the answers as the reactor would apply them).

use super::*;

#[test]
fn parses_redis_urls() {
    let ok = |url: &str| ClusterConfig::parse_url(url).unwrap().0.to_string();
    assert_eq!(ok("redis://127.0.0.1:7000"), "127.0.0.1:7000");
    assert_eq!(ok("redis://127.0.0.1"), "127.0.0.1:6379");
    assert_eq!(ok("redis://127.0.0.1:7000/"), "127.0.0.1:7000");
    for bad in [
        "127.0.0.1:7000",
        "redis://",
        "redis://user@127.0.0.1:1",
        "redis://user:@127.0.0.1:1",
        "redis://u:%zz@127.0.0.1:1",
        "redis://h:1/2",
        "http://x",
    ] {
        assert!(ClusterConfig::parse_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn parses_credentials_and_never_shows_the_password() {
    let auth = |url: &str| ClusterConfig::parse_url(url).unwrap().1;
    assert_eq!(auth("redis://127.0.0.1:7000"), None);
    let acl = auth("redis://chatd:s3cret@127.0.0.1:7000").unwrap();
    assert_eq!(
        (acl.user.as_str(), acl.password.as_str()),
        ("chatd", "s3cret")
    );
    let default = auth("redis://:pw@127.0.0.1").unwrap();
    assert_eq!(
        (default.user.as_str(), default.password.as_str()),
        ("default", "pw")
    );
    // A password with `@`, `:` and `/`, escaped or not.
    let odd = auth("redis://u:a%40b%3Ac%2Fd@e@127.0.0.1:1").unwrap();
    assert_eq!(odd.password, "a@b:c/d@e");
    assert!(!format!("{acl:?}").contains("s3cret"));
    for url in ["redis://chatd:s3cret@h:1", "redis://:s3cret@h"] {
        let shown = ClusterConfig::redacted(url);
        assert!(
            !shown.contains("s3cret") && shown.contains("***"),
            "{shown}"
        );
    }
    assert_eq!(ClusterConfig::redacted("redis://h:1"), "redis://h:1");
    assert_eq!(
        ClusterConfig::redacted("redis://chatd:s3cret@h:1"),
        "redis://chatd:***@h:1"
    );
}

#[test]
fn the_first_command_authenticates_when_there_are_credentials() {
    let mut out = Vec::new();
    let auth = Auth {
        user: "chatd".into(),
        password: "pw".into(),
    };
    hello(&mut out, Some(&auth), "chatd-n1");
    hello(&mut out, None, "chatd-n1");
    let mut link = ready_link();
    link.out = out;
    assert_eq!(
        commands(&mut link),
        [
            vec!["HELLO", "3", "AUTH", "chatd", "pw", "SETNAME", "chatd-n1"],
            vec!["HELLO", "3", "SETNAME", "chatd-n1"],
        ]
    );
    assert!(is_auth_error("WRONGPASS invalid username-password pair"));
    assert!(!is_auth_error("NOSCRIPT No matching script"));
}

#[test]
fn node_ids_differ() {
    assert_ne!(new_node_id(), new_node_id());
    assert_eq!(new_node_id().len(), 16);
}

// The link's logic without a socket: commands are read back from `out`,
// replies are fed to `on_reply`, and the answers are what the reactor
// would apply.

use codec::{Reply, decode_reply};

/// A link as if its handshake had been answered: ready, with a lease until
/// 10 s.
fn ready_link() -> Shard {
    let config = ShardConfig {
        redis: "127.0.0.1:1".parse().unwrap(),
        auth: None,
        prefix: "p".into(),
        lease_ms: 10_000,
        index: 0,
        several: false,
        layout: "0/1".into(),
    };
    let mut link = Shard::new(config, "n1".into(), 16 * 1024);
    link.state = State::Ready;
    link.lease_until = Some(10_000);
    link.sweep_at = 3_333;
    // The lease's own connection is not tried in these tests.
    link.lease_link.retry_at = u64::MAX;
    link
}

const TOKENS: Tokens = Tokens {
    link: Token(0),
    lease: Token(1),
};

fn slot(key: u32) -> Slot {
    Slot { key, id: key + 100 }
}

/// The commands queued since the last call, each as its words.
fn commands(link: &mut Shard) -> Vec<Vec<String>> {
    link.seal_staged();
    let mut all = Vec::new();
    let mut at = 0;
    while let Ok(Some((Reply::Array(words), used))) = decode_reply(&link.out[at..]) {
        at += used;
        let words = words.into_iter().map(|w| match w {
            Reply::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
            other => format!("{other:?}"),
        });
        all.push(words.collect());
    }
    link.out.clear();
    all
}

#[test]
fn a_claim_without_a_ready_link_is_unavailable_at_once() {
    let config = ready_link().config.clone();
    let mut link = Shard::new(config, "n1".into(), 16 * 1024);
    link.claim(slot(1), Rc::from("alice"), false, 0);
    assert!(commands(&mut link).is_empty());
    let answers = link.take_answers();
    assert!(matches!(
        answers[..],
        [Answer::Claimed {
            outcome: Claimed::Unavailable,
            ..
        }]
    ));
}

/// The answer to a claim script: one number per claim.
fn claimed(results: &[i64]) -> Reply {
    Reply::Array(results.iter().map(|&r| Reply::Int(r)).collect())
}

#[test]
fn a_claim_found_taken_is_tried_once_more_then_refused() {
    let mut link = ready_link();
    let poll = mio::Poll::new().unwrap();
    link.claim(slot(1), Rc::from("alice"), false, 0);
    commands(&mut link);
    link.on_reply(claimed(&[1]), 1).unwrap();
    assert!(matches!(
        link.take_answers()[..],
        [Answer::Claimed {
            outcome: Claimed::Held,
            ..
        }]
    ));
    link.claim(slot(2), Rc::from("bob"), false, 10);
    let sent = commands(&mut link);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let claim = String::from_utf8(scripts::shas()[Script::Claim as usize].clone()).unwrap();
    assert_eq!(sent[0][..3], ["EVALSHA", &claim, "0"]);
    assert_eq!(sent[0][3..], ["p", "n1", "bob"]);
    link.on_reply(claimed(&[0]), 12).unwrap();
    assert!(link.take_answers().is_empty(), "no answer while it waits");
    assert!(link.owes(slot(2)));
    assert_eq!(link.next_deadline(), 12 + CLAIM_RETRY_MS);
    link.on_timer(poll.registry(), TOKENS, 12 + CLAIM_RETRY_MS);
    assert_eq!(commands(&mut link)[0][3..], ["p", "n1", "bob"]);
    link.on_reply(claimed(&[0]), 200).unwrap();
    assert!(matches!(
        link.take_answers()[..],
        [Answer::Claimed {
            outcome: Claimed::Taken,
            ..
        }]
    ));
    assert!(!link.owes(slot(2)));
}

/// A send script's answer: the numbers of the offline and of the
/// unreachable names, and (number, node, epoch) of names found by lookup.
fn sent_reply(offline: &[i64], unreachable: &[i64], found: &[(i64, &str, &str)]) -> Reply {
    let ints = |list: &[i64]| Reply::Array(list.iter().map(|&i| Reply::Int(i)).collect());
    let found = found
        .iter()
        .flat_map(|&(i, node, epoch)| {
            [
                Reply::Int(i),
                Reply::Bulk(node.into()),
                Reply::Bulk(epoch.into()),
            ]
        })
        .collect();
    Reply::Array(vec![ints(offline), ints(unreachable), Reply::Array(found)])
}

#[test]
fn a_turns_lines_go_to_redis_as_one_command() {
    let mut link = ready_link();
    let names = ["bob", "dave", "erin"];
    assert!(link.route(slot(1), &names, b"from alice: hi\n", false, 0));
    assert!(link.route(slot(2), &["bob"], b"from carol: yo\n", false, 0));
    link.flush(0);
    let sent = commands(&mut link);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0][3..],
        [
            "p",
            "n1",
            "1",
            "",
            "0",
            "4",
            "bob,dave,erin 15\nfrom alice: hi\nbob 15\nfrom carol: yo\n"
        ]
    );
    // Names numbered in the order of the records: bob dave erin bob.
    let reply = sent_reply(&[2], &[3], &[(1, "n2", "41"), (4, "n2", "41")]);
    link.on_reply(reply, 1).unwrap();
    match &link.take_answers()[..] {
        [
            Answer::Routed {
                slot: first,
                offline,
                unreachable,
                ..
            },
            Answer::Settled { slot: one },
            Answer::Settled { slot: two },
        ] => {
            assert_eq!(*first, slot(1));
            assert_eq!(offline, &["dave"]);
            assert_eq!(unreachable, &["erin"]);
            assert_eq!((*one, *two), (slot(1), slot(2)), "nothing to say to 2");
        }
        other => panic!("{other:?}"),
    }
    assert!(!link.has_waiting(slot(1)) && !link.has_waiting(slot(2)));
    // Next turn, bob is guessed on n2 at epoch 41; dave is not guessed.
    assert!(link.route(slot(1), &["dave", "bob"], b"x\n", false, 2));
    link.flush(2);
    let sent = commands(&mut link);
    assert_eq!(
        sent[0][5..],
        [
            "2",
            "",
            "0",
            "1",
            "dave 2\nx\n",
            "n2",
            "41",
            "1",
            "bob 2\nx\n"
        ]
    );
}

#[test]
fn any_other_command_sends_the_lines_staged_before_it_first() {
    let mut link = ready_link();
    assert!(link.route(slot(1), &["bob"], b"x\n", false, 0));
    link.release("gone");
    assert!(link.route(slot(1), &["bob"], b"y\n", false, 0));
    link.flush(0);
    let sent = commands(&mut link);
    let payloads: Vec<&str> = sent.iter().map(|c| c.last().unwrap().as_str()).collect();
    assert_eq!(payloads, ["bob 2\nx\n", "gone", "bob 2\ny\n"], "{sent:?}");
}

#[test]
fn a_batch_past_its_bounds_is_sent_in_several_commands_in_order() {
    let mut link = ready_link();
    let line = vec![b'x'; 6 << 10];
    for _ in 0..5 {
        assert!(link.route(slot(1), &["bob"], &line, false, 0));
    }
    link.flush(0);
    let sent = commands(&mut link);
    assert_eq!(sent.len(), 3, "16 KiB a batch: 2 + 2 + 1 lines");
    for (command, lines) in sent.iter().zip([2, 2, 1]) {
        assert_eq!(command[9].matches("bob 6144\n").count(), lines);
    }
    for _ in 0..3 {
        link.on_reply(sent_reply(&[], &[], &[]), 1).unwrap();
    }
    assert!(
        matches!(link.take_answers()[..], [Answer::Settled { .. }]),
        "no answer for lines that reached everyone; one when all are in"
    );
}

#[test]
fn a_route_that_finds_the_lease_gone_takes_a_new_one_and_tells_the_others() {
    let mut link = ready_link();
    assert!(link.route(slot(1), &["bob"], b"x\n", false, 0));
    link.flush(0);
    commands(&mut link);
    link.on_reply(Reply::Int(-1), 1).unwrap();
    assert!(matches!(
        link.take_answers()[..],
        [Answer::Unroutable { .. }, Answer::Settled { .. }]
    ));
    let sent = commands(&mut link);
    let words: Vec<&str> = sent.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(
        words,
        ["PUBLISH", "EVALSHA", "SET", "SET", "SADD"],
        "{sent:?}"
    );
    assert_eq!(sent[0][1..], ["p:leases-lost", "n1"]);
    assert_eq!(sent[2][1], "p:epoch:n1", "a new epoch with the new lease");
    assert_eq!(sent[3][1..], ["p:lease:n1", "1", "PX", "10000", "NX"]);
}

#[test]
fn word_that_leases_were_lost_renews_at_once() {
    let mut link = ready_link();
    let channel = link.lost_channel.clone();
    let push = Reply::Message {
        channel,
        payload: b"n2".to_vec(),
    };
    link.on_reply(push.clone(), 5).unwrap();
    let sent = commands(&mut link);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0][..2], ["SET", "p:lease:n1"]);
    link.on_reply(push, 6).unwrap();
    assert!(
        commands(&mut link).is_empty(),
        "one renewal in flight at a time"
    );
}

#[test]
fn lines_for_this_node_are_delivered_as_they_came_in_either_format() {
    let mut link = ready_link();
    let payload = b"bob,carol 15\nfrom alice: hi\nbob 13\nfrom z: yo\n".to_vec();
    let lines = Reply::Message {
        channel: link.lines_channel.clone(),
        payload: payload.clone(),
    };
    link.on_reply(lines, 0).unwrap();
    // A node of an earlier version sends one line a message.
    let old = Reply::Message {
        channel: link.channel.clone(),
        payload: b"bob,carol\nfrom alice: hi\n".to_vec(),
    };
    link.on_reply(old, 0).unwrap();
    match &link.take_answers()[..] {
        [
            Answer::Deliver { payload: first },
            Answer::Deliver { payload: second },
        ] => {
            assert_eq!(first, &payload);
            let got: Vec<_> = records(second).collect();
            assert_eq!(got, [(&b"bob,carol"[..], &b"from alice: hi\n"[..])]);
        }
        other => panic!("{other:?}"),
    }
    assert!(link.pending.is_empty(), "a push answers no command");
}

#[test]
fn held_markers_follow_the_answers_before_them() {
    let mut link = ready_link();
    assert!(link.route(slot(1), &["bob"], b"x\n", false, 0));
    link.hold_marker(slot(1));
    link.hold_marker(slot(2));
    // Among the turn's lines, in order, after slot 3's line: one batch,
    // one script call.
    assert!(link.route(slot(3), &["carol"], b"y\n", false, 0));
    link.seal_staged();
    assert_eq!(link.pending.len(), 1, "{:?}", link.pending);
    assert!(link.take_answers().is_empty());
    assert!(link.has_waiting(slot(1)) && link.has_waiting(slot(2)));
    link.on_reply(sent_reply(&[2], &[], &[]), 1).unwrap();
    let answers = link.take_answers();
    let said: Vec<&Answer> = answers
        .iter()
        .filter(|a| !matches!(a, Answer::Settled { .. }))
        .collect();
    assert!(
        matches!(
            said[..],
            [
                Answer::Held { slot: s1 },
                Answer::Held { slot: s2 },
                Answer::Routed { slot: s3, .. },
            ] if *s1 == slot(1) && *s2 == slot(2) && *s3 == slot(3)
        ),
        "the held lines, in their places: {answers:?}"
    );
    assert!(!link.has_waiting(slot(1)) && !link.has_waiting(slot(2)));
    // Nothing before it: released at once.
    link.hold_marker(slot(3));
    assert!(matches!(link.take_answers()[..], [Answer::Held { .. }]));
}

#[test]
fn a_reset_fails_everything_in_flight_in_order_and_remembers_what_is_uncertain() {
    let mut link = ready_link();
    link.claim(slot(1), Rc::from("alice"), false, 0);
    link.release("gone");
    assert!(link.route(slot(2), &["bob"], b"x\n", false, 0));
    link.hold_marker(slot(2));
    link.reset(1, "test");
    let answers = link.take_answers();
    assert!(
        matches!(
            answers[..],
            [
                Answer::Claimed {
                    outcome: Claimed::Unavailable,
                    ..
                },
                Answer::Unroutable { .. },
                Answer::Held { .. },
            ]
        ),
        "{answers:?}"
    );
    assert!(matches!(link.state, State::Down { .. }));
    let (_, mut uncertain, _) = link.handover_state(1);
    uncertain.sort();
    assert_eq!(uncertain, ["alice", "gone"], "either may have run");
    assert!(!link.has_waiting(slot(2)));
}

#[test]
fn an_error_reply_fails_its_entry_and_asks_for_a_reset() {
    let mut link = ready_link();
    link.claim(slot(1), Rc::from("alice"), false, 0);
    commands(&mut link);
    let refused = link.on_reply(Reply::Error("NOSCRIPT".into()), 1);
    assert!(refused.unwrap_err().contains("NOSCRIPT"));
    assert!(matches!(
        link.take_answers()[..],
        [Answer::Claimed {
            outcome: Claimed::Unavailable,
            ..
        }]
    ));
    let (_, uncertain, _) = link.handover_state(1);
    assert!(uncertain.is_empty(), "a refused claim did not run");
}

#[test]
fn a_client_waiting_for_many_answers_is_throttled_until_they_are_in() {
    let mut link = ready_link();
    for i in 0..MAX_WAITING_PER_CONN {
        assert!(!link.must_throttle(slot(1)), "{i}");
        assert!(link.route(slot(1), &["bob"], b"x\n", false, 0));
    }
    assert!(link.must_throttle(slot(1)));
    link.throttle(slot(1));
    assert!(link.is_throttled(slot(1)));
    assert!(
        link.take_answers()
            .iter()
            .all(|a| !matches!(a, Answer::Unthrottle { .. }))
    );
    link.flush(0);
    link.on_reply(sent_reply(&[], &[], &[]), 1).unwrap();
    // After the answer that let it go: its earlier lines' results first.
    let answers = link.take_answers();
    let last = answers.last();
    assert!(
        matches!(last, Some(Answer::Unthrottle { .. })),
        "{answers:?}"
    );
    assert!(!link.is_throttled(slot(1)));
}

#[test]
fn the_node_fences_a_margin_before_its_lease_can_end() {
    let mut link = ready_link();
    let margin = 1000; // a tenth of the 10 s lease
    assert_eq!(link.fence_at(), Some(10_000 - margin));
    assert!(!link.must_fence(10_000 - margin - 1));
    assert!(link.must_fence(10_000 - margin));
}

#[test]
fn a_reply_nobody_asked_for_is_an_error() {
    let mut link = ready_link();
    assert!(link.on_reply(Reply::Int(1), 0).is_err());
}

#[test]
fn claims_past_the_window_wait_for_room_and_leave_with_their_client() {
    let mut link = ready_link();
    for i in 0..CLAIM_WINDOW as u32 + 2 {
        link.claim(slot(i), Rc::from(format!("c{i}").as_str()), false, 0);
    }
    let sent = commands(&mut link);
    assert_eq!(sent.len(), 1, "a turn's claims in one call");
    assert_eq!(sent[0].len() - 5, CLAIM_WINDOW, "the window is full");
    assert!(
        link.owes(slot(CLAIM_WINDOW as u32)),
        "a waiting claim is owed"
    );
    assert!(!link.is_quiet());
    // The last one's client leaves: its claim is never sent.
    link.release(&format!("c{}", CLAIM_WINDOW + 1));
    let gone = link.take_answers();
    assert!(matches!(
        gone[..],
        [Answer::Claimed {
            outcome: Claimed::Unavailable,
            ..
        }]
    ));
    link.on_reply(claimed(&[1; CLAIM_WINDOW]), 1).unwrap();
    let sent = commands(&mut link);
    let words: Vec<&str> = sent.iter().map(|c| c[c.len() - 1].as_str()).collect();
    let next = format!("c{CLAIM_WINDOW}");
    let gone = format!("c{}", CLAIM_WINDOW + 1);
    assert_eq!(
        words,
        [gone.as_str(), next.as_str()],
        "the release, then the next claim"
    );
}

/// A logout wave waits on the node, as a login wave does: the releases
/// past [`RELEASE_WINDOW`] wait there, not in Redis's queue ahead of the
/// other nodes' lease renewals. A claim does not wait behind them: it
/// takes its name's waiting release out (the name is still this node's in
/// Redis; sent after the claim, the release would free it).
#[test]
fn releases_past_their_window_wait_and_a_claim_takes_its_names_release_out() {
    assert_eq!(
        RELEASE_WINDOW, 128,
        "the figure README.md and CLUSTER.md give"
    );
    let mut link = ready_link();
    let n = 2 * RELEASE_WINDOW + 10;
    for i in 0..n {
        link.release(&format!("r{i}"));
    }
    let names = |sent: &[Vec<String>]| -> Vec<String> {
        sent.iter().flat_map(|c| c[5..].iter().cloned()).collect()
    };
    let expect =
        |range: std::ops::Range<usize>| -> Vec<String> { range.map(|i| format!("r{i}")).collect() };
    let sent = commands(&mut link);
    assert_eq!(
        names(&sent),
        expect(0..RELEASE_WINDOW),
        "the window's worth"
    );
    assert_eq!(
        link.claims_admitted(),
        (CLAIM_WINDOW, 0, RELEASE_WINDOW + 10)
    );
    // The last one logs in again: its claim goes at once, its release never.
    let again = format!("r{}", n - 1);
    link.claim(slot(1), Rc::from(again.as_str()), false, 0);
    let sent = commands(&mut link);
    assert_eq!(
        names(&sent),
        std::slice::from_ref(&again),
        "the claim, at once"
    );
    assert_eq!(link.claims_admitted().2, RELEASE_WINDOW + 9);
    // Each answer lets the next releases go.
    link.on_reply(Reply::Int(1), 1).unwrap();
    let sent = commands(&mut link);
    assert_eq!(names(&sent), expect(RELEASE_WINDOW..2 * RELEASE_WINDOW));
    link.on_reply(claimed(&[1]), 1).unwrap();
    link.on_reply(Reply::Int(1), 1).unwrap();
    let sent = commands(&mut link);
    assert_eq!(names(&sent), expect(2 * RELEASE_WINDOW..n - 1));
    assert_eq!(link.claims_admitted().2, 0);
    link.on_reply(Reply::Int(1), 1).unwrap();
    assert!(link.pending.is_empty() && link.releases_in_flight == 0);
}

/// A node whose link breaks while it leaves does not connect again: the
/// handshake would put back its epoch key (no expiry) and its place in
/// the set of nodes, which its farewell takes away (found by an attack:
/// SIGTERM with Redis paused, a client keeping the shutdown going).
#[test]
fn a_node_leaving_does_not_connect_again() {
    let mut link = ready_link();
    let poll = mio::Poll::new().unwrap();
    assert!(link.farewell());
    link.reset(1, "test");
    assert!(
        link.take_answers()
            .iter()
            .any(|a| matches!(a, Answer::FarewellDone))
    );
    // Nothing to wake for but the lease's end (no reconnection's back-off).
    assert_eq!(link.next_deadline(), link.fence_at().unwrap());
    link.on_timer(poll.registry(), TOKENS, 5_000);
    assert!(matches!(link.state, State::Down { .. }), "not connecting");
}

/// A connection dropped with commands in flight is killed by the next one
/// before that one settles anything: its commands could still reach Redis
/// late (a slow network, a proxy still delivering), and a claim so
/// delayed would hold for good a name settled as free (found by an attack
/// through a throttling proxy). An ACL without `CLIENT KILL` is not an
/// error.
#[test]
fn the_next_connection_kills_one_dropped_with_commands_in_flight() {
    let mut link = ready_link();
    link.link_id = Some(42);
    link.claim(slot(1), Rc::from("alice"), false, 0);
    commands(&mut link);
    link.reset(1, "test");
    link.take_answers();
    link.state = State::Handshaking;
    link.handshake(2);
    let sent = commands(&mut link);
    assert_eq!(sent[0][0], "HELLO");
    assert_eq!(sent[1], ["CLIENT", "KILL", "ID", "42"], "{sent:?}");
    let hello = Reply::Array(vec![
        Reply::Bulk(b"server".to_vec()),
        Reply::Bulk(b"redis".to_vec()),
        Reply::Bulk(b"id".to_vec()),
        Reply::Int(43),
    ]);
    link.on_reply(hello, 3).unwrap();
    assert_eq!(link.link_id, Some(43));
    let refused = Reply::Error("NOPERM this user has no permissions".into());
    assert!(link.on_reply(refused, 3).is_ok(), "not a reason to reset");
    assert!(link.stale_links.is_empty());
    // Dropped with nothing in flight: nothing to kill.
    link.pending.clear();
    link.reset(4, "test");
    assert!(link.stale_links.is_empty());
}

/// At shutdown the releases waiting never go: the farewell drops every
/// name of the node, and a release after it would bring back the node's
/// epoch key, which nothing would delete. Claims waiting fail.
#[test]
fn a_farewell_drops_what_waits_for_room() {
    let mut link = ready_link();
    for i in 0..RELEASE_WINDOW + 5 {
        link.release(&format!("r{i}"));
    }
    for i in 0..CLAIM_WINDOW as u32 + 1 {
        link.claim(slot(i), Rc::from(format!("c{i}").as_str()), false, 0);
    }
    commands(&mut link);
    assert!(link.farewell());
    let unavailable = link.take_answers();
    assert_eq!(unavailable.len(), 1, "the claim waiting fails");
    link.release("late");
    let sent = commands(&mut link);
    assert!(sent.last().unwrap().iter().any(|w| w == "DEL"));
    link.on_reply(Reply::Int(1), 1).unwrap();
    link.on_reply(claimed(&[1; CLAIM_WINDOW]), 1).unwrap();
    assert!(commands(&mut link).is_empty(), "nothing after the farewell");
}

/// A live upgrade does not wait for a logout wave's releases: they stay
/// on the node and go to the new process as uncertain names (released
/// there once its link is ready, if no client holds them).
#[test]
fn a_live_upgrade_hands_the_waiting_releases_over() {
    let mut link = ready_link();
    for i in 0..RELEASE_WINDOW + 5 {
        link.release(&format!("r{i}"));
    }
    assert!(link.quiesce());
    commands(&mut link);
    link.on_reply(Reply::Int(1), 1).unwrap();
    link.unsubscribed = true; // the confirmation pushed
    assert!(
        commands(&mut link).is_empty(),
        "none sent while handing over"
    );
    assert!(link.is_quiet());
    let (_, uncertain, _) = link.handover_state(1);
    let expect: Vec<String> = (RELEASE_WINDOW..RELEASE_WINDOW + 5)
        .map(|i| format!("r{i}"))
        .collect();
    assert_eq!(uncertain, expect);
    // The upgrade failed: they go at once.
    link.resubscribe();
    let sent = commands(&mut link);
    assert_eq!(sent[0][0], "SUBSCRIBE");
    assert_eq!(sent[1][5..], expect[..]);
    assert!(!link.releases_may_go());
}

/// On a link too slow to carry a window of releases within the reply
/// timeout, the releases are not what resets it: timed, the same 128 would
/// time out, be sent again after the reset, and time out again, and the
/// wave would never drain (found by an attack through a 2 KB/s proxy).
#[test]
fn releases_slower_than_the_reply_timeout_do_not_reset_the_link() {
    let mut link = ready_link();
    let poll = mio::Poll::new().unwrap();
    for i in 0..RELEASE_WINDOW + 10 {
        link.release(&format!("r{i}"));
    }
    commands(&mut link);
    let late = 3 * link.reply_timeout_ms();
    link.on_timer(poll.registry(), TOKENS, late);
    assert_eq!(link.state, State::Ready, "slow releases are not silence");
    link.on_reply(Reply::Int(1), late).unwrap();
    let sent = commands(&mut link);
    let released = sent.iter().flatten();
    let released = released.filter(|w| w.starts_with('r') && w[1..].parse::<u32>().is_ok());
    assert_eq!(released.count(), 10, "the rest, once the first are in");
    // A claim behind them is timed, as ever.
    link.claim(slot(1), Rc::from("c"), false, late);
    commands(&mut link);
    link.on_timer(poll.registry(), TOKENS, late + link.reply_timeout_ms() + 1);
    assert!(matches!(link.state, State::Down { .. }));
}

#[test]
fn a_reset_leaves_the_releases_waiting_for_room_uncertain() {
    let mut link = ready_link();
    for i in 0..CLAIM_WINDOW + 2 {
        link.release(&format!("r{i}"));
    }
    link.reset(1, "test");
    let (_, mut uncertain, _) = link.handover_state(1);
    uncertain.sort();
    assert_eq!(
        uncertain.len(),
        CLAIM_WINDOW + 2,
        "sent or not: settled later"
    );
    assert_eq!(link.claims_admitted().2, 0);
}

#[test]
fn a_busy_redis_is_not_a_dead_one() {
    let mut link = ready_link();
    let poll = mio::Poll::new().unwrap();
    let timeout = link.reply_timeout_ms();
    // One turn's claim, then another turn's two.
    link.claim(slot(0), Rc::from("c0"), false, 0);
    commands(&mut link);
    for i in 1..3 {
        link.claim(slot(i), Rc::from(format!("c{i}").as_str()), false, 0);
    }
    commands(&mut link);
    // Redis answers the first just before the timeout: the others may
    // wait that long again.
    link.on_reply(claimed(&[1]), timeout - 1).unwrap();
    link.on_timer(poll.registry(), TOKENS, timeout + 1);
    assert_eq!(link.state, State::Ready, "answers came: busy, not gone");
    assert!(
        link.claim_window < CLAIM_WINDOW,
        "a slow answer shrinks the window"
    );
    link.on_timer(poll.registry(), TOKENS, 2 * timeout);
    assert!(
        matches!(link.state, State::Down { .. }),
        "then nothing: gone"
    );
}

#[test]
fn a_reset_fails_the_claims_waiting_for_room_too() {
    let mut link = ready_link();
    for i in 0..CLAIM_WINDOW as u32 + 1 {
        link.claim(slot(i), Rc::from(format!("c{i}").as_str()), false, 0);
    }
    link.reset(1, "test");
    let failed = link.take_answers();
    assert_eq!(failed.len(), CLAIM_WINDOW + 1);
    let (_, uncertain, _) = link.handover_state(1);
    assert_eq!(
        uncertain.len(),
        CLAIM_WINDOW,
        "only the ones sent may have run"
    );
}

/// A reply that moves a name in the cache while lines to it are staged
/// (read in the same turn) sends the staged ones first: a name is in one
/// group of a batch, so one sender's lines to it cannot overtake each
/// other in the script (which publishes a group that passes its check
/// before one it looks up). Found by the hostile review.
#[test]
fn a_reply_that_moves_a_name_sends_the_lines_staged_for_it_first() {
    let mut link = ready_link();
    assert!(link.route(slot(1), &["bob"], b"0\n", false, 0));
    link.flush(0);
    commands(&mut link);
    link.on_reply(sent_reply(&[], &[], &[(1, "n2", "41")]), 1)
        .unwrap();
    assert!(link.route(slot(1), &["bob"], b"a\n", false, 2));
    link.flush(2);
    commands(&mut link);
    assert!(link.route(slot(1), &["bob"], b"1\n", false, 3));
    // The answer for "a": bob found at (n2, 42).
    link.on_reply(sent_reply(&[], &[], &[(1, "n2", "42")]), 3)
        .unwrap();
    assert!(link.route(slot(1), &["bob"], b"2\n", false, 3));
    link.flush(3);
    let sent = commands(&mut link);
    let groups: Vec<&[String]> = sent.iter().map(|c| &c[5..]).collect();
    assert_eq!(
        groups,
        [
            &["1", "n2", "41", "1", "bob 2\n1\n"][..],
            &["1", "n2", "42", "1", "bob 2\n2\n"][..],
        ]
    );
}

/// A turn's claims are one script call, answered by one array: each
/// claim gets its own outcome, in order; an error fails them all.
#[test]
fn a_turns_claims_go_as_one_command_and_are_answered_in_order() {
    let mut link = ready_link();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        link.claim(slot(i as u32), Rc::from(*name), false, 0);
    }
    assert!(link.route(slot(0), &["x"], b"l\n", false, 0));
    link.claim(slot(9), Rc::from("d"), true, 0);
    let sent = commands(&mut link);
    let tails: Vec<&[String]> = sent.iter().map(|c| &c[3..]).collect();
    assert_eq!(tails[0], ["p", "n1", "a", "b", "c"]);
    assert_eq!(
        tails[1][2..],
        ["1", "", "0", "1", "x 2\nl\n"],
        "the line after them"
    );
    assert_eq!(tails[2], ["p", "n1", "d"], "the next claim after the line");
    link.on_reply(claimed(&[1, -1, 1]), 1).unwrap();
    let outcomes: Vec<(Slot, Claimed)> = link
        .take_answers()
        .into_iter()
        .filter_map(|a| match a {
            Answer::Claimed { slot, outcome, .. } => Some((slot, outcome)),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            (slot(0), Claimed::Held),
            (slot(1), Claimed::Unavailable),
            (slot(2), Claimed::Held)
        ]
    );
    link.on_reply(sent_reply(&[], &[], &[]), 2).unwrap();
    link.take_answers();
    assert!(link.on_reply(Reply::Error("BUSY".into()), 3).is_err());
    assert!(matches!(
        link.take_answers()[..],
        [
            Answer::Claimed {
                outcome: Claimed::Unavailable,
                ..
            },
            ..
        ]
    ));
    assert!(link.pending.is_empty());
}

/// A turn's releases are one script call too, answered once for all.
#[test]
fn a_turns_releases_go_as_one_command() {
    let mut link = ready_link();
    link.release("a");
    link.release("b");
    link.claim(slot(1), Rc::from("a"), false, 0);
    let sent = commands(&mut link);
    let tails: Vec<&[String]> = sent.iter().map(|c| &c[3..]).collect();
    assert_eq!(tails, [&["p", "n1", "a", "b"][..], &["p", "n1", "a"][..]]);
    link.on_reply(Reply::Int(1), 1).unwrap();
    assert_eq!(link.pending.len(), 1, "both releases answered");
    link.on_reply(claimed(&[1]), 2).unwrap();
    assert!(link.pending.is_empty());
    let (_, uncertain, _) = link.handover_state(3);
    assert!(uncertain.is_empty());
}

/// A client that leaves while its claim waits to be tried again (found
/// taken once) takes the retry with it: the release is not followed by a
/// claim nobody would hold. Found by review.
#[test]
fn a_release_cancels_a_claim_waiting_to_be_tried_again() {
    let mut link = ready_link();
    let poll = mio::Poll::new().unwrap();
    link.claim(slot(1), Rc::from("a"), false, 0);
    commands(&mut link);
    link.on_reply(claimed(&[0]), 1).unwrap();
    assert!(link.owes(slot(1)));
    link.release("a");
    assert!(!link.owes(slot(1)) || link.has_answers());
    link.take_answers();
    link.on_timer(poll.registry(), TOKENS, 1 + CLAIM_RETRY_MS);
    let sent = commands(&mut link);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0][3..], ["p", "n1", "a"], "the release only");
    assert!(link.retries.is_empty());
}

#[test]
fn a_list_of_urls_keeps_a_comma_in_a_password() {
    let shards =
        ClusterConfig::parse_urls("redis://:a,b@127.0.0.1:1, redis://127.0.0.1:2").unwrap();
    assert_eq!(shards.len(), 2);
    assert_eq!(
        shards[0].auth.as_ref().map(|a| a.password.as_str()),
        Some("a,b")
    );
    assert_eq!(shards[1].addr.to_string(), "127.0.0.1:2");
    let escaped = ClusterConfig::parse_urls("redis://:a%2Cb@127.0.0.1:1").unwrap();
    assert_eq!(
        escaped[0].auth.as_ref().map(|a| a.password.as_str()),
        Some("a,b")
    );
}

/// A connection gone with an answer owed, its slab key taken by another
/// whose input is held back: the answer lets the new one be read again,
/// by its own slot (an `Unthrottle` for the gone one would be dropped, and
/// the new one never read again).
#[test]
fn an_answer_for_a_gone_connection_unthrottles_the_one_on_its_key() {
    let mut link = ready_link();
    let (gone, now) = (Slot { key: 7, id: 1 }, Slot { key: 7, id: 2 });
    assert!(link.route(gone, &["bob"], b"x\n", false, 0));
    link.flush(0);
    commands(&mut link);
    link.throttle(now);
    link.on_reply(sent_reply(&[], &[], &[]), 1).unwrap();
    let answers = link.take_answers();
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, Answer::Unthrottle { slot } if *slot == now)),
        "{answers:?}"
    );
}

/// Two batches in flight when the lease went both find it gone (`-1`): the
/// node takes one new lease, not two (the second `SET NX` would find the
/// first's and reset the link, closing the clients claimed again).
#[test]
fn a_lease_lost_under_two_batches_is_taken_anew_once() {
    let mut link = ready_link();
    assert!(link.route(slot(1), &["bob"], b"x\n", false, 0));
    link.seal_staged();
    assert!(link.route(slot(1), &["bob"], b"y\n", false, 0));
    link.seal_staged();
    link.on_reply(Reply::Int(-1), 1).unwrap();
    link.on_reply(Reply::Int(-1), 1).unwrap();
    let acquires = link
        .pending
        .iter()
        .filter(|p| matches!(p, Pending::Acquire { .. }))
        .count();
    assert_eq!(acquires, 1, "{:?}", link.pending);
    let answers = link.take_answers();
    let unroutable = answers
        .iter()
        .filter(|a| matches!(a, Answer::Unroutable { .. }))
        .count();
    assert_eq!(unroutable, 2, "both lines answered: {answers:?}");
    // The new lease's commands are answered: the link stays up.
    while let Some(entry) = link.pending.front() {
        let reply = match entry {
            Pending::Acquire { .. } => Reply::Status("OK".into()),
            _ => Reply::Int(1),
        };
        link.on_reply(reply, 2).unwrap();
    }
    assert_eq!(link.state, State::Ready);
}

/// Lines pushed to this node keep coming while its commands' answers wait
/// behind them (a flood it reads as fast as it can): Redis is alive and
/// the link works, so it is not reset at the reply timeout; silence is.
#[test]
fn pushes_say_redis_is_alive_while_answers_wait_behind_them() {
    let mut link = ready_link();
    let poll = mio::Poll::new().unwrap();
    let timeout = link.reply_timeout_ms();
    link.claim(slot(0), Rc::from("c0"), false, 0);
    commands(&mut link);
    let lines = Reply::Message {
        channel: link.lines_channel.clone(),
        payload: b"bob 5\nhi x\n".to_vec(),
    };
    link.on_reply(lines, timeout - 1).unwrap();
    link.on_timer(poll.registry(), TOKENS, timeout + 1);
    assert_eq!(link.state, State::Ready, "a push came: busy, not gone");
    link.on_timer(poll.registry(), TOKENS, 2 * timeout);
    assert!(
        matches!(link.state, State::Down { .. }),
        "then nothing: gone"
    );
}
