//! `wsgate bench resume`: a reconnect storm. N clients subscribe to one
//! history channel, all drop their connections at once (as a drain's
//! 1001 makes them do), `missed` messages are published meanwhile, and all
//! N reconnect at once and resume with `since`: on the same gateway, or on
//! another replica through Redis. Reports the time until every client is
//! live again (its `ok` and replay received), the resuming gateway's CPU
//! per client, and Redis commands per client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use super::{BenchError, Target, Ws};

/// The result of `bench resume`.
#[derive(Debug, Serialize)]
pub struct ResumeReport {
    pub mode: &'static str,
    pub connections: usize,
    pub subscribed: usize,
    /// Clients whose resume was answered `recovered` with every missed
    /// message replayed.
    pub recovered: usize,
    /// Clients that failed to reconnect or resume.
    pub failed: usize,
    pub missed_per_client: usize,
    /// From the first reconnect to the last client live again.
    pub to_live_s: f64,
    pub resumes_per_s: f64,
    /// CPU seconds the resuming gateway spent meanwhile, and per client
    /// (full TLS handshake, upgrade, JWT, resume and replay).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_client: Option<f64>,
    /// Commands Redis processed meanwhile (without this tool's INFO calls).
    pub redis_commands: Option<u64>,
    pub redis_commands_per_client: Option<f64>,
}

/// CPU seconds (user + system) process `pid` has used.
pub(super) fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: `) S ppid …`.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    Some(ticks / hz)
}

/// A connection for reading Redis' counters.
pub(super) async fn redis_conn(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).ok()?;
    client.get_multiplexed_async_connection().await.ok()
}

/// Redis' `total_commands_processed` (the INFO asking for it is counted
/// only after it answers).
pub(super) async fn redis_commands(conn: &mut redis::aio::MultiplexedConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
}

/// How many scripts Redis ran (`EVALSHA` and `EVAL` calls, from
/// `INFO commandstats`): the round trips of the gateway's scripts, whose
/// own commands `total_commands_processed` counts too.
pub(super) async fn redis_script_calls(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .ok()?;
    Some(
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split_once("calls=")?
                    .1
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum(),
    )
}

/// The next text frame, or an error naming what was awaited.
async fn next_text(ws: &mut Ws, what: &str) -> Result<String, BenchError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.as_str().to_owned()),
            Ok(Some(Ok(_))) => {}
            other => return Err(BenchError::Connect(format!("{what}: {other:?}"))),
        }
    }
}

/// Subscribes `channel` (resuming from `since` when given) and reads the
/// `ok` and `replay` messages; returns the `ok`.
async fn subscribe(
    ws: &mut Ws,
    channel: &str,
    since: Option<&serde_json::Value>,
    replay: usize,
) -> Result<serde_json::Value, BenchError> {
    let mut frame = serde_json::json!({"op": "subscribe", "id": 1, "channel": channel});
    if let Some(since) = since {
        frame["since"] = since.clone();
    }
    ws.send(Message::text(frame.to_string()))
        .await
        .map_err(|e| BenchError::Connect(e.to_string()))?;
    let ok: serde_json::Value = serde_json::from_str(&next_text(ws, "subscribe ok").await?)
        .map_err(|e| BenchError::Connect(e.to_string()))?;
    if ok["op"] != "ok" || !ok["epoch"].is_string() {
        return Err(BenchError::Connect(format!(
            "subscribe answered {ok} (is {channel} a history channel?)"
        )));
    }
    if ok["recovered"] == serde_json::json!(true) {
        for _ in 0..replay {
            next_text(ws, "replayed message").await?;
        }
    }
    Ok(ok)
}

/// Runs the storm; see the module documentation.
///
/// # Errors
/// The publisher could not connect or publish.
#[allow(clippy::too_many_arguments)]
pub async fn resume(
    first: &Target,
    then: &Target,
    connections: usize,
    concurrency: usize,
    channel: &str,
    missed: usize,
    server_pid: Option<u32>,
    redis_url: Option<&str>,
) -> Result<ResumeReport, BenchError> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let channel: Arc<str> = channel.into();

    // Everyone subscribed at the same position.
    let mut set = JoinSet::new();
    for i in 0..connections {
        let (target, permits, channel) =
            (first.clone(), Arc::clone(&permits), Arc::clone(&channel));
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut ws = target.connect(i).await?;
            let ok = subscribe(&mut ws, &channel, None, 0).await?;
            Ok::<_, BenchError>((ws, ok))
        });
    }
    let mut held = Vec::with_capacity(connections);
    let mut since = None;
    while let Some(joined) = set.join_next().await {
        if let Ok(Ok((ws, ok))) = joined {
            since
                .get_or_insert_with(|| serde_json::json!({"epoch": ok["epoch"], "seq": ok["seq"]}));
            held.push(ws);
        }
    }
    let subscribed = held.len();
    eprintln!("resume: {subscribed} of {connections} subscribed; dropping them all");
    // All at once, as a drain's 1001 does.
    for mut ws in held {
        let _ = ws.close(None).await;
    }
    let since = since.ok_or_else(|| BenchError::Connect("no client subscribed".into()))?;

    // Published while they are away.
    let mut publisher = then.connect(connections).await?;
    for n in 0..missed {
        let frame = serde_json::json!({"op": "publish", "id": n + 2, "channel": &*channel, "data": {"n": n}});
        publisher
            .send(Message::text(frame.to_string()))
            .await
            .map_err(|e| BenchError::Connect(e.to_string()))?;
        next_text(&mut publisher, "publish ok").await?;
    }

    let cpu_before = server_pid.and_then(cpu_s);
    let mut redis = match redis_url {
        Some(url) => redis_conn(url).await,
        None => None,
    };
    let redis_before = match redis.as_mut() {
        Some(conn) => redis_commands(conn).await,
        None => None,
    };
    let started = Instant::now();
    let since = Arc::new(since);
    let mut set = JoinSet::new();
    for i in 0..connections {
        let (target, permits, channel, since) = (
            then.clone(),
            Arc::clone(&permits),
            Arc::clone(&channel),
            Arc::clone(&since),
        );
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut ws = target.connect(i).await?;
            let ok = subscribe(&mut ws, &channel, Some(&since), missed).await?;
            // Held until every client is live, as a real client stays.
            Ok::<_, BenchError>((ws, ok["recovered"] == serde_json::json!(true)))
        });
    }
    let (mut recovered, mut failed, mut live) = (0, 0, Vec::with_capacity(connections));
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok((ws, ok))) => {
                recovered += usize::from(ok);
                live.push(ws);
            }
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => failed += 1,
        }
    }
    let to_live = started.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(server_pid.and_then(cpu_s))
        .map(|(b, a)| a - b);
    let redis = match (redis.as_mut(), redis_before) {
        (Some(conn), Some(before)) => redis_commands(conn)
            .await
            // Less the INFO that read `before`.
            .map(|after| after.saturating_sub(before + 1)),
        _ => None,
    };
    if let Some(e) = first_error {
        eprintln!("resume: first failure: {e}");
    }
    drop(live);
    let n = (connections - failed).max(1) as f64;
    Ok(ResumeReport {
        mode: "resume",
        connections,
        subscribed,
        recovered,
        failed,
        missed_per_client: missed,
        to_live_s: to_live,
        resumes_per_s: n / to_live.max(f64::EPSILON),
        server_cpu_s: cpu,
        server_cpu_us_per_client: cpu.map(|c| c * 1e6 / n),
        redis_commands: redis,
        redis_commands_per_client: redis.map(|r| r as f64 / n),
    })
}
