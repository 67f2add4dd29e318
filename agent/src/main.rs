//! `signet-agent`: parse flags, set up logging, run or inspect. Exit 64 on bad
//! configuration.

use std::process::ExitCode;

use clap::Parser;
use signet_agent::config::{Cli, Command};

/// sysexits' EX_USAGE.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // clap's whole message: the problem, a similar flag or the accepted
            // values where it knows them, the usage line and where help is.
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    signet_telemetry::init_logging(cli.log_format);
    // One identity is light work: a single-threaded runtime keeps the agent small
    // (one stack, one malloc arena). RSA key generation runs on a blocking thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            let config = match args.validate(std::env::vars()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            // The CA client's TLS (tonic takes the process default): X25519MLKEM768
            // offered first, and what COMPLIANCE_POLICY allows.
            if signet_tls::provider(config.ca.compliance_policy)
                .install_default()
                .is_err()
            {
                eprintln!("error: a TLS provider was installed before COMPLIANCE_POLICY's");
                return ExitCode::FAILURE;
            }
            let result: anyhow::Result<()> = runtime.block_on(async {
                let socket = signet_agent::sds::bind(&config.socket)?;
                let (http, fallback) = signet_flags::bind_listener(config.http_addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.http_addr))?;
                if let Some(warning) = fallback {
                    tracing::warn!("{warning}");
                }
                let workload_api = match &config.workload_api_socket {
                    Some(path) => Some(signet_agent::sds::bind_as(path, "Workload API socket")?),
                    None => None,
                };
                let listeners = signet_agent::server::Listeners {
                    sds: socket,
                    http,
                    workload_api,
                };
                signet_agent::server::run(config, listeners, shutdown_signal()).await?;
                Ok(())
            });
            if let Err(e) = result {
                // Once, through the log (stderr, in the chosen format).
                tracing::error!("cannot run: {}", signet_telemetry::error_chain(e.as_ref()));
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Inspect(args) => {
            // The HTTP client asking the agent at /trust builds its TLS support from
            // the process default even for plain HTTP.
            let _ = rustls::crypto::ring::default_provider().install_default();
            match runtime.block_on(signet_agent::inspect::inspect(
                args.socket,
                args.names,
                args.timeout,
                0.5,
                args.agent_addr,
            )) {
                Ok(secrets) if args.json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&secrets).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(secrets) => {
                    print!("{}", signet_agent::inspect::render_text(&secrets));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}", signet_telemetry::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
