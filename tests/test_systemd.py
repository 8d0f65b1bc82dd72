"""The systemd unit is one systemd accepts, and runs the daemon the way the README says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

UNIT = os.path.join(os.path.dirname(__file__), "..", "systemd", "synckit.service")
SOCKET = os.path.join(os.path.dirname(__file__), "..", "systemd", "synckit.socket")
PACKAGED_TWISTD = "/opt/venvs/synckit/bin/twistd"


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class UnitTests(SynchronousTestCase):
    def unit(self) -> str:
        return read(UNIT)

    def verify(self, *names: str) -> None:
        """
        C{systemd-analyze verify} on the named units, copied side by side.  It insists that
        ExecStart's program exists, and the packaged virtualenv is not on a development machine,
        so the service checked points ExecStart at this virtualenv's twistd instead; nothing else
        is changed.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (apt-get install systemd)")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        for source in (UNIT, SOCKET):
            with open(os.path.join(folder, os.path.basename(source)), "w", encoding="utf-8") as f:
                f.write(read(source).replace(PACKAGED_TWISTD, os.path.abspath(twistd)))
        result = subprocess.run([analyze, "verify", *(os.path.join(folder, n) for n in names)], capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""), result.stdout)

    def test_systemd_analyze_verify(self) -> None:
        """C{systemd-analyze verify} finds nothing wrong with the service."""
        self.verify("synckit.service")

    def test_systemd_analyze_verify_socket(self) -> None:
        """Nor with the socket unit, which activates the service beside it."""
        self.verify("synckit.socket")

    def test_socket_matches_the_listen_it_documents(self) -> None:
        """
        The socket is IPv4 (an address, not a bare port, which systemd would make an IPv6
        socket) as the ``domain=INET`` of the endpoint it tells the administrator to set says;
        the daemon accepts its connections itself.
        """
        socket_unit = read(SOCKET)
        for line in ("ListenStream=0.0.0.0:8080", "Accept=no", "WantedBy=sockets.target"):
            self.assertIn(f"\n{line}\n", socket_unit)
        self.assertIn("listen = systemd:domain=INET:index=0", socket_unit)

    def test_runtime_directory_for_a_unix_socket(self) -> None:
        """/run/synckit exists for the daemon (the rest of /run is read-only to it), for unix:/run/synckit/..."""
        self.assertIn("\nRuntimeDirectory=synckit\n", self.unit())

    def test_runs_twistd_in_the_foreground_as_its_own_user(self) -> None:
        """The unit runs the packaged twistd in the foreground, as its own user, sandboxed, restarted on failure."""
        unit = self.unit()
        self.assertIn(f"ExecStart={PACKAGED_TWISTD} --nodaemon --pidfile=", unit)
        for line in ("User=synckit", "Restart=on-failure", "EnvironmentFile=-/etc/default/synckit",
                     "ProtectSystem=strict", "NoNewPrivileges=true", "PrivateTmp=true", "KillSignal=SIGTERM"):  # fmt: skip
            self.assertIn(f"\n{line}\n", unit)
