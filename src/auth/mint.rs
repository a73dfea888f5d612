//! Minting development tokens (`wsgate token`, `serve --dev`) and creating
//! the development HMAC secret. Production tokens come from an identity
//! provider; this exists so a newcomer can connect in one step.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{AlgorithmFamily, EncodingKey, Header};
use serde_json::{Map, Value};

use crate::config::{Config, ConfigError};

/// What a minted token says.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub sub: String,
    pub roles: Vec<String>,
    pub ttl: Duration,
    /// Extra claims; they may not replace `sub`, `exp`, `iat` or the roles.
    pub claims: Map<String, Value>,
    /// The `kid` header: which key of a JWK set verifies the token.
    pub kid: Option<String>,
}

/// Signs a token with the configured key and first configured algorithm.
/// `iss` and `aud` are filled from the config when it requires them.
///
/// # Errors
/// A missing or unusable signing key.
pub fn mint(
    config: &Config,
    request: &TokenRequest,
    private_key: Option<&Path>,
) -> Result<String, ConfigError> {
    let alg = config.algorithms()?[0];
    let key = match alg.family() {
        AlgorithmFamily::Hmac => {
            EncodingKey::from_secret(&super::read_hmac_secret(&config.auth.hmac_secret_file)?)
        }
        family => {
            let path = private_key
                .or(config.auth.private_key_file.as_deref())
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{alg:?} needs a private key: pass --key or set auth.private_key_file"
                    ))
                })?;
            let pem = std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!("cannot read {}: {e}", path.display()))
            })?;
            let parsed = match family {
                AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem),
                AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
                _ => EncodingKey::from_ed_pem(&pem),
            };
            parsed.map_err(|e| {
                ConfigError::Invalid(format!(
                    "{}: not a {family:?} private key ({e})",
                    path.display()
                ))
            })?
        }
    };
    let now = unix_now();
    let mut claims = request.claims.clone();
    if let Some(iss) = config.auth.issuers.first() {
        claims.entry("iss").or_insert_with(|| iss.clone().into());
    }
    if let Some(aud) = config.auth.audiences.first() {
        claims.entry("aud").or_insert_with(|| aud.clone().into());
    }
    claims.insert("sub".into(), request.sub.clone().into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + request.ttl.as_secs()).into());
    claims.insert(
        config.auth.roles_claim.clone(),
        request.roles.iter().cloned().map(Value::from).collect(),
    );
    let mut header = Header::new(alg);
    header.kid = request.kid.clone();
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| ConfigError::Invalid(format!("cannot sign token: {e}")))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses `90`, `90s`, `15m`, `1h`, `7d` into a duration.
///
/// # Errors
/// Anything else, or zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 1h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?} (use s, m, h or d)"
            ));
        }
    };
    match n.checked_mul(scale) {
        Some(0) => Err("a duration must be above zero".into()),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(format!("{text:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
