"""The shared trainer: every method trains, runs are reproducible, NaN is caught, the CLI is strict."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_main
from musicssl.models import Backbone
from musicssl.pretext.base import Progress
from musicssl.pretext.registry import available_methods
from musicssl.train import (
    ConfigError,
    SSLModule,
    TrainConfig,
    build_method,
    build_parser,
    config_from_args,
    given_options,
    main,
    method_settings,
    probe_score,
    resolve_precision,
    resolve_run_settings,
    train,
    warmup_cosine,
)


def tiny_config(method: str, tmp_path, **changes) -> TrainConfig:
    config = TrainConfig(
        method=method, preset="cpu", max_epochs=2, steps_per_epoch=3, batch_size=8, probe_segments=64,
        probe_segments_per_track=2, num_threads=1, out_dir=str(tmp_path / method), seed=3,
    )
    return replace(config, **changes)


@pytest.mark.parametrize("method", ["contrastive", "byol", "clustering", "barlow_twins", "vicreg"])
def test_every_method_trains_and_writes_its_run(method, tmp_path, tonal_data):
    import lightning.pytorch as pl

    config = tiny_config(method, tmp_path)
    pl.seed_everything(config.seed, verbose=False)
    initial = build_method(resolve_run_settings(config)).backbone.state_dict()  # train() starts from these
    result = train(config, data=tonal_data, progress_bar=False)
    assert result.diverged_step is None
    # The loss's gradients moved the weights. AdamW's decoupled weight decay alone (a zero gradient)
    # would only scale each tensor, leaving nothing orthogonal to its initial value.
    moved = []
    for name, before in initial.items():
        if before.dtype.is_floating_point and before.dim() > 1:
            after = result.backbone.state_dict()[name].double()
            before = before.double()
            orthogonal = after - (after * before).sum() / (before * before).sum() * before
            moved.append(float(orthogonal.norm() / after.norm()))
    assert max(moved) > 1e-3 and sorted(moved)[len(moved) // 2] > 1e-4, moved
    assert [row["epoch"] for row in result.epochs] == [1, 2]
    assert result.final["steps"] == 6
    assert math.isfinite(result.final["train_loss"])
    # Every loss term is logged, and the collapse metrics of the last epoch are in the summary.
    assert result.final["collapse_rankme_embedding"] > 1.0
    assert 0.0 <= result.final["probe_auc"] <= 1.0 and 0.0 <= result.final["probe_map"] <= 1.0
    out = tmp_path / method
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 2 and "train_loss" in metrics and "collapse_l2_std_embedding" in metrics
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2
    # The summary's metrics are the last epoch's, as metrics.csv holds them.
    last = metrics.iloc[-1]
    shared = [key for key in metrics.columns if key not in ("epoch", "step", "verdict") and key in summary]
    assert "train_loss" in shared and "collapse_rankme_embedding" in shared
    differ = [key for key in shared if summary[key] != pytest.approx(float(last[key]), rel=1e-6, nan_ok=True)]
    assert not differ, [(key, summary[key], last[key]) for key in differ]
    assert metrics.iloc[0]["train_loss"] != last["train_loss"]
    # Where it ran and in which precision: the defaults pick the GPU (bf16) when there is one.
    on_gpu = torch.cuda.is_available()
    assert (summary["accelerator"], summary["precision"]) == (("gpu", "bf16-mixed") if on_gpu else ("cpu", "32-true"))
    expected_device = (f"cuda:0 ({torch.cuda.get_device_name(0)})" if on_gpu
                       else f"cpu ({torch.backends.cpu.get_cpu_capability()})")
    assert summary["device"] == expected_device
    # The checkpoint is a plain state_dict of the backbone, loadable without pickled code.
    state = torch.load(out / "backbone.pt", weights_only=True)
    backbone = Backbone(preset="cpu")
    backbone.load_state_dict(state)
    assert torch.equal(backbone.state_dict()["attention_pool.positional_embedding"],
                       result.backbone.state_dict()["attention_pool.positional_embedding"])
    # The run's probe scores are the probe's on that backbone, with the run's segments per track and seed.
    assert probe_score(backbone, tonal_data, 2, config.seed) == {key: result.final[key]
                                                                   for key in ("probe_map", "probe_auc")}
    # config.json holds the method's settings as the run used them, the cpu preset's changes included (before:
    # only the --set strings, so that a reader assumed the method's defaults, e.g. 4096 prototypes, not 1024).
    method_config = json.loads((out / "config.json").read_text())["method_config"]
    cpu_preset = {"hidden_dim": 512, "projection_dim": 1024, "predictor_hidden_dim": 128, "bottleneck_dim": 128,
                  "num_prototypes": 1024}  # the cpu preset's table, written out
    for name, value in cpu_preset.items():
        if name in method_config:
            assert method_config[name] == value, name
    if method == "clustering":
        assert method_config["num_prototypes"] == 1024 and method_config["bottleneck_dim"] == 128
    assert json.loads((out / "config.json").read_text())["training_corpus"] is None  # not a generated corpus
    assert json.loads((out / "config.json").read_text())["training_data_unlabeled"] is False  # a tracks.csv
    assert json.loads((out / "config.json").read_text())["training_split_groups"] is False  # its split column


def test_a_run_on_a_generated_corpus_records_which_one(tmp_path, tonal_dataset):
    """config.json says which generated corpus (version, seed, size) the backbone trained on, so that an
    evaluation on another corpus of the seed can find the test tracks it trained on (analysis.downstream)."""
    from musicssl.data.cache import LogMelConfig
    from musicssl.data.index import TrackIndex
    from musicssl.corpus.splits import split_assignment
    from musicssl.data.pipeline import prepare_data

    # The tonal tracks listed the way the generator lists its corpus: its ids, each in the split the generator
    # gives that number (a track's split is a function of (seed, number); see musicssl.corpus.splits).
    folder = tmp_path / "corpus"
    tonal = TrackIndex.from_csv(tonal_dataset / "tracks.csv")
    tracks = tonal.tracks.copy()
    tracks["track_id"] = [f"track{number:05d}" for number in range(len(tracks))]
    tracks["split"] = split_assignment(48, 7)[: len(tracks)]
    TrackIndex(tracks, tonal.tag_names).to_csv(folder / "tracks.csv")
    (folder / "corpus.json").write_text(json.dumps({"generator_version": 2, "config": {"tracks": 48, "seconds": 14.0, "seed": 7}}))

    def recorded_corpus(name: str) -> dict | None:
        data = prepare_data(folder / "tracks.csv", LogMelConfig(n_mels=64), cache_dir=tmp_path / "mels", workers=0, verbose=False)
        config = TrainConfig(method="vicreg", preset="cpu", max_epochs=1, steps_per_epoch=1, batch_size=8, num_threads=1,
                             final_probe=False, out_dir=str(tmp_path / name))
        train(config, data=data, progress_bar=False)
        return json.loads((tmp_path / name / "config.json").read_text())["training_corpus"]

    assert recorded_corpus("run") == {"generator_version": 2, "seed": 7, "tracks": 48, "seconds": 14.0}
    # A test track moved to train by hand: no longer the generated corpus's splits, so no record is claimed.
    first_test = tracks.index[tracks["split"] == "test"][0]
    tracks.loc[first_test, "split"] = "train"
    TrackIndex(tracks, tonal.tag_names).to_csv(folder / "tracks.csv")
    assert recorded_corpus("edited") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["contrastive", "byol", "clustering", "barlow_twins", "vicreg"])
def test_every_method_trains_on_the_gpu_in_bf16_and_matches_the_cpu(method, tmp_path, tonal_data):
    # One step from the same seed: same initial weights and batch on every device.
    def one_step(folder, **changes):
        config = tiny_config(method, tmp_path / folder, max_epochs=1, steps_per_epoch=1, **changes)
        return train(config, data=tonal_data, progress_bar=False)

    on_cpu = one_step("cpu", accelerator="cpu", final_probe=False)
    fp32 = one_step("fp32", precision="32-true", final_probe=False)
    default = one_step("gpu")  # accelerator and precision left to their defaults
    native = torch.cuda.is_bf16_supported(including_emulation=False)  # (before Ampere: float32)
    assert (default.final["accelerator"], default.final["precision"]) == ("gpu", "bf16-mixed" if native else "32-true")
    assert (fp32.final["accelerator"], on_cpu.final["accelerator"]) == ("gpu", "cpu")
    # float32 on the GPU is the CPU's loss up to TF32 convolutions (10-bit mantissa; measured on an
    # H200: at most 0.7 %, clustering).
    assert fp32.final["train_loss"] == pytest.approx(on_cpu.final["train_loss"], rel=2e-2)
    # bf16 autocast moves it further (8-bit mantissa), and does change it. The losses are computed in float32,
    # but the backbone's and projector's outputs are rounded, and at initialisation the tracks' embeddings are
    # nearly one point (mean cosine 0.998), so the losses read differences that rounding blurs. Measured on an
    # H200 (2026-12-04, torch 2.11): byol -0.4 %, vicreg -2.2 %, barlow_twins +4.1 %, clustering +15.1 % (its
    # teacher temperature of 0.04 multiplies the logits' rounding by 25) and contrastive +22.9 % (its
    # temperature of 0.1 by 10, on cosines that differ in their third decimal).
    tolerance = {"contrastive": 0.35, "clustering": 0.25}.get(method, 0.1)
    assert default.final["train_loss"] == pytest.approx(on_cpu.final["train_loss"], rel=tolerance)
    assert default.final["train_loss"] != fp32.final["train_loss"]
    assert default.diverged_step is None and math.isfinite(default.final["probe_map"])
    # The checkpoint comes back to the CPU in float32, loadable without pickled code.
    state = torch.load(tmp_path / "gpu" / method / "backbone.pt", weights_only=True)
    assert {value.device.type for value in state.values()} == {"cpu"}
    assert {value.dtype for value in state.values() if value.is_floating_point()} == {torch.float32}
    Backbone(preset="cpu").load_state_dict(state)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_probe_embeds_on_the_device_given_and_leaves_the_backbone_where_it_is(device, tonal_data):
    """Before: a run trained on a GPU scored its final probe (and a search's trial its objective) with the
    backbone already moved to the CPU, embedding every training and validation track there."""
    from musicssl.train import probe_score

    torch.manual_seed(0)
    backbone = Backbone(preset="cpu")
    seen: list[str] = []
    backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].device.type))
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    on_device = probe_score(backbone, tonal_data, 4, seed=0, device=device)
    assert set(seen) == {device}
    assert {value.device.type for value in backbone.state_dict().values()} == {"cpu"}
    assert all(torch.equal(value, before[name]) for name, value in backbone.state_dict().items())
    seen.clear()
    here = probe_score(backbone, tonal_data, 4, seed=0)
    assert set(seen) == {"cpu"}
    # The same probe up to the device's arithmetic (TF32 convolutions on a GPU).
    assert on_device == pytest.approx(here, abs=0.02 if device == "cuda" else 0.0)


def test_the_default_precision_is_bf16_on_a_gpu_and_float32_on_the_cpu():
    assert resolve_precision(TrainConfig(), "gpu", native_bf16=True) == "bf16-mixed"
    assert resolve_precision(TrainConfig(), "cpu") == "32-true"
    assert resolve_precision(TrainConfig(precision="32-true"), "gpu", native_bf16=True) == "32-true"
    # Before: bf16 autocast on any GPU, one that only emulates bfloat16 (before Ampere: V100, T4) included.
    assert resolve_precision(TrainConfig(), "gpu", native_bf16=False) == "32-true"
    assert resolve_precision(TrainConfig(precision="bf16-mixed"), "gpu", native_bf16=False) == "bf16-mixed"


def test_vicreg_logs_its_three_terms_and_they_add_up(tmp_path, tonal_data):
    result = train(tiny_config("vicreg", tmp_path, max_epochs=1), data=tonal_data, progress_bar=False)
    row = result.epochs[-1]
    weights = method_settings(result.config)
    # Epoch means of a weighted sum equal the weighted sum of the epoch means.
    expected = (weights.inv_weight * row["train_invariance"] + weights.var_weight * row["train_variance"]
                + weights.cov_weight * row["train_covariance"])
    assert row["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_same_seed_gives_the_same_metrics(tmp_path, tonal_data, monkeypatch):
    """The same seed: the same batches (tracks and where their views start) and metrics; another seed: other
    batches, not only other initial weights."""
    from musicssl.train import SSLModule

    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    training_step = SSLModule.training_step

    def recording(self, batch, batch_idx):
        batches.append((batch[0].clone(), batch[1].clone()))  # the views, and the tracks they were cut from
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(SSLModule, "training_step", recording)

    def run(folder, seed=3):
        batches.clear()
        result = train(tiny_config("contrastive", tmp_path / folder, seed=seed, final_probe=False), data=tonal_data,
                       progress_bar=False)
        return result, list(batches)

    (first, first_batches), (second, second_batches) = run("a"), run("b")
    drop = {"epoch_seconds"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in drop} for row in rows]  # noqa: E731
    assert strip(first.epochs) == strip(second.epochs)
    assert len(first_batches) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first_batches, second_batches))
    other, other_batches = run("c", seed=4)
    assert other.epochs[0]["train_loss"] != first.epochs[0]["train_loss"]
    assert not torch.equal(other_batches[0][1], first_batches[0][1])  # other tracks in the first batch
    # A track drawn in the first epoch of both: its views start elsewhere.
    def first_epoch_views(run_batches):
        return {int(track): views for batch, tracks in run_batches[:3] for views, track in zip(batch, tracks)}

    first_views, other_views = first_epoch_views(first_batches), first_epoch_views(other_batches)
    shared = sorted(set(first_views) & set(other_views))
    assert shared and all(not torch.equal(first_views[t], other_views[t]) for t in shared)


def test_without_steps_per_epoch_an_epoch_is_one_pass_over_the_training_tracks(tmp_path, tonal_data):
    """steps_per_epoch None (--steps-per-epoch 0): as many whole batches as the training tracks fill."""
    training_tracks = len(tonal_data.track_ids("train"))
    assert training_tracks // 8 >= 2  # (more than one batch, so that a count of one would show)
    config = tiny_config("vicreg", tmp_path, steps_per_epoch=None, max_epochs=1, probe_segments=0, final_probe=False)
    result = train(config, data=tonal_data, progress_bar=False)
    assert result.final["steps"] == training_tracks // 8


def test_a_run_that_diverges_keeps_the_weights_of_its_last_epoch_before(tmp_path, tonal_data):
    """Before, backbone.pt held the weights the run diverged with: the diverging step's forward had already
    updated BatchNorm's statistics (and a huge finite step before it can leave NaN weights), and the CLI exited 0
    with a NaN checkpoint."""
    import dataclasses

    from musicssl.train import finite_state

    kept = {}

    def poison_after_epoch_1(module, record):  # the next step's loss overflows: the run diverges at step 3
        if record["epoch"] == 1:
            kept.update({k: v.detach().clone() for k, v in module.method.backbone.state_dict().items()})
            module.method.config = dataclasses.replace(module.method.config, inv_weight=1e300)

    config = tiny_config("vicreg", tmp_path, max_epochs=3)
    result = train(config, data=tonal_data, progress_bar=False, epoch_end_hooks=[poison_after_epoch_1])
    assert result.verdict == "diverged" and result.diverged_step == 3 and result.final["epochs_run"] == 1
    assert result.final["backbone_epoch"] == 1
    saved = torch.load(tmp_path / "vicreg" / "backbone.pt", weights_only=True)
    assert set(saved) == set(kept) and all(torch.equal(saved[k], kept[k]) for k in kept)
    assert finite_state(saved)
    assert json.loads((tmp_path / "vicreg" / "summary.json").read_text())["backbone_epoch"] == 1

    # Weights left non-finite without a non-finite loss (here a BatchNorm statistic, set after epoch 1): the last
    # finite epoch's are kept too.
    def poison_statistics(module, record):
        if record["epoch"] == 2:
            next(b for n, b in module.method.backbone.named_buffers() if n.endswith("running_var")).fill_(math.inf)

    config = tiny_config("vicreg", tmp_path / "statistics", max_epochs=2)
    result = train(config, data=tonal_data, progress_bar=False, epoch_end_hooks=[poison_statistics])
    assert result.verdict != "diverged" and result.final["epochs_run"] == 2 and result.final["backbone_epoch"] == 1
    assert finite_state(torch.load(tmp_path / "statistics" / "vicreg" / "backbone.pt", weights_only=True))

    # Poisoned after epoch 2 of 3: epoch 2's weights are kept, not the first finite epoch's.
    kept.clear()

    def poison_after_epoch_2(module, record):
        if record["epoch"] == 2:
            kept.update({k: v.detach().clone() for k, v in module.method.backbone.state_dict().items()})
            module.method.config = dataclasses.replace(module.method.config, inv_weight=1e300)

    config = tiny_config("vicreg", tmp_path / "later", max_epochs=3)
    result = train(config, data=tonal_data, progress_bar=False, epoch_end_hooks=[poison_after_epoch_2])
    assert result.diverged_step == 6 and (result.final["epochs_run"], result.final["backbone_epoch"]) == (2, 2)
    saved = torch.load(tmp_path / "later" / "vicreg" / "backbone.pt", weights_only=True)
    assert all(torch.equal(saved[k], kept[k]) for k in kept)


def test_a_run_whose_weights_are_never_finite_says_so_not_that_it_diverged(tmp_path, tonal_data, monkeypatch, capsys):
    from analysis.downstream import DownstreamError, resolve_method
    from musicssl import train as training

    def poison_statistics(module, record):  # after its only epoch; its loss stays finite
        next(b for n, b in module.method.backbone.named_buffers() if n.endswith("running_var")).fill_(math.inf)

    real_train = training.train
    monkeypatch.setattr(training, "train", lambda config, **kwargs: real_train(
        config, data=tonal_data, progress_bar=False, epoch_end_hooks=[poison_statistics]))
    code, out, err = run_main(main, ["vicreg", "--max-epochs", "1", "--steps-per-epoch", "3", "--batch-size", "8",
                                     "--threads", "1", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    # Before: "no backbone.pt, as no epoch ended before", and downstream's "diverged ... (at step None)".
    assert "vicreg: its weights after epoch 1 are not all finite; no backbone.pt, as no epoch's were\n" in out
    assert not (tmp_path / "run" / "backbone.pt").exists()
    with pytest.raises(DownstreamError, match="a training run whose weights were not finite after any epoch keeps no "
                                              "backbone.pt"):
        resolve_method(str(tmp_path / "run"))


def test_a_run_that_diverges_in_its_first_epoch_writes_no_backbone(tmp_path, tonal_data, capsys):
    from analysis.downstream import DownstreamError, resolve_method

    config = tiny_config("vicreg", tmp_path, max_epochs=2, method_params={"inv_weight": 1e300})
    result = train(config, data=tonal_data, progress_bar=False)
    assert result.verdict == "diverged" and result.final["backbone_epoch"] == 0
    folder = tmp_path / "vicreg"
    assert sorted(path.name for path in folder.iterdir()) == ["collapse.csv", "config.json", "metrics.csv", "summary.json"]
    with pytest.raises(DownstreamError, match="a training run that diverged in its first epoch .at step 0. keeps no "
                                              "backbone.pt"):
        resolve_method(str(folder))


def test_a_non_finite_loss_stops_the_run_at_once_as_diverged(tmp_path, tonal_data):
    # A weight of 1e300 overflows float32: the first loss is inf (a NaN weight is refused by the config).
    config = tiny_config("vicreg", tmp_path, max_epochs=3, method_params={"inv_weight": 1e300})
    result = train(config, data=tonal_data, progress_bar=False)
    assert result.verdict == "diverged"
    assert result.diverged_step == 0
    assert result.final["steps"] == 0
    assert "probe_map" not in result.final  # no probe on a diverged run
    # Its files are readable: no epoch closed, and the CSVs have their header (before: one empty line,
    # which pandas refuses).
    import pandas as pd

    assert list(pd.read_csv(tmp_path / "vicreg" / "metrics.csv").columns) == ["epoch", "step", "verdict"]
    assert len(pd.read_csv(tmp_path / "vicreg" / "metrics.csv")) == 0
    collapse = pd.read_csv(tmp_path / "vicreg" / "collapse.csv")
    assert collapse[["kind", "epoch", "step", "verdict"]].values.tolist() == [["step", 1, 0, "diverged"]]
    # Without collapse metrics (probe_segments=0), collapse.csv has its header alone.
    quiet = train(tiny_config("vicreg", tmp_path / "unmeasured", max_epochs=1, probe_segments=0), data=tonal_data,
                  progress_bar=False)
    assert quiet.verdict != "diverged"
    collapse = pd.read_csv(tmp_path / "unmeasured" / "vicreg" / "collapse.csv")
    assert list(collapse.columns) == ["kind", "epoch", "step", "verdict"] and len(collapse) == 0


def test_warmup_cosine_schedule_matches_its_formula():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    # The cosine starts at the peak on the first step after the warm-up, and never exceeds it.
    assert warmup_cosine(10, 10, 110) == 1.0
    assert warmup_cosine(11, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 1 / 100)))
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0)
    assert warmup_cosine(120, 10, 110) == pytest.approx(0.0)  # past the end: stays at 0
    assert max(warmup_cosine(step, 10, 110) for step in range(130)) == 1.0
    assert warmup_cosine(0, 0, 100) == 1.0 and warmup_cosine(50, 0, 100) == pytest.approx(0.5)


def test_clustering_schedules_in_a_run_follow_their_formulas_step_by_step(tmp_path, tonal_data):
    """The teacher temperature (linear warm-up, DINO) and the teacher's EMA rate (cosine to 1, BYOL) that
    a run logs per epoch are the means over its steps k = 0, 1, ... of the formulas at k: the loss of
    step k sees the schedules at k, not one step on."""
    config = tiny_config("clustering", tmp_path, final_probe=False,
                         method_params={"teacher_warmup_epochs": 4, "base_ema_rate": 0.9})
    result = train(config, data=tonal_data, progress_bar=False)
    settings = method_settings(result.config)
    steps_per_epoch, total = 3, 6
    for epoch, row in enumerate(result.epochs):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        temperature = [settings.teacher_temperature_start + (settings.teacher_temperature
                       - settings.teacher_temperature_start) * min(1.0, k / steps_per_epoch / 4) for k in steps]
        rate = [1 - (1 - 0.9) * (1 + math.cos(math.pi * k / total)) / 2 for k in steps]
        assert row["train_teacher_temperature"] == pytest.approx(sum(temperature) / 3, rel=1e-6)
        assert row["train_ema_rate"] == pytest.approx(sum(rate) / 3, rel=1e-6)


def test_a_run_follows_the_warmup_cosine_schedule_with_weight_decay_and_clipping(tmp_path, tonal_data):
    """In a real run: 3 epochs x 4 steps, warm-up 1.5 epochs (6 steps). The learning rate after k
    optimiser steps is peak * (k + 1) / 6 while k < 6, then peak * (1 + cos(pi * (k - 6) / 6)) / 2;
    metrics.csv logs it after each epoch's last step (k = 4, 8, 12)."""
    peak = 2e-3
    seen: list[dict] = []

    def inspect(module, record):
        trainer = module.trainer
        seen.append({"clip": trainer.gradient_clip_val,
                     "decay": {group["weight_decay"] for group in trainer.optimizers[0].param_groups},
                     "params": sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"]),
                     "trainable": sum(p.numel() for p in module.method.parameters() if p.requires_grad)})

    config = tiny_config("vicreg", tmp_path, max_epochs=3, steps_per_epoch=4, learning_rate=peak, warmup_epochs=1.5,
                         weight_decay=0.03, final_probe=False)
    result = train(config, data=tonal_data, progress_bar=False, epoch_end_hooks=[inspect])
    expected = [peak * 5 / 6, peak * (1 + math.cos(math.pi * 2 / 6)) / 2, 0.0]
    assert pd.read_csv(tmp_path / "vicreg" / "metrics.csv")["lr"].tolist() == pytest.approx(expected, abs=1e-12)
    assert [row["lr"] for row in result.epochs] == pytest.approx(expected, abs=1e-12)
    # Weight decay on every parameter (BatchNorm and biases included), the gradient norm clipped at 3.
    assert all(s["clip"] == 3.0 and s["decay"] == {0.03} and s["params"] == s["trainable"] for s in seen)
    assert len(seen) == 3
    unclipped = []
    train(replace(config, gradient_clip=None, max_epochs=1, out_dir=str(tmp_path / "unclipped")), data=tonal_data,
          progress_bar=False, epoch_end_hooks=[lambda module, record: unclipped.append(module.trainer.gradient_clip_val)])
    assert unclipped == [None]


def test_the_gradient_norm_is_clipped_at_the_setting(tmp_path, tonal_data, monkeypatch):
    """What the optimiser steps on: the gradients' total L2 norm (over every parameter) at most gradient_clip,
    and exactly it where the raw norm was larger; without clipping, the raw norms (here all above 3)."""
    norms: list[float] = []
    step = torch.optim.AdamW.step

    def recording(self, closure=None):
        def then_measure():  # Lightning's closure: the forward, backward and clipping of the step
            loss = closure()
            grads = [p.grad.double() for group in self.param_groups for p in group["params"] if p.grad is not None]
            norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
            return loss

        return step(self, then_measure)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    config = tiny_config("vicreg", tmp_path, max_epochs=1, steps_per_epoch=4, final_probe=False, probe_segments=0)
    train(replace(config, gradient_clip=None, out_dir=str(tmp_path / "raw")), data=tonal_data, progress_bar=False)
    raw, norms[:] = list(norms), []
    assert len(raw) == 4 and min(raw) > 3.0, raw
    train(replace(config, gradient_clip=3.0), data=tonal_data, progress_bar=False)
    assert norms == pytest.approx([3.0] * 4, rel=1e-5), norms
    train(replace(config, gradient_clip=1e6, out_dir=str(tmp_path / "loose")), data=tonal_data, progress_bar=False)
    assert norms[4:] == pytest.approx(raw, rel=1e-4)  # (the same seed: the same steps)


def test_collapse_metrics_every_n_steps_go_to_collapse_csv_with_the_epochs_own(tmp_path, tonal_data, monkeypatch):
    """collapse_every_n_steps=2 over 2 epochs x 4 steps: rows after steps 2 and 6, and the epoch-end
    rows after steps 4 and 8 (no second row at an epoch's last step), whose values are metrics.csv's. A row's
    loss is the mean of its epoch's step losses so far."""
    from musicssl.pretext.vicreg import VICReg

    losses: list[float] = []
    training_loss = VICReg.training_loss

    def recording(self, views, progress):
        outputs = training_loss(self, views, progress)
        if self.training:
            losses.append(float(outputs["loss"].detach()))
        return outputs

    monkeypatch.setattr(VICReg, "training_loss", recording)
    config = tiny_config("vicreg", tmp_path, steps_per_epoch=4, collapse_every_n_steps=2, final_probe=False)
    train(config, data=tonal_data, progress_bar=False)
    collapse = pd.read_csv(tmp_path / "vicreg" / "collapse.csv")
    assert collapse[["kind", "epoch", "step"]].values.tolist() == [
        ["step", 1, 2], ["epoch", 1, 4], ["step", 2, 6], ["epoch", 2, 8]]
    assert len(losses) == 8
    mean = statistics.fmean
    assert collapse["loss"].tolist() == pytest.approx([mean(losses[:2]), mean(losses[:4]), mean(losses[4:6]),
                                                       mean(losses[4:])], rel=1e-6)
    assert collapse["rankme_embedding"].between(1.0, 256.0).all()
    assert collapse["alignment"].between(0.0, 4.0).all()  # over the pairs of one track's probe segments
    # The steps' metrics are measured then, not copies of the epoch's.
    assert collapse["rankme_embedding"].nunique() == 4
    metrics = pd.read_csv(tmp_path / "vicreg" / "metrics.csv")
    epochs = collapse[collapse["kind"] == "epoch"]
    for name in ("rankme_embedding", "l2_std_embedding", "uniformity", "alignment", "mean_cosine"):
        assert epochs[name].tolist() == pytest.approx(metrics[f"collapse_{name}"].tolist(), rel=1e-9)
    assert epochs["verdict"].tolist() == metrics["verdict"].tolist()
    assert epochs["epoch"].tolist() == metrics["epoch"].tolist() == [1, 2]  # both count epochs from 1


@pytest.mark.parametrize("method", ["vicreg", "clustering"])
def test_the_collapse_metrics_read_the_probe_set_in_chunks_with_the_same_numbers(method, tmp_path, tonal_data,
                                                                               monkeypatch):
    """One forward pass over a large probe set (--probe-segments 100000) took over 16 GB of activations; the
    pass goes in chunks of COLLAPSE_CHUNK segments now, which in eval mode give each segment the outputs it
    gets in one pass (here chunks of 5 against one pass over the whole probe set)."""
    import musicssl.train as training

    runs = {}
    for chunk in (5, 10**6):
        monkeypatch.setattr(training, "COLLAPSE_CHUNK", chunk)
        config = tiny_config(method, tmp_path / str(chunk), final_probe=False)
        train(config, data=tonal_data, progress_bar=False)
        runs[chunk] = pd.read_csv(tmp_path / str(chunk) / method / "collapse.csv")
    assert config.probe_segments == 64 and len(runs[5]) == 2  # several chunks at each of the two epochs' ends
    numbers = runs[5].select_dtypes("number").columns
    pd.testing.assert_frame_equal(runs[5][numbers], runs[10**6][numbers], rtol=1e-5, atol=1e-6)
    assert runs[5]["verdict"].tolist() == runs[10**6]["verdict"].tolist()


def test_cpu_preset_scales_the_heads_and_settings_override_them():
    config = TrainConfig(method="vicreg", preset="cpu", method_params={"hidden_dim": "256", "var_weight": "2.5"})
    settings = method_settings(config)
    assert settings.hidden_dim == 256 and settings.projection_dim == 1024 and settings.var_weight == 2.5
    assert method_settings(TrainConfig(method="vicreg", preset="paper")).projection_dim == 2048
    # A method-specific preset setting: BYOL's predictor learning rate on the CPU preset only.
    assert method_settings(TrainConfig(method="byol", preset="cpu")).predictor_lr_scale == 10.0
    assert method_settings(TrainConfig(method="byol", preset="paper")).predictor_lr_scale == 1.0
    own = TrainConfig(method="byol", preset="cpu", method_params={"predictor_lr_scale": "1"})
    assert method_settings(own).predictor_lr_scale == 1.0
    with pytest.raises(ConfigError, match="unknown setting 'var_wieght'"):
        method_settings(TrainConfig(method="vicreg", method_params={"var_wieght": "1"}))
    with pytest.raises(ConfigError, match="expects a number"):
        method_settings(TrainConfig(method="vicreg", method_params={"var_weight": "lots"}))


def test_batch_size_defaults_to_the_presets_value_for_the_method_and_an_explicit_one_wins(tmp_path, tonal_data):
    # Barlow Twins on the CPU preset: 128 (README: at 64 its short run does not beat the random backbone).
    assert resolve_run_settings(TrainConfig(method="barlow_twins", preset="cpu")).batch_size == 128
    assert resolve_run_settings(TrainConfig(method="barlow_twins", preset="paper")).batch_size == 64
    assert resolve_run_settings(TrainConfig(method="vicreg", preset="cpu")).batch_size == 64
    assert resolve_run_settings(TrainConfig(method="barlow_twins", preset="cpu", batch_size=32)).batch_size == 32
    # The CLI leaves it unset unless --batch-size gives it.
    parser = build_parser()
    assert config_from_args(parser.parse_args(["barlow_twins"])).batch_size is None
    assert config_from_args(parser.parse_args(["barlow_twins", "--batch-size", "16"])).batch_size == 16
    # train() runs with the resolved value: the tonal set's 34 training tracks are too few for 128.
    with pytest.raises(ConfigError, match="for batch_size 128"):
        train(tiny_config("barlow_twins", tmp_path, batch_size=None), data=tonal_data, progress_bar=False)


def test_byol_predictor_learning_rate_scale_reaches_the_optimiser_step():
    torch.manual_seed(0)
    config = TrainConfig(method="byol", preset="cpu", learning_rate=1e-3, method_params={"predictor_lr_scale": "10"})
    method = build_method(config)
    optimiser = SSLModule(method, config, steps_per_epoch=10).configure_optimizers()["optimizer"]
    predictor = {id(p) for p in method.predictor.parameters()}
    assert [group["initial_lr"] for group in optimiser.param_groups] == pytest.approx([1e-3, 1e-2])
    # The schedule scales both alike: step 0 of a 10-step warm-up is at 1/10.
    assert [group["lr"] for group in optimiser.param_groups] == pytest.approx([1e-4, 1e-3])
    assert {id(p) for p in optimiser.param_groups[1]["params"]} == predictor
    grouped = [id(p) for group in optimiser.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.student_parameters())  # each once, no teacher
    # Adam's first step moves every weight with a gradient by about the learning rate (m / sqrt(v) = sign(g)).
    before = {id(p): p.detach().clone() for p in method.student_parameters()}
    views = [torch.randn(8, 64, 126) for _ in range(2)]
    method.training_loss(views, Progress(0, 10, 10))["loss"].backward()
    optimiser.step()
    steps = {"predictor": [], "projector": []}
    for name, part in (("predictor", method.predictor), ("projector", method.projector)):
        for p in part.parameters():
            if p.dim() == 2:  # weight matrices: decay is lr * 1e-4 per step, negligible next to lr
                steps[name].append((p.detach() - before[id(p)]).abs().median())
    assert torch.stack(steps["predictor"]).median() == pytest.approx(1e-3, rel=0.05)
    assert torch.stack(steps["projector"]).median() == pytest.approx(1e-4, rel=0.05)
    with pytest.raises(ValueError, match="predictor_lr_scale must be > 0"):
        method_settings(TrainConfig(method="byol", method_params={"predictor_lr_scale": "0"}))
    without = build_method(TrainConfig(method="byol", method_params={"use_predictor": "false"}))
    assert [scale for _, scale in without.parameter_groups()] == [1.0]


def test_the_teacher_update_after_step_k_uses_byols_rate_tau_k(tmp_path, tonal_data, monkeypatch):
    """BYOL: tau_k = 1 - (1 - tau_base) (1 + cos(pi k / K)) / 2 for the update after step k = 0..K-1."""
    import musicssl.pretext.byol as byol

    rates = []
    real_update = byol.ema_update_

    def recording_update(teacher, student, rate):
        rates.append(rate)
        real_update(teacher, student, rate)

    monkeypatch.setattr(byol, "ema_update_", recording_update)
    config = tiny_config("byol", tmp_path, method_params={"base_ema_rate": "0.9"})  # 2 epochs x 3 steps
    train(config, data=tonal_data, progress_bar=False)
    total = 6
    expected = [1 - (1 - 0.9) * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)]
    # Two updates per step (backbone, projector), each with the same rate.
    assert rates[::2] == pytest.approx(expected, abs=1e-12)
    assert rates[1::2] == pytest.approx(expected, abs=1e-12)
    assert rates[0] == pytest.approx(0.9) and rates[-1] < 1.0


def test_registry_has_the_five_methods():
    assert available_methods() == ["barlow_twins", "byol", "clustering", "contrastive", "vicreg"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["simclr"], "unknown pretext method 'simclr'"),
        (["vicreg", "--set", "var_wieght=1"], "unknown setting 'var_wieght'"),
        (["vicreg", "--set", "var_weight"], "--set takes name=value"),
        (["vicreg", "--set", "probe_segments=many"], "expects a number"),
        # A setting with a flag of its own is not taken from --set (it silently won over the flag).
        (["vicreg", "--lr", "1e-3", "--set", "learning_rate=0.01"], "--set learning_rate= is given by its own flag: use --lr 0.01"),
        (["vicreg", "--set", "batch_size=24"], "use --batch-size 24"),
        (["vicreg", "--set", "var_weight=1", "--set", "var_weight=2"], "--set gives var_weight twice ('1' and '2')"),
        # Refused before any data is prepared (before: tracebacks, or late errors naming internals).
        # A flag's value is named by its flag (before: by its field in TrainConfig, "num_threads must be ...").
        (["vicreg", "--threads", "-1"], "error: --threads must be a whole number >= 1 (for torch's choice: leave out --threads), got -1\n"),
        # The command a hint gives works (before: "use --steps-per-epoch none", which argparse refuses).
        (["vicreg", "--set", "steps_per_epoch=none"], "for one pass over the training tracks, use --steps-per-epoch 0"),
        (["vicreg", "--set", "num_threads=None"], "for torch's choice of threads, leave out --threads"),
        (["vicreg", "--set", "batch_size=none"], "for the default batch size, leave out --batch-size"),
        # NaN and inf are refused, naming the setting (before: runs that diverged at step 0, a traceback
        # from int(inf) in the view sampler, a message naming no setting, or NaN read as no warm-up).
        (["vicreg", "--set", "var_weight=nan"], "var_weight must be >= 0, got nan"),
        (["contrastive", "--set", "temperature=nan"], "temperature must be > 0, got nan"),
        (["barlow_twins", "--set", "lambd=inf"], "lambd must be >= 0, got inf"),
        (["clustering", "--set", "teacher_temperature=inf"], "teacher_temperature must be > 0, got inf"),
        (["clustering", "--set", "teacher_warmup_epochs=nan"], "teacher_warmup_epochs must be >= 0, got nan"),
        (["byol", "--set", "base_ema_rate=nan"], "base_ema_rate must be in [0, 1], got nan"),
        (["vicreg", "--set", "max_gap_seconds=inf"], "need finite 0 <= min_gap_seconds <= max_gap_seconds, got 4.0 and inf"),
        (["vicreg", "--set", "segment_seconds=nan"], "segment_seconds must be a finite number > 0, got nan"),
        (["vicreg", "--threads", "0"], "--threads must be a whole number >= 1"),
        (["vicreg", "--seed", "-1"], "error: --seed must be a whole number >= 0 and < 2**32"),
        (["vicreg", "--seed", "4294967296"], "error: --seed must be a whole number >= 0 and < 2**32"),
        (["vicreg", "--set", "n_views=1"], "n_views must be an integer >= 2"),
        (["vicreg", "--set", "min_gap_seconds=5", "--set", "max_gap_seconds=1"], "need finite 0 <= min_gap_seconds <= max_gap_seconds"),
        (["vicreg", "--steps-per-epoch", "-5"],
         "--steps-per-epoch must be a whole number >= 0 and < 2**31 (0: one pass over the training tracks), got -5"),
        # Before: accepted, and the run failed with an OverflowError as it started (an epoch's samples).
        (["vicreg", "--steps-per-epoch", str(10**20)], "--steps-per-epoch must be a whole number >= 0 and < 2**31"),
        # Said with the command's other problems, not alone.
        (["vicreg", "--steps-per-epoch", "-5", "--max-epochs", "0"],
         "error: --max-epochs must be a whole number >= 1, got 0; --steps-per-epoch must be a whole number >= 0"),
        (["vicreg", "--max-epochs", "0"], "error: --max-epochs must be a whole number >= 1, got 0\n"),
        (["vicreg", "--batch-size", "1"], "error: --batch-size must be a whole number >= 2, got 1\n"),
        (["vicreg", "--weight-decay", "nan"], "error: --weight-decay must be >= 0, got nan\n"),
        (["vicreg", "--workers", "-1"], "error: --workers must be a whole number >= 0, got -1\n"),
        (["vicreg", "--lr", "-1"], "error: --lr must be > 0, got -1.0"),
        (["vicreg", "--set", "warmup_epochs=-1"], "warmup_epochs must be >= 0"),
        (["vicreg", "--set", "gradient_clip=0"], "gradient_clip must be > 0"),
        (["vicreg", "--set", "precision=bogus"], "precision must be one of auto, 32-true, bf16-mixed"),
        # Before: accepted, and every run diverged in its first steps (AdamW's eps is 0 in float16).
        (["vicreg", "--set", "precision=16-true"], "precision=16-true holds the weights and AdamW's state in float16"),
        # Before: a traceback (exit 1) once the run folder was made, which was left locked and empty.
        (["vicreg", "--preset", "gpu"], "error: --preset must be one of cpu, paper, got 'gpu'\n"),
        # Before: an empty --out (an unset shell variable) trained into the default folder.
        (["vicreg", "--out", ""], "error: --out is empty; give a folder for the run, or leave the flag out for "
                                  "runs/train/vicreg-<time>\n"),
        (["byol", "--set", "precision=bf16-true"], "precision=bf16-true holds the weights and byol's EMA teacher in "
                                                   "bfloat16"),
        (["vicreg", "--set", "precision=bf16-true"], "precision=bf16-true holds the weights in bfloat16"),
        (["vicreg", "--set", "accelerator=tpu"], "accelerator must be one of auto, cpu, gpu, cuda, mps, got 'tpu'"),
        pytest.param(["vicreg", "--set", "accelerator=gpu"], "torch sees no CUDA device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        pytest.param(["vicreg", "--set", "accelerator=mps"], "accelerator=mps but torch sees no MPS device",
                     marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    ],
)
def test_cli_misuse_exits_2_without_traceback(arguments, message, capsys):
    """In this process (a traceback would be an exception here, failing the test); the next test runs
    one such command as a user does."""
    code, out, err = run_main(main, arguments, capsys)
    assert code == 2, out + err
    assert message in err
    printed = out + err
    assert "mel cache" not in printed and "corpus" not in printed  # before any data


@pytest.mark.parametrize(("arguments", "message"), [
    (["--data", ""], "error: the dataset given is empty (''); give 'corpus', a dataset name"),
    (["--data", "mtat", "--root", ""], "error: --root is empty; give a folder, or leave the flag out"),
])
def test_an_empty_data_flag_is_refused_not_read_as_the_current_folder(arguments, message, tmp_path, monkeypatch,
                                                                     capsys):
    # Before: "" became the current folder, and every audio file under it was indexed and cached.
    (tmp_path / "a.wav").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(main, ["vicreg", *arguments], capsys)
    assert code == 2, out + err
    assert message in err and "mel cache" not in out + err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.wav"]  # no run folder


def test_cli_misuse_in_a_real_process_exits_2_with_one_line():
    completed = subprocess.run(
        [sys.executable, "-m", "musicssl.train", "vicreg", "--set", "var_wieght=1"], capture_output=True, text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("python -m musicssl.train: error: unknown setting 'var_wieght'")
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr


def test_what_does_not_train_does_not_wait_for_lightnings_import():
    """Lightning's import takes seconds (2.5-3 s in a fresh process). The train command's help (its parser, which
    its misuse stops in) and what a search's driver process imports (it never trains) do without it. ``SSLModule``
    is defined on its first use (here, this file's import of it) as the class a module-level definition would
    give: the same object however it is reached, and pickled by name."""
    import pickle

    import lightning.pytorch as pl

    import musicssl.train

    completed = subprocess.run([sys.executable, "-X", "importtime", "-m", "musicssl.train", "--help"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in completed.stderr.splitlines() if "|" in line}
    assert "musicssl.pretext.registry" in imported and "lightning" not in imported
    code = ("import sys, hpsearch.run, hpsearch.trainable, musicssl.train, musicssl.probe\n"
            # and what the driver's untrained reference imports
            "from musicssl.collapse import effective_rank\n"
            "from musicssl.data.views import fixed_segments\n"
            "from musicssl.embeddings import calibrate_batchnorm_on_tracks, embed_tracks\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'lightning'))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout == "[]\n", completed.stdout[-2000:] + completed.stderr[-2000:]

    assert issubclass(SSLModule, pl.LightningModule) and musicssl.train.SSLModule is SSLModule
    assert (SSLModule.__module__, SSLModule.__qualname__) == ("musicssl.train", "SSLModule")
    assert pickle.loads(pickle.dumps(SSLModule)) is SSLModule
    with pytest.raises(AttributeError, match="^module 'musicssl.train' has no attribute 'SSLModul'$"):
        musicssl.train.SSLModul


def _configured(argv: list[str]) -> TrainConfig:
    """The settings ``main(argv)`` trains with (none of it run)."""
    return config_from_args(build_parser().parse_args(argv), given_options(argv))


def test_from_a_run_trains_again_with_its_settings_and_the_changes_given(tmp_path, tonal_dataset, monkeypatch, capsys):
    """``--from RUN`` takes the run's settings (its data, schedule, seed, batch and the method's settings it was
    given): with the torch threads it had, the run is repeated step for step. Flags and --set change single
    settings, a flag given at its default value too; where and how it runs (threads, workers, the folder) is not
    taken from it, nor the preset's head sizes (another --preset gets its own)."""
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    first, again = tmp_path / "first", tmp_path / "again"
    code, out, err = run_main(main, [
        "vicreg", "--data", str(tonal_dataset / "tracks.csv"), "--max-epochs", "2", "--steps-per-epoch", "3",
        "--batch-size", "8", "--threads", "1", "--seed", "5", "--lr", "2e-3", "--workers", "0",
        "--set", "var_weight=7", "--set", "warmup_epochs=0.5", "--set", "probe_segments=32",
        "--set", "probe_segments_per_track=1", "--out", str(first)], capsys)
    assert code == 0, err
    code, out, err = run_main(main, ["--from", str(first), "--threads", "1", "--out", str(again)], capsys)
    assert code == 0, err
    assert f"python -m musicssl.train: training with the settings of the run ({first / 'config.json'})" in out

    recorded, repeated = (json.loads((folder / "config.json").read_text()) for folder in (first, again))
    assert repeated["out_dir"] == str(again) and recorded["trained_from"] is None
    assert repeated["trained_from"] == f"the run ({first / 'config.json'})"
    assert {**repeated, "out_dir": None, "trained_from": None} == {**recorded, "out_dir": None}
    assert (recorded["seed"], recorded["learning_rate"], recorded["warmup_epochs"], recorded["batch_size"]) == (5, 2e-3, 0.5, 8)
    assert recorded["method_config"]["var_weight"] == 7.0 and recorded["method_config"]["hidden_dim"] == 512
    # Step for step: every loss term and collapse metric of every epoch, and the final probe.
    metrics = [pd.read_csv(folder / "metrics.csv") for folder in (first, again)]
    assert len(metrics[0]) == 2
    pd.testing.assert_frame_equal(metrics[0].drop(columns=[c for c in metrics[0] if "second" in c]),
                                  metrics[1].drop(columns=[c for c in metrics[1] if "second" in c]))
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (first, again)]
    assert summaries[1]["probe_map"] == summaries[0]["probe_map"]

    # Changes: a flag at its default value (seed 0) is a change too; --set adds to the method's settings it had.
    changed = _configured(["--from", str(first), "--seed", "0", "--max-epochs", "4", "--set", "cov_weight=3",
                           "--set", "var_weight=2"])
    assert (changed.method, changed.seed, changed.max_epochs, changed.learning_rate) == ("vicreg", 0, 4, 2e-3)
    assert (changed.data, changed.steps_per_epoch, changed.batch_size) == (recorded["data"], 3, 8)
    assert (changed.probe_segments, changed.probe_segments_per_track) == (32, 1)
    assert method_settings(changed).var_weight == 2.0 and method_settings(changed).cov_weight == 3.0
    assert changed.num_threads is None and changed.out_dir.startswith(str(Path("runs") / "train" / "vicreg-"))
    # Another preset gets its own head sizes (the run's came from its preset, not from its --set).
    paper = _configured(["--from", str(first), "--preset", "paper"])
    assert method_settings(paper).hidden_dim == 1024 and method_settings(paper).var_weight == 7.0
    # Other data: the run's own folders (--root, --audio-dir) stay with the run's data.
    other = _configured(["--from", str(first), "--data", "corpus"])
    assert (other.data, other.data_root, other.audio_dir) == ("corpus", None, None)
    # METHOD may be given, if it is the run's.
    assert _configured(["vicreg", "--from", str(first)]).method == "vicreg"

    # It trained on one thread: a run on more is told how to repeat it (said before the run starts; here the
    # folder taken ends it).
    code, out, err = run_main(main, ["--from", str(first), "--out", str(first)], capsys)
    assert code == 2 and "exists and is not empty" in err
    note = ("note: it trained on 1 torch thread, this run on torch's choice "
            f"({torch.get_num_threads()}): give --threads 1 to repeat it step for step")
    assert (note in err) == (torch.get_num_threads() != 1), err


def test_from_takes_the_data_folders_with_the_data(tmp_path):
    """A search's trials record no folders: its best trial's data is the search's (search.json: --data, --root,
    --audio-dir). --data drops the source's folders, which belong to its data; --root alone keeps its data."""
    search = tmp_path / "search"
    search.mkdir()
    (search / "best_config.json").write_text(json.dumps(
        {"trial": 3, "params": {}, "train_config": {"method": "byol", "data": "mtat", "data_root": None, "seed": 2}}))
    (search / "search.json").write_text(json.dumps({"data": "mtat", "root": "/data/mtat", "audio_dir": "/data/audio"}))
    config = _configured(["--from", str(search)])
    assert (config.method, config.seed, config.data, config.data_root, config.audio_dir) == (
        "byol", 2, "mtat", "/data/mtat", "/data/audio")
    assert _configured(["--from", str(search), "--data", "corpus"]).data_root is None
    moved = _configured(["--from", str(search), "--root", "/elsewhere/mtat"])
    assert (moved.data, moved.data_root, moved.audio_dir) == ("mtat", "/elsewhere/mtat", "/data/audio")


@pytest.mark.parametrize(("content", "arguments", "message"), [
    (None, [], "error: give the pretext METHOD (barlow_twins, byol, clustering, contrastive, vicreg), or --from a run "
               "or search folder to train with its settings"),
    (None, ["--from", " "], "error: --from is empty; give a run folder, a search folder or its config file"),
    ("missing", [], "no such file or folder"),
    ("folder", [], "not a run folder (config.json) or a search folder (best_config.json)"),
    ("search", [], "a search with no complete trial yet (no best_config.json)"),
    ("[1, 2]", [], "is not a run's configuration (config.json) or a search's best trial's (best_config.json)"),
    ('{"method": "vicreg", ', [], "cannot read"),
    ('{"method": "vicreg", "learning_rate": 0.01, "stem_width": 3}', [],
     "holds settings this version does not know (stem_width); it was written by another version"),
    ('{"method": "vicreg"}', ["byol"], "trained vicreg, not byol; leave METHOD out"),
    ('{"method": "vicreg", "data": "songs/tracks.csv"}', [],
     "trained on 'songs/tracks.csv' (data), a path relative to where it ran; give --data"),
    ('{"method": "vicreg", "data": "mtat", "data_root": "mtat"}', [], "a path relative to where it ran; give --root"),
    ('{"method": "vicreg", "method_params": {"var_wieght": 1}}', [], "unknown setting 'var_wieght'"),
    ('{"method": "vicreg", "max_epochs": 0}', [], "--max-epochs must be a whole number >= 1, got 0"),
])
def test_from_what_is_not_a_run_exits_2_naming_the_problem(content, arguments, message, tmp_path, capsys):
    """Refused before any data is prepared, in one line."""
    source = tmp_path / "config.json"
    if content == "folder" or content == "search":
        source = tmp_path / "somewhere"
        source.mkdir()
        if content == "search":
            (source / "search.json").write_text("{}")
    elif content is not None and content != "missing":
        source.write_text(content)
    code, out, err = run_main(main, [*arguments, *([] if content is None else ["--from", str(source)])], capsys)
    assert code == 2, out + err
    assert message in err and err.count("\n") == 1 and "mel cache" not in out + err
    if content is not None and content.startswith('{"method": "vicreg", "data": "songs'):  # --data gives it
        assert _configured(["--from", str(source), "--data", "corpus"]).data == "corpus"


@pytest.mark.parametrize("module", ["musicssl.train", "analysis.downstream", "musicssl.corpus", "hpsearch.run",
                                    "analysis.sensitivity"])
def test_ctrl_c_while_the_command_loads_is_one_line(module, tmp_path):
    """torch and Lightning take seconds to load (8 s on a loaded 2-core machine), the corpus builder's
    numpy, scipy and pretty_midi about 2 s: a Ctrl-C then printed the traceback of the import under way.
    Signalled as soon as numpy is loaded (the handler is set before any import of weight; the corpus
    package loads its modules on first use, so that its command can set it first)."""
    from conftest import WITH_CTRL_C

    # Its own cache: were the signal missed, the command would build the default corpus there.
    process = subprocess.Popen([*WITH_CTRL_C, sys.executable, "-m", module, "--out", str(tmp_path / "never")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MUSICSSL_CACHE": str(tmp_path / "cache")}, start_new_session=True)

    def numpy_loaded() -> bool:
        try:
            return "numpy" in Path(f"/proc/{process.pid}/maps").read_text()
        except OSError:
            return False

    try:
        deadline = time.monotonic() + 60
        while not numpy_loaded():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:  # the command and any worker it started, were the signal missed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert (process.returncode, stderr) == (130, f"\npython -m {module}: interrupted\n")
    assert not (tmp_path / "never").exists()


# A sitecustomize for a command run as `python -m`: a Ctrl-C (SIGINT to itself) as the module named by
# CTRL_C_AT_IMPORT begins to load.
CTRL_C_AT_IMPORT_HOOK = """
import os, signal, sys

if sys.argv[:1] == ["-m"] and os.environ.get("CTRL_C_AT_IMPORT"):
    class _CtrlCAtImport:
        def find_spec(self, name, path=None, target=None):
            if name == os.environ["CTRL_C_AT_IMPORT"]:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, _CtrlCAtImport())
"""


@pytest.mark.parametrize(("command", "first_import"), [
    (["hpsearch.run", "vicreg", "--trials", "1", "--name", "never"], "ray.tune"),
    (["musicssl.train", "vicreg", "--out", "never"], "musicssl.data.loaders"),  # with pandas and soundfile
    (["analysis.downstream", "--out", "never"], "musicssl.models"),  # (milliseconds: now before the arguments)
])
def test_ctrl_c_as_the_command_loads_what_it_needs_after_reading_its_arguments_is_one_line(command, first_import,
                                                                                           tmp_path):
    """Reading the arguments ends the one-line handler of the command's loading; what it loads next (Ray Tune for
    the search, seconds; the data's modules for a run, pandas and soundfile among them) came before its own
    handling. Before: a Ctrl-C then printed the traceback of that import (found by the random-stop test of the
    search on a loaded machine). The hook fires at the first import of a module the command loads after parsing
    (not pandas itself: torch asks where pandas is as it loads, before)."""
    from conftest import WITH_CTRL_C

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CTRL_C_AT_IMPORT_HOOK)
    env = {**os.environ, "MUSICSSL_CACHE": str(tmp_path / "cache"), "CTRL_C_AT_IMPORT": first_import,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*WITH_CTRL_C, sys.executable, "-m", *command], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert (done.returncode, done.stderr) == (130, f"\npython -m {command[0]}: interrupted\n"), done.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hooks"]  # no run, no search, no cache


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_cache_write_that_fails_for_room_names_the_cache_and_the_fix(tmp_path, tonal_dataset):
    """A mel shard that cannot be written for want of room (disk full; here the file size limit, the same
    failure: a write that names no file). Before: "error: [Errno 27] File too large", with no path, so no
    word of where or of MUSICSSL_CACHE."""
    # The limit is set by a small Python that then becomes the command (exec), not in a preexec_fn of this
    # threaded process; SIGXFSZ is ignored, so the write fails with EFBIG instead of killing.
    small_files = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000)); os.execv(sys.executable, sys.argv[1:])")
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", small_files, sys.executable, "-m", "musicssl.train", "vicreg", "--data",
               str(tonal_dataset / "tracks.csv"), "--max-epochs", "1", "--batch-size", "8", "--threads", "1",
               "--out", str(tmp_path / "run")]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MUSICSSL_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"})
    last = process.stderr.strip().splitlines()[-1]
    assert process.returncode == 2, process.stderr
    assert last.startswith(f"python -m musicssl.train: error: [Errno {errno.EFBIG}] File too large: '{cache / 'mels'}"), last
    assert last.endswith(f"(in the cache folder {cache}, where corpora and mel caches are kept: set MUSICSSL_CACHE "
                         "to a folder you can write, with room for them)")
    assert not (tmp_path / "run").exists()


def test_a_cache_folder_that_cannot_be_written_is_named_with_the_fix(tmp_path, tonal_dataset, monkeypatch, capsys):
    """Before: "error: [Errno 20] Not a directory: '.../mels'", with no word of MUSICSSL_CACHE."""
    from musicssl import train as train_module

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    arguments = ["vicreg", "--data", str(tonal_dataset / "tracks.csv"), "--max-epochs", "1", "--steps-per-epoch", "3",
                 "--batch-size", "8", "--threads", "1", "--workers", "0", "--out", str(tmp_path / "run")]
    assert train_module.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m musicssl.train: error: ") and error.count("\n") == 1
    assert error.rstrip().endswith(f"(in the cache folder {tmp_path / 'cache'}, where corpora and mel caches are "
                                   "kept: set MUSICSSL_CACHE to a folder you can write, with room for them)")
    assert not (tmp_path / "run").exists()
    # An error with a file descriptor for its file name (os.stat(999)) gets no hint, and no TypeError.
    from musicssl.paths import cache_hint

    assert cache_hint(OSError(9, "Bad file descriptor", 999)) == ""
    assert cache_hint(OSError(9, "Bad file descriptor")) == ""


def test_an_unexpected_error_in_a_run_leaves_no_empty_run_folder(tmp_path, tonal_dataset, monkeypatch):
    """A bug's traceback is shown as it is, but its run folder (and the parents the run made) no longer
    stays behind empty."""
    from musicssl import train as train_module

    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))

    def failing_train(config, **options):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_module, "train", failing_train)
    arguments = ["vicreg", "--data", str(tonal_dataset / "tracks.csv"), "--max-epochs", "1", "--steps-per-epoch", "3",
                 "--batch-size", "8", "--threads", "1", "--workers", "0", "--out", str(tmp_path / "runs" / "a" / "b")]
    with pytest.raises(RuntimeError, match="a bug"):
        train_module.main(arguments)
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_during_training_ends_the_cli_in_one_line_and_leaves_no_run_folder(tmp_path, tonal_dataset,
                                                                                    monkeypatch, capsys):
    """Before: Lightning's sys.exit(1) after its shutdown, no word, an empty run folder left, and
    Ctrl-C left ignored in the process; train() now raises the KeyboardInterrupt it was. The same for
    a SIGTERM during training."""
    from musicssl import train as train_module

    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    step = train_module.SSLModule.training_step

    def interrupted_at_the_second_step(self, batch, batch_idx):
        if self.global_step == 1:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(train_module.SSLModule, "training_step", interrupted_at_the_second_step)
    out = tmp_path / "runs" / "run"
    before = signal.getsignal(signal.SIGINT)
    arguments = ["vicreg", "--data", str(tonal_dataset / "tracks.csv"), "--max-epochs", "1", "--steps-per-epoch", "3",
                 "--batch-size", "8", "--threads", "1", "--workers", "0", "--out", str(out)]

    def main_code() -> int:
        try:
            return train_module.main(arguments)
        except KeyboardInterrupt:  # uncaught, it would end the whole test session
            pytest.fail("the interrupt escaped main()")
        finally:
            if signal.getsignal(signal.SIGINT) is not before:  # left ignored: restore for the other tests
                restored = signal.getsignal(signal.SIGINT)
                signal.signal(signal.SIGINT, before)
                pytest.fail(f"Ctrl-C left at {restored}")

    assert main_code() == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("python -m musicssl.train: interrupted; no run written (a run writes its "
                                            "files when it ends)")
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    # A SIGTERM (a batch scheduler's stop): Lightning's loop raises SIGTERMException, a SystemExit with no
    # code, so the command used to exit 0, as if the run had finished, with an empty run folder.
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def sigterm_at_the_second_step(self, batch, batch_idx):
        if self.global_step == 1:
            raise SIGTERMException
        return step(self, batch, batch_idx)

    monkeypatch.setattr(train_module.SSLModule, "training_step", sigterm_at_the_second_step)
    assert main_code() == 143  # 128 + SIGTERM, as a shell reports a process a SIGTERM ended
    assert "interrupted; no run written" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    monkeypatch.setattr(train_module.SSLModule, "training_step", interrupted_at_the_second_step)
    # Called from Python, train() raises KeyboardInterrupt, not Lightning's SystemExit.
    config = tiny_config("vicreg", tmp_path, data=str(tonal_dataset / "tracks.csv"), steps_per_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress_bar=False)
    assert signal.getsignal(signal.SIGINT) is before
    # Another SystemExit, e.g. Ray Tune's sys.exit(0) in a report when it stops a trial, goes on as it is.
    monkeypatch.setattr(train_module.SSLModule, "training_step", step)

    def stopped_by_the_caller(module, record):
        sys.exit(0)

    with pytest.raises(SystemExit) as stopped:
        train(replace(config, out_dir=str(tmp_path / "other")), epoch_end_hooks=[stopped_by_the_caller],
              progress_bar=False)
    assert stopped.value.code == 0 and type(stopped.value) is SystemExit


def test_a_real_sigterm_ends_the_cli_in_one_line_before_during_and_as_the_run_is_written(tmp_path, tonal_dataset,
                                                                                         monkeypatch, capsys):
    """Before: a SIGTERM while the data were prepared (or during the final probe) ended the process at
    Python's default, without a word and with an empty run folder left; one as the run was written
    left part of it. Now exit 143 with one line; a SIGTERM during the write takes effect once the run
    is whole, and says so."""
    from musicssl import train as train_module

    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    arguments = ["vicreg", "--data", str(tonal_dataset / "tracks.csv"), "--max-epochs", "1", "--steps-per-epoch", "3",
                 "--batch-size", "8", "--threads", "1", "--workers", "0"]

    def sigterm(*_):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):  # it would end the test session
            pytest.fail("SIGTERM is at its default here: it ends the process without a word")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler at its next check, which the sleep gives it

    def main_code(out) -> int:
        try:
            return train_module.main([*arguments, "--out", str(out)])
        except KeyboardInterrupt:  # uncaught, it would end the whole test session
            pytest.fail("the interrupt escaped main()")
        finally:
            now = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
            for signum, handler in zip((signal.SIGTERM, signal.SIGINT), before):
                signal.signal(signum, handler)
            assert now == before, "main() left its signal handlers set"

    check_batch = train_module._check_batch
    monkeypatch.setattr(train_module, "_check_batch", lambda *args: (sigterm(), check_batch(*args)))
    assert main_code(tmp_path / "runs" / "a") == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("python -m musicssl.train: interrupted; no run written (a run writes its "
                                            "files when it ends)")
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    monkeypatch.setattr(train_module, "_check_batch", check_batch)

    # During training: Lightning's handler runs first, then the command's, which stops the step at once.
    step = train_module.SSLModule.training_step

    def sigterm_at_the_second_step(self, batch, batch_idx):
        if self.global_step == 1:
            sigterm()
        return step(self, batch, batch_idx)

    monkeypatch.setattr(train_module.SSLModule, "training_step", sigterm_at_the_second_step)
    assert main_code(tmp_path / "runs" / "b") == 143
    assert "interrupted; no run written" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    monkeypatch.setattr(train_module.SSLModule, "training_step", step)

    # As the run is written: held until it is whole.
    write_csv = train_module._write_csv
    monkeypatch.setattr(train_module, "_write_csv", lambda *args: (sigterm(), write_csv(*args)))
    out = tmp_path / "runs" / "c"
    assert main_code(out) == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"python -m musicssl.train: interrupted as the run ended; it was written to {out}"
    assert sorted(path.name for path in out.iterdir()) == [
        "backbone.pt", "collapse.csv", "config.json", "metrics.csv", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow  # 12-14 s; run when the loader workers' signals or the training's stop change (a SIGTERM to
# the training process is in the fast suite: test_a_real_sigterm_ends_the_cli_in_one_line_before_during_and_as_the_run_is_written)
def test_a_sigterm_to_the_process_group_with_loader_workers_ends_in_one_line(tmp_path, tonal_dataset):
    """A SIGTERM to the whole process group (timeout, scancel, kill -TERM -PGID) reaches the DataLoader workers
    too. Before: they died of it, and torch's check of them raised "DataLoader worker (pid N) is killed by
    signal: Terminated" over the stop: a traceback and exit 1. Now they leave it to the training process."""
    log = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "musicssl.train", "vicreg", "--data", str(tonal_dataset / "tracks.csv"),
               "--max-epochs", "3", "--steps-per-epoch", "2000", "--batch-size", "8", "--threads", "1",
               "--workers", "2", "--set", "probe_segments=16", "--out", str(tmp_path / "run")]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                   env={**os.environ, "MUSICSSL_CACHE": str(tmp_path / "cache")})
        try:
            deadline = time.monotonic() + 240
            workers: list[str] = []
            while len(workers) < 2:  # the loader's workers run once the mel cache is built and training has begun
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
                if "48/48" in log.read_text(errors="replace"):
                    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                             text=True).stdout.split()
            time.sleep(1.0)
            os.killpg(process.pid, signal.SIGTERM)
            assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    err = log.read_text()
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("python -m musicssl.train: interrupted; no run written (a run writes its "
                                            "files when it ends)")
    assert not (tmp_path / "run").exists()
    # A worker lets only the first SIGTERM pass: the second (torch's or multiprocessing's terminate() of a
    # worker that does not end) ends it, so that a stuck worker cannot hang the process's exit.
    worker = ("import os, signal, time; from musicssl.train import _leave_sigterm_to_the_parent as hook; hook(0); "
              "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1); print('alive', flush=True); "
              "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('still alive')")
    done = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (-signal.SIGTERM, "alive\n"), done.stderr[-2000:]


def test_every_setting_that_set_refuses_has_that_flag_and_that_field(tmp_path):
    from musicssl.train import FLAG_OF_SETTING

    parser = build_parser()
    destinations = {action.option_strings[0]: action.dest for action in parser._actions if action.option_strings}
    names = {f.name for f in fields(TrainConfig)}
    for setting, flag in FLAG_OF_SETTING.items():
        assert setting in names and flag in destinations
    # and every flag of a setting is there (a new flag without its entry would let --set contradict it)
    assert set(destinations) - {"-h", "--set", "--from"} == set(FLAG_OF_SETTING.values())  # --from: a whole run's
    # Each flag really sets its field: a distinctive value given through it lands there.
    out = str(tmp_path / "somewhere")
    args = parser.parse_args(["vicreg", "--max-epochs", "7", "--steps-per-epoch", "9", "--batch-size", "5",
                              "--lr", "0.002", "--weight-decay", "0.003", "--seed", "11", "--workers", "1",
                              "--threads", "2", "--out", out, "--preset", "paper"])
    config = config_from_args(args)
    assert (config.max_epochs, config.steps_per_epoch, config.batch_size, config.learning_rate, config.weight_decay,
            config.seed, config.num_workers, config.num_threads, config.out_dir, config.preset) == (
        7, 9, 5, 0.002, 0.003, 11, 1, 2, out, "paper")


def test_a_run_shorter_than_the_teacher_warm_up_is_noted(tmp_path, capsys):
    from musicssl.train import schedule_notes

    # The study's warm-up is 10 epochs; the trainer's default run is 10 epochs: all warm-up.
    notes = schedule_notes(TrainConfig(method="clustering"))
    assert len(notes) == 1 and "never reaches teacher_temperature 0.04" in notes[0]
    assert schedule_notes(TrainConfig(method="clustering", max_epochs=11)) == []
    assert schedule_notes(TrainConfig(method="clustering", method_params={"teacher_warmup_epochs": "2"})) == []
    assert schedule_notes(TrainConfig(method="clustering", method_params={"teacher_warmup_epochs": "0"})) == []
    assert schedule_notes(TrainConfig(method="vicreg", max_epochs=1)) == []
    # In words: 1 epoch, not "1 epochs".
    (note,) = schedule_notes(TrainConfig(method="clustering", max_epochs=1,
                                         method_params={"teacher_warmup_epochs": "1"}))
    assert note.startswith("the teacher temperature warm-up (1 epoch) is not shorter than the run (1 epoch): "), note
    # The CLI prints it before training (here the run then fails on its data: exit 2, both said).
    code, _, err = run_main(main, ["clustering", "--data", str(tmp_path / "missing.csv")], capsys)
    assert code == 2, err
    assert "note: the teacher temperature warm-up (10 epochs)" in err
    assert "missing.csv" in err


def test_the_run_config_names_the_data_by_absolute_paths(tmp_path, monkeypatch):
    """config.json is read from anywhere: paths given relative to the working folder are stored whole;
    dataset names stay names."""
    monkeypatch.chdir(tmp_path)
    config = config_from_args(build_parser().parse_args(["vicreg", "--data", "music/tags.csv"]))
    assert config.data == str(tmp_path / "music" / "tags.csv")
    config = config_from_args(build_parser().parse_args(["vicreg", "--data", "MTAT", "--root", "mtat",
                                                         "--audio-dir", "~/audio"]))
    assert (config.data, config.data_root, config.audio_dir) == (
        "MTAT", str(tmp_path / "mtat"), str(Path("~/audio").expanduser()))


def test_the_cli_trains_on_a_named_dataset_given_its_root(tmp_path, monkeypatch, capsys):
    """``--data mtat --root DIR``: MagnaTagATune as distributed (annotations_final.csv, mp3 folders)."""
    from test_downstream import write_mtat_fixture

    root = tmp_path / "my mtat"
    write_mtat_fixture(root)
    out = tmp_path / "run"
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    command = ["vicreg", "--data", "mtat", "--root", str(root), "--max-epochs", "1", "--steps-per-epoch", "1",
               "--batch-size", "8", "--threads", "1", "--workers", "0", "--set", "probe_segments=16", "--set",
               "probe_segments_per_track=1", "--out", str(out)]
    code, _, err = run_main(main, command, capsys)
    assert code == 0, err[-2000:]
    assert json.loads((out / "config.json").read_text())["data_root"] == str(root)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and 0 <= summary["probe_map"] <= 1
    # Without --root, or with --root for a path, the CLI says which flag is wrong (exit 2, one line).
    for arguments, message in (
        (["--data", "mtat"], "dataset 'mtat' needs --root, the folder that holds its files"),
        (["--data", "msd", "--root", str(root)], "dataset 'msd' needs --audio-dir"),
        (["--data", str(root / "annotations_final.csv"), "--root", str(root)], "--root applies to named datasets"),
        (["--data", "corpus", "--audio-dir", str(root)], "--audio-dir applies to mtat, jamendo-* and msd"),
        # Before: the corpus builder's message, which named --out.
        (["--data", "corpus", "--root", str(root / "annotations_final.csv")],
         f"--root {root / 'annotations_final.csv'} is a file; give a folder (where the corpus is or is built)"),
        (["--data", "mtat", "--root", str(root / "annotations_final.csv")], "is a file; give a folder (the dataset's folder)"),
    ):
        code, _, stderr = run_main(main, ["vicreg", *arguments], capsys)
        assert code == 2 and message in stderr, stderr
        assert stderr.count("\n") == 1


def test_a_batch_larger_than_the_listed_training_tracks_is_refused_before_the_mel_cache_is_built(
        tmp_path, tonal_dataset, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    listed = int((pd.read_csv(tonal_dataset / "tracks.csv")["split"] == "train").sum())
    config = tiny_config("vicreg", tmp_path, data=str(tonal_dataset / "tracks.csv"), batch_size=listed + 1)
    with pytest.raises(ConfigError, match=rf"the data lists {listed} training tracks, fewer than the batch size "
                                          rf"{listed + 1}; lower --batch-size"):
        train(config, progress_bar=False)
    assert not (tmp_path / "cache").exists()
    # No training track at all: no batch size helps (before: "lists 0 training tracks ...; lower --batch-size").
    frame = pd.read_csv(tonal_dataset / "tracks.csv")
    frame = frame[frame["split"] != "train"]
    frame["path"] = [str(tonal_dataset / path) for path in frame["path"]]
    frame.to_csv(tmp_path / "untrained.csv", index=False)
    config = tiny_config("vicreg", tmp_path, data=str(tmp_path / "untrained.csv"))
    with pytest.raises(ConfigError) as refused:
        train(config, progress_bar=False)
    assert str(refused.value) == ("the data lists no training tracks (its splits: test, valid); training uses the "
                                  "tracks whose split is train: mark some so in its split column")
    assert not (tmp_path / "cache").exists()


def test_the_cli_trains_on_a_folder_of_audio_without_tags(tmp_path, tonal_dataset, monkeypatch, capsys):
    # Self-supervised training needs no tags; before, such a folder was refused with a message
    # naming Python arguments (tags_file=, unlabeled=True) that the command line does not have.
    out = tmp_path / "run"
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    command = ["vicreg", "--data", str(tonal_dataset / "audio"), "--max-epochs", "1", "--steps-per-epoch", "1",
               "--batch-size", "8", "--threads", "1", "--set", "probe_segments=16", "--out", str(out)]
    code, _, err = run_main(main, command, capsys)
    assert code == 0, err[-2000:]
    assert "the data has no tags (a folder of audio without a tags file, or a table of tracks without tags, is used without tags)" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and "probe_map" not in summary and summary["probe_skipped"]
    # Recorded, so that an evaluation of the folder with a tags file added later knows its splits were the paths'.
    assert json.loads((out / "config.json").read_text())["training_data_unlabeled"] is True


def test_a_run_on_a_tags_file_with_a_split_group_column_records_that_it_drew_its_splits_by_group(
        tmp_path, tonal_dataset, monkeypatch, capsys):
    # Recorded, so that an evaluation reads its training split again as drawn (a column added later is not).
    frame = pd.read_csv(tonal_dataset / "tracks.csv")
    table = pd.DataFrame({"path": [str(tonal_dataset / path) for path in frame["path"]], "tags": frame["tags"],
                          "split_group": [f"band{number // 2}" for number in range(len(frame))]})
    table.to_csv(tmp_path / "tags.csv", index=False)
    out = tmp_path / "run"
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    command = ["vicreg", "--data", str(tmp_path / "tags.csv"), "--max-epochs", "1", "--steps-per-epoch", "1",
               "--batch-size", "8", "--threads", "1", "--set", "probe_segments=16", "--out", str(out)]
    code, console, err = run_main(main, command, capsys)
    assert code == 0, err[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["training_split_groups"] is True and config["training_data_unlabeled"] is False
    # and said at the start: each group's split by the SHA-256 rule, written out (0.7 / 0.1 / 0.2)
    from test_loaders import recipe_split  # the rule, written out once

    splits = [recipe_split(f"split_group={group}", 0) for group in table["split_group"]]
    assert (f"data: splits drawn by split_group: {table['split_group'].nunique()} group(s) (train {splits.count('train')}, "
            f"valid {splits.count('valid')}, test {splits.count('test')} tracks)") in console


def test_a_dataset_with_no_decodable_file_is_a_clear_error_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """Every file skipped (undecodable, empty): exit 2 with the cache's count of reasons, no traceback."""
    import numpy as np
    import soundfile

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    soundfile.write(folder / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    (folder / "tags.csv").write_text("path,tags\nnoise.wav,rock\nempty.wav,jazz\n")
    out = tmp_path / "run"
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    code, _, err = run_main(main, ["vicreg", "--data", str(folder), "--max-epochs", "1", "--steps-per-epoch", "1",
                            "--batch-size", "2", "--threads", "1", "--workers", "0", "--out", str(out)], capsys)
    assert code == 2, err[-2000:]
    assert "error: none of the 2 tracks of index 'broken' is usable ({'undecodable': 1, 'zero_length': 1})" in err
    assert not out.exists()


def test_one_valid_track_moves_the_collapse_metrics_to_train_and_leaves_out_the_final_probe(tmp_path, capsys):
    """Before: the run trained, then died in the collapse metrics (all segments from one track) and
    wrote nothing; with two, the probe failed after training (no tag both present and absent)."""
    from conftest import write_tonal_dataset

    from musicssl.data.cache import LogMelConfig
    from musicssl.data.index import TrackIndex
    from musicssl.data.pipeline import prepare_data
    from musicssl.train import probe_problem

    index = write_tonal_dataset(tmp_path / "data", num_tracks=12, seconds=10.0)
    tracks = index.tracks.copy()
    tracks["split"] = ["train"] * 10 + ["valid", "test"]
    data = prepare_data(TrackIndex(tracks, index.tag_names, name="one-valid"), LogMelConfig(n_mels=64),
                        cache_dir=tmp_path / "mels", workers=0, verbose=False)
    assert probe_problem(data) == ("the linear probe cannot be scored: no tag has both a positive and a negative "
                                   "among the 1 usable valid track(s)")
    config = tiny_config("vicreg", tmp_path, max_epochs=1, steps_per_epoch=1, batch_size=4, probe_segments=16)
    result = train(config, data=data, progress_bar=False)
    assert "note: no final probe score" in capsys.readouterr().err
    assert result.final["probe_skipped"] == probe_problem(data) and "probe_map" not in result.final
    assert math.isfinite(result.final["collapse_mean_cosine"])  # measured across the training tracks
    assert (tmp_path / "vicreg" / "summary.json").is_file()
    with pytest.raises(ConfigError, match="probe_every_epoch: the linear probe cannot be scored"):
        train(replace(config, probe_every_epoch=True), data=data, progress_bar=False)
    # Two valid tracks of different pitch classes (10 and 11) can be scored, on the tags that tell them apart.
    tracks["split"] = ["train"] * 10 + ["valid", "valid"]
    two = prepare_data(TrackIndex(tracks, index.tag_names, name="two-valid"), LogMelConfig(n_mels=64),
                       cache_dir=tmp_path / "mels", workers=0, verbose=False)
    assert probe_problem(two) is None
    # No valid track at all: named as such.
    tracks["split"] = ["train"] * 11 + ["test"]
    none = prepare_data(TrackIndex(tracks, index.tag_names, name="no-valid"), LogMelConfig(n_mels=64),
                        cache_dir=tmp_path / "mels", workers=0, verbose=False)
    assert probe_problem(none).endswith("both the train and the valid split, and there are 11 and 0")


def test_claim_folder_keeps_two_runs_out_of_one_folder(tmp_path):
    """Two runs started together used to pass the "empty folder" check both and write into one folder, the
    later's files replacing the earlier's (both reported success)."""
    from musicssl.paths import CLAIM_FILE, FolderTaken, claim_folder

    def taken(path):
        return "holds results" if (path / "results.csv").exists() else None

    first = claim_folder(tmp_path / "new" / "out", taken)
    assert first.path == tmp_path / "new" / "out" and first.made == [tmp_path / "new" / "out", tmp_path / "new"]
    assert (first.path / CLAIM_FILE).is_file()
    with pytest.raises(FolderTaken, match="another run is writing its results there now; give another folder"):
        claim_folder(first.path, taken)
    second = claim_folder(first.path, taken, numbered=True)  # a default name: the next number
    third = claim_folder(first.path, taken, numbered=True)
    assert (second.path.name, third.path.name) == ("out-2", "out-3") and second.made == [second.path]
    (first.path / "results.csv").write_text("x\n")
    first.release()
    assert not (first.path / CLAIM_FILE).exists()  # nothing of the lock stays with the results
    with pytest.raises(FolderTaken, match="holds results"):  # free, but its results are kept
        claim_folder(first.path, taken)
    assert claim_folder(first.path, taken, numbered=True).path.name == "out-4"
    # A run that failed before writing removes what its claim made; a folder it found stays.
    second.release(remove_if_unused=True)
    assert not second.path.exists() and third.path.exists()
    with pytest.raises(FolderTaken, match="cannot be made"):  # a problem no number avoids: raised, not looped on
        claim_folder(tmp_path / "file" / "out", lambda path: None if path.parent.is_dir() else "cannot be made",
                     numbered=True)


def test_a_claim_taken_on_a_lock_file_deleted_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """A run releasing its claim deletes the lock file, then closes it. Another that had opened the file just
    before locked it once closed: a lock on a file no longer in the folder, which a third run, making the file
    anew, locked too; two runs held one folder. The lock is taken again on the file now in the folder."""
    import musicssl.paths as paths

    first = paths.claim_folder(tmp_path / "out", lambda path: None)
    real_flock = paths.fcntl.flock
    calls = []

    def release_first_then_flock(handle, operation):  # the first run releases between the open and the lock
        calls.append(operation)
        if len(calls) == 1:
            first.release()
        return real_flock(handle, operation)

    monkeypatch.setattr(paths.fcntl, "flock", release_first_then_flock)
    second = paths.claim_folder(tmp_path / "out", lambda path: None)
    monkeypatch.undo()
    assert len(calls) == 2  # the lock on the deleted file, then the lock on the folder's file
    with pytest.raises(paths.FolderTaken, match="another run is writing its results there now"):
        paths.claim_folder(tmp_path / "out", lambda path: None)  # the third run: refused
    second.release()


def test_a_claim_on_a_file_system_that_cannot_lock_files_goes_ahead_and_says_so(tmp_path, monkeypatch, capsys,
                                                                               caplog):
    """Some NFS or Lustre mounts refuse ``flock`` (ENOLCK): a run there failed with "--out ...: cannot write
    there (No locks available)". It goes ahead, unguarded, and says so. (``flock`` is replaced: no such file
    system can be mounted here.)"""
    import musicssl.paths as paths

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(paths.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="musicssl.paths"):
        claim = paths.claim_folder(tmp_path / "out", lambda path: None)
    assert claim.path == tmp_path / "out" and (claim.path / paths.CLAIM_FILE).is_file()
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / 'out'}: this file system cannot lock files (No locks available); do not write two runs into "
        "this folder at once"]
    claim.release(remove_if_unused=True)
    assert not (tmp_path / "out").exists()
    # The command gets past its --out to its next check (here its data).
    code, _, err = run_main(main, ["vicreg", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "none")],
                            capsys)
    assert code == 2 and "--out" not in err and "none" in err, err


def test_the_cli_refuses_a_folder_another_run_is_writing_into(tmp_path, capsys):
    from musicssl.paths import claim_folder

    # As a run in another process holds it (an flock is held by its open file, so this process's own
    # claim stands for another run's).
    claim = claim_folder(tmp_path / "out", lambda path: None)
    code, _, err = run_main(main, ["vicreg", "--out", str(claim.path)], capsys)
    assert code == 2 and f"--out {claim.path}: another run is writing its results there now" in err
    claim.release()


def test_the_cli_never_writes_into_a_full_folder_and_leaves_none_behind_when_it_fails(tmp_path, monkeypatch,
                                                                                         capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "summary.json").write_text("{}")
    code, _, err = run_main(main, ["vicreg", "--out", str(taken)], capsys)
    assert code == 2 and "exists and is not empty; a run never overwrites another" in err
    assert (taken / "summary.json").read_text() == "{}"
    code, _, err = run_main(main, ["vicreg", "--out", str(taken / "summary.json")], capsys)
    assert code == 2 and f"--out {taken / 'summary.json'}: is a file; give a folder" in err
    # A run that fails (here on its data) removes the run folder it made for itself, parents included.
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(main, ["vicreg", "--data", str(tmp_path / "none")], capsys)
    assert code == 2 and "none" in err and not (tmp_path / "runs").exists()


def test_a_run_folder_on_a_disk_without_room_for_the_run_is_refused_before_training(small_disk, capsys):
    """The run is written when it ends: before, a full disk then lost the training ("could not write
    backbone.pt ... run again")."""
    disk = small_disk(1_000_000)  # the cpu backbone's checkpoint takes 2 MB
    code, out, err = run_main(main, ["vicreg", "--out", str(disk.path / "run"), "--data", "no/such/data.csv"], capsys)
    assert code == 2, err
    assert f"error: --out {disk.path / 'run'}: only 1.0 MB free on its disk, and the run writes about 3.1 MB when " \
           "it ends; free some space or give another --out" in err
    assert list(disk.path.iterdir()) == []


def test_an_unwritable_run_folder_is_refused_before_training(tmp_path):
    (tmp_path / "a-file").write_text("")
    config = tiny_config("vicreg", tmp_path, out_dir=str(tmp_path / "a-file" / "run"))
    # Data that fails when touched: the refusal must come before any data is used, not after the run.
    untouchable = type("Untouchable", (), {"__getattr__": lambda self, name: pytest.fail(f"data.{name} was used")})()
    with pytest.raises(ConfigError, match="cannot write the run folder"):
        train(config, data=untouchable, progress_bar=False)


def test_settings_that_only_some_callers_use_keep_working_and_others_are_refused():
    from musicssl.train import check_config

    check_config(TrainConfig(probe_segments=0, steps_per_epoch=None, num_threads=None, gradient_clip=None))
    with pytest.raises(ConfigError, match=r"batch_size must be a whole number >= 2, got 4.5"):
        check_config(TrainConfig(batch_size=4.5))
    with pytest.raises(ConfigError, match=r"gradient_clip must be > 0 \(none: no clipping\)"):
        check_config(TrainConfig(gradient_clip=0.0))
    with pytest.raises(ConfigError, match=r"probe_segments must be a whole number >= 2 \(0: no collapse metrics\)"):
        check_config(TrainConfig(probe_segments=1))
    # A search's driver may have no GPU while its trials do: it checks the rest only.
    check_config(TrainConfig(accelerator="gpu"), devices=False)


@pytest.mark.parametrize("precision", ["64-true"])
def test_the_per_epoch_probe_runs_on_a_backbone_held_in_another_dtype(precision, tmp_path, tonal_data):
    """Before: with the weights themselves in float64 (or bf16, refused since), the per-epoch probe (what a search
    with ASHA on a probe objective turns on) fed the backbone float32 segments and failed at the end of the first
    epoch."""
    config = tiny_config("vicreg", tmp_path, precision=precision, probe_every_epoch=True, max_epochs=1,
                         steps_per_epoch=2, out_dir=None)
    result = train(config, data=tonal_data, progress_bar=False)
    assert result.final["precision"] == precision
    assert 0.0 < result.epochs[0]["probe_map"] <= 1.0 and 0.0 < result.epochs[0]["probe_auc"] <= 1.0
    # The epoch's probe is the probe's on the trained backbone, with the run's segments per track and seed.
    expected = probe_score(result.backbone, tonal_data, 2, config.seed)
    assert {key: result.epochs[0][key] for key in expected} == pytest.approx(expected, abs=1e-9)
    assert probe_score(result.backbone, tonal_data, 1, config.seed)["probe_map"] != expected["probe_map"]


def test_the_summary_records_the_precision_lightning_trained_in(tmp_path, tonal_data):
    """Before: the one asked for. Lightning trains 16-mixed as bf16-mixed on the CPU (it warns)."""
    config = tiny_config("vicreg", tmp_path, precision="16-mixed", max_epochs=1, steps_per_epoch=1, probe_segments=0,
                         accelerator="cpu")
    with pytest.warns(UserWarning, match="bf16-mixed"):
        result = train(config, data=tonal_data, progress_bar=False)
    assert result.final["precision"] == "bf16-mixed"
    assert json.loads((tmp_path / "vicreg" / "summary.json").read_text())["precision"] == result.final["precision"]


def test_bfloat16_weights_are_refused_for_every_method():
    """Before: precision=bf16-true was accepted for BYOL and clustering, whose EMA teacher then mostly stayed
    where it started (its per-step move rounds away in bf16), and for the other methods, whose small weight
    steps round away too: an AdamW step moves a weight by about the learning rate, and bf16 near 1 holds no
    step below 2**-9 (half of its rounding step below 1, 2**-8)."""
    from musicssl.pretext.base import ema_update_
    from musicssl.train import check_config

    # Why, for every method: AdamW steps of learning rate 1e-4 and 1e-3 (its first step moves each weight by the
    # learning rate, whatever the gradient) on weights of 1, held in bf16 and in float32.
    for lr in (1e-4, 1e-3):
        for dtype, expected in ((torch.bfloat16, 1.0), (torch.float32, 1 - lr)):
            weight = torch.nn.Parameter(torch.ones(4, dtype=dtype))
            weight.grad = torch.full_like(weight, 0.5)
            torch.optim.AdamW([weight], lr=lr, weight_decay=0.0).step()
            assert weight.detach().float().tolist() == pytest.approx([expected] * 4, rel=1e-6), (lr, dtype)

    # Why: one EMA step at BYOL's base rate, written out, with teacher and student held in bf16.
    teacher, student = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    with torch.no_grad():
        student.weight.copy_(teacher.weight + 1e-3)
    teacher, student = teacher.to(torch.bfloat16), student.to(torch.bfloat16)
    before = teacher.weight.detach().clone()
    ema_update_(teacher, student, 0.996)
    unchanged = (teacher.weight == before).float().mean().item()
    assert unchanged > 0.9, unchanged  # a float32 teacher moves every weight, by 4e-6

    for method in available_methods():
        teacher = f" and {method}'s EMA teacher" if method in ("byol", "clustering") else ""
        with pytest.raises(ConfigError, match=rf"precision=bf16-true holds the weights{teacher} in bfloat16, where "
                                              r"AdamW's small steps round away .*use bf16-mixed"):
            check_config(TrainConfig(method=method, precision="bf16-true"))
        check_config(TrainConfig(method=method, precision="bf16-mixed"))


def test_float16_weights_are_refused_for_every_method():
    """Before: precision=16-true was accepted, and runs diverged in their first steps. Why, written out: one
    AdamW step on a float16 weight whose gradient is 1e-3 (its squared-gradient average, 1e-9, and eps, 1e-8,
    are 0 in float16: the step divides by 0); in float32 it moves the weight by the learning rate."""
    from musicssl.train import check_config

    for dtype, expected in ((torch.float16, -math.inf), (torch.float32, 1 - 1e-3)):
        weight = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        weight.grad = torch.full_like(weight, 1e-3)
        torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0).step()
        assert weight.detach().float().tolist() == pytest.approx([expected] * 4, rel=1e-3)
    for method in available_methods():
        with pytest.raises(ConfigError, match="precision=16-true holds the weights and AdamW's state in float16.*use "
                                              r"16-mixed or bf16-mixed \(float32 weights\)$"):
            check_config(TrainConfig(method=method, precision="16-true"))
        check_config(TrainConfig(method=method, precision="bf16-mixed"))
        check_config(TrainConfig(method=method, precision="16-mixed"))


def test_an_explicit_cuda_accelerator_gets_the_gpu_default_precision():
    from musicssl.train import resolve_precision

    assert resolve_precision(TrainConfig(), "cuda", True) == resolve_precision(TrainConfig(), "gpu", True) == (
        "bf16-mixed")
    # Asked of the device itself where not told: here, without a GPU, float32.
    assert resolve_precision(TrainConfig(), "cuda") == ("bf16-mixed" if torch.cuda.is_available()
                                                        and torch.cuda.is_bf16_supported(False) else "32-true")
    assert resolve_precision(TrainConfig(), "cpu") == "32-true"


def test_cli_trains_on_a_track_index(tmp_path, tonal_dataset):
    """As a user runs it, in a process of its own: the one run to its end that way (the other commands
    that train run in the test process), so that a traceback or a hang at the process's exit shows."""
    import resource

    out = tmp_path / "run"
    command = [sys.executable, "-m", "musicssl.train", "barlow_twins", "--data", str(tonal_dataset / "tracks.csv"),
               "--max-epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--threads", "1",
               "--set", "probe_segments=32", "--out"]
    environment = {**os.environ, "MUSICSSL_CACHE": str(tmp_path / "cache")}
    completed = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    assert "barlow_twins: 1 epoch, 2 steps" in completed.stdout
    # Its progress counts the epochs as metrics.csv does, from 1 (Lightning's own bar reads "Epoch 0"). The output
    # is a pipe, not a terminal: plain lines, not a bar redrawn with carriage returns (as in a log file).
    bar = completed.stdout + completed.stderr
    assert "\nEpoch 1/1: 2/2 steps in " in bar and "Epoch 0" not in bar, bar[-2000:]
    assert "\r" not in bar and "mel cache: " in completed.stderr, bar[-2000:]
    assert (out / "backbone.pt").is_file() and (out / "metrics.csv").is_file()
    # Again (the mel cache is built now) with files limited to 1 MB, as a full disk would stop it: the
    # backbone (2 MB) cannot be written. Before: a summary.json that said "complete" next to a truncated
    # backbone.pt, a traceback, and a folder that refused the next run into it. Now one line says why, and
    # nothing is left.
    limited = subprocess.run([*command, str(tmp_path / "limited")], capture_output=True, text=True, timeout=300,
                             env=environment,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (10**6, 10**6)))
    assert limited.returncode == 2, limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr
    assert re.search(r"error: could not write .*limited/backbone.pt \(.*\); no run written there", limited.stderr)
    assert not (tmp_path / "limited").exists()


def test_the_search_objective_is_a_linear_probe_of_mean_segment_embeddings_from_train_to_valid(tonal_data):
    """``probe_score`` (what every search trial maximises) against the protocol written out here with
    sklearn: each track's embedding is the mean over its 4 s segments (starts 125 frames apart, at most
    ``max_segments`` spread evenly, first and last kept), a standardised logistic regression per tag
    is fitted on the train split and scored on the valid split, macro ROC-AUC and mAP over the tags
    with both classes there."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from musicssl.train import probe_score

    torch.manual_seed(0)
    backbone = Backbone(preset="cpu").eval()
    cache, max_segments = tonal_data.cache, 2
    labels = tonal_data.index.labels()
    row = {track_id: position for position, track_id in enumerate(tonal_data.index.track_ids)}

    def embedding(track_id: str) -> np.ndarray:
        starts = list(range(0, cache.frames(track_id) - 126 + 1, 125))
        if len(starts) > max_segments:
            starts = [starts[round(k * (len(starts) - 1) / (max_segments - 1))] for k in range(max_segments)]
        segments = torch.from_numpy(np.stack([cache.get(track_id, start, 126) for start in starts])).float()
        with torch.no_grad():
            return backbone(segments).mean(0).numpy()

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        ids = tonal_data.track_ids(name)
        return np.stack([embedding(t) for t in ids]), labels[[row[t] for t in ids]]

    (train_x, train_y), (valid_x, valid_y) = split("train"), split("valid")
    scaler = StandardScaler().fit(train_x)
    aucs, aps = [], []
    for tag in range(labels.shape[1]):
        if train_y[:, tag].min() == train_y[:, tag].max() or valid_y[:, tag].min() == valid_y[:, tag].max():
            continue
        model = LogisticRegression(C=1.0, max_iter=500).fit(scaler.transform(train_x), train_y[:, tag])
        scores = model.predict_proba(scaler.transform(valid_x))[:, 1]
        aucs.append(roc_auc_score(valid_y[:, tag], scores))
        aps.append(average_precision_score(valid_y[:, tag], scores))
    assert len(aucs) >= 3  # the tonal dataset has tags to score

    result = probe_score(backbone, tonal_data, max_segments=max_segments, seed=0)
    assert result["probe_auc"] == pytest.approx(np.mean(aucs), abs=1e-4)
    assert result["probe_map"] == pytest.approx(np.mean(aps), abs=1e-4)


def test_a_tracks_embedding_is_the_mean_over_the_segments_it_has(tonal_data):
    """embed_tracks (the probe objective's embeddings): a track with fewer segments than the cap is the mean over
    the ones it has, each put through the backbone in eval mode, not a sum over the cap."""
    from musicssl.data.views import track_segments
    from musicssl.embeddings import embed_tracks

    torch.manual_seed(0)
    backbone = Backbone(preset="cpu").eval()
    track = tonal_data.track_ids("train")[0]
    segments = track_segments(tonal_data.cache, track, max_segments=64)
    assert 2 <= len(segments) < 64
    with torch.no_grad():
        expected = torch.stack([backbone(segment[None])[0] for segment in segments]).mean(dim=0)
    (embedding,) = embed_tracks(backbone, tonal_data.cache, [track], max_segments=64)
    assert torch.allclose(torch.from_numpy(embedding), expected, rtol=1e-4, atol=1e-5)


def _segment_counts_in_order(events: list[str], per_track: list) -> list[int]:
    """Per event of embed_tracks, the segments a "read" brought in (0 for an "embed")."""
    counts = iter(len(segments) for segments in per_track)
    return [next(counts) if event == "read" else 0 for event in events]


@pytest.mark.parametrize("max_segments, batch_size", [(2, 7), (4, 256), (None, 5), (1, 4)])
def test_tracks_embedded_a_batch_at_a_time_give_what_all_their_segments_at_once_give(tonal_data, max_segments,
                                                                                     batch_size, monkeypatch):
    """embed_tracks reads the tracks as it embeds them (before, it gathered every segment of every track first:
    on a large dataset's training split, gigabytes per trial). Its result is bit for bit that of the definition
    written out here: all the segments in one tensor, embedded in batches of batch_size, each track the mean of
    its own rows."""
    from musicssl.data.views import track_segments
    from musicssl.embeddings import embed_segments, embed_tracks

    torch.manual_seed(1)
    backbone = Backbone(preset="cpu")
    tracks = tonal_data.track_ids("train")[:9]
    per_track = [track_segments(tonal_data.cache, track, max_segments=max_segments) for track in tracks]
    assert sum(map(len, per_track)) % batch_size  # batches that straddle tracks, and a short last one
    rows = embed_segments(backbone, torch.cat(per_track), batch_size)
    expected = torch.stack([chunk.mean(dim=0) for chunk in torch.split(rows, [len(p) for p in per_track])]).numpy()
    import musicssl.embeddings

    events = []
    read, embed = musicssl.embeddings.track_segments, musicssl.embeddings.embed_segments
    monkeypatch.setattr(musicssl.embeddings, "track_segments", lambda *a, **k: events.append("read") or read(*a, **k))
    monkeypatch.setattr(musicssl.embeddings, "embed_segments", lambda *a, **k: events.append("embed") or embed(*a, **k))
    got = embed_tracks(backbone, tonal_data.cache, tracks, max_segments=max_segments, batch_size=batch_size)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert backbone.training  # left as it was
    # Each track read once, and no more of them read before a batch is embedded than that batch needs.
    assert events.count("read") == len(tracks)
    held = 0
    for event, segments in zip(events, _segment_counts_in_order(events, per_track)):
        held += segments if event == "read" else -batch_size
        assert held < batch_size + max(map(len, per_track)), events


def test_batchnorm_calibrated_on_tracks_a_batch_at_a_time_equals_it_on_all_their_segments(tonal_data):
    """The search's untrained reference measures BatchNorm statistics on 2 segments of every training track; they
    are now read a batch at a time. The running statistics equal calibrate_batchnorm's on all of them at once (the
    same batches: torch.tensor_split's near-equal pieces)."""
    from musicssl.data.views import track_segments
    from musicssl.embeddings import calibrate_batchnorm, calibrate_batchnorm_on_tracks

    tracks = tonal_data.track_ids("train")
    segments = torch.cat([track_segments(tonal_data.cache, track, max_segments=2) for track in tracks])
    for batch_size in (8, 5, len(segments) + 3):
        torch.manual_seed(2)
        whole, streamed = Backbone(preset="cpu"), Backbone(preset="cpu")
        streamed.load_state_dict(whole.state_dict())
        assert calibrate_batchnorm(whole, segments, batch_size) == calibrate_batchnorm_on_tracks(
            streamed, tonal_data.cache, tracks, 2, batch_size)
        buffers = dict(streamed.named_buffers())
        for name, buffer in whole.named_buffers():
            assert torch.equal(buffer, buffers[name]), (batch_size, name)
        assert not streamed.training
    with pytest.raises(ValueError, match="need at least 2 segments"):
        calibrate_batchnorm_on_tracks(Backbone(preset="cpu"), tonal_data.cache, tracks[:1], 1, 4)


def test_a_tracks_segments_capped_are_the_only_ones_read(tonal_data, monkeypatch):
    """track_segments with max_segments (and no silence filter) reads only the segments it keeps: before, a long
    track was read whole to keep 2 of its segments. They are those the cap kept before: every segment, then that
    many spread evenly (first and last included)."""
    from musicssl.data.views import track_segments

    track = max(tonal_data.track_ids("train"), key=tonal_data.cache.frames)
    every = track_segments(tonal_data.cache, track)
    assert len(every) >= 3
    reads = []
    get = type(tonal_data.cache).get
    monkeypatch.setattr(type(tonal_data.cache), "get", lambda self, *args, **kwargs: reads.append(args[1]) or
                        get(self, *args, **kwargs))
    kept = track_segments(tonal_data.cache, track, max_segments=2)
    assert len(reads) == 2
    assert torch.equal(kept, every[np.round(np.linspace(0, len(every) - 1, 2)).astype(int)])
    assert torch.equal(kept, every[[0, len(every) - 1]])


def test_the_collapse_metrics_are_measured_on_fixed_segments_of_the_valid_tracks(tmp_path, tonal_data):
    """probe_segments=64: 64 segments (4 s) cut from the valid tracks' mels, the same every epoch, grouped by the
    track they come from (the metrics that compare segments of one track read the groups)."""
    from musicssl.data.views import probe_positions

    seen = []
    config = tiny_config("vicreg", tmp_path, final_probe=False)
    train(config, data=tonal_data, progress_bar=False, epoch_end_hooks=[
        lambda module, record: seen.append((module.probe_mels.clone(), module.probe_groups.clone()))])
    (mels, groups), (mels_2, groups_2) = seen
    assert torch.equal(mels, mels_2) and torch.equal(groups, groups_2)
    valid = set(tonal_data.track_ids("valid"))
    positions = probe_positions(tonal_data.cache, tonal_data.track_ids("valid"), 64, seed=config.seed)
    assert len(mels) == len(groups) == len(positions) == 64
    frames = mels.shape[-1]
    for mel, (track, start) in zip(mels, positions):
        assert track in valid
        assert torch.equal(mel, torch.from_numpy(tonal_data.cache.get(track, start, frames).copy()).float())
    tracks = [track for track, _ in positions]
    assert len(set(tracks)) > 1
    assert all((groups[i] == groups[j]).item() == (tracks[i] == tracks[j]) for i in range(64) for j in range(64))


def test_a_cpu_runs_record_names_the_instruction_set_torchs_kernels_use():
    """The same run on a CPU with AVX-512 and on one without differs in the last bits, and then takes another
    path (README, "Runs are seeded"): the record names which one the kernels used, ATEN_CPU_CAPABILITY's
    choice included (with it, a machine repeats another's runs)."""
    import subprocess
    import sys

    said = {}
    for capability in ("default", "avx2"):
        done = subprocess.run(
            [sys.executable, "-c", "import torch; from musicssl.train import device_name; "
             "print(device_name(torch.device('cpu')))"],
            capture_output=True, text=True, env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, timeout=120)
        assert done.returncode == 0, done.stderr
        said[capability] = done.stdout.strip()
    assert said["default"] == "cpu (DEFAULT)"
    cpu = Path("/proc/cpuinfo")
    if cpu.is_file() and "avx2" in cpu.read_text().split():  # (where the CPU lacks the one asked, torch keeps its own)
        assert said["avx2"] == "cpu (AVX2)"
