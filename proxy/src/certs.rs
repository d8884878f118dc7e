//! `meshshm-proxy certs`: a throwaway CA and per-proxy certificates for
//! tests and the quick start (docs/SECURITY.md), so that no one needs
//! openssl to try mutual TLS.
//!
//! Each certificate names its proxy twice: a SPIFFE-style URI SAN
//! `spiffe://<trust-domain>/svc/<name>` and a DNS SAN
//! `<name>.<trust-domain>`; it is good for both server and client
//! authentication (a proxy is both). Files are written atomically (temporary
//! file, then rename), keys with mode 0600, so that writing into a running
//! proxy's certificate directory is a clean rotation.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Subcommands of `meshshm-proxy`.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Generate a throwaway CA and per-proxy certificates (for tests and trying mTLS).
    Certs(CertsArgs),
}

/// `meshshm-proxy certs`.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory to write into (created if missing): ca.pem (+ ca.key for a
    /// new CA), NAME.pem and NAME.key for each --name.
    #[arg(long)]
    pub out: PathBuf,
    /// Trust domain of the identities.
    #[arg(long, default_value = "example.org")]
    pub trust_domain: String,
    /// A proxy (service) to issue a certificate for; repeat for more.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Sign with this existing CA certificate (PEM) instead of making a new CA.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The existing CA's private key (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Validity of the issued certificates, in days.
    #[arg(long, default_value_t = 365)]
    pub days: i64,
    /// Issue certificates that have already expired (for tests).
    #[arg(long)]
    pub expired: bool,
}

/// Write `data` to `path` atomically, with `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

fn generate(a: &CertsArgs) -> Result<Vec<String>, String> {
    let td = &a.trust_domain;
    if td.is_empty() || !td.split('.').all(valid_name) {
        return Err(format!(
            "--trust-domain {td:?}: expected a DNS name such as example.org"
        ));
    }
    if a.names.is_empty() {
        return Err("give at least one --name".into());
    }
    for n in &a.names {
        if !valid_name(n) {
            return Err(format!(
                "--name {n:?}: use lowercase letters, digits and '-' (it becomes a DNS label)"
            ));
        }
    }
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let err = |e: rcgen::Error| e.to_string();
    let now = OffsetDateTime::now_utc();
    let mut wrote = Vec::new();

    let (issuer, ca_pem): (Issuer<'static, KeyPair>, String) = match (&a.ca_cert, &a.ca_key) {
        (Some(c), Some(k)) => {
            let pem = std::fs::read_to_string(c).map_err(|e| format!("{}: {e}", c.display()))?;
            let key = std::fs::read_to_string(k).map_err(|e| format!("{}: {e}", k.display()))?;
            let key = KeyPair::from_pem(&key).map_err(|e| format!("{}: {e}", k.display()))?;
            let issuer =
                Issuer::from_ca_cert_pem(&pem, key).map_err(|e| format!("{}: {e}", c.display()))?;
            (issuer, pem)
        }
        _ => {
            let key = KeyPair::generate().map_err(err)?;
            let key_pem = key.serialize_pem();
            let mut p = CertificateParams::default();
            // Two throwaway CAs must not share a name: a tag from the key.
            let tag = key
                .public_key_raw()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                }) as u32;
            p.distinguished_name.push(
                DnType::CommonName,
                format!("meshshm test CA for {td} {tag:08x}"),
            );
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p.not_before = now - Duration::days(1);
            p.not_after = now + Duration::days(3650);
            let ca = CertifiedIssuer::self_signed(p, key).map_err(err)?;
            let pem = ca.pem();
            let key_path = a.out.join("ca.key");
            write_file(&key_path, key_pem.as_bytes(), 0o600)?;
            wrote.push(key_path.display().to_string());
            // CertifiedIssuer derefs to its Issuer; rebuild an owned one.
            let issuer = Issuer::from_ca_cert_pem(&pem, KeyPair::from_pem(&key_pem).map_err(err)?)
                .map_err(err)?;
            (issuer, pem)
        }
    };
    let ca_path = a.out.join("ca.pem");
    write_file(&ca_path, ca_pem.as_bytes(), 0o644)?;
    wrote.push(ca_path.display().to_string());

    for n in &a.names {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, n.clone());
        p.subject_alt_names = vec![
            SanType::URI(format!("spiffe://{td}/svc/{n}").try_into().map_err(err)?),
            SanType::DnsName(format!("{n}.{td}").try_into().map_err(err)?),
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        if a.expired {
            p.not_before = now - Duration::days(30);
            p.not_after = now - Duration::days(1);
        } else {
            p.not_before = now - Duration::minutes(5);
            p.not_after = now + Duration::days(a.days.max(1));
        }
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        let key_path = a.out.join(format!("{n}.key"));
        let cert_path = a.out.join(format!("{n}.pem"));
        // Key first: a proxy watching these files sees a key that does not
        // match the old certificate, refuses it, and loads both once the
        // certificate follows.
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        wrote.push(format!(
            "{} and {}: spiffe://{td}/svc/{n}, dns {n}.{td}{}",
            cert_path.display(),
            key_path.display(),
            if a.expired { ", EXPIRED" } else { "" }
        ));
    }
    Ok(wrote)
}

/// Run `meshshm-proxy certs`.
pub fn run(a: &CertsArgs) -> ExitCode {
    match generate(a) {
        Ok(files) => {
            for f in files {
                println!("wrote {f}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshshm-proxy certs: {e}");
            ExitCode::from(64)
        }
    }
}
