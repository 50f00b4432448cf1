//! ftbench's trainer: a decoder of its own for the Gemma 3 and Llama families that trains
//! on candle, LoRA adapters with PEFT semantics and files, data loading and the training loop.

pub mod attention;
pub mod config;
pub mod cpu_gemm;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod fused_lora;
pub mod generate;
pub mod loader;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod tokenizer;
pub mod train;

#[cfg(test)]
mod test_util;

pub use config::{Family, ModelConfig};
pub use device::DeviceSpec;
pub use error::{Error, Result};
pub use lora::LoraConfig;
pub use model::{Decoder, TrainMode};
