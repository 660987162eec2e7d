#include "CSpindleRing.h"
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>

struct spindle_ring {
    struct io_uring ring;
};

spindle_ring *spindle_ring_create(unsigned submission_entries, unsigned completion_entries, unsigned wanted,
                                  unsigned *in_use, int *error) {
    spindle_ring *ring = calloc(1, sizeof(*ring));
    if (ring == NULL) {
        *error = -ENOMEM;
        return NULL;
    }
    unsigned base = IORING_SETUP_CQSIZE;
    unsigned extra = 0;
    if (wanted & SPINDLE_RING_SINGLE_ISSUER) extra |= IORING_SETUP_SINGLE_ISSUER;
    if ((wanted & SPINDLE_RING_SINGLE_ISSUER) && (wanted & SPINDLE_RING_DEFER_TASKRUN)) extra |= IORING_SETUP_DEFER_TASKRUN;
    struct io_uring_params params = {0};
    params.flags = base | extra;
    params.cq_entries = completion_entries;
    int result = io_uring_queue_init_params(submission_entries, &ring->ring, &params);
    if (result == -EINVAL && extra != 0) {
        // An older kernel without SINGLE_ISSUER or DEFER_TASKRUN: run without them.
        extra = 0;
        struct io_uring_params plain = {0};
        plain.flags = base;
        plain.cq_entries = completion_entries;
        result = io_uring_queue_init_params(submission_entries, &ring->ring, &plain);
    }
    if (result != 0) {
        free(ring);
        *error = result;
        return NULL;
    }
    *in_use = 0;
    if (extra & IORING_SETUP_SINGLE_ISSUER) *in_use |= SPINDLE_RING_SINGLE_ISSUER;
    if (extra & IORING_SETUP_DEFER_TASKRUN) *in_use |= SPINDLE_RING_DEFER_TASKRUN;
    return ring;
}

void spindle_ring_destroy(spindle_ring *ring) {
    io_uring_queue_exit(&ring->ring);
    free(ring);
}

/// A free submission entry, submitting the full queue first if need be (the completion queue holds
/// every request in flight, so submitting cannot fail for lack of completion space).
static int next_entry(spindle_ring *ring, struct io_uring_sqe **entry) {
    for (;;) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
        if (sqe != NULL) {
            *entry = sqe;
            return 0;
        }
        int submitted = io_uring_submit(&ring->ring);
        if (submitted < 0 && submitted != -EINTR && submitted != -EAGAIN && submitted != -EBUSY) {
            return submitted;
        }
    }
}

#define TAKE_ENTRY                        \
    struct io_uring_sqe *sqe;             \
    int status = next_entry(ring, &sqe);  \
    if (status != 0) return status;

int spindle_ring_nop(spindle_ring *ring, uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_read(spindle_ring *ring, int fd, void *buffer, unsigned length, uint64_t offset, uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_read(sqe, fd, buffer, length, offset);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_write(spindle_ring *ring, int fd, const void *buffer, unsigned length, uint64_t offset, int fua,
                       uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_write(sqe, fd, buffer, length, offset);
    if (fua) sqe->rw_flags = RWF_DSYNC;
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_readv(spindle_ring *ring, int fd, const void *vectors, unsigned count, uint64_t offset, uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_readv(sqe, fd, (const struct iovec *)vectors, count, offset);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_writev(spindle_ring *ring, int fd, const void *vectors, unsigned count, uint64_t offset, int fua,
                        uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_writev(sqe, fd, (const struct iovec *)vectors, count, offset);
    if (fua) sqe->rw_flags = RWF_DSYNC;
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_writev_stream(spindle_ring *ring, int fd, const void *vectors, unsigned count, int offload, uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_writev(sqe, fd, (const struct iovec *)vectors, count, (uint64_t)-1);
    /* Large sends copy their data into the socket: in a kernel worker, not on the reactor thread. */
    if (offload) sqe->flags |= IOSQE_ASYNC;
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_fsync(spindle_ring *ring, int fd, int data_only, uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_fsync(sqe, fd, data_only ? IORING_FSYNC_DATASYNC : 0);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_fallocate(spindle_ring *ring, int fd, int mode, uint64_t offset, uint64_t length, uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_fallocate(sqe, fd, mode, (off_t)offset, (off_t)length);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_timeout(spindle_ring *ring, spindle_timespec *storage, uint64_t nanoseconds, uint64_t tag) {
    TAKE_ENTRY
    _Static_assert(sizeof(spindle_timespec) == sizeof(struct __kernel_timespec), "timespec layout");
    storage->seconds = (int64_t)(nanoseconds / 1000000000u);
    storage->nanoseconds = (int64_t)(nanoseconds % 1000000000u);
    io_uring_prep_timeout(sqe, (struct __kernel_timespec *)storage, 0, 0);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

int spindle_ring_cancel_all(spindle_ring *ring, uint64_t tag) {
    TAKE_ENTRY
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, tag);
    return 0;
}

unsigned spindle_ring_unsubmitted(spindle_ring *ring) {
    return io_uring_sq_ready(&ring->ring);
}

int spindle_ring_submit(spindle_ring *ring) {
    return io_uring_submit(&ring->ring);
}

int spindle_ring_submit_and_wait(spindle_ring *ring, unsigned wait_count) {
    return io_uring_submit_and_wait(&ring->ring, wait_count);
}

int spindle_ring_submit_and_get_events(spindle_ring *ring) {
    return io_uring_submit_and_get_events(&ring->ring);
}

unsigned spindle_ring_reap(spindle_ring *ring, uint64_t *tags, int32_t *results, unsigned maximum) {
    unsigned count = 0;
    unsigned head;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&ring->ring, head, cqe) {
        if (count == maximum) break;
        tags[count] = cqe->user_data;
        results[count] = cqe->res;
        count++;
    }
    io_uring_cq_advance(&ring->ring, count);
    return count;
}
