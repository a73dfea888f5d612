//! wsgate behind a real HAProxy, configured from the shipped TLS
//! passthrough file (`deploy/haproxy/wsgate-passthrough.cfg`) with only
//! addresses, paths and timings changed, so it sends PROXY protocol v2 to
//! gateways that require it: heartbeats keep an idle tunnel open past
//! HAProxy's `timeout tunnel`, a draining gateway leaves rotation through
//! its `/readyz` health check, and two replicas on one Redis see each
//! client's own address and share publications. HAProxy and redis-server
//! are required: `scripts/test-deps.sh` installs them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::RedisServer;
use crate::harness::{
    Client, Gateway, LOCAL, WAIT, Ws, admin_get, bearer_request_to, captured_logs, eventually_ok,
    free_port, metric, read_json, repo_root, require_tool, same_keys, start, substitute,
};

/// HAProxy's tunnel timeout in these tests; the gateway pings 3x as often.
const TUNNEL: Duration = Duration::from_secs(1);
const HEARTBEAT_MS: u64 = 300;

fn shipped(name: &str) -> String {
    let path = repo_root().join("deploy/haproxy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the shipped passthrough file asks of the gateways behind it: a
/// PROXY header on every connection, believed from HAProxy (which connects
/// from 127.0.0.1 here). Metrics are read on the admin listener, since the
/// main one now closes connections that do not come through HAProxy.
fn behind_haproxy(c: &mut wsgate::Config) {
    c.server.proxy_protocol = true;
    c.server.trusted_proxies = vec!["127.0.0.1/32".into()];
    c.server.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
}

/// The shipped `server` lines, replaced by one per address in `servers`
/// (named `gw0`, `gw1`, …) with the shipped options (`send-proxy-v2`, …).
fn server_lines(text: &str, servers: &[SocketAddr]) -> (String, String) {
    let shipped: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .collect();
    assert!(!shipped.is_empty(), "no server lines in:\n{text}");
    let options = |line: &str| {
        line.split_whitespace()
            .skip(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let first = options(shipped[0]);
    for line in &shipped {
        assert_eq!(options(line), first, "server lines differ: {shipped:?}");
    }
    let generated: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("    server gw{i} {addr} {first}"))
        .collect();
    (shipped.join("\n"), generated.join("\n"))
}

/// A running `haproxy -db`, killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    socket: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// HAProxy with the shipped passthrough configuration in front of
    /// `servers` (named `gw0`, `gw1`, …), their certificates checked
    /// against `ca`; returns once every server passed a health check.
    async fn start(ca: &Path, servers: &[SocketAddr]) -> Self {
        Self::start_balancing(ca, servers, None).await
    }

    /// As [`Haproxy::start`], with `balance` instead of the shipped algorithm.
    async fn start_balancing(ca: &Path, servers: &[SocketAddr], balance: Option<&str>) -> Self {
        let haproxy = require_tool("haproxy");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let socket = dir.path().join("admin.sock");
        let mut text = shipped("wsgate-passthrough.cfg");
        if let Some(balance) = balance {
            assert!(
                text.contains("balance leastconn"),
                "the shipped balance changed"
            );
            text = text.replace("balance leastconn", &format!("balance {balance}"));
        }
        let (shipped_servers, test_servers) = server_lines(&text, servers);
        let ca = ca.display().to_string();
        let text = substitute(
            &text,
            &[
                ("bind :443", &format!("bind 127.0.0.1:{port}")),
                (
                    "timeout tunnel 60s",
                    &format!("timeout tunnel {}ms", TUNNEL.as_millis()),
                ),
                (
                    "ca-file /etc/haproxy/wsgate-ca.pem",
                    &format!("ca-file {ca}"),
                ),
                // The harness certificates name localhost.
                ("wsgate.internal", "localhost"),
                ("inter 2s", "inter 200ms"),
                (&shipped_servers, &test_servers),
                (
                    "stats socket /run/haproxy/admin.sock mode 660",
                    &format!("stats socket {} mode 600", socket.display()),
                ),
            ],
        );
        // Unprivileged and in the foreground: no chroot, user switch,
        // daemon mode or syslog.
        let text: String = text
            .lines()
            .filter(|l| {
                let word = l.split_whitespace().next().unwrap_or("");
                !(["chroot", "user", "group", "daemon"].contains(&word)
                    || l.starts_with("    log /"))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, &text).unwrap();
        let stderr = dir.path().join("haproxy.log");
        let child = Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start haproxy");
        let proxy = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            socket,
            stderr,
            _dir: dir,
        };
        let names: Vec<String> = (0..servers.len()).map(|i| format!("gw{i}")).collect();
        proxy
            .wait_for("every server checked UP", |stat| {
                names.iter().all(|n| {
                    stat.iter()
                        .any(|s| &s.name == n && s.status == "UP" && s.check == "L7OK")
                })
            })
            .await;
        proxy
    }

    /// The backend's servers as `show stat` reports them.
    async fn stat(&self) -> std::io::Result<Vec<ServerStat>> {
        let mut sock = UnixStream::connect(&self.socket).await?;
        sock.write_all(b"show stat\n").await?;
        let mut csv = String::new();
        sock.read_to_string(&mut csv).await?;
        Ok(parse_stat(&csv))
    }

    /// Polls the stats socket until `done` holds; fails after `WAIT`
    /// with the last `show stat` and HAProxy's stderr.
    async fn wait_for(&self, what: &str, done: impl Fn(&[ServerStat]) -> bool) {
        eventually_ok(WAIT, &format!("haproxy: {what}"), async || {
            match self.stat().await {
                Ok(stat) if done(&stat) => Ok(()),
                last => Err(format!(
                    "{last:?}\nhaproxy stderr:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                )),
            }
        })
        .await;
    }

    /// A WebSocket through HAProxy to whichever gateway it picks; the
    /// client trusts `client`'s roots and sends `token` as a bearer header.
    async fn connect(&self, client: &Arc<ClientConfig>, token: &str) -> Ws {
        match self.upgrade_from(LOCAL, client, token).await {
            (101, Some(ws)) => ws,
            (status, _) => panic!("upgrade through haproxy answered {status}"),
        }
    }

    /// An upgrade through HAProxy from the loopback address `source`: the
    /// status, and the WebSocket when it is `101`.
    async fn upgrade_from(
        &self,
        source: IpAddr,
        client: &Arc<ClientConfig>,
        token: &str,
    ) -> (u16, Option<Ws>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let tcp = socket.connect(self.addr).await.expect("connect haproxy");
        let tls = tokio::time::timeout(
            WAIT,
            TlsConnector::from(Arc::clone(client))
                .connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .expect("tls through haproxy timed out")
        .expect("tls through haproxy");
        let url = format!("wss://localhost:{}/ws", self.addr.port());
        let req = bearer_request_to(&url, token);
        let upgrade = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tls))
            .await
            .expect("upgrade through haproxy timed out");
        match upgrade {
            Ok((ws, res)) => (res.status().as_u16(), Some(ws)),
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => (res.status().as_u16(), None),
            Err(e) => panic!("upgrade through haproxy: {e}"),
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct ServerStat {
    name: String,
    status: String,
    check: String,
}

/// The servers of backend `wsgate` in `show stat` CSV.
fn parse_stat(csv: &str) -> Vec<ServerStat> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(px), Some(sv), Some(st), Some(ck)) = (
        col("pxname"),
        col("svname"),
        col("status"),
        col("check_status"),
    ) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > ck.max(st) && f[px] == "wsgate" && f[sv] != "BACKEND")
        .map(|f| ServerStat {
            name: f[sv].to_owned(),
            status: f[st].to_owned(),
            check: f[ck].to_owned(),
        })
        .collect()
}

async fn sessions_open(gw: &Gateway) -> u64 {
    gw.metric("wsgate_sessions_open").await
}

#[tokio::test]
async fn heartbeats_keep_an_idle_session_open_through_haproxy() {
    let gw = start(|c, _| {
        behind_haproxy(c);
        c.websocket.heartbeat_ms = HEARTBEAT_MS;
    })
    .await;
    let proxy = Haproxy::start(&gw.path("ca.pem"), &[gw.addr]).await;
    let mut ws = proxy
        .connect(&gw.client, &gw.token("idle", &["member"]))
        .await;
    let welcome = read_json(&mut ws).await;
    assert_eq!(welcome["op"], "welcome");
    assert_eq!(welcome["heartbeat_ms"], HEARTBEAT_MS);

    // The client sends nothing of its own for 3 tunnel timeouts; only the
    // gateway's pings (and the pongs tungstenite answers with) cross HAProxy.
    // Reading until a fixed time is the test: the idle time is the subject.
    let idle_until = Instant::now() + TUNNEL * 3;
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(idle_until, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("the idle session ended after {pings} pings: {other:?}"),
        }
    }
    assert!(pings >= 5, "only {pings} pings in {:?}", TUNNEL * 3);

    ws.send(Message::text(
        r#"{"op":"subscribe","id":1,"channel":"chat:haproxy"}"#,
    ))
    .await
    .unwrap();
    let ok = read_json(&mut ws).await;
    assert!(crate::harness::is_ok(&ok, 1), "{ok}");
    ws.send(Message::text(
        r#"{"op":"publish","id":2,"channel":"chat:haproxy","data":{"text":"still here"}}"#,
    ))
    .await
    .unwrap();
    assert_eq!(
        read_json(&mut ws).await,
        serde_json::json!({"op": "ok", "id": 2})
    );
    let message = read_json(&mut ws).await;
    assert_eq!(message["op"], "message");
    assert_eq!(message["from"], "idle");
    assert_eq!(message["data"]["text"], "still here");
}

#[tokio::test]
async fn a_draining_gateway_leaves_rotation_and_new_clients_land_on_the_other() {
    let gw0 = start(|c, _| {
        behind_haproxy(c);
        c.server.drain_grace_ms = 30_000;
    })
    .await;
    // The same certificate and secret, so one client config and one token
    // work on either gateway.
    let keys = gw0.config.clone();
    let mut gw1 = start(move |c, _| {
        behind_haproxy(c);
        same_keys(c, &keys);
    })
    .await;
    gw1.client = Arc::clone(&gw0.client);
    let proxy = Haproxy::start(&gw0.path("ca.pem"), &[gw0.addr, gw1.addr]).await;
    let token = gw0.token("mover", &["member"]);

    // In rotation, both gateways take clients.
    let mut before = Vec::new();
    for _ in 0..4 {
        let mut ws = proxy.connect(&gw0.client, &token).await;
        assert_eq!(read_json(&mut ws).await["op"], "welcome");
        before.push(ws);
    }
    let (on0, on1) = (sessions_open(&gw0).await, sessions_open(&gw1).await);
    assert_eq!(on0 + on1, 4);
    assert!(on0 >= 1 && on1 >= 1, "not balanced: {on0} and {on1}");

    gw0.begin_stop();
    proxy
        .wait_for("gw0 DOWN with gw1 UP", |stat| {
            let status = |n: &str| stat.iter().find(|s| s.name == n).map(|s| s.status.clone());
            status("gw0").is_some_and(|s| s.starts_with("DOWN"))
                && status("gw1").as_deref() == Some("UP")
        })
        .await;

    // gw0 still accepts during its grace but would refuse upgrades with
    // 503; every new client gets a session, all of them on gw1.
    let mut after = Vec::new();
    for _ in 0..6 {
        let mut ws = proxy.connect(&gw0.client, &token).await;
        assert_eq!(read_json(&mut ws).await["op"], "welcome");
        after.push(ws);
    }
    assert_eq!(sessions_open(&gw1).await, on1 + 6);
    assert_eq!(
        sessions_open(&gw0).await,
        on0,
        "a new session landed on gw0"
    );
    assert_eq!(
        gw0.metric("wsgate_upgrades_total{result=\"draining\"}")
            .await,
        0,
        "HAProxy sent an upgrade to the draining gateway"
    );
}

/// Two replicas on one Redis, as `deploy/README.md` sets them up, with at
/// most one connection per client address, started behind HAProxy.
async fn replicas_behind_haproxy(redis: &RedisServer) -> (Gateway, Gateway, Haproxy) {
    let url = redis.url();
    let replica = move |c: &mut wsgate::Config| {
        behind_haproxy(c);
        c.cluster.redis_url = Some(url.clone());
        c.cluster.reconnect_max_ms = 200;
        c.admission.max_connections_per_address = 1;
    };
    let a = start({
        let replica = replica.clone();
        move |c, _| replica(c)
    })
    .await;
    // The same certificate and secret, so one client config and one token
    // work on either replica.
    let keys = a.config.clone();
    let mut b = start(move |c, _| {
        replica(c);
        same_keys(c, &keys);
    })
    .await;
    b.client = Arc::clone(&a.client);
    // Every server checked UP means /readyz answered 200 on both, so both
    // are connected to Redis.
    // Round-robin, so consecutive clients alternate between the replicas.
    let proxy =
        Haproxy::start_balancing(&a.path("ca.pem"), &[a.addr, b.addr], Some("roundrobin")).await;
    (a, b, proxy)
}

/// Clients' own source addresses, none of which any other test uses, so
/// finding one in the shared log capture means this test put it there.
fn source(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 42, n])
}

#[tokio::test]
async fn replicas_behind_haproxy_see_each_client_and_share_publications() {
    let redis = RedisServer::start().await;
    let (a, b, proxy) = replicas_behind_haproxy(&redis).await;
    let client = Arc::clone(&a.client);

    // Four clients from four addresses. With a limit of one connection per
    // address, a second one would be refused if the gateways counted
    // HAProxy's 127.0.0.1 instead of the address in the PROXY header.
    let users = ["ann", "ben", "cat", "dan"];
    let mut clients = Vec::new();
    for (n, user) in (2..).zip(users) {
        let (status, ws) = proxy
            .upgrade_from(source(n), &client, &a.token(user, &["member"]))
            .await;
        assert_eq!(status, 101, "{user} from {}", source(n));
        clients.push(Client::from_ws(ws.unwrap(), user).await);
    }
    let (on_a, on_b) = (sessions_open(&a).await, sessions_open(&b).await);
    assert_eq!(on_a + on_b, 4);
    assert!(on_a >= 1 && on_b >= 1, "not balanced: {on_a} and {on_b}");

    // Subscribers and publishers on both replicas: each client publishes in
    // turn, each publication acknowledged before the next, and every client
    // gets all of them in that order with one consecutive seq.
    for c in &mut clients {
        c.subscribe("chat:lb").await;
    }
    let rounds = 3;
    for round in 0..rounds {
        for (i, c) in clients.iter_mut().enumerate() {
            c.publish("chat:lb", serde_json::json!({"round": round, "from": i}))
                .await;
        }
    }
    let sent = rounds * users.len();
    for c in &mut clients {
        let mut first = None;
        for k in 0..sent {
            let m = c.next().await;
            assert_eq!(m["op"], "message", "{m}");
            let seq = m["seq"].as_u64().expect("seq");
            let first = *first.get_or_insert(seq);
            assert_eq!(seq, first + k as u64, "{m}");
            assert_eq!(m["from"], users[k % users.len()], "{m}");
            assert_eq!(
                m["data"],
                serde_json::json!({"round": k / users.len(), "from": k % users.len()})
            );
        }
    }

    // The per-address limit is per replica, so one address may hold one
    // connection on each of the two: of three connections from one
    // address at least one must be refused, whichever replicas HAProxy
    // picks. (Round-robin puts the first two on different replicas and
    // refuses the third; the assertions do not rely on it.)
    let token = a.token("eve", &["member"]);
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, ws) = proxy.upgrade_from(source(9), &client, &token).await;
        statuses.push(status);
        held.extend(ws);
    }
    assert_eq!(statuses[0], 101, "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [101, 429].contains(s)),
        "{statuses:?}"
    );
    let open = sessions_open(&a).await + sessions_open(&b).await;
    assert_eq!(open, 4 + held.len() as u64, "{statuses:?}");
    // Another address through the same HAProxy is not affected.
    let (status, _other) = proxy.upgrade_from(source(10), &client, &token).await;
    assert_eq!(status, 101);

    // The gateways logged the clients' addresses, not HAProxy's.
    let logs = captured_logs();
    for n in [2, 3, 4, 5, 9, 10] {
        assert!(
            logs.contains(&format!("client={}:", source(n))),
            "client={} is not in the logs",
            source(n)
        );
    }

    let refused = statuses.iter().filter(|s| **s == 429).count() as u64;
    let (mut address_limits, mut proxied_ok) = (0, 0);
    for gw in [&a, &b] {
        // From the admin listener (behind_haproxy), not via HAProxy.
        let text = gw.metrics().await;
        let proxied = |result: &str| {
            metric(
                &text,
                &format!("wsgate_proxy_headers_total{{result=\"{result}\"}}"),
            )
        };
        // Every client connection carried a PROXY header with its address,
        // and HAProxy's health checks a LOCAL one.
        assert!(proxied("ok") >= 1, "{text}");
        proxied_ok += proxied("ok");
        assert!(proxied("local") >= 1, "{text}");
        for bad in ["untrusted", "malformed", "timeout"] {
            assert_eq!(proxied(bad), 0, "{bad}");
        }
        address_limits += metric(&text, "wsgate_upgrades_total{result=\"address_limit\"}");
    }
    assert_eq!(address_limits, refused);
    // One header with an address per client connection, none for anything else.
    assert_eq!(proxied_ok, 4 + 3 + 1);
}

#[test]
fn shipped_haproxy_configs_pass_haproxy_c() {
    let haproxy = require_tool("haproxy");
    let dir = tempfile::tempdir().unwrap();
    let paths = wsgate::tools::certs::CertPaths::in_dir(dir.path());
    wsgate::tools::certs::generate(
        &paths,
        &["wsgate.internal".to_owned()],
        wsgate::tools::certs::Replace::Nothing,
    )
    .unwrap();
    // HAProxy's crt: the certificate and its key in one file.
    let combined = dir.path().join("combined.pem");
    let mut pem = std::fs::read(&paths.server_cert).unwrap();
    pem.extend(std::fs::read(&paths.server_key).unwrap());
    std::fs::write(&combined, pem).unwrap();
    let ca = paths.ca_cert.display().to_string();
    let crt = combined.display().to_string();

    let mut names: Vec<String> = std::fs::read_dir(repo_root().join("deploy/haproxy"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cfg"))
        .collect();
    names.sort();
    assert_eq!(names, ["wsgate-passthrough.cfg", "wsgate-reencrypt.cfg"]);
    for name in names {
        // -c loads the CA and certificate files: point them at real ones.
        let mut text = substitute(
            &shipped(&name),
            &[("/etc/haproxy/wsgate-ca.pem", ca.as_str())],
        );
        if text.contains("/etc/haproxy/certs/wsgate.pem") {
            text = substitute(&text, &[("/etc/haproxy/certs/wsgate.pem", crt.as_str())]);
        }
        let cfg = dir.path().join(&name);
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(&haproxy)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name}:\n{all}");
        assert!(
            !all.contains("[WARNING]") && !all.contains("[ALERT]"),
            "{name}:\n{all}"
        );
    }
}

/// Reads `n` `{"event":"subscribed"}` lines from a client program's
/// stdout, keeping the rest of the stream for its results.
async fn subscribed(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    n: usize,
    who: &str,
) {
    for _ in 0..n {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{who}: no subscribed line in time"))
            .expect("read")
            .unwrap_or_else(|| panic!("{who} ended before subscribing"));
        assert!(line.contains("\"subscribed\""), "{who}: {line}");
    }
}

/// Starts a client program that reads one token per line on stdin.
fn spawn_clients(
    mut command: std::process::Command,
    tokens: &[String],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn client program");
    let mut stdin = child.stdin.take().expect("stdin");
    let text = tokens.join("\n") + "\n";
    tokio::spawn(async move {
        let _ = stdin.write_all(text.as_bytes()).await;
    });
    let lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

/// One publication through HAProxy, reconnecting (to whichever replica
/// HAProxy picks) until one is acknowledged; returns the connection.
async fn publish_through(
    proxy: &Haproxy,
    client: &Arc<ClientConfig>,
    token: &str,
    mut ws: Option<Ws>,
    data: serde_json::Value,
) -> Ws {
    loop {
        let mut conn = match ws.take() {
            Some(ws) => ws,
            None => match proxy.upgrade_from(LOCAL, client, token).await {
                (101, Some(mut ws)) => {
                    let welcome = read_json(&mut ws).await;
                    assert_eq!(welcome["op"], "welcome");
                    ws
                }
                // A draining replica still in rotation: try again.
                _ => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let frame =
            serde_json::json!({"op": "publish", "id": 1, "channel": "chat:roll", "data": data});
        if conn.send(Message::text(frame.to_string())).await.is_err() {
            continue;
        }
        match tokio::time::timeout(WAIT, conn.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains(r#""op":"ok""#) => return conn,
            Ok(Some(Ok(Message::Text(text)))) => panic!("publish answered {text}"),
            // Closed (1001) or lost: publish again elsewhere. A message that
            // was published but not acknowledged is published twice, with
            // two seqs: the clients check seqs, not data.
            _ => {}
        }
    }
}

/// Zero-loss rolling restart: two replicas on Redis behind HAProxy (one
/// the built binary), 25 wsgate.js clients under Node and 25 raw Python
/// clients subscribed through it, a publisher at 200 messages/s. The
/// binary gets SIGTERM and drains (`/readyz` 503, HAProxy takes it out,
/// its sessions close with 1001 over the window, it exits 0); its clients
/// reconnect through HAProxy to the other and resume. Every client ends holding every `seq` from its
/// first to the last, once, in order.
#[tokio::test]
async fn a_rolling_restart_behind_haproxy_loses_no_message() {
    const PER_RUNTIME: usize = 25;
    let node = require_tool("node");
    let redis = RedisServer::start().await;
    let url = redis.url();
    let replica = move |c: &mut wsgate::Config| {
        behind_haproxy(c);
        c.cluster.redis_url = Some(url.clone());
        c.cluster.reconnect_max_ms = 200;
        c.server.drain_grace_ms = 800;
        c.server.drain_window_ms = 1_000;
        // HAProxy's tunnel timeout here is 1 s: heartbeats keep quiet
        // tunnels open, as in production.
        c.websocket.heartbeat_ms = HEARTBEAT_MS;
        // History sized for the rate: 200/s for up to a few seconds away.
        c.history.channels = vec![wsgate::config::HistoryRule {
            pattern: "chat:*".into(),
            max_messages: 2_000,
            max_age_s: 600,
        }];
        c.limits.publish_rate_per_s = 10_000;
        c.limits.publish_burst = 10_000;
    };
    // The replica that drains is the built binary, sent a real SIGTERM;
    // the other runs in this process.
    let mut a = crate::process::Proc::spawn({
        let replica = replica.clone();
        move |c, _| replica(c)
    })
    .await;
    let keys = a.config.clone();
    let mut b = start(move |c, _| {
        replica(c);
        same_keys(c, &keys);
    })
    .await;
    b.client = Arc::clone(&a.client);
    let ca = wsgate::tools::certs::CertPaths::for_server(
        &a.config.tls.cert_file,
        &a.config.tls.key_file,
    )
    .ca_cert;
    // Logged just after `listening`, which `spawn` waited for.
    let a_admin =
        crate::harness::eventually(WAIT, "replica A's admin listener in its log", async || {
            a.admin_addr()
        })
        .await;
    let proxy = Haproxy::start_balancing(&ca, &[a.addr, b.addr], Some("roundrobin")).await;
    let ws_url = format!("wss://localhost:{}/ws", proxy.addr.port());

    let tokens = |prefix: &str| -> Vec<String> {
        (0..PER_RUNTIME)
            .map(|i| a.token(&format!("{prefix}{i}"), &["member"]))
            .collect()
    };
    let mut js = std::process::Command::new(node);
    js.arg(repo_root().join("web/test/roll_js.mjs"))
        .args([&ws_url, "chat:roll"])
        .env("WSGATE_CA", &ca);
    let (mut js_child, mut js_lines) = spawn_clients(js, &tokens("js"));
    let mut py = crate::harness::python_with("websockets");
    py.arg(repo_root().join("web/test/roll_py.py"))
        .args([&ws_url, "chat:roll"])
        .env("WSGATE_CA", &ca);
    let (mut py_child, mut py_lines) = spawn_clients(py, &tokens("py"));
    subscribed(&mut js_lines, PER_RUNTIME, "node clients").await;
    subscribed(&mut py_lines, PER_RUNTIME, "python clients").await;
    let on_a = metric(
        &admin_get(a_admin, "/metrics").await.1,
        "wsgate_sessions_open",
    );
    assert!(on_a >= 10, "only {on_a} clients on the replica to drain");

    // 200 messages/s for 3 s; the drain starts after 1 s.
    let publisher_token = a.token("publisher", &["member"]);
    let mut conn = None;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let started = Instant::now();
    let mut published = 0u64;
    let mut drained = false;
    while started.elapsed() < Duration::from_secs(3) {
        tick.tick().await;
        if !drained && started.elapsed() >= Duration::from_secs(1) {
            a.signal("TERM");
            drained = true;
        }
        published += 1;
        conn = Some(
            publish_through(
                &proxy,
                &a.client,
                &publisher_token,
                conn,
                serde_json::json!({"n": published}),
            )
            .await,
        );
    }
    publish_through(
        &proxy,
        &a.client,
        &publisher_token,
        conn,
        serde_json::json!({"end": true}),
    )
    .await;

    let mut results = Vec::new();
    for (child, lines, who) in [
        (&mut js_child, &mut js_lines, "node"),
        (&mut py_child, &mut py_lines, "python"),
    ] {
        while let Some(line) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{who} clients did not finish"))
            .expect("read")
        {
            results.push(serde_json::from_str::<serde_json::Value>(&line).expect("json"));
        }
        assert!(
            child.wait().await.expect("wait").success(),
            "{who} clients failed"
        );
    }
    assert_eq!(results.len(), 2 * PER_RUNTIME);
    let mut reconnected = 0;
    let mut last = None;
    for r in &results {
        let seqs: Vec<u64> = r["seqs"]
            .as_array()
            .expect("seqs")
            .iter()
            .map(|s| s.as_u64().expect("seq"))
            .collect();
        let (first, top) = (seqs[0], *seqs.last().expect("messages"));
        assert_eq!(
            seqs,
            (first..=top).collect::<Vec<_>>(),
            "{}: not every seq once, in order",
            r["client"]
        );
        assert_eq!(r["unrecovered"], serde_json::json!([]), "{}", r["client"]);
        assert!(
            *last.get_or_insert(top) == top,
            "clients stopped at different seqs"
        );
        if r["reconnects"].as_u64() > Some(0) {
            reconnected += 1;
        }
    }
    eprintln!(
        "rolling restart: {} clients (25 wsgate.js, 25 Python), {} publications at 200/s, {} clients drained with 1001 and resumed on the other replica; every client holds every seq from its first to {}, once, in order",
        results.len(),
        published,
        reconnected,
        last.unwrap_or(0)
    );
    assert!(
        reconnected as u64 >= on_a,
        "{reconnected} reconnected, {on_a} were on the drained replica"
    );
    assert!(a.wait_exit().await.success(), "the drained replica exits 0");
}
