"""cffi build script for ``pwriter._native``: C loops over trace text.

The merge looks at every byte of its inputs once; in Python (``bytes.count``
of two patterns) that is a large share of the merge's CPU time, and it holds
the GIL.
Here the same check runs at memchr speed, and cffi releases the GIL around
the call, so reader threads scan in parallel.  Optional: ``setup.py`` builds
it where a C compiler is available, and :mod:`pwriter.plan.traceformat` falls
back to the pure-Python scan (same results, tested both ways) without it.
"""

from __future__ import annotations

from cffi import FFI

# The interface's version: the Python side (pwriter.plan.traceformat) uses a
# compiled module only when its pw_abi_version() is this (a stale build is
# left alone, and the pure-Python scan takes over).
ABI_VERSION = 2

CDEF = """
int pw_abi_version(void);
size_t pw_scan_events(const char *buf, size_t start, size_t len, size_t *lines, size_t *ids, int validate);
int pw_json_valid(const char *buf, size_t len);
long long pw_find_newline(const char *buf, size_t start, size_t stop);
long long pw_rfind_newline(const char *buf, size_t start, size_t stop);
size_t pw_count_newlines(const char *buf, size_t len);
size_t pw_count_lines(const char *buf, size_t len, int *blank);
void pw_hash_lines(const char *buf, size_t len, uint64_t *sums, uint64_t *hashes, size_t max_hashes);
"""

SOURCE = r"""
#define _GNU_SOURCE
#define PW_ABI_VERSION %d
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* JSON (RFC 8259, as strict as Python's json.loads without NaN/Infinity):
 * whether p[0:n] is one value with optional whitespace around it.  Strings
 * must be well-formed UTF-8 without raw control characters; nesting deeper
 * than PW_JSON_DEPTH is refused.  Iterative: a stack of open brackets. */
#define PW_JSON_DEPTH 512

static const char *pw_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int pw_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* p is just past the opening quote; returns the byte past the closing one, or NULL. */
static const char *pw_string(const char *p, const char *e)
{
    while (p < e) {
        unsigned char c = (unsigned char)*p;
        if (c == '"')
            return p + 1;
        if (c == '\\') {
            if (++p >= e)
                return NULL;
            switch (*p) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p++;
                break;
            case 'u':
                if (e - p < 5 || !pw_hex(p[1]) || !pw_hex(p[2]) || !pw_hex(p[3]) || !pw_hex(p[4]))
                    return NULL;
                p += 5;
                break;
            default:
                return NULL;
            }
        } else if (c < 0x20) {
            return NULL;
        } else if (c < 0x80) {
            p++;
        } else {  /* UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF */
            ptrdiff_t len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
            if (len == 0 || e - p < len)
                return NULL;
            for (ptrdiff_t i = 1; i < len; i++)
                if (((unsigned char)p[i] & 0xC0) != 0x80)
                    return NULL;
            unsigned char next = (unsigned char)p[1];
            if ((c == 0xE0 && next < 0xA0) || (c == 0xED && next > 0x9F) || (c == 0xF0 && next < 0x90) ||
                (c == 0xF4 && next > 0x8F))
                return NULL;
            p += len;
        }
    }
    return NULL;
}

static const char *pw_digits(const char *p, const char *e)
{
    if (p >= e || *p < '0' || *p > '9')
        return NULL;
    while (p < e && *p >= '0' && *p <= '9')
        p++;
    return p;
}

static const char *pw_number(const char *p, const char *e)
{
    if (p < e && *p == '-')
        p++;
    if (p < e && *p == '0')
        p++;
    else if ((p = pw_digits(p, e)) == NULL)
        return NULL;
    if (p < e && *p == '.' && (p = pw_digits(p + 1, e)) == NULL)
        return NULL;
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if ((p = pw_digits(p, e)) == NULL)
            return NULL;
    }
    return p;
}

static const char *pw_word(const char *p, const char *e, const char *word, size_t n)
{
    return (size_t)(e - p) >= n && memcmp(p, word, n) == 0 ? p + n : NULL;
}

int pw_json_valid(const char *buf, size_t len)
{
    const char *p = buf, *e = buf + len;
    char open[PW_JSON_DEPTH];
    int depth = 0;
    p = pw_ws(p, e);
value:  /* a value starts at p (whitespace skipped) */
    if (p >= e)
        return 0;
    switch (*p) {
    case '{':
    case '[':
        if (depth == PW_JSON_DEPTH)
            return 0;
        open[depth++] = *p;
        p = pw_ws(p + 1, e);
        if (p < e && *p == (open[depth - 1] == '{' ? '}' : ']')) {
            depth--;
            p++;
            goto after;
        }
        if (open[depth - 1] == '{')
            goto key;
        goto value;
    case '"': p = pw_string(p + 1, e); break;
    case 't': p = pw_word(p, e, "true", 4); break;
    case 'f': p = pw_word(p, e, "false", 5); break;
    case 'n': p = pw_word(p, e, "null", 4); break;
    default: p = pw_number(p, e); break;
    }
    if (p == NULL)
        return 0;
after:  /* a value ended just before p */
    p = pw_ws(p, e);
    if (depth == 0)
        return p == e;
    if (p >= e)
        return 0;
    if (*p == ',') {
        p = pw_ws(p + 1, e);
        if (open[depth - 1] == '[')
            goto value;
        goto key;
    }
    if (*p != (open[depth - 1] == '{' ? '}' : ']'))
        return 0;
    depth--;
    p++;
    goto after;
key:  /* a member "name": value starts at p */
    if (p >= e || *p != '"' || (p = pw_string(p + 1, e)) == NULL)
        return 0;
    p = pw_ws(p, e);
    if (p >= e || *p != ':')
        return 0;
    p = pw_ws(p + 1, e);
    goto value;
}

int pw_abi_version(void)
{
    return PW_ABI_VERSION;
}

/* How an event line that DFTracer's end event counts begins (pwriter.plan.traceformat.ID_PREFIX). */
static const char pw_id_prefix[] = "{\"id\":";
#define PW_ID_PREFIX_LEN (sizeof pw_id_prefix - 1)

/* buf[0:len] is whole lines, the last ending in '\n'.  From `start` on,
 * returns the offset of the first line that is not a bare event ('{' first,
 * '}' last, no NUL byte, and with `validate`, valid JSON), or len when there
 * is none, and sets *lines to the number of bare events before it and *ids
 * to the number of those that begin with pw_id_prefix. */
size_t pw_scan_events(const char *buf, size_t start, size_t len, size_t *lines, size_t *ids, int validate)
{
    const char *p = buf + start, *end = buf + len;
    size_t count = 0, id_count = 0;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL || nl - p < 2 || p[0] != '{' || nl[-1] != '}' || memchr(p, 0, (size_t)(nl - p)) != NULL)
            break;
        if (validate && !pw_json_valid(p, (size_t)(nl - p)))
            break;
        count++;
        if ((size_t)(nl - p) >= PW_ID_PREFIX_LEN && memcmp(p, pw_id_prefix, PW_ID_PREFIX_LEN) == 0)
            id_count++;
        p = nl + 1;
    }
    *lines = count;
    *ids = id_count;
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

/* Newlines in buf[0:len]; *blank is set when a line is empty (a newline
 * at the start, or right after another). */
size_t pw_count_lines(const char *buf, size_t len, int *blank)
{
    size_t count = 0;
    const char *p = buf, *end = buf + len, *nl;
    *blank = 0;
    while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (nl == buf || nl[-1] == '\n')
            *blank = 1;
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
ffibuilder.set_source("pwriter._native", SOURCE % ABI_VERSION, extra_compile_args=["-O2"], optional=True)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
