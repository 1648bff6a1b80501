#!/bin/bash
# The scenario tests/vm_systemd_host.rs runs inside the systemd host VM (image-builder/systemd-host.sh),
# as the oneshot unit fkr-sdhost-scenario.service once the network is up. It drives the installed
# fkr-qemu.service through start, a crash, a restart, two reloads and a stop, and reports what it sees
# as KEY=value lines on /dev/ttyS1 (the test reads them from QEMU's second serial port and asserts on
# them). It asserts nothing itself: every value is reported, whatever it is.
#
# Jobs come from outside: `WANT_JOB=<tag>` asks the test to add one to the Forgejo emulator; the
# daemon then picks it up and its VM appears in `fkr-qemu list`. Steps wait for the previous job's
# VM to be gone before asking for the next, so "the VM" of a step is the only one.
# Ends with END=<status> and a poweroff, whatever happened.
# Functions below are called through wait_until and the EXIT trap, which shellcheck cannot see.
# shellcheck disable=SC2317
set -u

unit=fkr-qemu.service
report() { printf '%s\n' "$*" >/dev/ttyS1; }
say() { echo "scenario: $*"; }

finish() {
  report "END=$1"
  sync
  systemctl poweroff --no-block
}
trap 'finish $?' EXIT

# wait_until SECONDS COMMAND…: polls COMMAND every second; status 1 on timeout.
wait_until() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 1
  done
}

prop() { systemctl show -p "$2" --value "$1" 2>/dev/null; }
main_pid() { prop "$unit" MainPID; }
# The process's cgroup v2 path, e.g. /machine.slice/machine-fr-0123abcd.scope.
cgroup_of() { sed -n 's/^0:://p' "/proc/$1/cgroup" 2>/dev/null; }
# 1 while pid $1 is a QEMU (the fake is called as …/qemu-system-x86_64), else 0.
qemu_alive() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -c qemu-system-x86_64; }
vms() { fkr-qemu list --json 2>/dev/null; }
# "name pid state" of this host's one VM once its QEMU runs.
the_vm() { vms | jq -r '.vms[] | select(.pid != null) | "\(.name) \(.pid) \(.state)"' | head -n1; }
no_vms() { [ "$(vms | jq '.vms | length')" = 0 ]; }
vm_running() { [ "$(the_vm | cut -d' ' -f3)" = running ]; }
# 1 while the daemon lists VM $1 with QEMU pid $2.
listed() { vms | jq --arg n "$1" --argjson p "$2" '[.vms[] | select(.name == $n and .pid == $p)] | length'; }
is_listed() { [ "$(listed "$1" "$2")" = 1 ]; }
active() { [ "$(prop "$unit" ActiveState)" = active ]; }
have_vm() { [ -n "$(the_vm)" ]; }
qemu_gone() { [ "$(qemu_alive "$1")" = 0 ]; }
restarted_from() { local p; p=$(main_pid); [ "$p" != 0 ] && [ "$p" != "$1" ] && active; }

# Asks for a job and waits for its VM's QEMU; sets name and qpid. Reports <tag>.VM and .QEMU_PID.
start_job() {
  local tag=$1 vm
  wait_until 240 no_vms || { report "$tag.ERROR=a VM of an earlier step is still there"; exit 3; }
  report "WANT_JOB=$tag"
  wait_until 240 have_vm || { report "$tag.ERROR=no VM"; exit 3; }
  # Mid-job: the runner has its task (the fake's job then takes its N seconds).
  wait_until 60 vm_running
  vm=$(the_vm)
  name=${vm%% *}
  qpid=$(echo "$vm" | cut -d' ' -f2)
  report "$tag.VM=$name"
  report "$tag.QEMU_PID=$qpid"
  report "$tag.STATE=$(echo "$vm" | cut -d' ' -f3)"
}

# Where the VM's QEMU is: its own scope under machine.slice with limits, machined knows it, and not
# under the service.
scope_checks() {
  local tag=$1 scope="machine-$name.scope"
  report "$tag.SCOPE_ACTIVE=$(prop "$scope" ActiveState)"
  report "$tag.SCOPE_SLICE=$(prop "$scope" Slice)"
  report "$tag.SCOPE_MEMORYMAX=$(prop "$scope" MemoryMax)"
  report "$tag.SCOPE_MEMORYSWAPMAX=$(prop "$scope" MemorySwapMax)"
  report "$tag.SCOPE_TASKSMAX=$(prop "$scope" TasksMax)"
  report "$tag.SCOPE_CPUQUOTA=$(prop "$scope" CPUQuotaPerSecUSec)"
  report "$tag.SCOPE_HAS_QEMU=$(grep -cx "$qpid" "/sys/fs/cgroup/machine.slice/$scope/cgroup.procs" 2>/dev/null)"
  report "$tag.MACHINE_CLASS=$(machinectl list --no-legend 2>/dev/null | awk -v n="$name" '$1 == n {print $2}')"
  report "$tag.QEMU_CGROUP=$(cgroup_of "$qpid")"
}

# After the job: its VM, QEMU and scope are gone.
job_done() {
  local tag=$1
  if wait_until 300 no_vms; then report "$tag.FINISHED=1"; else report "$tag.FINISHED=0"; fi
  wait_until 30 qemu_gone "$qpid"
  report "$tag.QEMU_AFTER=$(qemu_alive "$qpid")"
  report "$tag.SCOPE_AFTER=$(prop "machine-$name.scope" ActiveState)"
  # Where the daemon is now, after starting and cleaning up a VM (nothing may nest it deeper).
  report "$tag.DAEMON_CGROUP_END=$(cgroup_of "$(main_pid)")"
}

say "started"
report "CGROUP_FS=$(stat -fc %T /sys/fs/cgroup)"
report "SYSTEMD=$(systemctl --version | awk 'NR == 1 {print $2}')"
report "MACHINED=$(systemctl show -p LoadState --value systemd-machined.service)"

# --- start: Type=notify (start returns once the daemon said READY=1), LoadCredential -------------
systemctl start "$unit"
report "START.RC=$?"
pid=$(main_pid)
report "START.ACTIVE=$(prop "$unit" ActiveState)"
report "START.TYPE=$(prop "$unit" Type)"
# Read at once: with Type=notify the daemon is ready when `systemctl start` returns.
report "START.READY=$(fkr-qemu status --json 2>/dev/null | jq -r .ready)"
report "START.CREDENTIALS_DIRECTORY=$(tr '\0' '\n' <"/proc/$pid/environ" | grep -c '^CREDENTIALS_DIRECTORY=')"
# The token itself is never printed: only whether it shows up where it must not.
report "START.TOKEN_IN_ENV=$(grep -a -c -F -f /etc/fkr-qemu/admin-token "/proc/$pid/environ")"
report "START.TOKEN_IN_SHOW=$(systemctl show "$unit" | grep -c -F -f /etc/fkr-qemu/admin-token)"
report "START.DAEMON_CGROUP=$(cgroup_of "$pid")"

# --- a job undisturbed: where its QEMU runs, and it completes --------------------------------------
start_job run
scope_checks run
job_done run

# --- kill -9 of the daemon mid-job: systemd restarts it, the VM stays, the new daemon adopts it ---
start_job crash
scope_checks crash
old=$(main_pid)
kill -9 "$old"
if wait_until 120 restarted_from "$old"; then report "crash.RESTARTED=1"; else report "crash.RESTARTED=0"; fi
report "crash.NRESTARTS=$(prop "$unit" NRestarts)"
report "crash.DAEMON_CGROUP=$(cgroup_of "$(main_pid)")"
report "crash.QEMU_ALIVE=$(qemu_alive "$qpid")"
report "crash.SCOPE_AFTER_RESTART=$(prop "machine-$name.scope" ActiveState)"
report "crash.QEMU_CGROUP_AFTER_RESTART=$(cgroup_of "$qpid")"
# (A QEMU that died with its daemon cannot be adopted: no point waiting for it.)
if [ "$(qemu_alive "$qpid")" = 1 ] && wait_until 90 is_listed "$name" "$qpid"; then
  report "crash.ADOPTED=1"
else
  report "crash.ADOPTED=0"
fi
job_done crash

# --- systemctl restart mid-job: the same ---------------------------------------------------------
start_job restart
old=$(main_pid)
timeout 600 systemctl restart "$unit"
report "restart.RC=$?"
report "restart.NEW_PID=$([ "$(main_pid)" != "$old" ] && active && echo 1 || echo 0)"
report "restart.DAEMON_CGROUP=$(cgroup_of "$(main_pid)")"
report "restart.QEMU_ALIVE=$(qemu_alive "$qpid")"
report "restart.SCOPE_AFTER_RESTART=$(prop "machine-$name.scope" ActiveState)"
report "restart.QEMU_CGROUP_AFTER_RESTART=$(cgroup_of "$qpid")"
if [ "$(qemu_alive "$qpid")" = 1 ] && wait_until 90 is_listed "$name" "$qpid"; then
  report "restart.ADOPTED=1"
else
  report "restart.ADOPTED=0"
fi
job_done restart

# --- systemctl reload twice mid-job (handover): nothing moves, nothing nests deeper ---------------
start_job reload
pid=$(main_pid)
report "reload.DAEMON_CGROUP_BEFORE=$(cgroup_of "$pid")"
report "reload.QEMU_CGROUP_BEFORE=$(cgroup_of "$qpid")"
timeout 300 systemctl reload "$unit"
report "reload.RC1=$?"
timeout 300 systemctl reload "$unit"
report "reload.RC2=$?"
report "reload.SAME_PID=$([ "$(main_pid)" = "$pid" ] && echo 1 || echo 0)"
report "reload.DAEMON_CGROUP_AFTER=$(cgroup_of "$pid")"
report "reload.QEMU_CGROUP_AFTER=$(cgroup_of "$qpid")"
report "reload.QEMU_ALIVE=$(qemu_alive "$qpid")"
# Not SCOPE_AFTER: job_done reports that one (the scope once the job is done).
report "reload.SCOPE_AFTER_RELOAD=$(prop "machine-$name.scope" ActiveState)"
if wait_until 60 is_listed "$name" "$qpid"; then report "reload.LISTED=1"; else report "reload.LISTED=0"; fi
job_done reload

# --- systemctl stop mid-job: drains (the job finishes), then nothing is left ----------------------
start_job stop
timeout 600 systemctl stop "$unit"
report "stop.RC=$?"
report "stop.ACTIVE=$(prop "$unit" ActiveState)"
report "stop.QEMU_AFTER=$(qemu_alive "$qpid")"
report "stop.SCOPES_LEFT=$(systemctl list-units --all --no-legend --plain 'machine-fr-*.scope' | grep -c 'machine-fr-')"
report "stop.MACHINES_LEFT=$(machinectl list --no-legend 2>/dev/null | grep -c '^fr-')"
report "stop.TAPS_LEFT=$(ip -o link show | grep -c ': fr-')"
report "stop.NFT_TABLES_LEFT=$(nft list tables | grep -c fkr)"
report "stop.VM_DIRS_LEFT=$(find /run/fkr-qemu/vms -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
say "done"
exit 0
