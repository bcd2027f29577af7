//! Prompts to token ids with Hugging Face `tokenizers`, from a `tokenizer.json`.
//!
//! Batches come out the way diffusers' IF pipeline calls its tokenizer
//! (`padding="max_length", max_length=…, truncation=True,
//! add_special_tokens=True`): every row exactly `max_length` tokens, special
//! tokens added after truncation, padded on the right, with the attention mask
//! 1 on tokens and 0 on padding. The padding and truncation settings saved in
//! the file (all-MiniLM-L6-v2's pads to 128) are replaced by ours.
//!
//! The padding token is, in order: the one the options name; `pad_token` from
//! `tokenizer_config.json` or `special_tokens_map.json` (what transformers
//! uses); the one in the file's own padding settings.

use std::path::{Path, PathBuf};

use tch::Tensor;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor, TruncationParams};

use crate::nn::error::{NnError, Result};

/// How prompts become ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// Every row is padded or truncated to exactly this many tokens.
    pub max_length: usize,
    /// The padding token; `None` finds it as described in the module docs.
    pub pad_token: Option<String>,
}

/// A batch of tokenised prompts, on the CPU.
#[derive(Debug)]
pub struct TokenBatch {
    /// [B, L] i64.
    pub input_ids: Tensor,
    /// [B, L] i64: 1 for tokens (special ones included), 0 for padding.
    pub attention_mask: Tensor,
}

/// A `tokenizers::Tokenizer` set up for fixed-length batches.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
    pad_id: u32,
    file: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("file", &self.file).field("max_length", &self.max_length).finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, reading the padding token from the directory's
    /// `tokenizer_config.json` / `special_tokens_map.json` when present.
    pub fn from_dir(dir: &Path, options: &TokenizerOptions) -> Result<Self> {
        let mut options = options.clone();
        if options.pad_token.is_none() {
            options.pad_token = configured_pad_token(dir)?;
        }
        Self::from_file(&dir.join("tokenizer.json"), &options)
    }

    /// Loads one `tokenizer.json`.
    pub fn from_file(file: &Path, options: &TokenizerOptions) -> Result<Self> {
        let fail = |reason: String| NnError::Tokenizer(format!("{}: {reason}", file.display()));
        if !file.is_file() {
            return Err(NnError::io(file, std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json")));
        }
        let mut inner = tokenizers::Tokenizer::from_file(file).map_err(|e| fail(e.to_string()))?;
        let pad_token = match &options.pad_token {
            Some(token) => token.clone(),
            None => inner.get_padding().map(|p| p.pad_token.clone()).ok_or_else(|| {
                fail("no padding token: set `pad_token` in the options or in tokenizer_config.json".into())
            })?,
        };
        let pad_id = inner
            .token_to_id(&pad_token)
            .ok_or_else(|| fail(format!("padding token `{pad_token}` is not in the vocabulary")))?;
        // The special tokens ([CLS] … [SEP], or </s>) must leave room for one token.
        let added = inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if options.max_length <= added {
            return Err(NnError::input(
                "max_length",
                format!("{} leaves no room for text after {added} special tokens", options.max_length),
            ));
        }
        let truncation = TruncationParams { max_length: options.max_length, ..Default::default() };
        inner.with_truncation(Some(truncation)).map_err(|e| fail(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(options.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self { inner, max_length: options.max_length, pad_id, file: file.to_owned() })
    }

    /// Tokenises `prompts` into [B, max_length] ids and mask.
    pub fn encode(&self, prompts: &[&str]) -> Result<TokenBatch> {
        if prompts.is_empty() {
            return Err(NnError::input("prompts", "at least one prompt is needed"));
        }
        let encodings = self
            .inner
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| NnError::Tokenizer(format!("{}: {e}", self.file.display())))?;
        let mut ids = Vec::with_capacity(prompts.len() * self.max_length);
        let mut mask = Vec::with_capacity(ids.capacity());
        for encoding in &encodings {
            // Fixed padding plus truncation make every row max_length long.
            debug_assert_eq!(encoding.get_ids().len(), self.max_length);
            ids.extend(encoding.get_ids().iter().map(|&i| i64::from(i)));
            mask.extend(encoding.get_attention_mask().iter().map(|&m| i64::from(m)));
        }
        let shape = [prompts.len() as i64, self.max_length as i64];
        Ok(TokenBatch {
            input_ids: Tensor::f_from_slice(&ids)?.f_view(shape)?,
            attention_mask: Tensor::f_from_slice(&mask)?.f_view(shape)?,
        })
    }

    /// The byte range of `prompt` that each of its `max_length` tokens comes
    /// from, in the order [`Tokenizer::encode`] gives them (`(0, 0)` for special
    /// and padding tokens): which tokens spell a given word.
    pub fn offsets(&self, prompt: &str) -> Result<Vec<(usize, usize)>> {
        let encoding =
            self.inner.encode(prompt, true).map_err(|e| NnError::Tokenizer(format!("{}: {e}", self.file.display())))?;
        let special = encoding.get_special_tokens_mask();
        Ok(encoding.get_offsets().iter().zip(special).map(|(&o, &s)| if s == 1 { (0, 0) } else { o }).collect())
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// For each token of `offsets` (as [`Tokenizer::offsets`] gives them), whether
/// it spells part of one of the byte ranges `spans`: the tokens of some words.
pub fn covering(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<bool> {
    offsets.iter().map(|&(from, to)| from < to && spans.iter().any(|&(a, b)| from < b && to > a)).collect()
}

impl Tokenizer {
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` object (already configured for fixed length).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `pad_token` from tokenizer_config.json, else special_tokens_map.json; either
/// file may be absent. transformers writes it as a string or as an added-token
/// object `{"content": …}`.
fn configured_pad_token(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let file = dir.join(name);
        if !file.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&file).map_err(|e| NnError::io(&file, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| NnError::Json { file: file.display().to_string(), source })?;
        let token = match value.get("pad_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj) => obj.get("content").and_then(|c| c.as_str()).map(str::to_owned),
            None => None,
        };
        if token.is_some() {
            return Ok(token);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text").join(name)
    }

    fn options(max_length: usize) -> TokenizerOptions {
        TokenizerOptions { max_length, pad_token: None }
    }

    #[test]
    fn pads_and_truncates_to_the_fixed_length() {
        let tok = Tokenizer::from_dir(&fixture("tiny-bert"), &options(6)).unwrap();
        let batch = tok.encode(&["a red circle on top of a blue square", "zebra"]).unwrap();
        assert_eq!(batch.input_ids.size(), [2, 6]);
        let ids: Vec<i64> = batch.input_ids.flatten(0, -1).try_into().unwrap();
        let mask: Vec<i64> = batch.attention_mask.flatten(0, -1).try_into().unwrap();
        let (cls, sep, pad) = (2, 3, 0);
        // Truncated row still ends with [SEP]; the short row is padded on the right.
        assert_eq!((ids[0], ids[5]), (cls, sep));
        assert_eq!(&ids[6..9], &[cls, tok.inner().token_to_id("zebra").unwrap() as i64, sep]);
        assert_eq!(&ids[9..], &[pad; 3]);
        assert_eq!(mask, [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn bad_settings_are_errors() {
        let msg = Tokenizer::from_dir(&fixture("tiny-t5"), &options(1)).unwrap_err().to_string();
        assert!(msg.contains("max_length"), "{msg}");
        let opts = TokenizerOptions { max_length: 8, pad_token: Some("<nope>".into()) };
        let msg = Tokenizer::from_dir(&fixture("tiny-t5"), &opts).unwrap_err().to_string();
        assert!(msg.contains("tokenizer.json") && msg.contains("<nope>"), "{msg}");
        let msg = Tokenizer::from_dir(&fixture("missing"), &options(8)).unwrap_err().to_string();
        assert!(msg.contains("missing/tokenizer.json"), "{msg}");
        let tok = Tokenizer::from_dir(&fixture("tiny-t5"), &options(8)).unwrap();
        assert!(tok.encode(&[]).is_err());
    }
}
