//! `sigil-agent`: parse flags, load config, install logging, run.

#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use clap::Parser;
use sigil_agent::config::AgentConfig;
use sigil_agent::workload_api;
use sigil_proto::process::install_logging;

async fn run(args: cli::RunArgs) -> anyhow::Result<()> {
    let mut config = AgentConfig::load(&args.config)?;
    if let Some(level) = args.log_level {
        config.log.level = level;
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    install_logging(&config.log, &[])?;
    let listener = workload_api::bind(&config.socket_path)?;
    sigil_agent::run(config, listener, sigil_agent::shutdown_signal()).await?;
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
    let socket = cli::socket_path(cli.socket.as_deref());
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            command => cli::run_client(command, &socket, cli.output).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
