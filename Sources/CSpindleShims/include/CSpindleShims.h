#ifndef SPINDLE_SHIMS_H
#define SPINDLE_SHIMS_H
#include <stdint.h>

/// open(2) flag for direct I/O.
extern const int spindle_O_DIRECT;
/// fallocate(2) modes.
extern const int spindle_FALLOC_FL_KEEP_SIZE;
extern const int spindle_FALLOC_FL_PUNCH_HOLE;
extern const int spindle_FALLOC_FL_ZERO_RANGE;
/// Per-write flag that makes a write durable when it completes (forced unit access).
extern const int spindle_RWF_DSYNC;

/// Direct-I/O alignment of an open file, from statx(STATX_DIOALIGN).
/// Returns 1 and fills both values when the kernel reports them, 0 when it does not
/// (direct I/O unsupported or an older kernel), -1 with errno set on failure.
int spindle_dio_alignment(int fd, uint32_t *memory_alignment, uint32_t *offset_alignment);

/// Extended attributes of a file (getxattr(2), setxattr(2), removexattr(2)): the value's length or
/// 0 on success, -1 with errno on failure.
long spindle_get_attribute(const char *path, const char *name, void *value, unsigned long size);
int spindle_set_attribute(const char *path, const char *name, const void *value, unsigned long size);
int spindle_remove_attribute(const char *path, const char *name);

/// An eventfd with close-on-exec set, or -1 with errno.
int spindle_eventfd(void);
/// Names the calling thread (15 characters at most are kept).
void spindle_set_thread_name(const char *name);

/// The reactor that runs on the calling thread (NULL on other threads). A thread-local, so a thread
/// identity can never be mistaken for another after a thread ends and its id is reused.
void *spindle_current_reactor(void);
void spindle_set_current_reactor(void *reactor);

#endif
