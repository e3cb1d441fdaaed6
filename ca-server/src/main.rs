//! `sigil-server`: parse flags, load config, install logging, bind, run.

mod cli;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use anyhow::Context;
use clap::Parser;
use sigil_proto::process::install_logging;
use sigil_server::config::{Overrides, ServerConfig};
use sigil_server::server::{self, Listeners};

async fn run(args: cli::RunArgs, admin_socket: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let overrides = Overrides {
        trust_domain: args.trust_domain,
        data_dir: args.data_dir,
        bind_address: args.bind,
        admin_socket,
        log_level: args.log_level,
        log_format: args.log_format,
        server_id: args.server_id,
    };
    let config = ServerConfig::load(args.config.as_deref(), overrides)?;
    // Audit lines are always written, whatever the configured level.
    install_logging(&config.log, &[sigil_server::audit::LOG_TARGET])?;
    let node = tokio::net::TcpListener::bind(config.server.bind_address)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the node API",
                config.server.bind_address
            )
        })?;
    let admin = sigil_server::admin_api::bind_socket(&config.server.admin_socket)?;
    server::run(config, Listeners { node, admin }, server::shutdown_signal()).await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = cli::admin_target(&cli);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args, cli.admin_socket).await,
            command => cli::run_client(command, &target?, cli.output).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `entry plan` found changes: its plan is the output.
        Err(e) if e.is::<cli::PlanHasChanges>() => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
