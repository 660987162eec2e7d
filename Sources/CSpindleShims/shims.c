#include "CSpindleShims.h"
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/eventfd.h>
#include <sys/xattr.h>
#include <pthread.h>

const int spindle_O_DIRECT = O_DIRECT;
const int spindle_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int spindle_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int spindle_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const int spindle_RWF_DSYNC = RWF_DSYNC;

int spindle_dio_alignment(int fd, uint32_t *memory_alignment, uint32_t *offset_alignment) {
    struct statx st;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) != 0) {
        return -1;
    }
    if (!(st.stx_mask & STATX_DIOALIGN) || st.stx_dio_offset_align == 0) {
        return 0;
    }
    *memory_alignment = st.stx_dio_mem_align;
    *offset_alignment = st.stx_dio_offset_align;
    return 1;
}

long spindle_get_attribute(const char *path, const char *name, void *value, unsigned long size) {
    return (long)getxattr(path, name, value, size);
}

int spindle_set_attribute(const char *path, const char *name, const void *value, unsigned long size) {
    return setxattr(path, name, value, size, 0);
}

int spindle_remove_attribute(const char *path, const char *name) {
    return removexattr(path, name);
}

int spindle_eventfd(void) {
    return eventfd(0, EFD_CLOEXEC);
}

void spindle_set_thread_name(const char *name) {
    pthread_setname_np(pthread_self(), name);
}

static __thread void *current_reactor;

void *spindle_current_reactor(void) {
    return current_reactor;
}

void spindle_set_current_reactor(void *reactor) {
    current_reactor = reactor;
}
