//! Faults the gateway must survive, each on the built binary or a private
//! `redis-server`: file descriptors running out (no busy loop, recovery
//! once they free up), Redis stalled (`DEBUG SLEEP`) and killed in the
//! middle of publishing (no half-published message, clear errors,
//! recovery), Redis cutting the subscription connection between a
//! publication's answer and its echo (the local subscribers still get
//! it), a reconnect storm of 10,000 clients against admission limits
//! while 100 established clients keep their heartbeats (publish latency
//! printed before and during), and 1,000 subscribers that stop reading
//! while others keep receiving everything.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{RedisServer, wait_ready};
use crate::harness::{Client, WAIT, eventually_ok, start};
use crate::process::Proc;

/// CPU ticks per second of `/proc/*/stat`.
const TICKS: u64 = 100;

#[tokio::test]
async fn running_out_of_file_descriptors_is_no_busy_loop_and_recovers() {
    let gw = Proc::spawn_under(&["prlimit", "--nofile=64:64", "--"], |c, _| {
        c.server.handshake_timeout_ms = 30_000;
    })
    .await;
    // Far more connections than the gateway may hold files: it accepts
    // until EMFILE, then backs off.
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(tcp) = tokio::net::TcpStream::connect(gw.addr).await {
            held.push(tcp);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gw.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = gw.cpu_ticks() - before;
    println!(
        "fd exhaustion: {} connections held, {spent} CPU ticks in 2 s",
        held.len()
    );
    assert!(spent < TICKS / 2, "{spent} ticks in 2 s: a busy loop");
    // Once they close, a client gets in within a second (plus its own
    // handshake).
    drop(held);
    let freed = Instant::now();
    let token = gw.token("alice", &["member"]);
    let (ws, _) = eventually_ok(
        WAIT,
        "a connection after the descriptors freed",
        async || gw.connect(&token).await,
    )
    .await;
    let took = freed.elapsed();
    println!("fd exhaustion: recovered {took:?} after the connections closed");
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    drop(ws);
}

/// Answers of `n` publications sent at once by `client` (ids from 1):
/// `ok`s and error codes by id.
async fn publish_burst(client: &mut Client, channel: &str, n: u64) -> BTreeMap<u64, Json> {
    for i in 1..=n {
        let frame = json!({"op": "publish", "id": i, "channel": channel, "data": {"n": i}});
        client
            .ws
            .feed(Message::text(frame.to_string()))
            .await
            .unwrap();
    }
    client.ws.flush().await.unwrap();
    let mut answers = BTreeMap::new();
    while (answers.len() as u64) < n {
        let frame = client.next().await;
        if let Some(id) = frame["id"].as_u64() {
            answers.insert(id, frame);
        }
    }
    answers
}

/// Every `message` of `channel` that arrives within `window`.
async fn drain(client: &mut Client, channel: &str, window: Duration) -> Vec<Json> {
    let mut out = Vec::new();
    let until = Instant::now() + window;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match crate::harness::try_read_json(&mut client.ws, left).await {
            Some(f) if f["op"] == "message" && f["channel"] == channel => out.push(f),
            Some(_) => {}
            None => break,
        }
    }
    out
}

#[tokio::test]
async fn a_stalled_redis_is_a_clear_error_and_nothing_is_half_published() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]).await;
    let url = redis.url();
    let gw = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.cluster.command_timeout_ms = 300;
        c.cluster.reconnect_max_ms = 200;
    })
    .await;
    wait_ready(&gw, 200).await;
    let mut sub = Client::join(&gw, "sub", &["member"]).await;
    sub.subscribe("chat:stall").await;
    let mut publisher = Client::join(&gw, "pub", &["member"]).await;
    publisher.publish("chat:stall", json!({"n": 0})).await;

    // Redis stops answering for 1.5 s.
    let port = redis.port.to_string();
    let sleeper = std::thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-p", &port, "DEBUG", "SLEEP", "1.5"])
            .output()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let refused = publisher
        .error(
            json!({"op": "publish", "channel": "chat:stall", "data": {"n": 1}}),
            "internal",
        )
        .await;
    let took = started.elapsed();
    assert_eq!(
        refused["message"],
        "the message broker is unavailable; not published"
    );
    assert!(
        took < Duration::from_millis(1_000),
        "the error took {took:?}"
    );
    println!("redis stalled: a publish answered `internal` in {took:?} (command timeout 300 ms)");
    let _ = sleeper.join();
    // After the stall: publishing works again.
    eventually_ok(WAIT, "publishing after the stall", async || {
        let reply = publisher
            .call(json!({"op": "publish", "channel": "chat:stall", "data": {"n": 2}}))
            .await;
        if reply["op"] == "ok" {
            Ok(())
        } else {
            Err(reply)
        }
    })
    .await;
    // Whatever the subscriber received is whole and numbered once: a
    // publication reported failed may still have happened (the timeout
    // hid it), never the other way round.
    let got = drain(&mut sub, "chat:stall", Duration::from_millis(500)).await;
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(got.iter().any(|m| m["data"]["n"] == 2), "{got:?}");
}

#[tokio::test]
async fn redis_killed_mid_publish_loses_no_acknowledged_message_and_recovers() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let gw = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.cluster.command_timeout_ms = 500;
        c.cluster.reconnect_max_ms = 200;
        c.limits.publish_rate_per_s = 100_000;
        c.limits.publish_burst = 100_000;
    })
    .await;
    wait_ready(&gw, 200).await;
    let mut sub = Client::join(&gw, "sub", &["member"]).await;
    sub.subscribe("chat:kill").await;
    let mut publisher = Client::join(&gw, "pub", &["member"]).await;
    publisher.nodelay();
    // 400 publications at once; Redis dies while they are under way.
    let killer = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        redis.stop();
    };
    let (answers, ()) = tokio::join!(publish_burst(&mut publisher, "chat:kill", 400), killer);
    let acked: Vec<u64> = answers
        .iter()
        .filter(|(_, f)| f["op"] == "ok")
        .map(|(id, _)| *id)
        .collect();
    for frame in answers.values().filter(|f| f["op"] != "ok") {
        assert_eq!(frame["code"], "internal", "{frame}");
        assert_eq!(
            frame["message"],
            "the message broker is unavailable; not published"
        );
    }
    let got = drain(&mut sub, "chat:kill", Duration::from_millis(500)).await;
    let received: Vec<u64> = got
        .iter()
        .map(|m| m["data"]["n"].as_u64().unwrap())
        .collect();
    println!(
        "redis killed mid-publish: {} acknowledged, {} refused, {} received",
        acked.len(),
        400 - acked.len(),
        received.len()
    );
    for id in &acked {
        assert!(received.contains(id), "acknowledged {id} never arrived");
    }
    // Back: readiness returns and publishing works, without a restart.
    redis.restart().await;
    wait_ready(&gw, 200).await;
    publisher.publish("chat:kill", json!({"n": 1000})).await;
}

#[tokio::test]
async fn an_acknowledged_publication_reaches_local_subscribers_when_its_echo_is_lost() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let gw = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.cluster.reconnect_max_ms = 200;
    })
    .await;
    wait_ready(&gw, 200).await;
    let mut sub = Client::join(&gw, "sub", &["member"]).await;
    sub.subscribe("chat:echo").await;
    let mut publisher = Client::join(&gw, "pub", &["member"]).await;
    publisher.publish("chat:echo", json!({"n": 1})).await;
    let got = drain(&mut sub, "chat:echo", Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    // Redis cuts a subscriber whose output buffer passes its limit, as it
    // does a replica that falls behind: the publication is numbered and
    // answered, and its echo to this replica never goes out.
    // (Redis counts only what overflows a client's 16 KiB reply buffer.)
    redis.cli(&[
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "pubsub 1 1 0",
    ]);
    let big = "x".repeat(40 * 1024);
    publisher
        .publish("chat:echo", json!({"n": 2, "pad": big}))
        .await;
    redis.cli(&[
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "pubsub 33554432 8388608 60",
    ]);
    let mut frames = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match crate::harness::try_read_json(&mut sub.ws, left).await {
            Some(f) => {
                let gap = f["op"] == "error" && f["channel"] == "chat:echo";
                frames.push(f);
                if gap {
                    break;
                }
            }
            None => break,
        }
    }
    let ops: Vec<&Json> = frames.iter().map(|f| &f["op"]).collect();
    println!("echo lost: the subscriber got {ops:?}");
    assert_eq!(frames[0]["op"], "message", "{frames:?}");
    assert_eq!(frames[0]["data"]["n"], 2, "{frames:?}");
    assert_eq!(frames[0]["seq"], got[0]["seq"].as_u64().unwrap() + 1);
    // Having been away from the channel, the replica says so once back.
    let last = frames.last().unwrap();
    assert_eq!(last["op"], "error", "{frames:?}");
    assert_eq!(last["code"], "internal", "{frames:?}");
    wait_ready(&gw, 200).await;
    publisher.publish("chat:echo", json!({"n": 3})).await;
}

/// The messages `clients` receive until `stop`, as (sent, latency) in
/// µs: each carries the instant it was sent as `t` (µs since `epoch`).
/// Also says how many clients were still open at the end.
fn measure(
    clients: Vec<Client>,
    epoch: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<(Vec<(u64, u64)>, usize)> {
    tokio::spawn(async move {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for mut client in clients {
            let (samples, stop) = (Arc::clone(&samples), stop.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return true,
                        frame = client.ws.next() => match frame {
                            Some(Ok(Message::Text(t))) => {
                                let v: Json = serde_json::from_str(&t).unwrap_or_default();
                                if let Some(sent) = v["data"]["t"].as_u64() {
                                    let now = epoch.elapsed().as_micros() as u64;
                                    samples.lock().unwrap().push((sent, now - sent));
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return false,
                        },
                    }
                }
            }));
        }
        let mut open = 0;
        for t in tasks {
            open += usize::from(t.await.unwrap_or(false));
        }
        let samples = std::mem::take(&mut *samples.lock().unwrap());
        (samples, open)
    })
}

/// The 99th percentile of `latencies` (µs), in ms.
fn p99_ms(mut latencies: Vec<u64>) -> f64 {
    latencies.sort_unstable();
    let at = latencies.len().saturating_sub(1) * 99 / 100;
    latencies.get(at).map_or(f64::NAN, |us| *us as f64 / 1000.0)
}

/// Publishes one timestamped message every 20 ms until `done` is set.
async fn publish_clock(
    publisher: &mut Client,
    epoch: Instant,
    done: &std::sync::atomic::AtomicBool,
) {
    while !done.load(Ordering::Relaxed) {
        let t = epoch.elapsed().as_micros() as u64;
        publisher.publish("chat:lat", json!({"t": t})).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reconnect_storm_of_10000_leaves_established_clients_alone() {
    let gw = Proc::spawn(|c, _| {
        c.server.max_connections = 12_000;
        // Admission limits on, as on the open internet.
        c.admission.address_new_connections_per_s = 50;
        c.admission.address_new_connections_burst = 100;
        c.admission.max_connections_per_address = 2_000;
        // Heartbeats during the storm: a missed one would close a client.
        c.websocket.heartbeat_ms = 1_000;
        c.websocket.heartbeat_grace_ms = 2_000;
    })
    .await;
    let mut established = Vec::new();
    for i in 0..100 {
        let mut c = Client::join(&gw, &format!("steady{i}"), &["member"]).await;
        c.subscribe("chat:lat").await;
        established.push(c);
    }
    let mut publisher = Client::join(&gw, "clock", &["member"]).await;
    let epoch = Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    let measured = measure(established, epoch, stop.clone());
    let done = std::sync::atomic::AtomicBool::new(false);
    let storm = async {
        // Two calm seconds first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let storm_start = epoch.elapsed().as_micros() as u64;
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args([
                "bench",
                "connect",
                "--url",
                &format!("wss://127.0.0.1:{}/ws", gw.addr.port()),
            ])
            .arg("--ca")
            .arg(gw.dir_path().join("ca.pem"))
            .arg("--secret")
            .arg(&gw.config.auth.hmac_secret_file)
            .args([
                "--connections",
                "10000",
                "--concurrency",
                "500",
                "--sources",
                "20",
            ])
            .stderr(std::process::Stdio::null())
            .output()
            .await
            .expect("bench connect");
        let storm_end = epoch.elapsed().as_micros() as u64;
        tokio::time::sleep(Duration::from_millis(500)).await;
        done.store(true, Ordering::Relaxed);
        (
            storm_start,
            storm_end,
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    let ((storm_start, storm_end, report), ()) =
        tokio::join!(storm, publish_clock(&mut publisher, epoch, &done));
    stop.cancel();
    let (samples, open) = measured.await.unwrap();
    let calm: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t < storm_start)
        .map(|s| s.1)
        .collect();
    let stormy: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| (storm_start..storm_end).contains(t))
        .map(|s| s.1)
        .collect();
    println!(
        "reconnect storm: 10,000 connects in {:.1} s ({report}); 100 established clients: \
         publish p99 {:.1} ms before ({} samples), {:.1} ms during ({} samples)",
        (storm_end - storm_start) as f64 / 1e6,
        p99_ms(calm.clone()),
        calm.len(),
        p99_ms(stormy.clone()),
        stormy.len()
    );
    assert_eq!(
        open, 100,
        "an established client was closed during the storm"
    );
    assert!(!stormy.is_empty());
    assert!(p99_ms(stormy) < 2_000.0, "publish latency during the storm");
}

#[tokio::test]
async fn a_thousand_slow_readers_cost_only_themselves() {
    let gw = Proc::spawn(|c, _| {
        c.websocket.outbox_frames = 1024;
        // A cut-off reader's close frame cannot be written (its socket is
        // full): give up on it soon.
        c.websocket.write_timeout_ms = 500;
        c.limits.publish_rate_per_s = 100_000;
        c.limits.publish_burst = 100_000;
    })
    .await;
    // 1,000 readers that subscribe and never read again, each with a
    // small receive buffer.
    let mut slow = Vec::new();
    for i in 0..1_000 {
        slow.push(
            crate::harness::slow_reader(&gw, &format!("slow{i}"), "chat:flood", 4 * 1024).await,
        );
    }
    const N: u64 = 3_000;
    // Five readers that keep reading, each on its own task.
    let mut readers = Vec::new();
    let mut progress = Vec::new();
    for i in 0..5 {
        let mut c = Client::join(&gw, &format!("reader{i}"), &["member"]).await;
        c.subscribe("chat:flood").await;
        let read = Arc::new(AtomicU64::new(0));
        progress.push(read.clone());
        readers.push(tokio::spawn(async move {
            let mut next = 1;
            while next <= N {
                let frame = c.next().await;
                if frame["op"] == "message" {
                    assert_eq!(frame["data"]["n"], next, "in order, nothing lost");
                    read.store(next, Ordering::Relaxed);
                    next += 1;
                }
            }
        }));
    }
    let mut publisher = Client::join(&gw, "flood", &["member"]).await;
    let data = "y".repeat(1024);
    let started = Instant::now();
    // The publisher stays at most a quarter of the outbox ahead of the
    // slowest reader that reads: this test's own readers share two cores
    // with the gateway, and one that the scheduler starves long enough to
    // fall an outbox behind is, correctly, a slow reader (seen in CI).
    const AHEAD: u64 = 256;
    for i in 1..=N {
        while i > AHEAD
            + progress
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0)
        {
            publisher.ws.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let frame =
            json!({"op": "publish", "channel": "chat:flood", "data": {"n": i, "pad": data}});
        publisher
            .ws
            .feed(Message::text(frame.to_string()))
            .await
            .unwrap();
    }
    publisher.ws.flush().await.unwrap();
    for reader in readers {
        reader
            .await
            .expect("a reader missed a message or was cut off");
    }
    let took = started.elapsed();
    // Those whose queue filled are closed as slow readers, and those whose
    // socket took no bytes for the write deadline first as stalled writers
    // (each close frame given up on after the deadline); which comes first
    // depends on how much the kernel's socket buffers absorbed.
    let cut = eventually_ok(WAIT, "slow readers to be closed", async || {
        let text = gw.metrics_from(crate::harness::LOCAL).await;
        let closed = |reason: &str| {
            let series = format!("wsgate_sessions_closed_total{{reason=\"{reason}\"}}");
            crate::harness::metric(&text, &series)
        };
        match closed("slow_reader") + closed("write_timeout") {
            0 => Err(0),
            n => Ok(n),
        }
    })
    .await;
    let rss = gw.rss_kib();
    println!(
        "slow-reader flood: 5 readers got all {N} messages of 1 KiB in {took:?} beside \
         1,000 readers that stopped reading, {cut} of them closed as slow readers or stalled writers so far; \
         gateway RSS {rss} KiB"
    );
    assert!(
        rss < 512 * 1024,
        "the slow readers cost the gateway {rss} KiB"
    );
    drop(slow);
}
