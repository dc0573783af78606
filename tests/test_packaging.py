"""The package installs with its manifest: editable (this checkout) and as a built wheel."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_finds_the_root_manifest():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("napari-var-emitter")
    # one source: the package's napari.yaml is the repository root's file
    pkg_yaml = ROOT / "src" / "napari_var_emitter" / "napari.yaml"
    assert pkg_yaml.read_text() == (ROOT / "napari.yaml").read_text()
    assert mf.name == "napari-var-emitter"
    r = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-var-emitter"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_wheel_ships_manifest_and_weights_and_validates(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the tracked files")
    src = tmp_path / "src"
    # build from the tracked files only, as a release would
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        dest = src / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / f).is_symlink():
            os.symlink(os.readlink(ROOT / f), dest)
        elif (ROOT / f).is_file():
            shutil.copy2(ROOT / f, dest)
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                        "--outdir", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_var_emitter/napari.yaml" in names
    assert any(n.startswith("napari_var_emitter/weights/") and n.endswith(".pth") for n in names)
    assert "napari_var_emitter/weights/config.json" in names
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--target", str(target), str(wheel)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import napari_var_emitter, sys; assert str(napari_var_emitter.__file__)"
            f".startswith({str(target)!r}), napari_var_emitter.__file__;"
            "from npe2.cli import main; sys.argv=['npe2','validate','napari-var-emitter']; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "valid" in (r.stdout + r.stderr).lower()


def test_bundled_model_has_its_config_json_beside_it():
    from napari_var_emitter.checkpoint import load_checkpoint
    from napari_var_emitter.config import load_config
    from napari_var_emitter.inference import bundled_checkpoint_path

    path = bundled_checkpoint_path()
    beside = load_config(os.path.join(os.path.dirname(path), "config.json"))
    assert beside.to_dict() == load_checkpoint(path)["config_obj"].to_dict()
