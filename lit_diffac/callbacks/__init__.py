"""Monitoring callbacks for the RL modules, configurable from recipes (``trainer.callbacks``).

(The held-out evaluation is the modules' own ``evaluation`` component: :class:`lit_diffac.evaluation.HeldOutEvaluation`.)

* :class:`SampleGrid` — the same prompts and seeds every time, drawn as an image grid with each prompt and
  its reward written under the image, to every logger through its own image API (TensorBoard ``add_image``,
  W&B-style ``log_image`` with a caption, MLflow, Comet) and optionally PNG files.
* :class:`RLProgressBar` — one tqdm bar over all RL iterations with reward, approx. KL and explained variance;
  the module's console lines (held-out evaluations, "saved value head to …") print with it too.

Recipe fragment::

    trainer:
      callbacks:
        - class_path: lit_diffac.callbacks.SampleGrid
          init_args: {every_n_steps: 50, num_prompts: 8}
        - class_path: lit_diffac.callbacks.RLProgressBar
"""

from lit_diffac.callbacks.periodic import PeriodicCallback
from lit_diffac.callbacks.progress import RLProgressBar
from lit_diffac.callbacks.sample_grid import SampleGrid, annotate_grid, log_grid

__all__ = ["PeriodicCallback", "RLProgressBar", "SampleGrid", "annotate_grid", "log_grid"]
