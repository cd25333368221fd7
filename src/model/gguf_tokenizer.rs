//! A `tokenizers::Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! A GGUF carries no `tokenizer.json`: it stores the vocabulary, the BPE merges, the token types
//! and llama.cpp's name for the pre-tokenizer. This module maps those back to the Hugging Face
//! pipeline the model was trained with (normalizer, split regex, byte-level BPE, added tokens,
//! decoder), so the ids match the model's official `tokenizer.json` token for token.
//!
//! Only the header is read (`Content::read` stops before the tensor data), so this is cheap even
//! for multi-GB files.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::ModelError;

/// llama.cpp's token types (`llama_token_type`): 3 = control (special), 4 = user defined.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Qwen2's split regex, as in its `tokenizer.json` (and llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split regex (`LLAMA_VOCAB_PRE_TYPE_LLAMA3`): like Qwen2's but digits in runs of 1-3.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Everything a GGUF's metadata says about tokenising and chatting, besides the weights.
pub struct GgufAssets {
    /// `general.architecture`, e.g. "qwen2" or "llama".
    pub architecture: String,
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
    /// Text of the BOS/EOS tokens, exposed to chat templates as `bos_token` / `eos_token`.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation; see [`eos_token_ids`] for how they are chosen.
    pub eos_token_ids: Vec<u32>,
    /// `<arch>.context_length`.
    pub context_length: Option<usize>,
}

/// Reads a GGUF header (metadata only, no tensor data) and builds its tokenizer and chat assets.
pub fn read_gguf_assets(path: &Path) -> Result<GgufAssets, ModelError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| ModelError::NotFound(name.clone(), e.to_string()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::Invalid(name.clone(), format!("not a readable GGUF file: {e}")))?;
    assets_from_content(&content, &name)
}

/// Builds [`GgufAssets`] from already-read GGUF metadata. `name` is used in error messages.
pub fn assets_from_content(content: &Content, name: &str) -> Result<GgufAssets, ModelError> {
    let meta = &content.metadata;
    let architecture = get_str(meta, "general.architecture").unwrap_or_default().to_string();
    let tokens = string_array(meta, "tokenizer.ggml.tokens", name)?;
    let tokenizer = build_tokenizer(content, &tokens, name)?;
    let token_text = |key: &str| get_u32(meta, key).and_then(|id| tokens.get(id as usize).cloned());
    let chat_template = get_str(meta, "tokenizer.chat_template").map(str::to_string);
    let eos_token_ids = eos_token_ids(content, &tokens, chat_template.as_deref());
    let context_length = get_u32(meta, &format!("{architecture}.context_length")).map(|n| n as usize);
    Ok(GgufAssets {
        architecture,
        tokenizer,
        bos_token: token_text("tokenizer.ggml.bos_token_id"),
        eos_token: token_text("tokenizer.ggml.eos_token_id"),
        chat_template,
        eos_token_ids,
        context_length,
    })
}

/// Builds the tokenizer described by `tokenizer.ggml.*`. Supports `tokenizer.ggml.model == "gpt2"`
/// (byte-level BPE); any other model is a clear [`ModelError::Invalid`].
pub fn tokenizer_from_gguf(content: &Content, name: &str) -> Result<Tokenizer, ModelError> {
    let tokens = string_array(&content.metadata, "tokenizer.ggml.tokens", name)?;
    build_tokenizer(content, &tokens, name)
}

fn build_tokenizer(content: &Content, tokens: &[String], name: &str) -> Result<Tokenizer, ModelError> {
    let meta = &content.metadata;
    let invalid = |msg: String| ModelError::Invalid(name.to_string(), msg);
    let model = get_str(meta, "tokenizer.ggml.model")
        .ok_or_else(|| invalid("the GGUF has no tokenizer metadata (tokenizer.ggml.model)".into()))?;
    if model != "gpt2" {
        return Err(invalid(format!(
            "unsupported GGUF tokenizer model '{model}' (supported: gpt2 byte-level BPE); \
             use a Hugging Face directory with tokenizer.json instead"
        )));
    }
    let merges = string_array(meta, "tokenizer.ggml.merges", name)?;
    let types = int_array(meta, "tokenizer.ggml.token_type").unwrap_or_default();
    let token_type = |i: usize| types.get(i).copied().unwrap_or(1);
    let is_added = |i: usize| matches!(token_type(i), TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED);

    // The vocabulary is stored in the byte-level alphabet. A regular token with a character outside
    // it is written as plain text by some converters: respell it byte by byte (as transformers
    // does). Control/user-defined tokens keep their text so the added-token matcher finds them.
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, tok) in tokens.iter().enumerate() {
        let spelled = if is_added(i) || tok.chars().all(is_byte_level_char) {
            tok.clone()
        } else {
            tok.bytes().map(|b| BYTES_TO_CHARS[b as usize]).collect()
        };
        vocab.entry(spelled).or_insert(i as u32);
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for m in &merges {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| invalid(format!("malformed BPE merge '{m}' (expected two tokens)")))?;
        pairs.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(|e| invalid(format!("cannot build the BPE model: {e}")))?;

    let pre = get_str(meta, "tokenizer.ggml.pre").unwrap_or("default");
    let (normalize_nfc, pre_tokenizer) = pre_tokenizer_for(pre).map_err(invalid)?;

    let mut tk = Tokenizer::new(bpe);
    if normalize_nfc {
        tk.with_normalizer(Some(NFC)).map_err(|e| invalid(format!("cannot set the NFC normalizer: {e}")))?;
    }
    tk.with_pre_tokenizer(Some(pre_tokenizer));
    tk.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens (e.g. <|im_start|>) are special: matched whole in input text and dropped by
    // decode(skip_special_tokens = true). User-defined ones (e.g. <tool_call>) are matched whole
    // but kept when decoding, as in the official tokenizer.json files.
    let special: Vec<AddedToken> = (0..tokens.len())
        .filter(|&i| token_type(i) == TOKEN_TYPE_CONTROL)
        .map(|i| AddedToken::from(tokens[i].clone(), true).normalized(false))
        .collect();
    let user: Vec<AddedToken> = (0..tokens.len())
        .filter(|&i| token_type(i) == TOKEN_TYPE_USER_DEFINED)
        .map(|i| AddedToken::from(tokens[i].clone(), false).normalized(false))
        .collect();
    tk.add_special_tokens(special).map_err(|e| invalid(format!("cannot add special tokens: {e}")))?;
    tk.add_tokens(user).map_err(|e| invalid(format!("cannot add user-defined tokens: {e}")))?;

    let add_bos = get_bool(meta, "tokenizer.ggml.add_bos_token").unwrap_or(false);
    let bos = get_u32(meta, "tokenizer.ggml.bos_token_id").and_then(|id| tokens.get(id as usize).map(|t| (t, id)));
    match (add_bos, bos) {
        (true, Some((bos_text, bos_id))) => {
            let processor = TemplateProcessing::builder()
                .try_single(format!("{bos_text} $A"))
                .and_then(|b| b.try_pair(format!("{bos_text} $A {bos_text} $B:1")))
                .map_err(|e| invalid(format!("cannot build the BOS template: {e}")))?
                .special_tokens(vec![(bos_text.clone(), bos_id)])
                .build()
                .map_err(|e| invalid(format!("cannot build the BOS template: {e}")))?;
            tk.with_post_processor(Some(processor));
        }
        _ => {
            tk.with_post_processor(Some(ByteLevel::new(false, false, false)));
        }
    }
    Ok(tk)
}

/// Maps llama.cpp's `tokenizer.ggml.pre` name to the Hugging Face pre-tokenizer that produced the
/// vocabulary (see llama.cpp `llama-vocab.cpp`, `regex_exprs` per `LLAMA_VOCAB_PRE_TYPE_*`).
/// Returns (apply NFC normalisation, pre-tokenizer).
fn pre_tokenizer_for(pre: &str) -> Result<(bool, PreTokenizerWrapper), String> {
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| format!("bad split regex: {e}"))?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    match pre {
        // Qwen2's tokenizer.json normalises to NFC before splitting.
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Ok((true, split_then_bytes(QWEN2_SPLIT)?)),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => {
            Ok((false, split_then_bytes(LLAMA3_SPLIT)?))
        }
        // StarCoder-family vocabularies (SmolLM2 says "smollm"): each digit on its own, then the
        // GPT-2 regex. In tokenizer.json form: Digits(individual) + ByteLevel(use_regex).
        "smollm" | "starcoder" | "refact" | "codeshell" => Ok((
            false,
            Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        )),
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => Ok((false, ByteLevel::new(false, true, true).into())),
        other => Err(format!(
            "unsupported GGUF pre-tokenizer '{other}' (tokenizer.ggml.pre); supported: qwen2, llama3, smollm, \
             starcoder, gpt2 and their aliases"
        )),
    }
}

/// Token ids that end generation.
///
/// Starts from `tokenizer.ggml.eos_token_id` (and `eot_token_id`). Chat models end an assistant
/// turn with their template's turn terminator, which is not always the declared EOS (a GGUF made
/// from a base model's config says `<|endoftext|>` while the chat template closes turns with
/// `<|im_end|>`), so `<|im_end|>`, `<|eot_id|>` and `<|end|>` are added when the template uses them.
/// `<|endoftext|>` is added whenever it is a control token: it marks the end of a document, and
/// Qwen2.5's own generation_config.json lists it next to `<|im_end|>`.
pub fn eos_token_ids(content: &Content, tokens: &[String], chat_template: Option<&str>) -> Vec<u32> {
    let meta = &content.metadata;
    let types = int_array(meta, "tokenizer.ggml.token_type").unwrap_or_default();
    let mut ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| get_u32(meta, k))
        .filter(|&id| (id as usize) < tokens.len())
        .collect();
    let find = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let template = chat_template.unwrap_or("");
    for terminator in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
        if template.contains(terminator) {
            ids.extend(find(terminator));
        }
    }
    if let Some(id) = find("<|endoftext|>") {
        if types.get(id as usize).copied() == Some(TOKEN_TYPE_CONTROL) {
            ids.push(id);
        }
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

fn get_str<'a>(meta: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    meta.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
}

fn get_bool(meta: &HashMap<String, Value>, key: &str) -> Option<bool> {
    meta.get(key).and_then(|v| v.to_bool().ok())
}

/// Reads an integer of any GGUF integer type as u32 (files differ in the width they use).
fn get_u32(meta: &HashMap<String, Value>, key: &str) -> Option<u32> {
    meta.get(key).and_then(value_as_i64).and_then(|v| u32::try_from(v).ok())
}

fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn string_array(meta: &HashMap<String, Value>, key: &str, name: &str) -> Result<Vec<String>, ModelError> {
    let invalid = |msg: String| ModelError::Invalid(name.to_string(), msg);
    let values = meta
        .get(key)
        .ok_or_else(|| invalid(format!("the GGUF has no tokenizer metadata ({key})")))?
        .to_vec()
        .map_err(|_| invalid(format!("{key} is not an array")))?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| invalid(format!("{key} holds a non-string value"))))
        .collect()
}

fn int_array(meta: &HashMap<String, Value>, key: &str) -> Option<Vec<i64>> {
    meta.get(key)?.to_vec().ok()?.iter().map(value_as_i64).collect()
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onwards.
static BYTES_TO_CHARS: std::sync::LazyLock<[char; 256]> = std::sync::LazyLock::new(|| {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are valid chars");
            next += 1;
            c
        };
    }
    table
});

/// Whether `c` belongs to the byte-level alphabet: the 256 chars of [`BYTES_TO_CHARS`], which
/// all lie below U+0144.
fn is_byte_level_char(c: char) -> bool {
    static MEMBER: std::sync::LazyLock<[bool; 0x144]> = std::sync::LazyLock::new(|| {
        let mut member = [false; 0x144];
        for &c in BYTES_TO_CHARS.iter() {
            member[c as usize] = true;
        }
        member
    });
    MEMBER.get(c as usize).copied().unwrap_or(false)
}
