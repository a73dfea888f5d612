//! Loading: the TOML file, then the `WSGATE_*` environment overlay.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Config, ConfigError, ENV_PREFIX};

impl Config {
    /// Loads the file (if any) and overlays `env` (pairs of name and value,
    /// normally the process environment). It does not [`validate`](Self::validate).
    ///
    /// # Errors
    /// An unreadable file, unknown keys, or wrongly typed values.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_reporting(file, env).map(|(config, _)| config)
    }

    /// As [`Config::load`], also returning the `WSGATE_*` variables that
    /// were ignored because they name no section (such as the
    /// `WSGATE_SERVICE_HOST` that Kubernetes injects for a Service).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_reporting(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        let ignored = apply_env(&mut table, env)?;
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: file.map_or_else(|| PathBuf::from("<defaults>"), Path::to_owned),
                message: e.message().to_owned(),
            })?;
        Ok((config, ignored))
    }
}

/// Writes `WSGATE_SECTION_KEY=value` pairs into `table` as
/// `[section] key = value`. The value's type follows the key's default
/// (integer, boolean, list); lists may be TOML (`["a","b"]`) or
/// comma-separated; an empty value unsets an optional key. Each variable
/// is checked on its own, so an error names it. Returns the variables
/// skipped because they name no section.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| ConfigError::Invalid(format!("defaults do not serialize: {e}")))?;
    let mut ignored = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest == "CONFIG" {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        let section_defaults =
            lower
                .split_once('_')
                .and_then(|(section, key)| match defaults.get(section) {
                    Some(toml::Value::Table(t)) => Some((section, key, t)),
                    _ => None,
                });
        let Some((section, key, section_defaults)) = section_defaults else {
            ignored.push(name);
            continue;
        };
        let env_err = |message: String| ConfigError::Env {
            name: name.clone(),
            message,
        };
        let default = section_defaults.get(key);
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(env_err(format!("[{section}] in the file is not a table")));
        };
        let value = env_value(default, &raw).map_err(env_err)?;
        // Deserialize this one key alone, so an unknown key or a bad value
        // is reported against the variable rather than the file.
        let mut probe = toml::Table::new();
        let mut probe_section = toml::Table::new();
        probe_section.insert(key.to_owned(), value.clone());
        probe.insert(section.to_owned(), toml::Value::Table(probe_section));
        Config::deserialize(probe).map_err(|e| env_err(e.message().to_owned()))?;
        if default.is_none() && raw.is_empty() {
            // An optional key (no default value): empty means unset.
            section_table.remove(key);
        } else {
            section_table.insert(key.to_owned(), value);
        }
    }
    Ok(ignored)
}

fn env_value(default: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    let parse_toml = |s: &str| -> Result<Value, String> {
        let doc: toml::Table = format!("v = {s}")
            .parse()
            .map_err(|_| format!("{s:?} is not a valid value"))?;
        doc.get("v")
            .cloned()
            .ok_or_else(|| "empty value".to_owned())
    };
    match default {
        Some(Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| "expected an integer".to_owned()),
        Some(Value::Boolean(_)) => match raw.trim() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err("expected true or false".to_owned()),
        },
        Some(Value::Array(_)) | None if raw.trim_start().starts_with('[') => parse_toml(raw),
        Some(Value::Array(_)) => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )),
        _ => Ok(Value::String(raw.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_validate() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn env_overrides_file_with_typed_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9000\"\nmax_connections = 5\n[auth]\nleeway_s = 1\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("WSGATE_SERVER_MAX_CONNECTIONS", "7"),
                ("WSGATE_AUTH_QUERY_TOKEN", "true"),
                ("WSGATE_AUTH_ALGORITHMS", "HS384, HS512"),
                ("WSGATE_AUTH_ISSUERS", "[\"a\", \"b\"]"),
                ("WSGATE_AUTH_PUBLIC_KEY_FILE", "k.pem"),
                ("WSGATE_CONFIG", "ignored"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.auth.leeway_s, 1);
        assert!(c.auth.query_token);
        assert_eq!(c.auth.algorithms, ["HS384", "HS512"]);
        assert_eq!(c.auth.issuers, ["a", "b"]);
        assert_eq!(c.auth.public_key_file.as_deref(), Some(Path::new("k.pem")));
        // An empty value unsets an optional key the file had set.
        std::fs::write(&file, "[auth]\npublic_key_file = \"k.pem\"\n").unwrap();
        let c = Config::load(Some(&file), env(&[("WSGATE_AUTH_PUBLIC_KEY_FILE", "")])).unwrap();
        assert_eq!(c.auth.public_key_file, None);
    }

    #[test]
    fn unknown_keys_are_refused_everywhere() {
        let err = Config::load(None, env(&[("WSGATE_SERVER_LISTN", "x")])).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        assert!(err.to_string().contains("WSGATE_SERVER_LISTN"), "{err}");
        let err = Config::load(None, env(&[("WSGATE_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("WSGATE_LOG_FORMAT"), "{err}");
        let err = Config::load(None, env(&[("WSGATE_SERVER_LISTEN", "nope")])).unwrap_err();
        assert!(err.to_string().contains("WSGATE_SERVER_LISTEN"), "{err}");
        // Variables naming no section (Kubernetes service links) are skipped.
        let (_, ignored) = Config::load_reporting(
            None,
            env(&[
                ("WSGATE_PORT", "tcp://10.0.0.1:8443"),
                ("WSGATE_SERVICE_HOST", "10.0.0.1"),
            ]),
        )
        .unwrap();
        assert_eq!(ignored, ["WSGATE_PORT", "WSGATE_SERVICE_HOST"]);
        let err = Config::load(None, env(&[("WSGATE_SERVER_MAX_HEADERS", "many")])).unwrap_err();
        assert!(err.to_string().contains("integer"), "{err}");
    }

    #[test]
    fn validate_refuses_mixed_families_and_tight_limits() {
        let mut c = Config::default();
        c.auth.algorithms = vec!["HS256".into(), "RS256".into()];
        assert!(c.validate().is_err());
        c.auth.algorithms = vec!["none".into()];
        assert!(c.validate().is_err());
        c = Config::default();
        c.auth.algorithms = vec!["ES256".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("public_key_file")
        );
        c = Config::default();
        c.auth.max_token_bytes = c.server.max_header_bytes;
        assert!(c.validate().is_err());
        c = Config::default();
        c.server.allowed_origins = vec!["example.com".into()];
        assert!(c.validate().is_err());
        c = Config::default();
        c.auth.algorithms = vec!["PS512".into()];
        assert!(c.validate().is_err());
        c.auth.public_key_file = Some("k.pem".into());
        c.auth.algorithms = vec!["ES256".into(), "ES384".into()];
        assert!(c.validate().is_err());
        c = Config::default();
        c.auth.roles_claim = "sub".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn jwks_sources_are_checked() {
        let err = |c: &Config| c.validate().unwrap_err().to_string();
        let mut c = Config::default();
        c.auth.algorithms = vec!["ES256".into()];
        c.auth.jwks_url = Some("https://id.example.com/jwks".into());
        c.validate().unwrap();
        c.auth.jwks_file = Some("jwks.json".into());
        assert!(err(&c).contains("mutually exclusive"));
        c.auth.jwks_url = None;
        c.validate().unwrap();
        c.auth.public_key_file = Some("k.pem".into());
        assert!(err(&c).contains("cannot be combined"));
        c.auth.public_key_file = None;
        c.auth.algorithms = vec!["HS256".into()];
        assert!(err(&c).contains("asymmetric"));

        c = Config::default();
        c.auth.algorithms = vec!["RS256".into()];
        for bad in [
            "http://id.example.com/jwks",
            "https://u@id.example.com/",
            "jwks.json",
        ] {
            c.auth.jwks_url = Some(bad.into());
            assert!(err(&c).contains("auth.jwks_url"), "{bad}");
        }
        c.auth.jwks_url = None;
        c.auth.public_key_file = Some("k.pem".into());
        c.auth.jwks_ca_file = Some("ca.pem".into());
        assert!(err(&c).contains("jwks_ca_file"));
        c.auth.public_key_file = None;
        c.auth.jwks_url = Some("https://127.0.0.1:9/jwks".into());
        c.validate().unwrap();
        c.auth.jwks_timeout_ms = 0;
        assert!(err(&c).contains("jwks_timeout_ms"));
        c.auth.jwks_timeout_ms = 1;
        c.auth.jwks_min_refresh_interval_ms = 999;
        assert!(err(&c).contains("jwks_min_refresh_interval_ms"));
        c.auth.jwks_min_refresh_interval_ms = 60_000;
        c.auth.jwks_refresh_interval_ms = 59_999;
        assert!(err(&c).contains("jwks_refresh_interval_ms"));

        // The environment reaches the new keys like any other.
        let c = Config::load(
            None,
            env(&[
                ("WSGATE_AUTH_JWKS_URL", "https://id.example.com/jwks"),
                ("WSGATE_AUTH_JWKS_TIMEOUT_MS", "1500"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.auth.jwks_url.as_deref(),
            Some("https://id.example.com/jwks")
        );
        assert_eq!(c.auth.jwks_timeout_ms, 1500);
    }
}
