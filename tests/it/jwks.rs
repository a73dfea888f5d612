//! Verification keys by `kid` from a JWKS file or an https JWKS URL:
//! rotation without a restart (reload handle, file polling through a
//! symlink swap), broken sets that leave the keys in force, and a URL
//! served by a small HTTPS server of the test's own that counts fetches,
//! floods of unknown kids, hangs, and oversized answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use wsgate::config::TlsConfig;
use wsgate::tools::certs::{self, CertPaths};

use crate::harness::{self, Gateway, WAIT, assert_invalid_token, eventually_ok, now, start};

/// An ES256 signing key with its kid and public JWK.
struct Signer {
    kid: String,
    pem: String,
    jwk: Value,
}

fn signer(kid: &str) -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let raw = pair.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    Signer {
        kid: kid.to_owned(),
        pem: pair.serialize_pem(),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
        }),
    }
}

fn jwks(signers: &[&Signer]) -> String {
    let keys: Vec<&Value> = signers.iter().map(|s| &s.jwk).collect();
    json!({ "keys": keys }).to_string()
}

impl Signer {
    /// A token for `sub` signed by this key, naming `kid` in its header.
    fn token_as(&self, kid: &str, sub: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let claims = json!({"sub": sub, "exp": now() + 600});
        let key = EncodingKey::from_ec_pem(self.pem.as_bytes()).expect("pem");
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    }

    fn token(&self) -> String {
        self.token_as(&self.kid, "alice")
    }
}

async fn assert_accepted(gw: &Gateway, token: &str, why: &str) {
    let (_, res) = gw
        .connect(token)
        .await
        .unwrap_or_else(|e| panic!("{why}: {e}"));
    assert_eq!(res.status(), 101, "{why}");
}

/// Polls `/metrics` until `series` reaches `value` (the file watcher runs
/// on its own timer, so there is nothing else to wait on).
async fn wait_for_metric(gw: &Gateway, series: &str, value: u64) {
    eventually_ok(
        WAIT,
        &format!("{series} to reach {value}"),
        async || match gw.metric(series).await {
            now if now >= value => Ok(()),
            now => Err(now),
        },
    )
    .await;
}

const RELOAD_OK: &str = "wsgate_key_reloads_total{result=\"ok\"}";
const RELOAD_FAILED: &str = "wsgate_key_reloads_total{result=\"failed\"}";
const FETCH_OK: &str = "wsgate_jwks_fetches_total{result=\"ok\"}";
const FETCH_FAILED: &str = "wsgate_jwks_fetches_total{result=\"failed\"}";
const FETCH_THROTTLED: &str = "wsgate_jwks_fetches_total{result=\"throttled\"}";
const UNKNOWN_KID: &str = "wsgate_auth_failures_total{reason=\"unknown_kid\"}";

#[tokio::test]
async fn jwks_file_rotation_through_the_reload_handle() {
    let (a, b) = (signer("key-a"), signer("key-b"));
    let first = jwks(&[&a]);
    let gw = start(|c, dir| {
        let file = dir.join("jwks.json");
        std::fs::write(&file, &first).unwrap();
        c.auth.algorithms = vec!["ES256".into()];
        c.auth.jwks_file = Some(file);
        c.auth.jwks_watch_interval_ms = 0;
    })
    .await;
    let file = gw.path("jwks.json");
    assert_accepted(&gw, &a.token(), "kid A while A is in the set").await;
    assert_invalid_token(&gw, &b.token(), "kid B before B is added").await;

    // Rotate: B replaces A; A is retired by leaving the file.
    std::fs::write(&file, jwks(&[&b])).unwrap();
    assert_eq!(gw.handle.reload_keys().await, Ok(Some(1)));
    assert_accepted(&gw, &b.token(), "kid B after the reload").await;
    assert_invalid_token(&gw, &a.token(), "retired kid A").await;
    // B's kid on a token A signed is a signature failure, not a key lookup.
    assert_invalid_token(&gw, &a.token_as("key-b", "mallory"), "A's signature as B").await;

    // A truncated set, then one without a usable key, are refused; B stays.
    std::fs::write(&file, &jwks(&[&a, &b])[..40]).unwrap();
    assert!(gw.handle.reload_keys().await.is_err());
    std::fs::write(
        &file,
        r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#,
    )
    .unwrap();
    assert!(gw.handle.reload_keys().await.is_err());
    assert_accepted(&gw, &b.token(), "kid B after refused reloads").await;

    assert_eq!(gw.metric(RELOAD_OK).await, 1);
    assert_eq!(gw.metric(RELOAD_FAILED).await, 2);
    assert_eq!(gw.metric("wsgate_verification_keys").await, 1);
    assert!(gw.metric(UNKNOWN_KID).await >= 2);
    assert_eq!(gw.metric(FETCH_OK).await, 0, "no URL, no fetch");
}

/// Kubernetes mounts a Secret as `file -> ..data/file` with `..data` a
/// symlink swapped to a new directory on update; the watcher follows it.
#[tokio::test]
async fn jwks_file_changes_are_polled_through_a_symlink_swap() {
    let (a, b) = (signer("key-a"), signer("key-b"));
    let first = jwks(&[&a]);
    let gw = start(|c, dir| {
        let v1 = dir.join("v1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("jwks.json"), &first).unwrap();
        std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/jwks.json", dir.join("jwks.json")).unwrap();
        c.auth.algorithms = vec!["ES256".into()];
        c.auth.jwks_file = Some(dir.join("jwks.json"));
        c.auth.jwks_watch_interval_ms = 25;
    })
    .await;
    let swap_to = |version: &str, body: &str| {
        let dir = gw.dir.path();
        std::fs::create_dir(dir.join(version)).unwrap();
        std::fs::write(dir.join(version).join("jwks.json"), body).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(version, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    assert_accepted(&gw, &a.token(), "kid A at start").await;

    swap_to("v2", &jwks(&[&b]));
    wait_for_metric(&gw, RELOAD_OK, 1).await;
    assert_accepted(&gw, &b.token(), "kid B after the swap").await;
    assert_invalid_token(&gw, &a.token(), "retired kid A").await;

    swap_to("v3", "{\"keys\": [");
    wait_for_metric(&gw, RELOAD_FAILED, 1).await;
    assert_accepted(&gw, &b.token(), "kid B after a broken swap").await;
    assert_eq!(gw.metric(RELOAD_OK).await, 1);
}

// ---- a JWKS URL ------------------------------------------------------------

/// What the test JWKS server answers.
#[derive(Clone)]
enum Answer {
    /// `200` with this body.
    Body(String),
    /// Reads the request, then never answers.
    Hang,
    /// `200` with a body of 2 MiB.
    Huge,
}

/// A small HTTPS server for `GET /jwks.json`, with a certificate from its
/// own dev CA, counting the requests it reads.
struct JwksServer {
    addr: SocketAddr,
    ca: PathBuf,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl JwksServer {
    async fn start(answer: Answer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::in_dir(dir.path());
        certs::generate(&paths, &[], certs::Replace::Nothing).unwrap();
        let tls_config = TlsConfig {
            cert_file: paths.server_cert.clone(),
            key_file: paths.server_key.clone(),
            ..TlsConfig::default()
        };
        let store = wsgate::tls::CertStore::load(&tls_config).unwrap();
        let tls = wsgate::tls::server_config(&tls_config, store).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            ca: paths.ca_cert.clone(),
            answer: Arc::new(Mutex::new(answer)),
            requests: Arc::default(),
            _dir: dir,
        };
        let (answer, requests) = (Arc::clone(&server.answer), Arc::clone(&server.requests));
        let acceptor = TlsAcceptor::from(tls);
        // Ends with the test's runtime.
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, answer, requests) =
                    (acceptor.clone(), Arc::clone(&answer), Arc::clone(&requests));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    assert!(head.starts_with(b"GET /jwks.json HTTP/1.1\r\n"));
                    let current = answer.lock().unwrap().clone();
                    let body = match current {
                        Answer::Body(body) => body.into_bytes(),
                        Answer::Huge => vec![b' '; 2 * 1024 * 1024],
                        Answer::Hang => {
                            // A sleep: this answer is a server that never replies.
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        server
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/jwks.json", self.addr.port())
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Points `c` at this server, with a 60 s minimum refresh interval
    /// and no scheduled refresh within a test's time.
    fn configure(&self, c: &mut wsgate::Config, timeout_ms: u64) {
        c.auth.algorithms = vec!["ES256".into()];
        c.auth.jwks_url = Some(self.url());
        c.auth.jwks_ca_file = Some(self.ca.clone());
        c.auth.jwks_timeout_ms = timeout_ms;
        c.auth.jwks_min_refresh_interval_ms = 60_000;
        c.auth.jwks_refresh_interval_ms = 3_600_000;
    }
}

#[tokio::test]
async fn a_flood_of_unknown_kids_causes_one_fetch() {
    let (a, ghost) = (signer("key-a"), signer("ghost"));
    let server = JwksServer::start(Answer::Body(jwks(&[&a]))).await;
    let gw = start(|c, _| server.configure(c, 5_000)).await;
    assert_eq!(server.requests(), 1, "fetched once at start");
    assert_accepted(&gw, &a.token(), "kid A from the URL").await;

    let concurrent = (0..50).map(|i| {
        let token = ghost.token_as(&format!("ghost-{i}"), "mallory");
        let gw = &gw;
        async move { assert_invalid_token(gw, &token, "unknown kid, concurrent").await }
    });
    futures_util::future::join_all(concurrent).await;
    for i in 0..20 {
        let token = ghost.token_as(&format!("late-{i}"), "mallory");
        assert_invalid_token(&gw, &token, "unknown kid, sequential").await;
    }
    assert_eq!(server.requests(), 2, "one fetch for the whole flood");
    assert_eq!(gw.metric(FETCH_OK).await, 2);
    assert!(gw.metric(FETCH_THROTTLED).await >= 20);
    assert_eq!(gw.metric(UNKNOWN_KID).await, 70);
    assert_accepted(&gw, &a.token(), "kid A after the flood").await;
}

#[tokio::test]
async fn a_rotated_url_set_is_followed_after_one_refresh() {
    let (a, b) = (signer("key-a"), signer("key-b"));
    let server = JwksServer::start(Answer::Body(jwks(&[&a]))).await;
    let gw = start(|c, _| server.configure(c, 5_000)).await;
    assert_accepted(&gw, &a.token(), "kid A at start").await;

    server.set(Answer::Body(jwks(&[&b])));
    assert_accepted(&gw, &b.token(), "kid B, after the refresh it caused").await;
    assert_eq!(server.requests(), 2);
    assert_invalid_token(&gw, &a.token(), "kid A, retired from the served set").await;
    assert_eq!(
        server.requests(),
        2,
        "the retired kid is throttled, not fetched"
    );
    assert_eq!(gw.metric("wsgate_verification_keys").await, 1);
}

#[tokio::test]
async fn a_slow_or_broken_url_is_bounded_and_the_cached_keys_stay() {
    let (a, c) = (signer("key-a"), signer("key-c"));
    let server = JwksServer::start(Answer::Body(jwks(&[&a]))).await;
    let gw = start(|cfg, _| server.configure(cfg, 400)).await;

    server.set(Answer::Hang);
    let started = Instant::now();
    assert_invalid_token(&gw, &c.token(), "unknown kid while the URL hangs").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(server.requests(), 2);
    assert_accepted(&gw, &a.token(), "cached kid A while the URL hangs").await;

    // Reloads (SIGHUP) are not throttled; each failure keeps the keys.
    server.set(Answer::Huge);
    assert!(gw.handle.reload_keys().await.is_err());
    server.set(Answer::Body("not json".into()));
    assert!(gw.handle.reload_keys().await.is_err());
    assert_accepted(&gw, &a.token(), "cached kid A after failed fetches").await;
    assert_eq!(gw.metric(FETCH_FAILED).await, 3);

    server.set(Answer::Body(jwks(&[&a, &c])));
    assert_eq!(gw.handle.reload_keys().await, Ok(Some(2)));
    assert_accepted(&gw, &c.token(), "kid C once served").await;
    assert_eq!(gw.metric(FETCH_OK).await, 2);
}

#[tokio::test]
async fn the_gateway_does_not_start_without_its_jwks() {
    harness::capture_logs();
    let dir = tempfile::tempdir().unwrap();
    // A port with nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut config = harness::base_config(dir.path());
    config.auth.algorithms = vec!["ES256".into()];
    config.auth.jwks_url = Some(format!("https://127.0.0.1:{port}/jwks.json"));
    let err = wsgate::Server::bind(config.clone())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("JWKS fetch from"), "{err}");

    // A hanging URL is cut off at the timeout.
    let server = JwksServer::start(Answer::Hang).await;
    server.configure(&mut config, 300);
    let started = Instant::now();
    let err = wsgate::Server::bind(config.clone())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("within 300 ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // The wrong CA: refused by TLS, not trusted.
    server.set(Answer::Body(jwks(&[&signer("key-a")])));
    config.auth.jwks_ca_file = Some(write_other_ca(dir.path()));
    let err = wsgate::Server::bind(config).await.err().expect("refused");
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// A CA that did not sign the JWKS server's certificate.
fn write_other_ca(dir: &Path) -> PathBuf {
    let other = dir.join("other");
    certs::generate(&CertPaths::in_dir(&other), &[], certs::Replace::Nothing).unwrap();
    other.join("ca.pem")
}

#[tokio::test]
async fn wsgate_token_names_its_key_with_kid() {
    let (a, b) = (signer("key-a"), signer("key-b"));
    let set = jwks(&[&a, &b]);
    let gw = start(|c, dir| {
        let file = dir.join("jwks.json");
        std::fs::write(&file, &set).unwrap();
        c.auth.algorithms = vec!["ES256".into()];
        c.auth.jwks_file = Some(file);
    })
    .await;
    let config = gw.path("wsgate.toml");
    std::fs::write(&config, toml::to_string(&gw.config).unwrap()).unwrap();
    let key = gw.path("key-b.pem");
    std::fs::write(&key, &b.pem).unwrap();
    let mint = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["token", "--config", config.to_str().unwrap()])
            .args(["--key", key.to_str().unwrap(), "--sub", "carol"])
            .args(extra)
            .output()
            .expect("run wsgate token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_accepted(&gw, &mint(&["--kid", "key-b"]), "minted for key-b").await;
    // Two keys in the set: a token must say which one.
    assert_invalid_token(&gw, &mint(&[]), "no kid with two keys").await;
    assert_invalid_token(
        &gw,
        &mint(&["--kid", "key-a"]),
        "key-b's signature as key-a",
    )
    .await;
}
