//! `/metrics`: the counters move with real traffic, and the exposition
//! never names a user, a channel or a token.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{WAIT, admin_get, bearer, eventually, hs256_jwt, metric, start};

#[tokio::test]
async fn metrics_count_traffic_without_naming_anyone() {
    let gw = start(|_, _| {}).await;
    let token = gw.token("alice-metrics", &["member"]);
    let (mut ws, _) = gw.connect(&token).await.expect("upgrade");
    match tokio::time::timeout(WAIT, ws.next()).await.expect("frame") {
        Some(Ok(Message::Text(t))) => assert!(t.contains("welcome"), "{t}"),
        other => panic!("{other:?}"),
    }
    ws.send(Message::text(
        r#"{"op":"subscribe","id":1,"channel":"chat:secret-room"}"#,
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        r#"{"op":"publish","id":2,"channel":"chat:secret-room","data":"hi"}"#,
    ))
    .await
    .unwrap();
    // ok 1, ok 2, then the echo: the publication went all the way through.
    let mut seen = 0;
    while seen < 3 {
        if let Some(Ok(Message::Text(_))) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            seen += 1;
        }
    }
    let expired = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        r#"{"sub":"x","exp":1}"#,
        &gw.secret(),
    );
    assert_eq!(
        gw.raw(&gw.upgrade_head("/ws", &[&bearer(&expired)]))
            .await
            .status,
        401
    );
    assert_eq!(gw.raw(&gw.upgrade_head("/ws", &[])).await.status, 401);

    let res = gw.get("/metrics").await;
    assert_eq!(res.status, 200);
    let text = res.body;
    assert_eq!(metric(&text, "wsgate_upgrades_total{result=\"ok\"}"), 1);
    assert_eq!(
        metric(&text, "wsgate_upgrades_total{result=\"invalid_token\"}"),
        1
    );
    assert_eq!(
        metric(&text, "wsgate_upgrades_total{result=\"no_token\"}"),
        1
    );
    assert_eq!(
        metric(&text, "wsgate_auth_failures_total{reason=\"expired\"}"),
        1
    );
    assert_eq!(
        metric(&text, "wsgate_auth_failures_total{reason=\"no_token\"}"),
        1
    );
    assert_eq!(metric(&text, "wsgate_sessions_open"), 1);
    assert_eq!(metric(&text, "wsgate_subscriptions"), 1);
    assert_eq!(metric(&text, "wsgate_messages_received_total"), 1);
    assert_eq!(metric(&text, "wsgate_messages_delivered_total"), 1);
    assert_eq!(metric(&text, "wsgate_publish_seconds_count"), 1);
    // The session, the two refused requests and this scrape each shook hands.
    assert!(metric(&text, "wsgate_tls_handshake_seconds_count") >= 4);
    assert!(metric(&text, "wsgate_connections_open") >= 1);
    for secret in ["alice-metrics", "secret-room", &token, &expired] {
        assert!(!text.contains(secret), "{secret:.20} leaked into /metrics");
    }

    // The session's end is counted by reason, and the gauges come back down.
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {}
    let text = eventually(WAIT, "the close to be counted", async || {
        let text = gw.get("/metrics").await.body;
        let closed = metric(
            &text,
            "wsgate_sessions_closed_total{reason=\"client_closed\"}",
        );
        (closed == 1).then_some(text)
    })
    .await;
    assert_eq!(metric(&text, "wsgate_sessions_open"), 0);
    assert_eq!(metric(&text, "wsgate_subscriptions"), 0);
    // A close the gateway sends is counted by code; the client's own is not.
    let (mut ws, _) = gw.connect(&token).await.expect("upgrade");
    ws.send(Message::binary(b"no".to_vec())).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {}
    // Reloads are counted by result.
    gw.handle.reload_policies().expect("policy reload");
    gw.handle.reload_certs().expect("cert reload");
    let text = gw.get("/metrics").await.body;
    assert_eq!(metric(&text, "wsgate_close_codes_total{code=\"1003\"}"), 1);
    assert_eq!(metric(&text, "wsgate_close_codes_total{code=\"1000\"}"), 0);
    assert_eq!(
        metric(&text, "wsgate_sessions_closed_total{reason=\"binary\"}"),
        1
    );
    assert_eq!(
        metric(&text, "wsgate_policy_reloads_total{result=\"ok\"}"),
        1
    );
    assert_eq!(metric(&text, "wsgate_cert_reloads_total{result=\"ok\"}"), 1);
    assert_eq!(metric(&text, "wsgate_admission_dropped_total"), 0);
}

#[tokio::test]
async fn admin_listener_serves_metrics_and_health_in_plain_http() {
    let gw = start(|c, _| {
        c.server.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.server.drain_grace_ms = 5_000;
    })
    .await;
    let admin = gw.admin.expect("admin listener bound");
    let (status, body) = admin_get(admin, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("wsgate_connections_open"), "{body}");
    assert!(admin_get(admin, "/healthz").await.0.contains(" 200 "));
    assert!(admin_get(admin, "/readyz").await.0.contains(" 200 "));
    assert!(admin_get(admin, "/ws").await.0.contains(" 404 "));
    // Metrics are no longer public on the wss:// listener.
    assert_eq!(gw.get("/metrics").await.status, 404);
    // The admin listener reports the drain and keeps serving through it.
    gw.begin_stop();
    eventually(WAIT, "the admin /readyz to answer 503", async || {
        admin_get(admin, "/readyz")
            .await
            .0
            .contains(" 503 ")
            .then_some(())
    })
    .await;
    assert!(admin_get(admin, "/metrics").await.0.contains(" 200 "));
}
