//! Streaming decode: the text each new token adds, for printing generation as it happens.
//!
//! Decoding one token at a time is wrong twice over: a character split across byte-level tokens
//! decodes to U+FFFD until its last byte arrives, and decoders such as SentencePiece's strip a
//! leading space only at the start of the text. So the decoder re-decodes a short window of
//! recent ids and emits only what grew beyond the previously emitted text, holding back while the
//! window ends in an incomplete character.

use super::AutoTokenizer;
use crate::error::{Error, Result};

pub struct StreamDecoder<'a> {
    tokenizer: &'a AutoTokenizer,
    skip_special_tokens: bool,
    /// Ids not yet fully emitted, preceded by the ids of the already emitted `prefix`.
    ids: Vec<u32>,
    /// Text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl<'a> StreamDecoder<'a> {
    pub(super) fn new(tokenizer: &'a AutoTokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Feed one id; returns the new text it completes, or `None` while a character is incomplete
    /// (or the token decodes to nothing, e.g. a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if self.tokenizer.id_to_token(id).is_none() {
            return Err(Error::InvalidArgument(format!(
                "token id {id} is not in the vocabulary ({} tokens)",
                self.tokenizer.vocab_size()
            )));
        }
        tokenizers::tokenizer::step_decode_stream(
            self.tokenizer.inner(),
            vec![id],
            self.skip_special_tokens,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| Error::Other(format!("streaming decode: {e}")))
    }

    /// Text still held back at the end (an incomplete character decodes as U+FFFD, as `decode`
    /// would print it). Call once after the last token.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let full = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        self.ids.clear();
        let prefix = std::mem::take(&mut self.prefix);
        self.prefix_index = 0;
        let rest = full.strip_prefix(prefix.as_str()).unwrap_or("");
        Ok((!rest.is_empty()).then(|| rest.to_owned()))
    }
}
