//! The built `wsgate` binary as operators run it: JSON logs at trace level
//! that never contain a token across every refusal and close path, and a
//! drain of a few hundred clients on SIGTERM that closes each with 1001,
//! spread over the window, and exits 0.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

use crate::harness::{self, Endpoint, WAIT, Ws, bearer, eventually, hs256_jwt, masked_frame, now};

/// The binary, serving a test configuration, its stderr collected line by line.
pub(crate) struct Proc {
    pub endpoint: Endpoint,
    _dir: tempfile::TempDir,
    child: tokio::process::Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for Proc {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Proc {
    pub async fn spawn(tweak: impl FnOnce(&mut Config, &std::path::Path)) -> Self {
        Self::spawn_under(&[], tweak).await
    }

    /// As [`Proc::spawn`], run through `wrapper` (e.g. `prlimit --nofile=64 --`).
    pub async fn spawn_under(
        wrapper: &[&str],
        tweak: impl FnOnce(&mut Config, &std::path::Path),
    ) -> Self {
        let (dir, config) = harness::test_config(tweak);
        let file = dir.path().join("wsgate.toml");
        std::fs::write(&file, toml::to_string(&config).expect("config as TOML")).unwrap();
        let bin = env!("CARGO_BIN_EXE_wsgate");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&file)
            .args(["--log-format", "json", "--log-level", "trace"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wsgate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = Arc::clone(&logs);
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                    && let (Some(tx), Some(addr)) = (tx.take(), v["addr"].as_str())
                {
                    let _ = tx.send(addr.parse::<std::net::SocketAddr>().ok());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = tokio::time::timeout(WAIT, rx)
            .await
            .expect("the gateway never logged `listening`")
            .expect("stderr closed")
            .expect("listening addr");
        let client =
            harness::client_config(&wsgate::tools::certs::CertPaths::in_dir(dir.path()).ca_cert);
        Self {
            endpoint: Endpoint {
                addr,
                config,
                client,
            },
            _dir: dir,
            child,
            logs,
        }
    }

    /// The process's directory: its certificates (`ca.pem`), secret, policies.
    pub fn dir_path(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// CPU time the process has used (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // The fields after the command name, which may hold spaces.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
    }

    /// The process's resident set, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("running");
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .expect("VmRSS")
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the gateway did not exit")
            .expect("wait")
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The admin listener's address, from the `admin listener` log line.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.logs().iter().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            if !v["message"].as_str()?.starts_with("admin listener") {
                return None;
            }
            v["addr"].as_str()?.parse().ok()
        })
    }
}

/// Reads frames until the close frame; returns its code (1006 when the
/// stream ended without one).
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return 1006,
        }
    }
}

async fn welcome(ws: &mut Ws) {
    match tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("welcome")
    {
        Some(Ok(Message::Text(t))) => assert!(t.contains("\"welcome\""), "{t}"),
        other => panic!("expected welcome: {other:?}"),
    }
}

const MARKER: &str = "CANARYq8JSONzz4";

#[tokio::test]
async fn json_logs_never_contain_a_token_on_any_refusal_or_close_path() {
    let mut gw = Proc::spawn(|c, _| {
        c.websocket.heartbeat_ms = 300;
        c.websocket.heartbeat_grace_ms = 300;
        c.websocket.max_message_bytes = 4096;
        c.websocket.max_frame_bytes = 4096;
        c.websocket.outbox_frames = 4;
        c.limits.publish_rate_per_s = 1;
        c.limits.publish_burst = 1;
        c.limits.rate_limit_strikes = 2;
        c.auth.leeway_s = 0;
        c.server.drain_window_ms = 0;
    })
    .await;
    let key = wsgate::auth::read_hmac_secret(&gw.config.auth.hmac_secret_file).unwrap();
    let token = |sub: &str, ttl: u64| {
        hs256_jwt(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &format!(
                r#"{{"sub":"{sub}","exp":{},"roles":["member"],"note":"{MARKER}"}}"#,
                now() + ttl
            ),
            &key,
        )
    };
    let valid = token("canary", 600);
    let forged = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"sub":"x","exp":{},"n":"{MARKER}"}}"#, now() + 60),
        b"wrong key wrong key wrong key wrong",
    );
    let mut tokens = vec![valid.clone(), forged.clone()];

    // Refusals: every carrier, with a forged token and a valid one where it
    // still gets refused.
    for t in [&forged, &valid] {
        let auth = bearer(t);
        let proto = format!("Sec-WebSocket-Protocol: wsgate.v1, bearer.{t}");
        for head in [
            gw.upgrade_head("/ws", &[&auth, &proto]),
            gw.upgrade_head("/ws", &[&format!("Sec-WebSocket-Protocol: bearer.{t}")]),
            gw.upgrade_head(&format!("/ws?access_token={t}"), &[]),
            gw.upgrade_head("/ws", &[&auth])
                .replace("Version: 13", "Version: 8"),
        ] {
            assert_ne!(gw.raw(&head).await.status, 101);
        }
    }
    assert_eq!(
        gw.raw(&gw.upgrade_head("/ws", &[&bearer(&forged)]))
            .await
            .status,
        401
    );

    // Close paths, each with the canary in the token and in the frames.
    let open = || async { gw.connect(&valid).await.expect("upgrade").0 };

    let mut ws = open().await; // client_closed, after a refresh attempt
    welcome(&mut ws).await;
    ws.send(Message::text(format!(
        r#"{{"op":"refresh","id":1,"token":"{forged}"}}"#
    )))
    .await
    .unwrap();
    let reply = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(
        reply.contains("invalid_token") && !reply.contains(MARKER),
        "{reply}"
    );
    let fresh = token("canary", 900);
    tokens.push(fresh.clone());
    ws.send(Message::text(format!(
        r#"{{"op":"refresh","id":2,"token":"{fresh}"}}"#
    )))
    .await
    .unwrap();
    ws.close(None).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1005);

    let mut ws = open().await; // binary: 1003
    welcome(&mut ws).await;
    ws.send(Message::binary(valid.clone().into_bytes()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 1003);

    let mut ws = open().await; // too big: 1009
    welcome(&mut ws).await;
    let _ = ws
        .send(Message::text(format!("{MARKER}{}", "x".repeat(5000))))
        .await;
    assert_eq!(close_code(&mut ws).await, 1009);

    let mut ws = open().await; // not JSON, repeatedly: 1008
    welcome(&mut ws).await;
    for _ in 0..8 {
        let _ = ws.send(Message::text(format!("{MARKER} {valid}"))).await;
    }
    assert_eq!(close_code(&mut ws).await, 1008);

    let mut ws = open().await; // repeated rate limiting: 4008
    welcome(&mut ws).await;
    for i in 0..4 {
        let _ = ws
            .send(Message::text(format!(
                r#"{{"op":"publish","id":{i},"channel":"chat:{MARKER}","data":"{valid}"}}"#
            )))
            .await;
    }
    assert_eq!(close_code(&mut ws).await, 4008);

    // Expiry: 4001. Two seconds, not one: `exp` is whole seconds, so a
    // one-second token minted late in a second could be expired by the
    // time a loaded machine finishes the handshake.
    let short = token("canary-short", 2);
    tokens.push(short.clone());
    let (mut ws, _) = gw.connect(&short).await.expect("short token");
    welcome(&mut ws).await;
    assert_eq!(close_code(&mut ws).await, 4001);

    let auth = bearer(&valid);
    let mut raw = gw.upgrade_by_hand(&[&auth]).await; // invalid UTF-8: 1007
    raw.write_all(&masked_frame(0x1, b"\xff\xfe canary"))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut sink)).await;

    let mut raw = gw.upgrade_by_hand(&[&auth]).await; // protocol error: 1002
    raw.write_all(b"\x81\x05hello").await.unwrap(); // unmasked client frame
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut sink)).await;

    let mut raw = gw.upgrade_by_hand(&[&auth]).await; // heartbeat timeout
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut sink)).await;

    let raw = gw.upgrade_by_hand(&[&auth]).await; // the socket just goes away
    drop(raw);

    // Shutdown: 1001 to a live session, then exit 0.
    let mut ws = open().await;
    welcome(&mut ws).await;
    gw.signal("TERM");
    assert_eq!(close_code(&mut ws).await, 1001);
    assert!(gw.wait_exit().await.success());

    let logs = gw.logs();
    let mut reasons = std::collections::BTreeSet::new();
    for line in &logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"] == "session closed" {
            reasons.insert(v["reason"].as_str().unwrap_or("").to_owned());
            // The connection's span: session id and peer address.
            let spans = v["spans"].to_string();
            assert!(spans.contains("\"session\""), "{line}");
            assert!(spans.contains("\"peer\""), "{line}");
        }
    }
    for reason in [
        "client_closed",
        "binary",
        "too_big",
        "bad_frames",
        "rate_limited",
        "token_expired",
        "invalid_utf8",
        "protocol_error",
        "heartbeat_timeout",
        "shutdown",
    ] {
        assert!(
            reasons.contains(reason),
            "no `{reason}` close logged: {reasons:?}"
        );
    }
    let all = logs.join("\n");
    assert!(
        all.contains("request refused"),
        "trace logs were not captured"
    );
    assert!(!all.contains(MARKER), "the canary reached the logs");
    for t in &tokens {
        for part in t.split('.') {
            assert!(!all.contains(part), "a token segment reached the logs");
        }
    }
}

#[tokio::test]
async fn sigterm_drains_hundreds_of_clients_with_1001_spread_over_the_window() {
    const CLIENTS: usize = 300;
    let grace = Duration::from_millis(500);
    let window = Duration::from_millis(3000);
    let mut gw = Proc::spawn(|c, _| {
        c.server.drain_grace_ms = grace.as_millis() as u64;
        c.server.drain_window_ms = window.as_millis() as u64;
        c.limits.max_connections_per_user = CLIENTS;
    })
    .await;
    let token = gw.token("drain", &["member"]);
    let mut clients = Vec::with_capacity(CLIENTS);
    for chunk in 0..CLIENTS / 50 {
        let batch = (0..50).map(|_| async {
            let (mut ws, _) = gw.connect(&token).await.expect("upgrade");
            welcome(&mut ws).await;
            ws
        });
        clients.extend(futures_util::future::join_all(batch).await);
        let _ = chunk;
    }
    // Each client records its close code and when it arrived.
    let t0 = Instant::now();
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let code = tokio::time::timeout(Duration::from_secs(20), close_code(&mut ws))
                    .await
                    .unwrap_or(0);
                (code, Instant::now())
            })
        })
        .collect();
    gw.signal("TERM");
    // Within a second of t0, as the drain promises.
    let readyz = eventually(
        Duration::from_secs(1).saturating_sub(t0.elapsed()),
        "/readyz to answer 503 within 1 s of SIGTERM",
        async || (gw.get("/readyz").await.status == 503).then(|| t0.elapsed()),
    )
    .await;

    let mut times = Vec::with_capacity(CLIENTS);
    for w in waiters {
        let (code, at) = w.await.unwrap();
        assert_eq!(code, 1001, "a client saw {code} instead of 1001");
        times.push(at.duration_since(t0));
    }
    assert!(gw.wait_exit().await.success(), "exit status not 0");

    times.sort();
    let (first, last) = (times[0], times[CLIENTS - 1]);
    assert!(
        first + Duration::from_millis(50) >= grace,
        "closed before the grace: {first:?}"
    );
    assert!(
        last - first >= window * 6 / 10,
        "closes not spread: {first:?}..{last:?}"
    );
    // Evenly: no tenth of the window holds more than a quarter of them.
    let tenth = window / 10;
    let mut buckets = [0usize; 12];
    for t in &times {
        let i = (t.saturating_sub(grace).as_millis() / tenth.as_millis()) as usize;
        buckets[i.min(11)] += 1;
    }
    eprintln!(
        "drain: {CLIENTS} × 1001, first {first:?}, last {last:?}, per tenth of the window {buckets:?}, readyz 503 after {readyz:?}"
    );
    assert!(
        buckets.iter().all(|&n| n <= CLIENTS / 4),
        "bursty closes: {buckets:?}"
    );
}
