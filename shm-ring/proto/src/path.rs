use std::path::PathBuf;

/// The control socket's default path, the same rule for proxy, shim and CLI:
/// `$MESHSHM_SOCKET` if set, else `$XDG_RUNTIME_DIR/meshshm/proxy.sock`, else
/// `/tmp/meshshm-<uid>/proxy.sock`. (The proxy creates the directory with
/// mode 0700.)
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHSHM_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(d).join("meshshm").join("proxy.sock");
    }
    PathBuf::from(format!("/tmp/meshshm-{}/proxy.sock", nix::unistd::getuid()))
}
