//! `signet-ca`: parse flags, set up logging, serve. Exit 64 on bad configuration.

use std::process::ExitCode;

use clap::Parser;
use signet_ca::cli::config::{Cli, Command};

/// sysexits' EX_USAGE: bad flags or flag values.
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
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    signet_telemetry::init_logging(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();

    match cli.command {
        Command::Pki(command) => report(signet_ca::cli::pki::run(
            command,
            time::OffsetDateTime::now_utc(),
        )),
        Command::Rotation(command) => {
            let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let now = time::OffsetDateTime::now_utc();
            report(runtime.block_on(signet_ca::rotation::flags::run(command, now)))
        }
        Command::Serve(args) => {
            let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
            let (check_only, flags_only) = (args.check_config, args.check_flags);
            let config = match args.validate(in_cluster) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if flags_only {
                println!("signet-ca serve: the flags are valid");
                return ExitCode::SUCCESS;
            }
            let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
                Ok(r) => r,
                Err(code) => return code,
            };
            if check_only {
                let now = time::OffsetDateTime::now_utc();
                return match runtime.block_on(signet_ca::cli::check::check(&config, now)) {
                    Ok(seen) => {
                        for line in seen {
                            println!("ok: {line}");
                        }
                        println!("signet-ca serve: the configuration is valid");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {}", signet_telemetry::error_chain(&e));
                        ExitCode::from(EX_USAGE)
                    }
                };
            }
            let result = runtime.block_on(async {
                let listeners = signet_ca::server::Listeners {
                    grpc: listen(config.grpc_addr).await?,
                    http: listen(config.http_addr).await?,
                    oidc: match config.jwt.as_ref().and_then(|j| j.oidc.as_ref()) {
                        Some(oidc) => Some(listen(oidc.addr).await?),
                        None => None,
                    },
                };
                signet_ca::server::run(config, listeners, shutdown_signal())
                    .await
                    .map_err(anyhow::Error::from)
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Once, through the log (stderr, in the chosen format).
                    tracing::error!(
                        "cannot serve: {}",
                        signet_telemetry::error_chain(e.as_ref())
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A subcommand's outcome: its report on stdout, or its error on stderr.
fn report<E: std::error::Error + 'static>(result: Result<String, E>) -> ExitCode {
    match result {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", signet_telemetry::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The async runtime `builder` makes, or the exit code when it cannot be made.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// A listener at `addr`; `[::]` falls back to IPv4 where the kernel has no IPv6.
async fn listen(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let (listener, fallback) = signet_flags::bind_listener(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    if let Some(warning) = fallback {
        tracing::warn!("{warning}");
    }
    Ok(listener)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
