"""The demo model's machinery: the rebuild script runs every stage and writes a model set in the official layout,
generate.py runs such a set as the demo (no T5, its native size, its vocabulary printed), and the VAE's latent
rescaling is exact. The shipped model's quality: tests/test_demo_quality.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """scripts/train_demo.py at toy size: scenes, VAE (with its gate), latents, text encoders, transformer."""
    work = tmp_path_factory.mktemp("demo")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--work", str(work / "w"),
                          "--images", "32", "--vae-steps", "2", "--decoder-steps", "2", "--steps", "3", "--batch-size", "4", "--checks", "2",
                          "--check-every", "1", "--draw-prompts", "1", "--one-object-steps", "1", "--full-caption-steps", "2",
                          "--text-steps", "2", "--text-batch", "8", "--ema-decay", "0.5", "--compile", "off"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip()), out.stderr


def test_train_demo_ships_the_moving_average_when_asked(toy_demo):
    """--ema-decay: the model set holds the average the trainer kept, not the last trained weights."""
    from safetensors.torch import load_file

    model, _ = toy_demo
    state = torch.load(model.parent / "transformer" / "state.pt", weights_only=False)
    shipped = load_file(model / "sd3.5_medium.safetensors")
    names = sorted(state["ema"])
    assert len(names) > 100
    assert all(torch.equal(shipped["model.diffusion_model." + n], state["ema"][n].half()) for n in names)
    assert not all(torch.equal(state["ema"][n], state["trainable"][n]) for n in names)


def test_train_demo_runs_every_stage_and_writes_the_official_layout(toy_demo):
    from mmditx import read_config
    from mmditx.checkpoint import open_safetensors
    from sampling.pipeline import ModelFiles
    from training.demo.model_set import TRANSFORMER

    model, log = toy_demo
    for stage in ("scenes", "vae_scenes", "vae", "latents", "decoder", "vae_gate", "text_encoders", "transformer"):
        assert f"== {stage}:" in log
    info = json.loads((model / "demo.json").read_text())
    assert set(info["minutes"]) == {"scenes", "vae_scenes", "vae", "latents", "decoder", "vae_gate", "text_encoders",
                                    "transformer"}
    assert info["size"] == 128 and "shapes: circle" in info["vocabulary"] and info["examples"]
    files = ModelFiles.from_dir(model, t5="off")
    for path in (files.model, files.clip_l, files.clip_g):
        f = open_safetensors(path)
        assert {f.dtype(k) for k in f.keys()} == {torch.float16}, path
    assert read_config(files.model) == TRANSFORMER   # SLG's layers 7, 8, 9 exist: depth 10
    assert set(info["caption_checks"]) == {"1", "2", "3"} and "transformer step 3: loss with right / shuffled" in log
    check = dict(info["caption_checks"]["3"])
    drawn = check.pop("drawn")      # the reader on sampled prompts, both splits
    assert set(check.pop("word_gaps")) == {"position", "colour"}
    assert set(check) == {"0.8", "0.95", "1.0"} and all(len(pair) == 2 for pair in check.values())
    assert set(drawn) == {"seen", "held_out"} and drawn["held_out"]["colour"][1] >= 1
    assert "transformer step 3: the reader on sampled prompts" in log


class _Oracle(torch.nn.Module):
    """Predicts the exact velocity when its pooled input is the scene's own latent (a perfect caption reader)."""

    def forward(self, x, t, context, y, pos_offset=None):
        s = (t / 1000).view(-1, 1, 1, 1)
        x0 = y.view(x.shape)
        return (x - x0) / s                  # x_t = (1 - s) x0 + s noise, velocity noise - x0


class _Blind(torch.nn.Module):
    def forward(self, x, t, context, y, pos_offset=None):
        return torch.zeros_like(x)


def test_training_phases_one_object_first_then_full_captions_then_the_mix():
    from training.demo.train import DemoOptions, training_phase

    opts = DemoOptions(steps=10, one_object_steps=3, full_caption_steps=6, full_caption_share=0.25, check_every=4)
    assert [training_phase(s, opts) for s in (0, 3, 4, 6, 8, 9)] == [
        (True, 1.0, 3), (False, 1.0, 4), (False, 1.0, 6), (False, 0.25, 8), (False, 0.25, 10), (False, 0.25, 10)]


def test_phase_orders_one_object_scenes_first_then_every_scene_two_object_ones_repeated():
    from collections import Counter

    from training.demo.shapes import random_scene
    from training.demo.train import DemoOptions, phase_orders
    from training.loop import BatchOrder

    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, n_objects=1 + i % 3 // 2) for i in range(30)]     # 10 of 30 with two objects
    buckets = {(16, 16): list(range(30))}
    two = {i for i, s in enumerate(scenes) if len(s.objects) == 2}
    assert len(two) == 10

    def seen(order, epochs=1):   # how often each scene comes in the first epochs
        return Counter(i for e in range(epochs) for batch in order.epoch(e) for i in batch)

    plain = phase_orders(scenes, buckets, DemoOptions(batch_size=5, seed=3, two_object_repeat=1))
    assert set(seen(plain[True])) == set(range(30)) - two
    assert plain[False].epoch(0) == BatchOrder(buckets, 5, 3).epoch(0)      # the trainer's own order
    counts = seen(phase_orders(scenes, buckets, DemoOptions(batch_size=5, seed=3, two_object_repeat=3))[False])
    assert {counts[i] for i in two} == {3} and {counts[i] for i in set(range(30)) - two} == {1}


def test_train_demo_refuses_a_repeat_below_one_before_any_stage(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from scripts.errors import run_cli
    from scripts.train_demo import main

    assert run_cli(main, ["--work", str(tmp_path / "w"), "--two-object-repeat", "0"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --two-object-repeat must be at least 1 (got 0): it is how "
                                               "many times each two-object scene comes in an epoch")
    assert not (tmp_path / "w").exists()


class _Recorder:
    """A text conditioner that keeps the prompts it was asked to encode."""
    clip_l = clip_g = type("Clip", (), {"config": type("Config", (), {"width": 1})})

    def encode(self, prompts):
        self.prompts = prompts
        return torch.zeros(len(prompts), 1, 1), torch.zeros(len(prompts), 1)


def test_scene_dataset_reads_full_captions_at_the_share_it_is_given():
    from training.demo.train import SceneDataset

    conditioner = _Recorder()
    data = SceneDataset(torch.zeros(4, 1, 2, 2), ["short 0", "short 1", "short 2", "short 3"], conditioner,
                        caption_dropout=0.0, seed=0, full=["full 0", "full 1", "full 2", "full 3"])
    picks = []     # the share of full captions read
    for share in (0.0, 1.0, 0.5):
        data.full_share = share
        counts = 0
        for _ in range(50):
            data.batch([0, 1, 2, 3])
            assert [p.split()[1] for p in conditioner.prompts] == ["0", "1", "2", "3"]   # each scene's own
            counts += sum(p.startswith("full") for p in conditioner.prompts)
        picks.append(counts / 200)
    assert picks[0] == 0 and picks[1] == 1 and 0.4 < picks[2] < 0.6, picks


def test_scene_dataset_draws_resume_with_the_run(tmp_path):
    """Caption dropout and the full-caption pick come from the trainer's micro-batch generator: micro-batch k reads
    the same prompts whatever ran before it, so a resumed run continues with the unbroken run's draws."""
    from mmditx import MMDiTX, load_config
    from mmditx.checkpoint import build_on_meta
    from training.demo.train import SceneDataset
    from training.loop import TrainConfig, Trainer

    def trainer():
        conditioner = _Recorder()
        data = SceneDataset(torch.zeros(8, 16, 4, 4), [f"short {i}" for i in range(8)], conditioner,
                            caption_dropout=0.3, seed=0, full=[f"full {i}" for i in range(8)])
        data.full_share = 0.5
        model = build_on_meta(lambda: MMDiTX(load_config("tiny"))).to_empty(device="cpu")
        return Trainer(model, data, TrainConfig(steps=8, batch_size=8), tmp_path, log_stream=None), conditioner

    one, heard = trainer()
    unbroken = []
    for k in range(6):
        one.micro_batch(k)
        unbroken.append(heard.prompts)
    assert len({tuple(p) for p in unbroken}) == 6 and any("" in p for p in unbroken)    # the draws do vary
    resumed, heard = trainer()
    for k in (3, 4, 5):
        resumed.micro_batch(k)
        assert heard.prompts == unbroken[k], k


def test_scene_dataset_cached_captions_are_the_encoders_output():
    """cache=True encodes every caption once, up front: a batch gets what the text encoders give it on the fly."""
    from encoders import TextConditioner
    from training.demo.train import SceneDataset

    conditioner = TextConditioner.from_model_dir(ROOT / "sampling" / "demo_model", t5="off")
    captions, full = ["a red circle", "a blue square on the left", "a red circle"], ["a", "b", "green star"]
    made = [SceneDataset(torch.zeros(3, 1, 2, 2), captions, conditioner, caption_dropout=0.3, seed=1, full=full,
                         cache=cache) for cache in (False, True)]
    assert len(made[1].encoded[0]) == 6         # "" and the five distinct captions
    for share in (0.0, 0.5, 1.0):
        for data in made:
            data.full_share = share
        for _ in range(4):
            (_, context, pooled), (_, cached, cached_pooled) = (data.batch([0, 1, 2]) for data in made)
            assert cached.shape == context.shape == (3, 154, 4096) and context[:, :77, :128].abs().sum() > 0
            assert torch.allclose(cached, context, rtol=0, atol=1e-5) and torch.allclose(cached_pooled, pooled,
                                                                                          rtol=0, atol=1e-5)


def test_caption_check_tells_a_caption_reader_from_a_text_blind_model():
    from training.demo.train import caption_check

    x0 = torch.randn(8, 16, 4, 4)
    probe = (x0, torch.zeros(8, 3, 4), x0.flatten(1))
    for s, (right, shuffled) in caption_check(_Oracle(), probe).items():
        assert right < 1e-8 and shuffled > 0.5, (s, right, shuffled)
    for s, (right, shuffled) in caption_check(_Blind(), probe).items():
        assert right == shuffled


class _PromptIds:
    """A conditioner stub whose context is the prompt's number (the painter below looks the prompt up)."""

    def __init__(self):
        self.prompts = []

    def encode(self, prompts):
        self.prompts.append(prompts[0])
        return torch.full((1, 1, 1), len(self.prompts) - 1.0), torch.zeros(1, 1)


class _Painter(torch.nn.Module):
    """At sigma 1 draws the prompt's object as a 4x4 latent square: at its position if it reads position words
    (else in the centre), with a value set by its colour if it reads colour words (else 1)."""

    def __init__(self, conditioner, reads):
        super().__init__()
        self.conditioner, self.reads = conditioner, reads
        self.config = type("Config", (), {"in_channels": 16})

    def forward(self, x, t, context, y):
        from training.demo.shapes import COLOURS, POSITIONS, parse_caption

        obj = parse_caption(self.conditioner.prompts[int(context[0, 0, 0])]).objects[0]
        cx, cy = POSITIONS[obj.position if "position" in self.reads else "centre"]
        r, c = round(cy * x.shape[-2]), round(cx * x.shape[-1])
        x0 = torch.zeros_like(x)
        x0[..., r - 2:r + 2, c - 2:c + 2] = 1 + list(COLOURS).index(obj.colour) if "colour" in self.reads else 1
        return x - x0                                   # the velocity whose x0 at sigma 1 is the drawing


def test_word_gaps_say_which_words_a_model_draws():
    from training.demo.train import word_gaps

    gaps = {}
    for reads in ((), ("colour",), ("colour", "position")):
        conditioner = _PromptIds()
        gaps[reads] = word_gaps(_Painter(conditioner, reads), conditioner)
    assert gaps[()] == {"position": 0, "colour": 0}
    assert gaps[("colour",)]["position"] == 0 and gaps[("colour",)]["colour"] > 5
    assert gaps[("colour", "position")]["position"] > 5 and gaps[("colour", "position")]["colour"] > 5


def test_generate_runs_a_demo_model_set_as_the_demo(toy_demo, tmp_path):
    from sampling.io import read_png_params

    model, _ = toy_demo
    env = {"MMDITX_CACHE": str(tmp_path / "cache"), "MMDITX_DEMO_DIR": str(model), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "a red circle",
                          "--steps", "2", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "DEMO MODEL" in out.stderr and "shapes: circle" in out.stderr and "--model-dir" in out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    params = read_png_params(path)
    assert params["demo_model"] and not params["embedded_random_weights"] and params["t5"] == "off"
    assert Image.open(path).size == (128, 128)
    assert not (tmp_path / "cache").exists()   # the random-weight set was not built
    too_big = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "a red circle",
                              "--width", "256", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    assert too_big.returncode != 0 and "at most 128" in too_big.stderr and "Traceback" not in too_big.stderr
    rand = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--random-weights", "--prompt", "x",
                           "--steps", "1", "--width", "64", "--height", "64", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert rand.returncode == 0 and "EMBEDDED RANDOM-WEIGHT" in rand.stderr
    assert read_png_params(Path(rand.stdout.strip().splitlines()[-1]))["embedded_random_weights"]


def test_demo_json_sampling_settings_are_the_defaults_and_the_command_line_wins(toy_demo, tmp_path):
    """demo.json's "sampling" (measured on the demo model) replaces the preset's values; options still win."""
    import shutil

    from sampling.io import read_png_params

    model = tmp_path / "demo"
    shutil.copytree(toy_demo[0], model)
    info = json.loads((model / "demo.json").read_text())
    (model / "demo.json").write_text(json.dumps({**info, "sampling": {"cfg": 2.5, "slg": False, "steps": 2}}))
    env = {"MMDITX_CACHE": str(tmp_path / "cache"), "MMDITX_DEMO_DIR": str(model), "PATH": "/usr/bin:/bin"}
    for extra, cfg in (([], 2.5), (["--cfg", "4"], 4.0)):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "a red circle",
                              *extra, "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        params = read_png_params(Path(out.stdout.strip().splitlines()[-1]))
        assert (params["cfg"], params["slg"], params["steps"], params["width"]) == (cfg, False, 2, 128)


def test_contrastive_text_training_carries_the_words_into_the_padding_tokens(tmp_path):
    """training.demo.text: in random CLIPs a word stays in its own token, so the padding tokens (most of the
    context) hardly tell "left" from "right"; after contrastive training against scenes that differ where the
    captions do, they do. Measured on the conditioning the transformer reads (the last CLIP token)."""
    from encoders import TextConditioner
    from training.demo.model_set import write_text_encoders
    from training.demo.text import TextTrainConfig, save_text_encoders, train_text_encoders

    write_text_encoders(tmp_path, seed=0)
    conditioner = TextConditioner.from_model_dir(tmp_path, t5="off")
    words = ["on the left", "on the right", "at the top", "at the bottom"]

    def padding_gap():
        context, _ = conditioner.encode(["a red circle " + w for w in words[:2]])
        last = context[:, 76, :128]                               # a CLIP padding token, both CLIPs
        return ((last[0] - last[1]).norm() / last[0].norm()).item()

    scenes = torch.randn(len(words), 16, 4, 4, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle " + words[i % 4] for i in range(64)]
    latents = scenes[torch.arange(64) % 4]
    before = padding_gap()
    result = train_text_encoders(conditioner, captions, latents, TextTrainConfig(steps=80, batch_size=16), log=lambda m: None)
    after = padding_gap()
    assert before < 0.05 and after > 10 * before and after > 0.1, (before, after)
    assert result["loss"] < 2.0, result
    save_text_encoders(conditioner, tmp_path)
    reloaded = TextConditioner.from_model_dir(tmp_path, t5="off")
    assert torch.allclose(reloaded.encode(["a red circle at the top"])[0],
                          conditioner.encode(["a red circle at the top"])[0], atol=2e-2)


def test_latent_scale_matching_keeps_reconstructions_and_gives_unit_variance():
    from training.vae import match_latent_scale
    from vae import VAE, VAEConfig

    torch.manual_seed(0)
    ae = VAE(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval()
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    x = images.float() / 127.5 - 1
    before = ae.decode(ae.encode(x, sample=False))
    a = match_latent_scale(ae, images)
    z = ae.encode(x, sample=False)
    assert a != pytest.approx(1.0, abs=0.05)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(ae.decode(z), before, atol=1e-5, rtol=0)


def test_decoder_fine_tuning_leaves_the_encoder_and_lowers_the_object_error():
    """training.vae.train_decoder: the encoder (and so every latent made with it) is untouched, and the decoder
    gets the objects' pixels closer."""
    from training.vae import VAETrainConfig, pixels_to_unit, train_decoder
    from vae import VAE, VAEConfig

    torch.manual_seed(0)
    ae = VAE(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval().requires_grad_(False)
    images = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)
    for i in range(16):                                 # squares of 16 colours on black
        images[i, :, 8:24, 8:24] = torch.tensor([(i * 37) % 256, (i * 91) % 256, 255 - i * 8])[:, None, None]
    x = pixels_to_unit(images)
    latents = ae.encode(x, sample=False)                # (16, 16, 16, 16)
    encoder = {k: v.clone() for k, v in ae.encoder.state_dict().items()}

    def object_error():
        return (ae.decode(latents) - x)[:, :, 8:24, 8:24].abs().mean().item()

    before = object_error()
    history = train_decoder(ae, latents, images, VAETrainConfig(steps=80, batch_size=8, lr=2e-3, warmup_steps=5),
                            object_weight=5.0, crop=8)
    assert len(history) == 80 and not ae.decoder.training
    assert all(torch.equal(v, ae.encoder.state_dict()[k]) for k, v in encoder.items())
    torch.testing.assert_close(ae.encode(x, sample=False), latents)
    assert object_error() < 0.6 * before          # measured 0.52x; an untrained decoder keeps 1x


def test_the_vae_and_its_gate_see_every_combination_the_captioned_scenes_hold_out():
    """training.demo.train.any_scenes: the VAE's scenes (stream 3) and its gate's (stream 4) include the
    held-out combinations, which the training scenes never show; each stream is its own, and repeatable."""
    from training.demo.shapes import held_out_reasons, training_sample
    from training.demo.train import any_scenes

    vae_scenes, gate = any_scenes(300, 0, stream=3), any_scenes(300, 0, stream=4)
    assert vae_scenes == any_scenes(300, 0, stream=3) and vae_scenes != gate
    reasons = {r for s in vae_scenes for r in held_out_reasons(s)}
    assert {r.split(":")[0] for r in reasons} == {"colour x shape", "colour x background", "shape pair"}
    assert 30 <= sum(bool(held_out_reasons(s)) for s in gate) <= 150
    assert not any(held_out_reasons(training_sample(i)[0]) for i in range(300))


def test_vae_training_lowers_the_reconstruction_loss():
    from training.vae import VAETrainConfig, train_vae, vae_loss
    from vae import VAE, VAEConfig

    torch.manual_seed(0)
    ae = VAE(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1))
    images = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 8:24, 8:24] = 255                      # red squares on black
    x = images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = vae_loss(ae, x, g, 0.0)[0].item()
    train_vae(ae, images, VAETrainConfig(steps=30, batch_size=8, warmup_steps=5))
    with torch.no_grad():
        after = vae_loss(ae, x, torch.Generator().manual_seed(0), 0.0)[0].item()
    assert after < 0.5 * before


def test_vae_object_weight_spends_the_steps_on_the_objects():
    """train_vae with `objects` and object_weight: the same VAE, seed and batches reconstruct a small object
    better (and the background no better) than with the plain mean, where the background fills most pixels."""
    from training.vae import VAETrainConfig, object_pixels, pixels_to_unit, train_vae
    from vae import VAE, VAEConfig

    images = torch.full((16, 3, 32, 32), 200, dtype=torch.uint8)           # small shapes on gray
    for i in range(16):
        top, left = 4 + (i % 4) * 4, 4 + (i // 4) * 4
        images[i, :, top:top + 6, left:left + 6] = torch.tensor([220, 30, 30 + 12 * i]).view(3, 1, 1)
    objects = object_pixels(images)
    errors = {}
    for weight in (1.0, 20.0):
        torch.manual_seed(0)
        ae = VAE(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1))
        train_vae(ae, images, VAETrainConfig(steps=40, batch_size=8, warmup_steps=5), objects=objects,
                  object_weight=weight)
        with torch.no_grad():
            x = pixels_to_unit(images)
            error = (ae.decoder(ae.encoder(x).chunk(2, dim=1)[0]) - x).abs().mean(1, keepdim=True)
        errors[weight] = error[objects].mean().item(), error[~objects].mean().item()
    assert errors[20.0][0] < 0.8 * errors[1.0][0], errors
    assert errors[20.0][1] > errors[1.0][1], errors



class _IdentityVAE:
    """encode and decode that hand the picture through unchanged."""

    def encode(self, x, sample=False):
        return x

    def decode(self, z):
        return z


def test_palette_reconstruction_reads_every_pair_at_the_object_centre():
    """training.demo.train.palette_reconstruction through a VAE that changes nothing gives back the palette."""
    from training.demo.shapes import BACKGROUNDS, COLOURS
    from training.demo.train import palette_reconstruction

    back = palette_reconstruction(_IdentityVAE())
    assert set(back) == {(c, b) for c in COLOURS for b in BACKGROUNDS}
    assert all(back[c, b] == COLOURS[c] for c, b in back)
