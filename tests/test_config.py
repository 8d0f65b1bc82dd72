"""
Settings from the command line, the environment, a config file and defaults, and the twistd options that read them: precedence, parsing, and errors that name the
bad setting before the reactor starts.
"""

from __future__ import annotations

import os
from typing import Optional

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from synckit import tap
from synckit.config import DEFAULT_JWT_SECRET, SETTINGS, Config, ConfigError, load

SECRET = "s" * 32


class ConfigFileMixin:
    def write(self, text: str) -> str:
        """A config file with C{text} in it; returns its path."""
        path = self.mktemp()  # type: ignore[attr-defined]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class DefaultsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With nothing set, the values are section 1.4's defaults, and auth is required."""
        config = load({}, {})
        self.assertEqual(config, Config())
        self.assertEqual(config.port, 8080)
        self.assertEqual(config.host, "0.0.0.0")
        self.assertEqual(config.node_env, "development")
        self.assertEqual(config.jwt_secret, DEFAULT_JWT_SECRET)
        self.assertEqual(config.jwt_expires_in, 24 * 3600)
        self.assertEqual(config.jwt_refresh_expires_in, 7 * 24 * 3600)
        self.assertIs(config.auth_required, True)
        self.assertEqual(config.max_connections_per_ip, 50)
        self.assertEqual(config.max_messages_per_minute, 500)
        self.assertEqual(config.max_connections, 10_000)
        self.assertEqual(config.heartbeat_interval, 30_000)
        self.assertEqual(config.cors_origin, "*")

    def test_config_is_frozen(self) -> None:
        """A loaded config cannot be changed afterwards."""
        config = load({}, {})
        with self.assertRaises(AttributeError):
            config.port = 1  # type: ignore[misc]


class PrecedenceTests(ConfigFileMixin, SynchronousTestCase):
    def test_port(self) -> None:
        """For the port, the command line beats the environment, which beats the file, which beats the default."""
        path = self.write("[synckit]\nport = 1001\n")
        self.assertEqual(load({"port": "1003"}, {"PORT": "1002"}, path).port, 1003)
        self.assertEqual(load({}, {"PORT": "1002"}, path).port, 1002)
        self.assertEqual(load({}, {}, path).port, 1001)
        self.assertEqual(load({}, {}).port, 8080)

    def test_auth_required(self) -> None:
        """The auth switch follows the same order: CLI, environment, file."""
        path = self.write("[synckit]\nauth-required = false\n")
        self.assertIs(load({}, {}, path).auth_required, False)
        self.assertIs(load({}, {"SYNCKIT_AUTH_REQUIRED": "true"}, path).auth_required, True)
        self.assertIs(load({"auth-required": "false"}, {"SYNCKIT_AUTH_REQUIRED": "true"}, path).auth_required, False)

    def test_limits_and_lists(self) -> None:
        """Connection limits and API keys take the highest-precedence source, the others ignored."""
        path = self.write("[synckit]\nmax-connections = 3\napi-keys = file-key\nmax-connections-per-ip = 7\n")
        env = {"WS_MAX_CONNECTIONS": "4", "SYNCKIT_AUTH_APIKEYS": "env-a, env-b,,"}
        config = load({"max-connections": "5"}, env, path)
        self.assertEqual(config.max_connections, 5)
        self.assertEqual(config.api_keys, ("env-a", "env-b"))
        self.assertEqual(config.max_connections_per_ip, 7)
        self.assertEqual(config.max_messages_per_minute, 500)

    def test_unset_cli_option_does_not_override(self) -> None:
        """A command-line option that was not given (None) leaves the environment's value."""
        self.assertEqual(load({"port": None}, {"PORT": "1002"}).port, 1002)

    def test_higher_source_hides_bad_lower_value(self) -> None:
        """Only the winning source is parsed: a bad file value under a good env value is harmless."""
        path = self.write("[synckit]\nport = nope\n")
        self.assertEqual(load({}, {"PORT": "1002"}, path).port, 1002)


class ParseErrorTests(ConfigFileMixin, SynchronousTestCase):
    def assertConfigError(self, cli: dict, environ: dict, path: Optional[str], *names: str) -> ConfigError:
        """Loading fails with a ConfigError whose message contains every one of C{names}."""
        with self.assertRaises(ConfigError) as caught:
            load(cli, environ, path)
        for name in names:
            self.assertIn(name, str(caught.exception))
        return caught.exception

    def test_every_setting_names_its_source(self) -> None:
        """For every setting, a blank value is refused naming the option, env variable or file key."""
        for setting in SETTINGS:
            if setting.field == "api_keys":
                continue  # an empty key list is valid
            self.assertConfigError({setting.option: "  "}, {}, None, f"--{setting.option}")
            self.assertConfigError({}, {setting.env: "  "}, None, f"environment variable {setting.env}")  # blank, not empty
            path = self.write(f"[synckit]\n{setting.option} =\n")
            self.assertConfigError({}, {}, path, f"'{setting.option}'", path)

    def test_bad_values(self) -> None:
        """Out-of-range, misspelt and non-numeric values are refused, naming the option and the value."""
        for option, text in (
            ("port", "abc"),
            ("port", "65536"),
            ("port", "-1"),
            ("port", "80.5"),
            ("node-env", "staging"),
            ("max-connections", "0"),
            ("max-connections-per-ip", "0"),
            ("max-messages-per-minute", "ten"),
            ("heartbeat-interval", "-5"),
            ("max-frame-size", "1023"),
            ("awareness-timeout", "999"),
            ("document-cache-size", "0"),
            ("jwt-expires-in", "soon"),
            ("demo-allow-list", "on"),
        ):
            self.assertConfigError({option: text}, {}, None, f"--{option}", repr(text))

    def test_boundaries_accepted(self) -> None:
        """The smallest and largest allowed values load."""
        cli = {"port": "65535", "heartbeat-interval": "0", "max-frame-size": "1024", "awareness-timeout": "1000"}
        config = load(cli, {})
        values = (config.port, config.heartbeat_interval, config.max_frame_size, config.awareness_timeout)
        self.assertEqual(values, (65535, 0, 1024, 1000))
        self.assertEqual(load({"port": "0"}, {}).port, 0)

    def test_env_error_names_variable(self) -> None:
        """A bad environment value names the variable, not just the option."""
        env = {"SYNCKIT_MAX_MESSAGES_PER_MINUTE": "lots"}
        self.assertConfigError({}, env, None, "SYNCKIT_MAX_MESSAGES_PER_MINUTE", "'lots'")
        self.assertConfigError({}, {"NODE_ENV": "prod"}, None, "NODE_ENV", "development")

    def test_file_error_names_key_and_file(self) -> None:
        """A bad file value names the key and the file."""
        path = self.write("[synckit]\nmax-connections = many\n")
        self.assertConfigError({}, {}, path, "'max-connections'", path, "'many'")


class ConfigFileTests(ConfigFileMixin, SynchronousTestCase):
    def test_unknown_key(self) -> None:
        """A key that is no setting is refused, naming it (a typo must not be ignored)."""
        path = self.write("[synckit]\nport = 1\nmax-conections = 5\n")
        with self.assertRaises(ConfigError) as caught:
            load({}, {}, path)
        self.assertIn("max-conections", str(caught.exception))
        self.assertIn(path, str(caught.exception))

    def test_env_name_is_not_a_key(self) -> None:
        """Environment-variable spellings are not file keys."""
        self.assertRaises(ConfigError, load, {}, {}, self.write("[synckit]\nmax_connections = 5\n"))
        self.assertRaises(ConfigError, load, {}, {}, self.write("[synckit]\nWS_MAX_CONNECTIONS = 5\n"))

    def test_unknown_section(self) -> None:
        """A section other than [synckit] is refused, naming it."""
        path = self.write("[synckit]\nport = 1\n[server]\nport = 2\n")
        with self.assertRaises(ConfigError) as caught:
            load({}, {}, path)
        self.assertIn("[server]", str(caught.exception))

    def test_default_section_not_silently_ignored(self) -> None:
        """Settings in configparser's special [DEFAULT] section are either applied or refused, never ignored."""
        path = self.write("[DEFAULT]\nport = 1001\n")
        try:
            config = load({}, {}, path)
        except ConfigError:
            return
        self.assertEqual(config.port, 1001)

    def test_missing_file(self) -> None:
        """A config file that does not exist is an error naming it."""
        path = self.mktemp()
        with self.assertRaises(ConfigError) as caught:
            load({}, {}, path)
        self.assertIn(path, str(caught.exception))

    def test_malformed_file(self) -> None:
        """A file that is not INI (no section header, duplicate key) is a ConfigError naming the file."""
        for text in ("port = 1\n", "[synckit]\nport = 1\nport = 2\n", "[synckit]\njust words\n"):
            path = self.write(text)
            with self.assertRaises(ConfigError) as caught:
                load({}, {}, path)
            self.assertIn(path, str(caught.exception))

    def test_empty_file(self) -> None:
        """An empty file, or an empty [synckit] section, changes nothing."""
        self.assertEqual(load({}, {}, self.write("")), Config())
        self.assertEqual(load({}, {}, self.write("[synckit]\n# port = 1\n")), Config())

    def test_values_are_not_interpolated(self) -> None:
        """A ``%`` in a value (a secret, say) is taken literally."""
        secret = "%(port)s-" + "x" * 32
        self.assertEqual(load({}, {}, self.write(f"[synckit]\njwt-secret = {secret}\n")).jwt_secret, secret)


class SecretTests(SynchronousTestCase):
    def test_short_secret_rejected(self) -> None:
        """A JWT secret under 32 characters is refused, from any source, naming JWT_SECRET."""
        for cli, env in (({"jwt-secret": "x" * 31}, {}), ({}, {"JWT_SECRET": "x" * 31})):
            with self.assertRaises(ConfigError) as caught:
                load(cli, env)
            self.assertIn("JWT_SECRET", str(caught.exception))

    def test_32_character_secret_accepted(self) -> None:
        """A secret of exactly 32 characters loads."""
        self.assertEqual(load({}, {"JWT_SECRET": SECRET}).jwt_secret, SECRET)

    def test_production_needs_a_secret(self) -> None:
        """NODE_ENV=production with the built-in secret is refused; with a real one it loads."""
        with self.assertRaises(ConfigError) as caught:
            load({}, {"NODE_ENV": "production"})
        self.assertIn("JWT_SECRET", str(caught.exception))
        self.assertRaises(ConfigError, load, {}, {"NODE_ENV": "production", "JWT_SECRET": DEFAULT_JWT_SECRET})
        self.assertEqual(load({}, {"NODE_ENV": "production", "JWT_SECRET": SECRET}).node_env, "production")

    def test_development_allows_default_secret(self) -> None:
        """Outside production the built-in secret is allowed."""
        self.assertEqual(load({}, {"NODE_ENV": "test"}).jwt_secret, DEFAULT_JWT_SECRET)


class AuthRequiredTests(SynchronousTestCase):
    def test_true_and_false(self) -> None:
        """SYNCKIT_AUTH_REQUIRED=false turns auth off and =true keeps it on."""
        self.assertIs(load({}, {"SYNCKIT_AUTH_REQUIRED": "false"}).auth_required, False)
        self.assertIs(load({}, {"SYNCKIT_AUTH_REQUIRED": "true"}).auth_required, True)

    def test_other_words_rejected(self) -> None:
        """Anything but true or false is refused naming the variable, so a typo cannot pick a side."""
        for text in ("yes", "no", "1", "0", "off", "flase"):
            with self.assertRaises(ConfigError) as caught:
                load({}, {"SYNCKIT_AUTH_REQUIRED": text})
            self.assertIn("SYNCKIT_AUTH_REQUIRED", str(caught.exception))

    def test_only_exact_false_disables_auth(self) -> None:
        """
        Auth is off only for exactly ``false`` (section 1.4): other spellings of false must not
        turn it off (refusing them is fine).
        """
        for text in ("FALSE", "False", " false"):
            try:
                config = load({}, {"SYNCKIT_AUTH_REQUIRED": text})
            except ConfigError:
                continue
            self.assertIs(config.auth_required, True, f"SYNCKIT_AUTH_REQUIRED={text!r} disabled auth")


class DurationTests(SynchronousTestCase):
    def expires(self, text: str) -> int:
        return load({"jwt-expires-in": text}, {}).jwt_expires_in

    def test_units(self) -> None:
        """ms-style durations become whole seconds."""
        for text, seconds in (
            ("24h", 86400),
            ("7d", 604800),
            ("90 minutes", 5400),
            ("3600s", 3600),
            ("1.5h", 5400),
            ("2 days", 172800),
            ("1w", 604800),
            ("30m", 1800),
            ("5000ms", 5),
            ("1y", 31557600),
            ("24H", 86400),
        ):
            self.assertEqual(self.expires(text), seconds, text)

    def test_bare_number_is_milliseconds(self) -> None:
        """A number without a unit is milliseconds, as in the ms package."""
        self.assertEqual(self.expires("3600000"), 3600)
        self.assertEqual(self.expires("1000"), 1)

    def test_refresh_lifetime(self) -> None:
        """The refresh-token lifetime is parsed the same way, from its own variable."""
        self.assertEqual(load({}, {"JWT_REFRESH_EXPIRES_IN": "30d"}).jwt_refresh_expires_in, 30 * 86400)

    def test_bad_durations(self) -> None:
        """Unknown units, signs, empty text and lifetimes under a second are refused, naming the variable."""
        for text in ("soon", "h", "-1h", "5 fortnights", "999", "0s", "1h30m"):
            with self.assertRaises(ConfigError) as caught:
                load({}, {"JWT_EXPIRES_IN": text})
            self.assertIn("JWT_EXPIRES_IN", str(caught.exception))


class EnvironmentTests(SynchronousTestCase):
    def test_empty_variable_is_unset(self) -> None:
        """An empty variable falls through to the file and the default, as in the reference."""
        config = load({}, {"PORT": "", "SYNCKIT_AUTH_REQUIRED": "", "JWT_SECRET": "", "CORS_ORIGIN": ""})
        self.assertEqual((config.port, config.auth_required, config.cors_origin), (8080, True, "*"))

    def test_secret_is_not_trimmed(self) -> None:
        """The JWT secret is used byte for byte: trimming would change the HMAC key."""
        secret = " " + "s" * 40 + " "
        self.assertEqual(load({}, {"JWT_SECRET": secret}).jwt_secret, secret)


class TapOptionsTests(ConfigFileMixin, SynchronousTestCase):
    def options(self, argv: list[str], environ: Optional[dict] = None) -> tap.Options:
        self.patch(os, "environ", dict(environ or {}))
        options = tap.Options()
        options.parseOptions(argv)
        return options

    def test_every_setting_is_an_option(self) -> None:
        """Each setting can be given on the command line."""
        options = self.options([])
        for setting in SETTINGS:
            self.assertIn(setting.option, options)

    def test_options_build_config(self) -> None:
        """Parsed options carry a config with the command line's values."""
        options = self.options(["--port", "9001", "--auth-required", "false", "--api-keys", "k1,k2"])
        self.assertEqual(options.config.port, 9001)
        self.assertIs(options.config.auth_required, False)
        self.assertEqual(options.config.api_keys, ("k1", "k2"))

    def test_environment_used(self) -> None:
        """Options read the process environment, the command line winning."""
        env = {"PORT": "9002", "WS_MAX_CONNECTIONS": "9"}
        self.assertEqual(self.options([], env).config.port, 9002)
        options = self.options(["--port", "9003"], env)
        self.assertEqual((options.config.port, options.config.max_connections), (9003, 9))

    def test_bad_option_is_usage_error(self) -> None:
        """A bad command-line value is a UsageError naming the option."""
        with self.assertRaises(usage.UsageError) as caught:
            self.options(["--port", "eighty"])
        self.assertIn("--port", str(caught.exception))

    def test_bad_environment_is_usage_error(self) -> None:
        """A bad environment value is a UsageError naming the variable."""
        with self.assertRaises(usage.UsageError) as caught:
            self.options([], {"SYNCKIT_AUTH_REQUIRED": "maybe"})
        self.assertIn("SYNCKIT_AUTH_REQUIRED", str(caught.exception))

    def test_production_default_secret_is_usage_error(self) -> None:
        """The production secret check also surfaces as a UsageError."""
        self.assertRaises(usage.UsageError, self.options, [], {"NODE_ENV": "production"})

    def test_config_option(self) -> None:
        """--config names the file; environment and command line still win over it."""
        path = self.write("[synckit]\nport = 9004\nmax-connections = 11\n")
        options = self.options(["--config", path, "--max-connections", "12"])
        self.assertEqual((options.config.port, options.config.max_connections), (9004, 12))
        self.assertEqual(self.options(["-c", path], {"PORT": "9005"}).config.port, 9005)

    def test_config_from_environment(self) -> None:
        """SYNCKIT_CONFIG names the file when --config is not given; --config wins over it."""
        first = self.write("[synckit]\nport = 9006\n")
        second = self.write("[synckit]\nport = 9007\n")
        self.assertEqual(self.options([], {"SYNCKIT_CONFIG": first}).config.port, 9006)
        self.assertEqual(self.options(["--config", second], {"SYNCKIT_CONFIG": first}).config.port, 9007)

    def test_bad_config_file_is_usage_error(self) -> None:
        """An unknown key in the config file is a UsageError naming it."""
        path = self.write("[synckit]\nprot = 1\n")
        with self.assertRaises(usage.UsageError) as caught:
            self.options(["--config", path])
        self.assertIn("prot", str(caught.exception))
