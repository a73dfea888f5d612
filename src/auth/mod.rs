//! Token verification: the pinned algorithm set, the keys by `kid`
//! ([`keys`]), where they come from (the config's one key, a JWKS file, or
//! a JWKS URL through [`fetch`]), the claims we require, and the verified
//! [`Identity`] that travels inward. Minting of development tokens lives in
//! [`mint`].
//!
//! Keys are swapped whole (an `Arc` under a lock held only to clone or
//! replace it); a key set that fails to load never replaces the one in
//! force. Keys come only from the configuration: `jku`, `x5u`, `jwk` and
//! any other header that names a key source are ignored.
//!
//! Nothing here ever formats a token into an error or a log line: errors
//! carry only an [`AuthFailure`] reason.

mod claims;
pub mod fetch;
pub mod keys;
pub mod mint;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

pub use keys::KeyError;

use crate::config::{Config, ConfigError, MIN_HMAC_SECRET_BYTES};
use crate::identity::Identity;
use crate::metrics::KeyMetrics;
pub use claims::AuthFailure;
use claims::{identity_from_claims, map_error};
use fetch::{Admission, Cause, JwksClient, Outcome, RefreshGate};
use keys::{KeySet, MAX_JWKS_BYTES};

/// Checks tokens against the keys in force and a pinned algorithm set.
/// Clones share the keys, so a reload is seen by every holder.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    validation: Validation,
    /// The same rules, with `aud` required to be `api.audience`.
    api_validation: Validation,
    leeway: Duration,
    roles_claim: String,
    /// `auth.require_typ`.
    require_typ: bool,
    keys: RwLock<Arc<KeySet>>,
    source: Source,
    metrics: Arc<KeyMetrics>,
}

/// Where the keys come from.
enum Source {
    /// `auth.hmac_secret_file` or `auth.public_key_file`: one key, read at start.
    Config,
    /// `auth.jwks_file`: reloaded on SIGHUP and when it changes.
    File(PathBuf),
    /// `auth.jwks_url`: fetched at start, on a schedule and on unknown kids.
    Url {
        client: JwksClient,
        gate: RefreshGate,
        /// The body in force, so an unchanged set is not parsed again.
        body: Mutex<Option<Bytes>>,
    },
}

/// The longest `kid` looked up: key ids are short names or thumbprints;
/// a longer one is refused before any lookup.
const MAX_KID_BYTES: usize = 256;

/// Whether a JOSE `typ` names a JWT access token: `JWT` or `at+jwt`
/// (RFC 9068 §2.1), case-insensitive, with or without `application/`.
fn access_token_typ(typ: &str) -> bool {
    let t = typ
        .get(..12)
        .filter(|p| p.eq_ignore_ascii_case("application/"))
        .map_or(typ, |_| &typ[12..]);
    t.eq_ignore_ascii_case("jwt") || t.eq_ignore_ascii_case("at+jwt")
}

/// A refusal inside verification: unknown kids are told apart, since only
/// a `kid` that was named may be worth a refresh.
enum Refused {
    Auth(AuthFailure),
    NoKey { kid_named: bool },
}

impl Refused {
    fn failure(self) -> AuthFailure {
        match self {
            Self::Auth(f) => f,
            Self::NoKey { .. } => AuthFailure::UnknownKid,
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.inner.validation.algorithms)
            .field("keys", &*self.keys())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier from the `[auth]` section, reading its key file
    /// or JWKS file. A JWKS URL is not fetched here: see [`Verifier::prime`].
    ///
    /// # Errors
    /// A missing or unreadable key, an HMAC secret under 32 bytes, a key
    /// that does not fit the algorithm family, or a JWKS file without a
    /// usable key.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Self::with_metrics(config, Arc::default())
    }

    /// As [`Verifier::from_config`], counting reloads and fetches in `metrics`.
    ///
    /// # Errors
    /// As [`Verifier::from_config`].
    pub fn with_metrics(config: &Config, metrics: Arc<KeyMetrics>) -> Result<Self, ConfigError> {
        let algorithms = config.algorithms()?;
        let auth = &config.auth;
        let (source, keys) = if let Some(path) = &auth.jwks_file {
            let keys = load_jwks_file(path, &algorithms)
                .map_err(|e| ConfigError::Invalid(format!("auth.jwks_file: {e}")))?;
            (Source::File(path.clone()), keys)
        } else if auth.jwks_url.is_some() {
            let source = Source::Url {
                client: JwksClient::from_config(auth)?,
                gate: RefreshGate::new(Duration::from_millis(auth.jwks_min_refresh_interval_ms)),
                body: Mutex::new(None),
            };
            (source, KeySet::default())
        } else {
            let key = config_key(config, algorithms[0].family())?;
            (Source::Config, KeySet::single(key, &algorithms))
        };
        metrics.set_keys(keys.len());
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = auth.leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if auth.issuers.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&auth.issuers);
            required.push("iss");
        }
        if auth.audiences.is_empty() {
            // Without a configured audience, any `aud` is tolerated.
            validation.validate_aud = false;
        } else {
            validation.set_audience(&auth.audiences);
            required.push("aud");
        }
        let mut api_validation = validation.clone();
        api_validation.validate_aud = true;
        api_validation.set_audience(&[&config.api.audience]);
        let mut api_required = required.clone();
        if !api_required.contains(&"aud") {
            api_required.push("aud");
        }
        api_validation.set_required_spec_claims(&api_required);
        validation.set_required_spec_claims(&required);
        Ok(Self {
            inner: Arc::new(Inner {
                api_validation,
                validation,
                leeway: Duration::from_secs(auth.leeway_s),
                roles_claim: auth.roles_claim.clone(),
                require_typ: auth.require_typ,
                keys: RwLock::new(Arc::new(keys)),
                source,
                metrics,
            }),
        })
    }

    /// Fetches the first key set of a JWKS URL (nothing to do for other
    /// sources). The gateway refuses to start without it.
    ///
    /// # Errors
    /// The fetch failed, or its body held no usable key.
    pub async fn prime(&self) -> Result<(), KeyError> {
        if matches!(self.inner.source, Source::Url { .. }) {
            self.fetch_and_swap().await?;
        }
        Ok(())
    }

    /// Verifies `token` with the keys in force and returns who it names.
    ///
    /// # Errors
    /// The reason the token was refused; never the token itself.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        self.check(token).map_err(Refused::failure)
    }

    /// As [`Verifier::verify`], but a token naming a `kid` the set lacks,
    /// with a JWKS URL as the source, first waits for one refresh (shared
    /// with concurrent callers, throttled, bounded by `auth.jwks_timeout_ms`).
    ///
    /// # Errors
    /// As [`Verifier::verify`].
    pub async fn verify_fresh(&self, token: &str) -> Result<Identity, AuthFailure> {
        match self.check(token) {
            Err(Refused::NoKey { kid_named: true }) if self.is_fetched() => {
                self.refresh(Cause::UnknownKid).await;
                self.verify(token)
            }
            other => other.map_err(Refused::failure),
        }
    }

    /// Verifies an HTTP API token: the same keys and rules, and its `aud`
    /// must name `api.audience`. An unknown `kid` with a JWKS URL waits
    /// for one refresh, as [`Verifier::verify_fresh`].
    ///
    /// # Errors
    /// As [`Verifier::verify`].
    pub async fn verify_api(&self, token: &str) -> Result<Identity, AuthFailure> {
        let validation = &self.inner.api_validation;
        match self.check_with(token, validation) {
            Err(Refused::NoKey { kid_named: true }) if self.is_fetched() => {
                self.refresh(Cause::UnknownKid).await;
                self.check_with(token, validation).map_err(Refused::failure)
            }
            other => other.map_err(Refused::failure),
        }
    }

    /// As [`Verifier::verify`], for callers that must not wait (a session's
    /// `refresh`): an unknown `kid` starts a refresh in the background, so
    /// that a retry can succeed.
    ///
    /// # Errors
    /// As [`Verifier::verify`].
    pub fn verify_now(&self, token: &str) -> Result<Identity, AuthFailure> {
        match self.check(token) {
            Err(Refused::NoKey { kid_named: true }) if self.is_fetched() => {
                let this = self.clone();
                tokio::spawn(async move { this.refresh(Cause::UnknownKid).await });
                Err(AuthFailure::UnknownKid)
            }
            other => other.map_err(Refused::failure),
        }
    }

    /// Reloads the keys (SIGHUP, file change): re-reads a JWKS file, or
    /// fetches a JWKS URL now (joining a fetch in flight, never throttled).
    /// Returns the number of keys in force, or `None` for the config's one
    /// key, which is read only at start.
    ///
    /// # Errors
    /// The new set was refused; the previous keys stay in force.
    pub async fn reload(&self) -> Result<Option<usize>, KeyError> {
        match &self.inner.source {
            Source::Config => Ok(None),
            Source::File(path) => {
                let metrics = &self.inner.metrics;
                match load_jwks_file(path, &self.inner.validation.algorithms) {
                    Ok(keys) => {
                        metrics.reloads.inc("ok");
                        Ok(Some(self.swap(keys)))
                    }
                    Err(e) => {
                        metrics.reloads.inc("failed");
                        Err(e)
                    }
                }
            }
            Source::Url { client, .. } => match self.refresh(Cause::Scheduled).await {
                Some(outcome) => outcome.map(Some),
                None => Err(KeyError::Fetch {
                    url: client.url.text.clone(),
                    message: "no outcome in time".into(),
                }),
            },
        }
    }

    /// Fetches a JWKS URL on the schedule (`auth.jwks_refresh_interval_ms`,
    /// or the minimum interval after a failure) until `stop`; returns at
    /// once for other sources.
    pub async fn refresh_periodically(
        &self,
        every: Duration,
        after_failure: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if !self.is_fetched() {
            return;
        }
        let mut wait = every;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = match self.refresh(Cause::Scheduled).await {
                Some(Ok(_)) => every,
                _ => after_failure,
            };
        }
    }

    /// The algorithms this verifier accepts.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.inner.validation.algorithms
    }

    /// How many keys are in force.
    pub fn key_count(&self) -> usize {
        self.keys().len()
    }

    fn is_fetched(&self) -> bool {
        matches!(self.inner.source, Source::Url { .. })
    }

    fn keys(&self) -> Arc<KeySet> {
        Arc::clone(
            &self
                .inner
                .keys
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn swap(&self, keys: KeySet) -> usize {
        let n = keys.len();
        *self
            .inner
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        self.inner.metrics.set_keys(n);
        n
    }

    fn check(&self, token: &str) -> Result<Identity, Refused> {
        self.check_with(token, &self.inner.validation)
    }

    fn check_with(&self, token: &str, validation: &Validation) -> Result<Identity, Refused> {
        let auth = |e: jsonwebtoken::errors::Error| Refused::Auth(map_error(e.kind()));
        let header = jsonwebtoken::decode_header(token).map_err(auth)?;
        if header.crit.is_some() {
            // We understand no extensions, so any critical one must fail (RFC 7515 §4.1.11).
            return Err(Refused::Auth(AuthFailure::Crit));
        }
        if !validation.algorithms.contains(&header.alg) {
            return Err(Refused::Auth(AuthFailure::Algorithm));
        }
        if header
            .kid
            .as_ref()
            .is_some_and(|kid| kid.len() > MAX_KID_BYTES)
        {
            return Err(Refused::Auth(AuthFailure::Malformed));
        }
        if self.inner.require_typ && !header.typ.as_deref().is_some_and(access_token_typ) {
            return Err(Refused::Auth(AuthFailure::Malformed));
        }
        let keys = self.keys();
        let Some(key) = keys.select(header.kid.as_deref()) else {
            return Err(Refused::NoKey {
                kid_named: header.kid.is_some(),
            });
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(Refused::Auth(AuthFailure::Algorithm));
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
            .map_err(auth)?;
        let identity =
            identity_from_claims(data.claims, &self.inner.roles_claim).map_err(Refused::Auth)?;
        // jsonwebtoken compares whole seconds, while a session ends at the
        // exact instant `exp` + leeway: refuse from that instant too, or a
        // client could reconnect with the token its session just expired on.
        let end = UNIX_EPOCH
            .checked_add(Duration::from_secs(identity.expires_at))
            .and_then(|t| t.checked_add(self.inner.leeway))
            .ok_or(Refused::Auth(AuthFailure::BadClaim))?;
        if SystemTime::now() >= end {
            return Err(Refused::Auth(AuthFailure::Expired));
        }
        Ok(identity)
    }

    /// Refreshes a URL source for `cause`: leads a fetch, joins the one in
    /// flight, or is throttled (`None`). The fetch runs in its own task, so
    /// it completes (and frees the gate) even if every waiter goes away.
    async fn refresh(&self, cause: Cause) -> Option<Outcome> {
        let Source::Url { client, gate, .. } = &self.inner.source else {
            return None;
        };
        let rx = match gate.admit(cause) {
            Admission::Throttled => {
                self.inner.metrics.fetches.inc("throttled");
                debug!("JWKS refresh for an unknown kid throttled");
                return None;
            }
            Admission::Join(rx) => rx,
            Admission::Lead(ticket) => {
                let rx = ticket.subscribe()?;
                let this = self.clone();
                tokio::spawn(async move {
                    let outcome = this.fetch_and_swap().await;
                    ticket.finish(outcome);
                });
                rx
            }
        };
        // The fetch is bounded by its own deadline; the margin only covers
        // the hand-over between tasks.
        fetch::wait(rx, client.timeout() + Duration::from_secs(1)).await
    }

    /// One fetch of the URL, and the swap if it brought a usable set.
    async fn fetch_and_swap(&self) -> Outcome {
        let Source::Url { client, body, .. } = &self.inner.source else {
            return Ok(self.key_count());
        };
        let metrics = &self.inner.metrics;
        let url = client.url.text.as_str();
        let fetched = match client.fetch().await {
            Ok(fetched) => fetched,
            Err(e) => {
                metrics.fetches.inc("failed");
                let kept = self.key_count();
                warn!(url, error = %e, keys_kept = kept, "JWKS fetch failed");
                return Err(KeyError::Fetch {
                    url: url.to_owned(),
                    message: e.to_string(),
                });
            }
        };
        let unchanged = body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|old| *old == fetched);
        if unchanged {
            metrics.fetches.inc("ok");
            debug!(url, "JWKS unchanged");
            return Ok(self.key_count());
        }
        match KeySet::from_jwks(&fetched, &self.inner.validation.algorithms, url) {
            Ok(keys) => {
                metrics.fetches.inc("ok");
                let n = self.swap(keys);
                *body.lock().unwrap_or_else(PoisonError::into_inner) = Some(fetched);
                info!(url, keys = n, "JWKS loaded");
                Ok(n)
            }
            Err(e) => {
                metrics.fetches.inc("failed");
                let kept = self.key_count();
                warn!(url, error = %e, keys_kept = kept, "JWKS refused");
                Err(e)
            }
        }
    }
}

/// The one key of a PEM or HMAC configuration.
fn config_key(config: &Config, family: AlgorithmFamily) -> Result<DecodingKey, ConfigError> {
    let auth = &config.auth;
    if family == AlgorithmFamily::Hmac {
        return Ok(DecodingKey::from_secret(&read_hmac_secret(
            &auth.hmac_secret_file,
        )?));
    }
    let path = auth
        .public_key_file
        .as_deref()
        .ok_or_else(|| ConfigError::Invalid("auth.public_key_file is required".into()))?;
    let pem = read_key_file(path)?;
    let parsed = match family {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
        _ => DecodingKey::from_ed_pem(&pem),
    };
    parsed.map_err(|e| {
        ConfigError::Invalid(format!(
            "auth.public_key_file {}: not a {family:?} public key ({e})",
            path.display()
        ))
    })
}

/// Reads and parses a JWKS file, at most [`MAX_JWKS_BYTES`] of it.
fn load_jwks_file(path: &Path, pinned: &[Algorithm]) -> Result<KeySet, KeyError> {
    use std::io::Read as _;
    let origin = path.display().to_string();
    let read_err = |e: std::io::Error| KeyError::Read {
        origin: origin.clone(),
        message: e.to_string(),
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    KeySet::from_jwks(&bytes, pinned, &origin)
}

/// Reads an HMAC secret: the file's bytes less one trailing line break
/// (`\n` or `\r\n`), as editors and `echo` add.
///
/// # Errors
/// An unreadable file or a secret shorter than 32 bytes.
pub fn read_hmac_secret(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let mut bytes = read_key_file(path)?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.len() < MIN_HMAC_SECRET_BYTES {
        return Err(ConfigError::Invalid(format!(
            "HMAC secret in {} is {} bytes; at least {MIN_HMAC_SECRET_BYTES} are required",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::Invalid(format!("cannot read key file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn es256_token(pem: &str, kid: Option<&str>, extra_header: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        if let Some(url) = extra_header {
            // Headers that name a key source must be ignored.
            header.jku = Some(url.to_owned());
            header.x5u = Some(url.to_owned());
        }
        let claims = serde_json::json!({"sub": "alice", "exp": mint::unix_now() + 600});
        let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn jwks_verifier(dir: &Path, keys: &[serde_json::Value]) -> Verifier {
        let file = dir.join("jwks.json");
        std::fs::write(&file, serde_json::json!({ "keys": keys }).to_string()).unwrap();
        let mut config = Config::default();
        config.auth.algorithms = vec!["ES256".into()];
        config.auth.jwks_file = Some(file);
        config.validate().unwrap();
        Verifier::from_config(&config).unwrap()
    }

    #[test]
    fn tokens_are_verified_with_the_key_their_kid_names() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_pem) = keys::tests::ec_jwk("a", false);
        let (b, b_pem) = keys::tests::ec_jwk("b", false);
        let v = jwks_verifier(dir.path(), &[a.clone(), b]);
        assert_eq!(v.key_count(), 2);
        assert_eq!(
            v.verify(&es256_token(&a_pem, Some("a"), None))
                .unwrap()
                .user,
            "alice"
        );
        assert!(v.verify(&es256_token(&b_pem, Some("b"), None)).is_ok());
        // A's signature under B's kid is a bad signature, not a lookup miss.
        assert_eq!(
            v.verify(&es256_token(&a_pem, Some("b"), None)),
            Err(AuthFailure::Signature)
        );
        assert_eq!(
            v.verify(&es256_token(
                &a_pem,
                Some("c"),
                Some("https://evil.example/jwks")
            )),
            Err(AuthFailure::UnknownKid)
        );
        // No kid and two keys: which one is meant would be a guess.
        assert_eq!(
            v.verify(&es256_token(&a_pem, None, None)),
            Err(AuthFailure::UnknownKid)
        );

        let one = jwks_verifier(dir.path(), &[a]);
        assert!(one.verify(&es256_token(&a_pem, None, None)).is_ok());
        assert_eq!(
            one.verify(&es256_token(&a_pem, Some("b"), None)),
            Err(AuthFailure::UnknownKid)
        );
    }

    #[test]
    fn a_pem_key_serves_tokens_with_any_kid_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let public = dir.path().join("pub.pem");
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        let mut config = Config::default();
        config.auth.algorithms = vec!["ES256".into()];
        config.auth.public_key_file = Some(public);
        let v = Verifier::from_config(&config).unwrap();
        let pem = pair.serialize_pem();
        assert!(v.verify(&es256_token(&pem, None, None)).is_ok());
        assert!(
            v.verify(&es256_token(&pem, Some("rotating-idp-7"), None))
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_refused_reload_keeps_the_keys_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_pem) = keys::tests::ec_jwk("a", false);
        let (b, b_pem) = keys::tests::ec_jwk("b", false);
        let metrics = Arc::new(KeyMetrics::default());
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, serde_json::json!({ "keys": [a] }).to_string()).unwrap();
        let mut config = Config::default();
        config.auth.algorithms = vec!["ES256".into()];
        config.auth.jwks_file = Some(file.clone());
        let v = Verifier::with_metrics(&config, Arc::clone(&metrics)).unwrap();

        std::fs::write(&file, b"{\"keys\":[{\"kty\":").unwrap();
        assert!(matches!(v.reload().await, Err(KeyError::Parse { .. })));
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(v.reload().await, Err(KeyError::Read { .. })));
        assert!(v.verify(&es256_token(&a_pem, Some("a"), None)).is_ok());
        assert_eq!(metrics.reloads.get("failed"), 2);

        std::fs::write(&file, serde_json::json!({ "keys": [b] }).to_string()).unwrap();
        assert_eq!(v.reload().await, Ok(Some(1)));
        assert_eq!(metrics.reloads.get("ok"), 1);
        assert!(v.verify(&es256_token(&b_pem, Some("b"), None)).is_ok());
        assert_eq!(
            v.verify(&es256_token(&a_pem, Some("a"), None)),
            Err(AuthFailure::UnknownKid)
        );
    }

    #[test]
    fn roles_claim_must_be_strings() {
        let claims = |roles: Value| {
            let mut m = Map::new();
            m.insert("sub".into(), "alice".into());
            m.insert("exp".into(), 10.into());
            m.insert("roles".into(), roles);
            m
        };
        let id = identity_from_claims(claims(serde_json::json!(["a", "b"])), "roles").unwrap();
        assert_eq!(id.roles, ["a", "b"]);
        assert_eq!(
            identity_from_claims(claims(serde_json::json!([1])), "roles"),
            Err(AuthFailure::BadClaim)
        );
        assert_eq!(
            identity_from_claims(claims(serde_json::json!("admin")), "roles"),
            Err(AuthFailure::BadClaim)
        );
    }

    #[test]
    fn empty_or_numeric_sub_is_refused() {
        let mut m = Map::new();
        m.insert("exp".into(), 10.into());
        m.insert("sub".into(), "".into());
        assert_eq!(
            identity_from_claims(m.clone(), "roles"),
            Err(AuthFailure::BadClaim)
        );
        m.insert("sub".into(), 7.into());
        assert_eq!(identity_from_claims(m, "roles"), Err(AuthFailure::BadClaim));
    }

    fn hs_verifier(dir: &Path, tweak: impl FnOnce(&mut Config)) -> (Verifier, EncodingKey) {
        let secret = b"0123456789abcdef0123456789abcdef-verifier-test";
        let file = dir.join("hmac.secret");
        std::fs::write(&file, secret).unwrap();
        let mut config = Config::default();
        config.auth.hmac_secret_file = file;
        tweak(&mut config);
        (
            Verifier::from_config(&config).unwrap(),
            EncodingKey::from_secret(secret),
        )
    }

    fn hs_token(key: &EncodingKey, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, key).unwrap()
    }

    #[test]
    fn time_claims_that_overflow_are_refused_never_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let (v, key) = hs_verifier(dir.path(), |_| {});
        let header = Header::new(Algorithm::HS256);
        let now = mint::unix_now();
        let ok = serde_json::json!({"sub": "a", "exp": now + 600});
        assert!(v.verify(&hs_token(&key, &header, &ok)).is_ok());
        let huge = [
            serde_json::json!(1u64 << 63),
            serde_json::json!(u64::MAX),
            serde_json::json!(1e300),
            serde_json::json!(claims::MAX_NUMERIC_DATE + 1),
        ];
        for value in &huge {
            for claim in ["exp", "iat", "nbf"] {
                let mut claims = ok.clone();
                claims[claim] = value.clone();
                let verdict = v.verify(&hs_token(&key, &header, &claims));
                assert!(verdict.is_err(), "{claim} = {value} was accepted");
            }
        }
        let mut negative = ok.clone();
        negative["iat"] = serde_json::json!(-5);
        assert_eq!(
            v.verify(&hs_token(&key, &header, &negative)),
            Err(AuthFailure::BadClaim)
        );
    }

    #[test]
    fn long_kids_are_refused_and_typ_is_checked_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (v, key) = hs_verifier(dir.path(), |_| {});
        let claims = serde_json::json!({"sub": "a", "exp": mint::unix_now() + 600});
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k".repeat(MAX_KID_BYTES + 1));
        assert_eq!(
            v.verify(&hs_token(&key, &header, &claims)),
            Err(AuthFailure::Malformed)
        );
        header.kid = None;
        header.typ = Some("logout+jwt".into());
        assert!(
            v.verify(&hs_token(&key, &header, &claims)).is_ok(),
            "typ not asked"
        );

        let (strict, key) = hs_verifier(dir.path(), |c| c.auth.require_typ = true);
        for (typ, accepted) in [
            (Some("JWT"), true),
            (Some("at+jwt"), true),
            (Some("application/AT+JWT"), true),
            (Some("logout+jwt"), false),
            (Some("application/"), false),
            (None, false),
        ] {
            header.typ = typ.map(str::to_owned);
            assert_eq!(
                strict.verify(&hs_token(&key, &header, &claims)).is_ok(),
                accepted,
                "typ {typ:?}"
            );
        }
    }
}
