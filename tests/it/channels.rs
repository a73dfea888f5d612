//! `protocol.md` §2–§4 after the upgrade: every op end to end, `from` and
//! `seq` stamped by the gateway, error replies that keep the connection
//! open, policy reloads under live subscriptions, slow readers (4008),
//! token expiry and refresh, heartbeats, and the per-connection limits.
//!
//! Absence ("no message came") is proven with [`Client::settle`] (in the
//! harness): a ping round-trip, then a barrier message the client
//! publishes to its own `user:{sub}` inbox. A pong alone only proves the
//! ping was handled; the barrier goes through the hub and the connection's
//! queue like any message, behind everything routed to the client before
//! it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::harness::{
    self, Client, Gateway, WAIT, Ws, bearer, eventually, eventually_ok, expect_close, hs256_jwt,
    is_ok, read_json, start, try_read_json,
};

const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

// ---- helpers ------------------------------------------------------------------

/// A token for `sub` with `roles` that expires at `exp` (unix seconds).
fn token_until(gw: &Gateway, sub: &str, roles: &[&str], exp: u64) -> String {
    let claims = json!({"sub": sub, "roles": roles, "exp": exp});
    hs256_jwt(HS256, &claims.to_string(), &gw.secret())
}

/// The `message` frame the contract describes, field for field.
fn message(channel: &str, from: &str, data: Json, seq: u64) -> Json {
    json!({"op": "message", "channel": channel, "from": from, "data": data, "seq": seq})
}

/// Reads until the gateway's close frame: the text frames before it, and
/// its code (`None` when the stream ended without a close frame).
async fn read_until_close(ws: &mut Ws, stop_after: usize) -> (Vec<Json>, Option<u16>) {
    let mut frames = Vec::new();
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    frames.push(serde_json::from_str::<Json>(&text).expect("json"));
                    if frames.len() >= stop_after {
                        return None;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(Some(frame)))) => return Some(u16::from(frame.code)),
                Some(Ok(other)) => panic!("unexpected frame {other:?}"),
                Some(Err(_)) | None => return None,
            }
        }
    };
    let code = tokio::time::timeout(WAIT, read)
        .await
        .expect("the gateway neither closed nor sent enough in time");
    (frames, code)
}

/// Time since the epoch, with sub-second precision.
fn wall() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
}

/// Sleeps until the wall clock is `ms` milliseconds into a second, so a
/// test can place itself relative to the whole-second `exp` of a token.
async fn at_millis_into_second(ms: u32) {
    let now = wall().subsec_millis();
    let wait = (ms + 1000 - now) % 1000;
    // A sleep: the position within the wall-clock second is what the
    // expiry tests set up, there is no event to wait for.
    tokio::time::sleep(Duration::from_millis(u64::from(wait))).await;
}

/// Sends every frame in one flush, waiting for no reply.
async fn fire_and_forget(ws: &mut Ws, frames: Vec<String>) {
    for frame in frames {
        ws.feed(Message::text(frame)).await.expect("feed");
    }
    ws.flush().await.expect("flush");
}

// ---- 1. every op end to end ---------------------------------------------------

#[tokio::test]
async fn every_op_end_to_end() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    let mut carol = Client::join(&gw, "carol", &["member"]).await;
    alice.subscribe_inbox().await;
    bob.subscribe_inbox().await;

    // subscribe → {"op":"ok","id":N} (plus the position on a history
    // channel); a second subscribe is a no-op.
    alice.subscribe("chat:x").await;
    alice.subscribe("chat:x").await;
    bob.subscribe("chat:x").await;
    carol.subscribe("chat:x").await;

    // publish with id → ok, and every subscriber gets it once, the
    // subscribed publisher included.
    let data = json!({"text": "hi", "n": [1, 2.5, null, true]});
    bob.publish("chat:x", data.clone()).await;
    let expected = message("chat:x", "bob", data, 1);
    assert_eq!(alice.next().await, expected);
    assert_eq!(bob.next().await, expected);
    assert_eq!(carol.next().await, expected);

    // publish without id → no ok, still delivered; `data` may be null.
    alice
        .send(&json!({"op": "publish", "channel": "chat:x", "data": null}))
        .await;
    let expected = message("chat:x", "alice", Json::Null, 2);
    // No reply comes before the message, and `settle` shows none after it.
    assert_eq!(alice.next().await, expected);
    assert_eq!(bob.next().await, expected);
    assert_eq!(carol.next().await, expected);
    alice
        .assert_quiet("a publish without id gets no reply")
        .await;
    bob.assert_quiet("each message comes once").await;

    // unsubscribe → ok, then nothing more from the channel.
    alice
        .ok(json!({"op": "unsubscribe", "channel": "chat:x"}))
        .await;
    bob.publish("chat:x", json!("after")).await;
    let expected = message("chat:x", "bob", json!("after"), 3);
    assert_eq!(bob.next().await, expected);
    assert_eq!(carol.next().await, expected);
    alice
        .assert_quiet("unsubscribed from chat:x before bob published")
        .await;

    // unsubscribe of a channel not subscribed → not_subscribed with the id.
    let err = alice
        .error(
            json!({"op": "unsubscribe", "channel": "chat:x"}),
            "not_subscribed",
        )
        .await;
    assert_eq!(err["channel"], "chat:x", "{err}");
    alice
        .error(
            json!({"op": "unsubscribe", "channel": "chat:never"}),
            "not_subscribed",
        )
        .await;

    // ping → pong with the id; without id → a bare pong.
    let reply = alice.call(json!({"op": "ping"})).await;
    assert_eq!(reply, json!({"op": "pong", "id": alice.next_id}));
    alice.send(&json!({"op": "ping"})).await;
    assert_eq!(alice.next().await, json!({"op": "pong"}));

    // Subscribing again works, and the channel's seq went on.
    alice.subscribe("chat:x").await;
    carol.publish("chat:x", json!(4)).await;
    assert_eq!(alice.next().await, message("chat:x", "carol", json!(4), 4));
    alice.assert_quiet("one message").await;
}

/// Replies and messages are one ordered stream: no message of a channel
/// comes after its `unsubscribe` ok, not even one routed to the client
/// just before the unsubscribe was handled; the `subscribe` ok comes
/// before the channel's first message.
#[tokio::test]
async fn subscribe_and_unsubscribe_oks_are_ordered_with_messages() {
    const BURST: usize = 60;
    let gw = start(|c, _| {
        c.limits.publish_rate_per_s = 100_000;
        c.limits.publish_burst = 100_000;
    })
    .await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    bob.nodelay();
    alice.subscribe_inbox().await;
    for round in 0..20 {
        // Bob is mid-burst when alice subscribes ...
        let burst = |from: usize| -> Vec<String> {
            (from..from + BURST)
                .map(|n| json!({"op": "publish", "channel": "chat:x", "data": n}).to_string())
                .collect()
        };
        fire_and_forget(&mut bob.ws, burst(0)).await;
        let id = alice.id();
        alice
            .send(&json!({"op": "subscribe", "id": id, "channel": "chat:x"}))
            .await;
        fire_and_forget(&mut bob.ws, burst(BURST)).await;
        loop {
            let frame = read_json(&mut alice.ws).await;
            if is_ok(&frame, id) {
                break;
            }
            assert_ne!(
                frame["channel"], "chat:x",
                "before the subscribe ok: {frame}"
            );
        }
        // ... and again when she leaves: messages routed to her before the
        // unsubscribe are still queued when it is handled.
        fire_and_forget(&mut bob.ws, burst(2 * BURST)).await;
        let id = alice.id();
        alice
            .send(&json!({"op": "unsubscribe", "id": id, "channel": "chat:x"}))
            .await;
        loop {
            let frame = read_json(&mut alice.ws).await;
            if frame == json!({"op": "ok", "id": id}) {
                break;
            }
            assert_eq!(frame["channel"], "chat:x", "{frame}");
        }
        let late: Vec<Json> = alice
            .settle()
            .await
            .into_iter()
            .filter(|f| f["channel"] == "chat:x")
            .collect();
        assert!(
            late.is_empty(),
            "round {round}: {} message(s) of chat:x after the unsubscribe ok, the first {}",
            late.len(),
            late[0]
        );
    }
    bob.assert_quiet("no errors for the bursts").await;
}

// ---- 2. `from` is stamped by the gateway ----------------------------------------

#[tokio::test]
async fn publish_ok_comes_before_the_publishers_own_echo() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    alice.subscribe("chat:echo").await;
    for n in 0..5 {
        let id = alice.id();
        alice
            .send(&json!({"op": "publish", "id": id, "channel": "chat:echo", "data": n}))
            .await;
        // Read raw frames: the first must be the ok, the second the echo.
        assert_eq!(
            read_json(&mut alice.ws).await,
            json!({"op": "ok", "id": id})
        );
        assert_eq!(
            read_json(&mut alice.ws).await,
            message("chat:echo", "alice", json!(n), n + 1)
        );
    }
}

#[tokio::test]
async fn from_and_seq_are_stamped_by_the_gateway() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    alice.subscribe("chat:x").await;
    bob.ok(json!({
        "op": "publish", "channel": "chat:x", "data": "forged?",
        "from": "mallory", "seq": 999, "op2": "message",
    }))
    .await;
    assert_eq!(
        alice.next().await,
        message("chat:x", "bob", json!("forged?"), 1)
    );
    // Fire-and-forget too.
    bob.send(&json!({"op": "publish", "channel": "chat:x", "data": 2, "from": "mallory"}))
        .await;
    assert_eq!(alice.next().await, message("chat:x", "bob", json!(2), 2));
}

// ---- 3. seq per channel across publishers ----------------------------------------

#[tokio::test]
async fn seq_increases_by_one_per_channel_across_publishers() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    let mut carol = Client::join(&gw, "carol", &["member"]).await;
    alice.subscribe("chat:a").await;
    alice.subscribe("chat:b").await;

    // Interleaved, one at a time: the order is known exactly.
    let plan = [
        ("bob", "chat:a"),
        ("carol", "chat:a"),
        ("bob", "chat:b"),
        ("carol", "chat:a"),
        ("carol", "chat:b"),
        ("bob", "chat:a"),
        ("bob", "chat:b"),
    ];
    let mut seq_a = 0;
    let mut seq_b = 0;
    for (i, (who, channel)) in plan.into_iter().enumerate() {
        let publisher = if who == "bob" { &mut bob } else { &mut carol };
        publisher.publish(channel, json!(i)).await;
        let seq = if channel == "chat:a" {
            seq_a += 1;
            seq_a
        } else {
            seq_b += 1;
            seq_b
        };
        assert_eq!(alice.next().await, message(channel, who, json!(i), seq));
    }

    // Concurrent fire-and-forget from both: chat:a goes on from where it
    // was, by exactly one per message, with each publisher's order kept.
    const EACH: u64 = 40;
    let frames = |user: &str| -> Vec<String> {
        (0..EACH)
            .map(|i| {
                json!({"op": "publish", "channel": "chat:a", "data": {"who": user, "i": i}})
                    .to_string()
            })
            .collect()
    };
    let (bob_frames, carol_frames) = (frames("bob"), frames("carol"));
    tokio::join!(
        fire_and_forget(&mut bob.ws, bob_frames),
        fire_and_forget(&mut carol.ws, carol_frames)
    );
    let mut next_i = std::collections::HashMap::from([("bob", 0u64), ("carol", 0u64)]);
    for _ in 0..2 * EACH {
        let frame = alice.next().await;
        seq_a += 1;
        assert_eq!(frame["channel"], "chat:a", "{frame}");
        assert_eq!(frame["seq"], seq_a, "{frame}");
        let who = frame["from"].as_str().expect("from");
        assert_eq!(frame["data"]["who"], who, "{frame}");
        let expected = next_i.get_mut(who).expect("known publisher");
        assert_eq!(frame["data"]["i"], *expected, "{frame}");
        *expected += 1;
    }
    // chat:b was not touched by any of that.
    bob.publish("chat:b", json!("last")).await;
    assert_eq!(
        alice.next().await,
        message("chat:b", "bob", json!("last"), seq_b + 1)
    );
    bob.assert_quiet("no errors for fire-and-forget").await;
    carol.assert_quiet("no errors for fire-and-forget").await;
}

// ---- 4. own messages only when subscribed --------------------------------------------

#[tokio::test]
async fn publisher_gets_its_own_message_only_when_subscribed() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    alice.subscribe("chat:x").await;
    bob.subscribe_inbox().await;

    bob.publish("chat:x", json!(1)).await;
    assert_eq!(alice.next().await, message("chat:x", "bob", json!(1), 1));
    bob.assert_quiet("bob is not subscribed to chat:x").await;

    bob.subscribe("chat:x").await;
    bob.publish("chat:x", json!(2)).await;
    let expected = message("chat:x", "bob", json!(2), 2);
    assert_eq!(alice.next().await, expected);
    assert_eq!(bob.next().await, expected);
    bob.assert_quiet("exactly one copy").await;
}

// ---- 5. errors keep the connection open ----------------------------------------------

#[tokio::test]
async fn errors_are_replies_and_keep_the_connection_open() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let long = "a".repeat(256);
    // (frame, code, carries the id, channel named in the reply)
    let cases: Vec<(String, &str, Option<u64>, Option<&str>)> = vec![
        (
            r#"{"op":"fly","id":1}"#.into(),
            "bad_request",
            Some(1),
            None,
        ),
        (r#"{"id":2}"#.into(), "bad_request", Some(2), None),
        ("not json".into(), "bad_request", None, None),
        (r#"{"op":"ping","id":3"#.into(), "bad_request", None, None),
        (
            r#"{"op":"ping","id":"four"}"#.into(),
            "bad_request",
            None,
            None,
        ),
        (
            r#"{"op":"subscribe","id":5,"channel":"a b"}"#.into(),
            "bad_request",
            Some(5),
            None,
        ),
        (
            r#"{"op":"subscribe","id":6,"channel":"chat:*"}"#.into(),
            "bad_request",
            Some(6),
            None,
        ),
        (
            r#"{"op":"subscribe","id":7,"channel":"announce:>"}"#.into(),
            "bad_request",
            Some(7),
            None,
        ),
        (
            r#"{"op":"subscribe","id":8,"channel":"chat::x"}"#.into(),
            "bad_request",
            Some(8),
            None,
        ),
        (
            r#"{"op":"subscribe","id":9,"channel":""}"#.into(),
            "bad_request",
            Some(9),
            None,
        ),
        (
            format!(r#"{{"op":"subscribe","id":10,"channel":"{long}"}}"#),
            "bad_request",
            Some(10),
            None,
        ),
        (
            r#"{"op":"subscribe","id":11}"#.into(),
            "bad_request",
            Some(11),
            None,
        ),
        (
            r#"{"op":"subscribe","id":12,"channel":5}"#.into(),
            "bad_request",
            Some(12),
            None,
        ),
        (
            r#"{"op":"publish","id":13,"channel":"chat:x"}"#.into(),
            "bad_request",
            Some(13),
            None,
        ),
        (
            r#"{"op":"refresh","id":14}"#.into(),
            "bad_request",
            Some(14),
            None,
        ),
        (
            r#"{"op":"subscribe","id":15,"channel":"secret"}"#.into(),
            "forbidden",
            Some(15),
            Some("secret"),
        ),
        (
            r#"{"op":"subscribe","id":16,"channel":"user:bob"}"#.into(),
            "forbidden",
            Some(16),
            Some("user:bob"),
        ),
        (
            r#"{"op":"publish","id":17,"channel":"announce:x","data":1}"#.into(),
            "forbidden",
            Some(17),
            Some("announce:x"),
        ),
        (
            r#"{"op":"publish","id":18,"channel":"user:bob","data":1}"#.into(),
            "forbidden",
            Some(18),
            Some("user:bob"),
        ),
        // Without an id the failure still gets an error, without id.
        (
            r#"{"op":"publish","channel":"announce:x","data":1}"#.into(),
            "forbidden",
            None,
            Some("announce:x"),
        ),
        (
            r#"{"op":"subscribe","channel":"secret"}"#.into(),
            "forbidden",
            None,
            Some("secret"),
        ),
    ];
    for (i, (frame, code, id, channel)) in cases.iter().enumerate() {
        alice.send_text(frame).await;
        let err = alice.next().await;
        assert_eq!(err["op"], "error", "{frame} → {err}");
        assert_eq!(err["code"], *code, "{frame} → {err}");
        assert!(err["message"].is_string(), "{frame} → {err}");
        match id {
            Some(id) => assert_eq!(err["id"], *id, "{frame} → {err}"),
            None => assert!(err.get("id").is_none(), "{frame} → {err}"),
        }
        if let Some(channel) = channel {
            assert_eq!(err["channel"], *channel, "{frame} → {err}");
        }
        // Still open, and nothing else was sent.
        let ping = 1000 + i as u64;
        alice
            .send(&json!({"op": "ping", "id": ping, "unknown": "ignored"}))
            .await;
        assert_eq!(
            alice.next().await,
            json!({"op": "pong", "id": ping}),
            "after {frame}"
        );
    }
    // And everything still works.
    alice.subscribe("chat:x").await;
    alice.publish("chat:x", json!("still here")).await;
    assert_eq!(
        alice.next().await,
        message("chat:x", "alice", json!("still here"), 1)
    );
}

// ---- 6. policy reload under a live subscription ----------------------------------------

/// Members may still post to `chat:*` but no longer read it.
const CHAT_WRITE_ONLY: &str = r#"
[[rule]]
name = "members post to chat but no longer read it"
roles = ["member"]
allow.publish = ["chat:*"]

[[rule]]
name = "own inbox"
allow.subscribe = ["user:{sub}"]
allow.publish = ["user:{sub}"]

[[rule]]
name = "announcements are read by everyone"
allow.subscribe = ["announce:>"]
"#;

#[tokio::test]
async fn policy_reload_ends_a_lost_subscription_with_an_error_frame() {
    let gw = start(|c, _| c.policy.watch_interval_ms = 100).await;
    let policy_file = gw.config.policy.dir.join("default.toml");
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    alice.subscribe_inbox().await;
    alice.subscribe("chat:x").await;
    alice.subscribe("announce:news").await;
    bob.publish("chat:x", json!("before")).await;
    assert_eq!(
        alice.next().await,
        message("chat:x", "bob", json!("before"), 1)
    );

    std::fs::write(&policy_file, CHAT_WRITE_ONLY).expect("rewrite policy");
    // The error frame must come on its own: alice sends nothing meanwhile.
    let Some(err) = try_read_json(&mut alice.ws, WAIT).await else {
        let late = alice.settle().await;
        panic!(
            "no error frame within {WAIT:?} of the policy change while the client was idle; \
             after it sent a ping it got {late:#?}"
        );
    };
    assert_eq!(err["op"], "error", "{err}");
    assert_eq!(err["code"], "forbidden", "{err}");
    assert_eq!(err["channel"], "chat:x", "{err}");
    assert!(err["message"].is_string(), "{err}");
    assert!(err.get("id").is_none(), "not a reply: {err}");

    // Publishing to chat:x is still allowed; alice no longer gets it, and
    // her other subscriptions were kept.
    bob.publish("chat:x", json!("after")).await;
    alice
        .assert_quiet("chat:x was revoked; announce:news and the inbox were not")
        .await;
    let err = alice
        .error(json!({"op": "subscribe", "channel": "chat:x"}), "forbidden")
        .await;
    assert_eq!(err["channel"], "chat:x");
    alice
        .ok(json!({"op": "unsubscribe", "channel": "announce:news"}))
        .await;
}

/// Waits until `client` may no longer subscribe to `channel` (a reload
/// took it away), leaving it unsubscribed.
async fn until_subscribe_is_forbidden(client: &mut Client, channel: &str) {
    eventually(WAIT, "the policy change to be loaded", async || {
        let reply = client
            .call(json!({"op": "subscribe", "channel": channel}))
            .await;
        if reply["op"] == "error" {
            assert_eq!(reply["code"], "forbidden", "{reply}");
            return Some(());
        }
        // The reload may land between the two and end the subscription
        // itself (a `forbidden` without id): then there is nothing left to
        // unsubscribe from.
        let reply = client
            .call(json!({"op": "unsubscribe", "channel": channel}))
            .await;
        assert!(
            reply["op"] == "ok" || reply["code"] == "not_subscribed",
            "{reply}"
        );
        None
    })
    .await;
}

#[tokio::test]
async fn invalid_policy_file_is_refused_and_the_set_in_force_stays() {
    let gw = start(|c, _| c.policy.watch_interval_ms = 100).await;
    let policy_file = gw.config.policy.dir.join("default.toml");
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    alice.subscribe_inbox().await;
    alice.subscribe("announce:news").await;
    std::fs::write(&policy_file, CHAT_WRITE_ONLY).expect("rewrite policy");
    until_subscribe_is_forbidden(&mut bob, "chat:probe").await;

    // An invalid file is refused (the warning names it) ...
    let path_text = policy_file.display().to_string();
    let mentions = || {
        harness::captured_logs()
            .lines()
            .filter(|l| l.contains(&path_text))
            .count()
    };
    let before = mentions();
    std::fs::write(&policy_file, "[[rule]]\nname = 1\n").expect("break policy");
    eventually(
        WAIT,
        "the watcher to report the invalid policy file",
        async || (mentions() != before).then_some(()),
    )
    .await;
    // ... and, three polls later, the set in force is still the last good
    // one. A sleep: the watcher gets three chances (100 ms each) to act
    // wrongly, and nothing it does could be waited for instead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice.subscribe("announce:other").await;
    let err = alice
        .error(json!({"op": "subscribe", "channel": "chat:x"}), "forbidden")
        .await;
    assert_eq!(err["channel"], "chat:x");
    bob.publish("chat:x", json!("still allowed")).await;
    alice
        .assert_quiet("the refused file ended no subscription")
        .await;

    // The watcher goes on after a refused file: the default comes back.
    std::fs::write(&policy_file, wsgate::policy::DEFAULT_POLICY).expect("restore policy");
    eventually(WAIT, "the restored policy to be loaded", async || {
        let reply = alice
            .call(json!({"op": "subscribe", "channel": "chat:x"}))
            .await;
        if reply["op"] == "ok" {
            return Some(());
        }
        assert_eq!(reply["code"], "forbidden", "{reply}");
        None
    })
    .await;
    bob.publish("chat:x", json!("back")).await;
    let mut got = alice.next().await;
    // The channel had no subscriber for a while: its seq may have restarted.
    assert!(got["seq"].is_u64(), "{got}");
    got["seq"] = json!(0);
    assert_eq!(got, message("chat:x", "bob", json!("back"), 0));
    alice.assert_quiet("one message").await;
}

// ---- 7. slow consumer -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_closed_4008_and_others_get_every_message() {
    const N: u64 = 20_000;
    /// Publications in flight ahead of the fast reader. Fan-out has no
    /// backpressure on publishers, so an unpaced burst larger than the
    /// outbox cuts off every subscriber, however fast it reads; kept below
    /// the outbox, only the reader that stopped reading can fall behind.
    const AHEAD: u64 = 6;
    let gw = start(|c, _| {
        c.websocket.outbox_frames = 8;
        // The cut-off reader's close frame waits for it to read again,
        // which it does once the flood is over.
        c.websocket.write_timeout_ms = 8_000;
        c.limits.publish_rate_per_s = 1_000_000;
        c.limits.publish_burst = 1_000_000;
    })
    .await;
    let started = Instant::now();
    let mut slow = Client::join(&gw, "slow", &["member"]).await;
    let mut fast = Client::join(&gw, "fast", &["member"]).await;
    let mut publisher = Client::join(&gw, "pub", &["member"]).await;
    slow.subscribe("chat:flood").await;
    fast.subscribe("chat:flood").await;

    // Small windows are written at once, not held back by Nagle.
    publisher.nodelay();
    let pad = "x".repeat(1000);
    let (progress, mut seen_by_fast) = tokio::sync::watch::channel(0u64);
    let flood = async {
        for i in 1..=N {
            if i > *seen_by_fast.borrow() + AHEAD {
                publisher.ws.flush().await.expect("flush");
                tokio::time::timeout(WAIT, seen_by_fast.wait_for(|&got| i <= got + AHEAD))
                    .await
                    .expect("the fast reader stalled")
                    .expect("fast reader gone");
            }
            let frame = format!(
                r#"{{"op":"publish","channel":"chat:flood","data":{{"i":{i},"pad":"{pad}"}}}}"#
            );
            publisher.ws.feed(Message::text(frame)).await.expect("feed");
        }
        publisher.ws.flush().await.expect("flush");
    };
    let read_all = async {
        for seq in 1..=N {
            let frame = fast.next().await;
            assert_eq!(frame["op"], "message", "{frame}");
            assert_eq!(frame["seq"], seq, "fast reader: gap or reordering");
            assert_eq!(frame["data"]["i"], seq);
            assert_eq!(frame["from"], "pub");
            progress.send_replace(seq);
        }
    };
    tokio::join!(flood, read_all);
    let flooded = started.elapsed();

    // The slow reader resumes: what it gets is an in-order prefix, then 4008.
    let (frames, code) = read_until_close(&mut slow.ws, N as usize).await;
    assert!(
        (frames.len() as u64) < N,
        "the slow reader was never cut off: the socket buffers absorbed all {N} messages"
    );
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!(frame["seq"], i as u64 + 1, "slow reader: gap or reordering");
    }
    assert_eq!(
        code,
        Some(4008),
        "slow reader got {} messages, then no 4008 close frame",
        frames.len()
    );
    fast.assert_quiet("exactly N messages").await;
    publisher.assert_quiet("no errors for the flood").await;
    eprintln!(
        "slow reader got {} of {N} messages; flood took {flooded:?}",
        frames.len()
    );
}

// ---- 8. expiry and refresh --------------------------------------------------------------

#[tokio::test]
async fn token_expiry_closes_4001_on_time() {
    let gw = start(|c, _| c.auth.leeway_s = 0).await;
    // Just after a second boundary: `exp` lies 1.9–2 s ahead.
    at_millis_into_second(50).await;
    let exp = harness::now() + 2;
    let started = Instant::now();
    let mut client = Client::join_with(&gw, &token_until(&gw, "short", &[], exp), "short").await;
    assert_eq!(client.welcome["expires_at"], exp);
    assert_eq!(expect_close(&mut client.ws).await, 4001);
    let took = started.elapsed();
    let closed_at = wall();
    assert!(
        took >= Duration::from_millis(1500),
        "closed early: {took:?}"
    );
    assert!(
        closed_at + Duration::from_millis(50) >= Duration::from_secs(exp),
        "closed before exp"
    );
    assert!(
        closed_at < Duration::from_secs(exp) + Duration::from_secs(1),
        "closed {:?} after exp",
        closed_at.saturating_sub(Duration::from_secs(exp))
    );
}

/// With `leeway_s = 0` the session must end at `exp`, not up to a second
/// later: the remaining lifetime must not be computed from a wall clock
/// truncated to whole seconds.
#[tokio::test]
async fn token_expiry_is_not_late_by_the_fraction_of_a_second() {
    let gw = start(|c, _| c.auth.leeway_s = 0).await;
    // 0.7 s into a second: `exp` lies 1.3 s ahead on the wall clock.
    at_millis_into_second(700).await;
    let exp = harness::now() + 2;
    let mut client = Client::join_with(&gw, &token_until(&gw, "short", &[], exp), "short").await;
    assert_eq!(expect_close(&mut client.ws).await, 4001);
    let closed_at = wall();
    let exp = Duration::from_secs(exp);
    assert!(
        closed_at + Duration::from_millis(50) >= exp,
        "closed {:?} before exp",
        exp - closed_at
    );
    assert!(
        closed_at <= exp + Duration::from_millis(350),
        "the connection outlived its token (leeway 0) by {:?}",
        closed_at - exp
    );
}

#[tokio::test]
async fn refresh_extends_the_connection_past_the_first_exp() {
    let gw = start(|c, _| c.auth.leeway_s = 0).await;
    let exp = harness::now() + 2;
    let mut alice =
        Client::join_with(&gw, &token_until(&gw, "alice", &["member"], exp), "alice").await;
    let longer = token_until(&gw, "alice", &["member"], exp + 600);
    alice.ok(json!({"op": "refresh", "token": longer})).await;
    // Time is the subject: sleep until half a second past the first exp.
    let past = Duration::from_secs(exp) + Duration::from_millis(500);
    tokio::time::sleep(past.saturating_sub(wall())).await;
    alice.subscribe("chat:x").await;
    alice.publish("chat:x", json!("alive")).await;
    assert_eq!(
        alice.next().await,
        message("chat:x", "alice", json!("alive"), 1)
    );
}

#[tokio::test]
async fn refresh_errors_and_narrowed_roles() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    alice.subscribe_inbox().await;
    alice.subscribe("chat:x").await;
    alice.subscribe("announce:news").await;

    let bobs = gw.token("bob", &["member", "admin"]);
    let err = alice
        .error(json!({"op": "refresh", "token": bobs}), "token_mismatch")
        .await;
    assert!(!err.to_string().contains(&bobs), "token echoed: {err}");
    alice
        .error(
            json!({"op": "refresh", "token": "garbage"}),
            "invalid_token",
        )
        .await;
    let expired = token_until(&gw, "alice", &["member"], harness::now() - 120);
    alice
        .error(json!({"op": "refresh", "token": expired}), "invalid_token")
        .await;
    let forged = hs256_jwt(
        HS256,
        &json!({"sub": "alice", "roles": ["admin"], "exp": harness::now() + 600}).to_string(),
        b"not the gateway's key, but long enough",
    );
    alice
        .error(json!({"op": "refresh", "token": forged}), "invalid_token")
        .await;
    // None of those changed the identity: alice is still a member only.
    alice.subscribe("chat:y").await;
    alice
        .error(
            json!({"op": "publish", "channel": "announce:x", "data": 1}),
            "forbidden",
        )
        .await;

    // Narrowing the roles ends the subscriptions they carried.
    let plain = gw.token("alice", &[]);
    alice.ok(json!({"op": "refresh", "token": plain})).await;
    let mut lost: Vec<String> = Vec::new();
    for frame in alice.early.drain(..) {
        assert_eq!(frame["op"], "error", "{frame}");
        assert_eq!(frame["code"], "forbidden", "{frame}");
        assert!(frame.get("id").is_none(), "{frame}");
        lost.push(frame["channel"].as_str().expect("channel").to_owned());
    }
    lost.sort();
    assert_eq!(lost, ["chat:x", "chat:y"]);
    bob.publish("chat:x", json!("for members")).await;
    bob.publish("chat:y", json!("for members")).await;
    alice
        .assert_quiet("chat:* was lost with the member role")
        .await;
    alice
        .error(json!({"op": "subscribe", "channel": "chat:x"}), "forbidden")
        .await;
    alice
        .error(
            json!({"op": "publish", "channel": "chat:x", "data": 1}),
            "forbidden",
        )
        .await;
}

// ---- 9. heartbeat ------------------------------------------------------------------

#[tokio::test]
async fn raw_client_that_never_answers_pings_is_dropped() {
    let gw = start(|c, _| {
        c.websocket.heartbeat_ms = 300;
        c.websocket.heartbeat_grace_ms = 300;
    })
    .await;
    let token = gw.token("mute", &[]);
    let mut tls = gw.upgrade_by_hand(&[&bearer(&token)]).await;
    let started = Instant::now();
    // Reading sends nothing: no pong, no frame.
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut bytes))
        .await
        .expect("the silent client was never dropped");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "dropped early: {took:?}"
    );
    assert!(took <= Duration::from_secs(3), "dropped late: {took:?}");
    // It was pinged (an empty ping frame: 0x89 0x00) before being dropped.
    assert!(
        bytes.windows(2).any(|w| w == [0x89, 0x00]),
        "no ping frame in {bytes:?}"
    );
}

// ---- 10. limits ----------------------------------------------------------------------

#[tokio::test]
async fn subscription_limit() {
    let gw = start(|c, _| c.limits.max_subscriptions = 2).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    alice.subscribe("chat:a").await;
    alice.subscribe("chat:b").await;
    let err = alice
        .error(
            json!({"op": "subscribe", "channel": "chat:c"}),
            "too_many_subscriptions",
        )
        .await;
    assert_eq!(err["channel"], "chat:c");
    // Re-subscribing is not a new subscription; freeing one makes room.
    alice.subscribe("chat:a").await;
    alice
        .ok(json!({"op": "unsubscribe", "channel": "chat:a"}))
        .await;
    alice.subscribe("chat:c").await;
    alice
        .error(
            json!({"op": "subscribe", "channel": "chat:a"}),
            "too_many_subscriptions",
        )
        .await;
}

/// A gateway whose request budget is 1 a second after a `burst`, closing
/// after `strikes` requests over it in a row.
async fn with_budget(burst: u32, strikes: u32) -> Gateway {
    start(|c, _| {
        c.limits.publish_rate_per_s = 1;
        c.limits.publish_burst = burst;
        c.limits.rate_limit_strikes = strikes;
    })
    .await
}

#[tokio::test]
async fn publish_rate_limit_then_4008_after_strikes_in_a_row() {
    let gw = with_budget(2, 3).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let publish = json!({"op": "publish", "channel": "chat:x", "data": 1});
    alice.ok(publish.clone()).await;
    alice.ok(publish.clone()).await;
    for _ in 0..2 {
        let err = alice.error(publish.clone(), "rate_limited").await;
        assert_eq!(err["channel"], "chat:x");
    }
    // An allowed publication ends the streak. Time is the subject here: a
    // sleep, for the rate bucket (1/s) to refill one token.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    alice.ok(publish.clone()).await;
    alice.error(publish.clone(), "rate_limited").await;
    alice.error(publish.clone(), "rate_limited").await;
    // Still open after two strikes (asked of the metrics: any request of
    // alice's would spend her budget).
    assert_eq!(gw.metric("wsgate_sessions_open").await, 1);
    // The third strike in a row closes the connection; a `ping` counts as
    // a request like any other.
    alice.send(&json!({"op": "ping", "id": 99})).await;
    assert_eq!(expect_close(&mut alice.ws).await, 4008);
}

/// Every op spends the connection's request budget, WebSocket pings too
/// (a pong answering our heartbeat does not): none is a free way to make
/// the gateway work.
#[tokio::test]
async fn every_op_and_client_ping_spends_the_request_budget() {
    let gw = with_budget(3, 100).await;
    let ops = [
        json!({"op": "subscribe", "channel": "chat:a"}),
        json!({"op": "unsubscribe", "channel": "chat:a"}),
        json!({"op": "history", "channel": "chat:a"}),
        json!({"op": "presence", "channel": "chat:a"}),
        json!({"op": "ping"}),
        json!({"op": "refresh", "token": "x"}),
    ];
    for op in ops {
        let mut alice = Client::join(&gw, "alice", &["member"]).await;
        for _ in 0..3 {
            let reply = alice.call(op.clone()).await;
            assert_ne!(
                reply["code"], "rate_limited",
                "{op} within the burst: {reply}"
            );
        }
        let reply = alice.call(op.clone()).await;
        assert_eq!(
            reply["code"], "rate_limited",
            "{op} past the burst: {reply}"
        );
    }
    // WebSocket pings: the fourth is over the budget, then strikes close.
    let gw = with_budget(3, 3).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    for _ in 0..6 {
        let _ = alice.ws.send(Message::Ping(Default::default())).await;
    }
    assert_eq!(expect_close(&mut alice.ws).await, 4008);
}

#[tokio::test]
async fn per_user_connection_cap_is_429() {
    let gw = start(|c, _| {
        c.limits.max_connections_per_user = 1;
        c.server.retry_after_s = 3;
    })
    .await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    // Any token for the same `sub` counts.
    let another = gw.token("alice", &[]);
    let res = gw.raw(&gw.upgrade_head("/ws", &[&bearer(&another)])).await;
    res.assert_refused(429);
    assert_eq!(res.header("retry-after"), Some("3"), "{res:?}");
    // Other users are not affected.
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    bob.assert_quiet("bob is fine").await;
    alice.assert_quiet("alice's first connection is fine").await;
    // Closing frees the slot.
    alice.ws.close(None).await.expect("close");
    eventually_ok(WAIT, "alice's slot to come back", async || {
        match gw.connect(&another).await {
            Ok((_, r)) if r.status() == 101 => Ok(()),
            other => Err(other.map(|(_, r)| r.status())),
        }
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_text_frame_closes_1007() {
    let gw = start(|_, _| {}).await;
    let token = gw.token("alice", &[]);
    let mut tls = gw.upgrade_by_hand(&[&bearer(&token)]).await;
    let payload = b"{\"op\":\"ping\",\"id\":1,\"x\":\"\xff\xfe\xc3\x28\"}";
    tls.write_all(&harness::masked_frame(0x1, payload))
        .await
        .expect("write");
    let mut ws = WebSocketStream::from_raw_socket(tls, Role::Client, None).await;
    assert_eq!(read_json(&mut ws).await["op"], "welcome");
    assert_eq!(expect_close(&mut ws).await, 1007);
}

#[tokio::test]
async fn repeated_non_object_frames_close_1008() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &[]).await;
    let non_objects = ["[1]", "42", "\"text\"", "null", "{oops", "[]", "true"];
    for frame in non_objects {
        alice.send_text(frame).await;
        let err = alice.next().await;
        assert_eq!(err["op"], "error", "{frame} → {err}");
        assert_eq!(err["code"], "bad_request", "{frame} → {err}");
    }
    // A good frame resets the count: seven more are still answered.
    alice.assert_quiet("open after seven").await;
    for _ in 0..7 {
        alice.send_text("[1]").await;
        assert_eq!(alice.next().await["code"], "bad_request");
    }
    // The eighth in a row closes with 1008.
    alice.send_text("[1]").await;
    assert_eq!(expect_close(&mut alice.ws).await, 1008);
}

/// A frame that is not an object has no `id` field, so its error is not a
/// reply to any request and must carry no `id`: a client with request 1
/// pending would otherwise take it as that request's failure.
#[tokio::test]
async fn non_object_frames_get_errors_without_an_id() {
    let gw = start(|_, _| {}).await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    for frame in ["[1]", "[7,\"subscribe\"]", "42", "[]"] {
        alice.send_text(frame).await;
        let err = alice.next().await;
        assert_eq!(err["code"], "bad_request", "{frame} → {err}");
        assert!(
            err.get("id").is_none(),
            "the error for {frame} carries an id: {err}"
        );
    }
}
