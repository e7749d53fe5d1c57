"""The loop: resume equals an uninterrupted run, LR schedule, EMA, files written, loss curve."""

import json

import pytest
import torch

from mmditx import MMDiTX, load_config
from mmditx.checkpoint import build_on_meta
from mmditx.init import init_weights
from sampling.embedded import embedded_model_dir
from sampling.pipeline import ModelFiles
from training.cache import CacheOptions, CachedDataset, build_cache
from training.data import scan_folder
from training.distributed import Distributed
from training.example import make_example_data
from training.lora import add_lora
from training.loop import TrainConfig, Trainer, lr_factor
from training.muon import Muon
from training.objective import Objective


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    examples, _ = scan_folder(make_example_data(root / "data", count=4, size=64), resolution=64)
    folder = build_cache(examples, ModelFiles.from_dir(embedded_model_dir()), root / "run",
                         CacheOptions(flip=True), log=lambda m: None)
    return CachedDataset(folder)


def tiny(seed=0):
    return init_weights(build_on_meta(lambda: MMDiTX(load_config("tiny"))).to_empty(device="cpu"), seed=seed)


def config(**kw):
    base = dict(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, lr_schedule="cosine", ema_decay=0.9,
                caption_dropout=(0.2, 0.2, 0.2), objective=Objective(weighting="cosmap"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("lora,optimizer", [(False, "adamw"), (True, "adamw"), (False, "muon")])
def test_resume_equals_one_run(dataset, tmp_path, lora, optimizer):
    def model():
        m = tiny()
        if lora:
            add_lora(m, rank=4, dropout=0.1)
            g = torch.Generator().manual_seed(0)
            for a in m.modules():
                if hasattr(a, "lora_up"):  # zero ups would make the first steps trivially equal
                    torch.nn.init.normal_(a.lora_up, std=0.01, generator=g)
        return m

    cfg = config(grad_accum=2, full_checkpoints=False, optimizer=optimizer)
    one = Trainer(model(), dataset, cfg, tmp_path / "one", log_stream=None)
    one.save = lambda: None                         # LoRA files need mmditx.lora; state is what we compare
    one.train()
    first = Trainer(model(), dataset, cfg, tmp_path / "two", log_stream=None)
    first.save = lambda: None
    first.train(until=2)
    state = first.state_dict()
    resumed = Trainer(model(), dataset, cfg, tmp_path / "two", log_stream=None)
    resumed.save = lambda: None
    resumed.load_state_dict(state)
    resumed.train()
    a, b = one.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = model().state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a)                       # it did train
    assert all(torch.equal(one.ema[k], resumed.ema[k]) for k in one.ema)
    assert [r["loss"] for r in one.history[2:]] == [r["loss"] for r in resumed.history]


def test_use_average_puts_the_moving_average_into_the_model(dataset, tmp_path):
    trainer = Trainer(tiny(), dataset, config(steps=2), tmp_path / "avg", log_stream=None)
    trainer.save = lambda: None
    trainer.train()
    last = {n: p.detach().clone() for n, p in trainer.trainable}
    assert any(not torch.equal(last[n], trainer.ema[n]) for n in last)
    trainer.use_average()
    assert all(torch.equal(p, trainer.ema[n]) for n, p in trainer.trainable)
    plain = Trainer(tiny(), dataset, config(steps=1, ema_decay=None), tmp_path / "plain", log_stream=None)
    with pytest.raises(ValueError, match="kept no moving average"):
        plain.use_average()


def test_compiled_training_follows_the_eager_run(dataset, tmp_path):
    """compile=True runs the steps through torch.compile: the same losses and weights, float rounding apart."""
    runs = []
    for compiled in (False, True):
        trainer = Trainer(tiny(), dataset, config(steps=2, compile=compiled), tmp_path / str(compiled),
                          log_stream=None)
        assert isinstance(trainer.net, torch._dynamo.eval_frame.OptimizedModule) == compiled
        runs.append(([row["loss"] for row in trainer.train()], dict(trainer.trainable)))
    (eager_loss, eager), (compiled_loss, compiled) = runs
    assert eager_loss == pytest.approx(compiled_loss, rel=1e-4) and eager_loss[0] > 0
    moved = max((eager[n] - tiny().state_dict()[n]).abs().max().item() for n in eager)
    assert moved > 1e-4    # the steps changed the weights, so the comparison below can fail
    assert all(torch.allclose(eager[n], compiled[n], rtol=0, atol=1e-3 * moved) for n in eager)
    with pytest.raises(ValueError, match="compile does not combine with FSDP"):
        Trainer(tiny(), dataset, config(compile=True), tmp_path / "fsdp", dist=Distributed(fsdp=True))


def test_muon_steps_the_blocks_matrices_and_adamw_the_rest(dataset, tmp_path):
    """optimizer="muon": each 2-D weight of a joint block takes Muon's step (AdamW's RMS; training.muon batches
    the matrices of one shape), every other parameter AdamW's, both at the one learning rate; checked against
    torch's own Muon and AdamW run on the same gradients."""
    lr = 1e-3
    trainer = Trainer(tiny(), dataset, config(steps=1, lr=lr, warmup_steps=0, lr_schedule="constant", grad_clip=None,
                                              ema_decay=None, optimizer="muon"), tmp_path / "muon", log_stream=None)
    trainer.save = lambda: None
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    grads = {}
    for n, p in trainer.trainable:
        p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.clone()))
    trainer.train()
    kinds = {"muon": 0, "adamw": 0}
    for n, p in trainer.trainable:
        if n not in grads:
            continue
        kind = "muon" if p.ndim == 2 and n.startswith("joint_blocks.") else "adamw"
        oracle = before[n].clone().requires_grad_(True)
        oracle.grad = grads[n]
        if kind == "muon":
            torch.optim.Muon([oracle], lr=lr, weight_decay=1e-2, adjust_lr_fn="match_rms_adamw").step()
        else:
            torch.optim.AdamW([oracle], lr=lr, weight_decay=1e-2).step()
        assert torch.allclose(p.detach(), oracle.detach(), rtol=0, atol=1e-7), n
        kinds[kind] += 1
    assert kinds["muon"] >= 8 and kinds["adamw"] >= 8, kinds
    lora_only = tiny()
    add_lora(lora_only, rank=4)
    with pytest.raises(ValueError, match="a LoRA run"):
        Trainer(lora_only, dataset, config(optimizer="muon"), tmp_path / "lora", log_stream=None)
    with pytest.raises(ValueError, match="Muon orthogonalises whole weight matrices"):
        Trainer(tiny(), dataset, config(optimizer="muon"), tmp_path / "fsdp", dist=Distributed(fsdp=True))
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'muon'"):
        config(optimizer="sgd")
    with pytest.raises(ValueError, match="Muon steps 2-D weight matrices, not a parameter of shape"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_resume_refuses_other_options(dataset, tmp_path):
    first = Trainer(tiny(), dataset, config(steps=1), tmp_path / "a", log_stream=None)
    state = first.state_dict()
    other = Trainer(tiny(), dataset, config(steps=3, lr=5e-4), tmp_path / "a", log_stream=None)
    with pytest.raises(ValueError, match="options of the original run: lr differ"):
        other.load_state_dict(state)
    Trainer(tiny(), dataset, config(steps=3), tmp_path / "a", log_stream=None).load_state_dict(state)  # more steps: fine
    state["config"].pop("optimizer")        # a state saved before the option existed: an AdamW run
    Trainer(tiny(), dataset, config(steps=3), tmp_path / "a", log_stream=None).load_state_dict(state)
    with pytest.raises(ValueError, match="optimizer differ"):
        Trainer(tiny(), dataset, config(steps=3, optimizer="muon"), tmp_path / "a", log_stream=None).load_state_dict(state)


def test_lr_schedule():
    cfg = TrainConfig(steps=10, warmup_steps=2, lr_schedule="cosine")
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == 1.0 and abs(lr_factor(6, cfg) - 0.5) < 1e-12 and lr_factor(10, cfg) < 1e-12
    assert lr_factor(7, TrainConfig(steps=10, warmup_steps=2)) == 1.0


def test_full_run_writes_checkpoint_state_log_and_curve(dataset, tmp_path):
    from mmditx import load_mmditx
    base = embedded_model_dir() / "sd3.5_medium.safetensors"
    model = load_mmditx(base).requires_grad_(True)                   # loaded models are frozen
    trainer = Trainer(model, dataset, config(steps=2, batch_size=1, ema_decay=None), tmp_path / "run",
                      base_file=base, log_stream=None)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    loaded = load_mmditx(ckpt / "sd3.5_medium.safetensors")
    for k, v in loaded.state_dict().items():
        assert torch.allclose(v, model.state_dict()[k].half().float()), k
    assert (ckpt / "text_encoders").is_dir() and (ckpt / "tokenizer_3").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    from PIL import Image
    assert Image.open(tmp_path / "run" / "loss.png").size == (640, 360)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == 2
