use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VDBFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = vdbfs::cli::Cli::parse();
    if !matches!(cli.cmd, vdbfs::cli::Cmd::Serve { .. }) {
        // A CLI whose output is piped into `head` ends quietly, like other Unix tools. Never
        // for the daemon: a client hanging up must not kill it.
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = vdbfs::cli::run(cli) {
        eprintln!("vdbfs: error: {e:#}");
        std::process::exit(vdbfs::cli::exit_code(&e));
    }
}
