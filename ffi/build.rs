//! Gives libmeshshm.so its versioned soname (the ABI major version).

fn main() {
    // Bump together with MESHSHM_ABI_VERSION in src/lib.rs and meshshm.pc.in
    // whenever a released signature or struct layout changes.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmeshshm.so.0");
    println!("cargo:rerun-if-changed=build.rs");
}
