//! The verified caller that travels inward from the upgrade: made once by
//! `auth` from a checked token, read by policies, sessions and the core.
//! A leaf: no other module of ours.

use serde_json::{Map, Value};

/// A verified user: who they are, their roles, and when their token ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The token's `sub`.
    pub user: String,
    /// Strings from the configured roles claim (empty when absent).
    pub roles: Vec<String>,
    /// The token's `exp`, unix seconds.
    pub expires_at: u64,
    /// The token's `iat`, unix seconds, when it has one.
    pub issued_at: Option<u64>,
    /// The claims for policy templates such as `{claim.tenant}`: all but
    /// `exp`, `iat`, `nbf`, `jti` and the roles claim.
    pub claims: Map<String, Value>,
}

impl Identity {
    /// Whether the token's `aud` (a string or an array) names `audience`.
    pub fn has_audience(&self, audience: &str) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        }
    }
}
