"""
The server's settings, from the command line, the environment, a config file and defaults, in
that order of precedence.

Every setting is declared once in L{SETTINGS}: its option name (``--port``, and the key in the
config file's ``[synckit]`` section), the environment variable the reference server reads, how
its text is parsed and checked, and its help.  Any bad value raises L{ConfigError} naming the
setting and where the value came from, so twistd fails before the reactor starts.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from twisted.internet.endpoints import quoteStringArgument

DEFAULT_JWT_SECRET = "development-secret-do-not-use-in-production"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Config:
    port: int = 8080
    host: str = "0.0.0.0"
    listen: tuple[str, ...] = ()
    node_env: str = "development"
    jwt_secret: str = DEFAULT_JWT_SECRET
    jwt_expires_in: int = 24 * 3600
    jwt_refresh_expires_in: int = 7 * 24 * 3600
    auth_required: bool = True
    api_keys: tuple[str, ...] = ()
    max_connections_per_ip: int = 50
    max_messages_per_minute: int = 500
    max_connections: int = 10_000
    heartbeat_interval: int = 30_000
    max_message_size: int = 2_000_000
    max_frame_size: int = 16 * 1024 * 1024
    cors_origin: str = "*"
    document_cache_size: int = 1000
    awareness_timeout: int = 30_000
    legacy_field_deltas: bool = True
    demo_allow_list: bool = False
    test_endpoints: bool = False
    database: Optional[str] = None
    database_pool_size: int = 10
    auto_migrate: bool = False
    redis: Optional[str] = None
    redis_prefix: str = "synckit:"
    backend_timeout: int = 5000
    metrics_port: Optional[int] = None
    metrics_host: str = "127.0.0.1"
    metrics_listen: tuple[str, ...] = ()
    echo_endpoint: bool = False
    demo_login: bool = False
    jwt_public_key_file: Optional[str] = None
    jwks_url: Optional[str] = None
    jwt_issuer: Optional[str] = None
    jwt_audience: tuple[str, ...] = ()
    jwt_leeway: int = 0
    jwt_user_claim: tuple[str, ...] = ("userId", "sub")
    jwt_permissions_claim: str = "permissions"
    trusted_proxies: tuple[IPNetwork | str, ...] = ()
    max_http_connections_per_ip: Optional[int] = None
    http_header_timeout: int = 10_000
    http_idle_timeout: int = 60_000
    max_http_body_size: int = 64 * 1024
    max_send_queue: int = 16 * 1024 * 1024
    max_invalid_messages_per_minute: int = 100
    auth_timeout: int = 30_000
    max_chunk_memory: int = 64 * 1024 * 1024
    max_presence_size: int = 16 * 1024
    max_presence_per_document: int = 1000
    max_presence_per_connection: int = 100
    max_ops_per_message: int = 1000
    deltas_retention: int = 30 * 24 * 3600
    tombstone_retention: int = 7 * 24 * 3600
    cleanup_interval: int = 3600
    state_sync_interval: int = 1


# Parsers: text -> value, raising ValueError with a short reason.


def _integer(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def _boolean(text: str) -> bool:
    """
    Exactly ``true`` or ``false``.  The reference turns auth off only for the exact string
    ``false``; anything else that looks like a boolean is refused rather than guessed at.
    """
    if text in ("true", "false"):
        return text == "true"
    raise ValueError("must be true or false")


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _secret(text: str) -> str:
    """Taken as it is: trimming would change the key, and tokens signed with it elsewhere."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        url = text.strip()
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in schemes or not rest:
            raise ValueError("must be a URL starting " + " or ".join(f"{s}://" for s in schemes))
        return url

    return parse


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _some_words(text: str) -> tuple[str, ...]:
    """A list that, unlike api-keys, is set only to say something: blank is a mistake."""
    words = _words(text)
    if not words:
        raise ValueError("must not be empty")
    return words


def _networks(text: str) -> tuple[IPNetwork | str, ...]:
    """
    Comma-separated addresses or CIDR blocks (an address is a block of one), and ``unix`` for
    whatever connects through a unix socket.
    """
    networks: list[IPNetwork | str] = []
    for word in _some_words(text):
        if word == "unix":
            networks.append(word)
            continue
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"'{word}' is not an IP address or CIDR block") from None
    return tuple(networks)


def _endpoints(text: str) -> tuple[str, ...]:
    """
    Twisted server endpoint strings, separated by commas or spaces.  Only split here: each is
    parsed with the reactor by C{synckit.service.check_endpoints} before twistd runs anything
    (an ``ssl:`` endpoint reads its key, a ``systemd:`` one looks for its socket, and neither
    belongs to another program reading this configuration, such as synckit-migrate).
    """
    endpoints = tuple(word for word in re.split(r"[,\s]+", text) if word)
    if not endpoints:
        raise ValueError("must not be empty")
    return endpoints


def _public_key_file(text: str) -> str:
    """
    A PEM public key file, read and parsed now so that a missing, unreadable or wrong file stops
    the server before it listens rather than failing every login.
    """
    from synckit.auth import load_public_key

    path = text.strip()
    try:
        load_public_key(path)
    except OSError as e:
        raise ValueError(e.strerror) from None
    return path


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip() not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return text.strip()

    return parse


_UNITS = {
    "ms": 0.001, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
    "y": 31557600, "year": 31557600, "years": 31557600,
}  # fmt: skip
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")


def _duration(text: str) -> int:
    """
    A token lifetime in whole seconds, written as the reference's ``ms`` strings are: ``24h``,
    ``7d``, ``90 minutes``; a bare number is milliseconds, as there.
    """
    match = _DURATION.match(text.strip().lower())
    if match is None or match.group(2) not in _UNITS and match.group(2) != "":
        raise ValueError("must be a duration such as 3600s, 24h or 7d")
    seconds = int(float(match.group(1)) * _UNITS.get(match.group(2), 0.001))
    if seconds < 1:
        raise ValueError("must be at least one second")
    return seconds


@dataclass(frozen=True)
class Setting:
    field: str
    env: Optional[str]
    parse: Callable[[str], Any]
    help: str
    #: a boolean given on the command line as a bare flag (--auto-migrate), not with a value
    flag: bool = False

    @property
    def option(self) -> str:
        return self.field.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("port", "PORT", _integer(0, 65535), "TCP port for HTTP and the WebSocket endpoint /ws"),
    Setting("host", "HOST", _text, "address to listen on; 'localhost' listens on 127.0.0.1 and ::1, '::' on every IPv4 and IPv6 address"),
    Setting("listen", "SYNCKIT_LISTEN", _endpoints, "Twisted endpoints for HTTP and /ws, replacing port and host: tcp:8080, tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/run/synckit/synckit.sock, systemd:domain=INET:index=0 (socket activation); repeat the option, or separate them with commas or spaces"),
    Setting("node_env", "NODE_ENV", _choice("development", "production", "test"), "deployment mode; 'production' refuses the default JWT secret"),
    Setting("jwt_secret", "JWT_SECRET", _secret, "HMAC key for JWTs, at least 32 characters (prefer the environment to the command line)"),
    Setting("jwt_expires_in", "JWT_EXPIRES_IN", _duration, "access-token lifetime, e.g. 24h"),
    Setting("jwt_refresh_expires_in", "JWT_REFRESH_EXPIRES_IN", _duration, "refresh-token lifetime, e.g. 7d"),
    Setting("auth_required", "SYNCKIT_AUTH_REQUIRED", _boolean, "true: clients must send a valid token; false: every connection is an anonymous reader/writer"),
    Setting("api_keys", "SYNCKIT_AUTH_APIKEYS", _words, "comma-separated API keys accepted by 'auth' as an administrator"),
    Setting("max_connections_per_ip", "SYNCKIT_MAX_CONNECTIONS_PER_IP", _integer(1), "open WebSocket connections allowed per client address"),
    Setting("max_messages_per_minute", "SYNCKIT_MAX_MESSAGES_PER_MINUTE", _integer(1), "messages each connection may send in any 60 s"),
    Setting("max_connections", "WS_MAX_CONNECTIONS", _integer(1), "open WebSocket connections allowed in all"),
    Setting("heartbeat_interval", "WS_HEARTBEAT_INTERVAL", _integer(0), "ms between WebSocket pings; a peer that misses one is dropped (0: off)"),
    Setting("max_message_size", "SYNCKIT_MAX_MESSAGE_SIZE", _integer(1), "largest message accepted, in characters of JSON"),
    Setting("max_frame_size", "SYNCKIT_MAX_FRAME_SIZE", _integer(1024), "largest WebSocket message accepted, in bytes; larger ones close the connection (1009)"),
    Setting("cors_origin", "CORS_ORIGIN", _text, "allowed CORS origin for HTTP routes, or *"),
    Setting("document_cache_size", "SYNCKIT_DOCUMENT_CACHE_SIZE", _integer(1), "documents kept in memory; idle ones beyond this are reloaded from storage when used"),
    Setting("awareness_timeout", "SYNCKIT_AWARENESS_TIMEOUT", _integer(1000), "ms after which presence from another instance that stopped refreshing it expires"),
    Setting("legacy_field_deltas", "SYNCKIT_LEGACY_FIELD_DELTAS", _boolean, "after answering 'subscribe', also send the document's fields as 'delta' messages, which SDK 0.1.x needs to show them"),
    Setting("demo_allow_list", "SYNCKIT_DEMO_ALLOW_LIST", _boolean, "restrict 'subscribe' to the reference demo's document ids (playground*, wordwall*, room:*, page ids)"),
    Setting("test_endpoints", "SYNCKIT_TEST_ENDPOINTS", _boolean, "serve POST /_test/clear, which deletes every document (test suites only)"),
    Setting("database", "DATABASE_URL", _url("postgresql", "postgres"), "PostgreSQL URL, e.g. postgresql://synckit:PASSWORD@db.example:5432/synckit; unset: documents live in memory only"),
    Setting("database_pool_size", "DB_POOL_MAX", _integer(1, 1000), "PostgreSQL connections this process keeps open"),
    Setting("auto_migrate", "SYNCKIT_AUTO_MIGRATE", _boolean, "bring the database schema up to date at start (development; in production run synckit-migrate)", flag=True),
    Setting("redis", "REDIS_URL", _url("redis"), "Redis URL, e.g. redis://:PASSWORD@cache.example:6379/0, to relay writes and presence between instances; unset: one instance"),
    Setting("redis_prefix", "REDIS_CHANNEL_PREFIX", _text, "prefix of the Redis channels (<prefix>delta:<document>, <prefix>awareness:<document>)"),
    Setting("backend_timeout", "SYNCKIT_BACKEND_TIMEOUT", _integer(100), "ms to wait for PostgreSQL or Redis on a client's behalf before giving up with an error"),
    Setting("metrics_port", "SYNCKIT_METRICS_PORT", _integer(0, 65535), "serve /metrics on this port (and not on the main one); unset: on the main port"),
    Setting("metrics_host", "SYNCKIT_METRICS_HOST", _text, "address of the separate /metrics listener"),
    Setting("metrics_listen", "SYNCKIT_METRICS_LISTEN", _endpoints, "Twisted endpoints for a separate /metrics listener, as for listen, instead of metrics-port and metrics-host"),
    Setting("echo_endpoint", "SYNCKIT_ECHO_ENDPOINT", _boolean, "serve a plain WebSocket echo at /echo, for benchmarking the WebSocket layer"),
    Setting("demo_login", "SYNCKIT_DEMO_LOGIN", _boolean, "serve the reference demo's POST /auth/login and /auth/refresh, which sign any permissions asked for, administrator included (demos only)"),
    Setting("jwt_public_key_file", "SYNCKIT_JWT_PUBLIC_KEY_FILE", _public_key_file, "PEM public key (RSA: RS256, EC: ES256/384/512, Ed25519: EdDSA) that also verifies tokens without a kid; unset: none"),
    Setting("jwks_url", "SYNCKIT_JWKS_URL", _url("https", "http"), "identity provider's JWKS URL; tokens with a kid are verified with its keys; unset: none"),
    Setting("jwt_issuer", "SYNCKIT_JWT_ISSUER", _text, "required iss claim of every token; unset: not checked"),
    Setting("jwt_audience", "SYNCKIT_JWT_AUDIENCE", _some_words, "comma-separated audiences, one of which the aud claim must hold; unset: not checked"),
    Setting("jwt_leeway", "SYNCKIT_JWT_LEEWAY", _integer(0, 3600), "seconds of clock skew allowed on exp and nbf"),
    Setting("jwt_user_claim", "SYNCKIT_JWT_USER_CLAIM", _some_words, "claims tried in order for the user id"),
    Setting("jwt_permissions_claim", "SYNCKIT_JWT_PERMISSIONS_CLAIM", _text, "claim holding {canRead, canWrite, isAdmin}"),
    Setting("trusted_proxies", "SYNCKIT_TRUSTED_PROXIES", _networks, "comma-separated addresses or CIDR blocks of reverse proxies whose X-Forwarded-For and X-Real-IP are believed, and 'unix' for a proxy on a unix socket; unset: none"),
    Setting("max_http_connections_per_ip", "SYNCKIT_MAX_HTTP_CONNECTIONS_PER_IP", _integer(1), "open connections per peer address not (yet) upgraded to WebSocket, trusted proxies exempt; unset: max-connections-per-ip, so that as many clients of one address may be in their handshake as may be connected"),
    Setting("http_header_timeout", "SYNCKIT_HTTP_HEADER_TIMEOUT", _integer(100), "ms a connection has to send a request's complete headers, from its start or the previous response"),
    Setting("http_idle_timeout", "SYNCKIT_HTTP_IDLE_TIMEOUT", _integer(100), "ms after which a silent HTTP connection is closed"),
    Setting("max_http_body_size", "SYNCKIT_MAX_HTTP_BODY_SIZE", _integer(0), "largest HTTP request body accepted, in bytes; larger ones are refused with 413 before they are read"),
    Setting("max_send_queue", "SYNCKIT_MAX_SEND_QUEUE", _integer(65536), "bytes a WebSocket connection may have waiting to be sent once its socket is full; a client that does not read them is disconnected"),
    Setting("max_invalid_messages_per_minute", "SYNCKIT_MAX_INVALID_MESSAGES_PER_MINUTE", _integer(1), "undecodable messages each connection may send in any 60 s, each answered with an error; one more closes it (1008)"),
    Setting("auth_timeout", "SYNCKIT_AUTH_TIMEOUT", _integer(0), "ms a WebSocket connection has to authenticate when auth is required, then it is closed (1008); 0: no limit"),
    Setting("max_chunk_memory", "SYNCKIT_MAX_CHUNK_MEMORY", _integer(1024), "bytes of unfinished delta_batch_chunk sets held for all connections together; a set that would go over is dropped"),
    Setting("max_presence_size", "SYNCKIT_MAX_PRESENCE_SIZE", _integer(64), "largest presence state, in bytes of compact JSON (its clock included)"),
    Setting("max_presence_per_document", "SYNCKIT_MAX_PRESENCE_PER_DOCUMENT", _integer(1), "presence states (client ids) one document may hold from this instance's connections"),
    Setting("max_presence_per_connection", "SYNCKIT_MAX_PRESENCE_PER_CONNECTION", _integer(1), "presence states (client ids, over all documents) one connection may publish"),
    Setting("max_ops_per_message", "SYNCKIT_MAX_OPS_PER_MESSAGE", _integer(1), "field writes and operations one delta or delta_batch may carry; more are refused before anything is saved"),
    Setting("deltas_retention", "SYNCKIT_DELTAS_RETENTION", _duration, "how long PostgreSQL's delta log (an audit log no server reads) keeps each write, e.g. 30d"),
    Setting("tombstone_retention", "SYNCKIT_TOMBSTONE_RETENTION", _duration, "how long a deleted field's stamp is kept, so that a delayed older write cannot bring the field back, e.g. 7d"),
    Setting("cleanup_interval", "SYNCKIT_CLEANUP_INTERVAL", _duration, "time between cleanups applying deltas-retention and tombstone-retention, e.g. 1h"),
    Setting("state_sync_interval", "SYNCKIT_STATE_SYNC_INTERVAL", _duration, "how far behind PostgreSQL's documents.state (the copy the reference server reads) may fall: time between bringing it up to date, e.g. 1s"),
)  # fmt: skip

_BY_OPTION = {s.option: s for s in SETTINGS}


def _read_file(path: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if parser.defaults():
        raise ConfigError(f"config file {path}: settings go in [synckit], not [{parser.default_section}]")
    for section in parser.sections():
        if section != "synckit":
            raise ConfigError(f"config file {path}: unknown section [{section}] (settings go in [synckit])")
    values = dict(parser["synckit"]) if parser.has_section("synckit") else {}
    for key in values:
        if key not in _BY_OPTION:
            raise ConfigError(f"config file {path}: unknown setting '{key}'")
    return values


def load(
    cli: Mapping[str, Optional[str]],
    environ: Mapping[str, str],
    config_file: Optional[str] = None,
) -> Config:
    """
    Build the configuration.

    @param cli: option name (``max-connections``) -> text given on the command line, or C{None}.
    @param environ: the process environment.
    @param config_file: path of an INI file with a ``[synckit]`` section.
    @raise ConfigError: naming the first bad setting.
    """
    file_values = _read_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        sources = (
            (cli.get(setting.option), f"--{setting.option}"),
            # An empty variable counts as unset, as in the reference (and in most shells' intent).
            (environ.get(setting.env) or None if setting.env else None, f"environment variable {setting.env}"),
            (file_values.get(setting.option), f"'{setting.option}' in {config_file}"),
        )
        for text, origin in sources:
            if text is not None:
                try:
                    values[setting.field] = setting.parse(text)
                except ValueError as e:
                    raise ConfigError(f"{origin}: {e} (got {text!r})") from None
                break
    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    if len(config.jwt_secret) < 32:
        raise ConfigError("jwt-secret (JWT_SECRET) must be at least 32 characters")
    if config.node_env == "production" and config.jwt_secret == DEFAULT_JWT_SECRET:
        raise ConfigError("NODE_ENV=production requires JWT_SECRET to be set")
    if config.auto_migrate and not config.database:
        raise ConfigError("auto-migrate (SYNCKIT_AUTO_MIGRATE) needs a database (DATABASE_URL)")
    if config.metrics_listen and config.metrics_port is not None:
        raise ConfigError("metrics-listen (SYNCKIT_METRICS_LISTEN) and metrics-port (SYNCKIT_METRICS_PORT) both say where /metrics goes: set one")


def _tcp(port: int, host: str) -> str:
    return f"tcp:{port}:interface={quoteStringArgument(host)}"


def listen_endpoints(config: Config) -> tuple[tuple[str, bool], ...]:
    """
    The main listener's endpoint strings, each with whether it may fail to listen: listen's, or
    port and host as ``tcp:``.  ``localhost`` is both loopbacks, since clients resolve it to
    ``::1`` or ``127.0.0.1``; a machine without IPv6 has no ``::1``, and then that one may fail.
    """
    if config.listen:
        return tuple((endpoint, False) for endpoint in config.listen)
    if config.host == "localhost":
        return ((_tcp(config.port, "127.0.0.1"), False), (_tcp(config.port, "::1"), True))
    return ((_tcp(config.port, config.host), False),)


def metrics_endpoints(config: Config) -> tuple[str, ...]:
    """Where /metrics has a listener of its own (and is not on the main one): none by default."""
    if config.metrics_port is not None:
        return (_tcp(config.metrics_port, config.metrics_host),)
    return config.metrics_listen


def defaults() -> dict[str, Any]:
    """Each setting's default, by field name, for help texts and the example config."""
    return {f.name: f.default for f in dataclasses.fields(Config)}
