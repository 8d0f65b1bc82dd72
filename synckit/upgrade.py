"""
The listening port's protocol factory: a connection whose first read is a whole WebSocket
upgrade request for one of the WebSocket paths goes straight to that path's Autobahn factory;
every other connection goes to the twisted.web site.

Through twisted.web an upgrade is parsed twice: by twisted.web into a Request (header objects,
the security headers, resource traversal), then by Autobahn again, from bytes that
C{WebSocketResource} rebuilds out of that Request.  The first pass was about 40% of the CPU of
accepting a WebSocket connection.  Autobahn parses and answers the handshake itself either way.
The site mounts the same factories, so an upgrade this router leaves to it (one split across
reads, or a second request on a kept-alive HTTP connection) is served as before.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

from twisted.internet.interfaces import IAddress, IProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.web.server import Site

# An "Upgrade: websocket" header line (RFC 6455 section 4.1: the value is case-insensitive).
_UPGRADE = re.compile(rb"^upgrade:[ \t]*websocket[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


class UpgradeRouter(Factory):
    """
    @param websockets: the WebSocket factories by request path (C{b"/ws"}), which the site must
        also serve.
    """

    def __init__(self, site: Site, websockets: Mapping[bytes, Factory]) -> None:
        self.site = site
        self._websockets = dict(websockets)

    def buildProtocol(self, addr: IAddress) -> Optional[Protocol]:
        return _FirstRead(self, addr)

    def route(self, data: bytes) -> Factory:
        """The factory for a connection whose first read was C{data}."""
        head, end, _ = data.partition(b"\r\n\r\n")
        if end:
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            if len(parts) == 3 and parts[0] == b"GET":
                factory = self._websockets.get(parts[1].partition(b"?")[0])
                if factory is not None and _UPGRADE.search(headers):
                    return factory
        return self.site


class _FirstRead(Protocol, TimeoutMixin):
    """
    Waits for a connection's first bytes, then hands the connection over to the protocol they
    call for.  A client that sends nothing is dropped after the site's idle timeout, as the site
    would drop it.
    """

    def __init__(self, router: UpgradeRouter, addr: IAddress) -> None:
        self._router = router
        self._addr = addr
        self.callLater = router.site.reactor.callLater  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        self.setTimeout(self._router.site.timeOut)

    def dataReceived(self, data: bytes) -> None:
        self.setTimeout(None)
        protocol: IProtocol = self._router.route(data).buildProtocol(self._addr)
        self.transport.protocol = protocol  # type: ignore[attr-defined]
        protocol.makeConnection(self.transport)
        protocol.dataReceived(data)

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)
