/* reactor_upper.c: the WASM worker (reactor) ABI in C. spear calls spear_alloc for the input,
 * copies it in, then spear_handle, which upper-cases ASCII letters and returns
 * (out_len << 32) | out_ptr. The output buffer is reused across calls; the input buffer is
 * freed by the handler. A negative result (-1) reports that the handler ran out of memory.
 *
 * Build: zig cc -target wasm32-wasi -mexec-model=reactor -O2 -s reactor_upper.c */
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>

static unsigned char *out;
static size_t out_cap;

__attribute__((export_name("spear_alloc"))) uint32_t spear_alloc(uint32_t len) {
    return (uint32_t)(uintptr_t)malloc(len ? len : 1);
}

__attribute__((export_name("spear_handle"))) int64_t spear_handle(uint32_t ptr, uint32_t len) {
    unsigned char *in = (unsigned char *)(uintptr_t)ptr;
    if (len > out_cap) {
        free(out);
        out = malloc(len);
        out_cap = out ? len : 0;
        if (out == NULL) {
            free(in);
            return -1;
        }
    }
    for (uint32_t i = 0; i < len; i++) {
        out[i] = (unsigned char)toupper(in[i]);
    }
    free(in);
    return ((int64_t)len << 32) | (uint32_t)(uintptr_t)out;
}
