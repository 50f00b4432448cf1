//! Datasets: JSONL and plain-text loaders, prompt and chat templates, loss masks, batching.
//!
//! The path from a file to the trainer's tensors:
//!
//! 1. [`load_examples`] reads one file and turns every record into an [`Example`]: token ids
//!    and, per id, whether it is a completion token (one that carries loss). Four shapes are
//!    understood (see [`DataFormat`]): GSM8K rows (`question`/`answer`), prompt/completion
//!    rows, chat rows (`messages`, rendered with a [`ChatTemplate`]) and plain text for
//!    language modelling.
//! 2. [`split_heldout`] carves a deterministic held-out set when there is no eval file;
//!    [`load_datasets`] does steps 1 and 2 from a [`DataConfig`].
//! 3. [`Batcher`] serves training batches forever, shuffled per epoch by seed, padded or
//!    packed; [`eval_batches`] serves evaluation batches once, in order.
//!
//! A [`Batch`] follows the next-token convention: `targets[t] = input_ids[t + 1]` and
//! `loss_mask[t]` is 1 only where `input_ids[t + 1]` is a completion token of the same example.
//!
//! Tokenization goes through the [`TextEncoder`] trait. Template markers such as
//! `<start_of_turn>` or `<|im_end|>` are passed to the encoder as text, so the encoder must map
//! special-token strings to their ids (Hugging Face `tokenizer.json` added tokens do).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod batch;
mod chat;
mod gsm8k;
mod load;
mod rng;
#[cfg(test)]
mod testutil;

pub use batch::{eval_batches, Batch, Batcher};
pub use chat::{render_chat, ChatMessage, Role};
pub use gsm8k::{
    gsm8k_final_answer, gsm8k_prompt, load_gsm8k, strip_calculator_annotations, Gsm8kItem,
};
pub use load::{load_examples, load_examples_with_report, split_heldout, LoadReport};

/// What the data module needs from a tokenizer (the crate's tokenizer implements it).
pub trait TextEncoder {
    /// Token ids of `text`, preceded by the BOS id when `add_bos` is true and the vocabulary
    /// has one. Special-token strings inside `text` must map to their ids.
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>>;
    /// The beginning-of-sequence id, if any.
    fn bos_id(&self) -> Option<u32>;
    /// The end-of-sequence id, if any.
    fn eos_id(&self) -> Option<u32>;
    /// The padding id, if any.
    fn pad_id(&self) -> Option<u32>;
}

/// The id to pad batches with: the encoder's pad id, else its EOS id, else 0.
/// Padding never carries loss, so any id is correct; a real pad id keeps logs readable.
pub fn default_pad_id(tok: &dyn TextEncoder) -> u32 {
    tok.pad_id().or(tok.eos_id()).unwrap_or(0)
}

/// The shape of a data file. Serialized as `"auto"`, `"gsm8k"`, `"prompt_completion"`,
/// `"chat"` or `"text"`. Default: `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Pick by the file: a `.txt` file is text; a `.jsonl`/`.json` file, or any file whose
    /// first non-blank line starts with `{`, is JSONL and its first line's keys decide
    /// (`messages` → chat, `prompt`+`completion` → prompt_completion, `question`+`answer` →
    /// gsm8k); anything else is text.
    #[default]
    Auto,
    /// JSONL rows with string keys `question` and `answer`. The prompt is
    /// [`DataConfig::prompt_template`] with the question; the completion is the answer.
    Gsm8k,
    /// JSONL rows with string keys `prompt` and `completion`, used verbatim.
    PromptCompletion,
    /// JSONL rows with key `messages`: a non-empty list of `{"role", "content"}` objects,
    /// roles `system`, `user`, `assistant` (`model` is read as `assistant`). Loss on the
    /// assistant turns and their end-of-turn markers.
    Chat,
    /// A plain-text file for language modelling: every token carries loss; the token stream
    /// is cut into windows of `max_seq_len`.
    Text,
}

impl DataFormat {
    /// The name used in config files and messages.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Gsm8k => "gsm8k",
            DataFormat::PromptCompletion => "prompt_completion",
            DataFormat::Chat => "chat",
            DataFormat::Text => "text",
        }
    }
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How chat messages become text. Serialized as `"gemma"`, `"chatml"`, `"llama3"` or
/// `"plain"`. Default: `gemma`. See [`render_chat`] for the exact strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ChatTemplate {
    /// `<start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n…<end_of_turn>\n`.
    /// Gemma has no system role: a system message is prepended to the next user message,
    /// separated by a blank line.
    #[default]
    #[serde(rename = "gemma")]
    Gemma,
    /// `<|im_start|>role\n…<|im_end|>\n` (Qwen, SmolLM).
    #[serde(rename = "chatml")]
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (Llama 3).
    #[serde(rename = "llama3")]
    Llama3,
    /// `role: …\n`, for base models without a chat vocabulary.
    #[serde(rename = "plain")]
    Plain,
}

/// The `[data]` table of a training config. Every key is optional; the defaults are stated
/// per field and given by [`DataConfig::default`]. Unknown keys are rejected.
///
/// Relative paths are opened as given, i.e. against the current directory (the repository
/// root for the README commands); [`DataConfig::with_base_dir`] anchors them elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The training file. Default: `../shared/datasets/gsm8k/train.jsonl`.
    pub train_path: PathBuf,
    /// The evaluation file; when absent, `heldout_fraction` of the training examples is held
    /// out instead. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_path: Option<PathBuf>,
    /// The file shape. Default: `auto`.
    pub format: DataFormat,
    /// The chat template for `chat` files. Default: `gemma`.
    pub chat_template: ChatTemplate,
    /// The GSM8K prompt; `{question}` is replaced by the question. Must contain `{question}`.
    /// Default: `"Question: {question}\nAnswer: "`.
    pub prompt_template: String,
    /// The longest example in tokens (BOS and EOS included); longer examples are cut from the
    /// right, and text files are cut into windows of this length. At least 2. Default: 512.
    pub max_seq_len: usize,
    /// Pack several examples into each row of `max_seq_len` tokens instead of padding every
    /// example to the longest row of its batch. Default: false.
    pub packing: bool,
    /// The fraction of training examples held out for evaluation when `eval_path` is absent,
    /// in `[0, 1)`. Default: 0.05.
    pub heldout_fraction: f64,
    /// Use at most this many training examples (the first ones, after the held-out split).
    /// Default: all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_train_examples: Option<usize>,
    /// Use at most this many evaluation examples (the first ones). Default: all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_eval_examples: Option<usize>,
    /// Seeds the held-out split and the per-epoch shuffle. Default: 0.
    pub seed: u64,
    /// Start every example with the encoder's BOS id. Default: true.
    pub add_bos: bool,
    /// End every example with the encoder's EOS id, a completion token so that the model
    /// learns to stop (in chat files it carries loss only when the last message is the
    /// assistant's); for text files, once at the end of the file. Default: true.
    pub add_eos: bool,
    /// Remove GSM8K calculator annotations such as `<<48/2=24>>` from answers. Default: false.
    pub strip_calculator_annotations: bool,
}

/// The default training file, relative to the repository root.
pub const DEFAULT_TRAIN_PATH: &str = "../shared/datasets/gsm8k/train.jsonl";
/// The default GSM8K prompt template.
pub const DEFAULT_PROMPT_TEMPLATE: &str = "Question: {question}\nAnswer: ";

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train_path: PathBuf::from(DEFAULT_TRAIN_PATH),
            eval_path: None,
            format: DataFormat::Auto,
            chat_template: ChatTemplate::Gemma,
            prompt_template: DEFAULT_PROMPT_TEMPLATE.to_string(),
            max_seq_len: 512,
            packing: false,
            heldout_fraction: 0.05,
            max_train_examples: None,
            max_eval_examples: None,
            seed: 0,
            add_bos: true,
            add_eos: true,
            strip_calculator_annotations: false,
        }
    }
}

impl DataConfig {
    /// Checks the values serde cannot: errors name the key as `data.<key>`.
    pub fn validate(&self) -> Result<()> {
        if self.max_seq_len < 2 {
            return Err(Error::config(
                "data.max_seq_len",
                format!("expected at least 2, found {}", self.max_seq_len),
            ));
        }
        if !(self.heldout_fraction.is_finite() && (0.0..1.0).contains(&self.heldout_fraction)) {
            return Err(Error::config(
                "data.heldout_fraction",
                format!(
                    "expected a number in [0, 1), found {}",
                    self.heldout_fraction
                ),
            ));
        }
        if !self.prompt_template.contains("{question}") {
            return Err(Error::config(
                "data.prompt_template",
                format!(
                    "expected a template containing `{{question}}`, found {:?}",
                    self.prompt_template
                ),
            ));
        }
        for (key, v) in [
            ("data.max_train_examples", self.max_train_examples),
            ("data.max_eval_examples", self.max_eval_examples),
        ] {
            if v == Some(0) {
                return Err(Error::config(key, "expected at least 1, found 0"));
            }
        }
        Ok(())
    }

    /// This config with relative `train_path` and `eval_path` joined onto `base`.
    pub fn with_base_dir(mut self, base: &Path) -> Self {
        if self.train_path.is_relative() {
            self.train_path = base.join(&self.train_path);
        }
        if let Some(p) = &self.eval_path {
            if p.is_relative() {
                self.eval_path = Some(base.join(p));
            }
        }
        self
    }
}

/// One tokenized example: the ids and, per id, whether it is a completion token that carries
/// loss. Both vectors have the same length. The first id is never predicted, so its flag is
/// never used as a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, BOS and EOS included when configured.
    pub input_ids: Vec<u32>,
    /// Per id: true for completion tokens (they carry loss when predicted).
    pub loss_mask: Vec<bool>,
}

impl Example {
    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// The number of tokens that carry loss when the example is trained on (the completion
    /// tokens after the first position).
    pub fn n_loss_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// Training and evaluation examples built from a [`DataConfig`] by [`load_datasets`].
#[derive(Debug, Clone)]
pub struct Datasets {
    /// Training examples, in file order.
    pub train: Vec<Example>,
    /// Evaluation examples: the eval file's, or the held-out part of the training file.
    pub eval: Vec<Example>,
    /// What loading the training file found.
    pub train_report: LoadReport,
    /// What loading the eval file found; `None` when the eval set is held out.
    pub eval_report: Option<LoadReport>,
}

/// Validates `cfg`, loads the training file, takes the evaluation examples from `eval_path`
/// or holds out `heldout_fraction` of the training examples (seeded by `seed`), then applies
/// `max_train_examples` and `max_eval_examples` (the held-out set does not depend on them).
pub fn load_datasets(cfg: &DataConfig, tok: &dyn TextEncoder) -> Result<Datasets> {
    cfg.validate()?;
    let (all, train_report) = load_examples_with_report(&cfg.train_path, cfg, tok)?;
    let (mut train, mut eval, eval_report) = match &cfg.eval_path {
        Some(p) => {
            let (eval, report) = load_examples_with_report(p, cfg, tok)?;
            (all, eval, Some(report))
        }
        None => {
            let (train, eval) = split_heldout(all, cfg.heldout_fraction, cfg.seed);
            (train, eval, None)
        }
    };
    if let Some(n) = cfg.max_train_examples {
        train.truncate(n);
    }
    if let Some(n) = cfg.max_eval_examples {
        eval.truncate(n);
    }
    Ok(Datasets {
        train,
        eval,
        train_report,
        eval_report,
    })
}

#[cfg(test)]
mod tests {
    use super::testutil::{temp_file, CharEncoder};
    use super::*;

    #[test]
    fn config_defaults_names_and_unknown_keys() {
        let c: DataConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, DataConfig::default());
        assert_eq!(
            c.train_path,
            PathBuf::from("../shared/datasets/gsm8k/train.jsonl")
        );
        assert_eq!(c.prompt_template, "Question: {question}\nAnswer: ");
        let c: DataConfig = serde_json::from_str(
            r#"{"format": "prompt_completion", "chat_template": "chatml", "packing": true,
                "eval_path": "e.jsonl", "max_train_examples": 10}"#,
        )
        .unwrap();
        assert_eq!(c.format, DataFormat::PromptCompletion);
        assert_eq!(c.chat_template, ChatTemplate::ChatMl);
        assert_eq!(c.eval_path, Some(PathBuf::from("e.jsonl")));
        for (name, f) in [
            ("auto", DataFormat::Auto),
            ("gsm8k", DataFormat::Gsm8k),
            ("prompt_completion", DataFormat::PromptCompletion),
            ("chat", DataFormat::Chat),
            ("text", DataFormat::Text),
        ] {
            assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{name}\""));
            assert_eq!(f.name(), name);
        }
        for (name, t) in [
            ("gemma", ChatTemplate::Gemma),
            ("chatml", ChatTemplate::ChatMl),
            ("llama3", ChatTemplate::Llama3),
            ("plain", ChatTemplate::Plain),
        ] {
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{name}\""));
        }
        let e = serde_json::from_str::<DataConfig>(r#"{"max_len": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("unknown field `max_len`"), "{e}");
        // Round trip, absent options left out.
        let s = serde_json::to_string(&DataConfig::default()).unwrap();
        assert!(!s.contains("eval_path"), "{s}");
        assert_eq!(
            serde_json::from_str::<DataConfig>(&s).unwrap(),
            DataConfig::default()
        );
    }

    #[test]
    fn base_dir_anchors_relative_paths_only() {
        let c = DataConfig {
            eval_path: Some("/abs/e.jsonl".into()),
            ..DataConfig::default()
        }
        .with_base_dir(Path::new("/repo"));
        assert_eq!(
            c.train_path,
            PathBuf::from("/repo/../shared/datasets/gsm8k/train.jsonl")
        );
        assert_eq!(c.eval_path, Some(PathBuf::from("/abs/e.jsonl")));
    }

    #[test]
    fn load_datasets_holds_out_or_reads_eval_file_then_limits() {
        let rows: String = (0..40)
            .map(|i| format!("{{\"prompt\": \"p{i}\", \"completion\": \"c\"}}\n"))
            .collect();
        let train = temp_file("train.jsonl", &rows);
        let cfg = DataConfig {
            train_path: train.to_path_buf(),
            heldout_fraction: 0.25,
            ..DataConfig::default()
        };
        let d = load_datasets(&cfg, &CharEncoder).unwrap();
        assert_eq!((d.train.len(), d.eval.len()), (30, 10));
        assert!(d.eval_report.is_none());
        // Limits do not change the held-out set.
        let limited = DataConfig {
            max_train_examples: Some(5),
            max_eval_examples: Some(3),
            ..cfg.clone()
        };
        let l = load_datasets(&limited, &CharEncoder).unwrap();
        assert_eq!(l.train, d.train[..5].to_vec());
        assert_eq!(l.eval, d.eval[..3].to_vec());
        let eval = temp_file("eval.jsonl", "{\"prompt\": \"x\", \"completion\": \"y\"}\n");
        let with_eval = DataConfig {
            eval_path: Some(eval.to_path_buf()),
            ..cfg
        };
        let e = load_datasets(&with_eval, &CharEncoder).unwrap();
        assert_eq!((e.train.len(), e.eval.len()), (40, 1));
        assert_eq!(e.eval_report.unwrap().records, 1);
    }

    /// The development copy of the public datasets, if this checkout has one next to it.
    fn shared_datasets() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets");
        if p.is_dir() {
            Some(p)
        } else {
            println!(
                "skipped: no dataset folder at {} (see datasets/gsm8k.md)",
                p.display()
            );
            None
        }
    }

    #[test]
    fn real_gsm8k_train_file_loads() {
        let Some(dir) = shared_datasets() else { return };
        let path = dir.join("gsm8k/train.jsonl");
        let items = load_gsm8k(&path, None).unwrap();
        assert_eq!(items.len(), 7473);
        assert!(
            items.iter().all(|i| i.gold().is_some()),
            "every answer ends with #### <number>"
        );
        assert_eq!(items[0].gold().as_deref(), Some("72"));
        assert_eq!(load_gsm8k(&path, Some(10)).unwrap().len(), 10);
        // Char-level tokens: the longest row is under 2,000 chars, so nothing is cut.
        let cfg = DataConfig {
            train_path: path.clone(),
            max_seq_len: 4096,
            ..DataConfig::default()
        };
        let (examples, report) = load_examples_with_report(&path, &cfg, &CharEncoder).unwrap();
        assert_eq!(report.format, Some(DataFormat::Gsm8k));
        assert_eq!((examples.len(), report.truncated), (7473, 0));
        assert!(examples.iter().all(|e| e.n_loss_tokens() > 0));
        let test = load_gsm8k(&dir.join("gsm8k/test.jsonl"), None).unwrap();
        assert_eq!(test.len(), 1000);
    }

    #[test]
    fn real_tinyshakespeare_loads_as_text() {
        let Some(dir) = shared_datasets() else { return };
        let path = dir.join("tinyshakespeare/input.txt");
        let cfg = DataConfig {
            max_seq_len: 256,
            ..DataConfig::default()
        };
        let (examples, report) = load_examples_with_report(&path, &cfg, &CharEncoder).unwrap();
        assert_eq!(report.format, Some(DataFormat::Text));
        let chars = std::fs::read_to_string(&path).unwrap().chars().count();
        // Every char and the EOS is predicted exactly once.
        assert_eq!(report.loss_tokens, chars + 1);
        assert!(examples.iter().all(|e| e.len() <= 256));
    }
}
