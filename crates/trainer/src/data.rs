//! Datasets: JSONL and plain-text loaders, prompt templates, loss masks, batching.
