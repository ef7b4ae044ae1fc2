"""The client's configuration file, ``$XDG_CONFIG_HOME/virnet/client.toml``
(``~/.config/virnet/client.toml`` without the variable)::

    uri = "tcp://storage1:16509"   # the daemon when neither -c nor $VIRNET_DEFAULT_URI
    timeout = 10                   # seconds, as --timeout
    progress = false               # progress bars on a terminal, as --[no-]progress

A missing file is an empty configuration; anything wrong in it is a ``ConfigError``
naming the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._uri import parse_uri

CONFIG_PATH_HELP = "$XDG_CONFIG_HOME/virnet/client.toml, or ~/.config/virnet/client.toml"


class ConfigError(Exception):
    """One line: ``FILE: what is wrong``."""


@dataclass
class ClientConfig:
    path: str
    uri: str | None = None
    timeout: float | None = None
    progress: bool | None = None


def config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    return os.path.join(base, "virnet", "client.toml")


def load_config(path: str | None = None) -> ClientConfig:
    path = path or config_path()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError:
        return ClientConfig(path)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    import tomllib  # only with a file to read: it is a few ms of every command's start

    try:
        with fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = ClientConfig(path)
    for key, value in data.items():
        if key == "uri":
            if not isinstance(value, str):
                raise ConfigError(f"{path}: key 'uri': must be a string")
            try:
                parse_uri(value)
            except ValueError as exc:
                raise ConfigError(f"{path}: key 'uri': {exc}") from None
            config.uri = value
        elif key == "timeout":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{path}: key 'timeout': must be a positive number of seconds")
            config.timeout = float(value)
        elif key == "progress":
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: key 'progress': must be true or false")
            config.progress = value
        else:
            raise ConfigError(
                f"{path}: unknown key {key!r} (known: uri, timeout, progress)"
            )
    return config
