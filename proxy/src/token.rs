//! Signed, short-lived identity tokens (docs/GOVERNANCE.md, "Tokens").
//!
//! A signed token proves an identity until it expires, without a per-app
//! secret in the proxy's configuration:
//!
//! ```text
//! mst1.IDENTITY.EXPIRY.MAC
//! ```
//!
//! EXPIRY is a Unix time in seconds; MAC is the lowercase hex
//! HMAC-SHA256, under one of `[access.identity] signing_keys`, of
//! `mst1.IDENTITY.EXPIRY`. The identity may contain dots (the last two
//! fields are split off from the right). `meshshm-proxy token mint` makes
//! them; `meshshm-proxy token keygen` makes a key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;

/// Prefix (and version) of signed tokens.
pub const PREFIX: &str = "mst1.";

/// Shortest signing key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A signing key, ready for use.
pub fn key(k: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, k.as_bytes())
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

/// A token for `identity`, valid until `expiry` (Unix seconds).
pub fn mint(key: &hmac::Key, identity: &str, expiry: u64) -> String {
    let signed = format!("{PREFIX}{identity}.{expiry}");
    let tag = hmac::sign(key, signed.as_bytes());
    format!("{signed}.{}", hex(tag.as_ref()))
}

/// What a signed token says, once checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid for the identity until this Unix time.
    Valid(u64),
    /// The signature is good but the expiry has passed.
    Expired,
    /// Malformed, for another identity, or not signed by any of the keys.
    Invalid,
}

/// Check a signed token presented for `identity` at Unix time `now`.
/// The MAC is compared in constant time (`ring::hmac::verify`).
pub fn verify(keys: &[hmac::Key], identity: &str, token: &str, now: u64) -> Verdict {
    let Some((signed, mac)) = token.rsplit_once('.') else {
        return Verdict::Invalid;
    };
    let Some((head, expiry)) = signed.rsplit_once('.') else {
        return Verdict::Invalid;
    };
    let (Some(id), Ok(expiry), Some(mac)) =
        (head.strip_prefix(PREFIX), expiry.parse::<u64>(), unhex(mac))
    else {
        return Verdict::Invalid;
    };
    if id != identity
        || !keys
            .iter()
            .any(|k| hmac::verify(k, signed.as_bytes(), &mac).is_ok())
    {
        return Verdict::Invalid;
    }
    if expiry <= now {
        Verdict::Expired
    } else {
        Verdict::Valid(expiry)
    }
}

/// `meshshm-proxy token ...`.
#[derive(clap::Subcommand, Debug)]
pub enum TokenCmd {
    /// Print a new random signing key (64 hex characters) for
    /// `[access.identity] signing_keys`.
    Keygen,
    /// Print a signed token proving IDENTITY until now + TTL.
    Mint(MintArgs),
}

/// `meshshm-proxy token mint`.
#[derive(clap::Args, Debug)]
pub struct MintArgs {
    /// The identity the token proves (the app's Hello.service).
    #[arg(long)]
    pub identity: String,
    /// Lifetime: seconds, or a number with s, m, h or d (e.g. 15m, 12h).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Signing key (default: $MESHSHM_TOKEN_KEY, else the first of
    /// `signing_keys` in --config). The environment keeps it off `ps`.
    #[arg(long)]
    pub key: Option<String>,
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("--ttl {s:?}: not a number"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("--ttl {s:?}: unit must be s, m, h or d")),
    };
    match n.checked_mul(mul) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(format!("--ttl {s:?}: out of range")),
    }
}

/// Run a `token` subcommand. `config` is the `--config` file, if any.
pub fn run(cmd: &TokenCmd, config: Option<&PathBuf>) -> ExitCode {
    match cmd {
        TokenCmd::Keygen => {
            let mut k = [0u8; 32];
            if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k).is_err() {
                eprintln!("meshshm-proxy token keygen: no randomness");
                return ExitCode::FAILURE;
            }
            println!("{}", hex(&k));
            ExitCode::SUCCESS
        }
        TokenCmd::Mint(a) => {
            let given = a
                .key
                .clone()
                .or_else(|| std::env::var("MESHSHM_TOKEN_KEY").ok());
            let key_text = match (given, config) {
                (Some(k), _) => k,
                (None, Some(p)) => {
                    let cfg = std::fs::read_to_string(p)
                        .map_err(|e| format!("{}: {e}", p.display()))
                        .and_then(|t| crate::config::Config::parse(&t));
                    match cfg.map(|c| c.access.identity.signing_keys.first().cloned()) {
                        Ok(Some(k)) => k,
                        Ok(None) => {
                            eprintln!(
                                "meshshm-proxy token mint: {} has no access.identity.signing_keys",
                                p.display()
                            );
                            return ExitCode::from(64);
                        }
                        Err(e) => {
                            eprintln!("meshshm-proxy token mint: bad configuration: {e}");
                            return ExitCode::from(64);
                        }
                    }
                }
                (None, None) => {
                    eprintln!(
                        "meshshm-proxy token mint: give --key (or MESHSHM_TOKEN_KEY) or --config"
                    );
                    return ExitCode::from(64);
                }
            };
            if key_text.len() < MIN_KEY_LEN {
                eprintln!("meshshm-proxy token mint: the key must be at least {MIN_KEY_LEN} bytes");
                return ExitCode::from(64);
            }
            let ttl = match parse_ttl(&a.ttl) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("meshshm-proxy token mint: {e}");
                    return ExitCode::from(64);
                }
            };
            println!(
                "{}",
                mint(&key(&key_text), &a.identity, now_unix().saturating_add(ttl))
            );
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_expire_and_bind_the_identity() {
        let k = key("0123456789abcdef0123456789abcdef");
        let ks = std::slice::from_ref(&k);
        let other = key("fedcba9876543210fedcba9876543210");
        let t = mint(&k, "pay.v1", 1000);
        assert_eq!(verify(ks, "pay.v1", &t, 999), Verdict::Valid(1000));
        assert_eq!(
            verify(&[other.clone(), k.clone()], "pay.v1", &t, 10),
            Verdict::Valid(1000)
        );
        assert_eq!(verify(ks, "pay.v1", &t, 1000), Verdict::Expired);
        assert_eq!(verify(&[other], "pay.v1", &t, 10), Verdict::Invalid);
        assert_eq!(verify(ks, "pay", &t, 10), Verdict::Invalid);
        let forged = t.replace(".1000.", ".9999.");
        assert_eq!(verify(ks, "pay.v1", &forged, 10), Verdict::Invalid);
        for junk in [
            "",
            "mst1.",
            "mst1.a.b.c",
            "mst1.pay.v1.1000.zz",
            "x.pay.v1.1000.00",
        ] {
            assert_eq!(verify(ks, "pay.v1", junk, 10), Verdict::Invalid);
        }
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
