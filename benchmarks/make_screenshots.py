"""Screenshots for the README: the sample data, the inference widget and the training widget.

Usage (needs a display; on a headless machine run it under ``xvfb-run -a``)::

    python benchmarks/make_screenshots.py OUT_DIR [--checkpoint CKPT] [--frames 200]
        [--train-config tiny_config.json] [--train-steps 20]

Writes ``OUT_DIR/inference_canvas.png`` (probability map x8 over the frame with the detected
peaks), ``OUT_DIR/inference_window.png`` (the whole window with the inference dock),
``OUT_DIR/super_resolution.png`` and ``OUT_DIR/training_window.png`` (the training dock with
its loss curves after a short simulated fine-tune, whose checkpoints go to a temporary
folder that is removed at the end).
Without ``--checkpoint`` the bundled model is used.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _register_plugin():
    """Make sure napari knows the plugin (an uninstalled checkout registers napari.yaml)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    pm.discover()
    try:
        pm.get_manifest("napari-var-emitter")
    except KeyError:
        pm.register(PluginManifest.from_file(REPO_ROOT / "napari.yaml"))


def _wait(widget, timeout_s: float):
    """Process Qt events until the widget's job has finished."""
    from qtpy.QtWidgets import QApplication

    t0 = time.monotonic()
    while widget.running:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout_s:
            widget.cancel()
            raise TimeoutError(f"the job did not finish within {timeout_s:.0f} s")
    for _ in range(20):  # let the last signals and redraws through
        QApplication.processEvents()
        time.sleep(0.01)


def _save(image, path):
    import imageio.v3 as iio

    iio.imwrite(path, image)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--checkpoint", default=None, help="model (default: the bundled one)")
    parser.add_argument("--frames", type=int, default=200, help="frames of the sparse sample")
    parser.add_argument("--frame", type=int, default=10, help="frame shown in the screenshots")
    parser.add_argument("--train-config", default=None,
                        help="config.json of a model trained from scratch for the training "
                             "demo (default: fine-tune the bundled model)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    import numpy as np

    from napari_var_emitter._napari import inference_widget as IW
    from napari_var_emitter._napari import training_widget as TW

    _register_plugin()
    viewer = napari.Viewer(show=True, title="napari-var-emitter")
    viewer.window.resize(1400, 900)
    run_dir = None
    try:
        viewer.open_sample("napari-var-emitter", "sparse")
        sample = viewer.layers["sparse emitters"]
        truth = viewer.layers["sparse emitters ground truth"]
        if args.frames < sample.data.shape[0]:
            sample.data = np.asarray(sample.data[:args.frames])
            truth.data = truth.data[truth.data[:, 0] < args.frames]
        _, inference = viewer.window.add_plugin_dock_widget("napari-var-emitter",
                                                            "VAR emitter inference")
        inference.image.value = sample
        if args.checkpoint:
            inference.model_source.value = IW.MODEL_CHECKPOINT
            inference.checkpoint.value = args.checkpoint
        if inference.run() is None:
            print("error: inference could not start (see the notification)", file=sys.stderr)
            return 2
        _wait(inference, args.timeout)
        if inference.last_run is None:
            print(f"error: inference failed: {inference.status.value}", file=sys.stderr)
            return 2

        frame = min(args.frame, sample.data.shape[0] - 1)
        viewer.dims.set_point(0, frame)
        shown = {"sparse emitters", "VAR sparse emitters probability x8",
                 "VAR sparse emitters peaks"}
        for layer in viewer.layers:
            layer.visible = layer.name in shown
        viewer.reset_view()
        _save(viewer.screenshot(canvas_only=True, flash=False), out / "inference_canvas.png")
        _save(viewer.screenshot(canvas_only=False, flash=False), out / "inference_window.png")
        for layer in viewer.layers:
            layer.visible = layer.name == "VAR sparse emitters super-resolution"
        _save(viewer.screenshot(canvas_only=True, flash=False), out / "super_resolution.png")

        _, training = viewer.window.add_plugin_dock_widget("napari-var-emitter",
                                                           "VAR emitter training")
        training.source.value = TW.SOURCE_SIMULATION
        run_dir = tempfile.mkdtemp(prefix="screenshot-training-")
        training.output_dir.value = run_dir
        if args.train_config:
            training.config_file.value = args.train_config
            training.init.value = TW.INIT_SCRATCH
        steps_per_epoch = max(1, args.train_steps // 4)
        training.steps_per_epoch.value = steps_per_epoch
        training.epochs.value = max(1, args.train_steps // steps_per_epoch)
        training.batch_size.value = 8
        if training.start() is None:
            print("error: training could not start (see the notification)", file=sys.stderr)
            return 2
        _wait(training, args.timeout)
        for layer in viewer.layers:
            layer.visible = layer.name in shown
        _save(viewer.screenshot(canvas_only=False, flash=False), out / "training_window.png")
    finally:
        viewer.close()
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
