"""
``twistd synckit``: command-line options and the service they describe.

Every setting of L{synckit.config.SETTINGS} is an option; any of them may also come from its
environment variable or from the config file (``--config``, or ``SYNCKIT_CONFIG``), the command
line winning.  Values are checked here, before the reactor starts.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from twisted.python import usage

from synckit import __version__
from synckit.config import SETTINGS, ConfigError, defaults, load


def _option_help(setting: Any, default: Any) -> str:
    shown = (",".join(default) or None) if isinstance(default, tuple) else default
    if isinstance(shown, bool):
        shown = str(shown).lower()
    elif shown is None:
        shown = "unset"
    env = f"; env {setting.env}" if setting.env else ""
    secret = setting.field == "jwt_secret"
    return f"{setting.help} [default: {'(built in, development only)' if secret else shown}{env}]"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A SyncKit sync server: HTTP and the WebSocket endpoint /ws, on --port or the --listen endpoints. "
        "Each option may also be set by the environment variable named in its help, or in the "
        "[synckit] section of the config file; the command line wins, then the environment, "
        "then the file."
    )
    optParameters = [["config", "c", None, "config file (INI, [synckit] section) [env SYNCKIT_CONFIG]"]] + [
        [setting.option, None, None, _option_help(setting, defaults()[setting.field])]
        for setting in SETTINGS
        if not setting.flag
    ]
    optFlags = [[setting.option, None, _option_help(setting, defaults()[setting.field])] for setting in SETTINGS if setting.flag]

    # --listen and --metrics-listen may be given more than once: each adds an endpoint, in the
    # comma-separated form the environment and the config file take.  (No docstrings: the help
    # generated from the setting stays.)
    def opt_listen(self, endpoint: str) -> None:
        self._add("listen", endpoint)

    def opt_metrics_listen(self, endpoint: str) -> None:
        self._add("metrics-listen", endpoint)

    def _add(self, option: str, endpoint: str) -> None:
        self[option] = endpoint if self[option] is None else f"{self[option]},{endpoint}"

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"synckit {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        from synckit.service import check_endpoints  # the server's modules, only to run it

        config_file = self["config"] or os.environ.get("SYNCKIT_CONFIG")
        try:
            cli = {s.option: ("true" if self[s.option] else None) if s.flag else self[s.option] for s in SETTINGS}
            self.config = load(cli, os.environ, config_file)
            check_endpoints(self.config, _reactor())
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def _reactor() -> Any:
    """The reactor twistd runs: imported only now, after twistd has installed the one chosen."""
    from twisted.internet import reactor

    return reactor


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """Build the service tree; nothing listens or connects until it starts."""
    from synckit.service import build, exit_one_if_start_fails, exit_zero_on_signals, tune_garbage_collection

    if reactor is not None:
        return build(options.config, reactor)

    # Run by twistd: the process's own reactor, signals and exit status.
    reactor = _reactor()
    service = build(options.config, reactor)
    reactor.callWhenRunning(exit_zero_on_signals, reactor)
    reactor.callWhenRunning(tune_garbage_collection)
    exit_one_if_start_fails(service, reactor)
    return service
