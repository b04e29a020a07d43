//! Logs through tracing: readable lines by default, one JSON object per line on request.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// RUST_LOG, when set, wins over `log.level`, so an operator can turn on debug without editing.
pub fn init(c: &LogConfig) {
    // rustls warns once per handshake about clients that send an address as SNI (load tools,
    // some scanners): noise at the edge, kept to errors unless the level names rustls itself.
    let level = if c.level.contains("rustls") {
        c.level.clone()
    } else {
        format!("{},rustls=error", c.level)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ));
    let _ = match c.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_target(true).try_init(),
    };
}

/// Colour is for a person at a terminal: journald, `kubectl logs` and log files keep escape codes
/// as literal bytes that every search and parser then trips over. NO_COLOR set to anything but
/// the empty string turns it off everywhere (no-color.org).
fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.map_or(true, OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_and_never_under_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, Some(OsStr::new("1"))));
        // An empty NO_COLOR does not count as set.
        assert!(colour(true, Some(OsStr::new(""))));
    }
}
