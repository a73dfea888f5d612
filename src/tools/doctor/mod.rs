//! `wsgate doctor`: what `check-config` accepts but an operator should
//! know about: query tokens, unchecked issuers and audiences, weak or
//! development secrets, certificate expiry, heartbeats slower than load
//! balancers' idle timeouts, an open-file limit below the connection cap.
//!
//! Findings name the key they are about and never quote a secret: a
//! secret is described by its path, its length and an entropy estimate.

mod features;

use std::fmt;
use std::path::Path;

use jsonwebtoken::AlgorithmFamily;
use time::OffsetDateTime;

use crate::config::Config;

/// A certificate expiring within this many days is a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
/// A secret whose estimated entropy is below this many bits is a warning.
pub const WEAK_SECRET_BITS: f64 = 128.0;
/// Common idle timeout of load balancers (AWS ELB/ALB, nginx's
/// `proxy_read_timeout`), in milliseconds; heartbeats must come sooner.
pub const LB_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Descriptors besides connections: listener, logs, policy files, stdio.
const SPARE_FILES: u64 = 64;
/// Where `serve --dev` writes its HMAC secret.
const DEV_SECRET: &str = "certs/dev-hmac.secret";

/// How much a finding matters; `Error` makes `doctor` exit non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Note,
    Warning,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Note => "note",
            Self::Warning => "warning",
            Self::Error => "error",
        }
    }
}

/// One line of the report: a level, the key it is about, what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.level.as_str(), self.key, self.message)
    }
}

/// What the checks read from outside the configuration, so tests can
/// fix them.
#[derive(Debug, Clone, Copy)]
pub struct Environment {
    pub now: OffsetDateTime,
    /// Soft and hard `RLIMIT_NOFILE` of the process, when known.
    pub open_files: Option<(u64, u64)>,
}

impl Environment {
    /// The current time and this process's open-file limit.
    pub fn current() -> Self {
        Self {
            now: OffsetDateTime::now_utc(),
            open_files: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|text| parse_open_files(&text)),
        }
    }
}

/// Runs every check on `config` (not yet validated). Reads the key,
/// certificate and policy files the configuration names.
pub fn diagnose(config: &Config, env: &Environment) -> Vec<Finding> {
    let mut out = Findings::default();
    if let Err(e) = config.validate() {
        // Nothing else can be judged on a configuration `serve` refuses.
        out.push(Level::Error, "config", e.to_string());
        return out.0;
    }
    check_auth(config, &mut out);
    check_origins(config, &mut out);
    check_tls(config, env, &mut out);
    check_heartbeat(config, &mut out);
    features::check_history(config, &mut out);
    features::check_presence(config, &mut out);
    features::check_api(config, &mut out);
    check_policies(config, &mut out);
    check_network(config, &mut out);
    check_open_files(config, env, &mut out);
    out.0
}

/// Proxies, the admin listener and the Redis backplane.
fn check_network(config: &Config, out: &mut Findings) {
    let s = &config.server;
    let everyone = s
        .trusted_proxies
        .iter()
        .any(|net| net.trim().ends_with("/0"));
    if everyone {
        out.push(
            Level::Warning,
            "server.trusted_proxies",
            "holds a /0 network: any client may then name its own address in a PROXY or \
             forwarding header and escape its per-address limits; list only the balancers",
        );
    }
    if let Some(admin) = s.admin_listen
        && !admin.ip().is_loopback()
    {
        out.push(
            Level::Note,
            "server.admin_listen",
            format!(
                "{admin} serves /metrics over plain HTTP beyond loopback; keep it on a \
                 network only Prometheus and probes reach"
            ),
        );
    }
    if let Some(url) = &config.cluster.redis_url {
        let rest = url.strip_prefix("redis://").unwrap_or(url);
        let (auth, host) = match rest.split_once('@') {
            Some((auth, host)) => (Some(auth), host),
            None => (None, rest),
        };
        let host = host.split(['/', '?']).next().unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let local = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let password = auth.is_some_and(|a| a.contains(':') || !a.is_empty());
        if !local && !password {
            out.push(
                Level::Warning,
                "cluster.redis_url",
                "Redis beyond loopback without a password in the URL: anyone who reaches it \
                 can publish into every channel; set requirepass (or an ACL user) and put it \
                 in the URL",
            );
        }
    }
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, level: Level, key: &'static str, message: impl Into<String>) {
        self.0.push(Finding {
            level,
            key,
            message: message.into(),
        });
    }
}

fn check_auth(config: &Config, out: &mut Findings) {
    let a = &config.auth;
    if a.query_token {
        out.push(
            Level::Warning,
            "auth.query_token",
            "tokens are accepted in ?access_token=, and URLs end up in proxy and \
             load-balancer access logs; prefer the Authorization header or the \
             wsgate.v1 subprotocol",
        );
    } else {
        out.push(
            Level::Ok,
            "auth.query_token",
            "query-string tokens are refused",
        );
    }
    for (key, list, claim, risk) in [
        (
            "auth.issuers",
            &a.issuers,
            "iss",
            "a token signed with the key is accepted whoever issued it",
        ),
        (
            "auth.audiences",
            &a.audiences,
            "aud",
            "tokens minted for other services with the same key are accepted",
        ),
    ] {
        if list.is_empty() {
            out.push(
                Level::Warning,
                key,
                format!("empty, so `{claim}` is not checked: {risk}"),
            );
        } else {
            out.push(Level::Ok, key, format!("`{claim}` must be one of {list:?}"));
        }
    }

    let verifier = crate::auth::Verifier::from_config(config);
    let family = config.algorithms().ok().map(|algs| algs[0].family());
    if family == Some(AlgorithmFamily::Hmac) {
        check_hmac_secret(config, verifier.is_ok(), out);
    }
    match verifier {
        Ok(_) if family != Some(AlgorithmFamily::Hmac) => {
            let path = a.public_key_file.as_deref().unwrap_or(Path::new(""));
            out.push(
                Level::Ok,
                "auth.public_key_file",
                format!("{} loads for {}", path.display(), a.algorithms.join(", ")),
            );
        }
        Ok(_) => {}
        Err(e) => {
            let key = if family == Some(AlgorithmFamily::Hmac) {
                "auth.hmac_secret_file"
            } else {
                "auth.public_key_file"
            };
            out.push(Level::Error, key, e.to_string());
        }
    }
}

/// Length, entropy and origin of the HMAC secret; its bytes never leave
/// this function.
fn check_hmac_secret(config: &Config, loads: bool, out: &mut Findings) {
    let path = &config.auth.hmac_secret_file;
    const KEY: &str = "auth.hmac_secret_file";
    if path.ends_with(DEV_SECRET) {
        let level = if config.server.listen.ip().is_loopback() {
            Level::Note
        } else {
            Level::Warning
        };
        out.push(
            level,
            KEY,
            format!(
                "{} is the development secret that `serve --dev` creates; \
                 give production its own (openssl rand -hex 32)",
                path.display()
            ),
        );
    }
    if !loads {
        // The verifier's error (unreadable, too short) is reported by the caller.
        return;
    }
    let Ok(secret) = crate::auth::read_hmac_secret(path) else {
        return;
    };
    let bits = entropy_bits(&secret);
    let repeated = repeats(&secret);
    if bits < WEAK_SECRET_BITS || repeated {
        let why = if repeated {
            "a repeated pattern"
        } else {
            "few distinct bytes"
        };
        out.push(
            Level::Warning,
            KEY,
            format!(
                "the secret in {} ({} bytes) looks weak: {why}, about {bits:.0} bits \
                 estimated from its byte distribution (want {WEAK_SECRET_BITS:.0}); \
                 generate one with openssl rand -hex 32",
                path.display(),
                secret.len()
            ),
        );
    } else {
        out.push(
            Level::Ok,
            KEY,
            format!("{} bytes, about {bits:.0} bits estimated", secret.len()),
        );
    }
}

/// Shannon entropy of the byte distribution times the length: an upper
/// bound on the secret's strength that catches short alphabets and
/// repetition, not predictable words.
pub fn entropy_bits(secret: &[u8]) -> f64 {
    if secret.is_empty() {
        return 0.0;
    }
    let mut counts = [0usize; 256];
    for b in secret {
        counts[usize::from(*b)] += 1;
    }
    let n = secret.len() as f64;
    let per_byte: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = *c as f64 / n;
            -p * p.log2()
        })
        .sum();
    per_byte * n
}

/// Whether `secret` is one shorter pattern repeated (`abcabcabc`).
fn repeats(secret: &[u8]) -> bool {
    (1..=secret.len() / 2).any(|period| {
        secret.len().is_multiple_of(period) && secret.chunks(period).all(|c| c == &secret[..period])
    })
}

fn check_origins(config: &Config, out: &mut Findings) {
    let s = &config.server;
    const KEY: &str = "server.allowed_origins";
    match (s.allowed_origins.is_empty(), s.allow_same_origin) {
        (true, true) => out.push(
            Level::Warning,
            KEY,
            "empty: browsers are admitted only from pages served at this gateway's own \
             https://host:port (allow_same_origin), which is only wsgate's demo page, so a \
             browser app on any other origin gets 403. Fine if only servers and CLIs (which \
             send no Origin) connect; otherwise list the app's origins",
        ),
        (true, false) => out.push(
            Level::Note,
            KEY,
            "empty and allow_same_origin = false: every browser is refused (403); \
             servers and CLIs, which send no Origin, are not affected",
        ),
        (false, _) => {
            let plain: Vec<&String> = s
                .allowed_origins
                .iter()
                .filter(|o| o.to_ascii_lowercase().starts_with("http://"))
                .collect();
            if plain.is_empty() {
                out.push(
                    Level::Ok,
                    KEY,
                    format!("browsers admitted from {:?}", s.allowed_origins),
                );
            } else {
                out.push(
                    Level::Warning,
                    KEY,
                    format!(
                        "{plain:?} served over plain http: any network attacker who can \
                         inject into that page can use its visitors' tokens here"
                    ),
                );
            }
        }
    }
}

fn check_tls(config: &Config, env: &Environment, out: &mut Findings) {
    let tls = &config.tls;
    if tls.tls13_only {
        out.push(Level::Ok, "tls.tls13_only", "TLS 1.3 only");
    } else {
        out.push(
            Level::Note,
            "tls.tls13_only",
            "false: TLS 1.2 is allowed besides 1.3 (rustls offers only forward-secret \
             AEAD suites with it); set it to true once every client speaks TLS 1.3",
        );
    }
    // Loads chain and key and checks that they belong together.
    match crate::tls::CertStore::load(tls) {
        Ok(_) => {}
        Err(crate::tls::TlsError::Mismatch { .. }) => {
            out.push(
                Level::Error,
                "tls.key_file",
                format!(
                    "{} is not the private key of {}",
                    tls.key_file.display(),
                    tls.cert_file.display()
                ),
            );
            return;
        }
        Err(e) => {
            let key = if matches!(e, crate::tls::TlsError::Key { .. }) {
                "tls.key_file"
            } else {
                "tls.cert_file"
            };
            out.push(Level::Error, key, e.to_string());
            return;
        }
    }
    let leaf = match crate::tls::load_certs(&tls.cert_file) {
        Ok(chain) => chain.into_iter().next(),
        Err(e) => {
            out.push(Level::Error, "tls.cert_file", e.to_string());
            return;
        }
    };
    let Some(info) = leaf.as_deref().and_then(cert_info) else {
        out.push(
            Level::Warning,
            "tls.cert_file",
            format!(
                "{}: cannot read the leaf certificate's validity",
                tls.cert_file.display()
            ),
        );
        return;
    };
    let path = tls.cert_file.display();
    let days = (info.not_after - env.now).whole_days();
    if info.not_after <= env.now {
        out.push(
            Level::Error,
            "tls.cert_file",
            format!("{path} expired on {}", day(info.not_after)),
        );
    } else if info.not_before > env.now {
        out.push(
            Level::Error,
            "tls.cert_file",
            format!("{path} is not valid before {}", day(info.not_before)),
        );
    } else if days < EXPIRY_WARNING_DAYS {
        out.push(
            Level::Warning,
            "tls.cert_file",
            format!("{path} expires on {} (in {days} days)", day(info.not_after)),
        );
    } else {
        out.push(
            Level::Ok,
            "tls.cert_file",
            format!(
                "{path} matches its key, valid until {} ({days} days)",
                day(info.not_after)
            ),
        );
    }
    if info.dev_ca && !config.server.listen.ip().is_loopback() {
        out.push(
            Level::Warning,
            "tls.cert_file",
            format!(
                "{path} is signed by the wsgate development CA, whose key sits beside it, \
                 and server.listen = {} is reachable from other hosts",
                config.server.listen
            ),
        );
    }
}

fn check_heartbeat(config: &Config, out: &mut Findings) {
    let ms = config.websocket.heartbeat_ms;
    if ms >= LB_IDLE_TIMEOUT_MS {
        out.push(
            Level::Warning,
            "websocket.heartbeat_ms",
            format!(
                "{ms} ms is not below the {} s idle timeout of common load balancers: \
                 quiet sessions behind one will be cut; keep it under half the shortest \
                 idle timeout in front (25000 by default)",
                LB_IDLE_TIMEOUT_MS / 1000
            ),
        );
    } else {
        out.push(
            Level::Ok,
            "websocket.heartbeat_ms",
            format!("a ping every {ms} ms"),
        );
    }
}

fn check_policies(config: &Config, out: &mut Findings) {
    let dir = &config.policy.dir;
    match crate::policy::PolicySet::load_dir(dir) {
        Err(e) => out.push(Level::Error, "policy.dir", e.to_string()),
        Ok(set) if set.rules.is_empty() => out.push(
            Level::Warning,
            "policy.dir",
            format!(
                "{} has no rules: every subscribe and publish is denied",
                dir.display()
            ),
        ),
        Ok(set) => out.push(
            Level::Ok,
            "policy.dir",
            format!(
                "{} rules in {} file(s) in {}",
                set.rules.len(),
                set.files.len(),
                dir.display()
            ),
        ),
    }
}

fn check_open_files(config: &Config, env: &Environment, out: &mut Findings) {
    let s = &config.server;
    let need = (s.max_connections + s.overflow_connections) as u64 + SPARE_FILES;
    const KEY: &str = "server.max_connections";
    match env.open_files {
        None => out.push(
            Level::Note,
            KEY,
            "cannot read this process's open-file limit (/proc/self/limits)",
        ),
        Some((soft, hard)) if soft < need => out.push(
            Level::Warning,
            KEY,
            format!(
                "{} + overflow_connections {} need about {need} open files, but this \
                 process may open {soft} (hard limit {hard}); past it accept() fails. \
                 Raise LimitNOFILE / ulimit -n, and run doctor under the same limits as serve",
                s.max_connections, s.overflow_connections
            ),
        ),
        Some((soft, _)) => out.push(
            Level::Ok,
            KEY,
            format!("the open-file limit ({soft}) covers {need} descriptors"),
        ),
    }
}

/// Soft and hard "Max open files" of `/proc/self/limits`.
pub fn parse_open_files(limits: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let mut value = || match fields.next()? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some((value()?, value()?))
}

fn day(t: OffsetDateTime) -> String {
    format!("{}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// What doctor reads from a certificate.
#[derive(Debug)]
struct CertInfo {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    /// Whether the issuer `Name` (DER) holds `super::certs::CA_NAME`.
    dev_ca: bool,
}

/// The validity and issuer of a DER X.509 certificate (RFC 5280 §4.1).
fn cert_info(cert: &[u8]) -> Option<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let validity = cert.validity();
    let ca = super::certs::CA_NAME.as_bytes();
    Some(CertInfo {
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        dev_ca: cert.issuer().as_raw().windows(ca.len()).any(|w| w == ca),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn cert_valid_until(not_after: OffsetDateTime) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_validity_in_both_time_forms() {
        // 2049 is written as UTCTime, 2051 as GeneralizedTime.
        for ts in [1_900_000_000i64, 2_556_000_000] {
            let when = OffsetDateTime::from_unix_timestamp(ts).unwrap();
            let info = cert_info(&cert_valid_until(when)).unwrap();
            assert_eq!(info.not_after, when);
            assert_eq!(info.not_before.unix_timestamp(), 1_700_000_000);
        }
        assert!(cert_info(b"\x30\x03\x02\x01").is_none());
        assert!(cert_info(&[]).is_none());
    }

    #[test]
    fn recognises_the_development_ca_as_issuer() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let other = params.self_signed(&key).unwrap();
        assert!(!cert_info(other.der()).unwrap().dev_ca);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, super::super::certs::CA_NAME);
        let dev = params.self_signed(&key).unwrap();
        assert!(cert_info(dev.der()).unwrap().dev_ca);
    }

    #[test]
    fn entropy_estimate_separates_random_text_from_patterns() {
        let hex: Vec<u8> = (0..64u32)
            .map(|i| b"0123456789abcdef"[((i * 7 + i / 3) % 16) as usize])
            .collect();
        assert!(
            entropy_bits(&hex) >= WEAK_SECRET_BITS,
            "{}",
            entropy_bits(&hex)
        );
        assert!(entropy_bits(&[b'a'; 48]) < 1.0);
        assert!(entropy_bits(b"passwordpasswordpasswordpassword") < WEAK_SECRET_BITS);
        assert!(repeats(b"abcabcabc"));
        assert!(!repeats(b"abcabcabd"));
        assert!(!repeats(b"a"));
    }

    #[test]
    fn open_file_limits_parse_from_proc() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files(text), Some((1024, 524_288)));
        let text = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files(text), Some((u64::MAX, u64::MAX)));
        assert_eq!(parse_open_files("nothing"), None);
    }
}
