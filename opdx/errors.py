"""The error every layer raises for bad configuration or input (re-exported as `opdx.config.ConfigError`)."""


class ConfigError(ValueError):
    """Bad configuration or input; the trainer prints it as one line and exits nonzero before heavy work."""
