#!/usr/bin/python3
"""Incremental backup of an NBD export with stock tools (libnbd's Python bindings, Debian's
python3-libnbd): brings BACKUP, a copy of snapshot BASE, up to date with the export at URI by
copying only the ranges its `qemu:dirty-bitmap:BASE` metadata context marks as changed.

Works against `spindle serve` (every thin volume export offers qemu:dirty-bitmap:NAME for the other
volumes of its pool) and against qemu's own NBD server with a dirty bitmap of that name. Ranges that
read as zeros (base:allocation says hole and zero) become holes in BACKUP; the rest is copied.
BACKUP takes the export's size.

    Tools/incremental-backup.py 'nbd+unix:///tank/s2?socket=/run/spindle.sock' backup.raw --since s1

This script trusts you to name the right BACKUP; `spindle volume export tank/s2 backup.raw --since
tank/s1` does the same without NBD and checks that backup.raw is a copy of s1.
"""
import argparse
import ctypes
import os
import sys

import nbd

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
STATE_DIRTY = 1
STATE_HOLE_ZERO = 3
PIECE = 4 << 20  # bytes read per request


def extents(handle, context, size):
    """The (offset, length, flags) descriptors of a metadata context over the whole export."""
    result = []
    offset = 0
    while offset < size:
        found = []

        def take(name, start, entries, error):
            if name == context:
                position = start
                for index in range(0, len(entries), 2):
                    found.append((position, entries[index], entries[index + 1]))
                    position += entries[index]
            return 0

        handle.block_status(min(size - offset, 1 << 31), offset, take)
        if not found:
            sys.exit(f"incremental-backup: the server sent no {context} extents at offset {offset}")
        for start, length, flags in found:
            length = min(length, size - start)
            if length > 0:
                result.append((start, length, flags))
        offset = found[-1][0] + found[-1][1]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="the NBD export of the new snapshot")
    parser.add_argument("backup", help="an existing copy of BASE, updated in place")
    parser.add_argument("--since", required=True, metavar="BASE", help="the snapshot BACKUP is a copy of")
    arguments = parser.parse_args()
    dirty_context = "qemu:dirty-bitmap:" + arguments.since

    handle = nbd.NBD()
    handle.add_meta_context(dirty_context)
    handle.add_meta_context("base:allocation")
    handle.connect_uri(arguments.uri)
    if not handle.can_meta_context(dirty_context):
        sys.exit(f"incremental-backup: {arguments.uri} offers no {dirty_context} (is {arguments.since} a volume of its pool?)")
    size = handle.get_size()
    if not os.path.isfile(arguments.backup):
        sys.exit(f"incremental-backup: {arguments.backup} is not a file (make a full copy first, with nbdcopy)")

    changed = [(start, length) for start, length, flags in extents(handle, dirty_context, size) if flags & STATE_DIRTY]
    holes = [(start, start + length) for start, length, flags in extents(handle, "base:allocation", size)
             if flags & STATE_HOLE_ZERO == STATE_HOLE_ZERO]
    libc = ctypes.CDLL(None, use_errno=True)
    copied = punched = 0
    descriptor = os.open(arguments.backup, os.O_WRONLY)
    try:
        os.ftruncate(descriptor, size)
        hole_index = 0
        for start, length in changed:
            position = start
            end = start + length
            while position < end:
                while hole_index < len(holes) and holes[hole_index][1] <= position:
                    hole_index += 1
                hole = holes[hole_index] if hole_index < len(holes) else None
                if hole and hole[0] <= position:
                    stop = min(end, hole[1])
                    if libc.fallocate(descriptor, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                      ctypes.c_long(position), ctypes.c_long(stop - position)) != 0:
                        os.pwrite(descriptor, bytes(stop - position), position)
                    punched += stop - position
                else:
                    stop = min(end, position + PIECE, hole[0] if hole else end)
                    os.pwrite(descriptor, handle.pread(stop - position, position), position)
                    copied += stop - position
                position = stop
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
        handle.shutdown()
    print(f"{arguments.backup}: {len(changed)} changed ranges since {arguments.since}, "
          f"{copied} bytes copied, {punched} bytes of zeros left as holes; size {size}")


if __name__ == "__main__":
    main()
