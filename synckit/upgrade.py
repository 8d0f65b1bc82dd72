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

Each connection's protocol is a L{Routed} wrapper for the whole of its life: the protocol its
first read calls for is connected to the wrapper, never to the transport underneath.  So the
router works the same over any endpoint (TCP, TLS, a unix socket, a socket from systemd)
without knowing what the transport is: TLS, for one, is itself a protocol wrapper, and a
transport's own C{protocol} attribute is no interface to hand a connection over by.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

from twisted.internet.interfaces import IAddress, IProtocol, IProtocolNegotiationFactory, ISSLTransport, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import directlyProvides, implementer, providedBy

# An "Upgrade: websocket" header line (RFC 6455 section 4.1: the value is case-insensitive).
_UPGRADE = re.compile(rb"^upgrade:[ \t]*websocket[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


class Routed(ProtocolWrapper, TimeoutMixin):
    """
    One connection: waits for its first bytes, then connects the protocol they call for to
    itself, and relays to it from then on.  A client that sends nothing is dropped after the
    site's idle timeout, as the site would drop it.

    C{WebSocketResource} (a WebSocket upgrade on a kept-alive HTTP connection) hands the
    connection over too, by setting C{wrappedProtocol}, as it does on any protocol wrapper (an
    Autobahn detail that tests/test_dependencies.py checks).

    The wrapper provides every interface its transport provides but L{ISSLTransport}: Autobahn
    takes a transport that claims TLS to be Twisted's TLS protocol itself, whose TLS channel
    binding it reads, and fails on any other.  So over TLS, Autobahn and twisted.web see a plain
    stream; what they would read from TLS (the channel binding, a client certificate,
    C{Request.isSecure}) is nothing synckit uses.
    """

    factory: "UpgradeRouter"
    wrappedProtocol: Optional[IProtocol]  # type: ignore[assignment]

    def __init__(self, router: "UpgradeRouter", addr: IAddress) -> None:
        super().__init__(router, None)  # type: ignore[arg-type]
        self._addr = addr
        self.callLater = router.site.reactor.callLater  # type: ignore[attr-defined]

    def logPrefix(self) -> str:
        return type(self).__name__

    def makeConnection(self, transport: ITransport) -> None:
        # As ProtocolWrapper's, but not claiming TLS (above), with no protocol connected yet,
        # and no register of connections in the router.
        directlyProvides(self, *(i for i in providedBy(transport).flattened() if not i.isOrExtends(ISSLTransport)))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.setTimeout(self.factory.site.timeOut)

    def dataReceived(self, data: bytes) -> None:
        protocol = self.wrappedProtocol
        if protocol is None:
            self.setTimeout(None)
            protocol = self.factory.route(data).buildProtocol(self._addr)
            self.wrappedProtocol = protocol
            protocol.makeConnection(self)
        protocol.dataReceived(data)

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure) -> None:
        self.setTimeout(None)
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


@implementer(IProtocolNegotiationFactory)
class UpgradeRouter(Factory):
    """
    @param websockets: the WebSocket factories by request path (C{b"/ws"}), which the site must
        also serve.
    """

    protocol = Routed  # type: ignore[assignment]

    def __init__(self, site: Site, websockets: Mapping[bytes, Factory]) -> None:
        self.site = site
        self._websockets = dict(websockets)

    def buildProtocol(self, addr: IAddress) -> Optional[Protocol]:
        return self.protocol(self, addr)  # type: ignore[call-arg]

    def acceptableProtocols(self) -> list[bytes]:
        """
        What a TLS endpoint offers over ALPN: HTTP/1.1, the one that carries WebSocket upgrades.
        Twisted's TLS fails the handshake of any client that offers ALPN (every browser does)
        when the factory offers nothing.
        """
        return [b"http/1.1"]

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
