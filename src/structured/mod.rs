//! Structured outputs: `response_format` (`json_object`, `json_schema`) and `tool_choice`
//! (`required`, a named function) enforced by constrained decoding.
//!
//! The grammar engine is llguidance (the one llama.cpp and vLLM use): a request's JSON schema or
//! tool list becomes a grammar ([`grammar`]), compiled once per request against the model's
//! vocabulary ([`Structured`]); each choice gets its own matcher ([`Constraint`]), which gives the
//! set of tokens allowed next. The engine computes that mask while the step's forward pass runs
//! and the sampler forbids every other token (`constraint::MaskSlot`). Why llguidance rather
//! than outlines-core: it compiles grammars lazily (no up-front automaton over the whole
//! vocabulary, so a new schema costs milliseconds, not seconds), takes JSON schemas and
//! context-free grammars (tool-call wrappers around schemas) in one engine, computes a 150k-token
//! mask in tens of microseconds, and is on crates.io with no Python; outlines-core builds a
//! regex automaton per schema up front and covers JSON schema through regular expressions only.
pub mod constraint;
pub mod grammar;
#[cfg(test)]
mod tests;
mod tokenizer_env;

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};

pub use constraint::{Constraint, MaskSlot};

/// A model's grammar compiler: its vocabulary in llguidance's form, built on first use (about a
/// second for a 150k vocabulary on 2 CPUs), shared by every request.
pub struct Structured {
    tokenizer: Arc<tokenizers::Tokenizer>,
    n_vocab: usize,
    eos: Option<u32>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl Structured {
    /// `n_vocab`: the model's logits size; `eos`: the token that ends an answer (None: the model
    /// has none, and constrained decoding is refused).
    pub fn new(tokenizer: Arc<tokenizers::Tokenizer>, n_vocab: usize, eos: Option<u32>) -> Self {
        // Masks cover every logit and every tokenizer id, whichever is more.
        let n_vocab = n_vocab.max(tokenizer.get_vocab_size(true));
        Self { tokenizer, n_vocab, eos, factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<&ParserFactory, String> {
        let eos = self.eos.ok_or("the model has no end-of-sequence token")?;
        self.factory
            .get_or_init(|| {
                let env = tokenizer_env::InferdTokEnv::new(self.tokenizer.clone(), self.n_vocab, eos);
                let mut f = ParserFactory::new_simple(&(Arc::new(env) as llguidance::toktrie::TokEnv)).map_err(|e| e.to_string())?;
                f.quiet();
                Ok(f)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Compiles `grammar` and returns `n` independent matchers (one per choice); a grammar the
    /// engine cannot handle is an error naming what it refused.
    pub fn constraints(&self, grammar: TopLevelGrammar, n: usize) -> Result<Vec<Constraint>, String> {
        let factory = self.factory()?;
        let parser = factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(e);
        }
        let eos = self.eos.unwrap_or(0);
        Ok((0..n).map(|_| Constraint::new(m.deep_clone(), self.n_vocab, eos)).collect())
    }
}

impl std::fmt::Debug for Structured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Structured").field("n_vocab", &self.n_vocab).field("eos", &self.eos).finish()
    }
}
