"""``buzzdask.preload``: the garbage collector paused for TensorFlow's import, and back after."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from buzzdask.preload import collection_paused


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
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.split() == ["0", "True"]
