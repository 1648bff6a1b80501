#!/usr/bin/env bash
# Builds the root file system of a Debian 12 (bookworm) host with systemd as PID 1 and the unified
# cgroup v2 hierarchy, as users run fkr-qemu's .deb on; tests/vm_systemd_host.rs boots it as a VM under
# TCG (direct kernel boot from the root's own /boot) after installing the .deb and its scenario into
# a copy. The root is a tarball (numeric owners kept), so a copy needs no mmdebstrap and no network.
#
# Usage: image-builder/systemd-host.sh [--cache DIR] [--force]
#   --cache DIR  where the tarball is kept (default $FKR_SYSTEMD_HOST_CACHE, else
#                /var/cache/fkr-qemu/systemd-host): outside the clone, so CI re-runs reuse it
#   --force      rebuild even if the inputs did not change
# Prints the tarball's path on stdout. Needs root (mmdebstrap --mode=root) and the network to reach
# the Debian mirror the first time.
#
# Rebuilt only when an input changes: this script (package list, hooks) and the version of the
# kernel Debian 12 serves (linux-image-amd64's dependency), stored next to the tarball as
# root.tar.inputs. One build at a time per cache directory (flock).
set -euo pipefail

cache=${FKR_SYSTEMD_HOST_CACHE:-/var/cache/fkr-qemu/systemd-host}
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cache) cache=${2:?--cache needs a directory}; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "systemd-host.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

say() { echo "==> systemd-host: $*" >&2; }
die() { echo "systemd-host.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root keeps the root's owners and device nodes)"
for tool in mmdebstrap apt-cache sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool not found: run .ci/setup"
done

suite=bookworm
# What the host needs: systemd as init with D-Bus and machined (systemd-container), a kernel and an
# initrd that finds virtio-blk, the .deb's dependencies (so `dpkg -i` needs no apt inside), nft and ip
# for the daemon's network, procps and jq for the scenario's checks.
packages=(
  systemd systemd-sysv dbus udev systemd-container libpam-systemd
  linux-image-amd64 initramfs-tools kmod
  procps iproute2 nftables
  qemu-system-x86 qemu-utils ovmf
  ca-certificates jq
)

mkdir -p "$cache"
tarball=$cache/root.tar
stamp=$tarball.inputs
exec 9>"$cache/lock"
flock 9

kernel_ver() { apt-cache policy linux-image-amd64 2>/dev/null | awk '/Candidate:/ {print $2}'; }
inputs=$( { echo "suite $suite"; echo "linux-image-amd64 $(kernel_ver)"; sha256sum <"$0"; } | sha256sum | cut -d' ' -f1)
if [ "$force" = 0 ] && [ -f "$tarball" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
  say "up to date ($tarball)"
  echo "$tarball"
  exit 0
fi

say "mmdebstrap $suite (minbase + ${#packages[@]} packages) into $tarball"
partial=$cache/root.partial.tar
rm -f "$partial" "$stamp"
include=$(IFS=,; echo "${packages[*]}")
# The hooks run on the host with the root as "$1":
# - networkd takes the uplink by DHCP (QEMU's user network), resolved is not needed (no names);
# - the daily apt/man/e2scrub timers would only steal the emulated CPUs;
# - the initrd carries the virtio modules whatever the build host has (MODULES=most is the default);
# - no getty on the serial console (the kernel and systemd log there).
# The hooks are single-quoted on purpose: mmdebstrap expands "$1" (the root), not this shell.
# shellcheck disable=SC2016
# Documentation, man pages and translations are left out: each test run copies this root into an
# ext4 image (mkfs.ext4 -d), and every megabyte costs there.
mmdebstrap --mode=root --variant=minbase --quiet \
  --include="$include" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='mkdir -p "$1/etc/systemd/network"' \
  --customize-hook='printf "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n" >"$1/etc/systemd/network/20-uplink.network"' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
  --customize-hook='chroot "$1" systemctl mask serial-getty@ttyS0.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer' \
  --customize-hook='echo systemd-host >"$1/etc/hostname"' \
  --customize-hook='printf "/dev/vda / ext4 rw,noatime 0 1\n" >"$1/etc/fstab"' \
  --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*_Packages' \
  "$suite" "$partial" >&2
mv "$partial" "$tarball"
echo "$inputs" >"$stamp"
say "built $tarball ($(du -h "$tarball" | cut -f1))"
echo "$tarball"
