#!/bin/bash
# One cold `find -printf` walk of IMAGE through a sifuse mount, or the kernel's driver, with
# where the time went: wall time, and the server's user and system CPU. As root.
#
#   benches/walk.sh IMAGE [SERVER [SERVER_CPUS FIND_CPUS]]
#
# SERVER: a sifuse binary (default target/release/sifuse) or `kernel`. SERVER_CPUS and
# FIND_CPUS hold the server and find to those CPUs (taskset lists, such as 0 or 0-1).
set -euo pipefail
img=$1
server=${2:-target/release/sifuse}
server_cpus=${3:-}
find_cpus=${4:-}
mnt=$(mktemp -d /tmp/sifuse-walk.XXXXXX)
out=$(mktemp /dev/shm/sifuse-walk.XXXXXX)
pin() { if [ -n "$1" ]; then echo "taskset -c $1"; fi; }
cleanup() { umount "$mnt" 2>/dev/null || true; rmdir "$mnt"; rm -f "$out"; }
trap cleanup EXIT
pid=
if [ "$server" = kernel ]; then
  mount -t squashfs -o loop,ro "$img" "$mnt"
else
  $(pin "$server_cpus") "$server" mount -f "$img" "$mnt" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do grep -q " $mnt " /proc/self/mountinfo && break; sleep 0.05; done
fi
sync
echo 3 > /proc/sys/vm/drop_caches
start=$(date +%s.%N)
$(pin "$find_cpus") find "$mnt" -printf '%p %s %m %u %g %T@ %i\n' > "$out"
end=$(date +%s.%N)
entries=$(wc -l < "$out")
user=0; sys=0
if [ -n "$pid" ]; then read -r user sys <<<"$(awk '{print $14, $15}' "/proc/$pid/stat")"; fi
umount "$mnt"
if [ -n "$pid" ]; then wait "$pid" || true; fi
python3 - "$server" "$start" "$end" "$user" "$sys" "$entries" "$(cut -d' ' -f1 /proc/loadavg)" \
  "${server_cpus:-any}" "${find_cpus:-any}" <<'PY'
import os, sys
name, start, end, user, system, entries, load, scpu, fcpu = sys.argv[1:]
tick = os.sysconf("SC_CLK_TCK")
wall = float(end) - float(start)
user, system, entries = int(user) / tick, int(system) / tick, int(entries)
line = f"{os.path.basename(name)}: wall {wall:.2f} s, {entries} entries"
if name != "kernel":
    line += (f", server user {user:.2f} s ({user / entries * 1e6:.2f} us/entry)"
             f" sys {system:.2f} s, server on CPUs {scpu}, find on {fcpu}")
print(line + f", load {load}")
PY
