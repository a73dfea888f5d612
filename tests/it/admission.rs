//! Admission limits: open connections per address, new connections per
//! second per address and globally, and failed authentications per
//! address, each answered with its status and `Retry-After` and each
//! leaving other addresses alone. Client addresses are 127.0.0.x.

use std::net::IpAddr;
use std::time::Duration;

use crate::harness::{Gateway, LOCAL, RawResponse, WAIT, bearer, eventually, metric, start};

fn addr(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

async fn upgrade_from(gw: &Gateway, source: IpAddr, token: &str) -> RawResponse {
    gw.raw_from(source, &gw.upgrade_head("/ws", &[&bearer(token)]))
        .await
}

/// Reads one metric, scraped from an address no test limits.
async fn scraped(gw: &Gateway, series: &str) -> u64 {
    metric(&gw.metrics_from(addr(250)).await, series)
}

#[tokio::test]
async fn open_connections_per_address_are_capped_with_429() {
    let gw = start(|c, _| {
        c.admission.max_connections_per_address = 2;
        c.server.retry_after_s = 9;
    })
    .await;
    let token = gw.token("alice", &[]);
    let (first, _) = gw.connect(&token).await.expect("first");
    let (_second, _) = gw.connect(&token).await.expect("second");

    let res = upgrade_from(&gw, LOCAL, &token).await;
    res.assert_refused(429);
    assert_eq!(res.header("retry-after"), Some("9"));
    assert!(res.body.contains("too many connections from this address"));
    // Within the same second the address is not answered again: the
    // connection is closed before any TLS work.
    assert!(gw.tls_from(LOCAL).await.is_err(), "second refusal got TLS");
    // Other addresses are unaffected.
    let other = gw.bearer_request(&token);
    gw.connect_from(addr(2), other)
        .await
        .expect("other address");

    drop(first);
    eventually(WAIT, "the slot to be released", async || {
        gw.connect(&token).await.ok()
    })
    .await;
    assert_eq!(
        scraped(&gw, "wsgate_upgrades_total{result=\"address_limit\"}").await,
        1
    );
    assert!(scraped(&gw, "wsgate_admission_dropped_total").await >= 1);
}

#[tokio::test]
async fn new_connections_per_address_are_rate_limited_with_429() {
    let gw = start(|c, _| {
        c.admission.address_new_connections_per_s = 1;
        c.admission.address_new_connections_burst = 3;
    })
    .await;
    let token = gw.token("alice", &[]);
    let source = addr(3);
    for _ in 0..3 {
        upgrade_from(&gw, source, "bad").await.assert_refused(401);
    }
    let res = upgrade_from(&gw, source, &token).await;
    res.assert_refused(429);
    assert_eq!(res.header("retry-after"), Some("1"));
    // Another address has its own bucket.
    gw.connect_from(addr(4), gw.bearer_request(&token))
        .await
        .expect("other address");
    // A token comes back after a second. A sleep: time refilling the
    // bucket is the subject (and a probe from `source` would spend it).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gw.connect_from(source, gw.bearer_request(&token))
        .await
        .expect("after the refill");
}

#[tokio::test]
async fn global_new_connection_rate_answers_503() {
    let gw = start(|c, _| {
        c.admission.new_connections_per_s = 2;
        c.admission.new_connections_burst = 2;
    })
    .await;
    let token = gw.token("alice", &[]);
    gw.connect_from(addr(5), gw.bearer_request(&token))
        .await
        .expect("first");
    gw.connect_from(addr(6), gw.bearer_request(&token))
        .await
        .expect("second");
    let res = upgrade_from(&gw, addr(7), &token).await;
    res.assert_refused(503);
    assert_eq!(res.header("retry-after"), Some("1"));
    assert!(res.body.contains("too many new connections"));
}

#[tokio::test]
async fn failed_authentications_block_the_address_before_signature_checks() {
    let gw = start(|c, _| c.admission.address_failed_auths_per_min = 3).await;
    let token = gw.token("alice", &[]);
    let source = addr(8);
    let forged = crate::harness::forged_token();
    for _ in 0..3 {
        upgrade_from(&gw, source, &forged).await.assert_refused(401);
    }
    let signature_failures = scraped(&gw, "wsgate_auth_failures_total{reason=\"signature\"}").await;
    assert_eq!(signature_failures, 3);
    // Even a valid token is refused now, and without a signature check.
    let res = upgrade_from(&gw, source, &token).await;
    res.assert_refused(429);
    // 3 per minute: the next attempt is 20 s away.
    assert_eq!(res.header("retry-after"), Some("20"));
    assert!(res.body.contains("failed authentications"));
    upgrade_from(&gw, source, &forged).await.assert_refused(429);
    assert_eq!(
        scraped(&gw, "wsgate_auth_failures_total{reason=\"signature\"}").await,
        signature_failures
    );
    assert_eq!(
        scraped(&gw, "wsgate_upgrades_total{result=\"auth_rate\"}").await,
        2
    );
    // Other addresses still authenticate.
    gw.connect_from(addr(9), gw.bearer_request(&token))
        .await
        .expect("other address");
}

/// A refused `refresh` is a failed authentication of the address too: an
/// open connection is no way to try forged tokens past the limit.
#[tokio::test]
async fn refused_refreshes_count_against_the_address() {
    let gw = start(|c, _| c.admission.address_failed_auths_per_min = 3).await;
    let source = addr(11);
    let token = gw.token("alice", &["member"]);
    let (ws, _) = gw
        .connect_from(source, gw.bearer_request(&token))
        .await
        .expect("upgrade");
    let mut alice = crate::harness::Client::from_ws(ws, "alice").await;
    for _ in 0..3 {
        alice
            .error(
                serde_json::json!({"op": "refresh", "token": "a.b.c"}),
                "invalid_token",
            )
            .await;
    }
    // The address is over its failed authentications: even a valid token
    // is refused at the upgrade now.
    upgrade_from(&gw, source, &token).await.assert_refused(429);
    gw.connect_from(addr(12), gw.bearer_request(&token))
        .await
        .expect("other addresses are not affected");
}
