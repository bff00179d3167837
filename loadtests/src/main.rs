//! `berth-load`: see the library's documentation (`berth_loadtests`) and `--help`.

use std::process::ExitCode;

use clap::Parser;

use berth_loadtests::cli::Cli;

fn main() -> ExitCode {
    let (config, output) = match Cli::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth-load: {e}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = output.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth-load: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match runtime.block_on(berth_loadtests::run(&config)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth-load: {e}");
            return ExitCode::from(2);
        }
    };
    if !output.quiet {
        print!("{}", report.table());
    }
    if let Some(path) = &output.json {
        if let Err(e) = std::fs::write(path, report.to_json() + "\n") {
            eprintln!("berth-load: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.has_failures() && !output.allow_errors {
        eprintln!("berth-load: some requests failed (see errors); --allow-errors to exit 0");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
