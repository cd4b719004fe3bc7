"""Model directories as the lab has them: buzzdetect's earlier layouts, and damaged copies."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import dask
import pytest
import yaml

from buzzdask.errors import ModelError
from buzzdask.models import load_head, resolve_model
from tests.conftest import CLASSES, requires_ffmpeg


@pytest.fixture
def copy_of(tiny_model, tmp_path):
    """A copy of the tiny model, its ``config_model.json`` changed by ``edit``."""

    def copy(name: str, edit=None) -> Path:
        model = Path(shutil.copytree(tiny_model, tmp_path / name))
        if edit is not None:
            config = json.loads((model / "config_model.json").read_text())
            edit(config)
            (model / "config_model.json").write_text(json.dumps(config))
        return model

    return copy


def test_earlier_buzzdetect_layouts_load_as_the_current_one(copy_of, tiny_embedder):
    current = resolve_model(copy_of("current"), embedder=str(tiny_embedder))
    # Its trainer wrote config_model.txt until 2025, and "embedder" before "embeddername".
    earlier = copy_of("earlier", lambda c: c.update(embedder=c.pop("embeddername")))
    (earlier / "config_model.json").rename(earlier / "config_model.txt")
    loaded = resolve_model(earlier, embedder=str(tiny_embedder))
    assert (loaded.classes, loaded.embedder) == (current.classes, current.embedder)
    assert loaded.digits_results == current.digits_results


def test_a_name_is_found_in_one_search_directory_given_as_text(copy_of, tiny_embedder, tmp_path):
    copy_of("model_lab")
    for search_dirs in (str(tmp_path), tmp_path):  # one folder, not a list of its characters
        found = resolve_model("lab", search_dirs=search_dirs, embedder=str(tiny_embedder))
        assert found.path == str(tmp_path / "model_lab")


def test_an_unknown_embedder_is_refused_with_the_configuration_to_add(copy_of, tiny_embedder):
    model = copy_of("old", lambda c: c.update(embeddername="yamnet"))
    with pytest.raises(ModelError, match="unknown embedder 'yamnet'") as refused:
        resolve_model(model, embedder=str(tiny_embedder))
    message = str(refused.value)
    assert "buzzdetect's models before 2025-09 name TF Hub's YAMNet 'yamnet'" in message
    # The configuration the message gives, pasted into a config file, is the fix.
    (snippet,) = re.findall(r"(buzzdask: \{embedders: .*\}\}\})", message)
    as_read = dask.config.update(copy.deepcopy(dask.config.config), yaml.safe_load(snippet))
    with dask.config.set(as_read):
        loaded = resolve_model(model, embedder=str(tiny_embedder))
    assert loaded.embedder.name == "yamnet" and loaded.classes == tuple(CLASSES)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda m: (m / "variables" / "variables.index").unlink(), "lacks variables.index"),
        (lambda m: (m / "saved_model.pb").write_bytes(b""), "no saved_model.pb"),
        (lambda m: shutil.rmtree(m / "variables"), None),  # a SavedModel of constants could
    ],
    ids=["no-index", "empty-graph", "no-variables"],
)
def test_a_head_copied_short_is_refused_before_anything_starts(copy_of, damage, said):
    model = copy_of("cut")
    damage(model)
    if said is None:  # passes the look at its files; TensorFlow's load says, with the path
        with pytest.raises(ModelError, match=f"cannot load the head SavedModel in {model}"):
            load_head(str(model))
        return
    with pytest.raises(ModelError, match=f"the head must be a TF SavedModel: .*{said}"):
        resolve_model(model)


def test_a_damaged_variables_shard_is_a_model_error_naming_the_head(copy_of):
    model = copy_of("truncated")
    (shard,) = (model / "variables").glob("variables.data-*")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ModelError, match=f"cannot load the head SavedModel in {model} .*cut short"):
        load_head(str(model))


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("model.keras", "which can be exported as one: keras.models.load_model('{file}')"
         ".export('{model}')"),
        # Model.save_weights: keras.models.load_model of it raised "No model config found".
        ("model.weights.h5", "weights only: build the head's Keras model again, then "
         "model.load_weights('{file}') and model.export('{model}')"),
    ],
)  # fmt: skip
def test_a_keras_file_head_is_refused_with_what_makes_it_a_savedmodel(tmp_path, name, said):
    model = tmp_path / "keras_head"
    model.mkdir()
    (model / "config_model.json").write_text(json.dumps({"classes": ["a"], "embeddername": "x"}))
    (model / name).write_bytes(b"PK")
    with pytest.raises(ModelError) as refused:
        resolve_model(model)
    assert f"holds {name}, " + said.format(file=model / name, model=model) in str(refused.value)


def test_an_empty_class_name_is_refused(copy_of, tiny_embedder):
    model = copy_of("blank", lambda c: c.update(classes=["ins_buzz", " "]))
    with pytest.raises(ModelError, match=r"a class has an empty name \(\['ins_buzz', ' '\]\)"):
        resolve_model(model, embedder=str(tiny_embedder))


def test_a_one_class_head_of_one_value_per_frame_scores_one_column(tmp_path):
    """A Dense(1) head squeezed to shape (n,): buzzdetect reads it as one column."""
    import numpy as np
    import tensorflow as tf

    module = tf.Module()
    module.kernel = tf.Variable(np.linspace(0, 1, 1024, dtype=np.float32)[:, None])
    module.serve = tf.function(
        lambda input: {"dense": tf.matmul(input, module.kernel)[:, 0]},
        input_signature=[tf.TensorSpec([None, 1024], tf.float32, name="input")],
    )
    tf.saved_model.save(
        module, str(tmp_path / "head"), signatures={"serving_default": module.serve}
    )
    score, input_size = load_head(str(tmp_path / "head"))
    embeddings = np.ones((3, 1024), np.float32)
    activations = score(embeddings)
    assert input_size == 1024 and activations.shape == (3, 1)
    np.testing.assert_allclose(
        activations[:, 0], embeddings @ module.kernel.numpy()[:, 0], rtol=1e-5
    )


def test_a_head_without_serving_default_says_what_it_has(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.predict = tf.function(
        lambda x: {"dense": x[:, :2]}, input_signature=[tf.TensorSpec([None, 1024], tf.float32)]
    )
    tf.saved_model.save(module, str(tmp_path / "head"), signatures={"predict": module.predict})
    with pytest.raises(ModelError, match=r"no serving_default signature \(it has \['predict'\]\)"):
        load_head(str(tmp_path / "head"))


@pytest.mark.parametrize("digits", ["two", -1, 2.5, True])
def test_digits_results_must_be_a_whole_number(copy_of, tiny_embedder, digits):
    model = copy_of("digits", lambda c: c.update(digits_results=digits))
    with pytest.raises(ModelError, match=f"'digits_results' {re.escape(repr(digits))} must be"):
        resolve_model(model, embedder=str(tiny_embedder))


@requires_ffmpeg
def test_a_head_given_as_the_embedder_is_a_model_error_naming_it(
    make_audio, tmp_path, dask_client, tiny_model
):
    # A SavedModel that embeds nothing: TensorFlow's "Could not find matching concrete
    # function" over many lines, without the embedder's name.
    import buzzdask

    make_audio("a.wav", n_samples=3 * 15360)
    with pytest.raises(ModelError, match=rf"embedder '{re.escape(str(tiny_model))}' cannot embed"):
        buzzdask.analyze(
            tmp_path / "audio",
            tiny_model,
            output=tmp_path / "out",
            client=dask_client,
            embedder=str(tiny_model),
            progress=False,
        )
