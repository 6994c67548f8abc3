use clap::Parser;

fn main() {
    vdbfs::logging::init();
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
