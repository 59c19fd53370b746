"""Experiment tracking beside TensorBoard: Weights & Biases (config.logging.wandb).

One W&B run per workdir. Its id is made on the first start and kept in WORKDIR/wandb_id,
so everything that writes to that workdir (a resumed training run, a later
`jaxlm.evaluate`, fine-tuning's final scores) continues the same W&B run
(`resume="allow"`). What goes there:

    training (MetricSink)  every logged step's metrics, at that step
    few-shot evaluation    the table (task, metric, k, value, standard error) and the plots
    fine-tuning            the best epoch's validation scores and the plots

W&B keeps one step counter per run that only moves forward, so evaluation results are
logged at the step of the checkpoint they score. Only process 0 talks to W&B. wandb is
optional: config validation refuses logging.wandb=true without it. With
logging.wandb_mode=offline the run is written under WORKDIR/wandb and sent later with
`wandb sync`.
"""

from __future__ import annotations

import math
import pathlib
import secrets

ID_FILE = "wandb_id"


class Tracker:
    """A started W&B run: log(step, metrics), table(...), images(...), close()."""

    def __init__(self, run):
        self.run = run

    def log(self, step: int, metrics: dict) -> None:
        finite = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if finite:
            self.run.log(finite, step=step)

    def table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb
        self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def images(self, step: int, paths: list[pathlib.Path]) -> None:
        import wandb
        found = {f"plots/{p.stem}": wandb.Image(str(p)) for p in paths if p.is_file()}
        if found:
            self.run.log(found, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


def start(cfg, workdir: pathlib.Path, job_type: str, is_writer: bool) -> Tracker | None:
    """The workdir's W&B run, started or continued (None: tracking off, or not process 0).
    `job_type`: train, evaluate or finetune (W&B's grouping of what wrote)."""
    lg = cfg.logging
    if not lg.wandb or not is_writer:
        return None
    import wandb

    from jaxlm import config as config_lib
    from jaxlm import workdir as workdir_lib

    workdir = pathlib.Path(workdir)
    id_path = workdir / ID_FILE
    if id_path.is_file():
        run_id = id_path.read_text().strip()
    else:
        run_id = secrets.token_hex(6)  # W&B ids: lower-case letters and digits
        workdir.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_text(id_path, run_id + "\n")
    run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity or None,
                     name=lg.wandb_name or workdir.resolve().name, id=run_id, resume="allow",
                     dir=str(workdir), mode=lg.wandb_mode, job_type=job_type,
                     config=config_lib.to_dict(cfg))
    return Tracker(run)
