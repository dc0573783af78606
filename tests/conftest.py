"""Shared test fixtures, and the rules for GUI tests.

Tests marked ``gui`` need a real display: pytest-xvfb starts Xvfb automatically on Linux
(OpenGL works there; Qt's "offscreen" platform has none and gives black screenshots). Where
no display can be had they are skipped with the reason, unless ``VAR_EMITTER_REQUIRE_GUI=1``
(set by CI), which turns that skip into a failure so a broken display is never silent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAME = "napari-var-emitter"

_display_problem_cache: list = []


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Single-threaded torch in every test: OpenMP barriers are up to ~100x slower when the
    two cores of a CI machine are shared with the subprocesses tests start."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _probe_display() -> str | None:
    """None when a Qt application can start here, else the reason it cannot."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform.startswith(("offscreen", "minimal")):
        return f"QT_QPA_PLATFORM={platform} has no OpenGL; run under Xvfb (pytest-xvfb)"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return "no display: install Xvfb and pytest-xvfb (or set DISPLAY)"
    # in a child process: a Qt platform plugin that cannot connect aborts the whole process
    code = ("from qtpy.QtWidgets import QApplication\n"
            "app = QApplication([])\nprint('display-ok')\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "starting a Qt application timed out"
    if proc.returncode != 0 or "display-ok" not in proc.stdout:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return "Qt cannot start: " + (lines[-1] if lines else f"exit code {proc.returncode}")
    return None


def display_problem() -> str | None:
    """Cached :func:`_probe_display` (probed once per session, only when GUI tests run)."""
    if not _display_problem_cache:
        _display_problem_cache.append(_probe_display())
    return _display_problem_cache[0]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Skip (or, with VAR_EMITTER_REQUIRE_GUI=1, fail) GUI tests without a display."""
    if item.get_closest_marker("gui") is None:
        return
    problem = display_problem()
    if problem is None:
        return
    if os.environ.get("VAR_EMITTER_REQUIRE_GUI") == "1":
        pytest.fail(f"GUI test needs a display (VAR_EMITTER_REQUIRE_GUI=1): {problem}",
                    pytrace=False)
    pytest.skip(f"GUI test skipped: {problem}")


@pytest.fixture(scope="session")
def var_emitter_plugin():
    """The plugin's npe2 manifest, registered with napari's plugin manager.

    An installed package is found through its entry point; a source checkout (tests run
    with PYTHONPATH=src) is registered from the repository's napari.yaml.
    """
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    pm.discover()
    try:
        return pm.get_manifest(PLUGIN_NAME)
    except KeyError:
        manifest = PluginManifest.from_file(REPO_ROOT / "napari.yaml")
        pm.register(manifest)
        return manifest


@pytest.fixture
def viewer_with_plugin(make_napari_viewer, var_emitter_plugin):
    """A shown napari viewer (Xvfb) with this plugin available; no welcome screen."""
    viewer = make_napari_viewer(show=True)
    return viewer


@pytest.fixture(scope="session")
def tiny_model_config():
    """A very small model configuration (fast on a CPU): 16x16 tiles, factors 2/4/8."""
    from napari_var_emitter.config import Config

    return Config.from_dict({
        "model": {"input_size": [16, 16], "target_sizes": [[32, 32], [64, 64], [128, 128]],
                  "base_channels": 8, "embed_dim": 16, "num_heads": 2, "num_layers": 1,
                  "patch_size": 4, "codebook_size": 16, "vq_scales": [1, 2, 4]},
        "training": {"num_epochs": 2, "batch_size": 4, "steps_per_epoch": 3,
                     "val_samples": 8, "warmup_epochs": 1},
        "simulation": {"frame_size": [16, 16]},
    })


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory, tiny_model_config):
    """A checkpoint of the tiny model with random weights: exercises every code path of
    inference (its detections are meaningless, so tests on it check structure only)."""
    import torch

    from napari_var_emitter.checkpoint import save_checkpoint
    from napari_var_emitter.model import VarEmitterNet

    torch.manual_seed(0)
    model = VarEmitterNet(tiny_model_config.model)
    path = tmp_path_factory.mktemp("ckpt") / "untrained.pth"
    save_checkpoint(path, model.state_dict(), tiny_model_config, step=0)
    return path


def _drain(gen):
    """Exhaust a generator; return (the items it yielded, its return value)."""
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


@pytest.fixture
def drain():
    """:func:`_drain` for tests of generators that yield progress and return a result."""
    return _drain
