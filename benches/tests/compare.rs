//! Runs `meshshm-bench compare` for real (tiny durations) and checks what
//! it writes, that it leaves no process and nothing in /dev/shm behind,
//! and that Ctrl-C stops everything it started.
//!
//! Needs `meshshm-proxy` built next to `meshshm-bench` (`cargo build
//! --workspace --bins`, or `cargo build -p meshshm-proxy` for the same
//! profile), as the multi-process tests in `tests/` do.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshshm-bench"))
}

fn proxy() -> PathBuf {
    let p = bench().with_file_name("meshshm-proxy");
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

fn shm_names() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("meshshm"))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line mentions `needle`.
fn procs_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("meshshm-bench-test-{}-{name}", std::process::id()))
}

#[test]
fn compare_writes_sane_json_and_plot_and_cleans_up() {
    let (json, svg) = (tmp("out.json"), tmp("out.svg"));
    let shm_before = shm_names();
    let mut child = Command::new(bench())
        .args([
            "compare",
            "--sizes",
            "64,4KiB",
            "--concurrency",
            "1,8",
            "--open-sizes",
            "64",
            "--rate",
            "2000",
            "--duration",
            "0.05",
            "--open-duration",
            "0.05",
            "--warmup",
            "0.01",
            "--no-progress",
            "--proxy",
        ])
        .arg(proxy())
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshshm-bench");
    let pid = child.id();
    // Watchdog: a hang fails the test instead of blocking it.
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            panic!("meshshm-bench compare hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("transport") && stdout.contains("Targets"),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&json).expect("json written");
    let recs: serde_json::Value = serde_json::from_str(&text).expect("valid json");
    let recs = recs.as_array().expect("an array");
    let want = [
        "shm-spin",
        "shm-block",
        "tcp",
        "uds",
        "ring-floor",
        "ring-floor-block",
    ];
    // 2 sizes × 2 concurrencies closed + 1 open cell, per transport;
    // tcp-batch's many-in-flight cells (one in flight would repeat tcp's);
    // the doorbell-only pair's one-in-flight cells.
    assert_eq!(recs.len(), want.len() * 5 + 2 + 2 * 3, "{text}");
    for t in ["shm-park", "ring-floor-park"] {
        for (mode, size) in [("closed", 64), ("closed", 4096), ("open", 64)] {
            assert!(
                recs.iter().any(|r| r["transport"] == t
                    && r["mode"] == mode
                    && r["size"] == size
                    && r["concurrency"] == 1
                    && r["p50_us"].as_f64().is_some_and(|x| x > 0.0)),
                "no {t} record for {mode} {size} B x1: {text}"
            );
        }
    }
    for size in [64, 4096] {
        assert!(
            recs.iter().any(|r| r["transport"] == "tcp-batch"
                && r["size"] == size
                && r["concurrency"] == 8
                && r["client"] == "pipeline"),
            "no tcp-batch record for {size} B x8: {text}"
        );
    }
    for t in want {
        for (mode, size, c) in [
            ("closed", 64, 1),
            ("closed", 64, 8),
            ("closed", 4096, 1),
            ("closed", 4096, 8),
            ("open", 64, 1),
        ] {
            let r = recs
                .iter()
                .find(|r| {
                    r["transport"] == t
                        && r["mode"] == mode
                        && r["size"] == size
                        && r["concurrency"] == c
                })
                .unwrap_or_else(|| panic!("no record {t} {mode} {size} {c}"));
            let f = |k: &str| {
                r[k].as_f64()
                    .unwrap_or_else(|| panic!("{k} missing in {r}"))
            };
            let (p50, p99, p999) = (f("p50_us"), f("p99_us"), f("p999_us"));
            assert!(p50 > 0.0 && p50 < 1e6, "{r}");
            assert!(p50 <= p99 && p99 <= p999, "{r}");
            assert!(f("rps") > 0.0, "{r}");
            let bps = f("bytes_per_s");
            assert!(
                (bps - f("rps") * size as f64).abs() <= 1e-6 * bps + 1.0,
                "{r}"
            );
            assert!(f("client_cpu_us_per_req") > 0.0, "{r}");
            assert!(f("proxy_cpu_us_per_req") >= 0.0, "{r}");
            assert!(r["requests"].as_u64().unwrap_or(0) > 0, "{r}");
            let client = match (c, t) {
                (1, _) => "blocking",
                (_, "uds" | "ring-floor" | "ring-floor-block") => "mux",
                _ => "pipeline",
            };
            assert_eq!(r["client"], client, "{r}");
            if t == "tcp" {
                assert_eq!(r["p50_vs_tcp"].as_f64(), Some(1.0), "{r}");
            } else {
                assert!(r["p50_vs_tcp"].as_f64().is_some_and(|x| x > 0.0), "{r}");
            }
            if mode == "open" {
                assert_eq!(r["rate"].as_f64(), Some(2000.0), "{r}");
            }
        }
    }
    let plot = std::fs::read_to_string(&svg).expect("svg written");
    assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    for t in want {
        assert!(plot.contains(t), "legend lacks {t}");
    }
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);

    assert_eq!(shm_names(), shm_before, "segments left in /dev/shm");
    let left = procs_with(&format!("meshshm-bench-{pid}"));
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let left = procs_with(&format!("--parent {pid} "));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn ctrl_c_stops_every_child() {
    let mut child = Command::new(bench())
        .args([
            "compare",
            "--sizes",
            "64",
            "--concurrency",
            "1",
            "--modes",
            "closed",
            "--duration",
            "30",
            "--proxy",
        ])
        .arg(proxy())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshshm-bench");
    let pid = child.id();
    // Wait until the first cell runs (all servers are up by then).
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            let _ = tx.send(l);
        }
    });
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        // With stderr not a terminal, progress is a line per finished
        // cell, the first after 30 s: wait for the six servers instead
        // (each names the benchmark's private directory).
        if procs_with(&format!("meshshm-bench-{pid}")).len() >= 6 {
            break;
        }
        while let Ok(l) = rx.try_recv() {
            seen.push(l);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "servers did not start: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("meshshm-bench did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let left = procs_with(&format!("--parent {pid} "));
    let left2 = procs_with(&format!("meshshm-bench-{pid}"));
    assert!(
        left.is_empty() && left2.is_empty(),
        "left behind: {left:?} {left2:?}"
    );
}

/// `wake` measures both bells and prints a row for each, with numbers.
#[test]
fn wake_measures_both_bells() {
    let out = std::process::Command::new(bench())
        .args(["wake", "--count", "300", "--rounds", "1"])
        .output()
        .expect("run meshshm-bench wake");
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.code() == Some(2) {
        println!("SKIPPED: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bell in ["futex", "eventfd"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(bell))
            .unwrap_or_else(|| panic!("no {bell} row in:\n{text}"));
        let nums: Vec<f64> = row
            .split_whitespace()
            .skip(2)
            .map(|w| w.parse().expect("a number"))
            .collect();
        assert_eq!(nums.len(), 4, "{row}");
        assert!(nums.iter().all(|&x| x > 0.0), "{row}");
    }
}
