//! `wsgate certs`: a development CA and a server certificate it signs
//! (ECDSA P-256), so browsers and clients can trust `wss://localhost`.
//!
//! An existing CA is reused, so a CA trusted once keeps working when the
//! server certificate is made again. Private keys are written 0600.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

/// Common name of the development CA; `wsgate doctor` recognises dev certificates by it.
pub const CA_NAME: &str = "wsgate development CA";
/// Browsers refuse leaf certificates valid for more than 398 days.
const SERVER_DAYS: i64 = 397;
const CA_DAYS: i64 = 5 * 365;

/// Where the four files go.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl CertPaths {
    /// The standard names inside `dir`: `ca.pem`, `ca.key`, `server.pem`, `server.key`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    /// A server pair at the given paths, with the CA beside the certificate.
    pub fn for_server(cert: &Path, key: &Path) -> Self {
        let dir = cert.parent().unwrap_or(Path::new("."));
        Self {
            server_cert: cert.to_owned(),
            server_key: key.to_owned(),
            ..Self::in_dir(dir)
        }
    }
}

/// Which existing files [`generate`] may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// None: an existing server certificate or key is an error.
    Nothing,
    /// The server certificate and key; an existing CA is still reused.
    Server,
    /// Everything, including the CA (clients must trust the new one).
    All,
}

/// What [`generate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaSource {
    Created,
    Reused,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Writes a server certificate for `localhost`, `127.0.0.1`, `::1` and
/// `extra_hosts`, signed by the CA at `paths`, which is created when absent
/// (or replaced with [`Replace::All`]).
///
/// # Errors
/// A server file exists under [`Replace::Nothing`], or a file cannot be
/// read or written.
pub fn generate(
    paths: &CertPaths,
    extra_hosts: &[String],
    replace: Replace,
) -> Result<CaSource, CertError> {
    if replace == Replace::Nothing {
        for path in [&paths.server_cert, &paths.server_key] {
            if path.exists() {
                return Err(CertError::Exists(path.clone()));
            }
        }
    }
    for path in [&paths.ca_cert, &paths.server_cert] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
                path: dir.to_owned(),
                source,
            })?;
        }
    }
    let now = OffsetDateTime::now_utc();
    let reuse = replace != Replace::All && paths.ca_cert.exists() && paths.ca_key.exists();
    let (ca_key, source) = if reuse {
        let pem = std::fs::read_to_string(&paths.ca_key).map_err(|source| CertError::Read {
            path: paths.ca_key.clone(),
            source,
        })?;
        (KeyPair::from_pem(&pem)?, CaSource::Reused)
    } else {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params(now)?.self_signed(&key)?;
        write_private(&paths.ca_key, key.serialize_pem().as_bytes(), true).map_err(|source| {
            CertError::Write {
                path: paths.ca_key.clone(),
                source,
            }
        })?;
        write_public(&paths.ca_cert, cert.pem().as_bytes())?;
        (key, CaSource::Created)
    };
    // The issuer needs only the CA's name, key usages and key; the name is
    // fixed, so a reused CA signs exactly as the original did.
    let issuer = Issuer::new(ca_params(now)?, ca_key);

    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for host in extra_hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(SERVER_DAYS);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&paths.server_key, key.serialize_pem().as_bytes(), true).map_err(|source| {
        CertError::Write {
            path: paths.server_key.clone(),
            source,
        }
    })?;
    write_public(&paths.server_cert, cert.pem().as_bytes())?;
    Ok(source)
}

fn ca_params(now: OffsetDateTime) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "wsgate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CA_DAYS);
    Ok(params)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    std::fs::write(path, bytes).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes a secret file readable by its owner only (0600 on Unix). Without
/// `replace`, an existing file is an error rather than overwritten.
///
/// # Errors
/// The file exists (without `replace`) or cannot be written.
pub fn write_private(path: &Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // `mode` applies only at creation; an older file may be wider.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)
    }
    #[cfg(not(unix))]
    {
        options.open(path)?.write_all(bytes)
    }
}

/// How to make common clients trust the CA at `ca_cert`.
pub fn trust_instructions(ca_cert: &Path) -> String {
    let ca = ca_cert.display();
    format!(
        "Trust the development CA ({ca}):\n\
         \x20 browser: import {ca} as an authority (Chrome: Settings > Privacy and security > \
         Security > Manage certificates > Authorities; Firefox: Settings > Certificates > \
         View Certificates > Authorities > Import), then open https://localhost:8443/\n\
         \x20 Node:    NODE_EXTRA_CA_CERTS={ca} node client.js\n\
         \x20 Python:  SSL_CERT_FILE={ca} python3 client.py\n\
         \x20 curl:    curl --cacert {ca} https://localhost:8443/healthz\n"
    )
}

/// Creates `path` with a fresh random HMAC secret (hex of 48 random bytes)
/// unless it exists. Returns whether it was created.
///
/// # Errors
/// The file cannot be written.
pub fn ensure_dev_secret(path: &Path) -> Result<bool, crate::config::ConfigError> {
    if path.exists() {
        return Ok(false);
    }
    let mut raw = [0u8; 48];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| {
        crate::config::ConfigError::Invalid("no randomness for the dev secret".into())
    })?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, format!("{hex}\n").as_bytes(), false).map_err(|e| {
        crate::config::ConfigError::Invalid(format!("cannot write {}: {e}", path.display()))
    })?;
    Ok(true)
}
