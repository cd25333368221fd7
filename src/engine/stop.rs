//! Stop strings matched on the detokenised text, across token boundaries.
//!
//! Text that could still turn into a stop string is held back and released once it cannot; the
//! stop string itself (and anything after it) is never emitted. When generation ends for another
//! reason, `finish` flushes whatever was held back.

/// Per-sequence stop-string state.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
    /// Bytes of stop strings the searches so far set up or compared (each `find` costs its
    /// needle's length, each prefix check the bytes it compares): what a token's matching costs,
    /// counted rather than timed, for the tests.
    work: u64,
}

/// The result of feeding text to a `StopMatcher`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutput {
    /// Text safe to emit now.
    pub text: String,
    /// A stop string was found; nothing more may be emitted.
    pub stopped: bool,
}

impl StopMatcher {
    /// Builds a matcher; empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new(), stopped: false, work: 0 }
    }

    /// Bytes of stop strings searched for or compared since the matcher was made.
    pub fn work(&self) -> u64 {
        self.work
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds newly detokenised text; returns what may be emitted now.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped {
            return StopOutput { text: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StopOutput { text: text.to_owned(), stopped: false };
        }
        self.held.push_str(text);
        // Earliest occurrence of any stop string wins. A stop longer than the held text cannot
        // occur in it: skipping it keeps a token's cost independent of the stops' length (a
        // search sets itself up in time linear in the needle, so four 1 MB stops cost 60 ms a
        // token, every token, on the worker thread all sequences share).
        let held = self.held.len();
        let searched = self.stops.iter().filter(|s| s.len() <= held);
        self.work += searched.clone().map(|s| s.len() as u64).sum::<u64>();
        let first = searched.filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(pos) = first {
            let out = self.held[..pos].to_owned();
            self.held.clear();
            self.stopped = true;
            return StopOutput { text: out, stopped: true };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut compared = 0u64;
        let hold_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| {
                    compared += tail.len() as u64;
                    s.len() > tail.len() && s.starts_with(tail)
                })
            })
            .unwrap_or(self.held.len());
        self.work += compared;
        let out = self.held[..hold_from].to_owned();
        self.held.drain(..hold_from);
        StopOutput { text: out, stopped: false }
    }

    /// Ends generation for a reason other than a stop string: releases the held-back text.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// Feeds pieces; returns the emitted text and whether it stopped (after flushing at the end).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut sm = m(stops);
        let mut out = String::new();
        for p in pieces {
            let o = sm.push(p);
            out.push_str(&o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&sm.finish());
        (out, false)
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_spanning_three_tokens() {
        let mut sm = m(&["END"]);
        assert_eq!(sm.push("hello E").text, "hello ");
        assert_eq!(sm.push("N").text, "");
        let o = sm.push("Dx");
        assert_eq!(o, StopOutput { text: String::new(), stopped: true });
        assert_eq!(sm.finish(), "");
    }

    #[test]
    fn overlapping_stops_earliest_wins() {
        assert_eq!(run(&["ab", "b"], &["x", "a", "b"]), ("x".into(), true));
        assert_eq!(run(&["b", "ab"], &["xab"]), ("x".into(), true));
        assert_eq!(run(&["abc", "bcd"], &["zab", "cd"]), ("z".into(), true));
    }

    #[test]
    fn stop_at_the_very_start() {
        assert_eq!(run(&["\n"], &["\nhello"]), ("".into(), true));
    }

    #[test]
    fn multibyte_stops() {
        assert_eq!(run(&["世界"], &["你好", "世", "界!"]), ("你好".into(), true));
        let mut sm = m(&["é!"]);
        assert_eq!(sm.push("caf").text, "caf");
        assert_eq!(sm.push("é").text, "");
        assert_eq!(sm.push("?").text, "é?");
        assert_eq!(run(&["🙂"], &["a🙂b"]), ("a".into(), true));
    }

    #[test]
    fn stop_longer_than_text_is_flushed_at_end() {
        assert_eq!(run(&["a very long stop"], &["a ve", "ry"]), ("a very".into(), false));
    }

    #[test]
    fn partial_match_released_when_broken() {
        let mut sm = m(&["<|end|>"]);
        assert_eq!(sm.push("x <|en").text, "x ");
        assert_eq!(sm.push("try").text, "<|entry");
        assert!(!sm.is_stopped());
    }

    #[test]
    fn huge_stops_cost_nothing_per_token() {
        // Four stops of 1 MB (what a 4 MiB body allows): when every token searched for every
        // stop, 2,000 tokens of text cost 2,000 x 4 MiB of search set-up (> 8 s). Now a token's
        // matching touches only the few bytes held back.
        let stops: Vec<String> = ["x", "y", "z", "w"].iter().map(|c| c.repeat(1 << 20)).collect();
        let mut sm = StopMatcher::new(&stops);
        let mut out = String::new();
        let mut worst = 0u64;
        for i in 0..2000 {
            let before = sm.work();
            out.push_str(&sm.push(if i % 2 == 0 { "ab" } else { "x" }).text);
            worst = worst.max(sm.work() - before);
        }
        out.push_str(&sm.finish());
        assert_eq!(out.len(), 3000);
        assert!(worst <= 64, "one token's matching compared {worst} bytes of the 1 MB stops");
        // The same text against four one-byte stops that never match costs as much.
        let mut small = StopMatcher::new(&["q".into(), "r".into(), "s".into(), "t".into()]);
        for i in 0..2000 {
            small.push(if i % 2 == 0 { "ab" } else { "x" });
        }
        assert!(sm.work() <= 2 * small.work() + 2000, "1 MB stops: {} bytes, one-byte stops: {}", sm.work(), small.work());
        // The long stops still match once the text holds one.
        let mut sm = StopMatcher::new(&["ab".repeat(1000)]);
        let mut out = String::new();
        for _ in 0..1000 {
            out.push_str(&sm.push("ab").text);
        }
        assert!(sm.push("c").stopped && out.is_empty());
    }

    #[test]
    fn held_prefix_that_restarts_is_kept() {
        // "aab" with stop "ab": the first 'a' can be released once the second arrives.
        let mut sm = m(&["ab"]);
        assert_eq!(sm.push("a").text, "");
        assert_eq!(sm.push("a").text, "a");
        assert_eq!(sm.push("b"), StopOutput { text: String::new(), stopped: true });
    }
}
