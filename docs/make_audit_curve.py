"""Regenerate docs/audit-curve.png: a small classifier trained through RemoteLoss with a run id,
then ``lossd audit plot``. Run: ``.venv/bin/python docs/make_audit_curve.py``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from lossd.client import RemoteLoss
from lossd.server.app import create_server
from lossd.server.audit import cli
from lossd.server.config import ServerConfig

OUT = Path(__file__).resolve().parent / "audit-curve.png"


def main(steps: int = 150) -> None:
    with tempfile.TemporaryDirectory() as d:
        running = create_server(
            ServerConfig(port=0, device="cpu", audit_db=f"{d}/audit.sqlite3", audit_capture="all")
        )
        endpoint = f"127.0.0.1:{running.port}"
        torch.manual_seed(0)
        centers = torch.randn(5, 16) * 2
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        crit = RemoteLoss(
            "losses",
            losses=[
                {"criterion": "cross_entropy", "weight": 1.0},
                {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 0.5},
            ],
            endpoint=endpoint,
            run_id="readme-demo",
            tags={"model": "mlp-16-32-5"},
            timeout=60,
        )
        for step in range(steps):
            y = torch.randint(0, 5, (32,))
            x = centers[y] + torch.randn(32, 16) * 3.0
            crit.step = step
            loss = crit({"pred": model(x)}, {"target": nn.functional.one_hot(y, 5).float()})
            opt.zero_grad()
            loss.backward()
            opt.step()
        crit.close()
        assert (
            cli.main(
                [
                    "plot",
                    "readme-demo",
                    "-o",
                    str(OUT),
                    "--endpoint",
                    endpoint,
                    "--title",
                    f"lossd audit plot readme-demo ({steps} steps, losses = CE + 0.5 focal)",
                ]
            )
            == 0
        )
        assert cli.main(["verify", "readme-demo", "--endpoint", endpoint, "--quiet"]) == 0, (
            "verify failed"
        )
        running.stop(0)


if __name__ == "__main__":
    main()
