//! Several replicas on a Redis backplane: a `redis-server` started by the
//! test on a free port (never the shared one), two gateways in this
//! process sharing it. Publications from either replica reach subscribers
//! on both, in order, with one consecutive `seq`; policies hold on both;
//! and a Redis outage is visible (readiness, `internal` errors, a gap
//! notice) and recovered from without restarting the gateways.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value as Json, json};

use crate::harness::{
    Client, Gateway, WAIT, eventually_ok, free_port, require_tool, start, try_read_json,
};

/// A private `redis-server` on 127.0.0.1, without persistence.
pub(crate) struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Extra `redis-server` arguments (`--maxmemory`, …).
    args: Vec<String>,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts with extra `redis-server` arguments.
    pub async fn start_with(args: &[&str]) -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.restart().await;
        server
    }

    /// Runs one command with `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One `INFO` field of the server, as a number.
    pub fn info(&self, field: &str) -> u64 {
        self.cli(&["INFO"])
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no INFO field {field}"))
    }

    /// Starts (again) on the same port; returns once it accepts connections.
    pub async fn restart(&mut self) {
        let child = Command::new(require_tool("redis-server"))
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let port = self.port;
        eventually_ok(WAIT, "redis-server to accept connections", async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two replicas on `redis`, sharing one HMAC secret so a token works on both.
pub(crate) async fn replicas(redis: &RedisServer) -> (Gateway, Gateway) {
    let url = redis.url();
    let a = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.cluster.reconnect_max_ms = 200;
        // The bench test publishes as fast as deliveries complete.
        c.limits.publish_rate_per_s = 1_000_000;
        c.limits.publish_burst = 1_000_000;
    })
    .await;
    let secret = a.config.auth.hmac_secret_file.clone();
    let b = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.cluster.reconnect_max_ms = 200;
        c.auth.hmac_secret_file = secret;
    })
    .await;
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    (a, b)
}

pub(crate) async fn wait_ready(gw: &crate::harness::Endpoint, status: u16) {
    eventually_ok(
        WAIT,
        &format!("/readyz to answer {status}"),
        async || match gw.get("/readyz").await.status {
            now if now == status => Ok(()),
            now => Err(now),
        },
    )
    .await;
}

/// The next `n` messages (skipping nothing else: any other frame fails).
async fn messages(client: &mut Client, n: usize) -> Vec<Json> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let frame = client.next().await;
        assert_eq!(frame["op"], "message", "{frame}");
        out.push(frame);
    }
    out
}

#[tokio::test]
async fn publications_from_both_replicas_reach_both_in_order_with_one_seq() {
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let mut sub_b = Client::join(&b, "bob", &["member"]).await;
    let mut sub_a = Client::join(&a, "amy", &["member"]).await;
    sub_b.subscribe("chat:x").await;
    sub_a.subscribe("chat:x").await;
    let mut pub_a = Client::join(&a, "alice", &["member"]).await;
    let mut pub_b = Client::join(&b, "brian", &["member"]).await;
    for i in 0..20 {
        pub_a.publish("chat:x", json!({"n": i, "via": "a"})).await;
        pub_b.publish("chat:x", json!({"n": i, "via": "b"})).await;
    }
    for sub in [&mut sub_b, &mut sub_a] {
        let got = messages(sub, 40).await;
        let first = got[0]["seq"].as_u64().expect("seq");
        for (k, m) in got.iter().enumerate() {
            assert_eq!(m["seq"].as_u64(), Some(first + k as u64), "{m}");
            let (via, from) = if k % 2 == 0 {
                ("a", "alice")
            } else {
                ("b", "brian")
            };
            assert_eq!(m["data"], json!({"n": k / 2, "via": via}), "{m}");
            assert_eq!(m["from"], from);
            assert_eq!(m["channel"], "chat:x");
        }
    }
    // Policies hold on both replicas.
    let mut guest_a = Client::join(&a, "guest", &[]).await;
    guest_a
        .error(
            json!({"op": "publish", "channel": "chat:x", "data": 1}),
            "forbidden",
        )
        .await;
    let mut guest_b = Client::join(&b, "guest", &[]).await;
    guest_b
        .error(json!({"op": "subscribe", "channel": "chat:x"}), "forbidden")
        .await;
    // Nothing leaked to the guests or crossed to channels nobody asked for.
    assert_eq!(
        try_read_json(&mut sub_b.ws, Duration::from_millis(200)).await,
        None
    );
}

#[tokio::test]
async fn redis_outage_is_reported_and_recovered_without_a_restart() {
    let mut redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let mut sub = Client::join(&b, "bob", &["member"]).await;
    sub.subscribe("chat:y").await;
    let mut publisher = Client::join(&a, "alice", &["member"]).await;
    publisher.publish("chat:y", json!("before")).await;
    assert_eq!(messages(&mut sub, 1).await[0]["data"], "before");

    redis.stop();
    wait_ready(&a, 503).await;
    wait_ready(&b, 503).await;
    // Nothing is reported as sent that was not.
    let err = publisher
        .error(
            json!({"op": "publish", "channel": "chat:y", "data": "lost"}),
            "internal",
        )
        .await;
    assert_eq!(err["channel"], "chat:y");
    // A new subscription cannot be made either.
    let mut late = Client::join(&b, "carl", &["member"]).await;
    late.error(json!({"op": "subscribe", "channel": "chat:z"}), "internal")
        .await;

    // A sleep: the outage outlasts a reconnect attempt (reconnect_max_ms
    // is 200), so recovery is the replicas' own retrying, whose timing is
    // theirs; there is no event to wait for.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await;
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    // The subscriber is told its channel may have missed messages, and
    // keeps its subscription.
    let notice = sub.next().await;
    assert_eq!(notice["op"], "error", "{notice}");
    assert_eq!(notice["code"], "internal");
    assert_eq!(notice["channel"], "chat:y");
    assert!(notice.get("id").is_none());
    publisher.publish("chat:y", json!("after")).await;
    let after = messages(&mut sub, 1).await;
    assert_eq!(after[0]["data"], "after");
    late.subscribe("chat:z").await;
}

#[tokio::test]
async fn bench_fanout_measures_delivery_across_replicas() {
    use wsgate::tools::bench::{self, Auth, Pace, Target};
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let secret = a.secret();
    let ca = |gw: &Gateway| wsgate::tools::certs::CertPaths::in_dir(gw.dir.path()).ca_cert;
    let subscribers = Target::new(
        &b.ws_url(),
        &ca(&b),
        Auth::Secret(secret.clone()),
        true,
        false,
        1,
    )
    .await
    .unwrap();
    let publisher = Target::new(&a.ws_url(), &ca(&a), Auth::Secret(secret), true, false, 1)
        .await
        .unwrap();
    let fan = bench::fanout(
        &subscribers,
        Some(&publisher),
        5,
        100,
        Pace::Window(4),
        Duration::from_millis(800),
        Duration::from_millis(200),
        "chat:bench",
        None,
    )
    .await
    .unwrap();
    assert_eq!((fan.subscribers, fan.errors), (5, 0), "{fan:?}");
    assert!(fan.delivered > 0 && fan.published > 0, "{fan:?}");
}

/// How many Redis subscribers `topic` has (all replicas together).
fn redis_subscribers(redis: &RedisServer, topic: &str) -> u64 {
    let out = Command::new(require_tool("redis-cli"))
        .args([
            "-p",
            &redis.port.to_string(),
            "--raw",
            "PUBSUB",
            "NUMSUB",
            topic,
        ])
        .output()
        .expect("run redis-cli");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_replica_subscribes_in_redis_only_while_it_has_local_subscribers() {
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let topic = "wsgate:msg:chat:refs";
    assert_eq!(redis_subscribers(&redis, topic), 0);
    let mut one = Client::join(&b, "bob", &["member"]).await;
    let mut two = Client::join(&b, "bea", &["member"]).await;
    one.subscribe("chat:refs").await;
    two.subscribe("chat:refs").await;
    // Two local subscribers, one Redis subscription; none on replica A.
    assert_eq!(redis_subscribers(&redis, topic), 1);
    let mut third = Client::join(&a, "amy", &["member"]).await;
    third.subscribe("chat:refs").await;
    assert_eq!(redis_subscribers(&redis, topic), 2);
    one.ok(json!({"op": "unsubscribe", "channel": "chat:refs"}))
        .await;
    assert_eq!(
        redis_subscribers(&redis, topic),
        2,
        "bea still listens on B"
    );
    drop(two); // the last subscriber on B disconnects
    eventually_ok(
        WAIT,
        "B to unsubscribe in Redis",
        async || match redis_subscribers(&redis, topic) {
            1 => Ok(()),
            n => Err(n),
        },
    )
    .await;
}
