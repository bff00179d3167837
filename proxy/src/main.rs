fn main() {
    std::process::exit(berth_proxy::cli::main());
}
