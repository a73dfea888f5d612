//! The shipped deployment files (`deploy/`): each is checked by the tool
//! that will read it (the wsgate binary, `systemd-analyze`, `nginx -t`, the
//! Kubernetes schemas), and their timeouts are checked against the shipped
//! wsgate configuration so the files cannot drift apart. HAProxy's files
//! are checked in `haproxy.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use wsgate::Config;
use wsgate::tools::certs::{self, CertPaths};

use crate::harness::{python_with, repo_root, require_file, require_tool, substitute};

pub fn deploy(path: &str) -> PathBuf {
    repo_root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shipped_config() -> Config {
    Config::load(Some(&deploy("wsgate.toml")), Vec::new()).expect("deploy/wsgate.toml loads")
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `60s`, `1h`, `500ms`, `2m` or a bare number of seconds.
fn duration(text: &str) -> Duration {
    let text = text.trim().trim_end_matches(';');
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("no number in {text:?}"));
    match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => panic!("unknown unit {other:?} in {text:?}"),
    }
}

/// The values of every line of `text` that starts with `key` (after
/// indentation), the key itself cut off.
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix(key))
        .filter(|rest| rest.starts_with([' ', '=', ':']))
        .map(|rest| rest.trim_start_matches([' ', '=', ':']).trim())
        .collect()
}

/// Files for every path the shipped config reads, as the systemd unit and
/// the Kubernetes pod provide them: certificate, key, issuer key, policies.
pub struct Provided {
    dir: tempfile::TempDir,
}

impl Provided {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::in_dir(dir.path());
        certs::generate(
            &paths,
            &["wsgate.internal".to_owned()],
            certs::Replace::Nothing,
        )
        .unwrap();
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        std::fs::write(dir.path().join("issuer-public.pem"), rsa.public_key_pem()).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        std::fs::copy(
            repo_root().join("policies/default.toml"),
            policies.join("default.toml"),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The `WSGATE_*` overrides that point the shipped config at these files.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("WSGATE_TLS_CERT_FILE", self.path("server.pem")),
            ("WSGATE_TLS_KEY_FILE", self.path("server.key")),
            (
                "WSGATE_AUTH_PUBLIC_KEY_FILE",
                self.path("issuer-public.pem"),
            ),
            ("WSGATE_POLICY_DIR", self.path("policies")),
        ]
    }
}

pub fn wsgate(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    command.args(args).env_remove("WSGATE_CONFIG");
    // Only the variables under test: a developer's own WSGATE_* must not leak in.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WSGATE_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    command.output().expect("run wsgate")
}

#[test]
fn shipped_config_passes_check_config_with_the_files_it_names() {
    let provided = Provided::new();
    let config = deploy("wsgate.toml").display().to_string();
    let out = wsgate(&["check-config", "--config", &config], &provided.env());
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    // Without the files it names, it fails on the first: the paths in the
    // file are real, not placeholders that happen to parse.
    let out = wsgate(&["check-config", "--config", &config], &[]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/etc/wsgate/jwt/issuer-public.pem"),
        "{}",
        show(&out)
    );
}

/// `deploy/wsgate.toml` with one of its commented balancer blocks turned on.
fn behind(variant: &str) -> String {
    let text = read(&deploy("wsgate.toml"));
    let pairs: &[(&str, &str)] = match variant {
        "passthrough" => &[
            (
                "#proxy_protocol = true\n#trusted_proxies",
                "proxy_protocol = true\ntrusted_proxies",
            ),
            ("#admin_listen", "admin_listen"),
        ],
        "reencrypt" => &[(
            "#forwarded_header = \"x-forwarded-for\"\n#trusted_proxies",
            "forwarded_header = \"x-forwarded-for\"\ntrusted_proxies",
        )],
        other => panic!("no variant {other}"),
    };
    substitute(&text, pairs)
}

#[test]
fn shipped_config_has_the_settings_the_shipped_balancers_need() {
    let provided = Provided::new();
    let dir = tempfile::tempdir().unwrap();
    for variant in ["passthrough", "reencrypt"] {
        let path = dir.path().join(format!("{variant}.toml"));
        std::fs::write(&path, behind(variant)).unwrap();
        let file = path.display().to_string();
        let out = wsgate(&["check-config", "--config", &file], &provided.env());
        assert!(out.status.success(), "{variant}: {}", show(&out));
        let config = Config::load(Some(&path), Vec::new()).unwrap();
        let s = &config.server;
        assert!(!s.trusted_proxies.is_empty(), "{variant}");
        let forwarding = s.forwarded_header == wsgate::config::ForwardedHeader::XForwardedFor;
        assert_eq!(
            (s.proxy_protocol, forwarding),
            (variant == "passthrough", variant == "reencrypt"),
            "{variant}"
        );
    }

    // Passthrough: every connection to a gateway, health checks included,
    // starts with a PROXY header.
    let haproxy = read(&deploy("haproxy/wsgate-passthrough.cfg"));
    let servers = values(&haproxy, "server");
    assert!(servers.len() >= 2, "{servers:?}");
    for line in &servers {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(words.contains(&"send-proxy-v2"), "{line}");
        assert!(words.contains(&"check-send-proxy"), "{line}");
    }
    let stream = read(&deploy("nginx/wsgate-passthrough.conf"));
    assert_eq!(values(&stream, "proxy_protocol"), ["on;"]);

    // Re-encryption: the proxy writes X-Forwarded-For itself, replacing
    // whatever the client sent, so its right-most entry is the client.
    let haproxy = read(&deploy("haproxy/wsgate-reencrypt.cfg"));
    let line = |directive: &str| {
        haproxy
            .lines()
            .position(|l| l.trim_start().starts_with(directive))
            .unwrap_or_else(|| panic!("no {directive:?} in wsgate-reencrypt.cfg"))
    };
    assert!(
        line("http-request del-header X-Forwarded-For") < line("option forwardfor"),
        "HAProxy must drop the client's X-Forwarded-For before adding its own"
    );
    assert!(
        !values(&haproxy, "option forwardfor")
            .iter()
            .any(|v| v.contains("if-none"))
    );
    let http = read(&deploy("nginx/wsgate-reencrypt.conf"));
    let set = values(&http, "proxy_set_header");
    let xff: Vec<&&str> = set
        .iter()
        .filter(|v| v.starts_with("X-Forwarded-For "))
        .collect();
    assert_eq!(xff, [&"X-Forwarded-For $remote_addr;"], "{set:?}");
}

#[test]
fn supervisors_wait_longer_than_the_drain_and_proxies_outlast_heartbeats() {
    let config = shipped_config();
    let s = &config.server;
    let drain = Duration::from_millis(s.drain_grace_ms + s.drain_window_ms + s.shutdown_timeout_ms);
    let heartbeat = Duration::from_millis(config.websocket.heartbeat_ms);
    let grace = Duration::from_millis(s.drain_grace_ms);

    let unit = read(&deploy("systemd/wsgate.service"));
    let stop = values(&unit, "TimeoutStopSec");
    assert_eq!(stop.len(), 1, "{stop:?}");
    assert!(
        duration(stop[0]) > drain,
        "TimeoutStopSec {stop:?} <= {drain:?}"
    );
    let nofile: usize = values(&unit, "LimitNOFILE")[0].parse().unwrap();
    assert!(
        nofile > s.max_connections + s.overflow_connections + 64,
        "LimitNOFILE {nofile} too low for {} + {}",
        s.max_connections,
        s.overflow_connections
    );

    let pod = read(&deploy("k8s/deployment.yaml"));
    let kill = values(&pod, "terminationGracePeriodSeconds");
    assert!(
        duration(kill[0]) > drain,
        "terminationGracePeriodSeconds {kill:?}"
    );
    // The readiness probe notices a drain well within the grace.
    let period = duration(values(&pod, "periodSeconds")[0]);
    let failures: u32 = values(&pod, "failureThreshold")[0].parse().unwrap();
    assert!(
        period * (failures + 1) < grace,
        "readiness too slow for {grace:?}"
    );

    for file in [
        "haproxy/wsgate-passthrough.cfg",
        "haproxy/wsgate-reencrypt.cfg",
    ] {
        let cfg = read(&deploy(file));
        let tunnel = values(&cfg, "timeout tunnel");
        assert_eq!(tunnel.len(), 1, "{file}: {tunnel:?}");
        assert!(
            duration(tunnel[0]) >= heartbeat * 2,
            "{file}: tunnel {tunnel:?}"
        );
        // inter x (fall + 1): the longest a draining gateway stays in rotation.
        let line = values(&cfg, "default-server")
            .into_iter()
            .find(|l| l.contains(" inter "))
            .unwrap_or_else(|| panic!("{file}: no default-server with inter"));
        let word = |key: &str| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == key);
            words.next().unwrap_or_else(|| panic!("{file}: no {key}"))
        };
        let fall: u32 = word("fall").parse().unwrap();
        assert!(
            duration(word("inter")) * (fall + 1) < grace,
            "{file}: checks too slow for {grace:?}"
        );
    }

    let stream = read(&deploy("nginx/wsgate-passthrough.conf"));
    let idle = values(&stream, "proxy_timeout");
    assert_eq!(idle.len(), 1);
    assert!(duration(idle[0]) >= heartbeat * 2, "proxy_timeout {idle:?}");
    let http = read(&deploy("nginx/wsgate-reencrypt.conf"));
    for key in ["proxy_read_timeout", "proxy_send_timeout"] {
        let idle = values(&http, key);
        assert_eq!(idle.len(), 1, "{key}");
        assert!(duration(idle[0]) >= heartbeat * 2, "{key} {idle:?}");
    }
}

#[test]
fn systemd_unit_verifies_against_the_built_binary() {
    let analyze = require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let unit = substitute(
        &read(&deploy("systemd/wsgate.service")),
        &[("/usr/local/bin/wsgate", env!("CARGO_BIN_EXE_wsgate"))],
    );
    // The unit name decides %n and the credentials directory.
    let path = dir.path().join("wsgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    // Unknown keys and bad values are warnings with status 0: none allowed.
    assert!(out.stderr.is_empty(), "{}", show(&out));

    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            let rest = l
                .split("Overall exposure level for wsgate.service:")
                .nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no exposure level: {}", show(&out)));
    assert!(
        exposure <= 2.0,
        "hardening weakened: exposure {exposure}\n{text}"
    );
}

#[test]
fn nginx_configs_pass_nginx_t() {
    let nginx = require_tool("nginx");
    // wsgate-passthrough.conf loads the stream module, a package of its own.
    require_file(
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "libnginx-mod-stream",
    );
    let dir = tempfile::tempdir().unwrap();
    let paths = CertPaths::in_dir(dir.path());
    certs::generate(
        &paths,
        &["wsgate.internal".to_owned()],
        certs::Replace::Nothing,
    )
    .unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    // nginx -t opens the certificates, the logs and the pid file it names:
    // point those at the test's own files, nothing else.
    let logs = format!("{}/", dir.path().display());
    let common = [
        ("/var/log/nginx/", logs.as_str()),
        ("/run/nginx-wsgate.pid", &d("nginx.pid")),
    ];
    let files = [
        ("wsgate-passthrough.conf", vec![]),
        (
            "wsgate-reencrypt.conf",
            vec![
                ("/etc/nginx/tls/wsgate.crt", d("server.pem")),
                ("/etc/nginx/tls/wsgate.key", d("server.key")),
                ("/etc/nginx/tls/wsgate-ca.pem", d("ca.pem")),
            ],
        ),
    ];
    for (name, extra) in files {
        let mut pairs: Vec<(&str, &str)> = common.to_vec();
        pairs.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        let text = substitute(&read(&deploy(&format!("nginx/{name}"))), &pairs);
        let conf = dir.path().join(name);
        std::fs::write(&conf, text).unwrap();
        let out = Command::new(&nginx)
            .args(["-t", "-q", "-e", "stderr", "-c"])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", show(&out));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("[warn]"),
            "{name}: {}",
            show(&out)
        );
    }
}

/// The Kubernetes manifests, as JSON documents, parsed by PyYAML.
fn manifests(names: &[&str]) -> Vec<serde_json::Value> {
    let mut docs = Vec::new();
    for name in names {
        let out = python_with("yaml")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
            ])
            .arg(deploy(&format!("k8s/{name}")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", show(&out));
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        docs.extend(parsed);
    }
    docs
}

#[test]
fn k8s_manifests_validate_against_the_kubernetes_schemas() {
    let dir = deploy("k8s");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    // kustomization.yaml is kustomize's, not an API object.
    let objects: Vec<&String> = files
        .iter()
        .filter(|n| *n != "kustomization.yaml")
        .collect();
    assert!(objects.len() >= 5, "{files:?}");
    let out = python_with("kubernetes_validate")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(objects.iter().map(|n| dir.join(n)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));

    // Everything but the example Secret is applied by `kubectl apply -k`.
    let kustomization = read(&dir.join("kustomization.yaml"));
    for name in &objects {
        let listed = kustomization.contains(&format!("- {name}"));
        assert_eq!(
            listed,
            *name != "secret.example.yaml",
            "{name} in kustomization.yaml"
        );
    }
}

#[test]
fn k8s_pod_runs_the_shipped_config_with_hardening() {
    let docs = manifests(&["configmap.yaml", "deployment.yaml"]);
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let config = find("ConfigMap", "wsgate-config");
    assert_eq!(
        config["data"]["wsgate.toml"].as_str(),
        Some(read(&deploy("wsgate.toml")).as_str()),
        "configmap.yaml's wsgate.toml differs from deploy/wsgate.toml"
    );
    let policies = find("ConfigMap", "wsgate-policies");
    for (name, text) in policies["data"].as_object().unwrap() {
        assert!(name.ends_with(".toml"), "{name}");
        wsgate::policy::compile_file(Path::new(name), text.as_str().unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    let pod = &find("Deployment", "wsgate")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    assert!(
        container["lifecycle"].is_null(),
        "no preStop: wsgate drains itself"
    );
    // Every path the config names is mounted where the config expects it.
    let config = shipped_config();
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let public = config.auth.public_key_file.clone().unwrap();
    for needed in [
        config.tls.cert_file.as_path(),
        config.tls.key_file.as_path(),
        public.as_path(),
        config.policy.dir.as_path(),
        Path::new("/etc/wsgate/wsgate.toml"),
    ] {
        assert!(
            mounts.iter().any(|m| needed.starts_with(m)),
            "{} is not under a mount: {mounts:?}",
            needed.display()
        );
    }
}

#[test]
fn dockerfile_builds_what_the_binary_needs_and_runs_unprivileged() {
    let dockerfile = read(&deploy("Dockerfile"));
    // The binary embeds web/ and policies/: the build context must copy them.
    for dir in ["src", "web", "policies"] {
        assert!(
            dockerfile.contains(&format!("COPY {dir} {dir}")),
            "Dockerfile does not copy {dir}/"
        );
    }
    assert!(dockerfile.contains("USER 65532"), "runs as root");
    assert!(dockerfile.contains("EXPOSE 8443"));
    assert!(dockerfile.contains(r#"CMD ["serve", "--config", "/etc/wsgate/wsgate.toml"]"#));
    let ignore = read(&repo_root().join(".dockerignore"));
    for entry in [
        "target/",
        "web/node_modules/",
        ".ci/cache/",
        "**/*.key",
        "**/*.pem",
    ] {
        assert!(
            ignore.lines().any(|l| l == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
