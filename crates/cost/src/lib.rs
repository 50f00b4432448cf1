//! The cost model: prompting, RAG, LoRA, QLoRA, full fine-tuning and distillation.
