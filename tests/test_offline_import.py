"""Nothing touches the network at import time, nor when only local folders / toy models are named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import importlib, pkgutil, socket

attempts = []
def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

import lit_diffac
names = [m.name for m in pkgutil.walk_packages(lit_diffac.__path__, "lit_diffac.") if m.name != "lit_diffac.__main__"]
for name in names:
    importlib.import_module(name)
from lit_diffac.backbones import DiTBackbone, UNetBackbone
from lit_diffac.rewards import DigitAlignment
DiTBackbone("toy-dit"), UNetBackbone("toy-unet"), DigitAlignment()
assert not attempts, attempts
print("imported", len(names), "modules offline")
"""


def test_import_and_toy_models_use_no_network():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count = int(done.stdout.split("imported ")[1].split()[0])
    assert count > 30  # every module of the package, not just the top level
