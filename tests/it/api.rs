//! The HTTP API for backends (protocol.md §7) over real TLS: API tokens
//! by audience (and never in place of client tokens), publish and
//! broadcast through the same core as clients (so `seq` and replicas just
//! work), history, and precise failures for every bad request.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::ServerName;
use serde_json::{Value as Json, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use wsgate::auth::mint::{self, TokenRequest};

use crate::cluster::{RedisServer, replicas};
use crate::harness::{Client, Endpoint, Gateway, WAIT, hs256_jwt, now, start};

/// A gateway with the API on 127.0.0.1.
pub(crate) async fn gateway() -> Gateway {
    start(|c, _| {
        c.api.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await
}

/// An API token: the API audience, with `roles`.
pub(crate) fn api_token(gw: &Endpoint, sub: &str, roles: &[&str]) -> String {
    let mut claims = serde_json::Map::new();
    claims.insert("aud".into(), gw.config.api.audience.clone().into());
    let request = TokenRequest {
        sub: sub.to_owned(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        ttl: Duration::from_secs(600),
        claims,
        kid: None,
    };
    mint::mint(&gw.config, &request, None).expect("mint")
}

/// One answer: status, headers, JSON body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Json,
}

/// One HTTPS request to the API at `addr`.
pub(crate) async fn call(
    gw: &Endpoint,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Answer {
    let tcp = TcpStream::connect(addr).await.expect("connect api");
    let tls = TlsConnector::from(gw.client.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("tls to the api");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("http handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let res = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("api answer in time")
        .expect("api answer");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(gw: &Gateway, path: &str, token: &str, body: &Json) -> Answer {
    let addr = gw.api.expect("api listener");
    call(
        gw,
        addr,
        "POST",
        path,
        Some(token),
        Some(body.to_string().into_bytes()),
    )
    .await
}

/// The `error` of a failed answer: its code, after checking the status.
fn error(answer: &Answer, status: u16) -> String {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert!(
        answer.body["error"]["message"].is_string(),
        "{}",
        answer.body
    );
    answer.body["error"]["code"]
        .as_str()
        .expect("code")
        .to_owned()
}

#[tokio::test]
async fn a_backend_publishes_and_subscribers_get_it_from_the_service() {
    let gw = gateway().await;
    let service = api_token(&gw, "orders", &["member"]);
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    alice.subscribe("chat:lobby").await;
    alice.subscribe("user:alice").await;

    let first = post(
        &gw,
        "/api/publish",
        &service,
        &json!({"channel": "chat:lobby", "data": {"text": "hi"}}),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(
        first.body["epoch"].is_string(),
        "chat:* keeps history: {}",
        first.body
    );
    let second = post(
        &gw,
        "/api/publish",
        &service,
        &json!({"channel": "chat:lobby", "data": 2}),
    )
    .await;
    assert_eq!(second.body["seq"], first.body["seq"].as_u64().unwrap() + 1);
    for (data, seq) in [(json!({"text": "hi"}), &first), (json!(2), &second)] {
        let m = alice.next().await;
        assert_eq!(
            (
                m["op"].as_str(),
                m["from"].as_str(),
                &m["data"],
                m["seq"].as_u64()
            ),
            (
                Some("message"),
                Some("orders"),
                &data,
                seq.body["seq"].as_u64()
            )
        );
    }
    // A user's own inbox: the policy's `user:{sub}` is about the token's
    // sub, so a service needs a rule for it (none in the default policy).
    let inbox = post(
        &gw,
        "/api/publish",
        &service,
        &json!({"channel": "user:alice", "data": 1}),
    )
    .await;
    assert_eq!(error(&inbox, 403), "forbidden");

    // Broadcast: one answer per channel, in order; failures are per channel.
    let answer = post(
        &gw,
        "/api/broadcast",
        &service,
        &json!({"channels": ["chat:lobby", "announce:all", "chat:other"], "data": "all"}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let results = answer.body["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["channel"], "chat:lobby");
    assert_eq!(results[0]["seq"], second.body["seq"].as_u64().unwrap() + 1);
    assert_eq!(
        results[1]["error"]["code"],
        "forbidden",
        "{answer:?}",
        answer = answer.body
    );
    assert_eq!(results[2]["seq"], 1);
    assert_eq!(alice.next().await["data"], "all");

    // History through the API: the fields of the history op's ok.
    let addr = gw.api.unwrap();
    let page = call(
        &gw,
        addr,
        "GET",
        "/api/history?channel=chat%3Alobby&limit=2",
        Some(&service),
        None,
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.body["seq"], results[0]["seq"]);
    assert_eq!(page.body["messages"][1]["from"], "orders");
    assert_eq!(page.body["messages"][1]["data"], "all");
    assert!(page.body.get("op").is_none() && page.body.get("id").is_none());
    assert_eq!(
        gw.metric("wsgate_api_requests_total{endpoint=\"publish\",status=\"200\"}")
            .await,
        2
    );
}

#[tokio::test]
async fn api_and_client_tokens_never_stand_in_for_each_other() {
    let gw = gateway().await;
    let addr = gw.api.unwrap();
    let body = || {
        Some(
            json!({"channel": "chat:a", "data": 1})
                .to_string()
                .into_bytes(),
        )
    };
    // A client token at the API.
    let client = gw.token("alice", &["member"]);
    let a = call(&gw, addr, "POST", "/api/publish", Some(&client), body()).await;
    assert_eq!(error(&a, 401), "invalid_token");
    assert_eq!(
        a.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer error=\"invalid_token\"")
    );
    // An API token at /ws, and in a session's refresh.
    let service = api_token(&gw, "alice", &["member"]);
    gw.raw(&gw.upgrade_head("/ws", &[&format!("Authorization: Bearer {service}")]))
        .await
        .assert_refused(401);
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    let reply = alice
        .error(json!({"op": "refresh", "token": service}), "invalid_token")
        .await;
    assert!(
        reply["message"].as_str().unwrap().contains("audience"),
        "{reply}"
    );
    // No token, a bad signature, an expired token.
    let none = call(&gw, addr, "POST", "/api/publish", None, body()).await;
    assert_eq!(error(&none, 401), "invalid_token");
    let forged = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"sub":"x","exp":{},"aud":"wsgate-api"}}"#, now() + 60),
        b"another key entirely, 32 bytes..",
    );
    let bad = call(&gw, addr, "POST", "/api/publish", Some(&forged), body()).await;
    assert_eq!(error(&bad, 401), "invalid_token");
    let expired = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"sub":"x","exp":{},"aud":"wsgate-api"}}"#, now() - 3600),
        &gw.secret(),
    );
    let old = call(&gw, addr, "POST", "/api/publish", Some(&expired), body()).await;
    assert_eq!(error(&old, 401), "invalid_token");
    assert!(
        old.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
}

#[tokio::test]
async fn bad_requests_get_precise_answers() {
    let gw = gateway().await;
    let addr = gw.api.unwrap();
    let service = api_token(&gw, "svc", &["member"]);
    let raw = |body: &str| Some(body.as_bytes().to_vec());
    // Path, body, status, code, and a word the message must hold.
    type Case = (
        &'static str,
        Option<Vec<u8>>,
        u16,
        &'static str,
        &'static str,
    );
    let cases: [Case; 6] = [
        (
            "/api/publish",
            raw("not json"),
            400,
            "bad_request",
            "not JSON",
        ),
        (
            "/api/publish",
            raw(r#"{"channel":5,"data":1}"#),
            400,
            "bad_request",
            "channel",
        ),
        (
            "/api/publish",
            raw(r#"{"channel":"chat:a"}"#),
            400,
            "bad_request",
            "data",
        ),
        (
            "/api/publish",
            raw(r#"{"channel":"chat a","data":1}"#),
            400,
            "bad_request",
            "chat a",
        ),
        (
            "/api/broadcast",
            raw(r#"{"channels":[],"data":1}"#),
            400,
            "bad_request",
            "channels",
        ),
        ("/api/nothing", raw("{}"), 404, "not_found", "endpoint"),
    ];
    for (path, body, status, code, says) in cases {
        let a = call(&gw, addr, "POST", path, Some(&service), body).await;
        assert_eq!(error(&a, status), code, "{path}: {}", a.body);
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
    }
    // Over the publish size limit: 413, without reading it all.
    let big = format!(
        r#"{{"channel":"chat:a","data":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let a = call(
        &gw,
        addr,
        "POST",
        "/api/publish",
        Some(&service),
        Some(big.into_bytes()),
    )
    .await;
    assert_eq!(error(&a, 413), "too_large");
    // A wrong method: 405 with Allow.
    let a = call(&gw, addr, "GET", "/api/publish", Some(&service), None).await;
    assert_eq!(a.status, 405);
    assert_eq!(
        a.headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    // History: a missing channel, a bad limit, a channel without history.
    for (query, status, code) in [
        ("", 400, "bad_request"),
        ("?channel=chat:a&limit=0", 400, "bad_request"),
        ("?channel=user:svc", 404, "not_found"),
    ] {
        let a = call(
            &gw,
            addr,
            "GET",
            &format!("/api/history{query}"),
            Some(&service),
            None,
        )
        .await;
        assert_eq!(error(&a, status), code, "{query}");
    }
    // Nothing was published by any of these.
    assert_eq!(
        gw.metric("wsgate_api_requests_total{endpoint=\"publish\",status=\"200\"}")
            .await,
        0
    );
}

#[tokio::test]
async fn a_backend_on_one_replica_reaches_subscribers_on_the_other() {
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    // The API of a second gateway in front of the same Redis and secret.
    let api = start(|c, _| {
        c.cluster.redis_url = Some(redis.url());
        c.auth.hmac_secret_file = a.config.auth.hmac_secret_file.clone();
        c.api.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        // The shipped policy's commented `service` rule, uncommented.
        let rule: String = wsgate::policy::DEFAULT_POLICY
            .lines()
            .skip_while(|l| !l.starts_with("# Uncomment and narrow"))
            .skip(1)
            .filter_map(|l| l.strip_prefix('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(rule.contains(r#"roles = ["service"]"#), "{rule}");
        std::fs::write(c.policy.dir.join("service.toml"), rule).expect("service policy");
    })
    .await;
    let service = api_token(&api, "orders", &["service"]);
    let mut on_a = Client::join(&a, "alice", &["member"]).await;
    let mut on_b = Client::join(&b, "bob", &["member"]).await;
    on_a.subscribe("chat:lobby").await;
    on_b.subscribe("chat:lobby").await;
    on_a.subscribe("user:alice").await;
    let mut seqs = Vec::new();
    for n in 0..3 {
        let answer = post(
            &api,
            "/api/publish",
            &service,
            &json!({"channel": "chat:lobby", "data": n}),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        seqs.push(answer.body["seq"].as_u64().unwrap());
    }
    assert_eq!(
        seqs,
        [seqs[0], seqs[0] + 1, seqs[0] + 2],
        "consecutive across replicas"
    );
    for client in [&mut on_a, &mut on_b] {
        for (n, seq) in seqs.iter().enumerate() {
            let m = client.next().await;
            assert_eq!(
                (m["from"].as_str(), m["seq"].as_u64(), &m["data"]),
                (Some("orders"), Some(*seq), &json!(n))
            );
        }
    }
    // A user's own channel, allowed by the `service` rule only: "your
    // order shipped" reaches alice on the other replica.
    let answer = post(
        &api,
        "/api/publish",
        &service,
        &json!({"channel": "user:alice", "data": {"text": "your order shipped"}}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let m = on_a.next().await;
    assert_eq!(
        (
            m["channel"].as_str(),
            m["from"].as_str(),
            &m["data"]["text"]
        ),
        (
            Some("user:alice"),
            Some("orders"),
            &json!("your order shipped")
        )
    );
    // And the member role alone may not.
    let member = api_token(&api, "orders", &["member"]);
    let refused = post(
        &api,
        "/api/publish",
        &member,
        &json!({"channel": "user:alice", "data": 1}),
    )
    .await;
    assert_eq!(error(&refused, 403), "forbidden");
}

/// An admin API token.
pub(crate) fn admin_token(gw: &Endpoint) -> String {
    api_token(gw, "ops", &["admin"])
}

#[tokio::test]
async fn disconnect_revoke_and_unsubscribe_reach_exactly_that_user() {
    let gw = gateway().await;
    let ops = admin_token(&gw);
    let mut alice1 = Client::join(&gw, "alice", &["member"]).await;
    let mut alice2 = Client::join(&gw, "alice", &["member"]).await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    for c in [&mut alice1, &mut alice2, &mut bob] {
        c.subscribe("chat:a").await;
        c.subscribe("chat:b").await;
    }
    // Management needs the admin role.
    let member = api_token(&gw, "svc", &["member"]);
    let a = post(&gw, "/api/disconnect", &member, &json!({"user": "alice"})).await;
    assert_eq!(error(&a, 403), "forbidden");

    // unsubscribe: that channel, that user, with the forbidden error.
    let a = post(
        &gw,
        "/api/unsubscribe",
        &ops,
        &json!({"user": "alice", "channel": "chat:a"}),
    )
    .await;
    assert_eq!((a.status, &a.body), (200, &json!({"sessions": 2})));
    for c in [&mut alice1, &mut alice2] {
        let e = c.next().await;
        assert_eq!(
            (e["op"].as_str(), e["code"].as_str(), e["channel"].as_str()),
            (Some("error"), Some("forbidden"), Some("chat:a"))
        );
        assert!(e.get("id").is_none(), "{e}");
    }
    let publisher = api_token(&gw, "svc", &["member"]);
    post(
        &gw,
        "/api/publish",
        &publisher,
        &json!({"channel": "chat:a", "data": 1}),
    )
    .await;
    post(
        &gw,
        "/api/publish",
        &publisher,
        &json!({"channel": "chat:b", "data": 2}),
    )
    .await;
    assert_eq!(bob.next().await["data"], 1);
    assert_eq!(bob.next().await["data"], 2);
    for c in [&mut alice1, &mut alice2] {
        assert_eq!(c.next().await["data"], 2, "chat:a ended, chat:b goes on");
    }
    let channels = call(
        &gw,
        gw.api.unwrap(),
        "GET",
        "/api/channels?prefix=chat:",
        Some(&ops),
        None,
    )
    .await;
    assert_eq!(
        channels.body,
        json!({"channels": [{"channel": "chat:a", "subscribers": 1}, {"channel": "chat:b", "subscribers": 3}]})
    );

    // disconnect: alice's sessions close with 4003, bob's stay.
    let a = post(&gw, "/api/disconnect", &ops, &json!({"user": "alice"})).await;
    assert_eq!(a.body, json!({"sessions": 2}));
    for c in [&mut alice1, &mut alice2] {
        assert_eq!(crate::harness::expect_close(&mut c.ws).await, 4003);
    }
    // Bob is still here.
    assert!(bob.settle().await.is_empty());
}

#[tokio::test]
async fn revoke_refuses_older_tokens_at_ws_and_in_refresh() {
    let gw = gateway().await;
    let ops = admin_token(&gw);
    let old = gw.token("alice", &["member"]);
    let mut alice = Client::join_with(&gw, &old, "alice").await;
    let mut bob = Client::join(&gw, "bob", &["member"]).await;
    let a = post(&gw, "/api/revoke", &ops, &json!({"user": "alice"})).await;
    assert_eq!(a.body, json!({"sessions": 1}));
    assert_eq!(crate::harness::expect_close(&mut alice.ws).await, 4003);
    // Her token from before is refused at /ws ...
    gw.raw(&gw.upgrade_head("/ws", &[&format!("Authorization: Bearer {old}")]))
        .await
        .assert_refused(401);
    assert_eq!(
        gw.metric("wsgate_auth_failures_total{reason=\"revoked\"}")
            .await,
        1
    );
    assert!(bob.settle().await.is_empty(), "bob's session stays");
    // A token issued after the revocation works.
    let later = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(
            r#"{{"sub":"alice","roles":["member"],"iat":{},"exp":{}}}"#,
            now() + 1,
            now() + 600
        ),
        &gw.secret(),
    );
    let mut back = Client::join_with(&gw, &later, "alice").await;
    back.subscribe("chat:x").await;
    // ... and in a refresh with the old token on her new session.
    let reply = back
        .error(json!({"op": "refresh", "token": old}), "invalid_token")
        .await;
    assert!(
        reply["message"].as_str().unwrap().contains("revoked"),
        "{reply}"
    );
}

#[tokio::test]
async fn an_idempotency_key_publishes_once_across_replicas() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let a = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.cluster.reconnect_max_ms = 200;
        c.api.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let b = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.cluster.reconnect_max_ms = 200;
        c.auth.hmac_secret_file = a.config.auth.hmac_secret_file.clone();
        c.api.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    crate::cluster::wait_ready(&a, 200).await;
    crate::cluster::wait_ready(&b, 200).await;
    let service = api_token(&a, "orders", &["member"]);
    let mut alice = Client::join(&a, "alice", &["member"]).await;
    alice.subscribe("chat:orders").await;
    let body = json!({"channel": "chat:orders", "data": {"order": 7}, "idempotency_key": "order-7-shipped"});
    let first = post(&a, "/api/publish", &service, &body).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = post(&b, "/api/publish", &service, &body).await;
    assert_eq!(
        (again.status, &again.body),
        (200, &first.body),
        "the first answer, again"
    );
    // Another key publishes.
    let other = json!({"channel": "chat:orders", "data": {"order": 8}, "idempotency_key": "order-8-shipped"});
    let second = post(&b, "/api/publish", &service, &other).await;
    assert_eq!(second.body["seq"], first.body["seq"].as_u64().unwrap() + 1);
    assert_eq!(alice.next().await["data"], json!({"order": 7}));
    assert_eq!(
        alice.next().await["data"],
        json!({"order": 8}),
        "7 was delivered once"
    );
    let long = json!({"channel": "chat:orders", "data": 1, "idempotency_key": "k".repeat(201)});
    assert_eq!(
        error(&post(&a, "/api/publish", &service, &long).await, 400),
        "bad_request"
    );

    // Redis down: 503, and nothing was published.
    redis.stop();
    crate::cluster::wait_ready(&a, 503).await;
    let down = post(
        &a,
        "/api/publish",
        &service,
        &json!({"channel": "chat:orders", "data": 9}),
    )
    .await;
    assert_eq!(error(&down, 503), "unavailable");
}

#[tokio::test]
async fn an_idempotency_key_publishes_once_on_one_gateway() {
    let gw = gateway().await;
    let service = api_token(&gw, "orders", &["member"]);
    let body = json!({"channel": "chat:x", "data": 1, "idempotency_key": "k1"});
    let first = post(&gw, "/api/publish", &service, &body).await;
    let again = post(&gw, "/api/publish", &service, &body).await;
    assert_eq!(again.body, first.body);
    // The key belongs to the token's subject: another service's same key
    // is its own.
    let other = api_token(&gw, "billing", &["member"]);
    let theirs = post(&gw, "/api/publish", &other, &body).await;
    assert_eq!(theirs.body["seq"], first.body["seq"].as_u64().unwrap() + 1);
}

#[tokio::test]
async fn management_reaches_every_replica() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.api.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let b = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.auth.hmac_secret_file = a.config.auth.hmac_secret_file.clone();
    })
    .await;
    crate::cluster::wait_ready(&a, 200).await;
    crate::cluster::wait_ready(&b, 200).await;
    let ops = admin_token(&a);
    let old = a.token("alice", &["member"]);
    let mut alice_a = Client::join_with(&a, &old, "alice").await;
    let mut alice_b = Client::join_with(&b, &old, "alice").await;
    let mut bob_b = Client::join(&b, "bob", &["member"]).await;
    alice_a.subscribe("chat:a").await;
    alice_b.subscribe("chat:a").await;
    bob_b.subscribe("chat:a").await;
    bob_b.subscribe("chat:b").await;

    // Channels counted over both replicas.
    let channels = call(
        &a,
        a.api.unwrap(),
        "GET",
        "/api/channels?prefix=chat",
        Some(&ops),
        None,
    )
    .await;
    assert_eq!(
        channels.body,
        json!({"channels": [{"channel": "chat:a", "subscribers": 3}, {"channel": "chat:b", "subscribers": 1}]})
    );
    // Unsubscribe on both, for alice only.
    let a1 = post(
        &a,
        "/api/unsubscribe",
        &ops,
        &json!({"user": "alice", "channel": "chat:a"}),
    )
    .await;
    assert_eq!(a1.body, json!({"sessions": 2}));
    for c in [&mut alice_a, &mut alice_b] {
        assert_eq!(c.next().await["code"], "forbidden");
    }
    // Revoke: both of her sessions close with 4003; her old token is
    // refused on the replica that did not take the request.
    let r = post(&a, "/api/revoke", &ops, &json!({"user": "alice"})).await;
    assert_eq!(r.body, json!({"sessions": 2}));
    for c in [&mut alice_a, &mut alice_b] {
        assert_eq!(crate::harness::expect_close(&mut c.ws).await, 4003);
    }
    b.raw(&b.upgrade_head("/ws", &[&format!("Authorization: Bearer {old}")]))
        .await
        .assert_refused(401);
    assert!(bob_b.settle().await.is_empty(), "bob's session stays");

    // A replica started after the revocation reads it from Redis.
    let late = start(|c, _| {
        c.cluster.redis_url = Some(url.clone());
        c.auth.hmac_secret_file = a.config.auth.hmac_secret_file.clone();
    })
    .await;
    crate::cluster::wait_ready(&late, 200).await;
    crate::harness::eventually(
        WAIT,
        "the late replica refusing alice's old token",
        async || {
            let res = late
                .raw(&late.upgrade_head("/ws", &[&format!("Authorization: Bearer {old}")]))
                .await;
            (res.status == 401).then_some(())
        },
    )
    .await;
    // A token issued after the revocation second works there.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = late.token("alice", &["member"]);
    assert!(
        late.connect(&fresh).await.is_ok(),
        "a newer token is accepted"
    );
}

#[tokio::test]
async fn every_request_is_logged_with_its_subject_and_never_its_token() {
    let gw = gateway().await;
    let marker = "APICANARYq8RZ";
    let mut claims = serde_json::Map::new();
    claims.insert("aud".into(), gw.config.api.audience.clone().into());
    claims.insert("note".into(), marker.into());
    let token = mint::mint(
        &gw.config,
        &TokenRequest {
            sub: "audit-svc".into(),
            roles: vec!["member".into()],
            ttl: Duration::from_secs(600),
            claims,
            kid: None,
        },
        None,
    )
    .expect("mint");
    let ok = post(
        &gw,
        "/api/publish",
        &token,
        &json!({"channel": "chat:lobby", "data": "hello"}),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // Refused before the subject is known: a forged token quoting the marker.
    let forged = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"sub":"{marker}","exp":{}}}"#, now() + 60),
        b"not the key not the key not the key",
    );
    let refused = post(&gw, "/api/publish", &forged, &json!({})).await;
    assert_eq!(error(&refused, 401), "invalid_token");

    let logs = crate::harness::eventually(WAIT, "both access log lines", async || {
        let logs = crate::harness::captured_logs();
        let lines: Vec<String> = logs
            .lines()
            .filter(|l| l.contains("api request"))
            .map(str::to_owned)
            .collect();
        let served = lines
            .iter()
            .any(|l| l.contains("audit-svc") && l.contains("status=200") && l.contains("publish"));
        let denied = lines
            .iter()
            .any(|l| l.contains("status=401") && l.contains("duration_us="));
        (served && denied).then_some(logs)
    })
    .await;
    assert!(
        !logs.contains(marker),
        "a token or its claims reached the logs"
    );
    for part in token.split('.').chain(forged.split('.')) {
        assert!(!logs.contains(part), "a token segment reached the logs");
    }
}
