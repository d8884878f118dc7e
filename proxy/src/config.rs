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
    #[serde(default)]
    pub access: Access,
    /// Mutual TLS between proxies (docs/SECURITY.md).
    #[serde(default)]
    pub tls: crate::tls::TlsConfig,
    /// Admin HTTP port: metrics, liveness, readiness (docs/GOVERNANCE.md).
    #[serde(default)]
    pub admin: crate::gov::AdminCfg,
    /// Per-service governance policies (docs/GOVERNANCE.md).
    #[serde(default)]
    pub services: BTreeMap<String, crate::gov::ServiceCfg>,
    /// Clusters of upstream endpoints (docs/GOVERNANCE.md).
    #[serde(default)]
    pub clusters: BTreeMap<String, crate::gov::ClusterCfg>,
    /// HTTP/1.1 ingress listener (docs/GOVERNANCE.md).
    #[serde(default)]
    pub http: crate::http::HttpCfg,
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
    /// Owner of the control socket (user name or uid; "" = the proxy's).
    #[serde(default)]
    pub socket_owner: String,
    /// Group of the control socket (group name or gid; "" = the proxy's).
    #[serde(default)]
    pub socket_group: String,
    /// Uids allowed to open sessions on the control socket (empty = any
    /// uid that the socket's mode lets connect).
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// How long a new control connection may take to send its Hello.
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
    /// Most shm sessions one uid may hold at once (0 = no limit of its
    /// own; `shm.max_connections` still applies), so that one local user
    /// cannot take every session of the proxy.
    #[serde(default = "default_per_uid")]
    pub max_sessions_per_uid: usize,
}

fn default_per_uid() -> usize {
    512
}

fn default_mode() -> u32 {
    0o600
}

fn default_handshake_ms() -> u64 {
    5000
}

fn yes() -> bool {
    true
}

/// Which services each peer uid may call and serve. Keys are uids as
/// strings, or "*" for every uid without an entry of its own; a list may
/// hold "*" (any service). With no entry for a uid (and no "*"), the uid may
/// call and serve anything. TCP peers have no uid: the "*" entry applies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    #[serde(default)]
    pub call: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub serve: BTreeMap<String, Vec<String>>,
    /// Rules by uid or identity, enforce or dry-run (docs/GOVERNANCE.md).
    #[serde(default)]
    pub rules: Vec<crate::gov::AccessRuleCfg>,
    /// Identities presented at the handshake, and the tokens that prove them.
    #[serde(default)]
    pub identity: crate::gov::IdentityCfg,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    pub threads: usize,
    /// Mark the process non-dumpable, so that processes of the same uid can
    /// neither ptrace it nor open its fds or memory through /proc.
    #[serde(default = "yes")]
    pub non_dumpable: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shm {
    pub ring_size: u64,
    pub max_ring_size: u64,
    pub max_message: u64,
    pub backing: String,
    pub spin_us: u64,
    /// Whether a session's polling time follows its load (whole while
    /// requests come during the poll, halved each time an idle spell
    /// outlasts it, none with a probe every few waits once they are long);
    /// `false` polls `spin_us` before every sleep.
    #[serde(default = "default_true")]
    pub spin_adaptive: bool,
    pub max_connections: usize,
    pub max_in_flight: usize,
    /// Bytes the proxy may hold for one connection (forwarded requests in
    /// flight and answers waiting to go back) before it stops reading that
    /// connection's requests until some complete.
    #[serde(default = "default_max_buffered")]
    pub max_buffered: usize,
    /// How sessions wait for doorbells: "auto" (io_uring when the kernel
    /// and seccomp allow it, else epoll), "io_uring" or "epoll".
    #[serde(default = "default_waiter")]
    pub waiter: String,
    /// io_uring waiter: shm driver threads (0 = runtime.threads).
    #[serde(default)]
    pub drivers: usize,
}

fn default_true() -> bool {
    true
}

fn default_max_buffered() -> usize {
    64 << 20
}

fn default_waiter() -> String {
    "auto".into()
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
    /// a plain HTTP/1.1 service (crate::http::HttpUpstream)
    Http(SocketAddr),
}

impl UpstreamSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "echo" => Ok(UpstreamSpec::Echo),
            "local" => Ok(UpstreamSpec::Local),
            _ => match (s.strip_prefix("proxy:"), s.strip_prefix("http:")) {
                (Some(a), _) => a
                    .parse()
                    .map(UpstreamSpec::Proxy)
                    .map_err(|e| format!("upstream {s:?}: bad address: {e}")),
                (_, Some(a)) => a
                    .parse()
                    .map(UpstreamSpec::Http)
                    .map_err(|e| format!("upstream {s:?}: bad address: {e}")),
                _ => Err(format!(
                    "upstream {s:?}: expected \"echo\", \"local\", \"proxy:HOST:PORT\" or \"http:HOST:PORT\""
                )),
            },
        }
    }
}

impl Config {
    /// Parse and check a configuration.
    pub fn parse(text: &str) -> Result<Config, String> {
        let c = Config::parse_unchecked(text)?;
        c.check()?;
        Ok(c)
    }

    /// Parse without the checks, for a caller that changes the result
    /// (command-line overrides) and calls [`Config::check`] after.
    pub fn parse_unchecked(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn check(&self) -> Result<(), String> {
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
        if self.shm.max_buffered == 0 {
            return Err("shm.max_buffered must be at least 1 (bytes)".into());
        }
        if !matches!(self.shm.waiter.as_str(), "auto" | "io_uring" | "epoll") {
            return Err(format!(
                "shm.waiter = {:?}: expected \"auto\", \"io_uring\" or \"epoll\"",
                self.shm.waiter
            ));
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
        if !self.listen.allowed_uids.is_empty() && !self.listen.tcp.is_empty() {
            return Err(
                "listen.allowed_uids cannot be enforced on the loopback TCP listener \
                 (TCP peers have no uid): set listen.tcp = \"\" (or --tcp off)"
                    .into(),
            );
        }
        for (what, rules) in [("call", &self.access.call), ("serve", &self.access.serve)] {
            for k in rules.keys() {
                if k != "*" && k.parse::<u32>().is_err() {
                    return Err(format!("access.{what}: key {k:?} is not a uid or \"*\""));
                }
            }
        }
        self.socket_owner()?;
        self.tls.check()?;
        crate::gov::check(self)?;
        Ok(())
    }

    /// The uid and gid to give the control socket (`None`: leave as created).
    pub fn socket_owner(&self) -> Result<(Option<u32>, Option<u32>), String> {
        let uid = match self.listen.socket_owner.as_str() {
            "" => None,
            s => Some(match s.parse::<u32>() {
                Ok(u) => u,
                Err(_) => nix::unistd::User::from_name(s)
                    .map_err(|e| format!("listen.socket_owner = {s:?}: {e}"))?
                    .ok_or_else(|| format!("listen.socket_owner = {s:?}: no such user"))?
                    .uid
                    .as_raw(),
            }),
        };
        let gid = match self.listen.socket_group.as_str() {
            "" => None,
            s => Some(match s.parse::<u32>() {
                Ok(g) => g,
                Err(_) => nix::unistd::Group::from_name(s)
                    .map_err(|e| format!("listen.socket_group = {s:?}: {e}"))?
                    .ok_or_else(|| format!("listen.socket_group = {s:?}: no such group"))?
                    .gid
                    .as_raw(),
            }),
        };
        Ok((uid, gid))
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
        assert!(c.shm.spin_adaptive && c.shm.spin_us > 0);
        // A config written before the setting keeps the adaptive default.
        let old = DEFAULT.replace("spin_adaptive = true\n", "");
        assert!(Config::parse(&old).unwrap().shm.spin_adaptive);
    }

    #[test]
    fn bad_config_is_refused_with_reason() {
        let bad = DEFAULT.replace("ring_size = 2097152", "ring_size = 1000");
        assert!(Config::parse(&bad).unwrap_err().contains("ring_size"));
        let bad = DEFAULT.replace("echo = \"echo\"", "echo = \"nowhere\"");
        assert!(Config::parse(&bad).unwrap_err().contains("routes.echo"));
        let bad = DEFAULT.replace("allowed_uids = []", "allowed_uids = [1000]");
        assert!(Config::parse(&bad).unwrap_err().contains("allowed_uids"));
        let bad = format!("{DEFAULT}\n[access.call]\nbob = [\"echo\"]\n");
        assert!(Config::parse(&bad).unwrap_err().contains("access.call"));
    }

    #[test]
    fn shm_waiter_is_checked() {
        assert_eq!(Config::parse(DEFAULT).unwrap().shm.waiter, "auto");
        for w in ["io_uring", "epoll"] {
            let c = DEFAULT.replace("waiter = \"auto\"", &format!("waiter = \"{w}\""));
            assert_eq!(Config::parse(&c).unwrap().shm.waiter, w);
        }
        let bad = DEFAULT.replace("waiter = \"auto\"", "waiter = \"kqueue\"");
        assert!(Config::parse(&bad).unwrap_err().contains("shm.waiter"));
        // Older files without the settings still parse (auto, drivers = 0).
        let old = DEFAULT
            .replace("waiter = \"auto\"\n", "")
            .replace("drivers = 0\n", "");
        let c = Config::parse(&old).unwrap();
        assert_eq!((c.shm.waiter.as_str(), c.shm.drivers), ("auto", 0));
    }

    #[test]
    fn access_rules_parse() {
        let text = DEFAULT
            .replace("tcp = \"127.0.0.1:15001\"", "tcp = \"\"")
            .replace("allowed_uids = []", "allowed_uids = [0, 1000]");
        let c = Config::parse(&format!(
            "{text}\n[access.call]\n\"1000\" = [\"echo\"]\n\"*\" = []\n[access.serve]\n\"1000\" = [\"*\"]\n"
        ))
        .unwrap();
        assert_eq!(c.listen.allowed_uids, vec![0, 1000]);
        assert_eq!(c.access.call["1000"], vec!["echo".to_owned()]);
        assert!(c.access.call["*"].is_empty());
    }
}
