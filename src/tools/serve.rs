//! `wsgate serve`: the configuration with its flags, logging, what
//! `--dev` creates and prints, signals (drain, hurry, reload) and the
//! server's run.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use serde_json::Map;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::certs::{self, CertPaths, Replace};
use super::cli::{BoxError, ConfigArgs, load_config};
use crate::auth::mint::{self, TokenRequest};
use crate::config::{Config, LogFormat};
use crate::server::{DevEndpoints, Server, ServerHandle};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Create missing dev certificates and secret, and print a ready token.
    /// Serves `/dev/token` to loopback peers; refused on an address other
    /// than loopback unless `--dev-token-for-anyone`.
    #[arg(long)]
    pub dev: bool,
    /// With `--dev` on an address other than loopback: let `/dev/token`
    /// mint tokens with any role (admin included) for anyone who reaches
    /// the port. Only on a network you trust entirely.
    #[arg(long, requires = "dev")]
    pub dev_token_for_anyone: bool,
    /// Listen address, e.g. 127.0.0.1:8443 (overrides server.listen).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Log filter, e.g. info or wsgate=debug (overrides log.level).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format (overrides log.format).
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

pub fn serve(args: ServeArgs) -> Result<(), BoxError> {
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
    if args.dev {
        // On loopback (see below), metrics on the one listener are handy.
        config.server.public_metrics = true;
    }
    if args.dev && config.api.listen.is_none() {
        // The HTTP API on loopback: 8444 beside the default 8443, else
        // any free port (printed below), so a --listen of its own never
        // collides.
        let port = if config.server.listen.port() == 8443 {
            8444
        } else {
            0
        };
        config.api.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    config.validate()?;
    let dev_to = dev_endpoints(args.dev, args.dev_token_for_anyone, config.server.listen)?;
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
        let mut server = Server::bind(config.clone()).await?;
        server = server.with_dev_endpoints(dev_to);
        if dev_to == DevEndpoints::Anyone {
            warn!(addr = %config.server.listen, "--dev-token-for-anyone: /dev/token mints tokens with any role for anyone who reaches this port");
        }
        let addr = server.local_addr()?;
        info!(%addr, "listening");
        if let Some(admin) = server.admin_addr() {
            info!(addr = %admin, "admin listener (plain HTTP: /metrics, /healthz, /readyz)");
        }
        let api = server.api_addr();
        if let Some(api) = api {
            info!(addr = %api, "HTTP API listener");
        }
        if args.dev {
            print_dev_banner(&config, addr, api)?;
        }
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone(), server.handle()));
        tokio::spawn(reload_on_sighup(server.handle()));
        server.run(stop).await;
        Ok::<(), BoxError>(())
    })
}

/// Who `/dev/token` answers: nobody without `--dev`; loopback peers with
/// it; anyone only when asked by name.
///
/// # Errors
/// `--dev` on an address other than loopback without
/// `--dev-token-for-anyone`.
fn dev_endpoints(
    dev: bool,
    for_anyone: bool,
    listen: std::net::SocketAddr,
) -> Result<DevEndpoints, BoxError> {
    if !dev {
        return Ok(DevEndpoints::Off);
    }
    if for_anyone {
        return Ok(DevEndpoints::Anyone);
    }
    if !listen.ip().is_loopback() {
        return Err(format!(
            "refusing --dev on {listen}: it serves /dev/token, which mints tokens with any role \
             (admin included) for whoever asks; listen on a loopback address (127.0.0.1, [::1]), \
             or add --dev-token-for-anyone to expose exactly that"
        )
        .into());
    }
    Ok(DevEndpoints::Loopback)
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
            crate::policy::DEFAULT_POLICY,
        )?;
        info!(dir = %policy_dir.display(), "created the default policy");
    }
    if config.algorithms()?[0].family() == jsonwebtoken::AlgorithmFamily::Hmac
        && certs::ensure_dev_secret(&config.auth.hmac_secret_file)?
    {
        info!(file = %config.auth.hmac_secret_file.display(), "created development HMAC secret");
    }
    Ok(())
}

fn print_dev_banner(
    config: &Config,
    addr: std::net::SocketAddr,
    api: Option<std::net::SocketAddr>,
) -> Result<(), BoxError> {
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
    if let Some(api) = api {
        // A service token: the API audience, allowed what a member is.
        let mut claims = Map::new();
        claims.insert("aud".into(), config.api.audience.clone().into());
        let request = TokenRequest {
            sub: "dev-service".into(),
            roles: vec!["member".into()],
            ttl: Duration::from_secs(24 * 3600),
            claims,
            kid: None,
        };
        let api_token = mint::mint(config, &request, None)?;
        let scheme = if config.api.plain_http {
            "http"
        } else {
            "https"
        };
        println!(
            "HTTP API: {scheme}://{host}:{port}/api\n\n\
             A service token for the API (sub dev-service, aud {aud}, valid 24 h), and a publish:\n\n\
             \x20 API_TOKEN={api_token}\n\
             \x20 curl --cacert {ca} -H \"Authorization: Bearer $API_TOKEN\" \\\n\
             \x20   -d '{{\"channel\":\"chat:lobby\",\"data\":{{\"text\":\"hello from curl\"}}}}' \\\n\
             \x20   {scheme}://{host}:{port}/api/publish\n",
            port = api.port(),
            aud = config.api.audience,
            ca = ca.display()
        );
    }
    if !ca.exists() {
        warn!(ca = %ca.display(), "the dev CA is not where the certificate was expected");
    }
    Ok(())
}

/// SIGHUP re-reads the policies, the certificate and the verification
/// keys (errors are logged; what was in force stays).
async fn reload_on_sighup(handle: ServerHandle) {
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
async fn stop_on_signal(stop: CancellationToken, handle: ServerHandle) {
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
