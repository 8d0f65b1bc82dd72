from setuptools import setup

from synckit import __version__

setup(
    name="synckit",
    version=__version__,
    description="SyncKit-compatible document sync server for Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["synckit", "synckit.sync", "synckit.storage", "synckit.pubsub", "synckit.bench", "twisted.plugins"],
    package_data={"synckit.storage": ["migrations/*.sql"]},
    entry_points={
        "console_scripts": ["synckit-migrate = synckit.migrate:main", "synckit-bench = synckit.bench.cli:main"]
    },
    # The upper bounds stop at the next release line of each dependency whose internals synckit
    # relies on; tests/test_dependencies.py checks each of those internals against the installed
    # version, so to raise a bound, install the new version and run it first.
    install_requires=[
        # TLS for fetching an identity provider's JWKS over https.  Calendar versions: any year's
        # releases may change HTTPChannel's hooks, ProtocolWrapper's relaying or how a Deferred
        # is awaited, which synckit/web.py, synckit/upgrade.py and synckit/tasks.py use.
        "twisted[tls]>=24.3,<27",
        # 26.10.2 enforces the message size limit after decompression.  Calendar versions, and
        # synckit/websocket.py reaches into the protocol's internals (its masker, pformat,
        # onMessageEnd, send_queue, the close handshake), which change from month to month.
        "autobahn>=26.10.2,<26.12",
        "orjson>=3.9",
        "pyjwt[crypto]>=2.8",  # RS256, ES256 and EdDSA identity-provider tokens
        "cbor2>=5.4",
        "prometheus-client>=0.20",
        # 1.6 connects with factory.startConnecting(endpoint) and reworked the pool in a minor
        # release; synckit/pubsub/redis.py relies on its factory's deferred and constructor.
        "txredisapi>=1.6,<1.7",
        # synckit/storage/postgres.py rewrites parts of its connection and reconnection detector.
        "txpostgres>=1.7,<1.8",
        "psycopg2-binary>=2.9",  # txpostgres needs psycopg2 but does not declare it
    ],
    extras_require={"test": ["hypothesis>=6"], "plot": ["matplotlib>=3.6"]},
)
