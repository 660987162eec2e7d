// liburing.h defines _XOPEN_SOURCE before including the C library's headers, which would give
// structures such as fd_set definitions that differ from those in Swift's Glibc module. Including
// those headers first, as Glibc does, keeps one definition of each.
#ifndef SPINDLE_CLIBURING_H
#define SPINDLE_CLIBURING_H
#include <sys/types.h>
#include <sys/select.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>
#include <time.h>
#include <liburing.h>
#endif
