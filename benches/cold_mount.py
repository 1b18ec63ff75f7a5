#!/usr/bin/env python3
"""Cold mount latency of several sifuse binaries, interleaved (A B C A B C ...), as root.

    benches/cold_mount.py IMAGE NAME=BINARY [NAME=BINARY ...] [--rounds N]

Measures what the system benchmark's "mount latency" rows measure (benches/system.rs), for
builds of sifuse only, so that two builds (a profile change, say) can be compared with
enough samples to see through a busy machine: before each mount it syncs and drops the page
cache, dentries and inodes (so the binary and the image are both read from disk), then
times `BINARY mount -f IMAGE DIR` from spawn until the mount shows in mountinfo and its
root can be listed. With --exe-cached the binary is run once (`--version`) after the drop,
so only the image is cold. Prints every sample, then the median and quartiles per binary,
and the load average before and after. Times move with whatever else the machine does;
the server's major page faults and the bytes it read from disk (getrusage, counted until
it exits after the unmount) do not, and say how much of the binary a cold start pages in.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def one_mount(binary, image, mnt, exe_cached):
    drop_caches()
    if exe_cached:
        subprocess.run([binary, "--version"], stdout=subprocess.DEVNULL, check=True)
    start = time.perf_counter()
    child = subprocess.Popen([binary, "mount", "-f", image, mnt], stdout=subprocess.DEVNULL)
    try:
        while True:
            if mounted(mnt):
                try:
                    os.listdir(mnt)
                    break
                except OSError:
                    pass
            if child.poll() is not None:
                sys.exit(f"{binary} exited ({child.returncode}) before mounting")
            if time.perf_counter() - start > 60:
                sys.exit(f"{binary} did not mount within 60 s")
            time.sleep(0.0002)
        took = time.perf_counter() - start
    finally:
        if mounted(mnt):
            subprocess.run(["umount", mnt], check=True)
    # The server exits once its mount is gone; wait4 gives its resource usage.
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return took, usage.ru_majflt, usage.ru_inblock * 512


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("builds", nargs="+", metavar="NAME=BINARY")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--exe-cached", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("cold_mount.py: run as root (it drops caches and mounts)")
    builds = [b.split("=", 1) for b in args.builds]
    samples = {name: [] for name, _ in builds}
    faults = {name: [] for name, _ in builds}
    read = {name: [] for name, _ in builds}
    print(f"load before: {open('/proc/loadavg').read().strip()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cold-mount-") as d:
        mnt = os.path.join(d, "mnt")
        os.mkdir(mnt)
        for r in range(args.rounds):
            for name, binary in builds:
                t, majflt, nbytes = one_mount(binary, args.image, mnt, args.exe_cached)
                samples[name].append(t)
                faults[name].append(majflt)
                read[name].append(nbytes)
                print(
                    f"round {r + 1:2} {name:<10} {t * 1000:7.1f} ms"
                    f" {majflt:5} major faults {nbytes / 1024:8.0f} KiB read",
                    flush=True,
                )
    print(f"load after: {open('/proc/loadavg').read().strip()}")
    print(f"{args.rounds} mounts of each build; medians and quartiles")
    print(f"{'build':<10} {'ms':>7} {'q1':>7} {'q3':>7} {'major faults':>13} {'KiB read':>9}")
    for name, _ in builds:
        q1, med, q3 = (x * 1000 for x in statistics.quantiles(samples[name], n=4))
        flt = statistics.median(faults[name])
        kib = statistics.median(read[name]) / 1024
        print(f"{name:<10} {med:7.1f} {q1:7.1f} {q3:7.1f} {flt:13.0f} {kib:9.0f}")


if __name__ == "__main__":
    main()
