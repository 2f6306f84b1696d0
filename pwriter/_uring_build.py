"""cffi build script for ``pwriter._uring``: liburing, the few calls pwriter needs.

API (compiled) mode is required: in liburing 2.3 the prep helpers are
``static inline`` in the header, so only C compiled against ``liburing.h``
can call them.  Small C helpers below keep the number of Python -> C calls
per operation at one (prep an SQE) and per batch of completions at one
(copy up to ``max`` (user_data, res) pairs and advance the CQ).

``setup.py`` builds this module only where ``liburing.h`` is found, and as an
optional extension: a failed compile is a warning, pwriter still installs,
and its io_uring backend then reports itself unavailable with the reason.
``PW_ABI`` is checked at import by the backend, so a stale compiled module
from an older tree is refused rather than misused.
"""

from __future__ import annotations

from cffi import FFI

PW_ABI = 1

CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct io_uring { ...; };

int io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags);
void io_uring_queue_exit(struct io_uring *ring);
int io_uring_submit(struct io_uring *ring);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int io_uring_register_eventfd(struct io_uring *ring, int fd);
int io_uring_unregister_eventfd(struct io_uring *ring);
int io_uring_register_files_sparse(struct io_uring *ring, unsigned nr);
int io_uring_register_files_update(struct io_uring *ring, unsigned off, const int *files, unsigned nr_files);
int io_uring_unregister_files(struct io_uring *ring);

int pw_abi(void);
/* pw_prep_writev: pwriter writes with pwritev; bench/ring_lock.py measures a shared ring with this. */
int pw_prep_writev(struct io_uring *ring, int fd, int fixed_file, const struct iovec *iovecs,
                   unsigned nr, uint64_t offset, uint64_t user_data);
int pw_prep_fsync(struct io_uring *ring, int fd, int fixed_file, uint64_t user_data);
unsigned pw_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res, unsigned max);
int pw_cq_has_overflow(struct io_uring *ring);
"""

SOURCE = """
#include <errno.h>
#include <liburing.h>

#define PW_ABI %d

int pw_abi(void) { return PW_ABI; }

static void pw_finish(struct io_uring_sqe *sqe, int fixed_file, uint64_t user_data)
{
    if (fixed_file)
        sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, user_data);
}

int pw_prep_writev(struct io_uring *ring, int fd, int fixed_file, const struct iovec *iovecs,
                   unsigned nr, uint64_t offset, uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_writev(sqe, fd, iovecs, nr, offset);
    pw_finish(sqe, fixed_file, user_data);
    return 0;
}

int pw_prep_fsync(struct io_uring *ring, int fd, int fixed_file, uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_fsync(sqe, fd, 0);
    pw_finish(sqe, fixed_file, user_data);
    return 0;
}

unsigned pw_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res, unsigned max)
{
    struct io_uring_cqe *cqe;
    unsigned head, count = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (count == max)
            break;
        user_data[count] = io_uring_cqe_get_data64(cqe);
        res[count] = cqe->res;
        count++;
    }
    io_uring_cq_advance(ring, count);
    return count;
}

int pw_cq_has_overflow(struct io_uring *ring) { return io_uring_cq_has_overflow(ring) ? 1 : 0; }
""" % PW_ABI

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pwriter._uring", SOURCE, libraries=["uring"], optional=True)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
