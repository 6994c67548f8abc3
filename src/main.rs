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
    if let Err(e) = vdbfs::cli::run(cli) {
        eprintln!("vdbfs: error: {e:#}");
        std::process::exit(1);
    }
}
