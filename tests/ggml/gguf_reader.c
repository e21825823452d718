/*
 * Reads GGUF files with ggml's own reader, as llama.cpp opens a model, and prints one
 * verdict per file. The differential test in tests/it/hostile.rs compiles it against
 * libggml-base.so and compares its verdicts with byte-tier's reader.
 *
 * Input: one path per line on standard input. Output: one line per path, in order:
 *   accept         gguf_init_from_file succeeded and every tensor's data lies inside
 *                  the file
 *   refuse         gguf_init_from_file failed
 *   out-of-bounds  gguf_init_from_file succeeded (with no_alloc it reads no tensor
 *                  data), but a tensor's data ends past the end of the file, which
 *                  llama.cpp's model loader refuses next ("not within the file bounds")
 *
 * The few declarations below are those of ggml's public gguf.h and ggml.h, repeated so
 * that only the library is needed.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

struct gguf_context;
struct ggml_context;

struct gguf_init_params {
    bool no_alloc;
    struct ggml_context ** ctx;
};

enum ggml_log_level { GGML_LOG_LEVEL_NONE = 0 };
typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);

struct gguf_context * gguf_init_from_file(const char * fname, struct gguf_init_params params);
void gguf_free(struct gguf_context * ctx);
int64_t gguf_get_n_tensors(const struct gguf_context * ctx);
size_t gguf_get_data_offset(const struct gguf_context * ctx);
size_t gguf_get_tensor_offset(const struct gguf_context * ctx, int64_t tensor_id);
size_t gguf_get_tensor_size(const struct gguf_context * ctx, int64_t tensor_id);
void ggml_log_set(ggml_log_callback log_callback, void * user_data);

static void quiet(enum ggml_log_level level, const char * text, void * user_data) {
    (void) level;
    (void) text;
    (void) user_data;
}

static long long file_size(const char * path) {
    FILE * file = fopen(path, "rb");
    if (file == NULL) {
        return -1;
    }
    long long size = -1;
    if (fseek(file, 0, SEEK_END) == 0) {
        size = ftell(file);
    }
    fclose(file);
    return size;
}

static const char * verdict(const char * path) {
    struct gguf_init_params params = { .no_alloc = true, .ctx = NULL };
    struct gguf_context * ctx = gguf_init_from_file(path, params);
    if (ctx == NULL) {
        return "refuse";
    }
    const long long size = file_size(path);
    const char * result = size < 0 ? "refuse" : "accept";
    const size_t data = gguf_get_data_offset(ctx);
    for (int64_t i = 0; size >= 0 && i < gguf_get_n_tensors(ctx); ++i) {
        const size_t start = data + gguf_get_tensor_offset(ctx, i);
        const size_t end = start + gguf_get_tensor_size(ctx, i);
        if (start < data || end < start || end > (size_t) size) {
            result = "out-of-bounds";
            break;
        }
    }
    gguf_free(ctx);
    return result;
}

int main(void) {
    ggml_log_set(quiet, NULL);
    char path[4096];
    while (fgets(path, sizeof path, stdin) != NULL) {
        path[strcspn(path, "\n")] = '\0';
        if (path[0] == '\0') {
            continue;
        }
        printf("%s\n", verdict(path));
        fflush(stdout);
    }
    return 0;
}
