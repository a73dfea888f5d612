//! Tokens never reach the logs: with the whole process logging at trace
//! level, a canary token sent through every carrier and refusal path, and
//! a live session, appears in no captured line.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{self, WAIT, bearer, eventually, hs256_jwt, now, start};

#[tokio::test]
async fn canary_token_never_appears_in_logs() {
    let gw = start(|c, _| c.server.allowed_origins = vec!["https://ok.example".into()]).await;
    let key = gw.secret();
    let marker = "CANARYxq7TOKENzz9";
    // A well-formed token whose claims carry the marker, valid and invalid
    // variants, so every path from parsing to the session sees it.
    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let valid = hs256_jwt(
        hs,
        &format!(
            r#"{{"sub":"canary-user","exp":{},"note":"{marker}"}}"#,
            now() + 600
        ),
        &key,
    );
    let expired = hs256_jwt(
        hs,
        &format!(r#"{{"sub":"x","exp":1,"note":"{marker}"}}"#),
        &key,
    );
    let forged = hs256_jwt(
        hs,
        &format!(r#"{{"sub":"x","exp":{},"n":"{marker}"}}"#, now() + 60),
        b"wrong key wrong key wrong key wrong",
    );
    let garbage = format!("{marker}.{marker}.{marker}");
    let huge = format!("{marker}{}", "A".repeat(9000));
    let canaries: Vec<String> = [&valid, &expired, &forged, &garbage]
        .iter()
        .map(|t| (*t).clone())
        .collect();

    for token in canaries.iter().chain(std::iter::once(&huge)) {
        let auth = bearer(token);
        let proto = format!("Sec-WebSocket-Protocol: wsgate.v1, bearer.{token}");
        let lone_proto = format!("Sec-WebSocket-Protocol: bearer.{token}");
        let query = format!("/ws?access_token={token}");
        let heads = [
            gw.upgrade_head("/ws", &[&auth]),
            gw.upgrade_head("/ws", &[&proto]),
            gw.upgrade_head("/ws", &[&lone_proto]),
            gw.upgrade_head("/ws", &[&auth, &proto]),
            gw.upgrade_head(&query, &[]),
            gw.upgrade_head("/ws", &[&auth, "Origin: https://evil.example"]),
            gw.upgrade_head("/ws", &[&auth])
                .replace("Version: 13", "Version: 8"),
            gw.upgrade_head("/nowhere", &[&auth]),
        ];
        // The valid token passes through the first two on its own; skip them.
        let skip = if *token == valid { 2 } else { 0 };
        for head in &heads[skip..] {
            let res = gw.raw(head).await;
            assert_ne!(res.status, 101, "{res:?}");
            assert!(
                !res.body.contains(marker),
                "token echoed in a response body"
            );
            assert!(
                res.headers.iter().all(|(_, v)| !v.contains(marker)),
                "token in a response header"
            );
        }
    }

    // A live session with the marker in its token, plus a frame quoting it.
    let (mut ws, res) = gw.connect(&valid).await.expect("upgrade");
    assert!(
        res.headers()
            .values()
            .all(|v| !v.to_str().unwrap_or("").contains(&valid))
    );
    ws.send(Message::text(format!(r#"{{"op":"{marker}","id":1}}"#)))
        .await
        .unwrap();
    let _ = tokio::time::timeout(WAIT, ws.next()).await;
    ws.send(Message::binary(valid.clone().into_bytes()))
        .await
        .unwrap();
    let _ = tokio::time::timeout(WAIT, ws.next()).await;

    // Its `session closed` line is the last thing the session logs.
    let logs = eventually(
        WAIT,
        "the canary session's `session closed` line",
        async || {
            let logs = harness::captured_logs();
            logs.lines()
                .any(|l| l.contains("user=canary-user") && l.contains("session closed"))
                .then_some(logs)
        },
    )
    .await;
    assert!(
        logs.contains("request refused"),
        "trace capture is not working"
    );
    for token in &canaries {
        assert!(
            !logs.contains(token.as_str()),
            "a token appeared in the logs"
        );
    }
    assert!(!logs.contains(marker), "the canary appeared in the logs");
    let parts: Vec<&str> = valid.split('.').collect();
    for part in parts {
        assert!(!logs.contains(part), "a token segment appeared in the logs");
    }
    assert!(!logs.contains(&huge[..200]));
}
