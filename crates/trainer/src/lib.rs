//! ftbench's trainer: a decoder of its own for the Gemma 3 and Llama families that trains
//! on candle, LoRA adapters with PEFT semantics and files, data loading and the training loop.

pub mod error;
pub mod tokenizer;
pub mod data;

pub use error::{Error, Result};
