#!/usr/bin/env python3
"""Compare `spindle serve` with nbdkit over NBD with TLS-PSK (fio's nbd engine cannot do TLS), on the
same filled raw image, through TCP on loopback with the same pre-shared key file.

  1. nbdcopy of the whole image to null: (the default: as many connections as the server allows, and
     with --connections=1), in MiB/s.
  2. 4 KiB random reads at depth 32 from one libnbd connection (Python's nbd module, asynchronous
     calls), in IOPS.
  3. The same random reads without TLS (over a Unix socket), to show what TLS costs each server.

Servers start and stop around each run; the two sides alternate; medians of several rounds.

    Tools/compare-tls.py                      # 1 GiB image, 3 rounds
    Tools/compare-tls.py --rounds 5 --runtime 5
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"  # the interpreter Debian's python3-libnbd installs into

RANDOM_READS = r"""
import nbd, random, sys, time
uri, seconds, depth = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
blocks = h.get_size() // 4096
buffers = [nbd.Buffer(4096) for _ in range(depth)]
free = list(range(depth))
done = [0]
def finished(slot, error):
    free.append(slot)
    done[0] += 1
    return 1
end = time.monotonic() + seconds
start = time.monotonic()
while time.monotonic() < end:
    while free:
        slot = free.pop()
        h.aio_pread(buffers[slot], random.randrange(blocks) * 4096, completion=lambda error, slot=slot: finished(slot, error))
    h.poll(-1)
elapsed = time.monotonic() - start
while h.aio_in_flight() > 0:
    h.poll(-1)
print(done[0] / elapsed)
h.shutdown()
"""


def run(command, **kwargs):
    return subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE, **kwargs).stdout


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server process started for one run and stopped after it; ready once it accepts connections."""

    def __init__(self, command, port=None, unix=None):
        if unix and os.path.exists(unix):
            os.remove(unix)
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(command)}")
            if unix:
                if os.path.exists(unix):
                    return
            else:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)

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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=4)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--spindle")
    args = parser.parse_args()
    for tool in ["fio", "nbdkit", "nbdcopy", "psktool"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: install it with 'apt-get install fio nbdkit libnbd-bin gnutls-bin python3-libnbd'")
    spindle = args.spindle
    if not spindle:
        subprocess.run(["swift", "build", "-c", "release", "--product", "spindle"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        spindle = os.path.join(run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT).strip(), "spindle")
    work = tempfile.mkdtemp(prefix="spindle-tls-", dir=args.dir)
    rows = []
    try:
        image = os.path.join(work, "disk.img")
        keys = os.path.join(work, "keys.psk")
        unix = os.path.join(work, "nbd.sock")
        run(["psktool", "-u", "alice", "-p", keys], stderr=subprocess.DEVNULL)
        print(f"filling a {args.size} image...", file=sys.stderr)
        run(["fio", "--name=fill", f"--filename={image}", "--rw=write", "--bs=1m", f"--size={args.size}", "--ioengine=io_uring",
             "--direct=1", "--output-format=json"])
        image_bytes = os.path.getsize(image)

        def tls_server(name, port):
            if name == "nbdkit":
                return (["nbdkit", "--foreground", "--exit-with-parent", "--ip-addr", "127.0.0.1", "--port", str(port),
                         "--tls=require", f"--tls-psk={keys}", "file", image, "cache=none"],
                        f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={keys}")
            return ([spindle, "serve", f"image:{image}", "--tcp", f"127.0.0.1:{port}", "--tls-psk", keys],
                    f"nbds://alice@127.0.0.1:{port}/disk.img?tls-psk-file={keys}")

        def plain_server(name):
            if name == "nbdkit":
                return (["nbdkit", "--foreground", "--exit-with-parent", "--unix", unix, "file", image, "cache=none"],
                        f"nbd+unix:///?socket={unix}")
            return ([spindle, "serve", f"image:{image}", "--socket", unix], f"nbd+unix:///disk.img?socket={unix}")

        def copy(connections):
            def measure(uri):
                command = ["nbdcopy", uri, "null:"] + ([f"--connections={connections}"] if connections else [])
                start = time.monotonic()
                run(command)
                return image_bytes / 1048576 / (time.monotonic() - start)
            return measure

        def random_reads(uri):
            return float(run([PYTHON, "-c", RANDOM_READS, uri, str(args.runtime), "32"]).strip())

        loads = [
            ("TLS-PSK: nbdcopy of the image to null: (connections as the server allows)", True, copy(None), "MiB/s", 1.0),
            ("TLS-PSK: nbdcopy --connections=1", True, copy(1), "MiB/s", 1.0),
            ("TLS-PSK: 4K random reads, depth 32, one libnbd connection", True, random_reads, "IOPS", 0.9),
            ("no TLS (Unix socket): 4K random reads, depth 32, one libnbd connection", False, random_reads, "IOPS", None),
        ]
        for label, tls, measure, unit, target in loads:
            values = {"nbdkit": [], "spindle": []}
            for index in range(args.rounds):
                for name in (["nbdkit", "spindle"] if index % 2 == 0 else ["spindle", "nbdkit"]):
                    drop_cached_pages(image)
                    if tls:
                        port = free_port()
                        command, uri = tls_server(name, port)
                        server = Server(command, port=port)
                    else:
                        command, uri = plain_server(name)
                        server = Server(command, unix=unix)
                    try:
                        values[name].append(measure(uri))
                    finally:
                        server.stop()
                print(f"  {label} round {index + 1}: nbdkit {values['nbdkit'][-1]:,.0f}, spindle {values['spindle'][-1]:,.0f}",
                      file=sys.stderr)
            rows.append((label, unit, statistics.median(values["nbdkit"]), statistics.median(values["spindle"]), target))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"NBD over TLS 1.3 with a pre-shared key, TCP on loopback; {args.size} filled raw image (nbdkit file cache=none, "
          f"spindle serve image:); {args.runtime:g} s per random-read run; median of {args.rounds} alternating rounds")
    print()
    print("| load | nbdkit | spindle serve | ratio | target |")
    print("|---|---|---|---|---|")
    for label, unit, peer, ours, target in rows:
        ratio = ours / peer if peer else 0
        goal = f">= {target:.2f}x ({'met' if ratio >= target else 'missed'})" if target else "(for reference)"
        print(f"| {label} | {peer:,.0f} {unit} | {ours:,.0f} {unit} | {ratio:.2f}x | {goal} |")


if __name__ == "__main__":
    main()
