//! `wsgate certs` and `wsgate token`, run as the real binary: certificates
//! validate with webpki against the generated CA; minted tokens verify with
//! the gateway's key; forged and confused tokens do not.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use wsgate::auth::Verifier;
use wsgate::tls::{load_certs, provider};
use wsgate::tools::certs::{self, CertPaths};

use crate::harness::{self, hs256_jwt, now, raw_jwt, start};

fn wsgate(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("WSGATE_CONFIG")
        .output()
        .expect("run wsgate")
}

fn verify_name(paths: &CertPaths, name: &str) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&paths.ca_cert).unwrap() {
        roots.add(cert).unwrap();
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.into(), provider())
        .build()
        .unwrap();
    let chain = load_certs(&paths.server_cert).unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(|_| ())
}

/// A config file that points the CLI at the gateway's HMAC secret.
fn secret_config(gw: &harness::Gateway) -> std::path::PathBuf {
    let file = gw.path("cli.toml");
    let secret = gw.config.auth.hmac_secret_file.display().to_string();
    std::fs::write(&file, format!("[auth]\nhmac_secret_file = {secret:?}\n")).unwrap();
    file
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn certs_command_makes_a_chain_webpki_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = wsgate(&["certs", "--out", "c", "--host", "gw.test"], dir.path());
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("NODE_EXTRA_CA_CERTS="), "{stdout}");
    assert!(stdout.contains("SSL_CERT_FILE="), "{stdout}");
    let paths = CertPaths::in_dir(&dir.path().join("c"));
    for name in ["localhost", "127.0.0.1", "::1", "gw.test"] {
        verify_name(&paths, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(verify_name(&paths, "example.com").is_err());
    assert_eq!(mode(&paths.server_key), 0o600);
    assert_eq!(mode(&paths.ca_key), 0o600);

    // No overwrite without --force; the files stay as they were.
    let before = std::fs::read(&paths.server_cert).unwrap();
    let again = wsgate(&["certs", "--out", "c"], dir.path());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read(&paths.server_cert).unwrap(), before);

    let ca = std::fs::read(&paths.ca_cert).unwrap();
    let forced = wsgate(&["certs", "--out", "c", "--force"], dir.path());
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(std::fs::read(&paths.server_cert).unwrap(), before);
    assert_eq!(
        std::fs::read(&paths.ca_cert).unwrap(),
        ca,
        "--force keeps the CA"
    );
    verify_name(&paths, "localhost").unwrap();

    let renewed = wsgate(&["certs", "--out", "c", "--new-ca"], dir.path());
    assert!(renewed.status.success(), "{renewed:?}");
    assert_ne!(
        std::fs::read(&paths.ca_cert).unwrap(),
        ca,
        "--new-ca replaces the CA"
    );
    verify_name(&paths, "localhost").unwrap();
}

#[test]
fn a_kept_ca_signs_the_new_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let paths = CertPaths::in_dir(dir.path());
    certs::generate(&paths, &[], certs::Replace::Nothing).unwrap();
    let ca = std::fs::read(&paths.ca_cert).unwrap();
    std::fs::remove_file(&paths.server_cert).unwrap();
    std::fs::remove_file(&paths.server_key).unwrap();
    assert_eq!(
        certs::generate(&paths, &[], certs::Replace::Nothing).unwrap(),
        certs::CaSource::Reused
    );
    assert_eq!(std::fs::read(&paths.ca_cert).unwrap(), ca);
    verify_name(&paths, "localhost").unwrap();
}

#[tokio::test]
async fn token_command_output_verifies_and_connects() {
    let gw = start(|_, _| {}).await;
    let config_file = secret_config(&gw);
    let out = wsgate(
        &[
            "token",
            "--config",
            config_file.to_str().unwrap(),
            "--sub",
            "alice",
            "--role",
            "member",
            "--role",
            "admin",
            "--ttl",
            "15m",
            "--claim",
            "tenant=acme",
            "--claim",
            "level=3",
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.trim_end();
    assert_eq!(stdout.lines().count(), 1, "token alone on stdout");

    let identity = Verifier::from_config(&gw.config)
        .unwrap()
        .verify(token)
        .unwrap();
    assert_eq!(identity.user, "alice");
    assert_eq!(identity.roles, ["member", "admin"]);
    assert_eq!(identity.claims["tenant"], "acme");
    assert_eq!(identity.claims["level"], 3);
    let ttl = identity.expires_at - now();
    assert!((880..=900).contains(&ttl), "ttl {ttl}");

    let (_, res) = gw.connect(token).await.expect("connect");
    assert_eq!(res.status(), 101);
}

#[test]
fn token_command_refuses_short_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short.secret"), "too short\n").unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "[auth]\nhmac_secret_file = \"short.secret\"\n",
    )
    .unwrap();
    let out = wsgate(&["token", "--config", "c.toml", "--sub", "a"], dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32"), "{err}");
}

/// The gateway pinned to RS256 must refuse an HS256 token whose HMAC key is
/// the RSA public key's bytes (the classic algorithm-confusion attack), and
/// a token whose header says `none`.
#[tokio::test]
async fn rs256_gateway_refuses_algorithm_confusion() {
    let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .expect("rsa key");
    let public_pem = rsa.public_key_pem();
    let gw = start(|c, dir| {
        let public = dir.join("rsa.pub.pem");
        let private = dir.join("rsa.key.pem");
        std::fs::write(&public, &public_pem).unwrap();
        std::fs::write(&private, rsa.serialize_pem()).unwrap();
        c.auth.algorithms = vec!["RS256".into()];
        c.auth.public_key_file = Some(public);
        c.auth.private_key_file = Some(private);
    })
    .await;

    // A real RS256 token works.
    let good = gw.token("alice", &[]);
    let (_, res) = gw.connect(&good).await.expect("rs256 token");
    assert_eq!(res.status(), 101);

    let claims = format!(r#"{{"sub":"mallory","exp":{}}}"#, now() + 600);
    let confused = hs256_jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &claims,
        public_pem.as_bytes(),
    );
    let none = raw_jwt(r#"{"alg":"none"}"#, &claims, b"");
    for (token, why) in [
        (confused, "HS256 keyed with the RSA public key"),
        (none, "alg none"),
    ] {
        harness::assert_invalid_token(&gw, &token, why).await;
    }
}

#[test]
fn check_config_reports_problems_without_binding() {
    let dir = tempfile::tempdir().unwrap();
    let paths = CertPaths::in_dir(&dir.path().join("certs"));
    certs::generate(&paths, &[], certs::Replace::Nothing).unwrap();
    wsgate::tools::certs::ensure_dev_secret(&dir.path().join("certs/dev-hmac.secret")).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/default.toml"),
        wsgate::policy::DEFAULT_POLICY,
    )
    .unwrap();
    // The defaults point at certs/ under the working directory.
    let ok = wsgate(&["check-config"], dir.path());
    assert!(ok.status.success(), "{ok:?}");

    std::fs::write(
        dir.path().join("bad.toml"),
        "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n",
    )
    .unwrap();
    let bad = wsgate(&["check-config", "--config", "bad.toml"], dir.path());
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bogus"));

    // A history pattern is compiled as `serve` compiles it.
    std::fs::write(
        dir.path().join("history.toml"),
        "[[history.channels]]\npattern = \"user:{sub}\"\nmax_messages = 10\nmax_age_s = 60\n",
    )
    .unwrap();
    let bad = wsgate(&["check-config", "--config", "history.toml"], dir.path());
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("history.channels") && stderr.contains("templates"),
        "{stderr}"
    );

    std::fs::remove_file(&paths.server_key).unwrap();
    let missing = wsgate(&["check-config"], dir.path());
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("server.key"));
}

#[tokio::test]
async fn serve_dev_needs_no_prior_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("WSGATE_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let (mut url, mut token) = (None, None);
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let line = line.trim().to_owned();
            if let Some(u) = line.strip_prefix("WebSocket: ") {
                url = Some(u.to_owned());
            } else if line.starts_with("eyJ") {
                token = Some(line);
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("banner");
    let url = url.expect("url printed");
    let token = token.expect("token printed");
    let port: u16 = url
        .trim_start_matches("wss://localhost:")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    assert_eq!(mode(&dir.path().join("certs/server.key")), 0o600);
    assert_eq!(mode(&dir.path().join("certs/dev-hmac.secret")), 0o600);

    let client = harness::client_config(&dir.path().join("certs/ca.pem"));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(client)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (_, res) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade");
    assert_eq!(res.status(), 101);
    child.start_kill().unwrap();
}

#[test]
fn policy_check_reports_counts_and_file_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("p");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("default.toml"),
        wsgate::policy::DEFAULT_POLICY,
    )
    .unwrap();
    let ok = wsgate(&["policy", "check", "--dir", "p"], dir.path());
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok: 4 rules in 1 file(s)"));

    std::fs::write(
        policies.join("zz-bad.toml"),
        "[[rule]]\nname = \"broken\"\nallow.subscribe = [\"chat:>:x\"]\n",
    )
    .unwrap();
    let bad = wsgate(&["policy", "check", "--dir", "p"], dir.path());
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("zz-bad.toml:3:"), "{err}");
    assert!(err.contains("`>` may only be the last token"), "{err}");
}

#[tokio::test]
async fn policy_explain_names_the_deciding_rule() {
    let gw = start(|_, _| {}).await;
    let dir = gw.config.policy.dir.to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        let mut all = vec!["policy", "explain", "--dir", &dir];
        all.extend_from_slice(args);
        wsgate(&all, gw.dir.path())
    };
    let allowed = run(&[
        "--sub",
        "alice",
        "--role",
        "member",
        "--action",
        "publish",
        "--channel",
        "chat:lobby",
    ]);
    assert_eq!(allowed.status.code(), Some(0), "{allowed:?}");
    let out = String::from_utf8_lossy(&allowed.stdout);
    assert!(
        out.contains("result:  allowed by rule \"members chat\""),
        "{out}"
    );
    assert!(out.contains("default.toml:"), "{out}");

    let denied = run(&[
        "--sub",
        "alice",
        "--role",
        "member",
        "--action",
        "publish",
        "--channel",
        "announce:x",
    ]);
    assert_eq!(denied.status.code(), Some(2));
    let out = String::from_utf8_lossy(&denied.stdout);
    assert!(out.contains("default deny"), "{out}");
    assert!(
        out.contains("does not apply: needs a role of admin"),
        "{out}"
    );

    // A crafted sub gains nothing through {sub}.
    let sneaky = run(&[
        "--sub",
        "*",
        "--action",
        "subscribe",
        "--channel",
        "user:bob",
    ]);
    assert_eq!(sneaky.status.code(), Some(2));

    // From a verified token, with the gateway's own config.
    let config_file = secret_config(&gw);
    let token = gw.token("root", &["admin"]);
    let admin = run(&[
        "--config",
        config_file.to_str().unwrap(),
        "--token",
        &token,
        "--action",
        "publish",
        "--channel",
        "announce:all",
    ]);
    assert_eq!(admin.status.code(), Some(0), "{admin:?}");
    assert!(String::from_utf8_lossy(&admin.stdout).contains("\"admins announce\""));
    let forged = run(&[
        "--config",
        config_file.to_str().unwrap(),
        "--token",
        &hs256_jwt(
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"x","exp":9999999999}"#,
            b"not the key, not the key, not it!",
        ),
        "--action",
        "publish",
        "--channel",
        "announce:all",
    ]);
    assert_eq!(forged.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&forged.stderr).contains("token refused"));
}

/// `/dev/token` mints tokens with any role: `--dev` refuses to serve it
/// beyond loopback unless the operator names exactly that. (Refused before
/// anything is bound.)
#[test]
fn serve_dev_beyond_loopback_needs_the_flag_that_says_what_it_exposes() {
    let dir = tempfile::tempdir().unwrap();
    let out = wsgate(&["serve", "--dev", "--listen", "0.0.0.0:0"], dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing --dev on 0.0.0.0:0"), "{err}");
    assert!(err.contains("--dev-token-for-anyone"), "{err}");
    let out = wsgate(&["serve", "--dev-token-for-anyone"], dir.path());
    assert!(!out.status.success(), "the flag needs --dev");
}
