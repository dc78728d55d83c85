"""Engine configurations: a dict, a JSON file, or the name of a JSON file in the engine's ``configs/`` folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .errors import InputError


def read_config(config: dict | str | Path, folder: str | Path) -> dict:
    """A copy of ``config`` when it is a dict; else the JSON file it names, or ``<folder>/<config>.json``.
    InputError names the config and the ones the folder has."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    folder = Path(folder)
    p = Path(config)
    if not p.is_file():
        p = folder / f"{config}.json"
    if not p.is_file():
        raise InputError(f"Config {config!r} not found (neither a file nor one of "
                         f"{sorted(q.stem for q in folder.glob('*.json'))})")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"Config {p.name} cannot be read: {e}") from None
