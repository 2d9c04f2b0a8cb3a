"""The run config of ``flwr run .`` in simulation: which federation, and where its run goes.

Flower gives the ServerApp and every ClientApp the same run config (the
``[tool.flwr.app.config]`` table of ``pyproject.toml``, fused with ``--run-config``):

``federation``
    The federation YAML whose sites the simulated nodes play (node ``partition-id``
    *i* plays the *i*-th site). A relative path is looked up inside the app: Flower's
    app bundle holds only the ``fab-include`` files, among them ``configs/demo.yaml``
    (the default, the built-in demo, which needs no data files). Any other federation
    is named by an absolute path.
``run-dir``
    The run directory (checkpoints, metrics, plots, and ``sites/<name>/`` with each
    simulated site's privacy ledger). Empty (the default): ``runs/flwr-<name>-<run id>``
    under the working directory of the simulation (where the local SuperLink was
    started, normally where ``flwr run`` was typed); the log stream prints the
    absolute path. A run directory that holds checkpoints is resumed.
``rounds``
    Override the config's number of rounds (0: as the YAML says).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medmeta_common.errors import ConfigError

# The app's root folder: the checkout, or the unpacked app bundle Flower runs from.
APP_DIR = Path(__file__).resolve().parents[2]


def federation_path(run_config: Mapping[str, object]) -> Path:
    """The federation YAML the run config names (relative: inside the app)."""
    value = str(run_config.get("federation", "") or "")
    if not value:
        raise ConfigError(source="run config", field="federation",
                          expected="a federation YAML (e.g. configs/demo.yaml), or "
                          "server-config for a deployment", found="nothing")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = APP_DIR / path
    if not path.is_file():
        raise ConfigError(source="run config", field="federation",
                          expected="an existing federation YAML: a path inside the app "
                          "(only fab-include files travel in Flower's app bundle, such as "
                          "configs/demo.yaml) or an absolute path",
                          found=f"{value} (looked for {path})")
    return path


def simulation_run_dir(run_config: Mapping[str, object], run_id: int, name: str) -> Path:
    """The absolute run directory of a simulated run (see the module docstring)."""
    value = str(run_config.get("run-dir", "") or "")
    path = Path(value).expanduser() if value else Path("runs") / f"flwr-{name}-{run_id}"
    return path.resolve()
