//! What a Sigil process does at its edges, the same in the server and the
//! agent: the signals that stop it, and its logging (the `[log]` config
//! section, the `--log-*` flags' values, and installing the subscriber).

use std::future::Future;

use serde::Deserialize;
use tracing::warn;
use tracing_subscriber::EnvFilter;

/// A future that resolves on the first SIGINT (Ctrl-C) or SIGTERM: the
/// usual `shutdown` for `run`. The handlers are installed by this call,
/// not on the first poll, so a signal arriving in between is not lost.
/// Must be called inside the Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            (Ok(mut one), Err(e)) | (Err(e), Ok(mut one)) => {
                warn!(error = %e, "cannot handle one of SIGINT/SIGTERM");
                one.recv().await;
            }
            (Err(e), Err(_)) => {
                warn!(error = %e, "cannot handle SIGINT or SIGTERM; stop the process with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// `[log]`: the same keys, defaults and meaning in the server and the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `error`, `warn`, `info`, `debug` or `trace` (or an env-filter string).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why logging could not be installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error(
        "invalid log level {level:?} (use error, warn, info, debug, trace or an env-filter string): {reason}"
    )]
    Level { level: String, reason: String },
    #[error("invalid log target {target:?}: {reason}")]
    Target { target: String, reason: String },
    #[error("a logger is already installed in this process: {0}")]
    Installed(String),
}

/// Installs the process's logger: lines to stderr at `log.level`, in
/// `log.format`, with colours only on a terminal. Each target in
/// `always_info` is logged at `info` whatever the level (the server's audit
/// lines). Call once, before anything logs.
pub fn install_logging(log: &LogSection, always_info: &[&str]) -> Result<(), LogError> {
    let mut filter = EnvFilter::try_new(&log.level).map_err(|e| LogError::Level {
        level: log.level.clone(),
        reason: e.to_string(),
    })?;
    for target in always_info {
        let directive = format!("{target}=info").parse().map_err(
            |e: tracing_subscriber::filter::ParseError| LogError::Target {
                target: (*target).to_owned(),
                reason: e.to_string(),
            },
        )?;
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| LogError::Installed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        #[serde(default)]
        log: LogSection,
    }

    fn parse(toml: &str) -> Result<LogSection, String> {
        toml::from_str::<File>(toml)
            .map(|f| f.log)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn log_section_keys_defaults_and_errors() {
        let default = parse("").unwrap();
        assert_eq!(
            (default.level.as_str(), default.format),
            ("info", LogFormat::Text)
        );
        let set = parse("[log]\nlevel = \"debug\"\nformat = \"json\"\n").unwrap();
        assert_eq!((set.level.as_str(), set.format), ("debug", LogFormat::Json));
        let only_format = parse("[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(only_format.level, "info");
        let err = parse("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.contains("unknown variant `xml`"), "{err}");
        let err = parse("[log]\nlevl = \"debug\"\n").unwrap_err();
        assert!(err.contains("unknown field `levl`"), "{err}");
    }

    #[test]
    fn a_bad_level_is_refused_before_installing() {
        let log = LogSection {
            level: "info,=[".into(),
            format: LogFormat::Text,
        };
        let err = install_logging(&log, &[]).unwrap_err();
        assert!(matches!(err, LogError::Level { .. }), "{err}");
    }
}
