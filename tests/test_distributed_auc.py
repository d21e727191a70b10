"""The pixel AUC loss under data-parallel training (issue #16): two CPU processes (gloo), each with half of a
global batch, compute the loss of the whole batch and, after data-parallel gradient averaging, its exact gradient:
the same numbers as one process on the global batch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from downstream.losses import SegLoss, all_reduce_sum, distributed_pixel_auc_loss, pixel_auc_loss

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from downstream.losses import SegLoss, distributed_pixel_auc_loss, pixel_auc_loss


    def problem():
        """A conv-1x1 head on features [4, 3, 5, 6] (float64), K = 5 classes: class 4 only in images 2–3 (the second
        process's half), class 3 absent, ignored pixels."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (4, 5, 6), generator=g)
        y[2:, :2, :3] = 4
        y[:, 4, 5] = 255
        w = torch.randn(5, 3, generator=g, dtype=torch.float64)
        return x, y, w


    def logits(w, x):
        return torch.einsum("kc,bchw->bkhw", w, x)


    def run(rank, world, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        x, y, w0 = problem()
        part = slice(2 * rank, 2 * rank + 2)
        w = w0.clone().requires_grad_(True)
        loss = distributed_pixel_auc_loss(logits(w, x[part]), y[part], margin=0.8)
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        grad /= world  # what data-parallel training (DDP, accelerate) does with the gradients
        local = pixel_auc_loss(logits(w0, x[part]), y[part], margin=0.8)  # one process alone
        # SegLoss (train-seg's loss) gathers the moments by itself under a process group of several processes
        v = w0.clone().requires_grad_(True)
        total, parts = SegLoss("aucseg", auc_weight=0.5, margin=0.8)(logits(v, x[part]), y[part])
        total.backward()
        seg_grad = v.grad.clone()
        dist.all_reduce(seg_grad)
        seg_grad /= world
        result = {"loss": float(loss), "grad": grad.tolist(), "local": float(local), "seg_auc": float(parts["auc"]),
                  "seg_ce": float(parts["ce"]), "seg_grad": seg_grad.tolist()}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()


    if __name__ == "__main__":
        out = sys.argv[1]
        mp.spawn(run, args=(2, f"file://{out}/rendezvous", out), nprocs=2, join=True)
''')


def _problem():
    namespace: dict = {}
    exec(WORKER.split("def run(")[0], namespace)  # the same problem() and logits() as the workers
    return namespace["problem"], namespace["logits"]


def test_two_processes_compute_the_loss_and_gradient_of_the_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    problem, logits = _problem()
    x, y, w0 = problem()
    w = w0.clone().requires_grad_(True)
    whole = pixel_auc_loss(logits(w, x), y, margin=0.8)  # one process, the global batch
    whole.backward()
    whole = whole.detach()
    for r in ranks:
        assert r["loss"] == pytest.approx(float(whole), rel=1e-12)
        assert torch.allclose(torch.tensor(r["grad"], dtype=torch.float64), w.grad, rtol=1e-10, atol=1e-13)
        assert r["seg_auc"] == pytest.approx(float(whole), rel=1e-12)
    # each process alone would pair only its own pixels: another number (class 4 is only in the second half)
    assert abs(ranks[0]["local"] - float(whole)) > 1e-3 and abs(ranks[1]["local"] - float(whole)) > 1e-3
    # SegLoss: CE per process (averaged by data-parallel training), λ·AUC of the global batch
    v = w0.clone().requires_grad_(True)
    ce = [SegLoss("ce")(logits(v, x[2 * r:2 * r + 2]), y[2 * r:2 * r + 2])[0] for r in range(2)]
    assert [r["seg_ce"] for r in ranks] == pytest.approx([float(c.detach()) for c in ce], rel=1e-12)
    ((ce[0] + ce[1]) / 2 + 0.5 * pixel_auc_loss(logits(v, x), y, margin=0.8)).backward()
    for r in ranks:
        assert torch.allclose(torch.tensor(r["seg_grad"], dtype=torch.float64), v.grad, rtol=1e-10, atol=1e-13)


def test_without_a_process_group_it_is_the_plain_loss():
    problem, logits = _problem()
    x, y, w = problem()
    z = logits(w, x)
    assert torch.equal(distributed_pixel_auc_loss(z, y), pixel_auc_loss(z, y))
    t = torch.ones(3)
    assert all_reduce_sum(t) is t
