//! `meshshm-proxy`: the sidecar. Reads its config (or the embedded
//! default), starts a fixed-size tokio runtime, and serves shared-memory
//! and loopback-TCP sessions until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

mod admin;
mod certs;
mod config;
mod dispatch;
mod driver;
mod gov;
mod http;
mod listen;
mod metrics;
mod reload;
mod router;
mod shm;
mod tcp;
mod tls;
mod token;

use config::Config;

/// What every session shares.
pub struct Shared {
    pub cfg: Config,
    pub router: router::Router,
    pub tls: Arc<tls::Tls>,
    /// Governance: policies, access rules, clusters, metrics (reloadable).
    pub gov: gov::Governor,
    /// The shm driver threads when shm sessions wait with io_uring
    /// (`shm.waiter`); `None`: each session is a tokio task (epoll).
    pub drivers: Option<driver::Drivers>,
}

/// Subcommands of `meshshm-proxy`.
#[derive(clap::Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Certs(certs::Command),
    /// Signed identity tokens: make a signing key, mint a token (docs/GOVERNANCE.md).
    #[command(subcommand)]
    Token(token::TokenCmd),
}

/// meshshm sidecar proxy: serves services over shared memory and loopback TCP.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (default: the embedded configuration).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Control socket path (overrides listen.socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Loopback TCP listener address, or "off" (overrides listen.tcp).
    #[arg(long)]
    tcp: Option<String>,
    /// Worker threads (overrides runtime.threads).
    #[arg(long)]
    threads: Option<usize>,
    /// Doorbell spin time in µs (overrides shm.spin_us).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Poll the whole spin time before every sleep (sets shm.spin_adaptive = false).
    #[arg(long)]
    spin_fixed: bool,
    /// How shm sessions wait for doorbells: "auto", "io_uring" or "epoll" (overrides shm.waiter).
    #[arg(long)]
    waiter: Option<String>,
    /// Segment backing: "memfd" or a tmpfs directory (overrides shm.backing).
    #[arg(long)]
    backing: Option<String>,
    /// Admin HTTP address (metrics, /live, /ready), or "off" (overrides admin.listen).
    #[arg(long)]
    admin: Option<String>,
    /// HTTP/1.1 ingress address, or "off" (overrides http.listen).
    #[arg(long)]
    http: Option<String>,
}

fn load(args: &Args) -> Result<Config, String> {
    let text = match &args.config {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => config::DEFAULT.to_owned(),
    };
    let mut cfg = Config::parse_unchecked(&text).map_err(|e| match &args.config {
        Some(p) => format!("{}: {e}", p.display()),
        None => e,
    })?;
    if let Some(s) = &args.socket {
        cfg.listen.socket = s.display().to_string();
    }
    if let Some(t) = &args.tcp {
        cfg.listen.tcp = if t == "off" { String::new() } else { t.clone() };
        cfg.tcp_addr()?;
    }
    if let Some(n) = args.threads {
        cfg.runtime.threads = n.max(1);
    }
    if let Some(s) = args.spin_us {
        cfg.shm.spin_us = s;
    }
    if args.spin_fixed {
        cfg.shm.spin_adaptive = false;
    }
    if let Some(w) = &args.waiter {
        cfg.shm.waiter = w.clone();
    }
    if let Some(b) = &args.backing {
        cfg.shm.backing = b.clone();
    }
    if let Some(a) = &args.admin {
        cfg.admin.listen = if a == "off" { String::new() } else { a.clone() };
    }
    if let Some(a) = &args.http {
        cfg.http.listen = if a == "off" { String::new() } else { a.clone() };
    }
    cfg.check()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match &args.command {
        Some(Command::Certs(certs::Command::Certs(a))) => return certs::run(a),
        Some(Command::Token(t)) => return token::run(t, args.config.as_ref()),
        None => {}
    }
    if args.print_default_config {
        print!("{}", config::DEFAULT);
        return ExitCode::SUCCESS;
    }
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshshm-proxy: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let tls = match tls::Tls::new(&cfg.tls) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshshm-proxy: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    if args.check_config {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.runtime.threads)
        .max_blocking_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshshm-proxy: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let drivers = match shm::start_waiter(&cfg, rt.handle()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("meshshm-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared {
        drivers,
        router: router::Router::new(&cfg, &tls),
        gov: gov::Governor::new(&cfg, &tls),
        cfg,
        tls: tls.clone(),
    });
    rt.spawn(tls.watch());
    let cfg_path = args.config.clone();
    let args = Arc::new(args);
    rt.spawn(reload::run(
        shared.clone(),
        cfg_path,
        Box::new(move || load(&args)),
    ));
    match rt.block_on(listen::run(shared)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshshm-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
