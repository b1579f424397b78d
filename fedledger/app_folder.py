"""The Flower app of the installed package, as a folder ``flwr run`` accepts.

``flwr run`` needs an app folder with a ``pyproject.toml`` (``[tool.flwr.app]``). A checkout has
one; an installed wheel has none. :func:`write_app` writes a folder holding only that file: its
components name the installed ``fedledger.server_app:app`` / ``fedledger.client_app:app`` and
its ``[tool.flwr.app.config]`` holds the installed settings' defaults
(``Settings.from_run_config({}).to_run_config()``), so the installed package runs from an empty
folder (``fedledger run`` does this where the current folder has no pyproject.toml).
"""

from __future__ import annotations

import json
import os
from importlib import metadata

APP_FOLDER = os.path.join(".fedledger", "app")


def toml_value(value) -> str:
    """One run-config value as TOML (what pyproject.toml and `flwr run --run-config` read)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def app_pyproject() -> str:
    from .config import Settings

    try:
        version = metadata.version("fedledger")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        version = "0.1.0"
    config = Settings.from_run_config({}).to_run_config()
    lines = ["# Written by fedledger: the Flower app of the installed fedledger package.",
             "[project]", 'name = "fedledger"', f'version = "{version}"',
             'description = "fedledger: federated LoRA fine-tuning with an on-chain audit trail"',
             'license = "Apache-2.0"', "", "[tool.flwr.app]", 'publisher = "fedledger"', "",
             "[tool.flwr.app.components]", 'serverapp = "fedledger.server_app:app"',
             'clientapp = "fedledger.client_app:app"', "", "[tool.flwr.app.config]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in config.items()]
    return "\n".join(lines) + "\n"


def write_app(folder: str = APP_FOLDER) -> str:
    """Write (or refresh) ``folder/pyproject.toml``; returns the folder's absolute path."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "pyproject.toml"), "w") as fh:
        fh.write(app_pyproject())
    return os.path.abspath(folder)
