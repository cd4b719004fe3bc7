"""``buzzdask.preload``: the garbage collector paused for TensorFlow's import, and back after;
Keras left out of that import, and loaded on first use; a lean import for CPU scorers, which
scores as the whole one and becomes it on first use of anything else."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import subprocess
import sys

import pytest

from buzzdask import preload
from buzzdask.preload import collection_paused, keras_left_out
from tests.conftest import SHARED_DIR, in_a_fresh_interpreter, requires_shared


@pytest.fixture
def collector_on():
    was_enabled = gc.isenabled()
    gc.enable()
    yield
    if not was_enabled:
        gc.disable()


def test_the_collector_is_paused_for_the_block_and_back_after(collector_on):
    with collection_paused():
        assert not gc.isenabled()
        with collection_paused():  # another import inside: the outer block turns it back on
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_error_in_the_block_turns_the_collector_back_on(collector_on):
    with pytest.raises(ImportError), collection_paused():
        raise ImportError("no such module")
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off(collector_on):
    gc.disable()
    with collection_paused():
        pass
    assert not gc.isenabled()


def test_tensorflow_imports_with_fewer_full_collections():
    """In a fresh interpreter: paused, the import runs no full collection of its own."""
    script = (
        "import gc\n"
        "from buzzdask.preload import collection_paused\n"
        "before = gc.get_stats()[2]['collections']\n"
        "with collection_paused():\n"
        "    import tensorflow\n"
        "print(gc.get_stats()[2]['collections'] - before, gc.isenabled())\n"
    )
    assert in_a_fresh_interpreter(script) == ["0 True"]


def test_a_package_left_out_is_found_but_not_imported_in_the_block(tmp_path, monkeypatch):
    (tmp_path / "left_out_package").mkdir()
    (tmp_path / "left_out_package" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with keras_left_out(["left_out_package"]):
        spec = importlib.util.find_spec("left_out_package")
        assert spec is not None and spec.submodule_search_locations is not None
        with pytest.raises(ImportError, match="left out"):
            importlib.import_module("left_out_package")
        assert "left_out_package" not in sys.modules
    assert importlib.import_module("left_out_package").VALUE == 1
    assert not any(type(finder).__module__ == "buzzdask.preload" for finder in sys.meta_path)


def test_tensorflow_imports_without_keras_which_loads_on_first_use():
    """In a fresh interpreter: no Keras (nor the pandas it imports) until ``tf.keras``."""
    script = (
        "import gc, os, sys\n"
        "os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
        "from buzzdask.preload import import_tensorflow\n"
        "tf = import_tensorflow()\n"
        "print(sorted({'tf_keras', 'keras', 'pandas'} & set(sys.modules)), gc.isenabled())\n"
        "print(tf.keras.layers.Dense.__module__.split('.')[0], import_tensorflow() is tf)\n"
    )
    assert in_a_fresh_interpreter(script) == ["[] True", "tf_keras True"]


def test_a_worker_preload_leaves_tensorflow_out_of_later_collections():
    """In a fresh interpreter: the objects the preload's import leaves are frozen (whichever
    thread imported), and a collection after it walks only what came later; a scorer's own
    import freezes nothing."""
    script = (
        "import gc, threading\n"
        "from buzzdask.preload import _import_tensorflow, import_tensorflow, logging_set\n"
        "logging_set.set()\n"
        "threads = [threading.Thread(target=_import_tensorflow), "
        "threading.Thread(target=import_tensorflow)]\n"
        "for thread in threads: thread.start()\n"
        "for thread in threads: thread.join()\n"
        "frozen = gc.get_freeze_count()\n"
        "print(frozen > 200_000, gc.isenabled(), len(gc.get_objects()) < frozen // 10)\n"
    )
    assert in_a_fresh_interpreter(script) == ["True True True"]
    plain = "import gc\nfrom buzzdask.preload import import_tensorflow\nimport_tensorflow()\n"
    assert in_a_fresh_interpreter(plain + "print(gc.get_freeze_count())\n") == ["0"]


def test_a_log_that_takes_descriptor_2_during_the_import_keeps_it(tmp_path):
    """A watch's workers load TensorFlow before its first pass's log takes their descriptor 2
    (the pass may begin as they load): the console, given back after the import, kept every
    later line of theirs off the log."""
    log = tmp_path / "buzzdask.log"
    script = (
        "import os, sys\n"
        "from buzzdask import preload\n"
        "preload.console_is_stderr.set()\n"
        "with preload._native_start_off_console():\n"
        "    os.write(2, b'I0000 00:00 port.cc:153] oneDNN custom operations are on\\n')\n"
        f"    os.dup2(os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)\n"
        "os.write(2, b'after the import\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stderr == ""
    assert log.read_text() == "after the import\n"


#: Run in a fresh interpreter: TensorFlow imported lean or whole (``sys.argv``-free: the mode is
#: substituted), the real YAMNet's embeddings of 10 s of noise saved, then what was imported.
_SCORE_WITH = """
import sys, numpy as np
from buzzdask.preload import import_tensorflow
tf = import_tensorflow(lean={lean})
whole_api = 'tensorflow._api.v2.math' in sys.modules
tf.config.threading.set_intra_op_parallelism_threads(1)
embedder = tf.saved_model.load({embedder!r})
audio = np.random.default_rng(0).standard_normal(160_000).astype(np.float32) * 0.1
np.save({target!r}, np.asarray(embedder(tf.constant(audio, dtype=tf.float32))[1]))
print(type(tf).__name__, whole_api, len(sys.modules), tf.__version__ == tf.version.VERSION)
"""


@requires_shared
@pytest.mark.shared_data
@pytest.mark.slow
def test_a_lean_import_scores_as_the_whole_one_with_half_the_modules(tmp_path):
    embedder = str(SHARED_DIR / "models" / "yamnet" / "saved_model_wholehop")
    runs = {
        lean: in_a_fresh_interpreter(
            _SCORE_WITH.format(lean=lean, embedder=embedder, target=str(tmp_path / f"{lean}.npy"))
        )[0].split()
        for lean in (False, True)
    }
    # Lean: no public API until a name outside LEAN_API (here tf.version) is used.
    assert runs[True][:2] == ["_LeanTensorFlow", "False"]
    assert runs[False][:2] == ["module", "True"]
    assert runs[True][3] == runs[False][3] == "True"
    import numpy as np

    lean, whole = np.load(tmp_path / "True.npy"), np.load(tmp_path / "False.npy")
    assert lean.shape == (11, 1024)
    np.testing.assert_array_equal(lean, whole)
    # Modules in all after the load (the whole API is imported by the last line's tf.version).
    assert int(runs[True][2]) < 0.7 * int(runs[False][2])


def test_any_other_name_completes_a_lean_import():
    """In a fresh interpreter: ``tf.math``, ``tf.config``'s other functions and ``tf.keras``
    come from the whole API, run once; ``import tensorflow`` gives the same module."""
    script = (
        "import os, sys\n"
        "os.environ['TF_USE_LEGACY_KERAS'] = '1'  # as in the workers\n"
        "from buzzdask.preload import import_tensorflow\n"
        "tf = import_tensorflow(lean=True)\n"
        "print('tensorflow._api.v2.math' in sys.modules, 'tf_keras' in sys.modules)\n"
        "print(callable(tf.config.set_visible_devices), int(tf.math.add(1, 2)))\n"
        "import tensorflow\n"
        "print(tensorflow is tf is import_tensorflow(lean=True), hasattr(tf, 'no_such_name'))\n"
        "print(tf.keras.layers.Dense.__module__.split('.')[0])\n"
    )
    assert in_a_fresh_interpreter(script) == ["False False", "True 3", "True False", "tf_keras"]


def test_a_lean_import_where_tensorflow_lies_otherwise_is_a_whole_one():
    """A module of LEAN_API that is not there (another TensorFlow): the whole import, at once."""
    script = (
        "import sys\n"
        "from buzzdask import preload\n"
        "preload.LEAN_API['constant'] = ('tensorflow.python.no_such_module', 'constant')\n"
        "tf = preload.import_tensorflow(lean=True)\n"
        "print('tensorflow._api.v2.math' in sys.modules, int(tf.constant(2)))\n"
    )
    assert in_a_fresh_interpreter(script) == ["True 2"]


def test_device_plugins_make_the_import_whole(tmp_path, monkeypatch):
    """Where TensorFlow's ``__init__.py`` would load plugins, a lean import would miss them."""
    monkeypatch.delenv("TF_PLUGGABLE_DEVICE_LIBRARY_PATH", raising=False)
    assert not preload._plugins()
    monkeypatch.setenv("TF_PLUGGABLE_DEVICE_LIBRARY_PATH", str(tmp_path))
    assert preload._plugins()
    monkeypatch.delenv("TF_PLUGGABLE_DEVICE_LIBRARY_PATH")
    site = tmp_path / "lib" / "site-packages"
    (site / "tensorflow-plugins").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    assert preload._plugins()


@pytest.mark.parametrize(("resources", "kind"), [({}, "_LeanTensorFlow"), ({"GPU": 1}, "module")])
def test_a_worker_without_gpus_imports_lean_whichever_import_comes_first(resources, kind):
    """In a fresh interpreter set up as a worker: a scorer's own import, before the preload's
    (which waits for the run's logging settings), is lean too; with GPUs both are whole."""
    script = (
        "from types import SimpleNamespace\n"
        "from buzzdask import preload\n"
        f"worker = SimpleNamespace(state=SimpleNamespace(total_resources={resources!r}))\n"
        "preload.dask_setup(worker)\n"
        "print(type(preload.import_tensorflow()).__name__)\n"
    )
    assert in_a_fresh_interpreter(script) == [kind]
