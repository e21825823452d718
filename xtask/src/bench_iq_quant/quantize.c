/* Times ggml's own quantization (`ggml_quantize_chunk`, the function llama-quantize
 * calls) on one thread: the anchor of `cargo xtask bench-iq-quant`.
 *
 * usage: quantize RUNS TYPE_ID N_PER_ROW VALUES WEIGHTS|- OUT
 * VALUES holds whole rows of f32; WEIGHTS one f32 per column, or `-` for none. Writes
 * the quantized bytes of the last run to OUT and prints the best wall time of one
 * quantization of every row, in seconds. The grids are initialized before timing. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static float *read_floats(const char *path, size_t *count) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *data = malloc((size_t)len);
    if (data == NULL || fread(data, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(1);
    }
    fclose(f);
    *count = (size_t)len / sizeof(float);
    return data;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: quantize RUNS TYPE_ID N_PER_ROW VALUES WEIGHTS|- OUT\n");
        return 2;
    }
    int runs = atoi(argv[1]);
    enum ggml_type type = (enum ggml_type)atoi(argv[2]);
    int64_t n_per_row = strtoll(argv[3], NULL, 10);
    size_t n_values = 0, n_weights = 0;
    float *values = read_floats(argv[4], &n_values);
    float *weights = strcmp(argv[5], "-") == 0 ? NULL : read_floats(argv[5], &n_weights);
    if (n_per_row <= 0 || n_values % (size_t)n_per_row != 0 ||
        (weights != NULL && n_weights != (size_t)n_per_row)) {
        fprintf(stderr, "values are not whole rows, or weights not one per column\n");
        return 2;
    }
    int64_t nrows = (int64_t)n_values / n_per_row;
    size_t out_len = ggml_row_size(type, n_per_row) * (size_t)nrows;
    void *out = malloc(out_len);
    ggml_quantize_init(type);
    double best = 1e300;
    for (int r = 0; r < runs; r++) {
        double start = now();
        ggml_quantize_chunk(type, values, out, 0, nrows, n_per_row, weights);
        double elapsed = now() - start;
        if (elapsed < best) best = elapsed;
    }
    FILE *f = fopen(argv[6], "wb");
    if (f == NULL || fwrite(out, 1, out_len, f) != out_len) {
        perror(argv[6]);
        return 1;
    }
    fclose(f);
    printf("%.9f\n", best);
    return 0;
}
