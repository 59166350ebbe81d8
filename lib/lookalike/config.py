"""Configuration: conf/lookalike.toml holds every default; a user file overrides some keys.

Unknown keys and values of the wrong type or range are rejected with a message naming the
key, so a typo in a scheduled job's config fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

REPO_ROOT = Path(__file__).resolve().parents[2]
# spark-submit.sh ships the package as a zip, away from conf/: it names the file instead.
DEFAULTS_FILE = Path(os.environ.get("LOOKALIKE_DEFAULTS", REPO_ROOT / "conf" / "lookalike.toml"))


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


# key -> (minimum, maximum) for numbers whose range matters; None means unbounded.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "scan.split_dirs": (1, None),
    "scan.manifest_files": (1, None),
    "extract.thumb_size": (64, 4096),
    "extract.thumb_quality": (1, 100),
    "extract.max_image_pixels": (1, None),
    "extract.max_read_bytes": (1, None),
    "extract.task_bytes": (1 << 20, None),
    "embed.batch_size": (1, 4096),
    "neardup.phash_radius": (0, 32),
    "neardup.orient_radius": (0, 32),
    "neardup.min_cosine": (-1.0, 1.0),
    "neardup.k": (1, 1000),
    "neardup.verify_radius": (0, 64),
    "neardup.verify_cosine": (-1.0, 1.0),
    "neardup.max_hash_matches": (1, None),
    "cluster.k": (0, None),
    "cluster.k_per_sqrt_n": (0.1, 100.0),
    "cluster.merge_cosine": (-1.0, 1.0),
    "cluster.join_cosine": (-1.0, 1.0),
    "cluster.label_weight": (0.0, 1.0),
    "cluster.refit_growth": (0.0, None),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "embed.backend": ("auto", "torch", "onnx"),
    "store.mode": ("hardlink", "copy", "move"),
    "spark.log_level": ("ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"),
}


@dataclass(frozen=True)
class Config:
    """The merged configuration; sections are plain dicts read as cfg['section']['key']."""

    values: dict[str, dict[str, Any]]
    source: str

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def home(self) -> Path:
        return Path(os.path.expanduser(self.values["catalog"]["home"])).resolve()

    @property
    def dsn(self) -> str:
        return os.environ.get("LOOKALIKE_DSN") or self.values["catalog"]["dsn"]

    @property
    def spark_master(self) -> str:
        return os.environ.get("LOOKALIKE_SPARK_MASTER", self.values["spark"]["master"])

    def with_home(self, home: str | Path | None) -> Config:
        if home is None:
            return self
        values = copy.deepcopy(self.values)
        values["catalog"]["home"] = str(Path(home).expanduser().resolve())
        return Config(values, self.source)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _check_value(key: str, default: Any, value: Any) -> Any:
    # bool is a subclass of int: check it first so `true` is not accepted as a number.
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")
    elif isinstance(default, float) and isinstance(value, int):
        value = float(value)
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    elif not isinstance(value, type(default)):
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")
    if key in _RANGES:
        lo, hi = _RANGES[key]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{key}: {value!r} is out of range [{lo}, {hi if hi is not None else '∞'}]")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
    if key == "extract.exif_timezone":
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not a known time zone (an IANA name such as "
                              "'UTC' or 'Europe/Paris')") from None
    if key == "cluster.refit_growth" and 0 < value <= 1:
        raise ConfigError(f"{key}: {value!r} would cluster everything again on every run: "
                          "use 0 (never) or more than 1")
    return value


def _merge(defaults: dict[str, Any], override: dict[str, Any], origin: str) -> dict[str, Any]:
    merged = copy.deepcopy(defaults)
    for section, table in override.items():
        if section not in defaults:
            raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(defaults)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {section} must be a table")
        for key, value in table.items():
            full = f"{section}.{key}"
            if key not in defaults[section]:
                raise ConfigError(f"{origin}: unknown key {full}")
            merged[section][key] = _check_value(full, defaults[section][key], value)
    return merged


def load_config(path: str | Path | None = None, home: str | Path | None = None) -> Config:
    """Defaults, then the file at `path` (if any), then `home` (the --home flag)."""
    defaults = _read_toml(DEFAULTS_FILE)
    values, source = defaults, str(DEFAULTS_FILE)
    if path is not None:
        values = _merge(defaults, _read_toml(Path(path)), str(path))
        source = str(path)
    # Validate the defaults too: a bad edit of conf/lookalike.toml should not slip through.
    for section, table in values.items():
        for key, value in table.items():
            _check_value(f"{section}.{key}", defaults[section][key], value)
    return Config(values, source).with_home(home)
