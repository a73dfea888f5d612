//! `wsgate bench api`: publishing through the HTTP API to WebSocket
//! subscribers. N subscribers on one channel (through the `wss://` target);
//! `connections` keep-alive HTTPS connections to the API each post
//! `/api/publish` in a closed loop (one request in flight per connection,
//! as a backend's pooled client does), or at a fixed rate shared among
//! them. Reports requests/s, the request's
//! round trip, and publish-to-receipt latency at the subscribers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use super::{BenchError, Percentiles, Receivers, Target, histogram, micros_now, start_receivers};

/// The result of `bench api`.
#[derive(Debug, Serialize)]
pub struct ApiReport {
    pub mode: &'static str,
    pub subscribers: usize,
    pub connections: usize,
    /// The fixed request rate over all connections, when one was asked.
    pub rate: Option<u32>,
    pub size: usize,
    /// Requests answered `200` while measuring.
    pub published: u64,
    pub duration_s: f64,
    pub requests_per_s: f64,
    /// From sending the request (at a fixed rate: from when it was due)
    /// to reading the whole answer.
    pub request_us: Percentiles,
    pub delivered: u64,
    pub deliveries_per_s: f64,
    /// From just before the request is sent (or was due) to the
    /// subscriber's receipt.
    pub latency_us: Percentiles,
    /// Answers other than `200`, failed connections and subscribers.
    pub errors: u64,
}

/// Where the API is and who publishes.
pub struct ApiTarget {
    /// `https://host:port`, the API listener.
    pub base: String,
    /// An API token (audience `api.audience`) allowed to publish.
    pub token: String,
}

/// One keep-alive HTTP/1.1 connection over TLS to the API.
async fn api_connection(
    target: &Target,
    base: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::Connect(format!("api: {e}"));
    let authority = base
        .strip_prefix("https://")
        .ok_or_else(|| BenchError::Setup(format!("{base}: only https:// API URLs")))?
        .trim_end_matches('/');
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| BenchError::Setup(format!("{base}: no port")))?;
    let host = host.trim_matches(['[', ']']);
    let tcp = TcpStream::connect((host, port.parse::<u16>().map_err(|e| err(&e))?))
        .await
        .map_err(|e| err(&e))?;
    tcp.set_nodelay(true).map_err(|e| err(&e))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| err(&e))?;
    let tls = TlsConnector::from(Arc::clone(&target.tls))
        .connect(name, tcp)
        .await
        .map_err(|e| err(&e))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| err(&e))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Runs the benchmark; see the module documentation.
///
/// # Errors
/// No subscriber or no API connection could be opened.
#[allow(clippy::too_many_arguments)]
pub async fn api(
    target: &Target,
    api: &ApiTarget,
    subscribers: usize,
    connections: usize,
    rate: Option<u32>,
    size: usize,
    duration: Duration,
    warmup: Duration,
    channel: &str,
) -> Result<ApiReport, BenchError> {
    // Receipts are not awaited here (the publishers pace themselves by
    // their answers), so a small ring of counters is enough.
    let Receivers {
        count: receivers,
        acks: _,
        errors,
        measuring,
        delivered,
        stop,
        mut tasks,
    } = start_receivers(target, subscribers, channel, 64, "api subscribers").await?;
    eprintln!("api: {receivers} subscribers ready");

    let pad = "x".repeat(size.saturating_sub(40));
    let channel_json = serde_json::to_string(channel).unwrap_or_default();
    let uri = format!("{}/api/publish", api.base.trim_end_matches('/'));
    let authorization = format!("Bearer {}", api.token);
    let next_key = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + duration;
    let mut publishers: JoinSet<Histogram<u64>> = JoinSet::new();
    for i in 0..connections.max(1) {
        let mut sender = api_connection(target, &api.base).await?;
        let (uri, authorization, pad, channel_json) = (
            uri.clone(),
            authorization.clone(),
            pad.clone(),
            channel_json.clone(),
        );
        let (next_key, published, errors, measuring) = (
            Arc::clone(&next_key),
            Arc::clone(&published),
            Arc::clone(&errors),
            Arc::clone(&measuring),
        );
        // At a fixed rate each connection sends its share on a clock, the
        // clocks spread over the period so the requests are evenly spaced
        // (together they would be a burst every period); a late answer
        // makes the next requests go at once, and their times count from
        // when they were due, so a stall is not hidden by the requests it
        // kept from being sent.
        let mut tick = rate.map(|r| {
            let period = Duration::from_secs_f64(connections.max(1) as f64 / f64::from(r.max(1)));
            let offset = period.mul_f64(i as f64 / connections.max(1) as f64);
            tokio::time::interval_at(tokio::time::Instant::now() + offset, period)
        });
        publishers.spawn(async move {
            let mut hist = histogram();
            while Instant::now() < end {
                let late = match &mut tick {
                    Some(tick) => tick.tick().await.elapsed(),
                    None => Duration::ZERO,
                };
                let k = next_key.fetch_add(1, Ordering::Relaxed);
                let sent = micros_now().saturating_sub(late.as_micros() as u64);
                let body = format!(
                    r#"{{"channel":{channel_json},"data":{{"t":{sent},"k":{k},"p":"{pad}"}}}}"#
                );
                let Ok(req) = http::Request::post(uri.as_str())
                    .header(http::header::HOST, "localhost")
                    .header(http::header::AUTHORIZATION, authorization.as_str())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                else {
                    break;
                };
                let Ok(res) = sender.send_request(req).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                };
                let ok = res.status() == http::StatusCode::OK;
                // Read the answer to its end so the connection can be reused.
                if res.into_body().collect().await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                } else if measuring.load(Ordering::Relaxed) {
                    published.fetch_add(1, Ordering::Relaxed);
                    let _ = hist.record(micros_now().saturating_sub(sent).max(1));
                }
            }
            hist
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    measuring.store(true, Ordering::Relaxed);
    let mut last = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1).min(end - Instant::now())).await;
        if last.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "api: published {}, delivered {}",
                published.load(Ordering::Relaxed),
                delivered.load(Ordering::Relaxed)
            );
            last = Instant::now();
        }
    }
    let mut requests = histogram();
    while let Some(joined) = publishers.join_next().await {
        if let Ok(h) = joined {
            let _ = requests.add(&h);
        }
    }
    let measured_for = end.saturating_duration_since(measure_from);
    measuring.store(false, Ordering::Relaxed);
    // Let in-flight messages land before reading the histograms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut latency = histogram();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(h) = joined {
            let _ = latency.add(&h);
        }
    }
    let published = published.load(Ordering::Relaxed);
    let delivered = delivered.load(Ordering::Relaxed);
    let secs = measured_for.as_secs_f64().max(1e-9);
    Ok(ApiReport {
        mode: "api",
        subscribers: receivers as usize,
        connections: connections.max(1),
        rate,
        size,
        published,
        duration_s: measured_for.as_secs_f64(),
        requests_per_s: published as f64 / secs,
        request_us: Percentiles::of(&requests),
        delivered,
        deliveries_per_s: delivered as f64 / secs,
        latency_us: Percentiles::of(&latency),
        errors: errors.load(Ordering::Relaxed),
    })
}
