//! Every rustls configuration the process builds: the server's
//! (certificate chain and key from PEM through `rustls-pki-types`'
//! `PemObject`, protocol versions, ALPN, and the [`CertStore`] that lets
//! the certificate be replaced while the server runs), the JWKS fetcher's
//! client, and the load generator's client.
//!
//! Reload swaps the certificate the resolver hands to *new* handshakes;
//! a live connection keeps the one it was made with. A pair that does not
//! load (unreadable, truncated, no certificate, a key that does not match)
//! is refused and the old pair keeps serving.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::aws_lc_rs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate file {path}: {message}")]
    Cert { path: String, message: String },
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
    #[error("key file {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: String, key: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere in the process.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// Reads every certificate in a PEM file, leaf first.
///
/// # Errors
/// An unreadable file, bad PEM, or no certificate at all.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Cert {
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Loads the certificate chain and key and checks that they belong
/// together.
fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = load_certs(cert_file)?;
    let key_err = |message: String| TlsError::Key {
        path: key_file.display().to_string(),
        message,
    };
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| key_err(e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: cert_file.display().to_string(),
        key: key_file.display().to_string(),
    })?;
    Ok(certified)
}

/// The current certificate and key, swapped by [`CertStore::reload`].
pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("CertStore")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads the pair named in the `[tls]` section.
    ///
    /// # Errors
    /// As [`CertStore::reload`].
    pub fn load(cfg: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let key = certified_key(&cfg.cert_file, &cfg.key_file)?;
        Ok(Arc::new(Self {
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            current: RwLock::new(Arc::new(key)),
        }))
    }

    /// Re-reads both files; new handshakes use the new pair from now on.
    ///
    /// # Errors
    /// Unreadable or malformed files, or a key that does not match the
    /// certificate; the old pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(&self.cert_file, &self.key_file)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }

    /// The two files, for watching.
    pub fn files(&self) -> [&Path; 2] {
        [&self.cert_file, &self.key_file]
    }

    /// The leaf certificate now served (DER).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .cert
            .first()
            .cloned()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// Builds the server config from the `[tls]` section, with certificates
/// served from `store`.
///
/// # Errors
/// Protocol versions the provider does not support.
pub fn server_config(
    cfg: &TlsConfig,
    store: Arc<CertStore>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = if cfg.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    // WebSocket over HTTP/2 (RFC 8441) is not offered yet.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client config for fetching `auth.jwks_url`: Mozilla's roots
/// (compiled in), plus the certificates of `ca_file` when set.
///
/// # Errors
/// An unreadable or malformed `ca_file`.
pub fn jwks_client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, ConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = load_certs(path)
            .map_err(|e| ConfigError::Invalid(format!("auth.jwks_ca_file: {e}")))?;
        for cert in certs {
            roots.add(cert).map_err(|e| {
                ConfigError::Invalid(format!("auth.jwks_ca_file {}: {e}", path.display()))
            })?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("JWKS client TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The load generator's client config: trusts only `ca_file`, offers
/// AES-128-GCM-SHA256 first (as browsers, Node and Python do; rustls'
/// default puts AES-256-GCM-SHA384 first, whose SHA-384 handshake hashing
/// has no hardware help on common CPUs), and never resumes, so every
/// connection pays a full handshake as new clients do.
///
/// # Errors
/// An unreadable or malformed `ca_file`.
pub fn bench_client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert)?;
    }
    let mut provider = aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
