#!/usr/bin/env python3
"""Sparse and incremental copies, measured side by side on this machine:

  1. nbdcopy of a 64 GiB thin volume holding 1 GiB of data (1 MiB extents at random places), served
     by `spindle serve`, against nbdcopy of a 1 GiB fully written volume (target: within 1.5x), and
     against qemu-nbd serving a qcow2 image with the same data in the same places (target: >= 1.0x).
     nbdcopy reads block status and copies only data; the destination is null: so the server is
     what is measured. Every run starts with the images out of the page cache.
  2. `spindle volume diff` of two snapshots of a 1 TiB volume sharing --mappings mappings with 1,000
     random 4 KiB writes between them (target: < 100 ms): the walk as the command reports it, from
     a cold start (the pool image out of the page cache, an empty node cache), and the whole command.

    Tools/compare-sparse.py                   # 3 alternating rounds, 10^6 mappings
    Tools/compare-sparse.py --rounds 5 --mappings 100000
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "Tools"))
from importlib import import_module  # noqa: E402

nbd = import_module("compare-nbd")


def timed(command):
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - started


def sparse_image(path, size, data_bytes, seed):
    """A sparse raw file of `size` bytes with `data_bytes` of random data in 1 MiB extents at random places."""
    rng = random.Random(seed)
    slots = rng.sample(range(size >> 20), data_bytes >> 20)
    with open(path, "wb") as file:
        file.truncate(size)
        for slot in sorted(slots):
            file.seek(slot << 20)
            file.write(os.urandom(1 << 20))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mappings", type=int, default=1_000_000)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--spindle")
    args = parser.parse_args()
    for tool in ["nbdcopy", "qemu-nbd", "qemu-img"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: install it with 'apt-get install libnbd-bin qemu-utils'")
    spindle = args.spindle
    if not spindle:
        subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        spindle = os.path.join(nbd.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT).strip(),
                               "spindle")
    work = tempfile.mkdtemp(prefix="spindle-sparse-", dir=args.dir)
    rows = []
    try:
        pool = os.path.join(work, "pool.img")
        socket = os.path.join(work, "nbd.sock")
        here = ["--dir", work]
        nbd.run([spindle, "pool", "create", "tank", pool, "--size", "72G"] + here)
        print("writing 1 GiB into a 64 GiB volume and a 1 GiB one, and the same into a qcow2...", file=sys.stderr)
        raw = os.path.join(work, "sparse.raw")
        sparse_image(raw, 64 << 30, 1 << 30, seed=1)
        nbd.run([spindle, "volume", "import", "tank/sparse", raw] + here)
        qcow = os.path.join(work, "sparse.qcow2")
        nbd.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow])
        os.remove(raw)
        full = os.path.join(work, "full.raw")
        sparse_image(full, 1 << 30, 1 << 30, seed=2)
        nbd.run([spindle, "volume", "import", "tank/full", full] + here)
        os.remove(full)
        sides = {
            "spindle 64 GiB volume, 1 GiB data": ([spindle, "serve", "volume:tank/sparse", "--read-only", "--socket", socket] + here,
                                                  f"nbd+unix:///tank/sparse?socket={socket}", pool),
            "spindle 1 GiB volume, full": ([spindle, "serve", "volume:tank/full", "--read-only", "--socket", socket] + here,
                                           f"nbd+unix:///tank/full?socket={socket}", pool),
            "qemu-nbd qcow2, same data": (["qemu-nbd", "--socket", socket, "--format=qcow2", "--aio=io_uring", "--cache=none",
                                           "--read-only", "--persistent", "--shared=8", "--export-name=x", qcow],
                                          f"nbd+unix:///x?socket={socket}", qcow),
        }
        seconds = {name: [] for name in sides}
        for index in range(args.rounds):
            names = list(sides) if index % 2 == 0 else list(reversed(list(sides)))
            for name in names:
                command, uri, image = sides[name]
                nbd.drop_cached_pages(image)
                server = nbd.Server(command, socket)
                try:
                    seconds[name].append(timed(["nbdcopy", uri, "null:"]))
                finally:
                    server.stop()
            print(f"  nbdcopy round {index + 1}: " + ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in sides),
                  file=sys.stderr)
        sparse = statistics.median(seconds["spindle 64 GiB volume, 1 GiB data"])
        whole = statistics.median(seconds["spindle 1 GiB volume, full"])
        qemu = statistics.median(seconds["qemu-nbd qcow2, same data"])
        rows.append(("nbdcopy to null: of a 64 GiB volume holding 1 GiB", "the same of a 1 GiB full volume",
                     f"{whole:.2f} s", f"{sparse:.2f} s", f"{sparse / whole:.2f}x the time",
                     f"<= 1.5x ({'met' if sparse <= 1.5 * whole else 'missed'})"))
        rows.append(("nbdcopy to null: of a 64 GiB volume holding 1 GiB", "qemu-nbd, qcow2 with the same data",
                     f"{qemu:.2f} s", f"{sparse:.2f} s", f"{qemu / sparse:.2f}x as fast",
                     f">= 1.0x ({'met' if qemu >= sparse else 'missed'})"))

        print(f"writing {args.mappings} mappings into a 1 TiB volume...", file=sys.stderr)
        nbd.run([spindle, "volume", "create", "tank/big", "--size", "1T"] + here)
        nbd.run([spindle, "bench", "--volume", "tank/big", "--rw", "randwrite", "--bs", "4K", "--iodepth", "32",
                 "--ops", str(args.mappings), "--size", "1T", "--seed", "3"] + here)
        nbd.run([spindle, "volume", "snapshot", "tank/big", "before", "--read-only"] + here)
        nbd.run([spindle, "bench", "--volume", "tank/big", "--rw", "randwrite", "--bs", "4K", "--iodepth", "32",
                 "--ops", "1000", "--size", "1T", "--seed", "4"] + here)
        nbd.run([spindle, "volume", "snapshot", "tank/big", "after", "--read-only"] + here)
        walks, commands, opens = [], [], []
        for _ in range(max(args.rounds, 3)):
            nbd.drop_cached_pages(pool)
            started = time.monotonic()
            output = nbd.run([spindle, "volume", "diff", "tank/before", "tank/after", "--json"] + here)
            commands.append(time.monotonic() - started)
            walks.append(json.loads(output)["elapsedSeconds"])
            nbd.drop_cached_pages(pool)
            opens.append(timed([spindle, "volume", "list", "tank"] + here))
        changed = nbd.run([spindle, "volume", "diff", "tank/before", "tank/after"] + here).splitlines()[0]
        walk = statistics.median(walks)
        # The device's own floor: as many 4 KiB random reads at depth 32 on the pool image as the walk
        # reads nodes (each changed chunk's leaf in both trees: at most 2 per changed range).
        reads = 2 * len(json.loads(output)["ranges"])
        nbd.drop_cached_pages(pool)
        floor = json.loads(nbd.run(["fio", "--name=floor", f"--filename={pool}", "--rw=randread", "--bs=4k", "--iodepth=32",
                                    "--direct=1", "--ioengine=io_uring", "--size=256M", f"--number_ios={reads}",
                                    "--output-format=json"]))["jobs"][0]["read"]["runtime"]
        rows.append((f"volume diff, 1 TiB volumes sharing {args.mappings:,} mappings, 1,000 writes between",
                     "(a bound)", "100 ms", f"{walk * 1000:.0f} ms (the command: {statistics.median(commands) * 1000:.0f} ms, "
                     f"of which starting and opening the pool, as `volume list` takes: {statistics.median(opens) * 1000:.0f} ms; "
                     f"fio's {reads} random 4 KiB reads at depth 32 on the pool image: {floor:.0f} ms)",
                     changed.split(": ", 1)[-1].split(", found")[0], f"< 100 ms ({'met' if walk < 0.1 else 'missed'})"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"median of {args.rounds} alternating rounds; nbdcopy over a Unix socket; volume diff as the whole "
          f"command, the pool image out of the page cache")
    print()
    print("| what | against | theirs | spindle | ratio | target |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
