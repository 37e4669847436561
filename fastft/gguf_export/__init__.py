"""GGUF export without a llama.cpp build.

    writer.py     save_gguf(): merged model -> one GGUF per quantization method, streamed
                  tensor by tensor, llama.cpp's names / metadata / tensor-type rules
    kquants.py    fastft's torch quantisers (Q4_K, Q5_K, Q6_K, Q8_0) in ggml's block layouts;
                  CPU or CUDA tensors
    tokenizer.py  transformers fast tokenizer -> tokenizer.ggml.* (BPE and SentencePiece)
    ollama.py     the Modelfile written beside the GGUF

Users reach this through `model.save_pretrained_gguf(...)` (fastft.save).
"""
