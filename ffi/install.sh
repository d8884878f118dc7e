#!/usr/bin/env bash
# Build libmeshshm (release) and install it under PREFIX:
#   PREFIX/lib/libmeshshm.so.<version>, libmeshshm.so.0 -> it, libmeshshm.so -> it,
#   PREFIX/lib/libmeshshm.a, PREFIX/include/meshshm.h, PREFIX/lib/pkgconfig/meshshm.pc
#
# usage: ffi/install.sh PREFIX            (e.g. /usr/local, or $HOME/.local)
#        PROFILE=debug ffi/install.sh PREFIX   (install a debug build instead)
#        NO_BUILD=1 ffi/install.sh PREFIX      (install what target/ holds already)
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 PREFIX" >&2
    exit 64
fi
prefix=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
profile=${PROFILE:-release}
libdir="$prefix/lib"

if [ -z "${NO_BUILD:-}" ]; then
    if [ "$profile" = release ]; then
        (cd "$root" && cargo build --release -p meshshm-ffi)
    else
        (cd "$root" && cargo build --profile "$profile" -p meshshm-ffi)
    fi
fi
target_dir=${CARGO_TARGET_DIR:-$root/target}
out="$target_dir/$profile"
[ "$profile" = dev ] && out="$target_dir/debug"

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
abi=$(sed -n 's/.*-soname,libmeshshm\.so\.\([0-9]*\).*/\1/p' "$here/build.rs" | head -n1)

install -d "$libdir" "$libdir/pkgconfig" "$prefix/include"
install -m 0755 "$out/libmeshshm.so" "$libdir/libmeshshm.so.$version"
ln -sfn "libmeshshm.so.$version" "$libdir/libmeshshm.so.$abi"
ln -sfn "libmeshshm.so.$abi" "$libdir/libmeshshm.so"
install -m 0644 "$out/libmeshshm.a" "$libdir/libmeshshm.a"
install -m 0644 "$here/include/meshshm.h" "$prefix/include/meshshm.h"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@LIBDIR@|$libdir|g" -e "s|@VERSION@|$version|g" \
    "$here/meshshm.pc.in" >"$libdir/pkgconfig/meshshm.pc"

echo "installed libmeshshm $version (soname libmeshshm.so.$abi) under $prefix"
echo "  export PKG_CONFIG_PATH=$libdir/pkgconfig:\${PKG_CONFIG_PATH:-}"
echo "  export LD_LIBRARY_PATH=$libdir:\${LD_LIBRARY_PATH:-}   # unless $libdir is in ld.so's path"
