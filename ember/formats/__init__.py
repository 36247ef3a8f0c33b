"""File formats read without torch and without the rest of ember: the GGUF container and the GGML tensor
types. A leaf package: the loader, the tokenizer, the store and the kernels all read these, so it imports
nothing of ember but its errors."""
