//! Logging: `tracing` to stderr (text, or JSON lines for `serve --log-format json`), filtered by
//! `VDBFS_LOG` or `RUST_LOG` (default `info,fuser=error`), with the `log` records of libraries
//! (fuser) forwarded into it.
//!
//! One record changes level on the way: fuser logs "Failed to send FUSE reply: No such file or
//! directory" as an error when the kernel no longer waits for a reply, which is what happens to
//! a request whose caller was interrupted (a signal, a killed process). That is not a fault, so
//! it is logged at debug (`VDBFS_LOG=fuser=debug` shows it).

use tracing_subscriber::EnvFilter;

/// Sets up logging for this process (once, first thing in `main`): the filter from `VDBFS_LOG`,
/// else `RUST_LOG`, else `info,fuser=error`; lines as text, or as JSON objects with `json`.
pub fn init(json: bool) {
    const DEFAULT: &str = "info,fuser=error";
    let (var, value) = match (std::env::var("VDBFS_LOG"), std::env::var("RUST_LOG")) {
        (Ok(v), _) if !v.is_empty() => ("VDBFS_LOG", v),
        (_, Ok(v)) if !v.is_empty() => ("RUST_LOG", v),
        _ => ("", DEFAULT.to_string()),
    };
    let filter = EnvFilter::try_new(&value).unwrap_or_else(|e| {
        eprintln!("vdbfs: warning: {var}={value:?} is not a log filter ({e}); logging at info");
        EnvFilter::new(DEFAULT)
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if json {
        tracing::subscriber::set_global_default(builder.json().flatten_event(true).finish())
    } else {
        tracing::subscriber::set_global_default(
            builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .finish(),
        )
    };
    if installed.is_err() {
        return;
    }
    if log::set_boxed_logger(Box::new(Bridge)).is_ok() {
        log::set_max_level(match tracing::level_filters::LevelFilter::current() {
            tracing::level_filters::LevelFilter::OFF => log::LevelFilter::Off,
            tracing::level_filters::LevelFilter::ERROR => log::LevelFilter::Error,
            tracing::level_filters::LevelFilter::WARN => log::LevelFilter::Warn,
            tracing::level_filters::LevelFilter::INFO => log::LevelFilter::Info,
            tracing::level_filters::LevelFilter::DEBUG => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        });
    }
}

/// The level a `log` record is logged at (see the module docs).
pub fn level_for(target: &str, level: log::Level, message: &str) -> log::Level {
    let interrupted = target.starts_with("fuser::reply")
        && level == log::Level::Error
        && message.starts_with("Failed to send FUSE reply")
        && message.contains("(os error 2)");
    if interrupted {
        log::Level::Debug
    } else {
        level
    }
}

/// Forwards `log` records to `tracing` (where the filter decides), at [`level_for`].
struct Bridge;

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() != log::Level::Error || !record.target().starts_with("fuser::reply") {
            let _ = tracing_log::format_trace(record);
            return;
        }
        let message = record.args().to_string();
        let level = level_for(record.target(), record.level(), &message);
        if level == record.level() {
            let _ = tracing_log::format_trace(record);
            return;
        }
        let _ = tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("{message} (the request was interrupted)"))
                .level(level)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_to_an_interrupted_request_is_not_an_error() {
        let msg = "Failed to send FUSE reply: No such file or directory (os error 2)";
        assert_eq!(
            level_for("fuser::reply", log::Level::Error, msg),
            log::Level::Debug
        );
        // Every other failure to reply stays an error.
        let other = "Failed to send FUSE reply: Broken pipe (os error 32)";
        assert_eq!(
            level_for("fuser::reply", log::Level::Error, other),
            log::Level::Error
        );
        assert_eq!(
            level_for("fuser::session", log::Level::Error, msg),
            log::Level::Error
        );
        assert_eq!(
            level_for("fuser::reply", log::Level::Warn, "Reply not sent"),
            log::Level::Warn
        );
    }
}
