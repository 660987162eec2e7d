#!/usr/bin/env python3
"""Compare `spindle serve` with nbdkit and qemu-nbd, through the same transport (NBD on a Unix socket),
with fio's nbd engine driving the same loads.

  1. A filled raw image: spindle serve image:IMG against nbdkit file IMG (4K randread and randwrite
     depth 32, 1M sequential read and write depth 8).
  2. First writes: 4K randwrite depth 32 on a new thin volume (spindle serve volume:POOL/NAME) against
     qemu-nbd serving a new qcow2 image (--aio=io_uring --cache=none), the same number of writes.

Servers start and stop around each run; the two sides alternate; medians of several rounds.

    Tools/compare-nbd.py                  # 1 GiB image, 3 rounds of 4 s
    Tools/compare-nbd.py --rounds 5 --runtime 5
    Tools/compare-nbd.py --baseline OLD/spindle   # also run an older build in the same rounds (a regression check)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command, **kwargs):
    return subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE, **kwargs).stdout


def wait_for_socket(path, process):
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server for {path} did not start")
        time.sleep(0.05)


class Server:
    """A server process started for one run and stopped after it."""

    def __init__(self, command, socket, cwd=None):
        if os.path.exists(socket):
            os.remove(socket)
        self.process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.socket = socket
        wait_for_socket(socket, self.process)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def drop_cached_pages(path):
    """Every run starts with none of the image in the page cache, whichever server ran before it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def fio(uri, rw, bs, depth, runtime=None, io_size=None):
    command = ["fio", "--name=compare", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
               "--numjobs=1", "--output-format=json", "--randrepeat=0"]
    command += [f"--runtime={runtime}", "--time_based"] if runtime else []
    command += [f"--io_size={io_size}"] if io_size else []
    output = run(command)
    job = json.loads(output[output.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"], side["bw_bytes"] / 1048576


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=4)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--first-writes", type=int, default=32768)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--spindle")
    parser.add_argument("--baseline", help="an older spindle binary run alternately in the same rounds, for a regression check")
    args = parser.parse_args()
    for tool in ["fio", "nbdkit", "qemu-nbd", "qemu-img"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: install it with 'apt-get install fio nbdkit qemu-utils'")
    spindle = args.spindle
    if not spindle:
        subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        spindle = os.path.join(run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT).strip(), "spindle")
    rows = []
    work = tempfile.mkdtemp(prefix="spindle-nbd-", dir=args.dir)
    try:
        image = os.path.join(work, "disk.img")
        socket = os.path.join(work, "nbd.sock")
        print(f"filling a {args.size} image...", file=sys.stderr)
        run(["fio", "--name=fill", f"--filename={image}", "--rw=write", "--bs=1m", f"--size={args.size}", "--ioengine=io_uring",
             "--direct=1", "--output-format=json"])
        servers = {
            "nbdkit": (["nbdkit", "--foreground", "--unix", socket, "--exit-with-parent", "file", image, "cache=none"],
                       f"nbd+unix:///?socket={socket}"),
            "spindle": ([spindle, "serve", f"image:{image}", "--socket", socket], f"nbd+unix:///disk.img?socket={socket}"),
            # nbdkit's file plugin reads and writes through the page cache (cache=none only drops pages
            # afterwards); spindle serve --no-direct does the same, for a like-for-like row.
            "spindle --no-direct": ([spindle, "serve", f"image:{image}", "--no-direct", "--socket", socket],
                                    f"nbd+unix:///disk.img?socket={socket}"),
        }
        if args.baseline:
            servers["baseline"] = ([args.baseline, "serve", f"image:{image}", "--socket", socket],
                                   f"nbd+unix:///disk.img?socket={socket}")
            servers["baseline --no-direct"] = ([args.baseline, "serve", f"image:{image}", "--no-direct", "--socket", socket],
                                               f"nbd+unix:///disk.img?socket={socket}")
        loads = [("randread 4K depth 32", "randread", "4k", 32, 0, 1.0), ("randwrite 4K depth 32", "randwrite", "4k", 32, 0, 1.0),
                 ("read 1M depth 8", "read", "1m", 8, 1, 1.0), ("write 1M depth 8", "write", "1m", 8, 1, 1.0)]
        for label, rw, bs, depth, measure, target in loads:
            values = {name: [] for name in servers}
            for index in range(args.rounds):
                for name in (list(servers) if index % 2 == 0 else list(reversed(list(servers)))):
                    command, uri = servers[name]
                    drop_cached_pages(image)
                    server = Server(command, socket)
                    try:
                        values[name].append(fio(uri, rw, bs, depth, runtime=args.runtime)[measure])
                    finally:
                        server.stop()
                print(f"  {label} round {index + 1}: " + ", ".join(f"{name} {values[name][-1]:.0f}" for name in servers), file=sys.stderr)
            unit = "IOPS" if measure == 0 else "MiB/s"
            baseline = statistics.median(values["baseline"]) if args.baseline else None
            rows.append((f"raw image: {label}", "nbdkit file", unit, statistics.median(values["nbdkit"]),
                         statistics.median(values["spindle"]), target, baseline))
            baseline = statistics.median(values["baseline --no-direct"]) if args.baseline else None
            rows.append((f"raw image: {label}, spindle serve --no-direct (page cache, as nbdkit)", "nbdkit file", unit,
                         statistics.median(values["nbdkit"]), statistics.median(values["spindle --no-direct"]), target,
                         baseline))

        volume_bytes = args.first_writes * 4 * 65536
        binaries = {"spindle": spindle}
        if args.baseline:
            binaries["baseline"] = args.baseline
        values = {"qemu-nbd": [], **{name: [] for name in binaries}}
        for index in range(args.rounds):
            folder = os.path.join(work, f"first{index}")
            os.makedirs(folder)
            run([spindle, "pool", "create", "tank", os.path.join(folder, "pool.img"), "--size", str(volume_bytes + (1 << 30)),
                 "--dir", folder])
            run([spindle, "volume", "create", "tank/new", "--size", str(volume_bytes), "--dir", folder])
            qcow = os.path.join(folder, "new.qcow2")
            run(["qemu-img", "create", "-f", "qcow2", qcow, str(volume_bytes)])
            if args.baseline:
                run([args.baseline, "volume", "create", "tank/old", "--size", str(volume_bytes), "--dir", folder])
            order = ["qemu-nbd", *binaries]
            for name in (order if index % 2 == 0 else list(reversed(order))):
                if name in binaries:
                    volume = "new" if name == "spindle" else "old"
                    server = Server([binaries[name], "serve", f"volume:tank/{volume}", "--socket", socket, "--dir", folder],
                                    socket)
                    uri = f"nbd+unix:///tank/{volume}?socket={socket}"
                else:
                    server = Server(["qemu-nbd", "--socket", socket, "--format=qcow2", "--aio=io_uring", "--cache=none",
                                     "--persistent", "--shared=8", "--export-name=new", qcow], socket)
                    uri = f"nbd+unix:///new?socket={socket}"
                try:
                    values[name].append(fio(uri, "randwrite", "4k", 32, io_size=str(args.first_writes * 4096))[0])
                finally:
                    server.stop()
            shutil.rmtree(folder)
            print(f"  first writes round {index + 1}: " + ", ".join(f"{name} {values[name][-1]:.0f}" for name in values),
                  file=sys.stderr)
        rows.append((f"new thin volume vs new qcow2: 4K randwrite depth 32 ({args.first_writes} first writes)",
                     "qemu-nbd (qcow2, io_uring, cache=none)", "IOPS", statistics.median(values["qemu-nbd"]),
                     statistics.median(values["spindle"]), 2.0,
                     statistics.median(values["baseline"]) if args.baseline else None))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"fio --ioengine=nbd over a Unix socket, one job; {args.size} filled image; {args.runtime} s per timed run; "
          f"median of {args.rounds} alternating rounds")
    print()
    extra = " baseline (same rounds) | baseline ratio |" if args.baseline else ""
    print("| load | peer | peer | spindle serve | ratio | target |" + extra)
    print("|---|---|---|---|---|---|" + ("---|---|" if args.baseline else ""))
    for label, peer, unit, peer_value, spindle_value, target, baseline in rows:
        ratio = spindle_value / peer_value if peer_value else 0
        line = (f"| {label} | {peer} | {peer_value:,.0f} {unit} | {spindle_value:,.0f} {unit} | {ratio:.2f}x | "
                f">= {target:.2f}x ({'met' if ratio >= target else 'missed'}) |")
        if baseline is not None:
            line += f" {baseline:,.0f} {unit} | {baseline / peer_value if peer_value else 0:.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
