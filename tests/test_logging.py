"""What a user sees and keeps from a run (project issue 18): the module's console lines with the recipes' progress
bar on, metrics in every logger (not only the first), and sample grids in each logger's own image API."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from PIL import Image
from test_callbacks import fit, tiny_evaluation, tiny_module

from lit_diffac.callbacks import RLProgressBar, SampleGrid, log_grid
from lit_diffac.callbacks.sample_grid import grid_caption


# --------------------------------------------------------------------------------------------- console lines

def test_progress_bar_print_reaches_stdout_with_and_without_an_open_bar(capsys):
    """``LightningModule.print`` goes through the bar: before the bar exists and after it is closed Lightning's
    ``TQDMProgressBar.print`` drops the text; :class:`RLProgressBar` prints it."""
    bar = RLProgressBar()
    bar.print("before", "training", sep="-")  # no bar yet (the base evaluation)
    bar.train_progress_bar = bar.init_train_tqdm(total=2)
    bar.print("during training")  # above the open bar
    bar.train_progress_bar.close()
    bar.print("after training")  # bar closed (the final evaluation, saved files)
    out = capsys.readouterr().out
    assert [line for line in ("before-training", "during training", "after training") if line in out] == \
        ["before-training", "during training", "after training"]
    assert out.index("before-training") < out.index("during training") < out.index("after training")

    quiet = RLProgressBar(refresh_rate=0)  # disabled: Lightning prints plainly, and so would this
    quiet.print("plain")
    assert capsys.readouterr().out == "plain\n"


def test_eval_lines_print_with_the_progress_bar_on(dit_backbone, digit_reward, capsys):
    """The README's console lines: the base, periodic and final held-out evaluations with ``RLProgressBar``."""
    module = tiny_module(dit_backbone, digit_reward, evaluation=tiny_evaluation(every_n_iterations=1))
    fit(module, 2, callbacks=[RLProgressBar()])
    out = capsys.readouterr().out
    assert "[eval base @ iteration 0, 0 samples] digit_alignment " in out
    assert "[eval periodic @ iteration 1, 2 samples]" in out
    assert "[eval final @ iteration 2, 4 samples] digit_alignment " in out
    assert "iteration 2/2" in out  # the bar itself is still there
    assert out.index("[eval base") < out.index("[eval periodic") < out.index("[eval final")


def test_value_pretraining_says_where_it_saved_the_head_with_the_progress_bar_on(dit_backbone, digit_reward,
                                                                                   tmp_path, capsys):
    from lit_diffac.modules import ValuePretraining

    path = tmp_path / "head.safetensors"
    module = ValuePretraining(backbone=dit_backbone, rewards=[digit_reward], batch_size=2, minibatch_size=20,
                              evaluation=tiny_evaluation(), output_path=str(path))
    fit(module, 1, callbacks=[RLProgressBar()])
    assert f"saved value head to {path.resolve()}" in capsys.readouterr().out
    assert path.is_file()


# --------------------------------------------------------------------------------------------- several loggers

class RecordingLogger(Logger):
    """A logger with W&B's image API (``log_image(key, images, step, **per_image_lists)``) that records calls."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.images: list[dict] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
        assert isinstance(images, list) and all(len(v) == len(images) for v in kwargs.values())  # as WandbLogger
        self.images.append({"key": key, "images": images, "step": step, **kwargs})


def read_csv_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_logger_gets_the_metrics_and_the_sample_grids(dit_backbone, digit_reward, tmp_path):
    """TensorBoard + CSV + a W&B-like logger in one run: all three get the ``train/…``, ``reward/…`` and
    ``eval/…`` metrics; TensorBoard (``add_image``) and the W&B-like logger (``log_image`` with a caption) get
    the same grid at the same steps; CSV, scalars only, is skipped without a warning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = tiny_module(dit_backbone, digit_reward, evaluation=tiny_evaluation(every_n_iterations=1))
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    table = CSVLogger(str(tmp_path), name="csv")
    recording = RecordingLogger()
    grid = SampleGrid(every_n_steps=1, num_prompts=2, save_png=True)
    with no_grid_warning():
        fit(module, 2, callbacks=[grid], logger=[tensorboard, table, recording])

    # CSV: a second logger, so before issue 18 it got nothing
    rows = read_csv_metrics(Path(table.log_dir) / "metrics.csv")
    columns = set(rows[0])
    for key in ("train/approx_kl", "train/explained_variance", "reward/digit_alignment_mean",
                "eval/digit_alignment", "eval/diversity"):
        assert key in columns, key
    train_steps = sorted({int(r["step"]) for r in rows if r.get("train/approx_kl")})
    eval_steps = sorted({int(r["step"]) for r in rows if r.get("eval/digit_alignment")})
    assert train_steps == [0, 1] and eval_steps == [0, 1, 2]  # iterations; base, periodic, final evaluations
    evals = [float(r["eval/digit_alignment"]) for r in sorted(rows, key=lambda r: int(r["step"]))
             if r.get("eval/digit_alignment")]
    assert evals == pytest.approx([e["eval/digit_alignment"] for e in module.history.evaluations])

    # the W&B-like logger: the same metrics, and the grids with their captions
    recorded = {key for _, metrics in recording.metrics for key in metrics}
    assert {"train/approx_kl", "reward/digit_alignment_mean", "eval/digit_alignment", "eval/diversity"} <= recorded
    assert [(c["key"], c["step"]) for c in recording.images] == [("samples/grid", 0), ("samples/grid", 1),
                                                                  ("samples/grid", 2)]
    prompts = grid.resolve_prompts(module)
    for call in recording.images:
        [image], [caption] = call["images"], call["caption"]
        assert isinstance(image, Image.Image) and image.width >= 2 * 128
        assert caption.startswith(f"iteration {call['step']}: ")
        assert all(p in caption for p in prompts) and caption.count("digit_alignment ") == len(prompts)
    np.testing.assert_array_equal(np.asarray(recording.images[-1]["images"][0]), np.asarray(grid.last_grid))

    # TensorBoard still gets the grids (the same pixels) and the scalars
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    shots = events.Images("samples/grid")
    assert [s.step for s in shots] == [0, 1, 2]
    for shot, call in zip(shots, recording.images):
        pixels = np.asarray(Image.open(io.BytesIO(shot.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(pixels, np.asarray(call["images"][0]))
    assert {"train/approx_kl", "eval/digit_alignment"} <= set(events.Tags()["scalars"])
    assert (Path(tensorboard.log_dir) / "sample_grids" / "iteration_000002.png").is_file()  # PNGs as before


class no_grid_warning:
    """Fails if SampleGrid warns about a logger (CSVLogger must be skipped quietly)."""

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        grid_warnings = [str(w.message) for w in self._caught if "SampleGrid" in str(w.message)]
        assert not grid_warnings, grid_warnings
        return False


# --------------------------------------------------------------------------------------------- image APIs

class FakeMlflowClient:
    """``MlflowClient.log_image`` of MLflow >= 2.12 (``key`` / ``step``) that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def log_image(self, run_id, image, artifact_file=None, key=None, step=None, timestamp=None, synchronous=None):
        self.calls.append((run_id, image, artifact_file, key, step))


class OldMlflowClient(FakeMlflowClient):
    """``MlflowClient.log_image`` before MLflow 2.12: artifact files only."""

    def log_image(self, run_id, image, artifact_file):
        self.calls.append((run_id, image, artifact_file))


class FakeMLFlowLogger(MLFlowLogger):
    """An ``MLFlowLogger`` without mlflow: a fake client as its experiment."""

    def __init__(self, client) -> None:
        Logger.__init__(self)
        self.client = client

    @property
    def experiment(self):
        return self.client

    @property
    def run_id(self) -> str:
        return "run-1"


class NoImagesLogger(RecordingLogger):
    """A logger with no image API at all."""

    log_image = None

    @property
    def experiment(self):
        return object()


def test_log_grid_uses_each_loggers_image_api(tmp_path):
    grid = Image.new("RGB", (8, 6), (10, 20, 30))
    caption = grid_caption(3, ["seven\ndigit_alignment 0.500", "three\ndigit_alignment 0.250"])
    assert caption == "iteration 3: seven, digit_alignment 0.500 | three, digit_alignment 0.250"
    recording, new, old = RecordingLogger(), FakeMlflowClient(), OldMlflowClient()
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    loggers = [tensorboard, recording, FakeMLFlowLogger(new), FakeMLFlowLogger(old),
               CSVLogger(str(tmp_path), name="csv"), NoImagesLogger()]
    noted: set[str] = set()
    with pytest.warns(UserWarning, match="SampleGrid: NoImagesLogger has no image API"):
        how = log_grid(loggers, grid, "samples/grid", 3, caption, noted=noted)
    assert how == ["add_image", "log_image", "mlflow", "mlflow", "skipped", "skipped"]
    assert recording.images == [{"key": "samples/grid", "images": [grid], "step": 3, "caption": [caption]}]
    assert new.calls == [("run-1", grid, None, "samples/grid", 3)]
    assert old.calls == [("run-1", grid, "samples/grid/iteration_000003.png")]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the note about a logger with no image API is given once
        log_grid([NoImagesLogger()], grid, "samples/grid", 4, caption, noted=noted)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    [shot] = events.Images("samples/grid")
    assert shot.step == 3 and (shot.width, shot.height) == (8, 6)


# --------------------------------------------------------------------------------------------- total reward, HParams

def test_reward_statistics_include_the_weighted_total_for_several_rewards():
    import torch

    from lit_diffac.ppo import reward_statistics

    rewards = torch.tensor([[1.0, 10.0], [3.0, 20.0]])
    stats = reward_statistics(rewards, ["a", "b"], torch.tensor([1.0, 0.5]))
    assert stats["reward/total_mean"] == pytest.approx((6.0 + 13.0) / 2)  # 1 + 5, 3 + 10
    assert stats["reward/total_std"] == pytest.approx(3.5)
    assert "reward/total_mean" not in reward_statistics(rewards[:, :1], ["a"])


def test_hparams_tab_gets_the_real_hyperparameters_and_the_final_held_out_accuracy(dit_backbone, digit_reward,
                                                                                   tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    module = tiny_module(dit_backbone, digit_reward, actor_lr=3e-4)
    logger = TensorBoardLogger(tmp_path, name="run", version=0, default_hp_metric=False)
    fit(module, 1, logger=logger)
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"tensors": 0}).Reload()
    content = events.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info for c in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
    hparams = {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in start.hparams.items()}
    assert hparams["actor_lr"] == pytest.approx(3e-4) and hparams["estimator"] == "CriticGAE"
    assert hparams["backbone_class"] == "DiTBackbone" and hparams["rewards"] == "digit_alignment"
    final = module.history.evaluations[-1]["eval/digit_alignment_accuracy"]
    assert [s.value for s in events.Scalars("hp_metric")] == [pytest.approx(final)]  # not a -1 placeholder


def test_summary_averages_each_diagnostic_over_the_iterations_where_it_is_defined():
    """An iteration whose explained variance is undefined (NaN: all rewards equal) does not count for it; a
    diagnostic undefined in every recent iteration stays NaN."""
    import math

    from lit_diffac.history import RunHistory

    history = RunHistory(window=3)
    for ev, loss in ((0.5, 1.0), (math.nan, 2.0), (0.7, 3.0)):
        history.record_iteration({"train/explained_variance": ev, "train/value_loss": loss, "train/x": math.nan})
    summary = history.summary("m", iterations=3, seed=0)
    assert summary["final_explained_variance"] == pytest.approx(0.6)
    assert summary["final_train"]["train/value_loss"] == pytest.approx(2.0)
    assert math.isnan(summary["final_train"]["train/x"])


def test_summary_pools_explained_variance_over_iterations_by_target_variance():
    """With its parts logged, the summary's explained variance is 1 − ΣVar(G − V) / ΣVar(G): an iteration whose
    targets barely vary (EV −9 from a tiny Var(G)) weighs little, where the mean of the ratios would be −2.6."""
    from lit_diffac.history import RunHistory

    history = RunHistory(window=3)
    for err, ret in ((0.5, 1.0), (0.1, 0.01), (0.4, 1.0)):
        history.record_iteration({"train/explained_variance": 1 - err / ret, "train/value_error_var": err,
                                  "train/return_var": ret, "train/explained_variance_late": 0.9,
                                  "train/value_error_var_late": err / 2, "train/return_var_late": ret})
    summary = history.summary("m", iterations=3, seed=0)
    assert summary["final_explained_variance"] == pytest.approx(1 - 1.0 / 2.01)
    assert summary["final_train"]["train/explained_variance"] == pytest.approx(1 - 1.0 / 2.01)
    assert summary["final_train"]["train/explained_variance_late"] == pytest.approx(1 - 0.5 / 2.01)
    assert summary["final_train"]["train/return_var"] == pytest.approx(2.01 / 3)  # the parts stay plain means


def test_value_diagnostics_logs_the_parts_of_each_explained_variance():
    import torch

    from lit_diffac.losses import explained_variance
    from lit_diffac.ppo import value_diagnostics

    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(6, 9, 1, generator=gen)
    values = targets + 0.5 * torch.randn(6, 9, 1, generator=gen)
    out = value_diagnostics(values, targets, ["r"])
    for bucket, sl in (("", slice(0, 9)), ("_early", slice(0, 3)), ("_middle", slice(3, 6)), ("_late", slice(6, 9))):
        g, v = targets[:, sl], values[:, sl]
        assert out[f"train/return_var{bucket}"] == pytest.approx(g.var(unbiased=False).item(), rel=1e-5)
        assert out[f"train/value_error_var{bucket}"] == pytest.approx((g - v).var(unbiased=False).item(), rel=1e-5)
        assert out[f"train/explained_variance{bucket}"] == pytest.approx(
            1 - out[f"train/value_error_var{bucket}"] / out[f"train/return_var{bucket}"], rel=1e-5)
        assert out[f"train/explained_variance{bucket}"] == pytest.approx(explained_variance(v, g).item(), rel=1e-5)
