//! A char-level encoder and temporary files for the data tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::TextEncoder;
use crate::error::Result;

pub(crate) const PAD: u32 = 0;
pub(crate) const BOS: u32 = 1;
pub(crate) const EOS: u32 = 2;

/// One id per char: the char's code point. BOS 1, EOS 2, pad 0.
pub(crate) struct CharEncoder;

impl TextEncoder for CharEncoder {
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut v: Vec<u32> = Vec::new();
        if add_bos {
            v.push(BOS);
        }
        v.extend(text.chars().map(|c| c as u32));
        Ok(v)
    }
    fn bos_id(&self) -> Option<u32> {
        Some(BOS)
    }
    fn eos_id(&self) -> Option<u32> {
        Some(EOS)
    }
    fn pad_id(&self) -> Option<u32> {
        Some(PAD)
    }
}

/// The ids of `s` under [`CharEncoder`].
pub(crate) fn ids(s: &str) -> Vec<u32> {
    s.chars().map(|c| c as u32).collect()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A file in a temporary folder of its own, removed with the folder on drop.
pub(crate) struct TempFile(PathBuf);

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes `content` to a fresh file named `name` in a temporary folder of its own.
pub(crate) fn temp_file(name: &str, content: &str) -> TempFile {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ftbench-data-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    TempFile(p)
}
