// Token ids llama.cpp gives each text, with `tokenizer.ggml.pre` overridden.
// Usage: llama_tokenize_vectors VOCAB.gguf PRE TEXTS [special]
// TEXTS holds the texts separated by lines "__ggml_vocab_test__" (as llama.cpp's .inp files); one line
// of ids per text is written to stdout (no BOS/EOS, special-token text tokenized as plain text, as in
// llama.cpp's own test-tokenizer-0; with "special", BOS/EOS added and special-token text parsed, as
// llama.cpp's server tokenizes). Built and run by scripts/pretokenizer_vectors.py and
// scripts/unigram_vectors.py.
#include "llama.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc != 4 && !(argc == 5 && strcmp(argv[4], "special") == 0)) {
        fprintf(stderr, "usage: %s VOCAB.gguf PRE TEXTS [special]\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_kv_override overrides[2] = {};
    overrides[0].tag = LLAMA_KV_OVERRIDE_TYPE_STR;
    snprintf(overrides[0].key, sizeof(overrides[0].key), "tokenizer.ggml.pre");
    snprintf(overrides[0].val_str, sizeof(overrides[0].val_str), "%s", argv[2]);

    llama_model_params params = llama_model_default_params();
    params.vocab_only = true;
    params.kv_overrides = overrides;
    llama_model * model = llama_model_load_from_file(argv[1], params);
    if (model == nullptr) {
        printf("REFUSED\n");  // llama.cpp does not load this pre type
        return 0;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const bool special = argc == 5;

    std::ifstream in(argv[3], std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    const std::string all = buffer.str();
    const std::string separator = "\n__ggml_vocab_test__\n";
    size_t start = 0;
    for (size_t end; (end = all.find(separator, start)) != std::string::npos; start = end + separator.size()) {
        const std::string text = all.substr(start, end - start);
        std::vector<llama_token> ids(text.size() + 8);
        const int n = llama_tokenize(vocab, text.data(), (int) text.size(), ids.data(), (int) ids.size(), special, special);
        for (int i = 0; i < n; i++) {
            printf(i ? " %d" : "%d", ids[i]);
        }
        printf("\n");
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
