"""The embedded model set's first build is safe when several runs start at once."""

import subprocess
import sys
from pathlib import Path

from sampling import embedded

ROOT = Path(__file__).resolve().parent.parent


def test_three_first_runs_at_once(tmp_path):
    code = "from sampling.embedded import embedded_model_dir; print(embedded_model_dir())"
    env = {"PATH": "/usr/bin:/bin", "MMDITX_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    roots = {out.strip() for out, _ in results}
    assert len(roots) == 1
    root = Path(roots.pop())
    assert (root / "COMPLETE").is_file() and (root / "sd3.5_medium.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]   # no temporary folders left behind


def test_losing_the_race_keeps_the_winners_set(tmp_path, monkeypatch):
    """Another run renames its complete set into place while this one builds: this one uses it, deletes only its
    own temporary folder and never the winner's files."""
    monkeypatch.setenv("MMDITX_CACHE", str(tmp_path))
    root = embedded.cache_dir()

    def build(folder):
        (folder / "ours").write_text("x")
        root.mkdir(parents=True)
        (root / "theirs").write_text("winner")
        (root / "COMPLETE").write_text("done")
    monkeypatch.setattr(embedded, "build", build)
    assert embedded.embedded_model_dir() == root
    assert (root / "theirs").read_text() == "winner" and not (root / "ours").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]


def test_an_incomplete_leftover_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDITX_CACHE", str(tmp_path))
    root = embedded.cache_dir()
    root.mkdir(parents=True)
    (root / "half").write_text("x")
    monkeypatch.setattr(embedded, "build", lambda folder: (folder / "ours").write_text("x"))
    assert embedded.embedded_model_dir() == root
    assert (root / "ours").is_file() and (root / "COMPLETE").is_file() and not (root / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]
