//! Certificate reload: new handshakes get the new certificate, live
//! sessions keep going, a broken or mismatched pair is refused (the old
//! one serves on, the failure is counted), and an atomic symlink swap of
//! the directory, as Kubernetes does for Secrets, is picked up by polling.

use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsgate::tools::certs::{self, CertPaths, Replace};

use crate::harness::{Gateway, WAIT, Ws, eventually, start};

/// The leaf certificate a new, full TLS handshake is served (DER). A
/// resumed session would report the certificate of the session it resumes.
async fn served(gw: &Gateway) -> Vec<u8> {
    served_at(gw, gw.addr).await
}

/// The same at another listener of the gateway (the HTTP API's).
async fn served_at(gw: &Gateway, addr: std::net::SocketAddr) -> Vec<u8> {
    let mut client = (*gw.client).clone();
    client.resumption = rustls::client::Resumption::disabled();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("tls handshake");
    let certs = tls.get_ref().1.peer_certificates().expect("peer certs");
    certs[0].to_vec()
}

/// The leaf certificate in a PEM file (DER).
fn leaf(path: &Path) -> Vec<u8> {
    wsgate::tls::load_certs(path).expect("cert")[0].to_vec()
}

/// Issues a new server certificate from the test CA into `gw.dir`.
fn reissue(gw: &Gateway) -> CertPaths {
    let paths = CertPaths::in_dir(gw.dir.path());
    certs::generate(&paths, &[], Replace::Server).expect("reissue");
    paths
}

/// A live session still answers a ping.
async fn still_alive(ws: &mut Ws) {
    ws.send(Message::text(r#"{"op":"ping","id":5}"#))
        .await
        .expect("send on the old session");
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("pong") {
            Some(Ok(Message::Text(t))) if t.contains("pong") => return,
            Some(Ok(_)) => {}
            other => panic!("old session broke: {other:?}"),
        }
    }
}

#[tokio::test]
async fn reload_serves_the_new_certificate_and_keeps_live_sessions() {
    let gw = start(|c, _| {
        c.tls.watch_interval_ms = 0;
        c.api.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let api = gw.api.expect("api listener");
    let old = leaf(&gw.config.tls.cert_file);
    assert_eq!(served(&gw).await, old);
    assert_eq!(served_at(&gw, api).await, old);
    let (mut live, _) = gw.connect(&gw.token("alice", &[])).await.expect("live");

    let paths = reissue(&gw);
    let new = leaf(&paths.server_cert);
    assert_ne!(new, old, "a reissued certificate differs (serial, key)");
    gw.handle.reload_certs().expect("reload");
    assert_eq!(served(&gw).await, new);
    // The API listener serves the gateway's certificate and reloads with it.
    assert_eq!(served_at(&gw, api).await, new);
    assert_eq!(gw.handle.current_cert(), Some(new));
    still_alive(&mut live).await;
    assert_eq!(
        gw.metric("wsgate_cert_reloads_total{result=\"ok\"}").await,
        1
    );
}

#[tokio::test]
async fn broken_or_mismatched_pair_is_refused_and_the_old_one_serves() {
    let gw = start(|c, _| c.tls.watch_interval_ms = 0).await;
    let cert_file = gw.config.tls.cert_file.clone();
    let old = leaf(&cert_file);
    let (mut live, _) = gw.connect(&gw.token("alice", &[])).await.expect("live");
    let pem = std::fs::read_to_string(&cert_file).unwrap();

    // Truncated in the middle of the base64, as a half-finished copy is.
    std::fs::write(&cert_file, &pem[..pem.len() / 2]).unwrap();
    let err = gw.handle.reload_certs().expect_err("truncated PEM");
    assert!(err.to_string().contains("certificate file"), "{err}");
    assert_eq!(served(&gw).await, old);

    // A valid certificate for another key.
    let other = tempfile::tempdir().unwrap();
    let other_paths = CertPaths::in_dir(other.path());
    certs::generate(&other_paths, &[], Replace::Nothing).unwrap();
    std::fs::copy(&other_paths.server_cert, &cert_file).unwrap();
    let err = gw.handle.reload_certs().expect_err("mismatched key");
    assert!(err.to_string().contains("does not belong"), "{err}");
    assert_eq!(served(&gw).await, old);

    still_alive(&mut live).await;
    assert_eq!(
        gw.metric("wsgate_cert_reloads_total{result=\"failed\"}")
            .await,
        2
    );
    assert_eq!(
        gw.metric("wsgate_cert_reloads_total{result=\"ok\"}").await,
        0
    );
    // The logged reason names the file, never key material.
    let logs = crate::harness::captured_logs();
    assert!(!logs.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn symlink_swap_of_the_certificate_directory_is_picked_up() {
    // certs live in dir/live -> dir/v1, as a Kubernetes Secret volume
    // (`..data` -> a timestamped directory) does.
    let gw = start(|c, dir| {
        let v1 = dir.join("v1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::copy(&c.tls.cert_file, v1.join("tls.crt")).unwrap();
        std::fs::copy(&c.tls.key_file, v1.join("tls.key")).unwrap();
        std::os::unix::fs::symlink("v1", dir.join("live")).unwrap();
        c.tls.cert_file = dir.join("live/tls.crt");
        c.tls.key_file = dir.join("live/tls.key");
        c.tls.watch_interval_ms = 100;
    })
    .await;
    let old = served(&gw).await;

    let paths = reissue(&gw);
    let v2 = gw.path("v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::copy(&paths.server_cert, v2.join("tls.crt")).unwrap();
    std::fs::copy(&paths.server_key, v2.join("tls.key")).unwrap();
    // The atomic swap: a new link renamed over the old one.
    std::os::unix::fs::symlink("v2", gw.path("live.new")).unwrap();
    std::fs::rename(gw.path("live.new"), gw.path("live")).unwrap();

    let new = leaf(&v2.join("tls.crt"));
    assert_ne!(new, old);
    eventually(WAIT, "the swapped certificate to be served", async || {
        (served(&gw).await == new).then_some(())
    })
    .await;
    assert_eq!(
        gw.metric("wsgate_cert_reloads_total{result=\"ok\"}").await,
        1
    );
}
