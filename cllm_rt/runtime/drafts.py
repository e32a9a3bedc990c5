"""Draft tokens: what the next tokens of a row probably are, merged into one token tree per step.

Every draft is only a guess: the tree is verified in one forward and only tokens equal to the model's own
greedy predictions are committed, so no source can change the output, only the speed. Sources:

  ``context``  the longest suffix of the row's own tokens (prompt + output so far) that occurred earlier,
               continued — prompt lookup generalised: every recent earlier occurrence (up to
               ``max_matches``) is continued, and the continuations merge into a trie whose counts score
               each branch (as in SuffixDecoding, Oliaro et al. 2024).
  ``corpus``   the same lookup over other sequences: earlier outputs of this process and any texts the
               caller adds (e.g. a target's collected fixed points), bounded, oldest evicted first.
  ``jacobi``   the previous step's greedy predictions past the accepted token, i.e. Jacobi decoding's next
               iterate (recycled from the tree's rejected branch): what a CLLM is trained to make right.
  ``head``     a draft head's guesses (:mod:`cllm_rt.draft_head`, only when one is attached to the model):
               a small block over the target's hidden state at the last accepted node and the token it
               predicts, trained on the target's own greedy tokens, guessing the tokens after that one; one
               chain per first guess, each token with the head's own probability of it.

Scores: a node's score estimates the probability that it is accepted, ``score(parent) * min(1, c * f)``,
where ``f`` is the fraction of the parent's matches that continue with this token (1 for the Jacobi
chain, the head's probability for its guesses) and ``c`` a per-(source, depth) calibration learnt online
from which proposals the model accepted (:class:`AcceptanceStats`). The expected tokens of a tree are then
``1 + sum of its nodes' scores`` (the root's successor is always final), which is what
:mod:`cllm_rt.runtime.cost` trades against time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice

SOURCES = ("jacobi", "context", "corpus", "head")


class NgramIndex:
    """Where every n-gram (n = 1..max_n) of a growing token sequence ends, to continue a suffix quickly.

    Appending a token costs ``max_n`` dictionary updates; a lookup of the current suffix costs at most
    ``max_n`` dictionary reads. (A suffix tree would find arbitrarily long matches; beyond a few tokens a
    longer match rarely changes the continuation, and this stays a dozen lines.)
    """

    def __init__(self, max_n: int = 8):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(1, min(self.max_n, end) + 1):
                self.ends.setdefault(tuple(self.tokens[end - n:end]), []).append(end)

    def continuations(self, suffix: list[int], depth: int, max_matches: int,
                      min_n: int = 1) -> tuple[int, list[list[int]]]:
        """The longest tail of ``suffix`` (``min_n`` tokens at least) that occurs here and ends before this
        sequence's end, as (its length, up to ``max_matches`` continuations of ``depth`` tokens at most, most
        recent occurrence first); (0, []) when there is none."""
        for n in range(min(self.max_n, len(suffix)), min_n - 1, -1):
            ends = self.ends.get(tuple(suffix[len(suffix) - n:]))
            if not ends:
                continue
            # only the max_matches most recent occurrences are sliced, however many there are
            recent = islice((e for e in reversed(ends) if e < len(self.tokens)), max_matches)
            found = [self.tokens[e:e + depth] for e in recent]
            found = [c for c in found if c]
            if found:
                return n, found
        return 0, []


class Corpus:
    """Token sequences other than the row's own, searchable by :class:`NgramIndex`, ``max_tokens`` at most.

    Two generations, each an :class:`NgramIndex` of at most ``max_tokens // 2`` tokens: a new sequence goes
    into the young one, and when that is full the old generation is dropped whole and the young one takes its
    place. Every token is indexed once and eviction re-indexes nothing (dropping the oldest half and
    re-indexing the rest put ~512k tokens through the index on the decode thread); the oldest still go first.
    Sequences are stored back to back with a separator (-1): an n-gram across it holds -1, which no suffix of
    real tokens matches, and continuations are cut there.
    """

    SEPARATOR = -1

    def __init__(self, max_tokens: int = 1 << 20, max_n: int = 8):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (two generations of max_tokens // 2), got {max_tokens}")
        self.max_tokens = max_tokens
        self.generation_tokens = max_tokens // 2
        self.max_n = max_n
        self.young, self.old = NgramIndex(max_n), NgramIndex(max_n)
        self.sizes = [0, 0]  # tokens held by the young and the old generation, separators not counted

    def __len__(self) -> int:
        return sum(self.sizes)

    def add(self, tokens: list[int]) -> None:
        tokens = [int(t) for t in tokens][-self.generation_tokens:]
        if not tokens:
            return
        if self.sizes[0] + len(tokens) > self.generation_tokens:
            self.young, self.old = NgramIndex(self.max_n), self.young
            self.sizes = [0, self.sizes[0]]
        self.young.extend(tokens + [self.SEPARATOR])
        self.sizes[0] += len(tokens)

    def continuations(self, suffix: list[int], depth: int, max_matches: int,
                      min_n: int) -> tuple[int, list[list[int]]]:
        """As :meth:`NgramIndex.continuations` over both generations: the longest match, most recent first."""
        best, found = 0, []
        for index in (self.young, self.old):
            n, more = index.continuations(suffix, depth, max_matches, min_n)
            more = [c[:c.index(self.SEPARATOR)] if self.SEPARATOR in c else c for c in more]
            more = [c for c in more if c]
            if more and n > best:
                best, found = n, more
            elif more and n == best:
                found += more
        return best, found[:max_matches]


@dataclass
class DraftTree:
    """A token trie rooted at the row's last final token (node 0), nodes in insertion order."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    scores: list[float] = field(default_factory=lambda: [1.0])  # estimated probability of being accepted
    shares: list[float] = field(default_factory=lambda: [1.0])  # uncalibrated: the parent's share through it
    matched: list[int] = field(default_factory=lambda: [0])  # the suffix match's length that drafted it
    sources: list[str] = field(default_factory=lambda: [""])
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])

    @classmethod
    def rooted_at(cls, token: int) -> "DraftTree":
        return cls(tokens=[token])

    def __len__(self) -> int:
        return len(self.tokens)

    def _append(self, token: int, parent: int, score: float, share: float, source: str, matched: int) -> int:
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.shares.append(share)
        self.sources.append(source)
        self.matched.append(matched)
        self.children.append({})
        self.children[parent][token] = node
        return node

    def add_branch(self, tokens: list[int], scores: list[float], shares: list[float], source: str,
                   matched: int = 0) -> None:
        """Insert a chain below the root; a node already present keeps the larger score (so a child never
        outscores its parent: each chain's scores decrease along it)."""
        node = 0
        for token, score, share in zip(tokens, scores, shares):
            child = self.children[node].get(token)
            if child is None:
                child = self._append(token, node, score, share, source, matched)
            elif score > self.scores[child]:
                self.scores[child], self.shares[child] = score, share
                self.sources[child], self.matched[child] = source, matched
            node = child

    def add_trie(self, continuations: list[list[int]], calibration, source: str, matched: int = 0) -> None:
        """Insert continuations counted as a trie: a node's share is the share of its parent's continuations
        that go through it (scored by :meth:`add_scored`)."""
        prefix_counts: dict[tuple[int, ...], int] = {}
        for c in continuations:
            for d in range(1, len(c) + 1):
                prefix_counts[tuple(c[:d])] = prefix_counts.get(tuple(c[:d]), 0) + 1
        for c in continuations:
            counts = [len(continuations)] + [prefix_counts[tuple(c[:d])] for d in range(1, len(c) + 1)]
            self.add_scored(c, [count / parent for parent, count in zip(counts, counts[1:])], calibration, source,
                            matched)

    def add_scored(self, chain: list[int], shares: list[float], calibration, source: str, matched: int = 0) -> None:
        """Insert a chain whose tokens have the given shares (each token's probability given the ones before it,
        by the source's own count): a node's score is its parent's times its calibrated share,
        ``calibration(source, matched, depth)``, ``matched`` the length of the suffix match that found it."""
        scores, parent_score = [], 1.0
        for depth, share in enumerate(shares, 1):
            parent_score *= min(1.0, calibration(source, matched, depth) * share)
            scores.append(parent_score)
        self.add_branch(chain, scores, shares, source, matched)

    def best(self, budget: int) -> "DraftTree":
        """The ``budget`` highest-scoring nodes (a subtree, since a child never outscores its parent),
        renumbered depth-first with the best child first: the likeliest path then lies contiguous in the
        block, and its keys/values rarely need moving after verification."""
        order = sorted(range(1, len(self)), key=lambda i: (-self.scores[i], self.depths[i], i))
        keep = {0, *order[:budget - 1]}
        flat = DraftTree.rooted_at(self.tokens[0])
        stack = [(0, -1)]  # (node here, its parent's number in flat)
        while stack:
            node, parent = stack.pop()
            mapped = (flat._append(self.tokens[node], parent, self.scores[node], self.shares[node], self.sources[node],
                                   self.matched[node]) if node else 0)
            kids = sorted((c for c in self.children[node].values() if c in keep), key=lambda c: -self.scores[c])
            stack.extend((child, mapped) for child in reversed(kids))  # popped best first
        return flat

    def best_chain(self, length: int) -> "DraftTree":
        """The likeliest path below the root (the best-scored child each time), ``length`` nodes at most, as a
        tree of its own: what a verifier that takes one chain per row (vLLM's proposers) is given."""
        chain, node = DraftTree.rooted_at(self.tokens[0]), 0
        while self.children[node] and len(chain) <= length:
            node = max(self.children[node].values(), key=lambda c: (self.scores[c], -c))
            chain._append(self.tokens[node], len(chain) - 1, self.scores[node], self.shares[node],
                          self.sources[node], self.matched[node])
        return chain

    def expected_tokens(self) -> float:
        """Expected tokens made final by verifying this tree: the root's successor, plus each accepted node."""
        return 1.0 + sum(self.scores[1:])

    def first_child_chain(self, node: int) -> list[int]:
        """Nodes below ``node`` following the best child each time (the branch a Jacobi chain continues)."""
        chain = []
        while self.children[node]:
            node = min(self.children[node].values())  # depth-first order: the best child comes first
            chain.append(node)
        return chain


class AcceptanceStats:
    """Per (source, suffix-match length, depth) calibration of draft scores, learnt from verification.

    ``calibration(source, matched, depth)`` multiplies the raw share a source gives a token (a continuation
    of a 4-token match is likelier right than one of a 1-token match); it is the ratio of accepted proposals
    to their raw shares (given an accepted parent), smoothed toward a prior. Learnt from every call on the
    same model: how often drafts are right is a property of the model and its data.
    """

    PRIOR = {"jacobi": 0.2, "context": 0.6, "corpus": 0.4, "head": 1.0}  # a head's shares are its own probabilities
    STRENGTH = 4.0  # pseudo-observations of the prior
    DEPTHS = 8  # depths beyond share the last bucket
    MATCHES = 4  # longer suffix matches share the last bucket

    def __init__(self):
        self.accepted: dict[tuple[str, int, int], float] = {}
        self.predicted: dict[tuple[str, int, int], float] = {}

    def calibration(self, source: str, matched: int, depth: int) -> float:
        """Shrunk toward the calibration one level up (depth 1: toward the source's prior), so a depth never
        verified yet inherits what shallower ones showed instead of starting over from the prior."""
        estimate, matched = self.PRIOR[source], min(matched, self.MATCHES)
        for d in range(1, min(depth, self.DEPTHS) + 1):
            key = (source, matched, d)
            estimate = (self.accepted.get(key, 0.0) + self.STRENGTH * estimate) / (
                self.predicted.get(key, 0.0) + self.STRENGTH)
        return estimate

    def observe(self, tree: DraftTree, path: list[int]) -> None:
        """Learn from one verified tree: every node whose parent was accepted was a fair test of its score."""
        on_path = set(path)
        for node in range(1, len(tree)):
            if tree.parents[node] not in on_path:
                continue
            key = (tree.sources[node], min(tree.matched[node], self.MATCHES), min(tree.depths[node], self.DEPTHS))
            self.predicted[key] = self.predicted.get(key, 0.0) + tree.shares[node]
            self.accepted[key] = self.accepted.get(key, 0.0) + (node in on_path)
