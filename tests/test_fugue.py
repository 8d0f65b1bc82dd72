"""
Tests for L{synckit.sync.fugue}: reading, writing and merging SyncKit's Fugue text states.

The core's own verdicts come from tests/fixtures/fugue_vectors.json (written by
tools/fugue-vectors from the core itself), so these tests need nothing outside the project; the
differential test at the end re-runs the tool's checks live when the core's oracle is at hand.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import itertools
import json
import random
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from synckit.sync.fugue import FugueText, TextStateError, _read_like, grapheme_count

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "fixtures" / "fugue_vectors.json"

Key = tuple[int, str, int]
#: A block as the tests write it: (key, text, left origin, right origin, deleted).
Spec = tuple[Key, str, Optional[Key], Optional[Key], bool]


def node(key: Key) -> dict[str, Any]:
    return {"client_id": key[1], "clock": key[0], "offset": key[2]}


def state(blocks: Sequence[Spec], clock: int = 0, client: str = "s") -> str:
    """A state as the core writes it, from block specs."""
    entries = [
        [node(k), {"id": node(k), "text": t, "left_origin": l and node(l), "right_origin": r and node(r), "deleted": d}]
        for k, t, l, r, d in sorted(blocks)
    ]
    top = max([clock] + [k[0] for k, *_ in blocks])
    return json.dumps({"blocks": entries, "clock": {"value": top}, "client_id": client}, ensure_ascii=False, separators=(",", ":"))


def canonical(text: FugueText) -> str:
    """The state as JSON but for the client id, which names the merging side and nothing else."""
    copy = text.copy()
    copy.client_id = ""
    return copy.to_json()


def merged(states: list[FugueText], eager: bool = False) -> FugueText:
    """The first state (copied) with the others merged in; C{eager} reads the text in between."""
    result = states[0].copy()
    for other in states[1:]:
        if eager:
            result.text()
        result.merge(other)
    return result


# --- a transcription of the core's text, O(n^2) like the core, to check the fast one against ---


def core_text(value: dict[str, Any]) -> Optional[str]:
    """
    The text the core shows for a state after a merge (C{rebuild_rope}), transcribed from
    C{get_document_order}; C{None} where the core would walk a parent cycle forever.
    """
    blocks = sorted(
        ((e[0]["clock"], e[0]["client_id"], e[0]["offset"]), e[1]) for e in value["blocks"]
    )

    def find(origin: Optional[dict[str, Any]]) -> Optional[Key]:
        if origin is None:
            return None
        for key, block in blocks:
            length = grapheme_count(block["text"])
            if key[1] == origin["client_id"] and length and max(0, key[0] - length + 1) <= origin["clock"] <= key[0]:
                return key
        return None

    parents: dict[Key, tuple[Optional[Key], str]] = {}
    for key, block in blocks:
        a, b = find(block["left_origin"]), find(block["right_origin"])
        if a is None and b is None:
            parents[key] = (None, "R")
        elif b is None:
            parents[key] = (a, "R")
        elif a is None:
            parents[key] = (b, "L")
        else:
            current: Optional[Key] = b
            ancestor = False
            for _ in range(len(blocks) + 2):
                if current == a:
                    ancestor = True
                    break
                current = parents[current][0] if current in parents else None
                if current is None:
                    break
            else:
                return None
            parents[key] = (b, "L") if ancestor else (a, "R")
    out: list[str] = []
    by_key = dict(blocks)

    def visit(key: Key) -> None:
        for side in ("L", "R"):
            for child in sorted(k for k, (p, s) in parents.items() if p == key and s == side):
                visit(child)
            if side == "L" and not by_key[key]["deleted"]:
                out.append(by_key[key]["text"])

    for root in sorted(k for k, (p, _) in parents.items() if p is None):
        visit(root)
    return "".join(out)


# --- random replica histories, edited and merged the core's way --------------------------------

CHARS = "abcXY é😀"  # one grapheme each, so pieces split per character
OPS = st.lists(
    st.tuples(st.sampled_from("iidm"), st.integers(0, 3), st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 10**6)),
    max_size=25,
)


def history(ops: list[tuple[str, int, int, int, int]], replicas: int = 4) -> list[str]:
    """
    The final states of C{replicas} replicas after C{ops}: inserts (with any origins, not just
    neighbours, so any tree shape comes up), deletes that split blocks as the core does, and merges
    that keep the receiving side's copy of a key, as the core does (which is what makes it diverge).
    """
    clients = ["b", "a", "c", "bb"][:replicas]
    states: list[dict[Key, list[Any]]] = [{} for _ in clients]
    clocks = [0] * replicas
    for kind, i, j, x, y in ops:
        i, j = i % replicas, j % replicas
        blocks = states[i]
        chars = [(k[0] - len(b[0]) + 1 + n, k[1]) for k, b in blocks.items() for n in range(len(b[0]))]
        if kind == "i":
            text = "".join(CHARS[(x >> s) % len(CHARS)] for s in range(0, 3 * (1 + y % 3), 3))
            left = chars[x % len(chars)] if chars and x % 3 else None
            right = chars[y % len(chars)] if chars and y % 3 else None
            clocks[i] += len(text)
            blocks[(clocks[i], clients[i], 0)] = [text, left and (*left, 0), right and (*right, 0), False]
        elif kind == "d" and blocks:
            key = sorted(blocks)[x % len(blocks)]
            text, left, right, _ = blocks.pop(key)
            start, end = sorted((y % len(text), x % len(text)))
            first = key[0] - len(text) + 1
            for lo, hi, deleted in ((0, start, False), (start, end + 1, True), (end + 1, len(text), False)):
                if lo < hi:
                    blocks[(first + hi - 1, key[1], 0)] = [text[lo:hi], left, right, deleted]
        elif kind == "m" and i != j:
            for key, block in states[j].items():
                if key in blocks:
                    blocks[key][3] = blocks[key][3] or block[3]
                else:
                    blocks[key] = list(block)
            clocks[i] = max(clocks[i], clocks[j])
    return [
        state([(k, b[0], b[1] and (b[1][0], b[1][1], 0), b[2] and (b[2][0], b[2][1], 0), b[3]) for k, b in s.items()], clocks[n], clients[n])
        for n, s in enumerate(states)
    ]


class ParseTests(SynchronousTestCase):
    """Reading and writing states."""

    GOOD = state([((3, "a", 0), "abc", None, None, False), ((5, "b", 0), "XY", (1, "a", 0), (2, "a", 0), False)])

    def test_round_trip(self) -> None:
        """A state the core wrote is written back byte for byte."""
        self.assertEqual(FugueText.parse(self.GOOD).to_json(), self.GOOD)
        self.assertEqual(FugueText.parse(self.GOOD.encode()).to_json(), self.GOOD)

    def test_escapes(self) -> None:
        """Strings are escaped as serde_json escapes them: control characters only, lowercase hex."""
        text = 'a\x00\x1f\x7f"\\/\b\f\n\r\té😀\u2028'
        parsed = FugueText.parse(state([((15, 'c"\\', 0), text, None, None, False)]))
        self.assertIn(r'"text":"a\u0000\u001f' + '\x7f' + r'\"\\/\b\f\n\r\té😀' + "\u2028" + '"', parsed.to_json())
        self.assertEqual(FugueText.parse(parsed.to_json()).text(), text)

    def test_defaults(self) -> None:
        """A block's fields may be missing, as serde's defaults allow; the id must then match."""
        parsed = FugueText.parse('{"blocks":[[{"client_id":"","clock":0,"offset":0},{}]],"clock":{"value":0},"client_id":"x"}')
        self.assertEqual(parsed.text(), "")
        self.assertIn('"deleted":false', parsed.to_json())

    def test_clock(self) -> None:
        """The clock is the state's Lamport clock."""
        self.assertEqual(FugueText.parse(self.GOOD).clock, 5)

    def test_errors(self) -> None:
        """Anything that is not a state raises TextStateError, and leaves a parsed state as it was."""
        stored = FugueText.parse(self.GOOD)
        good = json.loads(self.GOOD)

        def mutate(path: list[Any], value: Any) -> str:
            copy = json.loads(self.GOOD)
            target = copy
            for step in path[:-1]:
                target = target[step]
            if value is KeyError:
                del target[path[-1]]
            else:
                target[path[-1]] = value
            return json.dumps(copy)

        bad: list[Any] = [
            None, 1, "", "{", "[]", "null", b"\xff", '"\\ud800"', "[" * 5000 + "]" * 5000, '{"blocks":[]}',
            mutate(["blocks"], {}), mutate(["clock"], 3), mutate(["clock", "value"], -1), mutate(["clock", "value"], 2**64),
            mutate(["clock", "value"], 1.0), mutate(["clock", "value"], True), mutate(["client_id"], None),
            mutate(["blocks", 0], [good["blocks"][0][0]]), mutate(["blocks", 0, 0, "clock"], "3"),
            mutate(["blocks", 0, 0, "offset"], 2**32), mutate(["blocks", 0, 0, "client_id"], KeyError),
            mutate(["blocks", 0, 1, "id", "clock"], 4), mutate(["blocks", 0, 1, "text"], None),
            mutate(["blocks", 0, 1, "deleted"], 0), mutate(["blocks", 0, 1, "left_origin"], "a@1"),
            mutate(["blocks", 0, 1], []), mutate(["blocks", 0], {"0": 1}),
            self.GOOD.replace('"text":"abc"', '"text":"\\udc00"'),
        ]
        for value in bad:
            with self.assertRaises(TextStateError, msg=repr(value)[:80]):
                FugueText.parse(value)
        self.assertEqual(stored.to_json(), self.GOOD)
        self.assertEqual(stored.text(), "XYabc")

    @given(st.binary(max_size=40), st.integers(0, 10**6))
    def test_mangled(self, junk: bytes, where: int) -> None:
        """A state with bytes cut out or spliced in either parses or raises TextStateError."""
        raw = self.GOOD.encode()
        at = where % len(raw)
        for candidate in (raw[:at] + junk + raw[at + len(junk) :], raw[:at] + junk):
            try:
                FugueText.parse(candidate)
            except TextStateError:
                pass

    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                            ["blocks", "clock", "value", "client_id", "id", "text", "offset", "deleted", "left_origin"]), inner, max_size=4),
                        max_leaves=20))  # fmt: skip
    def test_any_json(self, value: Any) -> None:
        """Any JSON value either parses or raises TextStateError."""
        try:
            FugueText.parse(json.dumps(value))
        except TextStateError:
            pass


def same(a: FugueText, b: FugueText) -> bool:
    """Whether two states are the same: blocks, clock and client."""
    return a.to_json() == b.to_json() and a.clock == b.clock and a.client_id == b.client_id


class ParseLikeTests(SynchronousTestCase):
    """
    Reading a state like another (the document's text): what is read is what the full parse
    reads, and what it refuses is refused with the full parse's reason.
    """

    @given(OPS, st.integers(0, 3), st.integers(0, 3))
    @settings(max_examples=150, deadline=None)
    def test_same_as_the_full_parse(self, ops: list[tuple[str, int, int, int, int]], i: int, j: int) -> None:
        states = history(ops)
        raw, like = states[i % len(states)], FugueText.parse(states[j % len(states)])
        if j % 2:
            like.merge(FugueText.parse(raw))  # the document already holds this client's state
        self.assertTrue(same(FugueText.parse(raw, like=like), FugueText.parse(raw)))

    def test_recorded_states(self) -> None:
        """Every recorded replica state reads the same like every other of its trace."""
        vectors = json.loads(VECTORS.read_text(encoding="utf-8"))["traces"][:60]
        for vector in vectors:
            for raw in vector["states"]:
                full = FugueText.parse(raw)
                self.assertTrue(same(_read_like(raw, FugueText.parse(raw)), full))  # type: ignore[arg-type]
                for other in vector["states"]:
                    self.assertTrue(same(FugueText.parse(raw, like=FugueText.parse(other)), full))

    def test_other_layouts(self) -> None:
        """A state laid out otherwise (spaces, another key order, repeated keys) reads the same."""
        like = FugueText.parse(ParseTests.GOOD)
        value = json.loads(ParseTests.GOOD)
        repeated = ParseTests.GOOD.replace('"blocks":[', '"blocks":[' + json.dumps(value["blocks"][1]) + ",", 1)
        for raw in (
            json.dumps(value), json.dumps(dict(reversed(list(value.items())))), repeated,
            ParseTests.GOOD[:-1] + ',"clock":{"value":9}}', ParseTests.GOOD + " ",
        ):  # fmt: skip
            self.assertTrue(same(FugueText.parse(raw, like=like), FugueText.parse(raw)), raw)

    def test_errors_as_the_full_parse(self) -> None:
        """A state the full parse refuses is refused, with the same reason, however like it is."""
        like = FugueText.parse(ParseTests.GOOD)
        good = ParseTests.GOOD
        bad = [
            good.replace("}]],", "}],],", 1),  # a trailing comma after the last entry
            good.replace('"clock":{"value":5}', '"clock":{"value":5.0}'),
            good.replace('"clock":3,', '"clock":3.0,', 1),
            good.replace('"clock":{"value":5}', '"clock":{"value":NaN}'),
            good.replace('[[', "[[1],[", 1),
            good.replace('"text":"XY"', '"text":"\udc00"'),
            good[:-1] + ',"blocks":{}}',
            good[: len(good) // 2],
        ]
        for raw in bad:
            with self.assertRaises(TextStateError, msg=raw) as full:
                FugueText.parse(raw)
            with self.assertRaises(TextStateError, msg=raw) as read:
                FugueText.parse(raw, like=like)
            self.assertEqual(str(read.exception), str(full.exception))

    def test_fills_what_like_has_not_written(self) -> None:
        """Entries of C{like} never written yet are written once, for the next state to match."""
        like = FugueText.parse(ParseTests.GOOD)
        like.merge(FugueText.parse(state([((9, "c", 0), "new", None, None, False)], 9, "c")))
        raw = like.to_json()
        fresh = FugueText.parse(raw)  # nothing written yet
        self.assertTrue(same(_read_like(raw, fresh), like))  # type: ignore[arg-type]


class MergeTests(SynchronousTestCase):
    """Merging, where the core is order-dependent and where it is not."""

    COARSE = state([((3, "a", 0), "abc", None, None, False)], client="b")
    FINE = state([((1, "a", 0), "a", None, None, False), ((2, "a", 0), "b", None, None, True), ((3, "a", 0), "c", None, None, False)], client="a")

    def test_split_conflict(self) -> None:
        """
        "abc" with "b" deleted on one side only: the core gives "aabc" or "ac" by merge order; the
        finer split wins here whatever the order.
        """
        for first, second, changes in ((self.COARSE, self.FINE, True), (self.FINE, self.COARSE, False)):
            result = FugueText.parse(first)
            self.assertEqual(result.merge(FugueText.parse(second)), changes)
            self.assertEqual(result.text(), "ac")

    def test_unchanged(self) -> None:
        """Merging what is already there reports no change."""
        result = FugueText.parse(self.FINE)
        self.assertFalse(result.merge(FugueText.parse(self.FINE)))
        self.assertFalse(result.merge(FugueText.parse(self.COARSE)))
        self.assertEqual(result.to_json(), self.FINE)

    def test_clock(self) -> None:
        """The merged clock is the largest clock of either side."""
        result = FugueText.parse(state([], clock=2))
        result.merge(FugueText.parse(self.FINE))
        self.assertEqual(result.clock, 3)
        result.merge(FugueText.parse(state([], clock=9)))
        self.assertEqual(result.clock, 9)

    def test_copy(self) -> None:
        """A copy is independent: merging into it leaves the original (and its text) alone."""
        original = FugueText.parse(self.COARSE)
        self.assertEqual(original.text(), "abc")
        copy = original.copy()
        copy.merge(FugueText.parse(self.FINE))
        self.assertEqual((original.text(), copy.text()), ("abc", "ac"))
        self.assertEqual(original.to_json(), self.COARSE)

    def test_concurrent_inserts(self) -> None:
        """Concurrent inserts at one place order by id on every side, whether the tree was built or not."""
        base: list[Spec] = [((3, "a", 0), "abc", None, None, False)]
        left = state(base + [((5, "b", 0), "XY", (3, "a", 0), None, False)])
        right = state(base + [((4, "c", 0), "Z", (3, "a", 0), None, False), ((6, "c", 0), "W", (1, "a", 0), (2, "a", 0), False)])
        for eager in (False, True):
            texts = {merged([FugueText.parse(s) for s in order], eager).text() for order in ((left, right), (right, left))}
            self.assertEqual(texts, {"WabcZXY"})

    def test_deep(self) -> None:
        """A document typed one character at a time (a tree as deep as it is long) is no trouble."""
        blocks: list[Spec] = [((1, "a", 0), "x", None, None, False)]
        blocks += [((n, "a", 0), "x", (n - 1, "a", 0), None, False) for n in range(2, 20001)]
        blocks += [((20001, "b", 0), "Y", (9999, "a", 0), (10000, "a", 0), False)]
        blocks += [((20002, "b", 0), "Z", (20001, "b", 0), (10000, "a", 0), False)]
        text = FugueText.parse(state(blocks)).text()
        self.assertEqual(text, "x" * 9999 + "YZ" + "x" * 10001)


class PropertyTests(SynchronousTestCase):
    """Merge is a join: commutative, associative, idempotent, in text and in state."""

    @settings(max_examples=300, deadline=None)
    @given(OPS)
    def test_commutative(self, ops: list[tuple[str, int, int, int, int]]) -> None:
        """Every order of merging the replicas gives one text and one state, eager or lazy."""
        states = [FugueText.parse(s) for s in history(ops)]
        results = [merged([states[i] for i in order], eager=n % 2 == 1) for n, order in enumerate(itertools.permutations(range(4)))]
        self.assertEqual(len({r.text() for r in results}), 1)
        self.assertEqual(len({canonical(r) for r in results}), 1)

    @settings(max_examples=200, deadline=None)
    @given(OPS)
    def test_associative(self, ops: list[tuple[str, int, int, int, int]]) -> None:
        """(a b) (c d) is a (b (c d)) is ((a b) c) d."""
        a, b, c, d = (FugueText.parse(s) for s in history(ops))
        results = [merged([merged([a, b]), merged([c, d])]), merged([a, merged([b, merged([c, d])])]), merged([a, b, c, d], eager=True)]
        self.assertEqual(len({canonical(r) for r in results}), 1)
        self.assertEqual(len({r.text() for r in results}), 1)

    @settings(max_examples=200, deadline=None)
    @given(OPS)
    def test_idempotent(self, ops: list[tuple[str, int, int, int, int]]) -> None:
        """Merging a state, or a merge it is part of, a second time changes nothing."""
        states = [FugueText.parse(s) for s in history(ops)]
        result = merged(states)
        before = result.to_json()
        self.assertFalse(result.merge(states[0].copy()))
        self.assertFalse(result.merge(merged(states[1:])))
        self.assertFalse(result.merge(result.copy()))
        self.assertEqual(result.to_json(), before)
        self.assertEqual(FugueText.parse(before).to_json(), before)

    @settings(max_examples=300, deadline=None)
    @given(OPS)
    def test_core_text(self, ops: list[tuple[str, int, int, int, int]]) -> None:
        """Our text is the core's (transcribed naively) for every replica and for the merge."""
        raw = history(ops)
        states = [FugueText.parse(s) for s in raw]
        for text, value in [(s.text(), json.loads(r)) for s, r in zip(states, raw)] + [
            (merged(states, eager=True).text(), json.loads(merged(states).to_json()))
        ]:
            expected = core_text(value)
            assume(expected is not None)
            self.assertEqual(text, expected)


#: Any blocks at all: overlapping, empty, origins anywhere (in the block itself, in later blocks,
#: in no block), so parent links can point to later blocks and form cycles.
ODD_IDS = st.tuples(st.integers(0, 12), st.sampled_from("ab"), st.sampled_from([0, 0, 1]))
ODD_BLOCKS = st.lists(
    st.tuples(ODD_IDS, st.text("ab😀é", max_size=3), st.none() | ODD_IDS, st.none() | ODD_IDS, st.booleans()),
    max_size=14,
    unique_by=lambda spec: spec[0],
)


class OddStateTests(SynchronousTestCase):
    """States the core never writes, but could be sent: still the core's text, still a join."""

    @settings(max_examples=250, deadline=None)
    @given(ODD_BLOCKS)
    def test_core_text(self, specs: list[Spec]) -> None:
        """Our text is the naive transcription's wherever the core's walk would end."""
        raw = state(specs)
        expected = core_text(json.loads(raw))
        assume(expected is not None)
        self.assertEqual(FugueText.parse(raw).text(), expected)

    @settings(max_examples=150, deadline=None)
    @given(ODD_BLOCKS, st.lists(st.integers(0, 2), min_size=14, max_size=14))
    def test_join(self, specs: list[Spec], parts: list[int]) -> None:
        """Split into three states, merged in every order, eagerly or lazily: one text, one state."""
        states = [FugueText.parse(state([b for b, p in zip(specs, parts) if p == n])) for n in range(3)]
        results = [merged(list(order), eager) for order in itertools.permutations(states) for eager in (False, True)]
        self.assertEqual(len({r.text() for r in results}), 1)
        self.assertEqual(len({canonical(r) for r in results}), 1)


class VectorTests(SynchronousTestCase):
    """The core's own verdicts, recorded by tools/fugue-vectors."""

    def setUp(self) -> None:
        self.vectors = json.loads(VECTORS.read_text(encoding="utf-8"))

    def test_graphemes(self) -> None:
        """Grapheme counts are the core's (it measures blocks in them)."""
        self.assertGreater(len(self.vectors["graphemes"]), 100)
        for text, count in self.vectors["graphemes"]:
            self.assertEqual(grapheme_count(text), count, repr(text))

    def test_states(self) -> None:
        """Every replica's state reads to the core's text and writes back byte for byte."""
        self.assertGreaterEqual(len(self.vectors["traces"]), 300)
        for vector in self.vectors["traces"]:
            for raw, text in zip(vector["states"], vector["texts"]):
                parsed = FugueText.parse(raw)
                self.assertEqual(parsed.to_json(), raw)
                self.assertEqual(parsed.text(), text)

    def test_merges(self) -> None:
        """
        Every merge order gives the recorded state (by hash) and text, and the state round-trips;
        where all the core's orders agreed, that is the core's text.
        """
        agreed = 0
        for vector in self.vectors["traces"]:
            states = [FugueText.parse(s) for s in vector["states"]]
            state = merged(states).to_json()
            self.assertEqual(hashlib.sha256(state.encode()).hexdigest(), vector["merged_sha256"])
            self.assertEqual(FugueText.parse(state).to_json(), state)
            for order in list(itertools.permutations(states))[:24]:
                self.assertEqual(merged(list(order), eager=True).text(), vector["text"])
            if len(vector["core_texts"]) == 1:
                agreed += 1
                self.assertEqual(vector["text"], vector["core_texts"][0])
        self.assertGreater(agreed, 100)


def load_tool() -> ModuleType:
    """tools/fugue-vectors, which drives the core's oracle, as a module."""
    path = ROOT / "tools" / "fugue-vectors"
    loader = importlib.machinery.SourceFileLoader("fugue_vectors", str(path))
    spec = importlib.util.spec_from_loader("fugue_vectors", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fugue_vectors"] = module
    loader.exec_module(module)
    return module


class OracleTests(SynchronousTestCase):
    """Live differential check against the core (the fixtures above cover the same ground offline)."""

    def test_differential(self) -> None:
        """Random traces through the core: no failure of the tool's checks."""
        tool = load_tool()
        if not tool.ORACLE.exists() or shutil.which("node") is None:
            raise SkipTest(
                f"SKIPPED LIVE DIFFERENTIAL CHECK: needs node and the core's oracle at {tool.ORACLE} "
                "(../shared/oracle/crdt-oracle.mjs from the project root); the fixture vectors still ran"
            )
        rng = random.Random(20240)
        oracle = tool.Oracle()
        self.addCleanup(oracle.close)
        _, failures = tool.grapheme_vectors(oracle, rng, 20)
        for _ in range(100):
            failures += tool.check(oracle, tool.random_trace(rng, oracle), rng).failures
        self.assertEqual(failures, [])
