#!/usr/bin/env bash
# fkr-qemu demo: the main job end to end on this machine, with no Forgejo of its own.
#
#   sudo bash scripts/demo.sh
#
# 1. installs what is missing and builds the test guest (.ci/setup), builds fkr-qemu and the Forgejo
#    emulator;
# 2. makes two network namespaces: "upstream" (the emulator on 203.0.113.1, standing in for a Forgejo
#    on the internet) and "host" (where `fkr-qemu serve` runs, with its bridge, taps and NAT), joined
#    by a veth pair — nothing outside them is touched;
# 3. adds a waiting job with `runs-on: external-host` to the emulator, runs `fkr-qemu serve` until the
#    job has run in a test-guest VM (the guest's stand-in runner fetches the job by its handle over the
#    VM network and reports success), stops it with SIGTERM;
# 4. shows serve's log lines and the job's result, and removes everything it made.
# Environment: FKR_DEMO_TIMEOUT (seconds to wait for the job, default 300), FKR_DEMO_KEEP=1 keeps the
# temp dir (config, logs, serial log).
# When the job does not finish, it says why: the VM's outcome, the accelerator and the reason it was
# chosen, and the last 30 lines of the VM's serial console; then it exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (network namespaces, bridge, taps, nftables)" >&2; exit 1; }
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "installing what is missing and building the test guest (.ci/setup)"
bash .ci/setup

say "building fkr-qemu and the Forgejo emulator"
cargo build --bin fkr-qemu --example forgejo-emulator
bin=$repo/target/debug/fkr-qemu
emulator=$repo/target/debug/examples/forgejo-emulator
image=$repo/target/test-guest/test-guest.qcow2

tmp=$(mktemp -d /tmp/fkr-demo.XXXXXX)
host=fkr-demo-host-$$
up=fkr-demo-up-$$
serve_pid=''
emu_pid=''
cleanup() {
  set +e
  if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
    kill -TERM "$serve_pid"; sleep 2; kill -TERM "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null
  fi
  [ -n "$emu_pid" ] && kill "$emu_pid" 2>/dev/null && wait "$emu_pid" 2>/dev/null
  for ns in "$host" "$up"; do
    if ip netns list | grep -qw "$ns"; then
      for p in $(ip netns pids "$ns"); do kill -KILL "$p" 2>/dev/null; done
      ip netns delete "$ns"
    fi
  done
  if [ "${FKR_DEMO_KEEP:-0}" = 1 ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# Why the job did not finish, from serve's log and the kept serial logs.
explain() {
  set +e
  echo
  echo "demo.sh: the job did not finish. What serve saw:" >&2
  local accel
  accel=$(grep -h 'accelerator chosen' "$tmp/serve.log" | tail -n 1 | sed 's/.*accelerator chosen //')
  echo "  accelerator: ${accel:-not chosen (no VM was started)}" >&2
  local outcome
  outcome=$(grep -hE "job ${job_id:-?}: |internal-error|QEMU exited|guest crashed|did not pick the job up|preparing the VM failed|KVM failed" \
    "$tmp/serve.log" | grep -v 'accelerator chosen')
  echo "  VM outcome:" >&2
  if [ -n "$outcome" ]; then
    printf '%s\n' "$outcome" | sed 's/^/    /' >&2
  else
    echo "    none yet: the VM was still running after ${FKR_DEMO_TIMEOUT:-300} s (FKR_DEMO_TIMEOUT)" >&2
  fi
  local log found=0
  for log in "$tmp"/state/logs/*.serial.log; do
    [ -f "$log" ] || continue
    found=1
    echo "  last 30 lines of the serial console ($log):" >&2
    tail -n 30 "$log" | sed 's/\x1b\[[0-9;=]*[A-Za-z]//g; s/^/    /' >&2
  done
  [ "$found" = 1 ] || echo "  no serial log (no VM got as far as QEMU)" >&2
  FKR_DEMO_KEEP=1
}

say "network namespaces: $host (fkr-qemu serve) and $up (the emulator on 203.0.113.1)"
ip netns add "$host"
ip netns add "$up"
ip -n "$host" link set lo up
ip -n "$up" link set lo up
ip -n "$host" link add up0 type veth peer name eth0 netns "$up"
ip -n "$host" addr add 203.0.113.2/24 dev up0
ip -n "$host" link set up0 up
ip -n "$host" route add default via 203.0.113.1
ip -n "$up" addr add 203.0.113.1/24 dev eth0
ip -n "$up" link set eth0 up

say "starting the Forgejo emulator"
ip netns exec "$up" "$emulator" --listen 203.0.113.1:0 >"$tmp/emulator.json" 2>"$tmp/emulator.log" &
emu_pid=$!
for _ in $(seq 50); do [ -s "$tmp/emulator.json" ] && break; sleep 0.1; done
url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$tmp/emulator.json")
token=$(sed -n 's/.*"admin_token":"\([^"]*\)".*/\1/p' "$tmp/emulator.json")
if [ -z "$url" ] || [ -z "$token" ]; then
  echo "the emulator did not start:"; cat "$tmp/emulator.log"; exit 1
fi
url=${url%/}/
echo "emulator at $url"

job=$(ip netns exec "$host" curl -sSf -X POST -H 'content-type: application/json' \
  -d '{"repo": "demo/hello", "labels": ["external-host"], "name": "build"}' "${url}_emulator/jobs")
job_id=$(printf '%s' "$job" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
echo "waiting job $job_id of demo/hello: $job"

cat >"$tmp/config.toml" <<EOF
label = "external-host"
poll_interval = "1s"
max_vms = 2
base_image = "$image"
boot_deadline = "3m"
job_deadline = "5m"
state_dir = "$tmp/state"
runtime_dir = "$tmp/run"

[forgejo]
url = "$url"

[vm]
accel = "auto"
vcpus = 1
memory_mib = 256
powerdown_grace_secs = 5
keep_serial_log = true

[net]
dns_servers = ["203.0.113.1"]
EOF
say "config ($tmp/config.toml)"
cat "$tmp/config.toml"

say "fkr-qemu serve (in $host)"
# The token goes through the environment, never argv.
# nsenter, not `ip netns exec`: that would mount a fresh sysfs and hide the cgroup file systems that
# serve puts each QEMU into.
FORGEJO_ADMIN_TOKEN=$token nsenter --net="/run/netns/$host" -- "$bin" serve --config "$tmp/config.toml" >"$tmp/serve.log" 2>&1 &
serve_pid=$!
deadline=$((SECONDS + ${FKR_DEMO_TIMEOUT:-300}))
tail -n +1 -f "$tmp/serve.log" --pid "$serve_pid" 2>/dev/null &
tail_pid=$!
until grep -q "finished (job $job_id)" "$tmp/serve.log"; do
  if ! kill -0 "$serve_pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    kill "$tail_pid" 2>/dev/null
    explain
    exit 1
  fi
  sleep 1
done
kill -TERM "$serve_pid"
wait "$serve_pid" && rc=0 || rc=$?
serve_pid=''
kill "$tail_pid" 2>/dev/null || true

say "serve's log lines, as operators of the original tool know them"
grep -E 'startup sweep\.\.\.|entering discovery loop|queue: dispatching job|dispatch job|creating CI user|VM fr-[0-9a-f]+ (started|finished)' "$tmp/serve.log" |
  sed 's/^[^ ]* *INFO [^ ]* //'

# The emulator's state lists each job's keys in sorted order: …"id",…,"outputs":{…},…,"status".
status=$(ip netns exec "$host" curl -sSf "${url}_emulator/state" |
  sed -n "s/.*\"id\":$job_id,[^{]*{[^}]*}[^{}]*\"status\":\"\([a-z]*\)\".*/\1/p")
say "job $job_id: ${status:-unknown}; serve exited with $rc"
left=$(find "$tmp/run/vms" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
echo "per-VM dirs left: $left; taps left: $(ip -n "$host" -o link | grep -c ' fr-' || true)"
if [ "$status" != success ]; then
  explain
  exit 1
fi
[ "$rc" = 0 ] && [ "$left" = 0 ]
