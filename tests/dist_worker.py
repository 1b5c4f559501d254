"""One rank of the distributed tests (started by tests/test_distributed.py through
tests/_dist.py, under torchrun-style environment variables).

    python tests/dist_worker.py compare OUT     train with every aggregator, save parameters
    python tests/dist_worker.py die RUN         rank 1 dies during epoch 2
    python tests/dist_worker.py resume RUN      resume RUN to the end
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import torch

import gradsift as gs
from gradsift.data import load_digits
from gradsift.models import mlp
from gradsift.train import Recorder

AGGREGATORS = ["mean", "clip:max_norm=1+mean", "winsorize:c=2", "m3", "trimmed_mean:fraction=0.1",
               "coordinate_median", "rm3"]
# 121 examples in global batches of 40: the last batch has 1 example, so rank 1's slice is empty
N_TRAIN, BATCH, EPOCHS = 121, 40, 1


def data():
    tr, te = load_digits()
    return tr.subset(np.arange(N_TRAIN)), te.subset(np.arange(60))


def model():
    torch.manual_seed(0)
    return mlp(64, 10, width=16)


class LossLog(Recorder):
    """Per-step losses by example id (a per-example table like the score recorders')."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_step(self, trainer, step):
        for i, loss, out in zip(step.example_ids.tolist(), step.losses.tolist(), step.outputs.argmax(1).tolist()):
            self.rows.append({"step": step.step, "example_id": i, "loss": loss, "pred": out})

    def on_epoch_end(self, trainer, epoch):
        if trainer.run is not None:
            trainer.run.write_table("losses", pd.DataFrame(self.rows))

    def state_dict(self):
        return {"rows": list(self.rows)}

    def load_state_dict(self, state):
        self.rows = list(state["rows"])


def fit(spec: str, run_dir=None, epochs=EPOCHS, distributed=False, comm=None, **kw):
    tr, te = data()
    kwargs = dict(aggregator=spec, optimizer="sgd:lr=0.3,momentum=0.9", epochs=epochs, batch_size=BATCH,
                  seed=1, run_dir=run_dir, recorders=[LossLog(), gs.CoherenceRecorder(m=16), gs.DynamicsRecorder(), gs.TracInRecorder()], progress=False, **kw)
    if distributed:
        return gs.distributed.fit_distributed(model(), tr, te, comm=comm, **kwargs)
    return gs.fit(model(), tr, te, **kwargs)


class DieAt(Recorder):
    def on_step(self, trainer, step):
        if step.epoch == 2 and trainer.comm.rank == 1:
            os._exit(3)


def main() -> None:
    import gradsift.distributed  # noqa: F401

    what, path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    comm = gs.distributed.init_from_env("gloo", timeout_s=30)
    if what == "compare":
        for spec in AGGREGATORS:
            res = fit(spec, run_dir=f"{path}/{spec}", distributed=True, comm=comm)
            if comm.rank == 0:
                torch.save(res.model.state_dict(), f"{path}/{spec}/params.pt")
    elif what == "die":
        tr, te = data()
        gs.distributed.fit_distributed(
            model(), tr, te, comm=comm, aggregator="m3", optimizer="sgd:lr=0.3", epochs=3,
            batch_size=BATCH, seed=1, run_dir=path, recorders=[DieAt()], progress=False)
    elif what == "resume":
        tr, te = data()
        res = gs.distributed.fit_distributed(
            model(), tr, te, comm=comm, aggregator="m3", optimizer="sgd:lr=0.3", epochs=3,
            batch_size=BATCH, seed=1, run_dir=path, progress=False, resume=True)
        if comm.rank == 0:
            torch.save(res.model.state_dict(), f"{path}/params.pt")
    comm.close()


if __name__ == "__main__":
    main()
