"""Node-local fan-out: channel group -> subscribers, each written the same pre-encoded bytes.

Subscribers are kept per serializer so a message is encoded at most once per wire format and
the loop over recipients only calls their transport's ``write`` with a shared ``bytes`` object.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Iterator

from .protocol.codec import Outbound, Serializer
from .protocol.presence import PresenceState, RefMaker

__all__ = ["Group", "Hub", "Writer"]

Writer = Callable[[bytes], object]


class Group:
    """Everyone joined to one channel group (public or private sub-topic) on this node."""

    __slots__ = ("key", "presence", "topic", "v1", "v2")

    def __init__(self, key: str, topic: str) -> None:
        self.key = key
        self.topic = topic
        self.v1: dict[Hashable, Writer] = {}
        self.v2: dict[Hashable, Writer] = {}
        self.presence: PresenceState | None = None

    def __len__(self) -> int:
        return len(self.v1) + len(self.v2)

    def members(self) -> Iterator[Hashable]:
        """Every subscribed member."""
        yield from self.v1
        yield from self.v2


class Hub:
    """Topic groups of this node."""

    __slots__ = ("groups", "refs")

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.refs = RefMaker()

    def add(self, key: str, topic: str, member: Hashable, serializer: Serializer, write: Writer) -> Group:
        """Subscribe ``member`` (written through ``write``) to the group ``key``."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key, topic)
        (group.v2 if serializer is Serializer.V2 else group.v1)[member] = write
        return group

    def remove(self, key: str, member: Hashable) -> Group | None:
        """Unsubscribe ``member``; the group is forgotten once empty. Returns the group, if any."""
        group = self.groups.get(key)
        if group is None:
            return None
        group.v1.pop(member, None)
        group.v2.pop(member, None)
        if not group.v1 and not group.v2 and not group.presence:
            del self.groups[key]
        return group

    def presence(self, key: str) -> PresenceState | None:
        """The presence state of ``key``, if anybody tracks there."""
        group = self.groups.get(key)
        return None if group is None else group.presence

    def presence_for(self, group: Group) -> PresenceState:
        """The presence state of ``group``, created on first use."""
        if group.presence is None:
            group.presence = PresenceState(self.refs)
        return group.presence

    def fanout(
        self,
        key: str,
        out: Outbound,
        exclude: Hashable | None = None,
        skip: Container[Hashable] | None = None,
    ) -> int:
        """Write ``out`` to every member of ``key`` except ``exclude`` and the members in ``skip``
        (those that may not read it, or have it already); returns the deliveries.

        A member whose write raises (its transport died under us) is dropped from the group.
        """
        group = self.groups.get(key)
        if group is None:
            return 0
        sent = 0
        broken: list[Hashable] = []
        for subs, frame in (
            (group.v2, out.frame_v2() if group.v2 else None),
            (group.v1, out.frame_v1() if group.v1 else None),
        ):
            if not subs or frame is None:
                continue
            if skip:
                for member, write in subs.items():
                    if member is not exclude and member not in skip:
                        sent += 1
                        try:
                            write(frame)
                        except Exception:
                            broken.append(member)
                continue
            for member, write in subs.items():
                if member is not exclude:
                    try:
                        write(frame)
                    except Exception:
                        broken.append(member)
            sent += len(subs) - (exclude in subs)
        for member in broken:
            self.remove(key, member)
        return sent - len(broken)
