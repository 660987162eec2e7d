#ifndef SPINDLE_RING_H
#define SPINDLE_RING_H
// A narrow C interface over liburing for Spindle's engine. liburing's headers carry their own copies
// of kernel structures (io_uring_sqe, iovec, ...), which clash with the copies other modules import
// (swift-system's among them); keeping them inside this target's .c file means no Swift module, ours
// or an embedder's, ever sees them.
#include <stdint.h>

typedef struct spindle_ring spindle_ring;

/// Storage for a timeout's duration; must stay valid until the timeout completes.
typedef struct spindle_timespec {
    int64_t seconds;
    int64_t nanoseconds;
} spindle_timespec;

enum {
    SPINDLE_RING_SINGLE_ISSUER = 1,
    SPINDLE_RING_DEFER_TASKRUN = 2,
};

/// Creates a ring with room for `completion_entries` completions. `wanted` is a set of
/// SPINDLE_RING_* flags; the kernel may refuse some (older kernels), and `in_use` says which were
/// applied. Returns NULL and sets `*error` to a negative errno on failure.
spindle_ring *spindle_ring_create(unsigned submission_entries, unsigned completion_entries, unsigned wanted,
                                  unsigned *in_use, int *error);
void spindle_ring_destroy(spindle_ring *ring);

// Each of these takes a submission entry (submitting the queue first when it is full) and fills it,
// tagging it with `tag`. They return 0, or a negative errno when the queue could not be submitted.
int spindle_ring_nop(spindle_ring *ring, uint64_t tag);
int spindle_ring_read(spindle_ring *ring, int fd, void *buffer, unsigned length, uint64_t offset, uint64_t tag);
int spindle_ring_write(spindle_ring *ring, int fd, const void *buffer, unsigned length, uint64_t offset, int fua,
                       uint64_t tag);
int spindle_ring_readv(spindle_ring *ring, int fd, const void *vectors, unsigned count, uint64_t offset, uint64_t tag);
int spindle_ring_writev(spindle_ring *ring, int fd, const void *vectors, unsigned count, uint64_t offset, int fua,
                        uint64_t tag);
/* A writev to a stream (socket, pipe) at its current position; with offload, run in a kernel worker. */
int spindle_ring_writev_stream(spindle_ring *ring, int fd, const void *vectors, unsigned count, int offload, uint64_t tag);
int spindle_ring_fsync(spindle_ring *ring, int fd, int data_only, uint64_t tag);
int spindle_ring_fallocate(spindle_ring *ring, int fd, int mode, uint64_t offset, uint64_t length, uint64_t tag);
int spindle_ring_timeout(spindle_ring *ring, spindle_timespec *storage, uint64_t nanoseconds, uint64_t tag);
/// Asks the kernel to cancel every request in flight.
int spindle_ring_cancel_all(spindle_ring *ring, uint64_t tag);

/// Entries prepared and not yet submitted.
unsigned spindle_ring_unsubmitted(spindle_ring *ring);
int spindle_ring_submit(spindle_ring *ring);
/// Submits and waits until at least `wait_count` completions are ready.
int spindle_ring_submit_and_wait(spindle_ring *ring, unsigned wait_count);
/// Submits and collects finished work without waiting.
int spindle_ring_submit_and_get_events(spindle_ring *ring);
/// Copies up to `maximum` ready completions out and marks them seen; returns how many.
unsigned spindle_ring_reap(spindle_ring *ring, uint64_t *tags, int32_t *results, unsigned maximum);

#endif
