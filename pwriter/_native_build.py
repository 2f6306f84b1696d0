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
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <stddef.h>
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
