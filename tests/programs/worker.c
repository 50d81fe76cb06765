/* A spear worker written in C: the framed protocol of docs/workers.md on stdin and stdout.
 *
 * Each frame is a 4-byte big-endian length and one CBOR map. The worker says hello, then
 * answers each request, one at a time, with its input upper-cased. It logs one line per
 * request on stderr. Input "fail" gets an error answer; input "exit" makes it exit with
 * code 9 in the middle of the request (a crash). Cancel frames and unknown frame types are
 * skipped: a request that was cancelled is still answered, which the protocol allows.
 *
 * Build: python -m ziglang cc -O2 -o worker worker.c   (or any C99 compiler)
 */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FRAME (64u * 1024u * 1024u)

/* --- pipes ------------------------------------------------------------------------------ */

static int read_full(uint8_t *buf, size_t n) {
    while (n > 0) {
        ssize_t got = read(0, buf, n);
        if (got <= 0) return -1;
        buf += got;
        n -= (size_t)got;
    }
    return 0;
}

static int write_full(const uint8_t *buf, size_t n) {
    while (n > 0) {
        ssize_t put = write(1, buf, n);
        if (put <= 0) return -1;
        buf += put;
        n -= (size_t)put;
    }
    return 0;
}

/* --- a CBOR writer: just what the answers need ------------------------------------------ */

typedef struct {
    uint8_t *bytes;
    size_t len, cap;
} out_t;

static void put(out_t *out, const void *data, size_t n) {
    if (out->len + n > out->cap) {
        out->cap = (out->len + n) * 2;
        out->bytes = realloc(out->bytes, out->cap);
        if (out->bytes == NULL) exit(12);
    }
    memcpy(out->bytes + out->len, data, n);
    out->len += n;
}

/* An item head: major type (0 uint, 2 bytes, 3 text, 5 map, 7 simple) and its argument. */
static void put_head(out_t *out, unsigned major, uint64_t value) {
    uint8_t head[9];
    size_t size;
    if (value < 24) {
        head[0] = (uint8_t)(major << 5 | value);
        size = 1;
    } else {
        unsigned extra = value <= 0xff ? 1 : value <= 0xffff ? 2 : value <= 0xffffffffu ? 4 : 8;
        head[0] = (uint8_t)(major << 5 | (extra == 1 ? 24 : extra == 2 ? 25 : extra == 4 ? 26 : 27));
        for (unsigned i = 0; i < extra; i++) head[1 + i] = (uint8_t)(value >> (8 * (extra - 1 - i)));
        size = 1 + extra;
    }
    put(out, head, size);
}

static void put_text(out_t *out, const char *text) {
    put_head(out, 3, strlen(text));
    put(out, text, strlen(text));
}

/* Send `out` as one frame (length prefix first), then empty it. */
static void send_frame(out_t *out) {
    uint8_t prefix[4] = {(uint8_t)(out->len >> 24), (uint8_t)(out->len >> 16),
                         (uint8_t)(out->len >> 8), (uint8_t)out->len};
    /* prefix and body in one writev: the host wakes once per answer */
    struct iovec parts[2] = {{prefix, 4}, {out->bytes, out->len}};
    ssize_t sent = writev(1, parts, 2);
    if (sent < 0) exit(0); /* host gone */
    if ((size_t)sent < 4) {
        if (write_full(prefix + sent, 4 - (size_t)sent) || write_full(out->bytes, out->len)) exit(0);
    } else if ((size_t)sent < 4 + out->len) {
        size_t done = (size_t)sent - 4;
        if (write_full(out->bytes + done, out->len - done)) exit(0);
    }
    out->len = 0;
}

/* --- a CBOR reader: heads, and skipping whatever it does not need ------------------------- */

typedef struct {
    const uint8_t *at, *end;
} in_t;

static int get_head(in_t *in, unsigned *major, uint64_t *value) {
    if (in->at >= in->end) return -1;
    uint8_t first = *in->at++;
    unsigned info = first & 31, extra;
    *major = first >> 5;
    if (info < 24) {
        *value = info;
        return 0;
    }
    if (info > 27) return -1; /* indefinite lengths: hosts never send them */
    extra = 1u << (info - 24);
    if ((size_t)(in->end - in->at) < extra) return -1;
    *value = 0;
    for (unsigned i = 0; i < extra; i++) *value = *value << 8 | *in->at++;
    return 0;
}

static int skip_item(in_t *in) {
    unsigned major;
    uint64_t value;
    if (get_head(in, &major, &value)) return -1;
    switch (major) {
    case 2: case 3: /* byte and text strings */
        if ((uint64_t)(in->end - in->at) < value) return -1;
        in->at += value;
        return 0;
    case 4: /* array */
        for (uint64_t i = 0; i < value; i++) if (skip_item(in)) return -1;
        return 0;
    case 5: /* map */
        for (uint64_t i = 0; i < 2 * value; i++) if (skip_item(in)) return -1;
        return 0;
    case 6: /* tag: its one item follows */
        return skip_item(in);
    default: /* integers and simple values: the head was all */
        return 0;
    }
}

/* A string item (major 2 or 3): point `data` at its bytes. */
static int get_string(in_t *in, unsigned want, const uint8_t **data, size_t *len) {
    unsigned major;
    uint64_t value;
    if (get_head(in, &major, &value) || major != want) return -1;
    if ((uint64_t)(in->end - in->at) < value) return -1;
    *data = in->at;
    *len = (size_t)value;
    in->at += value;
    return 0;
}

typedef struct {
    int is_request;
    uint64_t id;
    const uint8_t *data;
    size_t data_len;
} request_t;

static int parse_frame(const uint8_t *frame, size_t len, request_t *req) {
    in_t in = {frame, frame + len};
    unsigned major;
    uint64_t pairs;
    memset(req, 0, sizeof *req);
    if (get_head(&in, &major, &pairs) || major != 5) return -1;
    for (uint64_t i = 0; i < pairs; i++) {
        const uint8_t *key, *text;
        size_t key_len, text_len;
        if (get_string(&in, 3, &key, &key_len)) return -1;
        if (key_len == 4 && memcmp(key, "type", 4) == 0) {
            if (get_string(&in, 3, &text, &text_len)) return -1;
            req->is_request = text_len == 7 && memcmp(text, "request", 7) == 0;
        } else if (key_len == 2 && memcmp(key, "id", 2) == 0) {
            if (get_head(&in, &major, &req->id) || major != 0) return -1;
        } else if (key_len == 4 && memcmp(key, "data", 4) == 0) {
            if (get_string(&in, 2, &req->data, &req->data_len)) return -1;
        } else if (skip_item(&in)) {
            return -1;
        }
    }
    return 0;
}

/* --- the worker --------------------------------------------------------------------------- */

static void answer(out_t *out, const request_t *req) {
    if (req->data_len == 4 && memcmp(req->data, "fail", 4) == 0) {
        put_head(out, 5, 4);
        put_text(out, "type"), put_text(out, "response");
        put_text(out, "id"), put_head(out, 0, req->id);
        put_text(out, "ok"), put_head(out, 7, 20); /* false */
        put_text(out, "error");
        put_head(out, 5, 2);
        put_text(out, "code"), put_text(out, "bad_input");
        put_text(out, "message"), put_text(out, "this worker refuses the input \"fail\"");
        return;
    }
    put_head(out, 5, 4);
    put_text(out, "type"), put_text(out, "response");
    put_text(out, "id"), put_head(out, 0, req->id);
    put_text(out, "ok"), put_head(out, 7, 21); /* true */
    put_text(out, "data"), put_head(out, 2, req->data_len);
    for (size_t i = 0; i < req->data_len; i++) {
        uint8_t c = (uint8_t)toupper(req->data[i]);
        put(out, &c, 1);
    }
}

int main(void) {
    out_t out = {NULL, 0, 0};
    put_head(&out, 5, 3);
    put_text(&out, "type"), put_text(&out, "hello");
    put_text(&out, "protocol"), put_head(&out, 0, 1);
    put_text(&out, "max_concurrency"), put_head(&out, 0, 1);
    send_frame(&out);
    for (;;) {
        uint8_t prefix[4];
        if (read_full(prefix, 4)) return 0; /* the host closed the pipe: done */
        uint32_t len = (uint32_t)prefix[0] << 24 | (uint32_t)prefix[1] << 16 |
                       (uint32_t)prefix[2] << 8 | prefix[3];
        if (len > MAX_FRAME) {
            fprintf(stderr, "worker.c: frame of %u bytes is too large\n", len);
            return 3;
        }
        uint8_t *frame = malloc(len ? len : 1);
        request_t req;
        if (frame == NULL || read_full(frame, len)) return 3;
        if (parse_frame(frame, len, &req)) {
            fprintf(stderr, "worker.c: the host sent a frame that is not a valid map\n");
            return 3;
        }
        if (req.is_request) {
            fprintf(stderr, "worker.c: request %llu with %zu bytes\n",
                    (unsigned long long)req.id, req.data_len);
            if (req.data_len == 4 && memcmp(req.data, "exit", 4) == 0) exit(9);
            answer(&out, &req);
            send_frame(&out);
        }
        free(frame);
    }
}
