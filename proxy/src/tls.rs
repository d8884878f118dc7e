//! Mutual TLS between proxies (docs/SECURITY.md).
//!
//! - The TCP listener runs in one of three modes: `disabled` (plaintext
//!   only, as before), `permissive` (the first bytes of a connection tell a
//!   TLS ClientHello from a plaintext meshshm frame; both are served and
//!   plaintext connections are counted) or `strict` (plaintext is refused:
//!   requests already sent are answered with PERMISSION_DENIED and the
//!   reason, then the connection is closed).
//! - Each `proxy:HOST:PORT` upstream has a mode too: `disabled`
//!   (plaintext), `strict` (mutual TLS or nothing) or `permissive` (mutual
//!   TLS, falling back to plaintext when the peer does not speak TLS at all;
//!   never when it presents a bad certificate).
//! - Both sides present the proxy's certificate and verify the peer's
//!   against the trust bundle (expiry included). The verified identity (URI
//!   SANs such as `spiffe://example.org/svc/checkout`, and DNS SANs) is
//!   attached to the TCP session; `[[tls.allow]]` rules use it.
//! - The certificate, key and trust bundle files are polled; on a change the
//!   new material is loaded, checked, and swapped in atomically for new
//!   connections. Bad new material is refused and the old stays in force.
//!   Open connections are not touched.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use meshshm_proto::{encode_frame, status, RequestMeta, ResponseMeta};
use meshshm_ring::{FrameHeader, FrameKind, HEADER_LEN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Shared;

/// How a listener or an upstream treats TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Plaintext only.
    #[default]
    Disabled,
    /// Listener: TLS and plaintext (counted). Upstream: TLS, falling back to
    /// plaintext when the peer does not speak TLS.
    Permissive,
    /// TLS only.
    Strict,
}

/// What an `[[tls.allow]]` rule does with a call it does not allow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleMode {
    /// Deny it (PERMISSION_DENIED).
    #[default]
    Enforce,
    /// Let it through, but log and count it.
    DryRun,
}

/// The `[tls]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Mode of the TCP listener.
    #[serde(default)]
    pub mode: Mode,
    /// This proxy's certificate chain (PEM, leaf first).
    #[serde(default)]
    pub cert: String,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[serde(default)]
    pub key: String,
    /// Trust bundle: the CA certificates peers' certificates must chain to (PEM).
    #[serde(default)]
    pub ca: String,
    /// How often the three files are checked for changes (ms; 0 = never).
    #[serde(default = "default_reload_ms")]
    pub reload_ms: u64,
    /// How long a TLS handshake may take (ms), on either side.
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
    /// Mode of `proxy:HOST:PORT` upstreams without an entry in `upstream`.
    #[serde(default)]
    pub upstream_mode: Mode,
    /// Per upstream proxy ("HOST:PORT", as in the route): mode and expected identity.
    #[serde(default)]
    pub upstream: BTreeMap<String, UpstreamConfig>,
    /// Identity-based rules for calls arriving on the TCP listener.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            mode: Mode::Disabled,
            cert: String::new(),
            key: String::new(),
            ca: String::new(),
            reload_ms: default_reload_ms(),
            handshake_timeout_ms: default_handshake_ms(),
            upstream_mode: Mode::Disabled,
            upstream: BTreeMap::new(),
            allow: Vec::new(),
        }
    }
}

fn default_reload_ms() -> u64 {
    1000
}

fn default_handshake_ms() -> u64 {
    5000
}

/// `[tls.upstream."HOST:PORT"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub mode: Mode,
    /// The identity the upstream must present (a URI or DNS SAN; a pattern
    /// ending in `/*` matches a prefix). Empty: any certificate that chains
    /// to the trust bundle.
    #[serde(default)]
    pub identity: String,
}

/// `[[tls.allow]]`: `identity` may call `services` over the TCP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// A URI or DNS SAN, exactly, or a prefix ending in `/*`.
    pub identity: String,
    /// Service names, or "*" for all.
    pub services: Vec<String>,
    #[serde(default)]
    pub mode: RuleMode,
}

impl TlsConfig {
    /// Whether anything uses TLS (and so needs cert, key and trust bundle).
    pub fn enabled(&self) -> bool {
        self.mode != Mode::Disabled
            || self.upstream_mode != Mode::Disabled
            || self.upstream.values().any(|u| u.mode != Mode::Disabled)
    }

    /// Check the section (the files themselves are read by [`Tls::new`]).
    pub fn check(&self) -> Result<(), String> {
        if self.enabled() {
            for (what, v) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
                if v.is_empty() {
                    return Err(format!("tls.{what} must name a file when TLS is in use"));
                }
            }
        }
        for k in self.upstream.keys() {
            k.parse::<SocketAddr>()
                .map_err(|e| format!("tls.upstream.{k:?}: not HOST:PORT: {e}"))?;
        }
        if !self.allow.is_empty() && self.mode == Mode::Disabled {
            return Err("tls.allow rules need verified identities: set tls.mode to \
                        \"permissive\" or \"strict\""
                .into());
        }
        for (i, r) in self.allow.iter().enumerate() {
            if r.identity.is_empty() || r.services.is_empty() {
                return Err(format!(
                    "tls.allow[{i}]: identity and services must not be empty"
                ));
            }
        }
        if self.handshake_timeout_ms == 0 {
            return Err("tls.handshake_timeout_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// The verified identity of a TLS peer: the SANs of its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SANs (SPIFFE IDs).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
}

impl PeerIdentity {
    /// The SANs of a certificate (empty if it cannot be parsed).
    pub fn of(cert: &CertificateDer<'_>) -> PeerIdentity {
        use x509_parser::extensions::GeneralName;
        let mut id = PeerIdentity::default();
        if let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
            if let Ok(Some(san)) = c.subject_alternative_name() {
                for n in &san.value.general_names {
                    match n {
                        GeneralName::URI(u) => id.uris.push((*u).to_owned()),
                        GeneralName::DNSName(d) => id.dns.push((*d).to_owned()),
                        _ => {}
                    }
                }
            }
        }
        id
    }

    /// The name to show: the first URI SAN, else the first DNS SAN.
    pub fn name(&self) -> &str {
        self.uris
            .first()
            .or(self.dns.first())
            .map_or("(no SAN)", String::as_str)
    }

    /// Whether one of the SANs is `pattern` (or, for a pattern ending in
    /// `/*`, starts with what comes before the `*`).
    pub fn matches(&self, pattern: &str) -> bool {
        let mut all = self.uris.iter().chain(&self.dns);
        match pattern.strip_suffix('*').filter(|p| p.ends_with('/')) {
            Some(prefix) => all.any(|s| s.starts_with(prefix)),
            None => all.any(|s| s == pattern),
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters (logged in a `tls stats` line when they change; Prometheus
/// metrics come with the admin port).
#[derive(Debug, Default)]
pub struct Stats {
    pub tls_accepted: AtomicU64,
    pub tls_refused: AtomicU64,
    pub plaintext_accepted: AtomicU64,
    pub plaintext_refused: AtomicU64,
    pub denied: AtomicU64,
    pub would_deny: AtomicU64,
    pub upstream_tls: AtomicU64,
    pub upstream_refused: AtomicU64,
    pub upstream_plaintext_fallback: AtomicU64,
    pub reloads: AtomicU64,
    pub reloads_refused: AtomicU64,
}

impl Stats {
    fn bump(c: &AtomicU64) -> u64 {
        c.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `name=value` pairs, space-separated.
    pub fn line(&self) -> String {
        let f = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tls_accepted={} tls_refused={} plaintext_accepted={} plaintext_refused={} \
             denied={} would_deny={} upstream_tls={} upstream_refused={} \
             upstream_plaintext_fallback={} reloads={} reloads_refused={}",
            f(&self.tls_accepted),
            f(&self.tls_refused),
            f(&self.plaintext_accepted),
            f(&self.plaintext_refused),
            f(&self.denied),
            f(&self.would_deny),
            f(&self.upstream_tls),
            f(&self.upstream_refused),
            f(&self.upstream_plaintext_fallback),
            f(&self.reloads),
            f(&self.reloads_refused),
        )
    }
}

/// Log the first few events of a kind, then every 1000th.
fn worth_logging(n: u64) -> bool {
    n <= 10 || n % 1000 == 0
}

/// What identifies one version of a file: a change of any part is a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: Option<std::time::SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &str) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        mtime: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// One loaded version of the certificate, key and trust bundle.
struct Material {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The proxy's own identity and the certificate's serial, for logs.
    own: PeerIdentity,
    serial: String,
}

/// The proxy's TLS state: configuration, current material, counters, rules.
pub struct Tls {
    cfg: TlsConfig,
    provider: Arc<CryptoProvider>,
    material: RwLock<Option<Arc<Material>>>,
    stamps: std::sync::Mutex<[Option<Stamp>; 3]>,
    upstreams: HashMap<SocketAddr, UpstreamConfig>,
    /// Problems found at start, logged once logging is up.
    startup_warnings: std::sync::Mutex<Vec<String>>,
    pub stats: Stats,
}

/// A certificate verifier for the client side: the chain must end in the
/// trust bundle and be valid now, for server authentication. The host name
/// is not checked (peers are addressed by IP; the identity that matters is
/// the SAN, checked after the handshake against the upstream's `identity`).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn read(path: &str, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls.{what} = {path:?}: {e}"))
}

/// Certificates in a PEM file (at least one).
fn certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let v = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.{what} = {path:?}: {e}"))?;
    if v.is_empty() {
        return Err(format!("tls.{what} = {path:?}: no certificate in the file"));
    }
    Ok(v)
}

impl Tls {
    /// Read the files named by the configuration (if TLS is in use) and
    /// build the first TLS configurations. Unreadable files, a key that does
    /// not match the certificate or an empty bundle are errors. A
    /// certificate that is expired or does not chain to the bundle is
    /// logged loudly but used: peers will refuse it, local traffic flows.
    ///
    /// # Errors
    /// A message naming the file and the problem.
    pub fn new(cfg: &TlsConfig) -> Result<Arc<Tls>, String> {
        let tls = Tls {
            cfg: cfg.clone(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            material: RwLock::new(None),
            stamps: std::sync::Mutex::new([None; 3]),
            upstreams: cfg
                .upstream
                .iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.clone())))
                .collect(),
            startup_warnings: std::sync::Mutex::new(Vec::new()),
            stats: Stats::default(),
        };
        if cfg.enabled() {
            let st = tls.current_stamps();
            let (m, problem) = tls.load()?;
            if let Some(p) = problem {
                tls.startup_warnings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!(
                        "this proxy's certificate will be refused by peers: {p}"
                    ));
            }
            *tls.material.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(m));
            *tls.stamps.lock().unwrap_or_else(|p| p.into_inner()) = st;
        }
        Ok(Arc::new(tls))
    }

    /// The listener's mode.
    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }

    fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.handshake_timeout_ms)
    }

    fn current(&self) -> Option<Arc<Material>> {
        self.material
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn current_stamps(&self) -> [Option<Stamp>; 3] {
        [
            stamp(&self.cfg.cert),
            stamp(&self.cfg.key),
            stamp(&self.cfg.ca),
        ]
    }

    /// Load and check the files. `Err`: unusable (parse error, key
    /// mismatch). `Ok((m, Some(problem)))`: usable, but the certificate is
    /// not valid now against the bundle (expired, not yet valid, another CA,
    /// wrong key usage).
    fn load(&self) -> Result<(Material, Option<String>), String> {
        let c = &self.cfg;
        let chain = certs(&c.cert, "cert")?;
        let key_pem = read(&c.key, "key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("tls.key = {:?}: {e}", c.key))?;
        let mut roots = RootCertStore::empty();
        for ca in certs(&c.ca, "ca")? {
            roots
                .add(ca)
                .map_err(|e| format!("tls.ca = {:?}: {e}", c.ca))?;
        }
        let roots = Arc::new(roots);
        let certified =
            rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &self.provider)
                .map_err(|e| {
                    format!(
                        "tls.cert = {:?} and tls.key = {:?} do not go together: {e}",
                        c.cert, c.key
                    )
                })?;
        drop(certified);

        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| format!("tls.ca = {:?}: {e}", c.ca))?;
        // Our own certificate must be good for both roles, now.
        let now = UnixTime::now();
        let mut problem = None;
        if let Err(e) = verifier.verify_client_cert(&chain[0], &chain[1..], now) {
            problem = Some(format!("as a client certificate: {e}"));
        } else {
            let parsed = ParsedCertificate::try_from(&chain[0]).map_err(|e| e.to_string())?;
            if let Err(e) = verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &roots,
                &chain[1..],
                now,
                self.provider.signature_verification_algorithms.all,
            ) {
                problem = Some(format!("as a server certificate: {e}"));
            }
        }

        let mut server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("tls.cert = {:?}: {e}", c.cert))?;
        // Every connection is verified in full against the current bundle:
        // no resumption that would carry an old verification forward.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let mut client = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots,
                provider: self.provider.clone(),
            }))
            .with_client_auth_cert(chain.clone(), key)
            .map_err(|e| format!("tls.cert = {:?}: {e}", c.cert))?;
        client.resumption = Resumption::disabled();

        let serial = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map(|(_, x)| x.raw_serial_as_string())
            .unwrap_or_default();
        Ok((
            Material {
                server: Arc::new(server),
                client: Arc::new(client),
                own: PeerIdentity::of(&chain[0]),
                serial,
            },
            problem,
        ))
    }

    /// Reload if a file changed. New material replaces the old only if it
    /// loads and the certificate is valid now against the bundle.
    fn maybe_reload(&self) {
        let now = self.current_stamps();
        {
            let mut st = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *st == now {
                return;
            }
            // Stamps are taken before reading: a write after this point
            // changes them again and brings another attempt.
            *st = now;
        }
        match self.load() {
            Ok((m, None)) => {
                tracing::info!(
                    identity = %m.own,
                    serial = %m.serial,
                    "tls: new certificate, key and trust bundle loaded; new connections use them"
                );
                *self.material.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(m));
                Stats::bump(&self.stats.reloads);
            }
            Ok((_, Some(problem))) => {
                Stats::bump(&self.stats.reloads_refused);
                tracing::error!(%problem, "tls: new certificate refused; the old one stays in force");
            }
            Err(e) => {
                Stats::bump(&self.stats.reloads_refused);
                tracing::error!(error = %e, "tls: new files refused; the old ones stay in force");
            }
        }
    }

    /// Watch the files and log the counters when they change. Runs for the
    /// life of the process.
    pub async fn watch(self: Arc<Self>) {
        for w in std::mem::take(
            &mut *self
                .startup_warnings
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
            tracing::error!("tls: {w}");
        }
        if let Some(m) = self.current() {
            tracing::info!(
                identity = %m.own,
                serial = %m.serial,
                mode = ?self.cfg.mode,
                upstream_mode = ?self.cfg.upstream_mode,
                "tls: certificate loaded"
            );
        }
        let period = Duration::from_millis(if self.cfg.reload_ms == 0 {
            1000
        } else {
            self.cfg.reload_ms
        });
        if !self.cfg.enabled() {
            return;
        }
        let mut last = self.stats.line();
        loop {
            tokio::time::sleep(period).await;
            if self.cfg.reload_ms > 0 {
                self.maybe_reload();
            }
            let line = self.stats.line();
            if line != last {
                tracing::info!("tls stats {line}");
                last = line;
            }
        }
    }

    /// The decision of the `[[tls.allow]]` rules on a call to `service` by
    /// `who` (`None`: a plaintext peer). `None`: allowed.
    fn deny_reason(&self, who: Option<&PeerIdentity>, service: &str) -> Option<(RuleMode, String)> {
        let mut guarded = false;
        let mut enforced = false;
        for r in &self.cfg.allow {
            if r.services.iter().any(|s| s == "*" || s == service) {
                guarded = true;
                enforced |= r.mode == RuleMode::Enforce;
                if who.is_some_and(|w| w.matches(&r.identity)) {
                    return None;
                }
            }
        }
        if !guarded {
            return None;
        }
        let who = who.map_or("a plaintext peer".to_owned(), |w| format!("{:?}", w.name()));
        let why = format!("{who} may not call service {service:?} (tls.allow)");
        Some((
            if enforced {
                RuleMode::Enforce
            } else {
                RuleMode::DryRun
            },
            why,
        ))
    }

    /// Apply the `[[tls.allow]]` rules to a request arriving on the TCP
    /// listener from `who`. `Some(response)`: denied, answer this.
    pub fn check_call(
        &self,
        who: Option<&PeerIdentity>,
        meta: &[u8],
    ) -> Option<crate::router::Resp> {
        if self.cfg.allow.is_empty() {
            return None;
        }
        // Malformed metadata is the dispatcher's to answer.
        let m = RequestMeta::decode(meta).ok()?;
        let (mode, why) = self.deny_reason(who, m.service)?;
        match mode {
            RuleMode::Enforce => {
                let n = Stats::bump(&self.stats.denied);
                if worth_logging(n) {
                    tracing::warn!(count = n, reason = %why, "tls: call denied");
                }
                Some(crate::router::Resp::error(status::PERMISSION_DENIED, &why))
            }
            RuleMode::DryRun => {
                let n = Stats::bump(&self.stats.would_deny);
                if worth_logging(n) {
                    tracing::warn!(count = n, reason = %why, "tls: call would be denied (dry-run): allowed");
                }
                None
            }
        }
    }

    /// How connections to the upstream proxy at `addr` are made.
    pub fn upstream(self: &Arc<Self>, addr: SocketAddr) -> Upstream {
        let (mode, identity) = match self.upstreams.get(&addr) {
            Some(u) => (u.mode, u.identity.clone()),
            None => (self.cfg.upstream_mode, String::new()),
        };
        Upstream {
            tls: self.clone(),
            addr,
            mode,
            identity,
        }
    }
}

/// The read and write halves of a connection to an upstream proxy,
/// plaintext or TLS.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// See [`Reader`].
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// How to connect to one upstream proxy.
pub struct Upstream {
    tls: Arc<Tls>,
    addr: SocketAddr,
    mode: Mode,
    identity: String,
}

/// Whether a failed client handshake means "the peer does not speak TLS"
/// (a permissive upstream then falls back to plaintext), as opposed to a
/// refusal of a certificate (never a reason to fall back).
fn peer_not_tls(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidMessage(_)) => true,
        Some(_) => false,
        None => matches!(
            e.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
        ),
    }
}

async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr} timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn plain(s: TcpStream) -> (Reader, Writer) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(w))
}

impl Upstream {
    /// Permissive mode, the peer does not speak TLS: plaintext, counted.
    async fn fallback(&self, why: &str) -> Result<(Reader, Writer), String> {
        let n = Stats::bump(&self.tls.stats.upstream_plaintext_fallback);
        if worth_logging(n) {
            tracing::warn!(upstream = %self.addr, error = why, count = n,
                "tls: upstream does not speak TLS; plaintext (upstream mode permissive)");
        }
        Ok(plain(tcp_connect(self.addr).await?))
    }

    /// Open a connection in this upstream's mode.
    ///
    /// # Errors
    /// Connect failures, handshake failures (with rustls's reason), an
    /// unexpected peer identity.
    pub async fn connect(&self) -> Result<(Reader, Writer), String> {
        let addr = self.addr;
        let s = tcp_connect(addr).await?;
        if self.mode == Mode::Disabled {
            return Ok(plain(s));
        }
        let m = self
            .tls
            .current()
            .ok_or_else(|| format!("tls to {addr}: no certificate loaded"))?;
        let connector = tokio_rustls::TlsConnector::from(m.client.clone());
        let name = ServerName::IpAddress(addr.ip().into());
        let stats = &self.tls.stats;
        let r =
            tokio::time::timeout(self.tls.handshake_timeout(), connector.connect(name, s)).await;
        let ts = match r {
            Ok(Ok(ts)) => ts,
            Ok(Err(e)) if self.mode == Mode::Permissive && peer_not_tls(&e) => {
                return self.fallback(&e.to_string()).await;
            }
            // A plaintext peer may also read the ClientHello as the start of
            // a long frame and wait for the rest.
            Err(_) if self.mode == Mode::Permissive => {
                return self.fallback("handshake timed out").await;
            }
            Ok(Err(e)) => {
                let n = Stats::bump(&stats.upstream_refused);
                if worth_logging(n) {
                    tracing::warn!(upstream = %addr, error = %e, count = n, "tls: handshake with upstream failed");
                }
                return Err(format!("tls handshake with {addr}: {e}"));
            }
            Err(_) => {
                Stats::bump(&stats.upstream_refused);
                return Err(format!("tls handshake with {addr} timed out"));
            }
        };
        let peer = ts
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(PeerIdentity::of)
            .unwrap_or_default();
        if !self.identity.is_empty() && !peer.matches(&self.identity) {
            Stats::bump(&stats.upstream_refused);
            tracing::warn!(upstream = %addr, identity = %peer, expected = %self.identity,
                "tls: upstream presented another identity; closing");
            return Err(format!(
                "tls to {addr}: the upstream is {:?}, expected {:?}",
                peer.name(),
                self.identity
            ));
        }
        Stats::bump(&stats.upstream_tls);
        tracing::debug!(upstream = %addr, identity = %peer, "tls: upstream connection up");
        let (r, w) = tokio::io::split(ts);
        Ok((Box::new(r), Box::new(w)))
    }
}

/// What the first bytes of a connection look like.
enum Sniffed {
    Tls,
    Plaintext,
    Closed,
}

/// Tell a TLS ClientHello (record type 0x16, version 0x03xx, handshake
/// type 1 at byte 5) from a meshshm frame (a little-endian length, then a
/// kind and flags byte: meshshm encoders never set flags on a stream, so
/// byte 5 is 0). One byte that is not 0x16 is enough to decide.
async fn sniff(s: &TcpStream, timeout: Duration) -> std::io::Result<Sniffed> {
    let t0 = Instant::now();
    let mut b = [0u8; 6];
    loop {
        let n = s.peek(&mut b).await?;
        if n == 0 {
            return Ok(Sniffed::Closed);
        }
        if b[0] != 0x16 || (n >= 2 && b[1] != 0x03) {
            return Ok(Sniffed::Plaintext);
        }
        if n >= 6 {
            return Ok(if b[2] <= 0x04 && b[5] == 0x01 {
                Sniffed::Tls
            } else {
                Sniffed::Plaintext
            });
        }
        // A partial header: rare (the peer's first write was split). Wait.
        if t0.elapsed() > timeout {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "first bytes did not arrive in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serve one accepted TCP connection according to the listener's mode.
pub async fn accept(sh: Arc<Shared>, s: TcpStream, id: u64, mut shutdown: watch::Receiver<bool>) {
    let peer = s.peer_addr().ok();
    let _ = s.set_nodelay(true);
    let tls = sh.tls.clone();
    let mode = tls.mode();
    if mode == Mode::Disabled {
        return crate::tcp::serve(sh, s, peer, None, id, shutdown).await;
    }
    let sniffed = tokio::select! {
        r = sniff(&s, tls.handshake_timeout()) => r,
        _ = shutdown.changed() => return,
    };
    let stats = &tls.stats;
    match sniffed {
        Ok(Sniffed::Closed) => {}
        Err(e) => {
            tracing::debug!(session = id, ?peer, error = %e, "tcp connection dropped before its first bytes")
        }
        Ok(Sniffed::Plaintext) if mode == Mode::Permissive => {
            let n = Stats::bump(&stats.plaintext_accepted);
            if worth_logging(n) {
                tracing::info!(
                    session = id,
                    ?peer,
                    count = n,
                    "tls: plaintext connection accepted (tls.mode = permissive)"
                );
            }
            crate::tcp::serve(sh, s, peer, None, id, shutdown).await
        }
        Ok(Sniffed::Plaintext) => {
            let n = Stats::bump(&stats.plaintext_refused);
            let reason = "plaintext connection refused: this proxy's TCP listener requires \
                          mutual TLS (tls.mode = strict)";
            if worth_logging(n) {
                tracing::warn!(session = id, ?peer, count = n, "tls: {reason}");
            }
            refuse_plaintext(s, reason).await
        }
        Ok(Sniffed::Tls) => {
            let Some(m) = tls.current() else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(m.server.clone());
            match tokio::time::timeout(tls.handshake_timeout(), acceptor.accept(s)).await {
                Ok(Ok(ts)) => {
                    let who = ts
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(PeerIdentity::of)
                        .unwrap_or_default();
                    Stats::bump(&stats.tls_accepted);
                    tracing::info!(session = id, ?peer, identity = %who, "tls: mutual TLS session up");
                    crate::tcp::serve(sh, ts, peer, Some(Arc::new(who)), id, shutdown).await
                }
                Ok(Err(e)) => {
                    let n = Stats::bump(&stats.tls_refused);
                    if worth_logging(n) {
                        tracing::warn!(session = id, ?peer, error = %e, count = n, "tls: handshake refused");
                    }
                }
                Err(_) => {
                    let n = Stats::bump(&stats.tls_refused);
                    if worth_logging(n) {
                        tracing::warn!(session = id, ?peer, count = n, "tls: handshake timed out");
                    }
                }
            }
        }
    }
}

/// Answer a plaintext peer of a strict listener: its first request (if it
/// is one) gets PERMISSION_DENIED with `reason`, then a Goaway, then the
/// connection closes. The reason thus reaches the calling app through the
/// peer proxy instead of a bare "connection lost".
async fn refuse_plaintext(mut s: TcpStream, reason: &str) {
    let mut buf = Vec::with_capacity(HEADER_LEN);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while buf.len() < HEADER_LEN {
        let mut chunk = [0u8; HEADER_LEN];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk[..HEADER_LEN - buf.len()])).await
        {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let mut out = Vec::new();
    let mut hdr = [0u8; HEADER_LEN];
    hdr.copy_from_slice(&buf);
    if let Ok(h) = FrameHeader::decode(&hdr) {
        if h.kind == FrameKind::Request {
            let mut meta = Vec::new();
            ResponseMeta::encode(&mut meta, status::PERMISSION_DENIED, reason, &[]);
            encode_frame(
                &mut out,
                FrameKind::Response,
                h.stream_id,
                meta.len(),
                &[&meta],
            );
        }
    }
    encode_frame(&mut out, FrameKind::Goaway, 0, 0, &[]);
    if s.write_all(&out).await.is_err() {
        return;
    }
    let _ = s.shutdown().await;
    // Drain briefly so that closing with unread bytes does not reset the
    // connection before the peer has read the answer.
    let mut sink = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while total < (4 << 20) {
        match tokio::time::timeout_at(deadline + Duration::from_millis(500), s.read(&mut sink))
            .await
        {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uris: &[&str], dns: &[&str]) -> PeerIdentity {
        PeerIdentity {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn identity_matching() {
        let a = id(
            &["spiffe://example.org/svc/checkout"],
            &["checkout.example.org"],
        );
        assert!(a.matches("spiffe://example.org/svc/checkout"));
        assert!(a.matches("checkout.example.org"));
        assert!(a.matches("spiffe://example.org/*"));
        assert!(!a.matches("spiffe://example.org/svc/check"));
        assert!(!a.matches("spiffe://other.org/*"));
        assert_eq!(a.name(), "spiffe://example.org/svc/checkout");
    }

    fn cfg(text: &str) -> TlsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn allow_rules() {
        let c = cfg(r#"
            mode = "strict"
            cert = "c"
            key = "k"
            ca = "a"
            [[allow]]
            identity = "spiffe://example.org/svc/checkout"
            services = ["payment"]
            [[allow]]
            identity = "spiffe://example.org/svc/ops"
            services = ["audit"]
            mode = "dry-run"
        "#);
        c.check().unwrap();
        let t = Tls {
            cfg: c,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            material: RwLock::new(None),
            stamps: std::sync::Mutex::new([None; 3]),
            upstreams: HashMap::new(),
            startup_warnings: std::sync::Mutex::new(Vec::new()),
            stats: Stats::default(),
        };
        let checkout = id(&["spiffe://example.org/svc/checkout"], &[]);
        let other = id(&["spiffe://example.org/svc/web"], &[]);
        assert!(t.deny_reason(Some(&checkout), "payment").is_none());
        assert_eq!(
            t.deny_reason(Some(&other), "payment").map(|d| d.0),
            Some(RuleMode::Enforce)
        );
        assert_eq!(
            t.deny_reason(None, "payment").map(|d| d.0),
            Some(RuleMode::Enforce)
        );
        assert!(t.deny_reason(Some(&other), "echo").is_none());
        assert_eq!(
            t.deny_reason(Some(&other), "audit").map(|d| d.0),
            Some(RuleMode::DryRun)
        );
    }

    #[test]
    fn config_checks() {
        assert!(cfg("mode = \"strict\"")
            .check()
            .unwrap_err()
            .contains("tls.cert"));
        assert!(cfg("[upstream.\"nope\"]\nmode = \"strict\"\n")
            .check()
            .is_err());
        let e = cfg("[[allow]]\nidentity = \"x\"\nservices = [\"y\"]\n")
            .check()
            .unwrap_err();
        assert!(e.contains("tls.mode"), "{e}");
        assert!(toml::from_str::<TlsConfig>("mode = \"sometimes\"").is_err());
        assert!(TlsConfig::default().check().is_ok());
    }
}
