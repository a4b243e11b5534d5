"""The project's own error types, below every layer so that any module can raise them.

``ConfigError``: a setting that cannot work. Raised before any process starts where it can be
(``common.run.check_run``, the launcher), its message names the setting, its value and why, and
the launcher prints it as one ``error:`` line.

Usage::

    from common.errors import ConfigError
    raise ConfigError(f"data.max_duration_s ({value}) must be > 0")
"""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and its value."""
