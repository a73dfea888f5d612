//! Token verification: the pinned algorithm set and key, the claims we
//! require, and the verified [`Identity`] that travels inward. Minting of
//! development tokens lives in [`mint`].
//!
//! Nothing here ever formats a token into an error or a log line: errors
//! carry only an [`AuthFailure`] reason.

pub mod mint;

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value};

use crate::config::{Config, ConfigError, MIN_HMAC_SECRET_BYTES};

/// Why a token was refused. The label is stable (logs, metrics later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token algorithm is not allowed")]
    Algorithm,
    #[error("token has a crit header")]
    Crit,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token lacks a required claim")]
    MissingClaim,
    #[error("token claim has the wrong type")]
    BadClaim,
}

impl AuthFailure {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::Crit => "crit",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::MissingClaim => "missing_claim",
            Self::BadClaim => "bad_claim",
        }
    }
}

/// A verified user: who they are, their roles, and when their token ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The token's `sub`.
    pub user: String,
    /// Strings from the configured roles claim (empty when absent).
    pub roles: Vec<String>,
    /// The token's `exp`, unix seconds.
    pub expires_at: u64,
    /// The claims for policy templates such as `{claim.tenant}`: all but
    /// `exp`, `iat`, `nbf`, `jti` and the roles claim.
    pub claims: Map<String, Value>,
}

/// Checks tokens against one key and a pinned algorithm set.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
    roles_claim: String,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier from the `[auth]` section, reading its key file.
    ///
    /// # Errors
    /// A missing or unreadable key, an HMAC secret under 32 bytes, or a key
    /// that does not fit the algorithm family.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let algorithms = config.algorithms()?;
        let auth = &config.auth;
        let family = algorithms[0].family();
        let key = match family {
            AlgorithmFamily::Hmac => {
                DecodingKey::from_secret(&read_hmac_secret(&auth.hmac_secret_file)?)
            }
            family => {
                let path = auth.public_key_file.as_deref().ok_or_else(|| {
                    ConfigError::Invalid("auth.public_key_file is required".into())
                })?;
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
                })?
            }
        };
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
        validation.set_required_spec_claims(&required);
        Ok(Self {
            key,
            validation,
            leeway: Duration::from_secs(auth.leeway_s),
            roles_claim: auth.roles_claim.clone(),
        })
    }

    /// Verifies `token` and returns who it names.
    ///
    /// # Errors
    /// The reason the token was refused; never the token itself.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| map_error(e.kind()))?;
        if header.crit.is_some() {
            // We understand no extensions, so any critical one must fail (RFC 7515 §4.1.11).
            return Err(AuthFailure::Crit);
        }
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(AuthFailure::Algorithm);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| map_error(e.kind()))?;
        let identity = identity_from_claims(data.claims, &self.roles_claim)?;
        // jsonwebtoken compares whole seconds, while a session ends at the
        // exact instant `exp` + leeway: refuse from that instant too, or a
        // client could reconnect with the token its session just expired on.
        let end = UNIX_EPOCH + Duration::from_secs(identity.expires_at) + self.leeway;
        if SystemTime::now() >= end {
            return Err(AuthFailure::Expired);
        }
        Ok(identity)
    }

    /// The algorithms this verifier accepts.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.validation.algorithms
    }
}

fn identity_from_claims(
    mut claims: Map<String, Value>,
    roles_claim: &str,
) -> Result<Identity, AuthFailure> {
    let user = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(AuthFailure::BadClaim),
        None => return Err(AuthFailure::MissingClaim),
    };
    let expires_at = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(AuthFailure::BadClaim)?;
    let roles = match claims.get(roles_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or(AuthFailure::BadClaim))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(AuthFailure::BadClaim),
    };
    // A session keeps its claims for policy templates; the time claims and
    // the roles are held above or no longer needed, so they are dropped.
    for spent in ["exp", "iat", "nbf", "jti", roles_claim] {
        claims.remove(spent);
    }
    Ok(Identity {
        user,
        roles,
        expires_at,
        claims,
    })
}

fn map_error(kind: &ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::InvalidSignature => AuthFailure::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthFailure::Algorithm,
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidIssuer => AuthFailure::Issuer,
        ErrorKind::InvalidAudience => AuthFailure::Audience,
        ErrorKind::MissingRequiredClaim(_) => AuthFailure::MissingClaim,
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::InvalidSubject => AuthFailure::BadClaim,
        // Unparseable header (incl. `alg: none`), bad base64, bad JSON, wrong key type.
        _ => AuthFailure::Malformed,
    }
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
}
