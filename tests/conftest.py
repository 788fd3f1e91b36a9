"""Fixtures shared by the test modules, built once per session.

The screens are read-only for the tests: a test that damages, rewrites or touches a screen's files
works on a copy (``tests.fixtures.train.copy_screen``, or test_reliability's ``_copy_screen`` for the
stacks), and writes its own outputs under its ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import train as tf


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory) -> tf.Screen:
    """The tiny training screen: 16 px images, 6 treatments x 2 wells per plate, 2 plates of each of
    HUVEC-01, -02 (train) and -03 (test). Read-only: copy it before changing its files."""
    return tf.make_screen(tmp_path_factory.mktemp("screen"), image_size=16, wells_per_treatment=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_screen, tmp_path_factory) -> Path:
    """The weights file of ``tiny_screen`` trained for 1 epoch (``tf.TINY``, validated on HUVEC-02),
    in a folder of its own (not the screen's). Read-only."""
    out = tmp_path_factory.mktemp("tiny_model")
    tf.train_tiny(tiny_screen, out, {"epochs": 1})
    return out / "weights.pt"


@pytest.fixture(scope="session")
def data_screen(tmp_path_factory) -> tf.Screen:
    """A smaller screen for the data-loading tests: 4 treatments x 1 well per plate, 16 px.
    Read-only."""
    return tf.make_screen(tmp_path_factory.mktemp("data_screen"), n_treatments=4, wells_per_treatment=1)
