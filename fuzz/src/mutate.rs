//! Mutations of byte strings: the generic ones (bit flips, byte sets,
//! truncation, erasure, insertion, duplication, splicing two inputs) and
//! two that know the formats: interesting integers written over binary
//! fields or in place of a JSON number, and JSON strings of the seeds (keys,
//! enum tags) in place of another.

/// Integers at the edges of the types and checks the parsers use.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    15,
    16,
    17,
    0x7f,
    0x80,
    0xff,
    0x100,
    4095,
    4096,
    4097,
    0x7fff,
    0xffff,
    0x1_0000,
    1 << 22,
    (1 << 22) + 1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 52,
    0x7fff_ffff_ffff_f000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 4095,
    u64::MAX - 1,
    u64::MAX,
];

/// Numbers as JSON text, including ones no integer type holds.
const INTERESTING_TEXT: &[&str] = &[
    "-1",
    "-2147483649",
    "-9223372036854775808",
    "18446744073709551616",
    "1e400",
    "-0",
    "0.5",
    "1e3",
    "253402300800000",
    "99999999999999999999999999",
];

/// Bytes worth setting: JSON structure, digits, newline, high bytes.
const INTERESTING_BYTES: &[u8] = b"\0\n\"\\{}[],:0129-. \x7f\x80\xff";

/// Generates mutants of a corpus.
pub struct Mutator {
    rng: fastrand::Rng,
    corpus: Vec<Vec<u8>>,
    /// JSON strings found in the corpus, quotes included.
    dictionary: Vec<Vec<u8>>,
    max_len: usize,
}

impl Mutator {
    /// A mutator of `corpus` (not empty), seeded with `seed`, whose mutants
    /// are at most `max_len` bytes.
    pub fn new(seed: u64, corpus: &[Vec<u8>], max_len: usize) -> Self {
        let mut dictionary: Vec<Vec<u8>> = corpus
            .iter()
            .flat_map(|input| json_strings(input))
            .filter(|string| string.len() <= 66)
            .map(<[u8]>::to_vec)
            .collect();
        dictionary.sort();
        dictionary.dedup();
        Self {
            rng: fastrand::Rng::with_seed(seed),
            corpus: corpus.to_vec(),
            dictionary,
            max_len,
        }
    }

    /// A new input: an input of the corpus with 1 to 16 mutations stacked,
    /// fewer being likelier.
    pub fn mutant(&mut self) -> Vec<u8> {
        let mut data = self.corpus[self.rng.usize(..self.corpus.len())].clone();
        let stacked = 1 << self.rng.u32(0..5);
        for _ in 0..self.rng.u32(1..=stacked) {
            self.mutate(&mut data);
        }
        data.truncate(self.max_len);
        data
    }

    fn mutate(&mut self, data: &mut Vec<u8>) {
        let rng = &mut self.rng;
        if data.is_empty() {
            data.push(rng.u8(..));
            return;
        }
        let at = rng.usize(..data.len());
        match rng.u8(0..12) {
            0 => data[at] ^= 1 << rng.u8(0..8),
            1 => data[at] = rng.u8(..),
            2 => data[at] = INTERESTING_BYTES[rng.usize(..INTERESTING_BYTES.len())],
            3 => data.truncate(at),
            4 => {
                let end = (at + 1 + rng.usize(..64)).min(data.len());
                data.drain(at..end);
            }
            5 => {
                let bytes: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(..)).collect();
                data.splice(at..at, bytes);
            }
            6 => {
                let end = (at + 1 + rng.usize(..256)).min(data.len());
                let copy = data[at..end].to_vec();
                let to = rng.usize(..=data.len());
                data.splice(to..to, copy);
            }
            7 => {
                let other = &self.corpus[rng.usize(..self.corpus.len())];
                let from = rng.usize(..=other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            8 => {
                let value = INTERESTING[rng.usize(..INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.usize(..4)];
                let bytes = &value.to_le_bytes()[..width];
                // Aligned, as the binary formats' fields are.
                let at = at - at % width;
                let end = (at + width).min(data.len());
                data[at..end].copy_from_slice(&bytes[..end - at]);
            }
            9 | 10 => self.replace_number(data),
            _ => self.replace_string(data),
        }
    }

    /// Replaces one run of ASCII digits (a JSON number, or a number in the
    /// manifest's header) with an interesting integer or number.
    fn replace_number(&mut self, data: &mut Vec<u8>) {
        let numbers = digit_runs(data);
        if numbers.is_empty() {
            return;
        }
        let (start, end) = numbers[self.rng.usize(..numbers.len())];
        let text = if self.rng.bool() {
            let value = INTERESTING[self.rng.usize(..INTERESTING.len())];
            // Near an edge is as interesting as on it.
            value
                .wrapping_add(self.rng.u64(0..3))
                .wrapping_sub(1)
                .to_string()
        } else {
            INTERESTING_TEXT[self.rng.usize(..INTERESTING_TEXT.len())].to_owned()
        };
        data.splice(start..end, text.into_bytes());
    }

    /// Replaces one JSON string with one from the dictionary.
    fn replace_string(&mut self, data: &mut Vec<u8>) {
        if self.dictionary.is_empty() {
            return;
        }
        let strings: Vec<(usize, usize)> = json_string_spans(data);
        if strings.is_empty() {
            return;
        }
        let (start, end) = strings[self.rng.usize(..strings.len())];
        let word = self.dictionary[self.rng.usize(..self.dictionary.len())].clone();
        data.splice(start..end, word);
    }
}

/// Spans of maximal runs of ASCII digits.
fn digit_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (index, byte) in data.iter().enumerate() {
        match (byte.is_ascii_digit(), start) {
            (true, None) => start = Some(index),
            (false, Some(from)) => {
                runs.push((from, index));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(from) = start {
        runs.push((from, data.len()));
    }
    runs
}

/// Spans of double-quoted strings without escapes, quotes included.
fn json_string_spans(data: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut open = None;
    for (index, &byte) in data.iter().enumerate() {
        match (byte, open) {
            (b'"', None) => open = Some(index),
            (b'"', Some(from)) => {
                spans.push((from, index + 1));
                open = None;
            }
            (b'\\' | b'\n', Some(_)) => open = None,
            _ => {}
        }
    }
    spans
}

fn json_strings(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    json_string_spans(data)
        .into_iter()
        .map(move |(start, end)| &data[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutants() {
        let corpus = vec![br#"{"a": 12, "b": "x"}"#.to_vec()];
        let run = |seed| {
            let mut mutator = Mutator::new(seed, &corpus, 1024);
            (0..100).map(|_| mutator.mutant()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7), "a run replays from its seed");
        assert_ne!(run(7), run(8), "another seed explores other inputs");
    }

    #[test]
    fn numbers_and_strings_are_found_where_json_has_them() {
        let data = br#"{"count": 16, "kind": "file"} 7"#;
        let runs: Vec<&[u8]> = digit_runs(data)
            .into_iter()
            .map(|(s, e)| &data[s..e])
            .collect();
        assert_eq!(runs, [&b"16"[..], b"7"]);
        let strings: Vec<&[u8]> = json_strings(data).collect();
        assert_eq!(strings, [&br#""count""#[..], br#""kind""#, br#""file""#]);
    }

    #[test]
    fn mutants_respect_the_length_limit() {
        let corpus = vec![vec![b'9'; 100]];
        let mut mutator = Mutator::new(1, &corpus, 120);
        assert!((0..1000).all(|_| mutator.mutant().len() <= 120));
    }
}
