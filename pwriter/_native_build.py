"""cffi build script for ``pwriter._native``: C loops over trace text.

The merge looks at every byte of its inputs once; in Python (``bytes.count``
of two patterns) that costs about 1.3 CPU seconds per GiB and holds the GIL.
Here the same check runs at memchr speed, and cffi releases the GIL around
the call, so reader threads scan in parallel.  Optional: ``setup.py`` builds
it where a C compiler is available, and :mod:`pwriter.traceformat` falls
back to the pure-Python scan (same results, tested both ways) without it.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
size_t pw_scan_events(const char *buf, size_t start, size_t len, size_t *lines);
long long pw_find_newline(const char *buf, size_t start, size_t stop);
long long pw_rfind_newline(const char *buf, size_t start, size_t stop);
size_t pw_count_newlines(const char *buf, size_t len);
void pw_hash_lines(const char *buf, size_t len, uint64_t *sums, uint64_t *hashes, size_t max_hashes);
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* buf[0:len] is whole lines, the last ending in '\n'.  From `start` on,
 * returns the offset of the first line that is not a bare event ('{' first,
 * '}' last, no NUL byte), or len when there is none, and sets *lines to the
 * number of bare events before it. */
size_t pw_scan_events(const char *buf, size_t start, size_t len, size_t *lines)
{
    const char *p = buf + start, *end = buf + len;
    size_t count = 0;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL || nl - p < 2 || p[0] != '{' || nl[-1] != '}' || memchr(p, 0, (size_t)(nl - p)) != NULL)
            break;
        count++;
        p = nl + 1;
    }
    *lines = count;
    return (size_t)(p - buf);
}

/* Offset of the first (last) '\n' in buf[start:stop], or -1. */
long long pw_find_newline(const char *buf, size_t start, size_t stop)
{
    const char *nl = start < stop ? memchr(buf + start, '\n', stop - start) : NULL;
    return nl == NULL ? -1 : (long long)(nl - buf);
}

size_t pw_count_newlines(const char *buf, size_t len)
{
    size_t count = 0;
    const char *p = buf, *end = buf + len, *nl;
    while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        count++;
        p = nl + 1;
    }
    return count;
}

/* A 64-bit hash of one line (a multiply-rotate mix over 8-byte words). */
static uint64_t pw_hash(const char *p, size_t n, uint64_t seed)
{
    uint64_t h = seed ^ (n * 0x9E3779B97F4A7C15ULL);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h ^= w * 0xC2B2AE3D27D4EB4FULL;
        h = ((h << 31) | (h >> 33)) * 0x9E3779B97F4A7C15ULL;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    h ^= w * 0xC2B2AE3D27D4EB4FULL;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 32;
    return h;
}

/* Order-free fingerprint of the lines of buf[0:len] (each ending in '\n'):
 * sums[0] += number of lines, sums[1] += hash A, sums[2] += hash B (mod 2^64).
 * When hashes is not NULL, hash A of line i is stored in hashes[i] (i < max_hashes). */
void pw_hash_lines(const char *buf, size_t len, uint64_t *sums, uint64_t *hashes, size_t max_hashes)
{
    const char *p = buf, *end = buf + len, *nl;
    size_t i = 0;
    while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        uint64_t a = pw_hash(p, (size_t)(nl - p), 0x243F6A8885A308D3ULL);
        sums[0] += 1;
        sums[1] += a;
        sums[2] += pw_hash(p, (size_t)(nl - p), 0x13198A2E03707344ULL);
        if (hashes != NULL && i < max_hashes)
            hashes[i] = a;
        i++;
        p = nl + 1;
    }
}

long long pw_rfind_newline(const char *buf, size_t start, size_t stop)
{
    const char *nl = start < stop ? memrchr(buf + start, '\n', stop - start) : NULL;
    return nl == NULL ? -1 : (long long)(nl - buf);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pwriter._native", SOURCE, extra_compile_args=["-O2"], optional=True)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
