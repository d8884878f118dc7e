//! Run a program with io_uring refused: `meshshm-no-uring PROGRAM ARGS...`
//! installs a seccomp filter that makes `io_uring_setup` fail with EPERM
//! (as a container runtime's default profile or sysctl
//! `kernel.io_uring_disabled` would), then executes PROGRAM under it. For the
//! test of the proxy's fallback from io_uring to epoll (tests/waiters.rs).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((prog, rest)) = args.split_first() else {
        eprintln!("usage: meshshm-no-uring PROGRAM [ARGS...]");
        return ExitCode::from(64);
    };
    if let Err(e) = meshshm_ring::uring::deny_io_uring_for_tests() {
        eprintln!("meshshm-no-uring: cannot install the seccomp filter: {e}");
        return ExitCode::from(70);
    }
    let e = Command::new(prog).args(rest).exec();
    eprintln!("meshshm-no-uring: {prog}: {e}");
    ExitCode::from(71)
}
