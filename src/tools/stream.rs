//! The tool-call parser as a state machine over generated text: pieces in (one per token), content
//! and calls out, for streamed answers and (in one piece) whole ones.
//!
//! Hermes: text outside `<tool_call>` blocks is emitted at once, except a tail that could be the
//! start of the marker (held back until the next piece decides it). A block is held until its
//! closing tag (or the end of the answer), then emitted as a call, its arguments in the pieces
//! the model generated them in, as OpenAI streams them; a block that is not a call is emitted as
//! the content it was. Llama 3 JSON and Mistral answers are calls from their first character
//! or not at all: an answer that starts like one is held to its end, everything else streams as
//! content.
use std::ops::Range;

use serde_json::value::RawValue;

use super::{call_of, new_call_id, ToolFormat, ToolParsing};


const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const TOOL_CALLS: &str = "[TOOL_CALLS]";

/// What the parser emits, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Content(String),
    /// A call begins: its index among this answer's calls, id and function name.
    CallStart { index: usize, id: String, name: String },
    /// A piece of the call's arguments (JSON text).
    CallArguments { index: usize, text: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Hermes: outside a block. JSON formats: nothing but whitespace seen yet.
    Text,
    /// Hermes: inside a block.
    InCall,
    /// JSON formats: the answer looks like calls; held to its end.
    Whole,
    /// JSON formats: the answer is content.
    Plain,
}

/// One answer's parser.
#[derive(Debug)]
pub struct ToolStream {
    spec: ToolParsing,
    mode: Mode,
    /// Text not yet emitted (Hermes outside a block: a possible marker start; else the held
    /// block or answer).
    held: String,
    /// Offsets in `held` where each piece began (for splitting arguments like the model did).
    bounds: Vec<usize>,
    calls: usize,
    /// Something other than whitespace has been seen.
    started: bool,
}

impl ToolStream {
    pub fn new(spec: ToolParsing) -> Self {
        Self { spec, mode: Mode::Text, held: String::new(), bounds: Vec::new(), calls: 0, started: false }
    }

    /// How many calls have been emitted.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds one piece of generated text.
    pub fn push(&mut self, piece: &str) -> Vec<Out> {
        let mut out = Vec::new();
        if piece.is_empty() {
            return out;
        }
        match self.spec.format {
            ToolFormat::Hermes => {
                self.bounds.push(self.held.len());
                self.held.push_str(piece);
                if self.mode == Mode::Text && !self.started {
                    let t = self.held.trim_start();
                    if t.is_empty() {
                        return out;
                    }
                    self.started = true;
                    // Small models (Qwen2.5 0.5B) often write the call object without its tags:
                    // an answer that starts with `{` is held to its end and parsed whole.
                    if t.starts_with('{') {
                        self.mode = Mode::Whole;
                    }
                }
                if self.mode != Mode::Whole {
                    self.hermes(&mut out);
                }
            }
            ToolFormat::Llama3Json | ToolFormat::Mistral => {
                if self.mode == Mode::Plain {
                    out.push(Out::Content(piece.to_string()));
                    return out;
                }
                self.bounds.push(self.held.len());
                self.held.push_str(piece);
                if self.mode == Mode::Text {
                    let start = self.held.trim_start();
                    if !start.is_empty() {
                        let opens = match self.spec.format {
                            ToolFormat::Mistral => [TOOL_CALLS, "["],
                            _ => [PYTHON_TAG, "{"],
                        };
                        // Undecided while what is there is a prefix of a marker.
                        if opens.iter().any(|m| start.starts_with(m)) {
                            self.mode = Mode::Whole;
                        } else if !opens.iter().any(|m| m.starts_with(start)) {
                            self.mode = Mode::Plain;
                            out.push(Out::Content(std::mem::take(&mut self.held)));
                            self.bounds.clear();
                        }
                    }
                }
            }
        }
        out
    }

    /// The answer ended: flushes what is held.
    pub fn finish(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        let bounds = std::mem::take(&mut self.bounds);
        match (self.spec.format, self.mode) {
            (ToolFormat::Hermes, Mode::InCall) => self.block(&held, &bounds, false, &mut out),
            (ToolFormat::Hermes, Mode::Whole) => match json_calls(&held, &self.spec.names, &["arguments", "parameters"]) {
                Some(calls) => self.emit_calls(&held, &bounds, calls, &mut out),
                None => {
                    // Not bare calls: parse it as any other answer.
                    self.mode = Mode::Text;
                    self.held = held;
                    self.bounds = bounds;
                    self.hermes(&mut out);
                    out.extend(self.finish());
                    return out;
                }
            },
            (ToolFormat::Llama3Json | ToolFormat::Mistral, Mode::Whole) => self.whole(&held, &bounds, &mut out),
            _ if !held.is_empty() => out.push(Out::Content(held)),
            _ => {}
        }
        self.mode = Mode::Text;
        out
    }

    fn hermes(&mut self, out: &mut Vec<Out>) {
        loop {
            match self.mode {
                Mode::InCall => {
                    let Some(end) = self.held.find(CLOSE) else { return };
                    let rest = self.held.split_off(end + CLOSE.len());
                    let block = std::mem::replace(&mut self.held, rest);
                    let inner = &block[..end];
                    let bounds: Vec<usize> = self.bounds.iter().copied().filter(|&b| b < end).collect();
                    self.block(inner, &bounds, true, out);
                    // Offsets of the pieces that reach past the block, in what remains.
                    let cut = end + CLOSE.len();
                    self.bounds = std::iter::once(0).chain(self.bounds.iter().filter(|&&b| b > cut).map(|b| b - cut)).collect();
                    self.mode = Mode::Text;
                }
                _ => {
                    if let Some(at) = self.held.find(OPEN) {
                        if at > 0 {
                            out.push(Out::Content(self.held[..at].to_string()));
                        }
                        let cut = at + OPEN.len();
                        self.held = self.held.split_off(cut);
                        self.bounds = std::iter::once(0).chain(self.bounds.iter().filter(|&&b| b > cut).map(|b| b - cut)).collect();
                        self.mode = Mode::InCall;
                        continue;
                    }
                    // Emit all but a tail that could begin the marker.
                    let keep = (1..OPEN.len().min(self.held.len() + 1))
                        .rev()
                        .find(|&k| self.held.is_char_boundary(self.held.len() - k) && OPEN.starts_with(&self.held[self.held.len() - k..]))
                        .unwrap_or(0);
                    let emit = self.held.len() - keep;
                    if emit > 0 {
                        out.push(Out::Content(self.held[..emit].to_string()));
                        self.held = self.held.split_off(emit);
                    }
                    self.bounds = vec![0];
                    return;
                }
            }
        }
    }

    /// A Hermes block's inner text: a call, or the content it was.
    fn block(&mut self, inner: &str, bounds: &[usize], closed: bool, out: &mut Vec<Out>) {
        match CallText::of(inner, &self.spec.names, &["arguments", "parameters"]) {
            Some(call) => self.emit_call(inner, call, bounds, out),
            None => out.push(Out::Content(format!("{OPEN}{inner}{}", if closed { CLOSE } else { "" }))),
        }
    }

    /// A Llama 3 / Mistral answer held whole: all calls, or all content.
    fn whole(&mut self, text: &str, bounds: &[usize], out: &mut Vec<Out>) {
        let calls = match self.spec.format {
            ToolFormat::Mistral => mistral_calls(text, &self.spec.names),
            _ => json_calls(text, &self.spec.names, &["parameters", "arguments"]),
        };
        match calls {
            Some(calls) => self.emit_calls(text, bounds, calls, out),
            None => out.push(Out::Content(text.to_string())),
        }
    }

    fn emit_calls(&mut self, text: &str, bounds: &[usize], calls: Vec<(Range<usize>, CallText)>, out: &mut Vec<Out>) {
        for (range, call) in calls {
            let bounds: Vec<usize> = bounds.iter().filter(|b| range.contains(b)).map(|b| b - range.start).collect();
            self.emit_call(&text[range], call, &bounds, out);
        }
    }

    /// Emits one call found in `obj` (`bounds`: piece starts within `obj`).
    fn emit_call(&mut self, obj: &str, call: CallText, bounds: &[usize], out: &mut Vec<Out>) {
        let index = self.calls;
        self.calls += 1;
        out.push(Out::CallStart { index, id: new_call_id(), name: call.name });
        match call.range {
            // Split the arguments where the model's pieces began.
            Some(r) => {
                let mut at = r.start;
                for &b in bounds.iter().filter(|&&b| b > r.start && b < r.end) {
                    out.push(Out::CallArguments { index, text: obj[at..b].to_string() });
                    at = b;
                }
                out.push(Out::CallArguments { index, text: obj[at..r.end].to_string() });
            }
            None => out.push(Out::CallArguments { index, text: call.arguments }),
        }
    }
}

/// A call found in some text: its name, its arguments' JSON text, and where that text lies in the
/// object's text when it is there verbatim.
pub(crate) struct CallText {
    pub name: String,
    pub arguments: String,
    pub range: Option<Range<usize>>,
}

impl CallText {
    pub(crate) fn of(obj: &str, names: &[String], keys: &[&str]) -> Option<Self> {
        let (name, arguments) = call_of(obj, names, keys)?;
        let range = locate(obj, &arguments);
        Some(Self { name, arguments, range })
    }
}

/// Where `args` (a sub-slice's text) lies in `obj`: the last occurrence, since arguments follow
/// the name in every format these parsers accept and the outer object starts earlier.
fn locate(obj: &str, args: &str) -> Option<Range<usize>> {
    obj.rfind(args).map(|s| s..s + args.len())
}

/// `<|python_tag|>`? then JSON objects separated by whitespace or `;`, each a call (arguments
/// under the first of `keys` present).
fn json_calls(text: &str, names: &[String], keys: &[&str]) -> Option<Vec<(Range<usize>, CallText)>> {
    let mut at = text.len() - text.trim_start().len();
    if text[at..].starts_with(PYTHON_TAG) {
        at += PYTHON_TAG.len();
    }
    let mut calls = Vec::new();
    loop {
        at += text[at..].len() - text[at..].trim_start_matches(|c: char| c.is_whitespace() || c == ';').len();
        if at >= text.len() {
            break;
        }
        let mut values = serde_json::Deserializer::from_str(&text[at..]).into_iter::<&RawValue>();
        values.next()?.ok()?;
        let end = at + values.byte_offset();
        let obj = &text[at..end];
        calls.push((at..end, CallText::of(obj, names, keys)?));
        at = end;
    }
    (!calls.is_empty()).then_some(calls)
}

/// `[TOOL_CALLS]`? then one JSON array of calls.
fn mistral_calls(text: &str, names: &[String]) -> Option<Vec<(Range<usize>, CallText)>> {
    let body = text.trim();
    let body = body.strip_prefix(TOOL_CALLS).unwrap_or(body).trim_start();
    let items: Vec<&RawValue> = serde_json::from_str(body).ok()?;
    let base = body.as_ptr() as usize - text.as_ptr() as usize;
    let mut calls = Vec::with_capacity(items.len());
    for raw in items {
        let start = raw.get().as_ptr() as usize - body.as_ptr() as usize + base;
        let range = start..start + raw.get().len();
        calls.push((range, CallText::of(raw.get(), names, &["arguments", "parameters"])?));
    }
    (!calls.is_empty()).then_some(calls)
}
