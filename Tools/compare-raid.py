#!/usr/bin/env python3
"""Compare Spindle's RAID arrays with fio on the same member image files.

For each level, spindle bench runs on the array and fio (io_uring, O_DIRECT, one job) runs the same
load straight on the member files (--filename=a:b:c:d), alternately, for several rounds; the table
shows medians and ratios against the targets of the RAID issue. The rebuild of one member is timed
against fio reading one member sequentially.

    Tools/compare-raid.py                    # 1 GiB members, 3 rounds of 5 s
    Tools/compare-raid.py --member-size 512M --rounds 5
    Tools/compare-raid.py --integrity        # RAID5 x4 with the integrity layer against without it

With --integrity, two RAID5 arrays of four members are made side by side, one with
`array create --integrity`; spindle bench runs the same loads on each, alternately, and the rebuild
of one member is timed on each; the ISA-L checksum rates are printed beside memcpy's.
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


def size_bytes(text):
    units = {"k": 10, "m": 20, "g": 30, "t": 40}
    text = text.lower()
    return int(text[:-1]) << units[text[-1]] if text[-1] in units else int(text)


def fio(files, rw, bs, depth, runtime, size=None):
    command = ["fio", "--name=compare", "--filename=" + ":".join(files), f"--rw={rw}", f"--bs={bs}",
               f"--iodepth={depth}", "--ioengine=io_uring", "--direct=1", "--numjobs=1",
               "--output-format=json", "--offset=1M"]  # leave Spindle's superblocks alone
    command += [f"--runtime={runtime}", "--time_based"] if runtime else []
    command += [f"--size={size}"] if size else []
    output = run(command)
    job = json.loads(output[output.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"], side["bw_bytes"] / 1048576


def spindle_bench(spindle, members, rw, bs, depth, runtime, extra=()):
    command = [spindle, "bench", "--array", *members, "--rw", rw, "--bs", bs.upper(), "--iodepth", str(depth),
               "--runtime", str(runtime), "--json", *extra]
    report = json.loads(run(command))["report"]
    return report["iops"], report["mebibytesPerSecond"]


def compare_integrity(spindle, args, work):
    """RAID5 x4 with the integrity layer under each member against the same array without it."""
    member_bytes = size_bytes(args.member_size) + (1 << 20)
    arrays = {}
    for kind, extra in (("plain", []), ("integrity", ["--integrity"])):
        folder = os.path.join(work, kind)
        os.makedirs(folder)
        members = [os.path.join(folder, f"m{i}.img") for i in range(4)]
        # The integrity layer takes 0.1% and a MiB of each image: grow those so both arrays hold the same data.
        size = member_bytes + (member_bytes // 1024 + (2 << 20) if extra else 0)
        run([spindle, "array", "create", kind, "--level", "5", "--size", str(size), *members, *extra])
        capacity = json.loads(run([spindle, "array", "status", "--json", *members]))["capacityBytes"]
        print(f"filling the {kind} array ({capacity >> 20} MiB)...", file=sys.stderr)
        run([spindle, "bench", "--array", *members, "--rw", "write", "--bs", "768K", "--iodepth", "8",
             "--ops", str(capacity // (768 << 10)), "--json"])
        arrays[kind] = (folder, members)
    rows = []
    loads = [("randread 4K depth 32", "randread", "4k", 32, 0, 0.85),
             ("randwrite 4K depth 32", "randwrite", "4k", 32, 0, 0.70),
             ("full-stripe write 768K depth 8", "write", "768k", 8, 1, 0.80)]
    for label, rw, bs, depth, measure, target in loads:
        values = {"plain": [], "integrity": []}
        for index in range(args.rounds):
            for kind in (["plain", "integrity"] if index % 2 == 0 else ["integrity", "plain"]):
                values[kind].append(spindle_bench(spindle, arrays[kind][1], rw, bs, depth, args.runtime)[measure])
            print(f"  {label} round {index + 1}: plain {values['plain'][-1]:.0f}, integrity {values['integrity'][-1]:.0f}",
                  file=sys.stderr)
        rows.append((label, "IOPS" if measure == 0 else "MiB/s", statistics.median(values["plain"]),
                     statistics.median(values["integrity"]), target))
    rebuilds = {"plain": [], "integrity": []}
    for index in range(args.rounds):
        for kind in (["plain", "integrity"] if index % 2 == 0 else ["integrity", "plain"]):
            folder, members = arrays[kind]
            run([spindle, "array", "fail", "--member", members[1], *members])
            replacement = os.path.join(folder, f"r{index}.img")
            started = time.monotonic()
            run([spindle, "array", "replace", "--old", members[1], "--new", replacement, *members],
                stderr=subprocess.DEVNULL)
            rebuilds[kind].append(size_bytes(args.member_size) / 1048576 / (time.monotonic() - started))
            os.replace(replacement, members[1])
        print(f"  rebuild round {index + 1}: plain {rebuilds['plain'][-1]:.0f} MiB/s, "
              f"integrity {rebuilds['integrity'][-1]:.0f} MiB/s", file=sys.stderr)
    rows.append((f"rebuild one {args.member_size} member", "MiB/s", statistics.median(rebuilds["plain"]),
                 statistics.median(rebuilds["integrity"]), 0.80))
    rates = json.loads(run([spindle, "bench", "--checksum-rate", "--json"]))
    print(f"RAID5, 4 members of {args.member_size}, 64 KiB chunks, O_DIRECT, {args.runtime} s per run, median of "
          f"{args.rounds} alternating rounds; the same loads on an array with the integrity layer and on one without")
    print()
    print("| load | without | with integrity | ratio | target |")
    print("|---|---|---|---|---|")
    for label, unit, plain, checked, target in rows:
        ratio = checked / plain if plain else 0
        print(f"| {label} | {plain:,.0f} {unit} | {checked:,.0f} {unit} | {ratio:.2f}x | "
              f">= {target:.2f}x ({'met' if ratio >= target else 'missed'}) |")
    print()
    print(f"Checksums of 4 KiB blocks in memory, one core: the integrity layer's block checksum (CRC32C and CRC32) "
          f"{rates['blockChecksumMiBPerSecond']:,.0f} MiB/s, CRC32C alone {rates['crc32cMiBPerSecond']:,.0f} MiB/s, "
          f"memcpy {rates['memcpyMiBPerSecond']:,.0f} MiB/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--member-size", default="1G")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--spindle")
    parser.add_argument("--levels", default="raid0,raid1,raid5", help="comma-separated: raid0, raid1, raid5")
    parser.add_argument("--integrity", action="store_true",
                        help="compare RAID5 x4 with the integrity layer against the same array without it")
    args = parser.parse_args()
    if not shutil.which("fio") and not args.integrity:
        sys.exit("fio is missing: install it with 'apt-get install fio'")
    spindle = args.spindle
    if not spindle:
        subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        spindle = os.path.join(run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT).strip(), "spindle")
    if args.integrity:
        work = tempfile.mkdtemp(prefix="spindle-integrity-", dir=args.dir)
        try:
            compare_integrity(spindle, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    member_bytes = size_bytes(args.member_size) + (1 << 20)  # the data area plus Spindle's 1 MiB of metadata
    rows = []
    work = tempfile.mkdtemp(prefix="spindle-raid-", dir=args.dir)
    try:
        # level, members, loads: (label, rw, bs, depth, measure, target, fio scale)
        plans = [
            ("raid0", 4, [("randread 4K depth 32", "randread", "4k", 32, 0, 0.90, 1.0)]),
            ("raid1", 2, [("randread 4K depth 32", "randread", "4k", 32, 0, 0.90, 1.0),
                          ("randwrite 4K depth 32", "randwrite", "4k", 32, 0, 0.45, 1.0)]),
            ("raid5", 4, [("randread 4K depth 32", "randread", "4k", 32, 0, 0.85, 1.0),
                          ("full-stripe write 768K depth 8", "write", "768k", 8, 1, 0.70, 0.75),
                          ("randwrite 4K depth 32", "randwrite", "4k", 32, 0, 0.20, 1.0)]),
        ]
        wanted = set(args.levels.split(","))
        for level, count, loads in [plan for plan in plans if plan[0] in wanted]:
            folder = os.path.join(work, level)
            os.makedirs(folder)
            members = [os.path.join(folder, f"m{i}.img") for i in range(count)]
            run([spindle, "array", "create", level, "--level", level[-1], "--size", str(member_bytes), *members])
            capacity = json.loads(run([spindle, "array", "status", "--json", *members]))["capacityBytes"]
            print(f"filling the {level} array ({capacity >> 20} MiB)...", file=sys.stderr)
            run([spindle, "bench", "--array", *members, "--rw", "write", "--bs", "768K", "--iodepth", "8",
                 "--ops", str(capacity // (768 << 10)), "--json"])
            for label, rw, bs, depth, measure, target, scale in loads:
                fio_values, spindle_values = [], []
                for index in range(args.rounds):
                    order = [0, 1] if index % 2 == 0 else [1, 0]
                    for tool in order:
                        if tool == 0:
                            fio_values.append(fio(members, rw, bs, depth, args.runtime)[measure])
                        else:
                            spindle_values.append(spindle_bench(spindle, members, rw, bs, depth, args.runtime)[measure])
                    print(f"  {level} {label} round {index + 1}: fio {fio_values[-1]:.0f}, spindle {spindle_values[-1]:.0f}",
                          file=sys.stderr)
                rows.append((level, count, label, "IOPS" if measure == 0 else "MiB/s", statistics.median(fio_values) * scale,
                             statistics.median(spindle_values), target, scale))
            if level == "raid5":
                rebuild_rates, read_rates, survivors_rates = [], [], []
                for index in range(args.rounds):
                    run([spindle, "array", "fail", "--member", members[1], *members])
                    replacement = os.path.join(folder, f"r{index}.img")
                    started = time.monotonic()
                    run([spindle, "array", "replace", "--old", members[1], "--new", replacement, *members],
                        stderr=subprocess.DEVNULL)
                    rebuild_rates.append(size_bytes(args.member_size) / 1048576 / (time.monotonic() - started))
                    os.replace(replacement, members[1])
                    read_rates.append(fio([members[0]], "read", "1m", 8, None, size=args.member_size)[1])
                    # What the disk gives when the n-1 surviving members are read at once, per member:
                    # the rebuild cannot go faster than that.
                    survivors = [m for i, m in enumerate(members) if i != 1]
                    total = fio(survivors, "read", "1m", 8 * len(survivors), None,
                                size=str(size_bytes(args.member_size) * len(survivors)))[1]
                    survivors_rates.append(total / len(survivors))
                    print(f"  rebuild round {index + 1}: {rebuild_rates[-1]:.0f} MiB/s; fio reading one member "
                          f"{read_rates[-1]:.0f} MiB/s, the {len(survivors)} survivors at once {survivors_rates[-1]:.0f} MiB/s each",
                          file=sys.stderr)
                rows.append(("raid5", count, f"rebuild one {args.member_size} member (vs fio reading one member, 1M depth 8)",
                             "MiB/s", statistics.median(read_rates), statistics.median(rebuild_rates), 0.70, 1.0))
                rows.append(("raid5", count, f"rebuild, against fio reading the {count - 1} surviving members at once (per member)",
                             "MiB/s", statistics.median(survivors_rates), statistics.median(rebuild_rates), 0.70, 1.0))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Members {args.member_size}, O_DIRECT, one job, {args.runtime} s per run, median of {args.rounds} alternating rounds; "
          "fio runs the same load on the member files")
    print()
    print("| array | load | fio on the members | spindle array | ratio | target |")
    print("|---|---|---|---|---|---|")
    for level, count, label, unit, fio_value, spindle_value, target, scale in rows:
        ratio = spindle_value / fio_value if fio_value else 0
        basis = f" (x{scale} of fio)" if scale != 1.0 else ""
        print(f"| {level}, {count} members | {label} | {fio_value:,.0f} {unit}{basis} | {spindle_value:,.0f} {unit} | "
              f"{ratio:.2f}x | >= {target:.2f}x ({'met' if ratio >= target else 'missed'}) |")


if __name__ == "__main__":
    main()
