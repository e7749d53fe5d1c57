"""The dependency direction of DESIGN.md, checked in fresh interpreters: the checkpoint reader shared by encoders/
and vae/ comes without the transformer, and every public entry point imports as written."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("package", ["encoders", "vae", "mmditx.checkpoint"])
def test_checkpoint_reader_without_the_transformer(package):
    modules = imported_after(f"import {package}")
    assert "mmditx.checkpoint" in modules
    assert not {"mmditx.model", "mmditx.blocks", "mmditx.loading", "sampling", "training"} & modules


def test_no_library_package_imports_the_instruments():
    """instruments/ (tracing, attention maps, compare, anatomy) observes the model; the model, the pipeline and
    the trainer never need it."""
    modules = imported_after("import mmditx, encoders, vae, sampling.pipeline, training.loop, training.run\n"
                             "from mmditx import load_mmditx, apply_lora, load_controlnet")
    assert {"mmditx.model", "sampling.pipeline", "training.loop"} <= modules
    assert not any(m == "instruments" or m.startswith("instruments.") for m in modules)


def test_entry_points_import_as_written():
    modules = imported_after("from mmditx import load_mmditx, apply_lora, load_controlnet, MMDiTX\n"
                             "from vae import load_vae\n"
                             "from encoders import load_clip_l, load_clip_g, load_t5\n"
                             "from scripts.generate import main")
    assert {"mmditx.model", "mmditx.lora", "mmditx.controlnet", "vae.loading", "encoders.t5"} <= modules


def test_no_script_shadows_the_standard_library():
    """Run as a file, a script's folder comes first on sys.path: no script may be named like a stdlib module
    (scripts/inspect.py once shadowed `inspect`, which torch imports)."""
    names = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    assert not names & set(sys.stdlib_module_names)
