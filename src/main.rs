//! The `wsgate` command line: `serve`, `certs`, `token`, `check-config`,
//! `doctor`, `policy`, `bench`.
//! Errors are boxed here and only here; every leaf error is typed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use wsgate::auth::Identity;
use wsgate::auth::mint::{self, TokenRequest};
use wsgate::certs::{self, CaSource, CertPaths, Replace};
use wsgate::channel::ChannelName;
use wsgate::config::{Config, LogFormat};
use wsgate::policy::{Action, PolicySet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "wsgate",
    version,
    about = "A secure, authenticated WebSocket (wss://) gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve wss:// until SIGTERM or Ctrl-C.
    Serve(ServeArgs),
    /// Create a development CA and a server certificate it signs.
    Certs(CertsArgs),
    /// Mint a development JWT (printed alone on stdout).
    Token(TokenArgs),
    /// Validate the configuration (and its key and certificate files) without binding.
    CheckConfig(ConfigArgs),
    /// Review the configuration for risky settings, certificate expiry and
    /// limits (exit 1 on errors; warnings alone exit 0).
    Doctor(ConfigArgs),
    /// Check policy files, or explain a decision.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Load generator for wsgate and plain broadcast servers (loopback or your own deployment).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct BenchTarget {
    /// The server's WebSocket URL.
    #[arg(long, default_value = "wss://localhost:8443/ws")]
    url: String,
    /// CA (PEM) to trust for the server's certificate.
    #[arg(long, default_value = "certs/ca.pem")]
    ca: PathBuf,
    /// HMAC secret file: mint an HS256 token per client (sub bench-N, role member).
    #[arg(long, conflicts_with = "token")]
    secret: Option<PathBuf>,
    /// One token for every client.
    #[arg(long, required_unless_present = "secret")]
    token: Option<String>,
    /// Token carrier.
    #[arg(long, default_value = "header", value_parser = ["header", "subprotocol"])]
    carrier: String,
    /// The server is a plain broadcast server (no welcome, no channels).
    #[arg(long)]
    plain: bool,
    /// Spread client sockets over 127.0.0.1..N (0: one per 25,000 connections).
    #[arg(long, default_value_t = 0)]
    sources: usize,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Open N connections, hold them, report server RSS per connection.
    Idle {
        #[command(flatten)]
        target: BenchTarget,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// Seconds to hold the connections after they are open.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// The server's pid, to read its RSS.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// One publisher to N subscribers: deliveries/s and latency.
    Fanout {
        #[command(flatten)]
        target: BenchTarget,
        #[arg(long)]
        subscribers: usize,
        /// Message payload size, bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Messages in flight (not yet received by every subscriber).
        #[arg(long, conflicts_with = "rate", required_unless_present = "rate")]
        window: Option<u32>,
        /// Fixed publish rate, messages per second.
        #[arg(long)]
        rate: Option<u32>,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value = "chat:bench")]
        channel: String,
        /// Publish through this URL instead of `--url` (another replica of
        /// a cluster, trusting the same CA): measures delivery across replicas.
        #[arg(long)]
        publish_url: Option<String>,
    },
    /// Authenticated connections per second (TLS + upgrade + JWT).
    Connect {
        #[command(flatten)]
        target: BenchTarget,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate the policy files; print each file's rule count or the first error.
    Check(PolicyDirArgs),
    /// Explain whether a user may subscribe or publish to a channel, and why.
    Explain(ExplainArgs),
}

#[derive(Args)]
struct PolicyDirArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Policy directory (overrides policy.dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    policy: PolicyDirArgs,
    /// A JWT to take the user from (verified with the configured key); `-` reads stdin.
    #[arg(long, conflicts_with_all = ["sub", "roles", "claims"])]
    token: Option<String>,
    /// The user id, instead of a token.
    #[arg(long, required_unless_present = "token")]
    sub: Option<String>,
    /// A role (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// A claim NAME=VALUE (repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    claims: Vec<(String, Value)>,
    /// subscribe or publish.
    #[arg(long, value_parser = ["subscribe", "publish"])]
    action: String,
    /// The channel.
    #[arg(long)]
    channel: String,
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file (also WSGATE_CONFIG).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Create missing dev certificates and secret, and print a ready token.
    #[arg(long)]
    dev: bool,
    /// Listen address, e.g. 127.0.0.1:8443 (overrides server.listen).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Log filter, e.g. info or wsgate=debug (overrides log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// Log format (overrides log.format).
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

#[derive(Args)]
struct CertsArgs {
    /// Directory for ca.pem, ca.key, server.pem and server.key.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// Extra DNS name or IP address for the server certificate (repeatable).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Replace an existing server certificate and key (the CA is kept).
    #[arg(long)]
    force: bool,
    /// Also replace the CA (clients must then trust the new one).
    #[arg(long)]
    new_ca: bool,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// A role (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Lifetime: 90s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = mint::parse_duration)]
    ttl: Duration,
    /// Extra claim NAME=VALUE; VALUE is JSON when it parses as JSON (repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    claims: Vec<(String, Value)>,
    /// Private key PEM for asymmetric algorithms (overrides auth.private_key_file).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The `kid` header, naming the key of a JWK set (`auth.jwks_file` or
    /// `auth.jwks_url`) that verifies the token.
    #[arg(long)]
    kid: Option<String>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Certs(args) => run_certs(&args),
        Command::Token(args) => token(args),
        Command::CheckConfig(args) => check_config(&args),
        Command::Doctor(args) => {
            return match doctor(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("wsgate: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Policy(PolicyCommand::Check(args)) => policy_check(&args),
        Command::Bench(command) => bench(command),
        Command::Policy(PolicyCommand::Explain(args)) => {
            return match policy_explain(args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(2),
                Err(e) => {
                    eprintln!("wsgate: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config from the file and `WSGATE_*` variables (not yet
/// validated: flags may still apply); reports the variables that were
/// skipped because they name no section.
fn load_config(args: &ConfigArgs) -> Result<(Config, Vec<String>), BoxError> {
    let file = args
        .config
        .clone()
        .or_else(|| std::env::var_os("WSGATE_CONFIG").map(PathBuf::from));
    // `vars()` panics on a non-UTF-8 variable; such a variable is not ours.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    Ok(Config::load_reporting(file.as_deref(), env)?)
}

fn check_config(args: &ConfigArgs) -> Result<(), BoxError> {
    let (config, ignored) = load_config(args)?;
    config.validate()?;
    for name in ignored {
        println!("note: {name} names no configuration section; ignored");
    }
    let verifier = wsgate::auth::Verifier::from_config(&config)?;
    // A JWKS URL is fetched as `serve` would, so an unreachable one shows here.
    block_on(verifier.prime())??;
    let certs = wsgate::server::tls::CertStore::load(&config.tls)?;
    wsgate::server::tls::server_config(&config.tls, certs)?;
    let policies = wsgate::policy::PolicySet::load_dir(&config.policy.dir)?;
    println!(
        "configuration is valid ({} policy rules from {})",
        policies.rules.len(),
        config.policy.dir.display()
    );
    Ok(())
}

/// Runs one future to completion on a small runtime, for the commands
/// that are otherwise synchronous (a JWKS fetch needs I/O and timers).
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(future))
}

/// Prints one line per finding and a count; `Ok(false)` when any is an error.
fn doctor(args: &ConfigArgs) -> Result<bool, BoxError> {
    use wsgate::doctor::{self, Level};
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

fn bench(command: BenchCommand) -> Result<(), BoxError> {
    use wsgate::bench::{self, Auth, Pace, Target};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let target = |t: &BenchTarget, n: usize| {
            let auth = match (&t.secret, &t.token) {
                (Some(path), _) => bench::secret_from_file(path).map(Auth::Secret),
                (None, Some(token)) => Ok(Auth::Token(token.clone())),
                (None, None) => Err(bench::BenchError::Setup("--secret or --token".into())),
            };
            let sources = if t.sources == 0 {
                n / 25_000 + 1
            } else {
                t.sources
            };
            let (url, ca, header, plain) =
                (t.url.clone(), t.ca.clone(), t.carrier == "header", t.plain);
            async move { Target::new(&url, &ca, auth?, header, plain, sources).await }
        };
        let line = match command {
            BenchCommand::Idle {
                target: t,
                connections,
                concurrency,
                hold,
                server_pid,
            } => {
                let target = target(&t, connections).await?;
                let report = bench::idle(
                    &target,
                    connections,
                    concurrency,
                    Duration::from_secs(hold),
                    server_pid,
                )
                .await;
                serde_json::to_string(&report)?
            }
            BenchCommand::Fanout {
                target: t,
                subscribers,
                size,
                window,
                rate,
                duration,
                warmup,
                channel,
                publish_url,
            } => {
                let subscribers_at = target(&t, subscribers).await?;
                let publisher = match publish_url {
                    Some(url) => Some(
                        target(
                            &BenchTarget {
                                url,
                                ca: t.ca.clone(),
                                secret: t.secret.clone(),
                                token: t.token.clone(),
                                carrier: t.carrier.clone(),
                                plain: t.plain,
                                sources: t.sources,
                            },
                            1,
                        )
                        .await?,
                    ),
                    None => None,
                };
                let pace = match (window, rate) {
                    (Some(w), _) => Pace::Window(w),
                    (None, Some(r)) => Pace::Rate(r),
                    (None, None) => Pace::Window(1),
                };
                let report = bench::fanout(
                    &subscribers_at,
                    publisher.as_ref(),
                    subscribers,
                    size,
                    pace,
                    Duration::from_secs(duration),
                    Duration::from_secs(warmup),
                    &channel,
                )
                .await?;
                serde_json::to_string(&report)?
            }
            BenchCommand::Connect {
                target: t,
                connections,
                concurrency,
            } => {
                let target = target(&t, connections).await?;
                serde_json::to_string(&bench::connect(&target, connections, concurrency).await)?
            }
        };
        println!("{line}");
        Ok::<(), BoxError>(())
    })
}

fn policy_dir(args: &PolicyDirArgs) -> Result<(Config, PathBuf), BoxError> {
    let (config, _) = load_config(&args.config)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| config.policy.dir.clone());
    Ok((config, dir))
}

fn policy_check(args: &PolicyDirArgs) -> Result<(), BoxError> {
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
fn policy_explain(args: ExplainArgs) -> Result<bool, BoxError> {
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
            let verifier = wsgate::auth::Verifier::from_config(&config)?;
            block_on(verifier.prime())??;
            verifier
                .verify(&token)
                .map_err(|e| format!("token refused: {e}"))?
        }
        None => Identity {
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

fn run_certs(args: &CertsArgs) -> Result<(), BoxError> {
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

fn token(args: TokenArgs) -> Result<(), BoxError> {
    let (config, _) = load_config(&args.config)?;
    config.validate()?;
    let request = TokenRequest {
        sub: args.sub,
        roles: args.roles,
        ttl: args.ttl,
        claims: args.claims.into_iter().collect::<Map<_, _>>(),
        kid: args.kid,
    };
    println!("{}", mint::mint(&config, &request, args.key.as_deref())?);
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), BoxError> {
    let (mut config, ignored) = load_config(&args.config)?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(level) = args.log_level {
        config.log.level = level;
    }
    if let Some(format) = args.log_format {
        config.log.format = if format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    config.validate()?;
    init_logging(&config)?;
    for name in ignored {
        info!(variable = %name, "environment variable names no configuration section; ignored");
    }
    if args.dev {
        prepare_dev(&config)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut server = wsgate::Server::bind(config.clone()).await?;
        if args.dev {
            server = server.with_dev_endpoints();
            if !config.server.listen.ip().is_loopback() {
                warn!(addr = %config.server.listen, "--dev serves /dev/token, which mints tokens for anyone: keep it on loopback");
            }
        }
        let addr = server.local_addr()?;
        info!(%addr, "listening");
        if let Some(admin) = server.admin_addr() {
            info!(addr = %admin, "admin listener (plain HTTP: /metrics, /healthz, /readyz)");
        }
        if args.dev {
            print_dev_banner(&config, addr)?;
        }
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone(), server.handle()));
        tokio::spawn(reload_on_sighup(server.handle()));
        server.run(stop).await;
        Ok::<(), BoxError>(())
    })
}

fn init_logging(config: &Config) -> Result<(), BoxError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
}

/// Creates what `serve --dev` needs and is missing: the dev certificate
/// (signed by the dev CA beside it), the HMAC secret, the default policy.
fn prepare_dev(config: &Config) -> Result<(), BoxError> {
    let tls = &config.tls;
    if !tls.cert_file.exists() || !tls.key_file.exists() {
        let paths = CertPaths::for_server(&tls.cert_file, &tls.key_file);
        // A lone certificate or key is useless: replace it, keeping the CA.
        certs::generate(&paths, &[], Replace::Server)?;
        info!(cert = %tls.cert_file.display(), ca = %paths.ca_cert.display(), "created development certificate");
    }
    let policy_dir = &config.policy.dir;
    if !policy_dir.exists() {
        std::fs::create_dir_all(policy_dir)?;
        std::fs::write(
            policy_dir.join("default.toml"),
            wsgate::policy::DEFAULT_POLICY,
        )?;
        info!(dir = %policy_dir.display(), "created the default policy");
    }
    if config.algorithms()?[0].family() == jsonwebtoken::AlgorithmFamily::Hmac
        && mint::ensure_dev_secret(&config.auth.hmac_secret_file)?
    {
        info!(file = %config.auth.hmac_secret_file.display(), "created development HMAC secret");
    }
    Ok(())
}

fn print_dev_banner(config: &Config, addr: std::net::SocketAddr) -> Result<(), BoxError> {
    let request = TokenRequest {
        sub: "dev".into(),
        roles: vec!["member".into()],
        ttl: Duration::from_secs(24 * 3600),
        claims: Map::new(),
        kid: None,
    };
    let token = mint::mint(config, &request, None)?;
    let host = if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        "localhost".to_owned()
    } else {
        addr.ip().to_string()
    };
    let port = addr.port();
    let ca = CertPaths::for_server(&config.tls.cert_file, &config.tls.key_file).ca_cert;
    println!(
        "\nwsgate is running (development mode)\n\
         \x20 demo chat: https://{host}:{port}/\n\
         \x20 WebSocket: wss://{host}:{port}/ws\n\
         \x20 health:    https://{host}:{port}/healthz\n\
         \x20 dev CA:    {ca}\n\n\
         A token for user \"dev\" (role member, valid 24 h):\n\n{token}\n\n\
         Try it:\n\
         \x20 TOKEN=$(cargo run -q -- token --sub alice --role member)\n\
         \x20 curl --cacert {ca} https://{host}:{port}/healthz\n",
        ca = ca.display()
    );
    if !ca.exists() {
        warn!(ca = %ca.display(), "the dev CA is not where the certificate was expected");
    }
    Ok(())
}

/// SIGHUP re-reads the policies, the certificate and the verification
/// keys (errors are logged; what was in force stays).
async fn reload_on_sighup(handle: wsgate::server::ServerHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!(
                "cannot listen for SIGHUP; policies, certificates and keys reload on file changes only"
            );
            return;
        };
        while hup.recv().await.is_some() {
            let _ = handle.reload_policies();
            let _ = handle.reload_certs();
            let _ = handle.reload_keys().await;
        }
    }
    #[cfg(not(unix))]
    let _ = handle;
}

/// The first SIGTERM or Ctrl-C starts the drain; a second one skips the
/// rest of the grace and the drain window.
async fn stop_on_signal(stop: CancellationToken, handle: wsgate::server::ServerHandle) {
    shutdown_signal().await;
    info!("shutting down (a second signal closes every session now)");
    stop.cancel();
    shutdown_signal().await;
    info!("second signal: closing every session now");
    handle.hurry();
}

/// The next SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
