"""The one error type of configuration problems."""


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key."""
