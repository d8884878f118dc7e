//! The proxy's configuration: a TOML file, or the embedded default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The embedded default configuration.
pub const DEFAULT: &str = include_str!("default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub runtime: Runtime,
    pub shm: Shm,
    #[serde(default)]
    pub routes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    #[serde(default)]
    pub socket: String,
    #[serde(default = "default_mode")]
    pub socket_mode: u32,
    #[serde(default)]
    pub tcp: String,
}

fn default_mode() -> u32 {
    0o600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    pub threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shm {
    pub ring_size: u64,
    pub max_ring_size: u64,
    pub max_message: u64,
    pub backing: String,
    pub spin_us: u64,
    pub max_connections: usize,
    pub max_in_flight: usize,
}

/// Where a service's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSpec {
    /// answer the body back
    Echo,
    /// a server app attached over shm
    Local,
    /// another meshshm proxy over TCP
    Proxy(SocketAddr),
}

impl UpstreamSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "echo" => Ok(UpstreamSpec::Echo),
            "local" => Ok(UpstreamSpec::Local),
            _ => match s.strip_prefix("proxy:") {
                Some(a) => a
                    .parse()
                    .map(UpstreamSpec::Proxy)
                    .map_err(|e| format!("upstream {s:?}: bad address: {e}")),
                None => Err(format!(
                    "upstream {s:?}: expected \"echo\", \"local\" or \"proxy:HOST:PORT\""
                )),
            },
        }
    }
}

impl Config {
    /// Parse and check a configuration.
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        let pow2 = |v: u64, what: &str| {
            if v.is_power_of_two()
                && v >= meshshm_ring::MIN_CAPACITY as u64
                && v <= meshshm_ring::MAX_CAPACITY as u64
            {
                Ok(())
            } else {
                Err(format!(
                    "shm.{what} = {v}: must be a power of two in 4096..=1 GiB"
                ))
            }
        };
        pow2(self.shm.ring_size, "ring_size")?;
        pow2(self.shm.max_ring_size, "max_ring_size")?;
        if self.shm.max_message == 0 || self.shm.max_message > u32::MAX as u64 {
            return Err("shm.max_message must be in 1..4 GiB".into());
        }
        if self.runtime.threads == 0 {
            return Err("runtime.threads must be at least 1".into());
        }
        if !self.listen.tcp.is_empty() {
            self.tcp_addr()?;
        }
        for (svc, up) in &self.routes {
            UpstreamSpec::parse(up).map_err(|e| format!("routes.{svc}: {e}"))?;
        }
        Ok(())
    }

    pub fn tcp_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.listen.tcp.is_empty() {
            return Ok(None);
        }
        self.listen
            .tcp
            .parse()
            .map(Some)
            .map_err(|e| format!("listen.tcp = {:?}: {e}", self.listen.tcp))
    }

    pub fn socket_path(&self) -> PathBuf {
        if self.listen.socket.is_empty() {
            meshshm_proto::default_socket_path()
        } else {
            PathBuf::from(&self.listen.socket)
        }
    }

    pub fn backing(&self) -> meshshm_ring::Backing {
        if self.shm.backing == "memfd" {
            meshshm_ring::Backing::Memfd
        } else {
            meshshm_ring::Backing::Dir(PathBuf::from(&self.shm.backing))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses_and_routes_echo() {
        let c = Config::parse(DEFAULT).unwrap();
        assert_eq!(c.routes.get("echo").map(String::as_str), Some("echo"));
        assert_eq!(
            c.tcp_addr().unwrap(),
            Some("127.0.0.1:15001".parse().unwrap())
        );
    }

    #[test]
    fn bad_config_is_refused_with_reason() {
        let bad = DEFAULT.replace("ring_size = 2097152", "ring_size = 1000");
        assert!(Config::parse(&bad).unwrap_err().contains("ring_size"));
        let bad = DEFAULT.replace("echo = \"echo\"", "echo = \"nowhere\"");
        assert!(Config::parse(&bad).unwrap_err().contains("routes.echo"));
    }
}
