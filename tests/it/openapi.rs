//! docs/api.yaml is true: real answers of every endpoint, successes and
//! failures, are recorded and validated against the OpenAPI description
//! (status documented, body by its JSON schema, required headers) by
//! tests/openapi/validate.py with `jsonschema`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use serde_json::{Value as Json, json};

use crate::api::{admin_token, api_token, call};
use crate::harness::{self, Client, start};

#[tokio::test]
async fn every_answer_matches_the_openapi_description() {
    let gw = start(|c, _| {
        c.api.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        // Small enough to reach a 429 quickly, per subject.
        c.api.requests_per_s = 1;
        c.api.requests_burst = 30;
    })
    .await;
    let addr = gw.api.expect("api listener");
    let svc = api_token(&gw, "svc", &["member"]);
    let ops = admin_token(&gw);
    let burst = api_token(&gw, "svc-burst", &["member"]);
    let mut alice = Client::join(&gw, "alice", &["member"]).await;
    alice.subscribe("chat:lobby").await;

    let big = json!({"channel": "chat:lobby", "data": "x".repeat(2 << 20)}).to_string();
    let body = |v: Json| Some(v.to_string().into_bytes());
    // (method, path and query, token, body)
    type Request<'a> = (&'a str, &'a str, Option<&'a str>, Option<Vec<u8>>);
    let requests: Vec<Request> = vec![
        (
            "POST",
            "/api/publish",
            Some(&svc),
            body(json!({"channel": "chat:lobby", "data": {"a": 1}})),
        ),
        (
            "POST",
            "/api/publish",
            Some(&svc),
            body(json!({"channel": "chat:lobby", "data": 1, "idempotency_key": "k1"})),
        ),
        (
            "POST",
            "/api/publish",
            Some(&svc),
            body(json!({"channel": "chat:lobby", "data": 1, "idempotency_key": "k1"})),
        ),
        (
            "POST",
            "/api/publish",
            Some(&svc),
            body(json!({"channel": "chat:lobby"})),
        ),
        (
            "POST",
            "/api/publish",
            Some(&svc),
            Some(b"not json".to_vec()),
        ),
        (
            "POST",
            "/api/publish",
            None,
            body(json!({"channel": "chat:lobby", "data": 1})),
        ),
        (
            "POST",
            "/api/publish",
            Some("a.b.c"),
            body(json!({"channel": "chat:lobby", "data": 1})),
        ),
        (
            "POST",
            "/api/publish",
            Some(&svc),
            body(json!({"channel": "user:alice", "data": 1})),
        ),
        ("POST", "/api/publish", Some(&svc), Some(big.into_bytes())),
        ("GET", "/api/publish", Some(&svc), None),
        (
            "POST",
            "/api/broadcast",
            Some(&svc),
            body(json!({"channels": ["chat:lobby", "announce:all"], "data": 2})),
        ),
        (
            "POST",
            "/api/broadcast",
            Some(&svc),
            body(json!({"data": 2})),
        ),
        (
            "GET",
            "/api/history?channel=chat%3Alobby&limit=2",
            Some(&svc),
            None,
        ),
        (
            "GET",
            "/api/history?channel=chat%3Alobby&limit=0",
            Some(&svc),
            None,
        ),
        ("GET", "/api/history?channel=user%3Asvc", Some(&svc), None),
        ("GET", "/api/history?channel=user%3Aalice", Some(&svc), None),
        ("POST", "/api/history", Some(&svc), None),
        (
            "GET",
            "/api/presence?channel=chat%3Alobby",
            Some(&svc),
            None,
        ),
        ("GET", "/api/presence?channel=user%3Asvc", Some(&svc), None),
        (
            "GET",
            "/api/presence?channel=user%3Aalice",
            Some(&svc),
            None,
        ),
        ("GET", "/api/presence?channel=", Some(&svc), None),
        (
            "POST",
            "/api/disconnect",
            Some(&svc),
            body(json!({"user": "alice"})),
        ),
        (
            "POST",
            "/api/disconnect",
            Some(&ops),
            body(json!({"user": ""})),
        ),
        (
            "POST",
            "/api/unsubscribe",
            Some(&ops),
            body(json!({"user": "alice", "channel": "chat:lobby"})),
        ),
        (
            "POST",
            "/api/revoke",
            Some(&ops),
            body(json!({"user": "nobody"})),
        ),
        (
            "POST",
            "/api/disconnect",
            Some(&ops),
            body(json!({"user": "alice"})),
        ),
        ("GET", "/api/channels?prefix=chat%3A", Some(&ops), None),
        ("GET", "/api/channels", Some(&svc), None),
        ("GET", "/api/disconnect", Some(&ops), None),
    ];
    let mut records = Vec::new();
    let mut seen = BTreeSet::new();
    let mut record = |method: &str, path: &str, answer: crate::api::Answer| {
        let path = path.split('?').next().unwrap_or(path).to_owned();
        seen.insert((path.clone(), answer.status));
        let headers: BTreeMap<String, String> = answer
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        records.push(json!({
            "method": method,
            "path": path,
            "status": answer.status,
            "body": answer.body,
            "headers": headers,
        }));
    };
    for (method, path, token, body) in requests {
        let answer = call(&gw, addr, method, path, token, body).await;
        record(method, path, answer);
    }
    // Past one subject's burst: 429 with Retry-After.
    let mut limited = false;
    for _ in 0..40 {
        let answer = call(
            &gw,
            addr,
            "POST",
            "/api/publish",
            Some(&burst),
            body(json!({})),
        )
        .await;
        if answer.status == 429 {
            record("POST", "/api/publish", answer);
            limited = true;
            break;
        }
    }
    assert!(limited, "no 429 within 40 requests of one subject");

    // The answers above cover these (path, status) pairs: a change that
    // stops producing one is a change to this test, not a silent gap.
    for (path, status) in [
        ("/api/publish", 200),
        ("/api/publish", 400),
        ("/api/publish", 401),
        ("/api/publish", 403),
        ("/api/publish", 405),
        ("/api/publish", 413),
        ("/api/publish", 429),
        ("/api/broadcast", 200),
        ("/api/broadcast", 400),
        ("/api/history", 200),
        ("/api/history", 400),
        ("/api/history", 404),
        ("/api/presence", 200),
        ("/api/presence", 400),
        ("/api/presence", 403),
        ("/api/presence", 404),
        ("/api/disconnect", 200),
        ("/api/disconnect", 403),
        ("/api/unsubscribe", 200),
        ("/api/revoke", 200),
        ("/api/channels", 200),
        ("/api/channels", 403),
    ] {
        assert!(
            seen.contains(&(path.to_owned(), status)),
            "no {status} answer from {path}: {seen:?}"
        );
    }

    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    for r in &records {
        writeln!(file, "{r}").expect("write record");
    }
    let root = harness::repo_root();
    let out = harness::python_with("jsonschema")
        .arg(root.join("tests/openapi/validate.py"))
        .arg(root.join("docs/api.yaml"))
        .arg(file.path())
        .output()
        .expect("run validate.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "docs/api.yaml disagrees:\n{text}");
    assert!(
        text.contains(&format!("validated {} answers", records.len())),
        "{text}"
    );
    drop(alice);
}
