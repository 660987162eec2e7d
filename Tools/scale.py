#!/usr/bin/env python3
"""How a thin pool behaves as its metadata grows: pools with 10^4, 10^5, 10^6 (and, asked for, 10^7)
mappings, built by random 4 KiB first writes over a volume sixteen times larger than what gets
written (so nearly every write maps a new chunk), then measured with the same release build:

  - first writes (the building pass itself): IOPS, p99 and p99.9 latency, peak RSS;
  - overwrites and reads of mapped chunks (the same offsets again, same seed);
  - the admin commands: pool open (the first command, with the image out of the page cache),
    pool status, pool list, volume list, volume snapshot, pool check, volume delete of the snapshot
    and then of the volume (which by then owns every chunk alone), and volume export of a mostly
    empty volume of the same size (100 chunks written);
  - with --on raid5 the pool sits on a 4-member RAID5 array (every pool command then assembles
    it, rebuild-free, so the pool-open row includes the assembly), and `array status` is timed too.

Each figure comes from one run; the machine is described above the table.

    Tools/scale.py                               # 10^4, 10^5, 10^6 mappings, pool on one image
    Tools/scale.py --sizes 10000,10000000        # 10^7 takes about 10 minutes and ~45 GiB of disk
    Tools/scale.py --on raid5 --metadata-cache 64M
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 64 * 1024


def drop_cached_pages(folder):
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".img") and os.path.isfile(path):
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def run_measured(command):
    """Runs a command and returns (stdout, seconds, peak RSS MiB) using wait4 for the child's own RSS."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output = process.stdout.read()
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    if status != 0:
        sys.exit(f"{' '.join(command)} failed ({status}): {errors.decode().strip()}")
    return output.decode(), seconds, usage.ru_maxrss / 1024


def measure(spindle, size, work, on, cache):
    folder = os.path.join(work, f"n{size}")
    os.makedirs(folder)
    extra = ["--metadata-cache", cache] if cache else []

    def spindle_run(*arguments, pool_option=True, folder_option=True):
        command = [spindle, *arguments] + (["--dir", folder] if folder_option else []) + (extra if pool_option else [])
        return run_measured(command)

    volume_bytes = max(1 << 30, size * 16 * CHUNK)
    # Room for every chunk written, twice over for the snapshot's copies, and a margin.
    pool_bytes = size * CHUNK * 2 + (2 << 30)
    if on == "raid5":
        members = [os.path.join(folder, f"m{index}.img") for index in range(4)]
        spindle_run("array", "create", "r5", "--level", "5", *members, "--size", str((pool_bytes // 3 + (64 << 20)) // (1 << 20) * (1 << 20)),
                    pool_option=False, folder_option=False)
        spindle_run("pool", "create", "big", "array:r5", pool_option=False)
    else:
        spindle_run("pool", "create", "big", os.path.join(folder, "pool.img"), "--size", str(pool_bytes),
                    pool_option=False)
    spindle_run("volume", "create", "big/v", "--size", str(volume_bytes), pool_option=False)

    row = {"size": size}
    bench = ["bench", "--volume", "big/v", "--bs", "4K", "--iodepth", "32", "--size", str(volume_bytes), "--json",
             "--seed", "7"]
    print(f"  {size}: first writes...", file=sys.stderr)
    output, seconds, rss = spindle_run(*bench, "--rw", "randwrite", "--ops", str(size))
    report = json.loads(output)["report"]["write"]
    row["first_iops"] = report["iops"]
    row["first_p99_ms"] = report["latencyNanosP99"] / 1e6
    row["first_p999_ms"] = report["latencyNanosP999"] / 1e6
    row["first_max_ms"] = report["latencyNanosMax"] / 1e6
    row["first_rss"] = rss
    again = min(size, 200_000)
    print(f"  {size}: overwrites and reads...", file=sys.stderr)
    output, _, _ = spindle_run(*bench, "--rw", "randwrite", "--ops", str(again))
    row["overwrite_iops"] = json.loads(output)["report"]["write"]["iops"]
    output, _, _ = spindle_run(*bench, "--rw", "randread", "--ops", str(again))
    row["read_iops"] = json.loads(output)["report"]["read"]["iops"]

    drop_cached_pages(folder)
    _, row["open_s"], _ = spindle_run("volume", "list", "big")
    output, row["status_s"], row["status_rss"] = spindle_run("pool", "status", "big", "--json")
    status = json.loads(output)
    row["mappings"] = sum(volume["mappedBytes"] for volume in status["volumes"]) // CHUNK
    _, row["pool_list_s"], _ = spindle_run("pool", "list", pool_option=False)
    _, row["volume_list_s"], _ = spindle_run("volume", "list", "big")
    _, row["snapshot_s"], _ = spindle_run("volume", "snapshot", "big/v", "s")
    output, row["check_s"], row["check_rss"] = spindle_run("pool", "check", "big", "--json")
    check = json.loads(output)
    if check.get("problems"):
        sys.exit(f"pool check found problems at {size}: {check['problems'][:3]}")
    row["check_mappings"] = check.get("mappedChunks", 0)
    _, row["delete_snapshot_s"], _ = spindle_run("volume", "delete", "big/s", "--yes")
    _, row["delete_volume_s"], _ = spindle_run("volume", "delete", "big/v", "--yes")

    spindle_run("volume", "create", "big/sparse", "--size", str(volume_bytes), pool_option=False)
    spindle_run("bench", "--volume", "big/sparse", "--bs", "4K", "--iodepth", "8", "--size", str(volume_bytes),
                "--rw", "randwrite", "--ops", "100", "--seed", "3")
    target = os.path.join(folder, "export.raw")
    _, row["export_s"], _ = spindle_run("volume", "export", "big/sparse", target)
    os.remove(target)
    if on == "raid5":
        _, row["reassembly_s"], _ = spindle_run("array", "status", "--scan", folder, "--array-name", "r5",
                                                pool_option=False, folder_option=False)
    shutil.rmtree(folder)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="mapping counts, comma-separated")
    parser.add_argument("--on", choices=["image", "raid5"], default="image", help="what the pool sits on")
    parser.add_argument("--metadata-cache", help="the pool's metadata cache budget, such as 256M (default: spindle's)")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--spindle")
    args = parser.parse_args()
    spindle = args.spindle
    if not spindle:
        subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        spindle = os.path.join(subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT,
                                              check=True, text=True, stdout=subprocess.PIPE).stdout.strip(), "spindle")
    sizes = [int(float(text)) for text in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="spindle-scale-", dir=args.dir)
    rows = []
    try:
        for size in sizes:
            rows.append(measure(spindle, size, work, args.on, args.metadata_cache))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpus = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    print(f"Machine: {platform.machine()}, {cpus} CPUs, {memory:.0f} GiB RAM, Linux {platform.release()}; "
          f"pool on {'one sparse image' if args.on == 'image' else 'a RAID5 array of 4 sparse images'}, 64 KiB chunks, "
          f"metadata cache {args.metadata_cache or 'default'}; figures from one run")
    print()
    header = ["", *[f"{row['size']:,} writes ({row['mappings']:,} mappings)" for row in rows]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    def line(label, key, form):
        print(f"| {label} | " + " | ".join(form(row[key]) if key in row else "—" for row in rows) + " |")

    iops = lambda value: f"{value:,.0f}"
    seconds = lambda value: f"{value:.2f} s"
    millis = lambda value: f"{value:.1f} ms"
    mib = lambda value: f"{value:.0f} MiB"
    line("first writes, 4K depth 32 (IOPS)", "first_iops", iops)
    line("first writes p99", "first_p99_ms", millis)
    line("first writes p99.9", "first_p999_ms", millis)
    line("first writes max", "first_max_ms", millis)
    line("peak RSS while writing", "first_rss", mib)
    line("overwrites of mapped chunks (IOPS)", "overwrite_iops", iops)
    line("reads of mapped chunks (IOPS)", "read_iops", iops)
    line("pool open (first command, cold page cache: volume list)", "open_s", seconds)
    line("pool status", "status_s", seconds)
    line("pool list", "pool_list_s", seconds)
    line("volume list", "volume_list_s", seconds)
    line("volume snapshot", "snapshot_s", seconds)
    line("pool check", "check_s", seconds)
    line("pool check RSS", "check_rss", mib)
    line("volume delete (the snapshot)", "delete_snapshot_s", seconds)
    line("volume delete (the volume, every chunk its own)", "delete_volume_s", seconds)
    line("volume export, mostly empty volume of the same size", "export_s", seconds)
    line("array status after the run (every member's superblocks read; pool commands assemble the array)",
         "reassembly_s", seconds)
    if rows:
        base = rows[0]["first_iops"]
        print()
        print("First-write IOPS against the smallest pool: " +
              ", ".join(f"{row['size']:,}: {row['first_iops'] / base:.2f}x" for row in rows))


if __name__ == "__main__":
    main()
