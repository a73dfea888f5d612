//! `protocol.md` §1: one test per refusal row and per carrier rule, each
//! sending a WebSocket frame right behind the request to prove nothing is
//! processed after a refusal; and the happy path through to `welcome`.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::harness::{
    self, Gateway, RawResponse, WAIT, assert_invalid_token, bearer, eventually, expect_close,
    hs256_jwt, now, raw_jwt, read_json, start,
};

async fn gateway() -> Gateway {
    start(|_, _| {}).await
}

/// A valid upgrade request with a bearer token, edited by `edit`, sent raw.
async fn send_edited(gw: &Gateway, edit: impl FnOnce(String) -> String) -> RawResponse {
    let token = gw.token("alice", &[]);
    gw.raw(&edit(gw.upgrade_head("/ws", &[&bearer(&token)])))
        .await
}

/// `head` without the header lines starting with `name:`.
fn without(head: String, name: &str) -> String {
    head.lines()
        .filter(|l| !l.starts_with(&format!("{name}:")))
        .map(|l| format!("{l}\n"))
        .collect()
}

// ---- not a valid upgrade (400 / 426) -------------------------------------

#[tokio::test]
async fn non_get_upgrade_is_400() {
    let gw = gateway().await;
    send_edited(&gw, |h| h.replacen("GET", "POST", 1))
        .await
        .assert_refused(400);
}

#[tokio::test]
async fn http10_upgrade_is_400() {
    let gw = gateway().await;
    send_edited(&gw, |h| h.replacen("HTTP/1.1", "HTTP/1.0", 1))
        .await
        .assert_refused(400);
}

#[tokio::test]
async fn missing_host_is_400() {
    let gw = gateway().await;
    let res = send_edited(&gw, |h| without(h, "Host")).await;
    // hyper or the gateway may answer this one; either way 400 and closed.
    assert_eq!(res.status, 400, "{res:?}");
    assert!(res.closed);
    assert!(res.trailing.is_empty());
}

#[tokio::test]
async fn plain_get_is_426_with_upgrade_header() {
    let gw = gateway().await;
    let head = format!("GET /ws HTTP/1.1\nHost: localhost:{}\n", gw.addr.port());
    let res = gw.raw(&head).await;
    res.assert_refused(426);
    assert_eq!(res.header("upgrade"), Some("websocket"));
}

#[tokio::test]
async fn upgrade_to_other_protocol_is_400() {
    let gw = gateway().await;
    send_edited(&gw, |h| h.replace("Upgrade: websocket", "Upgrade: h2c"))
        .await
        .assert_refused(400);
}

#[tokio::test]
async fn connection_without_upgrade_token_is_400() {
    let gw = gateway().await;
    send_edited(&gw, |h| {
        h.replace("Connection: Upgrade", "Connection: keep-alive")
    })
    .await
    .assert_refused(400);
}

#[tokio::test]
async fn connection_token_list_is_accepted() {
    let gw = gateway().await;
    let token = gw.token("alice", &[]);
    let mut req = gw.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "connection",
        HeaderValue::from_static("keep-alive, Upgrade"),
    );
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let (mut ws, res) = gw.connect_with(req).await.expect("upgrade");
    assert_eq!(res.status(), 101);
    assert_eq!(read_json(&mut ws).await["op"], "welcome");
}

#[tokio::test]
async fn bad_websocket_keys_are_400() {
    let gw = gateway().await;
    for key in [
        "not base64!!",
        "c2hvcnQ=",
        "dGhpcyBpcyBtb3JlIHRoYW4gc2l4dGVlbiBieXRlcw==",
    ] {
        send_edited(&gw, |h| h.replace("dGhlIHNhbXBsZSBub25jZQ==", key))
            .await
            .assert_refused(400);
    }
    send_edited(&gw, |h| without(h, "Sec-WebSocket-Key"))
        .await
        .assert_refused(400);
}

#[tokio::test]
async fn other_websocket_version_is_426_naming_13() {
    let gw = gateway().await;
    for version in ["8", "12", "14"] {
        let res = send_edited(&gw, |h| {
            h.replace("Version: 13", &format!("Version: {version}"))
        })
        .await;
        res.assert_refused(426);
        assert_eq!(res.header("sec-websocket-version"), Some("13"));
    }
    let res = send_edited(&gw, |h| without(h, "Sec-WebSocket-Version")).await;
    res.assert_refused(426);
}

#[tokio::test]
async fn unknown_path_is_404() {
    let gw = gateway().await;
    let token = gw.token("alice", &[]);
    gw.raw(&gw.upgrade_head("/other", &[&bearer(&token)]))
        .await
        .assert_refused(404);
    let res = gw.get("/nope").await;
    assert_eq!(res.status, 404);
}

/// An upgrade asked of a route that serves pages (`/`, `/healthz`) is
/// refused and the connection closed, not answered as a plain GET that
/// keeps the connection alive.
#[tokio::test]
async fn upgrades_to_other_routes_are_refused_and_closed() {
    let gw = gateway().await;
    let token = gw.token("alice", &[]);
    for path in ["/", "/healthz", "/wsgate.js"] {
        // `raw` reads until the server closes: a kept-alive answer would
        // time out here.
        let res = gw.raw(&gw.upgrade_head(path, &[&bearer(&token)])).await;
        res.assert_refused(404);
    }
}

/// A validly signed token whose time claims overflow time arithmetic is
/// refused like any bad claim, before the `101`; the gateway lives on.
#[tokio::test]
async fn time_claims_past_any_clock_are_401() {
    let gw = gateway().await;
    let secret = gw.secret();
    for claims in [
        r#"{"sub":"a","exp":9223372036854775808}"#.to_owned(),
        r#"{"sub":"a","exp":18446744073709551615}"#.to_owned(),
        r#"{"sub":"a","exp":1e300}"#.to_owned(),
        format!(r#"{{"sub":"a","exp":{},"iat":1e300}}"#, now() + 600),
        format!(r#"{{"sub":"a","exp":{},"nbf":-1}}"#, now() + 600),
    ] {
        let token = hs256_jwt(r#"{"alg":"HS256","typ":"JWT"}"#, &claims, &secret);
        assert_invalid_token(&gw, &token, &claims).await;
    }
    let token = gw.token("alice", &[]);
    gw.connect(&token).await.expect("still serving");
}

/// `/metrics` is served on the public listener only when the operator
/// turns it on (the admin listener serves it otherwise).
#[tokio::test]
async fn metrics_are_not_public_by_default() {
    let gw = start(|c, _| c.server.public_metrics = false).await;
    assert_eq!(gw.get("/metrics").await.status, 404);
    let gw = start(|c, _| c.server.public_metrics = true).await;
    assert_eq!(gw.get("/metrics").await.status, 200);
}

/// Refusals are logged at the default level, a flood held back per
/// address (`[log] client_lines_*`), and the held lines counted.
#[tokio::test]
async fn refusal_lines_are_rate_limited_per_address() {
    let gw = start(|c, _| {
        c.log.client_lines_per_s = 1;
        c.log.client_lines_burst = 2;
        c.log.client_lines_max_per_s = 100;
    })
    .await;
    for _ in 0..6 {
        gw.raw(&gw.upgrade_head("/ws", &[]))
            .await
            .assert_refused(401);
    }
    let held = crate::harness::metric(&gw.metrics().await, "wsgate_log_lines_held_total");
    assert!((3..=4).contains(&held), "held {held}");
}

// ---- Origin (403) --------------------------------------------------------

#[tokio::test]
async fn origin_rules() {
    let gw = start(|c, _| c.server.allowed_origins = vec!["https://app.example.com".into()]).await;
    let token = gw.token("alice", &[]);
    let port = gw.addr.port();
    for bad in [
        "Origin: https://evil.example.com".to_owned(),
        "Origin: http://app.example.com".to_owned(),
        "Origin: https://app.example.com:444".to_owned(),
        "Origin: null".to_owned(),
        format!("Origin: http://localhost:{port}"),
    ] {
        let res = gw
            .raw(&gw.upgrade_head("/ws", &[&bearer(&token), &bad]))
            .await;
        res.assert_refused(403);
    }
    for good in [
        "https://app.example.com",
        "https://APP.example.com:443",
        &format!("https://localhost:{port}"),
    ] {
        let mut req = gw.ws_url().into_client_request().unwrap();
        req.headers_mut()
            .insert("origin", HeaderValue::from_str(good).unwrap());
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let (_, res) = gw
            .connect_with(req)
            .await
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        assert_eq!(res.status(), 101, "{good}");
    }
}

#[tokio::test]
async fn same_origin_can_be_switched_off() {
    let gw = start(|c, _| c.server.allow_same_origin = false).await;
    let token = gw.token("alice", &[]);
    let origin = format!("Origin: https://localhost:{}", gw.addr.port());
    gw.raw(&gw.upgrade_head("/ws", &[&bearer(&token), &origin]))
        .await
        .assert_refused(403);
}

// ---- tokens (401) --------------------------------------------------------

#[tokio::test]
async fn no_token_is_401_with_bearer_challenge() {
    let gw = gateway().await;
    let res = gw.raw(&gw.upgrade_head("/ws", &[])).await;
    res.assert_refused(401);
    assert_eq!(res.header("www-authenticate"), Some("Bearer"));
    // Another scheme is not a bearer token.
    let res = gw
        .raw(&gw.upgrade_head("/ws", &["Authorization: Basic YWxpY2U6cHc="]))
        .await;
    res.assert_refused(401);
    assert_eq!(res.header("www-authenticate"), Some("Bearer"));
}

#[tokio::test]
async fn invalid_tokens_are_401_invalid_token() {
    let gw = gateway().await;
    let key = gw.secret();
    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let exp = now() + 600;
    let cases: Vec<(String, &str)> = vec![
        ("not-a-jwt".into(), "malformed"),
        ("a.b.c".into(), "bad base64 parts"),
        (
            hs256_jwt(
                hs,
                &format!(r#"{{"sub":"a","exp":{exp}}}"#),
                b"another key entirely, 32+ bytes long",
            ),
            "signed with another key",
        ),
        (
            raw_jwt(
                r#"{"alg":"none","typ":"JWT"}"#,
                &format!(r#"{{"sub":"a","exp":{exp}}}"#),
                b"",
            ),
            "alg none",
        ),
        (
            hs256_jwt(
                r#"{"alg":"HS384","typ":"JWT"}"#,
                &format!(r#"{{"sub":"a","exp":{exp}}}"#),
                &key,
            ),
            "algorithm not pinned (HS384 header)",
        ),
        (
            hs256_jwt(hs, &format!(r#"{{"sub":"a","exp":{}}}"#, now() - 120), &key),
            "expired beyond leeway",
        ),
        (
            hs256_jwt(
                hs,
                &format!(r#"{{"sub":"a","exp":{exp},"nbf":{}}}"#, now() + 300),
                &key,
            ),
            "not yet valid",
        ),
        (hs256_jwt(hs, r#"{"sub":"a"}"#, &key), "missing exp"),
        (
            hs256_jwt(hs, &format!(r#"{{"exp":{exp}}}"#), &key),
            "missing sub",
        ),
        (
            hs256_jwt(hs, &format!(r#"{{"sub":"","exp":{exp}}}"#), &key),
            "empty sub",
        ),
        (
            hs256_jwt(
                r#"{"alg":"HS256","typ":"JWT","crit":["exp"]}"#,
                &format!(r#"{{"sub":"a","exp":{exp}}}"#),
                &key,
            ),
            "crit header",
        ),
        (
            hs256_jwt(
                hs,
                &format!(r#"{{"sub":"a","exp":{exp},"roles":"admin"}}"#),
                &key,
            ),
            "roles not an array",
        ),
    ];
    for (token, why) in &cases {
        assert_invalid_token(&gw, token, why).await;
    }
    // Within leeway (default 30 s) an expired token still passes.
    let recent = hs256_jwt(hs, &format!(r#"{{"sub":"a","exp":{}}}"#, now() - 5), &key);
    let (_, res) = gw.connect(&recent).await.expect("within leeway");
    assert_eq!(res.status(), 101);
}

#[tokio::test]
async fn issuer_and_audience_when_configured() {
    let gw = start(|c, _| {
        c.auth.issuers = vec!["https://idp.example".into()];
        c.auth.audiences = vec!["wsgate".into()];
    })
    .await;
    let key = gw.secret();
    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let exp = now() + 600;
    let good = format!(r#"{{"sub":"a","exp":{exp},"iss":"https://idp.example","aud":"wsgate"}}"#);
    let (_, res) = gw
        .connect(&hs256_jwt(hs, &good, &key))
        .await
        .expect("good token");
    assert_eq!(res.status(), 101);
    // The minted dev token fills iss and aud from the config.
    let (_, res) = gw.connect(&gw.token("a", &[])).await.expect("minted");
    assert_eq!(res.status(), 101);
    for (claims, why) in [
        (
            format!(r#"{{"sub":"a","exp":{exp},"aud":"wsgate"}}"#),
            "missing iss",
        ),
        (
            format!(r#"{{"sub":"a","exp":{exp},"iss":"https://evil","aud":"wsgate"}}"#),
            "wrong iss",
        ),
        (
            format!(r#"{{"sub":"a","exp":{exp},"iss":"https://idp.example"}}"#),
            "missing aud",
        ),
        (
            format!(r#"{{"sub":"a","exp":{exp},"iss":"https://idp.example","aud":"other"}}"#),
            "wrong aud",
        ),
    ] {
        assert_invalid_token(&gw, &hs256_jwt(hs, &claims, &key), why).await;
    }
}

// ---- carriers -------------------------------------------------------------

#[tokio::test]
async fn header_carrier_gets_welcome_and_pong() {
    let gw = gateway().await;
    let token = gw.token("alice", &["member"]);
    let (mut ws, res) = gw.connect(&token).await.expect("upgrade");
    assert_eq!(res.status(), 101);
    assert!(res.headers().get("sec-websocket-protocol").is_none());
    // The answer to a request that carried a token is never cached.
    assert_eq!(
        res.headers().get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-store"[..])
    );
    let welcome = read_json(&mut ws).await;
    assert_eq!(welcome["op"], "welcome");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["heartbeat_ms"], 25_000);
    assert!(welcome["session"].as_str().is_some_and(|s| s.len() == 16));
    assert!(welcome["expires_at"].as_u64().unwrap() > now());

    ws.send(Message::text(r#"{"op":"ping","id":5}"#))
        .await
        .unwrap();
    assert_eq!(
        read_json(&mut ws).await,
        serde_json::json!({"op":"pong","id":5})
    );
    ws.send(Message::text(r#"{"op":"ping"}"#)).await.unwrap();
    assert_eq!(read_json(&mut ws).await, serde_json::json!({"op":"pong"}));
    ws.send(Message::text(r#"{"op":"fly","id":6}"#))
        .await
        .unwrap();
    let err = read_json(&mut ws).await;
    assert_eq!(err["op"], "error");
    assert_eq!(err["id"], 6);
    assert_eq!(err["code"], "bad_request");
    ws.send(Message::text("not json")).await.unwrap();
    let err = read_json(&mut ws).await;
    assert_eq!(err["code"], "bad_request");
    assert!(err.get("id").is_none());
    // Still alive after errors.
    ws.send(Message::text(r#"{"op":"ping","id":7}"#))
        .await
        .unwrap();
    assert_eq!(read_json(&mut ws).await["id"], 7);
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn subprotocol_carrier_echoes_only_wsgate_v1() {
    let gw = gateway().await;
    let token = gw.token("bob", &[]);
    let mut req = gw.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("wsgate.v1, bearer.{token}")).unwrap(),
    );
    let (mut ws, res) = gw.connect_with(req).await.expect("upgrade");
    assert_eq!(res.status(), 101);
    assert_eq!(
        res.headers().get("sec-websocket-protocol").unwrap(),
        "wsgate.v1"
    );
    assert_eq!(read_json(&mut ws).await["user"], "bob");
}

#[tokio::test]
async fn wsgate_v1_is_echoed_with_header_carrier() {
    let gw = gateway().await;
    let token = gw.token("carol", &[]);
    let mut req = gw.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("wsgate.v1"),
    );
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let (_, res) = gw.connect_with(req).await.expect("upgrade");
    assert_eq!(
        res.headers().get("sec-websocket-protocol").unwrap(),
        "wsgate.v1"
    );
}

#[tokio::test]
async fn bearer_subprotocol_without_wsgate_v1_is_400() {
    let gw = gateway().await;
    let token = gw.token("bob", &[]);
    let line = format!("Sec-WebSocket-Protocol: chat, bearer.{token}");
    gw.raw(&gw.upgrade_head("/ws", &[&line]))
        .await
        .assert_refused(400);
}

#[tokio::test]
async fn two_bearer_subprotocols_are_400() {
    let gw = gateway().await;
    let token = gw.token("bob", &[]);
    let line = format!("Sec-WebSocket-Protocol: wsgate.v1, bearer.{token}, bearer.{token}");
    gw.raw(&gw.upgrade_head("/ws", &[&line]))
        .await
        .assert_refused(400);
    // Split across two header lines counts the same.
    let a = format!("Sec-WebSocket-Protocol: wsgate.v1, bearer.{token}");
    let b = format!("Sec-WebSocket-Protocol: bearer.{token}");
    gw.raw(&gw.upgrade_head("/ws", &[&a, &b]))
        .await
        .assert_refused(400);
}

#[tokio::test]
async fn two_carriers_are_401() {
    let gw = start(|c, _| c.auth.query_token = true).await;
    let token = gw.token("bob", &[]);
    let proto = format!("Sec-WebSocket-Protocol: wsgate.v1, bearer.{token}");
    for (target, lines) in [
        ("/ws".to_owned(), vec![bearer(&token), proto.clone()]),
        (format!("/ws?access_token={token}"), vec![bearer(&token)]),
        (format!("/ws?access_token={token}"), vec![proto.clone()]),
        (
            format!("/ws?access_token={token}&access_token={token}"),
            vec![],
        ),
        ("/ws".to_owned(), vec![bearer(&token), bearer(&token)]),
    ] {
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let res = gw.raw(&gw.upgrade_head(&target, &lines)).await;
        res.assert_refused(401);
        assert_eq!(
            res.header("www-authenticate"),
            Some("Bearer error=\"invalid_request\"")
        );
    }
}

#[tokio::test]
async fn query_token_is_refused_while_disabled() {
    let gw = gateway().await;
    let token = gw.token("bob", &[]);
    let res = gw
        .raw(&gw.upgrade_head(&format!("/ws?access_token={token}"), &[]))
        .await;
    res.assert_refused(401);
}

#[tokio::test]
async fn query_token_works_when_enabled() {
    let gw = start(|c, _| c.auth.query_token = true).await;
    let token = gw.token("dave", &[]);
    let url = format!("{}?x=1&access_token={token}", gw.ws_url());
    let req = url.into_client_request().unwrap();
    let (mut ws, res) = gw.connect_with(req).await.expect("upgrade");
    assert_eq!(res.status(), 101);
    assert_eq!(read_json(&mut ws).await["user"], "dave");
}

#[tokio::test]
async fn oversized_token_is_401_before_parsing() {
    let gw = start(|c, _| c.auth.max_token_bytes = 1024).await;
    // A syntactically valid, correctly signed token that is merely too big.
    let pad = "x".repeat(1200);
    let token = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"sub":"a","exp":{},"pad":"{pad}"}}"#, now() + 600),
        &gw.secret(),
    );
    let res = gw.raw(&gw.upgrade_head("/ws", &[&bearer(&token)])).await;
    res.assert_refused(401);
    assert_eq!(
        res.header("www-authenticate"),
        Some("Bearer error=\"invalid_request\"")
    );
}

// ---- after the upgrade ------------------------------------------------------

#[tokio::test]
async fn silent_client_is_dropped_after_heartbeat_and_grace() {
    let gw = start(|c, _| {
        c.websocket.heartbeat_ms = 200;
        c.websocket.heartbeat_grace_ms = 200;
    })
    .await;
    // A client that keeps reading answers the pings and stays.
    let (mut live, _) = gw.connect(&gw.token("live", &[])).await.unwrap();
    assert_eq!(read_json(&mut live).await["heartbeat_ms"], 200);
    let keep_reading = async {
        while let Some(Ok(msg)) = live.next().await {
            assert!(matches!(msg, Message::Ping(_)), "unexpected {msg:?}");
        }
        panic!("a client answering pings was dropped");
    };
    // A client that reads nothing sends no pongs.
    let (mut silent, _) = gw.connect(&gw.token("silent", &[])).await.unwrap();
    assert_eq!(read_json(&mut silent).await["op"], "welcome");
    // Reading until a fixed time is the test: 1.2 s is past the silent
    // client's heartbeat and grace, and within it nothing may end `live`.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(1200), keep_reading).await;
    // Pings queued before the drop may come first; then the stream ends.
    let end = async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Ping(_))) => continue,
                other => return other,
            }
        }
    };
    match tokio::time::timeout(harness::WAIT, end).await.unwrap() {
        None | Some(Err(_)) => {}
        other => panic!("expected the silent client to be dropped, got {other:?}"),
    }
}

#[tokio::test]
async fn client_close_is_answered() {
    let gw = gateway().await;
    let (mut ws, _) = gw.connect(&gw.token("eve", &[])).await.unwrap();
    assert_eq!(read_json(&mut ws).await["op"], "welcome");
    ws.close(None).await.unwrap();
    match tokio::time::timeout(harness::WAIT, ws.next())
        .await
        .unwrap()
    {
        Some(Ok(Message::Close(_))) => {}
        other => panic!("expected the close reply, got {other:?}"),
    }
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    let gw = gateway().await;
    let (mut ws, _) = gw.connect(&gw.token("eve", &[])).await.unwrap();
    assert_eq!(read_json(&mut ws).await["op"], "welcome");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, 1003);
}

#[tokio::test]
async fn oversized_message_closes_1009() {
    let gw = start(|c, _| {
        c.websocket.max_message_bytes = 1024;
        c.websocket.max_frame_bytes = 1024;
    })
    .await;
    let (mut ws, _) = gw.connect(&gw.token("eve", &[])).await.unwrap();
    assert_eq!(read_json(&mut ws).await["op"], "welcome");
    ws.send(Message::text(format!(
        r#"{{"op":"ping","pad":"{}"}}"#,
        "x".repeat(2000)
    )))
    .await
    .unwrap();
    assert_eq!(expect_close(&mut ws).await, 1009);
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001() {
    let gw = gateway().await;
    let (mut ws, _) = gw.connect(&gw.token("eve", &[])).await.unwrap();
    assert_eq!(read_json(&mut ws).await["op"], "welcome");
    gw.begin_stop();
    assert_eq!(expect_close(&mut ws).await, 1001);
    gw.stop().await;
}

#[tokio::test]
async fn drain_spreads_1001_closes_over_the_window() {
    let gw = start(|c, _| c.server.drain_window_ms = 1_500).await;
    let mut sessions = Vec::new();
    for i in 0..8 {
        let (mut ws, _) = gw.connect(&gw.token(&format!("u{i}"), &[])).await.unwrap();
        assert_eq!(read_json(&mut ws).await["op"], "welcome");
        sessions.push(ws);
    }
    let started = std::time::Instant::now();
    gw.begin_stop();
    // Each session is read by its own task, so every close is timed when
    // it arrives, not when the one before it was read.
    let readers: Vec<_> = sessions
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let code = expect_close(&mut ws).await;
                (code, started.elapsed())
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for reader in readers {
        let (code, at) = reader.await.unwrap();
        assert_eq!(code, 1001);
        closed_at.push(at);
    }
    closed_at.sort();
    let (first, last) = (closed_at[0], closed_at[closed_at.len() - 1]);
    assert!(
        last - first >= std::time::Duration::from_millis(500),
        "not spread: {closed_at:?}"
    );
    assert!(
        last <= std::time::Duration::from_millis(3_000),
        "past the window: {closed_at:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_second_signal_closes_every_session_now() {
    let gw = start(|c, _| {
        c.server.drain_grace_ms = 30_000;
        c.server.drain_window_ms = 30_000;
    })
    .await;
    let mut sessions = Vec::new();
    for i in 0..3 {
        let (mut ws, _) = gw.connect(&gw.token(&format!("h{i}"), &[])).await.unwrap();
        assert_eq!(read_json(&mut ws).await["op"], "welcome");
        sessions.push(ws);
    }
    gw.begin_stop();
    // The second signal comes while the drain is under way.
    eventually(WAIT, "/readyz to answer 503 once draining", async || {
        (gw.get("/readyz").await.status == 503).then_some(())
    })
    .await;
    let hurried = std::time::Instant::now();
    gw.handle.hurry();
    for mut ws in sessions {
        assert_eq!(expect_close(&mut ws).await, 1001);
    }
    assert!(hurried.elapsed() < std::time::Duration::from_secs(3));
    gw.stop().await;
}

#[tokio::test]
async fn token_expiry_closes_4001() {
    let gw = start(|c, _| c.auth.leeway_s = 0).await;
    let token = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"sub":"a","exp":{}}}"#, now() + 2),
        &gw.secret(),
    );
    let (mut ws, _) = gw.connect(&token).await.unwrap();
    assert_eq!(read_json(&mut ws).await["op"], "welcome");
    assert_eq!(expect_close(&mut ws).await, 4001);
    // The token that just expired cannot open a new session, even within
    // the same wall-clock second (no welcome/4001 loop for reconnecting
    // clients).
    assert_invalid_token(&gw, &token, "expired a moment ago").await;
}
