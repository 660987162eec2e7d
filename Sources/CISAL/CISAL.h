#ifndef SPINDLE_CISAL_H
#define SPINDLE_CISAL_H
// Intel ISA-L: XOR parity for RAID5 and CRC32C for on-disk metadata.
#include <isa-l/raid.h>
#include <isa-l/crc.h>
#endif
