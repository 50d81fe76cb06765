/* upper.c: the per-call contract in C. Reads stdin to the end and writes it to stdout with
 * ASCII letters upper-cased. Exit status 0 on success, 1 if a read or write fails. */
#include <ctype.h>
#include <stdio.h>

int main(void) {
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        for (size_t i = 0; i < n; i++) {
            buf[i] = (char)toupper((unsigned char)buf[i]);
        }
        if (fwrite(buf, 1, n, stdout) != n) {
            return 1;
        }
    }
    return ferror(stdin) || fflush(stdout) != 0 ? 1 : 0;
}
