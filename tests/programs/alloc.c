/* alloc.c: allocates (and touches) 1 MiB blocks until malloc fails, then says so on stderr
 * and exits 1. Under a memory limit this is what most C programs do when memory runs out. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct block {
    struct block *next;
    char data[(1 << 20) - sizeof(void *)];
};

int main(void) {
    struct block *head = NULL;
    unsigned long count = 0;
    for (;;) {
        struct block *b = malloc(sizeof *b);
        if (b == NULL) {
            fprintf(stderr, "alloc: malloc failed after %lu MiB\n", count);
            return 1;
        }
        memset(b->data, 1, sizeof b->data);
        b->next = head; /* keep every block reachable so none is optimised away */
        head = b;
        count++;
    }
}
