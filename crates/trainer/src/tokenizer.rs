//! Tokenizers: HF tokenizer.json files and vocabularies embedded in GGUF files.
