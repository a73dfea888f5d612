//! `wsgate doctor`, run as the real binary on configurations written for
//! each case: a clean one passes without warnings, each risky setting gets
//! its own warning (and only that one), broken files are errors with a
//! non-zero exit, and no secret byte ever reaches the output.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair};
use time::{Duration, OffsetDateTime};
use wsgate::tools::certs::{self, CertPaths};

use crate::deploy::{Provided, deploy, wsgate};

/// The knobs a case turns; `Knobs::clean` is a configuration with nothing
/// to warn about.
#[derive(Clone)]
struct Knobs {
    listen: String,
    query_token: bool,
    origins: Vec<String>,
    same_origin: bool,
    issuers: Vec<String>,
    audiences: Vec<String>,
    tls13_only: bool,
    heartbeat_ms: u64,
    max_connections: u64,
    cert: PathBuf,
    key: PathBuf,
    secret: PathBuf,
    policies: PathBuf,
    trusted_proxies: Vec<String>,
    redis_url: Option<String>,
}

struct Setup {
    dir: tempfile::TempDir,
    clean: Knobs,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::in_dir(&dir.path().join("tls"));
        certs::generate(&paths, &[], certs::Replace::Nothing).unwrap();
        let secret = dir.path().join("jwt.secret");
        wsgate::tools::certs::ensure_dev_secret(&secret).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        std::fs::write(
            policies.join("default.toml"),
            wsgate::policy::DEFAULT_POLICY,
        )
        .unwrap();
        let clean = Knobs {
            listen: "127.0.0.1:8443".into(),
            query_token: false,
            origins: vec!["https://app.test".into()],
            same_origin: false,
            issuers: vec!["https://id.test".into()],
            audiences: vec!["wsgate".into()],
            tls13_only: true,
            heartbeat_ms: 25_000,
            max_connections: 100,
            cert: paths.server_cert,
            key: paths.server_key,
            secret,
            policies,
            trusted_proxies: Vec::new(),
            redis_url: None,
        };
        Self { dir, clean }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `k` as a config file, runs `wsgate doctor` on it.
    fn doctor(&self, k: &Knobs) -> Report {
        let text = format!(
            "[server]\nlisten = {:?}\nallowed_origins = {:?}\nallow_same_origin = {}\n\
             max_connections = {}\noverflow_connections = 10\ntrusted_proxies = {:?}\n\
             [tls]\ncert_file = {:?}\nkey_file = {:?}\ntls13_only = {}\n\
             [auth]\nhmac_secret_file = {:?}\nissuers = {:?}\naudiences = {:?}\nquery_token = {}\n\
             [websocket]\nheartbeat_ms = {}\n[policy]\ndir = {:?}\n{}",
            k.listen,
            k.origins,
            k.same_origin,
            k.max_connections,
            k.trusted_proxies,
            k.cert.display().to_string(),
            k.key.display().to_string(),
            k.tls13_only,
            k.secret.display().to_string(),
            k.issuers,
            k.audiences,
            k.query_token,
            k.heartbeat_ms,
            k.policies.display().to_string(),
            k.redis_url
                .as_ref()
                .map_or(String::new(), |u| format!("[cluster]\nredis_url = {u:?}\n")),
        );
        let file = self.path("doctor.toml");
        std::fs::write(&file, text).unwrap();
        Report::of(wsgate(
            &["doctor", "--config", &file.display().to_string()],
            &[],
        ))
    }
}

struct Report {
    ok: bool,
    stdout: String,
    all: String,
}

impl Report {
    fn of(out: std::process::Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        Self {
            ok: out.status.success(),
            stdout,
            all,
        }
    }

    fn lines(&self, level: &str) -> Vec<&str> {
        let prefix = format!("{level}: ");
        self.stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    fn has(&self, start: &str) -> bool {
        self.stdout.lines().any(|l| l.starts_with(start))
    }
}

/// A self-signed `localhost` certificate and its key, valid until `not_after`.
fn cert_until(dir: &Path, name: &str, not_after: OffsetDateTime) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = OffsetDateTime::now_utc() - Duration::days(400);
    params.not_after = not_after;
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn a_clean_config_passes_without_warnings() {
    let setup = Setup::new();
    let report = setup.doctor(&setup.clean);
    assert!(report.ok, "{}", report.all);
    assert!(report.lines("warning").is_empty(), "{}", report.all);
    assert!(report.lines("error").is_empty(), "{}", report.all);
    for key in [
        "auth.query_token",
        "auth.issuers",
        "auth.audiences",
        "auth.hmac_secret_file",
        "server.allowed_origins",
        "tls.tls13_only",
        "tls.cert_file",
        "websocket.heartbeat_ms",
        "policy.dir",
        "server.max_connections",
    ] {
        assert!(
            report.has(&format!("ok: {key}: ")),
            "no ok for {key}:\n{}",
            report.all
        );
    }
    assert!(
        report.stdout.contains("0 error(s), 0 warning(s)"),
        "{}",
        report.all
    );
}

#[test]
fn each_risky_setting_gets_its_own_warning() {
    let setup = Setup::new();
    let clean = &setup.clean;
    let dev_secret = setup.path("certs/dev-hmac.secret");
    std::fs::create_dir_all(dev_secret.parent().unwrap()).unwrap();
    wsgate::tools::certs::ensure_dev_secret(&dev_secret).unwrap();
    let weak = setup.path("weak.secret");
    std::fs::write(&weak, "K9v".repeat(16)).unwrap();
    let (soon_cert, soon_key) = cert_until(
        setup.dir.path(),
        "soon",
        OffsetDateTime::now_utc() + Duration::days(10),
    );
    let empty_policies = setup.path("no-rules");
    std::fs::create_dir(&empty_policies).unwrap();
    std::fs::write(empty_policies.join("empty.toml"), "# nothing yet\n").unwrap();

    type Tweak = Box<dyn Fn(&mut Knobs)>;
    let cases: Vec<(&str, Tweak, &[&str])> = vec![
        (
            "query tokens",
            Box::new(|k| k.query_token = true),
            &["warning: auth.query_token: "],
        ),
        (
            "no origins, same-origin only",
            Box::new(|k| {
                k.origins.clear();
                k.same_origin = true;
            }),
            &["warning: server.allowed_origins: "],
        ),
        (
            "plain http origin",
            Box::new(|k| k.origins = vec!["http://app.test".into()]),
            &["warning: server.allowed_origins: "],
        ),
        (
            "no issuers",
            Box::new(|k| k.issuers.clear()),
            &["warning: auth.issuers: "],
        ),
        (
            "no audiences",
            Box::new(|k| k.audiences.clear()),
            &["warning: auth.audiences: "],
        ),
        (
            "heartbeat at an LB idle timeout",
            Box::new(|k| k.heartbeat_ms = 60_000),
            &["warning: websocket.heartbeat_ms: "],
        ),
        (
            "dev certificate on all interfaces",
            Box::new(|k| k.listen = "0.0.0.0:8443".into()),
            &["warning: tls.cert_file: "],
        ),
        (
            "more connections than open files",
            Box::new(|k| k.max_connections = 4_000_000_000),
            &["warning: server.max_connections: "],
        ),
        (
            "low-entropy secret",
            Box::new(move |k| k.secret = weak.clone()),
            &["warning: auth.hmac_secret_file: "],
        ),
        (
            "dev secret beyond loopback",
            {
                let dev_secret = dev_secret.clone();
                Box::new(move |k| {
                    k.secret = dev_secret.clone();
                    k.listen = "0.0.0.0:8443".into();
                })
            },
            &[
                "warning: auth.hmac_secret_file: ",
                "warning: tls.cert_file: ",
            ],
        ),
        (
            "certificate expiring in 10 days",
            Box::new(move |k| {
                k.cert = soon_cert.clone();
                k.key = soon_key.clone();
            }),
            &["warning: tls.cert_file: "],
        ),
        (
            "a policy set without rules",
            Box::new(move |k| k.policies = empty_policies.clone()),
            &["warning: policy.dir: "],
        ),
        (
            "every address a trusted proxy",
            Box::new(|k| k.trusted_proxies = vec!["0.0.0.0/0".into()]),
            &["warning: server.trusted_proxies: "],
        ),
        (
            "remote Redis without a password",
            Box::new(|k| k.redis_url = Some("redis://10.0.0.5:6379/".into())),
            &["warning: cluster.redis_url: "],
        ),
        (
            "remote Redis with a password",
            Box::new(|k| k.redis_url = Some("redis://:s3cret@10.0.0.5:6379/".into())),
            &[],
        ),
        // Notes, not warnings: these are sound choices, only worth knowing.
        ("TLS 1.2 allowed", Box::new(|k| k.tls13_only = false), &[]),
        (
            "dev secret on loopback",
            Box::new(move |k| k.secret = dev_secret.clone()),
            &[],
        ),
    ];
    for (name, tweak, expected) in cases {
        let mut knobs = clean.clone();
        tweak(&mut knobs);
        let report = setup.doctor(&knobs);
        assert!(report.ok, "{name}: warnings alone exit 0\n{}", report.all);
        assert!(
            !report.all.contains("s3cret"),
            "{name}: a password was printed"
        );
        let warnings = report.lines("warning");
        assert_eq!(
            warnings.len(),
            expected.len(),
            "{name}: {warnings:#?}\n{}",
            report.all
        );
        for start in expected {
            assert!(report.has(start), "{name}: no {start:?}\n{}", report.all);
        }
        assert!(report.lines("error").is_empty(), "{name}: {}", report.all);
    }
}

#[test]
fn broken_files_are_errors_and_exit_non_zero() {
    let setup = Setup::new();
    let short = setup.path("short.secret");
    std::fs::write(&short, "tooshort-but-secret\n").unwrap();
    let (expired_cert, expired_key) = cert_until(
        setup.dir.path(),
        "expired",
        OffsetDateTime::now_utc() - Duration::days(2),
    );
    let (other_cert, _) = cert_until(
        setup.dir.path(),
        "other",
        OffsetDateTime::now_utc() + Duration::days(90),
    );

    type Tweak = Box<dyn Fn(&mut Knobs)>;
    let cases: Vec<(&str, Tweak, &str, &str)> = vec![
        (
            "secret under 32 bytes",
            Box::new(move |k| k.secret = short.clone()),
            "error: auth.hmac_secret_file: ",
            "19 bytes",
        ),
        (
            "expired certificate",
            Box::new(move |k| {
                k.cert = expired_cert.clone();
                k.key = expired_key.clone();
            }),
            "error: tls.cert_file: ",
            "expired on",
        ),
        (
            "key of another certificate",
            Box::new(move |k| k.cert = other_cert.clone()),
            "error: tls.key_file: ",
            "is not the private key of",
        ),
        (
            "missing policy directory",
            Box::new(|k| k.policies = PathBuf::from("/nonexistent/policies")),
            "error: policy.dir: ",
            "/nonexistent/policies",
        ),
        (
            "a config serve refuses",
            Box::new(|k| k.max_connections = 0),
            "error: config: ",
            "max_connections",
        ),
    ];
    for (name, tweak, start, detail) in cases {
        let mut knobs = setup.clean.clone();
        tweak(&mut knobs);
        let report = setup.doctor(&knobs);
        assert!(!report.ok, "{name}: exited 0\n{}", report.all);
        let line = report
            .lines("error")
            .into_iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("{name}: no {start:?}\n{}", report.all));
        assert!(line.contains(detail), "{name}: {line}");
    }
}

#[test]
fn no_secret_bytes_reach_the_output() {
    let setup = Setup::new();
    // One too short (an error), one long but weak (a warning), one good:
    // every path that reads the secret.
    let secrets = [
        "Zq8Zq8Zq8Zq8Zq8Zq8x".to_owned(),
        "Zq8".repeat(20),
        std::fs::read_to_string(&setup.clean.secret).unwrap(),
    ];
    for (i, secret) in secrets.iter().enumerate() {
        let path = setup.path(&format!("s{i}.secret"));
        std::fs::write(&path, secret).unwrap();
        let mut knobs = setup.clean.clone();
        knobs.secret = path;
        let report = setup.doctor(&knobs);
        assert!(
            report.has("error: auth.hmac_secret_file: ")
                || report.has("warning: auth.hmac_secret_file: ")
                || report.has("ok: auth.hmac_secret_file: "),
            "{}",
            report.all
        );
        let secret = secret.trim_end();
        for window in secret.as_bytes().windows(8) {
            let window = std::str::from_utf8(window).unwrap();
            assert!(
                !report.all.contains(window),
                "secret {i} leaked ({window:?}):\n{}",
                report.all
            );
        }
    }
}

#[test]
fn the_shipped_config_has_no_errors() {
    let provided = Provided::new();
    // A certificate from some other CA than wsgate's development one, as
    // production has: the shipped file listens on all interfaces.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert_until(
        dir.path(),
        "prod",
        OffsetDateTime::now_utc() + Duration::days(90),
    );
    let mut env = provided.env();
    for (name, value) in &mut env {
        match *name {
            "WSGATE_TLS_CERT_FILE" => *value = cert.display().to_string(),
            "WSGATE_TLS_KEY_FILE" => *value = key.display().to_string(),
            _ => {}
        }
    }
    let config = deploy("wsgate.toml").display().to_string();
    let report = Report::of(wsgate(&["doctor", "--config", &config], &env));
    assert!(report.ok, "{}", report.all);
    assert!(report.lines("error").is_empty(), "{}", report.all);
    // Only the open-file limit of this test process may fall short of the
    // 20,000 connections the shipped file allows (systemd raises it).
    for line in report.lines("warning") {
        assert!(
            line.starts_with("warning: server.max_connections: "),
            "{}",
            report.all
        );
    }
}
