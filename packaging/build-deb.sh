#!/usr/bin/env bash
# Builds the Debian package fkr-qemu_<version>_<arch>.deb from this repository with dpkg-deb alone
# (no debhelper, no cargo-deb: nothing to install or compile beyond dpkg-dev).
#
# Usage: packaging/build-deb.sh [--binary PATH] [--out DIR] [--compression TYPE]
#   --binary PATH  package this fkr-qemu binary (default: `cargo build --release --locked`, then
#                  target/release/fkr-qemu). The package tests pass the release binary they built
#                  once for all of them (tests/common/release.rs).
#   --out DIR      where the .deb goes (default: target/deb). Its path is printed on stdout.
#   --compression TYPE  dpkg-deb's -Z: xz (default, smallest), gzip (the package tests: faster),
#                  zstd, none.
#
# What goes where (README.md, "Adding a host"):
#   /usr/bin/fkr-qemu                               the binary, stripped
#   /lib/systemd/system/fkr-qemu.service            contrib/systemd/fkr-qemu.service (not enabled)
#   /etc/fkr-qemu/config.toml                       packaging/config.toml, a conffile (dir 0700, file 0640)
#   /usr/share/fkr-qemu/image-builder/              build-runner-base.sh, runner-base/, README.md
#   /usr/share/doc/fkr-qemu/                        copyright, changelog.gz, README.md.gz, ARCHITECTURE.md.gz
#   /usr/share/man/man1/fkr-qemu*.1.gz              manual pages         } written by the binary itself
#   /usr/share/bash-completion/completions/fkr-qemu                      } (`fkr-qemu generate`) from
#   /usr/share/zsh/vendor-completions/_fkr-qemu     shell completions    } its command-line definition
#   /usr/share/fish/vendor_completions.d/fkr-qemu.fish
#   /usr/share/lintian/overrides/fkr-qemu           packaging/lintian-overrides (why each is deliberate)
# The package passes lintian with no error and no warning but those overridden (tests/package_deb.rs).
# Metadata: packaging/control (the version comes from Cargo.toml, the architecture from dpkg, the
# shared-library dependencies from dpkg-shlibdeps); maintainer scripts packaging/{postinst,prerm,postrm}.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
binary=
out=$repo/target/deb
compression=xz

die() {
  echo "build-deb: error: $*" >&2
  exit 1
}

while (($#)); do
  case "$1" in
  --binary) binary=${2:?--binary needs a path}; shift 2 ;;
  --out) out=${2:?--out needs a directory}; shift 2 ;;
  --compression) compression=${2:?--compression needs xz, gzip, zstd or none}; shift 2 ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) die "unknown option: $1 (see --help)" ;;
  esac
done

for tool in dpkg-deb dpkg-shlibdeps strip; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found: apt-get install dpkg-dev binutils"
done

# The [package] version of Cargo.toml. A SemVer pre-release (0.2.0-rc.1) becomes 0.2.0~rc.1, which
# dpkg sorts before 0.2.0, as SemVer does; a '-' would make dpkg read a Debian revision.
version=$(awk -F'"' '/^\[/ { in_package = ($0 == "[package]") } in_package && /^version *=/ { print $2; exit }' "$repo/Cargo.toml")
[ -n "$version" ] || die "no version in the [package] section of $repo/Cargo.toml"
deb_version=${version/-/\~}
arch=$(dpkg --print-architecture)

if [ -z "$binary" ]; then
  (cd "$repo" && cargo build --release --locked --bin fkr-qemu >&2)
  binary=$repo/target/release/fkr-qemu
fi
[ -x "$binary" ] || die "$binary is not an executable"
# A stale binary would ship under the wrong version: the binary must say the version being packaged.
[ "$("$binary" --version)" = "fkr-qemu $version" ] ||
  die "$binary --version says '$("$binary" --version)', Cargo.toml says $version: rebuild it"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps wants a source tree: debian/control, and the package's files in debian/<package>/.
mkdir -p "$work/debian"
printf 'Source: fkr-qemu\n\nPackage: fkr-qemu\nArchitecture: any\n' >"$work/debian/control"
root=$work/debian/fkr-qemu
umask 022

install -D -m 0755 "$binary" "$root/usr/bin/fkr-qemu"
# What dh_strip does: no debug info or symbol table in the shipped binary (a debug build shrinks
# from ~50 MB to ~20 MB).
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/fkr-qemu"

install -D -m 0644 "$repo/contrib/systemd/fkr-qemu.service" "$root/lib/systemd/system/fkr-qemu.service"
grep -qx 'ExecStart=/usr/bin/fkr-qemu serve' "$root/lib/systemd/system/fkr-qemu.service" ||
  die "contrib/systemd/fkr-qemu.service must start /usr/bin/fkr-qemu, where the package puts it"

# The admin token goes next to the config (README.md): only root may look into the directory.
install -d -m 0700 "$root/etc/fkr-qemu"
install -m 0640 "$here/config.toml" "$root/etc/fkr-qemu/config.toml"

# The runner base image builder. test-guest.sh is left out: it builds CI's test guest into the
# repository's target/ directory.
ib=$root/usr/share/fkr-qemu/image-builder
install -D -m 0755 "$repo/image-builder/build-runner-base.sh" "$ib/build-runner-base.sh"
install -m 0644 "$repo/image-builder/README.md" "$ib/README.md"
install -d -m 0755 "$ib/runner-base"
for f in "$repo"/image-builder/runner-base/*; do
  # Keep each file's executable bit (customize.sh, the initramfs hook); everything else 0644.
  if [ -x "$f" ]; then mode=0755; else mode=0644; fi
  install -m "$mode" "$f" "$ib/runner-base/"
done

# Manual pages and completions come from the binary being packaged, so they match its options.
man=$root/usr/share/man/man1
install -d -m 0755 "$man"
"$binary" generate man "$man"
[ -f "$man/fkr-qemu.1" ] || die "$binary generate man wrote no fkr-qemu.1"
for page in "$man"/*.1; do
  gzip -9n "$page"
  chmod 0644 "$page.gz"
done
complete() { # shell, path
  install -d -m 0755 "$(dirname "$root/$2")"
  "$binary" generate completions "$1" >"$root/$2"
  chmod 0644 "$root/$2"
}
complete bash usr/share/bash-completion/completions/fkr-qemu
complete zsh usr/share/zsh/vendor-completions/_fkr-qemu
complete fish usr/share/fish/vendor_completions.d/fkr-qemu.fish
install -D -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/fkr-qemu"

# Reproducible: file times clamped to the last commit's (dpkg-deb reads SOURCE_DATE_EPOCH).
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
  export SOURCE_DATE_EPOCH
fi

doc=$root/usr/share/doc/fkr-qemu
install -D -m 0644 "$here/copyright" "$doc/copyright"
# Debian wants a changelog in every package; ours names the commit the package was built from.
commit=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)
maintainer=$(sed -n 's/^Maintainer: //p' "$here/control")
{
  echo "fkr-qemu ($deb_version) unstable; urgency=medium"
  echo
  echo "  * Built from the fkr-qemu repository, commit $commit."
  echo
  echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
for f in README.md ARCHITECTURE.md; do
  gzip -9n <"$repo/$f" >"$doc/$f.gz"
  chmod 0644 "$doc/$f.gz"
done

install -d -m 0755 "$root/DEBIAN"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"
echo /etc/fkr-qemu/config.toml >"$root/DEBIAN/conffiles"
# md5sums of every file but the conffiles (dpkg keeps their sums itself): `dpkg --verify fkr-qemu`.
(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | sort -z |
  xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums" "$root/DEBIAN/conffiles"

shlibs=$(cd "$work" && dpkg-shlibdeps -O debian/fkr-qemu/usr/bin/fkr-qemu | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no shared-library dependencies of the binary"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
{
  sed "s/\${shlibs:Depends}/$shlibs/" "$here/control" | sed '/^Description:/,$d'
  echo "Version: $deb_version"
  echo "Architecture: $arch"
  echo "Installed-Size: $installed_size"
  sed -n '/^Description:/,$p' "$here/control"
} >"$root/DEBIAN/control"

mkdir -p "$out"
deb=$(cd "$out" && pwd)/fkr-qemu_${deb_version}_${arch}.deb
dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >&2
echo "$deb"
