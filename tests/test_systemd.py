"""The systemd unit is one systemd accepts, and runs the daemon the way the README says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

UNIT = os.path.join(os.path.dirname(__file__), "..", "systemd", "synckit.service")
PACKAGED_TWISTD = "/opt/venvs/synckit/bin/twistd"


class UnitTests(SynchronousTestCase):
    def unit(self) -> str:
        with open(UNIT, encoding="utf-8") as f:
            return f.read()

    def test_systemd_analyze_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing wrong.  It also insists that ExecStart's program
        exists, and the packaged virtualenv is not on a development machine, so the copy checked
        points ExecStart at this virtualenv's twistd instead; nothing else is changed.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (apt-get install systemd)")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        copy = os.path.join(folder, "synckit.service")
        with open(copy, "w", encoding="utf-8") as f:
            f.write(self.unit().replace(PACKAGED_TWISTD, os.path.abspath(twistd)))
        result = subprocess.run([analyze, "verify", copy], capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""), result.stdout)

    def test_runs_twistd_in_the_foreground_as_its_own_user(self) -> None:
        unit = self.unit()
        self.assertIn(f"ExecStart={PACKAGED_TWISTD} --nodaemon --pidfile=", unit)
        for line in ("User=synckit", "Restart=on-failure", "EnvironmentFile=-/etc/default/synckit",
                     "ProtectSystem=strict", "NoNewPrivileges=true", "PrivateTmp=true", "KillSignal=SIGTERM"):  # fmt: skip
            self.assertIn(f"\n{line}\n", unit)
