/* Times ggml's own dequantization (the `to_float` of `ggml_get_type_traits`) on one
 * thread, over tensors laid end to end in one file: the anchor of `cargo xtask
 * bench-codecs`.
 *
 * usage: to_float RUNS TYPE_ID FILE N_ELEMENTS...
 * Each N_ELEMENTS is one tensor's element count, in the file's order. Prints the best
 * wall time of dequantizing every tensor once, in seconds. Exits with status 3 when
 * ggml has no `to_float` for the type. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ggml.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: to_float RUNS TYPE_ID FILE N_ELEMENTS...\n");
        return 2;
    }
    int runs = atoi(argv[1]);
    enum ggml_type type = (enum ggml_type)atoi(argv[2]);
    const struct ggml_type_traits *traits = ggml_get_type_traits(type);
    if (traits == NULL || traits->to_float == NULL) {
        fprintf(stderr, "ggml has no to_float for type %d\n", (int)type);
        return 3;
    }
    int n_tensors = argc - 4;
    int64_t *counts = calloc((size_t)n_tensors, sizeof *counts);
    size_t total_bytes = 0;
    int64_t largest = 0;
    for (int i = 0; i < n_tensors; i++) {
        counts[i] = strtoll(argv[4 + i], NULL, 10);
        total_bytes += ggml_row_size(type, counts[i]);
        if (counts[i] > largest) largest = counts[i];
    }
    FILE *f = fopen(argv[3], "rb");
    if (f == NULL) {
        perror(argv[3]);
        return 1;
    }
    unsigned char *data = malloc(total_bytes);
    float *out = malloc((size_t)largest * sizeof(float));
    if (data == NULL || out == NULL || fread(data, 1, total_bytes, f) != total_bytes) {
        fprintf(stderr, "cannot read %zu bytes of %s\n", total_bytes, argv[3]);
        return 1;
    }
    fclose(f);
    double best = 1e300;
    float sink = 0.0f;
    for (int r = 0; r < runs; r++) {
        double start = now();
        size_t at = 0;
        for (int i = 0; i < n_tensors; i++) {
            traits->to_float(data + at, out, counts[i]);
            at += ggml_row_size(type, counts[i]);
            sink += out[counts[i] - 1];
        }
        double elapsed = now() - start;
        if (elapsed < best) best = elapsed;
    }
    /* The sink keeps the calls from being optimized away; it goes to stderr. */
    fprintf(stderr, "%g\n", (double)sink);
    printf("%.9f\n", best);
    return 0;
}
