"""
Fugue text states as SyncKit's SyncText makes them, for the ``text`` scenario: a pre-filled
document, and a client's local inserts into its replica of it.

L{synckit.sync.fugue} reads, merges and writes states, but makes no local edit (the server never
types).  So an insert is written here as the state holding just its new block, the way the tests'
state builders write blocks, and merged into the replica with L{FugueText.merge}: the replica then
holds what the core's insert would have added, and its L{FugueText.to_json} is the state the SDK
would send.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from synckit.sync.fugue import FugueText, grapheme_count

#: A character's id, as origins name it: (clock, client id); the offset is always 0.
Char = tuple[int, str]
#: A block to write: (the clock of its last character, client id, text, left origin, right origin).
BlockSpec = tuple[int, str, str, Optional[Char], Optional[Char]]

#: Who typed the pre-filled document, in turns.
AUTHORS = ("alice", "bob", "carol")
WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt".split()


def _node(char: Char) -> dict[str, object]:
    return {"client_id": char[1], "clock": char[0], "offset": 0}


def state_json(client_id: str, blocks: Sequence[BlockSpec]) -> str:
    """A state as the core writes it, holding C{blocks} (none deleted), its clock their largest."""
    entries = [
        [_node((clock, client)), {
            "id": _node((clock, client)), "text": text, "left_origin": left and _node(left),
            "right_origin": right and _node(right), "deleted": False,
        }]
        for clock, client, text, left, right in sorted(blocks, key=lambda b: (b[0], b[1]))
    ]  # fmt: skip
    top = max((b[0] for b in blocks), default=0)
    return json.dumps({"blocks": entries, "clock": {"value": top}, "client_id": client_id}, separators=(",", ":"))


def insert(replica: FugueText, client_id: str, text: str, left: Optional[Char], right: Optional[Char]) -> None:
    """
    Type C{text} into C{replica} between the characters C{left} and C{right} (C{None}: the start
    or the end), as the core's insert does: one new block of C{client_id}'s, whose characters take
    the clocks just above the replica's.
    """
    clock = replica.clock + grapheme_count(text)
    replica.merge(FugueText.parse(state_json(client_id, [(clock, client_id, text, left, right)])))


@dataclass(frozen=True)
class Prefill:
    """A document as its authors typed it: its state, and every character's id in text order."""

    state: str
    order: tuple[Char, ...]

    def between(self, position: int) -> tuple[Optional[Char], Optional[Char]]:
        """The characters either side of C{position} (0 to the length) of the pre-filled text."""
        left = self.order[position - 1] if position > 0 else None
        right = self.order[position] if position < len(self.order) else None
        return left, right


def prefill(chars: int, seed: int = 0) -> Prefill:
    """
    About C{chars} characters typed front to back by L{AUTHORS} in turns, 20-80 characters an
    insert, each merging the others' work first: a block per insert, as a shared document has.
    The same C{seed} gives the same document in every worker process.
    """
    rng = random.Random(seed)
    blocks: list[BlockSpec] = []
    order: list[Char] = []
    clock = 0
    while len(order) < chars:
        text = " ".join(rng.choices(WORDS, k=12))[: rng.randint(20, 80)]
        author = AUTHORS[len(blocks) % len(AUTHORS)]
        blocks.append((clock + len(text), author, text, order[-1] if order else None, None))
        order += [(clock + n, author) for n in range(1, len(text) + 1)]
        clock += len(text)
    return Prefill(state_json(AUTHORS[0], blocks), tuple(order))
