//! The client's real address behind a load balancer: PROXY protocol v1
//! and v2 from trusted peers only, under a deadline, and forwarding
//! headers believed only from trusted proxies. The address found feeds the
//! per-address limits and the logs.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use wsgate::config::ForwardedHeader;

use crate::harness::{Gateway, WAIT, metric, start};

fn v2(src: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(src) = src else {
        panic!("v4 only here")
    };
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0, 12]);
    out.extend_from_slice(&src.ip().octets());
    out.extend_from_slice(&[127, 0, 0, 1]);
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&8443u16.to_be_bytes());
    out
}

fn v1(src: SocketAddr) -> Vec<u8> {
    format!("PROXY TCP4 {} 127.0.0.1 {} 8443\r\n", src.ip(), src.port()).into_bytes()
}

async fn tcp_from(gw: &Gateway, source: IpAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(gw.addr).await.unwrap()
}

/// TLS over a connection that first sends `header`.
async fn tls_after(
    gw: &Gateway,
    source: IpAddr,
    header: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut tcp = tcp_from(gw, source).await;
    tcp.write_all(header).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&gw.client)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("tls timed out"))?
}

/// Upgrades with `token` over a connection that first sent `header`;
/// returns the HTTP status.
async fn upgrade_after(
    gw: &Gateway,
    header: &[u8],
    token: &str,
    extra: &[&str],
) -> (u16, Option<crate::harness::Ws>) {
    let tls = tls_after(gw, "127.0.0.1".parse().unwrap(), header)
        .await
        .expect("tls");
    let mut req = gw.bearer_request(token);
    for line in extra {
        let (k, v) = line.split_once(": ").unwrap();
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, res)) => (res.status().as_u16(), Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => (res.status().as_u16(), None),
        Err(e) => panic!("{e}"),
    }
}

/// The value of `series` on `/metrics`, scraped behind a PROXY header
/// (the listener requires one) from a trusted peer's LOCAL header, as a
/// balancer's health check sends.
async fn proxied_metric(gw: &Gateway, series: &str) -> u64 {
    let mut tls = tls_after(gw, "127.0.0.1".parse().unwrap(), &local_v2())
        .await
        .expect("tls");
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_string(&mut out)).await;
    metric(&out, series)
}

fn local_v2() -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

fn proxied(c: &mut wsgate::Config) {
    c.server.proxy_protocol = true;
    c.server.trusted_proxies = vec!["127.0.0.1/32".into()];
    c.server.proxy_header_timeout_ms = 300;
    c.admission.max_connections_per_address = 1;
}

#[tokio::test]
async fn proxy_v1_and_v2_addresses_feed_the_per_address_limit_and_logs() {
    let gw = start(|c, _| proxied(c)).await;
    let token = gw.token("alice", &[]);
    let a: SocketAddr = "203.0.113.7:4711".parse().unwrap();
    let b: SocketAddr = "198.51.100.9:5000".parse().unwrap();
    let (status, _held) = upgrade_after(&gw, &v2(a), &token, &[]).await;
    assert_eq!(status, 101);
    // The same client address again (v1 this time): over its limit of 1,
    // although every connection comes from 127.0.0.1.
    let (status, _) = upgrade_after(&gw, &v1(a), &token, &[]).await;
    assert_eq!(status, 429);
    let (status, _other) = upgrade_after(&gw, &v1(b), &token, &[]).await;
    assert_eq!(status, 101);
    assert_eq!(
        proxied_metric(&gw, "wsgate_proxy_headers_total{result=\"ok\"}").await,
        3
    );
    assert!(proxied_metric(&gw, "wsgate_proxy_headers_total{result=\"local\"}").await >= 1);
    let logs = crate::harness::captured_logs();
    assert!(
        logs.contains("client=203.0.113.7:4711"),
        "the client address is not in the logs"
    );
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_peer_is_refused() {
    let gw = start(|c, _| {
        proxied(c);
        c.server.trusted_proxies = vec!["127.0.0.2/32".into()];
    })
    .await;
    // Valid header, wrong sender: closed before TLS.
    let from_untrusted = tls_after(
        &gw,
        "127.0.0.1".parse().unwrap(),
        &v2("203.0.113.7:1".parse().unwrap()),
    )
    .await;
    assert!(from_untrusted.is_err(), "an untrusted peer got TLS");
    // Without a header at all, too (the listener requires one).
    let mut plain = tcp_from(&gw, "127.0.0.1".parse().unwrap()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(buf.is_empty());
    // From the trusted address the same header works.
    assert!(
        tls_after(
            &gw,
            "127.0.0.2".parse().unwrap(),
            &v2("203.0.113.7:1".parse().unwrap())
        )
        .await
        .is_ok()
    );
}

#[tokio::test]
async fn stalled_or_malformed_proxy_headers_are_dropped() {
    let gw = start(|c, _| proxied(c)).await;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    // Stalled half-way: dropped at the 300 ms deadline.
    let mut tcp = tcp_from(&gw, local).await;
    tcp.write_all(b"PROXY TCP4 203.0").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("never dropped");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Malformed: a TLS ClientHello where the header should be.
    assert!(tls_after(&gw, local, b"").await.is_err());
    let mut tcp = tcp_from(&gw, local).await;
    tcp.write_all(b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("never dropped");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "malformed waited for the deadline"
    );
    assert!(proxied_metric(&gw, "wsgate_proxy_headers_total{result=\"timeout\"}").await >= 1);
    assert!(proxied_metric(&gw, "wsgate_proxy_headers_total{result=\"malformed\"}").await >= 2);
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let gw = start(|c, _| {
        c.server.forwarded_header = ForwardedHeader::XForwardedFor;
        c.server.trusted_proxies = vec!["127.0.0.2/32".into()];
        c.admission.max_connections_per_address = 1;
    })
    .await;
    let token = gw.token("alice", &[]);
    let connect = |source: &'static str, xff: &'static str| {
        let mut req = gw.bearer_request(&token);
        req.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
        let gw = &gw;
        async move {
            match gw.connect_from(source.parse().unwrap(), req).await {
                Ok((ws, res)) => (res.status().as_u16(), Some(ws)),
                Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                    (res.status().as_u16(), None)
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    // A client that sends X-Forwarded-For itself is limited by its real
    // address: the second connection from 127.0.0.1 is over the limit,
    // whatever it claims.
    let (status, _a) = connect("127.0.0.1", "203.0.113.7").await;
    assert_eq!(status, 101);
    let (status, _) = connect("127.0.0.1", "198.51.100.1").await;
    assert_eq!(status, 429);
    // Through the trusted proxy, the right-most untrusted hop is the client
    // (a spoofed entry on the left changes nothing).
    let (status, _b) = connect("127.0.0.2", "6.6.6.6, 203.0.113.7").await;
    assert_eq!(status, 101);
    let (status, _) = connect("127.0.0.2", "203.0.113.7").await;
    assert_eq!(status, 429, "same client through the proxy");
    let (status, _c) = connect("127.0.0.2", "198.51.100.1").await;
    assert_eq!(status, 101, "another client through the same proxy");
}

/// The bypass the security review found: through a trusted proxy, a
/// forwarding header whose nearest entry does not parse used to leave the
/// request with no address at all, so forged tokens were never stopped by
/// the failed-authentication gate (45 tries, all 401). Now such a request
/// is counted against the proxy's own address.
#[tokio::test]
async fn an_unbelievable_forwarding_header_counts_against_the_proxy() {
    let gw = start(|c, _| {
        c.server.forwarded_header = ForwardedHeader::XForwardedFor;
        c.server.trusted_proxies = vec!["127.0.0.3/32".into()];
        c.admission.address_failed_auths_per_min = 30;
    })
    .await;
    let forged = crate::harness::forged_token();
    let mut statuses = Vec::new();
    for _ in 0..45 {
        let head = gw.upgrade_head(
            "/ws",
            &[&crate::harness::bearer(&forged), "X-Forwarded-For: x"],
        );
        statuses.push(
            gw.raw_from("127.0.0.3".parse().unwrap(), &head)
                .await
                .status,
        );
    }
    assert!(statuses[..30].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[30..].iter().all(|s| *s == 429), "{statuses:?}");
}
