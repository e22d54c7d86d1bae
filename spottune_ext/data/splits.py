"""Fixed-seed stratified splits: every class is split with the same fractions, so the class balance
of train, validation and test matches the whole pool's."""
import numpy as np


def stratified_split(targets, fractions, seed):
    """Split sample indices by class into len(fractions) + 1 disjoint index arrays, each in a fixed-seed
    shuffled order (so that no split stays sorted by class, as some data sets are stored).

    targets: int labels [N]. fractions: one fraction per part after the first (the first part keeps the
    rest), e.g. (0.1, 0.2) -> (train, val, test). Each class is shuffled with `seed`; a class gives each
    later part round(n * fraction) samples, at least one when it has enough samples for every part to
    get one, and the first part always keeps at least one.
    """
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError(f"stratified_split: targets must be 1-D, got shape {targets.shape}")
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"stratified_split: fractions must be >= 0 and sum to < 1, got {tuple(fractions)}")
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        n = len(idx)
        counts = [int(round(n * f)) for f in fractions]
        if n > len(fractions):
            counts = [max(c, 1) if f > 0 else c for c, f in zip(counts, fractions)]
        # The first part (train) keeps at least one sample of every class.
        while sum(counts) > n - 1 and any(counts):
            counts[int(np.argmax(counts))] -= 1
        start = n - sum(counts)
        parts[0].append(idx[:start])
        for part, count in zip(parts[1:], counts):
            part.append(idx[start:start + count])
            start += count
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
                 for p in parts)


def cap_per_class(targets, indices, max_per_class, seed):
    """At most `max_per_class` of `indices` per class, chosen with `seed`, in their original order."""
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    targets = np.asarray(targets)
    indices = np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(indices[targets[indices] == cls])[:max_per_class]
            for cls in np.unique(targets[indices])]
    return indices[np.isin(indices, np.concatenate(kept))] if kept else indices
