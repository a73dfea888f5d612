//! The bodies of the `wsgate` commands other than `serve` and `bench`:
//! `check-config`, `doctor`, `policy check|explain`, `certs`, `token`, and
//! the configuration loading they share. `main.rs` only parses and
//! dispatches; errors are boxed here, at the top, and only here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Map, Value};

use crate::auth::mint::{self, TokenRequest};
use crate::channel::ChannelName;
use crate::config::Config;
use crate::identity::Identity;
use crate::policy::{Action, PolicySet};
use crate::tools::certs::{self, CaSource, CertPaths, Replace};
use crate::tools::doctor::{self, Level};

/// The one boxed error type, for command bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args)]
pub struct ConfigArgs {
    /// TOML configuration file (also WSGATE_CONFIG).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate the policy files; print each file's rule count or the first error.
    Check(PolicyDirArgs),
    /// Explain whether a user may subscribe or publish to a channel, and why.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct PolicyDirArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Policy directory (overrides policy.dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub policy: PolicyDirArgs,
    /// A JWT to take the user from (verified with the configured key); `-` reads stdin.
    #[arg(long, conflicts_with_all = ["sub", "roles", "claims"])]
    pub token: Option<String>,
    /// The user id, instead of a token.
    #[arg(long, required_unless_present = "token")]
    pub sub: Option<String>,
    /// A role (repeatable).
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// A claim NAME=VALUE (repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    pub claims: Vec<(String, Value)>,
    /// subscribe or publish.
    #[arg(long, value_parser = ["subscribe", "publish"])]
    pub action: String,
    /// The channel.
    #[arg(long)]
    pub channel: String,
}

#[derive(Args)]
pub struct CertsArgs {
    /// Directory for ca.pem, ca.key, server.pem and server.key.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// Extra DNS name or IP address for the server certificate (repeatable).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Replace an existing server certificate and key (the CA is kept).
    #[arg(long)]
    pub force: bool,
    /// Also replace the CA (clients must then trust the new one).
    #[arg(long)]
    pub new_ca: bool,
}

#[derive(Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// A role (repeatable).
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Lifetime: 90s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = mint::parse_duration)]
    pub ttl: Duration,
    /// Extra claim NAME=VALUE; VALUE is JSON when it parses as JSON (repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    pub claims: Vec<(String, Value)>,
    /// Private key PEM for asymmetric algorithms (overrides auth.private_key_file).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The `kid` header, naming the key of a JWK set (`auth.jwks_file` or
    /// `auth.jwks_url`) that verifies the token.
    #[arg(long)]
    pub kid: Option<String>,
    /// The `aud` claim; `--aud wsgate-api` (`api.audience`) mints a token
    /// for the HTTP API, which `/ws` refuses.
    #[arg(long)]
    pub aud: Option<String>,
}

fn parse_claim(text: &str) -> Result<(String, Value), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    if name.is_empty() {
        return Err("claim name is empty".into());
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

/// Loads the config from the file and `WSGATE_*` variables (not yet
/// validated: flags may still apply); reports the variables that were
/// skipped because they name no section.
pub fn load_config(args: &ConfigArgs) -> Result<(Config, Vec<String>), BoxError> {
    let file = args
        .config
        .clone()
        .or_else(|| std::env::var_os("WSGATE_CONFIG").map(PathBuf::from));
    // `vars()` panics on a non-UTF-8 variable; such a variable is not ours.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    Ok(Config::load_reporting(file.as_deref(), env)?)
}

pub fn check_config(args: &ConfigArgs) -> Result<(), BoxError> {
    let (config, ignored) = load_config(args)?;
    config.validate()?;
    // The history patterns compile as `serve` compiles them.
    crate::history::HistoryRules::compile(&config.history, config.websocket.outbox_frames)
        .map_err(crate::config::ConfigError::Invalid)?;
    crate::presence::PresenceRules::compile(&config.presence)
        .map_err(crate::config::ConfigError::Invalid)?;
    for name in ignored {
        println!("note: {name} names no configuration section; ignored");
    }
    let verifier = crate::auth::Verifier::from_config(&config)?;
    // A JWKS URL is fetched as `serve` would, so an unreachable one shows here.
    block_on(verifier.prime())??;
    let certs = crate::tls::CertStore::load(&config.tls)?;
    crate::tls::server_config(&config.tls, certs)?;
    let policies = crate::policy::PolicySet::load_dir(&config.policy.dir)?;
    println!(
        "configuration is valid ({} policy rules from {})",
        policies.rules.len(),
        config.policy.dir.display()
    );
    Ok(())
}

/// Runs one future to completion on a small runtime, for the commands
/// that are otherwise synchronous (a JWKS fetch needs I/O and timers).
pub fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(future))
}

/// Prints one line per finding and a count; `Ok(false)` when any is an error.
pub fn doctor(args: &ConfigArgs) -> Result<bool, BoxError> {
    let (config, ignored) = load_config(args)?;
    for name in ignored {
        println!("note: {name} names no configuration section; ignored");
    }
    let findings = doctor::diagnose(&config, &doctor::Environment::current());
    for finding in &findings {
        println!("{finding}");
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let (errors, warnings) = (count(Level::Error), count(Level::Warning));
    println!("{errors} error(s), {warnings} warning(s)");
    Ok(errors == 0)
}

fn policy_dir(args: &PolicyDirArgs) -> Result<(Config, PathBuf), BoxError> {
    let (config, _) = load_config(&args.config)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| config.policy.dir.clone());
    Ok((config, dir))
}

pub fn policy_check(args: &PolicyDirArgs) -> Result<(), BoxError> {
    let (_, dir) = policy_dir(args)?;
    let set = PolicySet::load_dir(&dir)?;
    for file in &set.files {
        let prefix = format!("{}:", file.display());
        let rules = set
            .rules
            .iter()
            .filter(|r| r.origin.starts_with(&prefix))
            .count();
        println!("{}: {rules} rules", file.display());
    }
    println!(
        "ok: {} rules in {} file(s)",
        set.rules.len(),
        set.files.len()
    );
    Ok(())
}

/// Prints the decision and every rule's part in it; `Ok(true)` when allowed.
pub fn policy_explain(args: ExplainArgs) -> Result<bool, BoxError> {
    let (config, dir) = policy_dir(&args.policy)?;
    let set = PolicySet::load_dir(&dir)?;
    let channel = ChannelName::parse(&args.channel)?;
    let action = if args.action == "publish" {
        Action::Publish
    } else {
        Action::Subscribe
    };
    let who = match args.token {
        Some(token) => {
            let token = if token == "-" {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line.trim().to_owned()
            } else {
                token
            };
            config.validate()?;
            let verifier = crate::auth::Verifier::from_config(&config)?;
            block_on(verifier.prime())??;
            verifier
                .verify(&token)
                .map_err(|e| format!("token refused: {e}"))?
        }
        None => Identity {
            issued_at: None,
            user: args.sub.unwrap_or_default(),
            roles: args.roles,
            expires_at: 0,
            claims: args.claims.into_iter().collect(),
        },
    };
    let decision = set.decide(&who, action, &channel);
    println!("user:    {}", who.user);
    println!(
        "roles:   {}",
        if who.roles.is_empty() {
            "(none)".to_owned()
        } else {
            who.roles.join(", ")
        }
    );
    println!("request: {} {channel}", action.as_str());
    println!("result:  {decision}");
    println!("\nrules, in order:");
    for t in set.trace(&who, action, &channel) {
        let what = if !t.applies {
            let rule = t.rule;
            if !rule.roles.is_empty() && !rule.roles.iter().any(|r| who.roles.contains(r)) {
                format!("does not apply: needs a role of {}", rule.roles.join(", "))
            } else {
                let claims: Vec<String> = rule
                    .claims
                    .iter()
                    .map(|(k, v)| format!("{k} in [{}]", v.join(", ")))
                    .collect();
                format!("does not apply: needs claims {}", claims.join(" and "))
            }
        } else if let Some(p) = t.deny.first() {
            format!("applies; deny.{} {p} matches", action.as_str())
        } else if let Some(p) = t.allow.first() {
            format!("applies; allow.{} {p} matches", action.as_str())
        } else {
            format!("applies; no {} pattern matches", action.as_str())
        };
        println!("  {} {:?}: {what}", t.rule.origin, t.rule.name);
    }
    Ok(decision.allowed)
}

pub fn run_certs(args: &CertsArgs) -> Result<(), BoxError> {
    let paths = CertPaths::in_dir(&args.out);
    let replace = match (args.new_ca, args.force) {
        (true, _) => Replace::All,
        (false, true) => Replace::Server,
        (false, false) => Replace::Nothing,
    };
    let ca = certs::generate(&paths, &args.hosts, replace)?;
    let verb = match ca {
        CaSource::Created => "created",
        CaSource::Reused => "reused",
    };
    println!("CA ({verb}):  {}", paths.ca_cert.display());
    println!("server cert: {}", paths.server_cert.display());
    println!("server key:  {} (mode 0600)", paths.server_key.display());
    println!();
    print!("{}", certs::trust_instructions(&paths.ca_cert));
    Ok(())
}

pub fn token(args: TokenArgs) -> Result<(), BoxError> {
    let (config, _) = load_config(&args.config)?;
    config.validate()?;
    let mut claims = args.claims.into_iter().collect::<Map<_, _>>();
    if let Some(aud) = args.aud {
        claims.insert("aud".into(), aud.into());
    }
    let request = TokenRequest {
        sub: args.sub,
        roles: args.roles,
        ttl: args.ttl,
        claims,
        kid: args.kid,
    };
    println!("{}", mint::mint(&config, &request, args.key.as_deref())?);
    Ok(())
}
