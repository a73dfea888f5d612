//! Deadlines and caps: the TLS handshake and header timeouts, header size
//! and count limits (431), the global connection cap (503 + Retry-After),
//! and draining (503 on `/readyz` and on new upgrades).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{WAIT, admin_get, bearer, eventually, eventually_ok, start};

/// Reads until EOF or error; returns the bytes and how long it took.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("server never closed the connection");
    (out, started.elapsed())
}

/// The connection ended near `deadline`: not before it, and well before
/// the harness gives up (the bound is loose: CI machines stall).
fn assert_dropped_at(took: Duration, deadline: Duration) {
    assert!(
        took + Duration::from_millis(50) >= deadline,
        "dropped too early: {took:?}"
    );
    assert!(
        took < deadline + Duration::from_secs(3),
        "kept past its deadline: {took:?}"
    );
}

#[tokio::test]
async fn silent_tcp_client_is_dropped_at_handshake_timeout() {
    let gw = start(|c, _| c.server.handshake_timeout_ms = 300).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (bytes, took) = read_until_closed(&mut tcp).await;
    assert!(bytes.is_empty());
    assert_dropped_at(took, Duration::from_millis(300));
}

#[tokio::test]
async fn partial_tls_handshake_is_dropped_at_handshake_timeout() {
    let gw = start(|c, _| c.server.handshake_timeout_ms = 300).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    // The first bytes of a ClientHello record, then nothing.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut tcp).await;
    assert_dropped_at(took, Duration::from_millis(300));
}

#[tokio::test]
async fn tls_client_that_sends_no_request_is_dropped_at_header_timeout() {
    let gw = start(|c, _| c.server.header_read_timeout_ms = 400).await;
    let mut tls = gw.tls().await;
    let (bytes, took) = read_until_closed(&mut tls).await;
    assert_dropped_at(took, Duration::from_millis(400));
    assert!(!String::from_utf8_lossy(&bytes).contains(" 101 "));
}

#[tokio::test]
async fn idle_keep_alive_connection_is_dropped_at_header_timeout() {
    let gw = start(|c, _| c.server.header_read_timeout_ms = 400).await;
    let mut tls = gw.tls().await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (bytes, took) = read_until_closed(&mut tls).await;
    assert!(String::from_utf8_lossy(&bytes).starts_with("HTTP/1.1 200"));
    assert_dropped_at(took, Duration::from_millis(400));
}

#[tokio::test]
async fn slow_header_sender_is_dropped_at_header_timeout() {
    let gw = start(|c, _| c.server.header_read_timeout_ms = 400).await;
    let mut tls = gw.tls().await;
    tls.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // Trickle a header byte now and then; the deadline covers the whole head.
    let trickle = async {
        for _ in 0..50 {
            // A sleep: the slowness of this sender is what is tested.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tls.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(WAIT, trickle).await;
    let (bytes, _) = read_until_closed(&mut tls).await;
    let took = started.elapsed();
    assert_dropped_at(took, Duration::from_millis(400));
    // Either nothing or an error status, never an upgrade.
    assert!(!String::from_utf8_lossy(&bytes).contains(" 101 "));
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let gw = start(|c, _| {
        c.server.max_header_bytes = 4096;
        c.auth.max_token_bytes = 2048;
    })
    .await;
    let big = format!("X-Fill: {}", "a".repeat(6000));
    let res = gw.raw(&gw.upgrade_head("/ws", &[&big])).await;
    assert_eq!(res.status, 431, "{res:?}");
    assert!(res.closed);
}

#[tokio::test]
async fn too_many_headers_are_431() {
    let gw = start(|c, _| c.server.max_headers = 16).await;
    let lines: Vec<String> = (0..20).map(|i| format!("X-H{i}: v")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let res = gw.raw(&gw.upgrade_head("/ws", &refs)).await;
    assert_eq!(res.status, 431, "{res:?}");
    assert!(res.closed);
}

#[tokio::test]
async fn global_connection_cap_answers_503_with_retry_after() {
    let gw = start(|c, _| {
        c.server.max_connections = 1;
        c.server.retry_after_s = 7;
    })
    .await;
    let token = gw.token("alice", &[]);
    let (held, _) = gw.connect(&token).await.expect("first connection");
    let res = gw.raw(&gw.upgrade_head("/ws", &[&bearer(&token)])).await;
    res.assert_refused(503);
    assert_eq!(res.header("retry-after"), Some("7"));
    // Releasing the held session frees the permit.
    drop(held);
    eventually_ok(WAIT, "the permit to come back", async || {
        match gw.connect(&token).await {
            Ok((_, r)) if r.status() == 101 => Ok(()),
            other => Err(other.map(|(_, r)| r.status())),
        }
    })
    .await;
}

#[tokio::test]
async fn draining_answers_503_to_readyz_and_upgrades() {
    let gw = start(|c, _| c.server.drain_grace_ms = 3_000).await;
    let token = gw.token("alice", &[]);
    let ready = gw.get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.header("access-control-allow-origin"), Some("*"));
    gw.begin_stop();
    eventually(WAIT, "/readyz to answer 503 once draining", async || {
        (gw.get("/readyz").await.status == 503).then_some(())
    })
    .await;
    let health = gw.get("/healthz").await;
    assert_eq!(health.status, 200, "liveness stays up while draining");
    let res = gw.raw(&gw.upgrade_head("/ws", &[&bearer(&token)])).await;
    res.assert_refused(503);
}

#[tokio::test]
async fn the_admin_listener_keeps_the_same_header_limit() {
    let gw = start(|c, _| {
        c.server.max_header_bytes = 4096;
        c.auth.max_token_bytes = 2048;
        c.server.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = gw.admin.expect("admin listener bound");
    // Within hyper's 8 KiB read buffer, over the configured header limit:
    // only the shared HTTP/1 builder's `max_header_size` refuses it.
    let mut tcp = TcpStream::connect(admin).await.expect("connect admin");
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Fill: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(6000)
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut out))
        .await
        .expect("admin answer")
        .expect("read admin answer");
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(admin_get(admin, "/healthz").await.0.contains(" 200 "));
}

/// The server frames in `bytes` (unmasked): (opcode, payload) each.
fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0f;
        let (len, head) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 if bytes.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&bytes[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    10,
                )
            }
            n if n < 126 => (usize::from(n), 2),
            _ => break,
        };
        let Some(payload) = bytes.get(head..head + len) else {
            break;
        };
        out.push((opcode, payload.to_vec()));
        bytes = &bytes[head + len..];
    }
    out
}

/// The close code of the server's close frame, if it sent one.
fn close_code_in(bytes: &[u8]) -> Option<u16> {
    server_frames(bytes)
        .into_iter()
        .find(|(op, _)| *op == 0x8)
        .and_then(|(_, p)| p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])))
}

/// A client that starts a message and trickles it (a large frame, or a
/// fragmented message one continuation at a time), answering pings all
/// along, is closed with 1008 once the message has been in progress past
/// `websocket.message_timeout_ms`.
#[tokio::test]
async fn a_trickled_message_is_closed_at_its_deadline() {
    let deadline = Duration::from_millis(1_000);
    let gw = start(|c, _| {
        c.websocket.message_timeout_ms = deadline.as_millis() as u64;
        c.websocket.heartbeat_ms = 300;
        c.limits.publish_rate_per_s = 1_000;
        c.limits.publish_burst = 1_000;
    })
    .await;
    let token = gw.token("alice", &["member"]);
    // Zero masks: the payload goes as written.
    let big_frame_head = [0x81u8, 0x80 | 126, 0x10, 0x00, 0, 0, 0, 0]; // 4096 bytes
    let fragment_start = [0x01u8, 0x80 | 1, 0, 0, 0, 0, b'{']; // text, FIN=0
    let continuation = [0x00u8, 0x80 | 1, 0, 0, 0, 0, b' ']; // FIN=0
    let pong = [0x8au8, 0x80, 0, 0, 0, 0];
    for (start, trickle) in [
        (&big_frame_head[..], &b" "[..]),
        (&fragment_start[..], &continuation[..]),
    ] {
        let mut tls = gw.upgrade_by_hand(&[&bearer(&token)]).await;
        tls.write_all(start).await.unwrap();
        tls.flush().await.unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        loop {
            assert!(started.elapsed() < deadline * 4, "never closed");
            // Trickle, and answer pings (as a pong each), every 100 ms.
            let wrote = async {
                tls.write_all(trickle).await?;
                tls.write_all(&pong).await?;
                tls.flush().await
            };
            if wrote.await.is_err() {
                break;
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(100), tls.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        let took = started.elapsed();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut got)).await;
        assert_eq!(close_code_in(&got), Some(1008), "{:?}", server_frames(&got));
        assert!(
            took >= deadline && took < deadline * 3,
            "closed {took:?} after the message began (deadline {deadline:?})"
        );
    }
    assert_eq!(
        crate::harness::metric(
            &gw.metrics().await,
            "wsgate_sessions_closed_total{reason=\"message_timeout\"}"
        ),
        2
    );
}

/// The outbox is bounded in bytes too: a slow reader subscribed to large
/// messages is cut off (4008) once `websocket.outbox_bytes` are queued for
/// it, long before `outbox_frames` of them would be.
#[tokio::test]
async fn a_slow_reader_of_large_messages_is_cut_off_by_bytes() {
    let gw = start(|c, _| {
        c.websocket.outbox_frames = 1024;
        c.websocket.outbox_bytes = 256 * 1024;
        c.websocket.write_timeout_ms = 500;
        c.limits.publish_rate_per_s = 100_000;
        c.limits.publish_burst = 100_000;
    })
    .await;
    // A reader whose socket takes little (no receive-buffer autotuning up
    // to tens of MiB on loopback) and who never reads after subscribing.
    let slow = crate::harness::slow_reader(&gw, "slow", "chat:big", 16 * 1024).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut publisher = crate::harness::Client::join(&gw, "pub", &["member"]).await;
    let data = serde_json::json!("x".repeat(60 * 1024));
    // 1024 frames of 60 KiB would be 60 MiB; the byte bound is 256 KiB
    // plus what the kernel's socket buffers hold. `slow` never reads.
    let mut published = 0;
    while published < 400 {
        publisher.publish("chat:big", data.clone()).await;
        published += 1;
        // Cut off: its subscription ends at once (its close frame then
        // waits for the write deadline on a full socket).
        if published % 10 == 0
            && crate::harness::metric(&gw.metrics().await, "wsgate_subscriptions") == 0
        {
            break;
        }
    }
    assert!(
        published < 400,
        "never cut off after {published} messages of 60 KiB"
    );
    crate::harness::eventually(WAIT, "the slow reader's close counted", async || {
        let text = gw.metrics().await;
        (crate::harness::metric(
            &text,
            "wsgate_sessions_closed_total{reason=\"slow_reader\"}",
        ) == 1)
            .then_some(())
    })
    .await;
    println!("outbox bytes: the slow reader was cut off after {published} messages of 60 KiB");
    drop(slow);
}
