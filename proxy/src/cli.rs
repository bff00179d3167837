//! The `berth` command line.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;

use berth_cache::clock::Clock;
use berth_cache::Cache;
use berth_config::{Config, DEFAULT_CONFIG};
use berth_registry::Registry;
use berth_store::Store;

use crate::access_log::AccessLog;
use crate::drain::{Drain, InFlight};
use crate::metrics::Metrics;
use crate::private::Maintenance;
use crate::server::App;

const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(24 * 3600);
pub(crate) const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

/// berth: a pull-through caching proxy for OCI container images.
///
/// Point containerd, k3s or minikube's registry mirror configuration at it; it serves
/// `/v2/<registry>/<repository>/…` and containerd's `/v2/<repository>/…?ns=<registry>`
/// from its local store, fetching what it lacks from the upstreams in its configuration.
/// `berth` alone is `berth serve` with the embedded default configuration.
#[derive(Parser, Debug)]
#[command(name = "berth", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the registry API (the default).
    Serve(ServeArgs),
    /// Validate a configuration file and print every problem with its path.
    Check {
        /// The configuration file (TOML) to validate.
        file: PathBuf,
    },
    /// Remove private content nothing references any more: blobs no manifest of their
    /// repository references (and that are older than --grace), then blob files no
    /// repository links and the pull-through cache does not index. Run it while berth is
    /// stopped: the store allows one process at a time.
    Gc {
        /// Store directory. Default as for `serve`.
        #[arg(long, env = "BERTH_STORE")]
        store: Option<PathBuf>,
        /// Keep content younger than this: a push uploads its blobs before the manifest
        /// that references them.
        #[arg(long, default_value = "1h")]
        grace: String,
    },
    /// Print, or install with --write, a container runtime's configuration for pulling
    /// every upstream of berth's configuration through berth.
    NodeConfig(NodeConfigArgs),
}

#[derive(Args, Debug)]
struct NodeConfigArgs {
    /// The runtime: containerd (certs.d hosts.toml files), k3s (registries.yaml),
    /// minikube (its file-sync folder, and the --registry-mirror flag) or docker
    /// (daemon.json).
    #[arg(value_enum)]
    runtime: crate::node_config::Runtime,
    /// berth's configuration file. Default: the embedded configuration.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// berth's URL as the runtime reaches it. Default: [server] external_url, else the
    /// listen address (127.0.0.1 for 0.0.0.0); for minikube, host.minikube.internal.
    #[arg(long)]
    url: Option<String>,
    /// The CA certificate (PEM) the runtime checks an https:// berth with.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A file holding the node's credential for berth, one `user:secret` line (a user of
    /// the htpasswd file, or an API key as the secret). Written into the runtime's
    /// configuration, which is then readable by its owner only.
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Install into this folder (containerd: its certs.d, such as
    /// /etc/containerd/certs.d; k3s: /etc/rancher/k3s; minikube: ~/.minikube/files;
    /// docker: /etc/docker), keeping what was there as <file>.berth-backup.
    #[arg(long)]
    write: Option<PathBuf>,
    /// With --write: put back what berth replaced, and delete what it created.
    #[arg(long, requires = "write")]
    remove: bool,
    /// containerd's config.toml, checked for the registry config_path the mirrors need.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// Configuration file (TOML). Default: the configuration embedded in the binary
    /// (the shipped upstreams.toml).
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on. Overrides `[server] listen`. Default 127.0.0.1:5000.
    #[arg(long, env = "BERTH_LISTEN")]
    listen: Option<String>,
    /// Store directory (blobs and metadata). Overrides `[server] store`. Default
    /// /var/lib/berth for root, otherwise $XDG_CACHE_HOME/berth or ~/.cache/berth.
    #[arg(long, env = "BERTH_STORE")]
    store: Option<PathBuf>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { file }) => check(&file),
        Some(Command::Gc { store, grace }) => gc(store, &grace),
        Some(Command::NodeConfig(args)) => node_config(args),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn check(file: &PathBuf) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return 2;
        }
    };
    match Config::parse(&text) {
        Ok(c) => {
            let retention = match c.retention.len() {
                0 => String::new(),
                n => format!(", {n} retention policies"),
            };
            println!(
                "{}: ok ({} upstreams{retention})",
                file.display(),
                c.upstreams.len()
            );
            0
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{}: {e}", file.display());
            }
            1
        }
    }
}

/// Reads berth's configuration: the file, or the embedded default. Returns its name too.
fn load_config(path: Option<&PathBuf>) -> Result<(String, Config), Vec<String>> {
    let (source, text) = match path {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => (path.display().to_string(), t),
            Err(e) => return Err(vec![format!("cannot read {}: {e}", path.display())]),
        },
        None => ("embedded default".to_owned(), DEFAULT_CONFIG.to_owned()),
    };
    match Config::parse(&text) {
        Ok(c) => Ok((source, c)),
        Err(errors) => Err(errors.0.iter().map(|e| format!("{source}: {e}")).collect()),
    }
}

fn node_config(args: NodeConfigArgs) -> i32 {
    use crate::node_config::{self as nc, Runtime};
    let fail = |e: &str| {
        eprintln!("berth node-config: {e}");
        2
    };
    let (_, config) = match load_config(args.config.as_ref()) {
        Ok(c) => c,
        Err(errors) => return fail(&errors.join("\n")),
    };
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| default_node_url(&config, args.runtime));
    let credentials = match &args.credentials_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match text.trim().split_once(':') {
                Some((user, secret)) if !user.is_empty() && !secret.is_empty() => {
                    Some((user.to_owned(), secret.to_owned()))
                }
                _ => {
                    return fail(&format!(
                        "{} must hold one line user:secret",
                        path.display()
                    ))
                }
            },
            Err(e) => return fail(&format!("cannot read {}: {e}", path.display())),
        },
    };
    let daemon_json = match (args.runtime, &args.write) {
        (Runtime::Docker, Some(dir)) => std::fs::read_to_string(dir.join("daemon.json")).ok(),
        _ => None,
    };
    let options = nc::Options {
        url,
        ca: args.ca.clone(),
        credentials,
        daemon_json,
    };
    let mut warnings = nc::warnings(args.runtime, &config, &options);
    if args.runtime == Runtime::Containerd {
        let text = std::fs::read_to_string(&args.containerd_config).ok();
        warnings.extend(nc::containerd_config_warnings(
            text.as_deref(),
            args.write.as_deref(),
        ));
    }
    let files = match nc::render(args.runtime, &config, &options) {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    for w in &warnings {
        eprintln!("berth node-config: warning: {w}");
    }
    let Some(dir) = &args.write else {
        for f in &files {
            println!("# {}\n{}", f.path.display(), f.contents);
        }
        if args.runtime == Runtime::Minikube {
            println!(
                "# minikube's Docker runtime: minikube start --registry-mirror={}",
                options.url
            );
        }
        return 0;
    };
    for f in &files {
        let result = if args.remove {
            nc::uninstall(dir, f)
        } else {
            nc::install(dir, f)
        };
        match result {
            Ok(change) => println!("{:?}: {}", change, dir.join(&f.path).display()),
            Err(e) => return fail(&e),
        }
    }
    0
}

/// berth's URL for a node's runtime when `--url` is not given.
fn default_node_url(config: &Config, runtime: crate::node_config::Runtime) -> String {
    if let Some(url) = &config.server.external_url {
        return url.clone();
    }
    let scheme = crate::auth::scheme(config);
    let listen = config
        .server
        .listen
        .as_deref()
        .unwrap_or(DEFAULT_LISTEN)
        .parse::<std::net::SocketAddr>()
        .unwrap_or_else(|_| DEFAULT_LISTEN.parse().expect("valid default"));
    let host = match runtime {
        crate::node_config::Runtime::Minikube => "host.minikube.internal".to_owned(),
        _ if listen.ip().is_unspecified() => "127.0.0.1".to_owned(),
        _ => match listen {
            std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
            std::net::SocketAddr::V4(a) => a.ip().to_string(),
        },
    };
    format!("{scheme}://{host}:{}", listen.port())
}

fn gc(store: Option<PathBuf>, grace: &str) -> i32 {
    init_logging();
    let grace = match berth_config::parse_duration(grace) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("berth gc: --grace: {e}");
            return 2;
        }
    };
    let dir = store.unwrap_or_else(default_store);
    let store = match Store::open(&dir) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!(
                "berth gc: cannot open the store at {} (is berth running on it?): {e}",
                dir.display()
            );
            return 2;
        }
    };
    let registry = Registry::new(store, berth_registry::Options::default());
    match registry.collect_garbage(grace) {
        Ok(r) => {
            println!(
                "berth gc: removed {} manifests, {} blob links and {} blobs ({} bytes)",
                r.manifests_removed, r.links_removed, r.blobs_removed, r.bytes_freed
            );
            for (repo, digest) in &r.unreadable_manifests {
                println!(
                    "berth gc: kept every blob of {repo}: its manifest {digest} cannot be read"
                );
            }
            0
        }
        Err(e) => {
            eprintln!("berth gc: {e}");
            1
        }
    }
}

fn default_store() -> PathBuf {
    let is_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::env::var("HOME").map(|h| h == "/root").unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/berth");
    }
    if let Ok(x) = std::env::var("XDG_CACHE_HOME") {
        if !x.is_empty() {
            return PathBuf::from(x).join("berth");
        }
    }
    match std::env::var("HOME") {
        Ok(h) => PathBuf::from(h).join(".cache/berth"),
        Err(_) => PathBuf::from("/var/lib/berth"),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn serve(args: ServeArgs) -> i32 {
    init_logging();
    let (source, config) = match load_config(args.config.as_ref()) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("berth: {e}");
            }
            return 2;
        }
    };
    let listen = args
        .listen
        .or_else(|| config.server.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let Ok(listen_addr) = listen.parse::<std::net::SocketAddr>() else {
        eprintln!("berth: --listen {listen:?} is not an address such as 127.0.0.1:5000");
        return 2;
    };
    let store_dir = args
        .store
        .or_else(|| config.server.store.clone())
        .unwrap_or_else(default_store);
    let drain = config.server.drain.unwrap_or(DEFAULT_DRAIN);
    let store = match Store::open(&store_dir) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!(
                "berth: cannot open the store at {}: {e}",
                store_dir.display()
            );
            return 2;
        }
    };
    let metrics = Arc::new(Metrics::new());
    let store_for_registry = store.clone();
    let mut registry_options = berth_registry::Options::default();
    if let Some(t) = config.server.upload_timeout {
        registry_options.upload_timeout = t;
    }
    if let Some(n) = config.server.max_upload_size {
        registry_options.max_upload_size = n;
    }
    let clock = Clock::from_env();
    let retention_clock = clock.clone();
    let cache = match Cache::new(&config, store, metrics.cache.clone(), clock.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: {e}");
            return 2;
        }
    };
    let upstreams: Vec<_> = config
        .upstreams
        .iter()
        .map(|u| u.namespace.as_str())
        .collect();
    let mode = crate::auth::Mode::of(&config, listen_addr);
    tracing::info!(%listen, store = %store_dir.display(), config = %source,
        upstreams = %upstreams.join(","), access = %mode.describe(), "berth starting");
    let token = config.access.as_ref().and_then(|a| a.token.as_ref());
    if token.is_some() && crate::auth::token_realm(&config, listen_addr).is_none() {
        tracing::warn!(
            "the token realm is built from the address each connection arrived on: \
             set [server] external_url (or [auth] token.realm) to the URL clients use"
        );
    }

    let threads = match worker_threads() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("berth: {e}");
            return 2;
        }
    };
    let mut conf = ServerConf {
        threads,
        // Requests in flight get the drain time (see drain.rs, which exits as soon as
        // none is left); then the runtimes get one more second.
        grace_period_seconds: Some(drain.as_secs() + u64::from(drain.subsec_nanos() > 0)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    conf.pid_file = std::env::temp_dir()
        .join(format!("berth-{}.pid", std::process::id()))
        .display()
        .to_string();
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let registry = Arc::new(Registry::new(store_for_registry.clone(), registry_options));
    let auth = match crate::auth::Auth::new(
        &config,
        listen_addr,
        Some(store_for_registry.clone()),
        clock,
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth: {e}");
            return 2;
        }
    };
    let in_flight = InFlight::default();
    let app = App {
        tls: config.server.tls.is_some(),
        auth,
        logins: Default::default(),
        in_flight: in_flight.clone(),
        config: Arc::new(config),
        cache,
        registry,
        metrics,
        access_log: AccessLog::from_filter(),
        ui_contents: Default::default(),
    };
    let maintenance = Maintenance {
        registry: app.registry.clone(),
        gc_interval: match app.config.server.gc_interval {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(DEFAULT_GC_INTERVAL),
        },
        gc_grace: app.config.server.gc_grace.unwrap_or(DEFAULT_GC_GRACE),
        retention_interval: match app.config.server.retention_interval {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(berth_config::DEFAULT_RETENTION_INTERVAL),
        },
        retention: Arc::new(app.config.retention.clone()),
        clock: retention_clock,
    };
    let budget = crate::private::Budget {
        cache: app.cache.clone(),
        scrub_interval: app.config.cache.scrub_interval,
        scrub_rate: app.config.cache.scrub_rate,
    };
    let tls = app.config.server.tls.clone();
    let mut service = Service::new(
        "berth".to_owned(),
        crate::front::Front { app: Arc::new(app) },
    );
    match &tls {
        // Plain HTTP reads go straight into the request's header buffer. Pingora's
        // default 64 KiB read buffer per connection saves no read(2) here (a request
        // head is read whole), and it made an idle keep-alive connection cost about
        // 33 KiB of memory. The write buffer holds a response head and a small body
        // (a manifest) so that they go out in one write.
        None => service.add_listener(pingora::listeners::ListenerConfig::tcp(&listen).l4_buffer(
            pingora::protocols::l4::stream::L4BufferSettings::new(0, 16 << 10),
        )),
        Some(t) => {
            let (cert, key) = (t.cert.display().to_string(), t.key.display().to_string());
            if let Err(e) = service.add_tls(&listen, &cert, &key) {
                eprintln!("berth: cannot serve TLS with {cert} and {key}: {e}");
                return 2;
            }
        }
    }
    server.add_service(service);
    server.add_service(pingora::services::background::background_service(
        "drain",
        Drain { in_flight, drain },
    ));
    server.add_service(pingora::services::background::background_service(
        "maintenance",
        maintenance,
    ));
    server.add_service(pingora::services::background::background_service(
        "budget", budget,
    ));
    server.run_forever()
}

/// The environment variable that sets the number of worker threads.
pub const THREADS_ENV: &str = "BERTH_THREADS";

/// The worker threads: `BERTH_THREADS` if set, else the CPUs berth may run on (its
/// affinity and cgroup quota included).
fn worker_threads() -> Result<usize, String> {
    match std::env::var(THREADS_ENV) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n @ 1..=1024) => Ok(n),
            _ => Err(format!(
                "{THREADS_ENV}={v:?} is not a number of worker threads from 1 to 1024"
            )),
        },
        Err(_) => Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)),
    }
}
