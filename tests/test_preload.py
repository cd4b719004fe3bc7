"""``buzzdask.preload``: the garbage collector paused for TensorFlow's import, and back after;
Keras left out of that import, and loaded on first use."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import sys

import pytest

from buzzdask.preload import collection_paused, keras_left_out
from tests.conftest import in_a_fresh_interpreter


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
