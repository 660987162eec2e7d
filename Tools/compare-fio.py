#!/usr/bin/env python3
"""Compare `spindle bench` with fio (io_uring engine) on the same image file.

Both tools run the same load (pattern, block size, depth, O_DIRECT, one job) on the same filled
image, alternately, for several rounds; the table shows the median of each and their ratio.

    Tools/compare-fio.py                      # the four loads of the foundation targets
    Tools/compare-fio.py --rounds 5 --runtime 10 --size 2G
    Tools/compare-fio.py --loads randread --spindle-args "--submit-batch 4"

Needs fio (installed with apt-get when missing and run as root) and builds spindle in release mode
unless --spindle names a binary.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (fio rw, block size, depth, measure, target ratio)
LOADS = {
    "randread": ("randread", "4k", 32, "iops", 0.90),
    "randwrite": ("randwrite", "4k", 32, "iops", 0.90),
    "read": ("read", "1m", 8, "mib", 0.95),
    "write": ("write", "1m", 8, "mib", 0.95),
}


def run(command, **kwargs):
    return subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE, **kwargs).stdout


def ensure_fio():
    if shutil.which("fio"):
        return
    if os.geteuid() != 0:
        sys.exit("fio is missing: install it with 'apt-get install fio'")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "fio"], check=True)


def build_spindle():
    print("building spindle (release)...", file=sys.stderr)
    subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    path = run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT).strip()
    return os.path.join(path, "spindle")


def size_bytes(text):
    units = {"k": 10, "m": 20, "g": 30, "t": 40}
    text = text.lower().rstrip("ib").rstrip("b")
    if text[-1] in units:
        return int(text[:-1]) << units[text[-1]]
    return int(text)


def fio_figure(image, load, args):
    rw, bs, depth, measure, _ = LOADS[load]
    output = run(["fio", "--name=compare", f"--filename={image}", f"--rw={rw}", f"--bs={bs}",
                  f"--iodepth={depth}", "--ioengine=io_uring", "--direct=1", "--numjobs=1",
                  f"--size={args.size}", f"--runtime={args.runtime}", "--time_based",
                  "--output-format=json"])
    job = json.loads(output[output.index("{"):])["jobs"][0]
    side = job["read"] if rw in ("read", "randread") else job["write"]
    return side["iops"] if measure == "iops" else side["bw_bytes"] / 1048576


def spindle_figure(spindle, image, load, args):
    rw, bs, depth, measure, _ = LOADS[load]
    command = [spindle, "bench", image, "--rw", rw, "--bs", bs.upper(), "--iodepth", str(depth),
               "--size", args.size.upper(), "--runtime", str(args.runtime), "--json"]
    command += args.spindle_args.split()
    report = json.loads(run(command))["report"]
    return report["iops"] if measure == "iops" else report["mebibytesPerSecond"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per run")
    parser.add_argument("--size", default="1G", help="image size, e.g. 1G")
    parser.add_argument("--dir", default="/var/tmp", help="folder for the image (needs O_DIRECT support)")
    parser.add_argument("--loads", default=",".join(LOADS), help="comma-separated: " + ", ".join(LOADS))
    parser.add_argument("--spindle", help="spindle binary to use instead of building one")
    parser.add_argument("--spindle-args", default="", help="extra arguments for spindle bench")
    args = parser.parse_args()

    ensure_fio()
    spindle = args.spindle or build_spindle()
    loads = [load.strip() for load in args.loads.split(",") if load.strip()]
    for load in loads:
        if load not in LOADS:
            sys.exit(f"unknown load '{load}'; choose from {', '.join(LOADS)}")

    workdir = tempfile.mkdtemp(prefix="spindle-compare-", dir=args.dir)
    image = os.path.join(workdir, "compare.img")
    try:
        total = size_bytes(args.size)
        print(f"filling {image} ({args.size})...", file=sys.stderr)
        run([spindle, "bench", image, "--size", args.size.upper(), "--rw", "write", "--bs", "1M",
             "--iodepth", "8", "--ops", str(total // 1048576), "--json"])
        rows = []
        for load in loads:
            fio_values, spindle_values = [], []
            for round_index in range(args.rounds):
                # Alternate which tool goes first, so drift on the machine hits both alike.
                order = ["fio", "spindle"] if round_index % 2 == 0 else ["spindle", "fio"]
                for tool in order:
                    if tool == "fio":
                        fio_values.append(fio_figure(image, load, args))
                    else:
                        spindle_values.append(spindle_figure(spindle, image, load, args))
                print(f"  {load} round {round_index + 1}: fio {fio_values[-1]:.1f}, spindle {spindle_values[-1]:.1f}",
                      file=sys.stderr)
            rows.append((load, statistics.median(fio_values), statistics.median(spindle_values)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"Image {args.size}, O_DIRECT, one job, {args.runtime} s per run, median of {args.rounds} alternating rounds"
          + (f", spindle {args.spindle_args}" if args.spindle_args else ""))
    print()
    print("| load | fio (io_uring) | spindle bench | ratio | target |")
    print("|---|---|---|---|---|")
    for load, fio_value, spindle_value in rows:
        rw, bs, depth, measure, target = LOADS[load]
        unit = "IOPS" if measure == "iops" else "MiB/s"
        ratio = spindle_value / fio_value if fio_value else 0
        verdict = "met" if ratio >= target else "missed"
        print(f"| {rw} {bs.upper()} depth {depth} | {fio_value:,.0f} {unit} | {spindle_value:,.0f} {unit} | "
              f"{ratio:.2f}x | >= {target:.2f}x ({verdict}) |")


if __name__ == "__main__":
    main()
