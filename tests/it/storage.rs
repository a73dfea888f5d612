//! Storage that clients can grow stays bounded: publishing to thousands
//! of fresh history channels fills neither the gateway (its history store
//! is capped by `history.max_bytes`, evicting whole channels) nor Redis
//! (every key wsgate writes expires, so a Redis with `maxmemory` and an
//! evicting policy stays under it and keeps accepting publications); and
//! one user's publications are budgeted over all their connections.
//! Measured on the built binary (its RSS) and a private `redis-server`.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{RedisServer, wait_ready};
use crate::harness::{Client, Endpoint, metric, start};
use crate::process::Proc;

/// Fresh history channels each flood publishes to.
const CHANNELS: usize = 20_000;

/// Publishes one 200-byte message to each of `CHANNELS` fresh `chat:`
/// channels, fire-and-forget over 4 connections, then waits for a
/// publication with an `id` on each (which follows the others in order).
async fn flood(gw: &Endpoint) {
    let data = json!("x".repeat(200));
    let mut clients = Vec::new();
    for k in 0..4 {
        clients.push(Client::join(gw, &format!("flooder{k}"), &["member"]).await);
    }
    for i in 0..CHANNELS {
        let client = &mut clients[i % 4];
        let frame = json!({"op": "publish", "channel": format!("chat:fresh{i}"), "data": data});
        client
            .ws
            .feed(Message::text(frame.to_string()))
            .await
            .expect("send");
    }
    for client in &mut clients {
        client.ws.flush().await.expect("flush");
        client.publish("chat:last", json!("end")).await;
    }
}

/// Lifts the connection budget the flood would otherwise meet (the test
/// configuration lifts the per-user one): this test is about storage,
/// the budgets are tested below and in channels.rs.
fn unlimited(c: &mut wsgate::Config) {
    c.limits.publish_rate_per_s = 1_000_000;
    c.limits.publish_burst = 1_000_000;
}

#[tokio::test]
async fn a_flood_of_fresh_channels_is_bounded_by_the_history_cap() {
    let gw = Proc::spawn(|c, _| {
        unlimited(c);
        c.history.max_bytes = 2 * 1024 * 1024;
    })
    .await;
    let before = gw.rss_kib();
    flood(&gw).await;
    let after = gw.rss_kib();
    let text = {
        let mut probe = Client::join(&gw, "probe", &["member"]).await;
        probe.subscribe("chat:probe").await;
        gw.metrics_from(crate::harness::LOCAL).await
    };
    let stored = metric(&text, "wsgate_history_bytes");
    let channels = metric(&text, "wsgate_history_channels");
    let evictions = metric(&text, "wsgate_history_evictions_total");
    println!(
        "storage: {CHANNELS} fresh channels: history {stored} B in {channels} channels \
         (cap 2 MiB), {evictions} evicted; RSS {before} -> {after} KiB"
    );
    assert!(stored <= 2 * 1024 * 1024, "{stored}");
    assert!(evictions > 0);
    assert!(
        after.saturating_sub(before) < 48 * 1024,
        "RSS grew {} KiB",
        after.saturating_sub(before)
    );
}

#[tokio::test]
async fn a_flood_of_fresh_channels_keeps_redis_under_its_maxmemory() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru"])
            .await;
    let url = redis.url();
    let gw = Proc::spawn(|c, _| {
        unlimited(c);
        c.cluster.redis_url = Some(url.clone());
    })
    .await;
    wait_ready(&gw, 200).await;
    let rss_before = gw.rss_kib();
    flood(&gw).await;
    let used = redis.info("used_memory");
    let evicted = redis.info("evicted_keys");
    let rss_after = gw.rss_kib();
    println!(
        "storage: {CHANNELS} fresh channels through Redis: used_memory {used} B \
         (maxmemory 8 MiB), {evicted} keys evicted; gateway RSS {rss_before} -> {rss_after} KiB"
    );
    // Redis enforces maxmemory before each write; a little over is its
    // own bookkeeping.
    assert!(used <= 9 * 1024 * 1024, "{used}");
    assert!(evicted > 0, "the flood did not reach maxmemory");
    assert!(rss_after.saturating_sub(rss_before) < 48 * 1024);
    // And publications still work: the flood's last ones had their `ok`.
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    alice.publish("chat:after", json!(1)).await;
}

#[tokio::test]
async fn one_users_publications_are_budgeted_over_all_their_connections() {
    let gw = start(|c, _| {
        c.limits.publish_rate_per_s = 1_000;
        c.limits.publish_burst = 1_000;
        c.limits.user_publish_rate_per_s = 1;
        c.limits.user_publish_burst = 3;
    })
    .await;
    let mut a = Client::join(&gw, "alice", &["member"]).await;
    let mut b = Client::join(&gw, "alice", &["member"]).await;
    a.publish("chat:x", json!(1)).await;
    b.publish("chat:x", json!(2)).await;
    a.publish("chat:x", json!(3)).await;
    let refused = b
        .error(
            json!({"op": "publish", "channel": "chat:x", "data": 4}),
            "rate_limited",
        )
        .await;
    assert_eq!(refused["message"], "user publish rate exceeded");
    // Another user is not affected.
    let mut carol = Client::join(&gw, "carol", &["member"]).await;
    carol.publish("chat:x", json!(5)).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    b.publish("chat:x", json!(6)).await;
}
