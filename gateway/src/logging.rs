//! Logs through tracing: readable lines by default, one JSON object per line on request.

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
        .with_writer(std::io::stderr);
    let _ = match c.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_target(true).try_init(),
    };
}
