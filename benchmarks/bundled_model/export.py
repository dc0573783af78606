"""Export a training checkpoint as the bundled model (weights + config + metrics only).

Usage::

    python benchmarks/bundled_model/export.py RUN/best_model.pth \
        src/napari_var_emitter/weights/var_emitter_default.pth --model-id var-emitter-default-v1

Drops the optimiser, scheduler and RNG state (not needed for inference, and they triple
the size) and records the training step, validation metrics, history and, when present,
the calibration (``var-emitter calibrate``; run it on the exported file otherwise).
``config.json`` is written beside it, as beside every training checkpoint.
"""

from __future__ import annotations

import argparse
import os

from napari_var_emitter.checkpoint import load_checkpoint, save_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--model-id", default="var-emitter-default")
    a = ap.parse_args(argv)
    ckpt = load_checkpoint(a.checkpoint)
    save_checkpoint(a.out, ckpt["model"], ckpt["config_obj"], model_id=a.model_id,
                    step=int(ckpt.get("step", 0)), epoch=int(ckpt.get("epoch", 0)),
                    metrics=dict(ckpt.get("metrics", {})), history=list(ckpt.get("history", [])),
                    **({"calibration": ckpt["calibration"]} if "calibration" in ckpt else {}))
    ckpt["config_obj"].save(os.path.join(os.path.dirname(os.path.abspath(a.out)), "config.json"))
    print(f"{a.out}: {os.path.getsize(a.out) / 1e6:.2f} MB, step {ckpt.get('step')}, "
          f"metrics {ckpt.get('metrics')}")


if __name__ == "__main__":
    main()
