#!/usr/bin/env bash
# Builds the fkr-qemu runner base image from Debian Trixie's packages (no downloaded cloud image, no
# libguestfs, no loop mounts), smoke-boots it with `fkr-qemu boot-test` and publishes it atomically.
# Run as root. `--help` lists the options; README.md ("Base image") says what it downloads.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
conf_dir=$here/runner-base
repo=$(cd "$here/.." && pwd)

# The forgejo-runner release baked into the image unless --runner-bin is given (runner >= 12.8 has
# `one-job`, which serve uses). Bump all three together; the sha256 is that of the release asset.
runner_version=12.9.0
runner_url=https://code.forgejo.org/forgejo/runner/releases/download/v$runner_version/forgejo-runner-$runner_version-linux-amd64
runner_sha256=41c40d82ab4bde07d80c3e20254e3474b1d6abc3b4b8f57e181a3e66c1006521

variant=full
runner_bin=
size=20G
output=
cache_dir=/var/cache/fkr-qemu/mmdebstrap
mirror=http://deb.debian.org/debian
publish_path=/var/lib/fkr-qemu/images/runner-base.qcow2
publish=1
boot_test=1
fkr_qemu=
keep_work=0
from_image=

usage() {
  cat <<EOF
Usage: sudo $0 [options]

Builds a Debian Trixie runner base image (qcow2, UEFI, UKI at EFI/BOOT/BOOTX64.EFI), boot-tests it and
publishes it to $publish_path (the previous image is kept as .prev).

  --variant full|reduced  full (default): Podman and Node.js included; reduced: neither (CI's variant)
  --runner-bin PATH       put this forgejo-runner into the image instead of downloading release
                          v$runner_version (sha256-checked)
  --size SIZE             virtual disk size, e.g. 20G, 8GiB, 4096M (default $size; the qcow2 stays small)
  --output PATH           where the built qcow2 goes (default: <cache-dir>/../build/runner-base-<variant>.qcow2)
  --cache-dir DIR         package cache reused across runs (default $cache_dir)
  --mirror URL            Debian mirror (default $mirror)
  --publish-path PATH     where to publish (default $publish_path)
  --no-publish            build (and boot-test) only
  --no-boot-test          skip the smoke boot; implies --no-publish
  --fkr-qemu PATH         the fkr-qemu binary for boot-test (default: on PATH, else target/{release,debug})
  --keep-work             keep the work directory (root tree, raw disk) for inspection
  --from-image PATH       build nothing: boot-test PATH and publish it (an image built earlier)
  -h, --help              this text
EOF
}

die() {
  echo "build-runner-base: error: $*" >&2
  exit 1
}
log() { echo "==> $*" >&2; }

while (($#)); do
  case "$1" in
  --variant) variant=${2:?--variant needs full or reduced}; shift 2 ;;
  --runner-bin) runner_bin=${2:?--runner-bin needs a path}; shift 2 ;;
  --size) size=${2:?--size needs a size}; shift 2 ;;
  --output) output=${2:?--output needs a path}; shift 2 ;;
  --cache-dir) cache_dir=${2:?--cache-dir needs a directory}; shift 2 ;;
  --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
  --publish-path) publish_path=${2:?--publish-path needs a path}; shift 2 ;;
  --no-publish) publish=0; shift ;;
  --no-boot-test) boot_test=0; publish=0; shift ;;
  --fkr-qemu) fkr_qemu=${2:?--fkr-qemu needs a path}; shift 2 ;;
  --keep-work) keep_work=1; shift ;;
  --from-image) from_image=${2:?--from-image needs a path}; shift 2 ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; die "unknown option: $1" ;;
  esac
done

case "$variant" in full | reduced) ;; *) die "--variant must be full or reduced, not '$variant'" ;; esac
if [ -n "$from_image" ]; then
  [ -f "$from_image" ] || die "--from-image $from_image does not exist"
  ((boot_test)) || die "--from-image publishes only what passed boot-test: drop --no-boot-test"
else
  [ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, chroot): use sudo"
fi

if ((boot_test)); then
  if [ -z "$fkr_qemu" ]; then
    if command -v fkr-qemu >/dev/null 2>&1; then fkr_qemu=$(command -v fkr-qemu)
    elif [ -x "$repo/target/release/fkr-qemu" ]; then fkr_qemu=$repo/target/release/fkr-qemu
    elif [ -x "$repo/target/debug/fkr-qemu" ]; then fkr_qemu=$repo/target/debug/fkr-qemu
    else die "fkr-qemu not found for the boot test: build it (cargo build --release), pass --fkr-qemu PATH, or use --no-boot-test"
    fi
  fi
  [ -x "$fkr_qemu" ] || die "--fkr-qemu $fkr_qemu is not an executable"
fi

work=
pub_tmp=
cleanup() {
  [ -z "$pub_tmp" ] || rm -f "$pub_tmp"
  [ -z "$output" ] || rm -f "$output.tmp.$$"
  if [ -n "$work" ]; then
    if ((keep_work)); then
      echo "work directory kept: $work" >&2
    else
      rm -rf "$work"
    fi
  fi
}
trap cleanup EXIT

started=$SECONDS
phase_start=$SECONDS
phase() { # phase NAME: logs how long the previous phase took
  log "$1 (+$((SECONDS - phase_start)) s)"
  phase_start=$SECONDS
}
mib=$((1024 * 1024))

# Steps 1–4: tools, forgejo-runner, mmdebstrap, disk, qcow2 (skipped with --from-image).
build_image() {
  # --- tools ---------------------------------------------------------------------------------------
  missing=()
  need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing+=("$1 (package $2)")
  }
  need mmdebstrap mmdebstrap
  need qemu-img qemu-utils
  need sfdisk fdisk
  need mkfs.ext4 e2fsprogs
  need mkfs.vfat dosfstools
  need mmd mtools
  need mcopy mtools
  need curl curl
  need sha256sum coreutils
  need numfmt coreutils
  ((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}; install with: apt-get install mmdebstrap qemu-utils fdisk e2fsprogs dosfstools mtools curl"
  # `mkfs.ext4 -d` (populate from a directory without mounting) needs e2fsprogs >= 1.43.
  mkfs_usage=$(mkfs.ext4 2>&1 || true)
  [[ "$mkfs_usage" == *"-d root-directory"* ]] || die "mkfs.ext4 has no -d option: e2fsprogs >= 1.43 is needed"

  # --- sizes ---------------------------------------------------------------------------------------
  size_num=${size%iB}
  size_num=${size_num%B}
  disk_bytes=$(numfmt --from=iec "$size_num" 2>/dev/null) || die "--size '$size' is not a size like 20G or 4096M"
  esp_mib=128
  # GPT: 1 MiB before the ESP, the root after it up to 1 MiB before the end (room for the backup table).
  disk_mib=$((disk_bytes / mib))
  root_mib=$((disk_mib - 1 - esp_mib - 1))
  ((root_mib >= 1024)) || die "--size $size is too small: the root file system needs at least 1 GiB"

  # --- work dirs -----------------------------------------------------------------------------------
  [ -n "$output" ] || output=$(dirname "$cache_dir")/build/runner-base-$variant.qcow2
  mkdir -p "$cache_dir" "$(dirname "$output")"
  cache_dir=$(cd "$cache_dir" && pwd)
  work=$(mktemp -d "${TMPDIR:-/var/tmp}/fkr-runner-base.XXXXXX")

  # --- the mirror must be reachable before minutes are spent -----------------------------------------
  curl -fsS --max-time 30 -o /dev/null "$mirror/dists/trixie/InRelease" ||
    die "cannot fetch $mirror/dists/trixie/InRelease: this machine needs HTTP access to a Debian mirror (or pass --mirror)"

  # --- forgejo-runner ------------------------------------------------------------------------------
  if [ -n "$runner_bin" ]; then
    [ -f "$runner_bin" ] || die "--runner-bin $runner_bin does not exist"
    runner_src=$(cd "$(dirname "$runner_bin")" && pwd)/$(basename "$runner_bin")
  else
    runner_src=$cache_dir/forgejo-runner-$runner_version-linux-amd64
    if ! echo "$runner_sha256  $runner_src" | sha256sum --check --status 2>/dev/null; then
      log "downloading forgejo-runner $runner_version"
      curl -fsSL --max-time 300 -o "$work/forgejo-runner" "$runner_url" ||
        die "cannot download $runner_url (pass a local binary with --runner-bin PATH)"
      echo "$runner_sha256  $work/forgejo-runner" | sha256sum --check --status ||
        die "sha256 of $runner_url is $(sha256sum "$work/forgejo-runner" | cut -d' ' -f1), expected $runner_sha256"
      mv "$work/forgejo-runner" "$runner_src"
    fi
  fi

  # --- packages ------------------------------------------------------------------------------------
  packages=(
    # boot: kernel for virtual machines (LZ4, virtio drivers), a small initrd, the UKI tooling
    linux-image-cloud-amd64 initramfs-tools zstd systemd-ukify systemd-boot-efi
    # system
    systemd systemd-sysv udev dbus systemd-resolved cloud-init iproute2 e2fsprogs
    # what jobs expect on a runner
    ca-certificates curl git sudo openssh-client xz-utils unzip tar gzip
  )
  if [ "$variant" = full ]; then
    packages+=(
      # container engine: daemonless, no extra repository; `docker` CLI shim for scripts that call docker
      podman podman-docker buildah uidmap passt fuse-overlayfs catatonit
      # JavaScript actions
      nodejs
    )
  fi
  include=$(IFS=,; echo "${packages[*]}")

  root_uuid=$(cat /proc/sys/kernel/random/uuid)
  export FKR_VARIANT=$variant FKR_ROOT_UUID=$root_uuid FKR_RUNNER_BIN=$runner_src FKR_CONF_DIR=$conf_dir
  # panic=-1: a guest that panics resets at once, and QEMU (-no-reboot) exits instead of spinning.
  # systemd.gpt_auto=0: the ESP holds only the UKI; nothing needs it auto-mounted.
  export FKR_CMDLINE="root=UUID=$root_uuid ro console=ttyS0,115200n8 panic=-1 systemd.gpt_auto=0"

  rootfs=$work/rootfs
  phase "mmdebstrap trixie ($variant) from $mirror, package cache $cache_dir"
  # The single-quoted hooks are expanded by the shell mmdebstrap runs them in ("$1" = the new root).
  # shellcheck disable=SC2016
  mmdebstrap --mode=root --variant=minbase --format=directory \
    --components=main \
    --include="$include" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
    --setup-hook="sync-in '$cache_dir' /var/cache/apt/archives/" \
    --setup-hook='install -D -m 0644 "$FKR_CONF_DIR/initramfs.conf" "$1/etc/initramfs-tools/conf.d/fkr-qemu"' \
    --setup-hook='install -D -m 0755 "$FKR_CONF_DIR/initramfs-hook" "$1/etc/initramfs-tools/hooks/fkr-qemu"' \
    --customize-hook="sync-out /var/cache/apt/archives '$cache_dir'" \
    --customize-hook='"$FKR_CONF_DIR/customize.sh" "$1"' \
    trixie "$rootfs" "$mirror"

  uki=$work/BOOTX64.EFI
  mv "$rootfs/boot/fkr-qemu-uki.efi" "$uki"

  # --- disk ----------------------------------------------------------------------------------------
  phase "disk: GPT, ESP ${esp_mib} MiB, ext4 root ${root_mib} MiB"
  raw=$work/disk.raw
  truncate -s "$((disk_mib * mib))" "$raw"
  printf '%s\n' 'label: gpt' 'unit: sectors' \
    "start=2048, size=$((esp_mib * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP" \
    "start=$(((1 + esp_mib) * 2048)), size=$((root_mib * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root" |
    sfdisk --quiet "$raw"

  esp=$work/esp.img
  mkfs.vfat -C -F 32 -n ESP "$esp" $((esp_mib * 1024)) >/dev/null
  mmd -i "$esp" ::/EFI ::/EFI/BOOT
  mcopy -i "$esp" "$uki" ::/EFI/BOOT/BOOTX64.EFI
  dd if="$esp" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none

  # ext4 written straight into the disk at the root partition's offset, populated from the tree (no mount).
  # Inode tables and journal are zeroed now, so the guest has no lazy-init writes into its overlay.
  mkfs.ext4 -q -F -U "$root_uuid" -L fkr-root -d "$rootfs" \
    -E "offset=$(((1 + esp_mib) * mib)),lazy_itable_init=0,lazy_journal_init=0" \
    "$raw" "$((root_mib * 1024))k" || die "mkfs.ext4 could not populate the root file system"

  phase "qcow2"
  tmp_out=$output.tmp.$$
  qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$raw" "$tmp_out"
  mv -f "$tmp_out" "$output"
  built=$SECONDS

  rootfs_mb=$(du -sm "$rootfs" | cut -f1)
  image_mb=$(($(stat -c %s "$output") / mib))
  log "built $output: $image_mb MiB qcow2, $((disk_bytes / mib / 1024)) GiB virtual, root tree $rootfs_mb MiB, in $((built - started)) s"
}

if [ -n "$from_image" ]; then
  output=$from_image
  built=$started
else
  build_image
fi
image_mb=$(($(stat -c %s "$output") / mib))
virtual_gib=$(($(qemu-img info --output=json "$output" | sed -n 's/.*"virtual-size": *\([0-9]*\).*/\1/p') / mib / 1024))

# --- smoke boot, publish ---------------------------------------------------------------------------
if ((boot_test)); then
  phase "boot-test"
  # Generous: under TCG (no KVM) a Trixie boot takes 1–3 minutes; with KVM, seconds.
  "$fkr_qemu" boot-test --image "$output" --timeout 600 || die "boot-test failed for $output: not published"
  log "boot-test passed in $((SECONDS - phase_start)) s"
fi

if ((publish)); then
  phase "publishing to $publish_path"
  pub_dir=$(dirname "$publish_path")
  mkdir -p "$pub_dir"
  pub_tmp=$(mktemp "$pub_dir/.runner-base.XXXXXX")
  cp --sparse=always "$output" "$pub_tmp"
  chmod 0644 "$pub_tmp"
  sync "$pub_tmp"
  # Keep the previous image as .prev (a hard link: VMs that opened it keep running from the same inode),
  # then swap the new one in with one rename.
  if [ -e "$publish_path" ]; then
    ln -f "$publish_path" "$publish_path.prev"
  fi
  mv -f "$pub_tmp" "$publish_path"
  pub_tmp=
  sync "$pub_dir"
  log "published $publish_path"
fi

echo "build-runner-base: image $output ($image_mb MiB, $virtual_gib GiB virtual): build $((built - started)) s, total $((SECONDS - started)) s"
