//! History and resume on a single gateway (protocol.md §5): positions in
//! the subscribe `ok`, resume with `since` (recovered, epoch_changed,
//! trimmed, too_many, no_history), the `history` op, the byte cap, and the
//! race between a replay and live messages.

use serde_json::{Value as Json, json};
use wsgate::config::HistoryRule;

use crate::cluster::{RedisServer, replicas, wait_ready};
use crate::harness::{Client, Gateway, WAIT, eventually, start};

/// A gateway whose `chat:*` keeps `max_messages`, replaying at most
/// `max_replay`; publishers are not rate limited.
async fn gateway(max_messages: usize, max_replay: usize) -> Gateway {
    start(|c, _| {
        c.history.channels = vec![HistoryRule {
            pattern: "chat:*".into(),
            max_messages,
            max_age_s: 600,
        }];
        c.history.max_replay = max_replay;
        c.limits.publish_rate_per_s = 100_000;
        c.limits.publish_burst = 100_000;
    })
    .await
}

/// Subscribes with `since` and returns the `ok`.
async fn resume(client: &mut Client, channel: &str, epoch: &str, seq: u64) -> Json {
    let reply = client
        .call(json!({"op": "subscribe", "channel": channel, "since": {"epoch": epoch, "seq": seq}}))
        .await;
    assert_eq!(reply["op"], "ok", "{reply}");
    reply
}

/// The `seq`s of the next `n` messages of `channel`, checking their data.
async fn next_seqs(client: &mut Client, channel: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let frame = client.next().await;
        assert_eq!(frame["op"], "message", "{frame}");
        assert_eq!(frame["channel"], channel, "{frame}");
        let seq = frame["seq"].as_u64().expect("seq");
        assert_eq!(
            frame["data"],
            json!({"n": seq}),
            "data follows seq: {frame}"
        );
        out.push(seq);
    }
    out
}

async fn publish_n(client: &mut Client, channel: &str, seqs: std::ops::RangeInclusive<u64>) {
    for n in seqs {
        client.publish(channel, json!({"n": n})).await;
    }
}

#[tokio::test]
async fn a_client_resumes_exactly_what_it_missed_then_goes_live() {
    let gw = gateway(100, 300).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;

    // The ok carries the position even before anything was published.
    let ok = alice.subscribe("chat:lobby").await;
    let epoch = ok["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(ok["seq"], 0, "{ok}");
    assert!(!epoch.is_empty() && epoch.len() <= 32);

    publish_n(&mut bob, "chat:lobby", 1..=5).await;
    assert_eq!(
        next_seqs(&mut alice, "chat:lobby", 5).await,
        [1, 2, 3, 4, 5]
    );
    drop(alice);

    publish_n(&mut bob, "chat:lobby", 6..=10).await;

    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let ok = resume(&mut alice, "chat:lobby", &epoch, 5).await;
    assert_eq!(ok["recovered"], true, "{ok}");
    assert_eq!(
        (ok["epoch"].as_str(), ok["seq"].as_u64()),
        (Some(&*epoch), Some(10))
    );
    assert!(ok.get("reason").is_none(), "{ok}");
    assert_eq!(
        next_seqs(&mut alice, "chat:lobby", 5).await,
        [6, 7, 8, 9, 10]
    );

    // Then live, from 11 on, nothing repeated.
    publish_n(&mut bob, "chat:lobby", 11..=12).await;
    assert_eq!(next_seqs(&mut alice, "chat:lobby", 2).await, [11, 12]);
    alice.assert_quiet("after the live messages").await;

    // Resuming at the top replays nothing and is still recovered.
    let mut carol = Client::join(&gw, "carol", &["member"]).await;
    let ok = resume(&mut carol, "chat:lobby", &epoch, 12).await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["seq"].as_u64()),
        (Some(true), Some(12))
    );
    carol.assert_quiet("nothing was missed").await;
    assert_eq!(
        gw.metric("wsgate_resumes_total{outcome=\"recovered\"}")
            .await,
        2
    );
}

#[tokio::test]
async fn history_returns_the_last_messages_oldest_first() {
    let gw = gateway(100, 300).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    // Stored with nobody subscribed.
    publish_n(&mut bob, "chat:room", 1..=7).await;

    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let ok = alice
        .call(json!({"op": "history", "channel": "chat:room", "limit": 3}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    assert_eq!(ok["seq"], 7);
    assert!(ok["epoch"].is_string());
    assert_eq!(
        ok["messages"],
        json!([
            {"from": "bob", "seq": 5, "data": {"n": 5}},
            {"from": "bob", "seq": 6, "data": {"n": 6}},
            {"from": "bob", "seq": 7, "data": {"n": 7}},
        ])
    );
    // The default limit is 50: all seven.
    let all = alice
        .call(json!({"op": "history", "channel": "chat:room"}))
        .await;
    assert_eq!(all["messages"].as_array().map(Vec::len), Some(7), "{all}");

    // Without history, without permission, or a bad limit: errors.
    alice
        .error(
            json!({"op": "history", "channel": "user:alice"}),
            "no_history",
        )
        .await;
    alice
        .error(json!({"op": "history", "channel": "user:bob"}), "forbidden")
        .await;
    alice
        .error(
            json!({"op": "history", "channel": "chat:room", "limit": 1001}),
            "bad_request",
        )
        .await;
    assert_eq!(gw.metric("wsgate_history_reads_total").await, 2);
}

#[tokio::test]
async fn what_cannot_be_replayed_is_said_and_the_subscription_still_made() {
    // Keeps 3, replays at most 5.
    let gw = gateway(3, 5).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let ok = alice.subscribe("chat:a").await;
    let epoch = ok["epoch"].as_str().expect("epoch").to_owned();
    alice
        .ok(json!({"op": "unsubscribe", "channel": "chat:a"}))
        .await;
    publish_n(&mut bob, "chat:a", 1..=4).await;

    // Missed 4, only 2..=4 kept: trimmed.
    let ok = resume(&mut alice, "chat:a", &epoch, 0).await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["reason"].as_str()),
        (Some(false), Some("trimmed"))
    );
    assert_eq!(ok["seq"], 4);
    alice
        .ok(json!({"op": "unsubscribe", "channel": "chat:a"}))
        .await;

    // Missed 6 > 5: too many (checked before what is kept).
    publish_n(&mut bob, "chat:a", 5..=10).await;
    let ok = resume(&mut alice, "chat:a", &epoch, 4).await;
    assert_eq!(ok["reason"], "too_many", "{ok}");
    // The subscription is made all the same: live messages arrive.
    publish_n(&mut bob, "chat:a", 11..=11).await;
    assert_eq!(next_seqs(&mut alice, "chat:a", 1).await, [11]);
    alice.assert_quiet("nothing was replayed").await;

    // Another epoch, or a seq from the future: epoch_changed.
    let mut carol = Client::join(&gw, "carol", &["member"]).await;
    let ok = resume(&mut carol, "chat:a", "not-this-one", 3).await;
    assert_eq!(ok["reason"], "epoch_changed", "{ok}");
    assert_eq!(ok["epoch"].as_str(), Some(&*epoch));
    let mut dave = Client::join(&gw, "dave", &["member"]).await;
    let ok = resume(&mut dave, "chat:a", &epoch, 99).await;
    assert_eq!(ok["reason"], "epoch_changed", "{ok}");

    // A channel without history.
    let ok = resume(&mut dave, "user:dave", &epoch, 0).await;
    assert_eq!(
        ok,
        json!({"op": "ok", "id": ok["id"], "recovered": false, "reason": "no_history"})
    );

    // A malformed since is a bad request and subscribes nothing.
    for since in [
        json!(5),
        json!({"epoch": 5, "seq": 1}),
        json!({"epoch": "e", "seq": -1}),
    ] {
        dave.error(
            json!({"op": "subscribe", "channel": "chat:b", "since": since}),
            "bad_request",
        )
        .await;
    }
    for outcome in ["trimmed", "too_many", "no_history"] {
        let series = format!("wsgate_resumes_total{{outcome=\"{outcome}\"}}");
        assert_eq!(gw.metric(&series).await, 1, "{outcome}");
    }
    assert_eq!(
        gw.metric("wsgate_resumes_total{outcome=\"epoch_changed\"}")
            .await,
        2
    );
}

#[tokio::test]
async fn a_restarted_gateway_answers_epoch_changed() {
    let first = gateway(100, 300).await;
    let mut alice = Client::join(&first, "alice", &["member"]).await;
    let ok = alice.subscribe("chat:lobby").await;
    let epoch = ok["epoch"].as_str().expect("epoch").to_owned();
    alice.publish("chat:lobby", json!({"n": 1})).await;
    drop(alice);
    first.stop().await;

    // A fresh process state: its numbering starts again.
    let second = gateway(100, 300).await;
    let mut alice = Client::join(&second, "alice", &["member"]).await;
    let ok = resume(&mut alice, "chat:lobby", &epoch, 1).await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["reason"].as_str()),
        (Some(false), Some("epoch_changed"))
    );
    assert_ne!(ok["epoch"].as_str(), Some(&*epoch));
    assert_eq!(ok["seq"], 0);
}

#[tokio::test]
async fn the_byte_cap_evicts_whole_channels_which_start_a_new_epoch() {
    let gw = start(|c, _| {
        c.history.max_bytes = 1024 * 1024;
        c.limits.publish_rate_per_s = 100_000;
        c.limits.publish_burst = 100_000;
    })
    .await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    let first = bob.subscribe("chat:c0").await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    bob.ok(json!({"op": "unsubscribe", "channel": "chat:c0"}))
        .await;
    let big = "x".repeat(60 * 1024);
    for i in 0..40 {
        bob.publish(&format!("chat:c{i}"), json!({"pad": big}))
            .await;
    }
    assert!(gw.metric("wsgate_history_evictions_total").await > 0);
    let bytes = gw.metric("wsgate_history_bytes").await;
    assert!(bytes <= 1024 * 1024, "{bytes} bytes kept");
    // The least recently published channel went first: its history is gone
    // with its epoch.
    let ok = resume(&mut bob, "chat:c0", &epoch, 1).await;
    assert_eq!(ok["reason"], "epoch_changed", "{ok}");
}

/// The replay/live race: `clients` resume on `resume_on` (each from some
/// position at or below `before`) while a publisher on `publish_on` takes
/// the channel from `before` to `total`; a watcher subscribed from the
/// start on `resume_on` checks the live stream. Every client must get
/// every seq after its position exactly once, in order. Returns how many
/// resumes happened mid-stream.
async fn race(
    publish_on: &Gateway,
    resume_on: &Gateway,
    clients: usize,
    before: u64,
    total: u64,
) -> usize {
    let mut publisher = Client::join(publish_on, "pub", &["member"]).await;
    let mut watcher = Client::join(resume_on, "watch", &["member"]).await;
    let ok = watcher.subscribe("chat:race").await;
    let epoch = ok["epoch"].as_str().expect("epoch").to_owned();
    publish_n(&mut publisher, "chat:race", 1..=before).await;

    let publishing = tokio::spawn(async move {
        for n in before + 1..=total {
            publisher
                .send(&json!({"op": "publish", "channel": "chat:race", "data": {"n": n}}))
                .await;
            if n % 4 == 0 {
                // Pacing only: spreads the stream over the resumes.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        publisher
    });
    let mut resumers = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut c = Client::join(resume_on, &format!("r{i}"), &["member"]).await;
        let since = (i as u64 * 7) % before;
        let epoch = epoch.clone();
        resumers.push(tokio::spawn(async move {
            let ok = resume(&mut c, "chat:race", &epoch, since).await;
            assert_eq!(ok["recovered"], true, "{ok}");
            let at = ok["seq"].as_u64().expect("seq");
            let seqs = next_seqs(&mut c, "chat:race", (total - since) as usize).await;
            (since, at, seqs)
        }));
    }
    let mut publisher = publishing.await.expect("publisher");
    let mut mid_stream = 0;
    for r in resumers {
        let (since, at, seqs) = r.await.expect("resumer");
        let expected: Vec<u64> = (since + 1..=total).collect();
        assert_eq!(seqs, expected, "resumed from {since} at {at}");
        if at > before && at < total {
            mid_stream += 1;
        }
    }
    assert!(mid_stream > 0, "no resume raced the publisher");
    assert_eq!(
        next_seqs(&mut watcher, "chat:race", total as usize).await,
        (1..=total).collect::<Vec<_>>()
    );
    publisher.assert_quiet("no echo: not subscribed").await;
    mid_stream
}

#[tokio::test]
async fn resumes_racing_a_publisher_get_every_seq_exactly_once_in_order() {
    let gw = gateway(1000, 1000).await;
    let mid_stream = race(&gw, &gw, 50, 100, 600).await;
    eprintln!(
        "replay/live race: 50 clients resumed while 500 messages were published ({mid_stream} of them mid-stream); each got every seq after its position exactly once, in order"
    );
    let _ = eventually(WAIT, "the resumes to be counted", async || {
        (gw.metric("wsgate_resumes_total{outcome=\"recovered\"}")
            .await
            == 50)
            .then_some(())
    })
    .await;
}

/// Through Redis: a client that last saw seq 5 on one replica resumes on
/// the other and gets exactly 6..=10, then live messages.
#[tokio::test]
async fn through_redis_a_client_resumes_on_another_replica() {
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let mut bob = Client::join(&b, "bob", &["member"]).await;
    let mut alice = Client::join(&a, "alice", &["member"]).await;
    let ok = alice.subscribe("chat:lobby").await;
    let epoch = ok["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(ok["seq"], 0, "{ok}");

    publish_n(&mut bob, "chat:lobby", 1..=5).await;
    assert_eq!(
        next_seqs(&mut alice, "chat:lobby", 5).await,
        [1, 2, 3, 4, 5]
    );
    drop(alice);
    publish_n(&mut bob, "chat:lobby", 6..=10).await;

    let mut alice = Client::join(&b, "alice", &["member"]).await;
    let ok = resume(&mut alice, "chat:lobby", &epoch, 5).await;
    assert_eq!(
        (
            ok["recovered"].as_bool(),
            ok["epoch"].as_str(),
            ok["seq"].as_u64()
        ),
        (Some(true), Some(&*epoch), Some(10)),
        "{ok}"
    );
    assert_eq!(
        next_seqs(&mut alice, "chat:lobby", 5).await,
        [6, 7, 8, 9, 10]
    );
    publish_n(&mut bob, "chat:lobby", 11..=11).await;
    assert_eq!(next_seqs(&mut alice, "chat:lobby", 1).await, [11]);
    alice.assert_quiet("nothing repeated").await;

    // History through Redis, from either replica.
    let page = bob
        .call(json!({"op": "history", "channel": "chat:lobby", "limit": 2}))
        .await;
    assert_eq!(page["seq"], 11, "{page}");
    assert_eq!(page["epoch"].as_str(), Some(&*epoch));
    assert_eq!(
        page["messages"],
        json!([
            {"from": "bob", "seq": 10, "data": {"n": 10}},
            {"from": "bob", "seq": 11, "data": {"n": 11}},
        ])
    );
    // Too many, a future seq, and a channel without history.
    let mut carol = Client::join(&a, "carol", &["member"]).await;
    let ok = resume(&mut carol, "chat:lobby", &epoch, 99).await;
    assert_eq!(ok["reason"], "epoch_changed", "{ok}");
    let ok = resume(&mut carol, "user:carol", &epoch, 0).await;
    assert_eq!(ok["reason"], "no_history", "{ok}");
    carol
        .error(
            json!({"op": "history", "channel": "user:carol"}),
            "no_history",
        )
        .await;
}

/// Redis loses the counter: a client holding a position of the old epoch
/// is told `epoch_changed`, never a wrong "recovered".
#[tokio::test]
async fn through_redis_a_lost_counter_is_an_epoch_change() {
    let mut redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let mut bob = Client::join(&b, "bob", &["member"]).await;
    let mut alice = Client::join(&a, "alice", &["member"]).await;
    let epoch = alice.subscribe("chat:x").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    publish_n(&mut bob, "chat:x", 1..=3).await;
    assert_eq!(next_seqs(&mut alice, "chat:x", 3).await, [1, 2, 3]);
    drop(alice);

    redis.stop();
    redis.restart().await;
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    // The new numbering reaches past the old position.
    let mut bob = Client::join(&b, "bob", &["member"]).await;
    publish_n(&mut bob, "chat:x", 1..=5).await;

    let mut alice = Client::join(&a, "alice", &["member"]).await;
    let ok = resume(&mut alice, "chat:x", &epoch, 3).await;
    assert_eq!(
        (
            ok["recovered"].as_bool(),
            ok["reason"].as_str(),
            ok["seq"].as_u64()
        ),
        (Some(false), Some("epoch_changed"), Some(5)),
        "{ok}"
    );
    assert_ne!(ok["epoch"].as_str(), Some(&*epoch));
    alice.assert_quiet("nothing replayed").await;
}

/// Through Redis, resumes racing a publisher on the other replica: every
/// client ends with every seq after its position, once, in order.
#[tokio::test]
async fn through_redis_resumes_racing_a_publisher_lose_and_repeat_nothing() {
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let mid_stream = race(&a, &b, 30, 50, 400).await;
    eprintln!(
        "replay/live race through redis: 30 clients resumed while 350 messages were published ({mid_stream} of them mid-stream); each got every seq after its position exactly once, in order"
    );
}
