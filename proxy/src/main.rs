/// mimalloc rather than glibc's malloc. A cached manifest costs Pingora and berth about
/// sixty allocations; glibc spent about a fifth of the request's instructions in malloc
/// and free, and its arena locks are contended when tasks move between threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(berth_proxy::cli::main());
}
