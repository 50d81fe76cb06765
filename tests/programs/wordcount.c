/* wordcount.c: prints the number of whitespace-separated words on stdin, then a newline.
 * Writes "wordcount: N bytes read" to stderr, so tests can check that logs are captured. */
#include <ctype.h>
#include <stdio.h>

int main(void) {
    unsigned long words = 0, bytes = 0;
    int in_word = 0;
    int c;
    while ((c = getchar()) != EOF) {
        bytes++;
        if (isspace(c)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    fprintf(stderr, "wordcount: %lu bytes read\n", bytes);
    printf("%lu\n", words);
    return 0;
}
