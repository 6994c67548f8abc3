fn main() {
    std::process::exit(vdbfs::cli::main());
}
