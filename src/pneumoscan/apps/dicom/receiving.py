"""What the DICOM node lets in: instances received to disk a chunk at a time with a byte limit, and connections per peer.

By default pynetdicom assembles each C-STORE's dataset in memory (a 400 MB instance cost the node
+787 MB, three at once +2.4 GB, and no size was checked before the whole was read). With its
chunked receive (``STORE_RECV_CHUNKED_DATASET``) it writes the P-DATA fragments to a file as they
come; :class:`Receipts` makes that file, in the node's own ``receiving/`` folder, and stops
writing once an instance passes the byte limit (the rest of it is read from the network and
dropped), so the node answers it with a failure status and has held neither it in memory nor
more than the limit on disk. A connection that is aborted half-way leaves its partial file,
which the association's close removes.

DICOM itself has no passwords, and a TCP connection that never sends an A-ASSOCIATE-RQ still
takes an association slot until pynetdicom's ARTIM timer ends it (30 s by default): 50 idle
connections kept the listed modality out. :class:`GuardedAssociationServer` refuses a peer's
connection beyond a few at once, before any slot is taken, and the node sets a short ARTIM timeout.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pneumoscan.dicom")

PARTIAL_SUFFIX = ".part"


class BoundedFile:
    """The file pynetdicom writes one received dataset into (it asks for ``name``, ``write``, ``file.flush``, ``close``)."""

    def __init__(self, folder: Path, limit: int):
        descriptor, name = tempfile.mkstemp(dir=folder, suffix=PARTIAL_SUFFIX)
        self.name = name
        self.file = os.fdopen(descriptor, "wb")
        self.limit = limit
        self.received = 0

    @property
    def over_limit(self) -> bool:
        return self.received > self.limit

    def write(self, data: bytes) -> int:
        """Past the limit the bytes are counted and dropped: the sender finishes, and gets a failure status."""
        was_over = self.over_limit
        self.received += len(data)
        if self.over_limit:
            if not was_over:
                self.file.truncate(0)  # nothing of an instance that will be refused is kept
            return len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


@dataclass
class Receipts:
    """Where and how much the node receives, per instance and per association; cleans up after an abort.

    pynetdicom writes a dataset from its DUL thread (whose ``assoc`` is the association) and calls the
    C-STORE handler from the association's own: files are therefore kept per association.
    """

    folder: Path
    max_instance_bytes: int
    max_association_bytes: int
    open_files: dict[int, dict[str, BoundedFile]] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)  # bytes of the instances each association has sent
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for partial in self.folder.glob(f"*{PARTIAL_SUFFIX}"):  # left by a crash in the middle of a transfer
            partial.unlink(missing_ok=True)

    def new_file(self, *_args: object, **_kwargs: object) -> BoundedFile:
        """Stands in for ``tempfile.NamedTemporaryFile`` in pynetdicom's chunked receive."""
        key = id(getattr(threading.current_thread(), "assoc", None))
        with self.lock:
            room = self.max_association_bytes - self.received.get(key, 0)
            bounded = BoundedFile(self.folder, max(0, min(self.max_instance_bytes, room)))
            self.open_files.setdefault(key, {})[bounded.name] = bounded
        return bounded

    def claim(self, association: object, path: Path) -> BoundedFile | None:
        """The file of a dataset the C-STORE handler now has: counted, and no longer the association's to clean up."""
        with self.lock:
            bounded = self.open_files.get(id(association), {}).pop(str(path), None)
            if bounded is not None:
                self.received[id(association)] = self.received.get(id(association), 0) + bounded.received
        return bounded

    def discard_unclaimed(self, association: object) -> None:
        """At an association's close: what it was receiving when it was cut off is deleted."""
        with self.lock:
            leftovers = self.open_files.pop(id(association), {})
            self.received.pop(id(association), None)
        for bounded in leftovers.values():
            bounded.close()
            Path(bounded.name).unlink(missing_ok=True)
        if leftovers:
            log.info("an association closed in the middle of %d instance(s); the partial data was deleted", len(leftovers))


def receive_chunked_into(receipts: Receipts) -> None:
    """Make pynetdicom write received datasets through ``receipts`` (process-wide: one node per process)."""
    from pynetdicom import _config, dimse_messages

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = receipts.new_file  # type: ignore[attr-defined]


def guarded_server_class(max_connections_per_peer: int):  # type: ignore[no-untyped-def]
    """pynetdicom's threaded server, refusing a peer's connection beyond ``max_connections_per_peer`` at once."""
    from pynetdicom.transport import ThreadedAssociationServer

    class GuardedAssociationServer(ThreadedAssociationServer):
        def verify_request(self, request, client_address) -> bool:  # type: ignore[no-untyped-def]
            peer = client_address[0] if isinstance(client_address, tuple) else str(client_address)
            held = sum(1 for association in self.active_associations if peer_of(association) == peer)
            if held >= max_connections_per_peer:
                log.warning("refused a connection from %s: it already holds %d (the most one peer may)", peer, held)
                return False
            return True

    return GuardedAssociationServer


def peer_of(association) -> str | None:  # type: ignore[no-untyped-def]
    """The address an association's connection comes from, or None once it is closed."""
    try:
        return str(association.dul.socket.socket.getpeername()[0])
    except (AttributeError, OSError, TypeError):
        return None
