//! The checked-in C header must be what cbindgen generates from the source
//! (rustls-ffi's "ensure-header-updated"). `MESHSHM_BLESS=1 cargo test -p
//! meshshm-ffi --test header` rewrites it.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = dir.join("include/meshshm.h");
    if std::env::var_os("MESHSHM_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/meshshm.h");
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "ffi/include/meshshm.h is stale: regenerate it with \
         `MESHSHM_BLESS=1 cargo test -p meshshm-ffi --test header` and commit it"
    );
}
