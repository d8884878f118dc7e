//! Parsing and printing sizes and times.

/// Parse a byte size: `64`, `64B`, `1k`, `1KiB`, `16K`, `1M`, `1MiB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("bad size {s:?} (expected e.g. 64, 1KiB, 1MiB)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("bad size unit in {s:?} (B, KiB or MiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// `64B`, `1KiB`, `16KiB`, `1MiB`, or plain bytes when not a whole unit.
pub fn fmt_size(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

/// A number with about three significant digits, for tables.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A ratio for tables: `0.031x`, `8.4x`.
pub fn fmt_ratio(v: Option<f64>) -> String {
    match v {
        Some(r) if r.is_finite() => {
            if r >= 100.0 {
                format!("{r:.0}x")
            } else if r >= 10.0 {
                format!("{r:.1}x")
            } else if r >= 0.1 {
                format!("{r:.2}x")
            } else {
                format!("{r:.3}x")
            }
        }
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        for (s, n) in [
            ("64", 64),
            ("64B", 64),
            ("1KiB", 1024),
            ("16k", 16384),
            ("256KiB", 256 << 10),
            ("1MiB", 1 << 20),
            ("1M", 1 << 20),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        assert_eq!(fmt_size(64), "64B");
        assert_eq!(fmt_size(1024), "1KiB");
        assert_eq!(fmt_size(1 << 20), "1MiB");
        assert_eq!(fmt_size(1500), "1500B");
        assert!(parse_size("1GiB").is_err());
        assert!(parse_size("x").is_err());
    }
}
