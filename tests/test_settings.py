"""The settings object: defaults, overrides, and every way a configuration can be wrong."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
import yaml
from dask.utils import parse_bytes

import buzzdask.config
from buzzdask.errors import ParameterError
from buzzdask.settings import EmbedderSettings, Settings, load_settings

DEFAULTS = yaml.safe_load(Path(buzzdask.config.__file__).with_name("buzzdask.yaml").read_text())


@pytest.fixture(autouse=True)
def fresh_config() -> Iterator[Callable[..., None]]:
    """``dask.config`` rebuilt from the registered defaults plus only the given YAML files and
    environment (never the developer's own), restored afterwards."""
    saved = copy.deepcopy(dask.config.config)

    def refresh(*, env: Mapping[str, str] | None = None, paths: list[Path] | None = None) -> None:
        dask.config.refresh(paths=[str(p) for p in paths or []], env=env or {})

    refresh()
    yield refresh
    dask.config.config.clear()
    dask.config.config.update(saved)


def as_yaml(value: Any) -> Any:
    """A settings object as the YAML that would give it: hyphenated keys, lists."""
    if dataclasses.is_dataclass(value):
        return {
            f.name.replace("_", "-"): as_yaml(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {name: as_yaml(entry) for name, entry in value.items()}
    if isinstance(value, tuple):
        return [as_yaml(item) for item in value]
    return value


def test_defaults_are_the_yaml() -> None:
    expected = copy.deepcopy(DEFAULTS["buzzdask"])
    expected["memory-budget"] = parse_bytes(expected["memory-budget"])
    settings = load_settings()
    assert as_yaml(settings) == expected  # every key has a field, every field a key
    assert settings.chunk_seconds == 600.0
    assert settings.memory_budget == 2**30
    assert settings.seekable_codecs == ("mp3", "flac", "wavpack", "pcm_*")
    assert decode_chunk_default("seekable_codecs") == settings.seekable_codecs  # one list
    assert settings.watch.idle_timeout_seconds == 3600.0
    assert settings.embedders["yamnet_k2"].sample_rate == 16000
    assert settings.train.hidden_units == ()


def test_settings_are_a_plain_value() -> None:
    settings = load_settings()
    assert settings == load_settings()
    assert hash(settings) == hash(load_settings())
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.chunk_seconds = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.embedders["other"] = settings.embedders["yamnet_k2"]  # type: ignore[index]
    assert settings != load_settings(chunk_seconds=1)


def test_keyword_overrides() -> None:
    with dask.config.set({"buzzdask.chunk-seconds": 10, "buzzdask.batch-frames": 64}):
        settings = load_settings(chunk_seconds=300, memory_budget="2GiB", batch_frames=None)
    assert settings.chunk_seconds == 300.0  # the keyword beats the configuration
    assert settings.memory_budget == 2 * 2**30
    assert settings.batch_frames == 64  # None: not given
    # Numbers out of NumPy (a DataFrame's int64): numbers, exactly.
    counted = load_settings(
        batch_frames=np.int64(32), memory_budget=np.int64(2**40 + 1), chunk_seconds=np.float32(60)
    )
    assert (counted.batch_frames, counted.memory_budget) == (32, 2**40 + 1)
    assert counted.chunk_seconds == 60.0

    trained = settings.with_overrides(train={"epochs": 5, "patience": None})
    assert (trained.train.epochs, trained.train.patience) == (5, 10)
    assert settings.train.epochs == 200  # a copy; the original is unchanged

    local = settings.with_overrides(embedders={"yamnet_k2": {"handle": "/models/yamnet"}})
    assert local.embedders["yamnet_k2"] == dataclasses.replace(
        settings.embedders["yamnet_k2"], handle="/models/yamnet"
    )


def test_spellings_the_configuration_can_arrive_in() -> None:
    given = {
        "buzzdask.train.learning-rate": "1e-3",  # PyYAML reads 1e-3 as a string
        "buzzdask.batch-frames": 512.0,
        "buzzdask.staging.enabled": 1,  # DASK_BUZZDASK__STAGING__ENABLED=1
        "buzzdask.model-dirs": ("models", "/fs/models"),
        "buzzdask.local-cluster.dashboard-address": 8787,  # distributed takes a bare port
    }
    with dask.config.set(given):
        settings = load_settings()
    assert settings.train.learning_rate == 0.001
    assert settings.batch_frames == 512 and isinstance(settings.batch_frames, int)
    assert settings.staging.enabled is True
    assert settings.model_dirs == ("models", "/fs/models")
    assert settings.local_cluster.dashboard_address == ":8787"
    with dask.config.set({"buzzdask.local-cluster.dashboard-address": "8790"}):  # YAML's '8790'
        assert load_settings().local_cluster.dashboard_address == ":8790"


_ADDRESS = "an address such as ':8787' or 'localhost:8787' (no URL), or a port, or null"


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("chunk-seconds", -1, "a number in (0, 86400] [s]"),
        ("chunk-seconds", "soon", "a number in (0, 86400] [s]"),
        ("chunk-seconds", True, "a number in (0, 86400] [s]"),
        ("chunk-seconds", 1e9, "a number in (0, 86400] [s]"),  # 58 TiB each: MemoryError
        ("scorer-ping-seconds", float("inf"), "a number > 0 [s]"),
        ("decode-margin-seconds", -0.1, "a number >= 0 [s]"),
        ("memory-budget", "lots", "a size > 0: an integer or a string such as '1GiB' [bytes]"),
        ("memory-budget", 0, "a size > 0"),
        ("memory-budget", "", "a size > 0"),
        ("memory-budget", "GiB", "a size > 0"),
        ("memory-budget", float("inf"), "a size > 0"),
        ("memory-budget", "1e400", "a size > 0"),
        ("memory-budget", 1.5, "a size > 0"),  # was 1 byte
        ("batch-frames", 0, "an integer >= 1 [frames]"),
        ("batch-frames", 2.5, "an integer >= 1 [frames]"),
        ("cpu-scorer-workers", 0, "an integer >= 1, or null (every worker)"),
        ("cpu-call-frames", 0, "an integer >= 1 [frames], or null (batch-frames)"),
        ("tf-intra-op-threads", -2, "an integer >= 1, or null (TensorFlow's default)"),
        ("seekable-codecs", "mp3", "a list of strings"),
        ("model-dirs", ["models", 3], "a list of strings"),
        ("ffmpeg", "", "a non-empty string"),
        ("transfer", 5, "a mapping of settings"),
        ("transfer.batch-size", 0, "an integer >= 1 [files]"),
        ("watch.poll-seconds", 0, "a number > 0 [s]"),
        ("watch.idle-timeout-seconds", -1, "a number > 0 [s], or null (stop only at the marker)"),
        ("staging.enabled", "maybe", "true or false"),
        ("staging.keep-files", -1, "an integer >= 0 [files]"),
        ("local-cluster.dashboard-address", -1, _ADDRESS),
        ("local-cluster.dashboard-address", "abc", _ADDRESS),
        ("local-cluster.dashboard-address", "http://localhost:8791", _ADDRESS),  # a URL
        ("embedders.yamnet_k2.sample-rate", 0, "an integer >= 1 [Hz]"),
        ("embedders.yamnet_k2.frame-context-seconds", -0.01, "a number >= 0 [s]"),
        ("train.holdout-fraction", 1.0, "a number in (0, 1)"),
        ("train.target-precision", 0, "a number in (0, 1]"),
        ("train.hidden-units", [8, 0], "a list of integers >= 1"),
        ("train.learning-rate", 0, "a number > 0"),
        ("train.epochs", 0, "an integer >= 1 [epochs]"),
        ("train.patience", -1, "an integer >= 0 [epochs]"),
        ("train.seed", -1, "an integer >= 0"),
    ],
)
def test_bad_values_name_key_value_and_rule(key: str, value: Any, rule: str) -> None:
    variable = "DASK_BUZZDASK__" + key.upper().replace("-", "_").replace(".", "__")
    message = f"buzzdask.{key}={value!r} must be {rule}"
    with dask.config.set({f"buzzdask.{key}": value}), pytest.raises(ParameterError) as error:
        load_settings()
    assert message in str(error.value)
    assert f"~/.config/dask/, a {variable} variable or dask.config.set" in str(error.value)


def test_bad_keyword_values_name_the_keyword() -> None:
    with pytest.raises(
        ParameterError, match=r"^chunk_seconds=0 must be a number in \(0, 86400\] \[s\]$"
    ):
        load_settings(chunk_seconds=0)
    with pytest.raises(ParameterError, match=r"^memory_budget='-1GiB' must be a size > 0"):
        load_settings(memory_budget="-1GiB")
    with pytest.raises(ParameterError, match=r"^train\.epochs=0 must be an integer >= 1"):
        load_settings().with_overrides(train={"epochs": 0})
    with pytest.raises(ParameterError, match=r"^train=5 must be a mapping of settings$"):
        load_settings(train=5)


@pytest.mark.parametrize(
    ("key", "nearest"),
    [
        ("chunk-secondz", "chunk-seconds"),
        ("memory_budgett", "memory-budget"),
        ("train.epochz", "train.epochs"),
        ("local-cluster.dashboard", "local-cluster.dashboard-address"),
        ("embedders.yamnet_k2.sample-rat", "embedders.yamnet_k2.sample-rate"),
        ("cluster", "clusters"),
    ],
)
def test_unknown_keys_name_the_nearest(key: str, nearest: str) -> None:
    shown = key.replace("_", "-") if "." not in key else key
    with dask.config.set({f"buzzdask.{key}": 1}):
        with pytest.raises(ParameterError) as error:
            load_settings()
    assert str(error.value).startswith(f"unknown setting buzzdask.{shown} (set in a YAML file")
    assert str(error.value).endswith(f"did you mean buzzdask.{nearest}?")


def test_unknown_keys_without_a_near_one_list_the_known_ones() -> None:
    with dask.config.set({"buzzdask.watch.xyzzy": 1}):
        with pytest.raises(
            ParameterError,
            match=r"; the known ones are marker, poll-seconds, idle-timeout-seconds$",
        ):
            load_settings()


def test_unknown_keywords_name_the_nearest() -> None:
    with pytest.raises(
        ParameterError, match=r"^unknown keyword chunk_secondz; did you mean chunk_seconds\?$"
    ):
        load_settings(chunk_secondz=300)
    with pytest.raises(
        ParameterError, match=r"unknown keyword train\.epochz; did you mean train\.epochs\?"
    ):
        load_settings(train={"epochz": 5})
    with pytest.raises(ParameterError, match=r"unknown keyword clusters"):
        load_settings(clusters={})


@pytest.mark.parametrize("key", ["downmix", "resampler"])
def test_removed_embedder_keys_say_why(key: str) -> None:
    with dask.config.set({f"buzzdask.embedders.yamnet_k2.{key}": "mean"}):
        with pytest.raises(
            ParameterError,
            match=rf"buzzdask\.embedders\.yamnet_k2\.{key} .* removed: preprocessing is fixed",
        ):
            load_settings()


def test_a_misspelt_environment_variable_is_caught(fresh_config: Callable[..., None]) -> None:
    fresh_config(env={"DASK_BUZZDASK__CHUNK_SECONDZ": "300"})
    with pytest.raises(
        ParameterError,
        match=r"^unknown setting buzzdask\.chunk-secondz \(set in a YAML file under "
        r"~/\.config/dask/, a DASK_BUZZDASK__CHUNK_SECONDZ variable or dask\.config\.set\); "
        r"did you mean buzzdask\.chunk-seconds\?$",
    ):
        load_settings()


def test_environment_variables_are_read(fresh_config: Callable[..., None]) -> None:
    fresh_config(
        env={
            "DASK_BUZZDASK__CHUNK_SECONDS": "300",
            "DASK_BUZZDASK__MEMORY_BUDGET": "2GiB",
            "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0",
            "DASK_BUZZDASK__STAGING__ENABLED": "true",
            "DASK_BUZZDASK__TRANSFER__RCLONE_FLAGS": '["--bwlimit", "50M"]',
            "DASK_BUZZDASK__EMBEDDERS__YAMNET_K2__HANDLE": "/models/yamnet",
        }
    )
    settings = load_settings()
    assert settings.chunk_seconds == 300.0
    assert settings.memory_budget == 2 * 2**30
    assert settings.local_cluster.dashboard_address == ":0"
    assert settings.staging.enabled is True
    assert settings.transfer.rclone_flags == ("--bwlimit", "50M")
    assert settings.embedders["yamnet_k2"].handle == "/models/yamnet"
    assert settings.embedders["yamnet_k2"].sample_rate == 16000

    fresh_config(env={"DASK_BUZZDASK__MODEL_DIRS": "/fs/models"})  # a string, not a list
    with pytest.raises(ParameterError, match=r"buzzdask\.model-dirs='/fs/models' must be a list"):
        load_settings()


def test_a_misspelt_key_in_a_yaml_file_is_caught(
    fresh_config: Callable[..., None], tmp_path: Path
) -> None:
    (tmp_path / "mine.yaml").write_text("buzzdask:\n  train:\n    epochz: 5\n")
    fresh_config(paths=[tmp_path])
    with pytest.raises(ParameterError, match=r"did you mean buzzdask\.train\.epochs\?"):
        load_settings()


def test_what_dasks_merge_would_hide_is_caught(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A plain value where a section goes was replaced by the section's defaults; keys outside
    buzzdask: were never read. Both came from the user's own files and variables."""
    monkeypatch.setattr(dask.config, "paths", [str(tmp_path)])
    monkeypatch.setenv("DASK_BUZZDASK__STAGING", "true")
    with pytest.raises(
        ParameterError,
        match=r"^buzzdask\.staging=True must be a mapping of settings \(set by the "
        r"DASK_BUZZDASK__STAGING variable\)",
    ):
        load_settings()
    monkeypatch.delenv("DASK_BUZZDASK__STAGING")
    # An embedder given as its handle alone (the handle stayed TF Hub's), either spelling.
    for name in ("yamnet_k2", "yamnet-k2"):
        (tmp_path / "mine.yaml").write_text(f"buzzdask:\n  embedders:\n    {name}: /data/y\n")
        with pytest.raises(ParameterError, match=r"embedders\.yamnet_k2='/data/y' must be a"):
            load_settings()
    # Sections whose keys are all commented out are the defaults, as meant.
    (tmp_path / "mine.yaml").write_text("buzzdask:\n  # chunk-seconds: 3\n")
    assert load_settings().chunk_seconds == 600.0
    (tmp_path / "mine.yaml").write_text("buzzdask:\n  local-cluster:\n  embedders:\n")
    assert load_settings().chunk_seconds == 600.0
    # Also once dask.config.refresh() read the file over the defaults (None replaced them).
    (tmp_path / "mine.yaml").write_text(
        "buzzdask:\n  chunk-seconds: 300\n  staging:\n  embedders:\n    yamnet_k2:\n"
    )
    dask.config.refresh(paths=[str(tmp_path)], env={})
    settings = load_settings()
    assert settings.chunk_seconds == 300.0  # the file was read
    assert settings.staging.enabled is False
    assert settings.embedders["yamnet_k2"].sample_rate == 16000
    monkeypatch.setenv("DASK_BUZZDASK_CHUNK_SECONDS", "3")  # one underscore
    (tmp_path / "mine.yaml").write_text("chunk-seconds: 3\nbuzzdsak:\n  batch-frames: 9\n")
    with pytest.raises(ParameterError) as refused:
        load_settings()
    for key in ("buzzdask_chunk_seconds", "chunk-seconds", "buzzdsak"):
        assert f"'{key}' at the top of the configuration" in str(refused.value)
    assert "buzzdask's keys go under 'buzzdask:' (variables: DASK_BUZZDASK__KEY)" in str(
        refused.value
    )


def test_every_problem_is_reported_at_once() -> None:
    given = {"buzzdask.chunk-secondz": 1, "buzzdask.batch-frames": 0, "buzzdask.train.seed": -1}
    with dask.config.set(given), pytest.raises(ParameterError) as error:
        load_settings()
    lines = str(error.value).splitlines()
    assert len(lines) == 3
    assert {line.split("=")[0].split(" (")[0] for line in lines} == {
        "unknown setting buzzdask.chunk-secondz",
        "buzzdask.batch-frames",
        "buzzdask.train.seed",
    }


def test_new_embedders_need_every_key() -> None:
    with dask.config.set(
        {"buzzdask.embedders.mine": {"handle": "/models/mine", "sample-rate": 8000}}
    ):
        with pytest.raises(ParameterError) as error:
            load_settings()
    assert str(error.value).splitlines() == [
        f"buzzdask.embedders.mine.{key} is missing (set in a YAML file under ~/.config/dask/, "
        f"a DASK_BUZZDASK__EMBEDDERS__MINE__{key.upper().replace('-', '_')} variable or "
        "dask.config.set)"
        for key in ("frame-length-seconds", "frame-context-seconds")
    ]
    complete = {"frame-length-seconds": 0.5, "frame_context_seconds": 0}
    with dask.config.set(
        {"buzzdask.embedders.mine": {"handle": "/models/mine", "sample-rate": 8000, **complete}}
    ):
        settings = load_settings()
    assert settings.embedders["mine"] == EmbedderSettings("/models/mine", 8000, 0.5, 0.0)
    assert set(settings.embedders) == {"yamnet_k2", "mine"}


def test_cluster_configurations_are_not_settings() -> None:
    # Entries of cluster_configs/*.yaml (checked by load_cluster_config), as test_cluster sets one.
    with dask.config.set({"buzzdask.clusters.local.dashboard-address": ":0"}):
        settings = load_settings()
    assert isinstance(settings, Settings)
    assert not hasattr(settings, "clusters")


def decode_chunk_default(name: str):
    """The default of a decode_chunk option (which a chunk decoded outside a run uses)."""
    import inspect

    from buzzdask.decode import decode_chunk

    return inspect.signature(decode_chunk).parameters[name].default
