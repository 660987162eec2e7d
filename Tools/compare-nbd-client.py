#!/usr/bin/env python3
"""Compare Spindle's NBD client device (`spindle bench nbd+unix://...`) with fio's nbd engine (libnbd),
both driving the same nbdkit server over a Unix socket: 4K randread and randwrite depth 32, 1M sequential
read and write depth 8. The server (nbdkit memory, filled first so reads return data) runs for the whole
comparison; the two clients alternate; medians of several rounds.

    Tools/compare-nbd-client.py                  # 1 GiB export, 3 rounds of 4 s
    Tools/compare-nbd-client.py --rounds 5 --runtime 5
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("compare_nbd", os.path.join(ROOT, "Tools", "compare-nbd.py"))
compare_nbd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_nbd)
run, fio, Server = compare_nbd.run, compare_nbd.fio, compare_nbd.Server


def spindle_bench(spindle, uri, rw, bs, depth, runtime, size):
    output = run([spindle, "bench", uri, f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--runtime={runtime}",
                  f"--size={size}", "--json"])
    report = json.loads(output)["report"]
    side = report["read"] if "read" in rw else report["write"]
    return side["iops"], side["mebibytesPerSecond"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=4)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--spindle")
    args = parser.parse_args()
    for tool in ["fio", "nbdkit"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: install it with 'apt-get install fio nbdkit'")
    spindle = args.spindle
    if not spindle:
        subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        spindle = os.path.join(run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT).strip(), "spindle")
    work = tempfile.mkdtemp(prefix="spindle-nbd-client-", dir=args.dir)
    rows = []
    try:
        socket = os.path.join(work, "nbd.sock")
        uri = f"nbd+unix:///?socket={socket}"
        server = Server(["nbdkit", "--foreground", "--unix", socket, "--exit-with-parent", "--threads=16", "memory",
                         args.size], socket)
        try:
            print(f"filling the {args.size} export...", file=sys.stderr)
            run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1m", "--iodepth=8",
                 "--output-format=json"])
            loads = [("randread 4K depth 32", "randread", "4k", 32, 0), ("randwrite 4K depth 32", "randwrite", "4k", 32, 0),
                     ("read 1M depth 8", "read", "1m", 8, 1), ("write 1M depth 8", "write", "1m", 8, 1)]
            for label, rw, bs, depth, measure in loads:
                values = {"fio": [], "spindle": []}
                for index in range(args.rounds):
                    for name in (["fio", "spindle"] if index % 2 == 0 else ["spindle", "fio"]):
                        if name == "fio":
                            values[name].append(fio(uri, rw, bs, depth, runtime=args.runtime)[measure])
                        else:
                            values[name].append(spindle_bench(spindle, uri, rw, bs, depth, args.runtime, args.size)[measure])
                    print(f"  {label} round {index + 1}: fio {values['fio'][-1]:.0f}, spindle {values['spindle'][-1]:.0f}",
                          file=sys.stderr)
                rows.append((label, "IOPS" if measure == 0 else "MiB/s", statistics.median(values["fio"]),
                             statistics.median(values["spindle"])))
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"nbdkit memory {args.size} (filled) over a Unix socket; fio --ioengine=nbd (libnbd) against spindle bench "
          f"on an NBDDevice; {args.runtime} s per run; median of {args.rounds} alternating rounds")
    print()
    print("| load | fio --ioengine=nbd | spindle NBD device | ratio | target |")
    print("|---|---|---|---|---|")
    for label, unit, peer, ours in rows:
        ratio = ours / peer if peer else 0
        print(f"| {label} | {peer:,.0f} {unit} | {ours:,.0f} {unit} | {ratio:.2f}x | >= 0.90x ({'met' if ratio >= 0.9 else 'missed'}) |")


if __name__ == "__main__":
    main()
