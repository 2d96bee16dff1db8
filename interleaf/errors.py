"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class InterleafError(Exception):
    """A mistake in the user's input (paths, configs, options, data); never a bug."""


class ConfigError(InterleafError):
    """A configuration value is missing, unknown or of the wrong type."""
