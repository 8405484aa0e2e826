//! Property tests over real sockets: routing delivers each line to exactly
//! the set of online named recipients, once each, in order, and reports the
//! offline ones, for random populations and message sequences.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::{Client, Server};
use proptest::prelude::*;

/// Names 0..NAMES exist; a case picks which of them are online.
const NAMES: usize = 6;

#[derive(Debug, Clone)]
struct Message {
    /// Index into the online senders.
    sender: usize,
    /// Name indices, duplicates and offline names included.
    recipients: Vec<usize>,
}

fn name(i: usize) -> String {
    format!("u{i}")
}

/// The lines each online client must receive, in order, per docs/PROTOCOL.md.
fn model(online: &[usize], messages: &[Message]) -> BTreeMap<usize, Vec<String>> {
    let mut inbox: BTreeMap<usize, Vec<String>> = online.iter().map(|&i| (i, Vec::new())).collect();
    for (k, m) in messages.iter().enumerate() {
        let from = online[m.sender];
        let mut seen = HashSet::new();
        let mut offline = Vec::new();
        for &r in &m.recipients {
            if !seen.insert(r) {
                continue; // named twice: delivered once
            }
            match inbox.get_mut(&r) {
                Some(lines) => lines.push(format!("from {}: m{k}", name(from))),
                None => offline.push(name(r)),
            }
        }
        let lines = inbox.get_mut(&from).unwrap();
        if !offline.is_empty() {
            lines.push(format!("error: not-online: {}", offline.join(", ")));
        }
        // The sender's sync after each message (see the test).
        lines.push(format!("from {}: sync{k}", name(from)));
    }
    inbox
}

fn cases() -> impl Strategy<Value = (Vec<usize>, Vec<Message>)> {
    proptest::sample::subsequence((0..NAMES).collect::<Vec<_>>(), 1..=NAMES).prop_flat_map(
        |online| {
            let senders = online.len();
            let message = (0..senders, proptest::collection::vec(0..NAMES, 1..6))
                .prop_map(|(sender, recipients)| Message { sender, recipients });
            (Just(online), proptest::collection::vec(message, 1..20))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Each online recipient gets each message once, in the order the
    /// server processed them; senders hear about offline names.
    #[test]
    fn routing_matches_the_model((online, messages) in cases()) {
        let server = Server::start(&[]);
        let mut clients: BTreeMap<usize, Client> =
            online.iter().map(|&i| (i, server.login(&name(i)))).collect();
        // One message at a time, each confirmed by its sender's sync, so the
        // server's processing order is the list's order. `read` counts the
        // lines each client has checked so far.
        let mut read: BTreeMap<usize, usize> = online.iter().map(|&i| (i, 0)).collect();
        for (k, m) in messages.iter().enumerate() {
            let from = online[m.sender];
            let names: Vec<String> = m.recipients.iter().map(|&r| name(r)).collect();
            let sender = clients.get_mut(&from).unwrap();
            sender.send(&format!("{}: m{k}\n{}: sync{k}\n", names.join(", "), name(from)));
            let want = &model(&online, &messages[..=k])[&from];
            for line in &want[read[&from]..] {
                sender.expect(line);
            }
            read.insert(from, want.len());
        }
        let want = model(&online, &messages);
        for (i, client) in clients.iter_mut() {
            for line in &want[i][read[i]..] {
                client.expect(line);
            }
            client.sync(&name(*i)); // and nothing else arrived
        }
    }
}
