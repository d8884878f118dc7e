//! The picture: an SVG written by hand (no fonts or plotting library
//! needed), log-scale grouped bars per transport: latency percentiles and
//! CPU per request at one in flight by size, requests/s and CPU per request
//! by concurrency, throughput by size, and the open-loop latencies.

use std::fmt::Write as _;

use crate::backend::Transport;
use crate::report::Record;
use crate::units::{fmt_num, fmt_size};

fn color(t: &str) -> &'static str {
    match t {
        "shm-spin" => "#1f77b4",
        "shm-block" => "#2ca02c",
        "shm-park" => "#98df8a",
        "tcp" => "#d62728",
        "tcp-batch" => "#ff9896",
        "uds" => "#ff7f0e",
        "ring-floor" => "#9467bd",
        "ring-floor-park" => "#c5b0d5",
        _ => "#8c564b",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Bar {
    value: f64,
    /// drawn darker from the axis up to this value (e.g. the client's share)
    inner: Option<f64>,
    /// short horizontal marks (e.g. p99, p99.9)
    ticks: Vec<f64>,
}

struct Panel {
    title: String,
    ylabel: String,
    groups: Vec<String>,
    /// [group][transport]
    bars: Vec<Vec<Option<Bar>>>,
}

const PW: f64 = 640.0;
const PH: f64 = 330.0;

fn render_panel(s: &mut String, p: &Panel, x0: f64, y0: f64, series: &[&str]) {
    let (ml, mr, mt, mb) = (62.0, 12.0, 30.0, 40.0);
    let (w, h) = (PW - ml - mr, PH - mt - mb);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        x0 + ml,
        y0 + 18.0,
        esc(&p.title)
    );
    let vals: Vec<f64> = p
        .bars
        .iter()
        .flatten()
        .flatten()
        .flat_map(|b| {
            std::iter::once(b.value)
                .chain(b.inner)
                .chain(b.ticks.iter().copied())
        })
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if vals.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#777">no data</text>"##,
            x0 + ml + 10.0,
            y0 + mt + 20.0
        );
        return;
    }
    let lo = vals
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let mut hi = vals.iter().copied().fold(0.0, f64::max).log10().ceil();
    if hi <= lo {
        hi = lo + 1.0;
    }
    let y = |v: f64| y0 + mt + h - (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo) * h;
    // Axes and decade grid.
    let mut d = lo;
    while d <= hi + 1e-9 {
        let yy = y(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            x0 + ml,
            x0 + ml + w,
            x0 + ml - 4.0,
            yy + 4.0,
            fmt_num(10f64.powf(d))
        );
        d += 1.0;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        x0 + ml,
        y0 + mt + h,
        x0 + ml + w,
        y0 + mt + h
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" font-size="11" text-anchor="middle">{}</text>"#,
        x0 + 14.0,
        y0 + mt + h / 2.0,
        esc(&p.ylabel)
    );
    let ng = p.groups.len().max(1) as f64;
    let gw = w / ng;
    let ns = series.len().max(1) as f64;
    let bw = (gw * 0.8 / ns).min(28.0);
    for (gi, g) in p.groups.iter().enumerate() {
        let gx = x0 + ml + gw * gi as f64 + (gw - bw * ns) / 2.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            x0 + ml + gw * (gi as f64 + 0.5),
            y0 + mt + h + 16.0,
            esc(g)
        );
        for (si, t) in series.iter().enumerate() {
            let Some(Some(b)) = p.bars.get(gi).map(|v| v.get(si).and_then(|b| b.as_ref())) else {
                continue;
            };
            let bx = gx + bw * si as f64;
            let base = y0 + mt + h;
            let top = y(b.value);
            let _ = writeln!(
                s,
                r#"<rect x="{bx:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}" fill-opacity="{}"><title>{} {}: {}</title></rect>"#,
                bw - 1.0,
                (base - top).max(0.0),
                color(t),
                if b.inner.is_some() { "0.45" } else { "0.9" },
                esc(t),
                esc(g),
                fmt_num(b.value)
            );
            if let Some(iv) = b.inner {
                let it = y(iv);
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{it:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
                    bx + bw * 0.2,
                    (bw - 1.0) * 0.6,
                    (base - it).max(0.0),
                    color(t)
                );
            }
            for tv in &b.ticks {
                let ty = y(*tv);
                let _ = writeln!(
                    s,
                    r##"<line x1="{bx:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#111" stroke-width="1.5"/>"##,
                    bx + bw - 1.0
                );
            }
        }
    }
}

/// Render the plot of `recs`.
pub fn svg(recs: &[Record], rate: f64) -> String {
    let series: Vec<&str> = <Transport as clap::ValueEnum>::value_variants()
        .iter()
        .map(|t| t.name())
        .filter(|n| recs.iter().any(|r| r.transport == *n))
        .collect();
    let mut sizes: Vec<usize> = recs.iter().map(|r| r.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut concs: Vec<usize> = recs
        .iter()
        .filter(|r| r.mode == "closed")
        .map(|r| r.concurrency)
        .collect();
    concs.sort_unstable();
    concs.dedup();
    let find = |t: &str, m: &str, size: usize, c: usize| {
        recs.iter()
            .find(|r| r.transport == t && r.mode == m && r.size == size && r.concurrency == c)
    };
    let by_size = |m: &'static str, f: &dyn Fn(&Record) -> Bar| -> Vec<Vec<Option<Bar>>> {
        sizes
            .iter()
            .map(|&z| series.iter().map(|t| find(t, m, z, 1).map(f)).collect())
            .collect()
    };
    let lat = |r: &Record| Bar {
        value: r.p50_us,
        inner: None,
        ticks: vec![r.p99_us, r.p999_us],
    };
    let cpu = |r: &Record| Bar {
        value: r.cpu_us_per_req,
        inner: Some(r.client_cpu_us_per_req),
        ticks: vec![],
    };
    let csize = sizes
        .iter()
        .copied()
        .find(|&z| z >= 1024)
        .or(sizes.first().copied())
        .unwrap_or(1024);
    let by_conc = |f: &dyn Fn(&Record) -> Bar| -> Vec<Vec<Option<Bar>>> {
        concs
            .iter()
            .map(|&c| {
                series
                    .iter()
                    .map(|t| find(t, "closed", csize, c).map(f))
                    .collect()
            })
            .collect()
    };
    let size_labels: Vec<String> = sizes.iter().map(|&z| fmt_size(z)).collect();
    let mut panels = vec![
        Panel {
            title: "Latency, closed loop, 1 in flight: p50 (bar), p99 and p99.9 (marks)".into(),
            ylabel: "µs (log)".into(),
            groups: size_labels.clone(),
            bars: by_size("closed", &lat),
        },
        Panel {
            title: "CPU per request, 1 in flight: client (dark) + server (light)".into(),
            ylabel: "µs of CPU per request (log)".into(),
            groups: size_labels.clone(),
            bars: by_size("closed", &cpu),
        },
        Panel {
            title: format!("Requests/s by requests in flight, {}", fmt_size(csize)),
            ylabel: "requests/s (log)".into(),
            groups: concs.iter().map(|c| format!("{c} in flight")).collect(),
            bars: by_conc(&|r| Bar {
                value: r.rps,
                inner: None,
                ticks: vec![],
            }),
        },
        Panel {
            title: format!(
                "CPU per request by requests in flight, {}: client (dark) + server",
                fmt_size(csize)
            ),
            ylabel: "µs of CPU per request (log)".into(),
            groups: concs.iter().map(|c| format!("{c} in flight")).collect(),
            bars: by_conc(&cpu),
        },
        Panel {
            title: "Throughput, closed loop, 1 in flight".into(),
            ylabel: "MB/s of body echoed (log)".into(),
            groups: size_labels.clone(),
            bars: by_size("closed", &|r| Bar {
                value: r.bytes_per_s / 1e6,
                inner: None,
                ticks: vec![],
            }),
        },
    ];
    let open_sizes: Vec<usize> = sizes
        .iter()
        .copied()
        .filter(|&z| {
            recs.iter()
                .any(|r| r.mode == "open" && r.size == z && r.concurrency == 1)
        })
        .collect();
    if !open_sizes.is_empty() {
        panels.push(Panel {
            title: format!("Open loop at {rate} req/s, 1 in flight: p50 (bar), p99, p99.9"),
            ylabel: "µs (log)".into(),
            groups: open_sizes.iter().map(|&z| fmt_size(z)).collect(),
            bars: open_sizes
                .iter()
                .map(|&z| {
                    series
                        .iter()
                        .map(|t| find(t, "open", z, 1).map(lat))
                        .collect()
                })
                .collect(),
        });
    }
    let cols = 2.0;
    let rows = (panels.len() as f64 / cols).ceil();
    let (wd, ht) = (PW * cols, 60.0 + PH * rows);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{wd}" height="{ht}" viewBox="0 0 {wd} {ht}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="16" y="24" font-size="16" font-weight="bold">meshshm-bench compare: shared memory through the proxy vs loopback TCP</text>"#
    );
    let mut lx = 16.0;
    for t in &series {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="36" width="14" height="14" fill="{}"/><text x="{:.1}" y="48" font-size="12">{}</text>"#,
            color(t),
            lx + 18.0,
            esc(t)
        );
        lx += 30.0 + 8.0 * t.len() as f64;
    }
    for (i, p) in panels.iter().enumerate() {
        let (c, r) = ((i % 2) as f64, (i / 2) as f64);
        render_panel(&mut s, p, c * PW, 60.0 + r * PH, &series);
    }
    s.push_str("</svg>\n");
    s
}
