//! Batches: padding or packing examples into rows, with next-token targets and loss masks.

use super::rng::{SplitMix64, TAG_SHUFFLE};
use super::Example;
use crate::error::{Error, Result};

/// A batch as plain vectors, row-major `[batch_size, seq_len]`; the trainer makes tensors of it.
///
/// In every row, `targets[t] = input_ids[t + 1]` and the last position's target is the pad id.
/// `loss_mask[t]` is 1.0 only where `input_ids[t + 1]` is a completion token of the same
/// example as `input_ids[t]`: prompt tokens, padding and the first token of a packed example
/// carry no loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows in this batch (the last batch of an epoch may have fewer than requested).
    pub batch_size: usize,
    /// Positions per row: the longest row of this batch.
    pub seq_len: usize,
    /// Token ids, right-padded with the pad id.
    pub input_ids: Vec<u32>,
    /// The next token of each position.
    pub targets: Vec<u32>,
    /// 1.0 where the target carries loss, else 0.0.
    pub loss_mask: Vec<f32>,
    /// The number of 1.0 entries in `loss_mask`.
    pub n_loss_tokens: usize,
    /// The number of non-pad positions (the examples' tokens).
    pub n_tokens: usize,
}

/// Builds a batch of rows, each the concatenation of some examples, padded to the longest row.
fn build_batch(rows: &[Vec<&Example>], pad_id: u32) -> Batch {
    let seq_len = rows
        .iter()
        .map(|r| r.iter().map(|e| e.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    let n = rows.len() * seq_len;
    let mut input_ids = vec![pad_id; n];
    let mut targets = vec![pad_id; n];
    let mut loss_mask = vec![0f32; n];
    let (mut n_loss_tokens, mut n_tokens) = (0, 0);
    for (r, row) in rows.iter().enumerate() {
        let base = r * seq_len;
        let mut pos = base;
        for ex in row {
            input_ids[pos..pos + ex.len()].copy_from_slice(&ex.input_ids);
            for t in 0..ex.len().saturating_sub(1) {
                if ex.loss_mask[t + 1] {
                    loss_mask[pos + t] = 1.0;
                    n_loss_tokens += 1;
                }
            }
            pos += ex.len();
            n_tokens += ex.len();
        }
        // Next-token targets over the whole row, boundaries included (masked above).
        if seq_len > 1 {
            let end = base + seq_len;
            targets[base..end - 1].copy_from_slice(&input_ids[base + 1..end]);
        }
    }
    Batch {
        batch_size: rows.len(),
        seq_len,
        input_ids,
        targets,
        loss_mask,
        n_loss_tokens,
        n_tokens,
    }
}

/// Serves training batches forever. Epoch `e` visits every example once, in an order shuffled
/// by `(seed, e)`, so two batchers with the same arguments serve the same batches. Without
/// packing, each row is one example and a batch is padded (right, with `pad_id`, no loss) to
/// its longest row; with packing, consecutive examples of the shuffled order fill rows of at
/// most `seq_len` tokens and no loss crosses from one example into the next. The last batch
/// of an epoch holds the rows left over and may be smaller than `batch_size`.
#[derive(Debug, Clone)]
pub struct Batcher {
    examples: Vec<Example>,
    batch_size: usize,
    seq_len: usize,
    packing: bool,
    pad_id: u32,
    seed: u64,
    /// The epoch of the rows in `rows`.
    epoch: usize,
    /// The current epoch's rows, as example indices.
    rows: Vec<Vec<usize>>,
    /// The next row of `rows` to serve.
    cursor: usize,
}

impl Batcher {
    /// A batcher over `examples`. Errors when there are no examples, `batch_size` is 0, or an
    /// example is empty, has a mask of another length, or is longer than `seq_len`.
    pub fn new(
        examples: Vec<Example>,
        batch_size: usize,
        seq_len: usize,
        packing: bool,
        pad_id: u32,
        seed: u64,
    ) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::config("data", "no training examples to batch"));
        }
        if batch_size == 0 {
            return Err(Error::config("batch_size", "expected at least 1, found 0"));
        }
        for (i, e) in examples.iter().enumerate() {
            if e.is_empty() || e.loss_mask.len() != e.len() {
                return Err(Error::config(
                    "data",
                    format!(
                        "example {i}: expected as many mask flags as ids (at least 1), found {} \
                         ids and {} flags",
                        e.len(),
                        e.loss_mask.len()
                    ),
                ));
            }
            if e.len() > seq_len {
                return Err(Error::config(
                    "data.max_seq_len",
                    format!(
                        "example {i} has {} tokens, more than seq_len {seq_len}",
                        e.len()
                    ),
                ));
            }
        }
        let mut b = Batcher {
            examples,
            batch_size,
            seq_len,
            packing,
            pad_id,
            seed,
            epoch: 0,
            rows: Vec::new(),
            cursor: 0,
        };
        b.rows = b.epoch_rows(0);
        Ok(b)
    }

    /// The epoch (0-based) of the last batch served; 0 before the first.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// The number of examples.
    pub fn n_examples(&self) -> usize {
        self.examples.len()
    }

    /// The number of batches in epoch [`Batcher::epoch`]. Without packing it is the same for
    /// every epoch; with packing it depends on how the shuffled examples fill rows.
    pub fn batches_in_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.batch_size)
    }

    /// The example indices of each row of epoch `e`.
    fn epoch_rows(&self, e: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        SplitMix64::new(self.seed, TAG_SHUFFLE, e as u64).shuffle(&mut order);
        if !self.packing {
            return order.into_iter().map(|i| vec![i]).collect();
        }
        let mut rows = Vec::new();
        let mut row: Vec<usize> = Vec::new();
        let mut len = 0;
        for i in order {
            let n = self.examples[i].len();
            if len + n > self.seq_len && !row.is_empty() {
                rows.push(std::mem::take(&mut row));
                len = 0;
            }
            row.push(i);
            len += n;
        }
        if !row.is_empty() {
            rows.push(row);
        }
        rows
    }

    /// The next batch, starting the next epoch when this one is used up.
    pub fn next_batch(&mut self) -> Batch {
        if self.cursor >= self.rows.len() {
            self.epoch += 1;
            self.rows = self.epoch_rows(self.epoch);
            self.cursor = 0;
        }
        let cursor = self.cursor;
        let end = (cursor + self.batch_size).min(self.rows.len());
        self.cursor = end;
        let rows: Vec<Vec<&Example>> = self.rows[cursor..end]
            .iter()
            .map(|r| r.iter().map(|&i| &self.examples[i]).collect())
            .collect();
        build_batch(&rows, self.pad_id)
    }
}

/// Evaluation batches: every example once, in order, one example per row, each batch padded
/// to its longest row. The last batch may be smaller. A `batch_size` of 0 is read as 1.
pub fn eval_batches(examples: &[Example], batch_size: usize, pad_id: u32) -> Vec<Batch> {
    examples
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let rows: Vec<Vec<&Example>> = chunk.iter().map(|e| vec![e]).collect();
            build_batch(&rows, pad_id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: u32 = 0;

    /// An example of `n` tokens `base, base+1, …` whose last `completion` tokens carry loss.
    fn ex(base: u32, n: usize, completion: usize) -> Example {
        Example {
            input_ids: (0..n as u32).map(|i| base + i).collect(),
            loss_mask: (0..n).map(|i| i >= n - completion).collect(),
        }
    }

    /// Checks the invariants of every row: targets are the next inputs, the last target is
    /// padding, and the mask is 1 exactly where the next token is a completion token of the
    /// same example. Examples are recognised by their ids (`ex` bases are distinct hundreds).
    fn check_invariants(b: &Batch, examples: &[Example]) {
        assert_eq!(b.input_ids.len(), b.batch_size * b.seq_len);
        let mut loss = 0;
        for r in 0..b.batch_size {
            let row = &b.input_ids[r * b.seq_len..(r + 1) * b.seq_len];
            for t in 0..b.seq_len {
                let i = r * b.seq_len + t;
                let next = if t + 1 < b.seq_len { row[t + 1] } else { PAD };
                assert_eq!(b.targets[i], next);
                let same_example = row[t] != PAD && next != PAD && row[t] / 100 == next / 100;
                let is_completion = same_example
                    && examples.iter().any(|e| {
                        e.input_ids
                            .iter()
                            .zip(&e.loss_mask)
                            .any(|(&id, &m)| id == next && m)
                    });
                assert_eq!(
                    b.loss_mask[i],
                    if is_completion { 1.0 } else { 0.0 },
                    "row {r} t {t}"
                );
                loss += is_completion as usize;
            }
        }
        assert_eq!(b.n_loss_tokens, loss);
    }

    #[test]
    fn padding_hand_checked() {
        let examples = vec![ex(100, 3, 1), ex(200, 5, 2)];
        let batches = eval_batches(&examples, 2, PAD);
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(
            (b.batch_size, b.seq_len, b.n_tokens, b.n_loss_tokens),
            (2, 5, 8, 3)
        );
        assert_eq!(
            b.input_ids,
            vec![100, 101, 102, 0, 0, 200, 201, 202, 203, 204]
        );
        assert_eq!(b.targets, vec![101, 102, 0, 0, 0, 201, 202, 203, 204, 0]);
        assert_eq!(b.loss_mask, vec![0., 1., 0., 0., 0., 0., 0., 1., 1., 0.]);
        check_invariants(b, &examples);
    }

    #[test]
    fn eval_batches_keep_order_and_cover_everything_once() {
        let examples: Vec<Example> = (1..=7)
            .map(|i| ex(i * 100, 1 + i as usize % 3, 1))
            .collect();
        let batches = eval_batches(&examples, 3, PAD);
        assert_eq!(
            batches.iter().map(|b| b.batch_size).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let firsts: Vec<u32> = batches
            .iter()
            .flat_map(|b| (0..b.batch_size).map(move |r| b.input_ids[r * b.seq_len]))
            .collect();
        assert_eq!(firsts, vec![100, 200, 300, 400, 500, 600, 700]);
        for b in &batches {
            check_invariants(b, &examples);
        }
    }

    #[test]
    fn packing_masks_the_boundary_between_examples() {
        let examples = vec![ex(100, 3, 1), ex(200, 4, 2)];
        let mut batcher = Batcher::new(examples.clone(), 1, 8, true, PAD, 0).unwrap();
        let b = batcher.next_batch();
        assert_eq!(
            (b.batch_size, b.seq_len, b.n_tokens),
            (1, 7, 7),
            "both in one row"
        );
        check_invariants(&b, &examples);
        let (first, second) = if b.input_ids[0] == 100 {
            (3, 4)
        } else {
            (4, 3)
        };
        let boundary = first - 1;
        // The last token of the first example is followed by the second's first token, which
        // is its target but carries no loss.
        assert_eq!(b.targets[boundary], b.input_ids[first]);
        assert_eq!(b.loss_mask[boundary], 0.0);
        assert_eq!(b.n_loss_tokens, 3);
        assert_eq!(first + second, 7);
        // A completion token right at the start of the next example would still carry none.
        let starts_with_completion = vec![
            ex(100, 2, 1),
            Example {
                input_ids: vec![200, 201],
                loss_mask: vec![true, true],
            },
        ];
        let mut batcher = Batcher::new(starts_with_completion.clone(), 1, 4, true, PAD, 3).unwrap();
        let b = batcher.next_batch();
        assert_eq!((b.seq_len, b.n_loss_tokens), (4, 2));
        assert_eq!(b.loss_mask[1], 0.0);
    }

    #[test]
    fn packing_fills_rows_up_to_seq_len() {
        let examples: Vec<Example> = (1..=20)
            .map(|i| ex(i * 100, 2 + i as usize % 5, 2))
            .collect();
        let total: usize = examples.iter().map(Example::len).sum();
        let mut batcher = Batcher::new(examples.clone(), 2, 10, true, PAD, 5).unwrap();
        let n = batcher.batches_in_epoch();
        let mut seen = 0;
        for _ in 0..n {
            let b = batcher.next_batch();
            assert!(b.seq_len <= 10);
            check_invariants(&b, &examples);
            seen += b.n_tokens;
        }
        assert_eq!(seen, total, "every token once per epoch");
        assert_eq!(batcher.epoch(), 0);
        batcher.next_batch();
        assert_eq!(batcher.epoch(), 1);
    }

    /// The first ids of the rows of the next epoch's batches.
    fn epoch_order(b: &mut Batcher) -> Vec<u32> {
        let mut order = Vec::new();
        let mut batch = b.next_batch();
        let e = b.epoch();
        for k in 0..b.batches_in_epoch() {
            if k > 0 {
                batch = b.next_batch();
            }
            assert_eq!(b.epoch(), e);
            for r in 0..batch.batch_size {
                order.push(batch.input_ids[r * batch.seq_len]);
            }
        }
        order
    }

    #[test]
    fn shuffling_is_deterministic_by_seed_and_epoch() {
        let examples: Vec<Example> = (1..=50).map(|i| ex(i * 100, 3, 1)).collect();
        let mk = |seed| Batcher::new(examples.clone(), 4, 8, false, PAD, seed).unwrap();
        let (mut a, mut b, mut c) = (mk(1), mk(1), mk(2));
        let a0 = epoch_order(&mut a);
        assert_eq!(a0, epoch_order(&mut b), "same seed, same order");
        assert_ne!(a0, epoch_order(&mut c), "another seed, another order");
        let mut sorted = a0.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (1..=50).map(|i| i * 100).collect::<Vec<_>>(),
            "each example once"
        );
        assert_ne!(a0, sorted, "shuffled");
        let a1 = epoch_order(&mut a);
        assert_eq!(a.epoch(), 1);
        assert_ne!(a0, a1, "each epoch its own order");
        assert_eq!(a1, epoch_order(&mut b));
        assert_eq!(
            a.batches_in_epoch(),
            13,
            "50 rows in batches of 4, the last one of 2"
        );
    }

    #[test]
    fn batches_pad_to_their_longest_row() {
        let examples = vec![ex(100, 2, 1), ex(200, 6, 1)];
        let mut b = Batcher::new(examples.clone(), 1, 8, false, 9, 0).unwrap();
        let lens: Vec<usize> = (0..2).map(|_| b.next_batch().seq_len).collect();
        let mut sorted = lens.clone();
        sorted.sort();
        assert_eq!(sorted, vec![2, 6]);
        let both = Batcher::new(examples, 2, 8, false, 9, 0)
            .unwrap()
            .next_batch();
        assert_eq!(both.seq_len, 6);
        assert_eq!(
            both.input_ids.iter().filter(|&&i| i == 9).count(),
            4,
            "pad id used"
        );
        assert_eq!(both.n_tokens, 8);
    }

    #[test]
    fn new_rejects_bad_input() {
        let err = |r: Result<Batcher>| r.unwrap_err().to_string();
        assert_eq!(
            err(Batcher::new(vec![], 1, 8, false, 0, 0)),
            "config key `data`: no training examples to batch"
        );
        assert_eq!(
            err(Batcher::new(vec![ex(100, 2, 1)], 0, 8, false, 0, 0)),
            "config key `batch_size`: expected at least 1, found 0"
        );
        assert_eq!(
            err(Batcher::new(vec![ex(100, 9, 1)], 1, 8, false, 0, 0)),
            "config key `data.max_seq_len`: example 0 has 9 tokens, more than seq_len 8"
        );
        let bad = Example {
            input_ids: vec![1, 2],
            loss_mask: vec![true],
        };
        assert!(err(Batcher::new(vec![bad], 1, 8, false, 0, 0)).contains("found 2 ids and 1 flags"));
    }
}
