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
    let _ = rustls::crypto::ring::default_provider().install_default();
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
            let result: anyhow::Result<()> = runtime.block_on(async {
                let socket = signet_agent::sds::bind(&config.socket)?;
                let http = bind_http(config.http_addr).await?;
                signet_agent::server::run(config, socket, http, shutdown_signal()).await?;
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
            match runtime.block_on(signet_agent::inspect::inspect(
                args.socket,
                args.names,
                args.timeout,
                0.5,
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

/// The HTTP listener. `[::]` (the default) takes IPv4 and IPv6; where the kernel has
/// no IPv6 at all it cannot be bound, and `0.0.0.0` on the same port is, with a
/// warning.
async fn bind_http(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && e.kind() != std::io::ErrorKind::AddrInUse =>
        {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            tracing::warn!(error = %e, "cannot listen on {addr}; listening on {v4} (IPv4 only)");
            tokio::net::TcpListener::bind(v4)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} or {v4}: {e}"))
        }
        Err(e) => Err(anyhow::anyhow!("cannot listen on {addr}: {e}")),
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
