//! A quick smoke of `wsgate bench` against a test gateway: each mode runs
//! briefly and reports what it measured (figures are not asserted: timing
//! belongs to `bench/run.sh`, not to tests).

use std::time::Duration;

use wsgate::tools::bench::{self, Auth, Pace, Target};

use crate::harness::start;

#[tokio::test]
async fn every_bench_mode_runs_against_a_gateway() {
    let gw = start(|c, _| {
        c.limits.publish_rate_per_s = 1_000_000;
        c.limits.publish_burst = 1_000_000;
        c.api.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        c.api.requests_per_s = 1_000_000;
        c.api.requests_burst = 1_000_000;
    })
    .await;
    let ca = gw.path("ca.pem");
    let secret = bench::secret_from_file(&gw.config.auth.hmac_secret_file).unwrap();
    let target = Target::new(&gw.ws_url(), &ca, Auth::Secret(secret), true, false, 2)
        .await
        .unwrap();

    // Held subscribed with presence: 20 members (in their grace once the
    // bench lets go, so still counted).
    let options = bench::IdleOptions {
        channel: Some("chat:idle".into()),
        presence: true,
        redis_url: None,
    };
    let idle = bench::idle(
        &target,
        20,
        5,
        Duration::ZERO,
        Some(std::process::id()),
        &options,
    )
    .await;
    assert_eq!((idle.opened, idle.failed), (20, 0), "{idle:?}");
    assert!(idle.rss_after_kib.is_some());
    assert_eq!(gw.metric("wsgate_presence_members").await, 20);

    // The kernel floor, plain and with rustls records: no gateway at all.
    for tls in [false, true] {
        let floor = bench::floor(
            20,
            100,
            Duration::from_millis(300),
            Duration::from_millis(100),
            tls,
            std::path::Path::new(env!("CARGO_BIN_EXE_wsgate")),
            None,
        )
        .await
        .unwrap();
        assert!(floor.writes > 0 && floor.writes_per_s > 0.0, "{floor:?}");
        assert_eq!(floor.writes, floor.rounds * 20, "{floor:?}");
        assert!(floor.round_ms_p50 > 0.0, "{floor:?}");
    }

    let fan = bench::fanout(
        &target,
        None,
        5,
        100,
        Pace::Window(4),
        Duration::from_millis(800),
        Duration::from_millis(200),
        "chat:bench",
        Some(std::process::id()),
    )
    .await
    .unwrap();
    assert_eq!((fan.subscribers, fan.errors), (5, 0), "{fan:?}");
    assert!(fan.delivered > 0 && fan.published > 0, "{fan:?}");
    assert!(
        fan.server_cpu_us_per_delivery.is_some() && fan.client_cpu_share.is_some(),
        "{fan:?}"
    );
    // Deliveries in the measured span may include the window of messages
    // published just before it started.
    assert!(fan.delivered <= (fan.published + 4) * 5, "{fan:?}");
    assert!(
        fan.latency_us.p50 > 0 && fan.latency_us.max >= fan.latency_us.p99,
        "{fan:?}"
    );

    // Through the HTTP API, with a token minted from the same secret.
    let api = bench::ApiTarget {
        base: format!("https://localhost:{}", gw.api.expect("api").port()),
        token: bench::api_token(&gw.config.auth.hmac_secret_file, &gw.config.api.audience).unwrap(),
    };
    for rate in [None, Some(50)] {
        let run = bench::api(
            &target,
            &api,
            5,
            2,
            rate,
            100,
            Duration::from_millis(800),
            Duration::from_millis(200),
            "chat:bench",
        )
        .await
        .unwrap();
        assert_eq!((run.subscribers, run.errors), (5, 0), "{run:?}");
        assert!(run.published > 0 && run.delivered > 0, "{run:?}");
        assert!(run.request_us.p50 > 0 && run.latency_us.p50 > 0, "{run:?}");
        if rate.is_some() {
            // 50/s for 0.8 s, give or take a tick at each end.
            assert!(run.published <= 45, "{run:?}");
        }
    }

    // The gateway runs in this process: its CPU is this process's.
    let pid = Some(std::process::id());
    let conn = bench::connect(&target, 20, 4, pid).await;
    assert_eq!((conn.ok, conn.failed), (20, 0), "{conn:?}");
    assert!(conn.connects_per_s > 0.0);
    assert!(
        conn.server_cpu_us_per_connect.is_some_and(|us| us > 0.0),
        "{conn:?}"
    );
    // Resumed TLS sessions connect too.
    let resumed = bench::connect(&target.clone().resuming(), 20, 4, None).await;
    assert_eq!((resumed.ok, resumed.failed), (20, 0), "{resumed:?}");

    // A bad token: every connection fails, and the report says so.
    let bad = Target::new(
        &gw.ws_url(),
        &ca,
        Auth::Token("x.y.z".into()),
        true,
        false,
        1,
    )
    .await
    .unwrap();
    let refused = bench::connect(&bad, 3, 3, None).await;
    assert_eq!((refused.ok, refused.failed), (0, 3));
}
