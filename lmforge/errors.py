"""The errors a user can cause, apart from any module that raises them (so nothing imports the runner or
the config schema just to raise one). A stage reports each in one line and exits with code 2."""


class InputError(ValueError):
    """Bad input data (missing file, malformed line, empty corpus)."""


class ConfigError(ValueError):
    """A params file that does not match the schema; the message names the key."""
