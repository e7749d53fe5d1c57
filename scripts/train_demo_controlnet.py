"""Train a canny ControlNet for the demo model and measure how it steers (issue 18's demo).

    python scripts/train_demo_controlnet.py --out runs/demo_controlnet     # ~15 min on a 2-core CPU

Renders --images scenes of the demo dataset, encodes them and their canny edges with the demo VAE, trains a
4-block "2b" ControlNet (demo transformer frozen), writes OUT/demo_canny.safetensors (official layout), then
judges it: for --tests new one-object scenes, a prompt naming only the colour and the background ("a red
shape on a white background"), generated with and without the scene's edges; the reader says whether the
shape and position are the edges' ones. Report: OUT/report.json, OUT/grid.png (every test image) and
OUT/steer.png (the first 8 scenes: edges, with them, without them). `--net FILE` judges an existing net
without training one.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

from scripts.errors import add_debug_flag, run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train and judge a canny ControlNet for the demo model.")
    p.add_argument("--out", type=Path, default=Path("runs/demo_controlnet"))
    p.add_argument("--model-dir", type=Path, help="the demo model set (default: the shipped one)")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="control blocks")
    p.add_argument("--tests", type=int, default=24, help="scenes to judge it on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--net", type=Path, help="judge this net (written by an earlier run) instead of training one")
    add_debug_flag(p)
    args = p.parse_args(argv)

    from encoders import TextConditioner
    from mmditx import load_mmditx
    from mmditx.runtime import keep_freed_memory
    from sampling.control import canny_edges
    from sampling.embedded import demo_model_dir
    from sampling.pipeline import GenerationParams, ModelFiles, Pipeline
    from training.demo.controlnet import edge_latents, new_controlnet, save_controlnet, train_controlnet
    from training.demo.evaluate import Item, accuracies, format_table, read_image, score, write_grid
    from training.demo.shapes import random_scene, render
    from training.demo.train import encode_latents, render_scenes
    from vae import load_vae

    keep_freed_memory()   # reuse freed activations instead of faulting fresh pages in every step (train_demo.py)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    model_dir = args.model_dir or demo_model_dir()
    files = ModelFiles.from_dir(model_dir, t5="off")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.net is None:
        images, captions, _ = render_scenes(args.images, args.seed, say)
        vae = load_vae(files.vae or files.model)
        model = load_mmditx(files.model).eval()
        net = new_controlnet(model.config, args.depth, args.seed)
        latents = encode_latents(vae, images, say)
        controls = edge_latents(vae, images, net.config)
        say(f"encoded {len(images)} scenes and their edges: {time.perf_counter() - start:.0f} s")
        conditioner = TextConditioner.from_model_dir(model_dir, t5="off")
        train_controlnet(model, net, latents, controls, captions, conditioner, args.steps, args.batch_size,
                         seed=args.seed, log=say)
        net_file = args.out / "demo_canny.safetensors"
        save_controlnet(net, net_file)
        minutes = (time.perf_counter() - start) / 60
        say(f"trained in {minutes:.1f} min -> {net_file}")
    else:
        net_file, minutes = args.net, None

    # the judgement: prompts without shape and position, the edges supply both
    import numpy as np
    rng = np.random.default_rng([args.seed, 7])
    items = {"with edges": [], "without": []}
    (args.out / "tests").mkdir(exist_ok=True)
    for i in range(args.tests):
        scene = random_scene(rng, 1)
        o = scene.objects[0]
        prompt = f"a {o.colour} shape on a {scene.background} background"
        edges = canny_edges(render(scene, 128))
        edge_file = args.out / "tests" / f"{i:03d}_edges.png"
        edges.save(edge_file)
        for label, nets in (("with edges", [(net_file, edge_file, 1.0, 0.0, 1.0)]), ("without", [])):
            pipe = Pipeline(files, controlnets=nets)
            image = pipe.generate(GenerationParams.from_preset("sd3.5_medium", prompt=prompt, width=128, height=128,
                                                               seed=i))[0]
            path = args.out / "tests" / f"{i:03d}_{label.replace(' ', '_')}.png"
            image.save(path)
            reading = read_image(image)
            items[label].append(Item(scene, "seen", reading, score(reading, scene), path=path, prompt=prompt))
    report = {"net": str(net_file)} | ({"minutes": round(minutes, 1), "steps": args.steps, "images": args.images}
                                      if minutes is not None else {})
    for label, its in items.items():
        table = accuracies(its)["seen"]
        report[label] = {k: [r, n] for k, (r, n) in table.items()}
        print(f"{label}:\n{format_table({'seen': table})}")
    write_grid(items["with edges"] + items["without"], args.out / "grid.png")
    write_steer_sheet(list(zip(*items.values()))[:8], args.out / "steer.png")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(args.out / "report.json")
    return 0


def write_steer_sheet(pairs, path: Path, tile: int = 128) -> None:
    """One column per test scene; rows: its edges, the image with them, the image without. Under each image
    what the reader got right of the scene's shape and position."""
    from PIL import Image, ImageDraw
    from mmditx.checkpoint import written_whole
    label_h = 14
    sheet = Image.new("RGB", (len(pairs) * (tile + 4), 3 * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for col, (with_edges, without) in enumerate(pairs):
        edges = with_edges.path.with_name(with_edges.path.name.replace("with_edges", "edges"))
        o = with_edges.truth.objects[0]
        cells = [(edges, f"edges: {o.shape}, {o.position}")]
        for label, item in (("with", with_edges), ("without", without)):
            got = ", ".join(k for k in ("shape", "position") if item.scores[k][0] == item.scores[k][1])
            cells.append((item.path, f"{label}: {got or 'neither'}"))
        for row, (file, text) in enumerate(cells):
            x, y = col * (tile + 4), row * (tile + label_h)
            with Image.open(file) as im:
                sheet.paste(im.convert("RGB").resize((tile, tile)), (x, y))
            draw.text((x + 2, y + tile + 1), text, fill=(0, 0, 0))
    with written_whole(path) as tmp:
        sheet.save(tmp, format="PNG")


if __name__ == "__main__":
    sys.exit(run_cli(main))
