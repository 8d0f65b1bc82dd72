"""The shipped example config documents every setting and is itself a valid config."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from synckit.config import SETTINGS, Config, load

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "etc", "synckit", "synckit.conf")


class ExampleConfigTests(SynchronousTestCase):
    def test_every_setting_is_documented(self) -> None:
        """Each setting appears with its option name and its environment variable."""
        with open(EXAMPLE, encoding="utf-8") as f:
            text = f.read()
        for setting in SETTINGS:
            self.assertIn(f"# {setting.option} = ", text)
            self.assertIn(f"# env: {setting.env}", text)

    def test_example_loads_to_defaults(self) -> None:
        """The example, all commented out, loads and changes nothing."""
        self.assertEqual(load({}, {}, EXAMPLE), Config())
