//! `meshshm-bench`: is meshshm faster and cheaper than loopback TCP? One
//! command measures it: `meshshm-bench compare` starts the real
//! `meshshm-proxy` and measures the same echo workload over shared memory
//! through the proxy (spinning, and blocking on doorbells), over loopback
//! TCP through the proxy (the same frames), and, as references, over a
//! plain Unix-socket echo and a bare two-process ring echo (the floors).
//! See `benches/README.md`.
//!
//! The hidden subcommands are the processes it starts: `uds-echo` (the
//! Unix-socket echo server), `ring-echo` (the ring floor's child) and
//! `exec` (sets the parent-death signal, then becomes the proxy).
#![forbid(unsafe_code)]

mod backend;
mod compare;
mod cpu;
mod floor;
mod mux;
mod plot;
mod procs;
mod report;
mod uds;
mod units;
mod wake;
mod wire;
mod work;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// meshshm benchmarks: shared memory through the sidecar vs loopback TCP.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare transports end to end; prints a table, writes JSON and SVG.
    Compare(Box<compare::Args>),
    /// The cost of a bare sleeping hand-off here (two pinned threads,
    /// futex and eventfd doorbells): the floor under every blocking row.
    Wake {
        /// Round trips per bell and round
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// Rounds
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// (internal) the Unix-socket echo server.
    #[command(hide = true)]
    UdsEcho {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        parent: i32,
    },
    /// (internal) the ring floor's echo child.
    #[command(hide = true)]
    RingEcho {
        #[arg(long)]
        connect: PathBuf,
        #[arg(long)]
        parent: i32,
    },
    /// (internal) set the parent-death signal, then exec the program.
    #[command(hide = true)]
    Exec {
        #[arg(long)]
        parent: i32,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Compare(a) => {
            procs::install_signal_thread();
            let code = compare::run(*a);
            procs::cleanup();
            code
        }
        Cmd::Wake { count, rounds } => wake::run(count, rounds),
        Cmd::UdsEcho { socket, parent } => uds::server_main(&socket, parent),
        Cmd::RingEcho { connect, parent } => floor::child_main(&connect, parent),
        Cmd::Exec { parent, argv } => procs::exec_main(parent, &argv),
    }
}
