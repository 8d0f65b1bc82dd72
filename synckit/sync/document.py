"""
One document: a flat map of fields with per-field last-writer-wins, and a vector clock.

PROTOCOL.md section 6.  The reference compares writes by (server time, writer's counter,
writer id), and because it processes writes one after another, the effective rule is "the write
the server processes later wins" except for ties inside one millisecond, where a later write can
lose to an earlier one with a higher counter.  We keep the same triple but stamp each local write
with a hybrid logical time (at least the current millisecond, and strictly later than the stamp it
replaces), so a write processed later always wins, even inside one millisecond.  Stamps from
another instance (pub/sub) are compared with the same triple, so every instance orders the same
pair of writes the same way.

Deleted fields leave the visible map at once; their stamp is kept so that a delayed remote write
older than the delete cannot bring them back.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

#: The value a client writes to delete a field, and the value broadcast when a delete wins.
TOMBSTONE: dict[str, bool] = {"__deleted": True}

#: (server ms, writer's counter after this write, writer id): compared as a tuple.
Stamp = tuple[int, int, str]

#: A field's stamp and value before a write, for L{Document.undo}; the value may be _ABSENT.
Prior = tuple[Optional[Stamp], Any]
_ABSENT = object()

#: Stamp of a field restored from storage: any new write beats it (PROTOCOL.md section 6.8).
RESTORED: Stamp = (0, 0, "storage")


def is_tombstone(value: Any) -> bool:
    """A non-null object whose ``__deleted`` member is exactly C{True} (extra keys are fine)."""
    return isinstance(value, dict) and value.get("__deleted") is True


#: Largest clock counter accepted from a client: JavaScript's largest exact integer.  A larger
#: one could be ticked past what the JSON encoder (and every JavaScript client) can represent,
#: and the document could no longer be sent to anyone.
MAX_COUNTER = 2**53 - 1


def merge_clock(into: dict[str, int], other: Any) -> None:
    """
    Element-wise maximum of C{other} into C{into}.  Entries that are not integers from 0 to
    L{MAX_COUNTER} are ignored (PROTOCOL.md R-3), as is anything that is not an object.
    """
    if not isinstance(other, dict):
        return
    for key, value in other.items():
        if type(value) is int and 0 <= value <= MAX_COUNTER and value > into.get(key, -1):
            into[key] = value


class Document:
    """
    The live state of one document.

    @ivar fields: visible field values; deleted fields are absent, C{None} is a value.
    @ivar clock: the document's vector clock, writer id -> counter.
    @ivar last_modified: client-supplied timestamp (ms) of the last write, for C{/health}.
    @ivar text: text-CRDT state C{(crdt JSON string, clock)} or C{None}.
    """

    __slots__ = ("id", "fields", "clock", "last_modified", "text", "_stamps")

    def __init__(
        self,
        doc_id: str,
        fields: Optional[Mapping[str, Any]] = None,
        clock: Optional[Mapping[str, int]] = None,
        text: Optional[tuple[str, float]] = None,
        stamps: Optional[Mapping[str, Stamp]] = None,
    ) -> None:
        self.id = doc_id
        self.fields: dict[str, Any] = dict(fields or {})
        self.clock: dict[str, int] = dict(clock or {})
        self.last_modified: Optional[int] = None
        self.text = text
        self._stamps: dict[str, Stamp] = {name: RESTORED for name in self.fields}
        self._stamps.update(stamps or {})

    def write(self, field: str, value: Any, writer: str, now_ms: int) -> tuple[Any, Stamp]:
        """
        Apply a write by local connection C{writer}: tick its clock entry, stamp it later than
        the value it replaces, and store it (a tombstone deletes).

        @return: the authoritative value to broadcast (C{TOMBSTONE} for a delete) and the stamp.
        """
        counter = self.clock.get(writer, 0) + 1
        self.clock[writer] = counter
        previous = self._stamps.get(field)
        ts = now_ms if previous is None or previous[0] < now_ms else previous[0] + 1
        stamp = (ts, counter, writer)
        return self._store(field, value, stamp), stamp

    def undo(self, field: str, stamp: Stamp, prior: "Prior") -> None:
        """
        Take back the write stamped C{stamp} (one that could not be saved), restoring C{prior},
        unless a later write has replaced it since.
        """
        if self._stamps.get(field) != stamp:
            return
        prior_stamp, prior_value = prior
        if prior_stamp is None:
            del self._stamps[field]
        else:
            self._stamps[field] = prior_stamp
        if prior_value is _ABSENT:
            self.fields.pop(field, None)
        else:
            self.fields[field] = prior_value

    def prior(self, field: str) -> "Prior":
        """What L{undo} needs to restore C{field} as it is now."""
        return self._stamps.get(field), self.fields.get(field, _ABSENT)

    def merge(self, field: str, value: Any, stamp: Stamp) -> bool:
        """
        Apply a write made elsewhere (another instance) if it is newer than what is stored.

        @return: whether it was applied (else the stored value won).
        """
        previous = self._stamps.get(field)
        if previous is not None and previous >= stamp:
            return False
        self._store(field, value, stamp)
        return True

    def _store(self, field: str, value: Any, stamp: Stamp) -> Any:
        self._stamps[field] = stamp
        if is_tombstone(value):
            self.fields.pop(field, None)
            return TOMBSTONE
        self.fields[field] = value
        return value

    def merge_clock(self, other: Any) -> None:
        merge_clock(self.clock, other)

    def reset(self) -> None:
        """Forget all state (the test reset endpoint), keeping the object its subscribers hold."""
        self.fields = {}
        self._stamps = {}
        self.clock = {}
        self.last_modified = None
        self.text = None
