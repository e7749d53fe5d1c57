"""The shipped demo model draws what it is asked (issue 14's CI check)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# measured on the shipped v11 (seed 0): background 8/8, colour 8/8, position 8/8 (v2, v3, v5-v10 the same; v1: 8/8,
# 6/8, 7/8), shape 6/8 (v8-v10: 8/8; v7: 6/8, v6: 7/8, v5: 6/8); a text-blind model that draws one centred blob on white
# scores at most 4/8, 1/8, 0/8
QUALITY_FLOOR = {"background": 0.75, "colour": 0.75, "position": 0.75}
SHIPPED = ROOT / "sampling" / "demo_model"
QUALITY_PROMPTS = ["a red circle on the left, on a white background", "a blue square on the right, on a black background",
                   "a yellow triangle at the top, on a black background", "a green circle at the bottom, on a black background",
                   "a red square on the right, on a white background", "a blue triangle on the left, on a white background",
                   "a yellow circle at the bottom, on a black background", "a green triangle at the top, on a white background"]


def test_the_shipped_demo_model_draws_what_it_is_asked(tmp_path):
    """The shipped demo model through generate.py as a newcomer runs it (no --model-dir): 8 prompts, one seed,
    read by the reader. Backgrounds, colours and positions must be far above chance (12.5% for a colour, 20%
    for a position); the reader gives chance on noise and on mismatched prompts (tests/test_demo_shapes.py),
    so a random or text-blind model cannot pass."""
    from training.demo.evaluate import accuracies, evaluate_folder

    assert (SHIPPED / "demo.json").is_file(), "no demo model in sampling/demo_model"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUALITY_PROMPTS) + "\n")
    env = {"MMDITX_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt-file", str(prompts),
                          "--seed", "0", "--out", str(tmp_path / "gen"), "--quiet"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0 and "DEMO MODEL" in out.stderr, out.stderr
    assert "does not reliably follow shape words" in out.stderr     # what it cannot do is said, not left to be found
    items, problems = evaluate_folder(tmp_path / "gen")
    assert not problems and len(items) == len(QUALITY_PROMPTS), problems
    table = accuracies(items)["seen"]
    share = {k: right / asked for k, (right, asked) in table.items() if asked}
    assert share["background"] >= QUALITY_FLOOR["background"], table
    assert share["colour"] >= QUALITY_FLOOR["colour"], table
    assert share["position"] >= QUALITY_FLOOR["position"], table


def test_the_probe_reads_what_features_carry_and_nothing_more():
    """training.demo.text's linear probe: features that encode the label (one-hot plus noise) are read almost
    always, features independent of it at chance."""
    import torch
    from training.demo.text import _fit_and_score

    g = torch.Generator().manual_seed(0)
    labels = [["red", "green", "blue", "pink"][i] for i in torch.randint(0, 4, (800,), generator=g).tolist()]
    onehot = torch.nn.functional.one_hot(torch.tensor([["red", "green", "blue", "pink"].index(v) for v in labels]))
    noise = torch.randn(800, 16, generator=g)
    assert _fit_and_score(torch.cat([onehot.float() * 2, noise], 1), labels) >= 0.95
    assert _fit_and_score(noise, labels) <= 0.25 + 0.1


def test_the_shipped_text_encoders_carry_every_attribute(capsys):
    """What the transformer receives names every attribute of a one-object caption: a linear probe reads
    shape, colour, position, size and background from the padding tokens at >= 95% (version 10's encoders, which
    version 11 keeps (the same stage, made again bit for bit): 99.9-100%; version 5's, which versions 6 to 9 kept: 99.3-100%), from the pooled vector at >= 80% (version 10:
    shape 84.3%, the rest 95.6-99.9%; version 5: shape 82.5%, the rest 94.8-100%;
    version 1's encoders: shape 96%, so the floor was 90% until version 5's retrained ones). So shape missing in
    the drawings is the transformer's (or the VAE's) limit, not what the tokens carry (docs/demo_model.md)."""
    sys.path.insert(0, str(ROOT))
    from scripts.evaluate_demo import main

    assert main(["--text-probe", str(SHIPPED)]) == 0
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    table = {r[0].strip(): [float(c.strip().rstrip("%")) / 100 for c in r[1:]] for r in rows}
    assert set(table) == {"pooled", "padding tokens", "chance"}, table
    assert min(table["padding tokens"]) >= 0.95, table
    assert min(table["pooled"]) >= 0.80, table
    assert max(table["chance"]) <= 0.5, table


def test_restoration_check_on_the_shipped_model():
    """training.demo.train.restoration_check on 16 new scenes: from sigma 0 (the VAE's reconstruction) the
    reader gets shape and colour (the ceiling), from sigma 0.2 the model keeps them, and from pure noise it
    places the object where the prompt says (v11 measured on these 16: shape 15 / 15 / 15, position 16 / 16 / 16;
    v10: shape 15 / 15 / 13;
    v9: shape 15 / 14 / 15; v8: shape 15 / 14 / 14; v7: shape 15 / 15 / 11; v6: shape 15 / 15 / 8; v5: shape 15 / 15 / 3; v3: shape
    13 / 14 / 7, position 16 / 16 / 15; v2: shape 13 / 14 / 6, position 16 / 16 / 16; v1 on 48: shape 81% / 79% /
    25%, position 100/100/94%)."""
    from mmditx import load_mmditx
    from training.demo.train import restoration_check
    from encoders import TextConditioner
    from vae import load_vae

    model_file = SHIPPED / "sd3.5_medium.safetensors"
    table = restoration_check(load_mmditx(model_file).eval(), load_vae(model_file).eval(),
                              TextConditioner.from_model_dir(SHIPPED, t5="off"), levels=(0.0, 0.2, 1.0), count=16)
    share = {level: {a: r / k for a, (r, k) in row.items() if k} for level, row in table.items()}
    assert share[0.0]["shape"] >= 0.6 and share[0.0]["colour"] >= 0.8, share[0.0]
    assert share[0.2]["shape"] >= share[0.0]["shape"] - 0.15 and share[0.2]["colour"] >= 0.8, share
    assert share[1.0]["position"] >= 0.75, share[1.0]
