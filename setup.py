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
    install_requires=[
        "twisted[tls]>=24.3",  # TLS for fetching an identity provider's JWKS over https
        "autobahn>=26.10.2",  # enforces the message size limit after decompression
        "orjson>=3.9",
        "pyjwt[crypto]>=2.8",  # RS256, ES256 and EdDSA identity-provider tokens
        "cbor2>=5.4",
        "prometheus-client>=0.20",
        "txredisapi>=1.6",
        "txpostgres>=1.7",
        "psycopg2-binary>=2.9",  # txpostgres needs psycopg2 but does not declare it
    ],
    extras_require={"test": ["hypothesis>=6"], "plot": ["matplotlib>=3.6"]},
)
