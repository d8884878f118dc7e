//! `meshshm`: the command-line client of the mesh (like curl or grpcurl).
//!
//! ```text
//! meshshm call echo Echo --data hello
//! meshshm call echo Echo --file body.bin --timeout 500ms
//! echo hi | meshshm call echo Echo --tcp 127.0.0.1:15001
//! meshshm serve greeter --echo
//! meshshm serve greeter -- tr a-z A-Z
//! ```

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshshm::{Call, Client, ClientOptions, Server, Transport};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Call services through the meshshm sidecar, or serve one"
)]
struct Args {
    /// Proxy control socket (default: $MESHSHM_SOCKET, $XDG_RUNTIME_DIR/meshshm/proxy.sock,
    /// or /tmp/meshshm-<uid>/proxy.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Call SERVICE METHOD; the response body goes to stdout.
    Call {
        service: String,
        method: String,
        /// Request body (else --file, else stdin).
        #[arg(long, short)]
        data: Option<String>,
        /// Read the request body from a file.
        #[arg(long, short, conflicts_with = "data")]
        file: Option<PathBuf>,
        /// Go over loopback TCP to this proxy address instead of shared memory.
        #[arg(long)]
        tcp: Option<SocketAddr>,
        /// Give up after this long (e.g. 500ms, 2s, 1m).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        /// Request header NAME=VALUE (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Priority: 0 low, 1 normal, 2 high.
        #[arg(long, default_value_t = 1)]
        priority: u8,
    },
    /// Serve SERVICE: answer each request with the output of CMD (body on
    /// its stdin), or echo the body back with --echo.
    Serve {
        service: String,
        /// Answer with the request body.
        #[arg(long)]
        echo: bool,
        /// Command to run per request.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
}

/// Parse "250us", "500ms", "2s", "1m" (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use us, ms, s or m)")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshshm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    match args.cmd {
        Cmd::Call {
            service,
            method,
            data,
            file,
            tcp,
            timeout,
            headers,
            priority,
        } => {
            let body = match (data, file) {
                (Some(d), _) => d.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?
                }
                (None, None) => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .map_err(|e| format!("stdin: {e}"))?;
                    b
                }
            };
            let hv: Vec<(String, Vec<u8>)> = headers
                .iter()
                .map(|h| match h.split_once('=') {
                    Some((k, v)) => Ok((k.to_owned(), v.as_bytes().to_vec())),
                    None => Err(format!("header {h:?} is not NAME=VALUE")),
                })
                .collect::<Result<_, _>>()?;
            let hr: Vec<(&str, &[u8])> =
                hv.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            let client = Client::with_options(ClientOptions {
                socket: args.socket,
                transport: tcp.map_or(Transport::Shm, Transport::Tcp),
                spin: 0,
                ..ClientOptions::default()
            })
            .map_err(|e| e.to_string())?;
            let resp = client
                .invoke(&Call {
                    headers: &hr,
                    timeout: Some(timeout),
                    priority,
                    ..Call::new(&service, &method, &body)
                })
                .map_err(|e| e.to_string())?;
            let body = resp.into_result().map_err(|e| e.to_string())?;
            std::io::stdout()
                .write_all(&body)
                .map_err(|e| format!("stdout: {e}"))?;
            Ok(())
        }
        Cmd::Serve { service, echo, cmd } => {
            if !echo && cmd.is_empty() {
                return Err("serve needs --echo or -- CMD [ARGS...]".into());
            }
            let server =
                Server::bind(args.socket.as_deref(), &service).map_err(|e| e.to_string())?;
            eprintln!("meshshm: serving {service}");
            server
                .serve(|req| {
                    if echo {
                        return (meshshm::status::OK, req.body.clone());
                    }
                    match run_cmd(&cmd, &req.body) {
                        Ok(out) => (meshshm::status::OK, out),
                        Err(e) => (meshshm::status::UNKNOWN, e.into_bytes()),
                    }
                })
                .map_err(|e| e.to_string())
        }
    }
}

fn run_cmd(cmd: &[String], input: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
