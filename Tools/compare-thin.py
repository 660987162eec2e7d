#!/usr/bin/env python3
"""Measure Spindle's thin volumes against their backing image, fio and qemu-img, in one run.

Loads (spindle bench and fio alternate; medians of several rounds):
  1. randread and randwrite 4K depth 32 on a fully written volume, against fio on the pool's
     backing image itself (its data region: the same file blocks).
  2. First writes: 4K randwrite depth 32 on a new volume (each write lands in a chunk never written),
     against fio on a new sparse image of the pool's size, and against qemu-img bench writing a new
     qcow2 image of the same size one cluster apart (each write allocates a cluster).
  3. Snapshot time of a volume with 1 GiB mapped against one with 16 GiB mapped (one 4K write per
     64K chunk, so the metadata is that of a fully written volume).
  4. Peak memory (max RSS) of a process with a 1 TiB pool open, running a load.

    Tools/compare-thin.py                 # 1 GiB pool, 5 rounds of 4 s
    Tools/compare-thin.py --rounds 3 --runtime 3
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command, **kwargs):
    return subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE, **kwargs).stdout


def fio(filename, rw, bs, depth, runtime=None, io_size=None, offset=None):
    command = ["fio", "--name=compare", f"--filename={filename}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
               "--ioengine=io_uring", "--direct=1", "--numjobs=1", "--output-format=json", "--randrepeat=0"]
    command += [f"--runtime={runtime}", "--time_based"] if runtime else []
    command += [f"--io_size={io_size}"] if io_size else []
    command += [f"--offset={offset}"] if offset else []
    output = run(command)
    job = json.loads(output[output.index("{"):])["jobs"][0]
    return (job["read"] if "read" in rw else job["write"])["iops"]


def bench(spindle, folder, volume, rw, bs, depth, runtime=None, ops=None):
    command = [spindle, "bench", "--volume", volume, "--dir", folder, "--rw", rw, "--bs", bs, "--iodepth", str(depth), "--json"]
    command += ["--runtime", str(runtime)] if runtime else []
    command += ["--ops", str(ops)] if ops else []
    return json.loads(run(command))["report"]["iops"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=4)
    parser.add_argument("--pool-size", default="1G", help="size of the pool image for the full-volume loads")
    parser.add_argument("--first-writes", type=int, default=65536, help="4K writes into new chunks per round")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--spindle")
    parser.add_argument("--only", default="full,first,snapshot,memory", help="sections to run, comma-separated")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    for tool in ["fio", "qemu-img"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: install it with 'apt-get install fio qemu-utils'")
    spindle = args.spindle
    if not spindle:
        subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        spindle = os.path.join(run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT).strip(), "spindle")
    rows = []
    work = tempfile.mkdtemp(prefix="spindle-thin-", dir=args.dir)
    try:
        # 1. A fully written volume against its backing image.
        if "full" in sections:
            full = os.path.join(work, "full")
            os.makedirs(full)
            image = os.path.join(full, "pool.img")
            run([spindle, "pool", "create", "tank", image, "--size", args.pool_size, "--dir", full])
            size = json.loads(run([spindle, "pool", "status", "tank", "--dir", full, "--json"]))["sizeBytes"]
            run([spindle, "volume", "create", "tank/full", "--size", str(size), "--dir", full])
            print(f"filling a {size >> 20} MiB volume...", file=sys.stderr)
            run([spindle, "bench", "--volume", "tank/full", "--dir", full, "--rw", "write", "--bs", "1M", "--iodepth", "8",
                 "--ops", str(size >> 20), "--json"])
            # fio runs on the pool image's data region (past the label and the metadata): the same file
            # blocks the volume uses. Its writes only scramble data the volume's load does not check.
            status = json.loads(run([spindle, "pool", "status", "tank", "--dir", full, "--json"]))["usage"]
            chunk = status["chunkBytes"]
            data_offset = (4096 + status["metadataBlocks"] * 4096 + chunk - 1) // chunk * chunk
            for label, rw, target in [("randread 4K depth 32, fully written volume", "randread", 0.95),
                                      ("randwrite 4K depth 32, fully written volume", "randwrite", 0.95)]:
                fio_values, spindle_values = [], []
                for index in range(args.rounds):
                    for tool in ([0, 1] if index % 2 == 0 else [1, 0]):
                        if tool == 0:
                            fio_values.append(fio(image, rw, "4k", 32, runtime=args.runtime, offset=data_offset))
                        else:
                            spindle_values.append(bench(spindle, full, "tank/full", rw, "4K", 32, runtime=args.runtime))
                    print(f"  {label} round {index + 1}: fio {fio_values[-1]:.0f}, spindle {spindle_values[-1]:.0f} IOPS", file=sys.stderr)
                rows.append((label, "fio on the backing image", statistics.median(fio_values), statistics.median(spindle_values), target))

        # 2. First writes on new volumes, new sparse images, new qcow2 images.
        if "first" in sections:
            first = os.path.join(work, "first")
            os.makedirs(first)
            volume_bytes = args.first_writes * 4 * 65536  # a quarter of the chunks get a write
            run([spindle, "pool", "create", "fresh", os.path.join(first, "fresh.img"), "--size", str(volume_bytes * args.rounds + (1 << 30)),
                 "--dir", first])
            sparse_values, spindle_values, qemu_values, filled_values = [], [], [], []
            for index in range(args.rounds):
                run([spindle, "volume", "create", f"fresh/v{index}", "--size", str(volume_bytes), "--dir", first])
                sparse = os.path.join(first, f"sparse{index}.img")
                qcow = os.path.join(first, f"new{index}.qcow2")
                with open(sparse, "wb") as handle:
                    handle.truncate(volume_bytes)
                run(["qemu-img", "create", "-f", "qcow2", qcow, str(volume_bytes)])
                for tool in ([0, 1, 2] if index % 2 == 0 else [2, 1, 0]):
                    if tool == 0:
                        sparse_values.append(fio(sparse, "randwrite", "4k", 32, io_size=str(args.first_writes * 4096)))
                    elif tool == 1:
                        spindle_values.append(bench(spindle, first, f"fresh/v{index}", "randwrite", "4K", 32, ops=args.first_writes))
                    else:
                        started = time.monotonic()
                        run(["qemu-img", "bench", "-w", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-d", "32", "-s", "4096",
                             "-S", "65536", "-c", str(args.first_writes), qcow])
                        qemu_values.append(args.first_writes / (time.monotonic() - started))
                filled = os.path.join(first, "filled.img")
                if not os.path.exists(filled):
                    run(["fio", "--name=fill", f"--filename={filled}", "--rw=write", "--bs=1m", "--size=1g", "--ioengine=io_uring",
                         "--direct=1", "--output-format=json"])
                filled_values.append(fio(filled, "randwrite", "4k", 32, runtime=args.runtime))
                os.remove(sparse)
                os.remove(qcow)
                print(f"  first writes round {index + 1}: spindle {spindle_values[-1]:.0f}, fio on a new sparse image {sparse_values[-1]:.0f}, "
                      f"qemu-img bench on a new qcow2 {qemu_values[-1]:.0f}, fio on a filled image {filled_values[-1]:.0f} IOPS", file=sys.stderr)
            label = f"first writes: 4K randwrite depth 32 on a new volume ({args.first_writes} writes)"
            rows.append((label, "fio randwrite on a new sparse image", statistics.median(sparse_values), statistics.median(spindle_values), 0.5))
            rows.append((label, "fio randwrite on a filled 1 GiB image", statistics.median(filled_values), statistics.median(spindle_values), 0.5))
            rows.append((label, "qemu-img bench -w, new qcow2, a new cluster per write", statistics.median(qemu_values),
                         statistics.median(spindle_values), 2.0))

        # 3. Snapshot time against the amount mapped.
        if "snapshot" in sections:
            snap = os.path.join(work, "snap")
            os.makedirs(snap)
            run([spindle, "pool", "create", "snaps", os.path.join(snap, "snaps.img"), "--size", "20G", "--dir", snap])
            timings = {}
            for gibibytes in [1, 16]:
                volume = f"snaps/v{gibibytes}"
                source = os.path.join(snap, f"source{gibibytes}.bin")
                with open(source, "wb") as handle:  # one byte in every 64 KiB chunk: every chunk mapped
                    handle.truncate(gibibytes << 30)
                    for offset in range(0, gibibytes << 30, 65536):
                        handle.seek(offset)
                        handle.write(b"\x01")
                run([spindle, "volume", "import", volume, source, "--dir", snap], stderr=subprocess.DEVNULL)
                os.remove(source)
                values = []
                for index in range(args.rounds):
                    output = run([spindle, "volume", "snapshot", volume, f"s{gibibytes}-{index}", "--dir", snap])
                    values.append(float(re.search(r"in ([0-9.]+) ms", output).group(1)) / 1000)
                timings[gibibytes] = statistics.median(values)
                print(f"  snapshot of {gibibytes} GiB mapped: {timings[gibibytes] * 1000:.2f} ms", file=sys.stderr)
            rows.append(("snapshot (the library call: share the tree, commit)", "the same with 1 GiB mapped",
                         timings[1] * 1000, timings[16] * 1000, None))

        # 4. Memory with a 1 TiB pool open under load.
        if "memory" in sections:
            big = os.path.join(work, "big")
            os.makedirs(big)
            run([spindle, "pool", "create", "huge", os.path.join(big, "huge.img"), "--size", "1T", "--dir", big])
            run([spindle, "volume", "create", "huge/v", "--size", "1020G", "--dir", big])
            # The bench process's own peak (wait4), not the peak of every child so far (which would
            # count the build and the other tools run before).
            bench_process = subprocess.Popen([spindle, "bench", "--volume", "huge/v", "--dir", big, "--rw", "randwrite",
                                              "--bs", "4K", "--iodepth", "32", "--runtime", str(args.runtime * 2), "--json"],
                                             text=True, stdout=subprocess.PIPE)
            output = bench_process.stdout.read()
            _, status, usage = os.wait4(bench_process.pid, 0)
            bench_process.returncode = os.waitstatus_to_exitcode(status)
            if bench_process.returncode != 0:
                raise subprocess.CalledProcessError(bench_process.returncode, bench_process.args)
            report = json.loads(output)["report"]
            peak = usage.ru_maxrss
            mapped = json.loads(run([spindle, "pool", "status", "huge", "--dir", big, "--json"]))["usage"]["usedChunks"]
            print(f"  1 TiB pool: peak RSS of the bench process {peak / 1024:.0f} MiB, "
                  f"{mapped} chunks mapped by {report['operations']} writes", file=sys.stderr)
            rows.append((f"peak memory, 1 TiB pool, 4K randwrite for {args.runtime * 2} s ({mapped} chunks mapped)", "limit (MiB)", 256,
                         peak / 1024, None))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Thin volumes, O_DIRECT, one job; median of {args.rounds} alternating rounds ({args.runtime} s each where timed); "
          f"pool of {args.pool_size} for the full-volume loads")
    print()
    print("| load | compared with | peer | spindle | ratio | target |")
    print("|---|---|---|---|---|---|")
    for label, peer, peer_value, spindle_value, target in rows:
        if target is None:
            if "memory" in label:
                verdict = "met" if spindle_value < peer_value else "missed"
                print(f"| {label} | {peer} | {peer_value:,.0f} MiB | {spindle_value:,.0f} MiB | | < {peer_value:.0f} MiB ({verdict}) |")
            else:
                ratio = spindle_value / peer_value
                verdict = "met" if ratio < 1.5 else "missed"
                print(f"| {label} | {peer} | {peer_value:,.2f} ms | {spindle_value:,.2f} ms with 16 GiB mapped | {ratio:.2f}x | "
                      f"does not grow with the volume ({verdict}) |")
            continue
        ratio = spindle_value / peer_value if peer_value else 0
        print(f"| {label} | {peer} | {peer_value:,.0f} IOPS | {spindle_value:,.0f} IOPS | {ratio:.2f}x | "
              f">= {target:.2f}x ({'met' if ratio >= target else 'missed'}) |")


if __name__ == "__main__":
    main()
