//! The `wsgate` command line: parses the arguments and dispatches to the
//! command bodies in `wsgate::tools`; nothing else lives here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use wsgate::tools::bench::cli::{self as bench, BenchCommand};
use wsgate::tools::cli::{self, CertsArgs, ConfigArgs, PolicyCommand, TokenArgs};
use wsgate::tools::serve::{self, ServeArgs};

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Certs(args) => cli::run_certs(&args),
        Command::Token(args) => cli::token(args),
        Command::CheckConfig(args) => cli::check_config(&args),
        Command::Doctor(args) => {
            return match cli::doctor(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("wsgate: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Policy(PolicyCommand::Check(args)) => cli::policy_check(&args),
        Command::Bench(command) => bench::run(command),
        Command::Policy(PolicyCommand::Explain(args)) => {
            return match cli::policy_explain(args) {
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
