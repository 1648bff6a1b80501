#!/usr/bin/env bash
# Builds the fkr-qemu test guest: a GPT disk whose EFI system partition holds a Unified Kernel Image
# (Debian 12's cloud kernel + a busybox initramfs, on the systemd EFI stub) at EFI/BOOT/BOOTX64.EFI.
# Boots through OVMF under TCG in a few seconds; its /init applies the cloud-config subset of
# ARCHITECTURE.md's "Seed contract". Built from Debian packages alone, without root (no loop mounts).
#
# Usage: image-builder/test-guest.sh [--out PATH] [--force]
#   --out PATH   output qcow2 (default target/test-guest/test-guest.qcow2)
#   --force      rebuild even if the inputs did not change
# Environment: FKR_TEST_GUEST_CACHE  where downloaded .debs are kept (default target/test-guest/cache)
#
# Rebuilt only when an input changes: this script, image-builder/test-guest/*, everything under
# image-builder/test-guest-files/ (copied into the guest's root, modes kept), and the versions of the
# kernel, busybox-static and systemd-boot-efi packages.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$repo/target/test-guest/test-guest.qcow2
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a path}; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "test-guest.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
out=$(realpath -m "$out")
cache=$(realpath -m "${FKR_TEST_GUEST_CACHE:-$repo/target/test-guest/cache}")
guest_dir=$here/test-guest
files_dir=$here/test-guest-files
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub

say() { echo "==> test-guest: $*" >&2; }
die() { echo "test-guest.sh: error: $*" >&2; exit 1; }

for tool in apt-cache apt-get dpkg-deb dpkg-query modinfo cpio gzip objcopy objdump sfdisk mkfs.vfat mmd mcopy qemu-img sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found: run .ci/setup (or apt-get install busybox-static systemd-boot-efi binutils cpio kmod fdisk dosfstools mtools qemu-utils)"
done
# (grep without -q: with pipefail, -q exiting early would SIGPIPE busybox and fail the check at random.)
[ -x /bin/busybox ] && /bin/busybox --list | grep -x findfs >/dev/null || die "/bin/busybox is not busybox-static: apt-get install busybox-static"
[ -f "$stub" ] || die "$stub missing: apt-get install systemd-boot-efi"

# The kernel Debian 12 currently serves for cloud-amd64 (the meta-package's dependency).
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ] && [ "$(id -u)" = 0 ]; then
  say "apt lists do not know linux-image-cloud-amd64: apt-get update"
  apt-get update -q >&2
  kpkg=$(kernel_pkg)
fi
[ -n "$kpkg" ] || die "apt does not know linux-image-cloud-amd64 (run apt-get update)"
kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
bbver=$(dpkg-query -W -f='${Version}' busybox-static)
stubver=$(dpkg-query -W -f='${Version}' systemd-boot-efi)

inputs_hash() {
  {
    echo "kernel $kpkg $kver"
    echo "busybox-static $bbver"
    echo "systemd-boot-efi $stubver"
    sha256sum "$here/test-guest.sh" "$guest_dir"/* | sed "s#  $repo/#  #"
    if [ -d "$files_dir" ]; then
      (cd "$files_dir" && find . \( -type f -o -type l \) -printf '%p %m\n' | LC_ALL=C sort)
      (cd "$files_dir" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
    fi
  } | sha256sum | cut -d' ' -f1
}
hash=$(inputs_hash)
stamp=$out.inputs
if [ "$force" = 0 ] && [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
  say "up to date ($out)"
  exit 0
fi

mkdir -p "$cache" "$(dirname "$out")"
deb=$(find "$cache" -maxdepth 1 -name "${kpkg}_${kver//:/%3a}_amd64.deb" -print -quit)
if [ -z "$deb" ]; then
  say "downloading $kpkg $kver into $cache"
  (cd "$cache" && apt-get download -q "$kpkg=$kver" >&2)
  deb=$(find "$cache" -maxdepth 1 -name "${kpkg}_*_amd64.deb" -newer "$0" -print -quit)
  [ -n "$deb" ] || deb=$(ls -t "$cache/${kpkg}"_*_amd64.deb | head -n 1)
fi
# Keep only the kernel in use: the cache does not grow with every Debian point release.
find "$cache" -maxdepth 1 -name 'linux-image-*.deb' ! -name "$(basename "$deb")" -delete

work=$(mktemp -d "${TMPDIR:-/tmp}/fkr-test-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "building $kpkg $kver + busybox $bbver"
dpkg-deb -x "$deb" "$work/kernel"
kdir=$(ls -d "$work"/kernel/lib/modules/*/ | head -n 1)
krel=$(basename "$kdir")
vmlinuz=$work/kernel/boot/vmlinuz-$krel
[ -f "$vmlinuz" ] || die "no kernel image in $deb"

# initramfs root
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc/fkr,lib/modules,proc,sys,dev,tmp,run,root,mnt/seed}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$guest_dir/init" "$root/init"
install -m 0644 "$guest_dir/user-data.awk" "$guest_dir/network-config.awk" "$root/etc/fkr/"
install -m 0755 "$guest_dir/fkr-report" "$root/usr/local/bin/fkr-report"
install -m 0755 "$guest_dir/fkr-agent" "$root/usr/local/bin/fkr-agent"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'fkr-test-guest\n' >"$root/etc/hostname"

# Kernel modules with their dependencies, dependencies first (insmod does not resolve them).
wanted="virtio_pci virtio_blk virtio_net virtio_console vfat nls_cp437 nls_ascii nls_utf8 button evdev"
declare -A done_mod=()
order=()
add_module() {
  local m=$1 f dep
  [ -n "${done_mod[$m]:-}" ] && return 0
  done_mod[$m]=1
  f=$(find "$kdir/kernel" -name "$m.ko" -o -name "${m//_/-}.ko" | head -n 1)
  if [ -z "$f" ]; then
    grep -q "/$m.ko\$" "$kdir/modules.builtin" 2>/dev/null || grep -q "/${m//_/-}.ko\$" "$kdir/modules.builtin" 2>/dev/null \
      || die "module $m is neither in $kpkg nor built in"
    return 0
  fi
  for dep in $(modinfo -F depends "$f" | tr ',' ' '); do add_module "$dep"; done
  cp "$f" "$root/lib/modules/$m.ko"
  order+=("$m")
}
for m in $wanted; do add_module "$m"; done
printf '%s\n' "${order[@]}" >"$root/etc/fkr/modules"
say "modules: ${order[*]}"

# The project's guest-side files (e.g. the forgejo-runner stand-in), modes preserved.
if [ -d "$files_dir" ]; then
  cp -a "$files_dir/." "$root/"
fi

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -1 >"$work/initrd.img"

# Unified Kernel Image: the stub plus .osrel, .cmdline, .linux, .initrd, each page-aligned after the
# stub's last section.
printf 'ID=fkr-test-guest\nNAME="fkr-qemu test guest"\nVERSION_ID=%s\n' "$krel" >"$work/os-release"
printf 'console=ttyS0 quiet panic=-1' >"$work/cmdline"
align=4096
end=0
while read -r _ _ size vma _; do
  e=$((16#$vma + 16#$size))
  [ "$e" -gt "$end" ] && end=$e
done < <(objdump -h "$stub" | awk '$1 ~ /^[0-9]+$/ {print}')
next_at() { echo $(( ($1 + align - 1) / align * align )); }
osrel=$(next_at "$end")
cmdline=$(next_at $((osrel + $(stat -c %s "$work/os-release"))))
linux=$(next_at $((cmdline + $(stat -c %s "$work/cmdline"))))
initrd=$(next_at $((linux + $(stat -c %s "$vmlinuz"))))
objcopy \
  --add-section .osrel="$work/os-release" --change-section-vma .osrel="$(printf 0x%x "$osrel")" \
  --add-section .cmdline="$work/cmdline" --change-section-vma .cmdline="$(printf 0x%x "$cmdline")" \
  --add-section .linux="$vmlinuz" --change-section-vma .linux="$(printf 0x%x "$linux")" \
  --add-section .initrd="$work/initrd.img" --change-section-vma .initrd="$(printf 0x%x "$initrd")" \
  "$stub" "$work/BOOTX64.EFI"

# ESP (FAT, filled with mtools: no mount, no root) inside a GPT disk.
uki_mib=$(( ($(stat -c %s "$work/BOOTX64.EFI") + 1048575) / 1048576 ))
esp_mib=$(( uki_mib + 8 ))
[ "$esp_mib" -lt 34 ] && esp_mib=34
truncate -s "${esp_mib}M" "$work/esp.img"
mkfs.vfat -F 32 -n ESP "$work/esp.img" >/dev/null
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.img" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
truncate -s $(( (esp_mib + 2) * 1048576 )) "$work/disk.raw"
printf 'label: gpt\nstart=2048, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="ESP"\n' $((esp_mib * 2048)) \
  | sfdisk -q "$work/disk.raw" >/dev/null
dd if="$work/esp.img" of="$work/disk.raw" bs=1M seek=1 conv=notrunc status=none
qemu-img convert -q -f raw -O qcow2 "$work/disk.raw" "$work/test-guest.qcow2"
mv "$work/test-guest.qcow2" "$out"
echo "$hash" >"$stamp"
say "built $out ($(du -h "$out" | cut -f1), kernel $krel)"
