"""A run on a shuffled DataLoader with augmentation, killed with SIGKILL mid-epoch and
resumed, ends with the same parameters as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np, torch
    from torch.utils.data import DataLoader, Dataset
    import gradsift as gs
    from gradsift.data import load_digits
    from gradsift.models import mlp

    class Noisy(Dataset):  # augmentation in the dataset, drawing from torch's RNG
        def __init__(self, x, y):
            self.x, self.y = x, y
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return self.x[i] + 0.05 * torch.randn(self.x.shape[1:]), self.y[i]

    class KillAt(gs.Recorder):
        def __init__(self, step):
            self.at = step
        def on_step(self, sifter, info):
            if info.step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.set_num_threads(1)
    tr, _ = load_digits()
    x, y = tr.tensors()
    loader = DataLoader(Noisy(x[:120], y[:120]), batch_size=16, shuffle=True)
    torch.manual_seed(0)
    model = mlp(64, 10, width=16)
    rec = [KillAt(kill_at)] if kill_at >= 0 else []
    res = gs.fit(model, loader, aggregator="winsorize:c=1", optimizer="sgd:lr=0.1,momentum=0.9", epochs=3,
                 seed=4, run_dir=run_dir, resume=resume, recorders=rec, progress=False)
    torch.save(res.model.state_dict(), os.path.join(run_dir, "final.pt"))
''')


def run(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path, tmp_path / "full", -1, 0)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run(tmp_path, tmp_path / "part", 12, 0)  # 8 steps an epoch: dies in epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "part" / "checkpoint.pt").exists() and not (tmp_path / "part" / "final.pt").exists()
    resumed = run(tmp_path, tmp_path / "part", -1, 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "final.pt")
    b = torch.load(tmp_path / "part" / "final.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
