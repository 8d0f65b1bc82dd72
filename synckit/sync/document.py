"""
One document: a flat map of fields with per-field last-writer-wins, a vector clock, and the
text CRDT state that SyncText and RichText clients share.

The reference compares writes by (server time, writer's counter, writer id), and because it
processes writes one after another, the effective rule is "the write the server processes later
wins" except for ties inside one millisecond, where a later write can lose to an earlier one with
a higher counter.  We keep the same triple but stamp each local write with a hybrid logical time
(at least the current millisecond, and strictly later than any stamp the field has had or has
been promised), so a write processed later always wins, even inside one millisecond.  Stamps from
another instance (pub/sub) or from storage are compared with the same triple, so every instance
orders the same pair of writes the same way.

A document only ever shows what storage has confirmed (see L{synckit.sync.engine}): a local
write is first given its stamps (L{Document.stamp}, which changes nothing visible), saved, and
only then merged in by L{Document.merge}, the same merge that applies other instances' writes.

Deleted fields leave the visible map at once; their stamp is kept, for the tombstone retention
(docs/data-lifecycle.md), so that a delayed remote write older than the delete cannot bring them
back.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

from synckit.sync.fugue import FugueText

#: The value a client writes to delete a field, and the value broadcast when a delete wins.
TOMBSTONE: dict[str, bool] = {"__deleted": True}

#: (server ms, writer's counter after this write, writer id): compared as a tuple.
Stamp = tuple[int, int, str]

#: Stamp of a field restored from storage without one: any new write beats it.
RESTORED: Stamp = (0, 0, "storage")


def is_tombstone(value: Any) -> bool:
    """A non-null object whose ``__deleted`` member is exactly C{True} (extra keys are fine)."""
    return isinstance(value, dict) and value.get("__deleted") is True


#: Largest clock counter accepted from a client: JavaScript's largest exact integer.  A larger
#: one could be ticked past what the JSON encoder (and every JavaScript client) can represent,
#: and the document could no longer be sent to anyone.
MAX_COUNTER = 2**53 - 1


#: The clock entry that orders the field values the server sends (see L{Document.served_clock}).
SERVER_CLOCK = "~server"


#: Most entries a merge lets a document's clock have.  Every broadcast and every answer carries
#: the whole clock, so a client that sends one with thousands of entries would otherwise make
#: each later message about the document that much larger, for every subscriber and instance.
#: Writers' own entries are set by the engine, not merged, and are kept beyond this bound: a
#: writer's counter orders its writes.  Storage loads the most recently raised entries up to it.
MAX_CLOCK_ENTRIES = 256

#: Longest writer id a merge takes into a clock (ours and the ids the SDK generates are under 40
#: characters).
MAX_CLOCK_KEY = 128


def merge_clock(into: dict[str, int], other: Any) -> bool:
    """
    Element-wise maximum of C{other} into C{into}.  Entries that are not integers from 0 to
    L{MAX_COUNTER} are ignored, as is anything that is not an object.  Entries C{into} has are
    raised whatever its size; new ones are added only while it has fewer than
    L{MAX_CLOCK_ENTRIES}, and only with keys of at most L{MAX_CLOCK_KEY} characters.

    @return: whether C{into} changed.
    """
    if not isinstance(other, dict):
        return False
    changed = False
    for key, value in other.items():
        if type(value) is not int or not 0 <= value <= MAX_COUNTER:
            continue
        previous = into.get(key)
        if previous is None and (len(into) >= MAX_CLOCK_ENTRIES or len(key) > MAX_CLOCK_KEY):
            continue
        if previous is None or value > previous:
            into[key] = value
            changed = True
    return changed


def collect_tombstones(stamps: dict[str, Stamp], fields: Mapping[str, Any], before_ms: float) -> int:
    """
    Remove from C{stamps} those of fields absent from C{fields} (deleted) stamped before
    C{before_ms}; return how many.
    """
    old = [name for name, stamp in stamps.items() if name not in fields and stamp[0] < before_ms]
    for name in old:
        del stamps[name]
    return len(old)


class Text(NamedTuple):
    """A document's text: the Fugue CRDT state and the text clock (ms, an integer)."""

    state: FugueText
    clock: int


class Document:
    """
    The live, confirmed state of one document.

    @ivar fields: visible field values; deleted fields are absent, C{None} is a value.
    @ivar clock: the document's vector clock, writer id -> counter.
    @ivar last_modified: client-supplied timestamp (ms) of the last write, for C{/health}.
    @ivar text: the text CRDT state, or C{None} if no text was ever written.
    @ivar stale: storage may hold writes this object lacks (a save whose outcome is unknown):
        it must be re-read before it is served again.
    """

    __slots__ = ("id", "fields", "clock", "last_modified", "text", "stale", "_stamps", "_promised")

    def __init__(
        self,
        doc_id: str,
        fields: Optional[Mapping[str, Any]] = None,
        clock: Optional[Mapping[str, int]] = None,
        text: Optional[Text] = None,
        stamps: Optional[Mapping[str, Stamp]] = None,
    ) -> None:
        self.id = doc_id
        self.fields: dict[str, Any] = dict(fields or {})
        self.clock: dict[str, int] = dict(clock or {})
        self.last_modified: Optional[int] = None
        self.text = text
        self.stale = False
        self._stamps: dict[str, Stamp] = {name: RESTORED for name in self.fields}
        self._stamps.update(stamps or {})
        #: the latest stamp given to a write of each field that is still being saved
        self._promised: dict[str, Stamp] = {}

    def stamp(self, field: str, writer: str, counter: int, now_ms: int) -> Stamp:
        """
        The stamp for a new local write of C{field}: later than the field's stamp and than any
        stamp already promised to a write still being saved, so that of two writes the one
        processed later wins whichever is saved first.  Nothing visible changes.
        """
        previous = max(self._stamps.get(field, RESTORED), self._promised.get(field, RESTORED))
        ts = now_ms if previous[0] < now_ms else previous[0] + 1
        stamp = (ts, counter, writer)
        self._promised[field] = stamp
        return stamp

    def settle(self, field: str, stamp: Stamp) -> None:
        """The write stamped C{stamp} was saved, or failed: it need not be outbid any more."""
        if self._promised.get(field) == stamp:
            del self._promised[field]

    def merge(self, field: str, value: Any, stamp: Stamp) -> bool:
        """
        Apply a confirmed write (ours once saved, another instance's, or storage's) if it is
        newer than what is shown.

        @return: whether it was applied (else the shown value won).
        """
        previous = self._stamps.get(field)
        if previous is not None and previous >= stamp:
            return False
        self._stamps[field] = stamp
        if is_tombstone(value):
            self.fields.pop(field, None)
        else:
            self.fields[field] = value
        return True

    def merge_clock(self, other: Any) -> bool:
        return merge_clock(self.clock, other)

    def collect_tombstones(self, before_ms: int) -> int:
        """
        Forget the stamps of deleted fields stamped before C{before_ms}, as storage forgets them
        (docs/data-lifecycle.md): a document cached for months must not keep every field name
        ever deleted.  A write of such a field older than its delete can then show it again;
        the tombstone retention is set far beyond how late such a write can arrive.

        @return: how many were forgotten.
        """
        return collect_tombstones(self._stamps, self.fields, before_ms)

    def served_clock(self, now_ms: int) -> dict[str, int]:
        """
        The clock to send with field values, raised first so that its largest entry is larger
        than in anything sent before.

        SyncKit's SDK applies each field value it receives through its own last-writer-wins,
        stamped with the largest entry of the message's clock and the writer "server", and
        breaks ties by comparing the values: where two messages carried the same largest entry,
        a later value that sorts lower would be dropped for good.  The L{SERVER_CLOCK} entry,
        at least the current time in ms and one more than every entry, makes each message
        outrank the ones before it, also across instances (clocks merge by maximum) and
        restarts (time moves on).
        """
        clock = self.clock
        clock[SERVER_CLOCK] = min(MAX_COUNTER, max(now_ms, max(clock.values(), default=0) + 1))
        return clock

    def merge_text(self, text: Text) -> bool:
        """
        Merge confirmed text state in (the Fugue merge is commutative and idempotent, so the
        order in which saves and other instances' publications arrive does not matter).  The
        document takes C{text} over: the caller must not change it afterwards.

        @return: whether the text state changed.
        """
        if self.text is None:
            self.text = text
            return True
        changed = self.text.state.merge(text.state)
        if text.clock > self.text.clock:
            self.text = Text(self.text.state, text.clock)
        return changed

    def reset(self) -> None:
        """Forget all state (the test reset endpoint), keeping the object its subscribers hold."""
        self.fields = {}
        self._stamps = {}
        self._promised = {}
        self.clock = {}
        self.last_modified = None
        self.text = None
        self.stale = False
