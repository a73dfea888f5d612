//! What a verified token means: the [`AuthFailure`] reasons (stable labels
//! for logs and metrics), the mapping from `jsonwebtoken`'s errors, and
//! the claims turned into an [`Identity`].

use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};

use crate::identity::Identity;

/// Why a token was refused. The label is stable (logs, metrics later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token algorithm is not allowed")]
    Algorithm,
    #[error("token has a crit header")]
    Crit,
    #[error("token names no key the gateway has")]
    UnknownKid,
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
    #[error("token was revoked")]
    Revoked,
}

impl AuthFailure {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::Crit => "crit",
            Self::UnknownKid => "unknown_kid",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::MissingClaim => "missing_claim",
            Self::BadClaim => "bad_claim",
            Self::Revoked => "revoked",
        }
    }
}

/// The latest NumericDate accepted, 9999-12-31T23:59:59Z: later ones mean
/// nothing real, and near `u64::MAX` they overflow time arithmetic.
pub const MAX_NUMERIC_DATE: u64 = 253_402_300_799;

/// A time claim as whole seconds: absent is `Ok(None)`; a number that is
/// negative, not finite or past [`MAX_NUMERIC_DATE`] is a bad claim.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, AuthFailure> {
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    // A NumericDate may have a fraction (RFC 7519 §2); whole seconds do.
    let secs = v
        .as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f <= MAX_NUMERIC_DATE as f64)
                .map(|f| f as u64)
        })
        .ok_or(AuthFailure::BadClaim)?;
    if secs > MAX_NUMERIC_DATE {
        return Err(AuthFailure::BadClaim);
    }
    Ok(Some(secs))
}

pub(super) fn identity_from_claims(
    mut claims: Map<String, Value>,
    roles_claim: &str,
) -> Result<Identity, AuthFailure> {
    let user = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(AuthFailure::BadClaim),
        None => return Err(AuthFailure::MissingClaim),
    };
    // `exp` in whole seconds, as ever; past year 9999 it is refused rather
    // than overflowing the time arithmetic of the expiry (a validly signed
    // `exp` of 2^63 used to panic the connection's task).
    let expires_at = claims
        .get("exp")
        .and_then(Value::as_u64)
        .filter(|exp| *exp <= MAX_NUMERIC_DATE)
        .ok_or(AuthFailure::BadClaim)?;
    let issued_at = numeric_date(&claims, "iat")?;
    numeric_date(&claims, "nbf")?;
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
        issued_at,
        claims,
    })
}

pub(super) fn map_error(kind: &ErrorKind) -> AuthFailure {
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
