//! The one test harness: a gateway started in-process on `127.0.0.1:0`
//! with a freshly generated CA, clients that trust it, and a log capture
//! at trace level shared by every test in this binary; the protocol
//! client ([`Client`]) and frame readers ([`read_json`]), `/metrics`
//! readers ([`metric`], [`Gateway::metrics`], [`admin_get`]), the one
//! poll loop ([`eventually`]), and the lookup of outside programs
//! ([`require_tool`]), which names the package to install when one is
//! missing.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{self, HeaderValue};
use tokio_util::sync::CancellationToken;
use wsgate::auth::mint::{self, TokenRequest};
use wsgate::tools::certs::{self, CertPaths};
use wsgate::{Config, Server};

/// The address clients connect from unless a test picks another.
pub const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Deadline for anything a test waits on, so a bug fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// Where a gateway listens and how to talk to it, whether it runs in this
/// process ([`Gateway`]) or as the built binary (`process.rs`).
pub struct Endpoint {
    pub addr: SocketAddr,
    pub config: Config,
    pub client: Arc<ClientConfig>,
}

/// A gateway running in this process.
pub struct Gateway {
    endpoint: Endpoint,
    /// The plain-HTTP admin listener, when the test configured one.
    pub admin: Option<SocketAddr>,
    /// The HTTP API listener, when the test configured one.
    pub api: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    /// Controls the running server (policy reload, hurry).
    pub handle: wsgate::server::ServerHandle,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

impl std::ops::Deref for Gateway {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl std::ops::DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut Endpoint {
        &mut self.endpoint
    }
}

/// A gateway with the test defaults and `tweak` applied.
pub async fn start(tweak: impl FnOnce(&mut Config, &std::path::Path)) -> Gateway {
    capture_logs();
    let (dir, config) = test_config(tweak);
    let ca = CertPaths::in_dir(dir.path()).ca_cert;
    let server = Server::bind(config.clone()).await.expect("bind");
    let addr = server.local_addr().expect("local addr");
    let admin = server.admin_addr();
    let api = server.api_addr();
    let handle = server.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));
    Gateway {
        endpoint: Endpoint {
            addr,
            client: client_config(&ca),
            config,
        },
        admin,
        api,
        dir,
        handle,
        stop,
        task: Some(task),
    }
}

/// A temporary directory with a CA, a server certificate, an HMAC secret
/// and the default policy, and the test configuration using them (listen
/// on 127.0.0.1:0) with `tweak` applied.
pub fn test_config(
    tweak: impl FnOnce(&mut Config, &std::path::Path),
) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = CertPaths::in_dir(dir.path());
    let _ = paths;
    let mut config = base_config(dir.path());
    tweak(&mut config, dir.path());
    (dir, config)
}

/// The test defaults, with a fresh CA, server certificate, HMAC secret
/// and the default policy written into `dir`; listens on 127.0.0.1:0.
pub fn base_config(dir: &std::path::Path) -> Config {
    let paths = CertPaths::in_dir(dir);
    certs::generate(&paths, &[], certs::Replace::Nothing).expect("generate certs");
    let secret = dir.join("hmac.secret");
    wsgate::tools::certs::ensure_dev_secret(&secret).expect("secret");

    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.tls.cert_file = paths.server_cert.clone();
    config.tls.key_file = paths.server_key.clone();
    config.auth.hmac_secret_file = secret;
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join("default.toml"),
        wsgate::policy::DEFAULT_POLICY,
    )
    .expect("policy");
    config.policy.dir = policies;
    // Every test client comes from 127.0.0.1: the admission limits are
    // tested on their own (admission.rs), not tripped by other tests.
    config.admission.address_new_connections_per_s = 0;
    config.admission.max_connections_per_address = 0;
    config.admission.address_failed_auths_per_min = 0;
    // Tests read /metrics on the main listener unless they set up an
    // admin one (off by default; tested in metrics.rs).
    config.server.public_metrics = true;
    // Tests publish in bursts as a few users: the per-user budget is
    // tested on its own (storage.rs).
    config.limits.user_publish_rate_per_s = 0;
    // Every test client is 127.0.0.1: the log rate is tested on its own.
    config.log.client_lines_per_s = 0;
    config.log.client_lines_max_per_s = 0;
    config
}

/// Gives `c` the certificate, key and HMAC secret of `of`, so one client
/// config and one token work on either gateway.
pub fn same_keys(c: &mut Config, of: &Config) {
    c.tls.cert_file = of.tls.cert_file.clone();
    c.tls.key_file = of.tls.key_file.clone();
    c.auth.hmac_secret_file = of.auth.hmac_secret_file.clone();
}

/// A rustls client config that trusts only the CA at `ca`.
pub fn client_config(ca: &std::path::Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in wsgate::tls::load_certs(ca).expect("ca") {
        roots.add(cert).expect("add root");
    }
    let config = ClientConfig::builder_with_provider(wsgate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

impl Endpoint {
    /// A token for `sub` with `roles`, valid for an hour.
    pub fn token(&self, sub: &str, roles: &[&str]) -> String {
        let request = TokenRequest {
            sub: sub.to_owned(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            ttl: Duration::from_secs(3600),
            claims: serde_json::Map::new(),
            kid: None,
        };
        mint::mint(&self.config, &request, None).expect("mint")
    }

    /// The HMAC secret the gateway verifies with.
    pub fn secret(&self) -> Vec<u8> {
        wsgate::auth::read_hmac_secret(&self.config.auth.hmac_secret_file).expect("secret")
    }

    /// A TLS connection to the gateway (SNI `localhost`).
    pub async fn tls(&self) -> TlsStream<TcpStream> {
        self.tls_from(LOCAL).await.expect("tls handshake")
    }

    /// A TLS connection from the loopback address `source` (any of
    /// 127.0.0.0/8), so tests can be several client addresses.
    pub async fn tls_from(&self, source: IpAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(self.addr).await?;
        let name = ServerName::try_from("localhost").expect("name");
        let connect = TlsConnector::from(Arc::clone(&self.client)).connect(name, tcp);
        tokio::time::timeout(WAIT, connect)
            .await
            .map_err(|_| std::io::Error::other("tls handshake timed out"))?
    }

    /// Sends `head` (a request without its final blank line is completed)
    /// followed, in the same write, by a masked `ping` frame, then reads
    /// until the server closes. Fails if the server keeps the socket open.
    pub async fn raw(&self, head: &str) -> RawResponse {
        self.raw_from(LOCAL, head).await
    }

    /// As [`Gateway::raw`], from the loopback address `source`.
    pub async fn raw_from(&self, source: IpAddr, head: &str) -> RawResponse {
        let mut tls = self.tls_from(source).await.expect("tls handshake");
        let mut bytes = head.replace('\n', "\r\n").into_bytes();
        if !head.ends_with("\n\n") {
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(&masked_text_frame(r#"{"op":"ping","id":99}"#));
        tls.write_all(&bytes).await.expect("write");
        // A TLS stream may keep records buffered after `write_all` when the
        // socket is briefly full (many connections at once): flush them.
        tls.flush().await.expect("flush");
        let mut out = Vec::new();
        let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
        let closed = match read {
            Ok(Ok(_)) => true,
            // A reset after the response still means the server closed.
            Ok(Err(_)) => true,
            Err(_) => false,
        };
        RawResponse::parse(&out, closed)
    }

    /// A plain `GET path` that asks the server to close afterwards.
    pub async fn get(&self, path: &str) -> RawResponse {
        self.raw(&format!(
            "GET {path} HTTP/1.1\nHost: localhost\nConnection: close\n"
        ))
        .await
    }

    /// A standard upgrade request for `/ws` with `extra` header lines.
    pub fn upgrade_head(&self, target: &str, extra: &[&str]) -> String {
        let mut head = format!(
            "GET {target} HTTP/1.1\nHost: localhost:{}\nConnection: Upgrade\nUpgrade: websocket\n\
             Sec-WebSocket-Version: 13\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n",
            self.addr.port()
        );
        for line in extra {
            head.push_str(line);
            head.push('\n');
        }
        head
    }

    /// Connects a WebSocket client with the token in the Authorization header.
    pub async fn connect(
        &self,
        token: &str,
    ) -> Result<(Ws, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
        self.connect_with(self.bearer_request(token)).await
    }

    /// An upgrade request for `/ws` carrying `token` in the Authorization header.
    pub fn bearer_request(&self, token: &str) -> http::Request<()> {
        bearer_request_to(&self.ws_url(), token)
    }

    /// Connects with a prepared request.
    pub async fn connect_with(
        &self,
        req: http::Request<()>,
    ) -> Result<(Ws, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
        self.connect_from(LOCAL, req).await
    }

    /// Connects with a prepared request from the loopback address `source`.
    pub async fn connect_from(
        &self,
        source: IpAddr,
        req: http::Request<()>,
    ) -> Result<(Ws, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
        let tls = self.tls_from(source).await?;
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tls))
            .await
            .expect("upgrade timed out")
    }

    /// Upgrades `/ws` by hand with `extra` header lines and returns the TLS
    /// stream right after the `101` response head (read byte by byte, so
    /// no WebSocket frame is consumed). Panics on any other answer.
    pub async fn upgrade_by_hand(&self, extra: &[&str]) -> TlsStream<TcpStream> {
        let mut tls = self.tls().await;
        let head = format!("{}\n", self.upgrade_head("/ws", extra)).replace('\n', "\r\n");
        tls.write_all(head.as_bytes()).await.expect("write");
        tls.flush().await.expect("flush");
        let mut response = Vec::new();
        let read_head = async {
            let mut byte = [0u8; 1];
            while !response.ends_with(b"\r\n\r\n") {
                let n = tls.read(&mut byte).await.expect("read upgrade response");
                assert_eq!(
                    n,
                    1,
                    "closed during the upgrade: {:?}",
                    String::from_utf8_lossy(&response)
                );
                response.push(byte[0]);
            }
        };
        tokio::time::timeout(WAIT, read_head)
            .await
            .expect("no upgrade response in time");
        assert!(
            response.starts_with(b"HTTP/1.1 101 "),
            "upgrade refused: {:?}",
            String::from_utf8_lossy(&response)
        );
        tls
    }

    pub fn ws_url(&self) -> String {
        format!("wss://localhost:{}/ws", self.addr.port())
    }

    /// `/metrics` over TLS from the loopback address `source`, so a scrape
    /// can stay off the addresses a test limits.
    pub async fn metrics_from(&self, source: IpAddr) -> String {
        let res = self
            .raw_from(
                source,
                "GET /metrics HTTP/1.1\nHost: localhost\nConnection: close\n",
            )
            .await;
        assert_eq!(res.status, 200, "/metrics: {res:?}");
        res.body
    }
}

impl Gateway {
    /// The `/metrics` exposition: from the admin listener when the test
    /// configured one (the main listener then answers 404), else over TLS
    /// from [`LOCAL`]. Fails unless the answer is `200`.
    pub async fn metrics(&self) -> String {
        match self.admin {
            Some(admin) => {
                let (status, body) = admin_get(admin, "/metrics").await;
                assert!(status.contains(" 200 "), "admin /metrics: {status}");
                body
            }
            None => self.metrics_from(LOCAL).await,
        }
    }

    /// The value of the sample `series` on [`Gateway::metrics`].
    pub async fn metric(&self, series: &str) -> u64 {
        metric(&self.metrics().await, series)
    }

    /// Begins shutdown (drain) without waiting for it.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    /// Stops the gateway and waits until it has finished.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("shutdown timed out")
                .expect("server task");
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `token` sent as a bearer header is refused 401 `invalid_token`, with the
/// contract's refusal shape.
pub async fn assert_invalid_token(gw: &Gateway, token: &str, why: &str) {
    let res = gw.raw(&gw.upgrade_head("/ws", &[&bearer(token)])).await;
    assert_eq!(res.status, 401, "{why}: {res:?}");
    res.assert_refused(401);
    assert_eq!(
        res.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "{why}"
    );
}

/// Waits for the server's close frame, skipping pings, and returns its code.
pub async fn expect_close(ws: &mut Ws) -> u16 {
    let close = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    };
    match tokio::time::timeout(WAIT, close)
        .await
        .expect("no close frame in time")
    {
        Some(Ok(Message::Close(Some(frame)))) => u16::from(frame.code),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// One HTTP response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Bytes after the declared body: must be empty on a refusal.
    pub trailing: Vec<u8>,
    pub closed: bool,
}

impl RawResponse {
    fn parse(bytes: &[u8], closed: bool) -> Self {
        let split = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
        let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let rest = &bytes[split + 4..];
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0usize)
            .min(rest.len());
        Self {
            status,
            body: String::from_utf8_lossy(&rest[..len]).into_owned(),
            trailing: rest[len..].to_vec(),
            headers,
            closed,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The contract's refusal shape: status, `no-store`, `close`, nothing
    /// after the response, and the socket closed.
    pub fn assert_refused(&self, status: u16) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("cache-control"), Some("no-store"), "{self:?}");
        assert_eq!(self.header("connection"), Some("close"), "{self:?}");
        assert!(
            self.trailing.is_empty(),
            "bytes after the refusal: {self:?}"
        );
        assert!(self.closed, "socket left open after refusal: {self:?}");
        assert!(self.header("sec-websocket-accept").is_none());
    }
}

/// A client-to-server text frame (masked, as RFC 6455 requires).
pub fn masked_text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    assert!(payload.len() < 126);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A masked client-to-server frame with `opcode` (FIN set) around any
/// payload, valid UTF-8 or not, of any length.
pub fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5au8, 0xa5, 0x3c, 0xc3];
    let mut frame = vec![0x80 | (opcode & 0x0f)];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Builds an unsigned-or-signed JWT by hand from raw JSON parts, for tokens
/// that no well-behaved library would make.
pub fn raw_jwt(header: &str, claims: &str, signature: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.{}",
        b64(header.as_bytes()),
        b64(claims.as_bytes()),
        b64(signature)
    )
}

/// HMAC-SHA256 over `header.claims` with `key`, giving a complete JWT.
/// A well-formed token for `mallory`, signed with a key the gateway does
/// not have: a forgery that fails at the signature check.
pub fn forged_token() -> String {
    hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"sub":"mallory","exp":{}}}"#, now() + 600),
        b"not the gateway's secret, but long enough for hs256",
    )
}

pub fn hs256_jwt(header: &str, claims: &str, key: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signing_input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let tag = aws_lc_rs::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64(tag.as_ref()))
}

pub fn now() -> u64 {
    wsgate::auth::mint::unix_now()
}

// ---- log capture ---------------------------------------------------------

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = self.0.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs, once per test binary, a trace-level subscriber that records
/// every log line of every test.
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(Arc::clone(&buf));
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
}

/// Everything logged so far by any test in this binary.
pub fn captured_logs() -> String {
    LOGS.get()
        .and_then(|b| {
            b.lock()
                .ok()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
        })
        .unwrap_or_default()
}

// ---- outside tools and shipped files ---------------------------------------

/// The repository root, where `deploy/` and `policies/` live.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How to get an outside program the tests run: the Debian package
/// `scripts/test-deps.sh` installs for it.
fn package_of(program: &str) -> Option<&'static str> {
    Some(match program {
        "haproxy" => "haproxy",
        "nginx" => "nginx-light",
        "systemd-analyze" => "systemd",
        "redis-server" => "redis-server",
        // Comes with redis-server, which depends on it.
        "redis-cli" => "redis-tools",
        "chromium" => "chromium",
        "python3" => "python3",
        _ => return None,
    })
}

/// What to tell the user when `program` is missing.
fn install_hint(program: &str) -> String {
    match package_of(program) {
        Some(package) => format!(
            "install it with `apt-get install {package}` (or run `bash scripts/test-deps.sh`, which installs every program the tests need)"
        ),
        None => {
            "run `bash scripts/test-deps.sh` (it installs every program the tests need)".to_owned()
        }
    }
}

/// The path of an outside program the tests need. Missing is a failure,
/// not a skip, and the failure says which package to install.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian puts haproxy and nginx in sbin, which a non-root PATH may lack.
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (searched $PATH, /usr/sbin and /sbin): {}",
                install_hint(name)
            )
        })
}

/// A file an outside program needs beyond its binary (an nginx module),
/// failing with the Debian `package` that provides it when it is missing.
pub fn require_file(path: &str, package: &str) -> PathBuf {
    let file = PathBuf::from(path);
    assert!(
        file.is_file(),
        "{path} not found: install it with `apt-get install {package}` (or run `bash scripts/test-deps.sh`)"
    );
    file
}

/// Python with the packages `scripts/test-deps.sh` puts in `.ci/cache/python`;
/// fails naming the module and how to get it when `module` is not there.
pub fn python_with(module: &str) -> std::process::Command {
    require_tool("python3");
    let cache = repo_root().join(".ci/cache/python");
    let probe = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .env("PYTHONPATH", &cache)
        .output();
    // The pip packages test-deps.sh installs, by the module they provide.
    let package = match module {
        "kubernetes_validate" => "kubernetes-validate",
        "yaml" => "PyYAML (with kubernetes-validate)",
        "jsonschema" => "jsonschema (with kubernetes-validate)",
        other => other,
    };
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "python3 cannot import {module} from {}: run `bash scripts/test-deps.sh`, which pip-installs {package} there ({})",
            cache.display(),
            // Python's own reason: the traceback's last line.
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => panic!("python3 did not run ({e}): {}", install_hint("python3")),
    }
    let mut command = std::process::Command::new("python3");
    command.env("PYTHONPATH", cache);
    command
}

/// A loopback port that was free a moment ago, for programs that cannot
/// bind port 0 and report it (HAProxy).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `text` with each `(from, to)` replaced; every `from` must occur, so a
/// shipped file that drifts from what a test expects fails the test.
pub fn substitute(text: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in pairs {
        assert!(out.contains(from), "{from:?} not found in:\n{text}");
        out = out.replace(from, to);
    }
    out
}

// ---- waiting ----------------------------------------------------------------

/// How often [`eventually`] probes.
const POLL: Duration = Duration::from_millis(10);

/// Probes every [`POLL`] until `probe` returns `Some`, and returns that.
/// Panics once `deadline` has passed, naming `what` was awaited. A probe
/// that started before the deadline may still succeed (as a hand-written
/// loop would let it), but not one that hangs [`WAIT`] past it. This is
/// the one way tests wait for something the gateway does on its own time
/// (a reload, a drain, a released slot); a fixed sleep is only for time
/// that is itself tested.
pub async fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    poll(deadline, what, async || probe().await.ok_or(None::<String>)).await
}

/// As [`eventually`], for a probe that says what it saw instead: the last
/// `Err` is in the failure message.
pub async fn eventually_ok<T, E: Debug>(
    deadline: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    poll(deadline, what, async || probe().await.map_err(Some)).await
}

async fn poll<T, E: Debug>(
    deadline: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, Option<E>>,
) -> T {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let last = match tokio::time::timeout_at(until + WAIT, probe()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(last)) => last.map(|e| format!("; last seen: {e:?}")),
            Err(_) => Some(format!("; the last probe hung {WAIT:?} past the deadline")),
        };
        if tokio::time::Instant::now() >= until {
            panic!(
                "timed out after {deadline:?} waiting for {what}{}",
                last.unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---- frames and the protocol client ----------------------------------------

/// The `Authorization` header line carrying `token`, for [`Endpoint::upgrade_head`].
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// An upgrade request for `url` carrying `token` in the Authorization header.
pub fn bearer_request_to(url: &str, token: &str) -> http::Request<()> {
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    req
}

/// The next text frame as JSON within `limit`, skipping pings and pongs;
/// `None` when nothing came in time. Panics on a close or a non-text frame.
/// Whether `frame` is the `ok` of request `id`, ignoring the position
/// (`epoch`, `seq`) that a subscribe on a history channel adds.
pub fn is_ok(frame: &Json, id: u64) -> bool {
    let mut plain = frame.clone();
    if let Some(fields) = plain.as_object_mut() {
        fields.remove("epoch");
        fields.remove("seq");
    }
    plain == json!({"op": "ok", "id": id})
}

pub async fn try_read_json(ws: &mut Ws, limit: Duration) -> Option<Json> {
    let next = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str::<Json>(&text)
                        .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(limit, next).await.ok()
}

/// The next text frame as JSON, skipping pings and pongs; fails after [`WAIT`].
pub async fn read_json(ws: &mut Ws) -> Json {
    try_read_json(ws, WAIT)
        .await
        .expect("no frame from the gateway in time")
}

/// One WebSocket client that has read its `welcome`.
pub struct Client {
    pub ws: Ws,
    user: String,
    pub welcome: Json,
    /// The last request id used.
    pub next_id: u64,
    /// Frames read while waiting for a reply, handed out first by `next`.
    pub early: VecDeque<Json>,
    /// Subscribed to `user:{sub}`, which `settle` uses as a barrier.
    inbox: bool,
}

impl Client {
    pub async fn join(gw: &Endpoint, user: &str, roles: &[&str]) -> Self {
        Self::join_with(gw, &gw.token(user, roles), user).await
    }

    pub async fn join_with(gw: &Endpoint, token: &str, user: &str) -> Self {
        let (ws, res) = gw.connect(token).await.expect("upgrade");
        assert_eq!(res.status(), 101);
        Self::from_ws(ws, user).await
    }

    /// A client on an upgraded `ws` (however it got there) signed in as `user`.
    pub async fn from_ws(mut ws: Ws, user: &str) -> Self {
        let welcome = read_json(&mut ws).await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        assert_eq!(welcome["user"], user, "{welcome}");
        Self {
            ws,
            user: user.to_owned(),
            welcome,
            next_id: 0,
            early: VecDeque::new(),
            inbox: false,
        }
    }

    /// Small writes leave at once instead of waiting for an ACK (Nagle),
    /// for clients that publish in bursts without waiting for replies.
    pub fn nodelay(&self) {
        self.ws
            .get_ref()
            .get_ref()
            .0
            .set_nodelay(true)
            .expect("nodelay");
    }

    /// A fresh request `id`.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn inbox_name(&self) -> String {
        format!("user:{}", self.user)
    }

    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(WAIT, self.ws.send(Message::text(text)))
            .await
            .expect("send timed out")
            .expect("send");
    }

    pub async fn send(&mut self, frame: &Json) {
        self.send_text(&frame.to_string()).await;
    }

    /// The next frame, earlier-read ones first.
    pub async fn next(&mut self) -> Json {
        match self.early.pop_front() {
            Some(frame) => frame,
            None => read_json(&mut self.ws).await,
        }
    }

    /// Reads until the reply carrying `id`; other frames are kept for `next`.
    pub async fn reply(&mut self, id: u64) -> Json {
        loop {
            let frame = read_json(&mut self.ws).await;
            if frame["id"] == id && frame["op"] != "message" {
                return frame;
            }
            self.early.push_back(frame);
        }
    }

    /// Sends `frame` with a fresh `id` and returns the reply carrying it.
    pub async fn call(&mut self, mut frame: Json) -> Json {
        let id = self.id();
        frame["id"] = id.into();
        self.send(&frame).await;
        self.reply(id).await
    }

    /// `frame` must be answered exactly `{"op":"ok","id":N}`.
    pub async fn ok(&mut self, frame: Json) {
        let id = self.next_id + 1;
        let reply = self.call(frame.clone()).await;
        assert_eq!(
            reply,
            json!({"op": "ok", "id": id}),
            "{} sent {frame}",
            self.user
        );
    }

    /// `frame` must be answered with an error `code` carrying the id.
    pub async fn error(&mut self, frame: Json, code: &str) -> Json {
        let id = self.next_id + 1;
        let reply = self.call(frame.clone()).await;
        assert_eq!(
            reply["op"], "error",
            "{} sent {frame}, got {reply}",
            self.user
        );
        assert_eq!(
            reply["code"], code,
            "{} sent {frame}, got {reply}",
            self.user
        );
        assert_eq!(reply["id"], id, "{reply}");
        assert!(reply["message"].is_string(), "{reply}");
        reply
    }

    /// Subscribes; the `ok` may carry the channel's position (`epoch`,
    /// `seq`) on a history channel, which a version 1 client ignores.
    /// Returns the `ok`.
    pub async fn subscribe(&mut self, channel: &str) -> Json {
        let id = self.next_id + 1;
        let reply = self
            .call(json!({"op": "subscribe", "channel": channel}))
            .await;
        assert!(
            is_ok(&reply, id),
            "{} subscribed to {channel}: {reply}",
            self.user
        );
        reply
    }

    pub async fn publish(&mut self, channel: &str, data: Json) {
        self.ok(json!({"op": "publish", "channel": channel, "data": data}))
            .await;
    }

    /// Subscribes to the client's own `user:{sub}` inbox, which makes
    /// [`Client::settle`] wait for a barrier message too.
    pub async fn subscribe_inbox(&mut self) {
        let inbox = self.inbox_name();
        self.subscribe(&inbox).await;
        self.inbox = true;
    }

    /// Every frame that arrives before a ping's pong and (with an inbox)
    /// before a barrier published to the inbox, plus frames read earlier.
    pub async fn settle(&mut self) -> Vec<Json> {
        let mut seen: Vec<Json> = self.early.drain(..).collect();
        let id = self.id();
        self.send(&json!({"op": "ping", "id": id})).await;
        loop {
            let frame = read_json(&mut self.ws).await;
            if frame == json!({"op": "pong", "id": id}) {
                break;
            }
            seen.push(frame);
        }
        if self.inbox {
            let id = self.id();
            let inbox = self.inbox_name();
            let mark = json!({"barrier": id});
            self.send(&json!({"op": "publish", "id": id, "channel": inbox, "data": mark}))
                .await;
            let (mut acked, mut arrived) = (false, false);
            while !(acked && arrived) {
                let frame = read_json(&mut self.ws).await;
                if frame == json!({"op": "ok", "id": id}) {
                    acked = true;
                } else if frame["op"] == "message"
                    && frame["channel"] == inbox.as_str()
                    && frame["data"] == mark
                {
                    assert_eq!(frame["from"], self.user.as_str(), "{frame}");
                    arrived = true;
                } else {
                    seen.push(frame);
                }
            }
        }
        seen
    }

    /// Nothing is pending for this client (see [`Client::settle`]).
    pub async fn assert_quiet(&mut self, why: &str) {
        let seen = self.settle().await;
        assert!(seen.is_empty(), "{}: {why}, but got {seen:#?}", self.user);
    }
}

// ---- /metrics -----------------------------------------------------------------

/// The value of the sample `series` (name and labels, as exposed) in the
/// `/metrics` exposition `text`.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(series)?;
            if !rest.starts_with([' ', '\t']) {
                return None;
            }
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no sample {series} in /metrics:\n{text}"))
}

/// A plain-HTTP GET on the admin listener; returns status line and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect admin");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write admin request");
    let mut out = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut out))
        .await
        .expect("admin answer")
        .expect("read admin answer");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// A client that subscribes to `channel` and never reads again, with a
/// receive buffer of `rcvbuf` bytes (no autotuning), too small for the
/// kernel to hide that for long.
pub async fn slow_reader(
    gw: &Endpoint,
    user: &str,
    channel: &str,
    rcvbuf: u32,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    let tcp = socket.connect(gw.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(gw.client.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let token = gw.token(user, &["member"]);
    let head = format!("{}\n", gw.upgrade_head("/ws", &[&bearer(&token)])).replace('\n', "\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    let subscribe = json!({"op": "subscribe", "id": 1, "channel": channel}).to_string();
    tls.write_all(&masked_text_frame(&subscribe)).await.unwrap();
    tls.flush().await.unwrap();
    tls
}
