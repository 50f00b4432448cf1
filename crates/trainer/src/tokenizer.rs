//! Tokenizers: HF tokenizer.json files and vocabularies embedded in GGUF files.
//! (interim: replaced by the full implementation on the tokenizer branch)

use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }
    pub fn from_gguf(_content: &gguf_file::Content, path: &Path) -> Result<Self> {
        Err(Error::model(path, "gguf tokenizers are not available yet"))
    }
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos {
            ids.extend(self.bos_id());
        }
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }
    pub fn piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.token_id("<bos>").or_else(|| self.token_id("<s>"))
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.token_id("<eos>").or_else(|| self.token_id("</s>"))
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.token_id("<pad>")
    }
    pub fn stop_ids(&self) -> Vec<u32> {
        self.eos_id().into_iter().collect()
    }
    pub fn add_bos_default(&self) -> bool {
        true
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        self.inner.save(dir.join("tokenizer.json"), false).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

impl crate::data::TextEncoder for Tokenizer {
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        Tokenizer::encode(self, text, add_bos)
    }
    fn bos_id(&self) -> Option<u32> {
        Tokenizer::bos_id(self)
    }
    fn eos_id(&self) -> Option<u32> {
        Tokenizer::eos_id(self)
    }
    fn pad_id(&self) -> Option<u32> {
        Tokenizer::pad_id(self)
    }
}
