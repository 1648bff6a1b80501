#!/usr/bin/env bash
# mmdebstrap customize hook for the fkr-qemu runner base image: `customize.sh ROOT`.
# Runs on the host with ROOT being the finished Debian tree (proc, sys and dev are mounted there).
# Inputs come from build-runner-base.sh through the environment:
#   FKR_VARIANT (full|reduced), FKR_ROOT_UUID, FKR_CMDLINE, FKR_RUNNER_BIN, FKR_CONF_DIR.
set -euo pipefail
root=$1
conf=$FKR_CONF_DIR
in_root() { chroot "$root" "$@"; }

echo "runner" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\trunner\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# The ESP only carries the UKI; nothing in the running system needs it mounted.
printf 'UUID=%s\t/\text4\tdefaults,noatime,errors=remount-ro\t0\t1\n' "$FKR_ROOT_UUID" >"$root/etc/fstab"

install -D -m 0644 "$conf/cloud-init.cfg" "$root/etc/cloud/cloud.cfg.d/90-fkr-qemu.cfg"
install -D -m 0644 "$conf/journald.conf" "$root/etc/systemd/journald.conf.d/90-fkr-qemu.conf"
install -D -m 0644 "$conf/modprobe-blacklist.conf" "$root/etc/modprobe.d/fkr-qemu.conf"

# The runner: the pinned release or the binary given with --runner-bin, on PATH for cloud-init's runcmd.
install -D -m 0755 "$FKR_RUNNER_BIN" "$root/usr/local/bin/forgejo-runner"

# The user jobs run as. Sub-ids let it run rootless containers; sudo lets it install packages.
in_root useradd --create-home --shell /bin/bash --user-group --comment "Forgejo Actions runner" runner
grep -q '^runner:' "$root/etc/subuid" 2>/dev/null || echo "runner:100000:65536" >>"$root/etc/subuid"
grep -q '^runner:' "$root/etc/subgid" 2>/dev/null || echo "runner:100000:65536" >>"$root/etc/subgid"
install -D -m 0440 "$conf/sudoers-runner" "$root/etc/sudoers.d/90-fkr-qemu-runner"
if [ "$FKR_VARIANT" = full ]; then
  install -D -m 0644 "$conf/registries.conf" "$root/etc/containers/registries.conf.d/50-fkr-qemu.conf"
fi

# Network: cloud-init renders network-config for systemd-networkd; resolved serves DNS. Nothing waits
# for "online" (masked-units says why); cloud-init's network stage still comes after networkd's start.
in_root systemctl enable systemd-networkd.service systemd-resolved.service
install -D -m 0644 "$conf/cloud-init-network.conf" \
  "$root/etc/systemd/system/cloud-init-network.service.d/90-fkr-qemu.conf"
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Warm pool: the job agent (started only in VMs that have its virtio-serial port).
install -D -m 0755 "$conf/fkr-agent" "$root/usr/local/sbin/fkr-agent"
install -D -m 0644 "$conf/fkr-agent.service" "$root/etc/systemd/system/fkr-agent.service"
in_root systemctl enable fkr-agent.service

while read -r unit; do
  case "$unit" in '' | '#'*) continue ;; esac
  ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done <"$conf/masked-units"

# Every VM gets its own machine id at first boot (its root is a fresh overlay).
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# The Unified Kernel Image, built with the image's own ukify, kernel and initrd.
kver=$(basename "$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -type d | sort -V | tail -n 1)")
in_root ukify build \
  --linux "/boot/vmlinuz-$kver" \
  --initrd "/boot/initrd.img-$kver" \
  --cmdline "$FKR_CMDLINE" \
  --os-release @/etc/os-release \
  --uname "$kver" \
  --output /boot/fkr-qemu-uki.efi

# First-boot work, done once here instead of in every VM. Every VM's root is a fresh overlay of this
# image, so units guarded by ConditionNeedsUpdate= (ldconfig, systemd-journal-catalog-update,
# systemd-sysusers, systemd-update-done, …) would otherwise run at every boot: their condition is true
# while /etc/.updated and /var/.updated are older than /usr. Do their work now, then write those
# stamps as systemd-update-done does (mkfs.ext4 -d keeps the tree's modification times).
in_root ldconfig
in_root journalctl --update-catalog
in_root systemd-sysusers
in_root /usr/lib/systemd/systemd-update-done
if [ ! -f "$root/etc/.updated" ] || [ ! -f "$root/var/.updated" ]; then
  echo "customize.sh: systemd-update-done wrote no /etc/.updated or /var/.updated" >&2
  exit 1
fi
