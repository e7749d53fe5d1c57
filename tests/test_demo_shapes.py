"""The demo model's dataset (training/demo/shapes.py) and the reader that checks images against prompts
(training/demo/evaluate.py): determinism, the held-out set, captions that parse back, and the reader's accuracy
on ground truth, on degraded scenes, and (at chance, not above) on noise, blank and mismatched images."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sampling.io import save_png
from training.demo import evaluate as ev
from training.demo import shapes as sh
from training.demo.shapes import Obj, Scene

ROOT = Path(__file__).resolve().parent.parent
CHANCE = {"background": 1 / len(sh.BACKGROUNDS), "colour": 1 / len(sh.COLOURS), "shape": 1 / len(sh.SHAPES),
          "size": 1 / len(sh.SIZES), "position": 1 / len(sh.POSITIONS)}


def rates(trials, attrs=tuple(CHANCE) + ("all",)):
    table = {}
    for t in trials:
        for a, (r, k) in t.scores.items():
            old = table.get(a, (0, 0))
            table[a] = (old[0] + r, old[1] + k)
    return {a: table[a][0] / table[a][1] for a in attrs if a in table and table[a][1]}


# ---- dataset --------------------------------------------------------------------------------------------

def test_samples_are_deterministic_and_depend_on_the_seed():
    a, b, c = sh.make_sample(7, seed=3), sh.make_sample(7, seed=3), sh.make_sample(7, seed=4)
    assert a[1] == b[1] and a[2] == b[2] and a[0].tobytes() == b[0].tobytes()
    captions = {sh.training_sample(i, 3)[2] for i in range(20)}
    assert len(captions) == 20  # varied
    assert [sh.training_sample(i, 4)[2] for i in range(20)] != [sh.training_sample(i, 3)[2] for i in range(20)]
    assert c[1] != a[1] or c[2]["scene"] != a[2]["scene"]


def test_write_dataset_files_are_identical_across_runs_and_a_prefix_of_larger_ones(tmp_path):
    one = sh.write_dataset(tmp_path / "one", 6, size=64, seed=1)
    two = sh.write_dataset(tmp_path / "two", 9, size=64, seed=1)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(["dataset.json"] + [f"{i:06d}.{e}" for i in range(6) for e in ("json", "png", "txt")])
    for n in names:
        if n != "dataset.json":
            assert (one / n).read_bytes() == (two / n).read_bytes(), n
    side = json.loads((one / "000002.json").read_text())
    assert (one / "000002.txt").read_text().strip() == side["caption"]
    assert Image.open(one / "000002.png").size == (64, 64)
    assert not list(tmp_path.glob(".*partial*"))  # the temporary folder is gone
    with pytest.raises(FileExistsError, match="not an empty folder"):
        sh.write_dataset(one, 3, size=64)


def test_the_trainer_reads_the_dataset_folder(tmp_path):
    from training.data import scan_folder
    folder = sh.write_dataset(tmp_path / "ds", 5, size=128, seed=2)
    examples, report = scan_folder(folder, resolution=128, on_error="stop")
    assert not report and [e.image.name for e in examples] == [f"{i:06d}.png" for i in range(5)]
    assert [e.caption for e in examples] == [sh.training_sample(i, 2)[2] for i in range(5)]
    assert {e.bucket for e in examples} == {(128, 128)}


def test_images_are_anti_aliased_at_the_requested_size():
    scene = Scene("white", (Obj("circle", "red", "large", "centre", box=(0.5, 0.5, 0.4)),))
    a = np.asarray(sh.render(scene, 96))
    assert a.shape == (96, 96, 3)
    colours = {tuple(p) for p in a.reshape(-1, 3)}
    assert (255, 255, 255) in colours and sh.COLOURS["red"] in colours
    assert len(colours) > 10  # blended edge pixels between the two
    # the circle covers pi r^2 of the image, to within the anti-aliasing
    coverage = ((255 - a[..., 1].astype(float)) / (255 - sh.COLOURS["red"][1])).sum() / 96 ** 2
    assert coverage == pytest.approx(np.pi * 0.2 ** 2, rel=0.01)


def test_held_out_combinations_never_appear_and_everything_else_does():
    colour_shape, colour_bg, pairs, words = set(), set(), set(), set()
    for i in range(3000):
        scene, named, caption = sh.training_sample(i, seed=0)
        assert sh.held_out_reasons(scene) == [], (i, caption)
        assert sh.held_out_reasons(sh.parse_caption(caption)) == [], (i, caption)
        colour_shape |= {(o.colour, o.shape) for o in scene.objects}
        colour_bg |= {(o.colour, scene.background) for o in scene.objects}
        if len(scene.objects) == 2:
            pairs.add(frozenset(o.shape for o in scene.objects))
        words |= set(caption.replace(",", "").split())
    every = {(c, s) for c in sh.COLOURS for s in sh.SHAPES}
    assert colour_shape == every - sh.HELD_OUT.colour_shape
    assert colour_bg == {(c, b) for c in sh.COLOURS for b in sh.BACKGROUNDS} - sh.HELD_OUT.colour_background
    assert pairs == {frozenset({a, b}) for a in sh.SHAPES for b in sh.SHAPES} - sh.HELD_OUT.shape_pairs
    assert words >= set(sh.SHAPES) | set(sh.COLOURS) | {"grey", "gray", "tiny", "huge", "above", "beneath"}
    assert "heart" not in words


def test_held_out_set_is_what_the_docs_say():
    assert ("red", "triangle") in sh.HELD_OUT.colour_shape and ("yellow", "white") in sh.HELD_OUT.colour_background
    assert sh.held_out_reasons(sh.parse_caption("a red triangle")) == ["colour x shape: red triangle"]
    assert sh.held_out_reasons(sh.parse_caption("a circle to the left of a square")) == [
        "shape pair: circle + square"]
    assert sh.held_out_reasons(sh.parse_caption("a red circle and a green triangle")) == []


# ---- captions and their parser ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2])
def test_every_template_parses_back_to_what_it_names(n):
    rng = np.random.default_rng(11)
    for template in sh.TEMPLATES[n]:
        for k in range(150):
            scene = sh.random_scene(rng, n)
            drop = (0.0, 0.3, 0.7, 1.0)[k % 4]
            named = sh.named_attributes(scene, rng, drop=drop, drop_shape=drop / 3)
            caption = sh.write_caption(named, rng, template)
            assert sh.parse_caption(caption) == named, (template, caption)
    with pytest.raises(ValueError, match="no template"):
        sh.write_caption(named, rng, "tags" if n == 2 else "positions")


def test_full_captions_name_everything_of_the_same_scene_in_varied_templates():
    starts = set()
    for i in range(300):
        scene = sh.training_sample(i, 5)[0]
        parsed = sh.parse_caption(sh.full_caption(i, 5))
        key = lambda o: tuple(o.attributes().values())   # the scene names every attribute: no None
        assert parsed.background == scene.background
        assert sorted(map(key, parsed.objects)) == sorted(map(key, scene.objects))
        starts.add(sh.full_caption(i, 5).split()[0])
    assert len(starts) >= 4 and sh.full_caption(3, 5) != sh.full_caption(3, 6)


@pytest.mark.parametrize("caption, expected", [
    ("a small red circle to the left of a blue triangle on a white background",
     Scene("white", (Obj("circle", "red", "small", "left"), Obj("triangle", "blue", None, "right")))),
    ("tiny square, left, grey background", Scene("gray", (Obj("square", None, "small", "left"),))),
    ("On the left, a star.", Scene(None, (Obj("star", None, None, "left"),))),
    ("a picture of a huge teal disk in the middle with a beige background",
     Scene("beige", (Obj("circle", "teal", "large", "centre"),))),
    ("a green shape below a yellow diamond", Scene(None, (Obj(None, "green", None, "bottom"),
                                                          Obj("diamond", "yellow", None, "top")))),
    ("a pink cross in the lower half and a big orange object near the top, on black",
     Scene("black", (Obj("cross", "pink", None, "bottom"), Obj(None, "orange", "large", "top")))),
    ("black background, a little purple triangle right of a square",
     Scene("black", (Obj("triangle", "purple", "small", "right"), Obj("square", None, None, "left")))),
])
def test_parse_caption_examples(caption, expected):
    assert sh.parse_caption(caption) == expected


@pytest.mark.parametrize("caption, message", [
    ("a red heart", "'heart' not in the demo vocabulary"),
    ("a red blue circle", "two colours"),
    ("a white circle on a black background", "two backgrounds"),
    ("red on white", "names 0 shapes"),
    ("a circle, a square and a star", "names 3 shapes"),
    ("a circle above", "needs a shape on either side"),
])
def test_parse_caption_refuses_what_is_outside_the_grammar(caption, message):
    with pytest.raises(sh.CaptionError, match=message):
        sh.parse_caption(caption)


def test_the_new_shape_word_is_known_only_when_asked_for():
    with pytest.raises(sh.CaptionError, match="'heart' not in the demo vocabulary"):
        sh.parse_caption("a small red heart on the left")
    assert sh.parse_caption("a small red heart on the left", sh.SHAPES + sh.NEW_SHAPES) == Scene(
        None, (Obj("heart", "red", "small", "left"),))
    assert "heart" not in sh.SHAPES and all(o.shape != "heart" for i in range(300)
                                            for o in sh.training_sample(i, 0)[0].objects)


def test_evaluation_prompts_cover_each_held_out_combination_and_parse_back():
    held = sh.evaluation_prompts("held_out", per_combination=2)
    seen = sh.evaluation_prompts("seen", per_combination=2)
    n = len(sh.HELD_OUT.colour_shape) + len(sh.HELD_OUT.colour_background) + len(sh.HELD_OUT.shape_pairs)
    assert len(held) == len(seen) == 2 * n
    reasons = [sh.held_out_reasons(s) for _, s in held]
    assert all(len(r) == 1 for r in reasons) and len({r[0] for r in reasons}) == n
    assert all(sh.held_out_reasons(s) == [] for _, s in seen)
    assert sorted(len(s.objects) for _, s in seen) == sorted(len(s.objects) for _, s in held)
    for prompt, scene in held + seen:
        assert sh.parse_caption(prompt) == scene
        assert None not in (scene.background, *(v for o in scene.objects for v in o.attributes().values()))
    assert held[0][0] == sh.evaluation_prompts("held_out", per_combination=2)[0][0]  # fixed by the seed


# ---- the reader ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_trials():
    return ev.ground_truth_trials(300, size=128, seed=0)


def test_reader_on_rendered_ground_truth(clean_trials):
    acc = rates(clean_trials)
    print("ground truth, 300 scenes at 128x128:", {a: round(v, 4) for a, v in acc.items()})
    assert all(v >= 0.98 for v in acc.values()), acc
    assert {t.split for t in clean_trials} == {"seen", "held_out"}


def test_reader_on_degraded_scenes():
    """Blur, noise and a colour cast, roughly what a small VAE's decoder does to a scene."""
    acc = rates(ev.ground_truth_trials(150, size=128, seed=1, degradation=(1.0, 8.0, 15.0)))
    print("degraded (blur 1 px, noise sd 8, shift 15), 150 scenes:", {a: round(v, 4) for a, v in acc.items()})
    assert all(v >= 0.95 for v in acc.values()), acc


def test_reader_with_the_new_shape():
    """With shapes=SHAPES + NEW_SHAPES (a LoRA's evaluation) hearts are read, and the other shapes still are."""
    trials = ev.ground_truth_trials(100, size=128, seed=4, shapes=sh.SHAPES + sh.NEW_SHAPES)
    acc = rates(trials)
    assert all(v >= 0.98 for v in acc.values()), acc
    hearts = [(o.shape, t.scores["shape"]) for t in trials for o in t.truth.objects if o.shape == "heart"]
    assert len(hearts) >= 10
    plain = ev.read_image(sh.render(Scene("white", (Obj("heart", "red", "large", "centre", box=(.5, .5, .38)),))))
    assert plain.objects[0].shape == "circle"  # without the new word the reader answers from the base six


def test_reader_at_other_resolutions():
    for size in (64, 256):
        acc = rates(ev.ground_truth_trials(40, size=size, seed=2))
        assert all(v >= 0.95 for v in acc.values()), (size, acc)


def _noise_trials(kind, truths, rng):
    trials = []
    for truth in truths:
        if kind == "uniform":
            a = rng.integers(0, 256, (128, 128, 3))
        elif kind == "blocks":  # coloured 8x8 blocks, like a random latent decoded
            a = np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((8, 8, 1), int))
        else:  # blank, one random colour
            a = np.broadcast_to(rng.integers(0, 256, 3), (128, 128, 3))
        reading = ev.read_image(Image.fromarray(a.astype(np.uint8)))
        trials.append(ev.Trial(truth, "seen", reading, ev.score(reading, truth)))
    return trials


@pytest.mark.parametrize("kind", ["uniform", "blocks", "blank", "mismatched"])
def test_reader_does_not_score_noise_above_chance(kind, clean_trials):
    """Noise, blank images, and real scenes judged against another scene's prompt: no attribute much above
    chance (1/vocabulary; two-object prompts get the better of two matchings), nothing all-correct."""
    rng = np.random.default_rng(5)
    truths = [t.truth for t in clean_trials[:150]]
    if kind == "mismatched":
        trials = [ev.Trial(truth, "seen", t.reading, ev.score(t.reading, truth))
                  for truth, t in zip(truths, clean_trials[150:])]
    else:
        trials = _noise_trials(kind, truths[:60], rng)
    acc = rates(trials)
    print(kind, {a: round(v, 3) for a, v in acc.items()})
    for attr, chance in CHANCE.items():
        assert acc[attr] <= chance + 0.15, (attr, acc[attr], chance)
    assert acc["all"] <= 0.03


def test_reader_splits_touching_objects_of_two_colours():
    scene = Scene("white", (Obj("square", "red", "large", "left", box=(0.33, 0.5, 0.36)),
                            Obj("circle", "blue", "large", "right", box=(0.67, 0.5, 0.36))))  # they touch
    reading = ev.read_image(sh.render(scene))
    assert sorted((o.colour, o.shape) for o in reading.objects) == [("blue", "circle"), ("red", "square")]


# ---- folders and the scripts -----------------------------------------------------------------------------

def test_evaluate_folder_reads_the_prompt_generate_py_stores(tmp_path):
    (prompt_a, scene_a), (prompt_b, scene_b) = sh.evaluation_prompts("held_out", per_combination=1)[:2]
    rng = np.random.default_rng(0)
    placed = Scene(scene_a.background, tuple(sh.place(o, 1, rng) for o in scene_a.objects))
    save_png(sh.render(placed), tmp_path / "000000.png", {"prompt": prompt_a, "seed": 0})
    save_png(Image.new("RGB", (128, 128), sh.BACKGROUNDS[scene_b.background]), tmp_path / "000001.png",
             {"prompt": prompt_b, "seed": 1})  # blank: background right, the object missing
    save_png(Image.new("RGB", (128, 128)), tmp_path / "000002.png", {"prompt": "a red heart", "seed": 2})
    Image.new("RGB", (128, 128)).save(tmp_path / "000003.png")  # no prompt at all
    items, problems = ev.evaluate_folder(tmp_path)
    assert [i.path.name for i in items] == ["000000.png", "000001.png"]
    assert [p.split(":")[0] for p in problems] == ["000002.png", "000003.png"] and "heart" in problems[0]
    assert items[0].prompt == prompt_a and items[0].split == "held_out" and items[0].scores["all"] == (1, 1)
    assert items[1].scores["background"] == (1, 1) and items[1].scores["colour"] == (0, 1)
    grid = ev.write_grid(items, tmp_path / "grid.png")
    assert Image.open(grid).size[0] == 8 * (128 + 8)


def test_scripts_make_a_dataset_and_evaluate_it(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    cwd=ROOT, timeout=120)
    made = run("scripts/make_shapes_dataset.py", tmp_path / "ds", "--count", 16, "--size", 128, "--seed", 3)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == str(tmp_path / "ds") and "held out:" in made.stderr
    again = run("scripts/make_shapes_dataset.py", tmp_path / "ds", "--count", 4)
    assert again.returncode != 0 and again.stderr.strip().startswith("error:") and "Traceback" not in again.stderr
    out = run("scripts/evaluate_demo.py", tmp_path / "ds", "--grid", tmp_path / "g.png", "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    assert "16 images" in out.stdout and "shape                100.0%" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["images"]) == 16 and (tmp_path / "g.png").is_file()
    prompts = run("scripts/evaluate_demo.py", "--prompts", "held_out", "--per-combination", 1)
    assert prompts.stdout.splitlines() == [p for p, _ in sh.evaluation_prompts("held_out", 1)]
    squeezed = run("scripts/evaluate_demo.py", "--self-test", 4, "--thumbnail", 32, "--degrade", "1,8,15")
    assert squeezed.returncode == 0 and "through a 32x32 thumbnail" in squeezed.stdout, squeezed.stderr
    missing = run("scripts/evaluate_demo.py", tmp_path / "nowhere")
    assert missing.returncode != 0 and "no such folder" in missing.stderr
    # --compare: the dataset's report (the reader on ground truth: 100% of every attribute asked) as a table row
    compared = run("scripts/evaluate_demo.py", "--compare", tmp_path / "r.json")
    assert compared.returncode == 0, compared.stderr
    header, rule, row = compared.stdout.splitlines()
    assert header.startswith("| run | background | colour | shape | size | position | count |")
    assert row.startswith("| r | 100 | 100 | 100 | 100 | 100 | 100 |"), row
    not_a_report = run("scripts/evaluate_demo.py", "--compare", tmp_path / "ds" / "000000.txt")
    assert not_a_report.returncode != 0 and "not a report of evaluate_demo.py --json" in not_a_report.stderr


def test_compare_table_cells_are_seen_then_held_out_percentages():
    table = ev.compare_table({"a": {"seen": {"colour": (1, 2), "shape": (0, 3)}, "held_out": {"colour": (3, 4)}},
                              "b": {"seen": {"colour": (2, 2)}, "held_out": {"colour": (1, 8)}}})
    assert table.splitlines() == ["| run | colour | shape |", "|---|---|---|",
                                  "| a | 50 / 75 | 0 / - |", "| b | 100 / 12 | - / - |"]
