"""
SyncKit's Fugue text CRDT state, read, merged and written as the clients' Rust core does.

SyncText and RichText clients send their whole text as the JSON of the core's
C{WasmFugueText.toJSON()}::

    {"blocks": [[id, block], ...], "clock": {"value": n}, "client_id": "..."}

where an id is C{{"client_id": s, "clock": n, "offset": n}} and a block is C{{"id": id, "text": s,
"left_origin": id|null, "right_origin": id|null, "deleted": bool}}.  A block is the run of
characters one insert typed; its id carries the Lamport clock of its I{last} character, one clock
value per grapheme, so the block covers the clocks C{clock - length + 1 .. clock} of its client.
Origins name single characters by that clock.  A delete never removes anything: it splits the
block (each piece keeps the original's origins and is keyed by its own last clock, so the
rightmost piece keeps the original key) and marks the deleted piece.

The text is what a client shows once it has merged the state: the core rebuilds it from a tree.
Blocks are taken in id order (clock, client, offset); each one's origins are mapped to the first
block, in that order, whose clock range holds them, and the block becomes the right child of its
left origin block, or, when that block is an ancestor of its right origin block in the tree built
so far, the left child of the right one; an in-order walk (children in id order) of the
non-deleted blocks is the text.  (The build SyncKit 0.3 ships, whose C{text.rs} is SyncKit
0.2's, shows a state it has only read, not merged, as its blocks in id order; clients merge every
state they receive, so that view is not one we reproduce.)

Merging is the core's merge: the union of the two block maps, a block deleted on either side stays
deleted, and the clock is the largest seen.  The shipped core is not a proper merge where the two
sides hold one key with different content: after a delete split a block on one replica and not on
another, both hold the rightmost piece under the original key, and the core keeps whichever its
own side had, so merging A into B and B into A give different texts ("aabc" and "ac" for "abc"
with "b" deleted on one side; the core's later split-to-match merge, not in the shipped build,
aims at the second).  We resolve such a conflict by content instead of by side: the shorter text
wins (the more finely split piece, whose left-hand pieces always come with it), then the smaller
text and origins.  Every step of our merge is then a join (union of keys, minimum of content per
key, "or" of deleted, maximum of clocks), so any set of states merged in any order and grouping
gives the same blocks, the same clock and the same text; only C{client_id}, which names the
replica holding the state and plays no part in the text, stays the receiving side's, as in the
core.  We deliberately go no further than the core: where its merge orders agree, its result
(duplicated text included) is what clients show, and ours is the same.

The core counts a block's length in extended grapheme clusters; L{grapheme_count} reproduces that
for the scripts clients type (the length decides which block an origin clock falls in).

The tree is only needed for the text, so it is built lazily; a merge that only adds blocks which
overlap no known clock range updates a built tree in place, anything else drops it to be rebuilt
by the next L{FugueText.text}.  For the states the core writes nothing here is quadratic (the core
itself is): origin lookups bisect a per-client index, ancestor tests follow jump pointers, the
walk is iterative (a document typed a character at a time is a tree as deep as it is long), and
each block's JSON is written once.
"""

from __future__ import annotations

import bisect
import json
import unicodedata
from json.encoder import encode_basestring
from typing import Any, NamedTuple, Optional, Union

import orjson

#: A block or character id as the core orders it: (clock, client_id, offset).
Key = tuple[int, str, int]

_U64 = 2**64 - 1
#: The core is WebAssembly: its offsets are 32-bit C{usize}.
_USIZE = 2**32 - 1

_LEFT, _RIGHT = 0, 1


class TextStateError(ValueError):
    """A text state that is not what the core writes (or would read)."""


class _Block(NamedTuple):
    """One run of text.  Immutable, so states can share blocks and L{FugueText.copy} is cheap."""

    text: str
    left: Optional[Key]
    right: Optional[Key]
    deleted: bool
    length: int  # in graphemes, as the core counts


# --- graphemes -------------------------------------------------------------------------------

_CR, _LF, _CONTROL, _EXTEND, _ZWJ, _SPACING, _PREPEND, _RI, _L, _V, _T, _LV, _LVT, _PICT, _OTHER = range(15)

_PREPEND_CHARS = frozenset(
    [*range(0x600, 0x606), 0x6DD, 0x70F, 0x890, 0x891, 0x8E2, 0xD4E, 0x110BD, 0x110CD, 0x111C2, 0x111C3]
    + [0x1193F, 0x11941, 0x11A3A, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02]
)
#: Spacing marks that Unicode nevertheless counts as grapheme extenders.
_EXTEND_MC = frozenset([0x9BE, 0x9D7, 0xB3E, 0xB57, 0xBBE, 0xBD7, 0xCC2, 0xCD5, 0xCD6, 0xD3E, 0xD57, 0xDCF, 0xDDF])
_PICT_RANGES = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
    (0x2139, 0x2139), (0x2194, 0x21AA), (0x231A, 0x23FF), (0x24C2, 0x24C2), (0x25AA, 0x25FE),
    (0x2600, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D),
    (0x3297, 0x3299), (0x1F000, 0x1F0FF), (0x1F10D, 0x1F1AD), (0x1F201, 0x1F3FA), (0x1F400, 0x1FAFF),
    (0x1FC00, 0x1FFFD),
)  # fmt: skip
#: Indic conjunct breaking (Unicode 15.1): viramas, and the consonants they join.
_LINKERS = frozenset([0x94D, 0x9CD, 0xACD, 0xB4D, 0xC4D, 0xD4D])
_CONSONANT_RANGES = (
    (0x915, 0x939), (0x958, 0x95F), (0x978, 0x97F), (0x995, 0x9B9), (0x9DC, 0x9DF), (0x9F0, 0x9F1),
    (0xA95, 0xAB9), (0xAF9, 0xAF9), (0xB15, 0xB39), (0xB5C, 0xB5F), (0xB71, 0xB71), (0xC15, 0xC39),
    (0xC58, 0xC5A), (0xD15, 0xD3A),
)  # fmt: skip


def _in(cp: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _gcb(ch: str) -> int:
    """The Grapheme_Cluster_Break class of one code point, from its general category."""
    cp = ord(ch)
    if cp == 0x0D:
        return _CR
    if cp == 0x0A:
        return _LF
    if cp == 0x200D:
        return _ZWJ
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return _L
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return _V
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return _T
    if 0xAC00 <= cp <= 0xD7A3:
        return _LV if (cp - 0xAC00) % 28 == 0 else _LVT
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return _RI
    if 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F or cp == 0x200C or cp in _EXTEND_MC:
        return _EXTEND
    if cp in _PREPEND_CHARS:
        return _PREPEND
    category = unicodedata.category(ch)
    if category in ("Mn", "Me") or cp in (0xFF9E, 0xFF9F):
        return _EXTEND
    if category == "Mc" or cp in (0xE33, 0xEB3):
        return _SPACING
    if category in ("Cc", "Zl", "Zp", "Cf"):
        return _CONTROL
    if _in(cp, _PICT_RANGES):
        return _PICT
    return _OTHER


def grapheme_count(text: str) -> int:
    """
    The number of extended grapheme clusters in C{text}, as Rust's C{unicode-segmentation}
    counts them (UAX #29 with Unicode 15.1's conjunct rule), for the core measures blocks in them.
    """
    if text.isascii():
        return len(text) - text.count("\r\n")
    count = 0
    prev = -1
    pict_zwj = False  # an extended pictographic, extenders, then ZWJ: GB11
    pict = False
    ri_odd = False
    conjunct = 0  # 1 after a consonant, 2 after consonant (extend|linker)* linker: GB9c
    for ch in text:
        cls = _gcb(ch)
        cp = ord(ch)
        if prev < 0:
            join = False
        elif prev == _CR and cls == _LF:
            join = True
        elif prev in (_CR, _LF, _CONTROL) or cls in (_CR, _LF, _CONTROL):
            join = False
        elif prev == _L and cls in (_L, _V, _LV, _LVT) or prev in (_LV, _V) and cls in (_V, _T):
            join = True
        elif prev in (_LVT, _T) and cls == _T:
            join = True
        elif cls in (_EXTEND, _ZWJ, _SPACING) or prev == _PREPEND:
            join = True
        elif conjunct == 2 and _in(cp, _CONSONANT_RANGES):
            join = True
        elif pict_zwj and cls == _PICT:
            join = True
        else:
            join = prev == _RI and cls == _RI and ri_odd
        if not join:
            count += 1
        pict_zwj = pict and cls == _ZWJ
        pict = cls == _PICT or pict and cls == _EXTEND
        ri_odd = cls == _RI and not (join and ri_odd)
        if _in(cp, _CONSONANT_RANGES):
            conjunct = 1
        elif conjunct and cp in _LINKERS:
            conjunct = 2
        elif not (conjunct and cls in (_EXTEND, _ZWJ)):
            conjunct = 0
        prev = cls
    return count


# --- reading ---------------------------------------------------------------------------------


def _node_id(value: Any, what: str) -> Key:
    if type(value) is not dict:
        raise TextStateError(f"{what} is not an id object")
    client, clock, offset = value.get("client_id"), value.get("clock"), value.get("offset")
    if type(client) is not str:
        raise TextStateError(f"{what} has no string client_id")
    if type(clock) is not int or not 0 <= clock <= _U64:
        raise TextStateError(f"{what} has no unsigned 64-bit clock")
    if type(offset) is not int or not 0 <= offset <= _USIZE:
        raise TextStateError(f"{what} has no unsigned 32-bit offset")
    return (clock, client, offset)


def _origin(value: Any, what: str) -> Optional[Key]:
    return None if value is None else _node_id(value, what)


def _block(key: Key, raw_key: dict[str, Any], value: Any) -> _Block:
    """A block as the core reads it: every field may be missing and takes its default."""
    if type(value) is not dict:
        raise TextStateError("a block is not an object")
    block_id = value.get("id")
    if block_id == raw_key and type(block_id["clock"]) is int and type(block_id["offset"]) is int:
        pass  # the usual case, checked without building the id (the key's was checked)
    elif (_node_id(block_id, "a block id") if block_id is not None else (0, "", 0)) != key:
        raise TextStateError("a block's id differs from its key")
    text = value.get("text", "")
    deleted = value.get("deleted", False)
    if type(text) is not str:
        raise TextStateError("a block's text is not a string")
    if type(deleted) is not bool:
        raise TextStateError("a block's deleted is not a boolean")
    left = _origin(value.get("left_origin"), "a left origin")
    right = _origin(value.get("right_origin"), "a right origin")
    return _Block(text, left, right, deleted, grapheme_count(text))


def _entry(entry: Any) -> tuple[Key, _Block]:
    """One C{[id, block]} entry of a state's C{blocks}."""
    if type(entry) is not list or len(entry) != 2:
        raise TextStateError("a block entry is not an [id, block] pair")
    key = _node_id(entry[0], "a block key")
    return key, _block(key, entry[0], entry[1])


def _check_top(clock: Any, client: Any) -> None:
    """A state's C{clock} and C{client_id}."""
    if type(clock) is not dict or type(clock.get("value")) is not int or not 0 <= clock["value"] <= _U64:
        raise TextStateError("clock is not {value: unsigned 64-bit integer}")
    if type(client) is not str:
        raise TextStateError("client_id is not a string")


# --- writing ---------------------------------------------------------------------------------


def _id_json(key: Key) -> str:
    return f'{{"client_id":{encode_basestring(key[1])},"clock":{key[0]},"offset":{key[2]}}}'


def _entry_json(key: Key, block: _Block) -> str:
    """One C{[id, block]} pair, byte for byte as serde_json writes it."""
    ident = _id_json(key)
    left = "null" if block.left is None else _id_json(block.left)
    right = "null" if block.right is None else _id_json(block.right)
    deleted = "true" if block.deleted else "false"
    return (
        f'[{ident},{{"id":{ident},"text":{encode_basestring(block.text)},'
        f'"left_origin":{left},"right_origin":{right},"deleted":{deleted}}}]'
    )


def _rank(block: _Block) -> tuple[Any, ...]:
    """Which of two contents of one key a merge keeps: the smaller rank (see the module doc)."""
    return (block.length, block.text, block.left or (), block.right or ())


def _span(key: Key, block: _Block) -> tuple[int, int]:
    """The clocks a block covers (the core's saturating arithmetic)."""
    return max(0, key[0] - block.length + 1), key[0]


# --- the tree --------------------------------------------------------------------------------


class _Index:
    """
    Per client, its non-empty blocks in id order with the clocks they cover, to find the block
    holding an origin (the first such block in id order, as the core's linear search finds).
    """

    __slots__ = ("clients",)

    def __init__(self, clients: dict[str, tuple[list[int], list[int], list[int], list[Key]]]) -> None:
        #: client -> (ends, starts, suffix minimum of starts, keys), all in id order
        self.clients = clients

    @classmethod
    def build(cls, keys: list[Key], blocks: dict[Key, _Block]) -> _Index:
        lists: dict[str, tuple[list[int], list[int], list[int], list[Key]]] = {}
        for key in keys:
            block = blocks[key]
            if block.length:
                ends, starts, _, ids = lists.setdefault(key[1], ([], [], [], []))
                start, end = _span(key, block)
                ends.append(end)
                starts.append(start)
                ids.append(key)
        for ends, starts, minimum, _ in lists.values():
            low = _U64 + 1
            minimum.extend([0] * len(starts))
            for i in range(len(starts) - 1, -1, -1):
                low = min(low, starts[i])
                minimum[i] = low
        return cls(lists)

    def copy(self) -> _Index:
        return _Index({c: (e[:], s[:], m[:], k[:]) for c, (e, s, m, k) in self.clients.items()})

    def first(self, client: str, low: int, high: int) -> Optional[Key]:
        """The first block of C{client} in id order that covers any clock in C{low..high}."""
        lists = self.clients.get(client)
        if lists is None:
            return None
        ends, starts, minimum, keys = lists
        i = bisect.bisect_left(ends, low)
        while i < len(ends) and minimum[i] <= high:
            if starts[i] <= high:
                return keys[i]
            i += 1
        return None

    def add(self, key: Key, block: _Block) -> None:
        """Add a block that overlaps no indexed one (so no other suffix minimum changes)."""
        if not block.length:
            return
        ends, starts, minimum, keys = self.clients.setdefault(key[1], ([], [], [], []))
        start, end = _span(key, block)
        i = bisect.bisect_left(keys, key)
        low = min(start, minimum[i]) if i < len(minimum) else start
        ends.insert(i, end)
        starts.insert(i, start)
        minimum.insert(i, low)
        keys.insert(i, key)


class _Node(NamedTuple):
    parent: Optional[Key]
    side: int
    #: the top of the node's run of parent links that each go to a smaller id (the core's normal
    #: case), where the run starts over: a root, or a node whose parent has a larger id
    base: Key
    depth: int  # below base
    jump: Key  # skew-binary jump pointer within the run, for logarithmic ancestor tests


class _Tree:
    """The core's block tree and its in-order walk (all blocks, deleted ones too)."""

    __slots__ = ("index", "nodes", "children", "roots", "order", "unreachable", "dangling", "odd")

    def __init__(self, index: _Index) -> None:
        self.index = index
        self.nodes: dict[Key, _Node] = {}
        self.children: dict[tuple[Key, int], tuple[Key, ...]] = {}
        self.roots: tuple[Key, ...] = ()
        self.order: list[Key] = []
        #: blocks no walk from a root reaches (parent links in a cycle): not in the text
        self.unreachable: set[Key] = set()
        #: origins no block holds, per client: a block that comes to hold one changes the tree
        self.dangling: dict[str, list[int]] = {}
        #: how many parent links go to a larger id (bounds ancestor walks through cycles)
        self.odd = 0

    def copy(self) -> _Tree:
        tree = _Tree(self.index.copy())
        tree.nodes = self.nodes.copy()
        tree.children = self.children.copy()
        tree.roots = self.roots
        tree.order = self.order[:]
        tree.unreachable = set(self.unreachable)
        tree.dangling = {c: clocks[:] for c, clocks in self.dangling.items()}
        tree.odd = self.odd
        return tree

    @classmethod
    def build(cls, keys: list[Key], blocks: dict[Key, _Block]) -> _Tree:
        tree = cls(_Index.build(keys, blocks))
        roots: list[Key] = []
        children: dict[tuple[Key, int], list[Key]] = {}
        for key in keys:  # in id order, so every list of siblings comes out sorted
            parent, side = tree._place(key, blocks[key])
            tree._attach(key, parent, side)
            if parent is None:
                roots.append(key)
            else:
                children.setdefault((parent, side), []).append(key)
        tree.roots = tuple(roots)
        tree.children = {place: tuple(siblings) for place, siblings in children.items()}
        tree.order = tree._walk()
        tree.unreachable = set(keys).difference(tree.order)
        return tree

    def _find(self, origin: Optional[Key]) -> Optional[Key]:
        if origin is None:
            return None
        found = self.index.first(origin[1], origin[0], origin[0])
        if found is None:
            self.dangling.setdefault(origin[1], []).append(origin[0])
        return found

    def _place(self, key: Key, block: _Block) -> tuple[Optional[Key], int]:
        """The core's C{determine_parent_and_side}, for the tree of the blocks before C{key}."""
        left, right = self._find(block.left), self._find(block.right)
        if right is None:
            return left, _RIGHT
        if left is None:
            return right, _LEFT
        if self._is_ancestor(left, right, key):
            return right, _LEFT
        return left, _RIGHT

    def _is_ancestor(self, a: Key, b: Key, limit: Key) -> bool:
        """
        Whether the core's walk up from C{b}, through the blocks placed before C{limit}, meets
        C{a}.  The core walks link by link; we jump along runs of normal links, and give up
        (where the core would loop forever) once more odd links were followed than exist.
        """
        nodes = self.nodes
        target = nodes.get(a) if a < limit else None
        current = b
        for _ in range(self.odd + 1):
            if current == a:
                return True
            node = nodes.get(current)
            if node is None or current >= limit:
                return False
            if target is not None and target.base == node.base and target.depth < node.depth:
                if self._ancestor_at(current, target.depth) == a:
                    return True
            parent = nodes[node.base].parent
            if parent is None:
                return False
            current = parent
        return False

    def _ancestor_at(self, key: Key, depth: int) -> Key:
        """The ancestor of C{key} at C{depth} of its run (which has a parent at every depth)."""
        nodes = self.nodes
        node = nodes[key]
        while node.depth > depth:
            if nodes[node.jump].depth >= depth:
                key = node.jump
            else:
                assert node.parent is not None
                key = node.parent
            node = nodes[key]
        return key

    def _attach(self, key: Key, parent: Optional[Key], side: int) -> None:
        node = self.nodes.get(parent) if parent is not None and parent < key else None
        if node is None:
            self.odd += parent is not None
            self.nodes[key] = _Node(parent, side, key, 0, key)
            return
        assert parent is not None
        jump = self.nodes[node.jump]
        skip = jump.jump if node.depth - jump.depth == jump.depth - self.nodes[jump.jump].depth else parent
        self.nodes[key] = _Node(parent, side, node.base, node.depth + 1, skip)

    def _walk(self) -> list[Key]:
        children = self.children
        order: list[Key] = []
        stack: list[tuple[Key, bool]] = [(root, False) for root in reversed(self.roots)]
        while stack:
            key, visited = stack.pop()
            if visited:
                order.append(key)
                continue
            stack.extend((child, False) for child in reversed(children.get((key, _RIGHT), ())))
            stack.append((key, True))
            stack.extend((child, False) for child in reversed(children.get((key, _LEFT), ())))
        return order

    def try_add(self, key: Key, block: _Block) -> bool:
        """
        Add a new block in place if that leaves every other block where the core would put it:
        the block's clocks overlap no block's and no dangling origin (so no origin moves to it).
        It then only becomes a leaf: we place it and insert it into the order.

        @return: whether it was added (else the tree is out of date).
        """
        if block.length:
            start, end = _span(key, block)
            if self.index.first(key[1], start, end) is not None:
                return False
            if any(start <= clock <= end for clock in self.dangling.get(key[1], ())):
                return False
            self.index.add(key, block)
        parent, side = self._place(key, block)
        self._attach(key, parent, side)
        siblings = self.roots if parent is None else self.children.get((parent, side), ())
        i = bisect.bisect_left(siblings, key)
        siblings = siblings[:i] + (key,) + siblings[i:]
        if parent is None:
            self.roots = siblings
        else:
            self.children[parent, side] = siblings
        if parent == key or parent in self.unreachable:  # its own parent, or below a cycle
            self.unreachable.add(key)
            return True
        if i + 1 < len(siblings):
            self.order.insert(self.order.index(self._first(siblings[i + 1])), key)
        elif parent is None:
            self.order.append(key)
        elif side == _LEFT:
            self.order.insert(self.order.index(parent), key)
        else:
            after = self._last(siblings[i - 1]) if i else parent
            self.order.insert(self.order.index(after) + 1, key)
        return True

    def _first(self, key: Key) -> Key:
        while (key, _LEFT) in self.children:
            key = self.children[key, _LEFT][0]
        return key

    def _last(self, key: Key) -> Key:
        while (key, _RIGHT) in self.children:
            key = self.children[key, _RIGHT][-1]
        return key


# --- the state -------------------------------------------------------------------------------


class FugueText:
    """
    One Fugue text state.  Parse it with L{parse}, merge others into it with L{merge}, write it
    with L{to_json}; L{text} is what the clients show for it.
    """

    __slots__ = ("client_id", "_clock", "_blocks", "_keys", "_json", "_tree", "_text")

    def __init__(self, client_id: str, clock: int, blocks: dict[Key, _Block]) -> None:
        self.client_id = client_id
        self._clock = clock
        self._blocks = blocks
        #: the keys in id order, as the core writes them
        self._keys = sorted(blocks)
        #: the JSON of each C{[id, block]} entry, once written
        self._json: dict[Key, str] = {}
        self._tree: Optional[_Tree] = None
        self._text: Optional[str] = None

    @classmethod
    def parse(cls, state: Union[str, bytes], like: Optional[FugueText] = None) -> FugueText:
        """
        Read a state as the core's C{fromJSON} does, but stricter where the core never writes
        what it would accept.

        @param like: a state this one probably shares most blocks with (the document's text:
            the SDK sends its whole state on every edit), read then by L{_read_like}.
        @raise TextStateError: for anything else (never another exception).
        """
        if like is not None:
            try:
                read = _read_like(state.decode() if isinstance(state, bytes) else state, like)
            except UnicodeDecodeError:
                read = None
            if read is not None:
                return read
        try:
            value = orjson.loads(state)
        except (orjson.JSONDecodeError, TypeError) as e:
            raise TextStateError(f"not JSON: {e}") from None
        if type(value) is not dict:
            raise TextStateError("not an object")
        entries, clock, client = value.get("blocks"), value.get("clock"), value.get("client_id")
        if type(entries) is not list:
            raise TextStateError("blocks is not an array")
        _check_top(clock, client)
        blocks: dict[Key, _Block] = {}
        for entry in entries:
            key, block = _entry(entry)
            blocks[key] = block  # a repeated key: the last wins, as in the core
        return cls(client, clock["value"], blocks)

    @property
    def clock(self) -> int:
        """The Lamport clock: at least the last clock of every block."""
        return self._clock

    def copy(self) -> FugueText:
        """An independent copy (blocks are immutable and shared), to merge into before a save."""
        other = FugueText.__new__(FugueText)
        other.client_id = self.client_id
        other._clock = self._clock
        other._blocks = self._blocks.copy()
        other._keys = self._keys[:]
        other._json = self._json.copy()
        other._tree = None if self._tree is None else self._tree.copy()
        other._text = self._text
        return other

    def merge(self, other: FugueText) -> bool:
        """
        Merge C{other} in: new blocks are added, a block deleted there is deleted here, and where
        both hold a key with different content the lower L{_rank} is kept.  C{other} is not
        changed.

        @return: whether this state changed.
        """
        blocks = self._blocks
        added: list[tuple[Key, _Block]] = []
        changed = restructured = False
        for key, theirs in other._blocks.items():
            ours = blocks.get(key)
            if ours is None:
                added.append((key, theirs))
                continue
            if ours == theirs:
                continue
            kept = ours
            if ours[:3] != theirs[:3] and _rank(theirs) < _rank(ours):
                kept = theirs._replace(deleted=ours.deleted)
                restructured = True
            if theirs.deleted:
                kept = kept._replace(deleted=True)
            if kept != ours:
                blocks[key] = kept
                self._json.pop(key, None)
                changed = True
        top = max(other._clock, other._keys[-1][0] if other._keys else 0)
        if top > self._clock:
            self._clock = top
            changed = True
        if added:
            added.sort()
            changed = True
            keys = self._keys
            if keys and added[0][0] > keys[-1]:
                keys.extend(key for key, _ in added)
            else:
                for key, _ in added:
                    bisect.insort(keys, key)
            for key, block in added:
                blocks[key] = block
            tree = self._tree
            if tree is not None and not restructured:
                restructured = not all(tree.try_add(key, block) for key, block in added)
        if restructured:
            self._tree = None
        if changed:
            self._text = None
        return changed

    def to_json(self) -> str:
        """The state as the core's C{toJSON} writes it (blocks in id order)."""
        parts = [self._entry_text(key) for key in self._keys]
        return (
            f'{{"blocks":[{",".join(parts)}],"clock":{{"value":{self._clock}}},'
            f'"client_id":{encode_basestring(self.client_id)}}}'
        )

    def _entry_text(self, key: Key) -> str:
        """The JSON of the C{[id, block]} entry of C{key}, written once and kept."""
        part = self._json.get(key)
        if part is None:
            part = self._json[key] = _entry_json(key, self._blocks[key])
        return part

    def text(self) -> str:
        """The text the core shows for this state."""
        if self._text is None:
            if self._tree is None:
                self._tree = _Tree.build(self._keys, self._blocks)
            blocks = self._blocks
            self._text = "".join([b.text for b in map(blocks.__getitem__, self._tree.order) if not b.deleted])
        return self._text

    def __repr__(self) -> str:
        return f"<FugueText {self.client_id!r} clock={self._clock} blocks={len(self._blocks)}>"


#: how the core's C{toJSON} begins a state, and how its blocks end
_HEAD = '{"blocks":['
_TAIL = '],"clock":'
_SCANNER = json.JSONDecoder()
#: entries read one by one before L{_read_like} leaves a state that differs more than it shares
_MOSTLY_LIKE = 32


def _read_like(state: str, like: FugueText) -> Optional[FugueText]:
    """
    L{FugueText.parse} of a state laid out as the core writes it, most of whose entries are
    written exactly as C{like} writes its own: those are recognised by comparing the text (C{like}
    writes each entry once and keeps it), so that only the entries that differ are decoded and
    checked.  A client's state differs from the document's text by its own edits, and reading a
    300 KB state entry by entry was most of the cost of a text write.

    C{None} when the state is laid out otherwise (whitespace, another key order) or anything in
    it is not what the full parse accepts: the full parse then reads it, and says what is wrong.
    An entry equal to one of C{like}'s is exactly what the full parse would have read there.
    """
    if not state.startswith(_HEAD):
        return None
    keys, known = like._keys, like._blocks
    blocks: dict[Key, _Block] = {}
    i, pos, read = 0, len(_HEAD), 0
    more = not state.startswith("]", pos)
    while more:
        part = like._entry_text(keys[i]) if i < len(keys) else None
        if part is not None and state.startswith(part, pos):
            blocks[keys[i]] = known[keys[i]]
            i += 1
            pos += len(part)
        else:
            read += 1
            if read > _MOSTLY_LIKE and 2 * read > len(blocks):  # more read than recognised
                return None  # not much like C{like}: the full parse is faster
            try:
                end = _SCANNER.raw_decode(state, pos)[1]  # only where the entry ends: orjson reads it
                key, block = _entry(orjson.loads(state[pos:end]))
            except (ValueError, TextStateError):  # orjson's JSONDecodeError is a ValueError
                return None
            blocks[key] = block
            i = bisect.bisect_right(keys, key)
            pos = end
        more = state.startswith(",", pos)
        pos += more
    if not state.startswith(_TAIL, pos):
        return None
    try:
        top = orjson.loads("{" + state[pos + 2 :])
    except orjson.JSONDecodeError:
        return None
    if type(top) is not dict or top.keys() != {"clock", "client_id"}:
        return None
    try:
        _check_top(top["clock"], top["client_id"])
    except TextStateError:
        return None
    return FugueText(top["client_id"], top["clock"]["value"], blocks)
