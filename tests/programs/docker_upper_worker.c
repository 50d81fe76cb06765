/* A worker for the docker runtime's tests: speaks spear's worker protocol on stdin/stdout
 * (4-byte big-endian length + one CBOR map per frame; spear/worker_protocol.py) and answers
 * each request with its data upper-cased. Built statically (zig cc -target
 * x86_64-linux-musl -static) into the spear/busybox-worker:1 test image by scripts/dockerd.
 *
 * Test hooks, chosen by the request's data: "crash" exits with code 3, "sleep" sleeps 60 s,
 * "fail" answers ok=false, "log" also writes a line to stderr. */
/* No libc (zig would build musl first, a minute of CPU): four system calls and the few
 * memory functions a compiler may call, x86_64 Linux only. */
#include <stddef.h>
#include <stdint.h>

typedef long ssize_t;

static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
static ssize_t read(int fd, void *buf, size_t n) { return sys3(0, fd, (long)buf, (long)n); }
static ssize_t write(int fd, const void *buf, size_t n) { return sys3(1, fd, (long)buf, (long)n); }
static void exit(int code) {
    for (;;) sys3(231, code, 0, 0); /* exit_group */
}
static void sleep(long s) {
    long ts[2] = {s, 0};
    sys3(35, (long)ts, 0, 0); /* nanosleep */
}
void *memcpy(void *d, const void *s, size_t n) {
    unsigned char *o = d;
    const unsigned char *i = s;
    while (n--) *o++ = *i++;
    return d;
}
void *memset(void *d, int c, size_t n) {
    unsigned char *o = d;
    while (n--) *o++ = (unsigned char)c;
    return d;
}
int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y) return *x - *y;
    return 0;
}
static size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}
static int strcmp(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}
static int toupper(int c) { return c >= 'a' && c <= 'z' ? c - 32 : c; }
static int run(void);

__attribute__((force_align_arg_pointer)) void _start(void) { exit(run()); }

#define MAX_FRAME (8u << 20)

static int read_full(unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(0, buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static void write_full(const unsigned char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, buf, n);
        if (w <= 0) exit(1);
        buf += w;
        n -= (size_t)w;
    }
}

/* CBOR: a head (major type + argument) */
static size_t put_head(unsigned char *out, unsigned major, uint64_t value) {
    unsigned char m = (unsigned char)(major << 5);
    if (value < 24) { out[0] = m | (unsigned char)value; return 1; }
    if (value <= 0xff) { out[0] = m | 24; out[1] = (unsigned char)value; return 2; }
    if (value <= 0xffff) {
        out[0] = m | 25; out[1] = (unsigned char)(value >> 8); out[2] = (unsigned char)value;
        return 3;
    }
    if (value <= 0xffffffffu) {
        out[0] = m | 26;
        for (int i = 0; i < 4; i++) out[1 + i] = (unsigned char)(value >> (24 - 8 * i));
        return 5;
    }
    out[0] = m | 27;
    for (int i = 0; i < 8; i++) out[1 + i] = (unsigned char)(value >> (56 - 8 * i));
    return 9;
}

static size_t put_text(unsigned char *out, const char *s) {
    size_t n = strlen(s), h = put_head(out, 3, n);
    memcpy(out + h, s, n);
    return h + n;
}

static void send_frame(unsigned char *body, size_t n) {
    unsigned char len[4] = {(unsigned char)(n >> 24), (unsigned char)(n >> 16),
                            (unsigned char)(n >> 8), (unsigned char)n};
    write_full(len, 4);
    write_full(body, n);
}

/* Reads one head at *p; returns the major type and sets *value (-1 on a bad head). */
static int get_head(const unsigned char *buf, size_t len, size_t *p, uint64_t *value) {
    if (*p >= len) return -1;
    unsigned char b = buf[(*p)++];
    unsigned info = b & 31, bytes = 0;
    if (info < 24) { *value = info; return b >> 5; }
    if (info == 24) bytes = 1; else if (info == 25) bytes = 2;
    else if (info == 26) bytes = 4; else if (info == 27) bytes = 8; else return -1;
    if (*p + bytes > len) return -1;
    *value = 0;
    for (unsigned i = 0; i < bytes; i++) *value = (*value << 8) | buf[(*p)++];
    return b >> 5;
}

static int run(void) {
    static unsigned char in[MAX_FRAME], out[MAX_FRAME + 256];
    size_t n = 0;
    n += put_head(out + n, 5, 3);
    n += put_text(out + n, "type");
    n += put_text(out + n, "hello");
    n += put_text(out + n, "protocol");
    n += put_head(out + n, 0, 1);
    n += put_text(out + n, "max_concurrency");
    n += put_head(out + n, 0, 1);
    send_frame(out, n);
    for (;;) {
        unsigned char len4[4];
        if (read_full(len4, 4) < 0) return 0; /* the host closed stdin */
        size_t len = ((size_t)len4[0] << 24) | ((size_t)len4[1] << 16) | ((size_t)len4[2] << 8) | len4[3];
        if (len > MAX_FRAME || read_full(in, len) < 0) return 2;
        size_t p = 0;
        uint64_t pairs, v, id = 0;
        if (get_head(in, len, &p, &pairs) != 5) return 2;
        char type[16] = "";
        const unsigned char *data = NULL;
        size_t data_len = 0;
        for (uint64_t i = 0; i < pairs; i++) {
            if (get_head(in, len, &p, &v) != 3 || p + v > len) return 2;
            const char *key = (const char *)in + p;
            size_t key_len = (size_t)v;
            p += key_len;
            int major = get_head(in, len, &p, &v);
            if (major == 2 || major == 3) {
                if (p + v > len) return 2;
                if (key_len == 4 && !memcmp(key, "type", 4) && v < sizeof type) {
                    memcpy(type, in + p, (size_t)v);
                    type[v] = 0;
                } else if (key_len == 4 && !memcmp(key, "data", 4)) {
                    data = in + p;
                    data_len = (size_t)v;
                }
                p += (size_t)v;
            } else if (major == 0) {
                if (key_len == 2 && !memcmp(key, "id", 2)) id = v;
            } else if (major != 1 && major != 7) {
                return 2;
            }
        }
        if (strcmp(type, "request") != 0) continue; /* a cancel, or a type not known */
        if (data_len == 5 && !memcmp(data, "crash", 5)) return 3;
        if (data_len == 5 && !memcmp(data, "sleep", 5)) sleep(60);
        if (data_len == 3 && !memcmp(data, "log", 3)) write(2, "worker log line\n", 16);
        int ok = !(data_len == 4 && !memcmp(data, "fail", 4));
        n = 0;
        n += put_head(out + n, 5, 4);
        n += put_text(out + n, "type");
        n += put_text(out + n, "response");
        n += put_text(out + n, "id");
        n += put_head(out + n, 0, id);
        n += put_text(out + n, "ok");
        out[n++] = ok ? 0xf5 : 0xf4;
        if (ok) {
            n += put_text(out + n, "data");
            n += put_head(out + n, 2, data_len);
            for (size_t i = 0; i < data_len; i++) out[n++] = (unsigned char)toupper(data[i]);
        } else {
            n += put_text(out + n, "error");
            n += put_head(out + n, 5, 2);
            n += put_text(out + n, "code");
            n += put_text(out + n, "bad_input");
            n += put_text(out + n, "message");
            n += put_text(out + n, "the input asked to fail");
        }
        send_frame(out, n);
    }
}
