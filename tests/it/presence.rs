//! Presence (protocol.md §6) over real sockets: per-user `join` and
//! `leave` with the grace, the `presence` op and its limit, the errors,
//! `GET /api/presence`, two replicas on a real `redis-server` (one killed
//! with SIGKILL), and a reconnect storm of 2,000 clients whose presence
//! frames stay within the documented bound.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value as Json, json};

use crate::api::{api_token, call};
use crate::cluster::{RedisServer, wait_ready};
use crate::harness::{
    Client, Endpoint, Gateway, WAIT, eventually_ok, metric, same_keys, start, try_read_json,
};

/// Subscribes with `"presence":true`; returns the `ok`.
async fn watch(client: &mut Client, channel: &str) -> Json {
    let reply = client
        .call(json!({"op": "subscribe", "channel": channel, "presence": true}))
        .await;
    assert_eq!(reply["op"], "ok", "{reply}");
    reply
}

/// The `presence` op's answer.
async fn presence(client: &mut Client, channel: &str) -> Json {
    let reply = client
        .call(json!({"op": "presence", "channel": channel}))
        .await;
    assert_eq!(reply["op"], "ok", "{reply}");
    reply
}

/// The next frame, which must be `op` (join or leave) for `user`.
async fn expect_event(client: &mut Client, op: &str, channel: &str, user: &str) {
    let frame = client.next().await;
    assert_eq!(
        frame,
        json!({"op": op, "channel": channel, "user": user}),
        "expected {op} of {user}"
    );
}

/// Every frame that arrives within `window` (pings skipped).
async fn frames_within(client: &mut Client, window: Duration) -> Vec<Json> {
    let mut out: Vec<Json> = client.early.drain(..).collect();
    let deadline = Instant::now() + window;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match try_read_json(&mut client.ws, left).await {
            Some(frame) => out.push(frame),
            None => break,
        }
    }
    out
}

#[tokio::test]
async fn a_user_joins_once_whatever_their_tabs_and_leaves_after_the_grace() {
    let grace = Duration::from_millis(1_000);
    let gw = start(|c, _| c.presence.grace_ms = grace.as_millis() as u64).await;
    let lobby = "chat:lobby";
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    watch(&mut alice, lobby).await;
    // Her own join follows her ok, as every watcher sees it.
    expect_event(&mut alice, "join", lobby, "alice").await;

    let mut bob1 = Client::join(&gw, "bob", &["member"]).await;
    bob1.subscribe(lobby).await;
    expect_event(&mut alice, "join", lobby, "bob").await;
    let mut bob2 = Client::join(&gw, "bob", &["member"]).await;
    bob2.subscribe(lobby).await;
    alice.assert_quiet("a second tab is no new join").await;
    assert_eq!(
        presence(&mut alice, lobby).await,
        json!({"op": "ok", "id": alice.next_id, "count": 2, "users": ["alice", "bob"]})
    );

    drop(bob1);
    let quiet = frames_within(&mut alice, grace + Duration::from_millis(500)).await;
    assert!(quiet.is_empty(), "one tab closed is no leave: {quiet:?}");

    let closed = Instant::now();
    drop(bob2);
    expect_event(&mut alice, "leave", lobby, "bob").await;
    let after = closed.elapsed();
    assert!(
        after >= grace.mul_f64(0.9) && after < grace + Duration::from_secs(2),
        "leave {after:?} after the last tab closed (grace {grace:?})"
    );
    println!("presence: leave {after:?} after the last tab closed, grace {grace:?}");

    // A quick reconnect (within the grace) is neither leave nor join.
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    bob.subscribe(lobby).await;
    expect_event(&mut alice, "join", lobby, "bob").await;
    drop(bob);
    tokio::time::sleep(grace / 4).await;
    let mut back = Client::join(&gw, "bob", &["member"]).await;
    back.subscribe(lobby).await;
    let seen = frames_within(&mut alice, grace * 2).await;
    assert!(seen.is_empty(), "a reconnect within the grace: {seen:?}");

    // Unsubscribing is a last subscription ending too.
    back.ok(json!({"op": "unsubscribe", "channel": lobby}))
        .await;
    expect_event(&mut alice, "leave", lobby, "bob").await;

    let text = gw.metrics().await;
    assert_eq!(metric(&text, "wsgate_presence_members"), 1, "alice");
    assert_eq!(
        metric(&text, "wsgate_presence_events_total{kind=\"join\"}"),
        3
    );
    assert_eq!(
        metric(&text, "wsgate_presence_events_total{kind=\"leave\"}"),
        2
    );
}

#[tokio::test]
async fn presence_lists_then_counts_and_refuses_precisely() {
    let gw = start(|c, _| {
        c.presence.max_listed = 2;
        c.presence.grace_ms = 0;
        c.api.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let lobby = "chat:lobby";
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    alice.subscribe(lobby).await;
    bob.subscribe(lobby).await;
    let id = alice.next_id + 1;
    assert_eq!(
        presence(&mut alice, lobby).await,
        json!({"op": "ok", "id": id, "count": 2, "users": ["alice", "bob"]})
    );
    // Asking works unsubscribed too, with the subscribe permission.
    let mut dan = Client::join(&gw, "dan", &["member"]).await;
    assert_eq!(presence(&mut dan, "chat:empty").await["count"], 0);

    let mut carol = Client::join(&gw, "carol", &["member"]).await;
    carol.subscribe(lobby).await;
    let id = alice.next_id + 1;
    assert_eq!(
        presence(&mut alice, lobby).await,
        json!({"op": "ok", "id": id, "count": 3}),
        "above the limit: the count only"
    );

    let mut eve = Client::join(&gw, "eve", &[]).await;
    let refused = eve
        .error(json!({"op": "presence", "channel": lobby}), "forbidden")
        .await;
    assert_eq!(refused["channel"], lobby);
    eve.error(
        json!({"op": "subscribe", "channel": lobby, "presence": true}),
        "forbidden",
    )
    .await;
    // Her own inbox: allowed, but it keeps no presence.
    eve.error(
        json!({"op": "presence", "channel": "user:eve"}),
        "no_presence",
    )
    .await;
    eve.error(
        json!({"op": "subscribe", "channel": "user:eve", "presence": true}),
        "no_presence",
    )
    .await;
    eve.error(
        json!({"op": "subscribe", "channel": "user:eve", "presence": "yes"}),
        "bad_request",
    )
    .await;
    eve.error(json!({"op": "presence"}), "bad_request").await;

    // The HTTP API answers the op's fields, with the same permission.
    let api = gw.api.expect("api listener");
    let token = api_token(&gw, "backend", &["member"]);
    let get = async |path: &str, token: &str| call(&gw, api, "GET", path, Some(token), None).await;
    let answer = get("/api/presence?channel=chat%3Alobby", &token).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, json!({"count": 3}));
    drop(carol);
    eventually_ok(WAIT, "carol to leave", async || {
        let body = get("/api/presence?channel=chat:lobby", &token).await.body;
        if body == json!({"count": 2, "users": ["alice", "bob"]}) {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    let nobody = api_token(&gw, "backend", &[]);
    let answer = get("/api/presence?channel=chat:lobby", &nobody).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], "forbidden");
    let answer = get("/api/presence?channel=user:backend", &token).await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], "not_found");
    let answer = get("/api/presence", &token).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
}

#[tokio::test]
async fn presence_requests_spend_the_connection_request_budget() {
    let gw = start(|c, _| {
        c.limits.publish_rate_per_s = 1;
        c.limits.publish_burst = 2;
    })
    .await;
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    presence(&mut alice, "chat:lobby").await;
    presence(&mut alice, "chat:lobby").await;
    let refused = alice
        .error(
            json!({"op": "presence", "channel": "chat:lobby"}),
            "rate_limited",
        )
        .await;
    assert_eq!(refused["channel"], "chat:lobby");
}

#[tokio::test]
async fn every_way_a_subscription_ends_starts_the_grace() {
    let gw = start(|c, _| {
        c.presence.grace_ms = 200;
        c.api.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let lobby = "chat:lobby";
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    watch(&mut alice, lobby).await;
    expect_event(&mut alice, "join", lobby, "alice").await;
    let api = gw.api.expect("api listener");
    let admin = api_token(&gw, "ops", &["admin"]);
    let manage = async |path: &str, body: Json| {
        let answer = call(
            &gw,
            api,
            "POST",
            path,
            Some(&admin),
            Some(body.to_string().into_bytes()),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    };

    // The server withdraws the subscription (as a lost permission is told).
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    bob.subscribe(lobby).await;
    expect_event(&mut alice, "join", lobby, "bob").await;
    manage("/api/unsubscribe", json!({"user": "bob", "channel": lobby})).await;
    expect_event(&mut alice, "leave", lobby, "bob").await;

    // Disconnected by an operator (4003).
    bob.subscribe(lobby).await;
    expect_event(&mut alice, "join", lobby, "bob").await;
    manage("/api/disconnect", json!({"user": "bob"})).await;
    expect_event(&mut alice, "leave", lobby, "bob").await;

    // A watcher that ends watches no more; others go on.
    let mut carol = Client::join(&gw, "carol", &["member"]).await;
    watch(&mut carol, lobby).await;
    expect_event(&mut alice, "join", lobby, "carol").await;
    expect_event(&mut carol, "join", lobby, "carol").await;
    carol
        .ok(json!({"op": "unsubscribe", "channel": lobby}))
        .await;
    expect_event(&mut alice, "leave", lobby, "carol").await;
    carol.assert_quiet("no longer watching").await;
    assert_eq!(metric(&gw.metrics().await, "wsgate_presence_members"), 1);
}

/// A replica on `redis` with a short presence time-to-live.
fn replica(c: &mut wsgate::Config, redis: &RedisServer) {
    c.cluster.redis_url = Some(redis.url());
    c.cluster.reconnect_max_ms = 200;
    c.presence.ttl_s = 4;
    c.presence.grace_ms = 300;
}

#[tokio::test]
async fn replicas_share_members_and_a_killed_one_leaves_once_within_the_ttl() {
    let redis = RedisServer::start().await;
    let a = start(|c, _| replica(c, &redis)).await;
    let keys = a.config.clone();
    let mut b = crate::process::Proc::spawn(|c, _| {
        replica(c, &redis);
        same_keys(c, &keys);
    })
    .await;
    b.endpoint.client = Arc::clone(&a.client);
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    let ttl = Duration::from_secs(a.config.presence.ttl_s);

    let lobby = "chat:lobby";
    let mut alice = Client::join(&a, "alice", &["member"]).await;
    watch(&mut alice, lobby).await;
    expect_event(&mut alice, "join", lobby, "alice").await;
    let mut bob = Client::join(&b, "bob", &["member"]).await;
    bob.subscribe(lobby).await;
    let mut carol = Client::join(&b, "carol", &["member"]).await;
    carol.subscribe(lobby).await;
    let mut carol_on_a = Client::join(&a, "carol", &["member"]).await;
    carol_on_a.subscribe(lobby).await;
    let mut dave = Client::join(&a, "dave", &["member"]).await;
    dave.subscribe(lobby).await;
    let mut joined = BTreeSet::new();
    while joined.len() < 3 {
        let frame = alice.next().await;
        assert_eq!(frame["op"], "join", "{frame}");
        assert!(
            joined.insert(frame["user"].as_str().unwrap().to_owned()),
            "once: {frame}"
        );
    }
    assert_eq!(
        joined,
        BTreeSet::from(["bob".into(), "carol".into(), "dave".into()])
    );
    let everyone = json!(["alice", "bob", "carol", "dave"]);
    assert_eq!(
        presence(&mut alice, lobby).await["users"],
        everyone,
        "from A"
    );
    assert_eq!(presence(&mut bob, lobby).await["users"], everyone, "from B");
    assert_eq!(presence(&mut bob, lobby).await["count"], 4);

    // A crash: B's members expire and A sends each leave once. Carol is
    // still subscribed through A: no leave for her.
    b.signal("KILL");
    let killed = Instant::now();
    expect_event(&mut alice, "leave", lobby, "bob").await;
    let after = killed.elapsed();
    println!("presence: a member of a killed replica left {after:?} after SIGKILL (ttl {ttl:?})");
    assert!(after < ttl, "{after:?} (ttl {ttl:?})");
    let rest = frames_within(&mut alice, ttl).await;
    assert!(rest.is_empty(), "one leave, for bob only: {rest:?}");
    assert_eq!(
        presence(&mut alice, lobby).await["users"],
        json!(["alice", "carol", "dave"])
    );
    let text = a.metrics().await;
    assert!(
        metric(&text, "wsgate_presence_expired_total") >= 2,
        "bob, carol on B"
    );
    assert!(metric(&text, "wsgate_presence_sweeps_total") >= 1);
}

#[tokio::test]
async fn a_replica_that_drains_hands_its_members_over_without_a_leave() {
    let redis = RedisServer::start().await;
    let grace = Duration::from_millis(1_500);
    let tweak = |c: &mut wsgate::Config| {
        replica(c, &redis);
        c.presence.grace_ms = grace.as_millis() as u64;
    };
    // A stops (and its directory goes) first: B holds the keys.
    let b = start(|c, _| tweak(c)).await;
    let keys = b.config.clone();
    let mut a = start(|c, _| {
        tweak(c);
        same_keys(c, &keys);
    })
    .await;
    a.client = Arc::clone(&b.client);
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    let lobby = "chat:lobby";
    let mut alice = Client::join(&b, "alice", &["member"]).await;
    watch(&mut alice, lobby).await;
    expect_event(&mut alice, "join", lobby, "alice").await;
    let mut bob = Client::join(&a, "bob", &["member"]).await;
    bob.subscribe(lobby).await;
    let mut carol = Client::join(&a, "carol", &["member"]).await;
    carol.subscribe(lobby).await;
    let mut joined = BTreeSet::new();
    for _ in 0..2 {
        let frame = alice.next().await;
        assert_eq!(frame["op"], "join", "{frame}");
        joined.insert(frame["user"].as_str().unwrap().to_owned());
    }
    assert_eq!(joined, BTreeSet::from(["bob".into(), "carol".into()]));

    // A rolling restart: A drains and exits; bob reconnects to B within
    // the grace, carol does not come back.
    let stopped = Instant::now();
    a.stop().await;
    drop((bob, carol));
    let mut bob = Client::join(&b, "bob", &["member"]).await;
    bob.subscribe(lobby).await;
    expect_event(&mut alice, "leave", lobby, "carol").await;
    let after = stopped.elapsed();
    println!(
        "presence: a member of a drained replica left {after:?} after it stopped (grace {grace:?})"
    );
    assert!(after >= grace.mul_f64(0.9), "{after:?} < grace {grace:?}");
    let rest = frames_within(&mut alice, grace).await;
    assert!(rest.is_empty(), "bob moved within the grace: {rest:?}");
    assert_eq!(
        presence(&mut alice, lobby).await["users"],
        json!(["alice", "bob"])
    );
}

/// Connects `users` to `gw`, each subscribing to `channel` with presence,
/// a hundred handshakes at a time.
async fn crowd(gw: &Endpoint, users: &[String], channel: &str) -> Vec<Client> {
    futures_util::stream::iter(users)
        .map(|user| async move {
            let mut client = Client::join(gw, user, &["member"]).await;
            watch(&mut client, channel).await;
            client
        })
        .buffer_unordered(100)
        .collect()
        .await
}

/// Join and leave frames the gateway has sent.
async fn events_sent(gw: &Gateway) -> u64 {
    let text = gw.metrics().await;
    metric(&text, "wsgate_presence_events_total{kind=\"join\"}")
        + metric(&text, "wsgate_presence_events_total{kind=\"leave\"}")
}

/// 2,000 users in one channel drop at once and reconnect at once; the
/// presence frames sent meanwhile must stay within 2·N·L (each change is
/// sent only while the channel has at most L = `max_listed` members),
/// where unbounded fan-out would be 2·N². With the grace, none at all.
#[tokio::test]
async fn a_reconnect_storm_of_2000_stays_within_the_bound() {
    const N: usize = 2_000;
    let users: Vec<String> = (0..N).map(|i| format!("u{i:04}")).collect();
    let channel = "chat:storm";
    for grace_ms in [5_000, 0] {
        let gw = start(|c, _| c.presence.grace_ms = grace_ms).await;
        let limit = gw.config.presence.max_listed as u64;
        let clients = crowd(&gw, &users, channel).await;
        let mut probe = Client::join(&gw, "probe", &["member"]).await;
        assert_eq!(presence(&mut probe, channel).await["count"], N);
        let before = events_sent(&gw).await;
        let started = Instant::now();
        drop(clients);
        let clients = crowd(&gw, &users, channel).await;
        let took = started.elapsed();
        // Every grace that could end has ended; every close is counted.
        tokio::time::sleep(Duration::from_millis(grace_ms) + Duration::from_secs(1)).await;
        eventually_ok(WAIT, "every member back", async || {
            match presence(&mut probe, channel).await["count"].as_u64() {
                Some(n) if n == N as u64 => Ok(()),
                other => Err(other),
            }
        })
        .await;
        let frames = events_sent(&gw).await - before;
        let bound = 2 * N as u64 * limit;
        println!(
            "presence storm: {N} clients reconnected in {took:?}, grace {grace_ms} ms: \
             {frames} join/leave frames sent (bound 2·N·L = {bound}; unbounded 2·N² = {})",
            2 * N * N
        );
        assert!(frames <= bound, "{frames} frames > {bound}");
        if grace_ms > 0 && took < Duration::from_millis(grace_ms) {
            assert_eq!(frames, 0, "every reconnect within the grace");
        }
        drop(clients);
    }
}
