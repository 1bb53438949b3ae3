"""Recording groups: which windows were cut from one recording, given by the data or found by
detecting windows that share samples, so the protocol never puts one recording in two parts."""

from __future__ import annotations


import numpy as np



_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def overlap_block(T: int) -> int:
    """Length of the sample blocks matched across windows; overlaps of at least this many samples are found."""
    return int(np.clip(T // 8, 4, 16))


def find_overlaps(X: np.ndarray) -> np.ndarray:
    """Pairs of windows that share samples, as rows (a, b, d): window b starts d >= 0 samples after window a
    and a[:, d:] equals b[:, :T-d] bit for bit (d = 0: duplicates). Enough pairs to join every set of
    overlapping windows, not every pair (windows 1 and 3 of a 75 %-overlap stream may be joined through 2
    only). Any offset is found whose overlap holds at least one non-constant block of overlap_block(T)
    samples; hashing every block and sorting the hashes costs O(N T log(N T)), then each proposed alignment
    is checked on the raw values."""
    N, C, T = X.shape
    k = overlap_block(T)
    if N < 2 or T < 2 * k:
        return np.zeros((0, 3), dtype=np.int64)
    words = np.ascontiguousarray(X, dtype=np.float32).view(np.uint32)
    h = np.full((N, T), _FNV_OFFSET, dtype=np.uint64)
    for c in range(C):  # one hash per sample vector (all channels at one time step)
        h = (h ^ words[:, c].astype(np.uint64)) * _FNV_PRIME
    h = _mix64(h)
    P = T - k + 1
    block = np.zeros((N, P), dtype=np.uint64)
    for j in range(k):  # polynomial hash of the k samples starting at each position
        block = block * _FNV_PRIME + h[:, j:j + P]
    # Constant blocks (a sensor at rest, zero padding) recur across unrelated windows: they propose nothing.
    runs = np.concatenate([np.zeros((N, 1), np.int64), np.cumsum(h[:, 1:] == h[:, :-1], axis=1)], axis=1)
    win, pos = np.nonzero((runs[:, k - 1:] - runs[:, :P]) != k - 1)
    keys = block[win, pos]
    order = np.lexsort((pos, win, keys))
    keys, win, pos = keys[order], win[order], pos[order]
    # Consecutive occurrences of one block in two windows propose an alignment: chained rather than all pairs,
    # so a block in m windows costs m - 1 proposals.
    hit = np.flatnonzero((keys[1:] == keys[:-1]) & (win[1:] != win[:-1]))
    a, b, d = win[hit], win[hit + 1], pos[hit] - pos[hit + 1]  # a's sample pos[hit] is b's sample pos[hit + 1]
    first, second = np.where(d >= 0, a, b).astype(np.int64), np.where(d >= 0, b, a).astype(np.int64)
    code = np.unique((first * N + second) * T + np.abs(d))
    cand = np.stack([code // T // N, code // T % N, code % T], axis=1)
    ok = np.zeros(len(cand), dtype=bool)
    for shift in np.unique(cand[:, 2]):
        rows = np.flatnonzero(cand[:, 2] == shift)
        for chunk in np.array_split(rows, len(rows) // 4096 + 1):  # bounded memory for large N
            ok[chunk] = (words[cand[chunk, 0], :, shift:] == words[cand[chunk, 1], :, :T - shift]).all(axis=(1, 2))
    return cand[ok]


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find: component id per item 0..n-1 joined by `pairs` [M, 2], numbered by each component's
    first item (no pairs: 0..n-1)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].reshape(-1).astype(np.int64)


def recording_groups(X: np.ndarray, given: np.ndarray | None) -> tuple[np.ndarray, str, str | None]:
    """Recording id per window (0..G-1), where the grouping came from ("given", "given + detected overlap",
    "detected overlap", "none") and a one-line note. Windows that overlap join one recording even when the
    given ids say otherwise. Overlap detection runs on time series [N, C, T] only."""
    n = len(X)
    overlaps = find_overlaps(X) if X.ndim == 3 else np.zeros((0, 3), dtype=np.int64)
    links = [overlaps[:, :2]]
    if given is not None:
        _, first, inv = np.unique(given, return_index=True, return_inverse=True)
        links.append(np.stack([first[inv.reshape(-1)], np.arange(n)], axis=1))
    groups = _components(n, np.concatenate(links))
    G = int(groups.max()) + 1 if n else 0
    kept_apart = f"{n} windows in {G} recordings; labelled, validation and test windows come from different recordings"
    if given is not None:
        n_given = len(np.unique(given))
        if G < n_given:
            merged = f"recordings: {n_given} given, {n_given - G} merged because their windows overlap"
            return groups, "given + detected overlap", f"{merged} ({kept_apart})"
        return groups, "given", f"recordings given by the data ({kept_apart})"
    if len(overlaps):
        return groups, "detected overlap", f"overlapping windows detected: {len(overlaps)} pairs share samples ({kept_apart})"
    return groups, "none", None
