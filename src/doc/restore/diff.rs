//! A sequence diff for restores: common prefix and suffix set aside, then Myers' shortest
//! edit script over the middle, as [`Splice`]s. Generic over the items and their equality;
//! bounded by [`MAX_EDIT_DISTANCE`] because it runs while the live document is locked.
//!
//! Owns: the diff algorithm. Must not touch: documents (it compares slices).

use std::ops::Range;

/// Beyond this many inserted plus deleted items, the diff stops looking for a shortest edit
/// and replaces the whole differing middle: the work grows with (length × distance) and runs
/// while the live document is locked.
const MAX_EDIT_DISTANCE: usize = 512;

/// At index `at` of the live sequence, `remove` items are replaced by the target's items
/// `insert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Splice {
    pub(super) at: usize,
    pub(super) remove: usize,
    pub(super) insert: Range<usize>,
}

/// The splices, in increasing order of `at` (indices into the unchanged `live`), that turn
/// `live` into `target`; none when they are equal. The common prefix and suffix are set aside
/// first, then the middle is diffed with Myers' algorithm, so items that did not change are
/// kept even between changes.
pub(super) fn splices<A, B>(
    live: &[A],
    target: &[B],
    same: impl Fn(&A, &B) -> bool,
) -> Vec<Splice> {
    let prefix = live
        .iter()
        .zip(target)
        .take_while(|(a, b)| same(a, b))
        .count();
    // The suffix may not eat into the prefix.
    let room = live.len().min(target.len()) - prefix;
    let suffix = live
        .iter()
        .rev()
        .zip(target.iter().rev())
        .take(room)
        .take_while(|(a, b)| same(a, b))
        .count();
    let live_middle = &live[prefix..live.len() - suffix];
    let target_middle = &target[prefix..target.len() - suffix];
    if live_middle.is_empty() && target_middle.is_empty() {
        return Vec::new();
    }
    let middle = match shortest_edit(live_middle, target_middle, &same) {
        Some(steps) => splices_of(&steps),
        None => vec![Splice {
            at: 0,
            remove: live_middle.len(),
            insert: 0..target_middle.len(),
        }],
    };
    middle
        .into_iter()
        .map(|s| Splice {
            at: s.at + prefix,
            remove: s.remove,
            insert: s.insert.start + prefix..s.insert.end + prefix,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Keep,
    Delete,
    Insert,
}

/// Myers' shortest edit script ("An O(ND) Difference Algorithm", 1986), or `None` when it is
/// longer than [`MAX_EDIT_DISTANCE`].
fn shortest_edit<A, B>(a: &[A], b: &[B], same: &impl Fn(&A, &B) -> bool) -> Option<Vec<Step>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max_d = (a.len() + b.len()).min(MAX_EDIT_DISTANCE) as isize;
    // furthest[k]: the furthest x reached on diagonal k = x - y, for the current d.
    let offset = max_d + 1;
    let at = |k: isize| (k + offset) as usize;
    let mut furthest = vec![0isize; at(offset) + 1];
    // trace[d]: `furthest` over diagonals -d..=d before round d, for the backtrack.
    let mut trace: Vec<Vec<isize>> = Vec::new();
    for d in 0..=max_d {
        trace.push(furthest[at(-d)..=at(d)].to_vec());
        for k in (-d..=d).step_by(2) {
            let down = k == -d || (k != d && furthest[at(k - 1)] < furthest[at(k + 1)]);
            let mut x = if down {
                furthest[at(k + 1)]
            } else {
                furthest[at(k - 1)] + 1
            };
            let mut y = x - k;
            while x < n && y < m && same(&a[x as usize], &b[y as usize]) {
                x += 1;
                y += 1;
            }
            furthest[at(k)] = x;
            if x >= n && y >= m {
                return Some(backtrack(&trace, n, m));
            }
        }
    }
    None
}

/// Walks the trace back from the end: each round d added one insert (a step down) or one
/// delete (a step right) followed by a run of kept items (a diagonal "snake").
fn backtrack(trace: &[Vec<isize>], n: isize, m: isize) -> Vec<Step> {
    let mut steps = Vec::new();
    let (mut x, mut y) = (n, m);
    for (d, furthest) in trace.iter().enumerate().skip(1).rev() {
        let d = d as isize;
        let reached = |k: isize| furthest[(k + d) as usize];
        let k = x - y;
        let down = k == -d || (k != d && reached(k - 1) < reached(k + 1));
        let prev_k = if down { k + 1 } else { k - 1 };
        let prev_x = reached(prev_k);
        let prev_y = prev_x - prev_k;
        let (step_x, step_y) = if down {
            (prev_x, prev_y + 1)
        } else {
            (prev_x + 1, prev_y)
        };
        while x > step_x && y > step_y {
            steps.push(Step::Keep);
            x -= 1;
            y -= 1;
        }
        steps.push(if down { Step::Insert } else { Step::Delete });
        (x, y) = (prev_x, prev_y);
    }
    // Round 0 is a run of kept items from the start.
    steps.extend((0..x).map(|_| Step::Keep));
    steps.reverse();
    steps
}

/// Groups an edit script into splices: a run of deletes and inserts between kept items.
fn splices_of(steps: &[Step]) -> Vec<Splice> {
    let mut splices = Vec::new();
    let mut open: Option<Splice> = None;
    let (mut x, mut y) = (0, 0);
    for step in steps {
        let new_splice = || Splice {
            at: x,
            remove: 0,
            insert: y..y,
        };
        match step {
            Step::Keep => {
                splices.extend(open.take());
                x += 1;
                y += 1;
            }
            Step::Delete => {
                open.get_or_insert_with(new_splice).remove += 1;
                x += 1;
            }
            Step::Insert => {
                open.get_or_insert_with(new_splice).insert.end += 1;
                y += 1;
            }
        }
    }
    splices.extend(open);
    splices
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Applies `splices` (right to left, as the restore does) to `live`.
    fn spliced(live: &[u8], target: &[u8], splices: &[Splice]) -> Vec<u8> {
        let mut result = live.to_vec();
        for s in splices.iter().rev() {
            result.splice(
                s.at..s.at + s.remove,
                target[s.insert.clone()].iter().copied(),
            );
        }
        result
    }

    fn longest_common_subsequence(a: &[u8], b: &[u8]) -> usize {
        let mut row = vec![0; b.len() + 1];
        for x in a {
            let mut diagonal = 0;
            for (j, y) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = if x == y {
                    diagonal + 1
                } else {
                    row[j + 1].max(row[j])
                };
                diagonal = above;
            }
        }
        row[b.len()]
    }

    #[test]
    fn splices_are_a_shortest_edit() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let live: Vec<u8> = (0..rng.gen_range(0..12))
                .map(|_| rng.gen_range(b'a'..b'e'))
                .collect();
            let target: Vec<u8> = (0..rng.gen_range(0..12))
                .map(|_| rng.gen_range(b'a'..b'e'))
                .collect();
            let found = splices(&live, &target, |a, b| a == b);
            assert_eq!(
                spliced(&live, &target, &found),
                target,
                "{live:?} -> {target:?}"
            );
            let edits: usize = found.iter().map(|s| s.remove + s.insert.len()).sum();
            let lcs = longest_common_subsequence(&live, &target);
            assert_eq!(
                edits,
                live.len() + target.len() - 2 * lcs,
                "{live:?} -> {target:?}"
            );
            assert!(found.windows(2).all(|w| w[0].at + w[0].remove < w[1].at));
        }
        assert!(splices(b"same", b"same", |a, b| a == b).is_empty());
    }

    #[test]
    fn long_edits_replace_the_differing_middle() {
        // Over 600 `2`s to insert: beyond MAX_EDIT_DISTANCE. Both start and end with 0, 1.
        let live: Vec<u8> = (0..2000).map(|i| (i % 2) as u8).collect();
        let target: Vec<u8> = (0..2000).map(|i| (i % 3) as u8).collect();
        let found = splices(&live, &target, |a, b| a == b);
        assert_eq!(spliced(&live, &target, &found), target);
        assert_eq!(
            found,
            vec![Splice {
                at: 2,
                remove: 1996,
                insert: 2..1998
            }]
        );
    }
}
