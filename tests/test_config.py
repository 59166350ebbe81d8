from pathlib import Path

import pytest

from lookalike.config import REPO_ROOT, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_load_and_are_valid() -> None:
    cfg = load_config()
    assert cfg["extract"]["thumb_size"] == 512
    assert cfg["spark"]["master"].startswith("local")


def test_override_changes_only_named_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[extract]\nthumb_size = 256\n"))
    assert cfg["extract"]["thumb_size"] == 256
    assert cfg["extract"]["thumb_quality"] == load_config()["extract"]["thumb_quality"]


@pytest.mark.parametrize(("text", "named"), [
    ("[extract]\nthumb_sise = 256\n", "extract.thumb_sise"),
    ("[extrakt]\nthumb_size = 256\n", "extrakt"),
    ("[extract]\nthumb_size = 'big'\n", "extract.thumb_size"),
    ("[extract]\nthumb_size = 10\n", "extract.thumb_size"),
    ("[neardup]\nmin_cosine = 2.0\n", "neardup.min_cosine"),
    ("[embed]\nbackend = 'gpu'\n", "embed.backend"),
    ("[scan]\nextensions = '.jpg'\n", "scan.extensions"),
    ("[extract]\nthumb_size = true\n", "extract.thumb_size"),
    ("[extract]\nkeep_gps = 1\n", "extract.keep_gps"),
    ("[extract]\nexif_timezone = 'Mars/Olympus'\n", "extract.exif_timezone"),
    ("[cluster]\nk_per_sqrt_n = 0\n", "cluster.k_per_sqrt_n"),
])
def test_bad_config_is_rejected_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[extract\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_dsn_from_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(write(tmp_path, "[catalog]\ndsn = 'postgresql://a@b/c'\n"))
    assert cfg.dsn == "postgresql://a@b/c"
    monkeypatch.setenv("LOOKALIKE_DSN", "postgresql://x@y/z")
    assert cfg.dsn == "postgresql://x@y/z"


def test_home_flag_overrides(tmp_path: Path) -> None:
    assert load_config(None, tmp_path / "h").home == (tmp_path / "h").resolve()


def test_the_cluster_example_is_a_valid_override(tmp_path: Path) -> None:
    cfg = load_config(REPO_ROOT / "conf" / "cluster.example.toml", tmp_path)
    assert cfg["spark"]["master"].startswith("spark://")
    assert cfg["catalog"]["dsn"].startswith("postgresql://")


def test_finer_categories_from_the_configuration(tmp_path: Path) -> None:
    from lookalike.cluster.algorithm import ClusterConfig, derive_k

    default = ClusterConfig.from_config(load_config()["cluster"])
    override = write(tmp_path, "[cluster]\nk_per_sqrt_n = 4\n")
    finer = ClusterConfig.from_config(load_config(override)["cluster"])
    assert (derive_k(10_000, default), derive_k(10_000, finer)) == (300, 400)
    assert derive_k(10_000_000, finer) == finer.k_max  # still bounded for the largest archives
