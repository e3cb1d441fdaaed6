//! How the `sigil-server` and `sigil-agent` command lines print API
//! replies (`--output text|json`). One JSON style for both: one compact
//! JSON value per line, so a stream (`api watch`) and a one-shot command
//! read the same way, line by line or with `jq`.

use std::fmt::Display;

use serde_json::Value;

/// The `--output` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// For programs: one JSON value per line.
    Json,
}

impl Output {
    /// Whether JSON was asked for.
    pub fn is_json(self) -> bool {
        self == Output::Json
    }

    /// Prints `value` (JSON) or `text` as it is (text callers end their
    /// lines themselves).
    pub fn print(self, value: &Value, text: impl Display) {
        match self {
            Output::Json => print_json(value),
            Output::Text => print!("{text}"),
        }
    }
}

/// Prints `value` as one line of compact JSON.
pub fn print_json(value: &Value) {
    println!("{value}");
}
